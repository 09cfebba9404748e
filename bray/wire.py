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
import struct
from dataclasses import dataclass
from typing import Any, Sequence, TypeAlias, Union

import numpy as np

from bray import tree
from bray.errors import ConfigError, WireError

__all__ = [
    "ALIGNMENT",
    "CONTENT_TYPE",
    "DEFAULT_LIMITS",
    "MAGIC",
    "MIN_STEP_HEADER",
    "NestedArray",
    "SEGMENTS_HEADER",
    "STEPS_HEADER",
    "STEP_HEADER",
    "SUPPORTED_DTYPES",
    "Segment",
    "VERSION",
    "WEIGHTS_HEADER",
    "WORKER_HEADER",
    "WireLimits",
    "decode",
    "decode_leaves",
    "encode",
    "encode_parts",
    "encode_segments",
    "is_binary",
    "parse_segments",
    "to_jsonable",
]

NestedArray: TypeAlias = Union[
    np.ndarray, "list[NestedArray]", "tuple[NestedArray, ...]", "dict[str, NestedArray]"
]

#: TorchServe hands bodies of this type to the handler as ``bytearray``.
CONTENT_TYPE = "application/octet-stream"
# HTTP headers of the bray protocol, beside the body: the step whose weights answered and
# the worker that answered (responses); the newest step the caller has already been
# answered with, which a lagging worker catches up to first (requests); the weight set
# (a clone of the model) a request wants, absent for the model's own weights (requests).
STEP_HEADER = "X-Bray-Step"
WORKER_HEADER = "X-Bray-Worker"
MIN_STEP_HEADER = "X-Bray-Min-Step"
WEIGHTS_HEADER = "X-Bray-Weights"
# One request for several weight sets (what the node proxy sends for a round of a league):
# the body's rows in consecutive segments, each for one weight set (request), and the step
# that answered each segment, in the same order (response). See encode_segments.
SEGMENTS_HEADER = "X-Bray-Segments"
STEPS_HEADER = "X-Bray-Steps"
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
_NAME_OF: dict[np.dtype, str] = {dt: name for name, dt in _WIRE_DTYPES.items()}
_BY_KIND_SIZE: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in _WIRE_DTYPES.items()
}
_DTYPE_LIST = ", ".join(SUPPORTED_DTYPES)
# Upper bounds on the limits themselves. Decoding and encoding recurse once per container
# level and json nests about three levels per dict, so 100 keeps far below Python's
# default recursion limit; numpy arrays have at most 64 dimensions.
_MAX_DEPTH_CAP = tree.MAX_DEPTH
_MAX_NDIM_CAP = 64
_U32_MAX = 2**32 - 1
_MAX_TOTAL_CAP = 2**62
_SCALARS = (bool, int, float, complex, np.generic)


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


def _type_name(obj: object) -> str:
    kind = type(obj)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


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
                f"{where} has dimension {d} in shape {tree.short(list(shape))}, over "
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
            "JSON bodies are read against the model's spec (bray.handlers.request.parse_request)"
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
    """Checks a flattened NestedArray's leaves and lays out their buffers."""

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        self.specs: list[list[Any]] = []
        self.buffers: list[tuple[int, np.ndarray]] = []
        self.end = 0

    def leaves(self, leaves: list[Any], treedef: tree.TreeDef) -> None:
        if len(leaves) > self.limits.max_arrays:
            raise WireError(
                f"more than max_arrays={self.limits.max_arrays} arrays (at {treedef.paths()[self.limits.max_arrays]}); "
                "stack them into fewer arrays or raise WireLimits(max_arrays=...)"
            )
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, np.ndarray):
                self.leaf(leaf, i, treedef)
            elif isinstance(leaf, _SCALARS):
                self.leaf(np.asarray(leaf), i, treedef)
            else:
                raise WireError(
                    f"expected an ndarray, list, tuple, dict or number at {treedef.paths()[i]}, got {_type_name(leaf)}"
                    + ("; convert tensors with .numpy() first" if hasattr(leaf, "numpy") else "")
                )

    def leaf(self, arr: np.ndarray, index: int, treedef: tree.TreeDef) -> None:
        arr = np.asarray(arr)  # drop ndarray subclasses
        name = _NAME_OF.get(arr.dtype)  # dtype.name is a slow property: look the dtype up
        if name is None:  # big-endian, or not carried: check, then cast
            name = _wire_dtype_name(arr.dtype, f"array at {treedef.paths()[index]}")
            arr = arr.astype(_WIRE_DTYPES[name])
        dtype = _WIRE_DTYPES[name]
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        # A screen for _check_extent, not a second rule: every shape _check_extent refuses
        # fails it (a dimension over the limit makes the span over it too), and the one
        # check with its messages runs only then (it costs ~1 us an array, a forward has few).
        if arr.ndim > self.limits.max_ndim or math.prod(max(d, 1) for d in arr.shape) * dtype.itemsize > self.limits.max_total_bytes:
            _check_extent(f"array at {treedef.paths()[index]}", arr.shape, name, self.limits)
        offset = _align(self.end)
        self.specs.append([name, list(arr.shape), offset, arr.nbytes])
        self.buffers.append((offset, arr))
        self.end = offset + arr.nbytes


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
    flat, treedef = tree.flatten(obj, max_depth=limits.max_depth)
    key: tuple[Any, ...] | None = (treedef,)
    for leaf in flat:  # contiguous arrays (not subclasses, not scalars) only: their bytes go as they are
        if type(leaf) is not np.ndarray or not leaf.flags.c_contiguous:
            key = None
            break
        key += (leaf.dtype, leaf.shape)  # type: ignore[operator]
    layout = _ENCODED.get(key) if key is not None else None
    if layout is None or not (layout.limits is limits or layout.limits == limits):
        enc = _Encoder(limits)
        enc.leaves(flat, treedef)
        layout = _encode_layout(treedef, enc.specs, enc.end, limits)
        arrays = [arr for _, arr in enc.buffers]
        # Kept for arrays that go as they are (no cast to little-endian, no copy): the same
        # dtypes and shapes then make the same header and go the same way.
        if key is not None and all(arr is leaf for arr, leaf in zip(arrays, flat)):
            _keep(_ENCODED, key, layout)
        flat = arrays
    parts: list[bytes | memoryview] = [layout.head]
    pos = 0
    for (_, _, offset, nbytes), arr in zip(layout.arrays, flat):
        if offset > pos:
            parts.append(_PAD[: offset - pos])
        if nbytes:
            parts.append(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
        pos = offset + nbytes
    return parts


@dataclass(frozen=True)
class _Layout:
    """One structure's binary form, checked against ``limits``: its head and where its arrays go.

    Calls repeat the same structure (one observation, the same dtypes, call after call): the
    codec keeps the layouts of the last few structures it encoded (by tree, dtypes and
    shapes) and decoded (by header bytes), and then copies or views arrays instead of
    writing and parsing the JSON header again. A layout is only made by the full encode or
    decode, which check everything, and is used again only for the same structure, body
    length and limits.
    """

    head: bytes  # prefix, header and padding up to the first array
    treedef: tree.TreeDef
    arrays: list[tuple[np.dtype, tuple[int, ...], int, int]]  # dtype, shape, offset after the head, nbytes
    total: int  # the body's bytes
    limits: WireLimits


_LAYOUTS_KEPT = 64  # structures x batch sizes a process meets (coalesced requests of 1..N rows)
_ENCODED: dict[tuple[Any, ...], _Layout] = {}
_DECODED: dict[bytes, _Layout] = {}


def _keep(cache: dict[Any, _Layout], key: Any, layout: _Layout) -> None:
    if len(cache) >= _LAYOUTS_KEPT:
        cache.clear()  # a process that meets that many structures gains little from any one
    cache[key] = layout


def _encode_layout(treedef: tree.TreeDef, specs: list[list[Any]], end: int, limits: WireLimits) -> _Layout:
    header = json.dumps({"tree": treedef.to_json(), "arrays": specs}, separators=(",", ":")).encode()
    if len(header) > limits.max_header_bytes:
        raise WireError(
            f"the header is {len(header)} bytes, over max_header_bytes={limits.max_header_bytes}; "
            "use fewer arrays or shorter keys, or raise WireLimits(max_header_bytes=...)"
        )
    data_start = _align(_PREFIX.size + len(header))
    total = data_start + end
    if total > limits.max_total_bytes:
        raise WireError(
            f"the body would be {total} bytes, over max_total_bytes={limits.max_total_bytes}; "
            "send smaller batches or raise WireLimits(max_total_bytes=...)"
        )
    head = _PREFIX.pack(MAGIC, VERSION, len(header)) + header
    arrays = [(_WIRE_DTYPES[name], tuple(shape), offset, nbytes) for name, shape, offset, nbytes in specs]
    return _Layout(head + _PAD[: data_start - len(head)], treedef, arrays, total, limits)


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
    raise WireError(f"{where} must be a non-negative integer, got {tree.short(value)}")


class _Decoder:
    """Validates a parsed header against the body and builds the views."""

    def __init__(self, view: memoryview, data_start: int, limits: WireLimits) -> None:
        self.view = view
        self.data_start = data_start
        self.data_len = view.nbytes - data_start
        self.limits = limits
        self.arrays: list[np.ndarray] = []

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
                raise WireError(f"{where}: expected [dtype, shape, offset, nbytes], got {tree.short(spec)}")
            name, shape, offset, length = spec
            if not (isinstance(name, str) and name in _WIRE_DTYPES):
                raise WireError(f"{where} has dtype {tree.short(name)}; expected one of {_DTYPE_LIST}")
            if not isinstance(shape, list):
                raise WireError(f"{where}: shape must be a list of integers, got {tree.short(shape)}")
            if len(shape) > self.limits.max_ndim:
                raise WireError(
                    f"{where} has {len(shape)} dimensions, over max_ndim={self.limits.max_ndim}"
                )
            for d in shape:
                if type(d) is not int or d < 0:  # the message (and its repr) only when needed
                    _int_field(d, f"{where}: every dimension of shape {tree.short(shape)}")
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
    arrays, treedef = decode_leaves(buf, limits=limits)
    return treedef.unflatten(arrays)


def decode_leaves(
    buf: bytes | bytearray | memoryview, *, limits: WireLimits = DEFAULT_LIMITS
) -> tuple[list[np.ndarray], tree.TreeDef]:
    """:func:`decode` as :func:`bray.tree.flatten` would give it: the arrays and the tree
    definition (``treedef.unflatten(arrays)`` is what :func:`decode` returns), for a
    caller that goes on with the leaves (the node proxy's batcher).

    Raises:
        WireError: As :func:`decode`.
    """
    view = _as_byte_view(buf)
    total = view.nbytes
    if total >= _PREFIX.size:  # a structure decoded before: its checked layout (same header and length)
        header_end = _PREFIX.size + _PREFIX.unpack_from(view)[2]
        layout = _DECODED.get(bytes(view[:header_end])) if header_end <= total else None
        if layout is not None and layout.total == total and (layout.limits is limits or layout.limits == limits):
            data_start = len(layout.head)
            return [np.frombuffer(view, dtype=dtype, count=nbytes // dtype.itemsize, offset=data_start + offset)
                    .reshape(shape) for dtype, shape, offset, nbytes in layout.arrays], layout.treedef
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
            f"the header must be a JSON object with keys 'tree' and 'arrays', got {tree.short(header)}"
        )
    decoder = _Decoder(view, data_start, limits)
    decoder.table(header["arrays"])
    treedef = tree.TreeDef.from_json(header["tree"], max_depth=limits.max_depth)
    if treedef.num_leaves != len(decoder.arrays):
        raise WireError(
            f"the header declares {len(decoder.arrays)} arrays but its tree uses "
            f"{treedef.num_leaves}"
        )
    arrays = [(arr.dtype, arr.shape, offset, nbytes) for arr, (_, _, offset, nbytes) in zip(decoder.arrays, header["arrays"])]
    _keep(_DECODED, bytes(view[: _PREFIX.size + header_len]),
          _Layout(bytes(view[:data_start]), treedef, arrays, total, limits))
    return decoder.arrays, treedef


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
    JSON bodies are read the other way against the model's spec, in
    :mod:`bray.handlers.request`.

    Args:
        obj: The NestedArray.

    Returns:
        Lists, dicts, ints, floats and bools.

    Raises:
        WireError: ``obj`` is not a NestedArray, or holds complex numbers (JSON has none;
            use the binary form).
    """
    flat, treedef = tree.flatten(obj)
    out = []
    for i, leaf in enumerate(flat):
        if isinstance(leaf, (np.ndarray, np.generic)):
            if leaf.dtype.kind not in "biuf":
                raise WireError(
                    f"{leaf.dtype} values at {treedef.paths()[i]} have no JSON form; "
                    + ("use the binary format" if leaf.dtype.kind == "c" else f"expected one of {_DTYPE_LIST}")
                )
            out.append(leaf.tolist())
        elif isinstance(leaf, (bool, int, float)):
            out.append(leaf)
        elif isinstance(leaf, complex):
            raise WireError(f"complex values at {treedef.paths()[i]} have no JSON form; use the binary format")
        else:
            raise WireError(f"expected an ndarray, list, tuple, dict or number at {treedef.paths()[i]}, "
                            f"got {_type_name(leaf)}")
    return treedef.unflatten(out, tuples=False)


@dataclass(frozen=True)
class Segment:
    """Consecutive rows of one request that one weight set answers (``X-Bray-Segments``).

    Attributes:
        rows: how many rows of the body, after the previous segments' rows.
        min_step: the newest step the caller was answered with for that weight set (-1: none).
        weight_set: the clone whose weights answer them; ``None``: the model's own.
    """

    rows: int
    min_step: int = -1
    weight_set: str | None = None


def encode_segments(segments: Sequence[Segment]) -> str:
    """The ``X-Bray-Segments`` value: ``rows:min_step:weight_set`` per segment, ``;`` between.

    The weight set comes last and may be empty (the model's own weights); clone names hold
    no ``;``.
    """
    return ";".join(f"{s.rows}:{s.min_step}:{s.weight_set or ''}" for s in segments)


def parse_segments(value: str, *, rows: int) -> list[Segment]:
    """Read an ``X-Bray-Segments`` value for a body of ``rows`` rows.

    Raises:
        WireError: it is not ``rows:min_step:name`` entries whose rows add up to ``rows``.
    """
    segments: list[Segment] = []
    for entry in value.split(";"):
        parts = entry.split(":", 2)
        try:
            if len(parts) != 3:
                raise ValueError
            n, min_step = int(parts[0]), int(parts[1])
        except ValueError:
            raise WireError(f"{SEGMENTS_HEADER} takes rows:min_step:weight_set entries separated by ';', "
                            f"got {entry[:60]!r}") from None
        if n < 1:
            raise WireError(f"{SEGMENTS_HEADER}: a segment of {n} rows; each holds at least one")
        segments.append(Segment(n, min_step, parts[2] or None))
    total = sum(s.rows for s in segments)
    if total != rows:
        raise WireError(f"{SEGMENTS_HEADER} covers {total} rows, the body holds {rows}")
    return segments
