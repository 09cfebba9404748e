"""The model definition the server rebuilds without the trainer's source code.

A trainer exports its module once, from ``forward_args`` (and ``forward_kwargs``):
``torch.export`` with a dynamic batch dimension (``model.pt2``), and, when asked, ONNX
from the same example inputs (``model.onnx``). ``spec.json`` records the input and
output structure (a NestedArray template: containers, dtypes, per-sample shapes) so the
handler can check requests before running anything, and can rebuild nested outputs
from an engine's flat list.

The export lives beside the checkpoint store (``<store>/<name>/export/``); from then on
only weights are published. Writing the export is atomic (temp dir + rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from bray.errors import ConfigError, EngineError, EngineUnavailableError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "EXPORT_DIRNAME",
    "ModelSpec",
    "export_model",
    "load_spec",
    "load_torch_module",
    "to_numpy",
]

EXPORT_DIRNAME = "export"
SPEC_FILE = "spec.json"
TORCH_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
SPEC_FORMAT = 1
_MAX_BATCH = 1 << 20
_LOAD_LOCK = threading.Lock()


# --- structure templates -------------------------------------------------------------
# A node is {"k": "a", "dtype": "float32", "shape": [64]} (per-sample shape, batch dim
# excluded) or {"k": "list"|"tuple", "items": [...]} or {"k": "dict", "keys": [...],
# "items": [...]}. Leaves are visited depth first, dict keys in insertion order: the
# same order as ``bray.wire.leaves``.


def _node_of(obj: Any, *, batched: bool) -> dict[str, Any]:
    if isinstance(obj, np.ndarray):
        shape = list(obj.shape[1:] if batched else obj.shape)
        if batched and obj.ndim == 0:
            raise ConfigError(
                "every input and output needs a leading batch dimension, got a 0-d array; "
                "give forward_args with shape (batch, ...)"
            )
        return {"k": "a", "dtype": obj.dtype.name, "shape": shape}
    if isinstance(obj, dict):
        return {"k": "dict", "keys": [str(k) for k in obj], "items": [_node_of(v, batched=batched) for v in obj.values()]}
    if isinstance(obj, (list, tuple)):
        return {"k": type(obj).__name__, "items": [_node_of(v, batched=batched) for v in obj]}
    raise ConfigError(f"expected a NestedArray (ndarray, list, tuple, dict), got {type(obj).__name__}")


def _build(node: Mapping[str, Any], it: Any) -> Any:
    kind = node["k"]
    if kind == "a":
        return next(it)
    items = [_build(n, it) for n in node["items"]]
    if kind == "dict":
        return dict(zip(node["keys"], items))
    return tuple(items) if kind == "tuple" else items


def _leaf_nodes(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if node["k"] == "a":
        return [node]
    return [leaf for n in node["items"] for leaf in _leaf_nodes(n)]


def to_numpy(obj: Any) -> Any:
    """Tensors (nested in lists, tuples, dicts) to numpy arrays; numbers to 0-d arrays.

    Duck-typed on ``.detach()``/``.numpy()`` so it never imports torch itself.

    Raises:
        ConfigError: a leaf that is neither an array, a tensor nor a number.
    """
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch tensor
        return obj.detach().cpu().numpy()
    if isinstance(obj, (int, float, bool, np.number)):
        return np.asarray(obj)
    raise ConfigError(f"model inputs and outputs must be arrays or tensors (nested), got {type(obj).__name__}")


def _to_torch(obj: Any, device: "torch.device | str" = "cpu") -> Any:
    import torch

    if isinstance(obj, np.ndarray):
        if not obj.flags.writeable:
            obj = obj.copy()  # torch.from_numpy warns on read-only memory
        return torch.from_numpy(obj).to(device, non_blocking=True)
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_torch(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(v, device) for v in obj)
    return obj


@dataclass(frozen=True)
class ModelSpec:
    """What the exported model takes and returns.

    Attributes:
        inputs: template node of ``(args, kwargs)`` as one tuple.
        outputs: template node of the model's output.
        param_names: state-dict keys the weights must provide.
        has_torch / has_onnx: which exports exist in the directory.
        onnx_input_names / onnx_output_names: the ONNX graph's data inputs / outputs,
            in leaf order.
    """

    inputs: dict[str, Any]
    outputs: dict[str, Any]
    param_names: tuple[str, ...]
    has_torch: bool
    has_onnx: bool
    onnx_input_names: tuple[str, ...] = ()
    onnx_output_names: tuple[str, ...] = ()
    param_shapes: Mapping[str, tuple[int, ...]] | None = None

    @cached_property
    def input_leaves(self) -> list[Mapping[str, Any]]:
        return _leaf_nodes(self.inputs)

    @cached_property
    def output_leaves(self) -> list[Mapping[str, Any]]:
        return _leaf_nodes(self.outputs)

    def build_inputs(self, leaves: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Flat input leaves (any array type) -> ``(args, kwargs)`` in the model's structure."""
        args, kwargs = _build(self.inputs, iter(leaves))
        return tuple(args), dict(kwargs)

    def build_outputs(self, leaves: Sequence[Any]) -> Any:
        """Flat output leaves -> the model's output structure."""
        return _build(self.outputs, iter(leaves))

    def check_inputs(self, leaves: Sequence[np.ndarray]) -> int:
        """Check flat inputs against the spec and return their batch size.

        Raises:
            InputError: wrong count, per-sample shape, or unequal batch sizes.
        """
        expected = self.input_leaves
        if len(leaves) != len(expected):
            raise InputError(
                f"the model takes {len(expected)} input array(s) {describe_inputs(self)}, got {len(leaves)}"
            )
        batch = None
        for i, (arr, node) in enumerate(zip(leaves, expected)):
            want = tuple(node["shape"])
            if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != want:
                raise InputError(
                    f"input {i} has shape {list(arr.shape)}, expected [batch, {', '.join(map(str, want))}]"
                    .replace(", ]", "]")
                )
            if batch is None:
                batch = arr.shape[0]
            elif arr.shape[0] != batch:
                raise InputError(f"inputs disagree on the batch size: input 0 has {batch}, input {i} has {arr.shape[0]}")
        return int(batch or 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "param_names": list(self.param_names),
            "has_torch": self.has_torch,
            "has_onnx": self.has_onnx,
            "onnx_input_names": list(self.onnx_input_names),
            "onnx_output_names": list(self.onnx_output_names),
            "param_shapes": {k: list(v) for k, v in (self.param_shapes or {}).items()},
        }


def describe_inputs(spec: ModelSpec) -> str:
    """``[float32[batch,64], ...]`` for error messages."""
    parts = [f"{n['dtype']}[batch{''.join(',' + str(d) for d in n['shape'])}]" for n in spec.input_leaves]
    return "[" + ", ".join(parts) + "]"


def load_spec(export_dir: str | os.PathLike[str]) -> ModelSpec:
    """Read ``spec.json`` from an export directory.

    Raises:
        EngineError: the directory has no export or an unreadable one.
    """
    path = Path(export_dir) / SPEC_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise EngineError(
            f"no exported model at {path.parent}; publish the model once with its forward_args "
            "(bray.RemoteModel(name, model=..., forward_args=...)) so the server can rebuild it"
        ) from err
    except (OSError, ValueError) as err:
        raise EngineError(f"cannot read the model spec {path}: {err}") from err
    if raw.get("format") != SPEC_FORMAT:
        raise EngineError(f"{path} has spec format {raw.get('format')!r}; this bray-serve reads format {SPEC_FORMAT}")
    return ModelSpec(
        inputs=raw["inputs"],
        outputs=raw["outputs"],
        param_names=tuple(raw["param_names"]),
        has_torch=bool(raw["has_torch"]),
        has_onnx=bool(raw["has_onnx"]),
        onnx_input_names=tuple(raw.get("onnx_input_names", ())),
        onnx_output_names=tuple(raw.get("onnx_output_names", ())),
        param_shapes={k: tuple(v) for k, v in raw.get("param_shapes", {}).items()} or None,
    )


def _example_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Repeat a batch of one to two samples: torch.export specializes size-1 dimensions."""
    import torch
    from torch.utils import _pytree as pytree

    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if leaves and all(t.ndim >= 1 and t.shape[0] == 1 for t in leaves):
        return pytree.tree_map(lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) else t, (args, kwargs))
    return args, kwargs


def export_model(
    model: "torch.nn.Module",
    forward_args: Sequence[Any],
    forward_kwargs: Mapping[str, Any] | None = None,
    *,
    dest: str | os.PathLike[str],
    onnx: bool = True,
) -> ModelSpec:
    """Export ``model`` for serving into ``dest`` (replacing what was there, atomically).

    Args:
        model: the policy network; put in eval mode for the export.
        forward_args: example positional inputs (tensors or arrays, nested), with a batch dim.
        forward_kwargs: example keyword inputs.
        dest: the export directory (``<store>/<name>/export``).
        onnx: also write ``model.onnx`` (needs the ``onnx`` extra).

    Returns:
        The spec written to ``dest/spec.json``.

    Raises:
        ConfigError: inputs without a batch dimension or of unsupported types.
        EngineError: torch.export or the ONNX exporter failed (the message says which).
        EngineUnavailableError: ``onnx=True`` without the ONNX exporter installed.
    """
    import torch
    from torch.utils import _pytree as pytree

    kwargs = dict(forward_kwargs or {})
    args = tuple(_to_torch(to_numpy(a)) if not isinstance(a, torch.Tensor) else a for a in forward_args)
    kwargs = {k: (_to_torch(to_numpy(v)) if not isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    args, kwargs = _example_batch(args, kwargs)
    was_training = model.training
    model.eval()
    try:
        in_node = _node_of(to_numpy((tuple(args), kwargs)), batched=True)  # checks batch dims first
        with torch.no_grad():
            example_out = model(*args, **kwargs)
        out_node = _node_of(to_numpy(example_out), batched=True)

        batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
        dyn = pytree.tree_map(lambda t: {0: batch} if isinstance(t, torch.Tensor) else None, (args, kwargs))
        final = Path(dest)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=final.parent))
        try:
            try:
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=_dyn_for(model, args, kwargs, dyn))
            except Exception as err:  # torch raises many types here; say what failed
                raise EngineError(f"torch.export could not export {type(model).__name__} with a dynamic batch dimension: {err}") from err
            torch.export.save(ep, str(tmp / TORCH_FILE))
            onnx_in: tuple[str, ...] = ()
            onnx_out: tuple[str, ...] = ()
            if onnx:
                onnx_in, onnx_out = _export_onnx(model, args, kwargs, _dyn_for(model, args, kwargs, dyn), tmp / ONNX_FILE)
            spec = ModelSpec(
                inputs=in_node,
                outputs=out_node,
                param_names=tuple(model.state_dict().keys()),
                param_shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
                has_torch=True,
                has_onnx=onnx,
                onnx_input_names=onnx_in,
                onnx_output_names=onnx_out,
            )
            (tmp / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=1))
            _replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return spec
    finally:
        model.train(was_training)


def _dyn_for(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], dyn: tuple[Any, Any]) -> Any:
    """dynamic_shapes keyed by forward's parameter names (works for args and kwargs alike)."""
    import inspect

    args_dyn, kwargs_dyn = dyn
    if not kwargs_dyn:
        return tuple(args_dyn)
    bound = inspect.signature(model.forward).bind(*args_dyn, **kwargs_dyn)
    return dict(bound.arguments)


def _export_onnx(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], dyn: Any, path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    import torch

    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise EngineUnavailableError(
            "exporting to ONNX needs onnx and onnxscript; pip install 'bray-serve[onnx]'"
        ) from err
    try:
        # optimize=False keeps every weight as an initializer named by its state-dict
        # key, so new weights can replace initializers without a new export.
        program = torch.onnx.export(
            model, args, kwargs=kwargs or None, dynamic_shapes=dyn, dynamo=True,
            optimize=False, verbose=False,
        )
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(path))
    except Exception as err:
        raise EngineError(f"ONNX export of {type(model).__name__} failed: {err}; serve it with engine='torch'") from err
    import onnx as _onnx

    graph = _onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    ins = tuple(i.name for i in graph.input if i.name not in inits)
    outs = tuple(o.name for o in graph.output)
    return ins, outs


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an old ``final`` is moved aside first, then removed."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}-old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_torch_module(export_dir: str | os.PathLike[str]) -> "torch.nn.Module":
    """Rebuild the exported module (``model.pt2``); its weights are those of the export.

    Raises:
        EngineError: no torch export in the directory, or it does not load.
    """
    import torch

    path = Path(export_dir) / TORCH_FILE
    if not path.is_file():
        raise EngineError(f"no torch export at {path}; re-export the model (RemoteModel with model=...)")
    try:
        with _LOAD_LOCK:  # torch.export.load keeps global deserializer state
            # torch.export.load retries a failed weights-only unpickle with full pickle;
            # a tampered model.pt2 must not run code in a worker, so force weights-only.
            saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
            try:
                module = torch.export.load(str(path)).module()
            finally:
                if saved is None:
                    os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
                else:
                    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved
        # The exported module re-checks every input's shape in a forward pre-hook (about
        # 20 us of a 55 us batch-1 forward of the policy MLP); every caller of this module
        # has checked the inputs against spec.json already (handlers/request.py).
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
                del module._forward_pre_hooks[key]
        return module
    except Exception as err:
        raise EngineError(f"cannot load the torch export {path}: {err}") from err
