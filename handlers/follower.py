"""Follow a model's steps in the store: load off the request path, swap between batches.

Shared by the TorchServe handler and by ``RemoteModel(local_mode=True)``, so both serve
steps the same way: the store's watcher thread loads and *prepares* a new step (the
slow part), :meth:`StepFollower.swap_if_pending` installs it at the start of the next
batch (the fast part). A step that fails to load is refused with a logged reason and
the old weights keep serving. Steps only move forward; ones that arrive faster than a
load may be skipped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable

from bray.errors import BrayError, StepNotFoundError
from bray.handlers.engines.base import Engine
from bray.store import HEARTBEAT_S, CheckpointStore

__all__ = ["StepFollower"]

log = logging.getLogger(__name__)

class StepFollower:
    """Keeps an engine on the latest step of ``name`` (or on one pinned step).

    Args:
        store: the checkpoint store.
        name: model name in the store.
        engine: the engine whose weights are swapped.
        step: ``-1`` follows the latest step; ``N`` loads step N once and stays there.
        announce: write ``<store>/<name>/.serving/<host>-<pid>.json`` on every staged step
            (how ``publish_weights(...).wait()`` sees that a worker has it).
        on_swap: called as ``on_swap(step, load_ms, published_time)`` after each swap
            (metrics; ``published_time`` is the step's unix publish time from the store).
        on_refuse: called as ``on_refuse(step)`` on the watcher thread for a refused step.
        poll_interval_s: read the store's ``LATEST`` this often instead of inotify
            (shared file systems); ``None``: inotify.
        node_cache: the node's weight cache (:mod:`bray.store.node_loader`), followed
            with inotify and mapped instead of the store read; a step not in it yet is
            read from the store. The announcements go there too, for the loader to relay
            (one file per node in the store). ``None``: the store itself.
    """

    def __init__(self, store: CheckpointStore, name: str, engine: Engine, *, step: int = -1,
                 announce: bool = False, on_swap: Callable[[int, float, float], None] | None = None,
                 on_refuse: Callable[[int], None] | None = None,
                 poll_interval_s: float | None = None, node_cache: CheckpointStore | None = None) -> None:
        self.store = store
        self.node_cache = node_cache
        # With a node loader the announcements (and their heartbeats) stay in the node's
        # shared memory, and the loader relays them to the store as one file per node.
        self._announced = node_cache if node_cache is not None else store
        self.name = name
        self.engine = engine
        self.pinned = step >= 0
        self._want = step
        self.step = -1  # what the next batch is served with
        self.staged_step = -1  # newest step loaded (maybe not yet swapped in)
        self.refused: set[int] = set()
        self._pending: tuple[int, Any, float, float] | None = None
        self._pending_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._watch: Any = None
        self._on_swap = on_swap
        self._on_refuse = on_refuse
        self._poll_interval_s = poll_interval_s
        self._worker = f"{socket.gethostname()}-{os.getpid()}" if announce else None
        self._heartbeat: threading.Thread | None = None
        self._closed = threading.Event()

    def start(self, initial: tuple[int, Any] | None = None) -> int:
        """Install the first weights and, unless pinned, start watching. Returns the step.

        Args:
            initial: ``(step, weights)`` to use instead of loading from the store
                (an archive that carries its own step).

        Raises:
            StoreError: a pinned step that cannot be loaded.
            EngineError: weights that do not fit the model.
        """
        if initial is not None:
            step, weights = initial
        elif self.pinned:
            ckpt = self.store.load(self.name, self._want)
            step, weights = ckpt.step, ckpt.weights
        else:
            try:
                ckpt = self._load(-1)
                step, weights = ckpt.step, ckpt.weights
            except StepNotFoundError:
                log.warning("bray: no step of %s published yet; serving the export's own weights", self.name)
                step, weights = -1, None
        if weights is not None:
            self.engine.set_weights(weights)
        self.step = self.staged_step = step
        if not self.pinned:
            self._announce(step)
            if self._worker is not None:
                self._heartbeat = threading.Thread(target=self._beat, name="bray-heartbeat", daemon=True)
                self._heartbeat.start()
            if self.node_cache is not None:  # a local tmpfs: inotify sees the loader's writes
                self._watch = self.node_cache.watch(self.name, self.on_step, poll_interval_s=None)
            else:
                self._watch = self.store.watch(self.name, self.on_step, poll_interval_s=self._poll_interval_s)
            latest = self.store.latest(self.name)
            if latest is not None and latest > step:  # published while we were starting
                self.on_step(latest)
        return step

    def on_step(self, step: int) -> None:
        """Load and stage ``step`` (watcher thread); refuse it if it does not load."""
        with self._load_lock:
            if step <= self.staged_step or step in self.refused:
                return
            started = time.perf_counter()
            withdrawn = None
            try:
                ckpt = self._load(step)
                if self.engine.reuses_prepared:
                    # Preparing rewrites the storage of a step staged but not swapped in yet
                    # (TensorRT refits its standby engine): refuse a bad step before that,
                    # then take the pending step back, so it can never go live half rewritten.
                    self.engine.check_weights(ckpt.weights)
                    with self._pending_lock:
                        withdrawn, self._pending = self._pending, None
                prepared = self.engine.prepare_weights(ckpt.weights)
            except Exception as err:  # a broken step must never take the worker down
                self._refuse(step)
                if withdrawn is not None:  # its buffer may be half rewritten: not staged any more
                    self.staged_step = self.step
                    self._announce(self.step)
                if isinstance(err, BrayError):
                    log.error("bray: refusing step %d of %s, still serving step %d: %s", step, self.name, self.step, err)
                else:
                    log.exception("bray: refusing step %d of %s (%s), still serving step %d", step, self.name, err, self.step)
                return
            load_ms = (time.perf_counter() - started) * 1e3
            with self._pending_lock:
                self._pending = (ckpt.step, prepared, load_ms, ckpt.meta.time)
            self.staged_step = ckpt.step
            self._announce(ckpt.step)
            log.info("bray: staged step %d of %s in %.1f ms", ckpt.step, self.name, load_ms)

    def _load(self, step: int) -> Any:
        """``step`` (``-1``: the store's latest) from the node cache, mapped (the loader verified it), else from the store."""
        if self.node_cache is not None:
            want = self.store.latest(self.name) if step < 0 else step
            if want is not None:
                try:
                    ckpt = self.node_cache.load(self.name, want, verify=False, mapped=True)
                except StepNotFoundError:
                    pass
                else:
                    if ckpt.step == want:  # not snapped down to an older cached step
                        return ckpt
        return self.store.load(self.name, step)

    def _refuse(self, step: int) -> None:
        self.refused.add(step)
        if self._on_refuse is not None:
            self._on_refuse(step)

    def swap_if_pending(self) -> int:
        """Install a staged step, if any (call between batches). Returns the step served."""
        if self._pending is None:  # fast path, no lock: a racing stage is taken next batch
            return self.step
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            step, prepared, load_ms, published_time = pending
            self.engine.swap(prepared)
            self.step = step
            if self._on_swap is not None:
                self._on_swap(step, load_ms, published_time)
        return self.step

    def catch_up(self, step: int, *, timeout_s: float) -> None:
        """Wait (bounded) until ``step`` is staged, when a caller has already seen it served.

        Another worker may stage a new step a few milliseconds before this one; a caller
        whose requests alternate between them would see its step go backwards. Waiting
        for this worker's own watcher keeps loading off the request path. A pinned
        follower, a refused step, or the bound passing ends the wait: the answer then
        says which step served it.
        """
        if self.pinned or step <= self.staged_step:
            return
        deadline = time.monotonic() + timeout_s
        while self.staged_step < step and step not in self.refused and time.monotonic() < deadline:
            time.sleep(0.0005)

    def wait_staged(self, step: int, *, timeout_s: float) -> bool:
        """Block until ``step`` (or a later one) is staged; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.staged_step < step:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def _beat(self) -> None:
        """Rewrite the announcement every HEARTBEAT_S: where no management API lists the
        workers, a fresh announcement is how the trainer knows this worker is alive."""
        while not self._closed.wait(HEARTBEAT_S):
            with self._load_lock:  # never re-announce an older step over a newer one
                self._announce(self.staged_step)

    def _announce(self, step: int) -> None:
        if self._worker is None or self._closed.is_set():
            return
        try:
            self._announced.announce_serving(self.name, self._worker, step, pid=os.getpid(), host=socket.gethostname())
        except OSError as err:  # advisory only; serving goes on
            log.warning("bray: cannot announce step %d of %s in %s: %s", step, self.name,
                        self._announced.serving_dir(self.name), err)

    def close(self) -> None:
        """Stop watching and withdraw this worker's serving announcement."""
        self._closed.set()
        if self._heartbeat is not None:  # so no beat lands after the withdrawal below
            self._heartbeat.join(timeout=5)
            self._heartbeat = None
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._worker is not None:
            self._announced.withdraw_serving(self.name, self._worker)
