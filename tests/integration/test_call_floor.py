"""Issue 24's workarounds inside a real TorchServe (bundled config, loopback).

The front end: the bundled config's ``vmargs`` keep the fork-join common pool in use for
the batch writes TorchServe 0.12's ``WorkerThread`` hands to ``CompletableFuture.runAsync``
(at the default parallelism of cores - 1, a 2-core machine started a Java thread per batch).

A server started with ``BRAY_WORKER_TIMELINE`` serves the policy MLP through
``RemoteModel``; every worker of the bray handler must say which workarounds it runs
(buffered reads, one-pass parse of the frontend's messages, the quiet per-batch log) and stamp every batch in order, one line per batch answered. Answers are
checked against the module. Nothing is timed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import bray
from bray.handlers.ts_worker import TIMELINE_ENV, WorkerTimeline
from tests.models import PolicyMLP
from tests.serving import init_for, unregister_all

NAME = "call-floor-policy"


def _last_pid() -> int:
    return int(Path("/proc/sys/kernel/ns_last_pid").read_text())


def test_the_front_end_writes_batches_on_the_common_pool_not_a_new_thread_each(torchserve, tmp_path: Path) -> None:
    """200 lone calls start no thread per batch in the front end: every thread (and process) of the
    machine takes a new id, so ids are counted (a thread per batch takes at least 200 of them), and
    the common pool's workers are among the JVM's threads (their names are Linux thread names)."""
    init_for(torchserve, tmp_path / "store")
    rm = bray.RemoteModel("fj-policy", model=PolicyMLP().eval(), forward_args=(torch.zeros(4, 64),), num_workers=1,
                          max_batch_size=8, node_proxy=False)
    obs = np.zeros((1, 64), np.float32)
    try:
        for _ in range(20):
            rm(obs)
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        before = _last_pid()
        for _ in range(200):
            rm(obs)
        taken = (_last_pid() - before) % pid_max
        names = [p.read_text().strip() for p in Path(f"/proc/{torchserve.pid}/task").glob("*/comm")]
    finally:
        rm.close()
        unregister_all(torchserve, {"fj-policy"})
    assert taken < 100, f"{taken} thread or process ids taken during 200 calls: a thread per batch again?"
    assert any(n.startswith("ForkJoinPool") for n in names), sorted(set(names))


def test_workers_run_the_patches_and_stamp_each_batch(torchserve_factory, tmp_path: Path) -> None:
    timeline = tmp_path / "timeline"
    server = torchserve_factory(extra_env={TIMELINE_ENV: str(timeline)})
    init_for(server, tmp_path / "store")
    model = PolicyMLP().eval()
    rm = bray.RemoteModel(NAME, model=model, forward_args=(torch.zeros(4, 64),), num_workers=2, max_batch_size=8,
                          node_proxy=False)
    try:
        rng = np.random.default_rng(0)
        calls = 40
        for _ in range(calls):
            obs = rng.standard_normal((1, 64), dtype=np.float32)
            got = rm(obs)
            with torch.no_grad():
                want = model(torch.from_numpy(obs)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        rm.close()
    files = sorted(timeline.glob("worker-*.tsv"))
    assert files, f"no worker wrote a timeline in {timeline}"
    batches = 0
    for path in files:
        lines = path.read_text().splitlines()
        assert lines[0].split(": ", 1)[1].split() == ["buffered_reads", "fast_frames", "quiet_per_batch_log"], lines[0]
        for line in lines[1:]:
            requests, *stamps = (int(v) for v in line.split("\t"))
            marks = dict(zip(WorkerTimeline.MARKS, stamps))
            assert requests >= 1 and all(marks.values()), line
            assert list(marks.values()) == sorted(marks.values()), marks  # woke <= read <= ... <= sent
            batches += 1
    # A batch's line is written when its worker reads the next one: the last of each may be missing.
    assert calls - len(files) <= batches <= calls + 2 * len(files)
