"""Nodes typed once, workers as (host, pid): what a publish's wait counts as served."""

from __future__ import annotations

from pathlib import Path

import pytest

from bray.bridge.registration import announcements, behind
from bray.locations import Locations, Node
from bray.errors import ConfigError


def test_two_nodes_whose_workers_share_a_pid_do_not_stand_in_for_each_other() -> None:
    """Matched by pid alone, host b's announcement of step 5 made host a's worker 100 look served."""
    announced = announcements({
        "a-100": {"host": "a", "pid": 100, "step": 3},
        "b-100": {"host": "b", "pid": 100, "step": 5},
        "b-101": {"host": "b", "pid": 101, "step": 5},
    })
    # node a's one worker is pid 100, node b's are 100 and 101: only host b covers b's pids
    nodes = [(None, (100,)), (None, (100, 101))]
    late = behind(nodes, announced, 5)
    assert late == {"a-100": 3}
    announced[("a", 100)] = 5
    assert behind(nodes, announced, 5) == {}


def test_a_node_on_this_machine_is_matched_by_its_host_name() -> None:
    announced = {("here", 7): 9, ("there", 7): 2}
    assert behind([("here", (7,))], announced, 9) == {}
    assert behind([("there", (7,))], announced, 9) == {"there-7": 2}


def test_a_worker_that_announced_nothing_is_behind() -> None:
    assert behind([(None, (5, 6))], {("h", 5): 4}, 4) == {"?-5": None, "?-6": None}
    assert announcements({"x": {"pid": 1, "step": 2}}) == {}  # no host: not a worker we can place


def test_nodes_are_built_once_from_per_node_lists(tmp_path: Path) -> None:
    loc = Locations.from_env({}, store=tmp_path, inference_url="http://a:8080,http://b:8080",
                             management_url="http://a:8081,http://b:8081", key_file="/k/a.json,/k/b.json",
                             model_store=tmp_path / "ms")
    assert loc.nodes == (
        Node("http://a:8080", "http://a:8081", Path("/k/a.json"), tmp_path / "ms"),
        Node("http://b:8080", "http://b:8081", Path("/k/b.json"), tmp_path / "ms"),
    )
    assert loc.inference_urls == ("http://a:8080", "http://b:8080")
    assert Locations.from_env(loc.to_env()) == loc  # what a node proxy rebuilds from its environment
    shared = Locations.from_env({}, store=tmp_path, inference_url="http://a:8080,http://b:8080")
    assert len(shared.managed_nodes()) == 1  # one management address: registered once


def test_per_node_lists_of_another_length_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"2 model stores for 3 inference address\(es\).*BRAY_MODEL_STORE"):
        Locations.from_env({}, store=tmp_path, inference_url="http://a:1,http://b:1,http://c:1",
                           model_store=f"{tmp_path}/x,{tmp_path}/y")


def test_nodes_without_a_reachable_management_api(tmp_path: Path) -> None:
    """``none`` marks a node whose management API stays on its own loopback: never registered on from here."""
    loc = Locations.from_env({}, store=tmp_path, inference_url="http://10.0.0.2:8080,http://10.0.0.3:8080",
                             management_url="none,none")
    assert [n.management_url for n in loc.nodes] == [None, None]
    assert loc.managed_nodes() == () and len(loc.unmanaged_nodes) == 2
    assert Locations.from_env(loc.to_env()).nodes == loc.nodes  # what a node proxy is started with
    with pytest.raises(ConfigError, match="no management API can be reached"):
        loc.management_url  # noqa: B018


def test_a_wait_over_unmanaged_nodes_counts_heartbeating_announcements(tmp_path: Path) -> None:
    """Two nodes x 2 workers expected: a stale announcement (a killed node) is no worker, however high its step."""
    from bray.bridge.registration import Registration
    from bray.handlers.options import ServingOptions
    from bray.store import HEARTBEAT_STALE_S, CheckpointStore

    loc = Locations.from_env({}, store=tmp_path, inference_url="http://10.0.0.2:8080,http://10.0.0.3:8080",
                             management_url="none")
    reg = Registration("p", CheckpointStore(tmp_path), loc, options=ServingOptions(workers=2), pinned=None,
                       timeout_s=1.0)
    now = 1000.0
    fresh = {f"{h}-{p}": {"host": h, "pid": p, "step": 4, "time": now - 1} for h in ("a", "b") for p in (1, 2)}
    assert reg.unmanaged_late(4, fresh, now=now) == ({}, "")
    assert reg.unmanaged_late(5, fresh, now=now)[0] == {"a-1": 4, "a-2": 4, "b-1": 4, "b-2": 4}
    dead = {**fresh, "b-2": {"host": "b", "pid": 2, "step": 9, "time": now - HEARTBEAT_STALE_S - 1}}
    late, short = reg.unmanaged_late(4, dead, now=now)
    assert late == {} and short.startswith("3 of the 4 workers expected on the 2 node(s)")
