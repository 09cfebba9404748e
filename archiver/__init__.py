"""bray.archiver: store steps as TorchServe model versions.

- :func:`pack_archive` packs a step (or a live, latest-following model) into a ``.mar``
  in the server's model store;
- :func:`publish_version` packs, registers and waits for the workers; :func:`list_versions`,
  :func:`set_default`, :func:`rollback`, :func:`prune`, :func:`scale` and :func:`status`
  manage what is registered; :func:`watch_and_publish` publishes every N-th step as the
  trainer publishes it;
- :class:`ManagementClient` is the one client of TorchServe's management API (token
  authorization included);
- ``bray-archive`` (:mod:`bray.archiver.cli`) drives all of it from the shell.
"""

from __future__ import annotations

from bray.archiver.management import ManagementClient, ModelVersion, TokenAuth
from bray.archiver.pack import PackedArchive, pack_archive, read_archive_config
from bray.archiver.publish import (
    ModelStatus,
    PublishWatch,
    VersionStatus,
    list_versions,
    prune,
    publish_version,
    rollback,
    scale,
    set_default,
    status,
    watch_and_publish,
)

__all__ = [
    "ManagementClient",
    "ModelStatus",
    "ModelVersion",
    "PackedArchive",
    "PublishWatch",
    "TokenAuth",
    "VersionStatus",
    "list_versions",
    "pack_archive",
    "prune",
    "publish_version",
    "read_archive_config",
    "rollback",
    "scale",
    "set_default",
    "status",
    "watch_and_publish",
]
