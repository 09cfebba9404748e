"""One model version's life on the TorchServe nodes: registered, re-registered, served.

A :class:`Registration` knows the nodes a ``RemoteModel`` is registered on (one
management client and model store each), registers the version where it is missing
(packing the store's step into an archive, :func:`bray.archiver.publish.publish_version`),
registers it again once after a server restart forgot it, however many callers saw the
404, and tells when every worker serves a step.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from bray.locations import Locations
from bray.errors import BrayTimeoutError, ModelNotFoundError, VersionExistsError
from bray.handlers.options import ServingOptions
from bray.store import CheckpointStore

__all__ = ["LIVE_VERSION", "Registration", "announcements", "behind"]

log = logging.getLogger(__name__)

#: The TorchServe version that follows the store's latest step (a clone pins its own).
LIVE_VERSION = "latest"
# wait_served() looks at the announcements every WAIT_PAUSE_S for its first WAIT_FAST_S,
# then every WAIT_SLOW_PAUSE_S.
WAIT_PAUSE_S, WAIT_FAST_S, WAIT_SLOW_PAUSE_S = 0.002, 0.05, 0.05


def _local_host(url: str) -> str | None:
    """This machine's host name when ``url`` is a loopback address (its workers run here), else ``None``."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return socket.gethostname() if loopback else None


def announcements(serving: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, int], int]:
    """The store's serving announcements (:meth:`CheckpointStore.serving`) as ``{(host, pid): step}``."""
    out = {}
    for info in serving.values():
        try:
            out[(str(info["host"]), int(info["pid"]))] = int(info["step"])
        except (KeyError, TypeError, ValueError):
            continue  # an announcement from an older worker, or being replaced
    return out


def behind(nodes: Sequence[tuple[str | None, Sequence[int]]], announced: Mapping[tuple[str, int], int],
           step: int) -> dict[str, int | None]:
    """The workers not yet serving ``step``: ``{"<host>-<pid>": announced step or None}``.

    Args:
        nodes: every node's ``(host or None, READY pids)`` (:meth:`Registration.workers`).
        announced: ``{(host, pid): step}`` (:func:`announcements`).
        step: the step waited for.

    A node whose host is unknown is matched to the hosts whose announcements cover
    every one of its pids; where several hosts do (pids that collide across machines),
    every one of them must have the step, so a wait never ends early.
    """
    late: dict[str, int | None] = {}
    for host, pids in nodes:
        if host is not None:
            hosts = [host]
        else:
            hosts = sorted({h for (h, pid) in announced if pid in pids})
            hosts = [h for h in hosts if all((h, pid) in announced for pid in pids)] or ["?"]
        for h in hosts:
            for pid in pids:
                seen = announced.get((h, pid))
                if seen is None or seen < step:
                    late[f"{h}-{pid}"] = seen
    return late


class Registration:
    """Where ``name`` is registered, and the registering itself.

    Args:
        name: the model's full name (namespace included).
        store: the checkpoint store the version serves from.
        locations: the TorchServe nodes (``bray.init``).
        options: what a version registered here is archived and served with; the
            owner may replace it (attaching adopts the registered version's settings).
        pinned: the step a clone serves (its version is that step), ``None``: the live one.
        timeout_s: the model's forward limit; registration waits get ten times it (at
            least 300 s), as TorchServe starts workers slowly under load.
    """

    def __init__(self, name: str, store: CheckpointStore, locations: Locations, *, options: ServingOptions,
                 pinned: int | None, timeout_s: float) -> None:
        self.name = name
        self.store = store
        self.locations = locations
        self.options = options
        self.pinned = pinned
        self.version = LIVE_VERSION if pinned is None else str(pinned)
        self.wait_s = max(timeout_s * 10, 300)
        self._nodes: list[tuple[Any, Path]] | None = None
        self._workers: tuple[tuple[str | None, tuple[int, ...]], ...] = ()
        self._lock = threading.Lock()
        #: Cleared while registering again: callers wait on it rather than meet 503s.
        self.idle = threading.Event()
        self.idle.set()
        #: Re-registrations so far: callers that saw the same 404 skip theirs.
        self.count = 0

    def nodes(self) -> list[tuple[Any, Path]]:
        """``(management client, model store)`` of every node the model is registered on.

        One per management address (``Locations.managed_nodes``): several inference
        addresses behind one management address register once.
        """
        if self._nodes is None:
            from bray.torchserve.management import ManagementClient

            self._nodes = [(ManagementClient(node.management_url, key_file=node.key_file, timeout_s=self.wait_s),
                            node.model_store)
                           for node in self.locations.managed_nodes()]
        return self._nodes

    def inference_auth(self) -> Any:
        """The inference API's token auth: one, or one per node (each TorchServe makes its own keys)."""
        from bray.torchserve.auth import TokenAuth

        nodes = self.locations.nodes
        # The inference client refreshes a refused key (reading the file at once): the file
        # is looked at every 0.1 s, not at every call.
        # A node without a reachable management API: its key file is re-read, never refreshed here.
        if len({(node.key_file, node.management_url) for node in nodes}) == 1:
            return TokenAuth(nodes[0].key_file, management_url=nodes[0].management_url or "", recheck_s=0.1)
        # Each TorchServe generates its own keys at start: one TokenAuth per node, refreshed
        # through that node's management API.
        return {node.inference_url: TokenAuth(node.key_file, management_url=node.management_url or "", recheck_s=0.1)
                for node in nodes}

    def ensure(self, *, override: bool) -> Any:
        """Make sure every node serves the version, registering it where it is missing.

        Args:
            override: unregister what is there first (the model was re-exported).

        Returns:
            What the first node had registered already (a ``ModelDescription``), else ``None``.

        Raises:
            ModelOwnedError: the name is served from another checkpoint store (another
                project or trial) on some node; nothing was changed there.
            ServerError: a node refused the registration (the message says why).
        """
        first = None
        for i, (client, model_store) in enumerate(self.nodes()):
            existing = self._ensure_on(client, model_store, override=override)
            if i == 0:
                first = existing
        return first

    def _ensure_on(self, client: Any, model_store: Path, *, override: bool) -> Any:
        from bray.archiver.publish import check_owner, publish_version

        # Before anything is unregistered or attached to: a name another run's store
        # serves stays that run's (TorchServe names are global, stores per trial).
        check_owner(self.name, client=client, model_store=model_store, store_path=str(self.store.root.resolve()))
        try:
            existing = client.describe(self.name, self.version)
        except ModelNotFoundError:
            existing = []
        if existing and override:
            client.unregister(self.name, self.version)
            existing = []
        if existing:
            return existing[0]
        try:
            publish_version(
                self.store, self.name, step=self.pinned, client=client, model_store=model_store,
                set_default=True, wait_timeout_s=self.wait_s, options=self.options,
                version=self.version, force=True, owner_checked=True,
            )
        except VersionExistsError:
            # Another process (an actor cloning the same opponent) registered it first.
            client.wait_ready(self.name, self.version, timeout_s=self.wait_s)
        return None

    def again(self, seen: int) -> None:
        """Register again after a 404, once for all callers that saw the same one (any thread).

        ``seen`` is :attr:`count` when the caller's request went out. A restarted
        TorchServe has forgotten its models (config snapshots are off): the version is
        registered from the store, whose latest step the live version serves, so no
        published step is lost.
        """
        with self._lock:
            if self.count != seen:
                return  # done by another caller since this one's request went out
            self.idle.clear()
            try:
                log.warning("bray: %s version %s is not registered on the server (restarted?); registering it "
                            "again from the store %s", self.name, self.version, self.store.root)
                try:
                    self.ensure(override=False)  # a no-op when it is registered again already
                except VersionExistsError:
                    pass  # another process registered it first
                self._workers = ()
                self.count += 1
            finally:
                self.idle.set()

    def worker_pids(self) -> tuple[int, ...]:
        """READY worker pids of the version on every node, asked now (see :meth:`workers`)."""
        return tuple(pid for _, pids in self.workers() for pid in pids)

    def workers(self) -> tuple[tuple[str | None, tuple[int, ...]], ...]:
        """Every node's READY workers, asked now: ``(host, pids)`` per node.

        TorchServe's management API names a worker by pid only; the host is known where
        the node is this machine (a loopback address: this host name), else ``None``
        and told apart by the workers' own announcements (:func:`behind`).
        """
        nodes = []
        for client, _ in self.nodes():
            try:
                (desc,) = client.describe(self.name, self.version)
            except (ModelNotFoundError, ValueError):
                continue
            pids = tuple(int(w["pid"]) for w in desc.raw.get("workers", [])
                         if w.get("pid") and w.get("status") == "READY")
            nodes.append((_local_host(client.url), pids))
        self._workers = tuple(nodes)
        return self._workers

    def unmanaged_late(self, step: int, serving: Mapping[str, Mapping[str, Any]], *,
                       now: float | None = None) -> tuple[dict[str, int | None], str]:
        """The nodes without a reachable management API: their workers not yet serving ``step``.

        Their workers are known by their announcements alone (``docs/scale.md`` section 5):
        those refreshed within :data:`~bray.store.HEARTBEAT_STALE_S` count, from hosts other
        than the managed nodes' (this machine's, when one is on loopback). Each such node
        runs the version's ``workers`` (:attr:`options`), so the wait needs that many per
        node, every one of them at ``step`` or later: a node that is down, or whose
        workers have not announced yet, keeps it waiting.

        Returns:
            ``({"<host>-<pid>": step}`` of the fresh workers behind, a reason when fewer
            fresh workers than expected announce (``""`` otherwise)).
        """
        from bray.store import HEARTBEAT_STALE_S

        unmanaged = self.locations.unmanaged_nodes
        if not unmanaged:
            return {}, ""
        now = time.time() if now is None else now
        managed_hosts = {host for host, _ in self._workers if host is not None}
        fresh = {}
        for worker, info in serving.items():
            try:
                host, stamp, seen = str(info["host"]), float(info["time"]), int(info["step"])
            except (KeyError, TypeError, ValueError):
                continue
            if host not in managed_hosts and now - stamp <= HEARTBEAT_STALE_S:
                fresh[worker] = seen
        late: dict[str, int | None] = {w: s for w, s in fresh.items() if s < step}
        expected = len(unmanaged) * max(self.options.workers, 1)
        short = ""
        if len(fresh) < expected:
            short = (f"{len(fresh)} of the {expected} workers expected on the {len(unmanaged)} node(s) without a "
                     f"management API here ({self.options.workers} each) announce within {HEARTBEAT_STALE_S:g} s "
                     "(a node down, or its workers not started?)")
        return late, short

    def wait_served(self, step: int, *, timeout_s: float) -> float:
        """Block until every READY worker of every node announces ``step`` (or a later one).

        Workers are ``(host, pid)``: two nodes whose workers share a pid never stand
        in for each other. Nodes without a reachable management API are waited for
        through their workers' heartbeating announcements (:meth:`unmanaged_late`).

        Returns:
            Seconds waited.

        Raises:
            BrayTimeoutError: some worker was still behind after ``timeout_s``.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        next_refresh = started + 0.5
        managed = bool(self.locations.managed_nodes())
        while True:
            nodes = (self._workers or self.workers()) if managed else ()
            serving = self.store.serving(self.name)
            late = behind(nodes, announcements(serving), step)
            far, short = self.unmanaged_late(step, serving)
            late.update(far)
            listed = not managed or (nodes and all(pids for _, pids in nodes))
            if listed and not late and not short:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise BrayTimeoutError(f"step {step} of {self.name!r} not served by every worker within {timeout_s} s; "
                                       f"workers behind (host-pid: step): {late or short or 'no READY worker'}"
                                       + (f"; {short}" if late and short else ""))
            if managed and (any(step_ is None for step_ in late.values()) or time.monotonic() > next_refresh):
                # A restarted worker has a new pid; a SIGKILLed one leaves its announcement
                # behind, so a behind worker is looked up again now and then too.
                self.workers()
                next_refresh = time.monotonic() + 0.5
            # Every 2 ms at first (one machine: served within ~10 ms), every 50 ms after
            # 50 ms (many nodes: each check reads every announcement in the store).
            time.sleep(WAIT_PAUSE_S if time.monotonic() - started < WAIT_FAST_S else WAIT_SLOW_PAUSE_S)

    def close(self) -> None:
        for client, _ in self._nodes or []:
            client.close()
