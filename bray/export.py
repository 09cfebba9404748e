"""The model definition the server rebuilds without the trainer's source code.

A trainer exports its module once, from ``forward_args`` (and ``forward_kwargs``):
``torch.export`` with a dynamic batch dimension (``model.pt2``), and, when asked, ONNX
from the same example inputs (``model.onnx``). ``spec.json`` records the input and
output structure (a NestedArray template: containers, dtypes, per-sample shapes) so the
handler can check requests before running anything, and can rebuild nested outputs
from an engine's flat list. The spec comes from running the module once on the example
inputs, not from the trace, so every module has one.

When ``torch.export`` refuses the module (data-dependent control flow such as
``if x.sum() > 0``), the torch engine serves it *eagerly*, as TorchServe's own eager
mode does: ``eager.json`` records the module's class as an importable
``"module:qualname"`` and its constructor's keyword arguments, and the server rebuilds
it with :mod:`importlib`, ``cls(**kwargs)`` and the step's safetensors weights. Nothing
is pickled. The constructor arguments are recorded by one convention: a module whose
constructor takes arguments sets ``self.bray_init_kwargs = {...}`` (JSON values only);
without it the class is built with no arguments. Both are checked at export time by
building the module that way and comparing its state-dict keys and shapes with the
given one's. The server's workers then need the class's module importable (installed,
or on the ``PYTHONPATH`` TorchServe is started with).

The export lives beside the checkpoint store (``<store>/<name>/export/``); from then on
only weights are published. Writing the export is atomic (temp dir + rename).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from bray import tree
from bray.errors import ConfigError, EngineError, EngineUnavailableError, InputError
from bray.store import EXPORT_DIRNAME, SPEC_FILE
from bray.tree import TreeDef

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "EAGER_FILE",
    "EXPORT_DIRNAME",
    "INIT_KWARGS_ATTR",
    "LeafSpec",
    "ModelSpec",
    "eager_definition",
    "export_model",
    "load_spec",
    "load_torch_module",
    "to_numpy",
]

TORCH_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
EAGER_FILE = "eager.json"
#: The attribute a module sets to record its constructor's keyword arguments (JSON values).
INIT_KWARGS_ATTR = "bray_init_kwargs"
#: What :func:`export_model` does when ``torch.export`` refuses the module.
FALLBACKS = ("eager", "local", "none")
SPEC_FORMAT = 2
_MAX_BATCH = 1 << 20
_LOAD_LOCK = threading.Lock()

log = logging.getLogger(__name__)


# --- structure ---------------------------------------------------------------------
# spec.json keeps each side as {"tree": <bray.tree JSON form>, "leaves": [{"dtype":
# "float32", "shape": [64]}, ...]}: the containers once, then each leaf's dtype and
# per-sample shape (batch dimension excluded), in bray.tree's leaf order.


@dataclass(frozen=True)
class LeafSpec:
    """One array of a model's inputs or outputs: dtype name and per-sample shape."""

    dtype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        """``float32[batch,64]``."""
        return f"{self.dtype}[batch{''.join(',' + str(d) for d in self.shape)}]"


def _describe_batched(obj: Any) -> tuple[TreeDef, tuple[LeafSpec, ...]]:
    flat, treedef = tree.flatten(obj, error=ConfigError)
    leaves = []
    for path, arr in zip(treedef.paths(), flat):
        if not isinstance(arr, np.ndarray):
            raise ConfigError(f"expected a NestedArray (ndarray, list, tuple, dict), got {type(arr).__name__} at {path}")
        if arr.ndim == 0:
            raise ConfigError(
                f"every input and output needs a leading batch dimension, got a 0-d array at {path}; "
                "give forward_args with shape (batch, ...)"
            )
        leaves.append(LeafSpec(arr.dtype.name, tuple(arr.shape[1:])))
    return treedef, tuple(leaves)


def _side_json(treedef: TreeDef, leaves: Sequence[LeafSpec]) -> dict[str, Any]:
    return {"tree": treedef.to_json(), "leaves": [{"dtype": x.dtype, "shape": list(x.shape)} for x in leaves]}


def _side_from_json(raw: Mapping[str, Any]) -> tuple[TreeDef, tuple[LeafSpec, ...]]:
    treedef = TreeDef.from_json(raw["tree"], error=EngineError)
    leaves = tuple(LeafSpec(str(x["dtype"]), tuple(int(d) for d in x["shape"])) for x in raw["leaves"])
    if len(leaves) != treedef.num_leaves:
        raise EngineError(f"spec.json lists {len(leaves)} leaves for a tree of {treedef.num_leaves}")
    return treedef, leaves


def _side_from_v1(node: Mapping[str, Any], leaves: list[LeafSpec]) -> TreeDef:
    """Format 1 nodes ({"k": "a"|"list"|"tuple"|"dict", ...}), as bray-serve 0.1 wrote them."""
    if node["k"] == "a":
        leaves.append(LeafSpec(node["dtype"], tuple(node["shape"])))
        return tree.LEAF
    children = tuple(_side_from_v1(n, leaves) for n in node["items"])
    return TreeDef(node["k"], children, tuple(node.get("keys", ())))


def _leaf_to_numpy(obj: Any) -> np.ndarray:
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch tensor
        return obj.detach().cpu().numpy()  # type: ignore[no-any-return]
    if isinstance(obj, (int, float, bool, np.number)):
        return np.asarray(obj)
    raise ConfigError(f"model inputs and outputs must be arrays or tensors (nested), got {type(obj).__name__}")


def to_numpy(obj: Any) -> Any:
    """Tensors (nested in lists, tuples, dicts) to numpy arrays; numbers to 0-d arrays.

    Duck-typed on ``.detach()``/``.numpy()`` so it never imports torch itself.

    Raises:
        ConfigError: a leaf that is neither an array, a tensor nor a number.
    """
    if isinstance(obj, np.ndarray):
        return obj
    flat, treedef = tree.flatten(obj, error=ConfigError)
    return treedef.unflatten([_leaf_to_numpy(x) for x in flat])


def _to_torch(obj: Any, device: "torch.device | str" = "cpu") -> Any:
    import torch

    def leaf(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            if not x.flags.writeable:
                x = x.copy()  # torch.from_numpy warns on read-only memory
            return torch.from_numpy(x).to(device, non_blocking=True)
        if isinstance(x, torch.Tensor):
            return x.to(device)
        return x

    return tree.map_leaves(leaf, obj)


@dataclass(frozen=True)
class ModelSpec:
    """What the exported model takes and returns.

    Attributes:
        inputs: the tree of ``(args, kwargs)`` as one tuple.
        input_leaves: each input array's dtype and per-sample shape, in leaf order.
        outputs: the tree of the model's output.
        output_leaves: each output array's dtype and per-sample shape.
        param_names: state-dict keys the weights must provide.
        has_torch / has_onnx: which exports exist in the directory.
        has_eager: ``eager.json`` holds the module's class and constructor arguments
            (``torch.export`` refused the module; the torch engine rebuilds it).
        onnx_input_names / onnx_output_names: the ONNX graph's data inputs / outputs,
            in leaf order.
    """

    inputs: TreeDef
    input_leaves: tuple[LeafSpec, ...]
    outputs: TreeDef
    output_leaves: tuple[LeafSpec, ...]
    param_names: tuple[str, ...]
    has_torch: bool
    has_onnx: bool
    onnx_input_names: tuple[str, ...] = ()
    onnx_output_names: tuple[str, ...] = ()
    param_shapes: Mapping[str, tuple[int, ...]] | None = None
    has_eager: bool = False

    @property
    def args_tree(self) -> TreeDef:
        """The tree of the positional inputs (a tuple)."""
        return self.inputs.children[0]

    @property
    def kwargs_tree(self) -> TreeDef:
        """The tree of the keyword inputs (a dict)."""
        return self.inputs.children[1]

    def build_inputs(self, leaves: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Flat input leaves (any array type) -> ``(args, kwargs)`` in the model's structure."""
        args, kwargs = self.inputs.unflatten(leaves)
        return tuple(args), dict(kwargs)

    def build_outputs(self, leaves: Sequence[Any]) -> Any:
        """Flat output leaves -> the model's output structure."""
        return self.outputs.unflatten(leaves)

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
        for i, (arr, want) in enumerate(zip(leaves, expected)):
            if arr.ndim != len(want.shape) + 1 or tuple(arr.shape[1:]) != want.shape:
                raise InputError(
                    f"input {i} has shape {list(arr.shape)}, expected [batch, {', '.join(map(str, want.shape))}]"
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
            "inputs": _side_json(self.inputs, self.input_leaves),
            "outputs": _side_json(self.outputs, self.output_leaves),
            "param_names": list(self.param_names),
            "has_torch": self.has_torch,
            "has_onnx": self.has_onnx,
            "has_eager": self.has_eager,
            "onnx_input_names": list(self.onnx_input_names),
            "onnx_output_names": list(self.onnx_output_names),
            "param_shapes": {k: list(v) for k, v in (self.param_shapes or {}).items()},
        }


def describe_inputs(spec: ModelSpec) -> str:
    """``[float32[batch,64], ...]`` for error messages."""
    return "[" + ", ".join(x.describe() for x in spec.input_leaves) + "]"


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
    version = raw.get("format")
    if version not in (1, SPEC_FORMAT):
        raise EngineError(f"{path} has spec format {version!r}; this bray-serve reads formats 1 and {SPEC_FORMAT}")
    try:
        if version == 1:  # bray-serve 0.1's template nodes
            in_leaves: list[LeafSpec] = []
            out_leaves: list[LeafSpec] = []
            sides = ((_side_from_v1(raw["inputs"], in_leaves), tuple(in_leaves)),
                     (_side_from_v1(raw["outputs"], out_leaves), tuple(out_leaves)))
        else:
            sides = (_side_from_json(raw["inputs"]), _side_from_json(raw["outputs"]))
    except (KeyError, TypeError, ValueError) as err:
        raise EngineError(f"{path} is not a valid model spec ({type(err).__name__}: {err}); re-export the model") from err
    (inputs, input_leaves), (outputs, output_leaves) = sides
    return ModelSpec(
        inputs=inputs,
        input_leaves=input_leaves,
        outputs=outputs,
        output_leaves=output_leaves,
        param_names=tuple(raw["param_names"]),
        has_torch=bool(raw["has_torch"]),
        has_onnx=bool(raw["has_onnx"]),
        has_eager=bool(raw.get("has_eager", False)),
        onnx_input_names=tuple(raw.get("onnx_input_names", ())),
        onnx_output_names=tuple(raw.get("onnx_output_names", ())),
        param_shapes={k: tuple(v) for k, v in raw.get("param_shapes", {}).items()} or None,
    )


def _example_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Repeat a batch of one to two samples: torch.export specializes size-1 dimensions."""
    import torch

    leaves = [x for x in tree.leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if leaves and all(t.ndim >= 1 and t.shape[0] == 1 for t in leaves):
        return tree.map_leaves(lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) else t, (args, kwargs))  # type: ignore[no-any-return]
    return args, kwargs


def export_model(
    model: "torch.nn.Module",
    forward_args: Sequence[Any],
    forward_kwargs: Mapping[str, Any] | None = None,
    *,
    dest: str | os.PathLike[str],
    onnx: bool = True,
    fallback: str = "eager",
) -> ModelSpec:
    """Export ``model`` for serving into ``dest`` (replacing what was there, atomically).

    Args:
        model: the policy network; put in eval mode for the export.
        forward_args: example positional inputs (tensors or arrays, nested), with a batch dim.
        forward_kwargs: example keyword inputs.
        dest: the export directory (``<store>/<name>/export``).
        onnx: also write ``model.onnx`` (needs the ``onnx`` extra).
        fallback: what happens when ``torch.export`` refuses the module (data-dependent
            control flow): ``"eager"`` records the module's class and constructor
            arguments in ``eager.json`` for the torch engine to rebuild (see the module
            docstring), or raises ConfigError when a server could not rebuild it;
            ``"local"`` the same, but a class a server could not rebuild leaves
            ``spec.json`` alone, for local mode, which runs the given module itself;
            ``"none"`` raises EngineError. The failure and the fallback are logged in
            one line. With ``onnx=True`` a refused module always raises: ONNX needs the graph.

    Returns:
        The spec written to ``dest/spec.json``.

    Raises:
        ConfigError: inputs without a batch dimension or of unsupported types; an unknown
            ``fallback``; a module ``torch.export`` refused whose class a server could
            not rebuild (``fallback="eager"``; the message says what to change).
        EngineError: torch.export refused the module and ONNX was asked for (or
            ``fallback="none"``), or the ONNX exporter failed (the message says which).
        EngineUnavailableError: ``onnx=True`` without the ONNX exporter installed.
    """
    import torch

    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
    kwargs = dict(forward_kwargs or {})
    args = tuple(_to_torch(to_numpy(a)) if not isinstance(a, torch.Tensor) else a for a in forward_args)
    kwargs = {k: (_to_torch(to_numpy(v)) if not isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    args, kwargs = _example_batch(args, kwargs)
    was_training = model.training
    model.eval()
    try:
        # The spec comes from running the module once, so every module has one, exported or not.
        inputs, input_leaves = _describe_batched(to_numpy((tuple(args), kwargs)))  # checks batch dims first
        with torch.no_grad():
            example_out = model(*args, **kwargs)
        outputs, output_leaves = _describe_batched(to_numpy(example_out))

        batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
        dyn = tree.map_leaves(lambda t: {0: batch} if isinstance(t, torch.Tensor) else None, (args, kwargs))
        final = Path(dest)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=final.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700: servers running as another user read the store
        try:
            has_torch = has_eager = False
            onnx_in: tuple[str, ...] = ()
            onnx_out: tuple[str, ...] = ()
            try:
                ep = _torch_export(model, args, kwargs, _dyn_for(model, args, kwargs, dyn))
            except Exception as err:  # torch raises many types here; say what failed, in one line
                has_eager = _not_exportable(model, err, tmp / EAGER_FILE, onnx=onnx, fallback=fallback)
            else:
                torch.export.save(ep, str(tmp / TORCH_FILE))
                has_torch = True
                if onnx:
                    onnx_in, onnx_out = _export_onnx(model, args, kwargs, _dyn_for(model, args, kwargs, dyn), tmp / ONNX_FILE)
            spec = ModelSpec(
                inputs=inputs,
                input_leaves=input_leaves,
                outputs=outputs,
                output_leaves=output_leaves,
                param_names=tuple(model.state_dict().keys()),
                param_shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
                has_torch=has_torch,
                has_onnx=has_torch and onnx,
                has_eager=has_eager,
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


def _torch_export(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any) -> Any:
    """``torch.export.export``, without the partial graph torch prints to stderr when it fails.

    torch 2.x prints a failed trace's partial FX graph to ``sys.stderr`` itself
    (``torch/export/_trace.py``) and logs a multi-line warning from its symbolic-shapes
    module; :func:`_not_exportable` says what failed in one line instead. Everything
    else written to stderr meanwhile is passed on.
    """
    import contextlib
    import io
    import sys

    import torch

    captured = io.StringIO()
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    partial = None
    try:
        with contextlib.redirect_stderr(captured):
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    except Exception as err:
        partial = getattr(err, "partial_fx_graph", None)
        raise
    finally:
        shapes_log.setLevel(level)
        text = captured.getvalue()
        if partial is not None:
            text = text.replace(f"{partial}\n", "")  # printed once per nested wrapper
        if text:
            sys.stderr.write(text)


def _one_line(err: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, cut at ``limit`` characters."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _not_exportable(model: Any, err: Exception, path: Path, *, onnx: bool, fallback: str) -> bool:
    """torch.export refused ``model``: write its eager definition to ``path``, or raise.

    Returns:
        True with ``eager.json`` written; False for a spec-only export (``fallback="local"``
        and a class a server could not rebuild).
    """
    what = f"torch.export could not export {type(model).__name__} with a dynamic batch dimension ({_one_line(err)})"
    log.debug("bray: %s", what, exc_info=err)  # the whole trace, for whoever turns debug logging on
    if onnx:
        raise EngineError(
            f"{what}; the onnx and tensorrt engines run an exported graph, which this module has none of: "
            "serve it with the torch engine (RemoteModel without use_onnx/use_tensorrt, --engine torch), "
            "which runs it eagerly"
        ) from None
    if fallback == "none":
        raise EngineError(f"{what}; export with fallback='eager' to serve the module eagerly from its class") from None
    try:
        definition = eager_definition(model)
    except ConfigError as why:
        if fallback == "eager":
            raise ConfigError(f"{what}, and a server cannot rebuild it eagerly instead: {why}") from None
        log.warning("bray: %s; running it in this process only (local mode), since a server could not rebuild it: %s",
                    what, why)
        return False
    path.write_text(json.dumps(definition, indent=1))
    log.warning("bray: %s; serving it eagerly instead: the torch engine rebuilds %s(**%s) and loads the weights "
                "(a server's workers must import %s; nothing is pickled)", what, definition["class"],
                json.dumps(definition["kwargs"]), definition["class"].split(":")[0])
    return True


def _resolve(where: str) -> Any:
    """The object ``"module:qualname"`` names, imported.

    Raises:
        ImportError, AttributeError: it cannot be imported.
        ValueError: ``where`` is not ``module:qualname``.
    """
    import importlib

    module, sep, qualname = where.partition(":")
    if not (sep and module and qualname):
        raise ValueError(f"expected 'module:qualname', got {where!r}")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def eager_definition(model: "torch.nn.Module") -> dict[str, Any]:
    """What a server needs to rebuild ``model`` without pickle: its class and constructor arguments.

    The class is recorded as ``"module:qualname"`` and must import back to the same
    class; the keyword arguments are ``model.bray_init_kwargs`` (JSON values only), or
    none. Building the class with them must give the state-dict keys and shapes of
    ``model`` (checked here, on the meta device where the constructor allows it).

    Returns:
        ``{"class": "module:qualname", "kwargs": {...}}``, what ``eager.json`` holds.

    Raises:
        ConfigError: the class cannot be imported by another process (defined in
            ``__main__`` or inside a function), its arguments are not JSON values, or
            the rebuilt module's weights differ (the message says what to change).
    """
    import torch

    cls = type(model)
    where = f"{cls.__module__}:{cls.__qualname__}"
    move = ("move the class into a module the server's workers can import (installed in their environment, "
            "or on the PYTHONPATH torchserve is started with)")
    if cls.__module__ == "__main__":
        raise ConfigError(f"{cls.__qualname__} is defined in __main__ (the script being run), "
                          f"which another process cannot import; {move}")
    if "<locals>" in cls.__qualname__:
        raise ConfigError(f"{where} is defined inside a function, which another process cannot import; {move}")
    try:
        found = _resolve(where)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{where} does not import back ({_one_line(err)}); {move}") from None
    if found is not cls:
        raise ConfigError(f"{where} imports as another object than the model's class (was it redefined or "
                          f"reloaded?); {move}")
    kwargs = getattr(model, INIT_KWARGS_ATTR, None)
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"{cls.__qualname__}.{INIT_KWARGS_ATTR} must be a dict of the constructor's keyword "
                          f"arguments, got {type(kwargs).__name__}")
    try:
        json_ok = json.loads(json.dumps(kwargs, allow_nan=False)) == kwargs
    except (TypeError, ValueError):
        json_ok = False
    if not json_ok:
        raise ConfigError(f"{cls.__qualname__}.{INIT_KWARGS_ATTR} must hold JSON values only (str, int, float, "
                          f"bool, None, lists, dicts with str keys; lists, not tuples) so that no pickle is "
                          f"needed, got {kwargs!r:.200}")
    try:
        try:
            with torch.device("meta"):  # checks shapes without allocating a second copy of the weights
                rebuilt = cls(**kwargs)
        except Exception:  # some constructors compute on their tensors: build it for real
            rebuilt = cls(**kwargs)
    except Exception as err:
        raise ConfigError(f"{where}(**{kwargs}) fails ({_one_line(err)}), which is how a server builds the model; "
                          f"set {INIT_KWARGS_ATTR} = {{...}} on the module to its constructor's keyword arguments") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        key = next((k for k in want if want[k] != got.get(k)), None) or next(k for k in got if k not in want)
        raise ConfigError(
            f"{where}(**{kwargs}) builds weights that differ from the model's ({key!r}: "
            f"{list(got[key]) if key in got else 'missing'}, the model has {list(want[key]) if key in want else 'none'}); "
            f"set {INIT_KWARGS_ATTR} = {{...}} on the module to the keyword arguments it was built with (JSON values)"
        )
    return {"class": where, "kwargs": kwargs}


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
    """Rebuild the exported module: ``model.pt2``, or the class ``eager.json`` names.

    The weights are the export's own (``model.pt2``) or the constructor's (eager, in
    eval mode); callers load a step's weights into it.

    Raises:
        EngineError: no torch export in the directory, or it does not load; an eager
            class that does not import here (the message says what to make importable).
    """
    import torch

    path = Path(export_dir) / TORCH_FILE
    if not path.is_file():
        if (Path(export_dir) / EAGER_FILE).is_file():
            return _load_eager(Path(export_dir) / EAGER_FILE)
        if (Path(export_dir) / SPEC_FILE).is_file():
            raise EngineError(
                f"the model at {path.parent} has no {TORCH_FILE} and no {EAGER_FILE}: torch.export refused it and "
                "its class could not be recorded for rebuilding (see the warning logged when it was created), so "
                "only RemoteModel(..., model=..., local_mode=True) runs it; move its class into an importable "
                "module and create the model again"
            )
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
        # torch 2.9+ also calls the same checks as a graph node (``_guards_fn``): another
        # 6-12 us of a 40 us batch-1 forward (issue 24), for the same reason not needed.
        guards = [n for n in module.graph.nodes if n.op == "call_module" and n.target == "_guards_fn" and not n.users]
        for node in guards:
            module.graph.erase_node(node)
        if guards:
            module.recompile()
        return module
    except Exception as err:
        raise EngineError(f"cannot load the torch export {path}: {err}") from err


def _load_eager(path: Path) -> "torch.nn.Module":
    """``cls(**kwargs)`` from ``eager.json``: an importable ``torch.nn.Module`` class and JSON arguments."""
    import torch

    try:
        raw = json.loads(path.read_text())
        where, kwargs = str(raw["class"]), raw["kwargs"]
        if not isinstance(kwargs, dict):
            raise TypeError(f"kwargs is a {type(kwargs).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EngineError(f"cannot read the eager model definition {path} ({_one_line(err)}); "
                          "create the model again (RemoteModel with model=...)") from err
    module_name = where.partition(":")[0]
    try:
        cls = _resolve(where)
    except (ImportError, AttributeError, ValueError) as err:
        raise EngineError(
            f"the model is served eagerly from its class {where}, which does not import here ({_one_line(err)}); "
            f"make {module_name} importable by this process (install it, or add its folder to PYTHONPATH; for "
            "TorchServe, in the environment torchserve is started from)"
        ) from err
    # Only a module class is called: eager.json must not be a way to call any importable function.
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise EngineError(f"{path} names {where}, which is not a torch.nn.Module class; refusing to build it "
                          "(create the model again)")
    try:
        module: torch.nn.Module = cls(**kwargs)
    except Exception as err:
        raise EngineError(f"building {where}(**{kwargs}) from {path} failed: {_one_line(err)}") from err
    return module.eval()
