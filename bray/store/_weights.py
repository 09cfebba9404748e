"""Weights on disk: safetensors bytes out of a (nested) state dict, and back.

Reading parses the safetensors header by hand on purpose: a step is read into memory once,
its sha256 checked, and the tensors are then views of that same buffer; the safetensors
library would read the file a second time (or map it while another process replaces it).
Writing uses the library.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from typing import Any

import numpy as np

from bray import tree
from bray.errors import ConfigError
from bray.store._layout import WEIGHTS_FILE, corrupt
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from bray.store._meta import StepMeta


_MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype tag -> numpy dtype (little-endian, as the format stores it)
_NP_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "C64": np.dtype("<c8"),
}


# tags numpy lacks, with their item size; only framework="pt" can load them
_TORCH_ONLY_SIZES = {"BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "U64": "uint64", "I32": "int32", "U32": "uint32", "I16": "int16",
    "U16": "uint16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


_SAVABLE_NP_KINDS = {np.dtype(d).newbyteorder("=").name for d in _NP_DTYPES.values()}


def read_all(f: Any) -> bytearray:
    size = os.fstat(f.fileno()).st_size
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    view.release()
    if got < size:
        del buf[got:]
    return buf


def verify_weights(data: bytearray, meta: StepMeta) -> None:
    where = f"file {WEIGHTS_FILE}"
    if len(data) != meta.nbytes:
        raise corrupt(meta.name, meta.step,
                       f"size mismatch ({where} has {len(data)} bytes, meta.json says {meta.nbytes})")
    got = hashlib.sha256(data).hexdigest()
    if got != meta.sha256:
        raise corrupt(meta.name, meta.step,
                       f"sha256 mismatch ({where} hashes to {got[:12]}…, meta.json says {meta.sha256[:12]}…)")


def _parse_header(data: bytearray, meta: StepMeta) -> tuple[int, dict[str, tuple[str, list[int], int, int]]]:
    """Check a safetensors buffer's layout; returns (body offset, key -> (dtype, shape, begin, end))."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes is too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise ValueError(f"header length {n} does not fit a {len(data)}-byte file")
    header = json.loads(bytes(data[8:8 + n]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    body = 8 + n
    body_len = len(data) - body
    out: dict[str, tuple[str, list[int], int, int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = info["dtype"]
        shape = info["shape"]
        begin, end = info["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {key!r} has shape {shape!r}")
        if dtype in _NP_DTYPES:
            itemsize = _NP_DTYPES[dtype].itemsize
        elif dtype in _TORCH_ONLY_SIZES:
            itemsize = _TORCH_ONLY_SIZES[dtype]
        else:
            raise ValueError(f"tensor {key!r} has unknown dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= body_len):
            raise ValueError(f"tensor {key!r} has offsets {[begin, end]} outside the {body_len}-byte body")
        if end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"tensor {key!r} holds {end - begin} bytes, its shape needs {math.prod(shape) * itemsize}")
        out[key] = (dtype, shape, body + begin, body + end)
    if set(out) != set(meta.keys):
        raise ValueError(f"file holds keys {sorted(out)[:5]}…, meta.json lists {list(meta.keys)[:5]}…")
    return body, out


def decode_weights(data: bytearray, meta: StepMeta, framework: str, device: str) -> dict[str, Any]:
    try:
        _, layout = _parse_header(data, meta)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise corrupt(meta.name, meta.step, f"not a valid safetensors file ({err})") from err
    weights: dict[str, Any] = {}
    if framework == "numpy":
        for key in meta.keys:
            dtype, shape, begin, end = layout[key]
            if dtype not in _NP_DTYPES:
                raise ConfigError(
                    f"step {meta.step} of {meta.name!r} holds {_TORCH_DTYPE_NAMES[dtype]} tensors "
                    f"({key!r}), which numpy lacks; load it with framework='pt'"
                )
            np_dtype = _NP_DTYPES[dtype]
            count = (end - begin) // np_dtype.itemsize
            if count == 0:
                weights[key] = np.empty(shape, dtype=np_dtype)
            else:
                weights[key] = np.frombuffer(data, dtype=np_dtype, count=count, offset=begin).reshape(shape)
        return weights
    import torch

    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from err
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise ConfigError("framework='pt' needs a little-endian host")
    for key in meta.keys:
        dtype, shape, begin, end = layout[key]
        t_dtype = getattr(torch, _TORCH_DTYPE_NAMES[dtype])
        if end == begin:
            tensor = torch.empty(shape, dtype=t_dtype)
        else:
            tensor = torch.frombuffer(data, dtype=t_dtype, count=(end - begin) // t_dtype.itemsize,
                                      offset=begin).reshape(shape)
        weights[key] = tensor if target.type == "cpu" else tensor.to(target)
    return weights


def _flat_weights(weights: Any, torch_mod: Any) -> dict[str, Any]:
    """``state_dict``-style keys (``layer.0.weight``) for a nested weights tree."""
    leaves, treedef = tree.flatten(weights, error=ConfigError)
    flat: dict[str, Any] = {}
    for keys, leaf in zip(treedef.key_paths(), leaves):
        key = ".".join(map(str, keys))
        if not (isinstance(leaf, (np.ndarray, np.generic)) or (torch_mod is not None and isinstance(leaf, torch_mod.Tensor))):
            raise ConfigError(
                f"weights must be a state_dict of torch tensors or a NestedArray (numpy arrays in nested "
                f"list/tuple/dict); {key or 'the top'!r} is a {type(leaf).__name__}"
            )
        if key in flat:
            raise ConfigError(f"weights flatten to the key {key!r} twice; rename one of them")
        if key == "__metadata__":
            raise ConfigError("'__metadata__' is reserved by safetensors; rename that weight")
        flat[key] = leaf
    return flat


def serialize_weights(weights: Any) -> tuple[bytes, list[str]]:
    """Flatten and encode weights as safetensors bytes; returns (bytes, sorted keys)."""
    torch_mod = sys.modules.get("torch")  # a torch tensor implies torch is imported
    flat = _flat_weights(weights, torch_mod)
    keys = sorted(flat)
    if torch_mod is not None and any(isinstance(v, torch_mod.Tensor) for v in flat.values()):
        return _serialize_torch(flat), keys
    arrays = {}
    for key, value in flat.items():
        arr = np.asarray(value)
        if arr.dtype.newbyteorder("=").name not in _SAVABLE_NP_KINDS:
            raise ConfigError(
                f"weight {key!r} has dtype {arr.dtype}, which safetensors cannot store; "
                f"use one of {sorted(_SAVABLE_NP_KINDS)}"
            )
        arrays[key] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    import safetensors.numpy

    return safetensors.numpy.save(arrays), keys


def _serialize_torch(flat: dict[str, Any]) -> bytes:
    import safetensors.torch
    import torch

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in flat.items():
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise ConfigError(f"weight {key!r} is a {value.layout} tensor; call .to_dense() first")
            tensor = value.detach().to("cpu").contiguous()
        else:
            arr = np.asarray(value)
            tensor = torch.from_numpy(arr if arr.flags.c_contiguous else arr.copy(order="C"))
        if tensor.numel():
            # safetensors refuses tensors sharing storage (tied weights); store a copy
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in seen_storage:
                tensor = tensor.clone()
                ptr = tensor.untyped_storage().data_ptr()
            seen_storage.add(ptr)
        tensors[key] = tensor
    try:
        return safetensors.torch.save(tensors)
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        raise ConfigError(f"these weights cannot be stored as safetensors: {err}") from err
