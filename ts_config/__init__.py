"""The TorchServe configuration bray-serve ships.

``config_path()`` and ``log_config_path()`` locate the bundled files,
``prometheus_config_path()`` and ``grafana_dashboard_path()`` the monitoring ones;
:mod:`bray.torchserve.launcher` starts and stops TorchServe instances with them
(from the shell: ``bray-archive server start``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["config_path", "grafana_dashboard_path", "log_config_path", "prometheus_config_path", "read_properties"]


def config_path() -> Path:
    """The bundled ``config.properties`` (absolute path)."""
    return Path(__file__).resolve().with_name("config.properties")


def log_config_path() -> Path:
    """The bundled ``log4j2.xml``: no access log, no per-request metrics lines."""
    return Path(__file__).resolve().with_name("log4j2.xml")


def prometheus_config_path() -> Path:
    """The bundled Prometheus scrape config (TorchServe, client exporters, the dashboard)."""
    return Path(__file__).resolve().with_name("prometheus.yml")


def grafana_dashboard_path() -> Path:
    """The bundled Grafana dashboard (import it; its data source is a Prometheus)."""
    return Path(__file__).resolve().with_name("grafana_dashboard.json")


def read_properties(path: str | Path) -> dict[str, str]:
    """Read a ``config.properties`` the way TorchServe's launcher does (``key=value`` lines).

    Args:
        path: the file.

    Returns:
        Keys to values, in file order; comments and blank lines skipped.
    """
    props: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        props[key.strip()] = value.strip()
    return props
