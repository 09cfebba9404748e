"""The inference client: async HTTP to one or more TorchServe nodes.

- one pool of kept-alive connections per event loop: a lean HTTP/1.1 session
  (:mod:`bray.torchserve.http1`; ``BRAY_HTTP_CLIENT=aiohttp`` takes aiohttp's instead),
  made by an injectable session factory;
- least-outstanding-requests load balancing over the inference addresses;
- a node that refuses connections, or does not accept one within ``connect_timeout_s``
  (its link cut, its machine gone: no answer at all), is set aside (0.5 s, doubling on
  each further refusal up to 8 s) and the request goes to another; once the pause is over the node gets one
  probe request at a time until it answers again, so a burst of concurrent calls does
  not all go back to a node that is still down; when every node is down the client
  keeps trying, with backoff, for ``reconnect_timeout_s`` (a TorchServe restart), then
  raises :class:`~bray.errors.ServerUnreachableError`;
- 5xx answers from a dying worker are retried (a forward is a pure function of its
  inputs and the served step, so retrying is safe); 4xx answers are the caller's error
  and are raised at once with the server's message;
- an expired inference key is refreshed through :class:`~bray.torchserve.auth.TokenAuth`
  and the call retried;
  a key file that is missing for a moment (a restarting server deletes and rewrites it)
  is waited for within ``reconnect_timeout_s``, like a node that is down.

Nothing here is silently dropped: every call either returns an answer or raises, with
the errors of :mod:`bray.torchserve.answers`.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from bray import wire
from bray.errors import AuthError, ConfigError, ServerUnreachableError
from bray.torchserve.answers import (
    answer_error,
    broken_connection_error,
    connection_failure,
    key_refused,
    unreachable_error,
)
from bray.torchserve.auth import TokenAuth, bearer_key

__all__ = ["InferenceClient", "Reply", "SessionFactory", "TransportStats"]

# Makes the HTTP session of the running event loop, called on that loop: what
# InferenceClient.predict uses is the session's ``closed``, ``close()`` and
# ``post(url, data=, headers=)``, an async context manager giving ``status``,
# ``headers`` and ``await read()`` (bray.torchserve.http1.Http1Session, aiohttp's ClientSession,
# a test's scripted one).
SessionFactory = Callable[["InferenceClient"], Any]

_RETRY_STATUSES = frozenset({500, 502, 503, 504, 507})
# A node that refused a connection is set aside this long, doubled per further refusal.
_SET_ASIDE_S = 0.5
_MAX_SET_ASIDE_S = 8.0


@dataclass(frozen=True)
class Reply:
    """One answered request: its body, the step that produced it, the node that answered."""

    body: bytes
    step: int
    url: str
    content_type: str
    #: Each segment's step, in order (``X-Bray-Steps``), for a request sent in segments.
    steps: tuple[int, ...] = ()
    #: The weight set that answered (``X-Bray-Weights`` on the answer), ``None``: none named.
    weights: str | None = None


@dataclass
class TransportStats:
    """Counters for reports: requests sent, retried, and connection failures seen."""

    requests: int = 0
    retries: int = 0
    connection_errors: int = 0
    auth_refreshes: int = 0
    by_url: dict[str, int] = field(default_factory=dict)


class InferenceClient:
    """Sends prediction requests, balancing over ``urls``.

    Args:
        urls: inference addresses (``http://host:port``), at least one.
        auth: hands out the inference key and refreshes it: one ``TokenAuth`` for every
            node, or a mapping ``{url: TokenAuth | None}`` when each node has its own key
            file (TorchServe generates every instance's keys at its start).
        timeout_s: per-request limit (TorchServe's queue wait included).
        connect_timeout_s: limit for opening a connection; past it the node is set aside
            as if it had refused (a partitioned node answers nothing, so without this
            limit a new connection to it would take all of ``timeout_s``).
        max_retries: retries of one request after 5xx answers or dropped connections.
        reconnect_timeout_s: how long to keep trying while no node accepts connections.
        max_connections: connection pool size per node.
        session_factory: makes the session of each event loop the client is used on,
            called on that loop with the client (again if that session was closed);
            default :meth:`new_session`. A test hands in scripted sessions here.
    """

    def __init__(self, urls: Sequence[str], *, auth: "TokenAuth | Mapping[str, TokenAuth | None] | None" = None,
                 timeout_s: float = 60.0, connect_timeout_s: float = 2.0, max_retries: int = 5,
                 reconnect_timeout_s: float = 60.0, max_connections: int = 64,
                 session_factory: SessionFactory | None = None) -> None:
        if not urls:
            raise ConfigError("InferenceClient needs at least one inference address")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be an integer >= 0, got {max_retries}")
        self.urls = [u.rstrip("/") for u in urls]
        self.auth = auth
        if isinstance(auth, Mapping):
            by_url = {u.rstrip("/"): a for u, a in auth.items()}
            missing = [u for u in self.urls if u not in by_url]
            if missing:
                raise ConfigError(f"auth has no entry for {missing}; give one TokenAuth (or None) per inference address")
            self._auth_by_url = {u: by_url[u] for u in self.urls}
        else:
            self._auth_by_url = {u: auth for u in self.urls}
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.max_retries = max_retries
        self.reconnect_timeout_s = reconnect_timeout_s
        self.max_connections = max_connections
        self.session_factory: SessionFactory = session_factory or InferenceClient.new_session
        self.stats = TransportStats()
        self._inflight = {u: 0 for u in self.urls}
        self._down_until = {u: 0.0 for u in self.urls}
        # Refusals since the node last answered: > 0 makes it a suspect that gets one
        # probe request at a time once its pause is over.
        self._refusals = {u: 0 for u in self.urls}
        self._now = time.monotonic  # the balancer's clock (a test can step it)
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        # Strong references while their loop lives: the loop itself only keeps weak ones.
        self._guards: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._rr = 0

    def new_session(self, *, close_with_loop: bool = True) -> Any:
        """A pool of kept-alive connections for the running event loop, sized for this client.

        The lean HTTP/1.1 session of :mod:`bray.torchserve.http1`, or aiohttp's with
        ``BRAY_HTTP_CLIENT=aiohttp`` in the environment.

        Args:
            close_with_loop: close it when ``asyncio.run()`` ends the loop; ``False`` for
                a loop that lives as long as the process (the bridge's own).
        """
        choice = os.environ.get("BRAY_HTTP_CLIENT", "http1").strip().lower() or "http1"
        if choice == "http1":
            from bray.torchserve.http1 import Http1Session

            session: Any = Http1Session(timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s,
                                        limit_per_host=self.max_connections)
        elif choice == "aiohttp":
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self.max_connections * len(self.urls),
                                             limit_per_host=self.max_connections,
                                             ttl_dns_cache=300, enable_cleanup_closed=True)
            # TorchServe hands every request header to the worker, which reads each one (4
            # fields apiece): headers it ignores (it never compresses) are left out.
            session = aiohttp.ClientSession(connector=connector,
                                            timeout=aiohttp.ClientTimeout(total=self.timeout_s,
                                                                          sock_connect=self.connect_timeout_s),
                                            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        else:
            raise ConfigError(f"BRAY_HTTP_CLIENT={choice!r}: say 'http1' (the default) or 'aiohttp'")
        if close_with_loop:
            # asyncio.run() cancels every task left when its main coroutine ends: this
            # one then closes the session before the loop goes away.
            loop = asyncio.get_running_loop()
            self._guards[loop] = loop.create_task(_close_when_cancelled(session))
        return session

    def _get_session(self) -> Any:
        """The session of the running event loop (one per loop: sessions are loop-bound)."""
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            session = self.session_factory(self)
            self._sessions[loop] = session
        return session

    def _pick(self, exclude: set[str]) -> str | None:
        now = self._now()
        # Concurrent callers all pick before any of them hears back: without the
        # one-probe rule a node whose pause just ended took its full share of a burst
        # (half of it with two nodes) and refused every one of them.
        live = [u for u in self.urls if u not in exclude and self._down_until[u] <= now
                and (self._refusals[u] == 0 or self._inflight[u] == 0)]
        if not live:
            return None
        low = min(self._inflight[u] for u in live)
        best = [u for u in live if self._inflight[u] == low]
        self._rr += 1
        return best[self._rr % len(best)]

    async def predict(self, model: str, body: bytes, *, version: str | None = None,
                      content_type: str = "application/octet-stream", min_step: int | None = None,
                      weights: str | None = None, segments: str | None = None) -> Reply:
        """POST ``body`` to ``/predictions/<model>[/<version>]`` on the least busy node.

        ``min_step`` (the newest step this client has been answered with) asks a worker
        that lags behind it to catch up first, so a caller never sees its step go back.
        ``weights`` names a weight set of the model (a clone served by its workers);
        ``segments`` (an ``X-Bray-Segments`` value, :func:`bray.wire.encode_segments`) has
        several weight sets answer consecutive rows of the body.

        Raises:
            InputError: the server answered 400 (its message says what was wrong).
            NotServedError: 404, no such model or version on that node.
            AuthError: the inference key was refused even after a refresh.
            ServerUnreachableError: no node accepted a connection within ``reconnect_timeout_s``.
            ServerError: 5xx answers after ``max_retries`` retries.
        """
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        session = self._get_session()
        failed, never_reached = _connection_failures()  # after the session: an aiohttp one has loaded aiohttp
        attempts = 0
        refreshed: set[str] = set()
        tried: set[str] = set()
        first_down: float | None = None
        why: dict[str, str] = {}  # url -> connection_failure() of its last failed attempt
        backoff = 0.05
        while True:
            url = self._pick(tried)
            if url is None:
                # Every node is down or was tried: wait (a restart) within the bound.
                now = time.monotonic()
                first_down = first_down or now
                if now - first_down > self.reconnect_timeout_s:
                    raise unreachable_error(why, urls=self.urls, waited_s=self.reconnect_timeout_s)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 1.0)
                tried.clear()
                continue
            headers = {"Content-Type": content_type}
            if min_step is not None and min_step >= 0:
                headers[wire.MIN_STEP_HEADER] = str(min_step)
            if weights:
                headers[wire.WEIGHTS_HEADER] = weights
            if segments:
                headers[wire.SEGMENTS_HEADER] = segments
            auth = self._auth_by_url[url]
            try:
                key_headers = auth.headers("inference") if auth is not None else {}
            except AuthError:
                if auth is None or not _key_file_missing(auth):
                    raise
                # A restarting TorchServe deletes its key file, then writes a new one.
                self._down_until[url] = self._now() + 0.25
                tried.add(url)
                continue
            headers.update(key_headers)
            self._inflight[url] += 1
            self.stats.requests += 1
            self.stats.by_url[url] = self.stats.by_url.get(url, 0) + 1
            try:
                async with session.post(url + path, data=body, headers=headers) as resp:
                    data = await resp.read()
                    status = resp.status
                    step = resp.headers.get(wire.STEP_HEADER)
                    seg_steps = resp.headers.get(wire.STEPS_HEADER) if segments else None
                    answered_by = resp.headers.get(wire.WEIGHTS_HEADER) if weights else None
                    ctype = resp.headers.get("Content-Type", "")
            except failed as err:
                self.stats.connection_errors += 1
                why[url] = connection_failure(err)
                # Refused, or no answer to the connect (a cut link): never reached the server.
                if isinstance(err, never_reached):
                    self._set_aside(url)
                    tried.add(url)
                    continue  # never reached the server: always safe to go elsewhere
                attempts += 1
                if attempts > self.max_retries:
                    raise broken_connection_error(err, url=url, path=path, attempts=attempts) from err
                self.stats.retries += 1
                tried.add(url)
                continue
            finally:
                self._inflight[url] -= 1
            first_down = None
            self._refusals[url] = 0  # it answered: back to its full share
            if status == 200:
                return Reply(body=data, step=int(step) if step is not None else -1, url=url, content_type=ctype,
                             steps=tuple(int(s) for s in seg_steps.split(",")) if seg_steps else (),
                             weights=answered_by)
            if key_refused(status, data) and auth is not None and url not in refreshed:
                refreshed.add(url)
                self.stats.auth_refreshes += 1
                stale = bearer_key(key_headers)
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        None, lambda: auth.refresh("inference", stale_key=stale))
                except (ServerUnreachableError, AuthError) as err:
                    # A server going down or coming up: its management API (where keys are
                    # regenerated) is not answering yet, or its key file is being rewritten.
                    if isinstance(err, AuthError) and not _key_file_missing(auth):
                        raise
                    refreshed.discard(url)
                    self._down_until[url] = self._now() + 0.25
                    tried.add(url)
                continue
            if status in _RETRY_STATUSES and attempts < self.max_retries:
                attempts += 1
                self.stats.retries += 1
                await asyncio.sleep(min(0.05 * 2 ** attempts, 1.0))
                continue
            raise answer_error(status, data, api="inference", url=url, method="POST", path=path)

    def _set_aside(self, url: str) -> None:
        """``url`` refused a connection: pause it, longer for each refusal in a row."""
        self._refusals[url] += 1
        pause = min(_SET_ASIDE_S * 2 ** (self._refusals[url] - 1), _MAX_SET_ASIDE_S)
        self._down_until[url] = max(self._down_until[url], self._now() + pause)

    async def close(self) -> None:
        """Close every loop's session (others' on their own loops, without waiting)."""
        here = asyncio.get_running_loop()
        for loop, session in list(self._sessions.items()):
            if session.closed:
                continue
            if loop is here:
                await session.close()
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(session.close(), loop)
        self._sessions = weakref.WeakKeyDictionary()


def _connection_failures() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """What a session's ``post`` raises when its connection fails, and the part of those that
    never reached the server (refused, or no answer to the connection attempt).

    aiohttp's errors only where aiohttp is loaded: a session that raises them imported it,
    and importing it here would cost a process using the default session ~130 ms at its
    first call for nothing.
    """
    from bray.torchserve.http1 import ConnectFailedError

    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is None:
        return (ConnectionError, asyncio.TimeoutError), (ConnectFailedError,)
    return ((aiohttp.ClientConnectionError, ConnectionError, asyncio.TimeoutError),
            (ConnectFailedError, aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def _key_file_missing(auth: "TokenAuth") -> bool:
    path = auth.key_file
    return path is not None and not path.is_file()


async def _close_when_cancelled(session: Any) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await session.close()
        raise
