"""The node proxy's slot protocol (bray.bridge._slot) with real shared memory and real sockets."""

from __future__ import annotations

import os
import signal
import socket

import numpy as np
import pytest

from bray.bridge._slot import (
    HEADER,
    MIN_SLOT_BYTES,
    OP_HELLO,
    Slot,
    check_peer,
    error_body,
    proxy_address,
    raise_error,
    read_outputs,
)
from bray.errors import InputError, ProxyUnavailableError, ServerError

OBS = {"args": [np.arange(64, dtype=np.float32).reshape(1, 64)], "kwargs": {"mask": np.ones((1, 3), np.int64)}}


def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(4)
    return sock


def test_a_slot_written_by_one_mapping_is_read_by_another() -> None:
    caller = Slot.create()
    proxy = Slot(os.dup(caller.fd), caller.size)  # what the proxy maps from the fd it was handed
    try:
        nbytes = caller.write(OBS)
        got = proxy.read(nbytes)
        np.testing.assert_array_equal(got["args"][0], OBS["args"][0])
        np.testing.assert_array_equal(got["kwargs"]["mask"], OBS["kwargs"]["mask"])
        # The answer goes back through the same memory.
        out = {"logits": np.full((1, 16), 2.5, np.float32)}
        del got
        back = read_outputs(caller, proxy.write(out))
        np.testing.assert_array_equal(back["logits"], out["logits"])
        caller.write({"logits": np.zeros((1, 16), np.float32)})
        assert back["logits"][0, 0] == 2.5, "read_outputs must copy: the slot is reused by the next call"
    finally:
        caller.close()
        proxy.close()


def test_a_slot_grows_for_a_large_answer_and_the_other_side_follows() -> None:
    caller = Slot.create()
    proxy = Slot(os.dup(caller.fd), caller.size)
    try:
        big = {"frames": np.random.default_rng(0).standard_normal((16, 84, 84)).astype(np.float32)}
        nbytes = proxy.write(big)
        assert proxy.size >= nbytes > MIN_SLOT_BYTES
        caller.follow(proxy.size)
        np.testing.assert_array_equal(read_outputs(caller, nbytes)["frames"], big["frames"])
        with pytest.raises(ProxyUnavailableError, match="protocol error"):
            caller.follow(proxy.size * 4)  # a size the memory does not have
        with pytest.raises(ProxyUnavailableError, match="protocol error"):
            caller.read(caller.size + 1)
    finally:
        caller.close()
        proxy.close()


def test_slots_leave_nothing_in_dev_shm() -> None:
    before = set(os.listdir("/dev/shm"))
    slots = [Slot.create(1 << 20) for _ in range(4)]
    assert set(os.listdir("/dev/shm")) == before  # memfd: no name anywhere
    for slot in slots:
        slot.close()


def test_a_slot_travels_over_the_socket_and_is_shared_with_a_real_process() -> None:
    address = f"\0bray-test-{os.getpid()}-{os.urandom(4).hex()}"
    with _listener(address) as listener:
        pid = os.fork()
        if pid == 0:  # the caller process: makes its slot, hands it over, writes its inputs
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(address)
                    slot = Slot.create()
                    nbytes = slot.write(OBS)
                    socket.send_fds(sock, [HEADER.pack(OP_HELLO, 1, -1, nbytes, slot.size)], [slot.fd])
                    sock.recv(1)  # wait for the reader before exiting
            finally:
                os._exit(0)
        conn, _ = listener.accept()
        with conn:
            assert check_peer(conn) == pid
            data, fds, _, _ = socket.recv_fds(conn, HEADER.size, 1)
            op, n, _, nbytes, size = HEADER.unpack(data)
            slot = Slot(fds[0], size)
            got = slot.read(nbytes)
            np.testing.assert_array_equal(got["args"][0], OBS["args"][0])
            del got
            slot.close()
            conn.send(b"x")
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
def test_a_process_of_another_user_is_refused() -> None:
    address = f"\0bray-test-{os.getpid()}-{os.urandom(4).hex()}"
    with _listener(address) as listener:
        pid = os.fork()
        if pid == 0:
            try:
                os.setuid(65534)  # nobody
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(address)
                    sock.recv(1)
            finally:
                os._exit(0)
        conn, _ = listener.accept()
        with conn:
            with pytest.raises(ProxyUnavailableError, match="runs as uid 65534"):
                check_peer(conn)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_the_proxy_address_names_one_model_version_server_set_and_store(tmp_path: object) -> None:
    a = proxy_address("policy", "latest", ["http://a:8080", "http://b:8080/"], "/s")
    assert a.startswith(f"\0bray-proxy-{os.getuid()}-")
    assert a == proxy_address("policy", "latest", ["http://b:8080", "http://a:8080"], "/s")
    others = {proxy_address("opp", "latest", ["http://a:8080", "http://b:8080"], "/s"),
              proxy_address("policy", "12", ["http://a:8080", "http://b:8080"], "/s"),
              proxy_address("policy", "latest", ["http://a:8080"], "/s"),
              proxy_address("policy", "latest", ["http://a:8080", "http://b:8080"], "/t")}
    assert a not in others and len(others) == 4


@pytest.mark.parametrize("err,cls", [(InputError("input 0 has dtype float64, expected float32", status=400), InputError),
                                     (RuntimeError("boom"), ServerError)], ids=["server-error", "proxy-bug"])
def test_errors_cross_the_socket_as_their_own_class(err: Exception, cls: type) -> None:
    with pytest.raises(cls) as caught:
        raise_error(error_body(err))
    assert str(err) in str(caught.value)
    assert getattr(caught.value, "status", None) == getattr(err, "status", None)


def test_repeated_structures_reuse_their_layout_and_stay_exact() -> None:
    """Written and read again through bray.wire's kept layouts, structure after structure, exactly."""
    from bray import tree, wire
    from bray.errors import WireError

    caller = Slot.create()
    proxy = Slot(os.dup(caller.fd), caller.size)
    rng = np.random.default_rng(1)
    structures = [
        lambda: {"args": [rng.standard_normal((1, 64)).astype(np.float32)]},
        lambda: {"args": [rng.standard_normal((3, 64)).astype(np.float32)]},  # another batch size
        lambda: {"args": [rng.integers(0, 9, (1, 64))], "kwargs": {"m": rng.random((1, 2)) > 0.5}},
        lambda: ({"a": rng.standard_normal((2, 5)).astype(np.float16)}, [np.zeros((2, 0), np.float32)]),
    ]
    try:
        for _ in range(3):  # the second and third rounds hit the caches
            for make in structures:
                obj = make()
                nbytes = caller.write(obj)
                assert bytes(caller.mm[:nbytes]) == wire.encode(obj)
                got = proxy.read(nbytes)
                (got_leaves, got_def), (leaves, treedef) = tree.flatten(got), tree.flatten(obj)
                assert got_def == treedef
                for a, b in zip(got_leaves, leaves, strict=True):
                    assert a.dtype == b.dtype and a.shape == b.shape
                    np.testing.assert_array_equal(a, b)
                del got
        assert wire._ENCODED and wire._DECODED
        # A cached header with fewer bytes than its arrays need is checked in full again.
        obj = structures[0]()
        nbytes = caller.write(obj)
        with pytest.raises(WireError, match="only 248 bytes follow"):
            proxy.read(nbytes - 8)
        # A non-contiguous array is written by the general path, correctly.
        view = rng.standard_normal((1, 128)).astype(np.float32)[:, ::2]
        nbytes = caller.write({"args": [view]})
        np.testing.assert_array_equal(proxy.read(nbytes)["args"][0], view)
    finally:
        caller.close()
        proxy.close()


def _silent_proxy(address: str) -> tuple[socket.socket, list[socket.socket]]:
    """A peer that completes the hello and then never answers a call (a hung proxy)."""
    import threading

    listener = _listener(address)
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            _, fds, _, _ = socket.recv_fds(conn, HEADER.size, 1)
            for fd in fds:
                os.close(fd)
            conn.sendall(HEADER.pack(0, 0, -1, 0, MIN_SLOT_BYTES))

    threading.Thread(target=serve, daemon=True).start()
    return listener, accepted


def test_a_hung_proxy_fails_a_sync_call_after_timeout_s_never_hangs() -> None:
    import asyncio
    import time

    from bray.bridge.proxy_client import ProxyClient
    from bray.errors import BrayTimeoutError

    address = f"\0bray-test-hung-{os.getpid()}"
    listener, _ = _silent_proxy(address)
    client = ProxyClient(address, argv=["false"], env={}, timeout_s=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(BrayTimeoutError, match="did not answer within 0.3 s"):
            client.call(OBS, 1, -1)  # the kernel's SO_RCVTIMEO, not a poll per recv
        assert 0.25 < time.monotonic() - started < 5
        with pytest.raises(BrayTimeoutError):
            asyncio.run(client.acall(OBS, 1, -1))
    finally:
        client.close()
        listener.close()


def test_a_forked_child_does_not_reuse_its_parents_connections() -> None:
    from bray.bridge.proxy_client import ProxyClient

    address = f"\0bray-test-fork-{os.getpid()}"
    listener, accepted = _silent_proxy(address)
    client = ProxyClient(address, argv=["false"], env={}, timeout_s=5)
    try:
        assert client.start(wait_s=5)
        parent_conn = client._idle[True][0]
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its connection must be new (the parent's socket is shared)
            try:
                conn = client._take(True)
                os.write(write, b"new" if conn is not parent_conn else b"reused")
            finally:
                os._exit(0)
        os.close(write)
        assert os.read(read, 16) == b"new"
        os.waitpid(pid, 0)
        assert client._take(True) is parent_conn  # the parent keeps its own
    finally:
        client.close()
        listener.close()
