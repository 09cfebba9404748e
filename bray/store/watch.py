"""Watching a model's latest step: watchdog's inotify observer, polling where inotify does not
work (NFS and similar), and a safety re-check so a lost event is never a lost step."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

__all__ = ["StoreWatch"]

logger = logging.getLogger("bray.store")


# Watchers re-check this often even without a file-system event (a lost inotify watch,
# a directory deleted and made again).
_WATCH_SAFETY_S = 5.0
_DEFAULT_POLL_S = 1.0


class Followed(Protocol):
    """What a watch reads of a store (a :class:`~bray.store.CheckpointStore`): no import of it here."""

    root: Path

    def latest(self, name: str) -> int | None: ...


class StoreWatch:
    """A running watch on one model's latest step; made by :meth:`CheckpointStore.watch`.

    Attributes:
        polling: ``True`` when a polling observer is in use, ``False`` with inotify
            (or the platform's native observer).
    """

    def __init__(
        self,
        store: Followed,
        name: str,
        callback: Callable[[int], None],
        poll_interval_s: float | None,
    ) -> None:
        self._store = store
        self._name = name
        self._callback = callback
        self._poll_interval_s = poll_interval_s
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # guards the observer and the scheduled watch
        self._watched_path: Path | None = None
        self._watched: Any = None
        self._last = store.latest(name)
        self.polling = poll_interval_s is not None
        # Polling asked for: no observer at all, the worker thread reads LATEST itself.
        self._observer: Any = None if self.polling else self._new_observer()
        self._ensure_watch()
        self._thread = threading.Thread(target=self._run, name=f"bray-store-watch-{name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"StoreWatch({self._name!r}, polling={self.polling}, last={self._last})"

    def __enter__(self) -> StoreWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop watching and wait (up to ``timeout_s``) for the thread to end. Idempotent."""
        self._stopped.set()
        self._wake.set()
        with self._lock:
            observer = self._observer
        if observer is not None:
            observer.stop()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        if observer is not None and threading.current_thread() is not observer:
            observer.join(timeout_s)

    # The observer only wakes the worker thread; the worker reads LATEST and calls back,
    # so a slow callback never blocks event collection and wakes coalesce.
    def _new_observer(self) -> Any:
        from watchdog.observers.polling import PollingObserver

        if not self.polling:
            try:
                from watchdog.observers import Observer

                observer = Observer()
                observer.start()
                return observer
            except OSError as err:  # inotify instance limits, no inotify at all
                logger.warning("inotify is not available (%s); polling %s every %.1f s instead",
                               err, self._store.root / self._name, _DEFAULT_POLL_S)
                self.polling = True
        observer = PollingObserver(timeout=self._poll_interval_s or _DEFAULT_POLL_S)
        observer.start()
        return observer

    def _target(self) -> Path:
        path = self._store.root / self._name
        while not path.is_dir() and path.parent != path:
            path = path.parent
        return path

    def _ensure_watch(self) -> None:
        if self._poll_interval_s is not None:
            return  # nothing to schedule: _run polls
        target = self._target()
        if target == self._watched_path:
            return
        from watchdog.events import (
            DirCreatedEvent,
            DirDeletedEvent,
            DirMovedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEventHandler,
        )

        wake = self._wake

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        with self._lock:
            if target == self._watched_path or self._stopped.is_set():
                return
            if self._watched is not None:
                try:
                    self._observer.unschedule(self._watched)
                except (KeyError, OSError):
                    pass
            kinds = [DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileCreatedEvent,
                     FileDeletedEvent, FileModifiedEvent, FileMovedEvent]
            try:
                self._watched = self._observer.schedule(_Wake(), str(target), recursive=False,
                                                        event_filter=kinds)
            except OSError as err:
                if self.polling:
                    raise
                logger.warning("inotify cannot watch %s (%s); polling every %.1f s instead",
                               target, err, _DEFAULT_POLL_S)
                self._observer.stop()
                self.polling = True
                self._observer = self._new_observer()
                self._watched = self._observer.schedule(_Wake(), str(target), recursive=False,
                                                        event_filter=kinds)
            self._watched_path = target
        self._wake.set()  # check once now: something may have changed before the watch began

    def _check(self) -> None:
        try:
            step = self._store.latest(self._name)
        except Exception:  # a store being rebuilt under us; the next wake retries
            logger.debug("watch on %r could not read the latest step", self._name, exc_info=True)
            return
        if step is None or (self._last is not None and step <= self._last):
            return
        self._last = step
        try:
            self._callback(step)
        except Exception:
            logger.exception("watch callback for step %d of %r raised; watching on", step, self._name)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._ensure_watch()
            except Exception:
                logger.warning("watch on %r could not (re)schedule its observer", self._name, exc_info=True)
            self._check()
            self._wake.wait(self._poll_interval_s or _WATCH_SAFETY_S)
            self._wake.clear()
