"""The client's own CPU per call, with no server: what our layers cost around one forward (issue 24).

Each case runs thousands of one-observation calls back to back in this process, with the
HTTP exchange replaced by an immediately-answering stand-in (a session handed to
:class:`~bray.torchserve.inference.InferenceClient` through its ``session_factory``, here
only), and reports CPU microseconds per call (``time.process_time`` or the thread's own
``time.thread_time``), the median over ``--rounds`` rounds:

- ``stub post``: the stand-in's ``post`` alone (subtract it from the cases below);
- ``predict``: ``InferenceClient.predict`` (balancing, headers, the key, the stand-in);
- ``transport.submit``: ``DirectTransport.submit`` (batcher, wire encode and decode, predict);
- ``await rm.forward``: ``RemoteModel.forward`` of one observation (``batch=False``) on
  this thread's event loop, through the direct transport;
- ``rm(obs) direct``: the synchronous call, through the bridge loop (both threads' CPU);
- ``proxy: actor`` / ``proxy: proxy``: ``rm(obs)`` through a node proxy served in this
  process on a thread of its own (its direct transport on the stand-in): the caller's
  thread's CPU and the proxy thread's CPU, per call, one caller;
- ``proxy xP: actor`` / ``proxy xP: proxy``: ``--procs`` forked actor processes calling
  the same in-process proxy for ``--seconds``: each actor's CPU per call (median over
  actors), and the proxy thread's CPU per call answered.

The observation is float32 (64,), the answer float32 (1, 16): the policy MLP of the other
benchmarks. CPU per call, not wall time: on a shared machine the other processes' load
moves wall time far more than our own work.

    .venv/bin/python scripts/bench_client_cpu.py [--calls 3000] [--rounds 5] [--procs 16] [--seconds 3] [--cases loop,sync,proxy,procs]
    .venv/bin/python scripts/bench_client_cpu.py --profile forward   # cProfile of one case instead
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import multiprocessing as mp
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np

from bray import wire
from bray.bridge.direct import DirectTransport
from bray.bridge.remote_model import RemoteModel
from bray.bridge.transport import Watermark
from bray.torchserve.auth import TokenAuth
from bray.torchserve.inference import InferenceClient

OBS, ACT = 64, 16
URL = "http://127.0.0.1:9"


class _Response:
    __slots__ = ("status", "headers", "_body")

    def __init__(self, body: bytes, headers: dict[str, str]) -> None:
        self.status, self._body, self.headers = 200, body, headers

    async def read(self) -> bytes:
        return self._body


class _Answering:
    """An HTTP session that answers every POST at once with the encoded outputs of its rows."""

    closed = False

    def __init__(self) -> None:
        self.headers = {"X-Bray-Step": "7", "Content-Type": wire.CONTENT_TYPE}
        self._bodies: dict[int, bytes] = {}

    def _body(self, rows: int) -> bytes:
        body = self._bodies.get(rows)
        if body is None:
            body = self._bodies[rows] = wire.encode(np.zeros((rows, ACT), np.float32))
        return body

    def post(self, url: str, *, data: bytes, headers: dict[str, str]) -> Any:
        # Rows of the request: the one array's leading dimension, from its shape in the header.
        rows = json.loads(bytes(data[9:9 + int.from_bytes(data[5:9], "little")]))["arrays"][0][1][0]
        return _answer(_Response(self._body(rows), self.headers))

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def _answer(resp: _Response) -> AsyncIterator[_Response]:
    yield resp


class _Registration:
    """What DirectTransport reads of a Registration, with a real key file to read per call."""

    def __init__(self, key_file: Path) -> None:
        self.name, self.version, self.count = "policy", "latest", 0
        self.idle = threading.Event()
        self.idle.set()
        self._key_file = key_file

    def inference_auth(self) -> TokenAuth:
        return TokenAuth(self._key_file, management_url="")


def _key_file(root: Path) -> Path:
    path = root / "key_file.json"
    path.write_text(json.dumps({kind: {"key": f"{kind}-key", "expiration time": "2099-01-01T00:00:00Z"}
                                for kind in ("management", "inference", "API")}))
    return path


def _direct(key_file: Path, session: _Answering) -> DirectTransport:
    transport = DirectTransport(_Registration(key_file), inference_urls=[URL], max_batch_samples=32 * 32,  # type: ignore[arg-type]
                                max_inflight=2, timeout_s=30.0, watermark=Watermark())
    transport._client = InferenceClient([URL], auth=transport.registration.inference_auth(), timeout_s=30.0,
                                        session_factory=lambda client: session)
    return transport


def _front(transport: Any) -> RemoteModel:
    """A RemoteModel over ``transport``, without registering anything (forward needs only its transport)."""
    rm = object.__new__(RemoteModel)
    rm.transport = transport
    return rm


def _per_call(run: Callable[[int], None], calls: int, clock: Callable[[], float] = time.process_time) -> float:
    run(min(200, calls))  # warm: first-use paths, caches
    started = clock()
    run(calls)
    return (clock() - started) / calls * 1e6


def _loop_cases(key_file: Path, calls: int) -> dict[str, float]:
    session = _Answering()
    transport = _direct(key_file, session)
    rm = _front(transport)
    obs = np.ones(OBS, np.float32)
    payload = {"args": [obs[None]]}
    body = wire.encode(payload)
    out: dict[str, float] = {}

    async def main() -> None:
        client = transport._client
        assert client is not None

        async def stub(k: int) -> None:
            for _ in range(k):
                async with session.post(URL, data=body, headers={}) as resp:
                    await resp.read()

        async def predict(k: int) -> None:
            for _ in range(k):
                await client.predict("policy", body, version="latest", min_step=3)

        async def submit(k: int) -> None:
            for _ in range(k):
                await transport.submit(payload, 1)

        async def forward(k: int) -> None:
            for _ in range(k):
                await rm.forward(obs)

        for name, case in (("stub post", stub), ("predict", predict), ("transport.submit", submit),
                           ("await rm.forward", forward)):
            await case(min(200, calls))
            started = time.process_time()
            await case(calls)
            out[name] = (time.process_time() - started) / calls * 1e6

    asyncio.run(main())
    return out


def _sync_direct(key_file: Path, calls: int) -> float:
    rm = _front(_direct(key_file, _Answering()))
    obs = np.ones((1, OBS), np.float32)
    return _per_call(lambda k: [rm(obs) for _ in range(k)], calls)


@contextlib.contextmanager
def _proxy(key_file: Path, profile: cProfile.Profile | None = None) -> Any:
    """A node proxy served on a thread of this process, its direct transport on the stand-in
    (``profile``: profiled while it serves)."""
    from bray.bridge._slot import proxy_address
    from bray.bridge.proxy import NodeProxy, bind

    address = proxy_address(f"bench-{os.getpid()}", "latest", [URL], tempfile.gettempdir())
    listener = bind(address)
    assert listener is not None
    proxy = NodeProxy(_direct(key_file, _Answering()), listener, idle_exit_s=None)

    def serve() -> None:
        with profile or contextlib.nullcontext():
            asyncio.run(proxy.serve())

    thread = threading.Thread(target=serve, name="bench-proxy")
    thread.start()
    try:
        yield address, proxy, thread
    finally:
        proxy.stop()
        thread.join()


def _thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds of another thread of this process (its clock, read from here)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))  # type: ignore[arg-type]


def _proxy_client(address: str) -> Any:
    from bray.bridge.proxy_client import NodeProxyTransport, ProxyClient

    client = ProxyClient(address, argv=["true"], env={}, timeout_s=30.0)
    direct = DirectTransport(None, inference_urls=[URL], max_batch_samples=0, max_inflight=1,  # type: ignore[arg-type]
                             timeout_s=30.0, watermark=Watermark())  # never used: the proxy answers
    return NodeProxyTransport(direct, client)


def _proxy_one(key_file: Path, calls: int) -> tuple[float, float]:
    obs = np.ones((1, OBS), np.float32)
    with _proxy(key_file) as (address, proxy, thread):
        rm = _front(_proxy_client(address))
        for _ in range(200):
            rm(obs)
        assert rm.transport.fallbacks == 0, rm.transport.proxy.last_error
        served, proxy_cpu, started = proxy.calls, _thread_cpu(thread), time.thread_time()
        for _ in range(calls):
            rm(obs)
        actor = (time.thread_time() - started) / calls * 1e6
        served_cpu = (_thread_cpu(thread) - proxy_cpu) / (proxy.calls - served) * 1e6
        rm.transport.close()
    return actor, served_cpu


def _actor(address: str, go: Any, seconds: float, results: Any) -> None:
    rm = _front(_proxy_client(address))
    obs = np.ones((1, OBS), np.float32)
    go.wait()
    rm(obs)
    calls, started, cpu = 0, time.monotonic(), time.process_time()
    while time.monotonic() - started < seconds:
        rm(obs)
        calls += 1
    results.put(((time.process_time() - cpu) / calls * 1e6, rm.transport.fallbacks))
    rm.transport.close()


def _proxy_many(key_file: Path, procs: int, seconds: float) -> tuple[float, float, float]:
    ctx = mp.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    from bray.bridge._slot import proxy_address

    address = proxy_address(f"bench-{os.getpid()}", "latest", [URL], tempfile.gettempdir())
    # Forked before the proxy's thread starts: a child inherits no running loop or held lock.
    actors = [ctx.Process(target=_actor, args=(address, go, seconds, results)) for _ in range(procs)]
    for p in actors:
        p.start()
    with _proxy(key_file) as (address_, proxy, thread):
        assert address_ == address
        time.sleep(0.2)
        served, cpu, started = proxy.calls, _thread_cpu(thread), time.monotonic()
        go.set()
        per_actor = [results.get(timeout=seconds + 60) for _ in actors]
        proxy_us = (_thread_cpu(thread) - cpu) / max(1, proxy.calls - served) * 1e6
        rate = (proxy.calls - served) / (time.monotonic() - started)
    for p in actors:
        p.join()
    assert all(f == 0 for _, f in per_actor), "a call fell back to the direct path"
    return statistics.median(us for us, _ in per_actor), proxy_us, rate


def _profile(case: str, key_file: Path, calls: int) -> None:
    obs = np.ones(OBS, np.float32)
    if case == "forward":
        rm = _front(_direct(key_file, _Answering()))

        async def run(k: int) -> None:
            for _ in range(k):
                await rm.forward(obs)

        asyncio.run(run(200))
        with cProfile.Profile() as prof:
            asyncio.run(run(calls))
    elif case == "proxy":
        served = cProfile.Profile()
        with _proxy(key_file, served) as (address, proxy, thread):
            rm = _front(_proxy_client(address))
            with cProfile.Profile() as prof:
                for _ in range(calls):
                    rm(obs[None])
            rm.transport.close()
        print("--- the proxy's thread")
        pstats.Stats(served).sort_stats("tottime").print_stats(30)
        print("--- the caller's thread")
    else:
        raise SystemExit(f"--profile takes forward or proxy, got {case!r}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--procs", type=int, default=16, help="actor processes of the proxy xP case (0: skip it)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the proxy xP case")
    parser.add_argument("--cases", default="loop,sync,proxy,procs",
                        help="which to run: loop (stub post .. await rm.forward), sync, proxy, procs (proxy xP)")
    parser.add_argument("--profile", choices=("forward", "proxy"), help="print a cProfile of one case and stop")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        key_file = _key_file(Path(tmp))
        if args.profile:
            _profile(args.profile, key_file, args.calls)
            return 0
        cases = set(args.cases.split(","))
        rows: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            if "loop" in cases:
                for name, us in _loop_cases(key_file, args.calls).items():
                    rows.setdefault(name, []).append(us)
            if "sync" in cases:
                rows.setdefault("rm(obs) direct", []).append(_sync_direct(key_file, args.calls))
            if "proxy" in cases:
                actor, proxy = _proxy_one(key_file, args.calls)
                rows.setdefault("proxy: actor", []).append(actor)
                rows.setdefault("proxy: proxy", []).append(proxy)
        if args.procs and "procs" in cases:
            for _ in range(args.rounds):
                actor, proxy, rate = _proxy_many(key_file, args.procs, args.seconds)
                rows.setdefault(f"proxy x{args.procs}: actor", []).append(actor)
                rows.setdefault(f"proxy x{args.procs}: proxy", []).append(proxy)
                rows.setdefault(f"proxy x{args.procs}: calls/s", []).append(rate)
    print(f"CPU µs per call, median of {args.rounds} rounds (min-max); load average {os.getloadavg()[0]:.1f}")
    print("| case | median | range |\n|---|---:|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):,.1f} | {min(values):,.1f}-{max(values):,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
