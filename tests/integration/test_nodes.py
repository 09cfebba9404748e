"""Several machines for real: server and actor nodes in network namespaces (``tests/netns.py``).

One cluster for the module: 2 server nodes (TorchServe on the node's address, 2 workers
each, management on the node's own loopback; the node's one weight loader polls the
shared store every 50 ms and its workers map the steps from its cache in /dev/shm),
3 actor nodes (each its own host name and node proxy), a relay node (2 ms per
chunk, 1% of connections dropped) in front of server 2. The trainer is this process: it
reaches no node, and ``wait()`` counts the workers' heartbeating announcements.

Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and Java; skipped with the reason otherwise.
The server-node kill runs last: it leaves one server node.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import _require_java
from tests.netns import unavailable
from tests.nodes import Cluster

WORKERS = 2  # per server node
POLL_MS = 50


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    _require_java()
    made = Cluster(tmp_path_factory.mktemp("nodes"), servers=2, actor_nodes=3, relay=True)
    try:
        made.trainer = made.init_trainer(workers=WORKERS, poll_interval_ms=POLL_MS)  # type: ignore[attr-defined]
        made.start_servers(workers=WORKERS, poll_interval_ms=POLL_MS, loader=True)
        publish(made, timeout_s=120)  # every worker of both nodes up and serving
        yield made
    finally:
        made.close()


def publish(cluster: Cluster, *, timeout_s: float = 30) -> int:
    from tests.models import probe_weights

    rm = cluster.trainer  # type: ignore[attr-defined]
    handle = rm.publish_weights(probe_weights(rm.step + 1))
    handle.wait(timeout_s=timeout_s)
    return int(handle.step)


def publish_every(cluster: Cluster, seconds: float, *, period_s: float = 0.2) -> list[int]:
    """The trainer's loop: a step every ``period_s``, each waited for on every worker of every node."""
    steps = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        steps.append(publish(cluster))
        time.sleep(max(0.0, period_s - (time.monotonic() - t0)))
    return steps


def check_calls(records: list[dict[str, Any]]) -> None:
    """No call failed, none answered with another step's output, no caller's step went back."""
    assert all(r["calls"] > 0 for r in records), [(r["node"], r.get("exit")) for r in records]
    assert [m for r in records for m in r["error_messages"]] == []
    assert sum(r["wrong"] for r in records) == 0
    assert sum(r["backwards"] for r in records) == 0


def fresh_workers(cluster: Cluster) -> dict[str, int]:
    """``{host-pid: step}`` of the announcements refreshed within the stale bound."""
    from bray.store import HEARTBEAT_STALE_S, CheckpointStore

    now = time.time()
    return {w: int(i["step"]) for w, i in CheckpointStore(cluster.store).serving(cluster.name).items()
            if now - float(i["time"]) <= HEARTBEAT_STALE_S}


def test_publish_reaches_every_worker_of_every_node_over_a_slow_lossy_link(cluster: Cluster) -> None:
    """12 actors (3 nodes x 4) call server 1 directly and server 2 through the relay while
    the trainer publishes every 200 ms: no call fails, no step goes back, every publish
    is staged by all 4 workers of the 2 nodes (hosts server1 and server2) before wait() returns."""
    urls = [cluster.servers[0].url, cluster.start_relay(cluster.servers[1], delay_ms=2.0, drop=0.01)]
    actors = cluster.start_actors(4, urls=urls)
    steps = publish_every(cluster, 10.0)
    records = actors.stop()
    relay = cluster.stop_relay()
    check_calls(records)
    assert len(steps) >= 10
    announced = fresh_workers(cluster)
    assert sorted(w.rsplit("-", 1)[0] for w in announced) == ["server1"] * WORKERS + ["server2"] * WORKERS
    assert set(announced.values()) == {steps[-1]}
    # Through each node's loader: one announcement file per node in the store, none per worker.
    files = sorted(p.name for p in (cluster.store / cluster.name / ".serving").glob("*.json"))
    assert files == ["server1.node.json", "server2.node.json"], files
    # The relay carried traffic and dropped some of it: the loss was real, and was retried.
    assert relay["connections"] > 0 and relay["dropped"] > 0, relay
    by_url: dict[str, int] = {}
    for r in records:
        for url, n in r["proxy"].get("requests_by_url", {}).items():
            by_url[url] = max(by_url.get(url, 0), n)
    assert set(by_url) == set(urls) and min(by_url.values()) > 0, by_url
    # Each actor node had its own node proxy (abstract sockets are per network namespace):
    # one proxy per node, three different ones (one shared proxy would show one pid thrice).
    proxies = {node: {r["proxy"]["pid"] for r in records if r["node"] == node} for node in {r["node"] for r in records}}
    assert all(len(pids) == 1 for pids in proxies.values()), proxies
    assert len(set.union(*proxies.values())) == 3, proxies


def test_a_cut_link_sends_calls_to_the_other_node_and_the_node_rejoins(cluster: Cluster) -> None:
    """Server 2's cable pulled for 5 s under load: calls keep being answered (by server 1)
    while it is out, none fails, and once it is back server 2 answers again."""
    server2 = cluster.servers[1]
    actors = cluster.start_actors(2)
    time.sleep(3)
    cut_at = time.time()
    server2.node.link(up=False)
    try:
        publish_every(cluster, 5.0)  # the store is not behind the cut link: every worker still follows it
    finally:
        server2.node.link(up=True)
    back_at = time.time()
    time.sleep(3)
    records = actors.stop()
    check_calls(records)
    # Answered during the cut's last 2 s (past the 2 s connect timeout): server 1 served them.
    during = sum(n for r in records for s, n in r["per_second"].items() if cut_at + 3 <= int(s) < back_at - 1)
    assert during > 0, [r["per_second"] for r in records]
    # Rejoined: a fresh run of actors (the same node proxies) sends server 2 requests again.
    before = {r["proxy"]["pid"]: r["proxy"]["requests_by_url"].get(server2.url, 0) for r in records}
    again = cluster.start_actors(2)
    time.sleep(10)  # the longest set-aside is 8 s
    later = again.stop()
    check_calls(later)
    after = {r["proxy"]["pid"]: r["proxy"]["requests_by_url"].get(server2.url, 0) for r in later}
    assert any(after[pid] > before.get(pid, 0) for pid in after), (before, after)


def test_an_actor_nodes_proxy_killed_its_actors_carry_on(cluster: Cluster) -> None:
    """SIGKILL the node proxy of actor node 1 mid-run: its actors' calls go on (direct, then a new proxy)."""
    import os
    import signal

    node = cluster.actor_nodes[0]
    actors = cluster.start_actors(3, nodes=[node])
    deadline = time.monotonic() + 60
    while not cluster.proxy_pids(node):
        assert time.monotonic() < deadline, "no node proxy started on the actor node"
        time.sleep(0.1)
    time.sleep(2)
    (killed,) = cluster.proxy_pids(node)
    os.kill(killed, signal.SIGKILL)
    time.sleep(4)
    records = actors.stop()
    check_calls(records)
    assert {r["proxy"].get("pid") for r in records} - {killed}, records  # a new proxy serves them


def test_a_killed_server_node_fails_over_and_wait_says_whose_workers_are_gone(cluster: Cluster) -> None:
    """Every process of server 2 SIGKILLed with calls in flight: each call is answered by
    server 1 or fails with a clear error, none hangs; then wait() times out naming the
    missing workers instead of claiming the step served."""
    from bray.errors import BrayTimeoutError

    actors = cluster.start_actors(4)
    time.sleep(4)
    killed = cluster.servers[1].node.kill_all()
    assert killed
    time.sleep(4)
    records = actors.stop(timeout_s=90)  # a hung call would keep its actor from stopping
    assert all(r["calls"] > 0 for r in records)
    clear = ("ServerUnreachableError", "ServerError", "BrayTimeoutError")
    assert all(m.startswith(clear) for r in records for m in r["error_messages"]), records
    assert sum(r["wrong"] for r in records) == 0 and sum(r["backwards"] for r in records) == 0
    with pytest.raises(BrayTimeoutError, match=r"2 of the 4 workers expected on the 2 node\(s\)"):
        publish(cluster, timeout_s=8)  # past the 5 s stale bound: server 2's workers no longer count
