"""One walk over nested containers: flatten to leaves and a tree definition, and back.

A *tree* is a leaf, or a ``list``, ``tuple`` or ``dict`` (``str`` keys, insertion order)
of trees; anything else is a leaf. :func:`flatten` walks a tree once and returns its
leaves, depth first, with a :class:`TreeDef` that describes the containers; the
definition rebuilds the tree from any leaves of the same count (:meth:`TreeDef.unflatten`),
is hashable (calls with equal definitions can share a batch) and has one JSON form, the
``tree`` of the wire header and of ``spec.json``::

    NODE := i                          the i-th leaf (0, 1, 2, ... in order)
          | {"list":  [NODE, ...]}
          | {"tuple": [NODE, ...]}
          | {"dict":  [[key, NODE], ...]}

Every module that meets a NestedArray (the wire codec, the model spec, request checks,
the client's batcher, the store's weight keys) goes through here, like jax's
``tree_util`` or ``torch.utils._pytree``: flatten once, then work on the flat leaves.

Errors name the place in the tree (``$.args[0].obs``) and are raised as the caller's
error class (``error=``), so the wire codec answers :class:`~bray.errors.WireError`,
the store :class:`~bray.errors.ConfigError`, the handler :class:`~bray.errors.InputError`.
"""

from __future__ import annotations

import reprlib
from typing import Any, Callable, Iterator, NoReturn, Sequence

from bray.errors import BrayError, WireError

__all__ = ["MAX_DEPTH", "TreeDef", "batch_signature", "flatten", "flatten_up_to", "key_path", "leaves", "map_leaves", "short"]

#: Most container levels any walk accepts (far below Python's recursion limit).
MAX_DEPTH = 100

_LEAF = "leaf"
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60
_KINDS = ("list", "tuple", "dict")


class TreeDef:
    """The containers of a tree, without its leaves. Hashable; never changed once made.

    Attributes:
        kind: ``"leaf"``, ``"list"``, ``"tuple"`` or ``"dict"``.
        children: the child definitions (empty for a leaf).
        keys: a dict's keys, in order (empty otherwise).
        num_leaves: how many leaves the tree holds.
    """

    __slots__ = ("kind", "children", "keys", "num_leaves", "_hash")

    kind: str
    children: tuple[TreeDef, ...]
    keys: tuple[str, ...]
    num_leaves: int
    _hash: int | None

    def __init__(self, kind: str, children: tuple[TreeDef, ...] = (), keys: tuple[str, ...] = ()) -> None:
        # Made for every forward call: plain slot writes, the hash only when asked for.
        # Treat instances as immutable (nothing here changes them after __init__).
        self.kind = kind
        self.children = children
        self.keys = keys
        self.num_leaves = 1 if kind == _LEAF else sum([c.num_leaves for c in children])
        self._hash = None

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self.kind, self.keys, self.children))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, TreeDef) or hash(self) != hash(other):
            return False
        return self.kind == other.kind and self.keys == other.keys and self.children == other.children

    def __repr__(self) -> str:
        return f"TreeDef({self.to_json()!r})"

    @property
    def is_leaf(self) -> bool:
        return self.kind == _LEAF

    def unflatten(self, leaves: Sequence[Any], *, tuples: bool = True) -> Any:
        """Rebuild the tree with ``leaves`` (any objects) in its leaf slots, in order.

        Args:
            leaves: one object per leaf slot.
            tuples: ``False`` builds lists where the tree has tuples (JSON has none).

        Raises:
            WireError: the number of leaves is not :attr:`num_leaves`.
        """
        if len(leaves) != self.num_leaves:
            raise WireError(f"the tree has {self.num_leaves} leaf slot(s), got {len(leaves)} leaves")
        return self._build(iter(leaves), tuples)

    def _build(self, it: Iterator[Any], tuples: bool) -> Any:
        if self.kind == _LEAF:
            return next(it)
        items = [c._build(it, tuples) for c in self.children]
        if self.kind == "dict":
            return dict(zip(self.keys, items))
        return tuple(items) if tuples and self.kind == "tuple" else items

    def to_json(self) -> Any:
        """The JSON form (see the module docstring)."""
        counter = iter(range(self.num_leaves))
        return self._json(counter)

    def _json(self, counter: Iterator[int]) -> Any:
        if self.kind == _LEAF:
            return next(counter)
        items = [c._json(counter) for c in self.children]
        if self.kind == "dict":
            return {"dict": [[k, n] for k, n in zip(self.keys, items)]}
        return {self.kind: items}

    @classmethod
    def from_json(cls, node: Any, *, max_depth: int = MAX_DEPTH, error: type[BrayError] = WireError) -> TreeDef:
        """Read the JSON form, checking it: each leaf index once and in order, known
        container kinds, str dict keys without repeats, at most ``max_depth`` levels.

        Raises:
            error: the node is malformed; the message says where and what was expected.
        """
        try:
            counter = [0]
            return cls._read_fast(node, 0, counter, max_depth)
        except _Malformed:
            cls._read(node, 0, "$", [0], max_depth, error)  # the walk with paths says where
            raise error(f"malformed tree {short(node)}") from None  # not reached

    @classmethod
    def _read_fast(cls, node: Any, depth: int, counter: list[int], max_depth: int) -> TreeDef:
        if type(node) is int:
            if node != counter[0]:
                raise _Malformed
            counter[0] += 1
            return LEAF
        if type(node) is not dict or len(node) != 1 or depth >= max_depth:
            raise _Malformed
        ((kind, children),) = node.items()
        if type(children) is not list:
            raise _Malformed
        if kind == "list" or kind == "tuple":
            return TreeDef(kind, tuple([cls._read_fast(c, depth + 1, counter, max_depth) for c in children]))
        if kind != "dict":
            raise _Malformed
        keys = []
        defs = []
        for pair in children:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                raise _Malformed
            keys.append(pair[0])
            defs.append(cls._read_fast(pair[1], depth + 1, counter, max_depth))
        if len(set(keys)) != len(keys):
            raise _Malformed
        return TreeDef("dict", tuple(defs), tuple(keys))

    @classmethod
    def _read(cls, node: Any, depth: int, path: str, counter: list[int], max_depth: int,
              error: type[BrayError]) -> TreeDef:
        if isinstance(node, int) and not isinstance(node, bool):
            if node != counter[0]:
                raise error(f"tree leaf at {path} refers to leaf {node}; expected leaf {counter[0]} "
                            "(each leaf once, in order)")
            counter[0] += 1
            return LEAF
        if not (isinstance(node, dict) and len(node) == 1):
            raise error(f"tree node at {path} must be a leaf index or one of "
                        f'{{"list": [...]}}, {{"tuple": [...]}}, {{"dict": [[key, node], ...]}}; got {short(node)}')
        ((kind, children),) = node.items()
        if kind not in _KINDS or not isinstance(children, list):
            raise error(f"tree node at {path}: expected list, tuple or dict with a list, got {short(node)}")
        if depth >= max_depth:
            _too_deep(path, max_depth, error)
        if kind != "dict":
            return TreeDef(kind, tuple(cls._read(c, depth + 1, f"{path}[{i}]", counter, max_depth, error)
                                       for i, c in enumerate(children)))
        keys: list[str] = []
        defs: list[TreeDef] = []
        for pair in children:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise error(f"dict entry at {path} must be [str key, node], got {short(pair)}")
            if pair[0] in keys:
                raise error(f"dict at {path} repeats key {short(pair[0])}")
            keys.append(pair[0])
            defs.append(cls._read(pair[1], depth + 1, key_path(path, pair[0]), counter, max_depth, error))
        return TreeDef("dict", tuple(defs), tuple(keys))

    def paths(self, root: str = "$") -> list[str]:
        """Each leaf's place, ``$.args[0].obs`` style, in leaf order (for messages)."""
        return [_format(root, keys) for keys in self.key_paths()]

    def key_paths(self) -> list[tuple[str | int, ...]]:
        """Each leaf's keys from the root (dict keys and list/tuple indices), in leaf order."""
        out: list[tuple[str | int, ...]] = []
        self._key_paths((), out)
        return out

    def _key_paths(self, prefix: tuple[str | int, ...], out: list[tuple[str | int, ...]]) -> None:
        if self.kind == _LEAF:
            out.append(prefix)
            return
        labels: Sequence[str | int] = self.keys if self.kind == "dict" else range(len(self.children))
        for label, child in zip(labels, self.children):
            child._key_paths((*prefix, label), out)


#: The definition of a lone leaf.
LEAF = TreeDef(_LEAF)


def flatten(tree: Any, *, max_depth: int = MAX_DEPTH, error: type[BrayError] = WireError) -> tuple[list[Any], TreeDef]:
    """Walk ``tree`` once: its leaves (depth first, dict entries in insertion order) and
    its definition. Leaves are returned as they are, not copied or checked.

    Raises:
        error: a dict key that is not a ``str``, or containers nested deeper than
            ``max_depth``; the message names the place.
    """
    out: list[Any] = []
    try:
        return out, _flatten(tree, out, 0, max_depth)
    except _Malformed:
        _explain(tree, "$", 0, max_depth, error)
        raise  # not reached: _explain raises


class _Malformed(Exception):
    """Raised by the fast walk, which keeps no paths; the slow one then says where."""


def _flatten(obj: Any, out: list[Any], depth: int, max_depth: int) -> TreeDef:
    kind = _CONTAINERS.get(type(obj))  # the exact types first: one lookup for a leaf (the usual array)
    if kind is None:
        if not isinstance(obj, (list, tuple, dict)):
            out.append(obj)
            return LEAF
        kind = ("tuple" if isinstance(obj, tuple) else "list") if isinstance(obj, (list, tuple)) else "dict"
    if depth >= max_depth:
        raise _Malformed
    if kind == "dict":
        if not all(isinstance(k, str) for k in obj):
            raise _Malformed
        return TreeDef("dict", tuple([_flatten(v, out, depth + 1, max_depth) for v in obj.values()]), tuple(obj))
    return TreeDef(kind, tuple([_flatten(v, out, depth + 1, max_depth) for v in obj]))


_CONTAINERS: dict[type, str] = {list: "list", tuple: "tuple", dict: "dict"}


def _explain(obj: Any, path: str, depth: int, max_depth: int, error: type[BrayError]) -> None:
    if isinstance(obj, (list, tuple, dict)) and depth >= max_depth:
        _too_deep(path, max_depth, error)
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise error(f"dict keys must be str, got {type(key).__name__} {key!r} at {path}")
            _explain(value, key_path(path, key), depth + 1, max_depth, error)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _explain(value, f"{path}[{i}]", depth + 1, max_depth, error)


def leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in :func:`flatten` order."""
    return flatten(tree)[0]


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """A tree of the same containers with ``fn(leaf)`` in place of every leaf."""
    flat, treedef = flatten(tree)
    return treedef.unflatten([fn(x) for x in flat])


def flatten_up_to(treedef: TreeDef, tree: Any, *, error: type[BrayError] = WireError,
                  root: str = "$") -> list[Any]:
    """The leaves of ``tree`` taken where ``treedef`` has its leaves, in its order.

    Whatever stands at a leaf slot is returned whole (a JSON nested list, an array), so
    a JSON body is read against a model's declared structure instead of guessed at. A
    dict must have exactly the definition's keys, in any order; lists and tuples are
    interchangeable (JSON has no tuples), their lengths must match.

    Raises:
        error: the containers differ from the definition; the message names the place,
            what was expected and what was got.
    """
    out: list[Any] = []
    _up_to(treedef, tree, root, out, error)
    return out


def _up_to(td: TreeDef, obj: Any, where: str, out: list[Any], error: type[BrayError]) -> None:
    if td.kind == _LEAF:
        out.append(obj)
        return
    if td.kind == "dict":
        if not isinstance(obj, dict) or set(obj) != set(td.keys):
            got = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise error(f"{where}: expected a dict with keys {list(td.keys)}, got {got}")
        for key, child in zip(td.keys, td.children):
            _up_to(child, obj[key], key_path(where, key), out, error)
        return
    if not isinstance(obj, (list, tuple)) or len(obj) != len(td.children):
        got = f"a list of {len(obj)}" if isinstance(obj, (list, tuple)) else type(obj).__name__
        raise error(f"{where}: expected a list of {len(td.children)} item(s), got {got}")
    for i, (child, item) in enumerate(zip(td.children, obj)):
        _up_to(child, item, f"{where}[{i}]", out, error)


def batch_signature(treedef: TreeDef, leaves: Sequence[Any]) -> tuple[Any, ...]:
    """What calls must share to be stacked into one batch: the containers and each
    leaf's dtype and per-sample shape (everything but the leading dimension)."""
    return (treedef, *((x.dtype, x.shape[1:]) for x in leaves))


def key_path(path: str, key: str) -> str:
    """``path.key``, or ``path['key']`` where the key is not an identifier."""
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"


def _format(root: str, keys: tuple[str | int, ...]) -> str:
    path = root
    for k in keys:
        path = f"{path}[{k}]" if isinstance(k, int) else key_path(path, k)
    return path


def short(obj: object) -> str:
    """``repr(obj)`` cut short for error messages: three levels deep, 60 characters a value.

    Values quoted in messages stay short and never recurse deeply (hostile headers nest).
    """
    return _SHORT.repr(obj)


def _too_deep(path: str, max_depth: int, error: type[BrayError]) -> NoReturn:
    if len(path) > 80:
        path = f"{path[:40]}...{path[-30:]}"
    raise error(f"containers nested deeper than max_depth={max_depth} at {path}; "
                "flatten the structure or raise the limit")
