"""The serving options are declared once (``bray.handlers.options.ServingOptions``).

Every consumer reaches the same values from that one definition: ``bray-archive``'s flags,
``pack_archive``, ``publish_version``, the handler's config read back from the archive, and
``RemoteModel`` (from Bray's arguments). A bad value is refused once, with a message that
names the option, the value got and what is accepted, before anything is written or sent.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import shutil
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from bray.archiver.cli import _parser, from_args, main
from bray.archiver.pack import pack_archive, read_archive_config
from bray.archiver.publish import publish_version, watch_and_publish
from bray.errors import ConfigError
from bray.handlers.options import ServingConfig, ServingOptions
from bray.handlers.engines import ENGINES
from bray.store import CheckpointStore

NAME = "policy"
FIELDS = [f.name for f in fields(ServingOptions)]

# Every option set to something other than its default, and the same as a user types it.
CHANGED: dict[str, Any] = dict(
    engine="onnx", batch_size=8, max_batch_delay_ms=3, workers=2, threads=2, fixed_batch_size=4,
    onnx_weights="inputs", quantize=True, reject_nonfinite=True, max_request_bytes=3 << 20,
    poll_interval_ms=20, device="cpu", max_batch=64, weight_sets_bytes=7 << 20,
)
CHANGED_ARGV = ["--engine", "onnx", "--batch-size", "8", "--max-batch-delay-ms", "3", "--workers", "2",
                "--threads", "2", "--fixed-batch-size", "4", "--onnx-weights", "inputs", "--quantize",
                "--reject-nonfinite", "--max-request-mb", "3", "--poll-interval-ms", "20", "--device", "cpu",
                "--max-batch", "64", "--weight-sets-mb", "7"]
COMMANDS = {"publish": ["publish", "--name", NAME], "watch": ["watch", "--name", NAME, "--every", "10"]}

# (option, a bad value, what the message says besides the option's name and the value)
BAD = [
    ("engine", "jax", f"must be one of {list(ENGINES)}"),
    ("batch_size", 0, "must be an integer >= 1"),
    ("batch_size", True, "must be an integer >= 1"),
    ("max_batch_delay_ms", -1, "must be an integer >= 0"),
    ("workers", -1, "must be an integer >= 0"),
    ("threads", 0, "must be an integer >= 1"),
    ("fixed_batch_size", -2, "must be an integer >= 0"),
    ("onnx_weights", "both", "must be one of ['initializers', 'inputs']"),
    ("quantize", "yes", "must be True or False"),
    ("max_request_bytes", 0, "must be an integer >= 1 (bytes)"),
    ("poll_interval_ms", 0.5, "must be an integer >= 0"),
    ("device", "gpu", "must be one of ['auto', 'cpu', 'cuda', 'cuda:N']"),
    ("max_batch", 0, "must be an integer >= 1"),
]
BAD_IDS = [f"{name}={value!r}" for name, value, _ in BAD]


def _message(name: str, value: Any, rule: str) -> str:
    return f"serving option {name} {rule}, got {value!r}"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export of a tiny Linear(4, 2), torch and ONNX (exporting takes seconds)."""
    import torch

    from bray.export import export_model

    dest = tmp_path_factory.mktemp("export") / "export"
    export_model(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), dest=dest, onnx=True)
    return dest


@pytest.fixture
def store(tmp_path: Path, export_dir: Path) -> CheckpointStore:
    import torch

    s = CheckpointStore(tmp_path / "store")
    shutil.copytree(export_dir, s.export_dir(NAME))
    s.publish(NAME, {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}, step=10)
    return s


# --- one definition ------------------------------------------------------------------------


def test_changed_sets_every_option_away_from_its_default() -> None:
    defaults = ServingOptions()
    assert sorted(CHANGED) == sorted(FIELDS)
    assert [n for n in FIELDS if CHANGED[n] == getattr(defaults, n)] == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_a_flag_whose_default_is_the_options_default(command: str) -> None:
    parser = _parser()
    _, pack = from_args(parser.parse_args(COMMANDS[command]))
    assert pack is not None and pack.serving == ServingOptions()
    _, pack = from_args(parser.parse_args(COMMANDS[command] + CHANGED_ARGV))
    assert pack is not None and pack.serving == ServingOptions(**CHANGED)


def test_a_command_with_its_own_default_does_not_change_the_others() -> None:
    """kserve polls the store and batches by default; publish and watch keep inotify (parents= shares flag objects)."""
    from bray.archiver.kserve import BATCH_SIZE, POLL_INTERVAL_MS

    parser = _parser()
    _, kserve = from_args(parser.parse_args(["kserve", NAME, "--out", "deploy"]))
    assert kserve is not None
    assert kserve.serving == ServingOptions(poll_interval_ms=POLL_INTERVAL_MS, batch_size=BATCH_SIZE)
    for command in sorted(COMMANDS):
        _, pack = from_args(parser.parse_args(COMMANDS[command]))
        assert pack is not None and pack.serving.poll_interval_ms == 0, command
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["kserve", "--help"]) == 0
    assert f"(default {POLL_INTERVAL_MS})" in " ".join(out.getvalue().split())


def test_help_shows_the_defaults_of_the_definition() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["publish", "--help"]) == 0
    text = " ".join(out.getvalue().split())
    assert "{torch,onnx,tensorrt}" in text  # the engine registry's names, in its order
    assert "largest request body the handler decodes (default 64)" in text  # in the flag's unit (MiB)
    assert "how long TorchServe holds a request to fill a batch (default 0," in text
    assert "largest batch a TensorRT engine's profile accepts (default 256)" in text


def test_engine_choices_are_the_engine_registry() -> None:
    publish = next(a for a in _parser()._actions if a.dest == "command").choices["publish"]  # type: ignore[union-attr]
    engine = next(a for a in publish._actions if a.dest == "engine")
    assert list(engine.choices) == list(ENGINES)
    assert ServingOptions().engine == next(iter(ENGINES))


def test_one_default_for_the_batch_delay() -> None:
    from bray import RemoteModel

    remote = inspect.signature(RemoteModel.__init__).parameters["max_batch_delay_ms"].default
    cli = _parser().parse_args(COMMANDS["publish"]).max_batch_delay_ms
    assert remote == cli == ServingOptions().max_batch_delay_ms == 0


# --- the archive carries them to the handler ---------------------------------------------


@pytest.mark.parametrize("step", [None, 10], ids=["live", "pinned"])
def test_options_survive_archive_to_handler_config(store: CheckpointStore, tmp_path: Path, step: int | None) -> None:
    options = ServingOptions(**CHANGED)
    packed = pack_archive(store, NAME, step=step, model_store=tmp_path / "ms", options=options)
    config = read_archive_config(packed.path)  # what the handler reads (ServingConfig.from_yaml_dict)
    assert config.options == options
    assert (config.name, config.step) == (NAME, -1 if step is None else 10)
    doc = yaml.safe_load(zipfile.ZipFile(packed.path).read("model-config.yaml"))
    # TorchServe's own keys hold its options; the handler's section holds the rest, once
    assert {k: doc[k] for k in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")} == {
        "minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 3}
    assert not {"batch_size", "max_batch_delay_ms", "workers"} & set(doc["handler"]["bray"])


def test_keyword_arguments_and_options_reach_the_same_archive(store: CheckpointStore, tmp_path: Path) -> None:
    by_keywords = pack_archive(store, NAME, step=10, model_store=tmp_path / "a", **CHANGED)
    by_options = pack_archive(store, NAME, step=10, model_store=tmp_path / "b",
                              options=ServingOptions(**{**CHANGED, "threads": 1}), threads=2)  # keywords win
    assert read_archive_config(by_keywords.path) == read_archive_config(by_options.path)
    assert read_archive_config(by_keywords.path).options == ServingOptions(**CHANGED)


def test_the_handler_serves_with_the_archives_options(store: CheckpointStore, tmp_path: Path) -> None:
    from ts.context import Context

    from bray.handlers.handler import EngineHandler

    options = ServingOptions(**{**CHANGED, "quantize": False})
    packed = pack_archive(store, NAME, step=10, model_store=tmp_path / "ms", options=options)
    model_dir = tmp_path / "mar"
    zipfile.ZipFile(packed.path).extractall(model_dir)
    doc = yaml.safe_load((model_dir / "model-config.yaml").read_text())  # as TorchServe hands it over
    handler = EngineHandler()
    handler.initialize(Context(NAME, str(model_dir), {}, 8, None, "0.12.0", model_yaml_config=doc))
    try:
        assert handler.config is not None and handler.config.options == options
        assert handler.engine.name == "onnx"
        engine_options = handler.engine.options
        assert (engine_options.threads, engine_options.onnx_weights, engine_options.device) == (2, "inputs", "cpu")
        assert engine_options.extra["max_batch"] == 64
        assert handler.pipeline is not None
        assert handler.pipeline.limits.max_total_bytes == 3 << 20
        assert (handler.pipeline.fixed_batch_size, handler.pipeline.reject_nonfinite) == (4, True)
    finally:
        handler.close()


OLD_YAML = ("minWorkers: 2\nmaxWorkers: 2\nbatchSize: 8\nmaxBatchDelay: 3\n"
            "handler:\n  bray:\n    name: policy\n    store: /data/store\n    engine: onnx\n    step: 20\n"
            "    fixed_batch_size: 0\n    threads: 2\n    device: auto\n    onnx_weights: initializers\n"
            "    quantize: false\n    reject_nonfinite: true\n    max_request_bytes: 67108864\n    max_batch: 256\n")


@pytest.mark.parametrize("poll", ["", "    poll_interval_ms: 50\n"], ids=["before-polling", "with-polling"])
def test_an_archive_written_before_the_options_object_still_reads(poll: str) -> None:
    """model-config.yaml exactly as bray-archive wrote it before ServingOptions existed."""
    doc = yaml.safe_load(OLD_YAML + poll)
    config = ServingConfig.from_yaml_dict(doc)
    assert config == ServingConfig(name="policy", store="/data/store", step=20, options=ServingOptions(
        engine="onnx", batch_size=8, max_batch_delay_ms=3, workers=2, threads=2, reject_nonfinite=True,
        poll_interval_ms=50 if poll else 0))
    # and what is written now has the same keys (poll_interval_ms since it exists), so the
    # handler of those archives reads it too
    written = config.to_model_yaml()
    assert set(written) == set(doc)
    assert set(written["handler"]["bray"]) == set(doc["handler"]["bray"]) | {"poll_interval_ms", "weight_sets_bytes"}
    assert ServingConfig.from_yaml_dict(written) == config


def test_unknown_keys_in_an_archive_are_refused_with_the_known_ones() -> None:
    doc = {"handler": {"bray": {"name": NAME, "store": "/s", "batch_size": 8}}}  # TorchServe's key, misplaced
    with pytest.raises(ConfigError, match=r"unknown keys \['batch_size'\] in model-config.yaml"):
        ServingConfig.from_yaml_dict(doc)


# --- RemoteModel: Bray's arguments onto the same options ---------------------------------


@pytest.mark.parametrize(("bray_args", "expected"), [
    ({}, {}),
    ({"max_batch_size": 32, "max_batch_delay_ms": 5}, {"batch_size": 32, "max_batch_delay_ms": 5}),
    ({"max_batch_size": 0, "max_batch_delay_ms": 5}, {}),  # no batching: no delay either
    ({"max_batch_size": -8}, {"batch_size": 8, "fixed_batch_size": 8}),
    ({"num_workers": 3, "cpus_per_worker": 2.0}, {"workers": 3, "threads": 2}),
    ({"use_onnx": "infer"}, {"engine": "onnx"}),
    ({"use_onnx": "train"}, {"engine": "onnx", "onnx_weights": "inputs"}),
    ({"use_onnx": "quantize"}, {"engine": "onnx", "quantize": True}),
    ({"use_tensorrt": True}, {"engine": "tensorrt"}),
], ids=["defaults", "batching", "no-batching", "fixed-batch", "workers-threads", "onnx-infer", "onnx-train",
        "onnx-quantize", "tensorrt"])
def test_bray_arguments_map_onto_the_options(bray_args: dict[str, Any], expected: dict[str, Any]) -> None:
    from bray.bridge.remote_model import _serving_options

    args = dict(max_batch_size=1, num_workers=None, cpus_per_worker=None, use_onnx=None, use_tensorrt=False,
                max_batch_delay_ms=0)
    assert _serving_options(**{**args, **bray_args}) == ServingOptions(**expected)


def test_remote_model_holds_the_options_it_serves_with(tmp_path: Path) -> None:
    import torch

    import bray

    bray.init(store=tmp_path / "store")
    rm = bray.RemoteModel(NAME, model=torch.nn.Linear(4, 2), forward_args=(torch.zeros(2, 4),), max_batch_size=-4,
                          cpus_per_worker=2, local_mode=True)
    try:
        assert rm.options == ServingOptions(batch_size=4, fixed_batch_size=4, threads=2)
        assert rm.engine_name == rm.options.engine == "torch"
        assert rm(torch.zeros(3, 4)).shape == (3, 2)  # padded to 4 and trimmed, as the handler does
    finally:
        rm.close()


def test_remote_model_refuses_a_bad_option_before_exporting(tmp_path: Path) -> None:
    import torch

    import bray

    bray.init(store=tmp_path / "store")
    with pytest.raises(ConfigError, match=_message("max_batch_delay_ms", -1, "must be an integer >= 0")):
        bray.RemoteModel(NAME, model=torch.nn.Linear(4, 2), forward_args=(torch.zeros(2, 4),), max_batch_size=8,
                         max_batch_delay_ms=-1)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("spec.json"))


# --- bad values: refused once, with the message ------------------------------------------


@pytest.mark.parametrize(("name", "value", "rule"), BAD, ids=BAD_IDS)
def test_a_bad_value_is_refused_when_built(name: str, value: Any, rule: str) -> None:
    with pytest.raises(ConfigError) as err:
        ServingOptions(**{name: value})
    assert _message(name, value, rule) in str(err.value)
    assert "bray-archive flag --" in str(err.value)


@pytest.mark.parametrize(("name", "value", "rule"), BAD, ids=BAD_IDS)
def test_pack_and_publish_refuse_a_bad_value_before_doing_anything(store: CheckpointStore, tmp_path: Path,
                                                                   name: str, value: Any, rule: str) -> None:
    model_store = tmp_path / "ms"
    with pytest.raises(ConfigError, match=_escape(_message(name, value, rule))):
        pack_archive(store, NAME, step=10, model_store=model_store, **{name: value})
    # client=None: publishing must fail on the option before it talks to any server
    with pytest.raises(ConfigError, match=_escape(_message(name, value, rule))):
        publish_version(store, NAME, step=10, client=None, model_store=model_store,  # type: ignore[arg-type]
                        **{name: value})
    with pytest.raises(ConfigError, match=_escape(_message(name, value, rule))):
        watch_and_publish(store, NAME, 10, client=None, model_store=model_store,  # type: ignore[arg-type]
                          **{name: value})
    assert not model_store.exists()


def test_an_unknown_option_name_lists_the_options(store: CheckpointStore, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown serving option\(s\) \['batch'\]; the options are \['engine'"):
        pack_archive(store, NAME, step=10, model_store=tmp_path / "ms", batch=8)
    with pytest.raises(ConfigError, match="unknown serving option"):
        publish_version(store, NAME, step=10, client=None, model_store=tmp_path / "ms",  # type: ignore[arg-type]
                        batchsize=8)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["--max-request-mb", "0"], "argument --max-request-mb: expected an integer >= 1, got 0"),
    (["--engine", "jax"], "argument --engine: invalid choice: 'jax'"),
    (["--onnx-weights", "both"], "argument --onnx-weights: invalid choice: 'both'"),
], ids=["batch-size", "max-request-mb", "engine", "onnx-weights"])
def test_the_cli_refuses_a_bad_flag_as_a_usage_error(argv: list[str], expected: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(COMMANDS["publish"] + argv) == 2
    assert expected in err.getvalue()


def test_the_cli_refuses_a_bad_device_with_the_options_message() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(COMMANDS["publish"] + ["--device", "gpu"]) == 1
    assert _message("device", "gpu", "must be one of ['auto', 'cpu', 'cuda', 'cuda:N']") in err.getvalue()


def _escape(text: str) -> str:
    import re

    return re.escape(text)
