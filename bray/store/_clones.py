"""Clone records: which model and step a clone was made from, and seeding a clone from its source.

A clone (``RemoteModel.clone``) is a model of its own in the store, with
``<root>/<clone>/clone.json`` naming its origin (linked into place once: the first
writer wins) and the source's export and origin step copied in once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bray.errors import ConfigError, CorruptCheckpointError, StepConflictError, StepNotFoundError, StoreWriteError
from bray.store._durable import fsync_dir, tmp_name, write_durable
from bray.store._layout import CLONE_FILE, FORMAT_VERSION, SPEC_FILE, TMP_DIR, check_name, check_step

if TYPE_CHECKING:  # pragma: no cover
    from bray.store._meta import Checkpoint

__all__ = ["CloneRecords"]


class CloneRecords:
    """:class:`~bray.store.CheckpointStore`'s clone records (a mixin: it uses the store's paths and steps)."""

    root: Path

    if TYPE_CHECKING:  # pragma: no cover - what the store provides
        def latest(self, name: str) -> int | None: ...
        def model_dir(self, name: str) -> Path: ...
        def export_dir(self, name: str) -> Path: ...
        def load(self, name: str, step: int = -1, *, framework: str = "numpy", device: str = "cpu",
                 verify: bool = True) -> Checkpoint: ...
        def publish(self, name: str, weights: Any, step: int | None = None) -> int: ...

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

    def clone_dedicated(self, name: str) -> bool:
        """Whether clone ``name`` is served as a TorchServe model of its own, not as a weight set.

        Records written before weight sets existed say nothing, and were models of their own.

        Raises:
            ConfigError: invalid name, or ``name`` is no clone.
            CorruptCheckpointError: the record is unreadable.
        """
        if self.clone_origin(name) is None:
            raise ConfigError(f"{name!r} is no clone (no {CLONE_FILE} in {self.root / name})")
        return bool(json.loads((self.root / name / CLONE_FILE).read_bytes()).get("dedicated", True))

    def record_clone_origin(self, name: str, *, source: str, step: int, dedicated: bool = True) -> tuple[str, int]:
        """Record once that ``name`` is a clone of ``source`` at ``step``.

        ``dedicated``: served as a TorchServe model of its own (``True``) or as a weight
        set of its family's model (``handlers/weight_sets.py``).

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
        data = json.dumps({"format": FORMAT_VERSION, "source": source, "step": step, "dedicated": bool(dedicated),
                           "time": time.time()}).encode()
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
