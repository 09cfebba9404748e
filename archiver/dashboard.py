"""``bray-archive dashboard``: a read-only web page of a training run being served.

One aiohttp application, no JavaScript build step: the server renders the whole page
(tables and an inline SVG plot); a few lines of inline JavaScript fetch it again every
``refresh_s`` and swap the content, and a ``<noscript>`` meta refresh does the same
without JavaScript. It shows, per model in the checkpoint store:

- the latest and kept steps (from the store): how many, and every one of them written
  compactly (``0-90 every 10, 96-100``); past :data:`MAX_STEP_RUNS` runs of steps the
  page shows the oldest and newest and says how many it left out;
- the registered versions, their default and workers (from the management API, when it
  answers; the page says so when it does not);
- the step each live worker serves: the workers' own announcements in the store, joined
  with the management API's worker list. An announcement whose worker no longer exists
  (not among TorchServe's workers of the model, or, with no answer from the management
  API, a process gone from this host) is left out, and the page says how many were;
- the league table (:func:`bray.league.read_league`: games, win rate, recent win rate per
  opponent) and a plot of win rate by opponent step.

``/metrics`` serves the league in Prometheus text format (``bray_league_win_rate``,
``bray_league_recent_win_rate``, ``bray_league_games``, ``bray_store_latest_step``) for the
Grafana dashboard's league panel; ``/api/state`` the page's data as JSON.

Read-only: only ``GET`` routes, nothing is written anywhere. TorchServe's keys are read
by the management client to authenticate and never reach a page, the JSON or a log
line. Bound to 127.0.0.1 unless told otherwise. This page goes beyond Bray (which has
none) and TorchServe (which ships none).
"""

from __future__ import annotations

import asyncio
import html
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bray.errors import BrayError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

    from bray.torchserve.management import ManagementClient

__all__ = ["DashboardOptions", "collect_state", "make_app", "render_page", "run_dashboard", "step_runs"]

DEFAULT_PORT = 8090

#: Runs of steps (``0-90 every 10`` is one) shown in full; more are cut in the middle, saying so.
MAX_STEP_RUNS = 24


@dataclass(frozen=True)
class DashboardOptions:
    """What the page shows and where it listens.

    Attributes:
        store: the checkpoint store root (``BRAY_STORE[/project/trial]``).
        host, port: the address to bind (loopback by default).
        refresh_s: how often the page refreshes itself.
        model_store: TorchServe's model store (tells pinned from live versions).
        client: builds a management client (``None``: no server is asked).
    """

    store: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    refresh_s: float = 2.0
    model_store: Path | None = None
    client: Callable[[], ManagementClient] | None = field(default=None, compare=False)


def check_store(root: Path) -> list[str]:
    """The model names in ``root``.

    Raises:
        ConfigError: ``root`` is not a checkpoint store (missing, a file, or no model in it).
    """
    from bray.store import CheckpointStore

    hint = ("pass --store (or set BRAY_STORE to) the directory the trainer publishes into "
            "(RemoteModel's store, with <project>/<trial> when bray.init was given them)")
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is a file"
        raise ConfigError(f"{root} {what}, so it is not a checkpoint store; {hint}")
    names = CheckpointStore(root).names()
    if not names:
        raise ConfigError(f"{root} is not a checkpoint store: no model in it (expected "
                          f"{root}/<model>/steps/<step>/); {hint}")
    return names


# --- the data -----------------------------------------------------------------------


def _league(root: Path, name: str) -> list[dict[str, Any]]:
    from bray.league import read_league

    return [asdict(s) for s in read_league(root, name)]


def _server_view(opts: DashboardOptions, names: list[str]) -> tuple[dict[str, Any], str | None]:
    """Versions and worker pids per model from the management API, or why not."""
    if opts.client is None:
        return {}, "no management API given"
    from bray.archiver.publish import status
    from bray.store import CheckpointStore

    try:
        with opts.client() as client:
            models = status(client=client, model_store=opts.model_store, store=CheckpointStore(opts.store))
            view: dict[str, Any] = {}
            for m in models:
                if m.name not in names:
                    continue
                pids: dict[int, tuple[str, str]] = {}
                for v in client.versions(m.name):
                    for w in v.raw.get("workers", []):
                        if w.get("pid"):
                            pids[int(w["pid"])] = (v.version, str(w.get("status", "")))
                view[m.name] = {"default": m.default_version, "pids": pids,
                                "versions": [asdict(v) for v in m.versions]}
            return view, None
    except BrayError as err:  # the page still shows the store; it says why the server is missing
        return {}, str(err).split("\n")[0][:300]


def _live_workers(announced: dict[str, dict[str, Any]], pids: dict[int, tuple[str, str]] | None,
                  now: float) -> tuple[list[dict[str, Any]], int]:
    """The announcements whose worker still exists, as table rows, and how many were stale.

    Args:
        announced: the store's announcements of one model (:meth:`CheckpointStore.serving`).
        pids: TorchServe's workers of the model, ``{pid: (version, status)}``; ``None``
            when the management API did not answer: then a worker of this host counts
            while its process exists, and one of another host (unknowable here) counts.
    """
    from bray.store._durable import pid_alive

    here = socket.gethostname()
    rows, stale = [], 0
    for worker, info in sorted(announced.items()):
        pid = int(info.get("pid", -1))
        if pids is not None:
            alive = pid in pids
        else:
            alive = info.get("host", here) != here or (pid > 0 and pid_alive(pid))
        if not alive:  # a killed or replaced worker left its announcement behind
            stale += 1
            continue
        version, state = (pids or {}).get(pid, ("", ""))
        rows.append({"worker": worker, "pid": pid, "host": info.get("host", ""), "step": info.get("step"),
                     "age_s": round(max(0.0, now - float(info.get("time", now))), 1),
                     "version": version, "status": state})
    return rows, stale


def _weight_set_of(store: Any, name: str) -> str | None:
    """The model whose workers serve clone ``name`` as a weight set, else ``None``."""
    from bray.handlers.weight_sets import weight_set_of

    try:
        return weight_set_of(store, name)
    except BrayError:  # an unreadable clone record: shown as a model of its own
        return None


def collect_state(opts: DashboardOptions) -> dict[str, Any]:
    """Everything the page shows, as plain data (what ``/api/state`` answers).

    Raises:
        ConfigError: the store is no longer a checkpoint store.
    """
    from bray.store import CheckpointStore

    names = check_store(opts.store)
    store = CheckpointStore(opts.store)
    server, server_error = _server_view(opts, names)
    now = time.time()
    models = []
    for name in names:
        # A clone served as a weight set has no TorchServe model: its family root's workers hold it.
        root = _weight_set_of(store, name)
        served = server.get(root or name, {})
        # The management API answered: a model it does not list has no live worker.
        workers, stale = _live_workers(store.serving(name), served.get("pids", {}) if server_error is None else None,
                                       now)
        models.append({
            "name": name, "latest": store.latest(name), "steps": store.steps(name),
            "default_version": None if root else served.get("default"),
            "versions": [] if root else served.get("versions", []), "weight_set_of": root,
            "workers": workers, "stale_announcements": stale, "league": _league(opts.store, name),
        })
    return {"store": str(opts.store), "time": now, "management_error": server_error,
            "server": bool(server) or server_error is None, "models": models}


# --- the page -----------------------------------------------------------------------

_E = html.escape

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em;margin:0 0 .2em}
h2{font-size:1.15em;margin:1.4em 0 .4em;border-bottom:1px solid #ccc}h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.2em 0 .8em}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.muted{color:#777}.warn{color:#a40}
.step{font-weight:bold}svg text{font:11px system-ui,sans-serif}
"""

_SCRIPT = """
const every = %d;
async function refresh() {
  try {
    const r = await fetch(location.pathname, {cache: "no-store"});
    if (r.ok) {
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      document.getElementById("content").replaceWith(doc.getElementById("content"));
    }
  } catch (e) { /* the next round tries again */ }
  setTimeout(refresh, every);
}
setTimeout(refresh, every);
"""


def _table(head: list[str], rows: list[list[Any]], *, left: int = 1, attrs: str = "") -> str:
    th = "".join(f'<th class="l">{_E(h)}</th>' if i < left else f"<th>{_E(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table {attrs}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _plot(league: list[dict[str, Any]], *, width: int = 440, height: int = 200) -> str:
    """Win rate (all games, and recent) by opponent step, as an inline SVG."""
    pad_l, pad_b, pad_t, pad_r = 40, 36, 10, 10
    steps = [s["step"] for s in league]
    lo, hi = min(steps), max(steps)
    span = (hi - lo) or 1

    def x(step: float) -> float:
        return pad_l + (step - lo) / span * (width - pad_l - pad_r) if hi != lo else (pad_l + width - pad_r) / 2

    def y(rate: float) -> float:
        return pad_t + (1 - rate) * (height - pad_t - pad_b)

    parts = [f'<svg id="winrate-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="win rate by opponent step">']
    for rate in (0, 0.5, 1):
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y(rate):.1f}" y2="{y(rate):.1f}" '
                     f'stroke="#ddd"/><text x="{pad_l - 6}" y="{y(rate) + 4:.1f}" text-anchor="end">{rate:g}</text>')
    for step in sorted({lo, hi}):
        parts.append(f'<text x="{x(step):.1f}" y="{height - pad_b + 14}" text-anchor="middle">{step}</text>')
    parts.append(f'<text x="{width - pad_r}" y="{height - 4}" text-anchor="end" fill="#777">opponent step</text>')
    for key, color, dash in (("mean", "#1f77b4", ""), ("recent", "#ff7f0e", ' stroke-dasharray="4 3"')):
        points = " ".join(f"{x(s['step']):.1f},{y(s[key]):.1f}" for s in league)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="{points}"/>')
        parts += [f'<circle cx="{x(s["step"]):.1f}" cy="{y(s[key]):.1f}" r="3" fill="{color}">'
                  f'<title>step {s["step"]}: {key} {s[key]:.3f} over {s["games"]} games</title></circle>'
                  for s in league]
    parts.append(f'<text x="{pad_l}" y="{height - 4}"><tspan fill="#1f77b4">'
                 f'all games</tspan> <tspan fill="#ff7f0e">recent (dashed)</tspan></text></svg>')
    return "".join(parts)


def step_runs(steps: list[int]) -> list[str]:
    """Sorted steps as runs of one stride: ``[0, 10, 20, 30, 36, 37, 38]`` -> ``["0-30 every 10", "36-38"]``.

    A run is three or more steps a constant stride apart; steps in no run stand alone.
    """
    runs: list[str] = []
    i = 0
    while i < len(steps):
        j = i  # the run is steps[i..j]
        stride = steps[i + 1] - steps[i] if i + 1 < len(steps) else 0
        while j + 1 < len(steps) and steps[j + 1] - steps[j] == stride:
            j += 1
        if j - i >= 2:
            runs.append(f"{steps[i]}-{steps[j]}" + (f" every {stride}" if stride != 1 else ""))
            i = j + 1
        else:
            runs.append(str(steps[i]))
            i += 1
    return runs


def _kept_steps(steps: list[int]) -> str:
    """How many steps are kept, and which: every one, or the ends and how many were left out."""
    if not steps:
        return "no kept step"
    runs = step_runs(steps)
    if len(runs) > MAX_STEP_RUNS:
        head, tail = runs[:MAX_STEP_RUNS // 4], runs[-(MAX_STEP_RUNS - MAX_STEP_RUNS // 4):]
        left_out = len(runs) - len(head) - len(tail)
        shown = (f'{_E(", ".join(head))}, <span class="cut">… {left_out} runs of steps not shown '
                 f'(/api/state lists them all) …</span>, {_E(", ".join(tail))}')
    else:
        shown = _E(", ".join(runs))
    noun = "step" if len(steps) == 1 else "steps"
    return f'<span class="kept-count">{len(steps)}</span> kept {noun}: <span class="kept-steps">{shown}</span>'


def _model_section(m: dict[str, Any], has_server: bool) -> str:
    name = m["name"]
    out = [f'<section class="model" data-model="{_E(name)}"><h2>{_E(name)}</h2>',
           f'<p>latest step <span class="step latest-step">{_E(str(m["latest"]))}</span>'
           f'<span class="muted"> · {_kept_steps(m["steps"])}</span></p>']
    if m.get("weight_set_of"):
        out.append(f'<p class="weight-set">a clone served as a weight set of <b>{_E(m["weight_set_of"])}</b> '
                   "by its workers (no TorchServe model of its own)</p>")
    elif m["versions"]:
        rows = [[_E(v["version"]) + (" <b>(default)</b>" if v["is_default"] else ""),
                 _E("live" if v["live"] else "pinned"), _E(str(v["step"])),
                 f'{v["ready_workers"]}/{v["workers"]}'] for v in m["versions"]]
        out.append("<h3>Registered versions</h3>" + _table(["version", "kind", "step", "ready workers"], rows, left=2))
    elif has_server:
        out.append('<p class="muted">not registered on the server</p>')
    if m["workers"]:
        rows = [[_E(w["worker"]), f'<span class="step worker-step">{_E(str(w["step"]))}</span>',
                 _E(w["version"] or "?"), _E(w["status"] or "?"), f'{w["age_s"]:.1f} s'] for w in m["workers"]]
        out.append("<h3>Step served by each worker</h3>"
                   + _table(["worker", "step", "version", "status", "announced"], rows, attrs='class="workers"'))
    else:
        out.append('<p class="muted">no live worker announces a step of this model (pinned versions do not)</p>')
    stale = m.get("stale_announcements", 0)
    if stale:
        what = ("announcement: a worker that no longer exists" if stale == 1
                else "announcements: workers that no longer exist")
        out.append(f'<p class="muted stale">ignored <span class="stale-count">{stale}</span> stale {what}</p>')
    if m["league"]:
        rows = [[_E(s["opponent"]), str(s["step"]), str(s["games"]), f'{s["mean"]:.3f}', f'{s["recent"]:.3f}']
                for s in m["league"]]
        out.append("<h3>League</h3>" + _table(["opponent", "step", "games", "win rate", "recent"], rows,
                                              attrs='class="league"'))
        out.append(_plot(m["league"]))
    out.append("</section>")
    return "".join(out)


def render_page(state: dict[str, Any], *, refresh_s: float) -> str:
    """The whole page for ``state`` (what :func:`collect_state` returns)."""
    when = time.strftime("%H:%M:%S", time.localtime(state["time"]))
    if state["management_error"]:
        server = f'<p class="warn">TorchServe: {_E(state["management_error"])}</p>'
    else:
        server = ""
    body = "".join(_model_section(m, state["server"]) for m in state["models"])
    content = (f'<div id="content"><p class="muted">store {_E(state["store"])} · updated '
               f'<span id="updated">{when}</span></p>{server}{body}</div>')
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>bray-serve dashboard</title>"
            f"<noscript><meta http-equiv=\"refresh\" content=\"{max(1, round(refresh_s))}\"></noscript>"
            f"<style>{_STYLE}</style></head><body><h1>bray-serve</h1>{content}"
            f"<script>{_SCRIPT % int(refresh_s * 1000)}</script></body></html>")


def render_metrics(state: dict[str, Any]) -> bytes:
    """The league and the store's latest steps in Prometheus text format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    class _State:
        def collect(self) -> Any:
            latest = GaugeMetricFamily("bray_store_latest_step", "The store's latest step", labels=["model"])
            rate = GaugeMetricFamily("bray_league_win_rate", "Win rate over every game against the opponent",
                                     labels=["model", "opponent", "opponent_step"])
            recent = GaugeMetricFamily("bray_league_recent_win_rate", "Time-decayed win rate (what ModelPool weighs)",
                                       labels=["model", "opponent", "opponent_step"])
            games = GaugeMetricFamily("bray_league_games", "Games recorded against the opponent",
                                      labels=["model", "opponent", "opponent_step"])
            for m in state["models"]:
                if m["latest"] is not None:
                    latest.add_metric([m["name"]], m["latest"])
                for s in m["league"]:
                    labels = [m["name"], s["opponent"], str(s["step"])]
                    rate.add_metric(labels, s["mean"])
                    recent.add_metric(labels, s["recent"])
                    games.add_metric(labels, s["games"])
            yield from (latest, rate, recent, games)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_State())  # type: ignore[arg-type]
    return generate_latest(registry)


# --- the server ---------------------------------------------------------------------


def make_app(opts: DashboardOptions) -> web.Application:
    """The aiohttp application (GET ``/``, ``/api/state``, ``/metrics``)."""
    from aiohttp import web

    cache: dict[str, Any] = {}
    lock = asyncio.Lock()

    async def state() -> dict[str, Any]:
        # Several browsers and a Prometheus share one collection per half refresh period.
        async with lock:
            if cache.get("at", 0.0) + opts.refresh_s / 2 < time.monotonic():
                cache["state"] = await asyncio.get_running_loop().run_in_executor(None, collect_state, opts)
                cache["at"] = time.monotonic()
            return cache["state"]

    async def page(_: web.Request) -> web.Response:
        try:
            text = render_page(await state(), refresh_s=opts.refresh_s)
        except BrayError as err:  # the store went away: say so, keep serving
            return web.Response(status=503, text=f"bray-archive dashboard: {err}\n")
        return web.Response(text=text, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def api(_: web.Request) -> web.Response:
        try:
            return web.json_response(await state(), dumps=lambda d: json.dumps(d, default=str))
        except BrayError as err:
            return web.json_response({"error": str(err)}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            return web.Response(status=501, text="/metrics needs prometheus-client: pip install 'bray-serve[metrics]'\n")
        try:
            body = render_metrics(await state())
        except BrayError as err:
            return web.Response(status=503, text=f"bray-archive dashboard: {err}\n")
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/api/state", api)
    app.router.add_get("/metrics", metrics)
    return app


def run_dashboard(opts: DashboardOptions, *, started: Callable[[str], None] | None = None) -> None:
    """Serve the page until interrupted (Ctrl-C or SIGTERM).

    Args:
        opts: the store and address.
        started: called with the page's URL once it listens.

    Raises:
        ConfigError: the store is not a checkpoint store, or the port is taken.
    """
    check_store(opts.store)
    from aiohttp import web

    async def serve() -> None:
        runner = web.AppRunner(make_app(opts), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, opts.host, opts.port)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {opts.host}:{opts.port}: {err.strerror or err} (port {opts.port} "
                              "is in use?); pick another with --port") from err
        if started is not None:
            host, port = runner.addresses[0][:2]
            started(f"http://{host}:{port}/")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())
