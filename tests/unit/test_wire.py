"""The NestedArray wire codec: round trips, zero copy, JSON, and hostile bodies."""

from __future__ import annotations

import json
import pickle
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bray import tree, wire
from bray.errors import ConfigError, WireError
from bray.wire import (
    ALIGNMENT,
    MAGIC,
    SUPPORTED_DTYPES,
    WireLimits,
    decode,
    encode,
    encode_parts,
    is_binary,
    to_jsonable,
)

pytestmark = pytest.mark.unit

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- helpers


def _canonical(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype.name).newbyteorder("<")


def assert_same(got: Any, want: Any, path: str = "$") -> None:
    """Exact equality: container kinds, key order, dtype, shape and bytes."""
    if isinstance(want, (np.ndarray, np.generic, bool, int, float, complex)):
        want = np.asarray(want)
        assert isinstance(got, np.ndarray), f"{path}: {type(got)}"
        assert got.dtype == _canonical(want.dtype), f"{path}: {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: {got.shape} != {want.shape}"
        assert got.tobytes() == want.astype(got.dtype).tobytes(), f"{path}: values differ"
        return
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{path}.{key}")
    else:
        assert len(got) == len(want), f"{path}: length"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")


def frame(header: Any, data: bytes = b"", *, version: int = 1, header_len: int | None = None,
          pad: bool = True) -> bytes:
    """A hand-built body: prefix, header (object -> JSON, or raw bytes), padding, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    head = struct.pack("<4sBI", MAGIC, version, length) + raw
    if pad:
        head += bytes(-len(head) % ALIGNMENT)
    return head + data


SMALL = (np.arange(6, dtype=np.float32).reshape(2, 3), {"a": np.array([1, 2], np.int64)})

# --------------------------------------------------------------------------- strategies


@st.composite
def wire_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(SUPPORTED_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    arr = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["c", "big-endian", "fortran", "strided"]))
    if layout == "big-endian":
        arr = arr.astype(dtype.newbyteorder(">"))
    elif layout == "fortran":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim:
        arr = np.repeat(arr, 2, axis=0)[::2]
    return arr


KEYS = st.text(max_size=6)


def nested(leaf: st.SearchStrategy[Any], depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return leaf
    child = nested(leaf, depth - 1)
    return st.one_of(
        leaf,
        st.lists(child, max_size=3),
        st.lists(child, max_size=3).map(tuple),
        st.dictionaries(KEYS, child, max_size=3),
    )


NESTED = nested(wire_arrays(), 4)


@st.composite
def json_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays whose JSON form reads back exactly: float32, int64, bool, no empty axis."""
    dtype = draw(st.sampled_from([np.float32, np.int64, np.bool_]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))
    elements = st.floats(width=32, allow_nan=False) if dtype is np.float32 else None
    return draw(hnp.arrays(dtype, shape, elements=elements))


def json_nested(depth: int) -> st.SearchStrategy[Any]:
    # A JSON list is a container only if it holds dicts; lists of arrays would read back
    # as one stacked array, and tuples come back as lists.
    if depth == 0:
        return json_arrays()
    child = json_nested(depth - 1)
    dicts = st.dictionaries(KEYS, child, max_size=3)
    return st.one_of(json_arrays(), dicts, st.lists(dicts, min_size=1, max_size=3))


# --------------------------------------------------------------------------- round trips


@FAST
@given(NESTED)
def test_round_trip_preserves_everything(obj: Any) -> None:
    body = encode(obj)
    assert_same(decode(body), obj)
    assert_same(decode(bytearray(body)), obj)
    assert_same(decode(memoryview(body)), obj)
    assert b"".join(encode_parts(obj)) == body
    assert is_binary(body)


@FAST
@given(NESTED)
def test_the_header_tree_is_bray_tree_s_definition(obj: Any) -> None:
    flat, treedef = tree.flatten(obj)
    header_len = struct.unpack_from("<I", encode(obj), 5)[0]
    assert json.loads(encode(obj)[9:9 + header_len])["tree"] == treedef.to_json()
    got_flat, got_def = tree.flatten(decode(encode(obj)))
    assert got_def == treedef
    assert [a.nbytes for a in got_flat] == [np.asarray(a).nbytes for a in flat]


@settings(max_examples=100, deadline=None)
@given(json_nested(3))
def test_json_round_trip(obj: Any) -> None:
    back = json.loads(json.dumps(to_jsonable(obj)))
    flat, treedef = tree.flatten(obj)
    # JSON has no tuples: the containers come back as lists and dicts in the same order.
    assert tree.flatten_up_to(treedef, back) == [np.asarray(a).tolist() for a in flat]


def test_scalars_become_0d_arrays() -> None:
    got = decode(encode([1, 2.5, True, np.float16(3), 1j]))
    assert [(a.dtype.name, a.shape) for a in got] == [
        ("int64", ()), ("float64", ()), ("bool", ()), ("float16", ()), ("complex128", ()),
    ]


def test_empty_containers_and_bare_array() -> None:
    for obj in ([], (), {}, [[], {}, ()], np.zeros((0, 3), np.uint8), np.float32(2)):
        assert_same(decode(encode(obj)), obj)


# --------------------------------------------------------------------------- zero copy


def _address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_decode_is_zero_copy_and_aligned(kind: str) -> None:
    obj = {"obs": np.ones((64, 64), np.float32), "mask": np.ones(3, bool), "h": np.ones(5, np.float64)}
    body = encode(obj)
    buf = {"bytes": body, "bytearray": bytearray(body), "memoryview": memoryview(body)}[kind]
    base = np.frombuffer(buf, np.uint8)
    got = decode(buf)
    for arr in got.values():
        assert np.shares_memory(arr, base)
        assert (_address(arr) - _address(base)) % ALIGNMENT == 0
        assert arr.flags.aligned and arr.flags.c_contiguous
        assert arr.flags.writeable == (kind == "bytearray")


def test_bytearray_views_see_writes_to_the_body() -> None:
    buf = bytearray(encode(np.zeros(4, np.uint8)))
    arr = decode(buf)
    buf[-1] = 7
    assert arr[-1] == 7


def test_encode_parts_does_not_copy_contiguous_arrays() -> None:
    arr = np.arange(100, dtype=np.float32)
    parts = encode_parts([arr])
    views = [p for p in parts if isinstance(p, memoryview)]
    assert len(views) == 1 and np.shares_memory(np.frombuffer(views[0], np.uint8), arr)


def test_layout_prefix_and_padding() -> None:
    body = encode(np.zeros(3, np.float32))
    assert body[:4] == MAGIC and body[4] == 1
    (header_len,) = struct.unpack_from("<I", body, 5)
    header = json.loads(body[9:9 + header_len])
    assert header == {"tree": 0, "arrays": [["float32", [3], 0, 12]]}
    assert len(body) == ALIGNMENT + 12


# --------------------------------------------------------------------------- encode errors


class Tensorish:
    def numpy(self) -> np.ndarray:
        return np.zeros(1)


@pytest.mark.parametrize(
    "obj, match",
    [
        (np.array([object()]), "dtype object"),
        (np.array(["a"]), "dtype <U1"),
        (np.zeros(2, "V4"), "dtype"),
        (np.zeros(2, "datetime64[s]"), "dtype datetime64"),
        (np.zeros(2, [("x", "f4")]), "dtype"),
        (np.zeros(2, np.longdouble) if np.dtype(np.longdouble).itemsize > 8 else np.zeros(2, "O"), "dtype"),
        ("text", "got str"),
        (None, "got NoneType"),
        (Tensorish(), r"\.numpy\(\) first"),
        ({1: np.zeros(1)}, "keys must be str"),
        ([2**70], "dtype object"),
    ],
    ids=["object", "unicode", "void", "datetime", "structured", "longdouble", "str", "none",
         "tensor", "int-key", "huge-int"],
)
def test_encode_rejects(obj: Any, match: str) -> None:
    with pytest.raises(WireError, match=match):
        encode(obj)


def test_encode_checks_limits() -> None:
    with pytest.raises(WireError, match="max_arrays=2"):
        encode([np.zeros(1)] * 3, limits=WireLimits(max_arrays=2))
    with pytest.raises(WireError, match="max_depth=2"):
        encode([[[np.zeros(1)]]], limits=WireLimits(max_depth=2))
    encode([[np.zeros(1)]], limits=WireLimits(max_depth=2))
    with pytest.raises(WireError, match="max_ndim=2"):
        encode(np.zeros((1, 1, 1)), limits=WireLimits(max_ndim=2))
    with pytest.raises(WireError, match="max_header_bytes=50"):
        encode({"k" * 60: np.zeros(1)}, limits=WireLimits(max_header_bytes=50))
    with pytest.raises(WireError, match="max_total_bytes=1000"):
        encode(np.zeros(1000, np.uint8), limits=WireLimits(max_total_bytes=1000))
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(WireError, match="nested deeper"):
        encode(cyclic)


# --------------------------------------------------------------------------- malformed bodies

ONE = [["float32", [2, 3], 0, 24]]


MALFORMED = {
    "empty": (b"", "truncated"),
    "wrong-magic": (b"GIF89a" + bytes(100), "does not start with b'BRAY'"),
    "json-body": (b'{"obs": [1, 2]}', "does not start with"),
    "wrong-version": (frame({"tree": 0, "arrays": ONE}, bytes(24), version=2), "version 2"),
    "header-len-past-end": (frame({"tree": 0, "arrays": ONE}, header_len=10_000), "only"),
    "header-len-huge": (frame({"tree": 0, "arrays": ONE}, header_len=2**32 - 1), "max_header_bytes"),
    "header-len-short": (frame({"tree": 0, "arrays": ONE}, bytes(24), header_len=5), "not valid UTF-8 JSON"),
    "header-not-utf8": (frame(b"\xff\xfe{}"), "not valid UTF-8 JSON"),
    "header-not-json": (frame(b"{tree: 0}"), "not valid UTF-8 JSON"),
    "header-deep-json": (frame(b"[" * 100_000 + b"]" * 100_000), "nests JSON too deeply"),
    "header-not-object": (frame([0, 1]), "keys 'tree' and 'arrays'"),
    "header-extra-key": (frame({"tree": 0, "arrays": ONE, "x": 1}, bytes(24)), "keys 'tree' and 'arrays'"),
    "header-huge-int": (frame(b'{"tree":0,"arrays":[["uint8",[' + b"9" * 5000 + b"],0,1]]}"), "not valid"),
    "arrays-not-list": (frame({"tree": 0, "arrays": {}}), "must be a list"),
    "unknown-dtype": (frame({"tree": 0, "arrays": [["float128", [1], 0, 16]]}, bytes(16)), "dtype 'float128'"),
    "object-dtype": (frame({"tree": 0, "arrays": [["object", [1], 0, 8]]}, bytes(8)), "dtype 'object'"),
    "big-endian-dtype": (frame({"tree": 0, "arrays": [[">f4", [1], 0, 4]]}, bytes(4)), "dtype '>f4'"),
    "spec-not-list": (frame({"tree": 0, "arrays": ["float32"]}), r"expected \[dtype, shape"),
    "shape-not-list": (frame({"tree": 0, "arrays": [["float32", 6, 0, 24]]}, bytes(24)), "shape must be a list"),
    "negative-dim": (frame({"tree": 0, "arrays": [["float32", [-2, -3], 0, 24]]}, bytes(24)), "non-negative"),
    "float-dim": (frame({"tree": 0, "arrays": [["float32", [2.0, 3], 0, 24]]}, bytes(24)), "non-negative integer"),
    "bool-dim": (frame({"tree": 0, "arrays": [["float32", [True], 0, 4]]}, bytes(4)), "non-negative integer"),
    "too-many-dims": (frame({"tree": 0, "arrays": [["uint8", [1] * 17, 0, 1]]}, bytes(1)), "max_ndim=16"),
    "nbytes-lies": (frame({"tree": 0, "arrays": [["float32", [2, 3], 0, 8]]}, bytes(8)), "nbytes field says 8"),
    "absurd-shape": (
        frame({"tree": 0, "arrays": [["float32", [10**6, 10**6], 0, 4 * 10**12]]}, bytes(1024)),
        r"array 0 declares shape \[1000000, 1000000\] float32 = 4000000000000 bytes at offset 0 "
        r"but only 1024 bytes follow the header",
    ),
    "huge-dim": (frame({"tree": 0, "arrays": [["uint8", [0, 2**62], 0, 0]]}), "dimension 4611686018427387904"),
    "zero-size-overflow": (frame({"tree": 0, "arrays": [["float64", [0] + [2**20] * 15, 0, 0]]}), "spanning"),
    "data-truncated": (frame({"tree": 0, "arrays": ONE}, bytes(20)), "only 20 bytes follow"),
    "trailing-bytes": (frame({"tree": 0, "arrays": ONE}, bytes(30)), "6 bytes after the last array"),
    "misaligned": (frame({"tree": 0, "arrays": [["uint8", [4], 4, 4]]}, bytes(8)), "multiple of 64"),
    "overlap": (
        frame({"tree": {"list": [0, 1]}, "arrays": [["uint8", [80], 0, 80], ["uint8", [4], 64, 4]]}, bytes(128)),
        "inside the previous array",
    ),
    "out-of-order": (
        frame({"tree": {"list": [0, 1]}, "arrays": [["uint8", [4], 64, 4], ["uint8", [4], 0, 4]]}, bytes(68)),
        "inside the previous array",
    ),
    "too-many-arrays": (frame({"tree": 0, "arrays": [["uint8", [0], 0, 0]] * 4097}), "max_arrays=4096"),
    "tree-bad-index": (frame({"tree": 5, "arrays": ONE}, bytes(24)), "refers to leaf 5; expected leaf 0"),
    "tree-reuses-array": (frame({"tree": {"list": [0, 0]}, "arrays": ONE}, bytes(24)), "refers to leaf 0; expected leaf 1"),
    "tree-misses-array": (frame({"tree": {"list": []}, "arrays": ONE}, bytes(24)), "its tree uses 0"),
    "tree-unknown-kind": (frame({"tree": {"set": [0]}, "arrays": ONE}, bytes(24)), "expected list, tuple or dict"),
    "tree-two-kinds": (frame({"tree": {"list": [0], "tuple": []}, "arrays": ONE}, bytes(24)), "leaf index or one of"),
    "tree-string": (frame({"tree": "0", "arrays": ONE}, bytes(24)), "leaf index or one of"),
    "tree-bool-leaf": (frame({"tree": False, "arrays": ONE}, bytes(24)), "leaf index or one of"),
    "dict-bad-pair": (frame({"tree": {"dict": [[1, 0]]}, "arrays": ONE}, bytes(24)), r"\[str key, node\]"),
    "dict-repeated-key": (
        frame({"tree": {"dict": [["a", {"list": []}], ["a", {"list": []}]]}, "arrays": []}),
        "repeats key 'a'",
    ),
    "tree-too-deep": (
        frame({"tree": json.loads('{"list":[' * 40 + "]}" * 40), "arrays": []}),
        "max_depth=32",
    ),
    "not-bytes-str": ("BRAY", "got str"),
    "not-bytes-dict": ({"obs": [1]}, "JSON bodies are read against the model"),
    "not-bytes-int": (7, "got int"),
}


@pytest.mark.parametrize("body, match", MALFORMED.values(), ids=MALFORMED.keys())
def test_decode_rejects_malformed(body: Any, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode(body)


def test_decode_checks_total_size_before_parsing() -> None:
    body = encode(np.zeros(1000, np.uint8))
    with pytest.raises(WireError, match="over max_total_bytes=512"):
        decode(body, limits=WireLimits(max_total_bytes=512))


def test_decode_limits_are_configurable() -> None:
    deep: Any = np.zeros(1)
    for _ in range(40):
        deep = [deep]
    with pytest.raises(WireError, match="max_depth=32"):
        decode(encode(deep, limits=WireLimits(max_depth=40)))
    assert_same(decode(encode(deep, limits=WireLimits(max_depth=40)), limits=WireLimits(max_depth=40)), deep)


def test_kept_layouts_stay_exact_and_checked() -> None:
    """A structure met again reuses its layout: the same bytes and arrays, and the same refusals."""
    obs = {"args": [np.arange(64, dtype=np.float32).reshape(1, 64)], "kwargs": {"m": np.ones((1, 2), bool)}}
    body = encode(obs)
    for _ in range(2):  # the second time from the kept layouts
        assert encode(obs) == body and b"".join(encode_parts(obs)) == body
        assert_same(decode(body), obs)
        assert_same(decode(bytearray(body)), obs)
    # Same dtypes and shapes in another byte order, or not contiguous: written as the full path writes them.
    swapped = {"args": [obs["args"][0].astype(">f4")], "kwargs": obs["kwargs"]}
    assert encode(swapped) == body and encode(swapped) == body
    strided = np.arange(128, dtype=np.float32).reshape(1, 128)[:, ::2]
    assert_same(decode(encode({"args": [strided], "kwargs": obs["kwargs"]})), {"args": [strided], "kwargs": obs["kwargs"]})
    # The same header with another length, or under tighter limits, is checked in full.
    with pytest.raises(WireError, match="follow the header"):
        decode(body[:-1])
    with pytest.raises(WireError, match="after the last array"):
        decode(body + bytes(64))
    with pytest.raises(WireError, match="over max_total_bytes=128"):
        decode(body, limits=WireLimits(max_total_bytes=128))
    with pytest.raises(WireError, match="over max_total_bytes=128"):
        encode(obs, limits=WireLimits(max_total_bytes=128))


def test_every_truncation_raises_wire_error() -> None:
    body = encode((np.arange(5, dtype=np.int16), {"k": [np.float32(1), np.zeros((0, 2))]}))
    for n in range(len(body)):
        with pytest.raises(WireError):
            decode(body[:n])


def test_wire_error_is_a_value_error_and_pickles() -> None:
    with pytest.raises(ValueError) as info:
        decode(b"nope")
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is WireError and str(again) == str(info.value)


# --------------------------------------------------------------------------- fuzz


def _decode_or_wire_error(body: bytes) -> None:
    try:
        decode(body, limits=WireLimits(max_total_bytes=1 << 20))
    except WireError:
        pass


VALID_BODIES = [
    encode(SMALL),
    encode([np.zeros(0, np.float64), (np.ones((2, 2), np.complex64),), {"x": np.int8(3)}]),
    encode({}),
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(tail: bytes) -> None:
    _decode_or_wire_error(tail)
    _decode_or_wire_error(MAGIC + b"\x01" + tail)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID_BODIES), st.data())
def test_fuzz_byte_mutations(body: bytes, data: st.DataObject) -> None:
    buf = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        at = data.draw(st.integers(0, len(buf)))
        if op == "flip" and at < len(buf):
            buf[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[at:at + data.draw(st.integers(1, 8))]
    _decode_or_wire_error(bytes(buf))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


def _replace_somewhere(node: Any, data: st.DataObject) -> Any:
    """Replace one randomly chosen sub-value of a parsed header."""
    if isinstance(node, (list, dict)) and node and data.draw(st.booleans()):
        keys = list(range(len(node))) if isinstance(node, list) else list(node)
        key = data.draw(st.sampled_from(keys))
        copy = list(node) if isinstance(node, list) else dict(node)
        copy[key] = _replace_somewhere(node[key], data)
        return copy
    return data.draw(JSON_VALUES)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID_BODIES), st.data())
def test_fuzz_header_values(body: bytes, data: st.DataObject) -> None:
    (header_len,) = struct.unpack_from("<I", body, 5)
    header = json.loads(body[9:9 + header_len])
    payload = body[-(-(9 + header_len) // ALIGNMENT) * ALIGNMENT:]
    _decode_or_wire_error(frame(_replace_somewhere(header, data), payload))


# --------------------------------------------------------------------------- JSON form


def test_to_jsonable() -> None:
    obj = (np.arange(4, dtype=np.int32).reshape(2, 2), {"a": np.float32(0.5), "b": [True]})
    assert to_jsonable(obj) == [[[0, 1], [2, 3]], {"a": 0.5, "b": [True]}]
    with pytest.raises(WireError, match="no JSON form"):
        to_jsonable(np.ones(2, np.complex64))
    with pytest.raises(WireError, match="got str"):
        to_jsonable(["x"])


# --------------------------------------------------------------------------- is_binary


@pytest.mark.parametrize(
    "body, want",
    [(encode([]), True), (bytearray(encode([])), True), (memoryview(encode([])), True),
     (b"BRA", False), (b'{"a": 1}', False), ({"a": 1}, False), ("BRAY", False), (None, False)],
    ids=["bytes", "bytearray", "memoryview", "short", "json-bytes", "dict", "str", "none"],
)
def test_is_binary(body: Any, want: bool) -> None:
    assert is_binary(body) is want


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_total_bytes": 0}, "max_total_bytes must be an integer in"),
        ({"max_arrays": 0}, "max_arrays must be an integer >= 1, got 0"),
        ({"max_depth": 101}, r"max_depth must be an integer in \[0, 100\], got 101"),
        ({"max_ndim": 65}, r"max_ndim must be an integer in \[0, 64\]"),
        ({"max_header_bytes": 2**32}, "max_header_bytes"),
        ({"max_arrays": 1.5}, "got 1.5"),
        ({"max_arrays": True}, "got True"),
    ],
    ids=["total-zero", "arrays-zero", "depth-over-cap", "ndim-over-cap", "header-over-u32",
         "float", "bool"],
)
def test_limits_are_validated(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        WireLimits(**kwargs)


def test_public_names() -> None:
    assert wire.__all__ == sorted(wire.__all__)
    public = {n for n in vars(wire) if not n.startswith("_")} - {
        "annotations", "json", "math", "reprlib", "struct", "dataclass", "np", "Any", "tree",
        "Sequence", "TypeAlias", "Union", "ConfigError", "WireError",
    }
    assert public == set(wire.__all__)


def test_segments_header_round_trips_and_refuses_what_does_not_add_up() -> None:
    from bray.wire import Segment, encode_segments, parse_segments

    segments = [Segment(3, 7, None), Segment(1, -1, "policy-clone-step-4-a"), Segment(2, 12, "x:y")]
    value = encode_segments(segments)
    assert value == "3:7:;1:-1:policy-clone-step-4-a;2:12:x:y"
    assert parse_segments(value, rows=6) == segments
    with pytest.raises(WireError, match="covers 6 rows, the body holds 5"):
        parse_segments(value, rows=5)
    with pytest.raises(WireError, match="rows:min_step:weight_set"):
        parse_segments("3:x:", rows=3)
    with pytest.raises(WireError, match="at least one"):
        parse_segments("0:1:a;3:1:", rows=3)
