"""bray.torchserve: the one way bray-serve speaks to TorchServe.

- :mod:`~bray.torchserve.auth`: :class:`TokenAuth`, the key file and key refresh, and
  :class:`InferenceKeyPlugin`, the inference key for ``tritonclient``;
- :mod:`~bray.torchserve.answers`: the one mapping from TorchServe's answers and from
  failed connections to the errors of :mod:`bray.errors`;
- :mod:`~bray.torchserve.management`: :class:`ManagementClient` (requests, an injectable
  ``session``) and :class:`ModelVersion`;
- :mod:`~bray.torchserve.inference`: :class:`InferenceClient` (an injectable
  ``session_factory``): load balancing, failover, retries, key refresh;
- :mod:`~bray.torchserve.http1`: :class:`~bray.torchserve.http1.Http1Session`, the lean
  kept-alive HTTP/1.1 session it sends with (aiohttp's with ``BRAY_HTTP_CLIENT=aiohttp``);
- :mod:`~bray.torchserve.launcher`: start and stop TorchServe instances.

The bridge, the archiver and ts_config speak to TorchServe only through here (none of
them reaches into another for it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bray._lazy import lazy_exports

# public name -> module that defines it; resolved on first use (no requests or aiohttp at import).
_EXPORTS: dict[str, str] = {
    "InferenceClient": "bray.torchserve.inference",
    "InferenceKeyPlugin": "bray.torchserve.auth",
    "ManagementClient": "bray.torchserve.management",
    "ModelVersion": "bray.torchserve.management",
    "Reply": "bray.torchserve.inference",
    "ServerState": "bray.torchserve.launcher",
    "TokenAuth": "bray.torchserve.auth",
    "TorchServeProcess": "bray.torchserve.launcher",
    "free_ports": "bray.torchserve.launcher",
    "start_server": "bray.torchserve.launcher",
    "start_torchserve": "bray.torchserve.launcher",
    "stop_server": "bray.torchserve.launcher",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from bray.torchserve.auth import InferenceKeyPlugin, TokenAuth
    from bray.torchserve.inference import InferenceClient, Reply
    from bray.torchserve.launcher import (
        ServerState,
        TorchServeProcess,
        free_ports,
        start_server,
        start_torchserve,
        stop_server,
    )
    from bray.torchserve.management import ManagementClient, ModelVersion


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
