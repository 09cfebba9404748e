"""CheckpointStore: publish, read, retain, clone and watch the steps of every model in a folder."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bray.errors import (
    ConfigError,
    CorruptCheckpointError,
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
    CLONE_FILE,
    EXPORT_DIRNAME,
    FORMAT_VERSION,
    LATEST_FILE,
    LEAGUE_DIR,
    LOCK_FILE,
    META_FILE,
    SERVING_DIRNAME,
    SPEC_FILE,
    STEPS_DIR,
    TMP_DIR,
    WEIGHTS_FILE,
    NAME_RE,
    STEP_DIGITS,
    check_name,
    check_step,
    corrupt,
    step_str,
    vanished,
)
from bray.store._holds import Hold, Retention, read_lost, remove_hold, write_hold
from bray.store._weights import decode_weights, read_all, serialize_weights, verify_weights
from bray.store.watch import StoreWatch


__all__ = ["Checkpoint", "CheckpointStore", "StepMeta", "StoreWatch"]


logger = logging.getLogger("bray.store")


_LOAD_ATTEMPTS = 3


@dataclass(frozen=True)
class StepMeta:
    """What the store knows about one published step.

    Attributes:
        name: the model name.
        step: the step number.
        time: when it was published (unix seconds).
        nbytes: size of the weights file in bytes.
        sha256: hex sha256 of the weights file.
        keys: the flattened tensor names, sorted.
        checkpoint: whether retention keeps this step for good (the clonable pool).
    """

    name: str
    step: int
    time: float
    nbytes: int
    sha256: str
    keys: tuple[str, ...]
    checkpoint: bool


@dataclass(frozen=True)
class Checkpoint:
    """One loaded step: flat ``weights`` (numpy arrays or torch tensors) and its ``meta``."""

    name: str
    step: int
    weights: dict[str, Any]
    meta: StepMeta


class CheckpointStore:
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

    # ---------------------------------------------------------------- clones

    def clone_origin(self, name: str) -> tuple[str, int] | None:
        """The ``(source model, step)`` a clone was made from, or ``None`` if ``name`` is no clone.

        Raises:
            ConfigError: invalid name.
            CorruptCheckpointError: the record is unreadable.
        """
        check_name(name)
        try:
            raw = (self.root / name / CLONE_FILE).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            doc = json.loads(raw)
            return str(doc["source"]), int(doc["step"])
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptCheckpointError(
                f"{self.root / name / CLONE_FILE} is unreadable ({err}); delete the clone's folder "
                "and clone again", name=name,
            ) from err

    def record_clone_origin(self, name: str, *, source: str, step: int) -> tuple[str, int]:
        """Record once that ``name`` is a clone of ``source`` at ``step``.

        The first writer wins (the record is linked into place, never replaced), so
        processes cloning at the same time agree on one origin.

        Returns:
            The recorded origin: the one given, or the one recorded before.

        Raises:
            ConfigError: invalid name or step.
            StoreWriteError: the disk refused the write.
        """
        check_name(name)
        check_name(source)
        check_step(step)
        mdir = self.root / name
        tmp_root = mdir / TMP_DIR
        data = json.dumps({"format": FORMAT_VERSION, "source": source, "step": step, "time": time.time()}).encode()
        try:
            tmp_root.mkdir(parents=True, exist_ok=True)
            tmp = tmp_root / tmp_name("clone")
            write_durable(tmp, data)
            try:
                os.link(tmp, mdir / CLONE_FILE)  # fails if recorded already: first writer wins
                fsync_dir(mdir)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        except OSError as err:
            raise StoreWriteError(
                f"the disk refused the clone record of {name!r} under {mdir} ({err.strerror or err}); "
                "free space or fix the mount/permissions, then clone again", name=name,
            ) from err
        origin = self.clone_origin(name)
        if origin is None:  # linked just now, by us or another process; deleted since
            raise StepNotFoundError(f"the clone record of {name!r} vanished while being written; clone again",
                                    name=name)
        return origin

    def seed_clone(self, name: str) -> None:
        """Give a recorded clone its source's model definition and its origin step, once.

        Copies the source's export into ``name``'s folder (renamed into place, so a
        reader sees all of it or nothing) and publishes the origin step's weights as the
        clone's first step. Processes seeding the same clone at the same time agree: the
        first rename and the first publish win, the others keep them.

        Raises:
            ConfigError: ``name`` is no clone (:meth:`record_clone_origin` first).
            StepNotFoundError: the origin step is no longer kept.
            StoreWriteError: the disk refused a write.
        """
        origin = self.clone_origin(name)
        if origin is None:
            raise ConfigError(f"{name!r} is no clone: record its origin first (record_clone_origin)")
        if self.latest(name) is not None:
            return
        source, step = origin
        export = self.export_dir(name)
        if not (export / SPEC_FILE).is_file():
            tmp = self.model_dir(name) / TMP_DIR / tmp_name("export")
            try:
                shutil.copytree(self.export_dir(source), tmp)
                try:
                    os.rename(tmp, export)
                except OSError:
                    if not (export / SPEC_FILE).is_file():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)  # another process seeded it first
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreWriteError(
                    f"cannot copy the model definition of {source!r} to the clone {name!r} under {export} "
                    f"({err.strerror or err}); free space or fix the mount/permissions, then clone again", name=name,
                ) from err
        ckpt = self.load(source, step, framework="pt")  # keeps dtypes numpy lacks (bfloat16)
        try:
            self.publish(name, ckpt.weights, step=step)
        except StepConflictError:
            if self.latest(name) is None:
                raise

    # -------------------------------------------------------- serving announcements

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

    # ---------------------------------------------------------------- holds

    def hold_steps(self, name: str, *, holder: str, every: int, above: int, ttl_s: float) -> None:
        """Ask retention to keep every step divisible by ``every`` above step ``above``.

        For a watcher that archives every ``every``-th step (:func:`bray.archiver.watch_and_publish`)
        and may run in another process than the publisher: retention runs where steps are
        published and reads the hold from the store. The hold holds for ``ttl_s`` seconds
        from now; refresh it well before (a quarter of that), raising ``above`` as due
        steps are archived. A hold not refreshed in time is stale and ignored, so a dead
        watcher never makes the store grow for ever; a step it then loses is recorded
        (:meth:`lost_steps`). See :mod:`bray.store._holds`.

        Raises:
            ConfigError: an invalid name, holder, ``every`` (>= 1), ``above`` (>= -1) or ``ttl_s`` (> 0).
            StoreWriteError: the disk refused the write.
        """
        check_name(name)
        check_name(holder, what="holder")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {every!r}")
        if not isinstance(above, int) or isinstance(above, bool) or above < -1:
            raise ConfigError(f"above must be a step, or -1 to hold from step 0, got {above!r}")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ConfigError(f"ttl_s must be a number of seconds > 0, got {ttl_s!r}")
        now = time.time()
        mdir = self.root / name
        try:
            write_hold(mdir, Hold(holder=holder, every=every, above=above, until=now + ttl_s, time=now), ttl_s)
        except OSError as err:
            raise StoreWriteError(
                f"the disk refused the hold of {holder} under {mdir} ({err.strerror or err}); retention may "
                "remove the steps it is due to archive. Free space or fix the mount/permissions",
                name=name,
            ) from err

    def release_hold(self, name: str, holder: str) -> None:
        """Drop ``holder``'s hold and its lost-step record (gone already is fine)."""
        check_name(name)
        check_name(holder, what="holder")
        remove_hold(self.root / name, holder)

    def lost_steps(self, name: str, holder: str) -> dict[int, str]:
        """Steps retention removed although ``holder``'s hold covered them (it was stale): step -> why."""
        check_name(name)
        check_name(holder, what="holder")
        return read_lost(self.root / name, holder)

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
            return _parse_meta(raw, name, step)
        for _ in range(_LOAD_ATTEMPTS):
            resolved = self.resolve(name, step)
            try:
                raw = (self._step_dir(name, resolved) / META_FILE).read_bytes()
            except FileNotFoundError:
                continue  # removed by retention after resolve; snap again
            return _parse_meta(raw, name, resolved)
        raise vanished(name, step)

    def load(
        self,
        name: str,
        step: int = -1,
        *,
        framework: str = "numpy",
        device: str = "cpu",
        verify: bool = True,
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
                    data = read_all(wf)
            except FileNotFoundError:
                continue  # retention took it between resolve and open; snap again
            meta = _parse_meta(raw_meta, name, resolved)
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

    def _ckpt_info(self, name: str, step: int) -> tuple[float, bool] | None:
        key = (name, step)
        info = self._ckpt_cache.get(key)
        if info is None:
            try:
                raw = json.loads((self._step_dir(name, step) / META_FILE).read_bytes())
                info = (float(raw["time"]), bool(raw["checkpoint"]))
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._ckpt_cache[key] = info
        return info

    def _is_checkpoint_step(self, name: str, step: int, now: float) -> bool:
        if not self.checkpoint_interval and not self.checkpoint_interval_s:
            return False
        last: tuple[int, float] | None = None
        for earlier in reversed(self._listing(name)):
            info = self._ckpt_info(name, earlier)
            if info is not None and info[1]:
                last = (earlier, info[0])
                break
        if last is None:
            return True  # no checkpoint yet: the first step starts the pool (Bray's step 0)
        every = _step_interval(self.checkpoint_interval, step)
        if every and step - last[0] >= every:
            return True
        return bool(self.checkpoint_interval_s) and now - last[1] >= self.checkpoint_interval_s

    def checkpoint_steps(self, name: str) -> list[int]:
        """The kept checkpoint steps of ``name`` (retention never removes them), ascending.

        These are the steps a league samples opponents from (:class:`bray.ModelPool`).

        Raises:
            ConfigError: ``name`` is not a valid model name.
        """
        latest = self.latest(name)
        if latest is None:
            return []
        out = []
        for step in self._listing(name):
            info = self._ckpt_info(name, step) if step <= latest else None
            if info is not None and info[1]:
                out.append(step)
        return out

    def _retire(self, name: str, tmp_root: Path) -> list[Path]:
        """Move steps retention drops into ``.tmp/`` (call holding the lock).

        Kept: the newest ``keep_last``, checkpoint steps, and steps a fresh hold covers
        (:meth:`hold_steps`).

        Returns:
            The moved directories, for the caller to delete after releasing the lock.
        """
        listing = self._listing(name)
        keep = set(listing[-self.keep_last:])
        doomed = []
        holds: Retention | None = None
        for step in listing:
            if step in keep:
                continue
            info = self._ckpt_info(name, step)
            if info is not None and info[1]:
                continue
            if holds is None:  # read once, and only when a step is to go: one listdir, a read per hold
                holds = Retention(self.root / name, self.keep_last)
            if holds.held(step):
                continue
            target = tmp_root / tmp_name("del")
            try:
                os.rename(self._step_dir(name, step), target)
            except OSError as err:  # retention failing must not fail a committed publish
                logger.warning("could not retire step %d of %r: %s", step, name, err)
                continue
            self._ckpt_cache.pop((name, step), None)
            doomed.append(target)
            holds.pruned(step)
        if holds is not None:
            holds.finish()
        return doomed


def _step_interval(interval: int | float, step: int) -> int:
    """Steps between checkpoints at ``step``: an int as is; Bray's growing float rule."""
    if not isinstance(interval, float):
        return int(interval)
    base = int(interval)
    frac, s = interval - base, step // 10
    while s:
        frac, s = frac * 10, s // 10
    return max(base, int(frac))


def _write_latest(mdir: Path, step: int) -> None:
    replace_durable(mdir / LATEST_FILE, f"{step}\n".encode(), tmp_dir=mdir / TMP_DIR)


def _parse_meta(raw: bytes, name: str, step: int) -> StepMeta:
    try:
        doc = json.loads(raw)
        version = int(doc.get("format", 1))
        if version > FORMAT_VERSION:
            raise corrupt(name, step, f"meta.json has format {version}, newer than this "
                           f"bray-serve reads ({FORMAT_VERSION}); upgrade bray-serve")
        meta = StepMeta(
            name=name,
            step=int(doc["step"]),
            time=float(doc["time"]),
            nbytes=int(doc["nbytes"]),
            sha256=str(doc["sha256"]),
            keys=tuple(str(k) for k in doc["keys"]),
            checkpoint=bool(doc["checkpoint"]),
        )
    except CorruptCheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise corrupt(name, step, f"meta.json is unreadable ({err})") from err
    if meta.step != step:
        raise corrupt(name, step, f"meta.json says step {meta.step}")
    return meta
