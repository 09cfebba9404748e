"""Where one call's time goes, request by request (issue 24): client, front end, worker, handler.

One TorchServe from the bundled config (``--property``/``--jvm`` change it) with
``BRAY_WORKER_TIMELINE`` set, so every worker stamps each batch (``handlers/ts_worker.py``'s
``WorkerTimeline``). One process calls back to back over one kept-alive ``http.client``
connection, stamping each call's send and answer with the same clock; each worker line is
joined to the one call it falls in. Targets:

- ``ping``: ``GET /ping``, the front end alone (HTTP, token check, no worker);
- ``noop``: ``POST /predictions`` to a one-class handler that answers ``b"0"`` at once
  (TorchServe's own path: front end, batch aggregator, worker loop);
- ``noop+patches before``: the same with bray's worker patches before issue 24 (buffered
  reads, ``PredictionTime`` once a second, no per-batch log line);
- ``noop+patches``: and issue 24's one-pass parse of each message;
- ``noop+patches, torch x2``: and an eager policy MLP forward of one observation twice per
  batch, stamped as ``decode`` (the first) and ``forward`` (the second, right after): what
  the same work costs at the start of a batch and once warm;
- ``bray``: the bray handler serving the policy MLP 64-256-256-16, one binary observation.

Segments (medians over the calls, µs): ``in`` the client's send to the worker awake with
the request readable (HTTP client, front end, batch aggregator, worker thread, the
socket to the worker, the worker's wake-up); ``read`` TorchServe's parse of the message;
``predict`` TorchServe's request list and context; ``decode`` / ``forward`` / ``encode``
/ ``tail`` (step and worker headers, metrics) the bray handler; ``respond`` TorchServe
framing the answer and writing it; ``out`` from the worker's write to the client holding
the answer (front end back out, HTTP client).

Beside them, the CPU each call costs (µs of user + system time per call over the round,
psutil): the Java front end, the Python workers (every worker of every model: idle ones
cost nothing), and this client process. On two cores shared by all three, that sum, not
the wall time, bounds how many calls a second many actors can get.

    .venv/bin/python scripts/bench_call_floor.py [--calls 1000] [--rounds 2] [--property k=v ...] [--jvm ARGS]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bray  # noqa: E402
from bray import wire  # noqa: E402
from bray.handlers.ts_worker import TIMELINE_ENV, WorkerTimeline  # noqa: E402
from bray.torchserve.launcher import start_torchserve  # noqa: E402
from bray.torchserve.management import ManagementClient  # noqa: E402
from tests.models import PolicyMLP  # noqa: E402

NOOP_HANDLER = textwrap.dedent('''
    """Answers every request with b"0" at once: TorchServe's own cost, no model."""
    from ts.torch_handler.base_handler import BaseHandler


    class NoopHandler(BaseHandler):
        def initialize(self, context):
            from bray.handlers import ts_worker

            reader = None
            if context.model_name != "noop":  # noop_before: the patches before issue 24; noop_patched: all
                ts_worker.quiet_per_batch_log()
                reader = ts_worker.buffer_frontend_reads()
                ts_worker.throttle_prediction_time(context.metrics)
                if context.model_name in ("noop_patched", "noop_torch"):
                    ts_worker.fast_frames(reader)
            self.timeline = ts_worker.worker_timeline(reader)
            self.net = None
            if context.model_name == "noop_torch":  # the same eager MLP forward twice per batch
                import torch

                torch.set_num_threads(1)
                self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                               torch.nn.ReLU(), torch.nn.Linear(256, 16)).eval()
                self.x = torch.zeros(1, 64)
            self.initialized = True

        def handle(self, data, context):
            timeline = self.timeline
            if timeline is not None:
                timeline.mark("handle")
                timeline.batch(len(data))
            if self.net is not None:
                import torch

                with torch.inference_mode():
                    self.net(self.x)
                    if timeline is not None:
                        timeline.mark("decoded")  # the first forward of the batch
                    self.net(self.x)
                    if timeline is not None:
                        timeline.mark("forwarded")  # the second, right after
            if timeline is not None:
                timeline.mark("answered")
            return [b"0"] * len(data)
''')

NOOPS = ("noop", "noop_before", "noop_patched", "noop_torch")
SEGMENTS = [("in", None, "woke"), ("read", "woke", "read"), ("predict", "read", "handle"),
            ("decode", "handle", "decoded"), ("forward", "decoded", "forwarded"),
            ("encode", "forwarded", "encoded"), ("tail", "encoded", "answered"),
            ("respond", "answered", "sent"), ("out", "sent", None)]


def _noop_archive(model_store: Path, work: Path) -> None:
    (work / "noop_handler.py").write_text(NOOP_HANDLER)
    for name in NOOPS:
        subprocess.run([str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", name,
                        "--version", "1", "--handler", str(work / "noop_handler.py"),
                        "--export-path", str(model_store), "-f"], check=True, capture_output=True)


def _worker_lines(directory: Path) -> np.ndarray:
    rows = []
    for path in directory.glob("worker-*.tsv"):
        for line in path.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) == 1 + len(WorkerTimeline.MARKS):
                rows.append([int(f) for f in fields[1:]])
    return np.array(rows, dtype=np.int64).reshape(-1, len(WorkerTimeline.MARKS))


def _breakdown(calls: np.ndarray, workers: np.ndarray) -> dict[str, float]:
    """Median µs of each segment over the calls that hold exactly one worker batch."""
    marks = WorkerTimeline.MARKS
    col = {m: i for i, m in enumerate(marks)}
    order = np.argsort(workers[:, col["woke"]]) if len(workers) else np.array([], int)
    workers = workers[order]
    per: dict[str, list[float]] = {name: [] for name, _, _ in SEGMENTS}
    per["total"] = []
    woke = workers[:, col["woke"]] if len(workers) else np.array([], np.int64)
    for c0, c1 in calls:
        lo, hi = np.searchsorted(woke, c0), np.searchsorted(woke, c1)
        per["total"].append((c1 - c0) / 1e3)
        if hi - lo != 1:
            continue
        w = workers[lo]
        stamps = {"client_send": c0, "client_done": c1}
        last = None
        for m in marks:  # a mark the handler does not make (noop) counts as the one before
            stamps[m] = int(w[col[m]]) or last
            last = stamps[m]
        for name, a, b in SEGMENTS:
            t0 = stamps[a] if a else c0
            t1 = stamps[b] if b else c1
            per[name].append((t1 - t0) / 1e3)
    return {k: float(np.median(v)) if v else float("nan") for k, v in per.items()} | {
        "joined": len(per["in"]), "calls": len(calls)}


def _cpu_s(procs: list[Any]) -> float:
    """User + system CPU seconds of ``procs`` so far (a process gone since counts 0)."""
    import psutil

    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1000, help="calls per target and round")
    p.add_argument("--rounds", type=int, default=2, help="times every target is repeated")
    p.add_argument("--property", action="append", default=[], help="key=value for config.properties")
    p.add_argument("--jvm", default="", help="JVM arguments added to the bundled config's vmargs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bray-call-floor-"))
    timeline = work / "timeline"
    props = dict(kv.split("=", 1) for kv in args.property)
    if args.jvm:  # added to the bundled config's vmargs
        from bray.ts_config import config_path

        bundled = [ln.split("=", 1)[1].strip() for ln in config_path().read_text().splitlines()
                   if ln.startswith("vmargs=")]
        props["vmargs"] = " ".join([*bundled, args.jvm])
    server = start_torchserve(workdir=work / "server", model_store=work / "model_store", properties=props,
                              extra_env={TIMELINE_ENV: str(timeline)})
    results: dict[str, Any] = {"properties": props, "rounds": []}
    try:
        bray.init(store=work / "store", model_store=server.model_store, inference_url=server.inference_url,
                  management_url=server.management_url, key_file=server.key_file)
        rm = bray.RemoteModel("policy_floor", model=PolicyMLP(64, 256, 16).eval(), forward_args=(torch.zeros(32, 64),),
                              max_batch_size=32, num_workers=args.workers, node_proxy=False)
        _noop_archive(server.model_store, work)
        with ManagementClient(server.management_url, key_file=server.key_file, timeout_s=120) as mgmt:
            for name in NOOPS:
                mgmt.register(f"{name}.mar", initial_workers=args.workers, batch_size=32, max_batch_delay_ms=0)
        host, port = server.inference_url.split("//")[1].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port))
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        headers = {**server.headers("inference"), "Content-Type": "application/octet-stream"}
        body = wire.encode({"args": [np.zeros((1, 64), np.float32)]})
        targets = [("ping", "GET", "/ping", None), ("noop", "POST", "/predictions/noop", b"0"),
                   ("noop+patches before", "POST", "/predictions/noop_before", b"0"),
                   ("noop+patches", "POST", "/predictions/noop_patched", b"0"),
                   ("noop+patches, torch x2", "POST", "/predictions/noop_torch", b"0"),
                   ("bray", "POST", "/predictions/policy_floor/latest", body)]

        def ask(method: str, path: str, payload: bytes | None) -> None:
            conn.request(method, path, body=payload, headers=headers)
            reply = conn.getresponse()
            reply.read()
            if reply.status != 200:
                raise RuntimeError(f"{method} {path} answered {reply.status}")

        warm_until = time.monotonic() + 4
        while time.monotonic() < warm_until:
            for _, method, path, payload in targets:
                ask(method, path, payload)
        import psutil

        front_end = psutil.Process(server.pid)
        workers = front_end.children(recursive=True)
        me = psutil.Process()
        names = [name for name, _, _ in SEGMENTS]
        print("| round | target | total µs | " + " | ".join(names) + " | joined | CPU µs/call: front end | workers | client |")
        print("|---:|---|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|")
        for r in range(args.rounds):
            for label, method, path, payload in targets:
                for f in timeline.glob("*.tsv"):
                    f.write_text("")  # truncated, not removed: each worker keeps its file open
                stamps = np.empty((args.calls, 2), np.int64)
                cpu0 = [_cpu_s([front_end]), _cpu_s(workers), _cpu_s([me])]
                for i in range(args.calls):
                    t0 = time.perf_counter_ns()
                    ask(method, path, payload)
                    stamps[i] = t0, time.perf_counter_ns()
                cpu = [(after - before) / args.calls * 1e6 for before, after in
                       zip(cpu0, [_cpu_s([front_end]), _cpu_s(workers), _cpu_s([me])])]
                ask("GET", "/ping", None)  # the last batch's line is written when its worker reads the next
                for _, m, pth, pl in targets[1:]:
                    ask(m, pth, pl)
                row = _breakdown(stamps, _worker_lines(timeline) if label != "ping" else np.empty((0, 8), np.int64))
                results["rounds"].append({"round": r + 1, "target": label, **row, "cpu_front_end_us": cpu[0],
                                          "cpu_workers_us": cpu[1], "cpu_client_us": cpu[2]})
                cells = " | ".join(f"{row[n]:.0f}" if row[n] == row[n] else "" for n in names)
                print(f"| {r + 1} | {label} | {row['total']:.0f} | {cells} | {row['joined']}/{row['calls']} | "
                      f"{cpu[0]:.0f} | {cpu[1]:.0f} | {cpu[2]:.0f} |", flush=True)
        conn.close()
        rm.close()
    finally:
        server.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
