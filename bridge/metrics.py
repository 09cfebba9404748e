"""Client-side Prometheus metrics: what the callers of ``RemoteModel`` see (policy lag).

Off by default. ``RemoteModel(..., metrics_port=9500)`` or ``BRAY_METRICS_PORT=9500``
(``host:port`` binds another address; the default host is 127.0.0.1) starts one HTTP
exporter per process, with one registry, on the first model that asks; every
``RemoteModel`` of the process with a port is reported there. Values are read when
Prometheus scrapes (a collector); a forward pays a clock read and a lock for the
``bray_client_forward_*`` series, and only while the exporter is on.

=======================================  =========  ==========================================
metric                                   type       meaning
=======================================  =========  ==========================================
``bray_client_policy_lag_steps``         gauge      latest published step minus the newest
                                                    step that has answered this process's calls
``bray_client_answered_step``            gauge      the newest step that has answered this
                                                    process
``bray_client_published_step``           gauge      the store's latest step of the model
``bray_client_forward_calls_total``      counter    answered ``forward`` / ``__call__`` calls,
                                                    one per call whatever its batch size
``bray_client_forward_samples_total``    counter    samples in those calls (the sum of their
                                                    batch dimensions)
``bray_client_forward_seconds``          histogram  time of one answered call, from its start
                                                    to its answer, in seconds
``bray_client_requests_total``           counter    HTTP requests this process sent to
                                                    TorchServe (client batching merges calls)
``bray_client_forwards_total``           counter    deprecated, removed in the next release:
                                                    calls (not samples) sent over HTTP or the
                                                    node proxy; use
                                                    ``bray_client_forward_calls_total``
=======================================  =========  ==========================================

Labels: ``model`` (the TorchServe model name) and ``version`` (the registered version);
the three ``bray_client_forward_*`` series also ``route``: ``http`` (this process's own
requests to TorchServe), ``proxy`` (answered through the node proxy) or ``local``
(``local_mode``). Lag is only reported once the process has been answered. Calls are
counted when answered; a call that raised is in none of them.

This goes beyond Bray, which has no metrics exporter.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any, Iterator

from bray.locations import METRICS_ENV_VAR as ENV_VAR
from bray.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from bray.bridge.remote_model import RemoteModel

__all__ = ["CLIENT_METRIC_NAMES", "CallStats", "FORWARD_SECONDS_BUCKETS", "track"]

CLIENT_METRIC_NAMES = (
    "bray_client_policy_lag_steps",
    "bray_client_answered_step",
    "bray_client_published_step",
    "bray_client_forward_calls_total",
    "bray_client_forward_samples_total",
    "bray_client_forward_seconds",
    "bray_client_requests_total",
    "bray_client_forwards_total",
)

#: Upper bounds of ``bray_client_forward_seconds``'s buckets: a call through the node proxy
#: takes about a millisecond on one machine, one that waits for a busy server seconds.
FORWARD_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

_lock = threading.Lock()
_models: "weakref.WeakKeyDictionary[RemoteModel, CallStats]" = weakref.WeakKeyDictionary()
_exporter: tuple[str, int, Any] | None = None  # (host, port, server) of this process


def track(model: RemoteModel, address: tuple[str, int]) -> CallStats:
    """Report ``model`` on this process's exporter, starting it at ``address`` if needed.

    Returns:
        Where ``model`` records its answered calls (reported as ``bray_client_forward_*``).

    Raises:
        ConfigError: the exporter already runs on another address (one per process), or
            the port cannot be bound, or ``prometheus-client`` is not installed.
    """
    global _exporter
    with _lock:
        if _exporter is None:
            try:
                from prometheus_client import CollectorRegistry, start_http_server
            except ImportError as err:
                raise ConfigError(
                    "metrics_port needs prometheus-client: pip install 'bray-serve[metrics]' "
                    "(or prometheus-client)") from err
            registry = CollectorRegistry(auto_describe=True)
            registry.register(_Collector())
            try:
                server, _thread = start_http_server(address[1], addr=address[0], registry=registry)
            except OSError as err:
                raise ConfigError(f"cannot serve client metrics on {address[0]}:{address[1]}: {err}; "
                                  f"choose another metrics_port ({ENV_VAR})") from err
            _exporter = (address[0], address[1], server)
        elif _exporter[:2] != address:
            raise ConfigError(
                f"this process already serves client metrics on {_exporter[0]}:{_exporter[1]}; every "
                f"RemoteModel of a process shares that exporter, got metrics_port {address[0]}:{address[1]}")
        stats = _models[model] = CallStats()
        return stats


class CallStats:
    """One model's answered calls by route: calls, samples and a latency histogram.

    :func:`track` makes one per model, so only a model whose metrics are on pays for it.
    Thread-safe (sync callers run on many threads).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # route -> [calls, samples, sum of seconds, count per bucket (the last: +Inf)]
        self._routes: dict[str, list[Any]] = {}

    def record(self, route: str, *, samples: int, seconds: float) -> None:
        """One answered call of ``samples`` samples that took ``seconds``."""
        i = bisect.bisect_left(FORWARD_SECONDS_BUCKETS, seconds)
        with self._lock:
            r = self._routes.get(route)
            if r is None:
                r = self._routes[route] = [0, 0, 0.0, [0] * (len(FORWARD_SECONDS_BUCKETS) + 1)]
            r[0] += 1
            r[1] += samples
            r[2] += seconds
            r[3][i] += 1

    def snapshot(self) -> dict[str, tuple[int, int, float, list[int]]]:
        """``{route: (calls, samples, seconds summed, cumulative bucket counts)}``."""
        with self._lock:
            return {route: (r[0], r[1], r[2], list(itertools.accumulate(r[3]))) for route, r in self._routes.items()}


class _Collector:
    """Reads every tracked model's figures at scrape time."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        labels = ["model", "version"]
        lag = GaugeMetricFamily("bray_client_policy_lag_steps",
                                "Latest published step minus the newest step that answered this process",
                                labels=labels)
        answered = GaugeMetricFamily("bray_client_answered_step", "Newest step that answered this process",
                                     labels=labels)
        published = GaugeMetricFamily("bray_client_published_step", "The store's latest step", labels=labels)
        by_route = [*labels, "route"]
        calls = CounterMetricFamily("bray_client_forward_calls",
                                    "Answered forward calls of this process, one per call whatever its batch size",
                                    labels=by_route)
        samples = CounterMetricFamily("bray_client_forward_samples",
                                      "Samples in this process's answered forward calls (sum of their batch dimensions)",
                                      labels=by_route)
        seconds = HistogramMetricFamily("bray_client_forward_seconds",
                                        "Time of one answered forward call of this process, start to answer, seconds",
                                        labels=by_route)
        requests = CounterMetricFamily("bray_client_requests", "HTTP requests this process sent to TorchServe",
                                       labels=labels)
        forwards = CounterMetricFamily("bray_client_forwards",
                                       "DEPRECATED, removed in the next release: forward calls (not samples) sent; "
                                       "use bray_client_forward_calls_total", labels=labels)
        bounds = [f"{b:g}" for b in FORWARD_SECONDS_BUCKETS] + ["+Inf"]
        with _lock:
            models = list(_models.items())
        for model, stats in models:
            values = [model.name, "" if model.local_mode else model.version]  # local mode serves no version
            latest = model.step
            seen = model.answered_step
            published.add_metric(values, latest)
            sent_calls, sent = model.batching_stats()
            forwards.add_metric(values, sent_calls)
            requests.add_metric(values, sent)
            for route, (n, n_samples, total_s, cumulative) in stats.snapshot().items():
                calls.add_metric([*values, route], n)
                samples.add_metric([*values, route], n_samples)
                seconds.add_metric([*values, route], buckets=list(zip(bounds, cumulative)), sum_value=total_s)
            if seen >= 0:
                answered.add_metric(values, seen)
                lag.add_metric(values, max(0, latest - seen))
        yield from (lag, answered, published, calls, samples, seconds, requests, forwards)

    def describe(self) -> list[Any]:
        return []  # names depend on nothing; describing would call collect at register time
