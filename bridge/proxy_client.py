"""A process's side of the node proxy: its connections, starting the proxy, noticing it gone.

``RemoteModel(..., node_proxy=True)`` holds a :class:`NodeProxyTransport`: a
:class:`ProxyClient` to the proxy, and a direct transport for the calls made while the
proxy cannot be reached. Each call takes an
idle connection (a socket and its shared-memory slot, see :mod:`bray.bridge._slot`) or
makes one, so concurrent calls of a process (threads or coroutines) each have their own;
a synchronous call blocks its own thread on its own socket, with no hop to an event
loop. When no proxy serves the model, the first caller that can take the start lock (an
abstract socket name, so a dead starter frees it) starts one; callers meanwhile get
:class:`~bray.errors.ProxyUnavailableError` at once, and ``RemoteModel`` sends
their calls to TorchServe directly. A proxy that dies mid-call fails that call with the
same error (the caller's socket reads EOF), never a hang.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from bray.bridge._slot import (
    HEADER,
    OP_CALL,
    OP_HELLO,
    OP_STATS,
    ST_ERROR,
    ST_SLOT,
    Slot,
    check_peer,
    raise_error,
    read_outputs,
)
from bray.bridge.transport import Transport, TransportStats
from bray.errors import BrayTimeoutError, ProxyUnavailableError

if TYPE_CHECKING:  # pragma: no cover
    from bray.bridge.direct import DirectTransport
    from bray.locations import Locations

__all__ = ["NodeProxyTransport", "ProxyClient"]

log = logging.getLogger(__name__)

# Between two attempts to reach a proxy that is not there (yet): calls go direct meanwhile.
_RETRY_S = 0.25
# A proxy that answered "could not set up the model" is asked again after this long.
_REFUSED_RETRY_S = 10.0
_HELLO_TIMEOUT_S = 10.0
_START_TIMEOUT_S = 120.0

# Forks seen by this process's children (os.register_at_fork, installed by the first
# ProxyClient): a client notices it was forked by comparing, instead of asking getpid on
# every call (a system call each).
_forks = 0
_fork_hook = False


def _forked() -> None:
    global _forks
    _forks += 1


def _kernel_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """A blocking socket whose reads and writes fail with EAGAIN after ``timeout_s``.

    Python's own ``settimeout`` polls before every recv and send (a system call each,
    two per call); the kernel's SO_RCVTIMEO / SO_SNDTIMEO cost nothing per call.
    """
    sock.settimeout(None)
    seconds = int(timeout_s)
    tv = struct.pack("ll", seconds, int((timeout_s - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class _ProxyConn:
    __slots__ = ("sock", "slot", "blocking")

    def __init__(self, sock: socket.socket, slot: Slot, blocking: bool) -> None:
        self.sock = sock
        self.slot = slot
        self.blocking = blocking

    def close(self) -> None:
        self.sock.close()
        self.slot.close()


class ProxyClient:
    """Connections from this process to the node proxy at ``address``.

    Args:
        address: the proxy's abstract socket name (:func:`~bray.bridge._slot.proxy_address`).
        argv, env: how to start the proxy when none serves (``python -m bray.bridge.proxy``).
        timeout_s: limit for one call's answer.
        weight_set: the clone this process calls through the proxy of the model serving
            it (said once per connection, in its hello); ``None``: the model's own weights.
    """

    def __init__(self, address: str, *, argv: Sequence[str], env: Mapping[str, str], timeout_s: float,
                 weight_set: str | None = None) -> None:
        self.address = address
        self.weight_set = weight_set
        self.argv = list(argv)
        self.env = dict(env)
        self.timeout_s = timeout_s
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._idle: dict[bool, list[_ProxyConn]] = {True: [], False: []}  # by "blocking"
        global _fork_hook
        if not _fork_hook:
            os.register_at_fork(after_in_child=_forked)
            _fork_hook = True
        self._forks = _forks
        self._down_until = 0.0
        self._starting = False  # the last failure was "no proxy yet; starting one"
        self._starter: tuple[socket.socket, subprocess.Popen[bytes], float] | None = None

    # --- connections ---------------------------------------------------------------------

    def start(self, *, wait_s: float) -> bool:
        """Reach the proxy, starting it when none serves, within ``wait_s``.

        Returns:
            ``True`` when it answers; ``False`` otherwise, with :attr:`last_error` saying why.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._give(self._connect(blocking=True))
                return True
            except ProxyUnavailableError as err:
                self.last_error = str(err)
                if not err.starting or time.monotonic() > deadline:
                    return False
                exited = self._starter_exit()
                if exited is not None:
                    self.last_error = f"the node proxy exited with status {exited} while starting ({' '.join(self.argv)})"
                    return False
            time.sleep(0.02)

    def _connect(self, *, blocking: bool) -> _ProxyConn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.address)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            self._spawn()
            raise ProxyUnavailableError("no node proxy serves this model yet; starting one", starting=True) from None
        slot: Slot | None = None
        try:
            check_peer(sock)
            sock.settimeout(_HELLO_TIMEOUT_S)
            slot = Slot.create()
            name = (self.weight_set or "").encode("ascii")
            socket.send_fds(sock, [HEADER.pack(OP_HELLO, 0, -1, len(name), slot.size) + name], [slot.fd])
            status, _, _, nbytes, _ = HEADER.unpack(_recv_exact(sock, HEADER.size))
            if status == ST_ERROR:
                body = _recv_exact(sock, nbytes)
                try:
                    reason = str(json.loads(body)["message"])
                except (ValueError, KeyError, TypeError):
                    reason = repr(body[:200])
                raise ProxyUnavailableError(f"the node proxy could not set up the model: {reason}")
        except (OSError, EOFError, ProxyUnavailableError) as err:
            sock.close()
            if slot is not None:
                slot.close()
            if isinstance(err, ProxyUnavailableError):
                raise
            raise ProxyUnavailableError(f"the node proxy did not complete the hello: {err!r}") from err
        self._started()
        if blocking:
            _kernel_timeouts(sock, self.timeout_s)
        else:
            sock.setblocking(False)
        return _ProxyConn(sock, slot, blocking)

    def _take(self, blocking: bool) -> _ProxyConn:
        with self._lock:
            if self._forks != _forks:  # a forked child: the parent's connections are not ours
                for conn in self._idle[True] + self._idle[False]:
                    conn.close()
                self._idle = {True: [], False: []}
                self._forks, self._starter = _forks, None
            pool = self._idle[blocking]
            if pool:
                return pool.pop()
            if time.monotonic() < self._down_until:
                raise ProxyUnavailableError(f"the node proxy is not available: {self.last_error}",
                                            starting=self._starting)
        try:
            return self._connect(blocking=blocking)
        except ProxyUnavailableError as err:
            self.last_error = str(err)
            self._starting = err.starting
            self._down_until = time.monotonic() + (_RETRY_S if err.starting else _REFUSED_RETRY_S)
            raise

    def _give(self, conn: _ProxyConn) -> None:
        with self._lock:
            self._idle[conn.blocking].append(conn)

    def _lost(self, conn: _ProxyConn, err: BaseException) -> ProxyUnavailableError:
        """The proxy went away: forget every connection to it (each would fail the same way)."""
        conn.close()
        with self._lock:
            for other in self._idle[True] + self._idle[False]:
                other.close()
            self._idle = {True: [], False: []}
            self._down_until = 0.0  # the next call tries (and restarts) it at once
        self.last_error = f"the node proxy went away during a call ({err!r})"
        return ProxyUnavailableError(self.last_error)

    # --- starting ------------------------------------------------------------------------

    def _spawn(self) -> None:
        """Start a proxy unless one is starting (ours or another process's: the start lock)."""
        with self._lock:
            if self._starter is not None:
                lock, proc, deadline = self._starter
                if proc.poll() is None and time.monotonic() < deadline:
                    return
                lock.close()
                self._starter = None
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                lock.bind(self.address + "-start")
            except OSError:
                lock.close()  # another process is starting it
                return
            proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            self._starter = (lock, proc, time.monotonic() + _START_TIMEOUT_S)

    def _started(self) -> None:
        with self._lock:
            if self._starter is not None:
                self._starter[0].close()  # the proxy answers: free the start lock
                self._starter = None

    def _starter_exit(self) -> int | None:
        with self._lock:
            starter = self._starter
        if starter is None:
            return None
        code = starter[1].poll()
        return code if code else None  # 0: another proxy was serving already

    # --- calls ---------------------------------------------------------------------------

    def call(self, payload: Any, n: int, min_step: int) -> tuple[Any, int]:
        """One forward through the proxy, blocking this thread.

        Raises:
            ProxyUnavailableError: no proxy, or it went away during the call (the call may
                be sent again elsewhere: a forward has no side effects).
            BrayTimeoutError: no answer within ``timeout_s``.
            The server's error (``InputError``, ``ServerError``, ...) for this call.
        """
        conn = self._take(True)
        request = self._request(conn, payload, n, min_step)
        try:
            conn.sock.sendall(request)
            status, _, step, nbytes, size = HEADER.unpack(_recv_exact(conn.sock, HEADER.size))
            conn.slot.follow(size)
            result = read_outputs(conn.slot, nbytes) if status == ST_SLOT else _recv_exact(conn.sock, nbytes)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO ran out
            conn.close()
            raise BrayTimeoutError(f"the node proxy did not answer within {self.timeout_s} s") from None
        except (OSError, EOFError, ProxyUnavailableError) as err:
            raise self._lost(conn, err) from err
        return self._answer(conn, status, result, step)

    async def acall(self, payload: Any, n: int, min_step: int) -> tuple[Any, int]:
        """:meth:`call` for a coroutine: waits on the running event loop, not a thread."""
        conn = self._take(False)
        request = self._request(conn, payload, n, min_step)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                await loop.sock_sendall(conn.sock, request)
                status, _, step, nbytes, size = HEADER.unpack(await _arecv_exact(loop, conn.sock, HEADER.size))
                conn.slot.follow(size)
                result = read_outputs(conn.slot, nbytes) if status == ST_SLOT else await _arecv_exact(loop, conn.sock, nbytes)
        except TimeoutError:
            conn.close()
            raise BrayTimeoutError(f"the node proxy did not answer within {self.timeout_s} s") from None
        except asyncio.CancelledError:
            conn.close()  # its answer may still come: the connection cannot be reused
            raise
        except (OSError, EOFError, ProxyUnavailableError) as err:
            raise self._lost(conn, err) from err
        return self._answer(conn, status, result, step)

    def _request(self, conn: _ProxyConn, payload: Any, n: int, min_step: int) -> bytes:
        """Write the inputs into the slot; the header that hands them over."""
        try:
            nbytes = conn.slot.write(payload)
        except BaseException:  # bad inputs (WireError): the connection is still good
            self._give(conn)
            raise
        return HEADER.pack(OP_CALL, n, min_step, nbytes, conn.slot.size)

    def _answer(self, conn: _ProxyConn, status: int, result: Any, step: int) -> tuple[Any, int]:
        self._give(conn)
        if status != ST_SLOT:
            raise_error(result)  # the server's (or the proxy's) error for this call
        return result, step

    def stats(self) -> dict[str, Any]:
        """The proxy's counters: ``calls``, ``samples``, ``requests`` (to TorchServe), ``clients``, ``pid``."""
        conn = self._take(True)
        try:
            conn.sock.sendall(HEADER.pack(OP_STATS, 0, -1, 0, conn.slot.size))
            _, _, _, nbytes, _ = HEADER.unpack(_recv_exact(conn.sock, HEADER.size))
            body = _recv_exact(conn.sock, nbytes)
        except (OSError, EOFError) as err:
            raise self._lost(conn, err) from err
        self._give(conn)
        return dict(json.loads(body))

    def close(self) -> None:
        """Close this process's connections (the proxy exits once no process has any)."""
        with self._lock:
            for conn in self._idle[True] + self._idle[False]:
                conn.close()
            self._idle = {True: [], False: []}
            if self._starter is not None:
                self._starter[0].close()
                self._starter = None


class NodeProxyTransport(Transport):
    """Forwards through the node proxy, and directly while it cannot be reached.

    Args:
        direct: the transport calls take while the proxy is away (its watermark is
            this transport's).
        proxy: the connections to the proxy.

    Attributes:
        fallbacks: calls sent to TorchServe directly because the proxy was unavailable.
    """

    def __init__(self, direct: DirectTransport, proxy: ProxyClient) -> None:
        super().__init__(direct.watermark)
        self.direct = direct
        self.proxy = proxy
        self.fallbacks = 0
        self._proxy_calls = 0
        self._ok = True

    @classmethod
    def start(cls, direct: DirectTransport, *, name: str, version: str, pinned: int | None, locations: Locations,
              store_root: os.PathLike[str] | str, timeout_s: float, wait_s: float) -> "NodeProxyTransport":
        """Attach to the node proxy of model ``name``, starting it when none runs (bounded by ``timeout_s``).

        ``name`` is the model whose workers serve the calls: a clone served as a weight set
        (``direct.weight_set``) shares its model's proxy, and says which set in its hello.
        A proxy that cannot be reached is not an error: calls go direct (a warning says why)
        until it answers. ``wait_s`` ``0``: nothing is started or waited for here; the
        first call starts the proxy and goes direct, quietly, until it answers.
        """
        import sys

        from bray.bridge._slot import proxy_address
        from bray.bridge.proxy import DEFAULT_IDLE_EXIT_S

        root = os.path.abspath(os.fspath(store_root))
        env = {**os.environ, **locations.to_env(store=root)}  # type: ignore[arg-type]
        idle = os.environ.get("BRAY_PROXY_IDLE_S") or str(DEFAULT_IDLE_EXIT_S)
        argv = [sys.executable, "-m", "bray.bridge.proxy", "--name", name, "--timeout-s", str(timeout_s),
                "--idle-exit-s", idle] + (["--step", str(pinned)] if pinned is not None else [])
        client = ProxyClient(proxy_address(name, version, locations.inference_urls, root), argv=argv, env=env,
                             timeout_s=timeout_s, weight_set=direct.weight_set)
        transport = cls(direct, client)
        if wait_s > 0 and not client.start(wait_s=wait_s):
            transport._ok = False
            log.warning("bray: %s: no node proxy (%s); calling TorchServe directly until one answers",
                        name, client.last_error)
        return transport

    async def submit(self, payload: Any, n: int) -> tuple[Any, int]:
        started = time.perf_counter()
        try:
            outputs, step = await self.proxy.acall(payload, n, self.watermark.value)
        except ProxyUnavailableError as err:
            self._unavailable(err)
            outputs, step = await self.direct.submit(payload, n)
            self.answered(step, n, started, "http")
            return outputs, step
        self._by_proxy(step, n, started)
        return outputs, step

    def call(self, payload: Any, n: int) -> tuple[Any, int]:
        """On this thread's own socket to the proxy; direct calls hop to the bridge loop."""
        started = time.perf_counter()
        try:
            outputs, step = self.proxy.call(payload, n, self.watermark.value)
        except ProxyUnavailableError as err:
            self._unavailable(err)
            outputs, step = self.direct.call(payload, n)
            self.answered(step, n, started, "http")
            return outputs, step
        self._by_proxy(step, n, started)
        return outputs, step

    def _by_proxy(self, step: int, n: int, started: float) -> None:
        self.answered(step, n, started, "proxy")
        self._proxy_calls += 1
        if not self._ok:
            self._ok = True
            log.warning("bray: %s: the node proxy answers again", self.direct.registration.name)

    def _unavailable(self, err: ProxyUnavailableError) -> None:
        self.fallbacks += 1
        if err.starting:  # being started (the default's first calls): direct meanwhile, said quietly
            log.debug("bray: %s: %s; calling TorchServe directly meanwhile", self.direct.registration.name, err)
            return
        if self._ok:
            self._ok = False
            log.warning("bray: %s: the node proxy is not available (%s); calling TorchServe directly until it "
                        "answers again", self.direct.registration.name, err)

    def proxy_stats(self) -> dict[str, Any] | None:
        """The proxy's counters over every process it serves (``None`` while unreachable)."""
        try:
            return self.proxy.stats()
        except ProxyUnavailableError:
            return None

    def stats(self) -> TransportStats:
        direct = self.direct.stats()
        return TransportStats(calls=direct.calls + self._proxy_calls, requests=direct.requests)

    def close(self) -> None:
        self.proxy.close()
        self.direct.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n)  # a header comes whole (32 bytes, one write): no buffer to assemble
    if len(data) == n:
        return data
    if not data:
        raise EOFError("the node proxy closed the connection")
    buf = bytearray(n)
    buf[:len(data)] = data
    view, got = memoryview(buf), len(data)
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("the node proxy closed the connection")
        got += k
    return bytes(buf)


async def _arecv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if not k:
            raise EOFError("the node proxy closed the connection")
        got += k
    return bytes(buf)
