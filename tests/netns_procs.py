"""What runs inside the nodes of :mod:`tests.netns`: ``python -m tests.netns_procs server|actor|relay``.

- ``server``: TorchServe as a server node runs it (inference on the node's address,
  management and metrics on the node's own loopback), the live version registered from
  the shared store with ``bray-archive publish --live`` through that loopback, workers
  polling the store, or with ``--cache`` the node's one weight loader polling it and the
  workers following its cache in ``/dev/shm``; prints ``ready`` and serves until SIGTERM.
- ``actor``: calls the StepProbe model (``y = step * (sum(x) + 1)``) through
  ``RemoteModel`` attached from a node that reaches no management API
  (``BRAY_MANAGEMENT_URL=none``), until a stop file appears; writes one JSON record:
  calls, errors, wrong answers, steps that went backwards, the slowest call, what the
  node proxy sent where.
- ``relay``: a TCP relay in front of a server node that delays every chunk by
  ``--delay-ms`` and drops ``--drop`` of the connections (closed at accept, or cut
  mid-use after a chunk), as a slow and lossy link would (no ``netem`` on this kernel).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def server(args: argparse.Namespace) -> int:
    from bray.torchserve.launcher import start_torchserve

    workdir = Path(args.workdir)
    loader = None
    if args.cache:  # the node's one weight loader, started before the workers it feeds
        loader = subprocess.Popen([sys.executable, "-m", "bray.store.node_loader", "--store", args.store, "--cache",
                                   args.cache, "--name", args.name, "--poll-interval-ms", str(args.poll_interval_ms)],
                                  stdout=open(workdir / "loader.log", "ab"), stderr=subprocess.STDOUT)
        while b"node loader:" not in (workdir / "loader.log").read_bytes():
            if loader.poll() is not None:
                print("the node loader exited:", (workdir / "loader.log").read_text(), flush=True)
                return 1
            time.sleep(0.05)
    ts = start_torchserve(workdir=workdir, model_store=workdir / "model_store", inference_port=8080,
                          management_port=8081, metrics_port=8082, grpc_ports=(7070, 7071),
                          properties={"inference_address": f"http://{args.address}:8080"}, timeout_s=180,
                          extra_env={"BRAY_NODE_CACHE": args.cache} if args.cache else None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cmd = [sys.executable, "-m", "bray.archiver", "publish", "--store", args.store, "--name", args.name, "--live",
               "--workers", str(args.workers), "--poll-interval-ms", str(args.poll_interval_ms),
               "--batch-size", str(args.batch_size), "--max-batch-delay-ms", "2", "--set-default",
               "--management", ts.management_url, "--key-file", str(ts.key_file),
               "--model-store", str(ts.model_store), "--no-progress"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            print(f"registration failed ({done.returncode}): {done.stdout}\n{done.stderr}", flush=True)
            return 1
        print(f"ready {ts.inference_url} key {ts.key_file}", flush=True)
        stop.wait()
        return 0
    finally:
        ts.stop()
        if loader is not None:
            loader.terminate()
            loader.wait(timeout=20)


def actor(args: argparse.Namespace) -> int:
    import numpy as np

    import bray

    bray.init()  # BRAY_* from the environment the test hands over
    rm = bray.RemoteModel(args.name, node_proxy=args.node_proxy == "on", timeout_s=args.timeout_s)
    x = np.full((1, args.n), args.value, dtype=np.float32)
    stop = Path(args.stop_file)
    calls = wrong = backwards = 0
    errors: list[str] = []
    last = -1
    first = None
    slowest = 0.0
    per_second: dict[int, int] = {}  # wall-clock second -> calls answered in it (the test knows when it cut what)
    started = time.monotonic()
    while not stop.exists():
        t0 = time.monotonic()
        try:
            y, step = rm(x, return_step=True)
        except Exception as err:  # every failure is counted and reported, none hidden
            errors.append(f"{type(err).__name__}: {err}"[:300])
            continue
        slowest = max(slowest, time.monotonic() - t0)
        calls += 1
        second = int(time.time())
        per_second[second] = per_second.get(second, 0) + 1
        first = step if first is None else first
        if not np.allclose(y, step * (args.n * args.value + 1), rtol=1e-4):
            wrong += 1
        if step < last:
            backwards += 1
        last = max(last, step)
    elapsed = time.monotonic() - started
    try:
        proxy = rm.proxy_stats() or {}
    except Exception as err:  # the proxy may be the one a test killed
        proxy = {"error": repr(err)}
    record = {"pid": os.getpid(), "calls": calls, "errors": len(errors), "error_messages": errors[:10],
              "wrong": wrong, "backwards": backwards, "first_step": first, "last_step": last,
              "seconds": round(elapsed, 3), "slowest_s": round(slowest, 3), "fallbacks": rm.proxy_fallbacks,
              "proxy": proxy, "per_second": per_second}
    Path(args.out).write_text(json.dumps(record))
    rm.close()
    return 0


def relay(args: argparse.Namespace) -> int:
    host, port = args.listen.rsplit(":", 1)
    to_host, to_port = args.to.rsplit(":", 1)
    delay_s = args.delay_ms / 1e3
    counts = {"connections": 0, "dropped": 0}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, lossy: bool,
                   other: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(delay_s)
                if lossy and random.random() < args.drop:
                    counts["dropped"] += 1
                    for w in (writer, other):  # the link dropped it: both ends see it cut
                        w.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts["connections"] += 1
        if random.random() < args.drop:
            counts["dropped"] += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            writer.transport.abort()
            return
        await asyncio.gather(pipe(reader, up_writer, lossy=True, other=writer),
                             pipe(up_reader, writer, lossy=False, other=up_writer))

    async def main() -> None:
        srv = await asyncio.start_server(handle, host, int(port))
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        print(f"relay {args.listen} -> {args.to}", flush=True)
        async with srv:
            await done.wait()
        Path(args.counts).write_text(json.dumps(counts))

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns_procs")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("server")
    p.add_argument("--workdir", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--poll-interval-ms", type=int, default=50)
    p.add_argument("--cache", help="run the node's weight loader into this /dev/shm folder")
    p.set_defaults(run=server)
    p = sub.add_parser("actor")
    p.add_argument("--name", required=True)
    p.add_argument("--value", type=float, required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--node-proxy", choices=("on", "off"), default="on")
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--n", type=int, default=4, help="StepProbe's input width")
    p.set_defaults(run=actor)
    p = sub.add_parser("relay")
    p.add_argument("--listen", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--delay-ms", type=float, default=2.0)
    p.add_argument("--drop", type=float, default=0.01)
    p.add_argument("--counts", required=True)
    p.set_defaults(run=relay)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
