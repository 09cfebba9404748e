"""Helpers for tests that serve models on a real TorchServe: point bray at it, clean up after."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import bray
from bray.errors import ModelNotFoundError
from bray.torchserve.launcher import TorchServeProcess, free_ports
from bray.torchserve.management import ManagementClient


def init_for(server: TorchServeProcess, store: Path, **overrides: object) -> None:
    """``bray.init`` pointed at ``server`` with the checkpoint store ``store``."""
    kwargs: dict[str, object] = dict(store=store, model_store=server.model_store, inference_url=server.inference_url,
                                     management_url=server.management_url, key_file=server.key_file)
    kwargs.update(overrides)
    bray.init(**kwargs)  # type: ignore[arg-type]


def unregister_all(server: TorchServeProcess, names: set[str]) -> None:
    """Unregister every version of each model in ``names`` (the ones not registered skipped)."""
    with ManagementClient(server.management_url, key_file=server.key_file, timeout_s=120) as client:
        for name in sorted(names):
            try:
                client.unregister(name)
            except ModelNotFoundError:
                pass


@contextmanager
def dashboard_process(store: Path, server: TorchServeProcess, log: Path, *, refresh_s: float = 0.5) -> Iterator[str]:
    """``bray-archive dashboard`` as a user starts it, in its own process; yields its URL."""
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "bray.archiver", "dashboard", "--store", str(store), "--port", str(port),
           "--management", server.management_url, "--key-file", str(server.key_file),
           "--model-store", str(server.model_store), "--refresh-s", str(refresh_s)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 60
        while b"dashboard of" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"dashboard did not start:\n{log.read_text()}"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
