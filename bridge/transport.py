"""The one contract under ``RemoteModel``: how a forward's inputs reach a model and come back.

``RemoteModel`` is a front (Bray's arguments, export, publish, clone) over one
:class:`Transport`:

=============================================  ==============================================
:class:`~bray.bridge.direct.DirectTransport`   HTTP to TorchServe: this process's calls
                                               coalesced per event loop, load balanced over
                                               the nodes, re-registered after a restart
:class:`~bray.bridge.proxy_client.NodeProxyTransport`  shared memory to the node proxy, which
                                               coalesces every process's calls; direct while
                                               the proxy is away
:class:`~bray.bridge.local.LocalRunner`        the engine in this process (local mode)
=============================================  ==============================================

A transport answers ``(outputs, step)``: the model's outputs for the ``n`` samples given
and the step whose weights produced them. Every transport of a model shares its
:class:`Watermark`, the newest step the process was answered with, sent as the minimum
step of the next requests so that a caller's steps never go backwards.
"""

from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["OnAnswer", "Transport", "TransportStats", "Watermark"]


class Watermark:
    """The newest step this process has been answered with: raised from any thread, never lowered."""

    __slots__ = ("value", "_lock")

    def __init__(self) -> None:
        self.value = -1
        self._lock = threading.Lock()

    def advance(self, step: int) -> None:
        if step > self.value:  # an int read is atomic: most answers take no lock
            with self._lock:
                if step > self.value:
                    self.value = step


@dataclass(frozen=True)
class TransportStats:
    """What a transport did so far.

    Attributes:
        calls: forward calls answered.
        requests: HTTP requests this process sent to TorchServe for them (``0`` for the
            calls the node proxy or a local engine answered).
    """

    calls: int
    requests: int


#: Told of every answered call: ``(route, samples, seconds)``, route ``"http"``, ``"proxy"``
#: or ``"local"`` (what :mod:`bray.bridge.metrics` counts).
OnAnswer = Callable[[str, int, float], None]


class Transport(abc.ABC):
    """Submits a forward's inputs, gets its outputs and the step; counts; closes.

    Args:
        watermark: the model's newest answered step, shared by its transports.

    Attributes:
        on_answer: called for every answered call (``None``: nobody listens).
    """

    def __init__(self, watermark: Watermark) -> None:
        self.watermark = watermark
        self.on_answer: OnAnswer | None = None

    def answered(self, step: int, n: int, started: float, route: str) -> None:
        """Every answered call passes here: the watermark rises, ``on_answer`` is told.

        Args:
            step: the step that answered.
            n: the samples of the call.
            started: ``time.perf_counter()`` when the call began.
            route: how it was answered (``"http"``, ``"proxy"``, ``"local"``).
        """
        self.watermark.advance(step)
        if self.on_answer is not None:
            self.on_answer(route, n, time.perf_counter() - started)

    @abc.abstractmethod
    async def submit(self, payload: Any, n: int) -> tuple[Any, int]:
        """Run one forward on the running event loop.

        Args:
            payload: ``{"args": [...], "kwargs": {...}}`` of numpy arrays with a batch
                dimension of ``n``.
            n: the samples in it.

        Returns:
            ``(outputs, step)``.

        Raises:
            InputError: the inputs do not fit the model (this call only).
            ServerError, BrayTimeoutError: the call could not be served.
        """

    @abc.abstractmethod
    def call(self, payload: Any, n: int) -> tuple[Any, int]:
        """:meth:`submit` from any thread, blocking it."""

    @abc.abstractmethod
    def stats(self) -> TransportStats:
        """Calls answered and requests sent so far."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and threads (the server keeps the model)."""
