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
from typing import Any

from bray.bridge.session import per_node
from bray.config import Locations
from bray.errors import BrayTimeoutError, ConfigError, ModelNotFoundError, VersionExistsError
from bray.handlers.config import ServingOptions
from bray.store import CheckpointStore

__all__ = ["LIVE_VERSION", "Registration"]

log = logging.getLogger(__name__)

#: The TorchServe version that follows the store's latest step (a clone pins its own).
LIVE_VERSION = "latest"


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
        self._worker_pids: tuple[int, ...] = ()
        self._lock = threading.Lock()
        #: Cleared while registering again: callers wait on it rather than meet 503s.
        self.idle = threading.Event()
        self.idle.set()
        #: Re-registrations so far: callers that saw the same 404 skip theirs.
        self.count = 0

    def nodes(self) -> list[tuple[Any, Path]]:
        """``(management client, model store)`` of every node the model is registered on.

        One per management address: ``BRAY_MANAGEMENT_URL`` (and ``BRAY_KEY_FILE``,
        ``BRAY_MODEL_STORE``) may list one entry per node, comma-separated in the same
        order; a single model store is taken as shared by every node.

        Raises:
            ConfigError: the lists do not match.
        """
        if self._nodes is None:
            from bray.torchserve.management import ManagementClient

            mgmt_urls, key_files = per_node(self.locations)
            stores = [Path(p.strip()) for p in str(self.locations.model_store).split(",") if p.strip()]
            if len(stores) not in (1, len(mgmt_urls)):
                raise ConfigError(
                    f"{len(stores)} model stores for {len(mgmt_urls)} management address(es); give one "
                    "shared by every node, or one per node in BRAY_MANAGEMENT_URL's order (BRAY_MODEL_STORE=a,b)"
                )
            self._nodes = [
                (ManagementClient(url, key_file=key_files[i % len(key_files)], timeout_s=self.wait_s),
                 stores[i % len(stores)])
                for i, url in enumerate(mgmt_urls)
            ]
        return self._nodes

    def inference_auth(self) -> Any:
        """The inference API's token auth: one, or one per node (each TorchServe makes its own keys)."""
        from bray.torchserve.auth import TokenAuth

        mgmt_urls, key_files = per_node(self.locations)
        if len(key_files) == 1 and len(mgmt_urls) == 1:
            return TokenAuth(key_files[0], management_url=mgmt_urls[0])
        # Each TorchServe generates its own keys at start: one TokenAuth per node, refreshed
        # through that node's management API (or the one given, when only one is).
        return {url: TokenAuth(key_files[i % len(key_files)], management_url=mgmt_urls[i % len(mgmt_urls)])
                for i, url in enumerate(self.locations.inference_urls)}

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
                version=self.version, force=True,
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
                self._worker_pids = ()
                self.count += 1
            finally:
                self.idle.set()

    def worker_pids(self) -> tuple[int, ...]:
        """READY worker pids of the version on every node, asked now."""
        pids: list[int] = []
        for client, _ in self.nodes():
            try:
                (desc,) = client.describe(self.name, self.version)
            except (ModelNotFoundError, ValueError):
                continue
            pids += [int(w["pid"]) for w in desc.raw.get("workers", []) if w.get("pid") and w.get("status") == "READY"]
        self._worker_pids = tuple(pids)
        return self._worker_pids

    def wait_served(self, step: int, *, timeout_s: float) -> float:
        """Block until every READY worker announces ``step`` (or a later one) in the store.

        Returns:
            Seconds waited.

        Raises:
            BrayTimeoutError: some worker was still behind after ``timeout_s``.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        next_refresh = started + 0.5
        while True:
            pids = self._worker_pids or self.worker_pids()
            serving = {int(v["pid"]): int(v["step"]) for v in self.store.serving(self.name).values() if "pid" in v}
            if pids and all(serving.get(pid, -1) >= step for pid in pids):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                behind = {pid: serving.get(pid) for pid in pids if serving.get(pid, -1) < step}
                raise BrayTimeoutError(f"step {step} of {self.name!r} not served by every worker within {timeout_s} s; "
                                       f"workers behind (pid: step): {behind}")
            if any(pid not in serving for pid in pids) or time.monotonic() > next_refresh:
                # A restarted worker has a new pid; a SIGKILLed one leaves its announcement
                # behind, so a behind worker is looked up again now and then too.
                self.worker_pids()
                next_refresh = time.monotonic() + 0.5
            time.sleep(0.002)

    def close(self) -> None:
        for client, _ in self._nodes or []:
            client.close()
