"""Load and fault helpers for the reliability tests (issue 7): callers, publishers, worker pids.

``run_callers`` drives N concurrent ``await rm.forward(...)`` loops for a while and records
what each caller saw: answers, failures, steps going backwards, answers that do not match
the step that claims to have produced them, and the longest stretch with no answer at all
(the gap a fault caused). The model is :class:`tests.models.StepProbe`, whose output on
``ones((1, n))`` is ``step * (n + 1)``, so every answer can be checked against its step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

from tests.models import probe_weights

__all__ = ["CallerReport", "Publisher", "probe_input", "probe_ok", "run_callers", "wait_workers", "worker_pids"]


def probe_input(n: int = 4) -> np.ndarray:
    return np.ones((1, n), np.float32)


def probe_ok(out: np.ndarray, step: int, n: int = 4) -> bool:
    """True when ``out`` is what StepProbe with every weight equal to ``step`` answers on ones."""
    return bool(np.allclose(out, step * (n + 1), rtol=1e-6))


@dataclass
class CallerReport:
    """What the callers saw during one run."""

    callers: int
    seconds: float
    answers: int = 0
    failures: list[str] = field(default_factory=list)
    backwards: int = 0
    inconsistent: list[tuple[int, float]] = field(default_factory=list)
    max_latency_s: float = 0.0
    gap_s: float = 0.0
    first_steps: list[int] = field(default_factory=list)
    last_steps: list[int] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.callers} callers, {self.seconds:.1f} s: {self.answers} answered, "
                f"{len(self.failures)} failed, {self.backwards} went backwards, "
                f"{len(self.inconsistent)} inconsistent, max latency {self.max_latency_s:.2f} s, "
                f"longest gap without any answer {self.gap_s:.2f} s")


async def _run(rm: Any, *, callers: int, seconds: float, n: int,
               during: Callable[[], Awaitable[None]] | None) -> CallerReport:
    report = CallerReport(callers=callers, seconds=seconds)
    x = probe_input(n)
    stop_at = time.monotonic() + seconds
    answered_at: list[float] = []

    async def caller() -> None:
        prev, first = -1, None
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                out, step = await rm.forward(x, batch=True, return_step=True)
            except Exception as err:  # every failure is a finding: record it, keep calling
                report.failures.append(f"{type(err).__name__}: {err}")
                await asyncio.sleep(0.05)
                continue
            now = time.monotonic()
            answered_at.append(now)
            report.answers += 1
            report.max_latency_s = max(report.max_latency_s, now - started)
            if not probe_ok(out, step, n):
                report.inconsistent.append((step, float(np.asarray(out).ravel()[0])))
            if step < prev:
                report.backwards += 1
            prev = step
            first = step if first is None else first
        report.first_steps.append(-1 if first is None else first)
        report.last_steps.append(prev)

    tasks = [caller() for _ in range(callers)]
    if during is not None:
        tasks.append(during())
    began = time.monotonic()
    await asyncio.gather(*tasks)
    stamps = [began, *sorted(answered_at), stop_at]
    report.gap_s = max(b - a for a, b in zip(stamps, stamps[1:]))
    return report


def run_callers(rm: Any, *, callers: int, seconds: float, n: int = 4,
                during: Callable[[], Awaitable[None]] | None = None) -> CallerReport:
    """Run ``callers`` forward loops for ``seconds`` (and ``during()`` beside them)."""
    return asyncio.run(_run(rm, callers=callers, seconds=seconds, n=n, during=during))


class Publisher:
    """Publishes StepProbe weights (every weight = the step) every ``interval_s`` from a thread.

    Attributes:
        published: the steps published, in order.
        errors: exceptions raised by ``publish_weights``.
    """

    def __init__(self, rm: Any, *, interval_s: float = 0.1, n: int = 4) -> None:
        self.rm, self.interval_s, self.n = rm, interval_s, n
        self.published: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-publisher", daemon=True)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            step = max(self.rm.step, 0) + 1
            try:
                self.published.append(int(self.rm.publish_weights(probe_weights(step, self.n), step=step)))
            except Exception as err:
                self.errors.append(err)
            due = max(due + self.interval_s, time.monotonic())  # a fixed cadence, not interval + publish time
            self._stop.wait(due - time.monotonic())

    def __enter__(self) -> "Publisher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def worker_pids(client: Any, name: str, version: str | None = None) -> dict[int, str]:
    """``{pid: status}`` of a version's workers, from the management API's describe."""
    (desc,) = client.describe(name, version) if version is not None else [client.default_version(name)]
    return {int(w["pid"]): str(w.get("status")) for w in desc.raw.get("workers", []) if w.get("pid")}


def wait_workers(client: Any, name: str, version: str, *, count: int, timeout_s: float = 60.0,
                 exclude: set[int] = frozenset()) -> tuple[dict[int, str], float]:
    """Wait until ``count`` workers are READY, none of them in ``exclude``. Returns them and the wait."""
    started = time.monotonic()
    while True:
        pids = worker_pids(client, name, version)
        ready = {p for p, s in pids.items() if s == "READY" and p not in exclude}
        if len(ready) >= count:
            return pids, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{name} {version}: workers {pids} not {count} READY (excluding {exclude}) in {timeout_s} s")
        time.sleep(0.05)
