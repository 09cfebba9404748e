"""The versioned checkpoint store: publish weights atomically, read any kept step, watch for new ones.

A store is a directory. Each model name gets its own sub-directory::

    <root>/<name>/
        LATEST                         the latest published step, as text (replaced atomically)
        steps/000000000012/            one directory per kept step, complete or absent
            weights.safetensors        the flattened tensors (safetensors, never pickle)
            meta.json                  step, time, byte size, sha256, keys, checkpoint flag
        .tmp/                          in-progress writes and steps being deleted
        .lock                          flock(2) target that serialises commits
        export/                        the exported model definition (written by
                                       :mod:`bray.export`; retention never touches it)
            spec.json                  its input/output structure and engine files
        .serving/<host>-<pid>.json     the step each serving worker has staged, rewritten
                                       every second (a heartbeat)
                                       (:meth:`CheckpointStore.announce_serving`, called by
                                       the handler's follower; read by ``wait()``)
        clone.json                     a clone's origin: source model and step (written once;
                                       :meth:`CheckpointStore.seed_clone` then copies the
                                       source's ``export/`` and publishes the origin step)
        league/<metric>/<writer>.json  league results, one file per writer, each replaced
                                       atomically (read by :mod:`bray.league`)
        .holds/<holder>.json           a watcher's hold: retention keeps every N-th step above
                                       step D while it is fresh (:meth:`CheckpointStore.hold_steps`)

Publishing writes into a unique directory under ``.tmp/``, fsyncs it, then, holding an
exclusive lock, renames it into ``steps/`` and moves ``LATEST`` with :func:`os.replace`.
Because a step directory only ever appears by rename, a reader sees a step whole or not
at all, even when the publisher is killed half-way. Leftovers in ``.tmp/`` are swept by
later publishes.

Steps only grow. Reading a step that retention removed "snaps down" to the largest kept
step at or below it, which is how Bray's ``clone(step)`` behaves.
"""

from __future__ import annotations

from bray.store._durable import replace_durable
from bray.store._layout import (
    CLONE_FILE,
    EXPORT_DIRNAME,
    FORMAT_VERSION,
    HOLDS_DIR,
    LATEST_FILE,
    LEAGUE_DIR,
    LOCK_FILE,
    META_FILE,
    SERVING_DIRNAME,
    SPEC_FILE,
    STEPS_DIR,
    TMP_DIR,
    WEIGHTS_FILE,
)
from bray.store._serving import HEARTBEAT_S, HEARTBEAT_STALE_S
from bray.store._store import Checkpoint, CheckpointStore, StepMeta
from bray.store.watch import StoreWatch

__all__ = ["Checkpoint", "CheckpointStore", "HEARTBEAT_S", "HEARTBEAT_STALE_S", "StepMeta", "StoreWatch"]
