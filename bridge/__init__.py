"""The client side: ``RemoteModel`` (forward, publish, clone, step, get_model), ``init``, ``ModelPool``."""

from __future__ import annotations

from bray.bridge.pool import ModelPool
from bray.bridge.remote_model import PublishHandle, RemoteModel
from bray.bridge.session import init

__all__ = ["ModelPool", "PublishHandle", "RemoteModel", "init"]
