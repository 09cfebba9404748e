"""EngineHandler inside a real TorchServe from the bundled config (token auth on).

Issue 3's scenario for the policy MLP (obs 64 -> 256 -> 256 -> 16): the handler is
archived and registered with ``publish_version`` (live version ``latest``: 2 workers,
batch size 8, 5 ms batch delay), answered with ``requests`` in the binary NestedArray
form and in JSON; new steps are published into the store while client threads keep
sending, and every worker switches with no failed request; the onnx engine (weights as
initializers, and as inputs) and a pinned version are registered beside it; the
handler's metrics show on the metrics API.

Every step's weights are a freshly seeded PolicyMLP, so an answer is checked against the
module *of the step its ``X-Bray-Step`` header names*: an answer computed with one
step's weights but labelled with another's would fail.

One server for the module (the session's). Tests run in file order: the hot-reload test
moves the store's latest step, the later ones read it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
import torch

from bray import wire
from bray.archiver import ManagementClient
from bray.archiver.publish import publish_version
from bray.export import export_model
from bray.handlers.handler import STEP_HEADER, WORKER_HEADER
from bray.store import CheckpointStore
from bray.torchserve.launcher import TorchServeProcess
from tests.models import PolicyMLP

NAME = "handler-policy"
OBS = 64
LIVE = dict(workers=2, batch_size=8, max_batch_delay_ms=5)


_SHAPES = {k: tuple(v.shape) for k, v in PolicyMLP().state_dict().items()}


def policy_weights(step: int) -> dict[str, torch.Tensor]:
    """The state dict published as ``step``, drawn from a generator seeded with the step.

    Not ``torch.manual_seed`` + ``PolicyMLP()``: the global RNG is shared with the client
    threads, which build reference modules while the test publishes.
    """
    rng = np.random.default_rng(step)
    return {k: torch.from_numpy(rng.uniform(-0.1, 0.1, shape).astype(np.float32)) for k, shape in _SHAPES.items()}


class Reference:
    """What the torch module of each step answers (cached per step, thread-safe)."""

    def __init__(self) -> None:
        self._modules: dict[int, PolicyMLP] = {}
        self._lock = threading.Lock()

    def __call__(self, step: int, x: np.ndarray) -> np.ndarray:
        with self._lock:
            if step not in self._modules:
                module = PolicyMLP().eval()
                module.load_state_dict(policy_weights(step))
                self._modules[step] = module
            module = self._modules[step]
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    def check(self, step: int, x: np.ndarray, y: Any) -> None:
        np.testing.assert_allclose(np.asarray(y, np.float32), self(step, x), rtol=1e-4, atol=1e-5,
                                   err_msg=f"answer labelled step {step} is not step {step}'s module")


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> CheckpointStore:
    s = CheckpointStore(tmp_path_factory.mktemp("handler-store"), keep_last=5)
    export_model(PolicyMLP().eval(), (torch.zeros(2, OBS),), dest=s.export_dir(NAME), onnx=True)
    s.publish(NAME, policy_weights(1), step=1)
    return s


@pytest.fixture(scope="module")
def server(torchserve: TorchServeProcess) -> TorchServeProcess:
    return torchserve


@pytest.fixture(scope="module")
def client(server: TorchServeProcess) -> Iterator[ManagementClient]:
    with ManagementClient(server.management_url, key_file=server.key_file) as c:
        yield c


@pytest.fixture(scope="module")
def live(store: CheckpointStore, client: ManagementClient, server: TorchServeProcess) -> str:
    """The live torch version, the default; unregistered with the module's other versions."""
    publish_version(store, NAME, step=None, client=client, model_store=server.model_store,
                    set_default=True, **LIVE)
    return "latest"


@pytest.fixture(scope="module", autouse=True)
def _unregister_at_end(client: ManagementClient) -> Iterator[None]:
    yield
    try:
        versions = client.versions(NAME)
    except Exception:  # nothing registered
        return
    for v in sorted(versions, key=lambda v: v.is_default):  # TorchServe drops the default last
        try:
            client.unregister(NAME, v.version)
        except Exception:
            pass


def inference_headers(server: TorchServeProcess) -> dict[str, str]:
    return server.headers("inference")


def predict(server: TorchServeProcess, x: np.ndarray, *, version: str | None = None, form: str = "binary",
            session: Any = requests, headers: dict[str, str] | None = None) -> requests.Response:
    """POST ``x`` in one of the forms a client may use."""
    url = f"{server.inference_url}/predictions/{NAME}" + (f"/{version}" if version else "")
    auth = headers if headers is not None else inference_headers(server)
    if form == "binary":
        return session.post(url, data=wire.encode(x), headers={**auth, "Content-Type": wire.CONTENT_TYPE}, timeout=60)
    if form == "binary-args":
        return session.post(url, data=wire.encode({"args": [x]}),
                            headers={**auth, "Content-Type": wire.CONTENT_TYPE}, timeout=60)
    if form == "json":
        return session.post(url, json=x.tolist(), headers=auth, timeout=60)
    if form == "json-args":
        return session.post(url, json={"args": [x.tolist()]}, headers=auth, timeout=60)
    if form in ("curl", "text"):  # curl -H 'Content-Type: application/json' -d '[[...]]' (or text/plain)
        content_type = "application/json" if form == "curl" else "text/plain"
        return session.post(url, data=json.dumps(x.tolist()).encode(),
                            headers={**auth, "Content-Type": content_type}, timeout=60)
    raise AssertionError(form)


def answer(resp: requests.Response) -> tuple[int, int, np.ndarray]:
    """(step, worker pid, outputs) of a 200 answer."""
    assert resp.status_code == 200, f"{resp.status_code}: {resp.text[:500]}"
    if resp.headers.get("Content-Type", "").startswith(wire.CONTENT_TYPE):
        value = np.asarray(wire.decode(resp.content))
    else:
        value = np.asarray(resp.json(), np.float32)
    return int(resp.headers[STEP_HEADER]), int(resp.headers[WORKER_HEADER]), value


def worker_pids(client: ManagementClient, version: str) -> set[int]:
    (mv,) = client.describe(NAME, version)
    return {int(w["pid"]) for w in mv.raw.get("workers", [])}


def observations(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, OBS), dtype=np.float32)


# --- answers ---------------------------------------------------------------------------

FORMS = ["binary", "binary-args", "json", "json-args", "curl", "text"]


@pytest.mark.parametrize("form", FORMS, ids=FORMS)
@pytest.mark.parametrize("batch", [1, 5], ids=["one-sample", "five-samples"])
def test_answers_equal_the_torch_module(live: str, server: TorchServeProcess, reference: Reference,
                                        client: ManagementClient, form: str, batch: int) -> None:
    x = observations(batch, seed=batch)
    step, worker, y = answer(predict(server, x, form=form))
    assert step == 1 and y.shape == (batch, 16)
    assert worker in worker_pids(client, live)
    reference.check(step, x, y)


def test_binary_in_binary_out_json_in_json_out(live: str, server: TorchServeProcess) -> None:
    x = observations(2)
    assert predict(server, x, form="binary").headers["Content-Type"].startswith(wire.CONTENT_TYPE)
    assert predict(server, x, form="json").headers["Content-Type"].startswith("application/json")


BAD = [
    pytest.param({"data": json.dumps([[1.0, 2.0]]), "ct": "application/json"}, "shape", id="wrong-shape"),
    pytest.param({"data": b"\x80\x04not-json", "ct": "application/octet-stream"}, "neither", id="undecodable"),
    pytest.param({"data": wire.encode(np.zeros((1, OBS), np.float64)), "ct": wire.CONTENT_TYPE}, "float64",
                 id="wrong-dtype"),
    # curl -d without -H: TorchServe parses the body as form fields and the JSON is lost
    pytest.param({"data": json.dumps([[0.0] * OBS]), "ct": "application/x-www-form-urlencoded"},
                 "Content-Type: application/json", id="curl-d-form-encoded"),
]


@pytest.mark.parametrize(("bad", "says"), BAD)
def test_bad_request_gets_a_4xx_that_says_why_and_the_worker_survives(
        live: str, server: TorchServeProcess, client: ManagementClient, bad: dict, says: str) -> None:
    url = f"{server.inference_url}/predictions/{NAME}"
    resp = requests.post(url, data=bad["data"], headers={**inference_headers(server), "Content-Type": bad["ct"]},
                         timeout=60)
    assert resp.status_code == 400, resp.text
    assert says in resp.text and resp.headers[STEP_HEADER] == "1"
    assert answer(predict(server, observations(1)))[0] == 1
    (mv,) = client.describe(NAME, live)
    assert mv.ready_workers == LIVE["workers"]


# --- hot reload ------------------------------------------------------------------------


class Clients:
    """Client threads sending binary requests back to back, recording every answer."""

    def __init__(self, server: TorchServeProcess, reference: Reference, n_threads: int) -> None:
        self.server, self.reference = server, reference
        self.headers = inference_headers(server)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.sent = 0
        self.last_step: dict[int, int] = {}  # worker pid -> step it last answered with
        self.out_of_order: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n_threads)]

    def _run(self, idx: int) -> None:
        seen: dict[int, int] = {}  # one thread's requests are sequential: per worker, steps never go back
        rng = np.random.default_rng(idx)
        with requests.Session() as session:
            while not self.stop.is_set():
                x = rng.standard_normal((1 + idx % 3, OBS), dtype=np.float32)
                try:
                    step, worker, y = answer(predict(self.server, x, session=session, headers=self.headers))
                    self.reference.check(step, x, y)
                except BaseException as err:  # noqa: BLE001 - every failure is reported by the test
                    with self.lock:
                        self.failures.append(f"{type(err).__name__}: {str(err)[:300]}")
                    continue
                if step < seen.get(worker, -1):
                    self.out_of_order.append(f"worker {worker}: step {step} after {seen[worker]}")
                seen[worker] = step
                with self.lock:
                    self.sent += 1
                    self.last_step[worker] = max(step, self.last_step.get(worker, -1))

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def wait_all_on(self, step: int, workers: set[int], *, timeout_s: float) -> float:
        """Seconds until every worker has answered with ``step``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with self.lock:
                if all(self.last_step.get(w, -1) >= step for w in workers) or self.failures:
                    break
            time.sleep(0.01)
        return time.monotonic() - started


def test_every_worker_switches_to_each_new_step_without_a_failed_request(
        live: str, store: CheckpointStore, server: TorchServeProcess, client: ManagementClient,
        reference: Reference) -> None:
    workers = worker_pids(client, live)
    assert len(workers) == LIVE["workers"]
    with Clients(server, reference, n_threads=3) as clients:
        clients.wait_all_on(1, workers, timeout_s=30)
        for step in (2, 3, 4):
            store.publish(NAME, policy_weights(step), step=step)
            clients.wait_all_on(step, workers, timeout_s=30)
            with clients.lock:
                assert {w: clients.last_step.get(w) for w in workers} == dict.fromkeys(workers, step), \
                    f"not every worker serves step {step}; failures: {clients.failures[:3]}"
    assert not clients.failures, f"{len(clients.failures)} of {clients.sent} requests failed: {clients.failures[:3]}"
    assert not clients.out_of_order, clients.out_of_order[:3]
    assert set(clients.last_step) == workers, "an answer came from a worker the server does not list"
    assert clients.sent > 20


# --- metrics ---------------------------------------------------------------------------

def _metrics_text(server: TorchServeProcess) -> str:
    # TorchServe 0.12's token authorization covers the inference and management APIs only.
    resp = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.text


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample of ``name`` in Prometheus text format."""
    return [(dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))), float(m.group(2)))
            for m in re.finditer(rf"^{name}\{{([^}}]*)\}}\s+(\S+)$", text, flags=re.MULTILINE)]


def test_handler_metrics_show_on_the_metrics_api(live: str, server: TorchServeProcess, store: CheckpointStore) -> None:
    # Runs after the hot reload: every worker has swapped weights and answered batches.
    wanted = ("bray_served_step", "bray_weight_load_seconds", "bray_publish_to_served_seconds_count",
              "bray_requests_total", "bray_samples_total", "bray_batches_total", "bray_refused_steps_total",
              "bray_max_batch_requests")
    deadline = time.monotonic() + 15
    while True:
        text = _metrics_text(server)
        found = {name: [(labels, v) for labels, v in _samples(text, name)
                        if labels.get("model") == NAME and labels.get("version") == live] for name in wanted}
        if all(found.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    bray_lines = "\n".join(line for line in text.splitlines() if "bray_" in line)
    assert all(found.values()), f"missing {[n for n, s in found.items() if not s]} in /metrics:\n{bray_lines}"
    served = {labels["worker"]: v for labels, v in found["bray_served_step"]}
    assert len(served) == LIVE["workers"] and set(served.values()) == {float(store.latest(NAME))}, bray_lines
    assert all(v > 0 for _, v in found["bray_weight_load_seconds"])
    assert all(v >= 1 for _, v in found["bray_publish_to_served_seconds_count"])
    per_worker = {name: {labels["worker"]: v for labels, v in found[name]}
                  for name in ("bray_requests_total", "bray_samples_total", "bray_batches_total")}
    assert sum(per_worker["bray_requests_total"].values()) > 0, bray_lines
    for worker, batches in per_worker["bray_batches_total"].items():
        assert batches <= per_worker["bray_requests_total"][worker] <= per_worker["bray_samples_total"][worker]
    assert {v for _, v in found["bray_max_batch_requests"]} == {float(LIVE["batch_size"])}
    assert {v for _, v in found["bray_refused_steps_total"]} == {0.0}


# --- other engines, pinned versions -----------------------------------------------------

ONNX = [
    pytest.param({"engine": "onnx", "version": "onnx"}, id="onnx-initializers"),
    pytest.param({"engine": "onnx", "onnx_weights": "inputs", "version": "onnx_inputs"}, id="onnx-inputs"),
]


@pytest.mark.parametrize("options", ONNX)
def test_onnx_engine_answers_like_torch(live: str, options: dict, store: CheckpointStore, server: TorchServeProcess,
                                        client: ManagementClient, reference: Reference) -> None:
    version = options["version"]
    publish_version(store, NAME, step=None, client=client, model_store=server.model_store, workers=1,
                    batch_size=8, max_batch_delay_ms=5, **options)
    try:
        latest = store.latest(NAME)
        x = observations(7, seed=3)
        for form in ("binary", "json"):
            step, _, y = answer(predict(server, x, version=version, form=form))
            assert step == latest
            reference.check(step, x, y)
            # ... and equal to what the torch engine answers to the same inputs
            t_step, _, y_torch = answer(predict(server, x, version=live, form=form))
            assert t_step == step
            np.testing.assert_allclose(y, y_torch, rtol=1e-4, atol=1e-5)
        # A live onnx version follows new steps too.
        new = store.publish(NAME, policy_weights(latest + 1))
        deadline = time.monotonic() + 30
        while (got := answer(predict(server, x, version=version)))[0] != new and time.monotonic() < deadline:
            time.sleep(0.1)
        assert got[0] == new
        reference.check(new, x, got[2])
    finally:
        client.unregister(NAME, version)


def test_pinned_version_keeps_serving_its_step(live: str, store: CheckpointStore, server: TorchServeProcess,
                                               client: ManagementClient, reference: Reference) -> None:
    pinned = store.latest(NAME)
    mv = publish_version(store, NAME, step=pinned, client=client, model_store=server.model_store, workers=1,
                         batch_size=8, max_batch_delay_ms=5)
    assert mv.version == str(pinned)
    try:
        x = observations(3, seed=7)
        newer = store.publish(NAME, policy_weights(pinned + 1))
        deadline = time.monotonic() + 30
        while answer(predict(server, x, version=live))[0] != newer and time.monotonic() < deadline:
            time.sleep(0.1)
        for form in ("binary", "json"):
            step, _, y = answer(predict(server, x, version=str(pinned), form=form))
            assert step == pinned
            reference.check(pinned, x, y)
        step, _, y = answer(predict(server, x, version=live))
        assert step == newer
        reference.check(newer, x, y)
    finally:
        client.unregister(NAME, str(pinned))
