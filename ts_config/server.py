"""The launcher's old home, kept for code that imports it: :mod:`bray.torchserve.launcher`.

``start_torchserve``, ``TorchServeProcess``, ``start_server``, ``stop_server``,
``ServerState``, ``ping_status`` and ``free_ports`` resolve there on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bray._lazy import lazy_exports

_EXPORTS: dict[str, str] = {name: "bray.torchserve.launcher" for name in (
    "ServerState", "TorchServeProcess", "free_ports", "ping_status", "start_server", "start_torchserve", "stop_server")}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from bray.torchserve.launcher import (
        ServerState,
        TorchServeProcess,
        free_ports,
        ping_status,
        start_server,
        start_torchserve,
        stop_server,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
