"""The floor of one call through TorchServe, for one process with one observation (issue 10's P=1).

On one TorchServe started from the bundled config (2 workers, batch 32, delay 0), after
4 s of calls to warm its JVM, the median and 10th percentile of, back to back:

- ``GET /ping`` over one kept-alive ``http.client`` connection: the front end alone;
- ``POST /predictions/<model>/latest`` of one binary (wire format) observation over that
  connection: front end, Python worker and the bray handler, no client library;
- ``rm(obs)`` direct (``RemoteModel`` on the bridge loop) with its lean HTTP/1.1 session
  (:mod:`bray.torchserve.http1`, the default) and with aiohttp's (``BRAY_HTTP_CLIENT=aiohttp``),
  and through the node proxy (``node_proxy=True``; the proxy process runs beside this one).

Beside each median, the CPU time per call of this process (every thread: the bridge loop
included) and, for the node proxy, of the proxy process (``psutil``, 10 ms ticks).
The rounds repeat, so a burst of load from elsewhere shows as a spread.

    .venv/bin/python scripts/bench_floor.py [--calls 600] [--rounds 2]
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bray  # noqa: E402
from bray import wire  # noqa: E402
from bray.torchserve.launcher import start_torchserve  # noqa: E402
from tests.models import PolicyMLP  # noqa: E402


def _proc_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0.0 for none)."""
    if pid is None:
        return 0.0
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _median_ms(call: Callable[[], object], n: int, other_pid: int | None = None) -> tuple[float, float, float, float]:
    """Median and p10 ms per call; CPU µs per call of this process and of ``other_pid``."""
    for _ in range(50):
        call()
    times = []
    cpu0, other0 = time.process_time(), _proc_cpu_s(other_pid)
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / n * 1e6
    other = (_proc_cpu_s(other_pid) - other0) / n * 1e6
    return float(np.median(times) * 1e3), float(np.percentile(times, 10) * 1e3), cpu, other


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=600, help="calls per measurement")
    p.add_argument("--rounds", type=int, default=2, help="times every measurement is repeated")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bray-floor-"))
    server = start_torchserve(workdir=work / "server", model_store=work / "model_store")
    try:
        bray.init(store=work / "store", model_store=server.model_store, inference_url=server.inference_url,
                  management_url=server.management_url, key_file=server.key_file)
        rm = bray.RemoteModel("policy_floor", model=PolicyMLP(64, 256, 16).eval(), forward_args=(torch.zeros(32, 64),),
                              max_batch_size=32, num_workers=2, node_proxy=False)
        proxied = bray.RemoteModel("policy_floor", node_proxy=True)
        obs = np.zeros((1, 64), np.float32)
        proxied(obs)  # the proxy is up
        os.environ["BRAY_HTTP_CLIENT"] = "aiohttp"  # read when this model's first call makes its session
        with_aiohttp = bray.RemoteModel("policy_floor", node_proxy=False)
        with_aiohttp(obs)
        del os.environ["BRAY_HTTP_CLIENT"]
        stats = proxied.proxy_stats()
        proxy_pid = stats["pid"] if stats else None
        warm_until = time.monotonic() + 4
        while time.monotonic() < warm_until:
            rm(obs)
        host, port = server.inference_url.split("//")[1].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port))
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        headers = {**server.headers("inference"), "Content-Type": "application/octet-stream"}
        body = wire.encode({"args": [obs]})

        def ask(method: str, path: str, payload: bytes | None = None) -> None:
            conn.request(method, path, body=payload, headers=headers)
            reply = conn.getresponse()
            reply.read()
            if reply.status != 200:
                raise RuntimeError(f"{method} {path} answered {reply.status}")

        calls = [("GET /ping (http.client)", lambda: ask("GET", "/ping")),
                 ("POST /predictions, binary (http.client)", lambda: ask("POST", "/predictions/policy_floor/latest", body)),
                 ("rm(obs) direct (http1 session)", lambda: rm(obs)),
                 ("rm(obs) direct (aiohttp session)", lambda: with_aiohttp(obs)),
                 ("rm(obs) node proxy", lambda: proxied(obs))]
        print("| round | call | median ms | p10 ms | CPU µs/call: caller | node proxy |\n|---:|---|---:|---:|---:|---:|")
        for r in range(args.rounds):
            for label, call in calls:
                pid = proxy_pid if "proxy" in label else None
                median, p10, cpu, other = _median_ms(call, args.calls, pid)
                print(f"| {r + 1} | {label} | {median:.2f} | {p10:.2f} | {cpu:.0f} | {other:.0f} |"
                      if pid else f"| {r + 1} | {label} | {median:.2f} | {p10:.2f} | {cpu:.0f} | |", flush=True)
        with_aiohttp.close()
        proxied.close()
        rm.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
