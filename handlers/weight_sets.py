"""Weight sets: a model's clones served by the model's own workers, one forward per set in a batch.

A league keeps many past selves of one policy. Instead of a TorchServe model (and its
worker processes) per opponent, a clone made with ``RemoteModel.clone(...)`` is a
*weight set* of the model it came from: a request names it in the ``X-Bray-Weights``
header (``curl -H 'X-Bray-Weights: policy-clone-step-120' ...``), and every worker of the
model keeps the weight sets it has been asked for, within a memory budget
(``ServingOptions.weight_sets_mb``), least recently used out first.

Freshness without a watcher per set: before a batch uses a weight set the worker checks
the clone's ``LATEST`` pointer (one ``stat``, :meth:`CheckpointStore.latest_stamp`; a read
of it when that changed, and at least every poll interval where the archive polls, as on a
shared volume whose client may cache a ``stat``) and, when a newer step is there, loads and
prepares it then. So on a local disk a step published to a clone is served by every answer
that comes after the publish returned, on every worker; a miss delays the batch by one load
of that set, and only when it is new or newer. A clone of a clone is a weight set of the
same model (its family's root). Engines run a set without copying the module where they
can (:meth:`~bray.handlers.engines.base.Engine.forward_with`); one that cannot refuses
with a message that says to clone with ``dedicated=True``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from bray import wire
from bray.errors import BrayError, ConfigError, InputError
from bray.handlers.engines.base import Engine
from bray.store import CheckpointStore

__all__ = ["WeightSets", "family_root", "weight_set_of"]

log = logging.getLogger(__name__)

WEIGHTS_HEADER = wire.WEIGHTS_HEADER


def family_root(store: CheckpointStore, name: str) -> str:
    """The model a clone (or a clone of a clone) descends from; ``name`` itself when it is no clone.

    Raises:
        ConfigError: an invalid name, or origins that loop.
    """
    seen = [name]
    while True:
        origin = store.clone_origin(seen[-1])
        if origin is None:
            return seen[-1]
        if origin[0] in seen:
            raise ConfigError(f"the clone records of {name!r} loop ({' -> '.join(seen + [origin[0]])})")
        seen.append(origin[0])


def weight_set_of(store: CheckpointStore, name: str) -> str | None:
    """The model whose workers serve ``name`` as a weight set; ``None`` for a model of its own
    (no clone, or a dedicated clone).

    Raises:
        ConfigError: an invalid name, or clone records that loop.
        CorruptCheckpointError: an unreadable clone record.
    """
    if store.clone_origin(name) is None or store.clone_dedicated(name):
        return None
    return family_root(store, name)


@dataclass
class _Held:
    step: int
    prepared: Any
    nbytes: int
    stamp: tuple[int, int, int] | None = None  # the clone's LATEST when this step was read from it
    read_at: float = 0.0  # monotonic time of that read


class WeightSets:
    """The weight sets one worker holds for the model ``root``: loaded on demand, LRU within a budget.

    Args:
        store: the checkpoint store the model and its clones live in.
        root: the served model's name (a weight set must descend from it).
        engine: the engine that runs forwards (and prepares weights for them).
        budget_bytes: the most bytes of prepared weights held at once (the set a batch
            needs is always held, even over the budget).
        announce: write each held set's step into its serving announcements.
        on_load: told of every load: ``miss`` (the set was not held), ``evicted`` (sets
            dropped to fit), ``held`` and ``nbytes`` after it (the handler's metrics).
        poll_interval_s: read each held set's ``LATEST`` at least this often even when its
            ``stat`` says it is unchanged (the archive's poll interval, for stores on a
            network file system); ``None``: trust the ``stat`` (a local disk).
    """

    def __init__(self, store: CheckpointStore, root: str, engine: Engine, *, budget_bytes: int,
                 announce: bool = True, on_load: Callable[..., None] | None = None,
                 poll_interval_s: float | None = None) -> None:
        self.on_load = on_load
        self.poll_interval_s = poll_interval_s
        self.store = store
        self.root = root
        self.engine = engine
        self.budget_bytes = budget_bytes
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._families: dict[str, bool] = {}  # name -> descends from root (clone records never change)
        self._lock = threading.Lock()
        self._worker = f"{socket.gethostname()}-{os.getpid()}" if announce else None
        # An engine that does not override forward_with cannot run weight sets: asked once.
        self._supported = type(engine).forward_with is not Engine.forward_with
        self.misses = 0
        self.loads = 0
        self.evictions = 0

    def held(self) -> dict[str, int]:
        """The weight sets held now and their steps, least recently used first."""
        with self._lock:
            return {name: h.step for name, h in self._held.items()}

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(h.nbytes for h in self._held.values())

    def get(self, name: str, *, min_step: int = -1) -> tuple[int, Any]:
        """The newest step of weight set ``name`` and its prepared weights, loading it when needed.

        Raises:
            InputError: ``name`` is no clone of this model (status 404; the message names it).
            StoreError / EngineError: its newest step cannot be loaded (those rows fail alone).
        """
        self._check_family(name)
        if not self._supported:
            self.engine.forward_with([], None)  # raises the engine's own "cannot serve weight sets"
        stamp = self.store.latest_stamp(name)
        now = time.monotonic()
        with self._lock:
            held = self._held.get(name)
        if held is not None and held.step >= min_step:
            fresh = stamp == held.stamp and (self.poll_interval_s is None or now - held.read_at < self.poll_interval_s)
            if not fresh:
                latest = self.store.latest(name)
                fresh = latest is None or held.step >= latest
                if fresh:  # nothing newer: remember what was read, for the next batches
                    held.stamp, held.read_at = stamp, now
            if fresh:
                with self._lock:
                    if name in self._held:
                        self._held.move_to_end(name)
                return held.step, held.prepared
        if held is None:
            self.misses += 1
        ckpt = self.store.load(name, -1)
        prepared = self.engine.prepare_weights(ckpt.weights)
        nbytes = sum(int(v.nbytes) for v in prepared.values()) if isinstance(prepared, dict) else ckpt.meta.nbytes
        with self._lock:
            self.loads += 1
            self._held[name] = _Held(ckpt.step, prepared, nbytes, stamp, now)
            self._held.move_to_end(name)
            evicted = self._evict(keep=name)
            count, used = len(self._held), sum(h.nbytes for h in self._held.values())
        if self.on_load is not None:
            self.on_load(miss=held is None, evicted=len(evicted), held=count, nbytes=used)
        self._announce(name, ckpt.step)
        for gone in evicted:
            self._withdraw(gone)
        return ckpt.step, prepared

    def _check_family(self, name: str) -> None:
        ok = self._families.get(name)
        if ok is None:
            try:
                ok = name != self.root and family_root(self.store, name) == self.root
            except ConfigError:
                ok = False
            self._families[name] = ok
        if not ok:
            raise InputError(
                f"no weight set {name!r} of {self.root!r}: {WEIGHTS_HEADER} names a clone of this model "
                f"(RemoteModel.clone), such as {self.root}-clone-step-<step>; leave the header out for "
                f"{self.root!r}'s own weights", status=404)

    def _evict(self, *, keep: str) -> list[str]:
        """Drop least recently used sets until within the budget (call holding the lock)."""
        gone = []
        total = sum(h.nbytes for h in self._held.values())
        for name in list(self._held):
            if total <= self.budget_bytes:
                break
            if name == keep:
                continue
            total -= self._held.pop(name).nbytes
            self.evictions += 1
            gone.append(name)
        return gone

    def _announce(self, name: str, step: int) -> None:
        if self._worker is None:
            return
        try:
            self.store.announce_serving(name, self._worker, step, pid=os.getpid(), host=socket.gethostname())
        except (OSError, BrayError) as err:  # advisory: serving goes on
            log.warning("bray: could not announce weight set %s step %d: %s", name, step, err)

    def _withdraw(self, name: str) -> None:
        if self._worker is not None:
            self.store.withdraw_serving(name, self._worker)

    def close(self) -> None:
        """Forget every set (and withdraw their announcements)."""
        with self._lock:
            names = list(self._held)
            self._held.clear()
        for name in names:
            self._withdraw(name)
