"""The NestedArray wire codec: a binary form for actors, a JSON form for ``curl``.

A *NestedArray* is an ``np.ndarray``, or a list, tuple or dict (``str`` keys) of
NestedArrays. Python and numpy scalars are accepted wherever a leaf is, as 0-d arrays.

Binary layout (version 1), all integers little-endian::

    offset  size  field
    0       4     MAGIC  b"BRAY"
    4       1     VERSION  1
    5       4     u32 header length H
    9       H     header: UTF-8 JSON, {"tree": NODE, "arrays": [[dtype, shape, offset, nbytes], ...]}
    9+H     pad   zero bytes up to D = the next multiple of ALIGNMENT (64)
    D       ...   the raw buffers, C order, each at D + its offset; offsets are multiples of
                  ALIGNMENT, in order, non-overlapping; the body ends at the last buffer's end

    NODE := i                       the i-th array (leaves appear in order 0, 1, 2, ...)
          | {"list":  [NODE, ...]}
          | {"tuple": [NODE, ...]}
          | {"dict":  [[key, NODE], ...]}   keys are strings, in insertion order

``dtype`` is one of :data:`SUPPORTED_DTYPES` (always stored little-endian), ``shape`` a
list of non-negative ints. Offsets are relative to ``D``, so every buffer sits at a
multiple of 64 from the start of the body: a body held in ``bytes`` or ``bytearray``
(16-byte-aligned by CPython) decodes to aligned views.

:func:`decode` checks every size against :class:`WireLimits` before it touches the
buffers, never allocates from a declared size, and answers every malformed body with
:class:`~bray.errors.WireError` saying what was wrong and what was expected.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from dataclasses import dataclass
from typing import Any, NoReturn, Sequence, TypeAlias, Union

import numpy as np

from bray.errors import ConfigError, WireError

__all__ = [
    "ALIGNMENT",
    "CONTENT_TYPE",
    "DEFAULT_LIMITS",
    "MAGIC",
    "MIN_STEP_HEADER",
    "NestedArray",
    "STEP_HEADER",
    "SUPPORTED_DTYPES",
    "VERSION",
    "WORKER_HEADER",
    "WireLimits",
    "decode",
    "encode",
    "encode_parts",
    "from_jsonable",
    "is_binary",
    "leaves",
    "nbytes",
    "structure",
    "to_jsonable",
    "unflatten",
]

NestedArray: TypeAlias = Union[
    np.ndarray, "list[NestedArray]", "tuple[NestedArray, ...]", "dict[str, NestedArray]"
]

#: TorchServe hands bodies of this type to the handler as ``bytearray``.
CONTENT_TYPE = "application/octet-stream"
# HTTP headers of the bray protocol, beside the body: the step whose weights answered and
# the worker that answered (responses); the newest step the caller has already been
# answered with, which a lagging worker catches up to first (requests).
STEP_HEADER = "X-Bray-Step"
WORKER_HEADER = "X-Bray-Worker"
MIN_STEP_HEADER = "X-Bray-Min-Step"
MAGIC = b"BRAY"
VERSION = 1
#: Every buffer starts at a multiple of this many bytes from the start of the body.
ALIGNMENT = 64

SUPPORTED_DTYPES: tuple[str, ...] = (
    "bool",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
    "complex64", "complex128",
)

# magic, version, header length: 9 bytes, no padding with "<".
_PREFIX = struct.Struct("<4sBI")
_PAD = bytes(ALIGNMENT)
_WIRE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES
}
_BY_KIND_SIZE: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in _WIRE_DTYPES.items()
}
_DTYPE_LIST = ", ".join(SUPPORTED_DTYPES)
# Values quoted in messages stay short and never recurse deeply (hostile headers nest).
_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3
_SHORT.maxstring = 60
_SHORT.maxother = 60
# Upper bounds on the limits themselves. Decoding and encoding recurse once per container
# level and json nests about three levels per dict, so 100 keeps far below Python's
# default recursion limit; numpy arrays have at most 64 dimensions.
_MAX_DEPTH_CAP = 100
_MAX_NDIM_CAP = 64
_U32_MAX = 2**32 - 1
_MAX_TOTAL_CAP = 2**62
_SCALARS = (bool, int, float, complex, np.generic)
_NODE_KINDS = ("list", "tuple", "dict")


@dataclass(frozen=True)
class WireLimits:
    """Bounds a decoder enforces before it trusts a body (encoders check them too).

    Attributes:
        max_total_bytes: Largest whole body (binary) or sum of array bytes (JSON).
        max_arrays: Most arrays (leaves) in one NestedArray.
        max_depth: Most container levels (list/tuple/dict) around a leaf; 0 allows
            only a bare array. At most 100.
        max_ndim: Most dimensions of one array. At most 64 (numpy's own limit).
        max_header_bytes: Largest binary header. At most 2**32 - 1 (a u32 field).

    Raises:
        ConfigError: A field is not an integer in its range.
    """

    max_total_bytes: int = 256 * 1024 * 1024
    max_arrays: int = 4096
    max_depth: int = 32
    max_ndim: int = 16
    max_header_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        bounds: dict[str, tuple[int, int | None]] = {
            "max_total_bytes": (1, _MAX_TOTAL_CAP),
            "max_arrays": (1, None),
            "max_depth": (0, _MAX_DEPTH_CAP),
            "max_ndim": (0, _MAX_NDIM_CAP),
            "max_header_bytes": (1, _U32_MAX),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            in_range = (
                isinstance(value, int)
                and not isinstance(value, bool)
                and value >= low
                and (high is None or value <= high)
            )
            if not in_range:
                wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ConfigError(
                    f"WireLimits.{name} must be an integer {wanted}, got {value!r}"
                )


DEFAULT_LIMITS = WireLimits()


# --------------------------------------------------------------------------- helpers


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"


def _type_name(obj: object) -> str:
    kind = type(obj)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _short(obj: object) -> str:
    return _SHORT.repr(obj)


def _too_deep(path: str, max_depth: int) -> NoReturn:
    if len(path) > 80:
        path = f"{path[:40]}...{path[-30:]}"
    if max_depth == _MAX_DEPTH_CAP:
        raise WireError(f"containers nested deeper than {max_depth} levels at {path}")
    raise WireError(
        f"containers nested deeper than max_depth={max_depth} at {path}; "
        "flatten the structure or raise WireLimits(max_depth=...)"
    )


def _wire_dtype_name(dtype: np.dtype, where: str) -> str:
    """The whitelist name of ``dtype`` (any byte order), or WireError."""
    name = _BY_KIND_SIZE.get((dtype.kind, dtype.itemsize))
    if name is not None:
        wire = _WIRE_DTYPES[name]
        # Equality rejects look-alikes: structured, sub-array and user-defined dtypes.
        if dtype in (wire, wire.newbyteorder(">")):
            return name
    raise WireError(
        f"{where} has dtype {dtype}, which the wire format does not carry; "
        f"expected one of {_DTYPE_LIST}"
    )


def _check_dims(where: str, shape: Sequence[int], limits: WireLimits) -> None:
    # Bounding each dimension first keeps the products below small (and printable).
    for d in shape:
        if d > limits.max_total_bytes:
            raise WireError(
                f"{where} has dimension {d} in shape {_short(list(shape))}, over "
                f"max_total_bytes={limits.max_total_bytes}"
            )


def _check_extent(where: str, shape: Sequence[int], dtype_name: str, limits: WireLimits) -> int:
    """Check ndim and size of a (validated-int) shape; returns its byte size."""
    if len(shape) > limits.max_ndim:
        raise WireError(
            f"{where} has {len(shape)} dimensions, over max_ndim={limits.max_ndim}; "
            "reshape it or raise WireLimits(max_ndim=...)"
        )
    itemsize = _WIRE_DTYPES[dtype_name].itemsize
    _check_dims(where, shape, limits)
    # Zero-size arrays still need their other dimensions bounded: numpy refuses shapes
    # whose product of non-zero dimensions overflows.
    span = math.prod(max(d, 1) for d in shape) * itemsize
    if span > limits.max_total_bytes:
        raise WireError(
            f"{where} has shape {list(shape)} {dtype_name}, spanning {span} bytes, over "
            f"max_total_bytes={limits.max_total_bytes}; send smaller batches or raise "
            "WireLimits(max_total_bytes=...)"
        )
    return math.prod(shape) * itemsize


def _as_byte_view(buf: object) -> memoryview:
    if isinstance(buf, (dict, list, str)):
        raise WireError(
            f"expected a binary body (bytes, bytearray or memoryview), got {_type_name(buf)}; "
            "JSON bodies go through from_jsonable()"
        )
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError as err:
        raise WireError(
            f"expected a binary body (bytes, bytearray or memoryview), got {_type_name(buf)}"
        ) from err
    if not view.c_contiguous:
        raise WireError("expected a contiguous buffer, got a strided memoryview; pass bytes(view)")
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except (TypeError, ValueError) as err:
            raise WireError(f"cannot read a {view.format!r} memoryview as bytes: {err}") from err
    return view


# --------------------------------------------------------------------------- encode


class _Encoder:
    """Walks a NestedArray once, building the header tree and the list of buffers."""

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        self.specs: list[list[Any]] = []
        self.buffers: list[tuple[int, np.ndarray]] = []
        self.end = 0

    def node(self, obj: Any, depth: int, path: str) -> Any:
        if isinstance(obj, np.ndarray):
            return self.leaf(obj, path)
        if isinstance(obj, (list, tuple)):
            if depth >= self.limits.max_depth:
                _too_deep(path, self.limits.max_depth)
            children = [self.node(item, depth + 1, f"{path}[{i}]") for i, item in enumerate(obj)]
            return {"tuple" if isinstance(obj, tuple) else "list": children}
        if isinstance(obj, dict):
            if depth >= self.limits.max_depth:
                _too_deep(path, self.limits.max_depth)
            pairs = []
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise WireError(f"dict keys must be str, got {_type_name(key)} {key!r} at {path}")
                pairs.append([key, self.node(value, depth + 1, _key_path(path, key))])
            return {"dict": pairs}
        if isinstance(obj, _SCALARS):
            return self.leaf(np.asarray(obj), path)
        raise WireError(
            f"expected an ndarray, list, tuple, dict or number at {path}, got {_type_name(obj)}"
            + ("; convert tensors with .numpy() first" if hasattr(obj, "numpy") else "")
        )

    def leaf(self, arr: np.ndarray, path: str) -> int:
        index = len(self.specs)
        if index >= self.limits.max_arrays:
            raise WireError(
                f"more than max_arrays={self.limits.max_arrays} arrays (at {path}); "
                "stack them into fewer arrays or raise WireLimits(max_arrays=...)"
            )
        arr = np.asarray(arr)  # drop ndarray subclasses
        name = _wire_dtype_name(arr.dtype, f"array at {path}")
        wire = _WIRE_DTYPES[name]
        if arr.dtype != wire:
            arr = arr.astype(wire)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        size = _check_extent(f"array at {path}", arr.shape, name, self.limits)
        offset = _align(self.end)
        self.specs.append([name, list(arr.shape), offset, size])
        self.buffers.append((offset, arr))
        self.end = offset + size
        return index


def encode_parts(obj: NestedArray, *, limits: WireLimits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """Encode a NestedArray as a list of chunks, for ``writev`` or a streamed HTTP body.

    The first chunk holds the prefix, header and padding; the others are zero-copy
    views of the (contiguous, little-endian) arrays and the zero padding between them,
    so mutating an array before the chunks are sent changes what is sent.
    ``b"".join(encode_parts(x)) == encode(x)``.

    Args:
        obj: The NestedArray. Scalars become 0-d arrays; non-contiguous or big-endian
            arrays are copied into contiguous little-endian ones.
        limits: Bounds to check, so a body the decoder would refuse fails here first.

    Returns:
        The chunks, in order.

    Raises:
        WireError: ``obj`` holds something other than arrays, scalars, lists, tuples
            and str-keyed dicts, an unsupported dtype, or exceeds ``limits``.
    """
    enc = _Encoder(limits)
    tree = enc.node(obj, 0, "$")
    header = json.dumps({"tree": tree, "arrays": enc.specs}, separators=(",", ":")).encode()
    if len(header) > limits.max_header_bytes:
        raise WireError(
            f"the header is {len(header)} bytes, over max_header_bytes={limits.max_header_bytes}; "
            "use fewer arrays or shorter keys, or raise WireLimits(max_header_bytes=...)"
        )
    data_start = _align(_PREFIX.size + len(header))
    total = data_start + enc.end
    if total > limits.max_total_bytes:
        raise WireError(
            f"the body would be {total} bytes, over max_total_bytes={limits.max_total_bytes}; "
            "send smaller batches or raise WireLimits(max_total_bytes=...)"
        )
    head = _PREFIX.pack(MAGIC, VERSION, len(header)) + header
    parts: list[bytes | memoryview] = [head + _PAD[: data_start - len(head)]]
    pos = 0
    for offset, arr in enc.buffers:
        if offset > pos:
            parts.append(_PAD[: offset - pos])
        if arr.nbytes:
            parts.append(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
        pos = offset + arr.nbytes
    return parts


def encode(obj: NestedArray, *, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """Encode a NestedArray into one binary body (see the module docstring for the layout).

    Args:
        obj: The NestedArray; scalars become 0-d arrays.
        limits: Bounds to check, as :func:`decode` would.

    Returns:
        The body, to send with ``Content-Type: application/octet-stream``.

    Raises:
        WireError: As :func:`encode_parts`.
    """
    return b"".join(encode_parts(obj, limits=limits))


# --------------------------------------------------------------------------- decode


def _int_field(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise WireError(f"{where} must be a non-negative integer, got {_short(value)}")


class _Decoder:
    """Validates a parsed header against the body and builds the views."""

    def __init__(self, view: memoryview, data_start: int, limits: WireLimits) -> None:
        self.view = view
        self.data_start = data_start
        self.data_len = view.nbytes - data_start
        self.limits = limits
        self.arrays: list[np.ndarray] = []
        self.next_leaf = 0

    def table(self, specs: object) -> None:
        if not isinstance(specs, list):
            raise WireError(f"header 'arrays' must be a list, got {_type_name(specs)}")
        if len(specs) > self.limits.max_arrays:
            raise WireError(
                f"the header declares {len(specs)} arrays, over max_arrays={self.limits.max_arrays}"
            )
        end = 0
        for i, spec in enumerate(specs):
            where = f"array {i}"
            if not (isinstance(spec, list) and len(spec) == 4):
                raise WireError(f"{where}: expected [dtype, shape, offset, nbytes], got {_short(spec)}")
            name, shape, offset, length = spec
            if not (isinstance(name, str) and name in _WIRE_DTYPES):
                raise WireError(f"{where} has dtype {_short(name)}; expected one of {_DTYPE_LIST}")
            if not isinstance(shape, list):
                raise WireError(f"{where}: shape must be a list of integers, got {_short(shape)}")
            if len(shape) > self.limits.max_ndim:
                raise WireError(
                    f"{where} has {len(shape)} dimensions, over max_ndim={self.limits.max_ndim}"
                )
            for d in shape:
                _int_field(d, f"{where}: every dimension of shape {_short(shape)}")
            _check_dims(where, shape, self.limits)
            offset = _int_field(offset, f"{where}: offset")
            length = _int_field(length, f"{where}: nbytes")
            dtype = _WIRE_DTYPES[name]
            declared = math.prod(shape) * dtype.itemsize
            if declared != length:
                raise WireError(
                    f"{where} declares shape {shape} {name} = {declared} bytes "
                    f"but its nbytes field says {length}"
                )
            if offset + length > self.data_len:
                raise WireError(
                    f"{where} declares shape {shape} {name} = {declared} bytes at offset "
                    f"{offset} but only {self.data_len} bytes follow the header"
                )
            if not declared:  # sized arrays are bounded by the body; empty ones are not
                _check_extent(where, shape, name, self.limits)
            if offset % ALIGNMENT:
                raise WireError(f"{where} is at offset {offset}; expected a multiple of {ALIGNMENT}")
            if offset < end:
                raise WireError(
                    f"{where} starts at offset {offset}, inside the previous array (which ends at "
                    f"{end}); arrays must be in order and must not overlap"
                )
            end = offset + length
            flat = np.frombuffer(
                self.view, dtype=dtype, count=length // dtype.itemsize, offset=self.data_start + offset
            )
            self.arrays.append(flat.reshape(shape))
        if end != self.data_len:
            raise WireError(
                f"the body has {self.data_len - end} bytes after the last array (expected it to "
                f"end at byte {self.data_start + end}, it is {self.view.nbytes} bytes long); "
                "two bodies concatenated, or a wrong header?"
            )

    def node(self, node: object, depth: int, path: str) -> NestedArray:
        if isinstance(node, int) and not isinstance(node, bool):
            if node != self.next_leaf or node >= len(self.arrays):
                raise WireError(
                    f"tree leaf at {path} refers to array {node}; expected array {self.next_leaf} "
                    f"of {len(self.arrays)} (each array once, in order)"
                )
            self.next_leaf += 1
            return self.arrays[node]
        if not (isinstance(node, dict) and len(node) == 1):
            raise WireError(
                f"tree node at {path} must be an array index or one of "
                f'{{"list": [...]}}, {{"tuple": [...]}}, {{"dict": [[key, node], ...]}}; got {_short(node)}'
            )
        ((kind, children),) = node.items()
        if kind not in _NODE_KINDS or not isinstance(children, list):
            raise WireError(
                f"tree node at {path}: expected list, tuple or dict with a list, got {_short(node)}"
            )
        if depth >= self.limits.max_depth:
            _too_deep(path, self.limits.max_depth)
        if kind == "dict":
            out: dict[str, NestedArray] = {}
            for pair in children:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                    raise WireError(f"dict entry at {path} must be [str key, node], got {_short(pair)}")
                key, child = pair
                if key in out:
                    raise WireError(f"dict at {path} repeats key {_short(key)}")
                out[key] = self.node(child, depth + 1, _key_path(path, key))
            return out
        items = [self.node(child, depth + 1, f"{path}[{i}]") for i, child in enumerate(children)]
        return tuple(items) if kind == "tuple" else items


def decode(
    buf: bytes | bytearray | memoryview, *, limits: WireLimits = DEFAULT_LIMITS
) -> NestedArray:
    """Decode a binary body into a NestedArray of views into ``buf`` (no copies).

    The arrays are ``np.frombuffer`` views: read-only when ``buf`` is ``bytes``, writable
    when it is a ``bytearray`` (what TorchServe hands the handler), and they keep ``buf``
    alive. Lists, tuples and dicts (in their encoded key order) come back as such.

    Args:
        buf: The body, starting with :data:`MAGIC`.
        limits: Bounds checked before any buffer is touched.

    Returns:
        The NestedArray.

    Raises:
        WireError: The body is not a bray binary message, is truncated or inconsistent,
            or exceeds ``limits``; the message says which and what was expected.
    """
    view = _as_byte_view(buf)
    total = view.nbytes
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC[: len(head)]:
        raise WireError(
            f"the body does not start with {MAGIC!r} (got {head!r}); expected a bray binary "
            f"message (Content-Type {CONTENT_TYPE}), or send JSON as application/json"
        )
    if total < _PREFIX.size:
        raise WireError(
            f"the body is truncated: {total} bytes, but a bray message starts with "
            f"{_PREFIX.size} (magic, version, header length)"
        )
    _, version, header_len = _PREFIX.unpack_from(view, 0)
    if version != VERSION:
        raise WireError(
            f"wire format version {version} is not supported; this bray-serve reads version "
            f"{VERSION} (upgrade the older side)"
        )
    if total > limits.max_total_bytes:
        raise WireError(
            f"the body is {total} bytes, over max_total_bytes={limits.max_total_bytes}; "
            "send smaller batches or raise WireLimits(max_total_bytes=...)"
        )
    if header_len > limits.max_header_bytes:
        raise WireError(
            f"the header length field says {header_len} bytes, over "
            f"max_header_bytes={limits.max_header_bytes}"
        )
    if _PREFIX.size + header_len > total:
        raise WireError(
            f"the header length field says {header_len} bytes but only "
            f"{total - _PREFIX.size} bytes follow the {_PREFIX.size}-byte prefix"
        )
    data_start = _align(_PREFIX.size + header_len)
    if data_start > total:
        raise WireError(
            f"the body is truncated: {total} bytes, but the header and its padding end at "
            f"byte {data_start}"
        )
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + header_len]).decode("utf-8"))
    except RecursionError as err:
        raise WireError("the header nests JSON too deeply; expected a bray v1 header") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise WireError(f"the header is not valid UTF-8 JSON: {err}") from err
    if not (isinstance(header, dict) and header.keys() == {"tree", "arrays"}):
        raise WireError(
            f"the header must be a JSON object with keys 'tree' and 'arrays', got {_short(header)}"
        )
    decoder = _Decoder(view, data_start, limits)
    decoder.table(header["arrays"])
    result = decoder.node(header["tree"], 0, "$")
    if decoder.next_leaf != len(decoder.arrays):
        raise WireError(
            f"the header declares {len(decoder.arrays)} arrays but its tree uses "
            f"{decoder.next_leaf}"
        )
    return result


def is_binary(buf: object) -> bool:
    """Tell a bray binary body from anything else (a JSON body, a parsed dict, text).

    Args:
        buf: Whatever the request carried.

    Returns:
        True when ``buf`` is a bytes-like object starting with :data:`MAGIC`.
    """
    if isinstance(buf, (bytes, bytearray)):
        return buf.startswith(MAGIC)
    if isinstance(buf, memoryview):
        try:
            return bytes(_as_byte_view(buf)[: len(MAGIC)]) == MAGIC
        except (WireError, TypeError, ValueError):
            return False
    return False


# --------------------------------------------------------------------------- JSON


def to_jsonable(obj: NestedArray) -> Any:
    """Turn a NestedArray into plain Python data for ``json.dumps``.

    Arrays become nested lists (``tolist``), numpy scalars Python numbers, tuples lists,
    dicts dicts. Non-finite floats come out as ``nan``/``inf`` floats, which
    ``json.dumps`` writes as ``NaN``/``Infinity`` (Python's json reads those back).

    Args:
        obj: The NestedArray.

    Returns:
        Lists, dicts, ints, floats and bools.

    Raises:
        WireError: ``obj`` is not a NestedArray, or holds complex numbers (JSON has none;
            use the binary form).
    """
    return _to_jsonable(obj, 0, "$")


def _to_jsonable(obj: Any, depth: int, path: str) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.kind not in "biuf":
            raise WireError(
                f"{obj.dtype} values at {path} have no JSON form; "
                + ("use the binary format" if obj.dtype.kind == "c" else f"expected one of {_DTYPE_LIST}")
            )
        return obj.tolist()
    if isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, complex):
        raise WireError(f"complex values at {path} have no JSON form; use the binary format")
    if depth >= _MAX_DEPTH_CAP:
        _too_deep(path, _MAX_DEPTH_CAP)
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(item, depth + 1, f"{path}[{i}]") for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise WireError(f"dict keys must be str, got {_type_name(key)} {key!r} at {path}")
            out[key] = _to_jsonable(value, depth + 1, _key_path(path, key))
        return out
    raise WireError(f"expected an ndarray, list, tuple, dict or number at {path}, got {_type_name(obj)}")


# From the kind numpy infers for JSON numbers to the kinds an explicit dtype may take.
_JSON_CASTS = {"b": "biufc", "i": "iufc", "u": "iufc", "f": "fc", "c": "c"}


class _FromJson:
    def __init__(self, dtype: np.dtype | None, limits: WireLimits) -> None:
        self.dtype = dtype
        self.limits = limits
        self.count = 0
        self.total = 0

    def node(self, obj: Any, depth: int, path: str) -> NestedArray:
        if isinstance(obj, np.ndarray):
            return self.leaf(obj, path, from_python=False)
        if isinstance(obj, (bool, int, float)) or (
            isinstance(obj, np.generic) and obj.dtype.kind in "biufc"
        ):
            return self.leaf(np.asarray(obj), path, from_python=True)
        if isinstance(obj, dict):
            if depth >= self.limits.max_depth:
                _too_deep(path, self.limits.max_depth)
            out: dict[str, NestedArray] = {}
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise WireError(f"dict keys must be str, got {_type_name(key)} {key!r} at {path}")
                out[key] = self.node(value, depth + 1, _key_path(path, key))
            return out
        if isinstance(obj, (list, tuple)):
            block = self.numeric_block(obj)
            if block is not None:
                return self.leaf(block, path, from_python=True)
            if not self.holds_dict(obj, path):
                self.diagnose(obj, path)
            if depth >= self.limits.max_depth:
                _too_deep(path, self.limits.max_depth)
            return [self.node(item, depth + 1, f"{path}[{i}]") for i, item in enumerate(obj)]
        raise WireError(
            f"expected a number, a list or a dict at {path}, got {_type_name(obj)} {_short(obj)}"
        )

    @staticmethod
    def numeric_block(obj: list[Any] | tuple[Any, ...]) -> np.ndarray | None:
        """The list as one numeric array, or None when numpy cannot make one."""
        try:
            arr = np.asarray(obj)
        except (ValueError, TypeError, OverflowError, RecursionError):
            return None
        return arr if arr.dtype.kind in "biufc" else None

    def holds_dict(self, obj: list[Any] | tuple[Any, ...], path: str) -> bool:
        """Whether a dict hides in this list's nesting (then it is a container, not an array)."""
        bound = self.limits.max_depth + self.limits.max_ndim
        stack: list[tuple[Any, int]] = [(obj, 0)]
        while stack:
            item, level = stack.pop()
            if isinstance(item, dict):
                return True
            if isinstance(item, (list, tuple)):
                if level >= bound:
                    raise WireError(
                        f"lists nested more than {bound} deep at {path}; expected at most "
                        f"max_ndim={self.limits.max_ndim} levels for an array inside "
                        f"max_depth={self.limits.max_depth} containers"
                    )
                stack.extend((child, level + 1) for child in item)
        return False

    def diagnose(self, obj: list[Any] | tuple[Any, ...], path: str) -> NoReturn:
        """Say why a dict-free list is not a numeric array."""

        def shape_of(item: Any, where: str) -> tuple[int, ...]:
            if isinstance(item, (list, tuple)):
                shapes = [shape_of(x, f"{where}[{i}]") for i, x in enumerate(item)]
                for i, shape in enumerate(shapes[1:], 1):
                    if shape != shapes[0]:
                        raise WireError(
                            f"ragged list at {where}: {where}[{i}] has shape {list(shape)} but "
                            f"{where}[0] has shape {list(shapes[0])}; a numeric list must be "
                            "rectangular (pad it, or send a list of dicts)"
                        )
                return (len(item),) + (shapes[0] if shapes else ())
            if isinstance(item, np.ndarray):
                return item.shape
            if isinstance(item, int) and not isinstance(item, bool) and not -(2**63) <= item < 2**64:
                raise WireError(f"integer {item} at {where} does not fit in 64 bits")
            if isinstance(item, (bool, int, float, np.number, np.bool_)):
                return ()
            raise WireError(
                f"expected a number at {where}, got {_type_name(item)} {_short(item)}"
            )

        shape_of(obj, path)
        raise WireError(f"list at {path} is not a numeric array (mixed or unsupported values)")

    def leaf(self, arr: np.ndarray, path: str, *, from_python: bool) -> np.ndarray:
        if self.count >= self.limits.max_arrays:
            raise WireError(f"more than max_arrays={self.limits.max_arrays} arrays (at {path})")
        if arr.ndim > self.limits.max_ndim:
            raise WireError(
                f"array at {path} has {arr.ndim} dimensions, over max_ndim={self.limits.max_ndim}"
            )
        kind = arr.dtype.kind
        if self.dtype is not None:
            arr = self.cast(arr, self.dtype, path)
        elif from_python:
            if kind == "u":  # numpy picks uint64 only for ints above int64's range
                raise WireError(f"integers at {path} exceed int64; pass dtype=np.uint64")
            target = {"b": np.dtype(bool), "i": np.dtype(np.int64), "f": np.dtype(np.float32),
                      "c": np.dtype(np.complex64)}[kind]
            arr = self.cast(arr, target, path)
        else:
            _wire_dtype_name(arr.dtype, f"array at {path}")
        self.count += 1
        self.total += arr.nbytes
        if self.total > self.limits.max_total_bytes:
            raise WireError(
                f"arrays up to {path} take {self.total} bytes, over "
                f"max_total_bytes={self.limits.max_total_bytes}"
            )
        return arr

    @staticmethod
    def cast(arr: np.ndarray, target: np.dtype, path: str) -> np.ndarray:
        if arr.dtype == target:
            return arr
        if target.kind not in _JSON_CASTS.get(arr.dtype.kind, ""):
            raise WireError(
                f"values at {path} are {arr.dtype} but {target} was expected; "
                "send numbers of that kind or pass another dtype"
            )
        if target.kind in "iu" and arr.size:
            info = np.iinfo(target)
            low, high = arr.min(), arr.max()
            if low < info.min or high > info.max:
                raise WireError(
                    f"values at {path} range over [{low}, {high}], outside {target} "
                    f"[{info.min}, {info.max}]"
                )
        try:
            with np.errstate(over="raise"):
                return arr.astype(target)
        except FloatingPointError as err:
            raise WireError(
                f"values at {path} overflow {target}; pass dtype=np.float64"
            ) from err


def from_jsonable(
    obj: Any, *, dtype: np.dtype | type | str | None = None, limits: WireLimits = DEFAULT_LIMITS
) -> NestedArray:
    """Turn JSON-parsed data into a NestedArray.

    - A number, or a rectangular (nested) list of numbers and bools, becomes one array.
      Without ``dtype``: all bools -> ``bool``; ints (and bools) -> ``int64``; any float ->
      ``float32`` (policies run in float32; pass ``dtype=np.float64`` to keep doubles).
      An empty list is a ``(0,)`` array.
    - A dict becomes a dict of NestedArrays.
    - A list holding a dict anywhere in it (e.g. a list of observations) becomes a list
      of NestedArrays; JSON has no tuples.
    - ``np.ndarray`` leaves are kept (cast when ``dtype`` is given).

    Args:
        obj: The output of ``json.loads`` (TorchServe passes JSON bodies parsed).
        dtype: One dtype for every array (ints may narrow when their values fit, floats
            never become ints), or None to infer as above.
        limits: Depth, array count, ndim and byte bounds.

    Returns:
        The NestedArray.

    Raises:
        WireError: Strings, None, ragged numeric lists, non-str keys, values that do not
            fit ``dtype``, or anything over ``limits``; the message gives the path (``$.obs[2]``).
        ConfigError: ``dtype`` is not one of :data:`SUPPORTED_DTYPES`.
    """
    target = None
    if dtype is not None:
        try:
            given = np.dtype(dtype)
        except TypeError as err:
            raise ConfigError(f"dtype must be one of {_DTYPE_LIST}, got {dtype!r}") from err
        try:
            target = _WIRE_DTYPES[_wire_dtype_name(given, "the dtype argument")].newbyteorder("=")
        except WireError as err:
            raise ConfigError(f"dtype must be one of {_DTYPE_LIST}, got {dtype!r}") from err
    return _FromJson(target, limits).node(obj, 0, "$")


# --------------------------------------------------------------------------- structure


def _walk(obj: Any, depth: int, path: str, on_leaf: Any) -> None:
    if isinstance(obj, np.ndarray):
        on_leaf(obj)
    elif isinstance(obj, _SCALARS):
        on_leaf(np.asarray(obj))
    elif isinstance(obj, (list, tuple, dict)):
        if depth >= _MAX_DEPTH_CAP:
            _too_deep(path, _MAX_DEPTH_CAP)
        if isinstance(obj, dict):
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise WireError(f"dict keys must be str, got {_type_name(key)} {key!r} at {path}")
                _walk(value, depth + 1, _key_path(path, key), on_leaf)
        else:
            for i, item in enumerate(obj):
                _walk(item, depth + 1, f"{path}[{i}]", on_leaf)
    else:
        raise WireError(
            f"expected an ndarray, list, tuple, dict or number at {path}, got {_type_name(obj)}"
        )


def leaves(obj: NestedArray) -> list[np.ndarray]:
    """The arrays of a NestedArray, depth first, dict entries in insertion order.

    This is the order :func:`encode` writes and :func:`unflatten` reads.

    Args:
        obj: The NestedArray; scalars come back as 0-d arrays.

    Returns:
        The arrays themselves (not copies).

    Raises:
        WireError: ``obj`` is not a NestedArray.
    """
    out: list[np.ndarray] = []
    _walk(obj, 0, "$", out.append)
    return out


def nbytes(obj: NestedArray) -> int:
    """Total bytes of the arrays of a NestedArray (headers and padding not counted).

    Raises:
        WireError: ``obj`` is not a NestedArray.
    """
    return sum(arr.nbytes for arr in leaves(obj))


def unflatten(template: Any, leaves: Sequence[Any]) -> Any:
    """Rebuild ``template``'s structure with ``leaves`` in place of its arrays.

    Everything in ``template`` that is not a list, tuple or dict is a leaf slot, filled
    in :func:`leaves` order; the new leaves may be of any type (tensors, slices).

    Args:
        template: A NestedArray (or anything of the same shape of containers).
        leaves: Exactly one item per leaf slot of ``template``.

    Returns:
        New containers of the same kinds (tuples stay tuples, dict key order kept).

    Raises:
        WireError: The number of leaves differs from the template's.
    """
    items = list(leaves)
    it = iter(items)
    used = 0

    def build(node: Any, depth: int, path: str) -> Any:
        nonlocal used
        if isinstance(node, (list, tuple, dict)):
            if depth >= _MAX_DEPTH_CAP:
                _too_deep(path, _MAX_DEPTH_CAP)
            if isinstance(node, dict):
                return {k: build(v, depth + 1, _key_path(path, str(k))) for k, v in node.items()}
            built = [build(x, depth + 1, f"{path}[{i}]") for i, x in enumerate(node)]
            return tuple(built) if isinstance(node, tuple) else built
        try:
            leaf = next(it)
        except StopIteration:
            raise WireError(
                f"unflatten got {len(items)} leaves, but the template needs more (ran out at {path})"
            ) from None
        used += 1
        return leaf

    result = build(template, 0, "$")
    if used != len(items):
        raise WireError(f"unflatten got {len(items)} leaves, but the template has {used} slots")
    return result


def structure(obj: NestedArray, *, batch_dim: bool = True) -> str:
    """A short description, e.g. ``tuple(float32[4,64], dict(a=int64[4]))``.

    Equal strings mean the same containers, keys, dtypes and shapes, so it serves as a
    grouping key as well as for error messages.

    Args:
        obj: The NestedArray.
        batch_dim: With False, every array's first dimension is written ``*``
            (``float32[*,64]``), to group requests that differ only in batch size.

    Returns:
        The description.

    Raises:
        WireError: ``obj`` is not a NestedArray.
    """
    return _structure(obj, 0, "$", batch_dim)


def _structure(obj: Any, depth: int, path: str, batch_dim: bool) -> str:
    if isinstance(obj, (np.ndarray, *_SCALARS)):
        arr = np.asarray(obj)
        dims = [str(d) for d in arr.shape]
        if dims and not batch_dim:
            dims[0] = "*"
        return f"{arr.dtype.name}[{','.join(dims)}]"
    if isinstance(obj, (list, tuple, dict)):
        if depth >= _MAX_DEPTH_CAP:
            _too_deep(path, _MAX_DEPTH_CAP)
        if isinstance(obj, dict):
            parts = []
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise WireError(f"dict keys must be str, got {_type_name(key)} {key!r} at {path}")
                label = key if key.isidentifier() else repr(key)
                parts.append(f"{label}={_structure(value, depth + 1, _key_path(path, key), batch_dim)}")
            return f"dict({', '.join(parts)})"
        inner = ", ".join(
            _structure(item, depth + 1, f"{path}[{i}]", batch_dim) for i, item in enumerate(obj)
        )
        return f"{'tuple' if isinstance(obj, tuple) else 'list'}({inner})"
    raise WireError(f"expected an ndarray, list, tuple, dict or number at {path}, got {_type_name(obj)}")
