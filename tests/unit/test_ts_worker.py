"""The TorchServe 0.12 worker workarounds (handlers/ts_worker.py), on real sockets.

Messages are framed as TorchServe's frontend frames them (``ts/protocol/
otf_message_handler.py`` documents each field) and parsed by TorchServe's own
``retrieve_msg``: once with its ``_retrieve_buffer`` and once with ours.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest

otf = pytest.importorskip("ts.protocol.otf_message_handler", reason="torchserve is not installed")

from bray.handlers.ts_worker import BufferedFrontendReads, buffer_frontend_reads  # noqa: E402


def _field(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def _inference(requests: list[tuple[bytes, dict[bytes, bytes], bytes]]) -> bytes:
    """An ``I`` message the way the frontend writes it: id, headers, one ``body`` input."""
    out = b"I"
    for req_id, headers, body in requests:
        out += _field(req_id)
        for name, value in headers.items():
            out += _field(name) + _field(value)
        out += struct.pack("!i", -1)
        out += _field(b"body") + _field(b"application/octet-stream") + _field(body)
        out += struct.pack("!i", -1)
    return out + struct.pack("!i", -1)


HEADERS = {b"host": b"127.0.0.1:8080", b"content-type": b"application/octet-stream",
           b"x-bray-min-step": b"12", b"authorization": b"Bearer abc", b"content-length": b"300",
           b"user-agent": b"bray", b"accept": b"*/*", b"accept-encoding": b"gzip", b"connection": b"keep-alive"}
MESSAGES = [
    _inference([(b"a" * 36, HEADERS, bytes(range(256)) * 2)]),
    _inference([(b"b" * 36, HEADERS, b"x" * 3000), (b"c" * 36, {}, b"")]),
    _inference([(b"d" * 36, HEADERS, bytes(1 << 20))]),  # 1 MiB: read straight into its buffer
    _inference([(b"e" * 36, HEADERS, b"after the large one")]),
]


def _parse_all(reader: object, data: bytes, monkeypatch: pytest.MonkeyPatch, *, chunks: int = 0) -> list[object]:
    """Every message of ``data``, sent at once (or in ``chunks``-byte writes), through ``reader``."""
    monkeypatch.setattr(otf, "_retrieve_buffer", reader)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        def send() -> None:
            if chunks:
                for i in range(0, len(data), chunks):
                    theirs.sendall(data[i:i + chunks])
            else:
                theirs.sendall(data)

        sender = threading.Thread(target=send)
        sender.start()
        got = [otf.retrieve_msg(ours) for _ in MESSAGES]
        sender.join()
    return got


def test_buffered_reads_parse_what_torchserve_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    original = otf._retrieve_buffer
    data = b"".join(MESSAGES)
    expected = _parse_all(original, data, monkeypatch)
    assert [cmd for cmd, _ in expected] == [b"I"] * len(MESSAGES)
    assert expected[1][1][1]["requestId"] == b"c" * 36  # the framing above is TorchServe's
    reader = BufferedFrontendReads()
    assert _parse_all(reader, data, monkeypatch) == expected
    # TorchServe's reader makes one recv per field (48 per message with 9 headers, 202 here
    # in all) plus several for the MiB value; how many the MiB takes depends on the socket
    # buffer, so only "far fewer" is asserted here (one per request: the test below).
    assert reader.recv_calls <= 40, reader.recv_calls
    # Bytes trickling in (7 at a time) are put together the same way.
    assert _parse_all(BufferedFrontendReads(), data, monkeypatch, chunks=7) == expected


def test_one_recv_per_small_request(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = BufferedFrontendReads()
    monkeypatch.setattr(otf, "_retrieve_buffer", reader)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        for i in range(20):
            theirs.sendall(_inference([(b"%036d" % i, HEADERS, b"obs" * 100)]))
            cmd, msg = otf.retrieve_msg(ours)
            assert cmd == b"I" and msg[0]["requestId"] == b"%036d" % i
    assert reader.recv_calls == 20  # TorchServe's own reader: 20 x 48


def test_frontend_gone_mid_message_exits_like_torchserve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otf, "_retrieve_buffer", BufferedFrontendReads())
    ours, theirs = socket.socketpair()
    with ours:
        theirs.sendall(MESSAGES[0][:50])
        theirs.close()
        with pytest.raises(SystemExit) as exc:
            otf.retrieve_msg(ours)
    assert exc.value.code == 0


def test_installed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otf, "_retrieve_buffer", otf._retrieve_buffer)
    first = buffer_frontend_reads()
    assert isinstance(first, BufferedFrontendReads) and otf._retrieve_buffer is first
    assert buffer_frontend_reads() is first


def _metrics_cache() -> object:
    import os

    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    cache = MetricsCacheYamlImpl(config_file_path=os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"))
    cache.initialize_cache()
    cache.model_name, cache.request_ids = "policy", {0: "req-0"}  # what a worker's service sets
    return cache


def test_prediction_time_reported_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    import time

    from bray.handlers.ts_worker import throttle_prediction_time

    cache: object = _metrics_cache()
    assert throttle_prediction_time(cache, period_s=0.2)
    assert not throttle_prediction_time(cache, period_s=0.2)  # installed once
    with caplog.at_level("INFO"):
        for i in range(50):  # what ts/service.py does after each batch
            cache.add_time("PredictionTime", 1.5 + i)  # type: ignore[attr-defined]
        time.sleep(0.25)
        cache.add_time("PredictionTime", 9.0)  # type: ignore[attr-defined]
        for _ in range(3):
            cache.add_time("HandlerTime", 2.0)  # type: ignore[attr-defined]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    prediction = [line for line in lines if line.startswith("[METRICS]PredictionTime")]
    assert [line.split(":", 1)[1].split("|", 1)[0] for line in prediction] == ["1.5", "9.0"]
    assert sum(line.startswith("[METRICS]HandlerTime") for line in lines) == 3  # others untouched


def test_prediction_time_without_a_metrics_cache() -> None:
    from bray.handlers.ts_worker import throttle_prediction_time

    assert not throttle_prediction_time(None)


# -- fast frames: one-pass parse of inference messages -------------------------------------


def _inference_inputs(inputs: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """An ``I`` message of one request with the given (name, content type, value) inputs."""
    out = b"I" + _field(b"r" * 36)
    for name, value in HEADERS.items():
        out += _field(name) + _field(value)
    out += struct.pack("!i", -1)
    for name, content_type, value in inputs:
        out += _field(name) + _field(content_type) + _field(value)
    return out + struct.pack("!i", -1) + struct.pack("!i", -1)


PARSED = [
    *MESSAGES,
    _inference_inputs([(b"body", b"application/json", b'{"a": [1, 2]}'), (b"note", b"text/plain", "é".encode()),
                       (b"bad", b"application/json", b"{not json"), (b"bin", b"application/octet-stream", b"\x00\xff")]),
    _inference([]),  # an empty batch: the end of list at once
]


def _theirs(message: bytes) -> tuple[bytes, object]:
    """TorchServe's own parse of ``message`` (sent from a thread: it may not fit the socket buffer)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = threading.Thread(target=theirs.sendall, args=(message,))
        sender.start()
        got = otf.retrieve_msg(ours)
        sender.join()
    return got


@pytest.mark.parametrize("decode", [None, "false"], ids=["decoded", "TS_DECODE_INPUT_REQUEST=false"])
def test_parse_inference_returns_what_torchserve_returns(decode: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from bray.handlers.ts_worker import parse_inference

    if decode is not None:
        monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", decode)
    for message in PARSED:
        expected = _theirs(message)[1]
        got, end = parse_inference(message, 1, decode_inputs=decode is None)
        assert got == expected and end == len(message)
        assert all(type(a) is type(b) for r, s in zip(got, expected) for a, b in zip(r["parameters"], s["parameters"]))


def test_parse_inference_of_a_cut_message_asks_for_the_rest() -> None:
    from bray.handlers.ts_worker import ShortMessage, parse_inference

    message = PARSED[4]
    for cut in range(1, len(message) - 1):
        with pytest.raises(ShortMessage):
            parse_inference(message[:cut], 1)
    with pytest.raises(ShortMessage):  # a negative length TorchServe would not expect
        parse_inference(b"I" + struct.pack("!i", -7), 1)


def test_fast_frames_parse_from_the_reader_and_fall_back_when_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    from bray.handlers.ts_worker import fast_frames

    def original(f: object) -> object:  # TorchServe's own, also where a handler test installed ours
        return getattr(f, "_bray_original", f)

    monkeypatch.setattr(otf, "_retrieve_buffer", otf._retrieve_buffer)
    monkeypatch.setattr(otf, "_retrieve_inference_msg", original(otf._retrieve_inference_msg))
    slow = otf._retrieve_inference_msg
    expected = [_theirs(message) for message in MESSAGES]
    assert not fast_frames(None)
    reader = buffer_frontend_reads()
    assert fast_frames(reader) and fast_frames(reader)  # installed once
    assert otf._retrieve_inference_msg is not slow
    for chunks in (0, 7):  # all at once: parsed from the reader's bytes; 7 at a time: field by field
        ours, theirs = socket.socketpair()
        with ours, theirs:
            def send() -> None:
                data = b"".join(MESSAGES)
                for i in range(0, len(data), chunks or len(data)):
                    theirs.sendall(data[i:i + (chunks or len(data))])

            sender = threading.Thread(target=send)
            sender.start()
            got = [otf.retrieve_msg(ours) for _ in MESSAGES]
            sender.join()
        assert got == expected
