"""A module ``torch.export`` refuses (data-dependent control flow), served eagerly by a real TorchServe.

The export records the module's class (``tests.models:BranchyPolicy``) and its
constructor arguments; TorchServe's workers rebuild it with importlib, so the server is
started with this repository on its ``PYTHONPATH`` (TorchServe passes its own
environment's ``PYTHONPATH`` on to the workers), as a user's server would have the
package that defines the policy installed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import bray
from bray.errors import ManagementError
from tests.models import BranchyPolicy
from tests.serving import init_for, unregister_all

REPO = Path(__file__).resolve().parents[2]
POS = np.ones((2, 4), np.float32)  # x.sum() > 0: BranchyPolicy answers lin(x)
NEG = -POS  # else -lin(x)


def _module_answers(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def test_a_module_torch_export_refuses_is_served_eagerly_and_follows_published_steps(
        torchserve_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = torchserve_factory(extra_env={"PYTHONPATH": str(REPO)})
    init_for(server, tmp_path / "store")
    net = BranchyPolicy(actions=3)
    made: list[bray.RemoteModel] = []
    try:
        with caplog.at_level(logging.WARNING, logger="bray.export"):
            rm = bray.RemoteModel("branchy", model=net, forward_args=(POS,), num_workers=1)
        made.append(rm)
        (line,) = [r.getMessage() for r in caplog.records if r.name == "bray.export"]
        assert "\n" not in line and "serving it eagerly" in line and "tests.models:BranchyPolicy" in line
        assert rm.engine_name == "torch" and (rm.store.export_dir("branchy") / "eager.json").is_file()
        for x in (POS, NEG):  # both branches, as the module answers them
            out, step = rm(x, return_step=True)
            assert step == 0
            np.testing.assert_allclose(out, _module_answers(net, x), rtol=1e-5, atol=1e-6)
        new = BranchyPolicy(actions=3)
        handle = rm.publish_weights(new.state_dict())
        handle.wait(timeout_s=60)
        for x in (NEG, POS):
            out, step = rm(x, return_step=True)
            assert step == handle
            np.testing.assert_allclose(out, _module_answers(new, x), rtol=1e-5, atol=1e-6)
        attached = bray.RemoteModel("branchy")  # another caller, without the trainer's module
        made.append(attached)
        np.testing.assert_allclose(attached(NEG), _module_answers(new, NEG), rtol=1e-5, atol=1e-6)
        rebuilt = attached.get_model()  # rebuilt from eager.json, with the latest weights
        assert type(rebuilt) is BranchyPolicy
        np.testing.assert_allclose(_module_answers(rebuilt, POS), _module_answers(new, POS), rtol=1e-6)
    finally:
        for m in made:
            m.close()
        unregister_all(server, {"branchy"})


def test_a_server_that_cannot_import_the_class_is_named_as_the_likely_reason(
        torchserve_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = torchserve_factory(extra_env={"PYTHONPATH": ""})  # tests.models is not importable there
    init_for(server, tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger="bray"), pytest.raises(ManagementError, match="Failed to start"):
        bray.RemoteModel("branchy", model=BranchyPolicy(), forward_args=(POS,), num_workers=1, timeout_s=30)
    hints = [r.getMessage() for r in caplog.records if "could not register" in r.getMessage()]
    assert len(hints) == 1 and "eager.json" in hints[0] and "PYTHONPATH" in hints[0]
    # The worker's own reason: the front end writes the worker's output to model_log.log on a
    # thread of its own, so under load the line can land after the registration failed.
    deadline = time.monotonic() + 30
    while "make tests.models importable" not in (model_log := (server.log_dir / "model_log.log").read_text()):
        assert time.monotonic() < deadline, f"the worker's reason never reached model_log.log: {model_log[-2000:]}"
        time.sleep(0.1)
