"""The packages import downwards only: core < handlers < archiver < bridge (and ts_config beside core).

Read from the source (every ``import``, lazy ones inside functions included), so a new
upward import fails here with its file and line, not as a cycle some day later.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"bray": "core", "handlers": "handlers", "archiver": "archiver", "bridge": "bridge", "ts_config": "ts_config"}
# What each layer may import besides itself.
ALLOWED = {
    "core": {"ts_config"},  # the launcher starts TorchServe with the bundled config files
    "ts_config": {"core"},
    "handlers": {"core"},
    "archiver": {"core", "handlers", "ts_config"},
    "bridge": {"core", "handlers", "archiver"},  # RemoteModel registers versions through the archiver
}
# The documented exceptions, each one import of a top-level entry point.
EXCEPTIONS = {
    ("bray/__init__.py", "bridge"),  # the front door: `from bray import RemoteModel` (lazy)
    ("bray/__init__.py", "handlers"),  # ... and `bray.ServingOptions`
    ("archiver/commands.py", "bridge"),  # `bray-archive proxy` runs the node proxy in the foreground
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "bray":
        return None
    return FOLDERS[parts[1]] if len(parts) > 1 and parts[1] in FOLDERS else "core"


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
    return out


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for folder, layer in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, module in _imports(path):
                target = _layer(module)
                if target is None or target == layer or target in ALLOWED[layer] or (rel, target) in EXCEPTIONS:
                    continue
                wrong.append(f"{rel}:{line} ({layer}) imports {module} ({target})")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_the_check_sees_lazy_imports() -> None:
    # The one lazy bridge -> archiver import is seen, so the rule above is not vacuous.
    found = [m for _, m in _imports(ROOT / "bridge" / "registration.py") if _layer(m) == "archiver"]
    assert found == ["bray.archiver.publish"]


# Private attributes of other libraries the code must touch: torch's module hooks (export's
# partial-graph print) and its modules' parameter and buffer tables (the torch engine's
# weight-set forward swaps tensors in them, as torch.func.functional_call does), argparse's
# action list (the CLI's help walk).
_FOREIGN_PRIVATE = {"_forward_pre_hooks", "_parameters", "_buffers", "_ArgumentGroup", "_actions",
                    "_SubParsersAction"}


def _defined_here(tree: ast.AST) -> set[str]:
    """Every name a module defines or binds: its own underscore names are its to read."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return names


def _private_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    own = _defined_here(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bray":
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and node.attr not in own and node.attr not in _FOREIGN_PRIVATE
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reads_another_modules_private_names() -> None:
    """A private name (``_x``) is its module's: another module imports or reads only public names.

    ``from bray.store._durable import sweep_tmp`` is fine (a public name of a private module);
    ``from bray.store._durable import _sweep_tmp`` and ``model._seen`` from another module are not.
    """
    wrong = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            wrong += [f"{path.relative_to(ROOT).as_posix()}:{line}" for line in _private_reads(path)]
    assert not wrong, "private names read from another module:\n" + "\n".join(wrong)


def test_the_private_name_check_sees_both_kinds(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from bray.store._durable import _flock\n\ndef f(model):\n    return model._seen.value\n")
    assert _private_reads(module) == ["1: from bray.store._durable import _flock", "4: model._seen"]


def test_the_store_modules_import_each_other_without_a_cycle() -> None:
    """``_store``, ``_weights`` and ``watch`` imported each other (under TYPE_CHECKING): now one way."""
    folder = ROOT / "bray" / "store"
    graph = {p.stem: {m.rsplit(".", 1)[-1] for _, m in _imports(p) if m.startswith("bray.store.")}
             for p in folder.glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, seen: tuple[str, ...]) -> list[tuple[str, ...]]:
        cycles = []
        for nxt in sorted(graph.get(start, ())):
            if nxt == seen[0]:
                cycles.append(seen + (nxt,))
            elif nxt not in seen:
                cycles += reaches(nxt, seen + (nxt,))
        return cycles

    cycles = [c for name in sorted(graph) for c in reaches(name, (name,))]
    assert not cycles, f"import cycles in bray/store: {cycles[:3]}"
    assert len(graph) >= 8 and all(len((folder / f"{m}.py").read_text().splitlines()) < 650 for m in graph)
