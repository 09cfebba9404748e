"""The README's manual start: `torchserve --start --ts-config <bundled> --model-store DIR`.

Run literally, through the torchserve CLI, with TorchServe's own TS_* environment
variables moving the addresses (the bundled config sets enable_envvars_config=true), in
a working directory of its own; stopped with `torchserve --stop`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from bray.torchserve.launcher import free_ports
from bray.ts_config import config_path, log_config_path


def test_readme_start_command_serves_on_env_overridden_loopback_ports(tmp_path: Path) -> None:
    inference, management, metrics, grpc_inf, grpc_mgmt = free_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    env.update(
        TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{inference}",
        TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{management}",
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{metrics}",
        TS_GRPC_INFERENCE_PORT=str(grpc_inf),
        TS_GRPC_MANAGEMENT_PORT=str(grpc_mgmt),
        # torchserve keeps its pid file in the temp dir: one of our own, so --stop stops this one
        TMPDIR=str(tmp_path / "tmp"), LOG_LOCATION=str(tmp_path / "logs"), METRICS_LOCATION=str(tmp_path / "logs"),
    )
    (tmp_path / "tmp").mkdir()
    (tmp_path / "model_store").mkdir()
    torchserve = str(Path(sys.executable).parent / "torchserve")
    cmd = [torchserve, "--start", "--ncs", "--ts-config", str(config_path()), "--log-config", str(log_config_path()),
           "--model-store", str(tmp_path / "model_store")]
    try:
        # The Java server inherits stdout: a file, not a pipe, or run() would wait for it to exit.
        with open(tmp_path / "torchserve.out", "wb") as out:
            subprocess.run(cmd, cwd=tmp_path, env=env, check=True, stdout=out, stderr=subprocess.STDOUT, timeout=60)
        deadline = time.monotonic() + 90
        key_file = tmp_path / "key_file.json"
        status = None
        while time.monotonic() < deadline:
            if key_file.is_file():
                try:
                    key = json.loads(key_file.read_text())["inference"]["key"]
                    status = requests.get(f"http://127.0.0.1:{inference}/ping",
                                          headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code
                except (ValueError, KeyError, requests.ConnectionError):
                    status = None
                if status == 200:
                    break
            time.sleep(0.5)
        assert status == 200, (tmp_path / "logs" / "ts_log.log").read_text(errors="replace")[-3000:]
        # token authorization is on: no key, no answer
        assert requests.get(f"http://127.0.0.1:{inference}/ping", timeout=5).status_code != 200
        # the model API is on and bound where the variable says
        key = json.loads(key_file.read_text())["management"]["key"]
        resp = requests.get(f"http://127.0.0.1:{management}/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
        assert resp.status_code == 200 and resp.json()["models"] == []
        listening = {c.laddr.port: c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
        for port in (inference, management, metrics):
            # Java listens on an IPv6 socket bound to the IPv4-mapped loopback address
            assert listening.get(port) in ("127.0.0.1", "::ffff:127.0.0.1"), (port, listening.get(port))
    finally:
        subprocess.run([torchserve, "--stop"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        for proc in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
                proc.kill()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{inference}/ping", timeout=2)
