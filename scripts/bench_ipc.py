"""Round trips between actor processes and one server process: the node proxy's transport candidates.

One round trip is what an actor's call to a node-local forward proxy costs before any
model runs: the actor writes an observation (float32, ``rows`` x 64, rows 1 or 16) and
a small header (rows, sequence number) into its own slot, wakes the server process;
the server copies the observation out (as a batcher would), writes an answer (rows x
16 float32, derived from the observation so the actor can check it belongs to its own
request) into the slot and wakes the actor, which copies the answer out and checks it.

Candidates (``--transports``, comma separated):

- ``shm+seqpacket``: ``multiprocessing.shared_memory`` slots; wake-ups are one byte over
  a per-actor ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair; the server ``epoll``s them all.
- ``memfd+stream``: what issue 10's node proxy chose (``bridge/_slot.py``): a ``memfd_create``
  slot and a 32-byte header each way over a per-actor ``SOCK_STREAM`` socket pair.
- ``shm+dgram``: the same slots; one ``SOCK_DGRAM`` server socket (abstract address) that
  every actor sends its slot number to, answered with ``sendto`` to the actor's own socket.
- ``shm+eventfd``: the same slots; two ``os.eventfd`` per actor (request, answer), made
  before the fork and inherited; the server ``epoll``s the request ones.
- ``shm+posix_ipc``: the same slots with a ready flag each; one shared request semaphore
  and one answer semaphore per actor (TorchRL ``ProcessSlotTransport``'s shape), from the
  ``posix-ipc`` package; the server scans the flags on each wake-up.
- ``shm+mp_semaphore``: the same with ``multiprocessing.Semaphore`` (also a POSIX
  semaphore, through ``_multiprocessing.SemLock``).
- ``zmq-ipc``: pyzmq ``DEALER`` actors and a ``ROUTER`` server on ``ipc://``; the
  observation travels in the message (no shared memory).
- ``seqpacket-payload``: baseline without shared memory: the observation and the answer
  travel in the ``SOCK_SEQPACKET`` messages themselves.

Measured per candidate and size: one actor's round trips back to back (median and p99
microseconds), and ``--clients`` actor processes looping for ``--seconds`` (aggregate
round trips per second, and their median), in ``--repeat`` rounds that interleave the
candidates; each figure is the median over the rounds. Every process blocks in the kernel while it
waits (no spinning): on a 2-core machine shared with servers, spinning would steal the
cores the model needs. Processes start with ``fork`` so file descriptors are inherited.

    .venv/bin/python scripts/bench_ipc.py [--quick] [--seconds 2] [--repeat 3] [--clients 16] [--out results]

Writes ``results/bench_ipc.md`` and ``results/bench_ipc.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import secrets
import select
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

OBS, ACT = 64, 16
MAX_ROWS = 16
HEADER = 4  # int64 per slot: rows, seq, ready flag, spare
REQ_FLOATS, REP_FLOATS = MAX_ROWS * OBS, MAX_ROWS * ACT


class Slots:
    """One shared-memory segment: per actor a header, a request area and an answer area.

    ``memfd=True`` backs it with ``memfd_create`` (no name in /dev/shm at all) instead of
    ``multiprocessing.shared_memory``; the forked processes inherit the mapping either way.
    """

    def __init__(self, clients: int, *, memfd: bool = False) -> None:
        import mmap
        from multiprocessing import shared_memory

        self.clients = clients
        size = clients * (HEADER * 8 + (REQ_FLOATS + REP_FLOATS) * 4)
        self.shm: Any = None
        if memfd:
            fd = os.memfd_create("bray-bench-slots")
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
            os.close(fd)
            buf: Any = self.map
        else:
            # Random name, 0600 by default on Linux (shm_open with mode 0o600 in CPython).
            self.shm = shared_memory.SharedMemory(name=f"bray-bench-{secrets.token_hex(8)}", create=True, size=size)
            buf = self.shm.buf
        h = clients * HEADER * 8
        r = h + clients * REQ_FLOATS * 4
        self.header = np.ndarray((clients, HEADER), np.int64, buf, 0)
        self.req = np.ndarray((clients, REQ_FLOATS), np.float32, buf, h)
        self.rep = np.ndarray((clients, REP_FLOATS), np.float32, buf, r)
        self.header[:] = 0

    # Forked children use the inherited mapping: attaching by name in Python < 3.13 registers
    # the segment with the child's resource tracker, which unlinks it when the child exits.

    def put(self, i: int, obs: np.ndarray, seq: int) -> None:
        rows = obs.shape[0]
        self.req[i, : rows * OBS] = obs.ravel()
        self.header[i, 0], self.header[i, 1] = rows, seq

    def answer(self, i: int) -> None:
        """Server side: copy the observation out, write the answer."""
        rows = int(self.header[i, 0])
        obs = self.req[i, : rows * OBS].reshape(rows, OBS).copy()
        self.rep[i, : rows * ACT] = (obs[:, :ACT] + 1.0).ravel()

    def take(self, i: int, rows: int) -> np.ndarray:
        return self.rep[i, : rows * ACT].reshape(rows, ACT).copy()

    def close(self) -> None:
        del self.header, self.req, self.rep
        if self.shm is None:
            self.map.close()
            return
        self.shm.close()
        self.shm.unlink()


def _answer_bytes(payload: bytes) -> bytes:
    obs = np.frombuffer(payload, np.float32).reshape(-1, OBS)
    return (obs[:, :ACT] + 1.0).tobytes()


class Transport:
    """One candidate. ``setup`` runs in the parent before the fork, ``serve`` in the server
    process (until killed), ``connect`` in an actor process and returns its round-trip call."""

    name = ""
    needs = ""  # the pip package it needs, for the skip reason

    def setup(self, clients: int) -> None:
        self.clients = clients
        self.slots = Slots(clients)

    def serve(self) -> None:
        raise NotImplementedError

    def connect(self, i: int) -> Callable[[np.ndarray, int], np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        self.slots.close()


class ShmSeqpacket(Transport):
    name = "shm+seqpacket"

    def setup(self, clients: int) -> None:
        super().setup(clients)
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(clients)]

    def serve(self) -> None:
        ep = select.epoll()
        by_fd = {}
        for i, (_, srv) in enumerate(self.pairs):
            ep.register(srv.fileno(), select.EPOLLIN)
            by_fd[srv.fileno()] = (i, srv)
        while True:
            for fd, _ in ep.poll():
                i, srv = by_fd[fd]
                srv.recv(8)
                self.slots.answer(i)
                srv.send(b"\0")

    def connect(self, i: int) -> Callable[[np.ndarray, int], np.ndarray]:
        sock, slots = self.pairs[i][0], self.slots

        def rt(obs: np.ndarray, seq: int) -> np.ndarray:
            slots.put(i, obs, seq)
            sock.send(b"\1")
            sock.recv(8)
            return slots.take(i, obs.shape[0])

        return rt

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()
        super().close()


class MemfdStream(ShmSeqpacket):
    """What issue 10's proxy chose (bridge/_slot.py): a memfd slot, a 32-byte header each way
    over a per-actor ``SOCK_STREAM`` Unix socket (read exactly, as a stream needs)."""

    name = "memfd+stream"
    MSG = 32

    def setup(self, clients: int) -> None:
        self.clients = clients
        self.slots = Slots(clients, memfd=True)
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(clients)]

    @staticmethod
    def _read(sock: socket.socket, n: int) -> None:
        while n:
            got = len(sock.recv(n))
            if not got:
                raise EOFError("peer closed")
            n -= got

    def serve(self) -> None:
        ep = select.epoll()
        by_fd = {}
        for i, (_, srv) in enumerate(self.pairs):
            ep.register(srv.fileno(), select.EPOLLIN)
            by_fd[srv.fileno()] = (i, srv)
        reply = bytes(self.MSG)
        while True:
            for fd, _ in ep.poll():
                i, srv = by_fd[fd]
                self._read(srv, self.MSG)
                self.slots.answer(i)
                srv.sendall(reply)

    def connect(self, i: int) -> Callable[[np.ndarray, int], np.ndarray]:
        sock, slots, msg = self.pairs[i][0], self.slots, bytes(self.MSG)

        def rt(obs: np.ndarray, seq: int) -> np.ndarray:
            slots.put(i, obs, seq)
            sock.sendall(msg)
            self._read(sock, self.MSG)
            return slots.take(i, obs.shape[0])

        return rt


class ShmDgram(Transport):
    name = "shm+dgram"

    def setup(self, clients: int) -> None:
        super().setup(clients)
        self.prefix = f"\0bray-bench-{secrets.token_hex(8)}"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.server.bind(self.prefix)

    def serve(self) -> None:
        while True:
            data, addr = self.server.recvfrom(8)
            i = int.from_bytes(data, "little")
            self.slots.answer(i)
            self.server.sendto(b"\0", addr)

    def connect(self, i: int) -> Callable[[np.ndarray, int], np.ndarray]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(f"{self.prefix}-{i}")
        sock.connect(self.prefix)
        me, slots = i.to_bytes(4, "little"), self.slots

        def rt(obs: np.ndarray, seq: int) -> np.ndarray:
            slots.put(i, obs, seq)
            sock.send(me)
            sock.recv(8)
            return slots.take(i, obs.shape[0])

        return rt

    def close(self) -> None:
        self.server.close()
        super().close()


class ShmEventfd(Transport):
    name = "shm+eventfd"

    def setup(self, clients: int) -> None:
        super().setup(clients)
        self.fds = [(os.eventfd(0), os.eventfd(0)) for _ in range(clients)]

    def serve(self) -> None:
        ep = select.epoll()
        by_fd = {}
        for i, (req, rep) in enumerate(self.fds):
            ep.register(req, select.EPOLLIN)
            by_fd[req] = (i, rep)
        while True:
            for fd, _ in ep.poll():
                i, rep = by_fd[fd]
                os.eventfd_read(fd)
                self.slots.answer(i)
                os.eventfd_write(rep, 1)

    def connect(self, i: int) -> Callable[[np.ndarray, int], np.ndarray]:
        req, rep = self.fds[i]
        slots = self.slots

        def rt(obs: np.ndarray, seq: int) -> np.ndarray:
            slots.put(i, obs, seq)
            os.eventfd_write(req, 1)
            os.eventfd_read(rep)
            return slots.take(i, obs.shape[0])

        return rt

    def close(self) -> None:
        for a, b in self.fds:
            os.close(a)
            os.close(b)
        super().close()


class ShmSemaphores(Transport):
    """One shared request semaphore, a ready flag per slot, one answer semaphore per actor."""

    name = "shm+mp_semaphore"

    def semaphore(self, tag: str) -> Any:
        return mp.get_context("fork").Semaphore(0)

    def setup(self, clients: int) -> None:
        super().setup(clients)
        self.request = self.semaphore("req")
        self.answers = [self.semaphore(f"rep{i}") for i in range(clients)]

    def serve(self) -> None:
        flags = self.slots.header[:, 2]
        while True:
            self.request.acquire()
            # A post can find its slot already answered by an earlier wake-up: nothing to do then.
            for i in np.flatnonzero(flags):
                flags[i] = 0
                self.slots.answer(int(i))
                self.answers[i].release()

    def connect(self, i: int) -> Callable[[np.ndarray, int], np.ndarray]:
        slots, request, answer = self.slots, self.request, self.answers[i]

        def rt(obs: np.ndarray, seq: int) -> np.ndarray:
            slots.put(i, obs, seq)
            slots.header[i, 2] = 1  # after the payload: x86 keeps store order, the flag is read first
            request.release()
            answer.acquire()
            return slots.take(i, obs.shape[0])

        return rt


class ShmPosixIpc(ShmSemaphores):
    name = "shm+posix_ipc"
    needs = "posix-ipc"

    def setup(self, clients: int) -> None:
        import posix_ipc  # noqa: F401  (fail here, in the parent, with the install hint)

        self.token = secrets.token_hex(8)
        super().setup(clients)

    def semaphore(self, tag: str) -> Any:
        import posix_ipc

        sem = posix_ipc.Semaphore(f"/bray-bench-{self.token}-{tag}", posix_ipc.O_CREX, mode=0o600, initial_value=0)
        sem.unlink()  # the name goes now; the forked processes keep the mapping
        return sem


class ZmqIpc(Transport):
    name = "zmq-ipc"
    needs = "pyzmq"

    def setup(self, clients: int) -> None:
        import zmq  # noqa: F401

        self.clients = clients
        self.dir = tempfile.mkdtemp(prefix="bray-bench-zmq-")
        self.addr = f"ipc://{self.dir}/s"

    def serve(self) -> None:
        import zmq

        sock = zmq.Context().socket(zmq.ROUTER)
        sock.bind(self.addr)
        while True:
            ident, payload = sock.recv_multipart(copy=False)
            sock.send_multipart([ident, _answer_bytes(payload.buffer)], copy=False)

    def connect(self, i: int) -> Callable[[np.ndarray, int], np.ndarray]:
        import zmq

        sock = zmq.Context().socket(zmq.DEALER)
        sock.connect(self.addr)

        def rt(obs: np.ndarray, seq: int) -> np.ndarray:
            sock.send(obs, copy=False)
            return np.frombuffer(sock.recv(), np.float32).reshape(obs.shape[0], ACT)

        return rt

    def close(self) -> None:
        for f in Path(self.dir).iterdir():
            f.unlink()
        os.rmdir(self.dir)


class SeqpacketPayload(ShmSeqpacket):
    name = "seqpacket-payload"

    def setup(self, clients: int) -> None:
        self.clients = clients
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(clients)]

    def serve(self) -> None:
        ep = select.epoll()
        by_fd = {}
        for _, srv in self.pairs:
            ep.register(srv.fileno(), select.EPOLLIN)
            by_fd[srv.fileno()] = srv
        while True:
            for fd, _ in ep.poll():
                srv = by_fd[fd]
                srv.send(_answer_bytes(srv.recv(REQ_FLOATS * 4)))

    def connect(self, i: int) -> Callable[[np.ndarray, int], np.ndarray]:
        sock = self.pairs[i][0]

        def rt(obs: np.ndarray, seq: int) -> np.ndarray:
            sock.send(obs)
            return np.frombuffer(sock.recv(REP_FLOATS * 4), np.float32).reshape(obs.shape[0], ACT)

        return rt

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()


TRANSPORTS: dict[str, type[Transport]] = {t.name: t for t in (
    ShmSeqpacket, MemfdStream, ShmDgram, ShmEventfd, ShmPosixIpc, ShmSemaphores, ZmqIpc, SeqpacketPayload)}


def _actor(t: Transport, i: int, rows: int, n: int, until: float, start: Any, out: Any) -> None:
    """Round trips back to back: ``n`` of them, or until ``until`` (monotonic) after ``start``."""
    rt = t.connect(i)
    obs = np.zeros((rows, OBS), np.float32)
    times: list[int] = []
    seq = 0

    def once() -> None:
        nonlocal seq
        seq += 1
        obs.fill(float(seq % 4096 + 1000 * i))
        t0 = time.perf_counter_ns()
        ans = rt(obs, seq)
        times.append(time.perf_counter_ns() - t0)
        if ans[-1, -1] != obs[0, 0] + 1.0:  # the answer must be to this actor's own request
            raise RuntimeError(f"{t.name}: actor {i} got {ans[-1, -1]} for request {obs[0, 0]}")

    for _ in range(200):  # warm-up
        once()
    times.clear()
    start.wait()
    if n:
        for _ in range(n):
            once()
    else:
        stop = time.monotonic() + until
        while time.monotonic() < stop:
            once()
    out.put(times)


def measure(name: str, rows: int, *, clients: int, seconds: float, n_latency: int) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    t = TRANSPORTS[name]()
    try:
        t.setup(clients)
    except ImportError as err:
        return {"skipped": f"{err.name or err} not installed (pip install {t.needs})"}
    server = ctx.Process(target=t.serve, daemon=True)
    server.start()
    try:
        row: dict[str, Any] = {}
        for k, (n, dur) in {1: (n_latency, 0.0), clients: (0, seconds)}.items():
            start, out = ctx.Event(), ctx.Queue()
            actors = [ctx.Process(target=_actor, args=(t, i, rows, n, dur, start, out), daemon=True) for i in range(k)]
            for a in actors:
                a.start()
            time.sleep(0.3 + 0.02 * k)  # every actor connected and warmed up
            t0 = time.perf_counter()
            start.set()
            times = [out.get(timeout=60 + seconds) for _ in actors]
            elapsed = time.perf_counter() - t0
            for a in actors:
                a.join(10)
                if a.exitcode != 0:
                    raise RuntimeError(f"{name}: an actor exited with {a.exitcode}")
            flat = np.concatenate([np.asarray(x, np.float64) for x in times]) / 1e3
            if k == 1:
                row.update(p50_us=float(np.median(flat)), p99_us=float(np.percentile(flat, 99)), n=int(flat.size))
            else:
                row.update(rt_per_s=flat.size / elapsed, p50_us_many=float(np.median(flat)), clients=k)
        return row
    finally:
        server.kill()
        server.join(10)
        t.close()


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the rounds, and the spread of the throughput."""
    if "skipped" in runs[0]:
        return runs[0]
    out = {k: float(np.median([r[k] for r in runs])) for k in ("p50_us", "p99_us", "rt_per_s", "p50_us_many")}
    out.update(rt_per_s_range=[min(r["rt_per_s"] for r in runs), max(r["rt_per_s"] for r in runs)],
               n=runs[0]["n"], clients=runs[0]["clients"], rounds=runs)
    return out


def markdown(res: dict[str, Any]) -> str:
    s = res["setup"]
    c = s["clients"]
    lines = [f"_{s['when']}, {s['machine']}, {s['cpus']} cores shared with five other engineers' servers and "
             f"tests (figures are noisy: compare rows of one run; 1-min load average {s['loadavg_1min'][0]:.1f} before, "
             f"{s['loadavg_1min'][1]:.1f} after), Python {s['python']}; "
             f"one server process, {s['seconds']} s per {c}-actor point; medians of {s['repeat']} interleaved rounds_", "",
             f"| transport | obs | 1 actor p50 µs | 1 actor p99 µs | {c} actors round trips/s (range) | {c} actors p50 µs |",
             "|---|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        shape = f"{r['rows']}x{OBS}"
        if "skipped" in r:
            lines.append(f"| {r['transport']} | {shape} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['transport']} | {shape} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | "
                         f"{r['rt_per_s']:,.0f} ({r['rt_per_s_range'][0]:,.0f}-{r['rt_per_s_range'][1]:,.0f}) | {r['p50_us_many']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transports", default=",".join(TRANSPORTS), help=f"comma separated, from {list(TRANSPORTS)}")
    p.add_argument("--rows", default="1,16", help="observations per round trip (1 to 16), comma separated")
    p.add_argument("--clients", type=int, default=16, help="actor processes for the throughput point")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per throughput point")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; each figure is their median")
    p.add_argument("--latency-n", type=int, default=5000, help="round trips for one actor's median and p99")
    p.add_argument("--quick", action="store_true", help="one round, 1 s points, 1000 round trips (a smoke run)")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.latency_n, args.repeat = 1.0, 1000, 1
    names = [x.strip() for x in args.transports.split(",") if x.strip()]
    unknown = [x for x in names if x not in TRANSPORTS]
    sizes = [int(x) for x in args.rows.split(",")]
    if unknown or not all(1 <= r <= MAX_ROWS for r in sizes):
        p.error(f"transports from {list(TRANSPORTS)} (got {unknown}), rows 1..{MAX_ROWS} (got {sizes})")
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(name, r): [] for name in names for r in sizes}
    for round_ in range(args.repeat):  # rounds interleave the candidates: a burst of load hits them all alike
        for (name, r), got in runs.items():
            print(f"bench_ipc: round {round_ + 1}/{args.repeat} {name} {r}x{OBS} ...", file=sys.stderr, flush=True)
            got.append(measure(name, r, clients=args.clients, seconds=args.seconds, n_latency=args.latency_n))
    rows = [{"transport": name, "rows": r, **combine(got)} for (name, r), got in runs.items()]
    res = {"setup": {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
                     "machine": platform.machine(), "python": platform.python_version(), "clients": args.clients,
                     "seconds": args.seconds, "latency_n": args.latency_n, "repeat": args.repeat,
                     "loadavg_1min": [load_before, os.getloadavg()[0]]}, "rows": rows}
    table = markdown(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_ipc.md").write_text(table)
    (args.out / "bench_ipc.json").write_text(json.dumps(res, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
