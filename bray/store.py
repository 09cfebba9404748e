"""The versioned checkpoint store: publish weights atomically, read any kept step, watch for new ones.

A store is a directory. Each model name gets its own sub-directory::

    <root>/<name>/
        LATEST                         the latest published step, as text (replaced atomically)
        steps/000000000012/            one directory per kept step, complete or absent
            weights.safetensors        the flattened tensors (safetensors, never pickle)
            meta.json                  step, time, byte size, sha256, keys, checkpoint flag
        .tmp/                          in-progress writes and steps being deleted
        .lock                          flock(2) target that serialises commits
        export/                        the exported model definition (written by
                                       :mod:`bray.export`; retention never touches it)
        .serving/<host>-<pid>.json     the step each serving worker has staged (written by
                                       the handler's follower; how ``wait()`` knows)
        clone.json                     a clone's origin: source model and step (written once)
        league/<metric>/<writer>.json  league results, one file per writer, each replaced
                                       atomically (read by :mod:`bray.league`)

Publishing writes into a unique directory under ``.tmp/``, fsyncs it, then, holding an
exclusive lock, renames it into ``steps/`` and moves ``LATEST`` with :func:`os.replace`.
Because a step directory only ever appears by rename, a reader sees a step whole or not
at all, even when the publisher is killed half-way. Leftovers in ``.tmp/`` are swept by
later publishes.

Steps only grow. Reading a step that retention removed "snaps down" to the largest kept
step at or below it, which is how Bray's ``clone(step)`` behaves.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bray import tree
from bray.errors import (
    ConfigError,
    CorruptCheckpointError,
    StepConflictError,
    StepNotFoundError,
    StoreError,
    StoreWriteError,
)

__all__ = ["Checkpoint", "CheckpointStore", "StepMeta", "StoreWatch"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"
LATEST_FILE = "LATEST"
STEPS_DIR = "steps"
TMP_DIR = ".tmp"
LOCK_FILE = ".lock"
EXPORT_DIR = "export"
CLONE_FILE = "clone.json"
LEAGUE_DIR = "league"
EXPORT_DIRNAME = "export"
SERVING_DIRNAME = ".serving"

_STEP_DIGITS = 12
_MAX_STEP = 10**_STEP_DIGITS - 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A temp entry older than this is swept even if its owner looks alive (another host,
# or a reused pid): no healthy publish leaves its directory untouched this long.
_STALE_TMP_S = 60.0
# Watchers re-check this often even without a file-system event (a lost inotify watch,
# a directory deleted and made again).
_WATCH_SAFETY_S = 5.0
_DEFAULT_POLL_S = 1.0
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_LOAD_ATTEMPTS = 3

# safetensors dtype tag -> numpy dtype (little-endian, as the format stores it)
_NP_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "C64": np.dtype("<c8"),
}
# tags numpy lacks, with their item size; only framework="pt" can load them
_TORCH_ONLY_SIZES = {"BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "U64": "uint64", "I32": "int32", "U32": "uint32", "I16": "int16",
    "U16": "uint16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_SAVABLE_NP_KINDS = {np.dtype(d).newbyteorder("=").name for d in _NP_DTYPES.values()}


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
        _check_name(name)
        return self.root / name

    def _step_dir(self, name: str, step: int) -> Path:
        return self.root / name / STEPS_DIR / _step_str(step)

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
        _check_name(name)
        return self._step_dir(name, step) / WEIGHTS_FILE

    def league_dir(self, name: str, metric: str) -> Path:
        """Where the league results of ``name`` for ``metric`` live (it may not exist yet).

        One JSON file per writer, each replaced atomically (see :mod:`bray.league`).

        Raises:
            ConfigError: ``name`` or ``metric`` is not a valid name.
        """
        _check_name(name)
        _check_name(metric, what="metric name")
        return self.root / name / LEAGUE_DIR / metric

    # ---------------------------------------------------------------- clones

    def clone_origin(self, name: str) -> tuple[str, int] | None:
        """The ``(source model, step)`` a clone was made from, or ``None`` if ``name`` is no clone.

        Raises:
            ConfigError: invalid name.
            CorruptCheckpointError: the record is unreadable.
        """
        _check_name(name)
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
        _check_name(name)
        _check_name(source)
        _check_step(step)
        mdir = self.root / name
        tmp_root = mdir / TMP_DIR
        data = json.dumps({"format": FORMAT_VERSION, "source": source, "step": step, "time": time.time()}).encode()
        try:
            tmp_root.mkdir(parents=True, exist_ok=True)
            tmp = tmp_root / _tmp_name("clone")
            _write_durable(tmp, data)
            try:
                os.link(tmp, mdir / CLONE_FILE)  # fails if recorded already: first writer wins
                _fsync_dir(mdir)
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

    # ---------------------------------------------------------------- reading

    def names(self) -> list[str]:
        """Model names that have a step directory or a latest pointer, sorted."""
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in entries:
            if not _NAME_RE.fullmatch(entry.name) or not entry.is_dir():
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
        _check_name(name)
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
        _check_name(name)
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

    def meta(self, name: str, step: int = -1) -> StepMeta:
        """The metadata of a step (snapping down like :meth:`resolve`).

        Raises:
            ConfigError: invalid name or step.
            StepNotFoundError: no such step.
            CorruptCheckpointError: ``meta.json`` is unreadable.
        """
        for _ in range(_LOAD_ATTEMPTS):
            resolved = self.resolve(name, step)
            try:
                raw = (self._step_dir(name, resolved) / META_FILE).read_bytes()
            except FileNotFoundError:
                continue  # removed by retention after resolve; snap again
            return _parse_meta(raw, name, resolved)
        raise _vanished(name, step)

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
                    data = _read_all(wf)
            except FileNotFoundError:
                continue  # retention took it between resolve and open; snap again
            meta = _parse_meta(raw_meta, name, resolved)
            if verify:
                _verify(data, meta)
            weights = _decode(data, meta, framework, device)
            return Checkpoint(name=name, step=resolved, weights=weights, meta=meta)
        raise _vanished(name, step)

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
        _check_name(name)
        if step is not None:
            _check_step(step)
        payload, keys = _serialize(weights)
        digest = hashlib.sha256(payload).hexdigest()
        mdir = self.root / name
        tmp_root = mdir / TMP_DIR
        tmp: Path | None = None
        doomed: list[Path] = []
        try:
            tmp_root.mkdir(parents=True, exist_ok=True)
            _sweep_tmp(tmp_root)
            tmp = tmp_root / _tmp_name("pub")
            tmp.mkdir()
            _write_durable(tmp / WEIGHTS_FILE, payload)
            with _flock(mdir / LOCK_FILE):
                current = self._max_step(name)
                if step is None:
                    step = 0 if current is None else current + 1
                    _check_step(step)
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
                _write_durable(tmp / META_FILE, json.dumps(meta, indent=1).encode())
                _fsync_dir(tmp)
                steps_dir = mdir / STEPS_DIR
                steps_dir.mkdir(exist_ok=True)
                final = steps_dir / _step_str(step)
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
                    _fsync_dir(steps_dir)
                    _write_latest(mdir, step)
                except OSError:
                    # Not visible yet (LATEST still points below); take it back so the
                    # caller's "not published" holds.
                    _discard(final, tmp_root)
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
            threading.Thread(target=_delete_all, args=(doomed,), name="bray-store-retire", daemon=True).start()
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
        _check_name(name)
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
        return sorted(int(e) for e in entries if len(e) == _STEP_DIGITS and e.isascii() and e.isdigit())

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

        Returns:
            The moved directories, for the caller to delete after releasing the lock.
        """
        listing = self._listing(name)
        keep = set(listing[-self.keep_last:])
        doomed = []
        for step in listing:
            if step in keep:
                continue
            info = self._ckpt_info(name, step)
            if info is not None and info[1]:
                continue
            target = tmp_root / _tmp_name("del")
            try:
                os.rename(self._step_dir(name, step), target)
            except OSError as err:  # retention failing must not fail a committed publish
                logger.warning("could not retire step %d of %r: %s", step, name, err)
                continue
            self._ckpt_cache.pop((name, step), None)
            doomed.append(target)
        return doomed


class StoreWatch:
    """A running watch on one model's latest step; made by :meth:`CheckpointStore.watch`.

    Attributes:
        polling: ``True`` when a polling observer is in use, ``False`` with inotify
            (or the platform's native observer).
    """

    def __init__(
        self,
        store: CheckpointStore,
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


# ------------------------------------------------------------------ helpers


def _delete_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _step_interval(interval: int | float, step: int) -> int:
    """Steps between checkpoints at ``step``: an int as is; Bray's growing float rule."""
    if not isinstance(interval, float):
        return int(interval)
    base = int(interval)
    frac, s = interval - base, step // 10
    while s:
        frac, s = frac * 10, s // 10
    return max(base, int(frac))


def _check_name(name: object, what: str = "model name") -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{what} must be 1-128 characters of letters, digits, '_', '.' or '-', starting "
            f"with a letter or digit (it is a directory name), got {name!r}"
        )


def _check_step(step: object) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= _MAX_STEP:
        raise ConfigError(f"step must be an integer from 0 to {_MAX_STEP}, got {step!r}")


def _step_str(step: int) -> str:
    return f"{step:0{_STEP_DIGITS}d}"


def _tmp_name(kind: str) -> str:
    host = socket.gethostname().replace("/", "_") or "host"
    return f"{kind}-{host}-{os.getpid()}-{secrets.token_hex(6)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_tmp(tmp_root: Path) -> None:
    """Delete leftovers of killed publishes: dead local owner, or untouched for a minute."""
    host = socket.gethostname().replace("/", "_") or "host"
    now = time.time()
    try:
        entries = list(os.scandir(tmp_root))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            _sweep_entry(entry, host, now)
        except OSError as err:  # best effort: a later publish tries again
            logger.debug("could not sweep %s: %s", entry.path, err)


def _sweep_entry(entry: os.DirEntry[str], host: str, now: float) -> None:
    try:
        _kind, rest = entry.name.split("-", 1)
        owner_host, pid_text, _token = rest.rsplit("-", 2)
        dead = owner_host == host and not _pid_alive(int(pid_text))
    except ValueError:
        dead = False
    if not dead:
        try:
            newest = entry.stat(follow_symlinks=False).st_mtime
            if entry.is_dir(follow_symlinks=False):
                for child in os.scandir(entry.path):
                    newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:
            return
        if now - newest < _STALE_TMP_S:
            return  # most likely a publish still in progress
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(mdir: Path, step: int) -> None:
    replace_durable(mdir / LATEST_FILE, f"{step}\n".encode(), tmp_dir=mdir / TMP_DIR)


def replace_durable(path: Path, data: bytes, *, tmp_dir: Path) -> None:
    """Replace ``path`` with ``data`` atomically: write a temporary file, fsync, ``os.replace``.

    A reader sees the old content or the new, never a mix, even if the writer is killed.
    ``tmp_dir`` must be on the same file system (the store's ``.tmp/`` folders).
    """
    tmp = tmp_dir / _tmp_name("replace")
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _discard(path: Path, tmp_root: Path) -> None:
    target = tmp_root / _tmp_name("del")
    try:
        os.rename(path, target)
    except OSError:
        target = path
    shutil.rmtree(target, ignore_errors=True)


def _read_all(f: Any) -> bytearray:
    size = os.fstat(f.fileno()).st_size
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    view.release()
    if got < size:
        del buf[got:]
    return buf


def _corrupt(name: str, step: int, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"step {step} of {name!r} is corrupt: {why}; republish it or load another step",
        name=name, step=step,
    )


def _vanished(name: str, step: int) -> StepNotFoundError:
    what = "the latest step" if step == -1 else f"step {step}"
    return StepNotFoundError(
        f"{what} of {name!r} kept disappearing while being read (retention or a deleted "
        "store racing the reader); try again", name=name, step=step,
    )


def _parse_meta(raw: bytes, name: str, step: int) -> StepMeta:
    try:
        doc = json.loads(raw)
        version = int(doc.get("format", 1))
        if version > FORMAT_VERSION:
            raise _corrupt(name, step, f"meta.json has format {version}, newer than this "
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
        raise _corrupt(name, step, f"meta.json is unreadable ({err})") from err
    if meta.step != step:
        raise _corrupt(name, step, f"meta.json says step {meta.step}")
    return meta


def _verify(data: bytearray, meta: StepMeta) -> None:
    where = f"file {WEIGHTS_FILE}"
    if len(data) != meta.nbytes:
        raise _corrupt(meta.name, meta.step,
                       f"size mismatch ({where} has {len(data)} bytes, meta.json says {meta.nbytes})")
    got = hashlib.sha256(data).hexdigest()
    if got != meta.sha256:
        raise _corrupt(meta.name, meta.step,
                       f"sha256 mismatch ({where} hashes to {got[:12]}…, meta.json says {meta.sha256[:12]}…)")


def _parse_header(data: bytearray, meta: StepMeta) -> tuple[int, dict[str, tuple[str, list[int], int, int]]]:
    """Check a safetensors buffer's layout; returns (body offset, key -> (dtype, shape, begin, end))."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes is too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise ValueError(f"header length {n} does not fit a {len(data)}-byte file")
    header = json.loads(bytes(data[8:8 + n]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    body = 8 + n
    body_len = len(data) - body
    out: dict[str, tuple[str, list[int], int, int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = info["dtype"]
        shape = info["shape"]
        begin, end = info["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {key!r} has shape {shape!r}")
        if dtype in _NP_DTYPES:
            itemsize = _NP_DTYPES[dtype].itemsize
        elif dtype in _TORCH_ONLY_SIZES:
            itemsize = _TORCH_ONLY_SIZES[dtype]
        else:
            raise ValueError(f"tensor {key!r} has unknown dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= body_len):
            raise ValueError(f"tensor {key!r} has offsets {[begin, end]} outside the {body_len}-byte body")
        if end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"tensor {key!r} holds {end - begin} bytes, its shape needs {math.prod(shape) * itemsize}")
        out[key] = (dtype, shape, body + begin, body + end)
    if set(out) != set(meta.keys):
        raise ValueError(f"file holds keys {sorted(out)[:5]}…, meta.json lists {list(meta.keys)[:5]}…")
    return body, out


def _decode(data: bytearray, meta: StepMeta, framework: str, device: str) -> dict[str, Any]:
    try:
        _, layout = _parse_header(data, meta)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise _corrupt(meta.name, meta.step, f"not a valid safetensors file ({err})") from err
    weights: dict[str, Any] = {}
    if framework == "numpy":
        for key in meta.keys:
            dtype, shape, begin, end = layout[key]
            if dtype not in _NP_DTYPES:
                raise ConfigError(
                    f"step {meta.step} of {meta.name!r} holds {_TORCH_DTYPE_NAMES[dtype]} tensors "
                    f"({key!r}), which numpy lacks; load it with framework='pt'"
                )
            np_dtype = _NP_DTYPES[dtype]
            count = (end - begin) // np_dtype.itemsize
            if count == 0:
                weights[key] = np.empty(shape, dtype=np_dtype)
            else:
                weights[key] = np.frombuffer(data, dtype=np_dtype, count=count, offset=begin).reshape(shape)
        return weights
    import torch

    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from err
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise ConfigError("framework='pt' needs a little-endian host")
    for key in meta.keys:
        dtype, shape, begin, end = layout[key]
        t_dtype = getattr(torch, _TORCH_DTYPE_NAMES[dtype])
        if end == begin:
            tensor = torch.empty(shape, dtype=t_dtype)
        else:
            tensor = torch.frombuffer(data, dtype=t_dtype, count=(end - begin) // t_dtype.itemsize,
                                      offset=begin).reshape(shape)
        weights[key] = tensor if target.type == "cpu" else tensor.to(target)
    return weights


def _flat_weights(weights: Any, torch_mod: Any) -> dict[str, Any]:
    """``state_dict``-style keys (``layer.0.weight``) for a nested weights tree."""
    leaves, treedef = tree.flatten(weights, error=ConfigError)
    flat: dict[str, Any] = {}
    for keys, leaf in zip(treedef.key_paths(), leaves):
        key = ".".join(map(str, keys))
        if not (isinstance(leaf, (np.ndarray, np.generic)) or (torch_mod is not None and isinstance(leaf, torch_mod.Tensor))):
            raise ConfigError(
                f"weights must be a state_dict of torch tensors or a NestedArray (numpy arrays in nested "
                f"list/tuple/dict); {key or 'the top'!r} is a {type(leaf).__name__}"
            )
        if key in flat:
            raise ConfigError(f"weights flatten to the key {key!r} twice; rename one of them")
        if key == "__metadata__":
            raise ConfigError("'__metadata__' is reserved by safetensors; rename that weight")
        flat[key] = leaf
    return flat


def _serialize(weights: Any) -> tuple[bytes, list[str]]:
    """Flatten and encode weights as safetensors bytes; returns (bytes, sorted keys)."""
    torch_mod = sys.modules.get("torch")  # a torch tensor implies torch is imported
    flat = _flat_weights(weights, torch_mod)
    keys = sorted(flat)
    if torch_mod is not None and any(isinstance(v, torch_mod.Tensor) for v in flat.values()):
        return _serialize_torch(flat), keys
    arrays = {}
    for key, value in flat.items():
        arr = np.asarray(value)
        if arr.dtype.newbyteorder("=").name not in _SAVABLE_NP_KINDS:
            raise ConfigError(
                f"weight {key!r} has dtype {arr.dtype}, which safetensors cannot store; "
                f"use one of {sorted(_SAVABLE_NP_KINDS)}"
            )
        arrays[key] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    import safetensors.numpy

    return safetensors.numpy.save(arrays), keys


def _serialize_torch(flat: dict[str, Any]) -> bytes:
    import safetensors.torch
    import torch

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in flat.items():
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise ConfigError(f"weight {key!r} is a {value.layout} tensor; call .to_dense() first")
            tensor = value.detach().to("cpu").contiguous()
        else:
            arr = np.asarray(value)
            tensor = torch.from_numpy(arr if arr.flags.c_contiguous else arr.copy(order="C"))
        if tensor.numel():
            # safetensors refuses tensors sharing storage (tied weights); store a copy
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in seen_storage:
                tensor = tensor.clone()
                ptr = tensor.untyped_storage().data_ptr()
            seen_storage.add(ptr)
        tensors[key] = tensor
    try:
        return safetensors.torch.save(tensors)
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        raise ConfigError(f"these weights cannot be stored as safetensors: {err}") from err
