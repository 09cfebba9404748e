"""Every bad input of issue 7, sent over HTTP to a real TorchServe (bundled config, token auth on).

Each gets a 4xx whose JSON ``message`` says what was expected; after each, ``/ping`` is
healthy and the model's workers are the same processes (pids from the management API's
describe), so no request killed or restarted a worker.

Two models share the session's server: ``bad-probe`` registered through ``RemoteModel``
(the defaults: NaN allowed, 64 MiB limit), and ``bad-strict``, the same model packed by
``bray-archive`` with ``reject_nonfinite: true`` and ``max_request_bytes: 4096`` in its
model-config.yaml (what an operator who wants those checks sets; the packer has no option
for them yet).
"""

from __future__ import annotations

import json
import os
import pickle  # noqa: S403 - only to build the hostile payload the server must refuse
import re
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests

import bray
from bray import wire
from bray.bridge.remote_model import RemoteModel
from bray.errors import InputError
from bray.torchserve.launcher import TorchServeProcess
from bray.torchserve.management import ManagementClient
from tests.load import worker_pids
from tests.models import StepProbe, probe_weights

NAME, STRICT = "bad-probe", "bad-strict"
GOOD = np.ones((1, 4), np.float32)


def _binary(header: dict[str, Any], data: bytes) -> bytes:
    """A bray wire body with a hand-written header (to lie in it)."""
    head = json.dumps(header).encode()
    prefix = struct.pack("<4sBI", wire.MAGIC, wire.VERSION, len(head)) + head
    return prefix + bytes(-len(prefix) % wire.ALIGNMENT) + data


def _one_array(dtype: str, shape: list[int], nbytes: int, data: bytes) -> bytes:
    return _binary({"tree": {"dict": [["args", {"list": [0]}]]}, "arrays": [[dtype, shape, 0, nbytes]]}, data)


def _strict_archive(mar: Path, **changes: Any) -> None:
    """Rewrite the ``handler: bray:`` section of a packed archive's model-config.yaml."""
    import yaml

    tmp = mar.with_name(f".{mar.name}.tmp")
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "model-config.yaml":
                doc = yaml.safe_load(data)
                doc["handler"]["bray"].update(changes)
                data = yaml.safe_dump(doc, sort_keys=False).encode()
            dst.writestr(item, data)
    os.replace(tmp, mar)


@pytest.fixture(scope="module")
def served(torchserve: TorchServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both models registered, with their worker pids as registered."""
    import torch

    from bray.archiver.pack import pack_archive
    from bray.export import export_model

    store_root = tmp_path_factory.mktemp("bad-input-store")
    bray.init(store=store_root, model_store=torchserve.model_store, inference_url=torchserve.inference_url,
              management_url=torchserve.management_url, key_file=torchserve.key_file)
    net = StepProbe()
    net.load_state_dict(probe_weights(3))
    rm = RemoteModel(NAME, model=net, forward_args=(torch.zeros(1, 4),), num_workers=1, max_batch_size=8)

    store = rm.store
    export_model(StepProbe(), (torch.zeros(1, 4),), dest=store.export_dir(STRICT), onnx=False)
    store.publish(STRICT, probe_weights(3))
    packed = pack_archive(store, STRICT, step=None, model_store=torchserve.model_store, batch_size=4,
                          max_batch_delay_ms=5, force=True)
    _strict_archive(packed.path, reject_nonfinite=True, max_request_bytes=4096)
    client = ManagementClient(torchserve.management_url, key_file=torchserve.key_file)
    client.register(packed.file_name, model_name=STRICT, initial_workers=1, batch_size=4, max_batch_delay_ms=5)
    client.wait_ready(STRICT, timeout_s=120)
    pids = {NAME: worker_pids(client, NAME), STRICT: worker_pids(client, STRICT)}
    assert all(len(p) == 1 for p in pids.values()), pids
    yield {"server": torchserve, "client": client, "pids": pids, "rm": rm}
    for name in (NAME, STRICT):
        try:
            client.unregister(name)
        except Exception:  # best effort: the session server is stopped later anyway
            pass
    client.close()
    rm.close()


def _post(served: dict[str, Any], path: str, body: bytes, content_type: str, *,
          headers: dict[str, str] | None = None) -> requests.Response:
    server: TorchServeProcess = served["server"]
    hdrs = server.headers("inference") if headers is None else headers
    return requests.post(f"{server.inference_url}/predictions/{path}", data=body,
                         headers={**hdrs, "Content-Type": content_type}, timeout=60)


def _assert_healthy_and_no_restart(served: dict[str, Any]) -> None:
    server: TorchServeProcess = served["server"]
    ping = requests.get(f"{server.inference_url}/ping", headers=server.headers("inference"), timeout=10)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy", ping.text
    for name, before in served["pids"].items():
        now = worker_pids(served["client"], name)
        assert now == before, f"{name}: workers were {before}, now {now}: a worker was restarted"


X = GOOD.tobytes()
OCT, JSON = wire.CONTENT_TYPE, "application/json"

CASES = [
    # id, model, body, content type, status, what the message must say
    ("truncated-binary", NAME, wire.encode({"args": [GOOD]})[:-8], OCT, 400,
     r"declares shape \[1, 4\] float32 = 16 bytes .* only 8 bytes follow"),
    ("lying-header-size", NAME, _one_array("float32", [1000, 4], 16000, X), OCT, 400,
     r"declares shape \[1000, 4\] float32 = 16000 bytes .* only 16 bytes follow"),
    ("lying-nbytes-field", NAME, _one_array("float32", [1, 4], 8, X), OCT, 400,
     r"= 16 bytes but its nbytes field says 8"),
    ("header-length-past-the-body", NAME, struct.pack("<4sBI", wire.MAGIC, 1, 1 << 20) + b"{}", OCT, 400,
     r"header length field says 1048576 bytes"),
    ("unknown-dtype", NAME, _one_array("float128", [1, 4], 64, X * 4), OCT, 400,
     r"dtype 'float128'; expected one of bool, .*float32"),
    ("object-dtype", NAME, _one_array("object", [1, 4], 32, X * 2), OCT, 400, r"dtype 'object'; expected one of"),
    ("wrong-dtype", NAME, wire.encode({"args": [GOOD.astype(np.float64)]}), OCT, 400,
     r"dtype float64, expected float32"),
    ("nan-refused-when-configured", STRICT, json.dumps([[float("nan"), 1, 1, 1]]).encode(), JSON, 400,
     r"NaN or infinity, which this model is configured to refuse"),
    ("inf-refused-when-configured", STRICT, wire.encode({"args": [np.full((1, 4), np.inf, np.float32)]}), OCT, 400,
     r"NaN or infinity"),
    ("wrong-shape", NAME, wire.encode({"args": [np.ones((1, 5), np.float32)]}), OCT, 400,
     r"shape \[1, 5\], expected \[batch, 4\]"),
    ("wrong-shape-json", NAME, json.dumps([[1.0, 2.0, 3.0]]).encode(), JSON, 400, r"expected \[batch, 4\]"),
    ("too-many-inputs", NAME, wire.encode({"args": [GOOD, GOOD]}), OCT, 400, r"expected a list of 1 item\(s\), got a list of 2"),
    ("too-few-inputs", NAME, json.dumps({"args": []}).encode(), JSON, 400, r"expected a list of 1 item\(s\), got a list of 0"),
    ("json-strings", NAME, json.dumps([["a", "b", "c", "d"]]).encode(), JSON, 400, r"expected numbers of dtype float32"),
    ("json-not-json", NAME, b"{not json", JSON, 400, r"neither a binary NestedArray \(bray.wire\) nor JSON"),
    ("empty-body", NAME, b"", OCT, 400, r"empty request body; send the model's inputs \[float32\[batch,4\]\]"),
    ("empty-json-body", NAME, b"", JSON, 400, r"empty request body"),
    ("over-the-handler-size-limit", STRICT, wire.encode({"args": [np.ones((300, 4), np.float32)]}), OCT, 413,
     r"the body is 4928 bytes, 832 over this model's limit of 4096 bytes; send smaller batches"),
    # Not a bray body at all, and too large: the size is what to fix first (was "neither ... nor JSON").
    ("zeros-over-the-handler-size-limit", STRICT, bytes(20 * 1024), OCT, 413,
     r"the body is 20480 bytes, 16384 over this model's limit of 4096 bytes"),
    ("pickle-payload", NAME, pickle.dumps(GOOD), OCT, 400, r"neither a binary NestedArray \(bray.wire\) nor JSON"),
    ("pickle-payload-pickle-type", NAME, pickle.dumps({"args": [GOOD]}), "application/python-pickle", 400,
     r"neither a binary NestedArray"),
]


@pytest.mark.parametrize("model,body,content_type,status,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_body_gets_a_4xx_saying_what_was_expected(served: dict[str, Any], model: str, body: bytes,
                                                     content_type: str, status: int, expected: str) -> None:
    resp = _post(served, model, body, content_type)
    assert resp.status_code == status, resp.text
    answer = resp.json()
    assert answer["code"] == status and answer["type"] in ("InputError", "WireError"), answer
    assert re.search(expected, answer["message"]), answer["message"]
    _assert_healthy_and_no_restart(served)


def test_nan_is_served_by_default(served: dict[str, Any]) -> None:
    resp = _post(served, NAME, json.dumps([[float("nan"), 1, 1, 1]]).encode(), JSON)
    assert resp.status_code == 200 and int(resp.headers["X-Bray-Step"]) == 0, resp.text


@pytest.mark.parametrize(
    "path,ts_type,expected",
    [("nope", "ModelNotFoundException", "Model not found: nope"),
     (f"{NAME}/999", "ModelVersionNotFoundException", f"Model version: 999 does not exist for model: {NAME}")],
    ids=["unknown-model", "unknown-version"],
)
def test_unknown_model_or_version_is_404_naming_it(served: dict[str, Any], path: str, ts_type: str,
                                                   expected: str) -> None:
    resp = _post(served, path, wire.encode({"args": [GOOD]}), OCT)
    assert resp.status_code == 404 and resp.json()["type"] == ts_type and expected in resp.json()["message"]
    _assert_healthy_and_no_restart(served)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no-token", "wrong-token"])
def test_requests_without_or_with_a_wrong_token_are_refused(served: dict[str, Any], headers: dict[str, str]) -> None:
    resp = _post(served, NAME, wire.encode({"args": [GOOD]}), OCT, headers=headers)
    # TorchServe 0.12 answers 400 (not 401) with this type for a missing, wrong or expired key.
    assert resp.status_code == 400 and resp.json()["type"] == "InvalidKeyException", resp.text
    assert "Token Authorization failed" in resp.json()["message"]
    _assert_healthy_and_no_restart(served)


def test_a_body_over_torchserves_own_limit_is_413(served: dict[str, Any]) -> None:
    # max_request_size (64 MiB) is enforced by the Java frontend before any handler runs; it
    # answers 413 with an empty body, so there is no message of ours to check here.
    resp = _post(served, NAME, wire.MAGIC + bytes(64 * 1024 * 1024 + 16), OCT)
    assert resp.status_code == 413
    _assert_healthy_and_no_restart(served)


def test_bad_requests_in_a_batch_do_not_fail_their_neighbours(served: dict[str, Any]) -> None:
    good = wire.encode({"args": [GOOD]})
    bodies = [good, b"", good, _one_array("object", [1, 4], 32, X * 2)] * 4  # the strict model batches 4

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: _post(served, STRICT, b, OCT), bodies))
    for body, resp in zip(bodies, answers):
        if body is good:
            assert resp.status_code == 200, resp.text
            assert np.allclose(wire.decode(resp.content), 3 * 5)
        else:
            assert resp.status_code == 400 and resp.json()["message"], resp.text
    _assert_healthy_and_no_restart(served)
    out, step = served["rm"](GOOD, return_step=True)
    assert step == 0 and np.allclose(out, 3 * 5)  # step 0 holds the weights the model was built with


def test_a_bad_input_coalesced_with_good_ones_fails_only_its_caller(served: dict[str, Any]) -> None:
    import asyncio

    rm = RemoteModel(STRICT)  # attach; its calls in this process are coalesced
    inputs = [GOOD * (i + 1) for i in range(9)] + [np.full((1, 4), np.nan, np.float32)]

    async def main() -> list[Any]:
        # The first calls leave at once; the rest wait for a free request slot and leave
        # together: the NaN one shares a request with good ones.
        return await asyncio.gather(*(rm.forward(x, batch=True) for x in inputs), return_exceptions=True)

    try:
        answers = asyncio.run(main())
    finally:
        rm.close()
    for x, answer in zip(inputs[:-1], answers[:-1]):
        assert not isinstance(answer, BaseException), answer
        assert np.allclose(answer, 3 * (x.sum() + 1))
    assert isinstance(answers[-1], InputError) and "NaN or infinity" in str(answers[-1]), answers[-1]
    assert sum(b.splits for b in rm.transport.batchers) >= 1, "the NaN call was never coalesced with a good one"
    _assert_healthy_and_no_restart(served)


def test_through_the_node_proxy_one_actors_bad_input_fails_only_that_actor(served: dict[str, Any]) -> None:
    import subprocess
    import sys

    server: TorchServeProcess = served["server"]
    env = {**os.environ, "BRAY_STORE": str(served["rm"].store.root), "BRAY_MODEL_STORE": str(server.model_store),
           "BRAY_INFERENCE_URL": server.inference_url, "BRAY_MANAGEMENT_URL": server.management_url,
           "BRAY_KEY_FILE": str(server.key_file), "BRAY_PROXY_IDLE_S": "2"}
    repo = Path(__file__).resolve().parents[2]

    def actor(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "tests.proxy_actor", "--name", STRICT, "--weights", "3", *args],
                                cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [actor("--value", str(k + 1), "--calls", "40") for k in range(3)] + [actor("--value", "0", "--nan",
                                                                                       "--calls", "20")]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results[:-1]:
        assert r["answers"] == 40 and r["n_errors"] == 0 and r["wrong"] == 0 and r["fallbacks"] == 0, r
    bad = results[-1]
    assert bad["answers"] == 0 and bad["n_errors"] == 20 and bad["fallbacks"] == 0, bad
    assert all(e.startswith("InputError") and "NaN or infinity" in e for e in bad["errors"]), bad
    _assert_healthy_and_no_restart(served)
