"""Pack one model of the checkpoint store into a TorchServe ``.mar``.

An archive holds what a TorchServe worker needs to serve the model without the
trainer's source::

    MAR-INF/MANIFEST.json     written by torch-model-archiver's own Python API
    bray_handler.py           one-class shim subclassing bray.handlers.handler.EngineHandler
    model-config.yaml         TorchServe's batching keys + the ``handler: bray:`` section
    export/spec.json          the exported model definition (bray.export) ...
    export/model.pt2          ... with only the file the chosen engine runs (model.onnx,
                              or eager.json: the class the torch engine rebuilds a
                              module torch.export refused from, which the workers import)
    weights.safetensors       pinned archives only: the step's weights, so the version
    step.json                 keeps serving after retention drops the step from the store

A *live* archive (``step=None``, version ``latest``) carries no weights: its workers load
the store's latest step and follow new ones. A *pinned* archive (``step=N``, version
``"N"``) serves step N for ever.

Archive format: a ``.mar`` zip whose entries are **stored, not deflated**.
torch-model-archiver's ``default`` format deflates everything, which on float weights
costs about a second per 100 MB for a size gain of a few percent (random-looking
mantissas do not compress), and its ``package_model`` first copies every file into
``$TMPDIR/<model name>/``, a folder shared by every archiver run on the machine, which
two packs of the same name wipe under each other's feet. So the manifest comes from
torch-model-archiver's API (``ModelArchiverConfig`` -> ``ModelExportUtils``), and the
zip is written here, streaming straight from the store into a uniquely named temporary
file inside the model store, then renamed with :func:`os.replace`: TorchServe never sees
a half-written archive, and nothing is copied twice.
"""

from __future__ import annotations

import json
import os
import re
import hashlib
import tempfile
import time
import zipfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Sequence

from bray.errors import ConfigError, CorruptCheckpointError, StepNotFoundError, StoreError, StoreWriteError
from bray.export import EAGER_FILE, EXPORT_DIRNAME, ONNX_FILE, SPEC_FILE, TORCH_FILE, load_spec
from bray.handlers.options import ARCHIVE_WEIGHTS_FILE, ServingConfig, ServingOptions

if TYPE_CHECKING:  # pragma: no cover
    from bray.store import CheckpointStore, StepMeta

__all__ = ["LIVE_VERSION", "PackedArchive", "archive_path", "pack_archive", "read_archive_config"]

LIVE_VERSION = "latest"
HANDLER_FILE = "bray_handler.py"
CONFIG_FILE = "model-config.yaml"
STEP_FILE = "step.json"
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]{0,63}")
_CHUNK = 8 << 20
ARCHIVE_MODE = 0o644

_SHIM = '''"""TorchServe handler of a bray-serve archive (written by bray-archive).

TorchServe wants exactly one class defined in the handler module; the real code is the
installed bray.handlers.handler.EngineHandler.
"""

from bray.handlers.handler import EngineHandler as _Base


class BrayHandler(_Base):
    """Serves this archive's model version with bray's EngineHandler."""
'''


@dataclass(frozen=True)
class PackedArchive:
    """An archive written into the model store.

    Attributes:
        path: the ``.mar`` file.
        name: the model name (TorchServe's and the store's).
        version: the TorchServe model version (``"<step>"`` or ``"latest"``).
        step: the pinned step, or ``None`` for a live archive.
    """

    path: Path
    name: str
    version: str
    step: int | None

    @property
    def file_name(self) -> str:
        """What the management API registers (``url=<file_name>``)."""
        return self.path.name


def archive_path(model_store: str | os.PathLike[str], name: str, version: str) -> Path:
    """Where :func:`pack_archive` puts version ``version`` of ``name``."""
    return Path(model_store) / f"{name}-{version}.mar"


def _check_version(version: str | None) -> None:
    if version is not None and not _VERSION_RE.fullmatch(version):
        raise ConfigError(
            f"version must match {_VERSION_RE.pattern} (TorchServe version strings), got {version!r}"
        )


def _version_step(version: str | None) -> int | None:
    """The step a version string names (``"30"`` -> 30), or ``None`` when it names none."""
    return int(version) if version is not None and version.isascii() and version.isdigit() else None


def _gone(store: CheckpointStore, name: str, step: int, why: str) -> StepNotFoundError:
    return StepNotFoundError(
        f"step {step} of {name!r} is not kept in {store.root}: {why} (retention keeps the newest "
        f"keep_last={store.keep_last} steps and every checkpoint step); version "
        f"{step} was not packed. Pack a kept step (kept now: {store.steps(name)}), or keep more steps "
        "(keep_last, checkpoint_interval); `bray-archive watch` holds the steps it is due to archive",
        name=name, step=step,
    )


def pin_step(store: CheckpointStore, name: str, step: int, version: str | None) -> int:
    """The kept step an archive of ``step`` pins, refusing a numeric version that names another.

    A version named N serves step N: when ``version`` is ``"N"`` and ``step`` is N but N is
    gone (retention pruned it since it was chosen), this is that step's loss, not a reason
    to pin the kept step below under N's name.

    Raises:
        StepNotFoundError: no kept step at or below ``step``, or step N named ``"N"`` is gone.
        ConfigError: a numeric ``version`` that is not the step pinned.
    """
    pinned = store.resolve(name, step)
    wanted = _version_step(version)
    if wanted is None or wanted == pinned:
        return pinned
    if wanted == step:
        raise _gone(store, name, step, "it was never published, or retention removed it before it could be packed")
    raise ConfigError(
        f"version {version!r} is a step number, but the archive would pin step {pinned} (asked for "
        f"step {step}); a numeric version must be the step it serves: leave version unset (it becomes "
        f"{str(pinned)!r}), or name it with letters",
        name=name, step=step, version=version,
    )


def _export_files(export_dir: Path, engine: str) -> list[Path]:
    """The export files the engine needs (the other engine's model file stays out)."""
    if not (export_dir / SPEC_FILE).is_file():
        raise StoreError(
            f"no exported model definition at {export_dir} ({SPEC_FILE} missing); export the "
            "model first (bray.export.export_model(model, forward_args, dest=<store>/<name>/export), "
            "which RemoteModel does on its first publish)"
        )
    spec = load_spec(export_dir)
    needed = (EAGER_FILE if spec.has_eager else TORCH_FILE) if engine == "torch" else ONNX_FILE
    if not (export_dir / needed).is_file() or (engine != "torch" and not spec.has_onnx):
        if engine == "torch" and not spec.has_torch and not spec.has_eager:
            hint = ("torch.export refused the model and its class could not be recorded for a server to "
                    "rebuild (it was created in local mode); move its class into an importable module and "
                    "create the model again")
        elif engine != "torch":
            hint = "export again with onnx=True (needs the 'onnx' extra) or use --engine torch"
        else:
            hint = "export the model again"
        raise StoreError(f"the export at {export_dir} has no {needed}, which engine {engine!r} runs; {hint}")
    skip = (ONNX_FILE,) if engine == "torch" else (TORCH_FILE, EAGER_FILE)
    files = []
    for path in sorted(export_dir.rglob("*")):
        rel = path.relative_to(export_dir)
        if not path.is_file() or rel.parts[0].startswith(".") or rel.name.startswith(skip):
            continue
        files.append(path)
    return files


def _yaml_text(serving: ServingConfig) -> str:
    import yaml

    return yaml.safe_dump(serving.to_model_yaml(), sort_keys=False)


def _manifest(name: str, version: str) -> str:
    """MANIFEST.json exactly as torch-model-archiver writes it."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_archiver_error import ModelArchiverError
    from model_archiver.model_packaging_utils import ModelExportUtils

    config = ModelArchiverConfig(model_name=name, handler=HANDLER_FILE, version=version,
                                 config_file=CONFIG_FILE, archive_format="default")
    try:
        ModelExportUtils.check_model_name_regex_or_exit(name)
    except ModelArchiverError as err:
        raise ConfigError(f"model name {name!r} is not valid for TorchServe: {err}") from err
    return ModelExportUtils.generate_manifest_json(config)


def _stream_into(zf: zipfile.ZipFile, fin: BinaryIO, arcname: str, bar: Any, digest: Any = None) -> None:
    """Copy an open file into the zip (open: a step retention removes meanwhile is still read whole)."""
    st = os.fstat(fin.fileno())
    info = zipfile.ZipInfo(arcname, time.localtime(st.st_mtime)[:6])
    info.external_attr = (st.st_mode & 0xFFFF) << 16
    info.compress_type = zipfile.ZIP_STORED
    # file_size known up front: zipfile picks zip64 itself for > 2 GiB, and rewrites
    # the local header in place (no data descriptor, which Java's ZipInputStream refuses
    # on stored entries).
    info.file_size = st.st_size
    with zf.open(info, "w") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            if digest is not None:
                digest.update(chunk)
            bar.update(len(chunk))


def _progress(total: int, label: str, enabled: bool) -> Any:
    from tqdm import tqdm

    # delay: no bar at all for packs that take less than a moment
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                disable=not enabled, delay=0.5, leave=False)


def _commit(tmp: Path, final: Path, *, force: bool) -> None:
    """Make ``tmp`` appear as ``final`` in one step; without ``force`` never replace one."""
    if force:
        os.replace(tmp, final)
        return
    try:
        # link(2) fails if the name exists: no window in which another pack's archive
        # (written while we were writing ours) could be clobbered.
        os.link(tmp, final)
    except FileExistsError:
        raise ConfigError(f"{final} already exists; pass --force to overwrite (force=True)",
                          path=str(final)) from None
    except OSError:  # no hard links on this file system
        if final.exists():
            raise ConfigError(f"{final} already exists; pass --force to overwrite (force=True)",
                              path=str(final)) from None
        os.replace(tmp, final)


def pack_archive(
    store: CheckpointStore,
    name: str,
    *,
    step: int | None,
    model_store: str | os.PathLike[str],
    options: ServingOptions | None = None,
    store_path: str | None = None,
    version: str | None = None,
    force: bool = False,
    progress: bool = False,
    **option_values: Any,
) -> PackedArchive:
    """Pack ``name`` from ``store`` into ``<model_store>/<name>-<version>.mar``.

    Args:
        store: the checkpoint store holding the export and the steps.
        name: the model name.
        step: ``None`` for a live archive (follows the latest step, version ``latest``,
            no weights packed); ``N`` (or ``-1`` for the latest) pins the kept step at or
            below N, packing its weights, as version ``"<step>"``.
        model_store: TorchServe's model store directory (created if missing).
        options: how the version is served (engine, batching, workers, ...; default
            :class:`~bray.handlers.options.ServingOptions`'s defaults).
        store_path: where the workers find the store, when that is not where this
            process does (a volume mounted at another path in a pod); default
            ``store``'s own absolute path.
        version: overrides the version string. A numeric one must be the step pinned (a
            version named N serves step N); a live archive's cannot be numeric.
        force: overwrite an existing archive of that version.
        progress: show a progress bar (stderr) when packing takes more than a moment.
        **option_values: any :class:`~bray.handlers.options.ServingOptions` field by name
            (``engine="onnx"``, ``batch_size=8``, ...); they win over ``options``.

    Returns:
        The archive written.

    Raises:
        ConfigError: an invalid option, a numeric ``version`` that is not the step pinned,
            or the archive exists and ``force`` is not set.
        StepNotFoundError: nothing published, no kept step at or below ``step``, step N
            asked as version ``"N"`` is not kept, or retention removed the step while it was
            being packed (nothing is left behind).
        StoreError: the model has no export (or none for this engine).
        StoreWriteError: the model store refused the write (nothing is left behind).
    """
    opts = ServingOptions.build(options, **option_values)
    _check_version(version)
    with ExitStack() as files:
        serving_step, meta, weights = -1, None, None
        if step is None:
            if _version_step(version) is not None:
                raise ConfigError(f"a live archive follows the latest step, so its version cannot be a step "
                                  f"number (got {version!r}); leave version unset ({LIVE_VERSION!r}) or name "
                                  "it with letters", name=name, version=version)
        else:
            serving_step = pin_step(store, name, step, version)
            # From here on exactly this step: its weights opened first (retention cannot take
            # them from under the copy then), its own meta.json, never a snap to another step.
            try:
                weights = files.enter_context(open(store.weights_path(name, serving_step), "rb"))
                meta = store.meta(name, serving_step, exact=True)
            except (FileNotFoundError, StepNotFoundError) as err:
                raise _gone(store, name, serving_step, "retention removed it while it was being packed") from err
        version = version or (LIVE_VERSION if step is None else str(serving_step))
        serving = ServingConfig(name=name, store=store_path or str(Path(store.root).resolve()), step=serving_step,
                                options=opts)
        export_dir = store.export_dir(name)
        export_files = _export_files(export_dir, opts.engine)
        manifest = _manifest(name, version)
        model_store = Path(model_store)
        final = archive_path(model_store, name, version)
        if final.exists() and not force:
            raise ConfigError(f"{final} already exists; pass --force to overwrite (force=True)",
                              path=str(final))
        entries = [(files.enter_context(open(p, "rb")), f"{EXPORT_DIRNAME}/{p.relative_to(export_dir).as_posix()}")
                   for p in export_files]
        if weights is not None:
            # Read straight from the store: no staging copy of possibly large weights.
            entries.append((weights, ARCHIVE_WEIGHTS_FILE))
        _write_archive(final, name, version, serving, meta, entries, manifest, force=force, progress=progress)
    return PackedArchive(path=final, name=name, version=version, step=None if meta is None else serving_step)


def _write_archive(final: Path, name: str, version: str, serving: ServingConfig, meta: StepMeta | None,
                   entries: Sequence[tuple[BinaryIO, str]], manifest: str, *, force: bool, progress: bool) -> None:
    """Stream the archive into a temporary file in the model store, then commit it as ``final``."""
    model_store = final.parent
    try:
        model_store.mkdir(parents=True, exist_ok=True)
        # Unique per pack, hidden (TorchServe skips dot-files), same file system as the
        # final name so os.replace is atomic.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}-{version}.", suffix=".mar.tmp", dir=model_store)
    except OSError as err:
        raise StoreWriteError(f"cannot write into the model store {model_store}: {err.strerror or err}; "
                              "check the path and its permissions") from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fobj:
            # mkstemp makes 0600; the server may run as another user (KServe's image runs as
            # model-server): readable by others, whatever the umask, and no more than that.
            os.fchmod(fobj.fileno(), ARCHIVE_MODE)
            with zipfile.ZipFile(fobj, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr(HANDLER_FILE, _SHIM)
                zf.writestr(CONFIG_FILE, _yaml_text(serving))
                if meta is not None:
                    meta_json = asdict(meta)
                    meta_json["keys"] = list(meta.keys)
                    zf.writestr(STEP_FILE, json.dumps(meta_json, indent=1))
                total = sum(os.fstat(src.fileno()).st_size for src, _ in entries)
                with _progress(total, f"packing {final.name}", progress) as bar:
                    for src, arcname in entries:
                        digest = hashlib.sha256() if arcname == ARCHIVE_WEIGHTS_FILE else None
                        _stream_into(zf, src, arcname, bar, digest)
                        if digest is not None and meta is not None and digest.hexdigest() != meta.sha256:
                            # An archive pins its step for ever: never pin a damaged copy.
                            raise CorruptCheckpointError(
                                f"step {meta.step} of {name!r} fails its checksum ({src.name}: sha256 "
                                f"{digest.hexdigest()[:12]}..., meta.json says {meta.sha256[:12]}...); "
                                "pack another step", name=name, step=meta.step,
                            )
                zf.writestr("MAR-INF/MANIFEST.json", manifest)
            fobj.flush()
            os.fsync(fobj.fileno())
        _commit(tmp, final, force=force)
    except OSError as err:
        raise StoreWriteError(f"writing {final} failed: {err.strerror or err}; nothing was written "
                              "(free space in the model store, then pack again)") from err
    finally:
        tmp.unlink(missing_ok=True)


def read_archive_config(path: str | os.PathLike[str]) -> ServingConfig:
    """The ``ServingConfig`` packed into an archive (what its workers serve).

    Raises:
        ConfigError: not a bray archive, or unreadable.
    """
    import yaml

    try:
        with zipfile.ZipFile(path) as zf:
            doc = yaml.safe_load(zf.read(CONFIG_FILE))
    except (OSError, KeyError, zipfile.BadZipFile, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {CONFIG_FILE} from archive {path}: {err}") from err
    return ServingConfig.from_yaml_dict(doc)
