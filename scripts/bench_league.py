"""``scripts/bench.py``'s league table (issue 23): opponents, TorchServe's memory, and the writer.

The workload: actor *processes* (``bench_procs.py``'s, 8 by default) play a league on one
TorchServe: each game step calls the learner and then one of K opponents round robin, one
observation a call (``bench_procs._client`` with ``opponents``). The systems, each at every
K it fits:

- bray-serve with default settings: opponents cloned with ``rm.clone(step)``, weight sets
  of the learner's workers, called through the node proxy;
- the same clones with ``node_proxy=False`` (direct HTTP from every actor);
- bray-serve dedicated clones (``clone(..., dedicated=True)``: a TorchServe model with
  the learner's workers each), at small K;
- stock TorchServe with a registered version per opponent (``torch-model-archiver`` +
  ``POST /models``, each version with workers of its own), called at
  ``/predictions/<name>/<version>``, as far as its memory allows.

Per point: forwards/s, TorchServe's memory (RSS of the frontend and every worker) and
process count, the node proxies' memory, and an opponent's creation to its first answer
(median). ``bench.py``'s ``league_table`` drives it; this module holds what it needs.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil

DEFAULT = "bray default (weight sets, node proxy)"
DIRECT = "bray direct (weight sets, node_proxy=False)"
DEDICATED = "bray dedicated clones (node proxy)"
STOCK = "stock TorchServe (a version per opponent)"
SYSTEMS = (DEFAULT, DIRECT, DEDICATED, STOCK)

#: An opponent made: its handle for the actors (a bray model name or a stock URL), and the
#: seconds from asking for it to its first answer.
Made = tuple[str, float]


def server_memory(pid: int) -> tuple[float, int]:
    """(RSS in MB of the TorchServe frontend ``pid`` and all its descendants, how many processes)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:  # a worker gone between the listing and the reading
            pass
    return total / 2**20, len(procs)


def node_proxies(store_root: Path) -> list[psutil.Process]:
    """The node proxies serving models of the store ``store_root`` (started by this benchmark's processes)."""
    root = str(Path(store_root).resolve())
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "bray.bridge.proxy" in (p.info["cmdline"] or []) and p.environ().get("BRAY_STORE", "").startswith(root):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def memory(server_pid: int, store_root: Path) -> dict[str, Any]:
    """TorchServe's memory and processes, and the node proxies' (outside TorchServe, counted apart)."""
    mb, procs = server_memory(server_pid)
    proxy_mb = 0.0
    proxies = node_proxies(store_root)
    for p in proxies:
        try:
            proxy_mb += p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return {"torchserve_mb": round(mb), "processes": procs, "proxy_mb": round(proxy_mb), "proxies": len(proxies)}


def grow(opponents: list[str], k: int, make: Callable[[int], Made], *, server_pid: int,
         cap_mb: float) -> tuple[list[float], str]:
    """Make opponents until there are ``k``, unless the next would take TorchServe past ``cap_mb``.

    The next opponent's cost is guessed as the largest growth one has caused so far (none
    before the first). Returns the seconds each new opponent took to its first answer, and
    why it stopped short (``""`` when it did not).
    """
    took: list[float] = []
    growth = 0.0
    while len(opponents) < k:
        before, _ = server_memory(server_pid)
        if before + growth > cap_mb:
            return took, (f"stopped at {len(opponents)} opponents: TorchServe held {before:,.0f} MB and the next "
                          f"would add about {growth:,.0f} MB, past the {cap_mb:,.0f} MB cap")
        handle, seconds = make(len(opponents))
        opponents.append(handle)
        took.append(seconds)
        growth = max(growth, server_memory(server_pid)[0] - before)
    return took, ""


def bray_opponent(learner: Any, steps: list[int], *, dedicated: bool, prefix: str) -> Callable[[int], Made]:
    """Opponent ``i``: ``learner.clone(step, name=...)`` from the kept ``steps`` round robin, called once."""

    def make(i: int) -> Made:
        started = time.perf_counter()
        opp = learner.clone(step=steps[i % len(steps)], name=f"{prefix}{i}", dedicated=dedicated)
        opp(np.zeros((1, 64), np.float32))
        seconds = time.perf_counter() - started
        opp.close()  # the actors attach by name; the server keeps serving it
        return opp.name, seconds

    return make


def points(measured: dict[str, Any], *, k: int, made_s: list[float], mem: dict[str, Any]) -> list[dict[str, Any]]:
    """``bench_procs.measure``'s points at one K, with the memory read after them and the opponents' creation."""
    out = []
    for p in measured["points"]:
        via = p["proxy"]["calls"] / p["calls"] if p.get("proxy") and p["calls"] else None
        out.append({"k": k, "system": p["system"], "actors": p["procs"], "forwards_per_s": p["forwards_per_s"],
                    "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"], "errors": p["errors"], "first_error": p["first_error"],
                    "samples_per_request": p["samples_per_request"], "calls_via_proxy": via,
                    "made": len(made_s),
                    "clone_to_answer_ms": statistics.median(made_s) * 1e3 if made_s else None,
                    "loadavg_1min": p["loadavg_1min"], **mem})
    for label, why in measured["skipped"].items():
        out.append({"k": k, "system": label, "skipped": why})
    return out


def _at(res: dict[str, Any], system: str, k: int) -> dict[str, Any] | None:
    return next((p for p in res["points"] if p["system"] == system and p["k"] == k and "skipped" not in p), None)


def goals(res: dict[str, Any]) -> list[str]:
    """Issue 23's goals, read from the default system's points (reported, not asserted)."""
    base, at64 = _at(res, DEFAULT, 0), _at(res, DEFAULT, 64)
    lines = []
    if base and at64:
        fps, mem = at64["forwards_per_s"] / base["forwards_per_s"], at64["torchserve_mb"] / base["torchserve_mb"]
        lines.append(f"- 64 opponents, forwards/s at least 0.9x the learner alone: {fps:.2f}x "
                     f"({'met' if fps >= 0.9 else 'not met'}).")
        lines.append(f"- 64 opponents, TorchServe memory at most 1.5x the learner alone: {mem:.2f}x "
                     f"({'met' if mem <= 1.5 else 'not met'}).")
    else:
        lines.append("- 64 opponents against the learner alone: not measured in this run (K=0 and K=64 needed).")
    clones = [p["clone_to_answer_ms"] for p in res["points"]
              if p["system"] == DEFAULT and p.get("clone_to_answer_ms") is not None]
    if clones:
        worst = max(clones)
        lines.append(f"- a clone answering within 50 ms of `clone()`: medians {', '.join(f'{c:.1f}' for c in clones)} ms "
                     f"({'met' if worst <= 50 else 'not met'}).")
    return lines


def markdown(res: dict[str, Any], head: str) -> str:
    """The table (one row per K and system, ratios to the same system's K=0), the goals, the notes."""
    lines = [f"_{head}_", "",
             f"{res['actors']} actor processes, each game step the learner then one of K opponents round robin, one "
             f"observation a call, sync, for {res['duration_s']:g} s a point after an untimed warm-up. Forwards/s: "
             "every answer (learner's and opponents'), all actors together. TorchServe memory: RSS of its frontend and "
             "every worker, read after the point; processes: TorchServe's (frontend + workers); node proxies: the "
             "proxy processes of this store, outside TorchServe, counted apart. Opponent to first answer: median, from "
             "`clone()` (or stock's archive + register) to the new opponent's first answer, over the opponents added "
             "for that K. Calls via proxy: the learner's node proxy's own count of calls answered over the calls made (weight-set "
             "clones share it; dedicated clones have proxies of their own, so there it is the learner's half). Default "
             "and direct call the same clones on the same server, interleaved.", "",
             "| K | system | forwards/s | vs K=0 | TorchServe RSS | vs K=0 | processes | node proxies | "
             "opponent to first answer | median call ms | calls via proxy | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for system in SYSTEMS:
        base = _at(res, system, 0) or (_at(res, DEFAULT, 0) if system == DEDICATED else None)
        for p in sorted((p for p in res["points"] if p["system"] == system), key=lambda p: p["k"]):
            if "skipped" in p:
                lines.append(f"| {p['k']} | {system} | skipped: {p['skipped']} |" + " |" * 9)
                continue
            fps_ratio = f"{p['forwards_per_s'] / base['forwards_per_s']:.2f}x" if base and p["k"] else ""
            mem_ratio = f"{p['torchserve_mb'] / base['torchserve_mb']:.2f}x" if base and p["k"] else ""
            made = f"{p['clone_to_answer_ms']:,.1f} ms ({p['made']})" if p.get("clone_to_answer_ms") is not None else ""
            via = f"{min(1.0, p['calls_via_proxy']):.0%}" if p.get("calls_via_proxy") is not None else "-"
            lines.append(f"| {p['k']} | {system} | {p['forwards_per_s']:,.0f} | {fps_ratio} | {p['torchserve_mb']:,} MB "
                         f"| {mem_ratio} | {p['processes']} | {p['proxies']}, {p['proxy_mb']:,} MB | {made} | "
                         f"{p['p50_ms']:.2f} | {via} | {p['errors']} |")
    lines += ["", "Goals (issue 23; on the default system):", *goals(res)]
    for note in res["notes"]:
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """Forwards/s and TorchServe's memory against K, one line per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib missing; no plot (pip install 'bray-serve[bench]')")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for system, style in zip(SYSTEMS, ("o-", "^-", "s--", "D:")):
        pts = sorted(((p["k"], p["forwards_per_s"], p["torchserve_mb"]) for p in res["points"]
                      if p["system"] == system and "skipped" not in p))
        if pts:
            left.plot([p[0] for p in pts], [p[1] for p in pts], style, label=system)
            right.plot([p[0] for p in pts], [p[2] for p in pts], style, label=system)
    left.set(xlabel="opponents K", ylabel="forwards/s", title=f"league, {res['actors']} actor processes")
    right.set(xlabel="opponents K", ylabel="TorchServe RSS (MB)", title="TorchServe memory (frontend + workers)")
    for ax in (left, right):
        ax.set_xscale("symlog", linthresh=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("A league on one TorchServe: policy MLP, learner 2 workers, batch 32; one run on 2 shared cores",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(res: dict[str, Any], head: str, out: Path) -> str:
    """``bench_league.md``, ``.json`` and ``.png`` in ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res, head)
    (out / "bench_league.md").write_text(md)
    (out / "bench_league.json").write_text(json.dumps({"meta": head, **res}, indent=1))
    plot(res, out / "bench_league.png")
    return md
