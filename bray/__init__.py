"""bray-serve: Bray's RemoteModel (publish, forward, clone) on TorchServe.

``from bray import RemoteModel`` is the front door. Names are resolved lazily so that
``import bray`` stays cheap (no torch, no HTTP client) and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "BrayError": "bray.errors",
    "CheckpointStore": "bray.store",
    "Locations": "bray.locations",
    "ModelPool": "bray.bridge.pool",
    "RemoteModel": "bray.bridge.remote_model",
    "ServingOptions": "bray.handlers.options",
    "init": "bray.bridge.session",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # pragma: no cover
    from bray.bridge.pool import ModelPool
    from bray.bridge.remote_model import RemoteModel
    from bray.bridge.session import init
    from bray.locations import Locations
    from bray.errors import BrayError
    from bray.handlers.options import ServingOptions
    from bray.store import CheckpointStore


def _lazy_exports(package: str, exports: dict[str, str],
                  public: list[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` (importing ``exports[name]`` on first use) and ``__dir__`` (``public``)."""

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def dir_() -> list[str]:
        return list(public)

    return getattr_, dir_


__getattr__, __dir__ = _lazy_exports("bray", _EXPORTS, __all__)
