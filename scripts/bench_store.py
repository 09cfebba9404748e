"""Checkpoint store timings: publish and load of a 1 MB and a 100 MB state dict.

    .venv/bin/python scripts/bench_store.py [--repeat 5] [--json]

Publish includes the fsyncs and the LATEST pointer move (what makes it atomic); load
includes reading the file and verifying its sha256.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def state_dict(total_bytes: int) -> dict[str, np.ndarray]:
    n = total_bytes // 4 // 4
    rng = np.random.default_rng(0)
    return {f"layer{i}.weight": rng.standard_normal(n, dtype=np.float32) for i in range(4)}


def main(argv: list[str] | None = None) -> int:
    from bray.store import CheckpointStore

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        store = CheckpointStore(tmp, keep_last=2)
        for label, size in (("1 MB", 1 << 20), ("100 MB", 100 << 20)):
            weights = state_dict(size)
            pub, load = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                step = store.publish(label.replace(" ", ""), weights)
                pub.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                store.load(label.replace(" ", ""), step)
                load.append(time.perf_counter() - t0)
            rows.append({"size": label, "publish_ms": statistics.median(pub) * 1e3, "load_ms": statistics.median(load) * 1e3,
                         "publish_MBps": size / 1e6 / statistics.median(pub), "load_MBps": size / 1e6 / statistics.median(load)})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("| state dict | publish ms (median) | load+verify ms (median) | publish MB/s | load MB/s |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['size']} | {r['publish_ms']:.1f} | {r['load_ms']:.1f} | {r['publish_MBps']:.0f} | {r['load_MBps']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
