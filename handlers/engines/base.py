"""The engine contract: load, set_weights, forward, close.

An engine runs one exported model on one device. The handler and local mode only
talk to this interface; each backend is one module beside this one. Weights change in
two phases so the expensive part stays off the request path:

- :meth:`Engine.prepare_weights` (background thread): convert, copy to the device,
  build a session or refit; returns an opaque object;
- :meth:`Engine.swap` (between batches): install what was prepared; cheap.

``set_weights`` does both, for callers that do not care. At most one ``prepare_weights``
runs at a time. An engine with :attr:`Engine.reuses_prepared` prepares into storage it
reuses (TensorRT refits one of two engines): once ``prepare_weights`` is called again,
an earlier prepared object that was not swapped in must never be swapped in;
:class:`StepFollower` takes the pending step back first.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from bray.errors import ConfigError
from bray.export import ModelSpec

__all__ = ["Engine", "EngineOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings from the archive's model-config.yaml (or RemoteModel's local mode).

    Attributes:
        device: ``"cpu"`` or ``"cuda:N"``.
        threads: intra-op threads per worker (``None`` leaves the library default).
        onnx_weights: ``"initializers"`` (a new ONNX Runtime session per step, weights
            baked in as initializers) or ``"inputs"`` (weights fed as graph inputs).
        quantize: dynamic int8 quantization (ONNX Runtime only).
        extra: anything engine-specific.
    """

    device: str = "cpu"
    threads: int | None = None
    onnx_weights: str = "initializers"
    quantize: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda:N', got {self.device!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be an integer >= 1 or None, got {self.threads!r}")
        if self.onnx_weights not in ("initializers", "inputs"):
            raise ConfigError(f"onnx_weights must be 'initializers' or 'inputs', got {self.onnx_weights!r}")


class Engine(abc.ABC):
    """One exported model on one device. Not thread-safe: one forward at a time."""

    name: ClassVar[str]
    #: ``prepare_weights`` writes into the storage of the previous prepared object (if that
    #: was not swapped in yet), instead of making a new one.
    reuses_prepared: ClassVar[bool] = False

    def __init__(self, export_dir: Path, spec: ModelSpec, options: EngineOptions) -> None:
        self.export_dir = export_dir
        self.spec = spec
        self.options = options

    @classmethod
    def load(cls, export_dir: str | Path, spec: ModelSpec, options: EngineOptions | None = None) -> "Engine":
        """Build the engine from an export directory (its weights are the export's own).

        Raises:
            EngineError: the export does not load on this engine.
            EngineUnavailableError: the engine's package or device is missing.
        """
        return cls(Path(export_dir), spec, options or EngineOptions())

    def check_weights(self, weights: Mapping[str, Any]) -> None:
        """Refuse weights whose keys or shapes do not match the model's state dict."""
        from bray.errors import EngineError

        want = set(self.spec.param_names)
        got = set(weights)
        if want != got:
            missing = sorted(want - got)[:5]
            extra = sorted(got - want)[:5]
            raise EngineError(
                f"weights do not match the model: missing {missing}, unexpected {extra}; "
                "publish the model's full state_dict()"
            )
        for key, want_shape in (self.spec.param_shapes or {}).items():
            got_shape = tuple(weights[key].shape)
            if got_shape != tuple(want_shape):
                raise EngineError(
                    f"weight {key!r} has shape {list(got_shape)}, the model needs {list(want_shape)}; "
                    "was the architecture changed? re-export the model"
                )

    @abc.abstractmethod
    def prepare_weights(self, weights: Mapping[str, np.ndarray]) -> Any:
        """Convert and stage new weights (slow part; off the request path).

        With :attr:`reuses_prepared`, calling it again invalidates what the previous call
        returned if that was not swapped in yet, also when the call fails; the active
        weights keep serving either way.
        """

    @abc.abstractmethod
    def swap(self, prepared: Any) -> None:
        """Install staged weights (fast; called between batches)."""

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Prepare and install ``weights`` (a flat state dict of arrays)."""
        self.swap(self.prepare_weights(weights))

    @abc.abstractmethod
    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one batch: flat input arrays (spec leaf order) -> flat output arrays."""

    def forward_with(self, inputs: Sequence[np.ndarray], prepared: Any) -> list[np.ndarray]:
        """:meth:`forward` with other weights (a weight set's, from :meth:`prepare_weights`),
        leaving the installed ones in place.

        Raises:
            EngineError: this engine cannot run weights it has not installed.
        """
        from bray.errors import EngineError

        raise EngineError(
            f"the {self.name} engine cannot serve weight sets (clones served by the model's own workers): "
            "clone with dedicated=True for a TorchServe model of its own, or serve with the torch engine")

    def forward_batch(self, inputs: Sequence[np.ndarray], *, fixed_batch_size: int = 0,
                      weights: Any = None) -> list[np.ndarray]:
        """:meth:`forward`, padded when the model wants a fixed batch size, outputs checked.

        Args:
            inputs: flat input arrays sharing a leading batch dimension.
            fixed_batch_size: ``> 0`` runs chunks of exactly this many samples, the last
                one padded with zeros, and trims the padding off the outputs.
            weights: a weight set's prepared weights (:meth:`forward_with`); ``None``: the
                installed ones.

        Raises:
            EngineError: an output whose leading dimension is not the batch size.
        """
        from bray.errors import EngineError

        total = int(inputs[0].shape[0])
        run = self.forward if weights is None else (lambda part: self.forward_with(part, weights))
        if not fixed_batch_size:
            outputs = run(inputs)
        else:
            chunks = []
            for start in range(0, total, fixed_batch_size):
                part = [a[start:start + fixed_batch_size] for a in inputs]
                short = fixed_batch_size - part[0].shape[0]
                if short:
                    part = [np.concatenate([a, np.zeros((short, *a.shape[1:]), dtype=a.dtype)]) for a in part]
                chunks.append([o[: fixed_batch_size - short] for o in run(part)])
            outputs = [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]
        for o in outputs:
            if o.shape[:1] != (total,):
                raise EngineError(f"the model returned {o.shape[0] if o.ndim else 'no'} rows for a batch of {total}")
        return outputs

    def close(self) -> None:
        """Release sessions and device memory."""
