"""StepFollower and the engine contract: only the newest prepared step is ever swapped in.

The engine here is a real :class:`Engine` with TensorRT's memory pattern (two weight
buffers, new weights written into the standby one), on numpy so it runs without a GPU.
It checks, while it writes, that the buffer it writes is not the one being served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytest

from bray.errors import EngineError
from bray.handlers.engines.base import Engine, EngineOptions
from bray.handlers.follower import StepFollower
from bray.store import CheckpointStore

pytestmark = pytest.mark.unit


class DoubleBuffered(Engine):
    """Two buffers; ``prepare_weights`` refits the standby one in two halves."""

    name = "double-buffered"
    reuses_prepared = True

    def __init__(self, follower_box: list[StepFollower], fail_on: int | None = None) -> None:
        super().__init__(Path("."), None, EngineOptions())  # type: ignore[arg-type]
        self.buffers = [np.zeros(4), np.zeros(4)]
        self.active = 0
        self.follower_box = follower_box
        self.fail_on = fail_on
        self.torn: list[str] = []

    def check_weights(self, weights: Mapping[str, Any]) -> None:
        if weights["w"].shape != (4,):
            raise EngineError(f"w has shape {list(weights['w'].shape)}, the model needs [4]")

    def prepare_weights(self, weights: Mapping[str, np.ndarray]) -> Any:
        self.check_weights(weights)
        standby = 1 - self.active
        value = float(weights["w"][0])
        self.buffers[standby][:2] = value
        # A batch starts while the refit is half done, as TorchServe's request thread may.
        self.follower_box[0].swap_if_pending()
        if self.active == standby:
            self.torn.append(f"buffer {standby} went live half refitted to {value}: {self.buffers[standby]}")
        if value == self.fail_on:
            raise EngineError(f"refit of {value} failed")
        self.buffers[standby][2:] = value
        return standby

    def swap(self, prepared: Any) -> None:
        self.active = int(prepared)

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.buffers[self.active].copy()]


def _follower(tmp_path: Path, fail_on: int | None = None) -> tuple[CheckpointStore, StepFollower, DoubleBuffered]:
    store = CheckpointStore(tmp_path)
    store.publish("m", {"w": np.zeros(4)}, step=0)
    box: list[StepFollower] = []
    engine = DoubleBuffered(box, fail_on)
    follower = StepFollower(store, "m", engine)
    box.append(follower)
    follower.start()
    follower._watch.stop()  # steps are delivered by hand, in the order under test
    return store, follower, engine


def test_a_pending_step_is_taken_back_before_its_buffer_is_refitted(tmp_path: Path) -> None:
    store, follower, engine = _follower(tmp_path)
    store.publish("m", {"w": np.full(4, 1.0)}, step=1)
    follower.on_step(1)  # staged into buffer 1, not swapped: no batch came
    store.publish("m", {"w": np.full(4, 2.0)}, step=2)
    follower.on_step(2)  # buffer 1 again, while step 1 is pending on it
    assert engine.torn == []
    assert follower.swap_if_pending() == 2
    assert engine.forward([])[0].tolist() == [2.0] * 4


def test_a_failed_refit_unstages_the_step_it_overwrote(tmp_path: Path) -> None:
    store, follower, engine = _follower(tmp_path, fail_on=2)
    store.publish("m", {"w": np.full(4, 1.0)}, step=1)
    follower.on_step(1)
    store.publish("m", {"w": np.full(4, 2.0)}, step=2)
    follower.on_step(2)  # fails half way through buffer 1, which held step 1
    assert engine.torn == []
    assert 2 in follower.refused
    assert follower.staged_step == 0 and follower.swap_if_pending() == 0
    assert engine.forward([])[0].tolist() == [0.0] * 4  # step 0 still serves, untouched
    store.publish("m", {"w": np.full(4, 3.0)}, step=3)
    follower.on_step(3)
    assert follower.swap_if_pending() == 3 and engine.forward([])[0].tolist() == [3.0] * 4


def test_a_step_refused_by_its_shape_leaves_the_pending_step_alone(tmp_path: Path) -> None:
    store, follower, engine = _follower(tmp_path)
    store.publish("m", {"w": np.full(4, 1.0)}, step=1)
    follower.on_step(1)  # pending on the standby buffer
    store.publish("m", {"w": np.full(5, 2.0)}, step=2)
    follower.on_step(2)  # refused before any buffer is touched
    assert 2 in follower.refused and follower.staged_step == 1
    assert follower.swap_if_pending() == 1 and engine.forward([])[0].tolist() == [1.0] * 4


def test_an_announcing_follower_heartbeats_until_closed(tmp_path: Path) -> None:
    """Where no management API lists the workers, a fresh announcement is the worker: it is rewritten
    every HEARTBEAT_S with the staged step, and withdrawn (not rewritten after) at close."""
    import time

    from bray.store import HEARTBEAT_S

    store = CheckpointStore(tmp_path)
    store.publish("m", {"w": np.zeros(4)})
    box: list[StepFollower] = []
    follower = StepFollower(store, "m", DoubleBuffered(box), announce=True)
    box.append(follower)
    follower.start()
    try:
        (first,) = store.serving("m").values()
        deadline = time.monotonic() + 10 * HEARTBEAT_S
        while (now := store.serving("m")) and next(iter(now.values()))["time"] == first["time"]:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
        assert next(iter(now.values()))["step"] == first["step"] == 0
    finally:
        follower.close()
    time.sleep(HEARTBEAT_S * 1.5)
    assert store.serving("m") == {}
