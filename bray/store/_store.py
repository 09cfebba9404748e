"""CheckpointStore: publish, read, retain, clone and watch the steps of every model in a folder."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bray.errors import (
    ConfigError,
    StepConflictError,
    StepNotFoundError,
    StoreError,
    StoreWriteError,
)
from bray.store._durable import (
    delete_all,
    discard,
    flock,
    fsync_dir,
    sweep_tmp,
    tmp_name,
    write_durable,
    replace_durable,
)
from bray.store._layout import (
    EXPORT_DIRNAME,
    FORMAT_VERSION,
    LATEST_FILE,
    LEAGUE_DIR,
    LOCK_FILE,
    META_FILE,
    SERVING_DIRNAME,
    STEPS_DIR,
    TMP_DIR,
    WEIGHTS_FILE,
    NAME_RE,
    STEP_DIGITS,
    check_name,
    check_step,
    step_str,
    vanished,
)
from bray.store._clones import CloneRecords
from bray.store._holds import HoldRecords
from bray.store._meta import Checkpoint, StepMeta, parse_meta
from bray.store._retention import RetentionRules
from bray.store._serving import ServingAnnouncements
from bray.store._weights import decode_weights, read_all, serialize_weights, verify_weights
from bray.store.watch import StoreWatch


__all__ = ["Checkpoint", "CheckpointStore", "StepMeta", "StoreWatch"]


logger = logging.getLogger("bray.store")


_LOAD_ATTEMPTS = 3


class CheckpointStore(RetentionRules, CloneRecords, ServingAnnouncements, HoldRecords):
    """A directory of versioned weights, safe for one or many publishers and any number of readers.

    Args:
        root: the store directory; created on the first publish, not here.
        keep_last: how many of the newest steps retention keeps (>= 1).
        checkpoint_interval: Bray's rule. An ``int`` N keeps for good every step at
            least N steps after the previous checkpoint step (with steps published one
            by one: 0, N, 2N, ...). A ``float`` ``B.F`` keeps steps at least
            ``max(B, int(F * 10**d))`` after the previous one, where ``d`` is the number
            of digits of ``step // 10``: the interval grows with the step (``10.1``
            keeps about every 10% of the run). ``0``: no step-based checkpoints.
        checkpoint_interval_s: a step published at least this many seconds after the
            previous checkpoint step is kept for good (0: none).
            With either set, the first step published is a checkpoint (Bray keeps step 0).

    Raises:
        ConfigError: an option is out of range.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int = 5,
        checkpoint_interval: int | float = 0,
        checkpoint_interval_s: float = 0.0,
    ) -> None:
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ConfigError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        if (
            not isinstance(checkpoint_interval, (int, float))
            or isinstance(checkpoint_interval, bool)
            or not math.isfinite(checkpoint_interval)
            or checkpoint_interval < 0
        ):
            raise ConfigError(
                "checkpoint_interval must be an integer number of steps >= 0 (0 turns it off) or a "
                f"float B.F (a growing interval, Bray's meaning), got {checkpoint_interval!r}"
            )
        if (
            not isinstance(checkpoint_interval_s, (int, float))
            or isinstance(checkpoint_interval_s, bool)
            or not math.isfinite(checkpoint_interval_s)
            or checkpoint_interval_s < 0
        ):
            raise ConfigError(
                "checkpoint_interval_s must be a finite number of seconds >= 0 (0 turns it off), "
                f"got {checkpoint_interval_s!r}"
            )
        self.root = Path(root).expanduser()
        self._root_str = str(self.root)  # for the os.path calls on the hot path
        self.keep_last = keep_last
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_interval_s = float(checkpoint_interval_s)
        # (name, step) -> (time, checkpoint); step metadata never changes once written
        self._ckpt_cache: dict[tuple[str, int], tuple[float, bool]] = {}

    def __repr__(self) -> str:
        return (
            f"CheckpointStore({str(self.root)!r}, keep_last={self.keep_last}, "
            f"checkpoint_interval={self.checkpoint_interval}, "
            f"checkpoint_interval_s={self.checkpoint_interval_s})"
        )

    # ------------------------------------------------------------------ paths

    def model_dir(self, name: str) -> Path:
        """The directory of one model, ``<root>/<name>`` (it may not exist yet).

        The exported model definition lives in :meth:`export_dir`.

        Raises:
            ConfigError: ``name`` is not a valid model name.
        """
        check_name(name)
        return self.root / name

    def _step_dir(self, name: str, step: int) -> Path:
        return self.root / name / STEPS_DIR / step_str(step)

    def export_dir(self, name: str) -> Path:
        """Where the exported model definition of ``name`` lives (it may not exist yet)."""
        return self.model_dir(name) / EXPORT_DIRNAME

    def serving_dir(self, name: str) -> Path:
        """Where the workers serving ``name`` announce the step they have staged."""
        return self.model_dir(name) / SERVING_DIRNAME

    def weights_path(self, name: str, step: int) -> Path:
        """The safetensors file of a kept step, for streaming it elsewhere unread.

        Check its sha256 against :meth:`meta` while copying; :meth:`load` does that itself.

        Raises:
            ConfigError: ``name`` is not a valid model name.
        """
        check_name(name)
        return self._step_dir(name, step) / WEIGHTS_FILE

    def league_dir(self, name: str, metric: str) -> Path:
        """Where the league results of ``name`` for ``metric`` live (it may not exist yet).

        One JSON file per writer, each replaced atomically (see :mod:`bray.league`).

        Raises:
            ConfigError: ``name`` or ``metric`` is not a valid name.
        """
        check_name(name)
        check_name(metric, what="metric name")
        return self.root / name / LEAGUE_DIR / metric

    # ---------------------------------------------------------------- reading

    def names(self) -> list[str]:
        """Model names that have a step directory or a latest pointer, sorted."""
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in entries:
            if not NAME_RE.fullmatch(entry.name) or not entry.is_dir():
                continue
            path = Path(entry.path)
            if (path / STEPS_DIR).is_dir() or (path / LATEST_FILE).is_file():
                found.append(entry.name)
        return sorted(found)

    def latest(self, name: str) -> int | None:
        """The latest published step of ``name``.

        Reads ``LATEST``; when it is missing or points at a step directory that is gone,
        falls back to the largest step directory.

        Returns:
            The step, or ``None`` when nothing is published.

        Raises:
            ConfigError: ``name`` is not a valid model name.
        """
        check_name(name)
        pointed = self._read_latest_file(name)
        if pointed is not None and (self._step_dir(name, pointed) / META_FILE).is_file():
            return pointed
        kept = self._listing(name)
        return kept[-1] if kept else None

    def latest_stamp(self, name: str) -> tuple[int, int, int] | None:
        """What changes whenever ``name``'s ``LATEST`` is replaced: its inode, size and
        modification time, from one ``stat`` (``None``: no ``LATEST``).

        For a reader that asks often whether there is a newer step (a worker's weight
        sets, before every batch) and calls :meth:`latest` only when this changed: a publish
        renames a new ``LATEST`` into place, so the inode changes. On a network file system
        the client may answer a ``stat`` from its attribute cache; such a reader also calls
        :meth:`latest` at its poll interval (an ``open`` revalidates).

        Raises:
            ConfigError: ``name`` is not a valid model name.
        """
        check_name(name)
        try:
            st = os.stat(os.path.join(self._root_str, name, LATEST_FILE))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def steps(self, name: str) -> list[int]:
        """The kept steps of ``name`` up to the latest, ascending (empty when none).

        Raises:
            ConfigError: ``name`` is not a valid model name.
        """
        latest = self.latest(name)
        if latest is None:
            return []
        return [s for s in self._listing(name) if s <= latest]

    def resolve(self, name: str, step: int = -1) -> int:
        """The kept step that reading ``step`` gives.

        Args:
            name: the model name.
            step: ``-1`` for the latest, else a step number; a step that is not kept
                snaps down to the largest kept step at or below it.

        Returns:
            A kept step number.

        Raises:
            ConfigError: invalid name or step.
            StepNotFoundError: nothing published, or no kept step at or below ``step``.
        """
        check_name(name)
        if not isinstance(step, int) or isinstance(step, bool) or step < -1:
            raise ConfigError(f"step must be -1 (the latest) or an integer >= 0, got {step!r}")
        latest = self.latest(name)
        if latest is None:
            known = self.names()
            raise StepNotFoundError(
                f"no step of {name!r} is published in {self.root}; publish one first"
                + (f" (the store holds {known})" if known else ""),
                name=name, step=step,
            )
        if step == -1 or step >= latest:
            return latest
        kept = [s for s in self._listing(name) if s <= step]
        if not kept:
            oldest = self.steps(name)
            raise StepNotFoundError(
                f"no kept step of {name!r} at or below {step}; the oldest kept step is "
                f"{oldest[0] if oldest else latest} (retention keeps the newest {self.keep_last} "
                "and every checkpoint step); ask for a later step",
                name=name, step=step,
            )
        return kept[-1]

    def meta(self, name: str, step: int = -1, *, exact: bool = False) -> StepMeta:
        """The metadata of a step (snapping down like :meth:`resolve`).

        Args:
            name: the model name.
            step: ``-1`` for the latest, else a step number.
            exact: that very step or an error, never another one (for callers that
                have resolved the step already and name something after it).

        Raises:
            ConfigError: invalid name or step.
            StepNotFoundError: no such step (with ``exact``: that step is not kept).
            CorruptCheckpointError: ``meta.json`` is unreadable.
        """
        if exact:
            check_name(name)
            check_step(step)
            try:
                raw = (self._step_dir(name, step) / META_FILE).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                raise StepNotFoundError(
                    f"step {step} of {name!r} is not kept in {self.root} (retention keeps the newest "
                    f"{self.keep_last} steps and every checkpoint step); the kept steps are {self.steps(name)}",
                    name=name, step=step,
                ) from None
            return parse_meta(raw, name, step)
        for _ in range(_LOAD_ATTEMPTS):
            resolved = self.resolve(name, step)
            try:
                raw = (self._step_dir(name, resolved) / META_FILE).read_bytes()
            except FileNotFoundError:
                continue  # removed by retention after resolve; snap again
            return parse_meta(raw, name, resolved)
        raise vanished(name, step)

    def load(
        self,
        name: str,
        step: int = -1,
        *,
        framework: str = "numpy",
        device: str = "cpu",
        verify: bool = True,
        mapped: bool = False,
    ) -> Checkpoint:
        """Read one step's weights.

        The weights file is opened before it is read, so a step that retention removes
        mid-read is still read whole; a step that vanished between resolving and
        opening is resolved again (snapping down).

        Args:
            name: the model name.
            step: ``-1`` for the latest, else a step (snapping down like :meth:`resolve`).
            framework: ``"numpy"`` for ndarrays, ``"pt"`` for torch tensors (needed for
                dtypes numpy lacks, such as bfloat16).
            device: torch device for ``framework="pt"``; must be ``"cpu"`` for numpy.
            verify: check the file's size and sha256 against its metadata.
            mapped: map the file (private, copy-on-write) instead of reading it: for a
                node's weight cache in shared memory (:mod:`bray.store.node_loader`),
                where a read would be one more copy of what the loader already verified.

        Returns:
            The :class:`Checkpoint`; arrays are writable views of one buffer.

        Raises:
            ConfigError: invalid name, step, framework or device, or numpy asked for a
                dtype it lacks.
            StepNotFoundError: no such step.
            CorruptCheckpointError: size, checksum or format mismatch.
        """
        if framework not in ("numpy", "pt"):
            raise ConfigError(f"framework must be 'numpy' or 'pt', got {framework!r}")
        if framework == "numpy" and device != "cpu":
            raise ConfigError(
                f"numpy arrays live on the cpu, got device={device!r}; use framework='pt' for other devices"
            )
        for _ in range(_LOAD_ATTEMPTS):
            resolved = self.resolve(name, step)
            folder = self._step_dir(name, resolved)
            try:
                with open(folder / WEIGHTS_FILE, "rb", buffering=0) as wf:
                    raw_meta = (folder / META_FILE).read_bytes()
                    data = _map(wf) if mapped else read_all(wf)
            except FileNotFoundError:
                continue  # retention took it between resolve and open; snap again
            meta = parse_meta(raw_meta, name, resolved)
            if verify:
                verify_weights(data, meta)
            weights = decode_weights(data, meta, framework, device)
            return Checkpoint(name=name, step=resolved, weights=weights, meta=meta)
        raise vanished(name, step)

    # ---------------------------------------------------------------- writing

    def publish(self, name: str, weights: Any, step: int | None = None) -> int:
        """Publish new weights as the next (or the given) step.

        Args:
            name: the model name, a path component ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}``.
            weights: a state_dict (mapping of str to torch.Tensor) or a NestedArray of
                numpy arrays (an ndarray, or nested list/tuple/dict of them), flattened to
                dotted keys (``"a.0.b"``).
            step: the step number, greater than the latest; ``None`` takes latest + 1
                (0 for the first).

        Returns:
            The step published.

        Raises:
            ConfigError: invalid name, step or weights.
            StepConflictError: ``step`` is not above the latest, or another publisher
                took it first; nothing was overwritten.
            StoreWriteError: the file system refused the write; nothing was published.
        """
        check_name(name)
        if step is not None:
            check_step(step)
        payload, keys = serialize_weights(weights)
        digest = hashlib.sha256(payload).hexdigest()
        mdir = self.root / name
        tmp_root = mdir / TMP_DIR
        tmp: Path | None = None
        doomed: list[Path] = []
        try:
            tmp_root.mkdir(parents=True, exist_ok=True)
            sweep_tmp(tmp_root)
            tmp = tmp_root / tmp_name("pub")
            tmp.mkdir()
            write_durable(tmp / WEIGHTS_FILE, payload)
            with flock(mdir / LOCK_FILE):
                current = self._max_step(name)
                if step is None:
                    step = 0 if current is None else current + 1
                    check_step(step)
                elif current is not None and step <= current:
                    visible = self._read_latest_file(name)
                    hidden = (f" (step {current} was written by a publisher that died before moving LATEST; "
                              "it is kept but not served)") if visible is not None and visible < current else ""
                    raise StepConflictError(
                        f"step {step} of {name!r} is not greater than the latest published step "
                        f"{current}{hidden}; steps only grow (publish with step=None to take step {current + 1})",
                        name=name, step=step, latest=current,
                    )
                now = time.time()
                checkpoint = self._is_checkpoint_step(name, step, now)
                meta = {
                    "format": FORMAT_VERSION,
                    "name": name,
                    "step": step,
                    "time": now,
                    "nbytes": len(payload),
                    "sha256": digest,
                    "keys": keys,
                    "checkpoint": checkpoint,
                }
                write_durable(tmp / META_FILE, json.dumps(meta, indent=1).encode())
                fsync_dir(tmp)
                steps_dir = mdir / STEPS_DIR
                steps_dir.mkdir(exist_ok=True)
                final = steps_dir / step_str(step)
                try:
                    os.rename(tmp, final)
                except OSError as err:
                    if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        raise StepConflictError(
                            f"step {step} of {name!r} was taken by another publisher; steps only grow "
                            "(publish with step=None to take the next one)",
                            name=name, step=step, latest=step,
                        ) from err
                    raise
                tmp = None
                try:
                    fsync_dir(steps_dir)
                    _write_latest(mdir, step)
                except OSError:
                    # Not visible yet (LATEST still points below); take it back so the
                    # caller's "not published" holds.
                    discard(final, tmp_root)
                    raise
                self._ckpt_cache[(name, step)] = (now, checkpoint)
                doomed = self._retire(name, tmp_root)
        except StoreError:
            raise
        except OSError as err:
            what = f"step {step}" if step is not None else "the next step"
            raise StoreWriteError(
                f"the disk refused the write of {what} of {name!r} under {mdir} "
                f"({err.strerror or err}); the step was not published. Free space or fix the "
                "mount/permissions, then publish again",
                name=name, step=step,
            ) from err
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if doomed:
            # Deleting retired steps costs a few ms of unlinks; the new step is already
            # visible, so do it off the publisher's path. An interrupted deletion leaves
            # ".tmp/del-*" entries that the next publish's sweep removes.
            threading.Thread(target=delete_all, args=(doomed,), name="bray-store-retire", daemon=True).start()
        return step

    def watch(
        self,
        name: str,
        callback: Callable[[int], None],
        *,
        poll_interval_s: float | None = None,
    ) -> StoreWatch:
        """Call ``callback(step)`` from a background thread for each new latest step.

        Steps published after this call are delivered in increasing order; when several
        arrive at once only the newest may be delivered, never an older one after a newer.
        Exceptions from ``callback`` are logged, not raised. To not miss a step, start the
        watch first, then load the latest, and ignore callbacks at or below what you loaded.

        Args:
            name: the model name (it need not be published yet).
            callback: called with each new latest step.
            poll_interval_s: read the ``LATEST`` pointer at this interval instead of
                using inotify (NFS and other shared file systems, where inotify sees only
                this host's writes). Each poll opens and reads that one small file, so NFS's
                close-to-open consistency gives a fresh answer without waiting out the
                attribute cache. Without it, inotify is used (re-checking every 5 s even
                without an event), falling back to polling every second where inotify
                cannot start.

        Returns:
            A running :class:`StoreWatch`; call ``stop()`` or use it as a context manager.

        Raises:
            ConfigError: invalid name or interval.
        """
        check_name(name)
        if poll_interval_s is not None and (
            isinstance(poll_interval_s, bool)
            or not isinstance(poll_interval_s, (int, float))
            or not math.isfinite(poll_interval_s)
            or poll_interval_s <= 0
        ):
            raise ConfigError(f"poll_interval_s must be a number of seconds > 0, got {poll_interval_s!r}")
        return StoreWatch(self, name, callback, poll_interval_s)

    # -------------------------------------------------------------- internals

    def _read_latest_file(self, name: str) -> int | None:
        try:
            text = (self.root / name / LATEST_FILE).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return int(text) if text.isascii() and text.isdigit() else None

    def _listing(self, name: str) -> list[int]:
        # Only complete steps appear here: a step directory is born by rename.
        try:
            entries = os.listdir(self.root / name / STEPS_DIR)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(e) for e in entries if len(e) == STEP_DIGITS and e.isascii() and e.isdigit())

    def _max_step(self, name: str) -> int | None:
        """The largest step ever committed, LATEST or not (call holding the lock)."""
        candidates = [s for s in (self._read_latest_file(name),) if s is not None]
        listing = self._listing(name)
        if listing:
            candidates.append(listing[-1])
        return max(candidates) if candidates else None


def _map(f: Any) -> Any:
    """A private writable mapping of the whole file (what ``read_all`` returns, without the reads)."""
    import mmap

    if os.fstat(f.fileno()).st_size == 0:
        return bytearray()
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _write_latest(mdir: Path, step: int) -> None:
    replace_durable(mdir / LATEST_FILE, f"{step}\n".encode(), tmp_dir=mdir / TMP_DIR)
