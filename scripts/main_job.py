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
- a league: every ``--league-every``-th step is kept as a checkpoint, and each actor's
  environments play half their games against opponents that ``bray.ModelPool`` samples
  among those checkpoints (clones served by TorchServe), recording who won; the
  trainer's updates push the policy towards action 0, and a game is won by the model
  that draws action 0 more often (actions sampled from its softmax) over ``--game-steps``
  shared observations, so old checkpoints lose more often;
- a progress line every few seconds, a report at the end (with the league's win-rate
  table; ``--report-dir`` gets it as ``report.md`` with ``league.png``, win rate by
  opponent step), the server stopped cleanly.

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
LAST_BIAS = "net.4.bias"  # PolicyMLP's output layer


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
    league_every: int
    game_steps: int
    report_dir: Path
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
        p.add_argument("--league-every", type=int, default=0,
                       help="keep every N-th step as a league checkpoint (0: about 40 over the run; each sampled "
                            "checkpoint is a clone served as a weight set of the learner's workers)")
        p.add_argument("--game-steps", type=int, default=8, help="forwards per league game")
        p.add_argument("--report-dir", type=Path, default=Path(__file__).resolve().parent.parent / "results" / "main_job",
                       help="where report.md and league.png go")
        p.add_argument("--max-batch-size", type=int, default=32, help="Bray's max_batch_size")
        p.add_argument("--workdir", type=Path, default=None, help="store, model store and server files (default: a temp dir)")
        p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
        p.add_argument("--no-node-proxy", action="store_true",
                       help="actors call TorchServe directly instead of through the node proxy")
        a = p.parse_args(argv)
        for key in ("duration_s", "publish_every_s"):
            if getattr(a, key) <= 0:
                p.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(a, key)}")
        if a.league_every == 0:
            a.league_every = max(1, round(a.duration_s / a.publish_every_s / 40))
        for key in ("hidden", "actors", "envs", "workers", "archive_every", "league_every", "game_steps"):
            if getattr(a, key) < 1:
                p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(a, key)}")
        workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bray-main-"))
        return cls(a.duration_s, a.hidden, a.engine, a.actors, a.envs, a.workers, a.publish_every_s,
                   a.archive_every, a.league_every, a.game_steps, a.report_dir.resolve(), a.max_batch_size,
                   workdir.resolve(), a.keep or a.workdir is not None, not a.no_node_proxy)


def make_policy(hidden: int) -> Any:
    """The policy network: obs 64 -> hidden -> hidden -> 16 (the one the tests and benchmarks use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.models import PolicyMLP

    return PolicyMLP(OBS, hidden, ACTIONS).eval()


def _init_from_env() -> None:
    import bray

    bray.init()  # BRAY_* variables set by the parent


# The trainer's stand-in for learning: each step raises the last layer's bias of action 0,
# so a newer step gives action 0 a higher probability than an older one.
GOOD_ACTION, DRIFT_PER_STEP = 0, 0.03


def trainer(stop_at: float, every_s: float, league_every: int, out: Any) -> None:
    """Publish perturbed weights at a steady rate (a stand-in for SGD), every N-th step a checkpoint."""
    _init_from_env()
    import bray

    # The publisher's store decides which steps are checkpoints: it needs the interval too.
    rm = bray.RemoteModel(NAME, checkpoint_interval=league_every)
    net = rm.get_model()
    weights = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(0)
    published, wait_s = 0, []
    next_t = time.monotonic()
    while time.monotonic() < stop_at:
        for v in weights.values():
            v += rng.standard_normal(v.shape).astype(v.dtype) * 1e-3
        weights[LAST_BIAS][GOOD_ACTION] += DRIFT_PER_STEP
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


def _draws_good(logits: np.ndarray, rng: np.random.Generator) -> int:
    """1 if an action sampled from the policy's softmax is the good one."""
    z = np.exp(logits - logits.max())
    return int(rng.random() < z[GOOD_ACTION] / z.sum())


def actor(idx: int, stop_at: float, envs: int, out: Any, league_at: float, game_steps: int, node_proxy: bool) -> None:
    """``envs`` environments stepping concurrently; from ``league_at`` on each plays half its
    games against an opponent sampled by ``bray.ModelPool`` and records the result."""
    _init_from_env()
    import bray

    rm = bray.RemoteModel(NAME, node_proxy=node_proxy)  # its clones (weight sets) share its node proxy
    league = bray.ModelPool(rm, clone_workers=1, seed=idx)  # metric="win", explore_rate=0.3
    store = rm.store
    rng = np.random.default_rng(idx)
    lat: list[float] = []
    lags: list[int] = []
    failures = 0
    opp_forwards, games, wins = 0, 0, 0.0
    latest = {"step": rm.step, "t": 0.0}

    def note_lag(step: int) -> None:
        now = time.monotonic()
        if now - latest["t"] > 0.05:
            latest["step"], latest["t"] = store.latest(NAME) or 0, now
        lags.append(max(0, latest["step"] - step))

    async def play_game(obs: np.ndarray) -> np.ndarray:
        """One game against a sampled opponent: both act on the same observations."""
        nonlocal opp_forwards, games, wins
        loop = asyncio.get_running_loop()
        opponent = await loop.run_in_executor(None, league.sample)  # a clone: registered on first use
        mine = theirs = 0
        for _ in range(game_steps):
            t0 = time.perf_counter()
            (logits, step), opp_logits = await asyncio.gather(rm.forward(obs, return_step=True), opponent.forward(obs))
            lat.extend([time.perf_counter() - t0] * 2)
            opp_forwards += 1
            note_lag(step)
            mine, theirs = mine + _draws_good(logits, rng), theirs + _draws_good(opp_logits, rng)
            obs = np.roll(obs, int(np.argmax(logits))) * 0.99 + rng.standard_normal(OBS).astype(np.float32) * 0.1
        value = 1.0 if mine > theirs else 0.5 if mine == theirs else 0.0
        await loop.run_in_executor(None, league.record, opponent, value)  # a durable write: off the loop
        games, wins = games + 1, wins + value
        return obs

    async def env_loop() -> None:
        nonlocal failures
        obs = rng.standard_normal(OBS).astype(np.float32)
        while time.monotonic() < stop_at:
            try:
                if time.monotonic() >= league_at and rng.random() < 0.5:
                    obs = await play_game(obs)
                    continue
                t0 = time.perf_counter()
                logits, step = await rm.forward(obs, return_step=True)  # one observation: Bray's batch=False
            except bray.BrayError as err:
                failures += 1
                print(f"actor {idx}: forward failed: {err}", file=sys.stderr)
                continue
            lat.append(time.perf_counter() - t0)
            note_lag(step)
            action = int(np.argmax(logits))
            obs = np.roll(obs, action) * 0.99 + rng.standard_normal(OBS).astype(np.float32) * 0.1

    async def main() -> None:
        await asyncio.gather(*(env_loop() for _ in range(envs)))

    asyncio.run(main())
    out.put((f"actor{idx}", {"latency_s": lat, "lag": lags, "failures": failures, "games": games, "wins": wins,
                             "opponent_forwards": opp_forwards, "requests": rm.batching_stats()[1],
                             "fallbacks": rm.proxy_fallbacks,
                             "opponent_proxies": [p for c in league.clones() if (p := c.proxy_stats())]}))
    league.close()
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
    from bray.archiver.publish import status, watch_and_publish
    from bray.torchserve.launcher import ServerState
    from bray.torchserve.management import ManagementClient

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
                              max_batch_size=cfg.max_batch_size, num_workers=cfg.workers, checkpoint_interval=cfg.league_every,
                              use_onnx="infer" if cfg.engine == "onnx" else None, node_proxy=cfg.node_proxy)
        print(f"main: {rm!r} exported, archived and serving in {time.monotonic() - t0:.1f} s", flush=True)
        client = ManagementClient(server.management_url, key_file=server.key_file)
        archiver = watch_and_publish(rm.store, NAME, cfg.archive_every, client=client, model_store=model_store,
                                     engine=cfg.engine, workers=1)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        start = time.monotonic() + 2.0  # children need a moment to import
        stop_at = start + cfg.duration_s
        league_at = start + min(5.0, cfg.duration_s / 4)  # a few checkpoints first
        procs = [ctx.Process(target=trainer, args=(stop_at, cfg.publish_every_s, cfg.league_every, out), name="trainer")]
        procs += [ctx.Process(target=actor, args=(i, stop_at, cfg.envs, out, league_at, cfg.game_steps, cfg.node_proxy),
                              name=f"actor{i}") for i in range(cfg.actors)]
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
            if p.is_alive():
                print(f"main: {p.name} did not exit; terminating it", file=sys.stderr)
                p.terminate()
                p.join(timeout=10)
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
    opp_proxies = [p for a in actors for p in a.get("opponent_proxies", [])]
    # Weight-set opponents share the learner's proxy: count each proxy process once.
    proxies = {p["pid"]: p for p in ([proxy] if proxy else []) + opp_proxies}
    via_proxy = sum(p["requests"] for p in proxies.values())
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
        f"- league: {sum(a['games'] for a in actors)} games of {cfg.game_steps} steps ({sum(a['opponent_forwards'] for a in actors)} "
        f"opponent forwards), learner won {sum(a['wins'] for a in actors) / max(1, sum(a['games'] for a in actors)):.0%}; "
        f"checkpoint steps {rm.store.checkpoint_steps(NAME)}",
        f"- versions archived while running: {[v.version for v in archiver.published]}"
        + (f"; archive errors: {[(s, str(e)) for s, e in archiver.errors]}" if archiver.errors else ""),
        "- registered models:",
    ]
    for m in models:
        lines.append(f"  - {m.name}: default {m.default_version}; "
                     + ", ".join(f"{v.version}(step {v.step}, {v.ready_workers}/{v.workers} ready)" for v in m.versions))
    standings = read_league(rm.store.root, NAME)
    table = ["### League: the learner's win rate by opponent (bray.league.read_league)", "",
             "| opponent | checkpoint step | games | win rate | recent (half-life 300 s) |", "|---|---:|---:|---:|---:|"]
    table += [f"| {s.opponent} | {s.step} | {s.games} | {s.mean:.2f} | {s.recent:.2f} |" for s in standings]
    text = "\n".join(line for line in lines if line) + "\n\n" + "\n".join(table)
    print(text, flush=True)
    cfg.report_dir.mkdir(parents=True, exist_ok=True)
    (cfg.report_dir / "report.md").write_text(text.lstrip() + "\n")
    png = plot_league(standings, cfg.report_dir / "league.png")
    print(f"\nmain: report in {cfg.report_dir / 'report.md'}" + (f", plot {png}" if png else ""), flush=True)
    ok = forwards > 0 and failures == 0 and trainer.get("published", 0) > 0 and len(actors) == cfg.actors
    print(f"\nmain: {'OK' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def read_league(root: Path, name: str) -> list[Any]:
    from bray.league import read_league as read

    return read(root, name)


def plot_league(standings: list[Any], path: Path) -> Path | None:
    """Win rate by opponent checkpoint step (marker area ~ games played); None without matplotlib."""
    if not standings:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        print(f"main: no plot ({err}; pip install 'bray-serve[bench]')", file=sys.stderr)
        return None
    steps = [s.step for s in standings]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(steps, [s.mean for s in standings], "-", color="tab:blue", alpha=0.5)
    ax.scatter(steps, [s.mean for s in standings], s=[min(400, 10 + 2 * s.games) for s in standings], color="tab:blue",
               label="win rate (marker area: games)")
    ax.plot(steps, [s.recent for s in standings], "x--", color="tab:orange", label="recent (half-life 300 s)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("opponent checkpoint step")
    ax.set_ylabel("learner's win rate")
    ax.set_title("main job league: win rate by opponent step")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
