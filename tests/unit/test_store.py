"""The checkpoint store on real files: round trips, step rules, retention, corruption,
watching, and publishers that are SIGKILLed or racing each other."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from bray.errors import (
    ConfigError,
    CorruptCheckpointError,
    StepConflictError,
    StepNotFoundError,
    StoreError,
    StoreWriteError,
)
from bray.store import Checkpoint, CheckpointStore, StepMeta


def tmp_entries(tmp: Path, timeout_s: float = 5.0) -> list[Path]:
    """What is left in ``.tmp`` once retention's background deletion has had its time."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = list(tmp.iterdir())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)

pytestmark = pytest.mark.unit


def step_dir(store: CheckpointStore, name: str, step: int) -> Path:
    return store.model_dir(name) / "steps" / f"{step:012d}"


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


# ------------------------------------------------------------------ round trips

NESTED_CASES = {
    "flat-dict": ({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3)},
                  {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3)}),
    "nested": ({"a": [np.ones(2, np.int64), {"b": np.full((1, 2), 7, np.int8)}], "c": (np.eye(2),)},
               {"a.0": np.ones(2, np.int64), "a.1.b": np.full((1, 2), 7, np.int8), "c.0": np.eye(2)}),
    "list-top": ([np.arange(3), np.arange(2.0)], {"0": np.arange(3), "1": np.arange(2.0)}),
    "bare-ndarray": (np.arange(4, dtype=np.uint16), {"": np.arange(4, dtype=np.uint16)}),
    "dtypes": ({"f16": np.ones(3, np.float16), "bool": np.array([True, False]),
                "u8": np.arange(5, dtype=np.uint8), "c64": np.array([1 + 2j], np.complex64)},
               {"f16": np.ones(3, np.float16), "bool": np.array([True, False]),
                "u8": np.arange(5, dtype=np.uint8), "c64": np.array([1 + 2j], np.complex64)}),
    "scalar-and-empty": ({"s": np.float32(2.5), "e": np.zeros((0, 4), np.float32)},
                         {"s": np.array(2.5, np.float32), "e": np.zeros((0, 4), np.float32)}),
    "non-contiguous": ({"t": np.arange(12.0).reshape(3, 4).T, "s": np.arange(10)[::3]},
                       {"t": np.arange(12.0).reshape(3, 4).T, "s": np.arange(10)[::3]}),
    "big-endian": ({"be": np.arange(4, dtype=">f4")}, {"be": np.arange(4, dtype="<f4")}),
}


@pytest.mark.parametrize("weights,expected", list(NESTED_CASES.values()), ids=list(NESTED_CASES))
def test_nested_array_round_trip(tmp_path, weights, expected):
    store = CheckpointStore(tmp_path)
    assert store.publish("policy", weights) == 0
    ckpt = store.load("policy")
    assert isinstance(ckpt, Checkpoint) and ckpt.step == 0 and ckpt.name == "policy"
    assert sorted(ckpt.weights) == sorted(expected) == list(ckpt.meta.keys)
    for key, want in expected.items():
        got = ckpt.weights[key]
        assert got.dtype == want.dtype.newbyteorder("=") and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want)
    # arrays are writable (views of one private buffer), and the file is standard safetensors
    for arr in ckpt.weights.values():
        assert arr.flags.writeable
    plain = safetensors.numpy.load_file(str(step_dir(store, "policy", 0) / "weights.safetensors"))
    for key, want in expected.items():
        np.testing.assert_array_equal(plain[key], want)
    as_torch = store.load("policy", framework="pt").weights
    for key, want in expected.items():
        np.testing.assert_array_equal(as_torch[key].numpy(), want)


def _tied_state_dict():
    lin = torch.nn.Linear(4, 3)
    sd = lin.state_dict()
    sd["tied"] = sd["weight"]  # shares storage, like tied embeddings
    return sd


STATE_DICTS = {
    "linear": lambda: torch.nn.Linear(4, 3).state_dict(),
    "bfloat16": lambda: torch.nn.Linear(4, 3).to(torch.bfloat16).state_dict(),
    "non-contiguous": lambda: {"t": torch.arange(12.0).reshape(3, 4).t(), "s": torch.arange(10)[::2]},
    "tied-weights": _tied_state_dict,
    "requires-grad": lambda: {"p": torch.nn.Parameter(torch.randn(5))},
    "mixed-numpy": lambda: {"t": torch.ones(2, dtype=torch.int32), "n": np.arange(3, dtype=np.float64)},
    "scalar-and-empty": lambda: {"s": torch.tensor(3.0), "e": torch.zeros(0, 2)},
}


@pytest.mark.parametrize("make", list(STATE_DICTS.values()), ids=list(STATE_DICTS))
def test_state_dict_round_trip(tmp_path, make):
    sd = make()
    store = CheckpointStore(tmp_path)
    store.publish("policy", sd)
    got = store.load("policy", framework="pt").weights
    assert sorted(got) == sorted(sd)
    for key, value in sd.items():
        want = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
        assert got[key].dtype == want.dtype and got[key].shape == want.shape
        assert torch.equal(got[key], want.detach()), key
    torch.nn.Module.load_state_dict  # the loaded dict feeds load_state_dict directly
    if any(v.dtype == torch.bfloat16 for v in got.values()):
        with pytest.raises(ConfigError, match="framework='pt'"):
            store.load("policy")


def test_state_dict_loads_into_module(tmp_path):
    src, dst = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    store = CheckpointStore(tmp_path)
    store.publish("policy", src.state_dict())
    dst.load_state_dict(store.load("policy", framework="pt").weights)
    x = torch.randn(2, 4)
    assert torch.equal(src(x), dst(x))
    np_weights = store.load("policy").weights  # float32 state dicts read fine as numpy too
    np.testing.assert_array_equal(np_weights["weight"], src.weight.detach().numpy())


BAD_WEIGHTS = {
    "python-float": ({"a": 1.0}, "is a float"),
    "int-key": ({1: np.zeros(2)}, "dict keys must be str, got int 1"),
    "object-dtype": ({"a": np.array([object()])}, "cannot store"),
    "colliding-keys": ({"a.b": np.zeros(1), "a": {"b": np.zeros(1)}}, "twice"),
    "string": ("weights", "is a str"),
}


@pytest.mark.parametrize("weights,match", list(BAD_WEIGHTS.values()), ids=list(BAD_WEIGHTS))
def test_bad_weights_are_config_errors(tmp_path, weights, match):
    store = CheckpointStore(tmp_path / "store")
    with pytest.raises(ConfigError, match=match):
        store.publish("policy", weights)
    assert not (tmp_path / "store" / "policy" / "steps").exists()


# ------------------------------------------------------------------ steps


def test_root_is_created_lazily_and_steps_increment(tmp_path):
    root = tmp_path / "deep" / "store"
    store = CheckpointStore(root)
    assert not root.exists()
    assert store.latest("policy") is None and store.steps("policy") == [] and store.names() == []
    assert [store.publish("policy", {"w": np.zeros(1)}) for _ in range(3)] == [0, 1, 2]
    assert store.publish("policy", {"w": np.zeros(1)}, step=10) == 10
    assert store.publish("policy", {"w": np.zeros(1)}) == 11
    assert store.latest("policy") == 11 and store.steps("policy") == [0, 1, 2, 10, 11]
    store.publish("value", [np.zeros(1)], step=5)
    assert store.names() == ["policy", "value"]
    meta = store.meta("policy")
    assert isinstance(meta, StepMeta) and meta.step == 11 and meta.keys == ("w",)
    assert meta.nbytes == (step_dir(store, "policy", 11) / "weights.safetensors").stat().st_size
    assert abs(meta.time - time.time()) < 60
    assert tmp_entries(root / "policy" / ".tmp") == []


@pytest.mark.parametrize("step", [7, 5], ids=["duplicate", "stale"])
def test_stale_or_duplicate_step_is_a_conflict(tmp_path, step):
    store = CheckpointStore(tmp_path)
    store.publish("policy", {"w": np.full(2, 7.0)}, step=7)
    with pytest.raises(StepConflictError) as info:
        store.publish("policy", {"w": np.zeros(2)}, step=step)
    assert str(info.value).startswith(
        f"step {step} of 'policy' is not greater than the latest published step 7; steps only grow"
    )
    err = info.value
    assert (err.name, err.step, err.latest) == ("policy", step, 7)
    assert isinstance(err, ValueError) and isinstance(err, StoreError)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is StepConflictError and again.latest == 7
    np.testing.assert_array_equal(store.load("policy", 7).weights["w"], np.full(2, 7.0))
    assert store.steps("policy") == [7]


def test_resolve_and_load_snap_down(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=10)
    for step in (3, 6, 9):
        store.publish("policy", {"w": np.full(1, step)}, step=step)
    assert [store.resolve("policy", s) for s in (3, 4, 5, 6, 8, 9, 100, -1)] == [3, 3, 3, 6, 6, 9, 9, 9]
    assert store.load("policy", 8).step == 6
    assert store.load("policy", 8).weights["w"][0] == 6
    assert store.meta("policy", 4).step == 3
    with pytest.raises(StepNotFoundError, match="no kept step of 'policy' at or below 2"):
        store.load("policy", 2)
    with pytest.raises(StepNotFoundError, match="publish one first"):
        store.resolve("value")
    with pytest.raises(ConfigError, match="step must be -1"):
        store.resolve("policy", -2)


def test_exact_meta_is_that_step_or_an_error_never_a_snap(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=10)
    for step in (10, 20):
        store.publish("policy", {"w": np.zeros(1)}, step=step)
    assert store.meta("policy", 15).step == 10
    assert store.meta("policy", 20, exact=True).step == 20
    with pytest.raises(StepNotFoundError, match=r"step 15 of 'policy' is not kept .* the kept steps are \[10, 20\]"):
        store.meta("policy", 15, exact=True)


def test_latest_falls_back_when_pointer_is_missing_or_dangling(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=10)
    for step in range(3):
        store.publish("policy", {"w": np.full(1, step)})
    latest_file = store.model_dir("policy") / "LATEST"
    latest_file.unlink()
    assert store.latest("policy") == 2
    latest_file.write_text("9\n")  # points at a step that does not exist
    assert store.latest("policy") == 2 and store.load("policy").step == 2
    # a step renamed into place but never made latest (publisher killed) stays hidden
    os.rename(step_dir(store, "policy", 2), store.model_dir("policy") / "moved")
    latest_file.write_text("1\n")
    os.rename(store.model_dir("policy") / "moved", step_dir(store, "policy", 2))
    assert store.latest("policy") == 1 and store.steps("policy") == [0, 1]
    # ...and the next publish steps past it instead of conflicting forever
    assert store.publish("policy", {"w": np.zeros(1)}) == 3


# ------------------------------------------------------------------ corruption


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_fails_checksum(tmp_path):
    store = CheckpointStore(tmp_path)
    store.publish("policy", {"w": np.arange(100, dtype=np.float32)}, step=12)
    path = step_dir(store, "policy", 12) / "weights.safetensors"
    _flip_byte(path, path.stat().st_size - 3)
    with pytest.raises(CorruptCheckpointError, match=r"step 12 of 'policy' is corrupt: sha256 mismatch") as info:
        store.load("policy")
    assert "republish it or load another step" in str(info.value)
    store.load("policy", verify=False)  # the layout is intact, only the data changed


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_truncated_file_is_corrupt(tmp_path, verify):
    store = CheckpointStore(tmp_path)
    store.publish("policy", {"w": np.arange(100, dtype=np.float32)})
    path = step_dir(store, "policy", 0) / "weights.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    match = "size mismatch" if verify else "not a valid safetensors file"
    with pytest.raises(CorruptCheckpointError, match=match):
        store.load("policy", verify=verify)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00" * 4, b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      xx",
     b"\x20\x00\x00\x00\x00\x00\x00\x00" + b'{"w":{"dtype":"F32","shape":[9],"data_offsets":[0,36]}}'[:32]],
    ids=["empty", "short", "huge-header", "bad-json", "cut-header"],
)
def test_garbage_with_matching_checksum_is_corrupt(tmp_path, garbage):
    store = CheckpointStore(tmp_path)
    store.publish("policy", {"w": np.zeros(9, np.float32)})
    folder = step_dir(store, "policy", 0)
    (folder / "weights.safetensors").write_bytes(garbage)
    meta = json.loads((folder / "meta.json").read_text())
    import hashlib

    meta.update(nbytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="not a valid safetensors file") as info:
        store.load("policy")
    assert info.value.__cause__ is not None


def test_unreadable_meta_is_corrupt(tmp_path):
    store = CheckpointStore(tmp_path)
    store.publish("policy", {"w": np.zeros(1)})
    (step_dir(store, "policy", 0) / "meta.json").write_text("{")
    with pytest.raises(CorruptCheckpointError, match="meta.json is unreadable"):
        store.meta("policy")


# ------------------------------------------------------------------ retention


def test_retention_keeps_newest_and_checkpoints_and_export(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3, checkpoint_interval=4)
    export = store.export_dir("policy")
    export.mkdir(parents=True)
    (export / "model.pt2").write_bytes(b"exported")
    for step in range(13):
        store.publish("policy", {"w": np.full(1, step)})
    assert store.steps("policy") == [0, 4, 8, 10, 11, 12]
    assert [store.meta("policy", s).checkpoint for s in store.steps("policy")] == [True, True, True, False, False, True]
    assert (export / "model.pt2").read_bytes() == b"exported"
    assert store.load("policy", 7).step == 4  # clone of a removed step snaps to a checkpoint
    assert tmp_entries(store.model_dir("policy") / ".tmp") == []
    assert store.names() == ["policy"]


def test_int_interval_counts_from_the_previous_checkpoint_as_bray_does(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1, checkpoint_interval=4)
    for step in (3, 5, 6, 7, 8, 12):  # steps need not start at 0 nor be consecutive
        store.publish("policy", {"w": np.zeros(1)}, step=step)
    # 3 starts the pool (Bray keeps step 0), 7 is 4 after it, 12 is 5 after 7; 8 is not
    assert store.checkpoint_steps("policy") == [3, 7, 12]


def test_float_interval_grows_with_the_step_as_bray_does(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1, checkpoint_interval=2.5)
    for _ in range(200):
        store.publish("policy", {"w": np.zeros(1)})
    # below step 10 the interval is 2; from 10 it is int(0.5 * 10) = 5 (one digit in step // 10),
    # from 100 it is int(0.5 * 100) = 50 (two digits); each counts from the previous checkpoint
    assert store.checkpoint_steps("policy") == [0, 2, 4, 6, 8, *range(13, 99, 5), 148, 198]


def test_retention_by_elapsed_time(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1, checkpoint_interval_s=0.3)
    store.publish("policy", {"w": np.zeros(1)})  # the first step starts the pool
    store.publish("policy", {"w": np.zeros(1)})
    time.sleep(0.35)
    store.publish("policy", {"w": np.zeros(1)})
    store.publish("policy", {"w": np.zeros(1)})
    assert store.steps("policy") == [0, 2, 3]
    assert [store.meta("policy", s).checkpoint for s in (0, 2, 3)] == [True, True, False]


def test_a_fresh_hold_keeps_due_steps_until_it_moves_past_them(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    store.hold_steps("policy", holder="watch-a", every=10, above=-1, ttl_s=3600)
    for _ in range(35):
        store.publish("policy", {"w": np.zeros(1)})
    assert store.steps("policy") == [0, 10, 20, 30, 33, 34]  # every 10th held, the newest two
    store.hold_steps("policy", holder="watch-a", every=10, above=20, ttl_s=3600)  # 0..20 archived
    store.publish("policy", {"w": np.zeros(1)})
    assert store.steps("policy") == [30, 34, 35]
    store.release_hold("policy", "watch-a")
    store.publish("policy", {"w": np.zeros(1)})
    assert store.steps("policy") == [35, 36]
    assert list((store.model_dir("policy") / ".holds").iterdir()) == []


def test_a_stale_hold_is_ignored_and_the_steps_it_lost_are_recorded(tmp_path):
    """A dead watcher's hold must not make the store grow for ever."""
    store = CheckpointStore(tmp_path, keep_last=2)
    store.hold_steps("policy", holder="watch-dead", every=10, above=5, ttl_s=3600)
    hold = store.model_dir("policy") / ".holds" / "watch-dead.json"
    doc = json.loads(hold.read_text())
    hold.write_text(json.dumps({**doc, "until": time.time() - 1}))  # not refreshed in time
    for _ in range(25):
        store.publish("policy", {"w": np.zeros(1)})
    assert store.steps("policy") == [23, 24]
    lost = store.lost_steps("policy", "watch-dead")
    assert sorted(lost) == [10, 20]  # 0 is not above 5
    assert "keep_last=2" in lost[20] and "hold of watch-dead was stale" in lost[20]
    assert store.lost_steps("policy", "watch-other") == {}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every": 0}, "every must be an integer >= 1, got 0"),
    ({"above": -2}, "above must be a step, or -1 to hold from step 0, got -2"),
    ({"ttl_s": 0}, "ttl_s must be a number of seconds > 0, got 0"),
    ({"holder": "a/b"}, "holder must be 1-128 characters"),
], ids=["every", "above", "ttl", "holder"])
def test_hold_arguments_are_validated(tmp_path, kwargs, message):
    args = {"holder": "w", "every": 10, "above": 0, "ttl_s": 60.0, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(message)):
        CheckpointStore(tmp_path).hold_steps("policy", **args)


def test_stale_temp_dirs_are_swept(tmp_path):
    store = CheckpointStore(tmp_path)
    store.publish("policy", {"w": np.zeros(1)})
    tmp = store.model_dir("policy") / ".tmp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    host = socket.gethostname()
    (tmp / f"pub-{host}-{dead.pid}-aaaa").mkdir()  # owner is dead
    (tmp / f"pub-{host}-{os.getpid()}-bbbb").mkdir()  # owner alive, fresh: in progress
    old = tmp / "pub-otherhost-1-cccc"
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # untouched for an hour
    store.publish("policy", {"w": np.zeros(1)})
    assert sorted(p.name for p in tmp.iterdir()) == [f"pub-{host}-{os.getpid()}-bbbb"]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "-x", "a/b", "..", "a b", "x" * 129, "naïve", 3],
    ids=["empty", "dot-first", "dash-first", "slash", "dotdot", "space", "too-long", "non-ascii", "not-str"],
)
def test_bad_names_are_rejected(tmp_path, name):
    store = CheckpointStore(tmp_path)
    with pytest.raises(ConfigError, match="letters, digits, '_', '.' or '-'"):
        store.publish(name, {"w": np.zeros(1)})
    with pytest.raises(ConfigError):
        store.latest(name)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["policy", "P0", "a.b-c_d", "9" * 128], ids=["word", "digits", "punct", "max-len"])
def test_good_names(tmp_path, name):
    store = CheckpointStore(tmp_path)
    store.publish(name, {"w": np.zeros(1)})
    assert store.names() == [name] and store.model_dir(name) == tmp_path / name


@pytest.mark.parametrize(
    "kwargs,message",
    [({"keep_last": 0}, "keep_last must be an integer >= 1, got 0"),
     ({"keep_last": 2.5}, "keep_last must be an integer >= 1, got 2.5"),
     ({"checkpoint_interval": -1}, "checkpoint_interval must be an integer number of steps >= 0"),
     ({"checkpoint_interval": float("inf")}, r"or a float B.F \(a growing interval, Bray's meaning\), got inf"),
     ({"checkpoint_interval_s": float("nan")}, "checkpoint_interval_s must be a finite number")],
    ids=["keep-zero", "keep-float", "interval-negative", "interval-inf", "interval-s-nan"],
)
def test_options_are_validated(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CheckpointStore(tmp_path, **kwargs)


def test_load_arguments_are_validated(tmp_path):
    store = CheckpointStore(tmp_path)
    store.publish("policy", {"w": np.zeros(1)})
    with pytest.raises(ConfigError, match="framework must be 'numpy' or 'pt'"):
        store.load("policy", framework="jax")
    with pytest.raises(ConfigError, match="numpy arrays live on the cpu"):
        store.load("policy", device="cuda")
    with pytest.raises(ConfigError, match="step must be an integer"):
        store.publish("policy", {"w": np.zeros(1)}, step=-3)


# ------------------------------------------------------------------ watch


@pytest.mark.parametrize("poll_interval_s", [None, 0.05], ids=["inotify", "polling"])
def test_watch_delivers_new_steps_in_order(tmp_path, poll_interval_s, capsys):
    store = CheckpointStore(tmp_path / "not-yet")  # neither root nor name dir exist yet
    got: list[int] = []
    seen_at: dict[int, float] = {}

    def callback(step: int) -> None:
        seen_at[step] = time.perf_counter()
        got.append(step)
        if step == 1:
            raise RuntimeError("a failing callback must not stop the watch")

    with store.watch("policy", callback, poll_interval_s=poll_interval_s) as watch:
        assert watch.polling is (poll_interval_s is not None)
        latencies = []
        for step in range(8):
            started = time.perf_counter()
            store.publish("policy", {"w": np.full(4, step)})
            assert wait_for(lambda: got and got[-1] == step), (step, got)
            latencies.append(seen_at[step] - started)
        for _ in range(5):  # bursts may coalesce, but never go backwards
            store.publish("policy", {"w": np.zeros(1)})
        assert wait_for(lambda: got[-1] == 12), got
    assert got == sorted(set(got)) and got[:8] == list(range(8))
    with capsys.disabled():
        kind = "polling 50 ms" if poll_interval_s else "inotify"
        print(f"\n[watch {kind}] publish->callback latency: median "
              f"{statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms")
    if poll_interval_s is None:
        # Not a speed check: the 5 s safety-net re-check would also deliver, so this only
        # proves inotify events did the waking.
        assert statistics.median(latencies) < 2.0


def test_watch_ignores_steps_before_it_started_and_stops(tmp_path):
    store = CheckpointStore(tmp_path)
    store.publish("policy", {"w": np.zeros(1)}, step=4)
    got: list[int] = []
    watch = store.watch("policy", got.append)
    store.publish("policy", {"w": np.zeros(1)})
    assert wait_for(lambda: got == [5])
    watch.stop()
    watch.stop()  # idempotent
    store.publish("policy", {"w": np.zeros(1)})
    time.sleep(0.1)
    assert got == [5]


# ------------------------------------------------------------------ crashes and races

_PUBLISHER = r"""
import sys
import numpy as np
from bray.errors import StepConflictError
from bray.store import CheckpointStore

store = CheckpointStore(sys.argv[1], keep_last=3, checkpoint_interval=10)
step = (store.latest("policy") or 0) + 1
published = 0
while True:
    weights = {"big": np.full((256, 1024), step, np.float32), "small": [np.full(7, step, np.int64)]}
    try:
        store.publish("policy", weights, step=step)
        step += 1
        published += 1
        if published == 1:  # every run publishes at least once, however loaded the machine
            print("ready", flush=True)
    except StepConflictError as err:  # the last run died after its rename, before LATEST
        step = err.latest + 1
"""


def _check_step_content(ckpt: Checkpoint) -> None:
    assert ckpt.weights["big"].shape == (256, 1024)
    assert (ckpt.weights["big"] == ckpt.step).all(), ckpt.step
    assert (ckpt.weights["small.0"] == ckpt.step).all(), ckpt.step


def test_sigkilled_publisher_never_exposes_a_partial_step(tmp_path, capsys):
    root = tmp_path / "store"
    store = CheckpointStore(root, keep_last=3, checkpoint_interval=10)
    stop = threading.Event()
    seen: list[int] = []
    failures: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                ckpt = store.load("policy")  # verify=True: size and sha256
                _check_step_content(ckpt)
                if seen and ckpt.step < seen[-1]:
                    raise AssertionError(f"latest went backwards: {seen[-1]} -> {ckpt.step}")
                if not seen or ckpt.step != seen[-1]:
                    seen.append(ckpt.step)
            except StepNotFoundError as err:
                if seen:  # once a step was seen, some step must always be readable
                    failures.append(err)
                    return
                time.sleep(0.001)  # nothing published yet
            except BaseException as err:  # noqa: BLE001 - reported below
                failures.append(err)
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    rng = random.Random(1234)
    kills = mid_publish = 0
    deadline = time.monotonic() + 90  # a bound, not a timing: a loaded machine makes fewer kills
    try:
        while kills < 40 and time.monotonic() < deadline and not failures:
            proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(root)],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.06))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            kills += 1
            tmp_dir = root / "policy" / ".tmp"
            if tmp_dir.is_dir() and any(p.name.startswith("pub-") for p in tmp_dir.iterdir()):
                mid_publish += 1  # killed with a half-written step in .tmp
    finally:
        stop.set()
        thread.join(10)
    assert not failures, failures[0]
    assert kills >= 10, f"only {kills} publisher runs in 90 s"
    with capsys.disabled():
        print(f"\n[sigkill] {kills} kills, {mid_publish} mid-publish, reader saw {len(seen)} steps")
    assert mid_publish >= 1
    latest = store.latest("policy")
    assert latest is not None and latest >= kills  # each run published, then was killed publishing
    assert len(seen) > 10
    for step in store.steps("policy"):
        _check_step_content(store.load("policy", step))
    # one clean publish sweeps whatever the killed publishers left in .tmp
    store.publish("policy", {"big": np.zeros((256, 1024), np.float32), "small": [np.zeros(7, np.int64)]})
    assert tmp_entries(root / "policy" / ".tmp") == []


def _race_worker(root: str, wid: int, steps: list[int], barrier, results) -> None:
    store = CheckpointStore(root, keep_last=1000)
    barrier.wait()
    outcome = []
    for step in steps:
        try:
            store.publish("policy", {"w": np.full(64, wid * 1000 + step, np.int64)}, step=step)
            outcome.append((step, "won"))
        except StepConflictError:
            outcome.append((step, "lost"))
        except Exception as err:  # noqa: BLE001 - reported to the parent
            outcome.append((step, repr(err)))
    results.put((wid, outcome))


def test_concurrent_publishers_get_one_winner_per_step(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    workers, steps = 4, list(range(1, 21))
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), wid, steps, barrier, results))
             for wid in range(workers)]
    for proc in procs:
        proc.start()
    outcomes = dict(results.get(timeout=300) for _ in procs)  # a bound: spawning 4 pythons is slow under load
    for proc in procs:
        proc.join(120)  # a bound, not a timing: exiting 4 spawned pythons is slow under load
        assert proc.exitcode == 0
    store = CheckpointStore(tmp_path)
    for step in steps:
        per_worker = {wid: dict(outcomes[wid])[step] for wid in outcomes}
        assert set(per_worker.values()) <= {"won", "lost"}, per_worker
        winners = [wid for wid, what in per_worker.items() if what == "won"]
        assert len(winners) == 1, (step, per_worker)
        np.testing.assert_array_equal(store.load("policy", step).weights["w"],
                                      np.full(64, winners[0] * 1000 + step))
    assert store.steps("policy") == steps
    assert tmp_entries(tmp_path / "policy" / ".tmp") == []


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_or_read_only_disk_gives_store_write_error(small_tmpfs):
    store = CheckpointStore(small_tmpfs / "store")
    store.publish("policy", {"w": np.ones(128 * 1024, np.float32)})  # 512 KiB fits
    with pytest.raises(StoreWriteError, match="the disk refused the write.*the step was not published") as info:
        store.publish("policy", {"w": np.ones(768 * 1024, np.float32)})  # 3 MiB does not
    assert isinstance(info.value, OSError) and info.value.__cause__ is not None
    assert store.latest("policy") == 0 and store.steps("policy") == [0]
    assert tmp_entries(small_tmpfs / "store" / "policy" / ".tmp") == []
    np.testing.assert_array_equal(store.load("policy").weights["w"], np.ones(128 * 1024, np.float32))
    assert store.publish("policy", {"w": np.zeros(4)}) == 1  # consistent: publishing goes on

    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(StoreWriteError, match="Read-only file system"):
        store.publish("policy", {"w": np.zeros(4)})
    assert store.latest("policy") == 1 and store.load("policy").step == 1
