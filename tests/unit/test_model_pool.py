"""``bray.ModelPool`` over local-mode models (no server): weighting, new steps, results in the store.

Opponents are StepProbe clones, whose outputs say which checkpoint step they serve.
Several real processes record into one league at once for the concurrency test.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import bray
from bray.errors import ConfigError, StepNotFoundError
from bray.league import read_league
from tests.models import StepProbe, probe_weights

X = np.ones((2, 4), np.float32)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    bray.init(store=root, model_store=tmp_path / "model_store")
    return root


def expected(step: int) -> np.ndarray:
    return np.repeat(step * (X.sum(-1, keepdims=True) + 1), 2, axis=-1)


def learner(steps: int, name: str = "league", **kwargs: object) -> bray.RemoteModel:
    """A local-mode StepProbe whose step s holds probe_weights(s + 1), with every step a checkpoint."""
    net = StepProbe()
    net.load_state_dict(probe_weights(1))
    kwargs.setdefault("checkpoint_interval", 1)
    rm = bray.RemoteModel(name, model=net, forward_args=(X,), local_mode=True, **kwargs)  # type: ignore[arg-type]
    for s in range(1, steps):
        rm.publish_weights(probe_weights(s + 1))
    return rm


def test_weighting_prefers_the_even_match_over_the_always_beaten(store: Path) -> None:
    rm = learner(3)
    pool = bray.ModelPool(rm, seed=0, refresh_s=0)
    try:
        assert list(pool.candidates()) == ["league-clone-step-0", "league-clone-step-1", "league-clone-step-2"]
        for i in range(20):
            pool.record("league-clone-step-0", 1.0)  # the learner always beats step 0
            pool.record("league-clone-step-1", float(i % 2))  # an even match
        assert pool.stats()["league-clone-step-0"] == (1.0, 20)
        mean1, games1 = pool.stats()["league-clone-step-1"]
        assert games1 == 20 and abs(mean1 - 0.5) < 0.05  # time-decayed, so not exactly 0.5
        weights = pool.weights()
        # Bray's formula: p ∝ exp(-100 |mean - 0.5|); step 2 has no result yet, so only exploration picks it
        assert set(weights) == {"league-clone-step-0", "league-clone-step-1"}
        ratio = math.exp(-100 * abs(mean1 - 0.5)) / math.exp(-100 * 0.5)
        assert weights["league-clone-step-1"] / weights["league-clone-step-0"] == pytest.approx(ratio)
        picks = Counter(pool.sample().name for _ in range(300))
        # 70% weighted (all but ~e^-45 of it on step 1) + 30% uniform over three
        assert picks["league-clone-step-1"] > 200
        assert picks["league-clone-step-0"] < 60 and 10 < picks["league-clone-step-2"] < 60, picks  # ~30 each
        opp = pool.sample()
        np.testing.assert_allclose(opp(X), expected(pool.candidates()[opp.name] + 1))  # serves its step
    finally:
        pool.close()
        rm.close()


def test_new_checkpoint_steps_enter_the_pool(store: Path) -> None:
    rm = learner(1)
    pool = bray.ModelPool(rm, explore_rate=1.0, seed=1, refresh_s=0)
    try:
        assert pool.sample().name == "league-clone-step-0"
        rm.publish_weights(probe_weights(2))
        rm.publish_weights(probe_weights(3))
        assert list(pool.candidates().values()) == [0, 1, 2]
        seen = {pool.sample().name for _ in range(40)}
        assert seen == {"league-clone-step-0", "league-clone-step-1", "league-clone-step-2"}
        for _ in range(5):
            pool.record("league-clone-step-2", 0.5)
        assert pool.stats()["league-clone-step-2"] == (0.5, 5)
    finally:
        pool.close()
        rm.close()


def test_results_survive_a_restart_and_read_from_the_store_alone(store: Path) -> None:
    rm = learner(2)
    first = bray.ModelPool(rm)
    for v in (1.0, 0.0, 1.0, 1.0):
        first.record("league-clone-step-1", v)
    first.record(rm.clone(0), 0.25)  # the model sample() returned, or its name
    del first
    again = bray.ModelPool(rm)  # another process, or this one restarted
    try:
        assert again.stats()["league-clone-step-1"][1] == 4
        table = read_league(store, "league")
        assert [(s.opponent, s.step, s.games, s.mean) for s in table] == [
            ("league-clone-step-0", 0, 1, 0.25), ("league-clone-step-1", 1, 4, 0.75)]
        assert table[1].last_time <= time.time()
        assert read_league(store, "league", metric="score") == []
    finally:
        again.close()
        rm.close()


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), float("inf"), "won", None],
                         ids=["above-1", "below-0", "nan", "inf", "text", "none"])
def test_a_bad_result_is_a_config_error_naming_it(store: Path, value: object) -> None:
    rm = learner(1)
    pool = bray.ModelPool(rm)
    try:
        with pytest.raises(ConfigError, match=r"a game result must be a number in \[0, 1\] \(1: the learner won\), "
                                              rf"got {repr(value) if value == value else 'nan'}"):
            pool.record("league-clone-step-0", value)  # type: ignore[arg-type]
        assert pool.stats() == {}  # nothing was recorded
    finally:
        rm.close()


def test_unknown_opponent_and_no_checkpoint_step(store: Path) -> None:
    rm = learner(2)
    pool = bray.ModelPool(rm)
    try:
        with pytest.raises(ConfigError, match=r"'league-clone-step-7' is not an opponent of 'league'.s league; record "
                                              r"what sample\(\) returned \(candidates: \['league-clone-step-0'"):
            pool.record("league-clone-step-7", 1.0)
        with pytest.raises(ConfigError, match="'somebody' is not an opponent"):
            pool.record("somebody", 1.0)
    finally:
        rm.close()
    bare = learner(2, name="bare", checkpoint_interval=0)  # no checkpoint kept
    try:
        with pytest.raises(StepNotFoundError, match=r"'bare' has no kept checkpoint step to sample an opponent from "
                                                    r"\(latest step 1, .*checkpoint_interval=N"):
            bray.ModelPool(bare).sample()
    finally:
        bare.close()
    with pytest.raises(ConfigError, match="explore_rate must be a probability in"):
        bray.ModelPool(bare, explore_rate=1.5)


def test_a_pool_of_clones_serves_sampled_checkpoints(store: Path) -> None:
    rm = learner(3)
    slot = rm.clone(0, name="slot")
    pool = bray.ModelPool(rm, pool=[slot], explore_rate=1.0, seed=3, refresh_s=0)
    try:
        served = set()
        for _ in range(12):
            opp = pool.sample()
            assert opp is slot
            name = pool._assigned[slot.name]
            step = pool.candidates()[name]
            rm_step_weights = expected(step + 1)
            np.testing.assert_allclose(opp(X), rm_step_weights)  # the sampled checkpoint's weights
            pool.record(opp, 1.0)  # counts for the checkpoint it serves
            served.add(name)
        assert len(served) >= 2
        assert sum(games for _, games in pool.stats().values()) == 12
        assert "league-clone-step-0-slot" not in pool.stats()
    finally:
        slot.close()
        rm.close()


_WRITER = textwrap.dedent("""
    import sys
    from bray.league import LeagueResults
    from bray.store import CheckpointStore
    results = LeagueResults(CheckpointStore(sys.argv[1]), "league")  # what every ModelPool.record writes with
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(int(sys.argv[2])):
        results.record(f"league-clone-step-{i % 2}", i % 2, (i % 4) / 4)
""")


def test_concurrent_writers_in_several_processes_lose_nothing(store: Path) -> None:
    n, procs = 200, 4  # n divisible by 4: each opponent gets equal shares of its two values
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(store), str(n)], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(procs)]
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        for w in writers:  # all start recording at once
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        totals = []
        while any(w.poll() is None for w in writers):
            totals.append(sum(s.games for s in read_league(store, "league")))  # a reader never sees a torn file
        assert [w.wait(timeout=120) for w in writers] == [0] * procs
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert totals == sorted(totals), "a reader saw results go backwards"
    table = {s.opponent: s for s in read_league(store, "league")}
    assert {k: v.games for k, v in table.items()} == {"league-clone-step-0": procs * n / 2, "league-clone-step-1": procs * n / 2}
    # every value of every writer is there: step 0 got 0 and 0.5 alternately, step 1 got 0.25 and 0.75
    assert table["league-clone-step-0"].mean == pytest.approx(0.25)
    assert table["league-clone-step-1"].mean == pytest.approx(0.5)
    assert len(list((store / "league" / "league" / "win").glob("w-*.json"))) == procs
