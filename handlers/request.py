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
from typing import Any, Sequence

import numpy as np

from bray import tree, wire
from bray.errors import InputError, WireError
from bray.export import LeafSpec, ModelSpec, describe_inputs

__all__ = ["Parsed", "check_leaves", "encode_outputs", "parse_payload", "parse_request", "split_outputs"]


@dataclass(frozen=True)
class Parsed:
    """One request, decoded and checked: flat input leaves, its batch size, its wire form."""

    leaves: list[np.ndarray]
    batch: int
    binary: bool


def _json_leaf(obj: Any, want: LeafSpec, where: str) -> np.ndarray:
    """A JSON value at a leaf slot as an array of the spec's dtype (never guessed)."""
    if isinstance(obj, (str, bytes)) or obj is None or isinstance(obj, dict):
        raise InputError(f"{where}: expected numbers (nested lists of {want.dtype}), got {type(obj).__name__}")
    try:
        arr = np.asarray(obj)
    except ValueError as err:
        raise InputError(f"{where}: ragged nested lists; expected a rectangular array [batch, {', '.join(map(str, want.shape))}]") from err
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{where}: expected numbers of dtype {want.dtype}, got values of kind {arr.dtype.name!r}")
    return arr.astype(want.dtype, copy=False)


def _split_payload(payload: Any, spec: ModelSpec) -> tuple[Any, Any]:
    """``{"args", "kwargs"}`` form, or the lone positional input."""
    if isinstance(payload, dict) and payload and set(payload) <= {"args", "kwargs"}:
        return payload.get("args", []), payload.get("kwargs", {})
    n_args, n_kwargs = len(spec.args_tree.children), len(spec.kwargs_tree.children)
    if n_args == 1 and not n_kwargs:
        return [payload], {}
    raise InputError(
        f"the model takes {n_args} positional and {n_kwargs} keyword "
        'input(s); send {"args": [...], "kwargs": {...}}'
    )


def _input_paths(spec: ModelSpec) -> list[str]:
    """Each input leaf's place (``args[0].obs``), in the spec's leaf order, for messages."""
    return spec.args_tree.paths("args") + spec.kwargs_tree.paths("kwargs")


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
        WireError: the body cannot be decoded at all; ``status`` 413 when it is larger
            than ``limits.max_total_bytes``.
    """
    if body is None or (isinstance(body, (bytes, bytearray, str)) and len(body) == 0):
        raise InputError(f"empty request body; send the model's inputs {describe_inputs(spec)} as binary NestedArray or JSON")
    binary = False
    if isinstance(body, (bytes, bytearray, memoryview)):
        size = memoryview(body).nbytes
        if size > limits.max_total_bytes:
            raise WireError(
                f"the body is {size} bytes, {size - limits.max_total_bytes} over this model's limit of "
                f"{limits.max_total_bytes} bytes; send smaller batches, or pack the model with a larger "
                "--max-request-mb", status=413,
            )
        if wire.is_binary(body):
            binary = True
            payload = wire.decode(body, limits=limits)
        else:
            try:
                payload = json.loads(bytes(body))
            except (UnicodeDecodeError, ValueError, RecursionError) as err:
                raise WireError(
                    f"the body ({size} bytes, starting {bytes(body[:8])!r}) is neither a binary NestedArray "
                    "(bray.wire) nor JSON; send Content-Type application/octet-stream with "
                    "bray.wire.encode(...) or application/json"
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
    if not binary and not isinstance(args, list):
        raise InputError(f'"args" must be a list of the positional inputs, got {type(args).__name__}')
    # The spec's trees say where the leaves are; dict keys are taken in the spec's order.
    slots = (tree.flatten_up_to(spec.args_tree, args, error=InputError, root="args")
             + tree.flatten_up_to(spec.kwargs_tree, kwargs, error=InputError, root="kwargs"))
    if binary:
        for i, value in enumerate(slots):
            if not isinstance(value, np.ndarray):
                raise InputError(f"{_input_paths(spec)[i]}: expected an array, got {type(value).__name__}")
        leaves: list[np.ndarray] = slots
    else:
        leaves = [_json_leaf(value, want, where)
                  for value, want, where in zip(slots, spec.input_leaves, _input_paths(spec))]
    return check_leaves(leaves, spec, reject_nonfinite=reject_nonfinite, binary=binary)


def check_leaves(leaves: list[np.ndarray], spec: ModelSpec, *, binary: bool = False,
                 reject_nonfinite: bool = False) -> Parsed:
    """Check flat input leaves (in the spec's order) against the spec: dtypes, shapes, batch.

    Shared by every request form (binary, JSON, Open Inference Protocol).

    Raises:
        InputError: a leaf that does not fit the model.
    """
    for i, (arr, want) in enumerate(zip(leaves, spec.input_leaves)):
        if arr.dtype != np.dtype(want.dtype):
            raise InputError(f"input {i} has dtype {arr.dtype.name}, expected {want.dtype}")
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
