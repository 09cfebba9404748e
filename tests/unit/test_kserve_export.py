"""``bray-archive kserve``: the layout, the manifests checked offline against the schemas, bad input.

Schemas, two independent checks:

- the Kubernetes API: ``kubernetes-validate`` (the JSON schemas of Kubernetes 1.37,
  strict: unknown fields are errors) for the PersistentVolumeClaim;
- KServe's CRDs: the model classes of the ``kserve`` package (0.21.0, generated from
  KServe's OpenAPI), walked field by field down into the ``kubernetes`` client's classes
  for the pod parts (containers, probes, volumes): every key must be a field of its class,
  every value of the field's type, every required Kubernetes field present.
  ``scripts/setup.sh`` downloads the kserve wheel (``pip download --no-deps``) rather than
  installing it: its runtime dependencies (a model server) would downgrade protobuf and
  psutil, and only its generated classes are needed. They are loaded from the wheel.
"""

from __future__ import annotations

import collections
import importlib
import os
import re
import shlex
import stat
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bray.archiver.cli import main
from bray.export import export_model
from bray.store import CheckpointStore
from tests.models import StepProbe, probe_weights

KSERVE_WHEEL_DIR = Path(sys.prefix) / "share" / "bray-kserve"


@pytest.fixture()
def store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "store")
    export_model(StepProbe(), (torch.zeros(2, 4),), dest=store.export_dir("probe_v1"), onnx=False)
    store.publish("probe_v1", probe_weights(1), step=1)
    return store


def export(store: CheckpointStore, out: Path, *extra: str) -> int:
    return main(["kserve", "probe_v1", "--out", str(out), "--store", str(store.root), *extra])


def load_docs(out: Path) -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((out / "kubernetes").glob("*.yaml"))}


def test_layout_is_what_kserves_torchserve_runtime_loads(store: CheckpointStore, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert export(store, out, "--workers", "3", "--batch-size", "16", "--max-batch-delay-ms", "2",
                  "--store-mount", "/data/store") == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "kubernetes", "kubernetes/0-store-pvc.yaml", "kubernetes/1-servingruntime.yaml",
        "kubernetes/2-inferenceservice.yaml", "models", "models/config", "models/config/config.properties",
        "models/model-store", "models/model-store/probe_v1-latest.mar"]
    props: dict[str, str] = {}
    for line in (out / "models/config/config.properties").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key] = value  # the last value wins, as in Java's Properties
    assert props["inference_address"] == "http://0.0.0.0:8085"
    assert props["management_address"] == "http://127.0.0.1:8081"  # the model API stays on loopback
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["enable_model_api"] == "true" and props["allowed_urls"] == "(?!)"
    assert "disable_token_authorization" not in props
    snapshot = yaml.safe_load(props["model_snapshot"])
    assert snapshot["models"]["probe_v1"]["latest"] == {
        "defaultVersion": True, "marName": "probe_v1-latest.mar", "minWorkers": 3, "maxWorkers": 3,
        "batchSize": 16, "maxBatchDelay": 2, "responseTimeout": 120}
    from bray.archiver.pack import read_archive_config

    cfg = read_archive_config(out / "models/model-store/probe_v1-latest.mar")
    assert cfg.store == "/data/store" and cfg.step == -1 and cfg.options.poll_interval_ms == 50

    docs = load_docs(out)
    runtime = docs["1-servingruntime.yaml"]["spec"]["containers"][0]
    assert runtime["args"] == ["torchserve", "--start", "--model-store=/mnt/models/model-store",
                               "--ts-config=/mnt/models/config/config.properties"]
    assert runtime["ports"] == [{"containerPort": 8085, "name": "http1", "protocol": "TCP"}]
    assert runtime["readinessProbe"]["exec"]["command"][-2:] == ["bray.ts_config.probe", "--ready"]
    predictor = docs["2-inferenceservice.yaml"]["spec"]["predictor"]
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 2
    assert predictor["model"]["volumeMounts"] == [{"name": "bray-store", "mountPath": "/data/store"}]
    assert {"name": "BRAY_STORE", "value": "/data/store"} in predictor["model"]["env"]
    assert docs["0-store-pvc.yaml"]["spec"]["accessModes"] == ["ReadWriteMany"]


# -- schemas ---------------------------------------------------------------------------------


def test_the_claim_is_valid_kubernetes(store: CheckpointStore, tmp_path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (test extra)")
    assert export(store, tmp_path / "out", "--storage-class", "nfs-client") == 0
    pvc = load_docs(tmp_path / "out")["0-store-pvc.yaml"]
    kubernetes_validate.validate(pvc, "1.37.0", strict=True)
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")  # the check catches a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, "1.37.0", strict=True)


@pytest.fixture(scope="module")
def kserve_models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("kubernetes", reason="needs the kubernetes client (test extra)")
    pytest.importorskip("six", reason="needs six (test extra), which KServe's generated classes import")
    wheels = sorted(KSERVE_WHEEL_DIR.glob("kserve-*.whl"))
    if not wheels:
        pytest.skip(f"needs KServe's model classes: scripts/setup.sh downloads the kserve wheel into {KSERVE_WHEEL_DIR}")
    root = tmp_path_factory.mktemp("kserve")
    with zipfile.ZipFile(wheels[-1]) as zf:
        for member in zf.namelist():
            if member.startswith("kserve/models/") or member == "kserve/configuration.py":
                zf.extract(member, root)
    saved = {k: v for k, v in sys.modules.items() if k == "kserve" or k.startswith("kserve.")}
    pkg = types.ModuleType("kserve")  # not the wheel's __init__, which starts a model server's imports
    pkg.__path__ = [str(root / "kserve")]
    sys.modules["kserve"] = pkg
    try:
        yield importlib.import_module("kserve.models")
    finally:
        for key in [k for k in sys.modules if k == "kserve" or k.startswith("kserve.")]:
            del sys.modules[key]
        sys.modules.update(saved)


_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
               "datetime": str, "date": str}


def _check(value: Any, type_name: str, where: str, kserve: Any, errors: list[str]) -> None:
    import kubernetes.client

    type_name = type_name.strip()
    if m := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, m.group(1), f"{where}[{i}]", kserve, errors)
        return
    if m := re.fullmatch(r"(?:dict\(str, ?(.+)\)|Dict\[str, ?(.+)\])", type_name):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return
        for key, item in value.items():
            _check(item, m.group(1) or m.group(2), f"{where}.{key}", kserve, errors)
        return
    if type_name in _PRIMITIVES:
        if not isinstance(value, _PRIMITIVES[type_name]) or (type_name == "int" and isinstance(value, bool)):
            errors.append(f"{where}: expected {type_name}, got {value!r}")
        return
    cls = getattr(kserve, type_name, None) or getattr(kubernetes.client, type_name, None)
    if cls is None:
        errors.append(f"{where}: unknown type {type_name}")
        return
    if type_name == "V1Time":  # a timestamp string
        return
    if type_name == "ResourceQuantity" or type_name.endswith("Quantity"):
        if not isinstance(value, (str, int, float)):
            errors.append(f"{where}: expected a quantity, got {value!r}")
        return
    if not isinstance(value, dict):
        errors.append(f"{where}: expected an object ({type_name}), got {type(value).__name__}")
        return
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{where}.{key}: not a field of {type_name} (fields: {sorted(by_json)})")
            continue
        _check(item, cls.openapi_types[by_json[key]], f"{where}.{key}", kserve, errors)
    fields = getattr(cls, "model_fields", None)  # the kubernetes client's pydantic classes
    if fields:
        for attr, info in fields.items():
            if info.is_required() and cls.attribute_map.get(attr, attr) not in value:
                errors.append(f"{where}: {type_name} needs {cls.attribute_map.get(attr, attr)}")


def schema_errors(doc: dict[str, Any], type_name: str, kserve: Any) -> list[str]:
    errors: list[str] = []
    _check(doc, type_name, doc.get("kind", type_name), kserve, errors)
    return errors


def test_runtime_and_service_fit_kserves_crd_classes(store: CheckpointStore, tmp_path: Path, kserve_models: Any) -> None:
    assert export(store, tmp_path / "out", "--gpus", "1") == 0
    docs = load_docs(tmp_path / "out")
    runtime, service = docs["1-servingruntime.yaml"], docs["2-inferenceservice.yaml"]
    assert schema_errors(runtime, "V1alpha1ServingRuntime", kserve_models) == []
    assert schema_errors(service, "V1beta1InferenceService", kserve_models) == []
    # and the walk does catch mistakes, at any depth
    runtime["spec"]["containers"][0]["readinessProbe"]["exec"]["cmd"] = ["true"]
    service["spec"]["predictor"]["minReplica"] = 2
    service["spec"]["predictor"]["volumes"][0]["persistentVolumeClaim"] = {"claim": "x"}
    assert [e.split(":")[0] for e in schema_errors(runtime, "V1alpha1ServingRuntime", kserve_models)] == [
        "ServingRuntime.spec.containers[0].readinessProbe.exec.cmd"]
    assert sorted(e.split(":")[0] for e in schema_errors(service, "V1beta1InferenceService", kserve_models)) == [
        "InferenceService.spec.predictor.minReplica",
        "InferenceService.spec.predictor.volumes[0].persistentVolumeClaim",
        "InferenceService.spec.predictor.volumes[0].persistentVolumeClaim.claim"]


# -- bad input -------------------------------------------------------------------------------


def test_unpublished_name_is_one_line_and_writes_nothing(store: CheckpointStore, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["kserve", "nobody", "--out", str(out), "--store", str(store.root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nobody' has no published step" in err and "publish one first" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["store"]


def test_a_non_empty_out_needs_force_and_force_replaces_it_whole(store: CheckpointStore, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert export(store, out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty; pass --force" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert export(store, out, "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["kubernetes", "models"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "store"]  # no temporary folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(store, empty) == 0  # an empty folder is fine without --force


@pytest.mark.parametrize("where", ["file-as-parent", "read-only-fs"])
def test_an_unwritable_out_is_one_line_and_leaves_nothing(store: CheckpointStore, tmp_path: Path, where: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    if where == "file-as-parent":
        (tmp_path / "afile").write_text("")
        out = tmp_path / "afile" / "out"
    else:
        out = Path("/proc/self/bray-out")  # procfs refuses new entries, even to root
    assert export(store, out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write into" in err and "choose an --out" in err
    assert not out.exists()


def test_bad_deployment_options_are_refused_before_anything_is_written(store: CheckpointStore, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert export(store, out, "--memory", "lots") == 1
    assert "memory must be a Kubernetes quantity" in capsys.readouterr().err
    assert export(store, out, "--store-mount", "/mnt/models") == 1
    assert "store_mount must be an absolute path other than /mnt/models" in capsys.readouterr().err
    assert not out.exists()


# -- what a user meets: the README's command, file modes, one value per key, batching ----------

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_kserve_command() -> list[str]:
    """The ``bray-archive kserve ...`` command of the README's KServe section, as a shell would split it."""
    section = README.read_text().split("## Kubernetes with KServe", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    text = block.replace("\\\n", " ")  # the shell's line continuations
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("bray-archive kserve ")]
    return shlex.split(line, comments=True)


def test_the_readmes_kserve_command_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = readme_kserve_command()
    assert argv[:3] == ["bray-archive", "kserve", "policy"], argv
    # What the README's quick start leaves behind: "policy" published in the trainer's store
    # ($BRAY_STORE), and a working directory without the --out folder's parent.
    store = CheckpointStore(tmp_path / "trainer-store")
    export_model(StepProbe(), (torch.zeros(2, 4),), dest=store.export_dir("policy"), onnx=False)
    store.publish("policy", probe_weights(3), step=3)
    monkeypatch.setenv("BRAY_STORE", str(store.root))
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    out = tmp_path / argv[argv.index("--out") + 1]
    from bray.archiver.pack import read_archive_config

    cfg = read_archive_config(out / "models/model-store/policy-latest.mar")
    mount = load_docs(out)["2-inferenceservice.yaml"]["spec"]["predictor"]["model"]["volumeMounts"][0]["mountPath"]
    assert cfg.store == mount == "/mnt/bray-store"  # the pods read the store where they mount it
    assert (out / "models/config/config.properties").is_file()


def test_the_pods_mount_path_as_local_store_says_which_is_which(store: CheckpointStore, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    mount = str(tmp_path / "not-here")
    assert export(store, tmp_path / "out", "--store", mount, "--store-mount", mount) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the checkpoint store {mount} does not exist" in err
    assert "--store-mount" in err and "where the pods mount" in err
    assert not (tmp_path / "out").exists()


def test_out_with_missing_parents_is_made(store: CheckpointStore, tmp_path: Path) -> None:
    out = tmp_path / "deploy" / "team" / "policy"
    assert export(store, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["kubernetes", "models"]
    assert sorted(p.name for p in (tmp_path / "deploy" / "team").iterdir()) == ["policy"]  # no temporary left


def test_made_parents_are_removed_again_when_the_export_fails(store: CheckpointStore, tmp_path: Path) -> None:
    assert main(["kserve", "nobody", "--out", str(tmp_path / "deploy" / "x"), "--store", str(store.root)]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def _modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


def test_archives_and_exported_files_are_readable_by_the_pods_user(tmp_path: Path) -> None:
    # The runtime image runs as model-server, not as the uploader: a private umask must not
    # make the archive, the export or the store's model definition unreadable to it.
    saved = os.umask(0o077)
    try:
        store = CheckpointStore(tmp_path / "store")
        export_model(StepProbe(), (torch.zeros(2, 4),), dest=store.export_dir("probe_v1"), onnx=False)
        store.publish("probe_v1", probe_weights(1), step=1)
        assert export(store, tmp_path / "out") == 0
        from bray.archiver.pack import pack_archive

        packed = pack_archive(store, "probe_v1", step=1, model_store=tmp_path / "model_store")
    finally:
        os.umask(saved)
    modes = _modes(tmp_path / "out")
    assert {k: v for k, v in modes.items() if (tmp_path / "out" / k).is_dir()} == {
        k: "0o755" for k in (".", "kubernetes", "models", "models/config", "models/model-store")}
    assert {k: v for k, v in modes.items() if (tmp_path / "out" / k).is_file()} == {
        k: "0o644" for k in ("kubernetes/0-store-pvc.yaml", "kubernetes/1-servingruntime.yaml",
                             "kubernetes/2-inferenceservice.yaml", "models/config/config.properties",
                             "models/model-store/probe_v1-latest.mar")}
    assert oct(stat.S_IMODE(packed.path.stat().st_mode)) == "0o644"
    export_dir = store.export_dir("probe_v1")
    assert oct(stat.S_IMODE(export_dir.stat().st_mode)) == "0o755"


def test_nothing_is_made_more_permissive_than_0644_and_0755(store: CheckpointStore, tmp_path: Path) -> None:
    saved = os.umask(0)
    try:
        assert export(store, tmp_path / "out") == 0
    finally:
        os.umask(saved)
    modes = set(_modes(tmp_path / "out").values())
    assert modes == {"0o644", "0o755"}, modes


def test_the_config_sets_each_key_once(store: CheckpointStore, tmp_path: Path) -> None:
    assert export(store, tmp_path / "out") == 0
    keys = [line.partition("=")[0].strip()
            for line in (tmp_path / "out/models/config/config.properties").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert [k for k, n in collections.Counter(keys).items() if n > 1] == []
    assert {"inference_address", "management_address", "metrics_address", "model_snapshot"} <= set(keys)


def test_pods_batch_by_default_as_the_readmes_remote_model_does(store: CheckpointStore, tmp_path: Path) -> None:
    from bray.archiver.kserve import BATCH_SIZE, export_kserve
    from bray.archiver.pack import read_archive_config

    assert BATCH_SIZE == 32  # the README's RemoteModel(..., max_batch_size=32) and the main job's
    assert export(store, tmp_path / "cli") == 0
    done = export_kserve(store, "probe_v1", out=tmp_path / "api")
    for out in (tmp_path / "cli", tmp_path / "api"):
        props = dict(line.split("=", 1) for line in (out / "models/config/config.properties").read_text().splitlines()
                     if line and not line.startswith("#"))
        entry = yaml.safe_load(props["model_snapshot"])["models"]["probe_v1"]["latest"]
        assert (entry["batchSize"], entry["maxBatchDelay"]) == (32, 0)
        cfg = read_archive_config(out / "models/model-store/probe_v1-latest.mar")
        assert cfg.options.batch_size == 32 and cfg.options.max_batch_delay_ms == 0
    assert done.archive.is_file()
    assert export(store, tmp_path / "one", "--batch-size", "1") == 0  # still a choice
