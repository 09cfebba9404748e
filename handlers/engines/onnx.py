"""The ONNX Runtime engine: the ONNX export with a dynamic batch dimension.

New weights never need a new export. Two ways to install them, chosen by
``EngineOptions.onnx_weights`` (``scripts/bench_engines.py`` measures both):

- ``"initializers"``: a new ``InferenceSession`` per step, built off the request path
  with ``SessionOptions.add_initializer`` overriding the export's initializers; the
  swap is a reference assignment. Fastest forward (constant folding, fused kernels).
- ``"inputs"``: the export's weights become graph inputs, fed with every run; a new
  step costs only wrapping arrays in OrtValues, but each forward pays for the feeds.

``quantize=True`` re-quantizes (dynamic int8) the model with each step's weights.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bray.errors import EngineError, EngineUnavailableError
from bray.export import ONNX_FILE, to_numpy
from bray.handlers.engines.base import Engine, EngineOptions

__all__ = ["OnnxEngine"]


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise EngineUnavailableError(
            "the onnx engine needs ONNX Runtime; pip install 'bray-serve[onnx]' "
            "(or 'bray-serve[onnx-gpu]' on a CUDA machine)"
        ) from err
    return onnxruntime


class OnnxEngine(Engine):
    """ONNX Runtime session on CPU, or CUDA when the provider and a GPU are present."""

    name = "onnx"

    def __init__(self, export_dir: Path, spec: Any, options: EngineOptions) -> None:
        super().__init__(export_dir, spec, options)
        if not spec.has_onnx:
            raise EngineError(
                f"the export at {export_dir} has no ONNX model; re-export with onnx=True "
                "(RemoteModel(..., use_onnx='infer')) or serve it with engine='torch'"
            )
        ort = _import_ort()
        self._ort = ort
        import onnx

        path = Path(export_dir) / ONNX_FILE
        try:
            self._proto = onnx.load(str(path))
        except Exception as err:
            raise EngineError(f"cannot read the ONNX export {path}: {err}") from err
        inits = {i.name for i in self._proto.graph.initializer}
        missing = [k for k in spec.param_names if k not in inits]
        if missing:
            raise EngineError(
                f"the ONNX export does not keep weights {missing[:5]} as named initializers; "
                "re-export it with this bray-serve version"
            )
        self._providers = self._pick_providers(options.device)
        self._input_names = list(spec.onnx_input_names)
        self._output_names = list(spec.onnx_output_names)
        self._dtypes = [np.dtype(x.dtype) for x in spec.input_leaves]
        if options.onnx_weights == "inputs" and not options.quantize:
            self._mode = "inputs"
            self._session = self._new_session(self._weights_as_inputs().SerializeToString(), {})
            from onnx import numpy_helper

            # Until a step is installed, serve the export's own weights.
            self._weights: dict[str, Any] = {
                i.name: numpy_helper.to_array(i) for i in self._proto.graph.initializer if i.name in set(spec.param_names)
            }
        else:
            self._mode = "quantize" if options.quantize else "initializers"
            self._model_bytes = self._proto.SerializeToString()
            self._session = self._new_session(self._model_bytes, {})
            self._weights = {}

    def _pick_providers(self, device: str) -> list[Any]:
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in self._ort.get_available_providers():
                raise EngineUnavailableError(
                    f"device {device} asked for, but ONNX Runtime has no CUDA provider; "
                    "pip install 'bray-serve[onnx-gpu]'"
                )
            dev_id = int(device.split(":")[1]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _options(self) -> Any:
        so = self._ort.SessionOptions()
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def _new_session(self, model: bytes | str, initializers: Mapping[str, Any]) -> Any:
        so = self._options()
        for name, value in initializers.items():
            so.add_initializer(name, value)
        try:
            return self._ort.InferenceSession(model, sess_options=so, providers=self._providers)
        except Exception as err:
            raise EngineError(f"ONNX Runtime could not build a session: {err}") from err

    def _weights_as_inputs(self) -> Any:
        """A copy of the graph whose weight initializers are graph inputs."""
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self._proto)
        params = set(self.spec.param_names)
        keep = []
        for init in model.graph.initializer:
            if init.name in params:
                vi = onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                model.graph.input.append(vi)
            else:
                keep.append(init)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        return model

    def prepare_weights(self, weights: Mapping[str, Any]) -> Any:
        self.check_weights(weights)
        arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in weights.items()}
        if self._mode == "inputs":
            return arrays
        if self._mode == "quantize":
            return (self._quantized_session(arrays), arrays)
        ort_values = {k: self._ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}
        # The OrtValues point into ``arrays``: keep both alive as long as the session.
        return (self._new_session(self._model_bytes, ort_values), (arrays, ort_values))

    def _quantized_session(self, arrays: Mapping[str, np.ndarray]) -> Any:
        import onnx
        from onnx import numpy_helper

        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError as err:
            raise EngineUnavailableError("quantization needs onnxruntime's quantization tools") from err
        model = onnx.ModelProto()
        model.CopyFrom(self._proto)
        for init in model.graph.initializer:
            if init.name in arrays:
                init.CopyFrom(numpy_helper.from_array(arrays[init.name].astype(numpy_helper.to_array(init).dtype), init.name))
        # The exporter's value_info can disagree with ONNX shape inference, which the
        # quantizer runs; dropping it lets inference recompute every shape.
        del model.graph.value_info[:]
        with tempfile.TemporaryDirectory(prefix="bray-quant-") as tmp:
            raw, src, dst = (os.path.join(tmp, f) for f in ("raw.onnx", "in.onnx", "out.onnx"))
            onnx.save(model, raw)
            # Fold the exporter's weight transposes into constants first (basic graph
            # optimizations), or the quantizer mis-shapes the transposed MatMul weights.
            so = self._ort.SessionOptions()
            so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = src
            self._ort.InferenceSession(raw, sess_options=so, providers=["CPUExecutionProvider"])
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            with open(dst, "rb") as f:
                return self._new_session(f.read(), {})

    def swap(self, prepared: Any) -> None:
        if self._mode == "inputs":
            self._weights = prepared
        else:
            self._session, self._keepalive = prepared

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._mode == "inputs":
            return self._run(self._session, inputs, self._weights)
        return self._run(self._session, inputs, None)

    def forward_with(self, inputs: Sequence[np.ndarray], prepared: Any) -> list[np.ndarray]:
        """A weight set's forward, the installed weights untouched: with weights as graph
        inputs, the set's arrays are fed instead of the installed ones (the same session);
        otherwise the set was prepared as a step is, a session of its own over its arrays,
        which runs instead (its memory is the session's, more than the arrays the weight-set
        budget counts)."""
        if self._mode == "inputs":
            return self._run(self._session, inputs, prepared)
        session, _ = prepared
        return self._run(session, inputs, None)

    def _run(self, session: Any, inputs: Sequence[np.ndarray], weights: Mapping[str, Any] | None) -> list[np.ndarray]:
        if session is None or (self._mode == "inputs" and not weights):
            raise EngineError("no weights installed yet; call set_weights first")
        feeds: dict[str, Any] = {
            name: (a if a.dtype == dt else a.astype(dt)) for name, a, dt in zip(self._input_names, inputs, self._dtypes)
        }
        if weights is not None:
            feeds.update(weights)
        try:
            return list(session.run(self._output_names, feeds))
        except Exception as err:
            raise EngineError(f"ONNX Runtime failed to run the batch: {err}") from err

    def close(self) -> None:
        self._session = None
        self._weights = {}
