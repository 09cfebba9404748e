"""Request bodies to model inputs, model outputs to response bodies.

A request body is either the binary NestedArray form (``bray.wire``) or JSON. Its
payload is either ``{"args": [...], "kwargs": {...}}`` (what ``RemoteModel`` sends) or,
for a model with one positional input, that input alone (so ``curl -d '[[0.1, ...]]'``
works). Every leaf carries a leading batch dimension. JSON is read *against the model's
spec*, so nested lists become arrays of the spec's dtype and shape, never guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from bray import wire
from bray.errors import InputError, WireError
from bray.export import ModelSpec, describe_inputs

__all__ = ["Parsed", "check_leaves", "encode_outputs", "parse_payload", "parse_request", "split_outputs"]


@dataclass(frozen=True)
class Parsed:
    """One request, decoded and checked: flat input leaves, its batch size, its wire form."""

    leaves: list[np.ndarray]
    batch: int
    binary: bool


def _json_to_node(obj: Any, node: Mapping[str, Any], where: str) -> Any:
    kind = node["k"]
    if kind == "a":
        if isinstance(obj, (str, bytes)) or obj is None or isinstance(obj, dict):
            raise InputError(f"{where}: expected numbers (nested lists of {node['dtype']}), got {type(obj).__name__}")
        try:
            arr = np.asarray(obj)
        except ValueError as err:
            raise InputError(f"{where}: ragged nested lists; expected a rectangular array [batch, {', '.join(map(str, node['shape']))}]") from err
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{where}: expected numbers of dtype {node['dtype']}, got values of kind {arr.dtype.name!r}")
        return arr.astype(node["dtype"], copy=False)
    if kind == "dict":
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected an object with keys {node['keys']}, got {type(obj).__name__}")
        if list(obj) != node["keys"] and set(obj) != set(node["keys"]):
            raise InputError(f"{where}: expected keys {node['keys']}, got {sorted(obj)}")
        return {k: _json_to_node(obj[k], n, f"{where}.{k}") for k, n in zip(node["keys"], node["items"])}
    if not isinstance(obj, list) or len(obj) != len(node["items"]):
        got = f"a list of {len(obj)}" if isinstance(obj, list) else type(obj).__name__
        raise InputError(f"{where}: expected a list of {len(node['items'])} item(s), got {got}")
    items = [_json_to_node(o, n, f"{where}[{i}]") for i, (o, n) in enumerate(zip(obj, node["items"]))]
    return tuple(items) if kind == "tuple" else items


def _split_payload(payload: Any, spec: ModelSpec) -> tuple[Any, Any]:
    """``{"args", "kwargs"}`` form, or the lone positional input."""
    if isinstance(payload, dict) and payload and set(payload) <= {"args", "kwargs"}:
        return payload.get("args", []), payload.get("kwargs", {})
    args_node, kwargs_node = spec.inputs["items"]
    if len(args_node["items"]) == 1 and not kwargs_node["items"]:
        return [payload], {}
    raise InputError(
        f"the model takes {len(args_node['items'])} positional and {len(kwargs_node['items'])} keyword "
        'input(s); send {"args": [...], "kwargs": {...}}'
    )


def _check_structure(value: Any, node: Mapping[str, Any], where: str) -> None:
    kind = node["k"]
    if kind == "a":
        if not isinstance(value, np.ndarray):
            raise InputError(f"{where}: expected an array, got {type(value).__name__}")
        return
    if kind == "dict":
        if not isinstance(value, dict) or set(value) != set(node["keys"]):
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise InputError(f"{where}: expected a dict with keys {node['keys']}, got {got}")
        for k, n in zip(node["keys"], node["items"]):
            _check_structure(value[k], n, f"{where}.{k}")
        return
    if not isinstance(value, (list, tuple)) or len(value) != len(node["items"]):
        got = f"{len(value)} item(s)" if isinstance(value, (list, tuple)) else type(value).__name__
        raise InputError(f"{where}: expected {len(node['items'])} item(s), got {got}")
    for i, (v, n) in enumerate(zip(value, node["items"])):
        _check_structure(v, n, f"{where}[{i}]")


def _ordered(value: Any, node: Mapping[str, Any]) -> list[np.ndarray]:
    """Leaves in the spec's order (dict keys as the model declared them)."""
    if node["k"] == "a":
        return [value]
    if node["k"] == "dict":
        return [leaf for k, n in zip(node["keys"], node["items"]) for leaf in _ordered(value[k], n)]
    return [leaf for v, n in zip(value, node["items"]) for leaf in _ordered(v, n)]


def parse_request(body: Any, spec: ModelSpec, *, limits: wire.WireLimits, reject_nonfinite: bool = False) -> Parsed:
    """Decode one TorchServe request body and check it against the model's spec.

    Args:
        body: what TorchServe hands over: ``bytearray`` (binary or unparsed JSON),
            ``str``, or already-parsed JSON (dict / list / number).
        spec: the model's input spec.
        limits: size limits for the binary form.
        reject_nonfinite: refuse NaN and infinity.

    Returns:
        The decoded request.

    Raises:
        InputError: the inputs do not fit the model (the message says what it takes).
        WireError: the body cannot be decoded at all.
    """
    if body is None or (isinstance(body, (bytes, bytearray, str)) and len(body) == 0):
        raise InputError(f"empty request body; send the model's inputs {describe_inputs(spec)} as binary NestedArray or JSON")
    binary = False
    if isinstance(body, (bytes, bytearray, memoryview)):
        if wire.is_binary(body):
            binary = True
            payload = wire.decode(body, limits=limits)
        else:
            try:
                payload = json.loads(bytes(body))
            except (UnicodeDecodeError, ValueError, RecursionError) as err:
                raise WireError(
                    "the body is neither a binary NestedArray (bray.wire) nor JSON; "
                    "send Content-Type application/octet-stream with bray.wire.encode(...) or application/json"
                ) from err
    elif isinstance(body, str):
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as err:
            raise WireError(f"the body is not valid JSON: {err}") from err
    else:
        payload = body
    return parse_payload(payload, spec, binary=binary, reject_nonfinite=reject_nonfinite)


def parse_payload(payload: Any, spec: ModelSpec, *, binary: bool, reject_nonfinite: bool = False) -> Parsed:
    """Check an already-decoded payload against the spec.

    Args:
        payload: ``{"args": [...], "kwargs": {...}}`` or the lone positional input.
        spec: the model's input spec.
        binary: ``True``: leaves are ndarrays whose dtypes must match exactly (the binary
            form, and local mode); ``False``: leaves are JSON lists, cast to the spec.
        reject_nonfinite: refuse NaN and infinity.

    Raises:
        InputError: the inputs do not fit the model.
    """
    args, kwargs = _split_payload(payload, spec)
    args_node, kwargs_node = spec.inputs["items"]
    if binary:
        value = (tuple(args) if isinstance(args, (list, tuple)) else args, kwargs)
        _check_structure(value[0], {"k": "tuple", "items": args_node["items"]}, "args")
        _check_structure(value[1], kwargs_node, "kwargs")
    else:
        if not isinstance(args, list):
            raise InputError(f'"args" must be a list of the positional inputs, got {type(args).__name__}')
        value = (
            _json_to_node(args, {"k": "list", "items": args_node["items"]}, "args"),
            _json_to_node(kwargs, kwargs_node, "kwargs"),
        )
    leaves = _ordered(value[0], {"k": "list", "items": args_node["items"]}) + _ordered(value[1], kwargs_node)
    return check_leaves(leaves, spec, binary=binary, reject_nonfinite=reject_nonfinite)


def check_leaves(leaves: list[np.ndarray], spec: ModelSpec, *, binary: bool = False,
                 reject_nonfinite: bool = False) -> Parsed:
    """Check flat input leaves (in the spec's order) against the spec: dtypes, shapes, batch.

    Shared by every request form (binary, JSON, Open Inference Protocol).

    Raises:
        InputError: a leaf that does not fit the model.
    """
    for i, (arr, node) in enumerate(zip(leaves, spec.input_leaves)):
        if arr.dtype != np.dtype(node["dtype"]):
            raise InputError(f"input {i} has dtype {arr.dtype.name}, expected {node['dtype']}")
        if reject_nonfinite and arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise InputError(f"input {i} holds NaN or infinity, which this model is configured to refuse")
    batch = spec.check_inputs(leaves)
    if batch < 1:
        raise InputError("the batch dimension is 0; send at least one sample")
    return Parsed(leaves=leaves, batch=batch, binary=binary)


def split_outputs(outputs: Sequence[np.ndarray], sizes: Sequence[int]) -> list[list[np.ndarray]]:
    """Cut batched output leaves back into per-request leaves (views, no copies)."""
    bounds = np.cumsum([0, *sizes])
    return [[o[bounds[i]:bounds[i + 1]] for o in outputs] for i in range(len(sizes))]


def encode_outputs(leaves: Sequence[np.ndarray], spec: ModelSpec, *, binary: bool) -> bytes | str:
    """One request's outputs in its own wire form (binary in, binary out)."""
    value = spec.build_outputs(list(leaves))
    if binary:
        return wire.encode(value)
    return json.dumps(wire.to_jsonable(value))
