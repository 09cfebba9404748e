"""The main job: an RL-shaped loop on a real TorchServe started from the bundled config.

- a TorchServe instance from ``ts_config/config.properties`` (token auth on, loopback),
  started and stopped with ``bray-archive server start|stop`` as a user would;
- the policy (an MLP, obs 64 -> hidden -> hidden -> 16) created as ``bray.RemoteModel``:
  exported, archived, registered, served by ``--workers`` workers;
- a trainer *process* publishing new weights every ``--publish-every-s`` seconds;
- ``--actors`` actor *processes*, each with ``--envs`` environments calling ``forward``
  concurrently (client-side batching coalesces them), measuring latency and policy lag
  (latest published step minus the step that answered);
- every ``--archive-every``-th step archived and registered as a TorchServe version;
- actor 0 plays half its games against a clone of an older step (league play);
- a progress line every few seconds, a report at the end, the server stopped cleanly.

Run it through ``bash scripts/run_main.sh`` (which sets the machine up first), or
``.venv/bin/python scripts/main_job.py --help``. Exit status 0 only if every forward was
answered and the trainer's steps reached the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NAME = "policy"
OBS, ACTIONS = 64, 16


@dataclass(frozen=True)
class JobConfig:
    duration_s: float
    hidden: int
    engine: str
    actors: int
    envs: int
    workers: int
    publish_every_s: float
    archive_every: int
    max_batch_size: int
    workdir: Path
    keep: bool
    node_proxy: bool = True

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "JobConfig":
        p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--duration-s", type=float, default=60.0, help="how long the actors play")
        p.add_argument("--hidden", type=int, default=256, help="hidden width of the policy MLP (model size)")
        p.add_argument("--engine", choices=["torch", "onnx"], default="torch", help="serving engine")
        p.add_argument("--actors", type=int, default=3, help="actor processes")
        p.add_argument("--envs", type=int, default=16, help="concurrent environments per actor")
        p.add_argument("--workers", type=int, default=2, help="TorchServe workers for the policy")
        p.add_argument("--publish-every-s", type=float, default=0.5, help="trainer publish period")
        p.add_argument("--archive-every", type=int, default=10, help="archive every N-th step as a version")
        p.add_argument("--max-batch-size", type=int, default=32, help="Bray's max_batch_size")
        p.add_argument("--workdir", type=Path, default=None, help="store, model store and server files (default: a temp dir)")
        p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
        p.add_argument("--no-node-proxy", action="store_true",
                       help="actors call TorchServe directly instead of through the node proxy")
        a = p.parse_args(argv)
        for key in ("duration_s", "publish_every_s"):
            if getattr(a, key) <= 0:
                p.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(a, key)}")
        for key in ("hidden", "actors", "envs", "workers", "archive_every"):
            if getattr(a, key) < 1:
                p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(a, key)}")
        workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bray-main-"))
        return cls(a.duration_s, a.hidden, a.engine, a.actors, a.envs, a.workers, a.publish_every_s,
                   a.archive_every, a.max_batch_size, workdir.resolve(), a.keep or a.workdir is not None,
                   not a.no_node_proxy)


def make_policy(hidden: int) -> Any:
    """The policy network: obs 64 -> hidden -> hidden -> 16 (the one the tests and benchmarks use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.models import PolicyMLP

    return PolicyMLP(OBS, hidden, ACTIONS).eval()


def _init_from_env() -> None:
    import bray

    bray.init()  # BRAY_* variables set by the parent


def trainer(stop_at: float, every_s: float, out: Any) -> None:
    """Publish perturbed weights at a steady rate (a stand-in for SGD)."""
    _init_from_env()
    import bray

    rm = bray.RemoteModel(NAME)
    net = rm.get_model()
    weights = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(0)
    published, wait_s = 0, []
    next_t = time.monotonic()
    while time.monotonic() < stop_at:
        for v in weights.values():
            v += rng.standard_normal(v.shape).astype(v.dtype) * 1e-3
        t0 = time.perf_counter()
        handle = rm.publish_weights(weights)
        try:
            handle.wait(timeout_s=10.0)
            wait_s.append(time.perf_counter() - t0)  # publish call included
        except bray.BrayError as err:
            print(f"trainer: step {int(handle)} not served in time: {err}", file=sys.stderr)
        published += 1
        next_t += every_s
        time.sleep(max(0.0, next_t - time.monotonic()))
    out.put(("trainer", {"published": published, "last_step": rm.step, "served_wait_s": wait_s}))
    rm.close()


def actor(idx: int, stop_at: float, envs: int, out: Any, league_after_s: float, node_proxy: bool) -> None:
    """``envs`` environments stepping concurrently; actor 0 also plays a clone."""
    _init_from_env()
    import bray

    rm = bray.RemoteModel(NAME, node_proxy=node_proxy)  # a clone of it gets its own node proxy
    store = rm.store
    rng = np.random.default_rng(idx)
    lat: list[float] = []
    lags: list[int] = []
    failures = 0
    opponent = None
    opp_forwards = 0
    latest = {"step": rm.step, "t": 0.0}

    async def env_loop() -> None:
        nonlocal failures, opp_forwards
        obs = rng.standard_normal(OBS).astype(np.float32)
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                use_opp = opponent is not None and rng.random() < 0.5
                model = opponent if use_opp else rm
                logits, step = await model.forward(obs, batch=False, return_step=True)
            except bray.BrayError as err:
                failures += 1
                print(f"actor {idx}: forward failed: {err}", file=sys.stderr)
                continue
            lat.append(time.perf_counter() - t0)
            if use_opp:
                opp_forwards += 1
            else:
                now = time.monotonic()
                if now - latest["t"] > 0.05:
                    latest["step"], latest["t"] = store.latest(NAME) or 0, now
                lags.append(max(0, latest["step"] - step))
            action = int(np.argmax(logits))
            obs = np.roll(obs, action) * 0.99 + rng.standard_normal(OBS).astype(np.float32) * 0.1

    async def league() -> None:
        nonlocal opponent
        await asyncio.sleep(league_after_s)
        if time.monotonic() < stop_at - 5:
            old = max(0, rm.step // 2)
            loop = asyncio.get_running_loop()
            opponent = await loop.run_in_executor(None, lambda: rm.clone(step=old))
            print(f"actor {idx}: playing against {opponent.name} (step {opponent.step})", flush=True)

    async def main() -> None:
        tasks = [env_loop() for _ in range(envs)]
        if idx == 0:
            tasks.append(league())
        await asyncio.gather(*tasks)

    asyncio.run(main())
    out.put((f"actor{idx}", {"latency_s": lat, "lag": lags, "failures": failures,
                             "opponent": opponent.name if opponent else None, "opponent_forwards": opp_forwards,
                             "requests": rm.batching_stats()[1], "fallbacks": rm.proxy_fallbacks,
                             "opponent_proxy": opponent.proxy_stats() if opponent else None}))
    if opponent is not None:
        opponent.close()
    rm.close()


def bray_archive(*argv: str) -> None:
    """Run this interpreter's ``bray-archive`` (``python -m bray.archiver``); a failure ends the job with its line."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "bray.archiver", *argv], text=True, stdout=subprocess.PIPE,
                          timeout=600)
    print("\n".join(f"main: {line}" for line in done.stdout.splitlines()), flush=True)
    if done.returncode != 0:  # its own one-line reason is already on stderr
        raise SystemExit(done.returncode)


def main(argv: list[str] | None = None) -> int:
    cfg = JobConfig.from_args(argv)
    import torch

    import bray
    from bray.archiver.management import ManagementClient
    from bray.archiver.publish import status, watch_and_publish
    from bray.ts_config.server import ServerState

    print(f"main: work directory {cfg.workdir}", flush=True)
    store_dir, model_store = cfg.workdir / "store", cfg.workdir / "model_store"
    t0 = time.monotonic()
    # Started the way a user starts one (bray-archive server start), on free ports beside others.
    bray_archive("server", "start", "--workdir", str(cfg.workdir / "server"), "--model-store", str(model_store),
                 "--any-ports")
    server = ServerState.read(cfg.workdir / "server")
    assert server is not None
    print(f"main: TorchServe up in {time.monotonic() - t0:.1f} s at {server.inference_url} "
          f"(management {server.management_url}, key file {server.key_file})", flush=True)
    env = {"BRAY_STORE": str(store_dir), "BRAY_MODEL_STORE": str(model_store), "BRAY_INFERENCE_URL": server.inference_url,
           "BRAY_MANAGEMENT_URL": server.management_url, "BRAY_KEY_FILE": str(server.key_file)}
    os.environ.update(env)
    archiver = None
    rc = 1
    try:
        bray.init()
        t0 = time.monotonic()
        rm = bray.RemoteModel(NAME, model=make_policy(cfg.hidden), forward_args=(torch.zeros(cfg.max_batch_size or 1, OBS),),
                              max_batch_size=cfg.max_batch_size, num_workers=cfg.workers, checkpoint_interval=cfg.archive_every,
                              use_onnx="infer" if cfg.engine == "onnx" else None, node_proxy=cfg.node_proxy)
        print(f"main: {rm!r} exported, archived and serving in {time.monotonic() - t0:.1f} s", flush=True)
        client = ManagementClient(server.management_url, key_file=server.key_file)
        archiver = watch_and_publish(rm.store, NAME, cfg.archive_every, client=client, model_store=model_store,
                                     engine=cfg.engine, workers=1)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        start = time.monotonic() + 2.0  # children need a moment to import
        stop_at = start + cfg.duration_s
        procs = [ctx.Process(target=trainer, args=(stop_at, cfg.publish_every_s, out), name="trainer")]
        procs += [ctx.Process(target=actor, args=(i, stop_at, cfg.envs, out, cfg.duration_s / 3, cfg.node_proxy), name=f"actor{i}")
                  for i in range(cfg.actors)]
        for p in procs:
            p.start()
        results: dict[str, Any] = {}
        while len(results) < len(procs):
            try:
                key, value = out.get(timeout=5.0)
                results[key] = value
            except Exception:
                left = max(0.0, stop_at - time.monotonic())
                print(f"main: t={time.monotonic() - start:5.1f}s step={rm.step} versions={len(archiver.published)} "
                      f"({left:.0f} s left)", flush=True)
                if time.monotonic() > stop_at + 120:
                    print("main: children did not report within 2 minutes of the end", file=sys.stderr)
                    break
        for p in procs:
            p.join(timeout=30)
        archiver.stop()
        rc = report(cfg, rm, results, archiver, status(client=client, model_store=model_store, store=rm.store))
        rm.close()
        client.close()
    finally:
        if archiver is not None:
            archiver.stop()
        t0 = time.monotonic()
        bray_archive("server", "stop", "--workdir", str(cfg.workdir / "server"))
        print(f"main: TorchServe stopped in {time.monotonic() - t0:.1f} s", flush=True)
        if not cfg.keep:
            shutil.rmtree(cfg.workdir, ignore_errors=True)
    return rc


def report(cfg: JobConfig, rm: Any, results: dict[str, Any], archiver: Any, models: list[Any]) -> int:
    actors = [v for k, v in results.items() if k.startswith("actor")]
    lat = np.array([x for a in actors for x in a["latency_s"]]) * 1e3
    lag = np.array([x for a in actors for x in a["lag"]])
    failures = sum(a["failures"] for a in actors)
    proxy = rm.proxy_stats()  # the node proxy's counters over every actor process
    opp_proxies = [a["opponent_proxy"] for a in actors if a.get("opponent_proxy")]
    via_proxy = (proxy["requests"] if proxy else 0) + sum(p["requests"] for p in opp_proxies)
    requests = sum(a["requests"] for a in actors) + via_proxy
    fallbacks = sum(a.get("fallbacks", 0) for a in actors)
    trainer = results.get("trainer", {})
    served = np.array(trainer.get("served_wait_s", [])) * 1e3
    forwards = int(lat.size)
    lines = [
        "",
        "## bray-serve main job",
        "",
        f"- {cfg.actors} actor processes x {cfg.envs} envs, {cfg.workers} TorchServe workers, engine {cfg.engine}, "
        f"MLP hidden {cfg.hidden}, {cfg.duration_s:.0f} s",
        f"- steps published: {trainer.get('published', 0)} (last step {trainer.get('last_step')})",
        f"- forwards served: {forwards} ({forwards / cfg.duration_s:.0f}/s) in {requests} HTTP requests "
        f"(x{forwards / max(1, requests):.1f} samples per request); failed: {failures}",
        (f"- node proxy (pid {proxy['pid']}): {proxy['calls']} calls of {cfg.actors} actor processes "
         f"({proxy['clients_seen']} connections), {proxy['samples']} samples in {proxy['requests']} TorchServe requests: "
         f"x{proxy['samples'] / max(1, proxy['requests']):.1f} samples per request across processes; "
         f"{fallbacks} calls sent directly while it was away" if proxy else
         "- node proxy: off (--no-node-proxy)" if not cfg.node_proxy else "- node proxy: not reachable at the end"),
        f"- latency ms: p50 {np.percentile(lat, 50):.2f}, p90 {np.percentile(lat, 90):.2f}, p99 {np.percentile(lat, 99):.2f}"
        if forwards else "- latency: no forwards",
        f"- policy lag seen by actors (steps): mean {lag.mean():.2f}, max {int(lag.max())}" if lag.size else "- policy lag: n/a",
        f"- publish -> served on every worker ms: median {np.median(served):.1f}, max {served.max():.1f}" if served.size else "",
        f"- league: {[(a['opponent'], a['opponent_forwards']) for a in actors if a['opponent']]}",
        f"- versions archived while running: {[v.version for v in archiver.published]}"
        + (f"; archive errors: {[(s, str(e)) for s, e in archiver.errors]}" if archiver.errors else ""),
        "- registered models:",
    ]
    for m in models:
        lines.append(f"  - {m.name}: default {m.default_version}; "
                     + ", ".join(f"{v.version}(step {v.step}, {v.ready_workers}/{v.workers} ready)" for v in m.versions))
    print("\n".join(line for line in lines if line), flush=True)
    ok = forwards > 0 and failures == 0 and trainer.get("published", 0) > 0 and len(actors) == cfg.actors
    print(f"\nmain: {'OK' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
