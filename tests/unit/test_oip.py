"""Open Inference Protocol requests through EngineHandler, with TorchServe's own Context.

Answers are read back with tritonclient's own decoder (``InferResult.from_response_body``),
so both the JSON and the binary-extension forms are checked against what Triton's client
library expects, not against our own reading of the protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ts.context import Context, RequestProcessor

from bray import wire
from bray.export import export_model
from bray.handlers.options import ServingConfig
from bray.handlers.handler import STEP_HEADER, EngineHandler
from bray.handlers.oip import HEADER_LENGTH
from bray.store import CheckpointStore
from tests.models import DictPolicy, StepProbe, probe_weights

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient (the test extra)")

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def expected_probe(step: int, x: np.ndarray) -> np.ndarray:
    return np.repeat(step * (x.sum(-1, keepdims=True) + 1), 2, axis=-1)


def handler_for(store: CheckpointStore, name: str, tmp_path: Path) -> tuple[EngineHandler, Context]:
    cfg = ServingConfig(name=name, store=str(store.root))
    (tmp_path / "mar").mkdir(exist_ok=True)
    ctx = Context(name, str(tmp_path / "mar"), {"model": {"modelVersion": "latest"}}, 32, None, "0.12.0",
                  model_yaml_config=cfg.to_model_yaml())
    handler = EngineHandler()
    handler.initialize(ctx)
    return handler, ctx


@pytest.fixture()
def probe(tmp_path: Path) -> Any:
    store = CheckpointStore(tmp_path / "store")
    export_model(StepProbe(), (torch.zeros(2, 4),), dest=store.export_dir("probe"), onnx=False)
    store.publish("probe", probe_weights(3), step=3)
    handler, ctx = handler_for(store, "probe", tmp_path)
    yield handler, ctx
    handler.close()


def run(handler: EngineHandler, ctx: Context, requests: list[tuple[Any, dict[str, str]]]) -> list[tuple[int, dict[str, str], Any]]:
    """One TorchServe batch of (body, request headers): (status, response headers, body) each."""
    ctx.request_processor = [RequestProcessor(headers) for _, headers in requests]
    out = handler.handle([{"body": body} for body, _ in requests], ctx)
    assert len(out) == len(requests)
    return [((ctx.get_response_status(i)[0] or 200), ctx.get_response_headers(i), body) for i, body in enumerate(out)]


def oip_json(x: np.ndarray, name: str = "INPUT__0", **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}],
            **extra}


def oip_binary(x: np.ndarray, *, binary_out: bool) -> tuple[bytes, dict[str, str]]:
    """The binary tensor extension as tritonclient writes it: JSON header, then raw bytes."""
    raw = x.astype("<f4").tobytes()
    header: dict[str, Any] = {"inputs": [{"name": "INPUT__0", "shape": list(x.shape), "datatype": "FP32",
                                          "parameters": {"binary_data_size": len(raw)}}]}
    if binary_out:
        header["parameters"] = {"binary_data_output": True}
    head = json.dumps(header).encode()
    return head + raw, {HEADER_LENGTH: str(len(head))}


def decode(body: Any, headers: dict[str, str]) -> Any:
    data = body.encode() if isinstance(body, str) else bytes(body)
    length = headers.get(HEADER_LENGTH)
    return httpclient.InferResult.from_response_body(data, header_length=int(length) if length else None)


def test_json_request_is_answered_in_oip_json_with_the_step(probe: Any) -> None:
    handler, ctx = probe
    ((status, headers, body),) = run(handler, ctx, [(oip_json(X, id="req-7"), {})])
    assert status == 200 and headers[STEP_HEADER] == "3"
    doc = json.loads(body)
    assert doc["id"] == "req-7" and doc["model_name"] == "probe" and doc["model_version"] == "latest"
    assert doc["parameters"]["step"] == 3
    result = decode(body, headers)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected_probe(3, X))


@pytest.mark.parametrize("binary_out", [False, True], ids=["json-answer", "binary-answer"])
def test_binary_extension_request(probe: Any, binary_out: bool) -> None:
    handler, ctx = probe
    body, headers = oip_binary(X, binary_out=binary_out)
    ((status, out_headers, answer),) = run(handler, ctx, [(bytearray(body), headers)])
    assert status == 200
    assert (HEADER_LENGTH in out_headers) is binary_out
    result = decode(answer, out_headers)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected_probe(3, X))
    assert result.get_response()["parameters"]["step"] == 3


def test_oip_and_bray_requests_share_a_batch_and_a_bad_one_gets_its_own_400(probe: Any) -> None:
    handler, ctx = probe
    bad = oip_json(X, name="obs")
    answers = run(handler, ctx, [(oip_json(X), {}), (bytearray(wire.encode({"args": [X]})), {}), (bad, {}),
                                 (json.dumps(oip_json(X[:1])), {})])
    (s0, h0, b0), (s1, _, b1), (s2, _, b2), (s3, h3, b3) = answers
    assert (s0, s1, s2, s3) == (200, 200, 400, 200)
    np.testing.assert_allclose(decode(b0, h0).as_numpy("OUTPUT__0"), expected_probe(3, X))
    np.testing.assert_allclose(wire.decode(b1), expected_probe(3, X))
    assert "no input named 'obs'" in json.loads(b2)["error"] and "INPUT__0 FP32[batch,4]" in json.loads(b2)["error"]
    np.testing.assert_allclose(decode(b3, h3).as_numpy("OUTPUT__0"), expected_probe(3, X[:1]))


_WRONG_SIZE = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [2, 4], "datatype": "FP32",
                                      "parameters": {"binary_data_size": 16}}]}).encode()
BAD = [
    pytest.param({"inputs": [{"name": "INPUT__0", "shape": [2, 4], "datatype": "FP64", "data": [0.0] * 8}]},
                 {}, "datatype 'FP64', expected FP32", id="wrong-datatype"),
    pytest.param({"inputs": [{"name": "INPUT__0", "shape": [2, 4], "datatype": "FP32", "data": [0.0] * 7}]},
                 {}, "holds 8 value(s), data has 7", id="shape-and-data-disagree"),
    pytest.param({"inputs": [{"name": "INPUT__0", "shape": [2, 3], "datatype": "FP32", "data": [0.0] * 6}]},
                 {}, "expected [batch, 4]", id="wrong-shape"),
    pytest.param({"inputs": [{"name": "INPUT__0", "shape": [2, 4], "datatype": "FP32"}]},
                 {}, "no data", id="no-data"),
    pytest.param({"inputs": [{"name": "INPUT__0", "shape": "2x4", "datatype": "FP32", "data": []}]},
                 {}, "shape must be a list", id="shape-not-a-list"),
    pytest.param({"inputs": [{"name": "INPUT__0", "shape": [2, 4], "datatype": "FP32", "data": ["a"] * 8}]},
                 {}, "expected numbers", id="strings"),
    pytest.param({"inputs": [{"name": "INPUT__0", "shape": [2, 4], "datatype": "FP32", "data": [0.0] * 8}],
                  "outputs": [{"name": "logits"}]}, {}, "no output named 'logits'", id="unknown-output"),
    pytest.param(bytearray(_WRONG_SIZE + bytes(16)), {HEADER_LENGTH: str(len(_WRONG_SIZE))}, "needs 32",
                 id="binary-size-wrong"),
    pytest.param(bytearray(b'{"inputs": []}'), {HEADER_LENGTH: "900"}, "the body has 14", id="header-past-the-body"),
    pytest.param(bytearray(b'{"inputs": []}'), {HEADER_LENGTH: "x"}, "byte count", id="header-not-a-number"),
]


@pytest.mark.parametrize(("bad", "headers", "says"), BAD)
def test_bad_oip_requests_are_refused_with_a_reason(probe: Any, bad: Any, headers: dict[str, str], says: str) -> None:
    handler, ctx = probe
    (s0, _, err), (s1, _, _) = run(handler, ctx, [(bad, headers), (oip_json(X), {})])
    assert s0 == 400 and s1 == 200
    assert says in json.loads(err)["error"]


def test_several_inputs_and_outputs_are_named_by_leaf(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    net = DictPolicy()
    obs = {"x": torch.randn(3, 4), "y": torch.randn(3, 2)}
    export_model(net, (obs,), dest=store.export_dir("dp"), onnx=False)
    store.publish("dp", net.state_dict(), step=1)
    handler, ctx = handler_for(store, "dp", tmp_path)
    try:
        request = {"inputs": [
            {"name": "INPUT__1", "shape": [3, 2], "datatype": "FP32", "data": obs["y"].reshape(-1).tolist()},
            {"name": "INPUT__0", "shape": [3, 4], "datatype": "FP32", "data": obs["x"].reshape(-1).tolist()},
        ], "outputs": [{"name": "OUTPUT__1"}]}
        ((status, headers, body),) = run(handler, ctx, [(request, {})])
        assert status == 200
        result = decode(body, headers)
        with torch.no_grad():
            ref = net(obs)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT__1"]
        np.testing.assert_allclose(result.as_numpy("OUTPUT__1"), ref["value"][0].numpy(), rtol=1e-5, atol=1e-6)
    finally:
        handler.close()


def test_the_key_plugin_adds_the_inference_key_and_follows_a_rewritten_key_file(tmp_path: Path) -> None:
    from tritonclient._request import Request

    from bray.torchserve import InferenceKeyPlugin

    key_file = tmp_path / "key_file.json"

    def write(inference: str) -> None:
        key_file.write_text(json.dumps({"management": {"key": "m"}, "inference": {"key": inference},
                                        "API": {"key": "a"}}))

    write("first")
    plugin = InferenceKeyPlugin(key_file=key_file)
    request = Request({"Content-Type": "application/json"})
    plugin(request)
    assert request.headers == {"Content-Type": "application/json", "Authorization": "Bearer first"}
    write("second-key")  # a restart or a refresh rewrote the file
    request = Request(None)
    plugin(request)
    assert request.headers == {"Authorization": "Bearer second-key"}
