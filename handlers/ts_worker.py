"""Workarounds inside TorchServe 0.12's Python worker process (kept out of handler.py,
which must define one class only).

TorchServe 0.12 is its final release: these patch its worker at the one place each
problem is, from the handler's ``initialize``, and only in the worker processes of a
bray model (a stock model's workers are untouched).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

__all__ = ["BufferedFrontendReads", "buffer_frontend_reads", "quiet_per_batch_log", "throttle_prediction_time"]

#: TorchServe's per-batch gauge (``ts/service.py``'s ``PREDICTION_METRIC``).
PREDICTION_TIME = "PredictionTime"

# One recv asks for this much: a whole request of a few KB arrives in one call.
_CHUNK = 256 * 1024


class _DropPerBatchLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Backend received inference at")


def quiet_per_batch_log() -> None:
    """Drop the worker's "Backend received inference at" line, logged for every batch.

    TorchServe's worker prints it to stdout, where the frontend parses it and writes it to
    model_log.log: a disk write and a parse per batch for no information. Everything else
    the worker logs is kept.
    """
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropPerBatchLines) for f in handler.filters):
            handler.addFilter(_DropPerBatchLines())


def throttle_prediction_time(metrics: Any, period_s: float = 1.0) -> bool:
    """Let TorchServe's ``PredictionTime`` gauge through at most once per ``period_s``.

    0.12's worker reports it after every batch, before sending the answer: a log line
    to stdout (a ``write``, plus ``uname`` and ``getpid`` for the line's hostname and
    record) that the frontend reads and parses on another thread, all on the request's
    path. A gauge scraped every few seconds shows one value per scrape anyway, so the
    first batch of each period reports it and the rest do not. Every other metric
    passes through untouched.

    Args:
        metrics: the worker's metrics cache (``context.metrics``).
        period_s: at most one report per this many seconds.

    Returns:
        Whether it was installed (``False`` without a metrics cache, or twice).
    """
    original = getattr(metrics, "add_time", None)
    if original is None or getattr(original, "_bray_throttled", False):
        return False
    last = [-float("inf")]

    def add_time(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == PREDICTION_TIME:
            now = time.monotonic()
            if now - last[0] < period_s:
                return None
            last[0] = now
        return original(name, *args, **kwargs)

    add_time._bray_throttled = True  # type: ignore[attr-defined]
    metrics.add_time = add_time
    return True


class BufferedFrontendReads:
    """TorchServe's ``otf_message_handler._retrieve_buffer``, reading ahead.

    The worker reads each message from its frontend field by field, and 0.12's
    ``_retrieve_buffer`` makes one ``recv`` per field: the command byte, every length
    and every value, 4 per request header. A request with 9 headers costs about 48
    ``recv`` calls (counted with ``strace -c`` on a worker at 16 actor processes), each a
    system call. This one asks for up to 256 KB per call and keeps what belongs to the
    next fields for them, so a request of a few KB costs one or two. Values of 256 KB
    and more are read straight into their own buffer, as before.

    Only correct while every read of the frontend socket goes through it, which holds in
    0.12: ``retrieve_msg`` (the sync and async worker loops) is the only reader, and it
    reads only through ``_retrieve_buffer``. Bytes buffered for one socket are dropped if
    another is read (a worker has one frontend connection for its life).
    """

    def __init__(self) -> None:
        self._conn: Any = None
        self._buf = b""
        self._pos = 0
        self.recv_calls = 0

    def __call__(self, conn: Any, length: int) -> bytearray:
        if conn is not self._conn:
            self._conn, self._buf, self._pos = conn, b"", 0
        pos, end = self._pos, self._pos + length
        if end <= len(self._buf):
            self._pos = end
            return bytearray(memoryview(self._buf)[pos:end])
        data = bytearray(length)
        got = len(self._buf) - pos
        data[:got] = memoryview(self._buf)[pos:]
        self._buf, self._pos = b"", 0
        view = memoryview(data)
        while got < length:
            self.recv_calls += 1
            if length - got >= _CHUNK:  # a large value: straight into its own buffer
                k = taken = conn.recv_into(view[got:])
            else:
                chunk = conn.recv(_CHUNK)
                k, taken = len(chunk), min(len(chunk), length - got)
                view[got:got + taken] = memoryview(chunk)[:taken]
                if taken < k:
                    self._buf, self._pos = chunk, taken  # the next fields' bytes
            if not k:
                # What 0.12's _retrieve_buffer does when the frontend goes away.
                logging.info("Frontend disconnected.")
                sys.exit(0)
            got += taken
        return data


def buffer_frontend_reads() -> BufferedFrontendReads | None:
    """Install :class:`BufferedFrontendReads` in this worker (once); the reader, or
    ``None`` outside a TorchServe 0.12 worker."""
    try:
        from ts.protocol import otf_message_handler as otf
    except ImportError:
        return None
    current: Callable[..., Any] = otf._retrieve_buffer
    if isinstance(current, BufferedFrontendReads):
        return current
    reader = BufferedFrontendReads()
    otf._retrieve_buffer = reader
    return reader
