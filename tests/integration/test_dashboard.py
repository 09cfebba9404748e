"""``bray-archive dashboard`` in a real headless Chromium (Debian's package) over DevTools.

A model is served by the session TorchServe (2 workers) while a main-job-like loop
publishes new weights, calls the policy and records league results; the dashboard runs
as the real CLI in its own process. The page is loaded once: the steps it shows must
advance by themselves (the inline script swaps the content, the page is never reloaded),
every worker's served step must be shown, no TorchServe key may appear anywhere on it,
and the screenshot is kept (``BRAY_DASHBOARD_SCREENSHOT=results/dashboard.png`` writes
the README's).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
import torch

import bray
from bray.league import LeagueResults
from bray.torchserve.launcher import TorchServeProcess
from tests.models import PolicyMLP
from tests.serving import dashboard_process, init_for, unregister_all

NAME = "dash-policy"
WORKERS = 2
WAIT_S = 90.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium package: apt-get install chromium (scripts/setup.sh "
                             "installs it where apt-get can)")


@pytest.fixture(scope="module")
def run(torchserve: TorchServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A served model and a loop that publishes, forwards and records league results."""
    store = tmp_path_factory.mktemp("dash-store")
    init_for(torchserve, store)
    rm = bray.RemoteModel(NAME, model=PolicyMLP(), forward_args=(torch.zeros(2, 64),), max_batch_size=8,
                          num_workers=WORKERS, checkpoint_interval=2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def main_job() -> None:
        try:
            league = LeagueResults(rm.store, NAME)
            obs = np.ones((2, 64), np.float32)
            rng = np.random.default_rng(0)
            while not stop.is_set():
                rm.publish_weights(PolicyMLP().state_dict()).wait(timeout_s=60)
                rm(obs)
                for step in rm.store.steps(NAME)[:-1]:
                    league.record(f"{NAME}-clone-step-{step}", step, float(rng.random() < 0.3 + step / 40))
                stop.wait(0.4)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=main_job, daemon=True)
    thread.start()
    try:
        yield store
    finally:
        stop.set()
        thread.join(timeout=60)
        rm.close()
        unregister_all(torchserve, {NAME})
    assert not errors, errors


@pytest.fixture(scope="module")
def dashboard(run: Path, torchserve: TorchServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dashboard_process(run, torchserve, tmp_path_factory.mktemp("dashboard") / "dashboard.out") as url:
        yield url


class DevTools:
    """Chrome DevTools Protocol over one page's websocket (aiohttp)."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.next_id = ws, 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), timeout=30)
            if msg.get("id") == self.next_id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Headless Chromium with a fresh profile; yields its DevTools port."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    assert CHROMIUM is not None
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         "--window-size=1000,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium wrote no DevToolsActivePort within 60 s"
            time.sleep(0.2)
        yield int(port_file.read_text().split()[0])
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def test_page_shows_steps_advancing_by_itself_and_no_keys(dashboard: str, chromium: int, run: Path,
                                                          torchserve: TorchServeProcess, tmp_path: Path) -> None:
    import aiohttp

    async def scenario() -> dict[str, Any]:
        targets = requests.get(f"http://127.0.0.1:{chromium}/json", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = DevTools(ws)
                await cdp.send("Page.enable")
                await cdp.send("Page.navigate", url=dashboard)
                deadline = time.monotonic() + WAIT_S
                while not await cdp.js("!!document.querySelector('.latest-step')"):
                    assert time.monotonic() < deadline, await cdp.js("document.body.innerText")
                    await asyncio.sleep(0.2)
                await cdp.js("window.loadedOnce = true")  # gone if the page were reloaded
                shown: list[int] = []
                workers: dict[str, str] = {}
                while len(set(shown)) < 4 or len(workers) < WORKERS:
                    assert time.monotonic() < deadline, f"shown steps {shown}, workers {workers}"
                    text = await cdp.js(f"document.querySelector('[data-model=\"{NAME}\"] .latest-step').textContent")
                    shown.append(int(text))
                    rows = await cdp.js(f"[...document.querySelectorAll('[data-model=\"{NAME}\"] table.workers "
                                        "tbody tr')].map(r => [...r.cells].map(c => c.textContent))")
                    workers = {r[0]: r[1] for r in rows if r[3] == "READY"}
                    await asyncio.sleep(0.3)
                reloaded = not await cdp.js("window.loadedOnce === true")
                league_rows = await cdp.js(f"document.querySelectorAll('[data-model=\"{NAME}\"] table.league tbody tr')"
                                           ".length")
                has_plot = await cdp.js("!!document.querySelector('#winrate-plot circle')")
                html = await cdp.js("document.documentElement.outerHTML")
                shot = await cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                return {"shown": shown, "workers": workers, "reloaded": reloaded, "html": html,
                        "league_rows": league_rows, "has_plot": has_plot, "png": base64.b64decode(shot["data"])}

    got = asyncio.run(scenario())
    shown = got["shown"]
    assert shown == sorted(shown) and shown[-1] > shown[0], f"the shown step must advance: {shown}"
    assert not got["reloaded"], "the page reloaded itself instead of updating its content"
    assert len(got["workers"]) == WORKERS and all(int(s) >= shown[0] for s in got["workers"].values())
    assert got["league_rows"] >= 1 and got["has_plot"], "league table and plot missing"
    keys = json.loads(torchserve.key_file.read_text())
    secrets = [v["key"] for v in keys.values() if isinstance(v, dict) and v.get("key")]
    state = requests.get(f"{dashboard}api/state", timeout=10).text
    assert secrets and not any(k in got["html"] or k in state for k in secrets), "a TorchServe key is shown"
    assert got["png"].startswith(b"\x89PNG\r\n\x1a\n")
    dest = Path(os.environ.get("BRAY_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    dest.write_bytes(got["png"])


def test_a_dead_workers_announcement_is_left_out_and_counted(dashboard: str, run: Path) -> None:
    """A worker killed without withdrawing leaves its announcement in the store: the page
    lists only the workers TorchServe still has, and says how many it left out."""
    from bray.store import CheckpointStore

    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid with no process behind it
    host = socket.gethostname()
    worker = f"{host}-{proc.pid}"
    store = CheckpointStore(run)
    store.announce_serving(NAME, worker, 0, pid=proc.pid, host=host)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            state = requests.get(f"{dashboard}api/state", timeout=10).json()
            model = next(m for m in state["models"] if m["name"] == NAME)
            if model["stale_announcements"] >= 1 and model["workers"]:
                break
            assert time.monotonic() < deadline, model
            time.sleep(0.3)
        page = requests.get(dashboard, timeout=10).text
    finally:
        store.withdraw_serving(NAME, worker)
    assert state["management_error"] is None, state["management_error"]
    assert worker not in {w["worker"] for w in model["workers"]}
    # Every row left is a worker TorchServe lists for the model (before: the dead one, as "gone").
    assert all(w["status"] for w in model["workers"]), model["workers"]
    assert worker not in page and '<span class="stale-count">' in page and "no longer exist" in page


def test_dashboard_is_read_only(dashboard: str) -> None:
    for method in ("POST", "PUT", "DELETE"):
        assert requests.request(method, dashboard, timeout=10).status_code == 405
    assert requests.get(f"{dashboard}metrics", timeout=10).status_code == 200
