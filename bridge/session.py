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

from bray.config import Locations
from bray.errors import ConfigError

__all__ = ["Session", "current", "init", "per_node"]


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
        ConfigError: a malformed address.
    """
    global _session
    locations = Locations.from_env(store=store, model_store=model_store, inference_url=inference_url,
                                   management_url=management_url, key_file=key_file)
    root = locations.store
    for part in (project, trial):
        if part:
            root = root / str(part)
    with _session_lock:
        _session = Session(locations=locations, store_root=root)
    return locations


def current() -> Session:
    """The session :func:`init` set, else one from the ``BRAY_*`` variables (not kept)."""
    with _session_lock:
        session = _session
    if session is None:
        locations = Locations.from_env()
        return Session(locations=locations, store_root=locations.store)
    return session


def per_node(locations: Locations) -> tuple[list[str], list[Path | None]]:
    """Management URLs and key files, each one or one per inference address.

    ``BRAY_KEY_FILE`` (and ``BRAY_MANAGEMENT_URL``) may list one entry per inference
    address, comma-separated in ``BRAY_INFERENCE_URL``'s order; the model is registered
    through every management address given.

    Raises:
        ConfigError: a count that is neither one nor one per inference address.
    """
    n = len(locations.inference_urls)
    mgmt = [u.strip().rstrip("/") for u in locations.management_url.split(",") if u.strip()]
    keys: list[Path | None] = (
        [Path(k.strip()) for k in str(locations.key_file).split(",") if k.strip()]
        if locations.key_file is not None else [None]
    )
    for what, items, var in (("management URL", mgmt, "BRAY_MANAGEMENT_URL"), ("key file", keys, "BRAY_KEY_FILE")):
        if len(items) not in (1, n):
            raise ConfigError(
                f"{len(items)} {what}s for {n} inference address(es); give one, or one per address "
                f"in BRAY_INFERENCE_URL's order ({var}=a,b,...)"
            )
    return mgmt, keys
