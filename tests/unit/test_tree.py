"""bray.tree: one flatten/unflatten for every NestedArray walk."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bray import tree
from bray.errors import ConfigError, InputError, WireError
from bray.tree import TreeDef

CASES = {
    "leaf": np.zeros(3),
    "list": [np.zeros(1), np.ones(2)],
    "tuple-in-dict": {"obs": (np.zeros(1), 2), "mask": np.ones(1, bool)},
    "empty": {"args": [], "kwargs": {}},
    "odd keys": {"a b": [1], "0": {"x": 2.0}},
}


@pytest.mark.parametrize("obj", CASES.values(), ids=CASES.keys())
def test_flatten_unflatten_round_trip(obj: Any) -> None:
    leaves, td = tree.flatten(obj)
    back = td.unflatten(leaves)
    assert type(back) is type(obj)
    assert repr(back) == repr(obj)  # same containers, kinds, key order and leaves
    assert td.num_leaves == len(leaves)
    assert TreeDef.from_json(json.loads(json.dumps(td.to_json()))) == td


def test_leaf_order_is_depth_first_dict_insertion_order() -> None:
    obj = {"b": [1, (2, 3)], "a": 4}
    leaves, td = tree.flatten(obj)
    assert leaves == [1, 2, 3, 4]
    assert td.paths() == ["$.b[0]", "$.b[1][0]", "$.b[1][1]", "$.a"]
    assert td.key_paths() == [("b", 0), ("b", 1, 0), ("b", 1, 1), ("a",)]
    assert td.to_json() == {"dict": [["b", {"list": [0, {"tuple": [1, 2]}]}], ["a", 3]]}


def test_definitions_compare_by_structure_not_leaves() -> None:
    _, a = tree.flatten({"obs": [np.zeros(1)]})
    _, b = tree.flatten({"obs": [np.ones(5)]})
    _, c = tree.flatten({"obs": (np.ones(5),)})
    _, d = tree.flatten({"act": [np.ones(5)]})
    assert a == b and hash(a) == hash(b)
    assert a != c and a != d


def test_batch_signature_ignores_only_the_batch_dimension() -> None:
    def sig(x: Any) -> Any:
        leaves, td = tree.flatten(x)
        return tree.batch_signature(td, leaves)

    assert sig([np.zeros((1, 4), np.float32)]) == sig([np.zeros((9, 4), np.float32)])
    assert sig([np.zeros((1, 4), np.float32)]) != sig([np.zeros((1, 5), np.float32)])
    assert sig([np.zeros((1, 4), np.float32)]) != sig([np.zeros((1, 4), np.float64)])


def test_map_leaves_keeps_containers() -> None:
    out = tree.map_leaves(lambda x: x * 2, {"a": (1, [2])})
    assert out == {"a": (2, [4])}


def test_unflatten_wrong_count() -> None:
    _, td = tree.flatten([1, 2])
    with pytest.raises(WireError, match="2 leaf slot.*got 3"):
        td.unflatten([1, 2, 3])


@pytest.mark.parametrize(
    "obj, error, match",
    [
        ({1: np.zeros(1)}, WireError, r"dict keys must be str, got int 1 at \$"),
        ([{2: 0}], ConfigError, r"got int 2 at \$\[0\]"),
        ([[[[0]]]], InputError, r"deeper than max_depth=2 at \$\[0\]\[0\]"),
    ],
    ids=["int key", "nested key, caller's error", "too deep"],
)
def test_flatten_says_where(obj: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tree.flatten(obj, max_depth=2, error=error)


def test_deep_input_fails_without_recursing_to_the_bottom() -> None:
    deep: Any = 0
    for _ in range(50_000):
        deep = [deep]
    with pytest.raises(WireError, match="max_depth=100"):
        tree.flatten(deep)


@pytest.mark.parametrize(
    "node, match",
    [
        (1, "refers to leaf 1; expected leaf 0"),
        ({"list": [0, 0]}, r"at \$\[1\] refers to leaf 0; expected leaf 1"),
        ({"set": []}, "expected list, tuple or dict"),
        ({"dict": [["a", 0], ["a", 1]]}, "repeats key 'a'"),
        ({"dict": [[1, 0]]}, r"must be \[str key, node\]"),
        ("x", "must be a leaf index"),
        ({"list": [{"list": [{"list": [0]}]}]}, "max_depth=2"),
    ],
    ids=["out of order", "repeated leaf", "unknown kind", "repeated key", "int key", "string", "too deep"],
)
def test_from_json_rejects(node: Any, match: str) -> None:
    with pytest.raises(WireError, match=match):
        TreeDef.from_json(node, max_depth=2)


def test_flatten_up_to_reads_json_against_a_definition() -> None:
    _, td = tree.flatten({"args": [np.zeros((1, 2))], "kwargs": {"m": np.zeros(1), "n": np.zeros(1)}})
    body = {"kwargs": {"n": [3], "m": [2]}, "args": [[[0.5, 1.5]]]}  # keys in another order
    assert tree.flatten_up_to(td, body) == [[[0.5, 1.5]], [2], [3]]


@pytest.mark.parametrize(
    "body, match",
    [
        ({"args": [[1]]}, r"\$: expected a dict with keys \['args', 'kwargs'\], got \['args'\]"),
        ({"args": [], "kwargs": {"m": 1, "n": 2}}, r"\$\.args: expected a list of 1 item\(s\), got a list of 0"),
        ({"args": [1], "kwargs": 5}, r"\$\.kwargs: expected a dict with keys \['m', 'n'\], got int"),
    ],
    ids=["missing key", "short list", "not a dict"],
)
def test_flatten_up_to_says_what_differs(body: Any, match: str) -> None:
    _, td = tree.flatten({"args": [0], "kwargs": {"m": 0, "n": 0}})
    with pytest.raises(InputError, match=match):
        tree.flatten_up_to(td, body, error=InputError)


_leaf = st.integers(-3, 3)
_trees = st.recursive(
    _leaf,
    lambda kids: st.lists(kids, max_size=3) | st.tuples(kids, kids) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
    max_leaves=12,
)


@given(_trees)
def test_round_trip_any_tree(obj: Any) -> None:
    leaves, td = tree.flatten(obj)
    assert td.unflatten(leaves) == obj
    assert TreeDef.from_json(td.to_json()) == td
    assert tree.flatten_up_to(td, obj) == leaves
