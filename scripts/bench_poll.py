"""Publish-to-served on every worker, with the workers polling the store (as KServe pods do).

Pods on several hosts share the checkpoint store on a ReadWriteMany volume, where inotify
sees only local writes, so ``bray-archive kserve`` archives the model with
``poll_interval_ms`` (default 50): each worker reads the store's ``LATEST`` that often.
This measures, on one real TorchServe with W workers per model, for inotify and for a
few poll intervals in one run:

- announced: from the moment ``CheckpointStore.publish`` returns (``LATEST`` moved) until
  every worker has staged the step (its ``.serving`` announcement: what
  ``publish_weights(...).wait()`` waits for);
- served: until every worker has then answered a request with the new step (requests
  sent back to back; a worker swaps a staged step in at its next batch).

Local disk here: on NFS add one GETATTR+READ round trip per poll (close-to-open).

    .venv/bin/python scripts/bench_poll.py [--publishes 15] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bray import wire  # noqa: E402
from bray.archiver.publish import publish_version  # noqa: E402
from bray.export import export_model  # noqa: E402
from bray.store import CheckpointStore  # noqa: E402
from bray.torchserve.launcher import start_torchserve  # noqa: E402
from bray.torchserve.management import ManagementClient  # noqa: E402
from tests.models import PolicyMLP  # noqa: E402


def measure(server, store: CheckpointStore, name: str, poll_ms: int, *, workers: int, publishes: int) -> dict:
    net = PolicyMLP()
    obs = np.zeros((1, 64), np.float32)
    export_model(net, (torch.zeros(2, 64),), dest=store.export_dir(name), onnx=False)
    step = 1
    store.publish(name, net.state_dict(), step=step)
    with ManagementClient(server.management_url, key_file=server.key_file, timeout_s=300) as client:
        publish_version(store, name, step=None, client=client, model_store=server.model_store, workers=workers,
                        poll_interval_ms=poll_ms)
        body = wire.encode({"args": [obs], "kwargs": {}})
        url = f"{server.inference_url}/predictions/{name}"
        session = requests.Session()
        announced, served = [], []
        try:
            for _ in range(publishes):
                step += 1
                weights = {k: v + 0.001 for k, v in net.state_dict().items()}
                store.publish(name, weights, step=step)
                started = time.perf_counter()  # LATEST has moved: the step is visible from here
                announced_at = None
                while announced_at is None:
                    states = store.serving(name)
                    if len(states) >= workers and all(s.get("step", -1) >= step for s in states.values()):
                        announced_at = time.perf_counter()
                    elif time.perf_counter() - started > 30:
                        raise TimeoutError(f"step {step} not announced by every worker in 30 s: {states}")
                    else:
                        time.sleep(0.0005)
                seen: set[str] = set()
                pids: set[str] = set()
                while True:
                    now = time.perf_counter()
                    resp = session.post(url, data=body, headers={**server.headers("inference"),
                                                                 "Content-Type": wire.CONTENT_TYPE}, timeout=30)
                    pid = resp.headers[wire.WORKER_HEADER]
                    pids.add(pid)
                    if int(resp.headers[wire.STEP_HEADER]) >= step:
                        seen.add(pid)
                    if len(seen) >= workers:
                        served.append((time.perf_counter() - started) * 1e3)
                        announced.append((announced_at - started) * 1e3)
                        break
                    if now - started > 30:
                        raise TimeoutError(f"step {step} not served by every worker in 30 s ({seen} of {pids})")
                time.sleep(0.2)  # publishes land at random phases of the poll
        finally:
            client.unregister(name)
    return {"announced": announced, "served": served}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--publishes", type=int, default=15)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--intervals-ms", default="0,10,50,100", help="0 = inotify")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bray-bench-poll-") as tmp:
        store = CheckpointStore(Path(tmp) / "store")
        with start_torchserve(workdir=Path(tmp) / "ts", model_store=Path(tmp) / "ts" / "model_store") as server:
            rows = []
            for poll_ms in (int(x) for x in args.intervals_ms.split(",")):
                name = f"poll{poll_ms}"
                result = measure(server, store, name, poll_ms, workers=args.workers, publishes=args.publishes)
                rows.append((poll_ms, result))
    print(f"publish -> every one of {args.workers} workers, {args.publishes} publishes each, policy MLP "
          "64-256-256-16, local disk")
    print("| watcher | announced median ms | announced max ms | served median ms | served max ms |")
    print("|---|---:|---:|---:|---:|")
    for poll_ms, r in rows:
        label = "inotify" if poll_ms == 0 else f"poll {poll_ms} ms"
        print(f"| {label} | {statistics.median(r['announced']):.1f} | {max(r['announced']):.1f} | "
              f"{statistics.median(r['served']):.1f} | {max(r['served']):.1f} |")


if __name__ == "__main__":
    main()
