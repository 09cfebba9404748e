"""bray-serve: Bray's RemoteModel (publish, forward, clone) on TorchServe.

``from bray import RemoteModel`` is the front door. Names are resolved lazily so that
``import bray`` stays cheap (no torch, no HTTP client) and has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bray._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports("bray", _EXPORTS, __all__)
