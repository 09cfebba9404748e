"""``bray-archive dashboard``'s page from a real store, without a server: kept steps and stale workers.

The page in a real browser beside a real TorchServe is ``tests/integration/test_dashboard.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bray.archiver.dashboard import MAX_STEP_RUNS, DashboardOptions, collect_state, render_page, step_runs
from bray.store import CheckpointStore

W = {"w": np.zeros(3, np.float32)}


@pytest.mark.parametrize(("steps", "want"), [
    ([], []),
    ([7], ["7"]),
    ([3, 4], ["3", "4"]),
    ([0, 1, 2, 3], ["0-3"]),
    ([0, 10, 20, 30, 36, 37, 38], ["0-30 every 10", "36-38"]),
    ([0, 2, 4, 5, 6, 7, 100], ["0-4 every 2", "5-7", "100"]),
], ids=["none", "one", "two-apart", "consecutive", "checkpoints-then-newest", "three-runs-and-one"])
def test_step_runs_write_every_step(steps: list[int], want: list[str]) -> None:
    assert step_runs(steps) == want


def publish(root: Path, steps: list[int]) -> None:
    store = CheckpointStore(root, keep_last=len(steps))
    for step in steps:
        store.publish("policy", W, step=step)


def test_every_kept_step_is_shown_and_counted(tmp_path: Path) -> None:
    publish(tmp_path, list(range(40)))
    state = collect_state(DashboardOptions(store=tmp_path))
    assert state["models"][0]["steps"] == list(range(40))
    page = render_page(state, refresh_s=2)
    # Before: the last 12 only ("28, 29, ..., 39"), with no word that others were kept.
    assert '<span class="kept-count">40</span> kept steps: <span class="kept-steps">0-39</span>' in page, page


def test_a_cut_list_says_it_is_cut_and_how_much(tmp_path: Path) -> None:
    squares = [k * k for k in range(MAX_STEP_RUNS + 10)]  # no three a constant stride apart: one run each
    publish(tmp_path, squares)
    page = render_page(collect_state(DashboardOptions(store=tmp_path)), refresh_s=2)
    assert f'<span class="kept-count">{len(squares)}</span> kept steps' in page
    assert '<span class="cut">… 10 runs of steps not shown (/api/state lists them all) …</span>' in page, page
    assert "0, 1, 4," in page and f"{squares[-1]}</span>" in page  # the oldest and the newest are there


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_without_a_server_only_workers_whose_process_exists_are_listed(tmp_path: Path) -> None:
    publish(tmp_path, [0, 1])
    store = CheckpointStore(tmp_path)
    here = socket.gethostname()
    gone = dead_pid()
    store.announce_serving("policy", f"{here}-{os.getpid()}", 1, pid=os.getpid(), host=here)
    store.announce_serving("policy", f"{here}-{gone}", 0, pid=gone, host=here)
    store.announce_serving("policy", "elsewhere-12", 1, pid=12, host="elsewhere")  # not checkable here: kept
    state = collect_state(DashboardOptions(store=tmp_path))
    (model,) = state["models"]
    assert [w["worker"] for w in model["workers"]] == ["elsewhere-12", f"{here}-{os.getpid()}"]
    assert model["stale_announcements"] == 1
    page = render_page(state, refresh_s=2)
    assert f"{here}-{gone}" not in page
    assert 'ignored <span class="stale-count">1</span> stale announcement: a worker that no longer exists' in page


def test_a_weight_set_clone_is_shown_as_served_by_its_models_workers(tmp_path: Path) -> None:
    """Before, every clone read 'not registered on the server'; a weight set never is, and is served."""
    publish(tmp_path, [0, 1])
    store = CheckpointStore(tmp_path)
    store.record_clone_origin("policy-clone-step-1", source="policy", step=1, dedicated=False)
    store.record_clone_origin("policy-clone-step-0-iso", source="policy", step=0, dedicated=True)
    store.publish("policy-clone-step-1", W, step=1)
    store.publish("policy-clone-step-0-iso", W, step=0)
    state = collect_state(DashboardOptions(store=tmp_path, client=None, model_store=None))
    by_name = {m["name"]: m for m in state["models"]}
    assert by_name["policy-clone-step-1"]["weight_set_of"] == "policy"
    assert by_name["policy-clone-step-0-iso"]["weight_set_of"] is None
    assert by_name["policy"]["weight_set_of"] is None
    page = render_page(state, refresh_s=1.0)
    assert page.count('class="weight-set"') == 1 and "a clone served as a weight set of <b>policy</b>" in page
