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
print("aiohttp loaded" if "aiohttp" in sys.modules else "aiohttp not loaded")
"""


@pytest.mark.parametrize("http_client", ["http1", "aiohttp"])
def test_a_process_that_never_closes_its_client_exits_without_warnings(http_client: str) -> None:
    env = {**os.environ, "BRAY_HTTP_CLIENT": http_client}
    out = subprocess.run([sys.executable, "-c", _FORGETS_TO_CLOSE], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    # The session was really used; the default one never loads aiohttp (~130 ms a process).
    loaded = "aiohttp loaded" if http_client == "aiohttp" else "aiohttp not loaded"
    assert out.stdout.splitlines() == ["ServerUnreachableError", loaded], out.stdout
    assert "Unclosed" not in out.stderr and "destroyed" not in out.stderr, out.stderr


def test_a_sync_call_on_the_bridge_loop_answers_raises_and_times_out() -> None:
    import asyncio
    import threading

    from bray.bridge._loop import in_loop_thread, run_sync
    from bray.errors import BrayTimeoutError

    async def answer() -> bool:
        await asyncio.sleep(0)
        return in_loop_thread()

    async def fail() -> None:
        raise ValueError("the coroutine's own error")

    cancelled = threading.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    assert run_sync(answer(), timeout_s=10) is True  # ran on the loop's thread
    with pytest.raises(ValueError, match="own error"):
        run_sync(fail(), timeout_s=10)
    with pytest.raises(BrayTimeoutError, match="within 0.1 s"):
        run_sync(hang(), timeout_s=0.1)
    assert cancelled.wait(10)  # not left running on the loop
