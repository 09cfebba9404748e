"""The client side: ``RemoteModel`` (forward, publish, clone, step, get_model) and ``init``."""

from __future__ import annotations

from bray.bridge.remote_model import PublishHandle, RemoteModel, init

__all__ = ["PublishHandle", "RemoteModel", "init"]
