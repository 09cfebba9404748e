"""``RemoteModel(local_mode=True)``: Bray's API with the engine in this process, no server.

The same export, store subscription and input checks as the served model; every test
here runs without TorchServe.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
import torch

import bray
from bray.errors import ConfigError, EngineError, InputError, StepConflictError, StepNotFoundError
from tests.models import BranchyPolicy, DictPolicy, PolicyMLP, StepProbe, probe_weights

OBS = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
X = np.ones((2, 4), np.float32)


@pytest.fixture(autouse=True)
def _store(tmp_path):
    bray.init(store=tmp_path / "store", model_store=tmp_path / "model_store")
    yield


def probe(name: str = "probe", step: int = 1, **kwargs) -> bray.RemoteModel:
    net = StepProbe()
    net.load_state_dict(probe_weights(step))
    return bray.RemoteModel(name, model=net, forward_args=(X,), local_mode=True, **kwargs)


def expected(step: int, x: np.ndarray = X) -> np.ndarray:
    """What StepProbe with ``probe_weights(step)`` answers for ``x``."""
    return np.repeat(step * (x.sum(-1, keepdims=True) + 1), 2, axis=-1)


def test_forward_matches_the_module():
    net = PolicyMLP()
    rm = bray.RemoteModel("policy", model=net, forward_args=(OBS,), local_mode=True)
    try:
        out = rm(OBS)
        with torch.no_grad():
            ref = net(torch.from_numpy(OBS)).numpy()
        assert isinstance(out, np.ndarray) and out.shape == (3, 16)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        assert rm.step == 0
    finally:
        rm.close()


def test_batch_true_and_false_shapes():
    rm = probe()
    try:
        assert rm(X).shape == (2, 2)
        single = rm(X[0], batch=False)
        assert single.shape == (2,)
        np.testing.assert_allclose(single, expected(1)[0])
        assert asyncio.run(rm.forward(X[0], batch=False)).shape == (2,)
        assert asyncio.run(rm.forward(X[0])).shape == (2,)  # Bray's default: one sample
        assert asyncio.run(rm.forward(X, batch=True)).shape == (2, 2)
    finally:
        rm.close()


def test_publish_wait_then_every_answer_has_the_new_step():
    rm = probe()
    try:
        out, step = rm(X, return_step=True)
        assert step == 0
        np.testing.assert_allclose(out, expected(1))
        for n in (2, 3):
            handle = rm.publish_weights(probe_weights(n))
            assert handle == rm.step == handle.step
            handle.wait(timeout_s=10)
            out, step = rm(X, return_step=True)
            assert step == handle
            np.testing.assert_allclose(out, expected(n))
    finally:
        rm.close()


def test_publish_numpy_nested_weights_and_an_explicit_step():
    rm = probe()
    try:
        weights = {k: v.numpy() for k, v in probe_weights(7).items()}
        rm.publish_weights(weights, step=10).wait(timeout_s=10)
        out, step = rm(X, return_step=True)
        assert step == 10
        np.testing.assert_allclose(out, expected(7))
        with pytest.raises(StepConflictError):
            rm.publish_weights(weights, step=10)
    finally:
        rm.close()


def test_get_model_has_the_latest_weights():
    rm = probe()
    try:
        rm.publish_weights(probe_weights(5)).wait(timeout_s=10)
        net = rm.get_model()
        assert isinstance(net, StepProbe)
        with torch.no_grad():
            np.testing.assert_allclose(net(torch.from_numpy(X)).numpy(), expected(5))
    finally:
        rm.close()


def test_clone_serves_its_step_while_the_original_moves_on():
    rm = probe(checkpoint_interval=1)
    clones = []
    try:
        for n in (2, 3, 4):
            rm.publish_weights(probe_weights(n)).wait(timeout_s=10)
        opp = rm.clone(step=2)  # step 2 holds probe_weights(3)
        clones.append(opp)
        assert opp.name == "probe-clone-step-2" and opp.local_mode
        out, step = opp(X, return_step=True)
        assert step == 2
        np.testing.assert_allclose(out, expected(3))
        # the clone is a model of its own: it trains on, the original is untouched
        opp.publish_weights(probe_weights(9)).wait(timeout_s=10)
        np.testing.assert_allclose(opp(X), expected(9))
        np.testing.assert_allclose(rm(X), expected(4))
        named = rm.clone(step=1, name="opponent")
        clones.append(named)
        assert named.name == "probe-clone-step-1-opponent"
        np.testing.assert_allclose(named(X), expected(2))
        of_clone = named.clone()
        clones.append(of_clone)
        assert of_clone.name == "probe-clone-step-1-opponent-clone-step-1"
        np.testing.assert_allclose(of_clone(X), expected(2))
        again = rm.clone(step=1, name="opponent")
        clones.append(again)
        assert again.name == named.name and again.step == named.step
    finally:
        for m in (rm, *clones):
            m.close()


def test_get_model_of_a_clone_without_the_module():
    rm = probe()
    try:
        rm.publish_weights(probe_weights(4)).wait(timeout_s=10)
        opp = rm.clone()
        opp._model = None  # as an actor that never saw the trainer's class
        net = opp.get_model()
        with torch.no_grad():
            out = net(torch.from_numpy(X))
        np.testing.assert_allclose(np.asarray(out), expected(4))
        opp.close()
    finally:
        rm.close()


def test_dict_and_keyword_inputs_and_nested_outputs():
    net = DictPolicy()
    obs = {"x": np.ones((5, 4), np.float32), "y": np.full((5, 2), 0.5, np.float32)}
    mask = np.ones((5, 3), np.float32)
    rm = bray.RemoteModel("dict", model=net, forward_args=(obs,), forward_kwargs={"mask": mask}, local_mode=True)
    try:
        out = rm(obs, mask=mask)
        with torch.no_grad():
            ref = net({k: torch.from_numpy(v) for k, v in obs.items()}, mask=torch.from_numpy(mask))
        assert set(out) == {"logits", "value"}
        assert isinstance(out["value"], tuple) and out["value"][0].shape == (5, 1)
        np.testing.assert_allclose(out["logits"], ref["logits"].numpy(), rtol=1e-5, atol=1e-6)
        one = rm({k: v[0] for k, v in obs.items()}, batch=False, mask=mask[0] * 0)
        assert one["logits"].shape == (3,) and one["value"][0].shape == (1,)
        np.testing.assert_allclose(one["logits"], 0.0)
    finally:
        rm.close()


def test_attach_without_model_and_override_false(tmp_path):
    rm = probe()
    rm.publish_weights(probe_weights(6)).wait(timeout_s=10)
    rm.close()
    attached = bray.RemoteModel("probe", local_mode=True)
    try:
        np.testing.assert_allclose(attached(X), expected(6))
    finally:
        attached.close()
    kept = probe(step=1, override_model=False)  # reuses the store: no new step, weights of step 1 kept
    try:
        assert kept.step == 1
        np.testing.assert_allclose(kept(X), expected(6))
    finally:
        kept.close()


def test_clear_errors():
    with pytest.raises(ConfigError, match="use_onnx"):
        bray.RemoteModel("bad", model=StepProbe(), forward_args=(X,), use_onnx="yes", local_mode=True)
    with pytest.raises(ConfigError, match="forward_args"):
        bray.RemoteModel("bad", model=StepProbe(), local_mode=True)
    with pytest.raises(StepNotFoundError, match="no model named 'nobody'"):
        bray.RemoteModel("nobody", local_mode=True)
    rm = probe()
    try:
        with pytest.raises(InputError, match=r"4"):
            rm(np.ones((2, 5), np.float32))
    finally:
        rm.close()


@pytest.mark.parametrize("use_onnx", ["infer", "train", "quantize"], ids=["onnx", "onnx-weights-as-inputs", "onnx-int8"])
def test_onnx_matches_torch(use_onnx):
    pytest.importorskip("onnxruntime")
    net = PolicyMLP()
    rm = bray.RemoteModel("policy", model=net, forward_args=(OBS,), use_onnx=use_onnx, local_mode=True)
    try:
        with torch.no_grad():
            ref = net(torch.from_numpy(OBS)).numpy()
        tol = 0.1 if use_onnx == "quantize" else 1e-4
        np.testing.assert_allclose(rm(OBS), ref, rtol=tol, atol=tol)
        if use_onnx == "train":  # Bray's "train": the weights are graph inputs, so a new step needs no new session
            assert rm.transport.engine._mode == "inputs"
    finally:
        rm.close()


def test_tuple_inputs_and_server_checks_in_local_mode():
    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, pair):
            return self.lin(pair[0]) - self.lin(pair[1])

    rm = bray.RemoteModel("pair", model=Pair(), forward_args=((X, X),), local_mode=True)
    try:
        np.testing.assert_allclose(rm((X, X * 0)), rm.get_model()((torch.from_numpy(X), torch.zeros(2, 4))).detach().numpy(),
                                   rtol=1e-6)
        assert rm((X[0], X[0]), batch=False).shape == (2,)
        # the server's checks, not a silent cast
        with pytest.raises(InputError, match="dtype float64, expected float32"):
            rm((X.astype(np.float64), X))
    finally:
        rm.close()


def test_one_key_file_per_inference_address(tmp_path):
    """Refused where the nodes are read (bray.init), before any model is made."""
    with pytest.raises(ConfigError, match=r"2 key files for 3 inference address\(es\).*BRAY_KEY_FILE"):
        bray.init(store=tmp_path / "s", inference_url="http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3",
                  key_file=f"{tmp_path}/a.json,{tmp_path}/b.json")


def test_concurrent_clones_of_one_step_give_one_model():
    import threading

    rm = probe(checkpoint_interval=1)
    rm.publish_weights(probe_weights(3)).wait(timeout_s=10)
    made, errors = [], []

    def clone() -> None:
        try:
            made.append(rm.clone(step=0))
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=clone) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert {m.name for m in made} == {"probe-clone-step-0"}
        for m in made:
            np.testing.assert_allclose(m(X), expected(1))
    finally:
        for m in (rm, *made):
            m.close()


def test_publish_step_minus_one_is_the_next_step():
    rm = probe()
    try:
        assert rm.publish_weights(probe_weights(2), step=-1) == 1  # Bray's default value
        assert rm.publish_weights(probe_weights(3), -1) == 2
        rm.publish_weights(probe_weights(4), step=7).wait(timeout_s=10)
        assert rm.publish_weights(probe_weights(5)) == 8
    finally:
        rm.close()


def test_clones_of_two_models_with_one_suffix_do_not_collide():
    a, b = probe("a", step=10, checkpoint_interval=1), probe("b", step=20, checkpoint_interval=1)
    made = []
    try:
        a.publish_weights(probe_weights(11)).wait(timeout_s=10)  # a: step 1
        made += [a.clone(1, "opp"), b.clone(0, "opp")]
        assert [m.name for m in made] == ["a-clone-step-1-opp", "b-clone-step-0-opp"]
        np.testing.assert_allclose(made[0](X), expected(11))
        np.testing.assert_allclose(made[1](X), expected(20))  # b's weights, not a's
        assert a.store.clone_origin("b-clone-step-0-opp") == ("b", 0)
    finally:
        for m in (a, b, *made):
            m.close()


def test_a_clone_name_taken_by_another_source_or_step_is_an_error():
    rm = probe("m", checkpoint_interval=1)
    made = []
    try:
        for n in (2, 3):
            rm.publish_weights(probe_weights(n)).wait(timeout_s=10)
        made.append(rm.clone(1))  # m-clone-step-1
        made.append(made[0].clone(1))  # its own clone of step 1: m-clone-step-1-clone-step-1
        # the same name reached another way: model m at step 1 with the suffix "clone-step-1"
        with pytest.raises(ConfigError, match=r"already names a clone of 'm-clone-step-1' at step 1, not of 'm' at "
                                              r"step 1; clone with another name= suffix"):
            rm.clone(1, "clone-step-1")
        other = bray.RemoteModel("m-clone-step-2", model=StepProbe(), forward_args=(X,), local_mode=True)
        made.append(other)  # a model of its own whose name looks like a clone's
        with pytest.raises(ConfigError, match="already a model of its own"):
            rm.clone(2)
    finally:
        for m in (rm, *made):
            m.close()


def test_bray_values_for_local_mode_and_checkpoint_interval():
    with pytest.raises(ConfigError, match="local_mode must be True, False or 'proxy', got 'yes'"):
        bray.RemoteModel("bad", model=StepProbe(), forward_args=(X,), local_mode="yes")
    rm = probe()  # checkpoint_interval=None: Bray's every 10 minutes, the first step kept
    try:
        assert (rm.store.checkpoint_interval, rm.store.checkpoint_interval_s) == (0, 600.0)
        rm.publish_weights(probe_weights(2)).wait(timeout_s=10)
        assert rm.store.checkpoint_steps("probe") == [0]
    finally:
        rm.close()
    grown = probe("grown", checkpoint_interval=2.1)
    try:
        assert (grown.store.checkpoint_interval, grown.store.checkpoint_interval_s) == (2.1, 0.0)
    finally:
        grown.close()


def test_the_seen_step_only_rises_whatever_threads_race() -> None:
    """Answers arriving on many threads at once never lower the step sent as X-Bray-Min-Step."""
    import random
    import threading

    from bray.bridge.transport import Watermark

    mark = Watermark()
    steps = list(range(20_000))
    random.Random(7).shuffle(steps)
    chunks = [steps[i::8] for i in range(8)]
    start = threading.Barrier(8)

    def answer(chunk: list[int]) -> None:
        start.wait()
        for step in chunk:
            mark.advance(step)

    threads = [threading.Thread(target=answer, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mark.value == max(steps)


# --- modules torch.export refuses (data-dependent control flow) --------------------------

POS = np.ones((2, 4), np.float32)  # x.sum() > 0: BranchyPolicy answers lin(x)
NEG = -POS  # else -lin(x)


def _module_answers(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def test_local_mode_runs_a_module_torch_export_refuses(caplog):
    net = BranchyPolicy()
    with caplog.at_level(logging.WARNING, logger="bray.export"):
        rm = bray.RemoteModel("branchy", model=net, forward_args=(POS,), local_mode=True)
    try:
        assert [r.getMessage().count("\n") for r in caplog.records] == [0]  # one line, no trace
        for x in (POS, NEG):  # both branches give the module's answers
            np.testing.assert_allclose(rm(x), _module_answers(net, x), rtol=1e-6, atol=1e-6)
        new = BranchyPolicy()
        rm.publish_weights(new.state_dict()).wait(timeout_s=10)
        np.testing.assert_allclose(rm(NEG), _module_answers(new, NEG), rtol=1e-6, atol=1e-6)
        rm._model = None  # as a process that never saw the module: rebuilt from its class
        np.testing.assert_allclose(_module_answers(rm.get_model(), POS), _module_answers(new, POS), rtol=1e-6)
    finally:
        rm.close()
    attached = bray.RemoteModel("branchy", local_mode=True)  # no module here: the eager definition
    try:
        np.testing.assert_allclose(attached(NEG), _module_answers(new, NEG), rtol=1e-6, atol=1e-6)
    finally:
        attached.close()


def test_local_mode_runs_a_refused_module_whose_class_no_server_could_import():
    class InAFunction(BranchyPolicy):
        pass

    net = InAFunction()
    rm = bray.RemoteModel("script", model=net, forward_args=(POS,), local_mode=True)
    try:
        for x in (POS, NEG):
            np.testing.assert_allclose(rm(x), _module_answers(net, x), rtol=1e-6, atol=1e-6)
    finally:
        rm.close()


def test_onnx_with_a_module_torch_export_refuses_says_use_the_torch_engine():
    with pytest.raises(EngineError, match="serve it with the torch engine") as info:
        bray.RemoteModel("branchy", model=BranchyPolicy(), forward_args=(POS,), use_onnx="infer", local_mode=True)
    assert info.value.__cause__ is None and "\n" not in str(info.value)
