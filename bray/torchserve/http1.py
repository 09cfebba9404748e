"""A lean HTTP/1.1 client session for the inference hot path.

:class:`~bray.torchserve.inference.InferenceClient` needs one thing from HTTP: POST a
body to a kept-alive connection and read the answer. aiohttp's session does that with
request and response objects, a cookie jar, tracing signals, a streaming payload reader
and a connector built for every case; on a one-observation call it costs about
170 µs more CPU in the caller than one ``write`` and a ``Content-Length`` parse
(docs/call_floor.md), on two shared cores beside TorchServe's JVM and workers. This
module is that minimum, on asyncio's protocol API, with the session interface
``InferenceClient`` uses (``closed``, ``close()``, ``post(url, data=, headers=)`` as an
async context manager giving ``status``, ``headers`` and ``await read()``), so the
client's retry, balancing and key rules stay where they are.

What it does and does not:

- a pool of kept-alive connections per ``scheme://host:port``, at most
  ``limit_per_host`` in use at once (the rest wait their turn), ``http`` and ``https``;
- the answer's body by ``Content-Length``, ``Transfer-Encoding: chunked``, or until the
  server closes; ``Connection: close`` is honoured;
- a connection that was kept alive and turns out closed by the server before any byte of
  the answer came (a restarted TorchServe, an idle close) is replaced and the request
  sent once more on a new one: the request never reached a server that answers it;
- failures say which kind they are: :class:`ConnectFailedError` (refused, unreachable,
  or no answer to the connection attempt within ``connect_timeout_s``:
  :class:`ConnectTimeoutError`), a :class:`ConnectionResetError` (the connection broke
  mid-answer), :class:`ReadTimeoutError` (no whole answer within ``timeout_s``);
- a request left unfinished (timed out, cancelled, broken) closes its connection: no
  later request ever reads an earlier one's answer;
- no redirects, cookies, proxies, compression, ``Expect: 100-continue`` or streaming:
  TorchServe's inference API needs none of them.

``BRAY_HTTP_CLIENT=aiohttp`` makes :class:`~bray.torchserve.inference.InferenceClient`
use aiohttp's session instead (to compare, or as a fallback).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ConnectFailedError", "ConnectTimeoutError", "Http1Session", "ReadTimeoutError", "Response"]

_MAX_HEAD = 64 * 1024  # bytes of status line and headers before the answer is called malformed


class ConnectFailedError(ConnectionError):
    """No connection could be opened (its cause says why: refused, unreachable, timeout).

    The request never reached the server: always safe to send it elsewhere.
    """


class ConnectTimeoutError(ConnectFailedError, TimeoutError):
    """No answer to the connection attempt within the connect timeout (a cut link, a dead host)."""


class ReadTimeoutError(TimeoutError):
    """Connected and sent, but no whole answer came within the request's timeout."""


class _Headers(dict):  # type: ignore[type-arg]
    """An answer's headers, looked up without regard to case (keys are stored lower-case)."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, key.lower())


class Response:
    """One whole answer: ``status``, ``headers`` (case-insensitive ``get``), ``await read()``."""

    __slots__ = ("status", "reason", "headers", "_body")

    def __init__(self, status: int, reason: str, headers: _Headers, body: bytes) -> None:
        self.status, self.reason, self.headers, self._body = status, reason, headers, body

    async def read(self) -> bytes:
        return self._body


class _Connection(asyncio.Protocol):
    """One kept-alive connection: sends a request, parses its one answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # it answered a request before: the server may have closed it meanwhile
        self._buf = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._head: tuple[int, str, _Headers] | None = None
        self._length: int | None = None  # body bytes expected; None: chunked or until close
        self._chunked = False
        self.got_bytes = False  # any byte of the current answer came

    # --- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():  # nothing asked: a server speaking out of turn
            self._fail(None)
            return
        self.got_bytes = True
        self._buf += data
        try:
            self._parse()
        except ValueError as err:
            self._fail(ConnectionResetError(f"malformed HTTP answer: {err}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._head is not None and self._length is None and not self._chunked:  # body ends with the connection
            self._finish(bytes(self._buf))
            return
        err = ConnectionResetError("the server closed the connection before its answer was whole")
        err.__cause__ = exc
        waiter.set_exception(err)

    # --- requests ----------------------------------------------------------------------------------
    def send(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._buf.clear()
        self._head, self._length, self._chunked, self.got_bytes = None, None, False, False
        self._waiter = self.loop.create_future()
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        return self._waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, err: BaseException | None) -> None:
        waiter = self._waiter
        if err is not None and waiter is not None and not waiter.done():
            waiter.set_exception(err)
        self.abort()

    def _parse(self) -> None:
        buf = self._buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise ValueError(f"no end of headers in {_MAX_HEAD} bytes")
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[:end + 4]
            version, _, rest = lines[0].partition(" ")
            code, _, reason = rest.partition(" ")
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise ValueError(f"status line {lines[0][:80]!r}")
            headers = _Headers()
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise ValueError(f"header line {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
            status = int(code)
            self._head = (status, reason, headers)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._chunked = True
            elif "content-length" in headers:
                self._length = int(headers["content-length"])
            elif status in (204, 304) or 100 <= status < 200:
                self._length = 0
        if self._chunked:
            body = self._unchunk()
            if body is not None:
                self._finish(body)
        elif self._length is not None and len(buf) >= self._length:
            self._finish(bytes(buf[:self._length]))

    def _unchunk(self) -> bytes | None:
        """The whole chunked body once its last chunk is in, else None (nothing consumed)."""
        buf, pos = self._buf, 0
        parts: list[bytes] = []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                end = buf.find(b"\r\n\r\n", eol)  # trailers, then the blank line
                if end < 0 and buf[eol:eol + 4] != b"\r\n\r\n":
                    return None
                return b"".join(parts)
            start = eol + 2
            if len(buf) < start + size + 2:
                return None
            parts.append(bytes(buf[start:start + size]))
            pos = start + size + 2

    def _finish(self, body: bytes) -> None:
        assert self._head is not None and self._waiter is not None
        status, reason, headers = self._head
        keep = headers.get("connection", "").lower() != "close"
        self._buf.clear()
        self.reused = True
        self._waiter.set_result(Response(status, reason, headers, body))
        if not keep:
            self.abort()


class _Host:
    """The connections to one ``scheme://host:port``: idle ones, and how many are in use."""

    def __init__(self, scheme: str, host: str, port: int, limit: int) -> None:
        self.scheme, self.host, self.port = scheme, host, port
        self.idle: collections.deque[_Connection] = collections.deque()
        self.slots = asyncio.Semaphore(limit)
        authority = host if (scheme, port) in (("http", 80), ("https", 443)) else f"{host}:{port}"
        self.host_header = f"Host: {authority}\r\n"


class Http1Session:
    """Kept-alive HTTP/1.1 connections for the running event loop (made and used on one loop).

    Args:
        timeout_s: limit for one request, from asking for a connection to the answer's last byte.
        connect_timeout_s: limit for opening one connection.
        limit_per_host: connections in use at once per address; further requests wait.
        ssl_context: for ``https`` addresses (default: the system's verified context).
    """

    def __init__(self, *, timeout_s: float = 60.0, connect_timeout_s: float = 2.0, limit_per_host: int = 64,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.limit_per_host = limit_per_host
        self._ssl = ssl_context
        self._hosts: dict[str, _Host] = {}
        self._busy: set[_Connection] = set()
        self.closed = False

    def post(self, url: str, *, data: bytes = b"", headers: dict[str, str] | None = None) -> "_Exchange":
        """``async with session.post(url, data=..., headers=...) as resp``: ``resp`` is whole on entry."""
        return _Exchange(self, url, data, headers or {})

    async def close(self) -> None:
        """Close every connection, idle or in use (a request in flight then fails)."""
        self.closed = True
        for host in self._hosts.values():
            while host.idle:
                host.idle.popleft().abort()
        for conn in list(self._busy):
            conn._fail(ConnectionResetError("the session was closed"))
        self._busy.clear()

    # --- one request -----------------------------------------------------------------------------
    def _host(self, url: str) -> tuple[_Host, str]:
        base_end = url.find("/", url.find("//") + 2)
        base, target = (url, "/") if base_end < 0 else (url[:base_end], url[base_end:])
        host = self._hosts.get(base)
        if host is None:
            split = urlsplit(base)
            if split.scheme not in ("http", "https") or not split.hostname:
                raise ValueError(f"not an http(s) address: {url!r}")
            port = split.port or (443 if split.scheme == "https" else 80)
            host = self._hosts[base] = _Host(split.scheme, split.hostname, port, self.limit_per_host)
        return host, target

    async def _connect(self, host: _Host) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if host.scheme == "https":
            context = self._ssl or ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), host.host, host.port, ssl=context),
                self.connect_timeout_s)
        except asyncio.TimeoutError as err:
            raise ConnectTimeoutError(f"no answer to a connection to {host.host}:{host.port} within "
                                      f"{self.connect_timeout_s} s") from err
        except OSError as err:  # refused, unreachable, name not resolved
            raise ConnectFailedError(f"cannot connect to {host.host}:{host.port}: {err}") from err
        return conn

    async def _request(self, url: str, data: bytes, headers: dict[str, str]) -> Response:
        if self.closed:
            raise ConnectionResetError("the session is closed")
        host, target = self._host(url)
        for value in headers.values():
            if "\n" in value or "\r" in value:
                raise ValueError(f"a header value holds a line break: {value[:80]!r}")
        head = "".join([f"POST {target} HTTP/1.1\r\n", host.host_header,
                        *(f"{k}: {v}\r\n" for k, v in headers.items()),
                        f"Content-Length: {len(data)}\r\n\r\n"]).encode("latin-1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        async with host.slots:
            conn = self._idle(host)
            while True:
                if conn is None:
                    conn = await self._connect(host)
                self._busy.add(conn)
                waiter = conn.send(head, data)
                timer = loop.call_at(deadline, _expire, waiter, self.timeout_s)
                resp = None
                try:
                    resp = await waiter
                except ConnectionResetError:
                    if not (conn.reused and not conn.got_bytes):
                        raise
                finally:
                    timer.cancel()
                    self._busy.discard(conn)
                    self._release(host, conn, waiter)
                if resp is not None:
                    return resp
                conn = None  # closed by the server while it was idle: the request never reached it

    def _release(self, host: _Host, conn: _Connection, waiter: asyncio.Future[Response]) -> None:
        """Back to the idle pool if its answer was whole and it stays open; else closed."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None \
                and not conn.closed and not self.closed:
            host.idle.append(conn)
        else:
            conn.abort()  # unfinished: its answer must never reach another request

    def _idle(self, host: _Host) -> _Connection | None:
        """The most recently used open idle connection (the likeliest still open), if any."""
        while host.idle:
            conn = host.idle.pop()
            if not conn.closed:
                return conn
        return None


def _expire(waiter: asyncio.Future[Response], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeoutError(f"no whole answer within {timeout_s} s"))


class _Exchange:
    """What :meth:`Http1Session.post` returns: an async context manager over the whole answer."""

    __slots__ = ("_session", "_url", "_data", "_headers")

    def __init__(self, session: Http1Session, url: str, data: bytes, headers: dict[str, str]) -> None:
        self._session, self._url, self._data, self._headers = session, url, data, headers

    async def __aenter__(self) -> Response:
        return await self._session._request(self._url, self._data, self._headers)

    async def __aexit__(self, *exc: Any) -> None:
        return None

    def __await__(self) -> Any:
        return self._session._request(self._url, self._data, self._headers).__await__()
