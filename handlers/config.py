"""What an archive tells its handler: the ``bray`` section of ``model-config.yaml``.

The archiver writes it (``ServingConfig.to_yaml_dict``), the handler reads it
(``ServingConfig.from_yaml_dict``): one definition for both sides::

    minWorkers: 2            # TorchServe's own keys, beside ours
    batchSize: 32
    maxBatchDelay: 5
    handler:
      bray:
        name: policy
        store: /home/me/.bray/store
        engine: torch
        step: -1             # -1 follows the latest step; N pins version N
        fixed_batch_size: 0  # > 0 pads every forward to this size (Bray's max_batch_size < 0)
        threads: 1
        poll_interval_ms: 0  # > 0 reads the store's LATEST this often (shared file systems)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from bray.errors import ConfigError

__all__ = ["ARCHIVE_WEIGHTS_FILE", "ServingConfig"]

# A pinned archive carries its step's weights under this name, beside model-config.yaml:
# the archiver writes it, the handler reads it.
ARCHIVE_WEIGHTS_FILE = "weights.safetensors"

_ENGINES = ("torch", "onnx", "tensorrt")


@dataclass(frozen=True)
class ServingConfig:
    """How one registered model version is served.

    Attributes:
        name: model name in the checkpoint store.
        store: checkpoint store root (absolute path, shared with the trainer).
        engine: ``torch``, ``onnx`` or ``tensorrt``.
        step: ``-1`` follows the latest step (hot reload); ``N >= 0`` pins step N.
        fixed_batch_size: ``0`` runs batches as they come; ``> 0`` pads every forward to
            exactly this many samples and trims the padding off the outputs.
        threads: intra-op threads per worker.
        device: ``"auto"`` (the GPU TorchServe assigns, else CPU), ``"cpu"`` or ``"cuda"``.
        onnx_weights: ``initializers`` or ``inputs`` (see ``engines/onnx.py``).
        quantize: dynamic int8 quantization (onnx engine).
        reject_nonfinite: answer 400 to inputs holding NaN or infinity.
        max_request_bytes: largest request body accepted, in bytes.
        max_batch: largest TensorRT profile batch.
        poll_interval_ms: ``0`` follows the store with inotify (one machine); ``> 0``
            reads its ``LATEST`` pointer this often instead, which is what a store on
            NFS or another shared file system needs (inotify sees only local writes).
    """

    name: str
    store: str
    engine: str = "torch"
    step: int = -1
    fixed_batch_size: int = 0
    threads: int = 1
    device: str = "auto"
    onnx_weights: str = "initializers"
    quantize: bool = False
    reject_nonfinite: bool = False
    max_request_bytes: int = 64 << 20
    max_batch: int = 256
    poll_interval_ms: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("the serving config needs a model name")
        if self.engine not in _ENGINES:
            raise ConfigError(f"engine must be one of {list(_ENGINES)}, got {self.engine!r}")
        for key in ("step",):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < -1:
                raise ConfigError(f"{key} must be -1 (latest) or a step >= 0, got {getattr(self, key)!r}")
        for key in ("fixed_batch_size", "poll_interval_ms"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"{key} must be an integer >= 0, got {getattr(self, key)!r}")
        for key in ("threads", "max_request_bytes", "max_batch"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    @property
    def pinned(self) -> bool:
        return self.step >= 0

    def to_yaml_dict(self) -> dict[str, Any]:
        """The ``handler: {bray: ...}`` section for model-config.yaml."""
        data = asdict(self)
        if not data["extra"]:
            data.pop("extra")
        else:
            data["extra"] = dict(data["extra"])
        return {"bray": data}

    @classmethod
    def from_yaml_dict(cls, model_yaml: Mapping[str, Any] | None) -> "ServingConfig":
        """Read the config from a parsed model-config.yaml (TorchServe's ``context.model_yaml_config``).

        Raises:
            ConfigError: the section is missing, or holds unknown keys or invalid values.
        """
        section = ((model_yaml or {}).get("handler") or {}).get("bray")
        if not isinstance(section, Mapping):
            raise ConfigError(
                "model-config.yaml has no 'handler: bray:' section; build the archive with "
                "`bray-archive publish` (or RemoteModel) rather than by hand"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"unknown keys {unknown} in model-config.yaml 'handler: bray:'; known: {sorted(known)}")
        return cls(**dict(section))
