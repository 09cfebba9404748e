"""TorchServe started exactly as the KServe runtime starts it, from `bray-archive kserve`'s layout.

The command is the ServingRuntime's, literally: ``torchserve --start
--model-store=<layout>/model-store --ts-config=<layout>/config/config.properties`` (the
layout sits where a test can write rather than at /mnt/models). Only the addresses move,
through TorchServe's own ``TS_*`` variables (the exported config keeps
``enable_envvars_config=true``), to free loopback ports, because other servers run on this
machine. The probes are the manifests' exec commands, run against it, with token
authorization on; the store is the "mounted" one, followed by polling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import pytest
import requests
import torch

from bray import wire
from bray.archiver.cli import main
from bray.export import export_model
from bray.store import CheckpointStore
from bray.torchserve.launcher import free_ports
from tests.models import StepProbe, probe_weights

X = np.ones((2, 4), np.float32)


def expected(step: int) -> np.ndarray:
    return np.repeat(step * (X.sum(-1, keepdims=True) + 1), 2, axis=-1)


class KServeStarted:
    """A TorchServe launched by the ServingRuntime's own command, in its own working directory."""

    def __init__(self, layout: Path, workdir: Path) -> None:
        self.workdir = workdir
        inference, management, metrics, grpc_inf, grpc_mgmt = free_ports(5)
        self.inference_url = f"http://127.0.0.1:{inference}"
        self.management_url = f"http://127.0.0.1:{management}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TS_", "BRAY_"))}
        self.env.update(
            TS_INFERENCE_ADDRESS=self.inference_url, TS_MANAGEMENT_ADDRESS=self.management_url,
            TS_METRICS_ADDRESS=f"http://127.0.0.1:{metrics}", TS_GRPC_INFERENCE_PORT=str(grpc_inf),
            TS_GRPC_MANAGEMENT_PORT=str(grpc_mgmt),
            # its pid file lives in the temp dir: one of our own, so --stop stops this one
            TMPDIR=str(workdir / "tmp"), LOG_LOCATION=str(workdir / "logs"), METRICS_LOCATION=str(workdir / "logs"),
        )
        (workdir / "tmp").mkdir(parents=True)
        self.torchserve = str(Path(sys.executable).parent / "torchserve")
        cmd = [self.torchserve, "--start", f"--model-store={layout}/model-store",
               f"--ts-config={layout}/config/config.properties"]
        with open(workdir / "torchserve.out", "wb") as out:  # a file: the daemon inherits it
            subprocess.run(cmd, cwd=workdir, env=self.env, check=True, stdout=out, stderr=subprocess.STDOUT,
                           timeout=60)

    def probe(self, kind: str) -> subprocess.CompletedProcess[str]:
        """The manifests' exec probe, with the pod's variables pointed at this server."""
        env = dict(self.env, BRAY_PROBE_URL=self.inference_url, BRAY_MANAGEMENT_URL=self.management_url,
                   BRAY_KEY_FILE=str(self.workdir / "key_file.json"))
        return subprocess.run([sys.executable, "-m", "bray.ts_config.probe", f"--{kind}"], env=env,
                              capture_output=True, text=True, timeout=60)

    def key(self, kind: str = "inference") -> str:
        return json.loads((self.workdir / "key_file.json").read_text())[kind]["key"]

    def logs(self) -> str:
        parts = []
        for path in (self.workdir / "torchserve.out", self.workdir / "logs" / "ts_log.log",
                     self.workdir / "logs" / "model_log.log"):
            if path.is_file():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        subprocess.run([self.torchserve, "--stop"], cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        for proc in psutil.process_iter(["cmdline"]):  # workers of this instance only
            try:
                if str(self.workdir) in " ".join(proc.info["cmdline"] or []) or \
                        str(self.env["TMPDIR"]) in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
            except psutil.Error:
                continue


@pytest.fixture
def exported(tmp_path: Path) -> Iterator[tuple[CheckpointStore, KServeStarted]]:
    if not any(Path(p, "java").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("needs Java 17+ for TorchServe's frontend")
    store = CheckpointStore(tmp_path / "store")
    export_model(StepProbe(), (torch.zeros(2, 4),), dest=store.export_dir("probe"), onnx=False)
    store.publish("probe", probe_weights(1), step=1)
    out = tmp_path / "kserve"
    # The pod mounts the store where the trainer sees it here; workers poll it every 50 ms.
    assert main(["kserve", "probe", "--out", str(out), "--store", str(store.root), "--workers", "2",
                 "--store-mount", str(store.root.resolve())]) == 0
    server = KServeStarted(out / "models", tmp_path / "pod")
    try:
        yield store, server
    finally:
        server.stop()


def answers(server: KServeStarted, n: int) -> list[tuple[int, str, np.ndarray]]:
    """(step, worker, output) of n binary requests."""
    body = wire.encode({"args": [X], "kwargs": {}})
    headers = {"Authorization": f"Bearer {server.key()}", "Content-Type": wire.CONTENT_TYPE}
    out = []
    for _ in range(n):
        resp = requests.post(f"{server.inference_url}/predictions/probe", data=body, headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        out.append((int(resp.headers[wire.STEP_HEADER]), resp.headers[wire.WORKER_HEADER], wire.decode(resp.content)))
    return out


def test_the_runtime_command_serves_the_layout_probes_pass_and_weights_follow_the_store(
    exported: tuple[CheckpointStore, KServeStarted],
) -> None:
    store, server = exported
    deadline = time.monotonic() + 180
    ready = server.probe("ready")
    while ready.returncode != 0 and time.monotonic() < deadline:
        time.sleep(1.0)
        ready = server.probe("ready")
    assert ready.returncode == 0, (ready.stderr, server.logs())
    assert server.probe("live").returncode == 0
    # why the probes are exec probes: kubelet's httpGet sends no key, and TorchServe says 400
    plain = requests.get(f"{server.inference_url}/ping", timeout=10)
    assert plain.status_code == 400 and "InvalidKeyException" in plain.text

    # the snapshot registered the model with its two workers, default version "latest"
    mgmt = requests.get(f"{server.management_url}/models/probe", timeout=10,
                        headers={"Authorization": f"Bearer {server.key('management')}"}).json()
    assert [(v["modelVersion"], len(v["workers"])) for v in mgmt] == [("latest", 2)]

    seen = answers(server, 20)
    assert {step for step, _, _ in seen} == {1}
    for _, _, y in seen:
        np.testing.assert_allclose(y, expected(1))

    # hot reload through the mounted store, on every worker (the workers poll LATEST)
    store.publish("probe", probe_weights(2), step=2)
    deadline = time.monotonic() + 60
    workers_on_2: set[str] = set()
    while len(workers_on_2) < 2 and time.monotonic() < deadline:
        for step, worker, y in answers(server, 10):
            if step == 2:
                np.testing.assert_allclose(y, expected(2))
                workers_on_2.add(worker)
    assert len(workers_on_2) == 2, server.logs()

    # the OIP route of the same runtime
    resp = requests.post(f"{server.inference_url}/v2/models/probe/infer", timeout=30,
                         headers={"Authorization": f"Bearer {server.key()}"},
                         json={"inputs": [{"name": "INPUT__0", "shape": [2, 4], "datatype": "FP32",
                                           "data": X.reshape(-1).tolist()}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["parameters"]["step"] == 2

    # a wrong key file: the readiness probe says so in one line and fails
    (server.workdir / "bad_key.json").write_text(json.dumps(
        {"management": {"key": "x"}, "inference": {"key": "x"}, "API": {"key": "x"}}))
    env = dict(server.env, BRAY_PROBE_URL=server.inference_url, BRAY_MANAGEMENT_URL=server.management_url,
               BRAY_KEY_FILE=str(server.workdir / "bad_key.json"))
    bad = subprocess.run([sys.executable, "-m", "bray.ts_config.probe", "--ready"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr

    server.stop()  # TorchServe removes its key file as it stops
    gone = server.probe("live")
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1, gone.stderr
    (server.workdir / "key_file.json").write_text((server.workdir / "bad_key.json").read_text())
    gone = server.probe("live")
    assert gone.returncode == 1 and "nothing answers" in gone.stderr
