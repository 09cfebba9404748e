"""The TensorRT engine against the torch module: same answers, and refit changes them.

Needs a CUDA GPU and the ``tensorrt`` package; skipped elsewhere with the reason shown.
The engine is built once for the module (building is the slow part) from the policy
MLP's ONNX export; refits then install other steps' weights without a rebuild.

TensorRT runs float32 layers in TF32 on Ampere and later by default, so answers are
compared with a tolerance that admits TF32 rounding (10-bit mantissa products).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from bray.errors import EngineError
from bray.export import export_model, load_spec
from bray.handlers.engines import EngineOptions, get_engine
from bray.handlers.follower import StepFollower
from bray.store import CheckpointStore
from tests.models import PolicyMLP

pytestmark = pytest.mark.gpu

NAME = "trt-policy"
OBS = 64
RTOL, ATOL = 2e-2, 2e-3


def _require_tensorrt() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none found")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("needs TensorRT; pip install 'bray-serve[tensorrt]' on a CUDA machine")


def policy_weights(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    shapes = {k: tuple(v.shape) for k, v in PolicyMLP().state_dict().items()}
    return {k: rng.uniform(-0.1, 0.1, s).astype(np.float32) for k, s in shapes.items()}


def torch_answer(step: int, x: np.ndarray) -> np.ndarray:
    module = PolicyMLP().eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in policy_weights(step).items()})
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> CheckpointStore:
    _require_tensorrt()
    s = CheckpointStore(tmp_path_factory.mktemp("trt-store"), keep_last=5)
    export_model(PolicyMLP().eval(), (torch.zeros(2, OBS),), dest=s.export_dir(NAME), onnx=True)
    s.publish(NAME, policy_weights(1), step=1)
    return s


@pytest.fixture(scope="module")
def engine(store: CheckpointStore) -> Iterator[object]:
    export_dir: Path = store.export_dir(NAME)
    eng = get_engine("tensorrt").load(export_dir, load_spec(export_dir),
                                      EngineOptions(device="cuda:0", extra={"max_batch": 64}))
    eng.set_weights(policy_weights(1))
    try:
        yield eng
    finally:
        eng.close()


@pytest.mark.parametrize("batch", [1, 7, 64], ids=["batch-1", "batch-7", "batch-64"])
def test_tensorrt_answers_like_torch(engine: object, batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, OBS), dtype=np.float32)
    (y,) = engine.forward([x])
    assert y.shape == (batch, 16) and y.dtype == np.float32
    np.testing.assert_allclose(y, torch_answer(1, x), rtol=RTOL, atol=ATOL)


def test_refit_changes_the_answers_without_a_rebuild(engine: object) -> None:
    x = np.random.default_rng(0).standard_normal((5, OBS), dtype=np.float32)
    (before,) = engine.forward([x])
    engines_before = list(engine._engines)  # noqa: SLF001 - the same engines, refitted
    prepared = engine.prepare_weights(policy_weights(2))
    (still,) = engine.forward([x])  # prepared, not swapped: the old weights still serve
    np.testing.assert_array_equal(still, before)
    engine.swap(prepared)
    (after,) = engine.forward([x])
    assert not np.allclose(after, before, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(after, torch_answer(2, x), rtol=RTOL, atol=ATOL)
    assert all(a is b for a, b in zip(engine._engines, engines_before))  # noqa: SLF001
    # and back again: both buffers of the double-buffered engine refit correctly
    engine.set_weights(policy_weights(3))
    (third,) = engine.forward([x])
    np.testing.assert_allclose(third, torch_answer(3, x), rtol=RTOL, atol=ATOL)


def test_wrong_shaped_weights_are_refused_and_the_old_ones_keep_serving(engine: object) -> None:
    x = np.random.default_rng(1).standard_normal((3, OBS), dtype=np.float32)
    engine.set_weights(policy_weights(4))
    bad = dict(policy_weights(5))
    bad["net.0.weight"] = np.zeros((8, OBS), np.float32)
    with pytest.raises(EngineError, match="shape"):
        engine.prepare_weights(bad)
    (y,) = engine.forward([x])
    np.testing.assert_allclose(y, torch_answer(4, x), rtol=RTOL, atol=ATOL)


def test_follower_hot_reloads_a_tensorrt_engine_from_the_store(store: CheckpointStore, engine: object) -> None:
    follower = StepFollower(store, NAME, engine)
    try:
        assert follower.start() == store.latest(NAME)
        new = store.publish(NAME, policy_weights(6))
        assert follower.wait_staged(new, timeout_s=30)
        assert follower.swap_if_pending() == new
        x = np.random.default_rng(2).standard_normal((4, OBS), dtype=np.float32)
        (y,) = engine.forward([x])
        np.testing.assert_allclose(y, torch_answer(new, x), rtol=RTOL, atol=ATOL)
    finally:
        follower.close()
