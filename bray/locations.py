"""Where things are: the checkpoint store, TorchServe's model store, its addresses, its key file.

One place reads the ``BRAY_*`` environment variables, so the bridge, the CLI and the
main job agree. Defaults match the bundled ``ts_config/config.properties`` started the
way the README says (from the directory that then holds ``key_file.json``).

============================  =======================================  ===========================
variable                      meaning                                  default
============================  =======================================  ===========================
``BRAY_STORE``                checkpoint store root                    ``~/.bray/store``
``BRAY_MODEL_STORE``          TorchServe model store (``.mar`` files)  ``~/.bray/model_store``
``BRAY_INFERENCE_URL``        one address, or several, comma-separated ``http://127.0.0.1:8080``
``BRAY_MANAGEMENT_URL``       management API address (``none``: not   ``http://127.0.0.1:8081``
                              reachable from here)
``BRAY_KEY_FILE``             TorchServe's ``key_file.json``           see :func:`find_key_file`
``BRAY_SERVER_DIR``           ``bray-archive server``'s working dir    ``~/.bray/server``
``BRAY_METRICS_PORT``         client metrics exporter ``[host:]port``  off; see :func:`metrics_address`
``BRAY_PROXY_METRICS_PORT``   the node proxy's own exporter            off; as ``BRAY_METRICS_PORT``
``BRAY_NODE_PROXY``           ``RemoteModel``'s default ``node_proxy`` on (``0`` turns it off)
``BRAY_NODE_CACHE``           a server node's weight cache (workers    off; see :func:`node_cache`
                              read steps from there)
============================  =======================================  ===========================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from bray.errors import ConfigError

__all__ = ["Locations", "Node", "check_url", "find_key_file", "metrics_address", "node_cache", "node_proxy_default",
           "server_dir"]

DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
#: ``BRAY_MANAGEMENT_URL``'s entry for a node whose management API cannot be reached from here.
NO_MANAGEMENT = "none"
METRICS_ENV_VAR = "BRAY_METRICS_PORT"
PROXY_METRICS_ENV_VAR = "BRAY_PROXY_METRICS_PORT"
DEFAULT_METRICS_HOST = "127.0.0.1"


def _home() -> Path:
    return Path(os.path.expanduser("~")) / ".bray"


def check_url(url: str, *, what: str, var: str, example: str) -> str:
    """Validate one ``http(s)://host:port`` address; ``var`` names where it came from.

    Raises:
        ConfigError: not http(s), no host, a port that is not a number (a comma list
            passed where one address is expected shows up here too).
    """
    from urllib.parse import urlsplit

    problem = ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as err:
        problem = str(err)
    else:
        if parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parts.hostname:
            problem = "it has no host"
    if problem:
        how = "pass" if var.startswith("--") else "set"
        raise ConfigError(f"{what} {url!r} is not a valid address ({problem}); {how} {var} like {example!r}")
    return url


def _split_urls(value: str, *, what: str, var: str, example: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in value.split(",") if u.strip())
    for url in urls:
        check_url(url, what=what, var=var, example=example)
    return urls


def server_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where ``bray-archive server start`` runs TorchServe: ``BRAY_SERVER_DIR`` or ``~/.bray/server``.

    TorchServe writes ``key_file.json`` into its working directory, so this directory
    also holds the key file that :func:`find_key_file` finds, beside ``logs/`` and
    ``server.json`` (what was started, for ``server stop`` and ``server status``).
    """
    env = os.environ if env is None else env
    return Path(env.get("BRAY_SERVER_DIR") or _home() / "server").expanduser()


def find_key_file(explicit: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Path | None:
    """Find TorchServe's ``key_file.json``.

    Looks, in order, at ``explicit``, ``BRAY_KEY_FILE``, ``./key_file.json`` and
    ``<server_dir()>/key_file.json`` (``~/.bray/server``, where ``bray-archive server
    start`` runs TorchServe).

    Returns:
        The first path that exists, or ``None`` (token authorization may be off).
    """
    env = os.environ if env is None else env
    candidates: list[Path] = []
    if explicit:
        return Path(explicit)
    if env.get("BRAY_KEY_FILE"):
        return Path(env["BRAY_KEY_FILE"])
    candidates.append(Path.cwd() / "key_file.json")
    candidates.append(server_dir(env) / "key_file.json")
    for path in candidates:
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class Node:
    """One TorchServe server: where it answers predictions, where it is managed, its key file, its model store.

    Attributes:
        inference_url: its inference API (``http://host:8080``).
        management_url: its management API (several nodes may share one); ``None`` where it
            cannot be reached from here (a KServe pod, or a machine whose management API
            stays on its own loopback): the node registers its models itself, and its
            workers are known by their heartbeating announcements in the store.
        key_file: its ``key_file.json`` (each TorchServe writes its own keys), ``None``
            with token authorization off.
        model_store: its model store directory (``.mar`` files), as this machine sees it.
    """

    inference_url: str
    management_url: str | None
    key_file: Path | None
    model_store: Path


def _per_node(items: list[Any], n: int, *, what: str, var: str) -> list[Any]:
    """One item for every node: a single one shared, or exactly one per inference address."""
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise ConfigError(
            f"{len(items)} {what}s for {n} inference address(es); give one, or one per address "
            f"in BRAY_INFERENCE_URL's order ({var}=a,b,...)"
        )
    return items


@dataclass(frozen=True)
class Locations:
    """The checkpoint store and the TorchServe nodes; build with :meth:`from_env`.

    Attributes:
        store: the checkpoint store root.
        nodes: every TorchServe node, in ``BRAY_INFERENCE_URL``'s order (at least one).
    """

    store: Path
    nodes: tuple[Node, ...]

    @property
    def inference_urls(self) -> tuple[str, ...]:
        """Every node's inference address, in order."""
        return tuple(node.inference_url for node in self.nodes)

    @property
    def management_url(self) -> str:
        """The first managed node's management address (the CLI talks to one node).

        Raises:
            ConfigError: no node's management API can be reached from here.
        """
        managed = self.managed_nodes()
        if not managed:
            raise ConfigError("no management API can be reached from here (BRAY_MANAGEMENT_URL is 'none' for every "
                              "node); run this on a server node, with BRAY_MANAGEMENT_URL=http://127.0.0.1:8081")
        return managed[0].management_url  # type: ignore[return-value]

    @property
    def unmanaged_nodes(self) -> tuple[Node, ...]:
        """The nodes whose management API cannot be reached from here (``BRAY_MANAGEMENT_URL=none``)."""
        return tuple(node for node in self.nodes if node.management_url is None)

    @property
    def key_file(self) -> Path | None:
        """The first node's key file."""
        return self.nodes[0].key_file

    @property
    def model_store(self) -> Path:
        """The first node's model store."""
        return self.nodes[0].model_store

    def managed_nodes(self) -> tuple[Node, ...]:
        """One node per management address (the first with it): where models are registered.

        Nodes without a reachable management API are left out: they register their models themselves.
        """
        seen: dict[str, Node] = {}
        for node in self.nodes:
            if node.management_url is not None:
                seen.setdefault(node.management_url, node)
        return tuple(seen.values())

    def to_env(self, *, store: Path | None = None) -> dict[str, str]:
        """The ``BRAY_*`` variables that rebuild these locations in another process (absolute paths).

        Args:
            store: the checkpoint store to name instead of :attr:`store` (a session's
                ``<store>/<project>/<trial>``).
        """
        env = {"BRAY_STORE": str(Path(store or self.store).resolve()),
               "BRAY_INFERENCE_URL": ",".join(self.inference_urls),
               "BRAY_MANAGEMENT_URL": ",".join(n.management_url or NO_MANAGEMENT for n in self.nodes),
               "BRAY_MODEL_STORE": ",".join(os.path.abspath(n.model_store) for n in self.nodes)}
        if all(n.key_file is not None for n in self.nodes):
            env["BRAY_KEY_FILE"] = ",".join(os.path.abspath(str(n.key_file)) for n in self.nodes)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "Locations":
        """Build from keyword overrides, else ``BRAY_*`` variables, else the defaults.

        Several nodes: ``BRAY_INFERENCE_URL`` lists one address per node, comma-separated;
        ``BRAY_MANAGEMENT_URL``, ``BRAY_KEY_FILE`` and ``BRAY_MODEL_STORE`` give either
        one value shared by every node or one per node in the same order; a management
        address ``none`` says that node's management API cannot be reached from here.

        Args:
            env: the environment to read (``os.environ`` when ``None``).
            **overrides: ``store``, ``model_store``, ``inference_url`` (str, comma list or
                sequence), ``management_url``, ``key_file`` (each a comma list or a
                sequence where several nodes differ); ``None`` values are ignored.

        Raises:
            ConfigError: an unknown override, a malformed address, or lists whose
                lengths are neither one nor one per inference address.
        """
        env = os.environ if env is None else env
        known = {"store", "model_store", "inference_url", "management_url", "key_file"}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown location option(s) {sorted(unknown)}; expected some of {sorted(known)}")
        o = {k: v for k, v in overrides.items() if v is not None}
        store = Path(str(o.get("store") or env.get("BRAY_STORE") or _home() / "store")).expanduser()

        def listed(value: object) -> str:
            if isinstance(value, (str, os.PathLike)):
                return os.fspath(value)  # type: ignore[return-value]
            return ",".join(os.fspath(v) for v in value)  # type: ignore[attr-defined]

        urls = _split_urls(listed(o.get("inference_url") or env.get("BRAY_INFERENCE_URL") or DEFAULT_INFERENCE_URL),
                           what="inference address", var="BRAY_INFERENCE_URL",
                           example="http://127.0.0.1:8080,http://10.0.0.2:8080")
        if not urls:
            raise ConfigError("no inference address given; set BRAY_INFERENCE_URL")
        n = len(urls)
        mgmt_listed = listed(o.get("management_url") or env.get("BRAY_MANAGEMENT_URL") or DEFAULT_MANAGEMENT_URL)
        mgmt: list[str | None] = [None if u.strip().lower() == NO_MANAGEMENT else u.strip().rstrip("/")
                                  for u in mgmt_listed.split(",") if u.strip()]
        for url in mgmt:
            if url is not None:
                check_url(url, what="management address", var="BRAY_MANAGEMENT_URL",
                          example="http://127.0.0.1:8081 (or none)")
        if not mgmt:
            raise ConfigError("no management address given; set BRAY_MANAGEMENT_URL")
        stores = [Path(p.strip()).expanduser() for p in listed(
            o.get("model_store") or env.get("BRAY_MODEL_STORE") or _home() / "model_store").split(",") if p.strip()]
        key = o.get("key_file")
        found = find_key_file(listed(key) if key else None, env)
        keys: list[Path | None] = [Path(k.strip()) for k in str(found).split(",") if k.strip()] if found else [None]
        mgmt_n = _per_node(list(mgmt), n, what="management URL", var="BRAY_MANAGEMENT_URL")
        keys_n = _per_node(keys, n, what="key file", var="BRAY_KEY_FILE")
        stores_n = _per_node(stores, n, what="model store", var="BRAY_MODEL_STORE")
        return cls(store=store, nodes=tuple(Node(inference_url=u, management_url=m, key_file=k, model_store=ms)
                                            for u, m, k, ms in zip(urls, mgmt_n, keys_n, stores_n)))


NODE_PROXY_ENV_VAR = "BRAY_NODE_PROXY"
NODE_CACHE_ENV_VAR = "BRAY_NODE_CACHE"


def node_cache(env: Mapping[str, str] | None = None) -> Path | None:
    """The node's weight cache that TorchServe workers follow instead of the store (``BRAY_NODE_CACHE``).

    Written by the node's one weight loader (``python -m bray.store.node_loader``), in
    shared memory; ``None`` (unset): every worker reads the store itself.
    """
    env = os.environ if env is None else env
    value = str(env.get(NODE_CACHE_ENV_VAR, "")).strip()
    return Path(value) if value else None


def node_proxy_default(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``RemoteModel`` calls through the node proxy when ``node_proxy`` is not given.

    On unless ``BRAY_NODE_PROXY`` is ``0``, ``false``, ``no`` or ``off``.

    Raises:
        ConfigError: another value.
    """
    env = os.environ if env is None else env
    value = str(env.get(NODE_PROXY_ENV_VAR, "1")).strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{NODE_PROXY_ENV_VAR} must be 1 or 0 (on or off), got {value!r}")


def metrics_address(port: int | str | None, env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """Where ``RemoteModel``'s client metrics exporter listens (:mod:`bray.bridge.metrics`).

    The keyword, else ``BRAY_METRICS_PORT``, else off; the host defaults to 127.0.0.1.

    Args:
        port: ``RemoteModel``'s ``metrics_port`` (``None``: read the variable; ``0`` or
            ``""``: off).
        env: the environment (``os.environ`` when ``None``).

    Returns:
        ``(host, port)``, or ``None`` when off.

    Raises:
        ConfigError: not a port number (or ``host:port``).
    """
    env = os.environ if env is None else env
    value = str(env.get(METRICS_ENV_VAR, "")).strip() if port is None else str(port).strip()
    if not value or value == "0":
        return None
    host, _, number = value.rpartition(":")
    try:
        parsed = int(number)
    except ValueError:
        parsed = -1
    if not 0 < parsed < 65536:
        raise ConfigError(f"metrics_port ({METRICS_ENV_VAR}) must be a port 1-65535 or host:port, got {value!r}")
    return host or DEFAULT_METRICS_HOST, parsed
