"""The per-node weight loader: each step read and verified once into a cache every worker maps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from bray.handlers.follower import StepFollower
from bray.store import CheckpointStore
from bray.store.node_loader import NodeLoader
from tests.unit.test_follower import DoubleBuffered


def _until(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.01)


def _w(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full(4, value, dtype=np.float32)}


def test_each_step_is_cached_once_verified_and_mapped_by_workers(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    store.publish("m", _w(1.0))
    loader = NodeLoader(store, tmp_path / "shm", ["m"], poll_interval_s=0.01, keep=2)
    loader.start()
    try:
        cache = CheckpointStore(tmp_path / "shm")
        assert cache.latest("m") == 0  # the latest step is copied at start
        for value in (2.0, 3.0, 4.0):
            step = store.publish("m", _w(value))
            _until(lambda: cache.latest("m") == step)
        got = cache.load("m", -1, verify=False, mapped=True)
        assert got.step == 3 and got.weights["w"].tolist() == [4.0] * 4
        _until(lambda: cache.steps("m") == [2, 3])  # keep=2: older steps leave the cache
        # A step that does not match its checksum never reaches the cache.
        loader.stop()  # copies by hand from here on
        bad = store.publish("m", _w(5.0))
        path = store.weights_path("m", bad)
        path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
        loader.copy("m", bad)
        assert cache.latest("m") == 3
    finally:
        loader.stop()


def test_a_follower_with_a_node_cache_maps_it_and_reads_the_store_only_for_steps_not_there(tmp_path: Path) -> None:
    """Step 1 corrupted in the store after the loader cached it: the follower, reading the cache, never sees
    the damage (a store read would refuse the step); step 2, not cached, is read from the store."""
    store = CheckpointStore(tmp_path / "store")
    store.publish("m", _w(0.0))
    one = store.publish("m", _w(1.0))
    cache_root = tmp_path / "shm"
    NodeLoader(store, cache_root, ["m"], poll_interval_s=None).copy("m", one)
    path = store.weights_path("m", one)
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    box: list[StepFollower] = []
    follower = StepFollower(store, "m", DoubleBuffered(box), node_cache=CheckpointStore(cache_root))
    box.append(follower)
    try:
        assert follower.start() == one and follower.engine.forward([])[0].tolist() == [1.0] * 4
        two = store.publish("m", _w(2.0))  # not cached: read from the store
        follower.on_step(two)
        assert follower.staged_step == two and not follower.refused
        assert follower.swap_if_pending() == two and follower.engine.forward([])[0].tolist() == [2.0] * 4
    finally:
        follower.close()


@pytest.mark.parametrize("keep", [0, -1], ids=["zero", "negative"])
def test_keep_must_be_positive(tmp_path: Path, keep: int) -> None:
    with pytest.raises(ValueError, match="keep must be >= 1"):
        NodeLoader(CheckpointStore(tmp_path), tmp_path / "shm", ["m"], poll_interval_s=None, keep=keep)


def test_the_loader_relays_its_workers_announcements_as_one_file_per_node(tmp_path: Path) -> None:
    """Workers announce into the cache (shared memory); the store gets one file for the node, listing
    the live ones: a dead worker's file, left in the cache, is not relayed."""
    import os
    import socket
    import subprocess

    from bray.store import HEARTBEAT_STALE_S

    store = CheckpointStore(tmp_path / "store")
    store.publish("m", _w(0.0))
    loader = NodeLoader(store, tmp_path / "shm", ["m"], poll_interval_s=None)
    loader.start()
    try:
        cache = CheckpointStore(tmp_path / "shm")
        dead = subprocess.Popen(["true"])
        dead.wait()
        host = socket.gethostname()
        cache.announce_serving("m", f"{host}-{os.getpid()}", 0, pid=os.getpid(), host=host)
        cache.announce_serving("m", f"{host}-{dead.pid}", 0, pid=dead.pid, host=host)
        _until(lambda: set(store.serving("m")) == {f"{host}-{os.getpid()}"})
        (info,) = store.serving("m").values()
        assert info["step"] == 0 and info["pid"] == os.getpid() and info["host"] == host
        assert [p.name for p in store.serving_dir("m").iterdir()] == [f"{host}.node.json"]
        cache.announce_serving("m", f"{host}-{os.getpid()}", 1, pid=os.getpid(), host=host)
        _until(lambda: next(iter(store.serving("m").values()))["step"] == 1)  # relayed within a few RELAY_S
        assert loader.workers("m", now=time.time() + HEARTBEAT_STALE_S + 1) == {}  # its heartbeat stopped: gone
    finally:
        loader.stop()
