"""Helpers for tests that serve models on a real TorchServe: point bray at it, clean up after."""

from __future__ import annotations

from pathlib import Path

import bray
from bray.archiver.management import ManagementClient
from bray.errors import ModelNotFoundError
from bray.ts_config.server import TorchServeProcess


def init_for(server: TorchServeProcess, store: Path, **overrides: object) -> None:
    """``bray.init`` pointed at ``server`` with the checkpoint store ``store``."""
    kwargs: dict[str, object] = dict(store=store, model_store=server.model_store, inference_url=server.inference_url,
                                     management_url=server.management_url, key_file=server.key_file)
    kwargs.update(overrides)
    bray.init(**kwargs)  # type: ignore[arg-type]


def unregister_all(server: TorchServeProcess, names: set[str]) -> None:
    """Unregister every version of each model in ``names`` (the ones not registered skipped)."""
    with ManagementClient(server.management_url, key_file=server.key_file, timeout_s=120) as client:
        for name in sorted(names):
            try:
                client.unregister(name)
            except ModelNotFoundError:
                pass
