"""The node proxy: one process per model on a node, coalescing every local process's forwards.

Actor processes hand their inputs to it through shared memory (the slot protocol of
:mod:`bray.bridge._slot`); it feeds every submission to one direct transport of its own
(:class:`~bray.bridge.direct.DirectTransport`, set up as a ``RemoteModel`` attaching to
the registered version would), so all of them go through the same client-side batcher,
HTTP client (load balancing over the nodes, retries, token refresh, re-registration
after a server restart) and monotonic-step hint as a direct caller's, and answers each caller with its own rows and
the step that produced them. A coalesced request that the server refuses as bad input
is split by the batcher, so one actor's bad input fails only that actor's call.

Started by the first ``RemoteModel(..., node_proxy=True)`` on the node (``python -m
bray.bridge.proxy``) or by hand (``bray-archive proxy --name NAME``). It exits when it
has had no caller for ``idle_exit_s`` seconds, or on SIGTERM/SIGINT after answering the
calls in flight; nothing of it stays on disk or in ``/dev/shm`` (see ``_slot``).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from bray.bridge._slot import (
    HEADER,
    OP_CALL,
    OP_HELLO,
    OP_STATS,
    ST_ERROR,
    ST_INLINE,
    ST_SLOT,
    Slot,
    check_peer,
    error_body,
    proxy_address,
)
from bray.locations import PROXY_METRICS_ENV_VAR, Locations
from bray.tree import TreeDef
from bray.errors import BrayError, ProxyUnavailableError, WireError

if TYPE_CHECKING:  # pragma: no cover
    from bray.bridge.direct import DirectTransport

__all__ = ["DEFAULT_IDLE_EXIT_S", "NodeProxy", "serve"]

log = logging.getLogger(__name__)

#: A spawned proxy exits after this long without a caller (``BRAY_PROXY_IDLE_S`` overrides).
DEFAULT_IDLE_EXIT_S = 30.0
# A caller answered this recently that has not called again is expected back soon (actors
# step in lockstep); while one is, a request waits for it, at most _WAIT_S (see
# ForwardBatcher's more_coming). A lone caller never waits: its own call makes it busy.
_RECENT_S = 0.05
_WAIT_S = 0.005
# How long a proxy that failed to start keeps answering callers with the reason.
_FAILED_LINGER_S = 10.0
_DRAIN_S = 10.0


def bind(address: str) -> socket.socket | None:
    """Listen on ``address``; ``None`` when another proxy already does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            return None
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _CallerConn:
    """One caller connection: its socket, its slot, and whether a call is in flight."""

    __slots__ = ("sock", "pid", "slot", "fds", "buf", "busy", "closed", "weight_set")

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.weight_set: str | None = None  # the clone this caller calls (its hello says), None: the model
        self.slot: Slot | None = None
        self.fds: list[int] = []
        self.buf = b""
        self.busy = False
        self.closed = False

    def release(self) -> None:
        if self.slot is not None:
            self.slot.close()
            self.slot = None
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class NodeProxy:
    """Serves the slot protocol on ``listener`` through ``transport``'s batcher.

    Args:
        transport: the proxy's own direct transport to TorchServe; ``None`` with
            ``failure`` when the model could not be set up: callers are then told why,
            for a short while.
        listener: the bound, listening, non-blocking socket.
        idle_exit_s: exit after this long without a caller (``None``: never).
        failure: why the model could not be built.
    """

    def __init__(self, transport: DirectTransport | None, listener: socket.socket, *, idle_exit_s: float | None,
                 failure: BaseException | None = None) -> None:
        self.transport = transport
        self.listener = listener
        self.idle_exit_s = idle_exit_s
        self.failure = failure
        self.calls = 0
        self.samples = 0
        self.call_s = 0.0  # summed time from a call's arrival to its answer, inside the proxy
        self.clients_seen = 0
        self._conns: set[_CallerConn] = set()
        # Callers answered and not called again yet, by answer time (oldest first): what
        # _more_coming asks on every call, in amortized O(1) instead of a walk over all.
        # By process, not connection: an actor playing a league calls the learner and K
        # opponents on K + 1 connections, and comes back on another one than it was answered on.
        self._expected: dict[int, float] = {}
        self._idle_since = time.monotonic()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # One batcher on the serving loop for the model and every weight set: calls of a
        # round for the learner and its opponents leave in one request, in segments.
        self._batcher: Any = None
        # Weight sets (clones served by the model's workers) called through this proxy: a
        # sibling transport each (its weight set's name and watermark, the model's HTTP
        # client), the batch's segment tags; None is the model's own.
        self._sets: dict[str | None, DirectTransport] = {None: transport} if transport is not None else {}
        #: Called with ``(samples, seconds, error)`` after every call answered (``error``
        #: is ``None`` on success): the place to count the proxy's calls (metrics).
        self.on_call: Callable[[int, float, BaseException | None], None] | None = None

    def stop(self) -> None:
        """Stop accepting callers; calls in flight are answered, then it returns from :meth:`serve`."""
        if self._stop is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def stats(self) -> dict[str, Any]:
        import resource

        transport = self.transport
        requests = transport.stats().requests if transport is not None else 0  # weight sets share its batcher
        client = transport.client if transport is not None else None
        return {"pid": os.getpid(), "clients": len(self._conns), "clients_seen": self.clients_seen,
                "calls": self.calls, "samples": self.samples, "requests": requests, "call_s": round(self.call_s, 6),
                "mixed_requests": self._batcher.mixed if self._batcher is not None else 0,
                "requests_by_url": dict(client.stats.by_url) if client is not None else {},
                "weight_sets": sorted(name for name in self._sets if name is not None),
                "cpu_s": round(time.process_time(), 3),
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}

    async def serve(self) -> None:
        """Answer callers until idle for ``idle_exit_s`` (or failed-start linger) or :meth:`stop`."""
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        loop.add_reader(self.listener.fileno(), self._accept)
        if self.transport is not None:
            self._batcher = self.transport.batcher()
            self._batcher.more_coming, self._batcher.max_wait_s = self._more_coming, _WAIT_S
        idle_exit_s = _FAILED_LINGER_S if self.failure is not None else self.idle_exit_s
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                if (idle_exit_s is not None and not self._conns
                        and time.monotonic() - self._idle_since > idle_exit_s):
                    break
        finally:
            loop.remove_reader(self.listener.fileno())
            self.listener.close()  # the abstract name is free again from here
            deadline = time.monotonic() + _DRAIN_S
            while any(c.busy for c in self._conns) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            for conn in list(self._conns):
                self._drop(conn)
            if self.transport is not None:  # weight sets share the model's client
                await self.transport.aclose()

    def _more_coming(self) -> bool:
        """Whether a caller process answered a moment ago has not called again yet."""
        assert self._loop is not None
        recent = self._loop.time() - _RECENT_S
        expected = self._expected
        while expected:
            pid, answered_at = next(iter(expected.items()))
            if answered_at > recent:
                return True
            del expected[pid]  # gone quiet: not waited for any more
        return False

    # --- connections -------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._loop is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.warning("bray proxy: accept failed: %s", err)
                return
            try:
                pid = check_peer(sock)
            except ProxyUnavailableError as err:
                log.warning("bray proxy: %s", err)
                sock.close()
                continue
            sock.setblocking(False)
            conn = _CallerConn(sock, pid)
            self._conns.add(conn)
            self.clients_seen += 1
            self._loop.add_reader(sock.fileno(), self._readable, conn)

    def _drop(self, conn: _CallerConn) -> None:
        """Forget a connection (its caller closed it, died, or broke the protocol)."""
        if conn.closed:
            return
        conn.closed = True
        self._expected.pop(conn.pid, None)
        assert self._loop is not None
        self._loop.remove_reader(conn.sock.fileno())
        conn.sock.close()
        self._conns.discard(conn)
        if not conn.busy:  # else the call in flight releases the slot when it ends
            conn.release()
        if not self._conns:
            self._idle_since = time.monotonic()

    def _readable(self, conn: _CallerConn) -> None:
        try:
            if conn.slot is None:  # the hello hands over the slot's descriptor
                data, fds, _, _ = socket.recv_fds(conn.sock, 4096, 4)
                conn.fds.extend(fds)
            else:  # no descriptor travels after it (a plain recv drops any, unopened)
                data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # EOF: the caller closed its socket or its process died
            self._drop(conn)
            return
        conn.buf = conn.buf + data if conn.buf else data
        while len(conn.buf) >= HEADER.size and not conn.closed:
            op, n, step, nbytes, size = HEADER.unpack_from(conn.buf)
            # A hello is followed on the socket by the weight set it names (nbytes long);
            # a call's nbytes are in the slot.
            end = HEADER.size + (nbytes if op == OP_HELLO else 0)
            if len(conn.buf) < end:
                return
            body, conn.buf = conn.buf[HEADER.size:end], conn.buf[end:]
            try:
                if op == OP_HELLO:
                    self._hello(conn, size, body)
                else:
                    self._request(conn, op, n, step, nbytes, size)
            except ProxyUnavailableError as err:
                log.warning("bray proxy: dropping the connection of pid %d: %s", conn.pid, err)
                self._drop(conn)

    def _hello(self, conn: _CallerConn, size: int, weight_set: bytes) -> None:
        """A caller's first message: its slot, and the weight set (a clone) it will call, if any."""
        if self.failure is not None:
            self._send_error(conn, self.failure)
            return
        if not conn.fds or conn.slot is not None:
            raise ProxyUnavailableError("a hello without exactly one new slot")
        fd = conn.fds.pop(0)
        if os.fstat(fd).st_size < size:
            os.close(fd)
            raise ProxyUnavailableError(f"a slot announced as {size} bytes holds {os.fstat(fd).st_size}")
        try:
            conn.weight_set = weight_set.decode("ascii") or None
        except UnicodeDecodeError:
            os.close(fd)
            raise ProxyUnavailableError(f"a hello naming an unreadable weight set {weight_set[:60]!r}") from None
        conn.slot = Slot(fd, size)
        self._send(conn, HEADER.pack(ST_SLOT, 0, -1, 0, size))

    def _request(self, conn: _CallerConn, op: int, n: int, step: int, nbytes: int, size: int) -> None:
        if op == OP_CALL:
            if conn.slot is None or conn.busy or self.transport is None:
                raise ProxyUnavailableError("a call before the hello, or while one is in flight")
            conn.slot.follow(size)
            try:
                leaves, treedef = conn.slot.read_leaves(nbytes)
            except WireError as err:
                self._send_error(conn, err)
                return
            conn.busy = True
            self._expected.pop(conn.pid, None)
            self._call(conn, leaves, treedef, n, step)
        elif op == OP_STATS:
            body = json.dumps(self.stats()).encode()
            self._send(conn, HEADER.pack(ST_INLINE, 0, -1, len(body), size) + body)
        else:
            raise ProxyUnavailableError(f"unknown operation {op}")

    def _call(self, conn: _CallerConn, leaves: list[Any], treedef: TreeDef, n: int, min_step: int) -> None:
        """Hand one call to the batcher; :meth:`_done` answers it (a callback, not a task per call)."""
        started = time.perf_counter()
        try:
            transport = self._sets.get(conn.weight_set)
            if transport is None:
                assert self.transport is not None
                transport = self._sets[conn.weight_set] = self.transport.sibling(conn.weight_set)
            transport.watermark.advance(min_step)  # a step the caller was answered with elsewhere
            future = self._batcher.enqueue(treedef.unflatten(leaves), n, None if conn.weight_set is None else transport,
                                           flat=(leaves, treedef))
        except Exception as err:
            assert self._loop is not None
            future = self._loop.create_future()
            future.set_exception(err)
        future.add_done_callback(functools.partial(self._done, conn, n, started))

    def _done(self, conn: _CallerConn, n: int, started: float, future: asyncio.Future[tuple[Any, int]]) -> None:
        error: BaseException | None = None
        try:
            outputs, step = future.result()
            reply = b""
            if not conn.closed:
                assert conn.slot is not None
                nbytes = conn.slot.write(outputs)
                reply = HEADER.pack(ST_SLOT, n, step, nbytes, conn.slot.size)
        except (Exception, asyncio.CancelledError) as err:  # every call is answered: with its outputs or its error
            error = err
            reply = b""
            if not conn.closed:
                body = error_body(err)
                reply = HEADER.pack(ST_ERROR, 0, -1, len(body), conn.slot.size if conn.slot else 0) + body
        finally:
            conn.busy = False
        elapsed = time.perf_counter() - started
        self.calls += 1
        self.samples += n
        self.call_s += elapsed
        if self.on_call is not None:
            try:
                self.on_call(n, elapsed, error)
            except Exception:  # a counter must not keep the answer from its caller
                log.exception("bray proxy: counting a call failed")
        if conn.closed:
            conn.release()  # the caller died while its call was in flight
        elif reply:
            if self._loop is not None:
                self._expected.pop(conn.pid, None)  # to the end: the dict stays oldest first
                self._expected[conn.pid] = self._loop.time()
            self._send(conn, reply)

    def _send_error(self, conn: _CallerConn, err: BaseException) -> None:
        body = error_body(err)
        self._send(conn, HEADER.pack(ST_ERROR, 0, -1, len(body), conn.slot.size if conn.slot else 0) + body)

    def _send(self, conn: _CallerConn, data: bytes) -> None:
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the caller is gone
            self._drop(conn)
            return
        if sent < len(data):  # a full socket buffer: rare, a large error message
            assert self._loop is not None
            self._loop.create_task(self._send_rest(conn, data[sent:]))

    async def _send_rest(self, conn: _CallerConn, data: bytes) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(conn.sock, data)
        except OSError:
            self._drop(conn)


def serve(name: str, *, locations: Locations | None = None, step: int | None = None,
          idle_exit_s: float | None = DEFAULT_IDLE_EXIT_S, timeout_s: float = 60.0,
          linger_on_failure: bool = True, ready: Callable[[str], None] | None = None) -> int:
    """Run the node proxy of ``name`` in this process until it is idle or stopped.

    Args:
        name: the model's full name (namespace included); it must be in the store and
            registered (a ``RemoteModel`` with ``model=`` did that), else it is registered
            from the store with the defaults.
        locations: where the store and TorchServe are (default: ``BRAY_*`` variables).
        step: serve this pinned version (a clone) instead of the live one.
        idle_exit_s: exit after this long without a caller (``None``: run until stopped).
        timeout_s: per-request limit towards TorchServe.
        linger_on_failure: when the model cannot be set up, answer callers with the
            reason for a few seconds and return 1 (what a proxy started by a caller does);
            ``False`` raises the error at once.
        ready: called with a line to print once callers are served.

    Returns:
        0 when it ran (or another proxy already serves the model), 1 when the model
        could not be set up (callers were told why).

    Raises:
        BrayError: the model could not be set up and ``linger_on_failure`` is ``False``.
    """
    from bray.bridge.direct import DirectTransport
    from bray.bridge.remote_model import LIVE_VERSION, RemoteModel
    from bray.bridge.session import use

    loc = locations or Locations.from_env()
    version = LIVE_VERSION if step is None else str(step)
    address = proxy_address(name, version, loc.inference_urls, loc.store)
    failure: BaseException | None = None
    transport: DirectTransport | None = None
    try:
        use(loc)
        # This process inherits BRAY_METRICS_PORT from the caller that started it, whose
        # exporter holds that port: the proxy's own view has a variable of its own.
        model = RemoteModel(name, override_model=False, timeout_s=timeout_s, _pinned_step=step, node_proxy=False,
                            metrics_port=os.environ.get(PROXY_METRICS_ENV_VAR) or 0)
        assert isinstance(model.transport, DirectTransport)  # node_proxy=False: the proxy calls TorchServe
        transport = model.transport
    except (BrayError, OSError) as err:
        if not linger_on_failure:
            raise
        failure = err
        log.error("bray proxy: %s could not be set up: %s", name, err)
    listener = bind(address)
    if listener is None:
        if ready is not None:
            ready(f"a node proxy for {name!r} (version {version}) already runs on this node")
        return 0
    proxy = NodeProxy(transport, listener, idle_exit_s=idle_exit_s, failure=failure)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, proxy.stop)
        if ready is not None and failure is None:
            ready(f"node proxy for {name!r} (version {version}) serving, pid {os.getpid()}; "
                  + (f"exits after {idle_exit_s:g} s without a caller" if idle_exit_s is not None else "Ctrl-C stops it"))
        await proxy.serve()

    asyncio.run(main())
    return 1 if failure is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bray.bridge.proxy --name NAME``: what ``RemoteModel(node_proxy=True)`` starts."""
    parser = argparse.ArgumentParser(prog="python -m bray.bridge.proxy")
    parser.add_argument("--name", required=True)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--idle-exit-s", type=float, default=DEFAULT_IDLE_EXIT_S)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return serve(args.name, step=args.step, idle_exit_s=args.idle_exit_s if args.idle_exit_s > 0 else None,
                 timeout_s=args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
