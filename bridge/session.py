"""Where this process's models live: the checkpoint store and the TorchServe nodes (``bray.init``).

One session per process, set by :func:`init` (or read from the ``BRAY_*`` environment
variables on first use), read by every ``RemoteModel`` made afterwards.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bray.locations import Locations

__all__ = ["Session", "current", "init", "use"]


@dataclass(frozen=True)
class Session:
    """The resolved locations and the store folder (``<store>/<project>/<trial>``)."""

    locations: Locations
    store_root: Path


_session: Session | None = None
_session_lock = threading.Lock()


def init(project: str | None = None, trial: str | None = None, *, store: str | os.PathLike[str] | None = None,
         model_store: str | os.PathLike[str] | None = None, inference_url: str | Sequence[str] | None = None,
         management_url: str | None = None, key_file: str | os.PathLike[str] | None = None) -> Locations:
    """Say where the checkpoint store lives and which TorchServe to use.

    Keyword arguments win over the ``BRAY_*`` environment variables, which win over the
    defaults (the bundled config started as the README says). ``project`` and ``trial``
    give the store a sub-folder each (``<store>/<project>/<trial>``), as in Bray.

    Several nodes (``inference_url="http://a:8080,http://b:8080"``, sharing one store):
    every TorchServe writes its own keys, so ``key_file`` lists one key file per address,
    comma-separated in the same order, and ``management_url`` and ``model_store`` may too:
    models are then registered through every management address.

    Returns:
        The resolved locations.

    Raises:
        ConfigError: a malformed address, or per-node lists of different lengths.
    """
    locations = Locations.from_env(store=store, model_store=model_store, inference_url=inference_url,
                                   management_url=management_url, key_file=key_file)
    root = locations.store
    for part in (project, trial):
        if part:
            root = root / str(part)
    use(locations, store_root=root)
    return locations


def use(locations: Locations, *, store_root: Path | None = None) -> None:
    """Make ``locations`` this process's session as they are (the node proxy takes its caller's).

    Args:
        locations: the store and the nodes.
        store_root: the store folder models live in (default ``locations.store``).
    """
    global _session
    with _session_lock:
        _session = Session(locations=locations, store_root=store_root or locations.store)


def current() -> Session:
    """The session :func:`init` set, else one from the ``BRAY_*`` variables (not kept)."""
    with _session_lock:
        session = _session
    if session is None:
        locations = Locations.from_env()
        return Session(locations=locations, store_root=locations.store)
    return session
