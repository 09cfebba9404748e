"""Measure EngineHandler inside TorchServe for the RL policy MLP (issue 3's numbers).

One TorchServe from the bundled config (token auth on), one store holding the policy
MLP (obs 64 -> 256 -> 256 -> 16, float32), and one live version per engine, each on
``--workers`` workers (``batch_size`` / ``max_batch_delay_ms`` as given). For each engine
and each wire form (binary NestedArray, JSON), one observation per request:

- **latency**: one client, requests back to back: median and p99 milliseconds. A lone
  request waits the full ``max_batch_delay`` before its batch runs (TorchServe), so the
  delay is part of the figure;
- **throughput**: 16 and 64 concurrent clients (one aiohttp event loop, one connection
  each) for ``--seconds``: answered requests per second.

Then, per engine, ``--publishes`` times: ``store.publish`` of new weights, and the time
until **every worker of the version has answered a request with the new step** (the
``X-Bray-Step`` and ``X-Bray-Worker`` headers), found by 4 pollers sending requests back
to back; the time each worker *staged* the step (its ``.serving`` announcement) is
recorded beside it. Median and worst.

The clients run on the same machine as the server and share its cores: on a small
machine the figures are a floor set partly by the client.

    .venv/bin/python scripts/bench_handler.py [--json] [--engines torch,onnx] [--seconds 5]

Writes ``results/bench_handler.md`` (and ``.json`` with ``--json``) and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch

from bray import wire
from bray.archiver import ManagementClient
from bray.archiver.publish import publish_version
from bray.export import export_model
from bray.handlers.handler import STEP_HEADER, WORKER_HEADER
from bray.store import CheckpointStore
from bray.torchserve.launcher import start_torchserve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.models import PolicyMLP  # noqa: E402  (the policy the tests and benchmarks share)

NAME = "bench-policy"
OBS, HIDDEN, ACTIONS = 64, 256, 16
# engine label -> publish_version options
ENGINES: dict[str, dict[str, Any]] = {
    "torch": {"engine": "torch"},
    "onnx": {"engine": "onnx"},
    "onnx-inputs": {"engine": "onnx", "onnx_weights": "inputs"},
}


def weights(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {k: rng.uniform(-0.1, 0.1, tuple(v.shape)).astype(np.float32) for k, v in PolicyMLP().state_dict().items()}


@dataclass
class Row:
    engine: str
    wire: str
    latency_p50_ms: float
    latency_p99_ms: float
    rps_16: float
    rps_64: float
    errors: int = 0


@dataclass
class ReloadRow:
    engine: str
    publishes: int
    serving_p50_ms: float
    serving_max_ms: float
    staged_p50_ms: float
    staged_max_ms: float
    publish_call_p50_ms: float
    errors: int = 0
    samples_ms: list[float] = field(default_factory=list)


class Target:
    """Where and how to send one engine's requests."""

    def __init__(self, inference_url: str, version: str, auth: dict[str, str]) -> None:
        self.url = f"{inference_url}/predictions/{NAME}/{version}"
        self.auth = auth
        x = np.random.default_rng(0).standard_normal((1, OBS), dtype=np.float32)
        self.bodies = {
            "binary": (wire.encode(x), {**auth, "Content-Type": wire.CONTENT_TYPE}),
            "json": (json.dumps(x.tolist()).encode(), {**auth, "Content-Type": "application/json"}),
        }

    async def send(self, session: aiohttp.ClientSession, form: str) -> tuple[int, int, int]:
        """(status, step, worker pid) of one request."""
        body, headers = self.bodies[form]
        async with session.post(self.url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status, int(resp.headers.get(STEP_HEADER, -1)), int(resp.headers.get(WORKER_HEADER, -1))


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def latency(target: Target, form: str, n: int) -> tuple[float, float, int]:
    times, errors = [], 0
    async with _session(1) as session:
        for _ in range(10):  # warm-up: connection, worker caches
            await target.send(session, form)
        for _ in range(n):
            t0 = time.perf_counter()
            status, _, _ = await target.send(session, form)
            times.append((time.perf_counter() - t0) * 1e3)
            errors += status != 200
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))], errors


async def throughput(target: Target, form: str, clients: int, seconds: float) -> tuple[float, int]:
    done = errors = 0
    counting = False
    stop_at = 0.0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors
        while time.perf_counter() < stop_at:
            status, _, _ = await target.send(session, form)
            if counting:
                done += 1
                errors += status != 200

    async with _session(clients) as session:
        stop_at = time.perf_counter() + 1.0 + seconds
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        await asyncio.sleep(1.0)  # warm-up: open every connection
        counting, started = True, time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return done / elapsed, errors


async def reload_times(target: Target, store: CheckpointStore, pids: set[int], publishes: int,
                       pollers: int = 4) -> tuple[list[float], list[float], list[float], int]:
    """Per publish: ms until every worker answered with the new step; ms until every worker staged it."""
    serving, staged, calls = [], [], []
    errors = 0
    first_seen: dict[int, float] = {}
    want = -1
    stop = False

    async def poller(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while not stop:
            status, step, pid = await target.send(session, "binary")
            now = time.perf_counter()
            if status != 200:
                errors += 1
            elif step >= want and pid not in first_seen:
                first_seen[pid] = now

    async with _session(pollers) as session:
        tasks = [asyncio.create_task(poller(session)) for _ in range(pollers)]
        for _ in range(publishes):
            await asyncio.sleep(0.3)  # let the previous step settle everywhere
            new_weights = weights((store.latest(NAME) or 0) + 1)
            want = (store.latest(NAME) or 0) + 1  # before the clear: no stale entry sneaks in
            first_seen.clear()
            staged_at: dict[int, float] = {}
            t0 = time.perf_counter()
            await asyncio.to_thread(store.publish, NAME, new_weights, want)
            calls.append((time.perf_counter() - t0) * 1e3)
            deadline = t0 + 30
            while (not pids <= set(first_seen) or len(staged_at) < len(pids)) and time.perf_counter() < deadline:
                for entry in store.serving(NAME).values():
                    pid = int(entry.get("pid", -1))
                    if pid in pids and entry.get("step", -1) >= want and pid not in staged_at:
                        staged_at[pid] = time.perf_counter()
                await asyncio.sleep(0.005)
            if not pids <= set(first_seen):
                errors += 1
                continue
            serving.append((max(first_seen[p] for p in pids) - t0) * 1e3)
            if len(staged_at) == len(pids):
                staged.append((max(staged_at.values()) - t0) * 1e3)
        stop = True
        await asyncio.gather(*tasks)
    return serving, staged, calls, errors


def _pids(client: ManagementClient, version: str) -> set[int]:
    (mv,) = client.describe(NAME, version)
    return {int(w["pid"]) for w in mv.raw.get("workers", [])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose from {sorted(ENGINES)}")
    rows: list[Row] = []
    reloads: list[ReloadRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-handler-") as tmp:
        root = Path(tmp)
        store = CheckpointStore(root / "store", keep_last=3)
        export_model(PolicyMLP().eval(), (torch.zeros(2, OBS),), dest=store.export_dir(NAME),
                     onnx=any(ENGINES[e]["engine"] == "onnx" for e in engines))
        store.publish(NAME, weights(1), step=1)
        with start_torchserve(workdir=root / "ts", model_store=root / "ts" / "model_store") as server, \
                ManagementClient(server.management_url, key_file=server.key_file) as client:
            auth = server.headers("inference")
            for label in engines:
                version = label.replace("-", "_")
                print(f"registering {label} ({args.workers} workers) ...", file=sys.stderr, flush=True)
                publish_version(store, NAME, step=None, client=client, model_store=server.model_store,
                                workers=args.workers, batch_size=args.batch_size,
                                max_batch_delay_ms=args.max_batch_delay_ms, version=version, **ENGINES[label])
                target = Target(server.inference_url, version, auth)
                try:
                    for form in ("binary", "json"):
                        print(f"  {label} {form}: latency, 16 and 64 clients ...", file=sys.stderr, flush=True)
                        p50, p99, e1 = asyncio.run(latency(target, form, args.latency_requests))
                        r16, e2 = asyncio.run(throughput(target, form, 16, args.seconds))
                        r64, e3 = asyncio.run(throughput(target, form, 64, args.seconds))
                        rows.append(Row(label, form, p50, p99, r16, r64, e1 + e2 + e3))
                    print(f"  {label}: {args.publishes} publishes ...", file=sys.stderr, flush=True)
                    pids = _pids(client, version)
                    serving, staged, calls, errors = asyncio.run(reload_times(target, store, pids, args.publishes))
                    reloads.append(ReloadRow(
                        engine=label, publishes=args.publishes,
                        serving_p50_ms=statistics.median(serving) if serving else float("nan"),
                        serving_max_ms=max(serving) if serving else float("nan"),
                        staged_p50_ms=statistics.median(staged) if staged else float("nan"),
                        staged_max_ms=max(staged) if staged else float("nan"),
                        publish_call_p50_ms=statistics.median(calls), errors=errors,
                        samples_ms=[round(s, 2) for s in serving]))
                finally:
                    client.unregister(NAME, version)  # one engine's workers at a time
    return {
        "setup": {
            "model": f"MLP {OBS}-{HIDDEN}-{HIDDEN}-{ACTIONS} float32, 1 observation per request",
            "workers": args.workers, "batch_size": args.batch_size, "max_batch_delay_ms": args.max_batch_delay_ms,
            "seconds_per_point": args.seconds, "latency_requests": args.latency_requests,
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
        },
        "serving": [asdict(r) for r in rows],
        "reload": [asdict(r) for r in reloads],
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"### EngineHandler on TorchServe: {s['model']}",
        "",
        f"{s['workers']} workers, batch_size {s['batch_size']}, max_batch_delay {s['max_batch_delay_ms']} ms; "
        f"{s['cpus']} CPUs shared by server and clients; torch {s['torch']}, Python {s['python']}.",
        "",
        "| engine | wire | latency p50 (ms) | latency p99 (ms) | req/s, 16 clients | req/s, 64 clients | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["serving"]:
        lines.append(f"| {r['engine']} | {r['wire']} | {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | "
                     f"{r['rps_16']:.0f} | {r['rps_64']:.0f} | {r['errors']} |")
    lines += [
        "",
        "`store.publish` to every worker serving the new step (polled: every worker pid answered with it), "
        "and to every worker having staged it (`.serving` announcements):",
        "",
        "| engine | publishes | serving p50 (ms) | serving worst (ms) | staged p50 (ms) | staged worst (ms) "
        "| publish() call p50 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["reload"]:
        lines.append(f"| {r['engine']} | {r['publishes']} | {r['serving_p50_ms']:.1f} | {r['serving_max_ms']:.1f} | "
                     f"{r['staged_p50_ms']:.1f} | {r['staged_max_ms']:.1f} | {r['publish_call_p50_ms']:.1f} | "
                     f"{r['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="torch,onnx", help=f"comma-separated, from {sorted(ENGINES)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per throughput point")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--json", action="store_true", help="also write the raw numbers as JSON")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    (args.out / "bench_handler.md").write_text(table)
    if args.json:
        (args.out / "bench_handler.json").write_text(json.dumps(result, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
