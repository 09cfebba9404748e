"""The bridge's inference client without a TorchServe: what a process leaves behind when it ends."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

_FORGETS_TO_CLOSE = r"""
import socket, sys
from bray.bridge._loop import loop_session, run_sync
from bray.torchserve.inference import InferenceClient
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()  # nobody listens
client = InferenceClient([f"http://127.0.0.1:{port}"], timeout_s=2, max_retries=0, reconnect_timeout_s=0.1,
                         session_factory=loop_session)  # as RemoteModel makes it
try:
    run_sync(client.predict("m", b"x"), timeout_s=10)  # opens the bridge loop's session
except Exception as err:
    print(type(err).__name__)
"""


@pytest.mark.parametrize("http_client", ["http1", "aiohttp"])
def test_a_process_that_never_closes_its_client_exits_without_warnings(http_client: str) -> None:
    env = {**os.environ, "BRAY_HTTP_CLIENT": http_client}
    out = subprocess.run([sys.executable, "-c", _FORGETS_TO_CLOSE], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ServerUnreachableError"  # the session was really used
    assert "Unclosed" not in out.stderr and "destroyed" not in out.stderr, out.stderr
