"""Holds: a watcher asks the store's retention to keep the steps it has yet to archive.

A hold is ``<root>/<name>/.holds/<holder>.json`` (replaced atomically)::

    {"format": 1, "holder": "...", "every": 10, "above": 240, "until": <unix s>, "ttl_s": 60, "time": <unix s>}

It says: keep every step divisible by ``every`` above step ``above``. Retention, which
runs in whichever process publishes, honours a hold while ``until`` is in the future
(clocks of the hosts sharing the store must roughly agree). The holder refreshes it well
before then (:class:`~bray.archiver.PublishWatch` every ``ttl_s / 4`` and whenever it
has archived a due step); a holder that died stops refreshing, its hold goes stale after
``ttl_s`` and is then ignored, so a dead watcher never makes the store grow for ever.

A step retention removes although a stale hold covers it is written down in
``<holder>.lost.json`` (the newest 64, with the reason), so a watcher that comes back
can say which due step it lost and why. A hold stale for a day is deleted with its record.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bray.errors import ConfigError, StoreWriteError
from bray.store._durable import replace_durable
from bray.store._layout import FORMAT_VERSION, HOLDS_DIR, TMP_DIR, check_name

logger = logging.getLogger("bray.store")

_LOST_SUFFIX = ".lost.json"
_KEEP_LOST = 64
_FORGET_S = 86400.0


@dataclass(frozen=True)
class Hold:
    """One holder's request: keep steps divisible by ``every`` above ``above`` until ``until``."""

    holder: str
    every: int
    above: int
    until: float
    time: float

    def covers(self, step: int) -> bool:
        return step > self.above and step % self.every == 0


def write_hold(mdir: Path, hold: Hold, ttl_s: float) -> None:
    doc = {"format": FORMAT_VERSION, "holder": hold.holder, "every": hold.every, "above": hold.above,
           "until": hold.until, "ttl_s": ttl_s, "time": hold.time}
    (mdir / HOLDS_DIR).mkdir(parents=True, exist_ok=True)
    (mdir / TMP_DIR).mkdir(exist_ok=True)
    replace_durable(mdir / HOLDS_DIR / f"{hold.holder}.json", json.dumps(doc).encode(), tmp_dir=mdir / TMP_DIR)


def read_holds(mdir: Path) -> list[Hold]:
    """Every readable hold of a model (one listdir, one small read per hold)."""
    folder = mdir / HOLDS_DIR
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    holds = []
    for entry in names:
        if not entry.endswith(".json") or entry.endswith(_LOST_SUFFIX):
            continue
        try:
            doc = json.loads((folder / entry).read_bytes())
            holds.append(Hold(holder=str(doc["holder"]), every=int(doc["every"]), above=int(doc["above"]),
                              until=float(doc["until"]), time=float(doc["time"])))
        except (OSError, ValueError, KeyError, TypeError) as err:  # removed meanwhile, or not ours
            logger.debug("ignoring the hold %s: %s", folder / entry, err)
    return holds


def remove_hold(mdir: Path, holder: str) -> None:
    for path in (mdir / HOLDS_DIR / f"{holder}.json", mdir / HOLDS_DIR / f"{holder}{_LOST_SUFFIX}"):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def read_lost(mdir: Path, holder: str) -> dict[int, str]:
    try:
        doc = json.loads((mdir / HOLDS_DIR / f"{holder}{_LOST_SUFFIX}").read_bytes())
        return {int(step): str(why) for step, why in doc["lost"].items()}
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        logger.warning("the lost-step record of %s under %s is unreadable (%s); ignoring it", holder, mdir, err)
        return {}


def note_lost(mdir: Path, holder: str, lost: dict[int, str]) -> None:
    """Add steps to a holder's lost record (call holding the store's lock: publishers take turns)."""
    merged = {**read_lost(mdir, holder), **lost}
    newest = dict(sorted(merged.items())[-_KEEP_LOST:])
    doc = {"format": FORMAT_VERSION, "lost": {str(step): why for step, why in newest.items()}}
    replace_durable(mdir / HOLDS_DIR / f"{holder}{_LOST_SUFFIX}", json.dumps(doc).encode(), tmp_dir=mdir / TMP_DIR)


class Retention:
    """What the holds of one model ask of one retention pass (built lazily: most passes prune nothing)."""

    def __init__(self, mdir: Path, keep_last: int) -> None:
        self.mdir, self.keep_last = mdir, keep_last
        self.now = time.time()
        holds = read_holds(mdir)
        self.fresh = [h for h in holds if h.until >= self.now]
        self.stale = [h for h in holds if h.until < self.now]
        self.lost: dict[str, dict[int, str]] = {}

    def held(self, step: int) -> bool:
        return any(h.covers(step) for h in self.fresh)

    def pruned(self, step: int) -> None:
        """Write down a removed step that a stale (not yet forgotten) hold covered."""
        for h in self.stale:
            if h.covers(step) and self.now - h.until < _FORGET_S:
                self.lost.setdefault(h.holder, {})[step] = (
                    f"retention removed it (it keeps the newest keep_last={self.keep_last} steps and every "
                    f"checkpoint step; this one was neither) while the hold of {h.holder} was stale: last "
                    f"refreshed {self.now - h.time:.0f} s before, good for {h.until - h.time:.0f} s")

    def finish(self) -> None:
        """Record the losses and forget holds stale for a day (best effort: a publish is committed)."""
        try:
            for holder, steps in self.lost.items():
                note_lost(self.mdir, holder, steps)
            for h in self.stale:
                if self.now - h.until >= _FORGET_S:
                    remove_hold(self.mdir, h.holder)
        except OSError as err:
            logger.warning("could not update the holds under %s: %s", self.mdir, err)


class HoldRecords:
    """:class:`~bray.store.CheckpointStore`'s holds (a mixin: it writes under the store's root)."""

    root: Path

    def hold_steps(self, name: str, *, holder: str, every: int, above: int, ttl_s: float) -> None:
        """Ask retention to keep every step divisible by ``every`` above step ``above``.

        For a watcher that archives every ``every``-th step (:func:`bray.archiver.watch_and_publish`)
        and may run in another process than the publisher: retention runs where steps are
        published and reads the hold from the store. The hold holds for ``ttl_s`` seconds
        from now; refresh it well before (a quarter of that), raising ``above`` as due
        steps are archived. A hold not refreshed in time is stale and ignored, so a dead
        watcher never makes the store grow for ever; a step it then loses is recorded
        (:meth:`lost_steps`). See :mod:`bray.store._holds`.

        Raises:
            ConfigError: an invalid name, holder, ``every`` (>= 1), ``above`` (>= -1) or ``ttl_s`` (> 0).
            StoreWriteError: the disk refused the write.
        """
        check_name(name)
        check_name(holder, what="holder")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {every!r}")
        if not isinstance(above, int) or isinstance(above, bool) or above < -1:
            raise ConfigError(f"above must be a step, or -1 to hold from step 0, got {above!r}")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ConfigError(f"ttl_s must be a number of seconds > 0, got {ttl_s!r}")
        now = time.time()
        mdir = self.root / name
        try:
            write_hold(mdir, Hold(holder=holder, every=every, above=above, until=now + ttl_s, time=now), ttl_s)
        except OSError as err:
            raise StoreWriteError(
                f"the disk refused the hold of {holder} under {mdir} ({err.strerror or err}); retention may "
                "remove the steps it is due to archive. Free space or fix the mount/permissions",
                name=name,
            ) from err

    def release_hold(self, name: str, holder: str) -> None:
        """Drop ``holder``'s hold and its lost-step record (gone already is fine)."""
        check_name(name)
        check_name(holder, what="holder")
        remove_hold(self.root / name, holder)

    def lost_steps(self, name: str, holder: str) -> dict[int, str]:
        """Steps retention removed although ``holder``'s hold covered them (it was stale): step -> why."""
        check_name(name)
        check_name(holder, what="holder")
        return read_lost(self.root / name, holder)
