"""The lean HTTP/1.1 session (bray.torchserve.http1) against real servers on loopback.

Each server here is a real asyncio TCP server speaking scripted HTTP (keep-alive, chunked
answers, answers cut short, answers too late, closed idle connections), so every case
the session must tell apart happens on real sockets. The session against TorchServe
itself is every integration test that calls a model (it is the default).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Awaitable, Callable

import pytest

from bray.torchserve.answers import connection_failure
from bray.torchserve.http1 import ConnectFailedError, ConnectTimeoutError, Http1Session, ReadTimeoutError
from bray.torchserve.inference import InferenceClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A loopback server: ``handler`` serves each connection; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
        """One request, or None at the client's end of the connection."""
        head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
        if not head:
            return None
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((lines[0], headers, body))
        return lines[0], headers, body


def answer(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nX-Bray-Step: 7\r\n{extra}\r\n").encode() + body


def echo_after(delay_s: Callable[[bytes], float]) -> Handler:
    """Keep-alive: answers each request with its own body, ``delay_s(body)`` seconds later."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while (req := await server.read_request(reader)) is not None:
            if delay := delay_s(req[2]):
                await asyncio.sleep(delay)
            writer.write(answer(req[2]))
            await writer.drain()
    return serve


echo = echo_after(lambda body: 0)


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_kept_alive_connection_is_reused_and_headers_are_read_without_regard_to_case() -> None:
    async def main() -> None:
        async with Server(echo) as srv:
            session = Http1Session()
            for i in range(5):
                async with session.post(srv.url + "/predictions/m/1", data=b"x" * i,
                                        headers={"Content-Type": "application/octet-stream", "X-Bray-Min-Step": "3"}) as r:
                    assert r.status == 200 and await r.read() == b"x" * i
                    assert r.headers.get("x-bray-step") == "7" and r.headers.get("X-BRAY-STEP") == "7"
            assert srv.connections == 1 and len(srv.requests) == 5
            line, headers, _ = srv.requests[0]
            assert line == "POST /predictions/m/1 HTTP/1.1"
            assert headers["host"] == srv.url.split("//")[1] and headers["x-bray-min-step"] == "3"
            await session.close()
    run(main())


def test_a_chunked_answer_written_a_few_bytes_at_a_time_is_read_whole() -> None:
    body = bytes(range(256)) * 40

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await server.read_request(reader) is not None:
            wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            for i in range(0, len(body), 1000):
                part = body[i:i + 1000]
                wire += f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
            wire += b"0\r\nX-Trailer: 1\r\n\r\n"
            for i in range(0, len(wire), 97):  # in pieces: the parser must wait for the rest
                writer.write(wire[i:i + 97])
                await writer.drain()
                await asyncio.sleep(0)

    async def main() -> None:
        async with Server(chunked) as srv:
            session = Http1Session()
            for _ in range(2):  # and the connection is still good for the next one
                async with session.post(srv.url + "/p", data=b"q") as r:
                    assert await r.read() == body
            assert srv.connections == 1
            await session.close()
    run(main())


def test_connection_close_is_honoured_and_a_body_may_end_with_the_connection() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        req = await server.read_request(reader)
        assert req is not None
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + req[2])  # no length: ends at close
        await writer.drain()

    async def main() -> None:
        async with Server(closing) as srv:
            session = Http1Session()
            for i in range(3):
                async with session.post(srv.url + "/p", data=str(i).encode()) as r:
                    assert await r.read() == str(i).encode()
            assert srv.connections == 3
            await session.close()
    run(main())


def test_an_idle_connection_the_server_closed_is_replaced_and_the_request_sent_once() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        req = await server.read_request(reader)
        assert req is not None
        writer.write(answer(req[2]))
        await writer.drain()  # then closes, as a restarted server's connections do

    async def main() -> None:
        async with Server(one_then_close) as srv:
            session = Http1Session()
            for i in range(4):
                async with session.post(srv.url + "/p", data=str(i).encode()) as r:
                    assert await r.read() == str(i).encode()
                await asyncio.sleep(0.02)  # the close has arrived, or is about to
            assert [body for _, _, body in srv.requests] == [b"0", b"1", b"2", b"3"]  # each sent once
            assert srv.connections == 4
            await session.close()
    run(main())


def test_an_answer_cut_short_is_a_reset_and_the_next_request_gets_its_own_answer() -> None:
    async def cut_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        req = await server.read_request(reader)
        assert req is not None
        if server.connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
            await writer.drain()
            return
        writer.write(answer(req[2]))
        await writer.drain()

    async def main() -> None:
        async with Server(cut_first) as srv:
            session = Http1Session()
            with pytest.raises(ConnectionResetError, match="before its answer was whole") as err:
                async with session.post(srv.url + "/p", data=b"first"):
                    pass
            assert connection_failure(err.value) == "reset"
            async with session.post(srv.url + "/p", data=b"second") as r:
                assert await r.read() == b"second"
            assert len(srv.requests) == 2  # a request that reached the server is never sent again here
            await session.close()
    run(main())


def test_refused_is_a_connect_failure_the_client_sets_the_node_aside_for() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused

    async def main() -> None:
        session = Http1Session()
        with pytest.raises(ConnectFailedError) as err:
            async with session.post(f"http://127.0.0.1:{port}/p", data=b""):
                pass
        assert connection_failure(err.value) == "refused"
        async with Server(echo) as srv:  # the client goes to the node that listens
            client = InferenceClient([f"http://127.0.0.1:{port}", srv.url], max_retries=0)
            replies = [await client.predict("m", b"obs") for _ in range(6)]
            assert {r.url for r in replies} == {srv.url} and all(r.step == 7 for r in replies)
            assert client.stats.connection_errors == 1  # set aside after its first refusal
            await client.close()
    run(main())


def test_no_answer_to_a_connection_attempt_is_a_connect_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepts: once its backlog is full, a new connection's SYN goes unanswered
    fillers = []
    try:
        for _ in range(8):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(listener.getsockname())
            fillers.append(f)

        async def main() -> None:
            session = Http1Session(connect_timeout_s=0.3)
            with pytest.raises(ConnectFailedError) as err:
                async with session.post(f"http://127.0.0.1:{listener.getsockname()[1]}/p", data=b""):
                    pass
            if not isinstance(err.value, ConnectTimeoutError):
                pytest.skip(f"this kernel answered the connection attempt ({err.value}); no timeout to see")
            assert connection_failure(err.value) == "connect-timeout"
        try:
            run(main())
        except Exception as err:  # connected after all: the backlog had room on this kernel
            pytest.skip(f"this kernel accepted the connection into a full backlog ({err!r})")
    finally:
        for f in fillers:
            f.close()
        listener.close()


def test_an_answer_later_than_the_timeout_closes_its_connection_and_never_reaches_the_next_request() -> None:
    async def main() -> None:
        async with Server(echo_after(lambda body: 0.5 if body == b"slow" else 0)) as srv:
            session = Http1Session(timeout_s=0.2)
            with pytest.raises(ReadTimeoutError) as err:
                async with session.post(srv.url + "/p", data=b"slow"):
                    pass
            assert connection_failure(err.value) == "read-timeout"
            async with session.post(srv.url + "/p", data=b"next") as r:
                assert await r.read() == b"next"  # not the slow one's late answer
            assert srv.connections == 2
            await session.close()
    run(main())


def test_a_cancelled_request_closes_its_connection() -> None:
    async def main() -> None:
        async with Server(echo_after(lambda body: 0.3 if body == b"slow" else 0)) as srv:
            session = Http1Session()
            task = asyncio.ensure_future(session.post(srv.url + "/p", data=b"slow"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with session.post(srv.url + "/p", data=b"mine") as r:
                assert await r.read() == b"mine"
            assert srv.connections == 2
            await session.close()
    run(main())


def test_connections_per_host_are_limited_and_the_rest_wait_their_turn() -> None:
    async def main() -> None:
        async with Server(echo_after(lambda body: 0.02)) as srv:
            session = Http1Session(limit_per_host=2)

            async def one(i: int) -> bytes:
                async with session.post(srv.url + "/p", data=str(i).encode()) as r:
                    return await r.read()
            got = await asyncio.gather(*(one(i) for i in range(10)))
            assert got == [str(i).encode() for i in range(10)]
            assert srv.most_open == 2 and srv.connections == 2
            await session.close()
            await asyncio.sleep(0.05)
            assert srv.open_now == 0 and session.closed  # close() closed the idle ones
    run(main())


def test_a_malformed_answer_or_header_is_refused_with_the_reason() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        if await server.read_request(reader) is not None:
            writer.write(b"SPDY/9 200 OK\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)

    async def main() -> None:
        async with Server(garbage) as srv:
            session = Http1Session()
            with pytest.raises(ConnectionResetError, match="malformed HTTP answer: status line 'SPDY/9 200 OK'"):
                async with session.post(srv.url + "/p", data=b""):
                    pass
            with pytest.raises(ValueError, match="line break"):
                async with session.post(srv.url + "/p", data=b"", headers={"X-Bray-Weights": "a\r\nHost: evil"}):
                    pass
            await session.close()
    run(main())
