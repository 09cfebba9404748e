"""A league on one TorchServe: K opponents as weight sets (the default) against K dedicated clones.

One real TorchServe started from the bundled config; the learner is the policy MLP
(64-256-256-16) with 2 workers and TorchServe batch 32. For each K, opponents are cloned
from kept checkpoints with ``rm.clone(step)`` (weight sets of the learner's workers), or
with ``dedicated=True`` (a TorchServe model with the learner's 2 workers each, what every
clone was before) for the K that fit in memory. Then G coroutine "games" play for a few
seconds: each game step calls the learner and then one of the K opponents, round robin,
one observation a call, all in one process (client batching coalesces a round's calls).
Measured per point: forwards/s, TorchServe's memory (RSS of the frontend and every
worker), its processes, and ``clone()`` to the clone's first answer (median).

    .venv/bin/python scripts/bench_league.py [--ks 0,8,64] [--dedicated-ks 0,4] [--games 8] [--seconds 4]

Writes ``results/bench_league.{md,json,png}``. One process of games is not the 8 actor
processes of the issue's table: compare the columns within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bray  # noqa: E402
from bray.torchserve.launcher import start_torchserve  # noqa: E402
from bray.torchserve.management import ManagementClient  # noqa: E402
from tests.models import PolicyMLP  # noqa: E402


def server_memory(pid: int) -> tuple[float, int]:
    """(RSS in MB of the frontend and all its descendants, how many processes)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs) / 2**20, len(procs)


async def play(learner: bray.RemoteModel, opponents: list[bray.RemoteModel], *, games: int,
               seconds: float) -> float:
    obs = np.zeros(64, np.float32)
    done = 0
    stop = time.monotonic() + seconds

    async def game(i: int) -> None:
        nonlocal done
        turn = i
        while time.monotonic() < stop:
            await learner.forward(obs)
            if opponents:
                await opponents[turn % len(opponents)].forward(obs)
                turn += 1
                done += 1
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(game(i) for i in range(games)))
    return done / (time.monotonic() - started)


def point(learner: bray.RemoteModel, steps: list[int], k: int, *, dedicated: bool, server_pid: int,
          games: int, seconds: float) -> dict:
    opponents, clone_s = [], []
    for i in range(k):
        started = time.perf_counter()
        opp = learner.clone(step=steps[i % len(steps)], name=f"{'d' if dedicated else 'w'}{k}x{i}", dedicated=dedicated)
        opp(np.zeros((1, 64), np.float32))
        clone_s.append(time.perf_counter() - started)
        opponents.append(opp)
    asyncio.run(play(learner, opponents, games=games, seconds=1.0))  # warm
    rate = asyncio.run(play(learner, opponents, games=games, seconds=seconds))
    mb, procs = server_memory(server_pid)
    for opp in opponents:
        opp.close()
    return {"k": k, "dedicated": dedicated, "forwards_per_s": round(rate), "torchserve_mb": round(mb),
            "processes": procs, "clone_to_answer_ms": round(statistics.median(clone_s) * 1e3, 1) if clone_s else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="0,8,64")
    parser.add_argument("--dedicated-ks", default="4")
    parser.add_argument("--games", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bray-league-") as tmp:
        root = Path(tmp)
        server = start_torchserve(workdir=root / "ts", model_store=root / "model_store")
        try:
            bray.init(store=root / "store", model_store=server.model_store, inference_url=server.inference_url,
                      management_url=server.management_url, key_file=server.key_file)
            import torch

            learner = bray.RemoteModel("league", model=PolicyMLP(), forward_args=(torch.zeros(2, 64),),
                                       max_batch_size=32, num_workers=2, checkpoint_interval=1)
            net = PolicyMLP()
            for _ in range(16):
                learner.publish_weights({k: v + 0.01 for k, v in net.state_dict().items()}).wait(timeout_s=60)
            steps = learner.store.checkpoint_steps(learner.name)
            for k in [int(x) for x in args.ks.split(",") if x]:
                rows.append(point(learner, steps, k, dedicated=False, server_pid=server.pid, games=args.games,
                                  seconds=args.seconds))
                print(json.dumps(rows[-1]), flush=True)
            for k in [int(x) for x in args.dedicated_ks.split(",") if x]:
                rows.append(point(learner, steps, k, dedicated=True, server_pid=server.pid, games=args.games,
                                  seconds=args.seconds))
                print(json.dumps(rows[-1]), flush=True)
                with ManagementClient(server.management_url, key_file=server.key_file, timeout_s=120) as client:
                    for name in client.list_models():
                        if name != "league":
                            client.unregister(name)
            learner.close()
        finally:
            server.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_league.json").write_text(json.dumps(rows, indent=1))
    lines = ["| K opponents | served as | forwards/s | TorchServe memory (RSS) | processes | clone() to first answer |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['k']} | {'dedicated models' if r['dedicated'] else 'weight sets'} | {r['forwards_per_s']:,} "
                     f"| {r['torchserve_mb']:,} MB | {r['processes']} | "
                     f"{'' if r['clone_to_answer_ms'] is None else str(r['clone_to_answer_ms']) + ' ms'} |")
    (out / "bench_league.md").write_text(
        f"_{time.strftime('%Y-%m-%d')}, scripts/bench_league.py --ks {args.ks} --dedicated-ks {args.dedicated_ks} "
        f"--games {args.games} --seconds {args.seconds}: one TorchServe, learner 2 workers, batch 32; G games in one "
        "process, each step the learner then one opponent round robin_\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, out / "bench_league.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Forwards/s and TorchServe's memory against K, weight sets and dedicated clones."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_league: matplotlib missing; no plot (pip install 'bray-serve[bench]')")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for dedicated, style, label in ((False, "o-", "weight sets (default)"), (True, "s--", "dedicated models")):
        pts = sorted((r["k"], r["forwards_per_s"], r["torchserve_mb"]) for r in rows if r["dedicated"] == dedicated
                     or (r["k"] == 0 and not r["dedicated"]))
        if pts:
            left.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            right.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
    left.set(xlabel="opponents K", ylabel="forwards/s", title="league throughput")
    right.set(xlabel="opponents K", ylabel="TorchServe RSS (MB)", title="TorchServe memory")
    for ax in (left, right):
        ax.set_xscale("symlog", linthresh=1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
