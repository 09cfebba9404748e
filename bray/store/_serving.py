"""Serving announcements: each worker says which step of a model it serves (advisory).

``<root>/<name>/serving/<host>-<pid>.json`` holds ``{"step", "pid", "host", "time"}``;
a publisher reads them to tell when every worker serves a step (``wait()``). A worker
rewrites its file every :data:`HEARTBEAT_S` (a heartbeat), so where no management API
lists the workers (another machine's loopback, a KServe pod) the fresh announcements are
the workers, and a killed worker's file, which nobody removes, stops counting after
:data:`HEARTBEAT_STALE_S`. ``time`` is the worker's wall clock: the machines' clocks
must agree to well within that bound (NTP does).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

__all__ = ["HEARTBEAT_S", "HEARTBEAT_STALE_S", "ServingAnnouncements"]

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
        path = self.serving_dir(name) / f"{worker}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, **info, "time": time.time()}))
        os.replace(tmp, path)

    def withdraw_serving(self, name: str, worker: str) -> None:
        """Remove ``worker``'s announcement (it stops serving ``name``); gone already is fine."""
        try:
            (self.serving_dir(name) / f"{worker}.json").unlink()
        except OSError:
            pass

    def serving(self, name: str) -> dict[str, dict[str, Any]]:
        """What every announcing worker of ``name`` serves: ``{"<host>-<pid>": {"step", "pid", ...}}``."""
        out: dict[str, dict[str, Any]] = {}
        folder = self.serving_dir(name)
        if not folder.is_dir():
            return out
        for path in folder.glob("*.json"):
            try:
                out[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced right now
        return out
