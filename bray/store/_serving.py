"""Serving announcements: each worker says which step of a model it serves (advisory).

``<root>/<name>/serving/<host>-<pid>.json`` holds ``{"step", "pid", "host", "time"}``;
a publisher reads them to tell when every worker serves a step (``wait()``). A worker
rewrites its file every :data:`HEARTBEAT_S` (a heartbeat), so where no management API
lists the workers (another machine's loopback, a KServe pod) the fresh announcements are
the workers, and a killed worker's file, which nobody removes, stops counting after
:data:`HEARTBEAT_STALE_S`. Where a node runs a weight loader, its workers announce into the
node's cache and the loader writes one ``<host>.node.json`` for all of them
(:meth:`ServingAnnouncements.announce_node`): one write per node per heartbeat. ``time`` is the worker's wall clock: the machines' clocks
must agree to well within that bound (NTP does).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

__all__ = ["HEARTBEAT_S", "HEARTBEAT_STALE_S", "NODE_SUFFIX", "ServingAnnouncements"]

#: A node's announcement file for all its workers: ``<host>.node.json``.
NODE_SUFFIX = ".node.json"

#: How often a serving worker rewrites its announcement.
HEARTBEAT_S = 1.0
#: An announcement older than this is a worker gone (killed, its node down or cut off).
HEARTBEAT_STALE_S = 5.0


class ServingAnnouncements:
    """:class:`~bray.store.CheckpointStore`'s serving announcements (a mixin)."""

    if TYPE_CHECKING:  # pragma: no cover - what the store provides
        def serving_dir(self, name: str) -> Path: ...

    def announce_serving(self, name: str, worker: str, step: int, **info: Any) -> None:
        """Say that ``worker`` (``"<host>-<pid>"``) serves ``step`` of ``name`` (replaced atomically).

        Advisory: what :meth:`serving` reads to tell when a step is served everywhere.

        Raises:
            OSError: the file could not be written (the caller logs it and serves on).
        """
        _replace_json(self.serving_dir(name) / f"{worker}.json", {"step": step, **info, "time": time.time()})

    def withdraw_serving(self, name: str, worker: str) -> None:
        """Remove ``worker``'s announcement (it stops serving ``name``); gone already is fine."""
        try:
            (self.serving_dir(name) / f"{worker}.json").unlink()
        except OSError:
            pass

    def announce_node(self, name: str, host: str, workers: dict[int, int]) -> None:
        """Say, for a whole node, which step each of its workers serves (replaced atomically).

        What a node's weight loader writes instead of every worker writing its own file:
        one write per node per heartbeat. :meth:`serving` lists its workers as if each had
        announced itself, with the node file's time.

        Raises:
            OSError: the file could not be written.
        """
        _replace_json(self.serving_dir(name) / f"{host}{NODE_SUFFIX}",
                      {"host": host, "workers": {str(p): s for p, s in workers.items()}, "time": time.time()})

    def serving(self, name: str) -> dict[str, dict[str, Any]]:
        """What every announcing worker of ``name`` serves: ``{"<host>-<pid>": {"step", "pid", ...}}``.

        A node's file (:meth:`announce_node`) counts as one announcement per worker it lists.
        """
        out: dict[str, dict[str, Any]] = {}
        folder = self.serving_dir(name)
        if not folder.is_dir():
            return out
        for path in folder.glob("*.json"):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced right now
            if not path.name.endswith(NODE_SUFFIX):
                out[path.stem] = info
                continue
            try:
                host, stamp = str(info["host"]), float(info["time"])
                for pid, step in dict(info["workers"]).items():
                    out[f"{host}-{pid}"] = {"step": int(step), "pid": int(pid), "host": host, "time": stamp}
            except (KeyError, TypeError, ValueError):
                continue  # not a node file we can read
        return out


def _replace_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file beside it, then ``os.replace``).

    Not fsynced: an announcement is advisory and rewritten every heartbeat.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)
