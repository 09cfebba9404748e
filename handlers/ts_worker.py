"""Workarounds inside TorchServe 0.12's Python worker process (kept out of handler.py,
which must define one class only).

TorchServe 0.12 is its final release: these patch its worker at the one place each
problem is, from the handler's ``initialize``, and only in the worker processes of a
bray model (a stock model's workers are untouched).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["BufferedFrontendReads", "ShortMessage", "TIMELINE_ENV", "WorkerTimeline", "buffer_frontend_reads",
           "fast_frames", "installed_patches", "parse_inference", "quiet_per_batch_log",
           "throttle_prediction_time", "worker_timeline"]

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

    @property
    def pending(self) -> int:
        """Bytes read from the socket and not handed out yet (the next fields' bytes)."""
        return len(self._buf) - self._pos

    def parse_held(self, conn: Any, parse: Callable[[bytes, int], tuple[Any, int]]) -> Any:
        """``parse(bytes, pos) -> (value, end)`` over the bytes held for ``conn``, which it
        then hands out; nothing is read from the socket.

        Raises:
            ShortMessage: nothing is held for ``conn``, or ``parse`` ran out of bytes
                (then nothing is handed out).
        """
        if conn is not self._conn or not self.pending:
            raise ShortMessage
        value, self._pos = parse(self._buf, self._pos)
        return value

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


_INT = struct.Struct("!i")


class ShortMessage(Exception):
    """The bytes at hand end before the message does (read the rest field by field)."""


def parse_inference(buf: bytes, pos: int, *, decode_inputs: bool = True) -> tuple[list[dict[str, Any]], int]:
    """TorchServe 0.12's inference message, its command byte excepted, parsed from ``buf[pos:]``.

    What ``otf_message_handler._retrieve_inference_msg`` returns (request ids, header
    names and values as ``bytearray``; input names and content types as ``str``; JSON and
    text inputs decoded unless ``TS_DECODE_INPUT_REQUEST`` says otherwise), in one pass
    over bytes already read instead of ~40 Python calls per request.

    Returns:
        The requests, and the position after the message.

    Raises:
        ShortMessage: ``buf`` ends inside the message, or a length is negative where
            TorchServe does not expect one (its own parser then reads it as it does).
    """
    unpack, n, view = _INT.unpack_from, len(buf), memoryview(buf)
    msg: list[dict[str, Any]] = []

    def field(at: int) -> tuple[int, int]:
        if at + 4 > n:
            raise ShortMessage
        (length,) = unpack(buf, at)
        if length < -1 or at + 4 + max(length, 0) > n:
            raise ShortMessage
        return at + 4, length

    while True:
        pos, length = field(pos)
        if length == -1:
            return msg, pos
        request: dict[str, Any] = {"requestId": bytearray(view[pos:pos + length])}
        pos += length
        headers = []
        while True:
            pos, length = field(pos)
            if length == -1:
                break
            header = bytearray(view[pos:pos + length])
            pos, length = field(pos + length)
            headers.append({"name": header, "value": bytearray(view[pos:pos + length])})
            pos += length
        request["headers"] = headers
        inputs = []
        while True:
            pos, length = field(pos)
            if length == -1:
                break
            name = bytes(view[pos:pos + length]).decode("utf-8")
            pos, length = field(pos + length)
            content_type = bytes(view[pos:pos + length]).decode("utf-8")
            pos, length = field(pos + length)
            value: Any = bytearray(view[pos:pos + length])
            pos += length
            if decode_inputs and (content_type == "application/json" or content_type.startswith("text")):
                raw = value
                try:
                    value = raw.decode("utf-8")
                    if content_type == "application/json":
                        value = json.loads(value)
                except Exception:  # what TorchServe does: pass the bytes on, say so
                    value = raw
                    logging.warning("Failed decoding of input data. Forwarding encoded payload", exc_info=True)
            inputs.append({"name": name, "contentType": content_type, "value": value})
        request["parameters"] = inputs
        msg.append(request)


def fast_frames(reader: BufferedFrontendReads | None) -> bool:
    """Parse inference messages with :func:`parse_inference` in this worker (once).

    Messages are parsed from the bytes ``reader`` already holds (the command byte's read
    brings a whole small message); one that is not all there is read field by field by
    TorchServe's own parser, through ``reader``, as before. Patches
    ``otf_message_handler._retrieve_inference_msg``, which 0.12's ``retrieve_msg`` looks
    up on every batch. (Framing the answer in one join was tried too: no faster than
    0.12's ``create_predict_response`` for one request, 4.2 against 3.7 us, not kept.)

    Returns:
        Whether it is installed (``False`` outside a TorchServe 0.12 worker or without
        ``reader``).
    """
    if reader is None:
        return False
    try:
        from ts.protocol import otf_message_handler as otf
    except ImportError:
        return False
    if getattr(otf._retrieve_inference_msg, "_bray_fast", False):
        return True
    slow_parse = otf._retrieve_inference_msg

    def retrieve_inference_msg(conn: Any) -> list[dict[str, Any]]:
        decode = os.environ.get("TS_DECODE_INPUT_REQUEST") in (None, "true")
        try:
            return reader.parse_held(conn, lambda buf, pos: parse_inference(buf, pos, decode_inputs=decode))
        except ShortMessage:
            return slow_parse(conn)

    retrieve_inference_msg._bray_fast = True  # type: ignore[attr-defined]
    retrieve_inference_msg._bray_original = slow_parse  # type: ignore[attr-defined]
    otf._retrieve_inference_msg = retrieve_inference_msg
    return True


#: The server environment variable that turns :class:`WorkerTimeline` on: a directory.
TIMELINE_ENV = "BRAY_WORKER_TIMELINE"


class WorkerTimeline:
    """Timestamps of every batch a worker answers, to see where a call's time goes (issue 24).

    Off unless the server's environment sets ``BRAY_WORKER_TIMELINE`` to a directory;
    then each worker writes ``<dir>/worker-<pid>.tsv``, one line per batch: the number of
    requests and :data:`MARKS` as ``time.perf_counter_ns()`` (``CLOCK_MONOTONIC``, one
    clock for every process of the machine, so a client's own timestamps line up):

    - ``woke``: the batch's first byte is readable and the worker is running (a
      ``MSG_PEEK`` of one byte, made only while this is on);
    - ``read``: TorchServe's ``retrieve_msg`` has parsed it;
    - ``handle``: the handler's ``handle`` starts (TorchServe's ``predict`` built the
      request list and context in between); ``decoded``, ``forwarded``, ``encoded``:
      the handler's steps, as it marks them; ``answered``: ``handle`` returns;
    - ``sent``: the worker asks for the next batch, its answer framed by TorchServe
      (``create_predict_response``) and written to the socket.

    Patches the name ``retrieve_msg`` in the worker's main module (0.12's sync loop looks
    it up on every batch). A line is written when the next batch is asked for, after the
    answer left. The file's first line (``# patches: ...``) names the workarounds of this
    module the worker runs (:func:`installed_patches`). Not for production: one more
    system call per batch, and a file write.
    """

    MARKS = ("woke", "read", "handle", "decoded", "forwarded", "encoded", "answered", "sent")

    def __init__(self, directory: Path, reader: BufferedFrontendReads | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"worker-{os.getpid()}.tsv"
        self._out = open(self.path, "a", buffering=1)  # noqa: SIM115 - the worker's life
        self._out.write(f"# patches: {' '.join(installed_patches()) or '-'}\n")
        self._reader = reader
        self._marks: dict[str, int] = {}
        self._requests = 0

    def mark(self, name: str) -> None:
        """Stamp ``name`` (one of :data:`MARKS`) for the batch being answered."""
        self._marks[name] = time.perf_counter_ns()

    def batch(self, requests: int) -> None:
        """Say how many requests the batch being answered holds."""
        self._requests = requests

    def wrap(self, retrieve_msg: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``retrieve_msg``, stamping ``sent`` (of the batch before), ``woke`` and ``read``."""
        def timed_retrieve_msg(conn: Any) -> Any:
            now = time.perf_counter_ns()
            if self._marks:
                self._marks["sent"] = now
                self._out.write("\t".join([str(self._requests)] + [str(self._marks.get(m, 0)) for m in self.MARKS]) + "\n")
                self._marks = {}
            if self._reader is None or not self._reader.pending:
                conn.recv(1, socket.MSG_PEEK)  # blocks until the frontend writes
            woke = time.perf_counter_ns()
            cmd, msg = retrieve_msg(conn)
            if cmd == b"I":
                self._marks = {"woke": woke, "read": time.perf_counter_ns()}
            return cmd, msg

        timed_retrieve_msg._bray_timeline = self  # type: ignore[attr-defined]
        return timed_retrieve_msg


def installed_patches() -> list[str]:
    """The workarounds of this module installed in this process, by name."""
    try:
        from ts.protocol import otf_message_handler as otf
    except ImportError:
        return []
    found = []
    if isinstance(otf._retrieve_buffer, BufferedFrontendReads):
        found.append("buffered_reads")
    if getattr(otf._retrieve_inference_msg, "_bray_fast", False):
        found.append("fast_frames")
    if any(isinstance(f, _DropPerBatchLines) for h in logging.getLogger().handlers for f in h.filters):
        found.append("quiet_per_batch_log")
    return found


def worker_timeline(reader: BufferedFrontendReads | None = None) -> WorkerTimeline | None:
    """Install :class:`WorkerTimeline` in this worker when ``BRAY_WORKER_TIMELINE`` is set.

    Args:
        reader: the worker's :class:`BufferedFrontendReads`, if installed (bytes it holds
            are the next batch already read, so there is nothing to wait for).

    Returns:
        The timeline, or ``None``: the variable is not set, or this is not TorchServe
        0.12's sync worker loop (its main module has no ``retrieve_msg``).
    """
    directory = os.environ.get(TIMELINE_ENV)
    main = sys.modules.get("__main__")
    current = getattr(main, "retrieve_msg", None)
    if not directory or current is None:
        return None
    existing = getattr(current, "_bray_timeline", None)
    if existing is not None:
        return existing
    timeline = WorkerTimeline(Path(directory), reader)
    main.retrieve_msg = timeline.wrap(current)  # type: ignore[union-attr]
    return timeline
