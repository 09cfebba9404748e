"""EngineHandler with a tiny real model, a real store and TorchServe's own Context."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ts.context import Context, RequestProcessor

from bray import wire
from bray.export import export_model
from bray.handlers.options import ServingConfig, ServingOptions
from bray.handlers.handler import STEP_HEADER, EngineHandler
from bray.store import CheckpointStore
from tests.models import DictPolicy, PolicyMLP, StepProbe, probe_weights


def make_context(model_dir: Path, cfg: ServingConfig) -> Context:
    return Context("m", str(model_dir), {}, 32, None, "0.12.0", model_yaml_config=cfg.to_model_yaml())


def run(handler: EngineHandler, ctx: Context, bodies: list[object]) -> list[tuple[int, dict[str, str], object]]:
    """One TorchServe batch: returns (status, headers, decoded body) per request."""
    ctx.request_processor = [RequestProcessor({}) for _ in bodies]
    out = handler.handle([{"body": b} for b in bodies], ctx)
    assert len(out) == len(bodies)
    answers = []
    for idx, body in enumerate(out):
        status, _ = ctx.get_response_status(idx)
        headers = ctx.get_response_headers(idx)
        if isinstance(body, (bytes, bytearray)):
            value = wire.decode(body)
        else:
            value = json.loads(body)
        answers.append((status or 200, headers, value))
    return answers


@pytest.fixture()
def probe_store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "store", keep_last=3)
    export_model(StepProbe(), (torch.zeros(2, 4),), dest=store.export_dir("probe"), onnx=True)
    store.publish("probe", probe_weights(1), step=1)
    return store


def probe_handler(store: CheckpointStore, tmp_path: Path, **cfg: object) -> tuple[EngineHandler, Context]:
    step = int(cfg.pop("step", -1))  # type: ignore[call-overload]
    config = ServingConfig(name="probe", store=str(store.root), step=step,
                           options=ServingOptions(**cfg))  # type: ignore[arg-type]
    ctx = make_context(tmp_path / "mar", config)
    (tmp_path / "mar").mkdir(exist_ok=True)
    handler = EngineHandler()
    handler.initialize(ctx)
    return handler, ctx


def expected_probe(step: int, x: np.ndarray) -> np.ndarray:
    return np.repeat(step * (x.sum(-1, keepdims=True) + 1), 2, axis=-1)


def wait_for_step(handler: EngineHandler, step: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while handler.follower.staged_step < step and time.monotonic() < deadline:
        time.sleep(0.01)


ENGINES = [
    pytest.param({"engine": "torch"}, id="torch"),
    pytest.param({"engine": "onnx"}, id="onnx-initializers"),
    pytest.param({"engine": "onnx", "onnx_weights": "inputs"}, id="onnx-inputs"),
]


@pytest.mark.parametrize("cfg", ENGINES)
def test_binary_and_json_requests_in_one_batch(probe_store: CheckpointStore, tmp_path: Path, cfg: dict) -> None:
    handler, ctx = probe_handler(probe_store, tmp_path, **cfg)
    try:
        x1 = np.arange(8, dtype=np.float32).reshape(2, 4)
        x2 = np.ones((3, 4), dtype=np.float32)
        answers = run(handler, ctx, [bytearray(wire.encode({"args": [x1]})), x2.tolist(), {"args": [x1[:1].tolist()]}])
        (s1, h1, y1), (s2, _, y2), (s3, _, y3) = answers
        assert (s1, s2, s3) == (200, 200, 200)
        assert h1[STEP_HEADER] == "1"
        np.testing.assert_allclose(y1, expected_probe(1, x1), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(y2), expected_probe(1, x2), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(y3), expected_probe(1, x1[:1]), rtol=1e-5)
    finally:
        handler.close()


BAD = [
    pytest.param(b"", "empty", id="empty-body"),
    pytest.param(bytearray(b"\x80\x04not-json-nor-bray"), "neither", id="pickle-like-bytes"),
    pytest.param([[1.0, 2.0]], "shape", id="wrong-shape"),
    pytest.param([["a", "b", "c", "d"]], "numbers", id="strings"),
    pytest.param(bytearray(wire.encode({"args": [np.zeros((1, 4), np.float64)]})), "dtype float64, expected float32", id="wrong-dtype"),
    pytest.param({"args": [[[0, 0, 0, 0]], [[1, 1, 1, 1]]]}, "expected a list of 1", id="too-many-inputs"),
    pytest.param(bytearray(wire.encode({"args": [np.zeros((1, 4), np.float32)]})[:-3]), "", id="truncated-binary"),
]


@pytest.mark.parametrize(("bad", "says"), BAD)
def test_bad_request_gets_its_own_400_and_neighbours_are_answered(probe_store: CheckpointStore, tmp_path: Path, bad: object, says: str) -> None:
    handler, ctx = probe_handler(probe_store, tmp_path)
    try:
        x = np.ones((1, 4), dtype=np.float32)
        good = bytearray(wire.encode({"args": [x]}))
        (s0, _, y0), (s1, _, err), (s2, _, y2) = run(handler, ctx, [good, bad, good])
        assert s0 == s2 == 200 and s1 == 400
        assert says in err["message"]
        np.testing.assert_allclose(y0, expected_probe(1, x))
        np.testing.assert_allclose(y2, expected_probe(1, x))
    finally:
        handler.close()


def test_nonfinite_inputs_refused_when_configured(probe_store: CheckpointStore, tmp_path: Path) -> None:
    handler, ctx = probe_handler(probe_store, tmp_path, reject_nonfinite=True)
    try:
        ((status, _, err),) = run(handler, ctx, [[[float("nan"), 0, 0, 0]]])
        assert status == 400 and "NaN" in err["message"]
    finally:
        handler.close()


@pytest.mark.parametrize("cfg", ENGINES)
def test_hot_reload_swaps_between_batches_and_refuses_bad_steps(probe_store: CheckpointStore, tmp_path: Path, cfg: dict) -> None:
    handler, ctx = probe_handler(probe_store, tmp_path, **cfg)
    try:
        x = np.ones((1, 4), dtype=np.float32)
        probe_store.publish("probe", probe_weights(2), step=2)
        wait_for_step(handler, 2)
        ((_, headers, y),) = run(handler, ctx, [bytearray(wire.encode({"args": [x]}))])
        assert headers[STEP_HEADER] == "2"
        np.testing.assert_allclose(y, expected_probe(2, x))
        # A wrong-shaped step is refused; the worker keeps serving step 2.
        probe_store.publish("probe", {"lin.weight": torch.zeros(3, 3), "lin.bias": torch.zeros(3)}, step=3)
        time.sleep(0.5)
        ((status, headers, y),) = run(handler, ctx, [bytearray(wire.encode({"args": [x]}))])
        assert status == 200 and headers[STEP_HEADER] == "2"
        np.testing.assert_allclose(y, expected_probe(2, x))
        probe_store.publish("probe", probe_weights(4), step=4)
        wait_for_step(handler, 4)
        ((_, headers, y),) = run(handler, ctx, [bytearray(wire.encode({"args": [x]}))])
        assert headers[STEP_HEADER] == "4"
        np.testing.assert_allclose(y, expected_probe(4, x))
    finally:
        handler.close()


def test_corrupt_step_is_refused_and_old_weights_serve(probe_store: CheckpointStore, tmp_path: Path) -> None:
    handler, ctx = probe_handler(probe_store, tmp_path)
    try:
        handler.follower._watch.stop()  # deliver the step by hand, after damaging it on disk
        probe_store.publish("probe", probe_weights(2), step=2)
        weights_file = max(probe_store.model_dir("probe").rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        data = bytearray(weights_file.read_bytes())
        data[-1] ^= 0xFF
        weights_file.write_bytes(bytes(data))
        handler.follower.on_step(2)
        x = np.ones((1, 4), dtype=np.float32)
        ((status, headers, y),) = run(handler, ctx, [x.tolist()])
        assert status == 200 and headers[STEP_HEADER] == "1"
        np.testing.assert_allclose(np.asarray(y), expected_probe(1, x))
        assert 2 in handler.follower.refused
    finally:
        handler.close()


def test_pinned_step_ignores_newer_steps(probe_store: CheckpointStore, tmp_path: Path) -> None:
    probe_store.publish("probe", probe_weights(2), step=2)
    handler, ctx = probe_handler(probe_store, tmp_path, step=1)
    try:
        probe_store.publish("probe", probe_weights(3), step=3)
        time.sleep(0.3)
        x = np.ones((2, 4), dtype=np.float32)
        ((_, headers, y),) = run(handler, ctx, [x.tolist()])
        assert headers[STEP_HEADER] == "1"
        np.testing.assert_allclose(np.asarray(y), expected_probe(1, x))
    finally:
        handler.close()


def test_fixed_batch_size_pads_and_trims(probe_store: CheckpointStore, tmp_path: Path) -> None:
    handler, ctx = probe_handler(probe_store, tmp_path, fixed_batch_size=4)
    try:
        xs = [np.full((n, 4), n, dtype=np.float32) for n in (1, 2, 3)]
        answers = run(handler, ctx, [bytearray(wire.encode({"args": [x]})) for x in xs])
        for x, (status, _, y) in zip(xs, answers):
            assert status == 200 and y.shape == (x.shape[0], 2)
            np.testing.assert_allclose(y, expected_probe(1, x))
    finally:
        handler.close()


@pytest.mark.parametrize("cfg", ENGINES)
def test_policy_mlp_engines_match_torch(tmp_path: Path, cfg: dict) -> None:
    torch.manual_seed(0)
    model = PolicyMLP().eval()
    store = CheckpointStore(tmp_path / "store")
    export_model(model, (torch.zeros(4, 64),), dest=store.export_dir("policy"), onnx=True)
    store.publish("policy", model.state_dict(), step=0)
    handler = EngineHandler()
    ctx = make_context(tmp_path, ServingConfig(name="policy", store=str(store.root), options=ServingOptions(**cfg)))
    handler.initialize(ctx)
    try:
        x = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32)
        ((status, _, y),) = run(handler, ctx, [bytearray(wire.encode({"args": [x]}))])
        assert status == 200
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    finally:
        handler.close()


def test_nested_inputs_outputs_and_keywords(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DictPolicy().eval()
    store = CheckpointStore(tmp_path / "store")
    obs = {"x": torch.randn(3, 4), "y": torch.randn(3, 2)}
    mask = torch.ones(3, 3)
    export_model(model, (obs,), {"mask": mask}, dest=store.export_dir("dict"), onnx=False)
    store.publish("dict", model.state_dict(), step=0)
    handler = EngineHandler()
    ctx = make_context(tmp_path, ServingConfig(name="dict", store=str(store.root)))
    handler.initialize(ctx)
    try:
        np_obs = {k: v.numpy() for k, v in obs.items()}
        payload = {"args": [np_obs], "kwargs": {"mask": mask.numpy()}}
        ((status, _, out), (s2, _, out_json)) = run(handler, ctx, [bytearray(wire.encode(payload)), wire.to_jsonable(payload)])
        assert status == s2 == 200
        with torch.no_grad():
            ref = model(obs, mask=mask)
        assert set(out) == {"logits", "value"} and isinstance(out["value"], tuple)
        np.testing.assert_allclose(out["logits"], ref["logits"].numpy(), rtol=1e-5)
        np.testing.assert_allclose(out["value"][0], ref["value"][0].numpy(), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out_json["logits"]), ref["logits"].numpy(), rtol=1e-5)
    finally:
        handler.close()


def test_handler_module_defines_exactly_one_class() -> None:
    # TorchServe's model_loader refuses a handler module with more than one class of its own,
    # so the module can also be referenced by name (handler: bray.handlers.handler).
    import inspect

    import bray.handlers.handler as module

    own = [n for n, o in vars(module).items() if inspect.isclass(o) and o.__module__ == module.__name__]
    assert own == ["EngineHandler"]


def test_a_lagging_worker_catches_up_to_the_step_its_caller_has_seen(probe_store: CheckpointStore, tmp_path: Path) -> None:
    import threading

    handler, ctx = probe_handler(probe_store, tmp_path)
    try:
        handler.follower._watch.stop()  # this worker's watcher is "late": the step arrives 50 ms after the request
        probe_store.publish("probe", probe_weights(2), step=2)
        late = threading.Timer(0.05, handler.follower.on_step, args=(2,))
        late.start()
        x = np.ones((1, 4), dtype=np.float32)
        ctx.request_processor = [RequestProcessor({"X-Bray-Min-Step": "2"})]
        (body,) = handler.handle([{"body": bytearray(wire.encode({"args": [x]}))}], ctx)
        late.join()
        assert ctx.get_response_headers(0)[STEP_HEADER] == "2"
        np.testing.assert_allclose(wire.decode(body), expected_probe(2, x))
        # a hint for a step that never arrives is waited for only boundedly; the answer says step 2
        ctx.request_processor = [RequestProcessor({"X-Bray-Min-Step": "7"})]
        started = time.monotonic()
        handler.handle([{"body": bytearray(wire.encode({"args": [x]}))}], ctx)
        assert time.monotonic() - started < 5 and ctx.get_response_headers(0)[STEP_HEADER] == "2"
    finally:
        handler.close()


# --- weight sets: clones served by the model's own workers ------------------------------


def _clone(store: CheckpointStore, name: str, source: str, step: int, weights_step: int | None = None) -> None:
    store.record_clone_origin(name, source=source, step=step)
    store.seed_clone(name)
    if weights_step is not None:
        store.publish(name, probe_weights(weights_step))


def run_with(handler: EngineHandler, ctx: Context, calls: list[tuple[dict[str, str], object]]) -> list[tuple]:
    """One batch of (headers, body) requests: (status, headers, decoded body) per request."""
    ctx.request_processor = [RequestProcessor(dict(h)) for h, _ in calls]
    out = handler.handle([{"body": b} for _, b in calls], ctx)
    answers = []
    for idx, body in enumerate(out):
        status, _ = ctx.get_response_status(idx)
        value = wire.decode(body) if isinstance(body, (bytes, bytearray)) else json.loads(body)
        answers.append((status or 200, ctx.get_response_headers(idx), value))
    return answers


@pytest.mark.parametrize("cfg", ENGINES)
def test_one_batch_answers_each_request_with_its_own_weight_set(probe_store: CheckpointStore, tmp_path: Path,
                                                                cfg: dict) -> None:
    """The learner, two clones and a clone of a clone in one batch: one forward per set, each row its own
    weights, on every engine that runs weight sets (ONNX: weights fed as inputs, or a session per set)."""
    _clone(probe_store, "probe-clone-step-1-a", "probe", 1, weights_step=5)
    _clone(probe_store, "probe-clone-step-1-b", "probe", 1, weights_step=7)
    _clone(probe_store, "probe-clone-step-2-a-c", "probe-clone-step-1-a", 2)  # a's step 2: weights 5
    handler, ctx = probe_handler(probe_store, tmp_path, **cfg)
    x = np.ones((2, 4), dtype=np.float32)
    body = bytearray(wire.encode({"args": [x]}))
    W = "X-Bray-Weights"
    try:
        answers = run_with(handler, ctx, [({}, body), ({W: "probe-clone-step-1-a"}, body),
                                          ({W: "probe-clone-step-1-b"}, body), ({W: "nope"}, body),
                                          ({W: "probe-clone-step-2-a-c"}, body), ({W: "probe-clone-step-1-a"}, body)])
        assert [a[0] for a in answers] == [200, 200, 200, 404, 200, 200]
        for (_, headers, value), weights, step in zip([answers[i] for i in (0, 1, 2, 4, 5)], (1, 5, 7, 5, 5),
                                                      ("1", "2", "2", "2", "2")):
            np.testing.assert_allclose(value, expected_probe(weights, x))
            assert headers[STEP_HEADER] == step
        assert "no weight set 'nope' of 'probe'" in answers[3][2]["message"]
        # each weight set's answer names the set that answered (clients refuse one that does not)
        assert [a[1].get("X-Bray-Weights") for a in answers] == [
            None, "probe-clone-step-1-a", "probe-clone-step-1-b", None, "probe-clone-step-2-a-c", "probe-clone-step-1-a"]
        assert handler.weight_sets is not None and handler.weight_sets.loads == 3
        # the learner's own weights were not touched by the sets' forwards
        np.testing.assert_allclose(run(handler, ctx, [body])[0][2], expected_probe(1, x))

        # a step published to a clone is what its next request gets, on this worker
        probe_store.publish("probe-clone-step-1-a", probe_weights(9))
        (answer,) = run_with(handler, ctx, [({W: "probe-clone-step-1-a"}, body)])
        np.testing.assert_allclose(answer[2], expected_probe(9, x))
        assert answer[1][STEP_HEADER] == "3"
        served = probe_store.serving("probe-clone-step-1-a")
        assert [v["step"] for v in served.values()] == [3]  # announced as any worker's step
        # a clone's name on the model itself is not a weight set of it, nor is the model's own name
        (own,) = run_with(handler, ctx, [({W: "probe"}, body)])
        assert own[0] == 404
    finally:
        handler.close()
    assert probe_store.serving("probe-clone-step-1-a") == {}  # withdrawn when the worker stops


def test_a_request_in_segments_answers_each_segments_rows_with_its_weight_set(probe_store: CheckpointStore,
                                                                              tmp_path: Path) -> None:
    """The node proxy's league round as one request: rows of the learner and two clones, each segment
    with its set's weights and step; with a whole request beside it; a failed segment is a 424 naming it."""
    _clone(probe_store, "probe-clone-step-1-a", "probe", 1, weights_step=5)
    _clone(probe_store, "probe-clone-step-1-b", "probe", 1, weights_step=7)
    probe_store.publish("probe-clone-step-1-b", probe_weights(8))  # b at its step 3
    handler, ctx = probe_handler(probe_store, tmp_path)
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4) / 10
    body = bytearray(wire.encode({"args": [x]}))
    S = "X-Bray-Segments"
    try:
        mixed = {S: "2:-1:probe-clone-step-1-b;1:-1:;3:2:probe-clone-step-1-a"}
        answers = run_with(handler, ctx, [(mixed, body), ({"X-Bray-Weights": "probe-clone-step-1-a"}, body)])
        (status, headers, value), whole = answers
        assert status == 200 and headers["X-Bray-Steps"] == "3,1,2"
        np.testing.assert_allclose(value, np.concatenate([expected_probe(8, x[:2]), expected_probe(1, x[2:3]),
                                                          expected_probe(5, x[3:])]))
        np.testing.assert_allclose(whole[2], expected_probe(5, x))
        assert handler.weight_sets is not None and handler.weight_sets.loads == 2  # a's rows shared one load

        (failed,) = run_with(handler, ctx, [({S: "3:-1:probe-clone-step-1-a;3:-1:nope"}, body)])
        assert failed[0] == 424 and "'nope'" in failed[2]["message"] and "send those rows apart" in failed[2]["message"]
        for headers_, says in (({S: "2:-1:;3:-1:probe-clone-step-1-a"}, "covers 5 rows, the body holds 6"),
                               ({S: "6:-1:", "X-Bray-Weights": "probe-clone-step-1-a"}, "not both")):
            (refused,) = run_with(handler, ctx, [(headers_, body)])
            assert refused[0] == 400 and says in refused[2]["message"]
    finally:
        handler.close()


def test_weight_sets_stay_within_their_budget_least_recently_used_out(probe_store: CheckpointStore,
                                                                     tmp_path: Path) -> None:
    for i in range(4):
        _clone(probe_store, f"probe-clone-step-1-{i}", "probe", 1, weights_step=10 + i)
    handler, ctx = probe_handler(probe_store, tmp_path, weight_sets_bytes=80)  # 40 bytes a set: two fit
    x = np.ones((1, 4), dtype=np.float32)
    body = bytearray(wire.encode({"args": [x]}))
    try:
        for i in (0, 1, 2, 0, 3):
            (answer,) = run_with(handler, ctx, [({"X-Bray-Weights": f"probe-clone-step-1-{i}"}, body)])
            np.testing.assert_allclose(answer[2], expected_probe(10 + i, x))
            assert handler.weight_sets is not None and handler.weight_sets.used_bytes <= 80
        assert list(handler.weight_sets.held()) == ["probe-clone-step-1-0", "probe-clone-step-1-3"]
        assert handler.weight_sets.evictions == 3 and handler.weight_sets.loads == 5
    finally:
        handler.close()


def test_an_engine_that_cannot_run_weight_sets_says_so_and_serves_the_rest(probe_store: CheckpointStore,
                                                                         tmp_path: Path) -> None:
    """An engine without forward_with (TensorRT: an engine is built per weight set) refuses a set's rows
    with 503 naming dedicated=True, and answers the model's own rows: here ONNX Runtime with the base
    Engine's forward_with, as TensorRT has (its own test needs a GPU)."""
    from bray.handlers.engines.base import Engine
    from bray.handlers.engines.onnx import OnnxEngine
    from bray.handlers.weight_sets import WeightSets

    class NoWeightSets(OnnxEngine):
        forward_with = Engine.forward_with

    _clone(probe_store, "probe-clone-step-1-a", "probe", 1, weights_step=5)
    handler, ctx = probe_handler(probe_store, tmp_path, engine="onnx")
    handler.engine.__class__ = NoWeightSets
    handler.weight_sets = WeightSets(probe_store, "probe", handler.engine, budget_bytes=1 << 20)
    x = np.ones((1, 4), dtype=np.float32)
    body = bytearray(wire.encode({"args": [x]}))
    try:
        refused, own = run_with(handler, ctx, [({"X-Bray-Weights": "probe-clone-step-1-a"}, body), ({}, body)])
        assert refused[0] == 503 and "dedicated=True" in refused[2]["message"]
        np.testing.assert_allclose(own[2], expected_probe(1, x))
    finally:
        handler.close()


def test_a_weight_sets_forward_that_fails_puts_the_models_own_weights_back(probe_store: CheckpointStore,
                                                                          tmp_path: Path) -> None:
    """The torch engine swaps a set's tensors into the module for one call: also when that call raises."""
    handler, _ = probe_handler(probe_store, tmp_path)
    engine = handler.engine
    try:
        prepared = engine.prepare_weights({k: v.numpy() for k, v in probe_weights(5).items()})
        x = np.ones((1, 4), dtype=np.float32)
        np.testing.assert_allclose(engine.forward_with([x], prepared)[0], expected_probe(5, x))
        with pytest.raises((RuntimeError, AssertionError)):  # the exported graph's guard refuses the width
            engine.forward_with([np.ones((1, 3), dtype=np.float32)], prepared)
        np.testing.assert_allclose(engine.forward([x])[0], expected_probe(1, x))  # step 1's own weights
    finally:
        handler.close()


# --- on a CUDA GPU (skipped elsewhere with the reason) -----------------------------------


def test_the_torch_engine_on_cuda_answers_as_on_cpu_swaps_steps_and_runs_weight_sets(
        probe_store: CheckpointStore, tmp_path: Path, cuda_device: str) -> None:
    """The handler on the GPU: its answers, a hot-swapped step, and a league round in segments (each
    weight set's tensors swapped into the module on the device) equal the CPU handler's, to float32 matmul
    precision on the GPU (an H200 answered within 1.5e-4 relative of the CPU: TF32-class products)."""
    _clone(probe_store, "probe-clone-step-1-a", "probe", 1, weights_step=5)
    _clone(probe_store, "probe-clone-step-1-b", "probe", 1, weights_step=7)
    for sub in ("gpu", "cpu"):
        (tmp_path / sub).mkdir()
    gpu, gctx = probe_handler(probe_store, tmp_path / "gpu", device=cuda_device)
    cpu, cctx = probe_handler(probe_store, tmp_path / "cpu", device="cpu")
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    body = bytearray(wire.encode({"args": [x]}))
    mixed = {"X-Bray-Segments": "2:-1:probe-clone-step-1-b;1:-1:;3:-1:probe-clone-step-1-a"}
    try:
        assert str(next(iter(gpu.engine.prepare_weights(
            {k: v.numpy() for k, v in probe_weights(1).items()}).values())).device).startswith("cuda")
        for handler, ctx in ((gpu, gctx), (cpu, cctx)):
            np.testing.assert_allclose(run(handler, ctx, [body])[0][2], expected_probe(1, x), rtol=2e-3, atol=1e-4)
        probe_store.publish("probe", probe_weights(2), step=2)
        for handler in (gpu, cpu):
            wait_for_step(handler, 2)
        answers = [run_with(h, c, [(mixed, body), ({}, body)]) for h, c in ((gpu, gctx), (cpu, cctx))]
        for (status, headers, value), own in answers:
            assert status == 200 and headers["X-Bray-Steps"] == "2,2,2"
            np.testing.assert_allclose(value, np.concatenate([expected_probe(7, x[:2]), expected_probe(2, x[2:3]),
                                                              expected_probe(5, x[3:])]), rtol=2e-3, atol=1e-4)
            np.testing.assert_allclose(own[2], expected_probe(2, x), rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(answers[0][0][2], answers[1][0][2], rtol=2e-3, atol=1e-4)
    finally:
        gpu.close()
        cpu.close()
