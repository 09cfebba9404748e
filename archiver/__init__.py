"""bray.archiver: store steps as TorchServe model versions.

- :func:`pack_archive` packs a step (or a live, latest-following model) into a ``.mar``
  in the server's model store;
- :func:`publish_version` packs, registers and waits for the workers; :func:`list_versions`,
  :func:`set_default`, :func:`rollback`, :func:`prune`, :func:`remove`, :func:`scale` and
  :func:`status` manage what is registered; :func:`watch_and_publish` publishes every N-th step as the
  trainer publishes it;
- :func:`export_kserve` writes a published model as KServe deploys it (storage layout
  and manifests, :mod:`bray.archiver.kserve`);
- :class:`ManagementClient` is the one client of TorchServe's management API (token
  authorization included);
- ``bray-archive`` (:mod:`bray.archiver.cli`) drives all of it from the shell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bray._lazy import lazy_exports

# public name -> module that defines it; resolved on first use, so that `bray-archive --help`,
# usage errors and shell completion do not pay for numpy and requests.
_EXPORTS: dict[str, str] = {
    "KServeExport": "bray.archiver.kserve",
    "KServeOptions": "bray.archiver.kserve",
    "ManagementClient": "bray.torchserve.management",
    "ModelStatus": "bray.archiver.publish",
    "ModelVersion": "bray.torchserve.management",
    "PackedArchive": "bray.archiver.pack",
    "PublishWatch": "bray.archiver.publish",
    "TokenAuth": "bray.torchserve.auth",
    "VersionStatus": "bray.archiver.publish",
    "WeightSetStatus": "bray.archiver.publish",
    "check_owner": "bray.archiver.publish",
    "export_kserve": "bray.archiver.kserve",
    "list_versions": "bray.archiver.publish",
    "pack_archive": "bray.archiver.pack",
    "prune": "bray.archiver.publish",
    "publish_version": "bray.archiver.publish",
    "read_archive_config": "bray.archiver.pack",
    "remove": "bray.archiver.publish",
    "rollback": "bray.archiver.publish",
    "scale": "bray.archiver.publish",
    "set_default": "bray.archiver.publish",
    "status": "bray.archiver.publish",
    "watch_and_publish": "bray.archiver.publish",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from bray.archiver.kserve import KServeExport, KServeOptions, export_kserve
    from bray.archiver.pack import PackedArchive, pack_archive, read_archive_config
    from bray.archiver.publish import (
        ModelStatus,
        PublishWatch,
        VersionStatus,
        WeightSetStatus,
        check_owner,
        list_versions,
        prune,
        publish_version,
        remove,
        rollback,
        scale,
        set_default,
        status,
        watch_and_publish,
    )
    from bray.torchserve.auth import TokenAuth
    from bray.torchserve.management import ManagementClient, ModelVersion


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
