"""``scripts/bench.py``'s multi-process table (issue 10's workload): actor processes and their driver.

Each actor is a separate process, as RL actors are: it builds one client per system it is
asked about (a ``requests.Session`` posting JSON for stock TorchServe, as its docs do; an
attached ``bray.RemoteModel`` for bray-serve, direct or through the node proxy) and then
calls it synchronously in a loop, one call after the other, with ``rows`` observations per
call, for a given time. The parent drives every actor over a pipe:

- ``("prepare", system, rows)``: build the client (once per system) and warm it up;
  answers ``("ready",)`` or ``("error", message)``;
- ``("run", start_at, duration_s)``: from ``start_at`` (``time.monotonic``, which every
  process on Linux shares) start calls for ``duration_s``; answers ``("done",
  call_seconds, errors, first_error, elapsed_s, proxy)`` (elapsed up to the last answer;
  ``proxy``: actor 0's reading of the node proxy's counters over the run, or ``None``);
- ``("stop",)``.

A system of kind ``torchrl`` is TorchRL's ``InferenceServer`` over its
``ProcessSlotTransport`` (shared-memory slots, one per actor, semaphores; the model in a
thread of this driver process, no HTTP): its slot clients can only be handed to a process
when it starts (they hold multiprocessing locks), so each of its points forks P actors of
its own (:func:`torchrl_actor`) from the same forkserver, which then preloads torch and
tensordict too.

The driver (:func:`measure`) runs every system at each point (P actor processes x rows
observations per call), the systems interleaved so that a burst of load from the other
users of the machine hits them alike, and counts TorchServe's requests per model from its
metrics API (``ts_inference_requests_total``) to give samples per request.

This module imports no torch at the top (actors would each pay ~1 s and ~300 MB for it):
the forkserver preloads it once and forks every actor from there.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests

import bray

OBS, ACTIONS = 64, 16
WARMUP_PROCS = 4


Stats = Callable[[], "dict[str, Any] | None"]


def _client(system: dict[str, Any], index: int = 0) -> tuple[Callable[[np.ndarray], Any], Stats]:
    """The system's call, and its node proxy's counters (``None`` without one).

    A league system (``opponents``: stock URLs or bray model names) alternates, one
    forward a call: the learner, then the next opponent round robin, starting from the
    actor's ``index`` so that the actors spread over the opponents (bench.py's league table).
    """
    if system["kind"] == "stock":
        session = requests.Session()
        headers = system["headers"]

        def stock_call(url: str) -> Callable[[np.ndarray], Any]:
            def stock(obs: np.ndarray) -> Any:
                # json= as TorchServe's examples post; it sends the body as bytes in the same write as
                # the headers (a str body goes in a second write and can wait on a delayed ACK).
                r = session.post(url, json=obs.tolist(), headers=headers, timeout=60)
                r.raise_for_status()
                return np.asarray(r.json(), np.float32)

            return stock

        learner, stats = stock_call(system["url"]), lambda: None
        opponents = [stock_call(url) for url in system.get("opponents", ())]
    else:
        bray.init(**system["locations"])
        options = system.get("options", {})
        rm = bray.RemoteModel(system["name"], **options)
        stats = getattr(rm, "proxy_stats", lambda: None)
        # batch=True explicitly: the observations carry their batch dimension (rows x 64).
        learner = lambda obs: rm(obs, batch=True)  # noqa: E731
        opponents = [(lambda obs, m=bray.RemoteModel(name, **options): m(obs, batch=True))
                     for name in system.get("opponents", ())]
    if not opponents:
        return learner, stats
    turn = 2 * index

    def game(obs: np.ndarray) -> Any:
        nonlocal turn
        turn += 1
        return learner(obs) if turn % 2 else opponents[(turn // 2) % len(opponents)](obs)

    return game, stats


def actor_main(conn: Any, index: int) -> None:
    """Serve the parent's commands until ``("stop",)``."""
    clients: dict[str, tuple[Callable[[np.ndarray], Any], Stats]] = {}
    call: Callable[[np.ndarray], Any] | None = None
    stats: Stats = lambda: None  # noqa: E731
    obs = np.zeros((1, OBS), np.float32)
    rng = np.random.default_rng(index)
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] == "prepare":
            _, system, rows = msg
            try:
                if system["label"] not in clients:
                    clients[system["label"]] = _client(system, index)
                call, stats = clients[system["label"]]
                obs = rng.standard_normal((rows, OBS), dtype=np.float32)
                for _ in range(3):
                    out = call(obs)
                if np.shape(out) != (rows, ACTIONS):
                    raise RuntimeError(f"answer of shape {np.shape(out)} for {rows} observations")
                conn.send(("ready",))
            except Exception as err:  # reported by the parent, which skips the system
                conn.send(("error", f"{type(err).__name__}: {err}"))
            continue
        _, start_at, duration_s = msg
        assert call is not None, "run before prepare"

        def checked(call: Callable[[np.ndarray], Any] = call, obs: np.ndarray = obs) -> None:
            out = call(obs)
            if np.shape(out) != obs.shape[:1] + (ACTIONS,):
                raise RuntimeError(f"answer of shape {np.shape(out)} for {obs.shape[0]} observations")

        # Every actor is warmed up by now (the parent waited for all), none has started.
        before = stats() if index == 0 else None
        times, errors, first_error, elapsed = timed_calls(checked, start_at, duration_s)
        after = stats() if index == 0 else None
        proxy = {k: after[k] - before[k] for k in ("calls", "samples", "requests")} if before and after else None
        conn.send(("done", times, errors, first_error, elapsed, proxy))


def timed_calls(call: Callable[[], Any], start_at: float, duration_s: float) -> tuple[np.ndarray, int, str, float]:
    """``call()`` back to back from ``start_at`` (``time.monotonic``) for ``duration_s``.

    Returns:
        Each answered call's seconds, the failed calls, the first failure, and the
        seconds from ``start_at`` to the last answer.
    """
    times: list[float] = []
    errors, first_error = 0, ""
    time.sleep(max(0.0, start_at - time.monotonic()))
    stop_at = start_at + duration_s
    now = time.monotonic()
    while now < stop_at:
        t0 = time.perf_counter()
        try:
            call()
            times.append(time.perf_counter() - t0)
        except Exception as err:  # counted: a benchmark that hides failures measures nothing
            errors += 1
            first_error = first_error or f"{type(err).__name__}: {err}"
        now = time.monotonic()
    return np.asarray(times, np.float64), errors, first_error, now - start_at


def torchrl_unsupported() -> str:
    """Why TorchRL's ``InferenceServer`` cannot be measured here, or ``""``."""
    try:
        from torchrl.modules.inference_server import InferenceServer, ProcessSlotTransport  # noqa: F401
    except ImportError as err:
        return f"torchrl is not installed ({err}; pip install 'bray-serve[bench]')"
    return ""


def torchrl_actor(client: Any, index: int, rows: int, conn: Any) -> None:
    """One TorchRL actor: warm up, say ready, call from ``start_at`` for ``duration_s``, answer
    as :func:`actor_main` does (no proxy counters)."""
    import torch
    from tensordict import TensorDict

    rng = np.random.default_rng(index)
    obs = TensorDict({"observation": torch.from_numpy(rng.standard_normal((rows, OBS), dtype=np.float32))})
    try:
        for _ in range(3):
            out = client(obs)["action"]
        if tuple(out.shape) != (rows, ACTIONS):
            raise RuntimeError(f"answer of shape {tuple(out.shape)} for {rows} observations")
        conn.send(("ready",))
    except Exception as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    _, start_at, duration_s = conn.recv()
    conn.send(("done", *timed_calls(lambda: client(obs)["action"], start_at, duration_s), None))


class TorchRL:
    """TorchRL's ``InferenceServer`` with a ``ProcessSlotTransport``, serving ``model`` in
    this process (one thread, 1 intra-op thread as bray's workers), for one point at a time."""

    def __init__(self, model: Any, *, max_batch_size: int) -> None:
        self.model, self.max_batch_size = model, max_batch_size
        self.cpu: CpuWindow | None = None  # the machine's CPU over the last point's calls

    def run(self, ctx: Any, procs: int, rows: int, duration_s: float, *, warm: bool = False) -> list[Any]:
        """``procs`` actors forked for this point; their ``("done", ...)`` answers (or ``("error", why)``)."""
        import torch
        from tensordict import TensorDict
        from tensordict.nn import TensorDictModule
        from torchrl.modules.inference_server import InferenceServer, ProcessSlotTransport

        torch.set_num_threads(1)
        policy = TensorDictModule(self.model, in_keys=["observation"], out_keys=["action"])
        transport = ProcessSlotTransport(TensorDict({"observation": torch.zeros(rows, OBS)}),
                                         TensorDict({"action": torch.zeros(rows, ACTIONS)}), num_slots=procs, ctx=ctx)
        clients = [transport.client() for _ in range(procs)]
        with InferenceServer(policy, transport, max_batch_size=self.max_batch_size):
            pipes = [ctx.Pipe() for _ in range(procs)]
            actors = [ctx.Process(target=torchrl_actor, args=(c, i, rows, child), daemon=True)
                      for i, (c, (_, child)) in enumerate(zip(clients, pipes))]
            try:
                for proc in actors:
                    proc.start()
                ready = [parent.recv() if parent.poll(300) else ("error", "no answer in 300 s") for parent, _ in pipes]
                if any(r[0] == "error" for r in ready):
                    return [next(r for r in ready if r[0] == "error")]
                start_at = time.monotonic() + 0.2
                for parent, _ in pipes:
                    parent.send(("run", start_at, duration_s))
                window = CpuWindow(start_at)
                answers = [parent.recv() if parent.poll(duration_s + 120) else ("error", "no answer") for parent, _ in pipes]
                self.cpu = window.close()
                return answers
            finally:
                for proc in actors:
                    proc.join(10)
                    if proc.is_alive():
                        proc.kill()
                        proc.join(5)


class Actors:
    """Up to ``n`` actor processes, started as needed and kept for every point."""

    def __init__(self, *, preload: tuple[str, ...] = ()) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload([__name__, *preload])
        self.procs: list[Any] = []
        self.cpu: CpuWindow | None = None  # the machine's CPU over the last run's calls
        self.conns: list[Any] = []

    def grow(self, n: int) -> None:
        while len(self.procs) < n:
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=actor_main, args=(child, len(self.procs)), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def _answers(self, conns: list[Any], timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        out = []
        for conn in conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"an actor did not answer within {timeout_s} s")
            out.append(conn.recv())
        return out

    def prepare(self, system: dict[str, Any], procs: int, rows: int) -> str:
        """Make the first ``procs`` actors ready to call ``system``; why not, or ``""``."""
        self.grow(procs)
        for conn in self.conns[:procs]:
            conn.send(("prepare", system, rows))
        errors = [a[1] for a in self._answers(self.conns[:procs], 300) if a[0] == "error"]
        return f"{len(errors)} of {procs} actors could not call it: {errors[0]}" if errors else ""

    def run(self, procs: int, duration_s: float) -> list[Any]:
        """Every prepared actor's ``("done", ...)`` answer after ``duration_s`` of calls
        (the machine's CPU over the calls in :attr:`cpu`)."""
        start_at = time.monotonic() + 0.2
        for conn in self.conns[:procs]:
            conn.send(("run", start_at, duration_s))
        window = CpuWindow(start_at)
        answers = self._answers(self.conns[:procs], duration_s + 120)
        self.cpu = window.close()
        return answers

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def busy_cpu_s() -> float:
    """Seconds of CPU the whole machine has spent busy since boot (``psutil.cpu_times``, all
    cores: user, nice, system, irq, softirq and steal time; idle and iowait left out)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


class CpuWindow:
    """The machine's busy CPU from ``start_at`` (``time.monotonic``) to :meth:`close`:
    ``cores`` busy on average, and ``seconds`` in all. Machine-wide: it shows whether a
    point ran out of cores (all of them busy) or waited on something else, and, divided by
    the forwards, what each forward cost every process on the machine together."""

    def __init__(self, start_at: float) -> None:
        time.sleep(max(0.0, start_at - time.monotonic()))
        self._wall, self._busy = time.monotonic(), busy_cpu_s()
        self.cores = self.seconds = float("nan")

    def close(self) -> "CpuWindow":
        self.seconds = busy_cpu_s() - self._busy
        self.cores = self.seconds / max(1e-9, time.monotonic() - self._wall)
        return self


def served_requests(metrics_url: str, name: str) -> float | None:
    """TorchServe's ``ts_inference_requests_total`` for ``name`` (all versions; 0 before the
    first request), or ``None`` when the metrics API does not answer."""
    try:
        text = requests.get(f"{metrics_url}/metrics", params={"name[]": "ts_inference_requests_total"}, timeout=10).text
    except requests.RequestException:
        return None
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("ts_inference_requests_total{") and f'model_name="{name}"' in line]
    return sum(found)


def proxy_unsupported() -> str:
    """Why ``RemoteModel(node_proxy=True)`` cannot be measured here, or ``""``."""
    if "node_proxy" not in inspect.signature(bray.RemoteModel).parameters:
        return "this checkout's RemoteModel has no node_proxy option (issue 10's proxy is not on main yet)"
    return ""


def measure(systems: list[dict[str, Any]], *, procs: tuple[int, ...], rows: tuple[int, ...], duration_s: float,
            metrics_url: str, log: Callable[[str], None] = print, warmup_s: float = 3.0) -> dict[str, Any]:
    """Every system at every point, after ``warmup_s`` of untimed calls to each. A system is a
    dict: label, kind (stock / bray / torchrl), model (its TorchServe name), and what
    :func:`_client` needs (torchrl: ``server``, a :class:`TorchRL`); one with ``skip`` is
    only listed."""
    points: list[dict[str, Any]] = []
    skipped = {s["label"]: s["skip"] for s in systems if s.get("skip")}
    live = [s for s in systems if not s.get("skip")]
    with_torchrl = any(s["kind"] == "torchrl" for s in live)
    actors = Actors(preload=("torch", "tensordict", "torchrl.modules.inference_server") if with_torchrl else ())
    try:
        # TorchServe's JVM compiles its hot paths in the first seconds of load: every
        # system gets the same untimed warm-up, or the first point measures the JIT
        # (measured: a lone caller's median 4.0 ms cold, 2.1-2.6 ms after 2,000 calls).
        for system in live:
            if system["kind"] == "torchrl":
                system["server"].run(actors.ctx, WARMUP_PROCS, 1, warmup_s)
            elif not actors.prepare(system, WARMUP_PROCS, 1):
                actors.run(WARMUP_PROCS, warmup_s)
        for p in procs:
            for r in rows:
                for system in live:
                    if system["label"] in skipped:
                        continue
                    if system["kind"] == "torchrl":  # no TorchServe model: no request count
                        done = system["server"].run(actors.ctx, p, r, duration_s)
                        why = done[0][1] if done and done[0][0] == "error" else ""
                        before = after = None
                    else:
                        why = actors.prepare(system, p, r)
                    if why:
                        skipped[system["label"]] = why
                        log(f"bench: {system['label']}: skipped: {why}")
                        continue
                    if system["kind"] != "torchrl":
                        before = served_requests(metrics_url, system["model"])
                        done = actors.run(p, duration_s)
                        after = served_requests(metrics_url, system["model"])
                    cpu = system["server"].cpu if system["kind"] == "torchrl" else actors.cpu
                    assert cpu is not None  # set by the run that answered
                    times = np.concatenate([d[1] for d in done]) if done else np.zeros(0)
                    calls = int(times.size)
                    sent = (after - before) if before is not None and after is not None else None
                    point = {
                        "system": system["label"], "procs": p, "rows": r, "calls": calls,
                        "calls_per_s": sum(d[1].size / d[4] for d in done),
                        "forwards_per_s": sum(d[1].size / d[4] for d in done) * r,
                        "p50_ms": float(np.median(times) * 1e3) if calls else float("nan"),
                        "p99_ms": float(np.percentile(times, 99) * 1e3) if calls else float("nan"),
                        # Counted between prepare and the last answer: the calls of the run only.
                        "samples_per_request": calls * r / sent if sent else None,
                        "requests": sent, "errors": sum(d[2] for d in done),
                        "first_error": next((d[3] for d in done if d[3]), ""),
                        # The node proxy's own count: a call it did not answer went direct.
                        "proxy": done[0][5] if done else None,
                        "loadavg_1min": os.getloadavg()[0],
                        # The whole machine's CPU during the calls: cores busy, and per forward.
                        "cpu_cores": cpu.cores,
                        "cpu_us_per_forward": cpu.seconds / (calls * r) * 1e6 if calls else float("nan"),
                    }
                    points.append(point)
                    log(f"bench: P={p} x {r} obs, {system['label']}: {point['forwards_per_s']:.0f} forwards/s, "
                        f"median {point['p50_ms']:.2f} ms, p99 {point['p99_ms']:.2f} ms, "
                        f"{point['samples_per_request'] or float('nan'):.1f} samples/request, {point['errors']} errors, "
                        f"machine CPU {point['cpu_cores']:.2f} cores, {point['cpu_us_per_forward']:.0f} µs per forward")
    finally:
        actors.close()
    return {"procs": list(procs), "rows": list(rows), "duration_s": duration_s,
            "systems": [s["label"] for s in systems], "points": points, "skipped": skipped}


def _point(res: dict[str, Any], label: str, p: int, r: int) -> dict[str, Any] | None:
    return next((x for x in res["points"] if x["system"] == label and x["procs"] == p and x["rows"] == r), None)


def markdown(res: dict[str, Any], head: str, stocks: list[str]) -> str:
    """The summary table (forwards/s and ratios against the better stock), then every figure."""
    others = [s for s in res["systems"] if s not in stocks]
    lines = [f"_{head}_", "",
             f"Forwards/s = observations answered per second, all P actor processes together, each calling "
             f"sync `rm(obs)` (or `requests.post` for stock) back to back for {res['duration_s']:g} s. "
             "Stock is the better of its two batch delays at each point. In the second table, calls via the "
             "proxy = the proxy's own count of calls answered during the point (read by one actor at its start and "
             "end) over the calls made, so a fallback to direct HTTP shows; load avg = the 1-minute load average "
             "at the end of the point; machine CPU = the cores the whole machine kept busy during the calls (of "
             f"{os.cpu_count()}), and that CPU over the forwards answered: a point with every core busy ran out of "
             "CPU, one with cores left waited on something else.", "",
             "| P processes x obs/call | stock best | " + " | ".join(others) + " | "
             + " | ".join(f"{o} vs stock" for o in others) + " |",
             "|---|" + "---:|" * (1 + 2 * len(others))]
    for p in res["procs"]:
        for r in res["rows"]:
            st = [x for x in (_point(res, s, p, r) for s in stocks) if x]
            best = max(st, key=lambda x: x["forwards_per_s"]) if st else None
            cells = [f"{best['forwards_per_s']:,.0f} /s, {best['p50_ms']:.1f} ms" if best else "-"]
            ratios = []
            for o in others:
                x = _point(res, o, p, r)
                cells.append(f"{x['forwards_per_s']:,.0f} /s, {x['p50_ms']:.1f} ms" if x else "-")
                ratios.append(f"{x['forwards_per_s'] / best['forwards_per_s']:.1f}x" if x and best else "-")
            lines.append(f"| {p} x {r} | " + " | ".join(cells + ratios) + " |")
    lines += ["", "| P x obs | system | forwards/s | calls/s | median ms | p99 ms | samples per TorchServe request "
              "| calls via the proxy | errors | load avg | machine CPU, cores | CPU µs per forward |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in res["points"]:
        spr = f"{x['samples_per_request']:.1f}" if x["samples_per_request"] else "-"
        via = f"{min(1.0, x['proxy']['calls'] / x['calls']):.0%}" if x.get("proxy") and x["calls"] else "-"
        load = f"{x['loadavg_1min']:.0f}" if "loadavg_1min" in x else "-"
        cores = f"{x['cpu_cores']:.2f}" if "cpu_cores" in x else "-"
        per = f"{x['cpu_us_per_forward']:,.0f}" if "cpu_us_per_forward" in x else "-"
        lines.append(f"| {x['procs']} x {x['rows']} | {x['system']} | {x['forwards_per_s']:,.0f} | {x['calls_per_s']:,.0f} | "
                     f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {spr} | {via} | {x['errors']} | {load} | {cores} | {per} |")
    for label, why in res["skipped"].items():
        lines.append(f"\nNot measured: {label}: {why}.")
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], head: str, stocks: list[str], out: Path) -> str:
    """``bench_procs.md``, ``.json`` and ``.png`` in ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res, head, stocks)
    (out / "bench_procs.md").write_text(md)
    (out / "bench_procs.json").write_text(json.dumps({"meta": head, **res}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib missing; no plot (pip install 'bray-serve[bench]')")
        return md
    fig, axes = plt.subplots(1, len(res["rows"]), figsize=(5.5 * len(res["rows"]), 4), squeeze=False)
    for ax, r in zip(axes[0], res["rows"]):
        for label in res["systems"]:
            xs = [p for p in res["procs"] if _point(res, label, p, r)]
            if xs:
                ax.plot(xs, [_point(res, label, p, r)["forwards_per_s"] for p in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(res["procs"], [str(p) for p in res["procs"]])
        ax.set_xlabel("actor processes (sync calls)")
        ax.set_ylabel("forwards / s")
        ax.set_title(f"{r} observation(s) per call", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Many actor processes: policy MLP, 2 workers, batch 32; one run on 2 shared cores "
                 "(compare systems, not runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "bench_procs.png", dpi=110)
    return md
