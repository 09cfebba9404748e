"""The TensorRT engine: built once from the ONNX export with the REFIT flag, refitted per step.

Two execution contexts over two engines deserialized from one plan (double buffering):
:meth:`prepare_weights` refits the standby engine in the background thread while the
active one serves; :meth:`swap` flips them between batches. A step never needs a new
build. Needs a CUDA GPU, ``tensorrt`` (``pip install 'bray-serve[tensorrt]'``) and torch
with CUDA (used for device buffers and the stream).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bray.errors import EngineError, EngineUnavailableError
from bray.export import ONNX_FILE, to_numpy
from bray.handlers.engines.base import Engine, EngineOptions

__all__ = ["TensorRTEngine"]


def _import_trt() -> Any:
    try:
        import tensorrt
    except ImportError as err:
        raise EngineUnavailableError(
            "the tensorrt engine needs TensorRT; pip install 'bray-serve[tensorrt]' on a CUDA machine"
        ) from err
    return tensorrt


class TensorRTEngine(Engine):
    """A refittable TensorRT engine with a dynamic batch profile (1 .. ``max_batch``)."""

    name = "tensorrt"
    reuses_prepared = True  # refits the standby engine in place

    def __init__(self, export_dir: Path, spec: Any, options: EngineOptions) -> None:
        super().__init__(export_dir, spec, options)
        import torch

        if not torch.cuda.is_available():
            raise EngineUnavailableError("the tensorrt engine needs a CUDA GPU; none is visible to torch")
        if not spec.has_onnx:
            raise EngineError(f"the export at {export_dir} has no ONNX model, which TensorRT builds from; re-export with onnx=True")
        trt = _import_trt()
        self._trt = trt
        self._torch = torch
        self._device = torch.device(options.device if options.device.startswith("cuda") else "cuda:0")
        self._logger = trt.Logger(trt.Logger.WARNING)
        from bray.handlers.options import ServingOptions

        max_batch = int(options.extra.get("max_batch") or ServingOptions().max_batch)
        plan = self._build(Path(export_dir) / ONNX_FILE, max_batch)
        runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self._device):
            self._engines = [runtime.deserialize_cuda_engine(plan) for _ in range(2)]
            self._contexts = [e.create_execution_context() for e in self._engines]
        self._active = 0
        self._inputs = list(spec.onnx_input_names)
        self._outputs = list(spec.onnx_output_names)

    def _build(self, onnx_path: Path, max_batch: int) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.REFIT)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            rest = tuple(tensor.shape)[1:]
            opt = min(32, max_batch)
            profile.set_shape(tensor.name, (1, *rest), (opt, *rest), (max_batch, *rest))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
        return bytes(plan)

    def prepare_weights(self, weights: Mapping[str, Any]) -> Any:
        self.check_weights(weights)
        trt = self._trt
        standby = 1 - self._active
        arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in weights.items()}
        refitter = trt.Refitter(self._engines[standby], self._logger)
        known = set(refitter.get_all_weights())
        for name, arr in arrays.items():
            if name in known and not refitter.set_named_weights(name, trt.Weights(arr)):
                raise EngineError(f"TensorRT refused new weights for {name!r} (shape {list(arr.shape)})")
        missing = refitter.get_missing_weights()
        if missing:
            raise EngineError(f"TensorRT refit is missing weights {list(missing)[:5]}")
        with self._torch.cuda.device(self._device):
            if not refitter.refit_cuda_engine():
                raise EngineError("TensorRT refit failed; the engine keeps its previous weights")
        # ``arrays`` must outlive the refit call only; TensorRT copies them.
        return standby

    def swap(self, prepared: Any) -> None:
        self._active = int(prepared)

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        trt = self._trt
        engine = self._engines[self._active]
        ctx = self._contexts[self._active]
        stream = torch.cuda.current_stream(self._device)
        keep = []
        for name, arr in zip(self._inputs, inputs):
            want = trt.nptype(engine.get_tensor_dtype(name))
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=want)).to(self._device, non_blocking=True)
            keep.append(t)
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self._outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = _torch_dtype(trt.nptype(engine.get_tensor_dtype(name)))
            t = torch.empty(shape, dtype=dtype, device=self._device)
            ctx.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT failed to run the batch")
        stream.synchronize()
        return [t.cpu().numpy() for t in outs]

    def close(self) -> None:
        self._contexts = []
        self._engines = []


def _torch_dtype(np_dtype: Any) -> Any:
    """The torch dtype of a numpy dtype (what torch.from_numpy would give)."""
    import torch

    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
