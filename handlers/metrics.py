"""The handler's Prometheus metrics, reported through TorchServe's custom metrics API.

TorchServe's frontend serves them on its metrics API (``metrics_address``, path
``/metrics``, no token) when the config says ``metrics_mode=prometheus``; the bundled one
does, with ``model_metrics_auto_detect=true`` so that metrics missing from TorchServe's
own ``metrics.yaml`` are registered on first sight with the type the worker gives.

======================================  =========  ==========================================
metric                                  type       meaning
======================================  =========  ==========================================
``bray_served_step``                    gauge      step the worker's next batch is served with
``bray_publish_to_served_seconds``      histogram  publish (the store's step time) to the swap
                                                   in this worker
``bray_weight_load_seconds``            gauge      load + prepare time of the last step
``bray_refused_steps_total``            counter    steps that failed to load (old weights kept)
``bray_requests_total``                 counter    requests answered (good or 4xx)
``bray_samples_total``                  counter    samples forwarded (sum of batch dimensions)
``bray_batches_total``                  counter    forwards (TorchServe batches with a good request)
``bray_max_batch_requests``             gauge      TorchServe's ``batchSize`` for this version
``bray_weight_sets_held``               gauge      clones' weight sets this worker holds
                                                   (``weight_sets.py``)
``bray_weight_sets_bytes``              gauge      their prepared weights, bytes (the budget is
                                                   ``--weight-sets-mb``)
``bray_weight_set_loads_total``         counter    weight-set steps loaded (a miss, or newer)
``bray_weight_set_misses_total``        counter    loads of a set this worker did not hold
``bray_weight_set_evictions_total``     counter    sets dropped, least recently used, to fit
======================================  =========  ==========================================

Every series has the labels ``model``, ``version`` and ``worker`` (the worker's pid), plus
``ModelName`` and ``Level`` which TorchServe's metrics cache adds to every backend metric
that lacks them (0.12, ``ts/metrics/metric_cache_abstract.py``): they are given here so
that every emission carries the same label set. Per-sample questions are ratios of
counters: samples per request is ``rate(bray_samples_total) / rate(bray_requests_total)``,
samples per batch ``rate(bray_samples_total) / rate(bray_batches_total)``, batch fill
``rate(bray_requests_total) / rate(bray_batches_total) / bray_max_batch_requests``.

Counters are summed here and reported once per ``period_s``: each report is a log line the
frontend parses, and a line per batch costs it more than the batch itself at small sizes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

__all__ = ["METRIC_NAMES", "ServingMetrics"]

log = logging.getLogger(__name__)

SERVED_STEP = "bray_served_step"
PUBLISH_TO_SERVED = "bray_publish_to_served_seconds"
WEIGHT_LOAD = "bray_weight_load_seconds"
REFUSED_STEPS = "bray_refused_steps_total"
REQUESTS = "bray_requests_total"
SAMPLES = "bray_samples_total"
BATCHES = "bray_batches_total"
MAX_BATCH = "bray_max_batch_requests"
SETS_HELD = "bray_weight_sets_held"
SETS_BYTES = "bray_weight_sets_bytes"
SET_LOADS = "bray_weight_set_loads_total"
SET_MISSES = "bray_weight_set_misses_total"
SET_EVICTIONS = "bray_weight_set_evictions_total"

METRIC_NAMES = (SERVED_STEP, PUBLISH_TO_SERVED, WEIGHT_LOAD, REFUSED_STEPS, REQUESTS, SAMPLES, BATCHES, MAX_BATCH,
                SETS_HELD, SETS_BYTES, SET_LOADS, SET_MISSES, SET_EVICTIONS)


class ServingMetrics:
    """Reports one worker's metrics through ``context.metrics`` (never raises).

    Args:
        metrics: TorchServe's ``context.metrics`` (``None``: report nothing).
        model: the model name; version: the registered version; worker: the worker's id.
        period_s: how often summed counters are reported.
    """

    def __init__(self, metrics: Any, *, model: str, version: str, worker: str | None = None,
                 period_s: float = 1.0) -> None:
        self._metrics = metrics
        self._labels = {"model": model, "version": version, "worker": worker or str(os.getpid()),
                        "ModelName": model, "Level": "Model"}
        self._period_s = period_s
        self._lock = threading.Lock()
        # Reported in this order, so a scrape between two lines still sees samples >=
        # requests >= batches.
        self._pending = {SAMPLES: 0, REQUESTS: 0, BATCHES: 0}
        self._reported_at = time.monotonic()

    def start(self, *, step: int, max_batch_requests: int) -> None:
        """First report: the step, the batch size, and every counter at 0 (so they exist)."""
        self.gauge(SERVED_STEP, step, "step")
        self.gauge(MAX_BATCH, max_batch_requests, "requests")
        for name in (REFUSED_STEPS, REQUESTS, SAMPLES, BATCHES):
            self._emit(name, 0, "count", "COUNTER")

    def swapped(self, step: int, *, load_s: float, published_time: float) -> None:
        """A new step is in: its number, its load time, and how long since its publish."""
        self.gauge(SERVED_STEP, step, "step")
        self.gauge(WEIGHT_LOAD, load_s, "s")
        # Wall clocks of the publisher and this worker: on one machine, or NTP-synced ones.
        self._emit(PUBLISH_TO_SERVED, max(0.0, time.time() - published_time), "s", "HISTOGRAM")

    def refused(self, step: int) -> None:
        """A step failed to load (watcher thread)."""
        self._emit(REFUSED_STEPS, 1, "count", "COUNTER")

    def batch(self, *, requests: int, samples: int, forwarded: bool) -> None:
        """Count one batch; report the sums when the period has passed."""
        with self._lock:
            self._pending[REQUESTS] += requests
            self._pending[SAMPLES] += samples
            self._pending[BATCHES] += int(forwarded)
            now = time.monotonic()
            if now - self._reported_at < self._period_s:
                return
            pending = {k: v for k, v in self._pending.items() if v}
            self._pending = dict.fromkeys(self._pending, 0)
            self._reported_at = now
        for name, value in pending.items():
            self._emit(name, value, "count", "COUNTER")

    def weight_set_loaded(self, *, miss: bool, evicted: int, held: int, nbytes: int) -> None:
        """A weight set's step was loaded (a miss or a newer step); ``held``/``nbytes`` after it."""
        self._emit(SET_LOADS, 1, "count", "COUNTER")
        self._emit(SET_MISSES, int(miss), "count", "COUNTER")
        self._emit(SET_EVICTIONS, evicted, "count", "COUNTER")
        self.gauge(SETS_HELD, held, "count")
        self.gauge(SETS_BYTES, nbytes, "bytes")

    def gauge(self, name: str, value: float, unit: str) -> None:
        self._emit(name, value, unit, "GAUGE")

    def _emit(self, name: str, value: float, unit: str, kind: str) -> None:
        if self._metrics is None:
            return
        try:
            from ts.metrics.dimension import Dimension
            from ts.metrics.metric_type_enum import MetricTypes

            dims = [Dimension(k, v) for k, v in self._labels.items()]
            self._metrics.add_metric(name, value, unit, dimensions=dims, metric_type=MetricTypes[kind])
        except Exception:  # metrics must never fail a batch
            log.debug("bray: metric %s not recorded", name, exc_info=True)
