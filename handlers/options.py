"""The serving options, declared once, and what an archive tells its handler.

:class:`ServingOptions` holds every option a served model version is built with (engine,
TorchServe batching and workers, threads, input checks, ...), each with its one default,
its validation and its ``bray-archive`` flag. ``bray-archive`` builds it from its flags
(:meth:`ServingOptions.from_args`, flags declared by :meth:`ServingOptions.add_arguments`),
``pack_archive`` and ``publish_version`` take it (or its fields as keyword arguments),
``RemoteModel`` maps Bray's arguments onto it, and the handler reads it back from the
archive.

:class:`ServingConfig` is what an archive tells its handler: the model, the store, the
step and the options, written into ``model-config.yaml`` by the archiver
(:meth:`ServingConfig.to_model_yaml`) and read by the handler
(:meth:`ServingConfig.from_yaml_dict`), one definition for both sides::

    minWorkers: 2            # TorchServe's own keys (batch_size, max_batch_delay_ms,
    maxWorkers: 2            # workers), beside ours
    batchSize: 32
    maxBatchDelay: 5
    handler:
      bray:
        name: policy
        store: /home/me/.bray/store
        step: -1             # -1 follows the latest step; N pins version N
        engine: torch
        fixed_batch_size: 0  # > 0 pads every forward to this size (Bray's max_batch_size < 0)
        threads: 1
        ...                  # the other handler-side options
"""

from __future__ import annotations

import argparse
from dataclasses import Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from bray.errors import ConfigError
from bray.handlers.engines import ENGINES

if TYPE_CHECKING:  # pragma: no cover
    from bray.handlers.engines import EngineOptions

__all__ = ["ARCHIVE_WEIGHTS_FILE", "ServingConfig", "ServingOptions"]

# A pinned archive carries its step's weights under this name, beside model-config.yaml:
# the archiver writes it, the handler reads it.
ARCHIVE_WEIGHTS_FILE = "weights.safetensors"

_DEVICES = ("auto", "cpu", "cuda", "cuda:N")


@dataclass(frozen=True)
class _Spec:
    """How one serving option is checked, shown on the command line and written to the archive.

    Attributes:
        help: the flag's help; ``{default}`` is replaced by the default (in the flag's unit).
        low: integers: the smallest value accepted.
        choices: strings: the values accepted.
        flag: the ``bray-archive`` flag, when not ``--<field-name>``.
        metavar: the flag's value placeholder.
        flag_unit: the flag counts in units of this many (``--max-request-mb``: 1 MiB).
        torchserve_key: TorchServe's own ``model-config.yaml`` key that holds the option
            (``batchSize``), instead of the ``handler: bray:`` section.
    """

    help: str
    low: int | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    metavar: str | None = None
    flag_unit: int = 1
    torchserve_key: str | None = None


def _option(default: Any, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": _Spec(**spec)})


def _spec(f: Field[Any]) -> _Spec:
    spec: _Spec = f.metadata["spec"]
    return spec


def _flag(f: Field[Any]) -> str:
    return _spec(f).flag or "--" + f.name.replace("_", "-")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


@dataclass(frozen=True, kw_only=True)
class ServingOptions:
    """How a model version is served: every option, its one default, validated when built.

    ``bray-archive publish`` and ``watch`` have one flag per field (``--batch-size``, ...;
    ``--max-request-mb`` counts MiB). Keyword arguments of the same names work wherever
    options are taken (``pack_archive``, ``publish_version``, ``watch_and_publish``).

    Attributes:
        engine: a name from the engine registry (``bray.handlers.engines.ENGINES``):
            ``torch``, ``onnx`` or ``tensorrt``.
        batch_size: TorchServe's batch size (``batchSize``), in requests.
        max_batch_delay_ms: how long TorchServe holds a request to fill a batch
            (``maxBatchDelay``); 0 as ``RemoteModel``: its client coalesces already, and
            a lone request waits the whole delay.
        workers: TorchServe workers of the version (``minWorkers``; ``maxWorkers`` is at
            least 1).
        threads: intra-op threads per worker.
        fixed_batch_size: ``0`` runs batches as they come; ``> 0`` pads every forward to
            exactly this many samples and trims the padding off the outputs.
        onnx_weights: ``initializers`` or ``inputs`` (see ``engines/onnx.py``).
        quantize: dynamic int8 quantization (onnx engine).
        reject_nonfinite: answer 400 to inputs holding NaN or infinity.
        max_request_bytes: largest request body the handler decodes, in bytes.
        poll_interval_ms: ``0`` follows the store with inotify (one machine); ``> 0``
            reads its ``LATEST`` pointer this often instead, which is what a store on
            NFS or another shared file system needs (inotify sees only local writes).
        device: ``auto`` (the GPU TorchServe assigns the worker, else CPU), ``cpu``,
            ``cuda`` or ``cuda:N``.
        max_batch: largest batch, in samples, a TensorRT engine's profile accepts.
        weight_sets_bytes: the most bytes of clones' weights (weight sets,
            ``handlers/weight_sets.py``) each worker holds at once, least recently used
            out first.

    Raises:
        ConfigError: a value of the wrong type or out of range (the message names the
            option, the value got, and what is accepted).
    """

    engine: str = _option("torch", choices=tuple(ENGINES), help="inference engine (default {default})")
    batch_size: int = _option(1, low=1, metavar="B", torchserve_key="batchSize",
                              help="TorchServe batch size (default {default})")
    max_batch_delay_ms: int = _option(
        0, low=0, metavar="D", torchserve_key="maxBatchDelay",
        help="how long TorchServe holds a request to fill a batch (default {default}, as RemoteModel: "
             "a lone request waits the whole delay, and bray's client batches already)")
    workers: int = _option(1, low=0, metavar="W", torchserve_key="minWorkers",
                           help="workers for the new version (default {default})")
    threads: int = _option(1, low=1, metavar="T", help="intra-op threads per worker (default {default})")
    fixed_batch_size: int = _option(0, low=0, metavar="N", help="pad every forward to N samples (default {default}: off)")
    onnx_weights: str = _option("initializers", choices=("initializers", "inputs"),
                                help="how the onnx engine takes weights (default {default})")
    quantize: bool = _option(False, help="dynamic int8 quantization (onnx engine)")
    reject_nonfinite: bool = _option(False, help="answer 400 to inputs holding NaN or infinity")
    max_request_bytes: int = _option(64 << 20, low=1, flag="--max-request-mb", metavar="MB", flag_unit=1 << 20,
                                     help="largest request body the handler decodes (default {default})")
    poll_interval_ms: int = _option(0, low=0, metavar="MS",
                                    help="workers read the store's LATEST every MS milliseconds instead of using "
                                         "inotify (0), for a store on NFS or another shared file system "
                                         "(default {default})")
    device: str = _option("auto", metavar="DEVICE",
                          help="where each worker runs: auto (the GPU TorchServe assigns it, else the CPU), "
                               "cpu, cuda or cuda:N (default {default})")
    max_batch: int = _option(256, low=1, metavar="N",
                             help="largest batch a TensorRT engine's profile accepts (default {default})")
    weight_sets_bytes: int = _option(512 << 20, low=1, flag="--weight-sets-mb", metavar="MB", flag_unit=1 << 20,
                                     help="the most memory each worker gives clones served as weight sets of this "
                                          "model, least recently used out first (default {default})")

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _problem(f, getattr(self, f.name))
            if problem:
                raise ConfigError(f"serving option {f.name} must be {problem}, got {getattr(self, f.name)!r} "
                                  f"(bray-archive flag {_flag(f)})")

    # --- building -----------------------------------------------------------------------

    @classmethod
    def build(cls, options: ServingOptions | None = None, /, **overrides: Any) -> ServingOptions:
        """``options`` (default: every default) with the keyword arguments a caller passed.

        This is how ``pack_archive(..., batch_size=8)`` and the like keep working.

        Raises:
            ConfigError: an unknown option name, or an invalid value.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ConfigError(f"unknown serving option(s) {unknown}; the options are {names} "
                              "(bray.handlers.options.ServingOptions)")
        base = options if options is not None else cls()
        if not isinstance(base, ServingOptions):
            raise ConfigError(f"options must be a ServingOptions, got {type(base).__name__}; "
                              "build one with ServingOptions(engine=..., batch_size=...)")
        return replace(base, **overrides) if overrides else base

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup, **defaults: Any) -> None:
        """Declare one ``bray-archive`` flag per option (names, defaults, help from the fields).

        Args:
            parser: the parser or argument group that gets the flags.
            **defaults: another default for this command (``poll_interval_ms=50``), shown in
                its help; flags shared through ``parents=`` share their default, so a command
                with other defaults needs its own flags.

        Raises:
            ConfigError: an unknown option or an invalid default.
        """
        chosen = cls.build(**defaults)
        for f in fields(cls):
            spec = _spec(f)
            default = getattr(chosen, f.name)
            shown = default // spec.flag_unit if spec.flag_unit > 1 else default
            text = spec.help.format(default=shown)
            if isinstance(f.default, bool):
                if default:  # a store_true flag cannot turn an option off
                    raise ConfigError(f"{f.name}'s flag {_flag(f)} can only turn it on; its default must be False")
                parser.add_argument(_flag(f), action="store_true", help=text)
            elif spec.choices is not None:
                parser.add_argument(_flag(f), choices=spec.choices, default=default, help=text)
            elif spec.low is not None:
                low = -(-spec.low // spec.flag_unit)  # in the flag's unit, rounded up
                parser.add_argument(_flag(f), type=int_at_least(low), default=shown, metavar=spec.metavar, help=text)
            else:
                parser.add_argument(_flag(f), default=default, metavar=spec.metavar, help=text)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServingOptions:
        """The options from flags declared by :meth:`add_arguments`.

        Raises:
            ConfigError: an invalid value (argparse refuses most before).
        """
        values = {}
        for f in fields(cls):
            value = getattr(args, _flag(f)[2:].replace("-", "_"))
            values[f.name] = value * _spec(f).flag_unit if _spec(f).flag_unit > 1 else value
        return cls(**values)

    def engine_options(self, *, device: str, extra: Mapping[str, Any] | None = None) -> EngineOptions:
        """What the engine is loaded with (the handler's and local mode's one mapping).

        Args:
            device: the resolved device, ``"cpu"`` or ``"cuda:N"``.
            extra: engine-specific settings besides ``max_batch``.
        """
        from bray.handlers.engines import EngineOptions

        return EngineOptions(device=device, threads=self.threads, onnx_weights=self.onnx_weights,
                             quantize=self.quantize, extra={"max_batch": self.max_batch, **dict(extra or {})})

    # --- in model-config.yaml -------------------------------------------------------------

    def torchserve_keys(self) -> dict[str, Any]:
        """TorchServe's own ``model-config.yaml`` keys (``minWorkers``, ``batchSize``, ...)."""
        keys: dict[str, Any] = {}
        for f in fields(self):
            key = _spec(f).torchserve_key
            if key is not None:
                keys[key] = getattr(self, f.name)
        return {"minWorkers": keys["minWorkers"], "maxWorkers": max(keys["minWorkers"], 1),
                **{k: v for k, v in keys.items() if k != "minWorkers"}}

    def handler_keys(self) -> dict[str, Any]:
        """The options the handler reads from the ``handler: bray:`` section."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not _spec(f).torchserve_key}

    @classmethod
    def from_model_yaml(cls, model_yaml: Mapping[str, Any], section: Mapping[str, Any]) -> ServingOptions:
        """The options from TorchServe's keys in ``model_yaml`` and the handler ``section``.

        A key that is absent takes its default (archives written before an option existed).
        """
        values = {}
        for f in fields(cls):
            key = _spec(f).torchserve_key
            if key is None and f.name in section:
                values[f.name] = section[f.name]
            elif key is not None and key in model_yaml:
                values[f.name] = model_yaml[key]
        return cls(**values)


def _problem(f: Field[Any], value: Any) -> str:
    """What ``value`` should have been for option ``f``, or "" when it is fine."""
    spec = _spec(f)
    if isinstance(f.default, bool):
        return "True or False" if not isinstance(value, bool) else ""
    if isinstance(f.default, int):
        if not isinstance(value, int) or isinstance(value, bool) or (spec.low is not None and value < spec.low):
            return f"an integer >= {spec.low}" + (" (bytes)" if f.name.endswith("_bytes") else "")
        return ""
    if spec.choices is not None:
        return f"one of {list(spec.choices)}" if value not in spec.choices else ""
    if f.name == "device":
        ok = isinstance(value, str) and (value in _DEVICES[:3] or (value.startswith("cuda:") and value[5:].isdigit()))
        return f"one of {list(_DEVICES)}" if not ok else ""
    return ""  # pragma: no cover - every option has a rule above


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """How one registered model version is served: what its archive tells the handler.

    Attributes:
        name: model name in the checkpoint store.
        store: checkpoint store root (absolute path, shared with the trainer).
        step: ``-1`` follows the latest step (hot reload); ``N >= 0`` pins step N.
        options: the serving options.
        extra: anything engine-specific (passed to the engine).
    """

    name: str
    store: str
    step: int = -1
    options: ServingOptions = field(default_factory=ServingOptions)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("the serving config needs a model name")
        if not self.store:
            raise ConfigError("the serving config needs the checkpoint store's path (store=)")
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < -1:
            raise ConfigError(f"step must be -1 (latest) or a step >= 0, got {self.step!r}")
        if not isinstance(self.options, ServingOptions):
            raise ConfigError(f"options must be a ServingOptions, got {type(self.options).__name__}")

    @property
    def pinned(self) -> bool:
        return self.step >= 0

    def to_model_yaml(self) -> dict[str, Any]:
        """The whole ``model-config.yaml``: TorchServe's keys and the ``handler: bray:`` section."""
        section: dict[str, Any] = {"name": self.name, "store": self.store, "step": self.step,
                                   **self.options.handler_keys()}
        if self.extra:
            section["extra"] = dict(self.extra)
        return {**self.options.torchserve_keys(), "handler": {"bray": section}}

    @classmethod
    def from_yaml_dict(cls, model_yaml: Mapping[str, Any] | None) -> ServingConfig:
        """Read the config from a parsed model-config.yaml (TorchServe's ``context.model_yaml_config``).

        Raises:
            ConfigError: the section is missing, or holds unknown keys or invalid values.
        """
        model_yaml = model_yaml or {}
        section = (model_yaml.get("handler") or {}).get("bray")
        if not isinstance(section, Mapping):
            raise ConfigError(
                "model-config.yaml has no 'handler: bray:' section; build the archive with "
                "`bray-archive publish` (or RemoteModel) rather than by hand"
            )
        known = {"name", "store", "step", "extra", *ServingOptions().handler_keys()}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"unknown keys {unknown} in model-config.yaml 'handler: bray:'; known: {sorted(known)}")
        return cls(name=section.get("name", ""), store=section.get("store", ""), step=section.get("step", -1),
                   options=ServingOptions.from_model_yaml(model_yaml, section), extra=dict(section.get("extra") or {}))
