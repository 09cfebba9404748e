"""The Open Inference Protocol (KServe v2) on the handler: what Triton's and KServe's clients send.

TorchServe 0.12's frontend routes ``POST /v2/models/<name>/infer`` to the default
version of ``<name>`` exactly like ``/predictions/<name>`` (``InferenceRequestHandler``,
``isKFV2InferenceReq``): the body reaches the handler untouched (parsed JSON for
``application/json``, bytes otherwise), with no sign of which route it came by. So an
OIP request is told apart by its shape: an object whose ``inputs`` is a list of tensor
objects (``name``, ``shape``, ``datatype``, ``data``). No request envelope is needed
(``service_envelope`` stays unset: TorchServe's ``kservev2`` envelope would hand the
handler a list of bare arrays and lose the names).

Tensors are named after the model's flat input and output leaves, in the order
:mod:`bray.export` gives them, as Triton's PyTorch backend names them:
``INPUT__0``, ``INPUT__1``, ... and ``OUTPUT__0``, ... Every tensor carries the batch
as its first dimension. The answer's ``parameters`` carry ``step`` (the weights that
produced it) and ``worker`` (the worker's pid).

Both OIP encodings are read and written:

- JSON: ``data`` is the tensor flattened in row-major order (nested lists are accepted).
- The binary tensor extension (Triton's, what ``tritonclient`` sends by default): the
  JSON header is the first ``Inference-Header-Content-Length`` bytes of the body, each
  binary input says its ``parameters.binary_data_size``, and its raw little-endian
  bytes follow the header in input order. An output is answered in binary when its
  request entry asks ``parameters.binary_data: true`` (or the request's
  ``parameters.binary_data_output`` does).

Beyond the protocol: ``datatype`` must be the model's own dtype (no silent casts), and
``BYTES`` tensors are refused (the exported models take numbers only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from bray.errors import InputError, WireError
from bray.export import ModelSpec
from bray.handlers.request import Parsed, check_leaves

__all__ = ["HEADER_LENGTH", "OipReply", "OipRequest", "datatype_of", "encode_response", "input_names",
           "is_oip", "output_names", "parse_oip"]

# Triton's binary tensor extension: how many leading bytes of the body are the JSON header.
HEADER_LENGTH = "Inference-Header-Content-Length"

_DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
_BY_DTYPE = {v: k for k, v in _DATATYPES.items()}


def input_names(spec: ModelSpec) -> list[str]:
    """OIP names of the model's inputs, in leaf order: ``INPUT__0``, ``INPUT__1``, ..."""
    return [f"INPUT__{i}" for i in range(len(spec.input_leaves))]


def output_names(spec: ModelSpec) -> list[str]:
    """OIP names of the model's outputs, in leaf order: ``OUTPUT__0``, ..."""
    return [f"OUTPUT__{i}" for i in range(len(spec.output_leaves))]


def datatype_of(dtype: str | np.dtype) -> str:
    """The OIP datatype of a numpy dtype (``float32`` -> ``FP32``)."""
    name = np.dtype(dtype).name
    try:
        return _BY_DTYPE[name]
    except KeyError:
        raise InputError(f"dtype {name} has no Open Inference Protocol datatype") from None


@dataclass(frozen=True)
class OipRequest:
    """One decoded OIP request: the checked inputs and how the answer should look."""

    parsed: Parsed
    id: str | None
    outputs: tuple[str, ...]
    binary_outputs: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class OipReply:
    """An encoded answer: the body, its content type, and the JSON header's length (binary)."""

    body: bytes | str
    content_type: str
    header_length: int | None


def _split_binary(body: bytes | bytearray | memoryview, header_length: int) -> tuple[Any, memoryview]:
    raw = memoryview(body)
    if not 0 < header_length <= len(raw):
        raise WireError(f"{HEADER_LENGTH} is {header_length} but the body has {len(raw)} byte(s); "
                        "send the JSON header's length in bytes")
    try:
        header = json.loads(bytes(raw[:header_length]))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WireError(f"the first {header_length} byte(s) ({HEADER_LENGTH}) are not a JSON inference "
                        f"request: {err}") from err
    return header, raw[header_length:]


def is_oip(body: Any, header_length: int | None = None) -> bool:
    """True when ``body`` is an OIP inference request (JSON object, or binary-extension bytes)."""
    if header_length is not None and isinstance(body, (bytes, bytearray, memoryview)):
        return True
    if isinstance(body, (bytes, bytearray, str)):
        head = body[:200].lstrip() if isinstance(body, str) else bytes(body[:200]).decode("latin-1").lstrip()
        if not head.startswith("{"):  # JSON arrays and bray.wire bytes are not OIP
            return False
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return False
    if not isinstance(body, Mapping):
        return False
    inputs = body.get("inputs")
    return (isinstance(inputs, list) and bool(inputs)
            and all(isinstance(t, Mapping) and "datatype" in t and "name" in t for t in inputs))


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise InputError(f"{where}: shape must be a list of integers >= 0, got {str(value)[:80]}")
    return value


def _tensor(entry: Mapping[str, Any], dtype: str, where: str, rest: memoryview, offset: int) -> tuple[np.ndarray, int]:
    shape = _int_list(entry.get("shape"), where)
    count = int(np.prod(shape)) if shape else 1
    params = entry.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, Mapping) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputError(f"{where}: parameters.binary_data_size must be an integer >= 0, got {size!r}")
        want = count * np.dtype(dtype).itemsize
        if size != want:
            raise InputError(f"{where}: binary_data_size is {size} byte(s), but shape {shape} of "
                             f"{datatype_of(dtype)} needs {want}")
        if offset + size > len(rest):
            raise WireError(f"{where}: the body ends {offset + size - len(rest)} byte(s) before this "
                            "tensor's binary data does")
        arr = np.frombuffer(rest[offset:offset + size], dtype=np.dtype(dtype).newbyteorder("<"))
        return arr.astype(dtype, copy=False).reshape(shape), offset + size
    data = entry.get("data")
    if data is None:
        raise InputError(f"{where}: no data (send \"data\": [...] or the binary extension's "
                         "parameters.binary_data_size)")
    try:
        arr = np.asarray(data)
    except ValueError as err:
        raise InputError(f"{where}: ragged data; send the tensor flattened in row-major order") from err
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{where}: data holds values of kind {arr.dtype.name!r}, expected numbers of "
                         f"{datatype_of(dtype)}")
    if arr.size != count:
        raise InputError(f"{where}: shape {shape} holds {count} value(s), data has {arr.size}")
    if dtype == "bool" and arr.dtype.kind != "b":
        raise InputError(f"{where}: BOOL data must be true/false, got numbers")
    return arr.astype(dtype, copy=False).reshape(shape), offset


def parse_oip(body: Any, spec: ModelSpec, *, header_length: int | None = None,
              reject_nonfinite: bool = False) -> OipRequest:
    """Decode one OIP request and check it against the model's spec.

    Args:
        body: the parsed JSON object, or the body's bytes (JSON, or the binary extension
            when ``header_length`` is given).
        spec: the model's spec.
        header_length: the request's ``Inference-Header-Content-Length``, if any.
        reject_nonfinite: refuse NaN and infinity.

    Raises:
        InputError: tensors that do not fit the model (the message names the expected ones).
        WireError: a body that cannot be decoded.
    """
    rest = memoryview(b"")
    if header_length is not None and isinstance(body, (bytes, bytearray, memoryview)):
        body, rest = _split_binary(body, header_length)
    elif isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise WireError(f"the body is not a JSON inference request: {err}") from err
    if not isinstance(body, Mapping) or not isinstance(body.get("inputs"), list):
        raise InputError('an Open Inference Protocol request is an object with "inputs": [...]')
    names = input_names(spec)
    leaves_by_name: dict[str, np.ndarray] = {}
    offset = 0
    for i, entry in enumerate(body["inputs"]):
        if not isinstance(entry, Mapping):
            raise InputError(f"inputs[{i}] must be an object with name, shape, datatype, data")
        name = entry.get("name")
        where = f"input {name!r}"
        if name not in names:
            raise InputError(f"inputs[{i}]: no input named {name!r}; this model takes "
                             f"{', '.join(_describe(spec, names))}")
        if name in leaves_by_name:
            raise InputError(f"{where} is given twice")
        dtype = spec.input_leaves[names.index(name)].dtype
        if entry.get("datatype") != datatype_of(dtype):
            raise InputError(f"{where} has datatype {entry.get('datatype')!r}, expected {datatype_of(dtype)}")
        leaves_by_name[name], offset = _tensor(entry, dtype, where, rest, offset)
    missing = [n for n in names if n not in leaves_by_name]
    if missing:
        raise InputError(f"missing input(s) {', '.join(missing)}; this model takes {', '.join(_describe(spec, names))}")
    if offset != len(rest):
        raise WireError(f"{len(rest) - offset} byte(s) after the last binary tensor; each binary input "
                        "needs parameters.binary_data_size")
    parsed = check_leaves([leaves_by_name[n] for n in names], spec, reject_nonfinite=reject_nonfinite)
    outputs, binary = _requested_outputs(body, spec)
    rid = body.get("id")
    return OipRequest(parsed=parsed, id=None if rid is None else str(rid), outputs=outputs,
                      binary_outputs=binary)


def _describe(spec: ModelSpec, names: Sequence[str]) -> list[str]:
    return [f"{n} {datatype_of(leaf.dtype)}[batch{''.join(',' + str(d) for d in leaf.shape)}]"
            for n, leaf in zip(names, spec.input_leaves)]


def _requested_outputs(body: Mapping[str, Any], spec: ModelSpec) -> tuple[tuple[str, ...], frozenset[str]]:
    names = output_names(spec)
    params = body.get("parameters") or {}
    all_binary = bool(isinstance(params, Mapping) and params.get("binary_data_output"))
    requested = body.get("outputs")
    if requested is None:
        return tuple(names), frozenset(names if all_binary else ())
    if not isinstance(requested, list):
        raise InputError('"outputs" must be a list of {"name": ...} objects')
    chosen: list[str] = []
    binary: set[str] = set()
    for i, entry in enumerate(requested):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if name not in names:
            raise InputError(f"outputs[{i}]: no output named {name!r}; this model answers {', '.join(names)}")
        chosen.append(name)
        out_params = entry.get("parameters") or {}
        if all_binary or (isinstance(out_params, Mapping) and out_params.get("binary_data")):
            binary.add(name)
    return tuple(chosen), frozenset(binary)


def encode_response(leaves: Sequence[np.ndarray], spec: ModelSpec, request: OipRequest, *,
                    model_name: str, model_version: str, step: int, worker: int) -> OipReply:
    """One request's outputs as an OIP answer (JSON, or the binary extension when asked for)."""
    names = output_names(spec)
    outputs = []
    blobs: list[bytes] = []
    for name in request.outputs:
        arr = np.ascontiguousarray(leaves[names.index(name)])
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        if name in request.binary_outputs:
            blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version,
                           "parameters": {"step": step, "worker": worker}, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc)
    if not blobs:
        return OipReply(body=header, content_type="application/json", header_length=None)
    head = header.encode()
    return OipReply(body=b"".join([head, *blobs]), content_type="application/octet-stream",
                    header_length=len(head))
