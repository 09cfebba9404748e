"""``bray-archive server start|status|stop`` through the installed console script, on a real TorchServe."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import requests

from tests.unit.test_cli_failures import BRAY_ARCHIVE, one_line


def bray_archive(*argv: str, env: dict[str, str] | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BRAY_")}
    full_env.update(env or {})
    return subprocess.run([BRAY_ARCHIVE, *argv], capture_output=True, text=True, env=full_env, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "server"
    yield path
    bray_archive("server", "stop", "--workdir", str(path), "--timeout-s", "20")  # whatever the test did


def test_start_status_stop(workdir: Path, tmp_path: Path) -> None:
    done = bray_archive("server", "start", "--workdir", str(workdir), "--any-ports",
                        "--model-store", str(tmp_path / "model_store"), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["key_file"] == str(workdir / "key_file.json") and Path(info["key_file"]).is_file()
    assert info["log_dir"] == str(workdir / "logs") and (workdir / "logs" / "ts_log.log").is_file()

    # The server outlives the command, answers with the key it wrote, and took the bundled log config.
    key = json.loads(Path(info["key_file"]).read_text())["inference"]["key"]
    ping = requests.get(f"{info['inference_url']}/ping", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert ping.status_code == 200, ping.text
    assert "log4j2.xml" in " ".join(Path(f"/proc/{info['java_pid']}/cmdline").read_text().split("\0"))

    # What the human form prints, and what the other commands find with only the key file given.
    status = bray_archive("server", "status", "--workdir", str(workdir))
    assert status.returncode == 0 and "answers /ping" in status.stdout
    for label in ("inference", "management", "metrics", "key file", "logs"):
        assert label in status.stdout
    models = bray_archive("status", "--management", info["management_url"], "--key-file", info["key_file"])
    assert models.returncode == 0 and "no models registered" in models.stdout, models.stderr

    again = bray_archive("server", "start", "--workdir", str(workdir), "--any-ports")
    assert again.returncode == 1 and "is still running" in one_line(again.stderr)
    assert f"bray-archive server stop --workdir {workdir}" in again.stderr

    stop = bray_archive("server", "stop", "--workdir", str(workdir))
    assert stop.returncode == 0 and "stopped TorchServe" in stop.stdout, stop.stderr
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{info['inference_url']}/ping", timeout=5)
    for pid in (info["java_pid"], info["launcher_pid"]):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert bray_archive("server", "status", "--workdir", str(workdir)).returncode == 3
    assert "nothing to stop" in bray_archive("server", "stop", "--workdir", str(workdir)).stdout


def test_start_on_a_taken_port_says_which(workdir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = bray_archive("server", "start", "--workdir", str(workdir), "--any-ports",
                            "--inference-port", str(port), "--model-store", str(tmp_path / "ms"))
    line = one_line(done.stderr)
    assert done.returncode == 1 and f"port(s) already in use on 127.0.0.1: inference {port}" in line
    assert "--any-ports" in line


def test_a_start_that_fails_is_one_line_pointing_at_the_logs(workdir: Path, tmp_path: Path) -> None:
    # TorchServe cannot answer /ping within 10 ms: the start fails, and the server is stopped again.
    done = bray_archive("server", "start", "--workdir", str(workdir), "--any-ports", "--timeout-s", "0.01",
                        "--model-store", str(tmp_path / "ms"))
    line = one_line(done.stderr)
    assert done.returncode == 1 and "did not answer" in line and "within 0.01 s" in line
    assert f"its logs are in {workdir / 'logs'}" in line
    assert bray_archive("server", "status", "--workdir", str(workdir)).returncode == 3


def test_models_given_at_start_are_registered(workdir: Path, tmp_path: Path) -> None:
    """`--models` (what the README advises for versions that must come back after a restart)."""
    import numpy as np
    import torch

    from bray.archiver.pack import pack_archive
    from bray.export import export_model
    from bray.store import CheckpointStore

    store = CheckpointStore(tmp_path / "store")
    export_model(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), dest=store.export_dir("policy"))
    store.publish("policy", {"weight": np.ones((2, 4), np.float32), "bias": np.zeros(2, np.float32)}, step=5)
    packed = pack_archive(store, "policy", step=5, model_store=tmp_path / "ms")

    done = bray_archive("server", "start", "--workdir", str(workdir), "--any-ports", "--model-store",
                        str(tmp_path / "ms"), "--models", f"policy={packed.file_name}", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    versions = bray_archive("versions", "policy", "--json", "--management", info["management_url"],
                            "--key-file", info["key_file"], "--model-store", str(tmp_path / "ms"),
                            "--store", str(store.root))
    assert versions.returncode == 0, versions.stderr
    (version,) = json.loads(versions.stdout)
    assert (version["version"], version["step"], version["is_default"]) == ("5", 5, True)
