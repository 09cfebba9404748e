"""Store steps as TorchServe model versions: publish, list, set-default, roll back, prune, scale.

The programmatic API behind ``bray-archive`` (and ``RemoteModel.clone``). Every function
talks to one server through a :class:`~bray.torchserve.management.ManagementClient`.

Version strings: a pinned archive of step N is version ``"N"``; a live archive (following
the store's latest step) is version ``"latest"``. "Older" and "newer" compare numeric
versions as numbers; ``latest`` is never rolled back to or pruned.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bray.archiver.pack import (
    LIVE_VERSION,
    PackedArchive,
    pin_step,
    archive_path,
    pack_archive,
    read_archive_config,
)
from bray.errors import (
    BrayError,
    ConfigError,
    ManagementError,
    ModelNotFoundError,
    ModelOwnedError,
    StepNotFoundError,
    VersionExistsError,
)
from bray.handlers.options import ServingConfig, ServingOptions

if TYPE_CHECKING:  # pragma: no cover
    from bray.store import CheckpointStore, StoreWatch
    from bray.torchserve.management import ManagementClient, ModelVersion

__all__ = [
    "ModelStatus",
    "PublishWatch",
    "VersionStatus",
    "WeightSetStatus",
    "check_owner",
    "list_versions",
    "prune",
    "publish_version",
    "remove",
    "rollback",
    "scale",
    "set_default",
    "status",
    "watch_and_publish",
]

log = logging.getLogger(__name__)


def _numeric(version: str) -> int | None:
    return int(version) if version.isascii() and version.isdigit() else None


def _version_key(version: str) -> tuple[int, int, str]:
    """Numeric versions in numeric order, then the others (``latest``) by name."""
    n = _numeric(version)
    return (0, n, "") if n is not None else (1, 0, version)


def _archive_config(version: ModelVersion, model_store: str | os.PathLike[str] | None) -> ServingConfig | None:
    """What a registered version's archive says (``model-config.yaml``): its store, step, name.

    Returns:
        ``None`` when the archive is not in ``model_store`` (another node's, or deleted).

    Raises:
        ConfigError: the archive is not a bray archive.
    """
    if model_store is None or not version.url:
        return None
    mar = Path(model_store) / version.url
    return read_archive_config(mar) if mar.is_file() else None


def check_owner(name: str, *, client: ManagementClient, model_store: str | os.PathLike[str],
                store_path: str) -> None:
    """Refuse to touch ``name`` on this server when it serves another checkpoint store.

    TorchServe's model names are global to a server, checkpoint stores are per project
    and trial (``bray.init``): a run registering a version of a name that another run's
    store serves would hand that run's callers its own weights. Versions whose archive
    cannot be read (another node's model store, a foreign archive) say nothing.

    Args:
        name: the TorchServe model name.
        client: the server's management client.
        model_store: the server's model store (where the archives are).
        store_path: the store this caller serves from (absolute).

    Raises:
        ModelOwnedError: some version of ``name`` serves another store (the message
            names both and what to do).
    """
    try:
        versions = client.versions(name)
    except ModelNotFoundError:
        return
    mine = os.path.realpath(store_path)
    for v in versions:
        try:
            config = _archive_config(v, model_store)
        except ConfigError:
            continue  # not a bray archive: it serves no checkpoint store
        owner = None if config is None else config.store
        if owner is not None and os.path.realpath(owner) != mine:
            raise ModelOwnedError(
                f"{name!r} on {client.url} (version {v.version}) serves the checkpoint store {owner}, "
                f"another project or trial than this one's store {mine}: runs never take over each "
                f"other's models. Give this model another name or a namespace (RemoteModel({name!r}, "
                "namespace=<trial>)), or, if that run is over, unregister its model first "
                f"(DELETE /models/{name} on the management API)",
                name=name, url=client.url, owner=owner, store=mine,
            )


def publish_version(
    store: CheckpointStore,
    name: str,
    *,
    step: int | None,
    client: ManagementClient,
    model_store: str | os.PathLike[str],
    set_default: bool = False,
    wait_timeout_s: float = 300.0,
    options: ServingOptions | None = None,
    version: str | None = None,
    force: bool = False,
    progress: bool = False,
    owner_checked: bool = False,
    **option_values: Any,
) -> ModelVersion:
    """Pack a step, register it as a version of ``name``, wait for its workers.

    Args:
        store: the checkpoint store.
        name: the model name (in the store and on the server).
        step: ``N`` pins the kept step at or below N (``-1``: the latest) as version
            ``"<that step>"``; ``None`` publishes a live version ``"latest"`` that follows the
            store. The archive holds exactly that step (weights, meta, checksum).
        client: the server's management client. Its ``timeout_s`` bounds the synchronous
            registration call (worker start included).
        model_store: the server's model store directory.
        set_default: make the new version the one ``/predictions/<name>`` serves.
        wait_timeout_s: how long to wait for the workers to be READY.
        options: how the version is served (:class:`~bray.handlers.options.ServingOptions`:
            engine, batching, workers, ...); the archive carries them and the version is
            registered with their batching and workers.
        version, force, progress: as for :func:`~bray.archiver.pack.pack_archive`.
        owner_checked: the caller has just run :func:`check_owner` on this node (a
            ``RemoteModel``'s registration does, before it unregisters or attaches):
            not run again.
        **option_values: any ``ServingOptions`` field by name (``engine="onnx"``,
            ``batch_size=8``, ...); they win over ``options``.

    Returns:
        The registered version, as the server describes it.

    Raises:
        VersionExistsError: that version is already registered (nothing was packed).
        ModelOwnedError: another version of ``name`` serves another checkpoint store
            (another project or trial; nothing was packed).
        StepNotFoundError: no such step in the store, or retention removed the pinned step
            before it was packed (nothing was packed or registered).
        ConfigError: invalid options, a numeric ``version`` that is not the step pinned, or a
            stale archive file without ``force=True``.
        ServerError: registration, start-up or set-default failed; the archive is removed
            and a half-registered version unregistered.
        BrayTimeoutError: the workers were not ready in time (cleaned up likewise).
    """
    opts = ServingOptions.build(options, **option_values)
    if step is not None:
        # Pinned once here, checked against a numeric version; the pack opens exactly this
        # step (or fails saying retention took it), never a snap to another under its name.
        step = pin_step(store, name, step, version)
    version = version or (LIVE_VERSION if step is None else str(step))
    try:
        client.describe(name, version)
    except ModelNotFoundError:
        pass
    else:
        raise VersionExistsError(
            f"version {version} of {name!r} is already registered on {client.url}; publish "
            f"another step, or unregister it first (bray-archive prune, or DELETE /models/{name}/{version})",
            status=None, name=name, version=version,
        )
    if not owner_checked:
        check_owner(name, client=client, model_store=model_store, store_path=str(Path(store.root).resolve()))
    packed = pack_archive(store, name, step=step, model_store=model_store, options=opts, version=version,
                          force=force, progress=progress)
    registered = False
    try:
        client.register(
            packed.file_name, model_name=name, initial_workers=opts.workers, batch_size=opts.batch_size,
            max_batch_delay_ms=opts.max_batch_delay_ms, synchronous=True,
        )
        registered = True
        client.wait_ready(name, packed.version, timeout_s=wait_timeout_s, min_ready=opts.workers)
        if set_default:
            client.set_default(name, packed.version)
        return client.describe(name, packed.version)[0]
    except VersionExistsError:
        if not registered:
            # Another publisher registered this version between our check and our call:
            # the archive on disk is now theirs (same name), so it stays.
            raise
        _undo(client, packed, maybe_registered=True)
        raise
    except BaseException:
        _undo(client, packed, maybe_registered=True)
        raise


def _undo(client: ManagementClient, packed: PackedArchive, *, maybe_registered: bool) -> None:
    """Leave no half-registered version and no orphan archive behind."""
    if maybe_registered:
        try:
            client.unregister(packed.name, packed.version)
        except ModelNotFoundError:
            pass
        except BrayError as err:  # the original error is the one worth raising
            log.warning("bray-archive: could not unregister %s version %s after a failed publish: %s",
                        packed.name, packed.version, err)
    packed.path.unlink(missing_ok=True)


def list_versions(name: str, *, client: ManagementClient) -> list[ModelVersion]:
    """Every registered version of ``name``, numeric versions in step order, then ``latest``.

    Raises:
        ModelNotFoundError: no such model.
    """
    return sorted(client.versions(name), key=lambda v: _version_key(v.version))


def set_default(name: str, version: str, *, client: ManagementClient) -> ModelVersion:
    """Make ``version`` the one ``/predictions/<name>`` serves.

    Returns:
        The new default version.

    Raises:
        ModelNotFoundError: no such model or version.
    """
    client.set_default(name, str(version))
    return client.default_version(name)


def rollback(name: str, *, client: ManagementClient) -> ModelVersion:
    """Make the previous version the default: the highest numeric version below the current default.

    A non-numeric default (``latest``) counts as newer than every numeric version.

    Returns:
        The new default version.

    Raises:
        ModelNotFoundError: no such model.
        ManagementError: no older numeric version to roll back to.
    """
    versions = client.versions(name)
    current = next((v for v in versions if v.is_default), None)
    if current is None:  # pragma: no cover - TorchServe always has a default
        raise ManagementError(f"{name!r} has no default version on {client.url}", status=None)
    below = _numeric(current.version)
    older = [v for v in versions if (n := _numeric(v.version)) is not None and (below is None or n < below)]
    if not older:
        listed = ", ".join(sorted((v.version for v in versions), key=_version_key))
        raise ManagementError(
            f"cannot roll back {name!r}: no version older than the default {current.version} "
            f"(registered: {listed}); publish an older step with `bray-archive publish --step N`",
            status=None, name=name,
        )
    target = max(older, key=lambda v: _numeric(v.version) or 0)
    return set_default(name, target.version, client=client)


def prune(name: str, *, keep: int, client: ManagementClient,
          model_store: str | os.PathLike[str]) -> list[str]:
    """Unregister and delete the oldest numeric versions, keeping the newest ``keep``.

    Never touches the default version or ``latest`` (neither counts towards ``keep``).

    Args:
        keep: numeric versions to keep besides the default (>= 0).
        model_store: where the archives are; each pruned version's ``.mar`` is deleted.

    Returns:
        The versions removed, oldest first.

    Raises:
        ConfigError: ``keep`` < 0.
        ModelNotFoundError: no such model.
    """
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise ConfigError(f"keep must be an integer >= 0, got {keep!r}")
    versions = client.versions(name)
    candidates = sorted((v for v in versions if not v.is_default and _numeric(v.version) is not None),
                        key=lambda v: _numeric(v.version) or 0)
    doomed = candidates[: max(0, len(candidates) - keep)]
    removed = []
    for v in doomed:
        client.unregister(name, v.version)
        _delete_archive(v, model_store)
        removed.append(v.version)
    return removed


def _delete_archive(v: ModelVersion, model_store: str | os.PathLike[str]) -> Path | None:
    """Delete an unregistered version's ``.mar``; returns it, or ``None`` when none was deleted."""
    mar = Path(model_store) / (v.url or archive_path("", v.name, v.version).name)
    # Only files inside the model store (v.url is a file name there); never follow a URL
    # somewhere else.
    if mar.resolve().parent != Path(model_store).resolve() or not mar.is_file():
        return None
    mar.unlink(missing_ok=True)
    return mar


def remove(names: list[str], *, client: ManagementClient,
           model_store: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Unregister every version of each model in ``names`` and delete their archives.

    For clones (``<model>-clone-step-N``) and other models no longer wanted: ``prune``
    keeps the default and ``latest``. Every name is checked before anything is removed.
    The checkpoint store is left alone (its steps stay clonable).

    Args:
        names: registered model names.
        model_store: where the archives are; each version's ``.mar`` there is deleted.

    Returns:
        ``{name: versions removed}``, each model's default version last.

    Raises:
        ConfigError: ``names`` is empty.
        ModelNotFoundError: a name is not registered (nothing was removed; the message
            lists the registered models).
    """
    if not names:
        raise ConfigError("remove needs at least one model name; bray-archive status lists them")
    registered = set(client.list_models())
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise ModelNotFoundError(
            f"no model {', '.join(map(repr, unknown))} is registered on {client.url}, so nothing was removed "
            f"(registered: {', '.join(sorted(registered)) or 'none'}); check the name with bray-archive status",
            status=None, name=unknown[0])
    removed: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        # TorchServe refuses to unregister the default version while others remain: it goes last.
        versions = sorted(client.versions(name), key=lambda v: (v.is_default, _version_key(v.version)))
        removed[name] = []
        for v in versions:
            try:
                client.unregister(name, v.version)
            except ModelNotFoundError:  # unregistered meanwhile (another remove, prune): gone is fine
                pass
            _delete_archive(v, model_store)
            removed[name].append(v.version)
    return removed


def scale(name: str, workers: int, *, client: ManagementClient, version: str | None = None,
          timeout_s: float | None = None) -> ModelVersion:
    """Run ``workers`` workers for one version (the default one when ``version`` is None).

    Returns:
        The version once its workers are READY (or stopped).

    Raises:
        ConfigError: ``workers`` < 0.
        ModelNotFoundError: no such model or version.
        BrayTimeoutError: the new workers were not READY within the wait.
    """
    ServingOptions(workers=workers)  # the one rule for a worker count
    client.scale(name, version=version, min_workers=workers, max_workers=max(workers, 1),
                 synchronous=True, timeout_s=timeout_s)
    if workers > 0:
        # TorchServe's synchronous scale-up answers once the workers are started, which
        # can be before they are READY: wait for that, as publish_version does.
        return client.wait_ready(name, version, timeout_s=max(timeout_s or 0.0, 120.0), min_ready=workers)
    if version is None:
        return client.default_version(name)
    return client.describe(name, version)[0]


@dataclass(frozen=True)
class VersionStatus:
    """One version of a model as :func:`status` reports it.

    Attributes:
        version: TorchServe's version string.
        is_default: ``/predictions/<name>`` serves this one.
        workers, ready_workers: worker counts.
        live: the version follows the store's latest step.
        step: the step it serves (pinned step; for live ones the latest step of the store
            its workers follow), or ``None`` when unknown.
        archive: the ``.mar`` it was registered from.
        store: the checkpoint store its workers read (from the archive's
            ``model-config.yaml``; the ``store`` given to :func:`status` when the archive
            is not in the model store), where a live version's step was read; ``None``
            when unknown.
    """

    version: str
    is_default: bool
    workers: int
    ready_workers: int
    live: bool
    step: int | None
    archive: str
    store: str | None = None


@dataclass(frozen=True)
class WeightSetStatus:
    """A clone served as a weight set of a registered model (``handlers/weight_sets.py``).

    Attributes:
        name: the clone's name (what ``X-Bray-Weights`` names).
        step: its latest step in the store.
        held_by: the workers holding it now (``"<host>-<pid>"``) and the step each holds.
    """

    name: str
    step: int | None
    held_by: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelStatus:
    """A registered model, its versions (numeric versions in step order) and its weight sets."""

    name: str
    default_version: str
    versions: tuple[VersionStatus, ...] = field(default=())
    weight_sets: tuple[WeightSetStatus, ...] = field(default=())


def _weight_sets(name: str, root: str | None) -> tuple[WeightSetStatus, ...]:
    """The clones of ``name`` in the store at ``root`` that its workers serve as weight sets."""
    if root is None:
        return ()
    from bray.handlers.weight_sets import weight_set_of
    from bray.store import CheckpointStore

    store = CheckpointStore(root)
    out = []
    try:
        for other in store.names():
            if other != name and weight_set_of(store, other) == name:
                held = {worker: int(info.get("step", -1)) for worker, info in store.serving(other).items()}
                out.append(WeightSetStatus(name=other, step=store.latest(other), held_by=held))
    except (BrayError, OSError) as err:  # a store this machine cannot read whole: say what was read
        log.warning("bray-archive: could not read every weight set of %s in %s: %s", name, root, err)
    return tuple(out)


def status(*, client: ManagementClient, model_store: str | os.PathLike[str] | None = None,
           store: CheckpointStore | None = None, names: list[str] | None = None) -> list[ModelStatus]:
    """Models, versions, workers, default, and the step each version serves.

    A live version's step is read from the store its archive names (what its workers
    follow), not from ``store``: several runs, clones and stores share one server.

    Args:
        client: the server's management client.
        model_store: where the archives are (read to tell pinned from live versions and
            which store each follows; without it a numeric version is taken as pinned to
            that step).
        store: the checkpoint store for versions whose archive cannot be read here.
        names: only these models (default every registered model).

    Raises:
        ModelNotFoundError: a name in ``names`` is not registered.
    """
    result = []
    for name in names if names is not None else sorted(client.list_models()):
        rows = []
        default = ""
        for v in list_versions(name, client=client):
            live, step, root = _served_step(v, model_store, store)
            if v.is_default:
                default = v.version
            rows.append(VersionStatus(version=v.version, is_default=v.is_default, workers=v.workers,
                                      ready_workers=v.ready_workers, live=live, step=step, archive=v.url,
                                      store=root))
        live_root = next((r.store for r in rows if r.live and r.store), None)
        result.append(ModelStatus(name=name, default_version=default, versions=tuple(rows),
                                  weight_sets=_weight_sets(name, live_root)))
    return result


def _served_step(v: ModelVersion, model_store: str | os.PathLike[str] | None,
                 store: CheckpointStore | None) -> tuple[bool, int | None, str | None]:
    """``(live, step, store root)`` of a version: what its archive says, else its version string."""
    from bray.store import CheckpointStore

    live, step = v.version == LIVE_VERSION, _numeric(v.version)
    root = None if store is None else str(store.root)
    name = v.name
    try:
        cfg = _archive_config(v, model_store)
    except ConfigError:  # not a bray archive: its version string says nothing about steps
        return False, None, None
    if cfg is not None:
        live, step, root, name = not cfg.pinned, (cfg.step if cfg.pinned else None), cfg.store, cfg.name
    if live:
        step = None
        if root is not None:
            try:
                step = CheckpointStore(root).latest(name)
            except (ConfigError, OSError):
                pass
    return live, step, root


class PublishWatch:
    """Publishes every ``every``-th step of a model as it appears; see :func:`watch_and_publish`.

    While it runs it holds the steps it is due to publish in the store
    (:meth:`~bray.store.CheckpointStore.hold_steps`: every ``every``-th step above the last
    one it handled), refreshed every ``hold_ttl_s / 4`` from a thread of its own, so the
    publisher's retention, in whatever process, keeps them until they are packed.

    Attributes:
        published: the versions registered so far.
        errors: ``(step, error)`` for steps that failed to publish, and for due steps that
            were lost before they could be (a ``StepNotFoundError`` saying why); the watch
            goes on.
        holder: the name of this watch's hold in the store.
    """

    def __init__(self, store: CheckpointStore, name: str, every: int, *, client: ManagementClient,
                 model_store: str | os.PathLike[str], set_default: bool, wait_timeout_s: float,
                 poll_interval_s: float | None,
                 on_published: Callable[[ModelVersion], None] | None,
                 on_error: Callable[[int, BaseException], None] | None,
                 options: ServingOptions, force: bool = False, progress: bool = False,
                 hold_ttl_s: float = 60.0) -> None:
        self.store, self.name, self.every = store, name, every
        self.options = options
        self.published: list[ModelVersion] = []
        self.errors: list[tuple[int, BaseException]] = []
        self._publish_kw: dict[str, Any] = dict(client=client, model_store=model_store, set_default=set_default,
                                                wait_timeout_s=wait_timeout_s, options=options, force=force,
                                                progress=progress)
        self._on_published, self._on_error = on_published, on_error
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._stopping = threading.Event()
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
        self.holder = f"watch-{host}-{os.getpid()}-{secrets.token_hex(4)}"
        self._hold_ttl_s = hold_ttl_s
        self._hold_lock = threading.Lock()
        self._hold_failing = False
        # Hold before reading the latest: every step published after that read is held
        # from birth (the steps until then are held too, and released at the next refresh).
        # A store this process cannot write to is watched all the same, unheld (logged).
        latest = store.latest(name)
        self._done = held = -1 if latest is None else latest
        self._hold()
        # Watch first, then read the latest: a step published in between is not missed.
        self._watch: StoreWatch = store.watch(name, self._queue.put, poll_interval_s=poll_interval_s)
        latest = store.latest(name)
        self._done = -1 if latest is None else latest  # steps already there are not published
        if self._done != held:
            self._hold()
        self._holding = threading.Thread(target=self._keep_holding, name=f"bray-archive-hold-{name}", daemon=True)
        self._holding.start()
        self._thread = threading.Thread(target=self._run, name=f"bray-archive-watch-{name}", daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        with self._hold_lock:
            try:
                self.store.hold_steps(self.name, holder=self.holder, every=self.every, above=self._done,
                                      ttl_s=self._hold_ttl_s)
            except BrayError as err:
                if not self._hold_failing:  # once per failing streak, not every refresh
                    log.error("bray-archive watch: %s", err)
                self._hold_failing = True
            else:
                self._hold_failing = False

    def _keep_holding(self) -> None:
        while not self._stopping.wait(self._hold_ttl_s / 4):
            self._hold()

    def _run(self) -> None:
        # Publishing (pack + worker start) can take seconds: done here, not on the
        # store watcher's thread, which must keep up with new steps.
        while not self._stopping.is_set():
            step = self._queue.get()
            if step is None or self._stopping.is_set():
                return
            if step <= self._done:
                continue
            # The watcher may coalesce steps; look at every kept step since the last one,
            # and at the due steps retention removed although this watch held them.
            kept = set(self.store.steps(self.name))
            lost = self.store.lost_steps(self.name, self.holder)
            due = sorted(s for s in kept | set(lost) if self._done < s <= step and s % self.every == 0)
            for s in due:
                if self._stopping.is_set():
                    return
                if s in kept:
                    self._publish(s)
                else:
                    self._lost(s, lost[s])
            released = due and self._done // self.every != step // self.every
            self._done = step
            if released:
                self._hold()  # let retention have what was archived

    def _lost(self, step: int, why: str) -> None:
        err = StepNotFoundError(
            f"step {step} of {self.name!r} was due to be archived (every {self.every}) but is gone: {why}. "
            f"It cannot be archived now. This watch refreshes its hold every {self._hold_ttl_s / 4:.0f} s: a "
            "stalled watch (a suspended process, a stuck file system) or clocks that disagree between hosts "
            "let it lapse; raise keep_last to keep more steps anyway",
            name=self.name, step=step,
        )
        self._failed(step, err)

    def _failed(self, step: int, err: BaseException) -> None:
        log.error("bray-archive watch: publishing step %d of %s failed: %s", step, self.name, err)
        self.errors.append((step, err))
        if self._on_error is not None:
            self._on_error(step, err)

    def _publish(self, step: int) -> None:
        try:
            mv = publish_version(self.store, self.name, step=step, **self._publish_kw)
        except VersionExistsError as err:
            log.info("bray-archive watch: %s", err)
            return
        except (BrayError, OSError) as err:
            self._failed(step, err)
            return
        self.published.append(mv)
        if self._on_published is not None:
            self._on_published(mv)

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop watching; a publish in progress is finished first (bounded by ``timeout_s``)."""
        self._stopping.set()
        self._watch.stop()
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._holding.join(timeout_s)
        with self._hold_lock:
            self.store.release_hold(self.name, self.holder)

    def join(self, timeout_s: float | None = None) -> None:
        """Block until stopped (from another thread, or by Ctrl-C in the caller)."""
        self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "PublishWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def watch_and_publish(
    store: CheckpointStore,
    name: str,
    every: int,
    *,
    client: ManagementClient,
    model_store: str | os.PathLike[str],
    set_default: bool = False,
    wait_timeout_s: float = 300.0,
    poll_interval_s: float | None = None,
    on_published: Callable[[ModelVersion], None] | None = None,
    on_error: Callable[[int, BaseException], None] | None = None,
    options: ServingOptions | None = None,
    force: bool = False,
    progress: bool = False,
    hold_ttl_s: float = 60.0,
    **option_values: Any,
) -> PublishWatch:
    """Publish every step divisible by ``every`` as a pinned version, as the trainer publishes it.

    Steps already in the store when the watch starts are left alone. Runs in background
    threads until ``stop()``; a step that fails to publish is logged, recorded in
    ``errors`` and passed to ``on_error``, and the watch goes on.

    Each version named N serves step N. The due steps are held in the store until they
    are packed (the publisher's retention, in any process, keeps every ``every``-th step
    above the last one handled while the hold is fresh); a due step lost all the same
    (the hold lapsed) is logged as an error and recorded like a failed publish, with a
    ``StepNotFoundError`` saying why.

    Args:
        every: publish steps with ``step % every == 0`` (>= 1).
        set_default: make each new version the default.
        poll_interval_s: poll the store instead of inotify (shared file systems).
        on_published: called with each registered version (from the watch thread).
        on_error: called with ``(step, error)`` for each failed publish.
        options, force, progress, **option_values: as for :func:`publish_version`
            (each step is its own version: no ``version``).
        hold_ttl_s: how long the hold on due steps holds unless refreshed (refreshed every
            quarter of it); a watch that dies lets retention have them back after this.

    Returns:
        The running watch (``stop()``, ``published``, ``errors``; a context manager).

    Raises:
        ConfigError: ``every`` < 1, ``hold_ttl_s`` <= 0, or a bad option.
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError(f"every must be an integer >= 1, got {every!r}")
    if (isinstance(hold_ttl_s, bool) or not isinstance(hold_ttl_s, (int, float)) or not math.isfinite(hold_ttl_s)
            or hold_ttl_s <= 0):
        raise ConfigError(f"hold_ttl_s must be a number of seconds > 0, got {hold_ttl_s!r}")
    if option_values.pop("version", None):
        raise ConfigError("watch publishes each step as its own version; do not pass version=")
    opts = ServingOptions.build(options, **option_values)
    store.model_dir(name)  # validates the name now rather than in the thread
    return PublishWatch(store, name, every, client=client, model_store=model_store,
                        set_default=set_default, wait_timeout_s=wait_timeout_s,
                        poll_interval_s=poll_interval_s, on_published=on_published,
                        on_error=on_error, options=opts, force=force, progress=progress, hold_ttl_s=hold_ttl_s)

