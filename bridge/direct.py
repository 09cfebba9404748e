"""The direct transport: this process's forwards over HTTP to TorchServe.

Concurrent calls on one event loop share a client-side batcher
(:class:`~bray.bridge.batching.ForwardBatcher`) and the HTTP client on that loop
(:class:`~bray.torchserve.inference.InferenceClient`: least-outstanding balancing over
the nodes, retries, token refresh), so an ``await forward(...)`` never hops threads; a
synchronous call runs on the bridge loop (:mod:`bray.bridge._loop`). A request answered
404 (a restarted TorchServe forgot its models) registers the version again through the
model's :class:`~bray.bridge.registration.Registration`, once for every caller that saw
it, and is sent again. The node proxy serves its callers with one of these.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Sequence

from bray import wire
from bray.bridge.transport import Transport, TransportStats, Watermark
from bray.errors import BatchMismatchError, NotServedError, ServerError

if TYPE_CHECKING:  # pragma: no cover
    from bray.bridge.batching import ForwardBatcher
    from bray.bridge.registration import Registration
    from bray.torchserve.inference import InferenceClient, Reply

__all__ = ["DirectTransport"]


class DirectTransport(Transport):
    """HTTP to the TorchServe nodes of ``registration``, coalesced per event loop.

    Args:
        registration: the version called (its name, version, nodes' keys, re-registering).
        inference_urls: the nodes' inference addresses.
        max_batch_samples: samples one coalesced request may hold (``0``: every call is
            its own request).
        max_inflight: requests in flight at once per loop.
        timeout_s: limit for one request (and for a sync call, twice it).
        watermark: the model's newest answered step (sent as the minimum step).
        weight_set: the clone every request asks for (``X-Bray-Weights``), served by the
            workers of ``registration``'s model; ``None``: that model's own weights.
    """

    def __init__(self, registration: Registration, *, inference_urls: Sequence[str], max_batch_samples: int,
                 max_inflight: int, timeout_s: float, watermark: Watermark, weight_set: str | None = None) -> None:
        super().__init__(watermark)
        self.weight_set = weight_set
        self.registration = registration
        self.inference_urls = tuple(inference_urls)
        self.max_batch_samples = max_batch_samples
        self.max_inflight = max_inflight
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._client: InferenceClient | None = None
        self._root = self  # siblings share the client of the transport they came from
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ForwardBatcher] = \
            weakref.WeakKeyDictionary()
        #: Every batcher made so far (one per event loop used), for their counters.
        self.batchers: list[ForwardBatcher] = []
        self._last: tuple[asyncio.AbstractEventLoop, ForwardBatcher] | None = None  # the last loop's

    def sibling(self, weight_set: str | None) -> "DirectTransport":
        """A transport to the same model for another weight set (a clone it serves), sharing the HTTP client.

        Its watermark is its own: a weight set's steps are the clone's.
        """
        other = DirectTransport(self.registration, inference_urls=self.inference_urls,
                                max_batch_samples=self.max_batch_samples, max_inflight=self.max_inflight,
                                timeout_s=self.timeout_s, watermark=Watermark(), weight_set=weight_set)
        other._root = self._root
        return other

    @property
    def client(self) -> InferenceClient | None:
        """The HTTP client (``None`` before the first call): its ``stats`` count requests by node."""
        return self._root._client

    def batcher(self) -> ForwardBatcher:
        """The client-side batcher of the running event loop (made on first use)."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop:  # the usual case: one loop calls; no weak-key lookup
            return last[1]
        batcher = self._batchers.get(loop)
        if batcher is not None:
            self._last = (loop, batcher)
            return batcher
        with self._lock:
            from bray.bridge._loop import loop_session
            from bray.bridge.batching import ForwardBatcher
            from bray.torchserve.inference import InferenceClient

            root = self._root
            if root._client is None:
                root._client = InferenceClient(self.inference_urls, auth=self.registration.inference_auth(),
                                               timeout_s=self.timeout_s, session_factory=loop_session)
            batcher = self._batchers.get(loop)
            if batcher is None:
                batcher = ForwardBatcher(self._send, max_batch_samples=self.max_batch_samples,
                                         max_inflight=self.max_inflight, send_tagged=self.send_segments)
                self._batchers[loop] = batcher
                self.batchers.append(batcher)
        self._last = (loop, batcher)
        return batcher

    async def submit(self, payload: Any, n: int) -> tuple[Any, int]:
        started = time.perf_counter()
        outputs, step = await self.batcher().submit(payload, n)
        self.answered(step, n, started, "http")
        return outputs, step

    def call(self, payload: Any, n: int) -> tuple[Any, int]:
        from bray.bridge._loop import run_sync

        return run_sync(self.submit(payload, n), timeout_s=self.timeout_s * 2)

    async def _send(self, payload: Any) -> tuple[Any, int]:
        """One coalesced request (the batcher's sender)."""
        reply = await self._predict(wire.encode(payload), weights=self.weight_set, min_step=self.watermark.value)
        if self.weight_set is not None and reply.weights != self.weight_set:
            raise ServerError(
                f"{reply.url} answered a request for weight set {self.weight_set!r} without naming it "
                f"({wire.WEIGHTS_HEADER} on the answer): its bray-serve handler predates weight sets and "
                "answered with the model's own weights; upgrade bray-serve where TorchServe runs, or clone "
                "with dedicated=True", url=reply.url)
        self.watermark.advance(reply.step)  # monotonic reads across workers, for every caller here
        return wire.decode(bytearray(reply.body)), reply.step

    async def send_segments(self, payload: Any,
                            segments: list[tuple["DirectTransport | None", int]]) -> tuple[Any, list[int]]:
        """One request whose consecutive rows are answered segment by segment (``X-Bray-Segments``).

        Each segment is ``(transport, rows)``: a :meth:`sibling` of this transport (its
        weight set answers those rows) or ``None`` for this one. Each segment's caller's
        step advances its own transport's watermark. The batcher's ``send_tagged``.

        Returns:
            The outputs of every row, and each segment's step.

        Raises:
            InputError: 424 when a segment failed (unknown or unloadable weight set): the
                batcher then sends its calls apart, each to its own answer or error.
        """
        transports = [t or self for t, _ in segments]
        if len(segments) == 1:
            outputs, step = await transports[0]._send(payload)
            return outputs, [step]
        header = wire.encode_segments([wire.Segment(rows, t.watermark.value, t.weight_set)
                                       for t, (_, rows) in zip(transports, segments)])
        reply = await self._predict(wire.encode(payload), segments=header)
        if len(reply.steps) != len(segments):
            raise BatchMismatchError(f"{len(segments)} segments sent, {len(reply.steps)} steps in the answer "
                                     f"({wire.STEPS_HEADER}): is the server's handler older than this client?")
        for transport, step in zip(transports, reply.steps):
            transport.watermark.advance(step)
        return wire.decode(bytearray(reply.body)), list(reply.steps)

    async def _predict(self, body: bytes, *, weights: str | None = None, min_step: int = -1,
                       segments: str | None = None) -> Reply:
        """POST ``body``: after the registration's workers are up, registered again on a 404."""
        client = self.client
        assert client is not None
        registration = self.registration
        if not registration.idle.is_set():  # its workers are not up yet: 503s otherwise
            await asyncio.get_running_loop().run_in_executor(None, registration.idle.wait, self.timeout_s * 10)
        seen = registration.count
        name, version = registration.name, registration.version
        try:
            return await client.predict(name, body, version=version, min_step=min_step, weights=weights,
                                        segments=segments)
        except NotServedError:
            # A restarted TorchServe has forgotten its models: register ours again, then retry once.
            await asyncio.get_running_loop().run_in_executor(None, registration.again, seen)
            return await client.predict(name, body, version=version, min_step=min_step, weights=weights,
                                        segments=segments)

    def stats(self) -> TransportStats:
        return TransportStats(calls=sum(b.calls for b in self.batchers),
                              requests=sum(b.requests_sent for b in self.batchers))

    async def aclose(self) -> None:
        """:meth:`close` on the loop the client was used on (the node proxy's)."""
        if self._client is not None:
            await self._client.close()

    def close(self) -> None:
        if self._client is not None:
            from bray.bridge._loop import run_sync

            try:
                run_sync(self._client.close(), timeout_s=5)
            except Exception:  # closing is best effort
                pass
