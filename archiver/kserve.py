"""A published model as KServe deploys it: the TorchServe runtime's storage layout and manifests.

``bray-archive kserve NAME --out DIR`` (and :func:`export_kserve`) writes::

    DIR/models/                     what the storage URI must hold (mounted at /mnt/models)
        config/config.properties    bray-serve's bundled settings (token auth on, model API on
                                    loopback only, allowed_urls closed) with KServe's
                                    addresses, and a model snapshot registering NAME
        model-store/NAME-latest.mar a live archive: it follows the checkpoint store
    DIR/kubernetes/
        servingruntime.yaml         our own runtime: TorchServe 0.12 + bray-serve
        inferenceservice.yaml       predictor: storage URI, replicas, resources, Prometheus
        store-pvc.yaml              the live checkpoint store, ReadWriteMany

KServe's TorchServe runtime reads ``config/config.properties`` and ``model-store/*.mar``
from the storage URI and starts ``torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties``, TorchServe listening on 8085 because
KServe's own model server takes 8080 in its image. A storage URI is read once, at pod
start, so the weights do not travel that way: every pod mounts the live store (the PVC)
at the same path and its workers poll the store's ``LATEST`` pointer (inotify does not
see writes made on other hosts of a shared file system).

Probes: TorchServe 0.12 answers ``/ping`` without the key with 400, so the runtime uses
``exec`` probes (``python -m bray.ts_config.probe``) that read the key file TorchServe
writes into its working directory. Token authorization is never turned off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bray.errors import ConfigError, StepNotFoundError, StoreWriteError

if TYPE_CHECKING:  # pragma: no cover
    from bray.handlers.options import ServingOptions
    from bray.store import CheckpointStore

__all__ = ["KServeExport", "KServeOptions", "export_kserve", "manifests", "service_name"]

MODELS_DIR = "models"
MANIFESTS_DIR = "kubernetes"
MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storage URI's files
INFERENCE_PORT = 8085  # KServe's TorchServe runtime: 8080 belongs to KServe's model server
MANAGEMENT_PORT = 8081
METRICS_PORT = 8082
# Pods follow a shared store: its workers poll LATEST (inotify does not see other hosts' writes).
POLL_INTERVAL_MS = 50
# Pods batch by default, with the batch size the README's RemoteModel(..., max_batch_size=32)
# and the main job register; the delay stays ServingOptions' 0 (a lone request is not held).
BATCH_SIZE = 32
# The runtime image runs as model-server, not as whoever uploads the layout: everything
# written is readable by others, and nothing more permissive than that.
FILE_MODE = 0o644
DIR_MODE = 0o755
# pytorch/torchserve images run from here; TorchServe writes key_file.json into it.
WORKDIR = "/home/model-server"
_DNS_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_QUANTITY_RE = re.compile(r"[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?")


@dataclass(frozen=True)
class KServeOptions:
    """How the model is deployed (everything but what goes into the archive).

    Attributes:
        storage_uri: where ``DIR/models`` is uploaded (``pvc://``, ``s3://``, ``gs://`` ...);
            default ``pvc://bray-models/<name>``.
        replicas: predictor pods (``minReplicas`` = ``maxReplicas``).
        image: TorchServe 0.12 with bray-serve installed (``deploy/kserve/Dockerfile``).
        runtime: the ServingRuntime's name.
        store_claim: the ReadWriteMany claim holding the live checkpoint store.
        store_mount: where every pod (and the trainer) mounts it; ``BRAY_STORE`` there.
        store_size_gi: the claim's size in GiB.
        storage_class: the claim's storage class (one that offers ReadWriteMany: NFS,
            CephFS, EFS, Filestore ...); ``None`` leaves the cluster's default.
        cpu, memory: requests and limits of each predictor pod (Kubernetes quantities).
        gpus: ``nvidia.com/gpu`` per pod (0: none).
    """

    storage_uri: str | None = None
    replicas: int = 2
    image: str = "bray-serve-torchserve:0.12.0"
    runtime: str = "bray-torchserve"
    store_claim: str = "bray-store"
    store_mount: str = "/mnt/bray-store"
    store_size_gi: int = 20
    storage_class: str | None = None
    cpu: str = "2"
    memory: str = "4Gi"
    gpus: int = 0

    def __post_init__(self) -> None:
        for key in ("replicas", "store_size_gi"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 0:
            raise ConfigError(f"gpus must be an integer >= 0, got {self.gpus!r}")
        for key in ("runtime", "store_claim"):
            if not _DNS_RE.fullmatch(getattr(self, key)):
                raise ConfigError(f"{key} must be a Kubernetes name (lowercase letters, digits, '-', at most "
                                  f"63), got {getattr(self, key)!r}")
        if not self.store_mount.startswith("/") or self.store_mount.rstrip("/") == MOUNT:
            raise ConfigError(f"store_mount must be an absolute path other than {MOUNT} (the storage URI's), "
                              f"got {self.store_mount!r}")
        for key in ("cpu", "memory"):
            if not _QUANTITY_RE.fullmatch(getattr(self, key)):
                raise ConfigError(f"{key} must be a Kubernetes quantity such as 2, 500m, 4Gi; got {getattr(self, key)!r}")
        if self.storage_uri is not None and "://" not in self.storage_uri:
            raise ConfigError(f"storage_uri must be a URI such as pvc://claim/path or s3://bucket/path, "
                              f"got {self.storage_uri!r}")


@dataclass(frozen=True)
class KServeExport:
    """What :func:`export_kserve` wrote.

    Attributes:
        out: the output folder.
        models: ``out/models``, to upload to the storage URI.
        config: the TorchServe config inside it.
        archive: the ``.mar`` inside it.
        manifests: the Kubernetes manifests, in apply order (claim, runtime, service).
        storage_uri: the storage URI the InferenceService names.
    """

    out: Path
    models: Path
    config: Path
    archive: Path
    manifests: tuple[Path, ...]
    storage_uri: str


def service_name(name: str) -> str:
    """The InferenceService name for model ``name`` (Kubernetes names: lowercase, '-')."""
    text = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    if not _DNS_RE.fullmatch(text):
        raise ConfigError(f"cannot make a Kubernetes name out of model name {name!r}")
    return text


def _config_text(name: str, archive: str, *, workers: int, batch_size: int, max_batch_delay_ms: int) -> str:
    from bray.ts_config import config_path

    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": {name: {"latest": {
        "defaultVersion": True, "marName": archive, "minWorkers": workers, "maxWorkers": max(workers, 1),
        "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms, "responseTimeout": 120}}}}
    kserve = [
        "# --- KServe (written by bray-archive kserve; these keys are set here, not above) ------",
        "# Inference on every interface of the pod (KServe's TorchServe runtime: 8085); the",
        "# management API (model registration) stays on loopback; metrics for Prometheus.",
        f"inference_address=http://0.0.0.0:{INFERENCE_PORT}",
        f"management_address=http://127.0.0.1:{MANAGEMENT_PORT}",
        f"metrics_address=http://0.0.0.0:{METRICS_PORT}",
        f"model_store={MOUNT}/model-store",
        "# The model registered at start, with its batching and workers (TorchServe restores it",
        "# like a snapshot of its own).",
        f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}",
    ]
    ours = {line.partition("=")[0] for line in kserve if not line.startswith("#")}
    # One value per key: the bundled lines of the keys set here are left out (a reader of
    # the file, or a tool that is not Java's Properties, sees the value that applies).
    bundled = [line for line in config_path().read_text().rstrip("\n").splitlines()
               if line.lstrip().startswith("#") or line.partition("=")[0].strip() not in ours]
    return "\n".join([*bundled, "", *kserve]) + "\n"


def _make_readable(root: Path) -> None:
    """Files 0644 and folders 0755 under ``root`` (itself included), whatever the umask."""
    os.chmod(root, DIR_MODE)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def _probe(kind: str, *, initial_delay_s: int, period_s: int, failures: int) -> dict[str, Any]:
    return {"exec": {"command": ["python", "-m", "bray.ts_config.probe", f"--{kind}"]},
            "initialDelaySeconds": initial_delay_s, "periodSeconds": period_s, "timeoutSeconds": 10,
            "failureThreshold": failures}


def _resources(opts: KServeOptions) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": opts.cpu, "memory": opts.memory}
    if opts.gpus:
        amounts["nvidia.com/gpu"] = str(opts.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def manifests(name: str, *, storage_uri: str, opts: KServeOptions) -> dict[str, dict[str, Any]]:
    """The three manifests as dicts: ``{"store-pvc": ..., "servingruntime": ..., "inferenceservice": ...}``."""
    scrape = {"prometheus.kserve.io/port": str(METRICS_PORT), "prometheus.kserve.io/path": "/metrics"}
    pvc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": opts.store_claim, "labels": {"app.kubernetes.io/part-of": "bray-serve"}},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{opts.store_size_gi}Gi"}}},
    }
    if opts.storage_class:
        pvc["spec"]["storageClassName"] = opts.storage_class
    runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
        "metadata": {"name": opts.runtime, "annotations": dict(scrape),
                     "labels": {"app.kubernetes.io/part-of": "bray-serve"}},
        "spec": {
            "annotations": dict(scrape),
            "supportedModelFormats": [{"name": "pytorch", "version": "1", "autoSelect": False}],
            "protocolVersions": ["v1", "v2"],
            "containers": [{
                "name": "kserve-container",
                "image": opts.image,
                # The command KServe's own TorchServe runtime runs (kserve-torchserve.yaml).
                "args": ["torchserve", "--start", f"--model-store={MOUNT}/model-store",
                         f"--ts-config={MOUNT}/config/config.properties"],
                "workingDir": WORKDIR,
                "env": [
                    {"name": "BRAY_STORE", "value": opts.store_mount},
                    {"name": "BRAY_KEY_FILE", "value": f"{WORKDIR}/key_file.json"},
                    {"name": "BRAY_PROBE_URL", "value": f"http://127.0.0.1:{INFERENCE_PORT}"},
                    {"name": "BRAY_MANAGEMENT_URL", "value": f"http://127.0.0.1:{MANAGEMENT_PORT}"},
                ],
                "ports": [{"containerPort": INFERENCE_PORT, "name": "http1", "protocol": "TCP"}],
                "readinessProbe": _probe("ready", initial_delay_s=10, period_s=5, failures=3),
                "livenessProbe": _probe("live", initial_delay_s=60, period_s=10, failures=6),
                "resources": _resources(opts),
            }],
        },
    }
    service = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": service_name(name), "labels": {"app.kubernetes.io/part-of": "bray-serve"},
                     "annotations": {"serving.kserve.io/enable-prometheus-scraping": "true", **scrape}},
        "spec": {"predictor": {
            "minReplicas": opts.replicas, "maxReplicas": opts.replicas,
            # Plain Prometheus (the kubernetes-pods job) reads these from the pods.
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                            "prometheus.io/path": "/metrics"},
            "model": {
                "modelFormat": {"name": "pytorch"},
                "runtime": opts.runtime,
                "storageUri": storage_uri,
                "resources": _resources(opts),
                "env": [{"name": "BRAY_STORE", "value": opts.store_mount}],
                "volumeMounts": [{"name": "bray-store", "mountPath": opts.store_mount}],
            },
            "volumes": [{"name": "bray-store", "persistentVolumeClaim": {"claimName": opts.store_claim}}],
        }},
    }
    return {"store-pvc": pvc, "servingruntime": runtime, "inferenceservice": service}


def export_kserve(
    store: CheckpointStore,
    name: str,
    *,
    out: str | os.PathLike[str],
    options: KServeOptions | None = None,
    force: bool = False,
    serving: ServingOptions | None = None,
    **pack_options: Any,
) -> KServeExport:
    """Write the KServe storage layout and manifests for published model ``name`` into ``out``.

    Everything is written into a temporary folder beside ``out`` and renamed into place:
    a failure leaves nothing half-written, and ``force`` replaces an old ``out`` only once
    the new one is complete. Missing parents of ``out`` are made (and removed again on a
    failure). Files are written 0644 and folders 0755, whatever the umask: the pods run
    as another user than the one who uploads them.

    Args:
        store: the checkpoint store the model is published in.
        name: the model name.
        out: the output folder (must not exist, or be empty, unless ``force``).
        options: how it is deployed (:class:`KServeOptions`).
        force: replace a non-empty ``out``.
        serving: the serving options (:class:`~bray.handlers.options.ServingOptions`);
            without it ``poll_interval_ms`` is :data:`POLL_INTERVAL_MS` and ``batch_size``
            :data:`BATCH_SIZE` here.
        **pack_options: archive options as for :func:`~bray.archiver.pack.pack_archive`
            (``engine``, ``batch_size``, ``workers``, ... ``progress``; they win over
            ``serving``); ``store_path`` is the mount.

    Returns:
        What was written.

    Raises:
        StepNotFoundError: ``name`` has no published step.
        StoreError: the model has no export (or none for the engine).
        ConfigError: a bad option, or ``out`` exists, is not empty and ``force`` is off.
        StoreWriteError: ``out``'s folder cannot be written.
    """
    import yaml

    from bray.archiver.pack import CONFIG_FILE, pack_archive

    opts = options or KServeOptions()
    if store.latest(name) is None:
        raise StepNotFoundError(
            f"model {name!r} has no published step in {store.root}; publish one first "
            "(RemoteModel(...).publish_weights, or pass --store with the trainer's store)", name=name)
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} exists and is not empty; pass --force to replace it, or choose "
                          "another folder")
    storage_uri = opts.storage_uri or f"pvc://bray-models/{service_name(name)}"
    for key in ("store_path", "step", "model_store", "version", "force"):
        if key in pack_options:
            raise ConfigError(f"export_kserve sets {key} itself; do not pass it")
    if serving is None:
        pack_options.setdefault("poll_interval_ms", POLL_INTERVAL_MS)
        pack_options.setdefault("batch_size", BATCH_SIZE)
    docs = manifests(name, storage_uri=storage_uri, opts=opts)  # validates before anything is written
    made = [p for p in reversed(out.parents) if not p.exists()]  # outermost first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        _remove_made(made)
        raise StoreWriteError(f"cannot write into {out.parent}: {err.strerror or err}; choose an --out "
                              "in a folder you can write to") from err
    done = False
    try:
        models = tmp / MODELS_DIR
        packed = pack_archive(store, name, step=None, model_store=models / "model-store",
                              store_path=opts.store_mount, options=serving, **pack_options)
        config = models / "config" / "config.properties"
        config.parent.mkdir(parents=True)
        # The snapshot registers the model with the archive's own batching and workers.
        with zipfile.ZipFile(packed.path) as zf:
            packed_yaml = yaml.safe_load(zf.read(CONFIG_FILE))
        config.write_text(_config_text(
            name, packed.file_name, workers=int(packed_yaml["minWorkers"]),
            batch_size=int(packed_yaml["batchSize"]), max_batch_delay_ms=int(packed_yaml["maxBatchDelay"])))
        written = _write_manifests(tmp / MANIFESTS_DIR, docs)
        _make_readable(tmp)
        _swap_into_place(tmp, out)
        done = True
    except OSError as err:
        raise StoreWriteError(f"writing {out} failed: {err.strerror or err}; nothing was left there") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            _remove_made(made)
    return KServeExport(out=out, models=out / MODELS_DIR, config=out / MODELS_DIR / "config" / "config.properties",
                        archive=out / MODELS_DIR / "model-store" / packed.file_name,
                        manifests=tuple(out / MANIFESTS_DIR / p.name for p in written), storage_uri=storage_uri)


def _remove_made(made: list[Path]) -> None:
    """Remove the folders made for ``out`` (innermost first), if nothing else went into them."""
    for path in reversed(made):
        try:
            path.rmdir()
        except OSError:
            return


def _write_manifests(folder: Path, docs: dict[str, dict[str, Any]]) -> list[Path]:
    import yaml

    folder.mkdir()
    paths = []
    for i, (stem, doc) in enumerate(docs.items()):
        path = folder / f"{i}-{stem}.yaml"  # apply order: the claim and the runtime first
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(path)
    return paths


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (empty, or ``force``) goes only afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the old one back
        raise
    shutil.rmtree(old, ignore_errors=True)
