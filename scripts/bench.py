"""bray-serve against stock TorchServe, in one run, on one server, as ratios.

Stock TorchServe as its docs teach it: a ``BaseHandler`` subclass taking JSON, the
model archived with the ``torch-model-archiver`` CLI from ``model.py`` + ``torch.save``
weights, new weights served by archiving a new version, registering it
(``POST /models``) and making it the default (``PUT .../set-default``).

bray-serve: ``bray.RemoteModel`` (binary wire format, client-side batching, weights
hot-reloaded from the store), torch and onnx engines.

Both serve the policy MLP (obs 64 -> 256 -> 256 -> 16) with 2 workers, TorchServe batch 32.

The single-process table (``--tables single``): single-caller latency, forwards/s with 1,
16 and 64 concurrent callers (asyncio coroutines in this process, one sample per
forward), time from new weights to served on every worker, and local mode against
calling the module directly. Writes ``results/bench.md``, ``.json`` and ``.png``.

The multi-process table (``--tables procs``, issue 10): P actor *processes* (1, 4, 16,
64) each calling sync ``rm(obs)`` with 1 or 16 observations back to back, against stock
TorchServe at max_batch_delay 0 and 5 ms, bray-serve direct (``RemoteModel``) and
bray-serve through the node proxy (``RemoteModel(node_proxy=True)``, skipped with the
reason where this checkout has none): forwards/s, median and p99 call time, samples per
TorchServe request. Writes ``results/bench_procs.md``, ``.json`` and ``.png``
(``scripts/bench_procs.py`` holds the actors and the table).

The league table (``--tables league``, issue 23): 8 actor processes, each game step calling
the learner and then one of K opponents (0, 8, 64, 256) round robin, one observation a
call: bray-serve's clones as weight sets with default settings (node proxy) and with
``node_proxy=False``, bray's dedicated clones at K=8, and stock TorchServe with a version
per opponent up to K=8 or an 8 GB cap: forwards/s, TorchServe's memory and processes, an
opponent's creation to its first answer. Writes ``results/bench_league.md``, ``.json`` and
``.png`` (``scripts/bench_league.py`` holds the opponents, the memory reading and the table).

    .venv/bin/python scripts/bench.py [--quick] [--tables single,procs,league] [--duration-s 5] [--out results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

OBS, HIDDEN, ACTIONS = 64, 256, 16
WORKERS = 2
BATCH, DELAY_MS = 32, 5
CALLERS = (1, 16, 64)

STOCK_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Policy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 16))

        def forward(self, obs):
            return self.net(obs)
    """
)

# The docs' custom-handler pattern: JSON in, tensors batched in preprocess, lists out.
STOCK_HANDLER = textwrap.dedent(
    """
    import json

    import torch
    from ts.torch_handler.base_handler import BaseHandler


    class PolicyHandler(BaseHandler):
        def preprocess(self, data):
            rows = []
            for row in data:
                body = row.get("data") or row.get("body")
                if isinstance(body, (bytes, bytearray)):
                    body = json.loads(body)
                rows.append(torch.tensor(body, dtype=torch.float32))
            self._sizes = [r.shape[0] for r in rows]
            return torch.cat(rows)

        def inference(self, data, *args, **kwargs):
            with torch.inference_mode():
                return self.model(data)

        def postprocess(self, data):
            return [part.tolist() for part in torch.split(data, self._sizes)]
    """
)


def policy() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.models import PolicyMLP

    return PolicyMLP(OBS, HIDDEN, ACTIONS).eval()


async def rate(call: Callable[[], Awaitable[Any]], callers: int, duration_s: float) -> float:
    """Forwards per second with ``callers`` coroutines looping on ``call`` for ``duration_s``."""
    count = 0
    stop = time.perf_counter() + duration_s

    async def loop() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await call()
            count += 1

    for _ in range(3):  # warm-up
        await call()
    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(callers)))
    return count / (time.perf_counter() - t0)


async def latency_ms(call: Callable[[], Awaitable[Any]], n: int) -> float:
    for _ in range(10):
        await call()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


class Stock:
    """The policy served the way TorchServe's docs teach."""

    def __init__(self, server: Any, work: Path, model: Any, *, name: str = "policy_stock",
                 max_batch_delay_ms: int = DELAY_MS) -> None:
        self.server, self.work, self.name, self.delay_ms = server, work, name, max_batch_delay_ms
        (work / "model.py").write_text(STOCK_MODEL)
        (work / "handler.py").write_text(STOCK_HANDLER)
        self.version = 0
        self.session: Any = None
        self.obs = np.random.default_rng(0).standard_normal((1, OBS)).astype(np.float32).tolist()
        self.deploy(model.state_dict())

    def deploy(self, state_dict: Any) -> float:
        """torch.save -> torch-model-archiver CLI -> POST /models -> set-default -> answered. Seconds."""
        import requests

        t0 = time.perf_counter()
        version = self.register(state_dict)
        mgmt, headers = self.server.management_url, self.server.headers("management")
        requests.put(f"{mgmt}/models/{self.name}/{version}/set-default", headers=headers).raise_for_status()
        r = requests.post(f"{self.server.inference_url}/predictions/{self.name}", json=self.obs, headers=self.server.headers("inference"))
        r.raise_for_status()
        took = time.perf_counter() - t0
        if self.version > 1:  # not timed: free the old version's workers
            requests.delete(f"{mgmt}/models/{self.name}/{self.version - 1}", headers=headers)
        return took

    def add_version(self, state_dict: Any) -> tuple[str, float]:
        """A league opponent: a new version beside the others (its own workers), not the default.
        Its URL, and the seconds from torch.save to its first answer."""
        import requests

        t0 = time.perf_counter()
        url = f"{self.server.inference_url}/predictions/{self.name}/{self.register(state_dict)}"
        requests.post(url, json=self.obs, headers=self.server.headers("inference")).raise_for_status()
        return url, time.perf_counter() - t0

    def register(self, state_dict: Any) -> str:
        """torch.save -> torch-model-archiver CLI -> POST /models (synchronous); the new version."""
        import requests
        import torch

        self.version += 1
        weights = self.work / "weights.pt"
        torch.save(state_dict, weights)
        subprocess.run(
            [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", self.name, "--version", str(self.version),
             "--model-file", str(self.work / "model.py"), "--serialized-file", str(weights), "--handler", str(self.work / "handler.py"),
             "--export-path", str(self.server.model_store), "-f"],
            check=True, capture_output=True,
        )
        mar = f"{self.name}-v{self.version}.mar"
        (self.server.model_store / f"{self.name}.mar").rename(self.server.model_store / mar)
        r = requests.post(f"{self.server.management_url}/models", headers=self.server.headers("management"), params={
            "url": mar, "initial_workers": WORKERS, "batch_size": BATCH, "max_batch_delay": self.delay_ms, "synchronous": "true"})
        r.raise_for_status()
        return str(self.version)

    async def forward(self) -> Any:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128))
        async with self.session.post(f"{self.server.inference_url}/predictions/{self.name}", json=self.obs,
                                     headers=self.server.headers("inference")) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)


def single_process(args: argparse.Namespace, server: Any, work: Path, model: Any, stock: Stock) -> dict[str, Any]:
    """The single-process table: coroutine callers, publish to served, local mode."""
    import torch

    import bray

    results: dict[str, Any] = {"callers": list(CALLERS)}
    obs = np.random.default_rng(0).standard_normal(OBS).astype(np.float32)
    example = (torch.zeros(BATCH, OBS),)
    systems: dict[str, Any] = {}
    systems["stock TorchServe (JSON, 32/5 ms)"] = stock.forward
    for label, kwargs in [
        ("bray torch (32/5 ms)", dict(max_batch_delay_ms=DELAY_MS)),
        ("bray torch (32/0 ms)", dict(max_batch_delay_ms=0)),
        ("bray torch, no client batching (32/0 ms)", dict(max_batch_delay_ms=0, client_batching=False)),
        ("bray onnx (32/0 ms)", dict(max_batch_delay_ms=0, use_onnx="infer")),
    ]:
        print(f"bench: deploying {label}", flush=True)
        name = "policy_" + label.split()[1].rstrip(",") + ("_d5" if "5 ms" in label else "") + ("_nocb" if "no client" in label else "")
        rm = bray.RemoteModel(name, model=model, forward_args=example, max_batch_size=BATCH, num_workers=WORKERS,
                              node_proxy=False, **kwargs)  # one process: direct, as labelled
        systems[label] = (lambda rm=rm: rm.forward(obs, batch=False))
        systems[label].rm = rm  # type: ignore[attr-defined]

    async def measure() -> None:
        for label, call in systems.items():
            row: dict[str, Any] = {"latency_ms": await latency_ms(call, args.latency_n)}
            for c in CALLERS:
                row[f"fps_{c}"] = await rate(call, c, args.duration_s)
            results[label] = row
            print(f"bench: {label}: {row}", flush=True)
        if stock.session is not None:
            await stock.session.close()

    asyncio.run(measure())

    # New weights -> served on every worker.
    rm = systems["bray torch (32/0 ms)"].rm
    served = []
    for i in range(args.publishes):
        weights = {k: v + 1e-3 * (i + 1) for k, v in model.state_dict().items()}
        t0 = time.perf_counter()
        rm.publish_weights(weights).wait(timeout_s=30)
        served.append(time.perf_counter() - t0)
    stock_served = [stock.deploy({k: v + 1e-3 * (i + 1) for k, v in model.state_dict().items()})
                    for i in range(args.stock_publishes)]
    results["publish_to_served_ms"] = {
        "bray_median": float(np.median(served) * 1e3), "bray_max": float(np.max(served) * 1e3),
        "stock_median": float(np.median(stock_served) * 1e3), "stock_max": float(np.max(stock_served) * 1e3),
    }
    print(f"bench: publish->served {results['publish_to_served_ms']}", flush=True)

    # Local mode against the module itself.
    local = bray.RemoteModel("policy_local", model=model, forward_args=example, local_mode=True)
    x1 = obs[None]
    n = 3000
    for _ in range(100):
        local(x1)
    t0 = time.perf_counter()
    for _ in range(n):
        local(x1)
    t_local = (time.perf_counter() - t0) / n
    with torch.inference_mode():
        xt = torch.from_numpy(x1)
        t0 = time.perf_counter()
        for _ in range(n):
            model(xt).numpy()
        t_direct = (time.perf_counter() - t0) / n
    results["local_mode_us"] = {"bray_local": t_local * 1e6, "direct_module": t_direct * 1e6}
    local.close()
    from bray.archiver import ManagementClient

    with ManagementClient(server.management_url, key_file=server.key_file) as client:
        for label, call in systems.items():
            if hasattr(call, "rm"):
                call.rm.close()
                if call.rm.name != PROCS_MODEL:  # free the cores and memory of models done with
                    client.unregister(call.rm.name)
    return results


PROCS_MODEL = "policy_torch"  # bray direct and proxy in the multi-process table: the 32/0 ms torch model


def multi_process(args: argparse.Namespace, server: Any, work: Path, model: Any, stock: Stock) -> dict[str, Any]:
    """The multi-process table (issue 10): P actor processes, sync calls, 1 or 16 observations."""
    import torch

    import bray
    import bench_procs

    rm = bray.RemoteModel(PROCS_MODEL, model=model, forward_args=(torch.zeros(BATCH, OBS),), max_batch_size=BATCH,
                          num_workers=WORKERS, max_batch_delay_ms=0, override_model=False)
    rm.close()
    print("bench: deploying stock TorchServe with max_batch_delay 0", flush=True)
    stock0 = Stock(server, work, model, name="policy_stock_d0", max_batch_delay_ms=0)
    locations = dict(store=str(work / "store"), model_store=str(server.model_store), inference_url=server.inference_url,
                     management_url=server.management_url, key_file=str(server.key_file))
    auth = server.headers("inference")
    stocks = [{"label": f"stock (JSON, 32/{s.delay_ms} ms)", "kind": "stock", "model": s.name,
               "url": f"{server.inference_url}/predictions/{s.name}", "headers": auth} for s in (stock0, stock)]
    brays = [{"label": "bray direct", "kind": "bray", "model": PROCS_MODEL, "name": PROCS_MODEL, "locations": locations,
              "options": {"node_proxy": False}},
             {"label": "bray node proxy", "kind": "bray", "model": PROCS_MODEL, "name": PROCS_MODEL,
              "locations": locations, "options": {"node_proxy": True}, "skip": bench_procs.proxy_unsupported()},
             # Bray code run unchanged: RemoteModel(name), whatever the default is (the node
             # proxy since issue 23, unless BRAY_NODE_PROXY=0 in this shell).
             {"label": "bray default (Bray code unchanged)", "kind": "bray", "model": PROCS_MODEL,
              "name": PROCS_MODEL, "locations": locations}]
    # The shared-memory peer (issue 24): the same model in this process, no HTTP, when installed.
    brays.append({"label": "TorchRL InferenceServer (ProcessSlotTransport)", "kind": "torchrl", "model": "",
                  "server": bench_procs.TorchRL(model, max_batch_size=BATCH), "skip": bench_procs.torchrl_unsupported()})
    res = bench_procs.measure(stocks + brays, procs=args.procs, rows=args.obs_per_call, duration_s=args.procs_duration_s,
                              warmup_s=1.0 if args.quick else 3.0,
                              metrics_url=server.metrics_url)
    res["stock_labels"] = [s["label"] for s in stocks]
    return res


LEAGUE_MODEL = "policy_league"


def league_table(args: argparse.Namespace, work: Path, model: Any) -> dict[str, Any]:
    """The league table (issue 23): actor processes playing the learner and K opponents.

    bray-serve on one TorchServe (weight-set clones at every K, default and direct
    interleaved, then dedicated clones at small K), then stock TorchServe on a fresh one
    (a version per opponent, up to ``--league-stock-max-k`` or the memory cap), so each
    system's memory is its own. See ``scripts/bench_league.py``.
    """
    import torch

    import bench_league
    import bench_procs
    import bray
    from bray.torchserve.launcher import start_torchserve
    from bray.torchserve.management import ManagementClient

    res: dict[str, Any] = {"ks": list(args.league_ks), "actors": args.league_actors, "duration_s": args.league_duration_s,
                           "cap_mb": args.league_cap_mb, "points": [], "notes": []}

    def measure(systems: list[dict[str, Any]], server: Any) -> dict[str, Any]:
        return bench_procs.measure(systems, procs=(args.league_actors,), rows=(1,), duration_s=args.league_duration_s,
                                   warmup_s=0.5 if args.quick else 3.0, metrics_url=server.metrics_url)

    def record(k: int, measured: dict[str, Any], made_s: list[float], server: Any, store: Path) -> None:
        new = bench_league.points(measured, k=k, made_s=made_s, mem=bench_league.memory(server.pid, store))
        res["points"] += new
        for p in new:
            print(f"bench: league K={k}, {p['system']}: " + (p.get("skipped") or
                  f"{p['forwards_per_s']:.0f} forwards/s, {p['torchserve_mb']} MB in {p['processes']} processes, "
                  f"{p['errors']} errors"), flush=True)

    store = work / "league-store"
    server = start_torchserve(workdir=work / "league-server", model_store=work / "league-model_store")
    try:
        bray.init(store=store, model_store=server.model_store, inference_url=server.inference_url,
                  management_url=server.management_url, key_file=server.key_file)
        print("bench: league: the learner and its kept steps", flush=True)
        learner = bray.RemoteModel(LEAGUE_MODEL, model=model, forward_args=(torch.zeros(BATCH, OBS),), max_batch_size=BATCH,
                                   num_workers=WORKERS, checkpoint_interval=1)
        for i in range(16):
            learner.publish_weights({k: v + 1e-2 * (i + 1) for k, v in model.state_dict().items()}).wait(timeout_s=60)
        steps = learner.store.checkpoint_steps(LEAGUE_MODEL)
        locations = dict(store=str(store), model_store=str(server.model_store), inference_url=server.inference_url,
                         management_url=server.management_url, key_file=str(server.key_file))
        base = {"kind": "bray", "model": LEAGUE_MODEL, "name": LEAGUE_MODEL, "locations": locations}
        for system, dedicated, ks in ((None, False, args.league_ks), (bench_league.DEDICATED, True, args.league_dedicated_ks)):
            opponents: list[str] = []
            make = bench_league.bray_opponent(learner, steps, dedicated=dedicated, prefix="d" if dedicated else "o")
            for k in ks:
                made_s, stopped = bench_league.grow(opponents, k, make, server_pid=server.pid, cap_mb=args.league_cap_mb)
                if stopped:
                    res["notes"].append(f"{system or 'bray weight sets'}: {stopped}.")
                    break
                if dedicated:
                    systems = [{**base, "label": system, "opponents": list(opponents)}]
                else:
                    systems = [{**base, "label": bench_league.DEFAULT, "opponents": list(opponents)},
                               {**base, "label": bench_league.DIRECT, "opponents": list(opponents),
                                "options": {"node_proxy": False}}]
                record(k, measure(systems, server), made_s, server, store)
            if dedicated and opponents:
                with ManagementClient(server.management_url, key_file=server.key_file, timeout_s=120) as client:
                    for name in opponents:
                        client.unregister(name)
        learner.close()
    finally:
        server.stop()
        for proxy in bench_league.node_proxies(store):  # ours: they serve this run's store
            proxy.terminate()

    print("bench: league: stock TorchServe on a fresh server", flush=True)
    server = start_torchserve(workdir=work / "league-stock-server", model_store=work / "league-stock-model_store")
    try:
        (work / "league-stock").mkdir()
        # Delay 0: each version has a queue of its own, which a few sync actors never fill;
        # a delay would only hold their lone requests.
        stock = Stock(server, work / "league-stock", model, name="policy_stock_league", max_batch_delay_ms=0)
        system = {"kind": "stock", "label": bench_league.STOCK, "model": stock.name, "headers": server.headers("inference"),
                  "url": f"{server.inference_url}/predictions/{stock.name}"}
        urls: list[str] = []

        def make(i: int) -> tuple[str, float]:
            return stock.add_version({k: v + 1e-2 * (i + 1) for k, v in model.state_dict().items()})

        for k in [k for k in args.league_ks if k <= args.league_stock_max_k]:
            made_s, stopped = bench_league.grow(urls, k, make, server_pid=server.pid, cap_mb=args.league_cap_mb)
            if stopped:
                res["notes"].append(f"{bench_league.STOCK}: {stopped}.")
                if urls and made_s:
                    record(len(urls), measure([{**system, "opponents": list(urls)}], server), made_s, server, store)
                break
            record(k, measure([{**system, "opponents": list(urls)}], server), made_s, server, store)
        else:
            res["notes"].append(f"{bench_league.STOCK}: measured at K <= {args.league_stock_max_k} "
                                "(--league-stock-max-k) only.")
    finally:
        server.stop()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", default="single,procs", help="which tables: single (coroutine callers, publish, "
                   "local mode), procs (actor processes), league (actor processes against K opponents), comma separated")
    p.add_argument("--quick", action="store_true", help="a short run: 1.5 s points, P 1 and 16 with 1 observation")
    p.add_argument("--duration-s", type=float, default=5.0, help="seconds per throughput point (single table)")
    p.add_argument("--latency-n", type=int, default=300, help="sequential forwards for the latency median")
    p.add_argument("--publishes", type=int, default=20, help="weight updates for bray's publish-to-served figure")
    p.add_argument("--stock-publishes", type=int, default=3, help="weight updates for stock's (each takes seconds)")
    p.add_argument("--procs", default="1,4,16,64", help="actor process counts (procs table)")
    p.add_argument("--obs-per-call", default="1,16", help="observations per call (procs table)")
    p.add_argument("--procs-duration-s", type=float, default=4.0, help="seconds per point (procs table)")
    p.add_argument("--league-ks", default="0,8,64,256", help="opponent counts K (league table)")
    p.add_argument("--league-dedicated-ks", default="8", help="K for bray's dedicated clones, '' for none (league table)")
    p.add_argument("--league-stock-max-k", type=int, default=8, help="largest K for stock TorchServe (league table)")
    p.add_argument("--league-cap-mb", type=float, default=8000, help="stop adding opponents of a system before "
                   "TorchServe's RSS would pass this (league table)")
    p.add_argument("--league-actors", type=int, default=8, help="actor processes (league table)")
    p.add_argument("--league-duration-s", type=float, default=6.0, help="seconds per point (league table)")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    tables = {t.strip() for t in args.tables.split(",") if t.strip()}
    if not tables or tables - {"single", "procs", "league"}:
        p.error(f"--tables takes single, procs, league or several, comma separated, got {args.tables!r}")
    try:
        args.procs = tuple(int(x) for x in args.procs.split(","))
        args.obs_per_call = tuple(int(x) for x in args.obs_per_call.split(","))
        args.league_ks = tuple(int(x) for x in args.league_ks.split(",") if x.strip())
        args.league_dedicated_ks = tuple(int(x) for x in args.league_dedicated_ks.split(",") if x.strip())
    except ValueError:
        p.error(f"--procs, --obs-per-call, --league-ks and --league-dedicated-ks take comma-separated integers, got "
                f"{args.procs!r}, {args.obs_per_call!r}, {args.league_ks!r}, {args.league_dedicated_ks!r}")
    if args.quick:
        args.duration_s, args.latency_n, args.publishes, args.stock_publishes = 1.5, 100, 5, 1
        args.procs, args.obs_per_call, args.procs_duration_s = (1, 16), (1,), 1.5
        args.league_ks, args.league_dedicated_ks, args.league_stock_max_k = (0, 2), (2,), 2
        args.league_actors, args.league_duration_s = 4, 1.5

    import torch

    import bray
    from bray.torchserve.launcher import start_torchserve

    torch.manual_seed(0)
    model = policy()
    work = Path(tempfile.mkdtemp(prefix="bray-bench-"))
    single = procs = None
    if tables & {"single", "procs"}:
        server = start_torchserve(workdir=work / "server", model_store=work / "model_store")
        try:
            bray.init(store=work / "store", model_store=server.model_store, inference_url=server.inference_url,
                      management_url=server.management_url, key_file=server.key_file)
            print("bench: deploying stock TorchServe (docs way)", flush=True)
            stock = Stock(server, work, model)
            single = single_process(args, server, work, model, stock) if "single" in tables else None
            procs = multi_process(args, server, work, model, stock) if "procs" in tables else None
        finally:
            server.stop()
    if single is not None:
        write(single, args.out)
    if procs is not None:
        import bench_procs

        print(bench_procs.write(procs, head(), procs["stock_labels"], args.out))
    if "league" in tables:  # its own servers, after the other tables are written
        import bench_league

        print(bench_league.write(league_table(args, work, model), head(), args.out))
    return 0


def versions() -> str:
    import onnxruntime
    import torch
    from importlib.metadata import version

    return (f"torch {torch.__version__}, torchserve {version('torchserve')}, onnxruntime {onnxruntime.__version__}, "
            f"Python {platform.python_version()}")


def head() -> str:
    """The figures' conditions: date, machine, versions, policy."""
    import os

    return (f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores (client and server on one machine, "
            f"shared with five other engineers' servers and tests: compare ratios within a run), "
            f"{versions()}; policy MLP 64-256-256-16, {WORKERS} workers, TorchServe batch {BATCH}")


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stock_label = "stock TorchServe (JSON, 32/5 ms)"
    stock = results[stock_label]
    labels = [k for k in results if isinstance(results[k], dict) and "latency_ms" in results[k]]
    lines = [f"_{head()}_", "", "| system | single-caller latency ms | fwd/s 1 | fwd/s 16 | fwd/s 64 | latency vs stock | fwd/s 64 vs stock |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        r = results[label]
        lines.append(f"| {label} | {r['latency_ms']:.2f} | {r['fps_1']:.0f} | {r['fps_16']:.0f} | {r['fps_64']:.0f} | "
                     f"{r['latency_ms'] / stock['latency_ms']:.2f}x | {r['fps_64'] / stock['fps_64']:.1f}x |")
    ps = results["publish_to_served_ms"]
    lm = results["local_mode_us"]
    lines += ["", "| new weights to served on every worker | median ms | worst ms |", "|---|---:|---:|",
              f"| stock: archive + register + set-default | {ps['stock_median']:.0f} | {ps['stock_max']:.0f} |",
              f"| bray: publish_weights(...).wait() | {ps['bray_median']:.1f} | {ps['bray_max']:.1f} |",
              f"| ratio stock / bray | {ps['stock_median'] / ps['bray_median']:.0f}x | |",
              "", f"Local mode: {lm['bray_local']:.1f} µs per forward (batch 1) vs {lm['direct_module']:.1f} µs calling the "
              f"module directly ({lm['bray_local'] / lm['direct_module']:.2f}x)."]
    md = "\n".join(lines) + "\n"
    (out / "bench.md").write_text(md)
    (out / "bench.json").write_text(json.dumps({"meta": head(), **results}, indent=1))
    print(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        xs = np.arange(len(CALLERS))
        for i, label in enumerate(labels):
            a1.bar(xs + i * 0.16, [results[label][f"fps_{c}"] for c in CALLERS], 0.16, label=label)
        a1.set_xticks(xs + 0.4, [str(c) for c in CALLERS])
        a1.set_xlabel("concurrent callers")
        a1.set_ylabel("forwards / s")
        a1.set_yscale("log")
        a1.legend(fontsize=7)
        a2.bar(labels, [results[label]["latency_ms"] for label in labels])
        a2.set_ylabel("single-caller latency ms")
        a2.tick_params(axis="x", labelrotation=20, labelsize=7)
        fig.suptitle("bray-serve vs stock TorchServe, policy MLP, 2 workers", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "bench.png", dpi=110)
    except ImportError:
        print("bench: matplotlib missing; no plot (pip install 'bray-serve[bench]')")


if __name__ == "__main__":
    sys.exit(main())
