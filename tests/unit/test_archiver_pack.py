"""pack_archive and the bray-archive CLI without a server: a tiny real model in a real store."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import shutil
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import bray.archiver
from bray.archiver.cli import main
from bray.archiver.pack import pack_archive, read_archive_config
from bray.errors import ConfigError, CorruptCheckpointError, StepNotFoundError, StoreError
from bray.store import CheckpointStore

NAME = "policy"
STEPS = (10, 20, 30)


def _linear_weights(step: int) -> dict:
    import torch

    return {"weight": torch.full((2, 4), float(step)), "bias": torch.full((2,), float(step))}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export of a tiny Linear(4, 2), torch and ONNX (exporting takes seconds)."""
    import torch

    from bray.export import export_model

    dest = tmp_path_factory.mktemp("export") / "export"
    export_model(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), dest=dest)
    return dest


@pytest.fixture
def store(tmp_path: Path, export_dir: Path) -> CheckpointStore:
    """A store holding steps 10, 20, 30 of NAME (weights all equal to the step)."""
    s = CheckpointStore(tmp_path / "store")
    shutil.copytree(export_dir, s.export_dir(NAME))
    for step in STEPS:
        s.publish(NAME, _linear_weights(step), step=step)
    return s


@pytest.fixture
def model_store(tmp_path: Path) -> Path:
    return tmp_path / "model_store"


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _read(path: Path) -> tuple[zipfile.ZipFile, dict]:
    zf = zipfile.ZipFile(path)
    return zf, yaml.safe_load(zf.read("model-config.yaml"))


# --- pack_archive ------------------------------------------------------------------------


def test_pinned_archive_holds_step_weights_export_shim_and_config(store: CheckpointStore, model_store: Path) -> None:
    packed = pack_archive(store, NAME, step=20, model_store=model_store, batch_size=8,
                          max_batch_delay_ms=3, workers=2, threads=2)

    assert packed.path == model_store / f"{NAME}-20.mar"
    assert (packed.name, packed.version, packed.step) == (NAME, "20", 20)
    zf, doc = _read(packed.path)
    assert sorted(zf.namelist()) == sorted([
        "MAR-INF/MANIFEST.json", "bray_handler.py", "model-config.yaml", "step.json",
        "weights.safetensors", "export/spec.json", "export/model.pt2",
    ])
    # stored, not deflated: float weights do not compress
    assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
    assert manifest == {"modelName": NAME, "handler": "bray_handler.py", "modelVersion": "20",
                        "configFile": "model-config.yaml"}
    assert {k: doc[k] for k in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")} == {
        "minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 3}
    bray_cfg = doc["handler"]["bray"]
    assert (bray_cfg["name"], bray_cfg["step"], bray_cfg["engine"], bray_cfg["threads"]) == (NAME, 20, "torch", 2)
    assert bray_cfg["store"] == str(store.root.resolve())
    step_dir = store.model_dir(NAME) / "steps" / f"{20:012d}"
    assert zf.read("weights.safetensors") == (step_dir / "weights.safetensors").read_bytes()
    meta = json.loads(zf.read("step.json"))
    assert (meta["step"], meta["sha256"]) == (20, store.meta(NAME, 20).sha256)
    assert read_archive_config(packed.path).step == 20


def test_shim_defines_exactly_one_class(store: CheckpointStore, model_store: Path, tmp_path: Path) -> None:
    """TorchServe's model_loader refuses a handler module with more or fewer classes."""
    from ts.utils.util import list_classes_from_module

    packed = pack_archive(store, NAME, step=10, model_store=model_store)
    shim = tmp_path / "bray_handler.py"
    shim.write_bytes(zipfile.ZipFile(packed.path).read("bray_handler.py"))
    spec = importlib.util.spec_from_file_location("bray_handler", shim)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = list_classes_from_module(module)
    assert [c.__name__ for c in classes] == ["BrayHandler"]
    from bray.handlers.handler import EngineHandler

    assert issubclass(classes[0], EngineHandler)


def test_live_archive_follows_latest_and_packs_no_weights(store: CheckpointStore, model_store: Path) -> None:
    packed = pack_archive(store, NAME, step=None, model_store=model_store)

    assert (packed.version, packed.step, packed.path.name) == ("latest", None, f"{NAME}-latest.mar")
    zf, doc = _read(packed.path)
    assert "weights.safetensors" not in zf.namelist() and "step.json" not in zf.namelist()
    assert doc["handler"]["bray"]["step"] == -1
    assert not read_archive_config(packed.path).pinned


def test_input_checks_are_packed_into_the_handler_config(store: CheckpointStore, model_store: Path) -> None:
    packed = pack_archive(store, NAME, step=None, model_store=model_store, version="strict",
                          reject_nonfinite=True, max_request_bytes=1 << 20)
    config = read_archive_config(packed.path)
    assert config.options.reject_nonfinite and config.options.max_request_bytes == 1 << 20


@pytest.mark.parametrize(("asked", "version"), [(25, "20"), (-1, "30"), (10**6, "30")],
                         ids=["snaps-down-to-kept", "minus-one-is-latest", "above-latest-is-latest"])
def test_step_resolves_to_a_kept_step(store: CheckpointStore, model_store: Path, asked: int, version: str) -> None:
    packed = pack_archive(store, NAME, step=asked, model_store=model_store)
    assert packed.version == version and packed.step == int(version)


@pytest.mark.parametrize(("engine", "present", "absent"), [
    ("torch", "export/model.pt2", "export/model.onnx"),
    ("onnx", "export/model.onnx", "export/model.pt2"),
], ids=["torch", "onnx"])
def test_only_the_engines_model_file_is_packed(store: CheckpointStore, model_store: Path,
                                               engine: str, present: str, absent: str) -> None:
    names = zipfile.ZipFile(pack_archive(store, NAME, step=10, model_store=model_store, engine=engine).path).namelist()
    assert present in names and absent not in names


def test_existing_archive_is_not_overwritten_without_force(store: CheckpointStore, model_store: Path) -> None:
    first = pack_archive(store, NAME, step=20, model_store=model_store)
    before = first.path.read_bytes()

    with pytest.raises(ConfigError, match="already exists; pass --force to overwrite"):
        pack_archive(store, NAME, step=20, model_store=model_store, batch_size=4)
    assert first.path.read_bytes() == before

    again = pack_archive(store, NAME, step=20, model_store=model_store, batch_size=4, force=True)
    assert _read(again.path)[1]["batchSize"] == 4
    assert sorted(p.name for p in model_store.iterdir()) == [f"{NAME}-20.mar"]  # no temp files left


def test_concurrent_packs_of_two_names_do_not_collide(store: CheckpointStore, model_store: Path) -> None:
    other = "opponent"
    shutil.copytree(store.export_dir(NAME), store.export_dir(other))
    store.publish(other, _linear_weights(7), step=7)
    barrier = threading.Barrier(4)

    def pack(args: tuple[str, int]) -> bray.archiver.PackedArchive:
        barrier.wait()
        return pack_archive(store, args[0], step=args[1], model_store=model_store)

    with ThreadPoolExecutor(4) as pool:
        packed = list(pool.map(pack, [(NAME, 10), (other, 7), (NAME, 30), (NAME, 20)]))

    assert sorted(p.path.name for p in packed) == sorted(p.name for p in model_store.iterdir())
    for p in packed:
        zf = zipfile.ZipFile(p.path)
        assert zf.testzip() is None
        assert json.loads(zf.read("step.json"))["name"] == p.name
        assert json.loads(zf.read("step.json"))["step"] == p.step


def test_racing_packs_of_one_version_leave_exactly_one_archive(store: CheckpointStore, model_store: Path) -> None:
    barrier = threading.Barrier(6)

    def pack(_: int) -> str:
        barrier.wait()
        try:
            pack_archive(store, NAME, step=30, model_store=model_store)
        except ConfigError as err:
            assert "already exists" in str(err)
            return "refused"
        return "written"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(pack, range(6)))

    assert outcomes.count("written") == 1
    assert [p.name for p in model_store.iterdir()] == [f"{NAME}-30.mar"]
    assert zipfile.ZipFile(model_store / f"{NAME}-30.mar").testzip() is None


def test_corrupt_step_is_refused_and_leaves_nothing(store: CheckpointStore, model_store: Path) -> None:
    weights = store.model_dir(NAME) / "steps" / f"{20:012d}" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        pack_archive(store, NAME, step=20, model_store=model_store)
    assert _files(model_store) == []


def test_missing_step_or_export_is_an_error_before_writing(tmp_path: Path, model_store: Path) -> None:
    empty = CheckpointStore(tmp_path / "empty")
    with pytest.raises(StepNotFoundError, match="publish one first"):
        pack_archive(empty, NAME, step=-1, model_store=model_store)
    empty.publish(NAME, _linear_weights(1), step=1)
    with pytest.raises(StoreError, match="export the model first"):
        pack_archive(empty, NAME, step=1, model_store=model_store)
    assert _files(model_store) == []


@pytest.mark.parametrize("options", [
    {"engine": "jax"}, {"batch_size": 0}, {"max_batch_delay_ms": -1}, {"workers": -1},
    {"onnx_weights": "both"}, {"version": "a/b"}, {"threads": 0},
], ids=lambda o: next(iter(o)))
def test_invalid_options_are_config_errors(store: CheckpointStore, model_store: Path, options: dict) -> None:
    with pytest.raises(ConfigError):
        pack_archive(store, NAME, step=10, model_store=model_store, **options)


def test_progress_bar_packs_the_same_archive(store: CheckpointStore, model_store: Path) -> None:
    packed = pack_archive(store, NAME, step=30, model_store=model_store, progress=True)
    assert zipfile.ZipFile(packed.path).testzip() is None


def test_public_surface_is_sorted_and_complete() -> None:
    from bray.archiver import kserve, pack, publish

    # Names resolve lazily (the CLI starts without numpy and requests); each is the defining module's.
    assert bray.archiver.__all__ == sorted(bray.archiver.__all__)
    client = {"ManagementClient", "ModelVersion", "TokenAuth"}  # bray.torchserve's, re-exported
    exported = (client | set(publish.__all__) | set(pack.__all__) - {"LIVE_VERSION", "archive_path"}
                | set(kserve.__all__) - {"manifests", "service_name"})
    assert set(bray.archiver.__all__) == exported
    for name in bray.archiver.__all__:
        assert getattr(bray.archiver, name) is getattr(importlib.import_module(bray.archiver._EXPORTS[name]), name)


# --- the CLI through main(argv) -----------------------------------------------------------

SUBCOMMANDS = ["publish", "versions", "set-default", "rollback", "prune", "scale", "status", "watch"]


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in SUBCOMMANDS)],
                         ids=["bray-archive", *SUBCOMMANDS])
def test_help_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert "usage: bray-archive" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["publish"],
    ["publish", "--name", "p", "--step", "-3"],
    ["publish", "--name", "p", "--step", "ten"],
    ["publish", "--name", "p", "--step", "3", "--live"],
    ["publish", "--name", "p", "--engine", "jax"],
    ["publish", "--name", "p", "--batch-size", "0"],
    ["prune", "p"],
    ["prune", "p", "--keep", "-1"],
    ["scale", "p"],
    ["set-default", "p"],
    ["watch", "--name", "p", "--every", "0"],
], ids=["no-command", "unknown-command", "publish-no-name", "negative-step", "step-not-a-number",
        "step-and-live", "unknown-engine", "batch-size-0", "prune-no-keep", "prune-negative-keep",
        "scale-no-workers", "set-default-no-step", "watch-every-0"])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("bray-archive") and "--help)" in err, err


def test_failure_exits_1_with_message_and_no_traceback(store: CheckpointStore, model_store: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["publish", "--store", str(store.root), "--model-store", str(model_store),
                 "--name", "nobody", "--management", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 1
    assert "no step of 'nobody' is published" in err and "Traceback" not in err


def test_unreachable_server_exits_3_saying_where(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["versions", "policy", "--management", "http://127.0.0.1:9", "--json"]) == 3
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9" in err and "is the server running? start it with: bray-archive server start" in err


def test_paths_default_from_bray_env(store: CheckpointStore, model_store: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BRAY_STORE", str(store.root))
    monkeypatch.setenv("BRAY_MODEL_STORE", str(model_store))
    monkeypatch.setenv("BRAY_MANAGEMENT_URL", "http://127.0.0.1:9")
    out = io.StringIO()
    # Step 99 snaps down to 30, which exists: the failure is the server, proving the store came from the env.
    assert main(["publish", "--name", NAME, "--step", "99"], out=out) == 3  # 3: no server at the address
    assert "http://127.0.0.1:9" in capsys.readouterr().err
    assert _files(model_store) == []  # the server is asked first: nothing packed for an unreachable one


def test_main_is_the_console_script() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "bray-archive"]
    assert ep.value == "bray.archiver.cli:main"
    assert sys.modules["bray.archiver.cli"].main is main


def test_a_module_torch_export_refused_packs_its_eager_definition(tmp_path: Path, model_store: Path) -> None:
    import torch

    from bray.export import export_model
    from tests.models import BranchyPolicy

    s = CheckpointStore(tmp_path / "store")
    export_model(BranchyPolicy(), (torch.zeros(2, 4),), dest=s.export_dir("branchy"), onnx=False)
    s.publish("branchy", BranchyPolicy().state_dict())
    packed = pack_archive(s, "branchy", step=0, model_store=model_store)
    names = set(zipfile.ZipFile(packed.path).namelist())
    assert {"export/eager.json", "export/spec.json", "weights.safetensors"} <= names
    assert "export/model.pt2" not in names
    with pytest.raises(StoreError, match="has no model.onnx.*--engine torch"):
        pack_archive(s, "branchy", step=0, model_store=model_store, engine="onnx", force=True)

    class Script(BranchyPolicy):  # a class no server can import: local mode only
        pass

    export_model(Script(), (torch.zeros(2, 4),), dest=s.export_dir("script"), onnx=False, fallback="local")
    s.publish("script", Script().state_dict())
    with pytest.raises(StoreError, match="torch.export refused the model.*importable module"):
        pack_archive(s, "script", step=None, model_store=model_store)


# --- a version named N serves step N -----------------------------------------------------


def test_a_numeric_version_must_name_the_pinned_step(store: CheckpointStore, model_store: Path) -> None:
    with pytest.raises(ConfigError, match=r"version '30' is a step number, but the archive would pin step 10"):
        pack_archive(store, NAME, step=10, model_store=model_store, version="30")
    with pytest.raises(ConfigError, match=r"version '25' is a step number, but the archive would pin step 30"):
        pack_archive(store, NAME, step=-1, model_store=model_store, version="25")
    with pytest.raises(StepNotFoundError, match=r"step 25 of 'policy' is not kept .* never published"):
        pack_archive(store, NAME, step=25, model_store=model_store, version="25")  # not snapped down to 20
    with pytest.raises(ConfigError, match="a live archive follows the latest step"):
        pack_archive(store, NAME, step=None, model_store=model_store, version="30")
    assert _files(model_store) == []
    assert pack_archive(store, NAME, step=20, model_store=model_store, version="20").step == 20


def test_a_pinned_step_pruned_before_packing_is_refused_not_renamed(tmp_path: Path, export_dir: Path,
                                                                    model_store: Path) -> None:
    """Issue 21: publish resolved step 30 and named the version "30"; retention pruned 30, and
    the pack snapped down to 24 under that name."""
    s = CheckpointStore(tmp_path / "store", keep_last=2, checkpoint_interval=100)
    shutil.copytree(export_dir, s.export_dir(NAME))
    for step in (24, 30, 31, 32):  # 24 is a checkpoint step; 30 falls out of the newest two
        s.publish(NAME, _linear_weights(step), step=step)
    assert s.resolve(NAME, 30) == 24

    with pytest.raises(StepNotFoundError, match=r"step 30 of 'policy' is not kept .*retention.*keep_last=2") as err:
        pack_archive(s, NAME, step=30, model_store=model_store, version="30")
    assert err.value.step == 30
    assert _files(model_store) == []


def test_packs_racing_retention_pin_exactly_their_step_or_fail(tmp_path: Path, export_dir: Path,
                                                               model_store: Path) -> None:
    """A trainer publishing in a loop with keep_last=1 while steps are packed by name: each archive
    holds the config, step.json and weights of the step it is named after, or the pack failed
    saying the step is gone and left no file (step 0, a checkpoint, is what a pruned step snapped
    down to)."""
    s = CheckpointStore(tmp_path / "store", keep_last=1, checkpoint_interval=10**6)
    shutil.copytree(export_dir, s.export_dir(NAME))
    s.publish(NAME, _linear_weights(0), step=0)
    stop = threading.Event()

    def trainer() -> None:
        while not stop.is_set():
            s.publish(NAME, _linear_weights(s.latest(NAME) + 1))

    thread = threading.Thread(target=trainer)
    thread.start()
    written, refused = [], []
    try:
        step = 0
        for _ in range(40):
            while (latest := s.latest(NAME)) == step:
                time.sleep(0.001)  # the next step: each version is packed once
            step = latest
            try:
                written.append(pack_archive(s, NAME, step=step, model_store=model_store, version=str(step)))
            except StepNotFoundError as err:
                assert f"step {step} of 'policy'" in str(err)
                refused.append(step)
    finally:
        stop.set()
        thread.join()
    import torch
    from safetensors.torch import load as load_safetensors

    for packed in written:
        zf = zipfile.ZipFile(packed.path)
        assert packed.version == str(packed.step)
        assert read_archive_config(packed.path).step == packed.step
        assert json.loads(zf.read("step.json"))["step"] == packed.step
        weights = load_safetensors(zf.read("weights.safetensors"))
        assert torch.equal(weights["bias"], torch.full((2,), float(packed.step)))
    assert sorted(_files(model_store)) == sorted(p.path.name for p in written)  # nothing half-made
    assert len(written) + len(refused) == 40
