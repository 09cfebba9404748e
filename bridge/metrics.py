"""Client-side Prometheus metrics: what the callers of ``RemoteModel`` see (policy lag).

Off by default. ``RemoteModel(..., metrics_port=9500)`` or ``BRAY_METRICS_PORT=9500``
(``host:port`` binds another address; the default host is 127.0.0.1) starts one HTTP
exporter per process, with one registry, on the first model that asks; every
``RemoteModel`` of the process with a port is reported there. Values are read when
Prometheus scrapes (a collector), so a forward pays nothing for them.

=================================  =======  ===============================================
metric                             type     meaning
=================================  =======  ===============================================
``bray_client_policy_lag_steps``   gauge    latest published step minus the newest step
                                            that has answered this process's calls
``bray_client_answered_step``      gauge    the newest step that has answered this process
``bray_client_published_step``     gauge    the store's latest step of the model
``bray_client_forwards_total``     counter  ``forward`` calls (samples groups) sent
``bray_client_requests_total``     counter  HTTP requests they became (client batching)
=================================  =======  ===============================================

Labels: ``model`` (the TorchServe model name) and ``version`` (the registered version).
Lag is only reported once the process has been answered.

This goes beyond Bray, which has no metrics exporter.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Iterator

from bray.config import METRICS_ENV_VAR as ENV_VAR
from bray.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from bray.bridge.remote_model import RemoteModel

__all__ = ["CLIENT_METRIC_NAMES", "track"]

CLIENT_METRIC_NAMES = (
    "bray_client_policy_lag_steps",
    "bray_client_answered_step",
    "bray_client_published_step",
    "bray_client_forwards_total",
    "bray_client_requests_total",
)

_lock = threading.Lock()
_models: "weakref.WeakSet[RemoteModel]" = weakref.WeakSet()
_exporter: tuple[str, int, Any] | None = None  # (host, port, server) of this process


def track(model: RemoteModel, address: tuple[str, int]) -> None:
    """Report ``model`` on this process's exporter, starting it at ``address`` if needed.

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
        _models.add(model)


class _Collector:
    """Reads every tracked model's figures at scrape time."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["model", "version"]
        lag = GaugeMetricFamily("bray_client_policy_lag_steps",
                                "Latest published step minus the newest step that answered this process",
                                labels=labels)
        answered = GaugeMetricFamily("bray_client_answered_step", "Newest step that answered this process",
                                     labels=labels)
        published = GaugeMetricFamily("bray_client_published_step", "The store's latest step", labels=labels)
        forwards = CounterMetricFamily("bray_client_forwards", "forward calls sent by this process", labels=labels)
        requests = CounterMetricFamily("bray_client_requests", "HTTP requests those calls became", labels=labels)
        with _lock:
            models = list(_models)
        for model in models:
            values = [model.name, "" if model.local_mode else model._version]  # local mode serves no version
            latest = model.step
            seen = model._seen.value
            published.add_metric(values, latest)
            calls, sent = model.batching_stats()
            forwards.add_metric(values, calls)
            requests.add_metric(values, sent)
            if seen >= 0:
                answered.add_metric(values, seen)
                lag.add_metric(values, max(0, latest - seen))
        yield from (lag, answered, published, forwards, requests)

    def describe(self) -> list[Any]:
        return []  # names depend on nothing; describing would call collect at register time
