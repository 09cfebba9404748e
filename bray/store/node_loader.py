"""One weight loader per node: each step read and verified once, handed to every worker in shared memory.

Without it every TorchServe worker of a node reads each published step from the store (a
shared volume at scale) and checks its sha256 itself: bytes x workers per node per
publish (``docs/scale.md`` section 1). With it, one process per node follows the store
(polling ``LATEST``, as on a shared volume), reads and verifies each new step once and
writes it into a *node cache*: a directory in ``/dev/shm`` with the store's own layout
(``<cache>/<name>/steps/<step>/weights.safetensors`` and ``meta.json``, then ``LATEST``
moved with :func:`os.replace`), so a step appears there whole or not at all. Workers
started with ``BRAY_NODE_CACHE=<cache>`` follow the cache instead of the store: inotify
works there (a local tmpfs), and they map the file instead of reading it
(:meth:`~bray.store.CheckpointStore.load` with ``mapped=True``, no second checksum). A
step missing from the cache (the loader not started yet, or behind) is read from the
store as before, so the cache only ever saves reads, never withholds a step.

    python -m bray.store.node_loader --store /mnt/bray-store --cache /dev/shm/bray-node --name policy

Only the newest ``keep`` steps stay in the cache (a worker's mapping of a removed file
stays valid until it lets go).

The workers announce the step they have staged into the cache too (``.serving/``, with
their heartbeats: shared memory, no writes to the store), and the loader relays them as one
``<host>.node.json`` per model, rewritten when a worker's step changes (looked at every
:data:`RELAY_S`) and at least every heartbeat: one write per node instead of one per
worker. A worker whose process is gone, or whose own heartbeat stopped, is left out. A
step still counts as served when the worker has it, not when the loader does.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Sequence

from bray.errors import BrayError, StepNotFoundError
from bray.store._durable import pid_alive
from bray.store._layout import LATEST_FILE, META_FILE, STEPS_DIR, TMP_DIR, WEIGHTS_FILE, step_str
from bray.store._meta import parse_meta
from bray.store._serving import HEARTBEAT_S, HEARTBEAT_STALE_S
from bray.store._store import CheckpointStore
from bray.store._weights import read_all, verify_weights
from bray.store.watch import StoreWatch

__all__ = ["RELAY_S", "NodeLoader", "main"]

log = logging.getLogger(__name__)

#: How often the loader looks at its workers' announcements in the cache.
RELAY_S = 0.01


class NodeLoader:
    """Copies each new step of ``names`` from ``store`` into ``cache``, verified, once.

    Args:
        store: the checkpoint store (a shared volume).
        cache: the node cache directory (tmpfs: ``/dev/shm/...``); created.
        names: the models to follow.
        poll_interval_s: read each ``LATEST`` this often (``None``: inotify, one machine).
        keep: steps of each model kept in the cache.
    """

    def __init__(self, store: CheckpointStore, cache: Path, names: Sequence[str], *,
                 poll_interval_s: float | None, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.store = store
        self.cache = Path(cache)
        self.names = tuple(names)
        self.poll_interval_s = poll_interval_s
        self.keep = keep
        self.copied = 0
        self._lock = threading.Lock()
        self._watches: list[StoreWatch] = []
        self._stop = threading.Event()
        self._relay: threading.Thread | None = None
        self._cache_store = CheckpointStore(self.cache)  # the workers' announcements, as they wrote them

    def start(self) -> None:
        """Copy each model's latest step now, then follow the store."""
        self.cache.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            latest = self.store.latest(name)
            if latest is not None:
                self.copy(name, latest)
            self._watches.append(self.store.watch(name, functools.partial(self.copy, name),
                                                  poll_interval_s=self.poll_interval_s))
        self._relay = threading.Thread(target=self._relay_announcements, name="bray-loader-relay", daemon=True)
        self._relay.start()

    def workers(self, name: str, *, now: float | None = None) -> dict[int, int]:
        """``{pid: step}`` of this node's live workers of ``name``, from their announcements in the cache."""
        now = time.time() if now is None else now
        out = {}
        for info in self._cache_store.serving(name).values():
            try:
                pid, step, stamp = int(info["pid"]), int(info["step"]), float(info["time"])
            except (KeyError, TypeError, ValueError):
                continue
            if now - stamp <= HEARTBEAT_STALE_S and pid_alive(pid):
                out[pid] = step
        return out

    def _relay_announcements(self) -> None:
        host = socket.gethostname()
        sent: dict[str, tuple[dict[int, int], float]] = {}
        while not self._stop.wait(RELAY_S):
            for name in self.names:
                try:
                    workers = self.workers(name)
                    last, at = sent.get(name, ({}, 0.0))
                    if workers != last or time.monotonic() - at >= HEARTBEAT_S:
                        self.store.announce_node(name, host, workers)
                        sent[name] = (workers, time.monotonic())
                except OSError as err:  # advisory, as a worker's own announcement is
                    log.warning("bray loader: cannot relay the announcements of %s: %s", name, err)

    def copy(self, name: str, step: int) -> None:
        """Read ``step`` of ``name`` once, check it, and make it the cache's latest (no-op when there)."""
        with self._lock:
            mdir = self.cache / name
            final = mdir / STEPS_DIR / step_str(step)
            if final.is_dir():
                return
            try:
                src = self.store.weights_path(name, step).parent
                with open(src / WEIGHTS_FILE, "rb", buffering=0) as wf:
                    raw_meta = (src / META_FILE).read_bytes()
                    data = read_all(wf)
                verify_weights(data, parse_meta(raw_meta, name, step))
            except (FileNotFoundError, StepNotFoundError):
                log.warning("bray loader: step %d of %s is gone from the store already; skipped", step, name)
                return
            except BrayError as err:  # a broken step: the workers would refuse it too
                log.error("bray loader: not caching step %d of %s: %s", step, name, err)
                return
            tmp = mdir / TMP_DIR / uuid.uuid4().hex
            tmp.mkdir(parents=True)
            (tmp / WEIGHTS_FILE).write_bytes(data)
            (tmp / META_FILE).write_bytes(raw_meta)
            final.parent.mkdir(exist_ok=True)
            os.rename(tmp, final)
            pointer = mdir / TMP_DIR / f"latest-{uuid.uuid4().hex}"
            pointer.write_text(f"{step}\n")
            os.replace(pointer, mdir / LATEST_FILE)
            self.copied += 1
            for old in sorted((mdir / STEPS_DIR).iterdir())[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def stop(self) -> None:
        self._stop.set()
        if self._relay is not None:
            self._relay.join(timeout=5)
            self._relay = None
        for watch in self._watches:
            watch.stop()
        self._watches.clear()



def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bray.store.node_loader``: run a node's loader until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m bray.store.node_loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="the checkpoint store (shared volume)")
    parser.add_argument("--cache", required=True, help="the node cache, in /dev/shm (workers get it as BRAY_NODE_CACHE)")
    parser.add_argument("--name", action="append", required=True, help="a model to follow (repeatable)")
    parser.add_argument("--poll-interval-ms", type=int, default=50, help="0: inotify (one machine)")
    parser.add_argument("--keep", type=int, default=3, help="steps of each model kept in the cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    loader = NodeLoader(CheckpointStore(args.store), Path(args.cache), args.name,
                        poll_interval_s=args.poll_interval_ms / 1e3 if args.poll_interval_ms > 0 else None,
                        keep=args.keep)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    loader.start()
    print(f"node loader: {', '.join(args.name)} from {args.store} into {args.cache}", flush=True)
    done.wait()
    loader.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
