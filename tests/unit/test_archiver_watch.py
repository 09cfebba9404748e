"""The archive watch's hold on its due steps, on a real store, without a server.

The watch's publishes fail here (the management address answers nothing), which is what
lets a test stop the watch inside a publish (its ``on_error``) while the trainer goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bray.archiver import ManagementClient, watch_and_publish
from bray.errors import ConfigError, ServerError, StepNotFoundError
from bray.store import CheckpointStore

NAME = "policy"


def _publish(store: CheckpointStore, upto: int) -> None:
    while (store.latest(NAME) or -1) < upto:
        store.publish(NAME, {"w": np.zeros(1, np.float32)})


def _wait(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def client() -> ManagementClient:
    c = ManagementClient("http://127.0.0.1:9", timeout_s=2.0)  # the discard port: nothing listens
    c.get_retry_delays_s = ()
    yield c
    c.close()


def test_a_due_step_lost_while_the_hold_lapsed_is_reported_not_skipped(
        tmp_path: Path, client: ManagementClient, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path / "store", keep_last=2)
    _publish(store, 4)
    in_publish, go_on = threading.Event(), threading.Event()
    errors: list[tuple[int, BaseException]] = []

    def on_error(step: int, err: BaseException) -> None:
        errors.append((step, err))
        if step == 10:
            in_publish.set()
            go_on.wait(30)

    with caplog.at_level(logging.ERROR, logger="bray.archiver.publish"):
        with watch_and_publish(store, NAME, 10, client=client, model_store=tmp_path / "models",
                               poll_interval_s=0.02, on_error=on_error, hold_ttl_s=3600) as watch:
            _publish(store, 10)
            _wait(in_publish.is_set, "the watch to try step 10")
            # The watch is stuck in a publish and its hold lapses (here: refreshed with no time left).
            store.hold_steps(NAME, holder=watch.holder, every=10, above=4, ttl_s=1e-6)
            _publish(store, 25)
            assert store.steps(NAME) == [24, 25]  # 20 went with the rest
            go_on.set()
            _wait(lambda: any(step == 20 for step, _ in errors), "the watch to report step 20")
    assert isinstance(errors[0][1], ServerError)  # step 10's publish, which failed on its own
    step, err = errors[1]
    assert step == 20 and isinstance(err, StepNotFoundError) and err.step == 20
    assert "step 20 of 'policy' was due to be archived (every 10) but is gone" in str(err)
    assert "keep_last=2" in str(err) and f"the hold of {watch.holder} was stale" in str(err)
    assert [s for s, _ in watch.errors] == [10, 20]
    assert any("step 20 of policy failed" in r.getMessage() for r in caplog.records)
    assert not (store.model_dir(NAME) / ".holds" / f"{watch.holder}.json").exists()  # released at stop


def test_the_watch_holds_its_due_steps_from_the_start_and_releases_them(tmp_path: Path,
                                                                        client: ManagementClient) -> None:
    """Without a hold, a trainer faster than the watch took every due step (issue 21): here
    each one stays until the watch has handled it, and goes once it has."""
    store = CheckpointStore(tmp_path / "store", keep_last=2)
    _publish(store, 3)
    tried: list[int] = []
    in_publish, go_on = threading.Event(), threading.Event()

    def on_error(step: int, err: BaseException) -> None:
        tried.append(step)
        in_publish.set()
        go_on.wait(30)

    with watch_and_publish(store, NAME, 10, client=client, model_store=tmp_path / "models",
                           poll_interval_s=0.02, on_error=on_error) as watch:
        _publish(store, 10)
        _wait(in_publish.is_set, "the watch to try step 10")
        _publish(store, 45)  # the watch is busy with step 10 meanwhile
        assert store.steps(NAME) == [10, 20, 30, 40, 44, 45]
        go_on.set()
        hold = store.model_dir(NAME) / ".holds" / f"{watch.holder}.json"
        _wait(lambda: json.loads(hold.read_text())["above"] >= 40, "the watch to move its hold past step 40")
        _publish(store, 46)
        _wait(lambda: store.steps(NAME) == [45, 46], "retention to take the handled steps back")
    assert tried == [10, 20, 30, 40]
    assert list((store.model_dir(NAME) / ".holds").iterdir()) == []


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan"), True], ids=["zero", "negative", "nan", "bool"])
def test_hold_ttl_is_validated(tmp_path: Path, client: ManagementClient, ttl: float) -> None:
    with pytest.raises(ConfigError, match="hold_ttl_s must be a number of seconds > 0"):
        watch_and_publish(CheckpointStore(tmp_path), NAME, 10, client=client, model_store=tmp_path, hold_ttl_s=ttl)
