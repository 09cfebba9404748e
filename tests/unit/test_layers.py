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
