"""Every way ``bray-archive`` fails, driven through the installed console script.

Each case runs the ``bray-archive`` that ``pip install`` put next to this interpreter,
as a user would, and checks the exit code and that stderr is exactly one line saying
what happened (no traceback). The failing servers are real sockets on loopback: a
closed port, a listener that never answers, one whose accept queue is full (so a
connection attempt is never answered), one that resets every connection.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from bray.torchserve.launcher import free_ports


def _console_script() -> str:
    path = shutil.which("bray-archive", path=str(Path(sys.executable).parent))
    assert path, f"no bray-archive beside {sys.executable}: install the package (bash scripts/setup.sh)"
    return path


BRAY_ARCHIVE = _console_script()


def run(*argv: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> tuple[int, str, str]:
    """``bray-archive argv...``: (exit code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BRAY_")}
    full_env.update(env or {})
    done = subprocess.run([BRAY_ARCHIVE, *argv], capture_output=True, text=True, env=full_env,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _close_listener(sock: socket.socket) -> None:
    """Close a listening socket and wake the thread blocked in its accept() (close alone does not)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """Accepts connections (the kernel does) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


@pytest.fixture
def full_listener() -> Iterator[int]:
    """A port whose accept queue is full: new connection attempts get no answer at all."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        try:
            f.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(f)
    yield port
    for f in fillers:
        f.close()
    sock.close()


@pytest.fixture
def resetting_server() -> Iterator[int]:
    """Reads each request, then resets the connection (SO_LINGER 0: an RST, no answer)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    _close_listener(sock)
    thread.join(5)


def test_closed_port_says_connection_refused_and_how_to_start_the_server() -> None:
    (port,) = free_ports(1)
    code, _, err = run("status", "--management", f"http://127.0.0.1:{port}")
    line = one_line(err)
    assert code == 3
    assert f"nothing listens at http://127.0.0.1:{port}" in line and "connection refused" in line
    assert "is the server running? start it with: bray-archive server start" in line


def test_unresolvable_name_says_so() -> None:
    code, _, err = run("versions", "policy", "--management", "http://nonexistent.invalid:8081")
    line = one_line(err)
    assert code == 3
    assert "cannot resolve the host name 'nonexistent.invalid'" in line and "name not resolved" in line
    assert "connection refused" not in line


def test_listener_that_never_answers_is_a_read_timeout(silent_listener: socket.socket) -> None:
    port = silent_listener.getsockname()[1]
    code, _, err = run("status", "--management", f"http://127.0.0.1:{port}", "--timeout-s", "0.5")
    line = one_line(err)
    assert code == 1
    assert "accepted the connection but did not answer GET /models within 0.5 s (read timed out)" in line
    assert "--timeout-s" in line


def test_connection_never_accepted_is_a_connect_timeout(full_listener: int) -> None:
    code, _, err = run("status", "--management", f"http://127.0.0.1:{full_listener}", "--timeout-s", "0.5")
    line = one_line(err)
    assert code == 3
    assert "did not accept a connection within 0.5 s" in line and "connect timed out" in line


def test_server_that_resets_says_the_connection_was_dropped(resetting_server: int) -> None:
    code, _, err = run("status", "--management", f"http://127.0.0.1:{resetting_server}")
    line = one_line(err)
    assert code == 3
    assert "dropped the connection during GET /models (connection reset)" in line
    assert "connection refused" not in line


def test_several_management_urls_are_refused_naming_them() -> None:
    code, _, err = run("status", env={"BRAY_MANAGEMENT_URL": "http://a:1,http://b:2"})
    line = one_line(err)
    assert code == 1
    assert "BRAY_MANAGEMENT_URL lists 2 servers (http://a:1, http://b:2)" in line
    assert "--management http://a:1" in line


@pytest.mark.parametrize(("env", "argv", "expected"), [
    ({"BRAY_MANAGEMENT_URL": "http://a:port"}, [], "management address 'http://a:port' is not a valid address"),
    ({"BRAY_MANAGEMENT_URL": "ftp://a:1"}, [], "set BRAY_MANAGEMENT_URL like"),
    ({}, ["--management", "localhost:8081"], "pass --management like 'http://127.0.0.1:8081'"),
    ({"BRAY_INFERENCE_URL": "127.0.0.1:8080"}, [], "set BRAY_INFERENCE_URL like"),
], ids=["bad-port", "bad-scheme", "flag-without-scheme", "inference-url"])
def test_a_malformed_address_is_named_with_its_own_variable(env: dict[str, str], argv: list[str],
                                                            expected: str) -> None:
    code, _, err = run("status", *argv, env=env)
    line = one_line(err)
    assert code == 1 and expected in line
    if "BRAY_MANAGEMENT_URL" in env:
        assert "BRAY_INFERENCE_URL" not in line


def test_ctrl_c_during_a_call_is_one_line_and_exit_130(silent_listener: socket.socket) -> None:
    port = silent_listener.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRAY_")}
    # A shell's background job (`cmd &`) inherits SIGINT ignored, and so would the CLI, which
    # would then never see the Ctrl-C: the child gets the default disposition back first.
    proc = subprocess.Popen([BRAY_ARCHIVE, "status", "--management", f"http://127.0.0.1:{port}",
                             "--timeout-s", "120"], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        silent_listener.settimeout(60)
        conn, _ = silent_listener.accept()  # the CLI is now inside its HTTP call
        conn.recv(65536)  # ... and has sent its request
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    conn.close()
    assert proc.returncode == 130
    assert one_line(err) == "bray-archive status: interrupted (Ctrl-C)"


def test_watch_of_a_store_that_is_not_there_says_so() -> None:
    code, _, err = run("watch", "--store", "/nonexistent", "--name", "policy", "--every", "10",
                       "--management", "http://127.0.0.1:9")
    line = one_line(err)
    assert code == 1 and "the checkpoint store /nonexistent does not exist" in line and "--store" in line


def test_publish_from_a_file_says_it_is_not_a_store(tmp_path: Path) -> None:
    not_a_store = tmp_path / "passwd"
    not_a_store.write_text("root:x:0:0::/root:/bin/sh\n")
    code, _, err = run("publish", "--store", str(not_a_store), "--name", "policy",
                       "--management", "http://127.0.0.1:9")
    line = one_line(err)
    assert code == 1 and f"{not_a_store} is not a directory, so not a checkpoint store" in line
    assert "publish one first" not in line


@pytest.mark.parametrize(("argv", "expected"), [
    (["scale", "policy"], "bray-archive scale: the following arguments are required: --workers"),
    (["publish", "--name", "p", "--step", "-3"], "expected a step number >= 0 or 'latest', got '-3'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
], ids=["missing-flag", "bad-step", "unknown-command"])
def test_usage_errors_are_one_line_and_exit_2(argv: list[str], expected: str) -> None:
    code, _, err = run(*argv)
    line = one_line(err)
    assert code == 2 and expected in line and "--help" in line


def test_server_status_without_a_server_exits_3(tmp_path: Path) -> None:
    code, _, err = run("server", "status", "--workdir", str(tmp_path))
    line = one_line(err)
    assert code == 3
    assert line == (f"bray-archive server status: no server running from {tmp_path.resolve()}; "
                    f"start it with: bray-archive server start --workdir {tmp_path.resolve()}")


def test_python_dash_m_bray_archiver_is_the_same_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "bray.archiver", "--version"], capture_output=True, text=True,
                          timeout=60)
    from bray import __version__

    assert done.returncode == 0 and done.stdout.strip() == f"bray-archive {__version__}", done.stderr


class FlakyServer:
    """A real HTTP listener that resets the first ``resets`` connections, then answers JSON."""

    def __init__(self, resets: int, body: bytes = b'{"models": []}') -> None:
        self.resets, self.body, self.requests = resets, body, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.requests.append(conn.recv(65536).split(b"\r\n", 1)[0].decode())
                if len(self.requests) <= self.resets:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(self.body), self.body))

    def close(self) -> None:
        _close_listener(self.sock)
        self.thread.join(5)


def test_idempotent_gets_are_retried_after_a_reset_and_other_calls_are_not() -> None:
    from bray.errors import ServerUnreachableError
    from bray.torchserve.management import ManagementClient

    flaky = FlakyServer(resets=2)
    try:
        with ManagementClient(flaky.url, key_file=None, timeout_s=10) as client:
            assert client.list_models() == []  # two resets, then the answer: within the two retries
        assert [r.split()[0] for r in flaky.requests] == ["GET", "GET", "GET"]
    finally:
        flaky.close()

    flaky = FlakyServer(resets=3)  # one more reset than retries: the error names the reset
    try:
        with ManagementClient(flaky.url, key_file=None, timeout_s=10) as client:
            with pytest.raises(ServerUnreachableError, match="connection reset") as err:
                client.list_models()
        assert err.value.reason == "reset" and len(flaky.requests) == 3
    finally:
        flaky.close()

    flaky = FlakyServer(resets=1)  # a registration is not repeated: it may have taken effect
    try:
        with ManagementClient(flaky.url, key_file=None, timeout_s=10) as client:
            with pytest.raises(ServerUnreachableError, match="POST /models"):
                client.register("policy-1.mar", initial_workers=0)
        assert [r.split()[0] for r in flaky.requests] == ["POST"]
    finally:
        flaky.close()


def test_the_inference_transport_says_why_each_node_failed(resetting_server: int) -> None:
    from bray.bridge._loop import run_sync
    from bray.errors import ServerError, ServerUnreachableError
    from bray.torchserve.inference import InferenceClient

    (closed,) = free_ports(1)
    client = InferenceClient(["http://nonexistent.invalid:8080", f"http://127.0.0.1:{closed}"],
                             reconnect_timeout_s=0.5)
    with pytest.raises(ServerUnreachableError) as err:
        run_sync(client.predict("policy", b"{}"), timeout_s=60)
    run_sync(client.close(), timeout_s=10)
    assert "http://nonexistent.invalid:8080: name not resolved" in str(err.value)
    assert f"http://127.0.0.1:{closed}: connection refused" in str(err.value)
    assert "bray-archive server start" in str(err.value) and err.value.reason == "mixed"

    client = InferenceClient([f"http://127.0.0.1:{resetting_server}"], max_retries=1, reconnect_timeout_s=0.5)
    with pytest.raises(ServerError, match=r"broke 2 times during /predictions/policy \(last: connection reset\)"):
        run_sync(client.predict("policy", b"{}"), timeout_s=60)
    run_sync(client.close(), timeout_s=10)


def test_a_key_file_that_is_not_there_says_where_it_comes_from(tmp_path: Path) -> None:
    code, _, err = run("status", "--key-file", str(tmp_path / "key_file.json"), "--management", "http://127.0.0.1:9")
    line = one_line(err)
    assert code == 1 and f"TorchServe key file {tmp_path / 'key_file.json'} does not exist" in line
    assert "bray-archive server start" in line


def test_a_key_file_that_is_not_one_says_what_was_expected(tmp_path: Path) -> None:
    bad = tmp_path / "key_file.json"
    bad.write_text("not json")
    code, _, err = run("versions", "policy", "--key-file", str(bad), "--management", "http://127.0.0.1:9")
    line = one_line(err)
    assert code == 1 and f"cannot read TorchServe key file {bad}" in line and '"management": {"key": ...}' in line
