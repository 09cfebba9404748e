"""Retention: which steps the store keeps when a step is published.

Kept: the newest ``keep_last`` steps, every checkpoint step (Bray's rule: a step
``checkpoint_interval`` steps, or ``checkpoint_interval_s`` seconds, after the previous
checkpoint; the first step always; the clonable pool a league samples), and the steps a
fresh hold covers (:mod:`bray.store._holds`). The rest is moved into ``.tmp/`` under the
model's lock and deleted after it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bray.store._durable import tmp_name
from bray.store._holds import Retention
from bray.store._layout import META_FILE

__all__ = ["RetentionRules"]

logger = logging.getLogger("bray.store")


class RetentionRules:
    """:class:`~bray.store.CheckpointStore`'s retention (a mixin: it reads the store's listing and metadata)."""

    root: Path
    keep_last: int
    checkpoint_interval: int | float
    checkpoint_interval_s: float
    _ckpt_cache: dict[tuple[str, int], tuple[float, bool]]

    if TYPE_CHECKING:  # pragma: no cover - what the store provides
        def latest(self, name: str) -> int | None: ...
        def _listing(self, name: str) -> list[int]: ...
        def _step_dir(self, name: str, step: int) -> Path: ...

    def _ckpt_info(self, name: str, step: int) -> tuple[float, bool] | None:
        key = (name, step)
        info = self._ckpt_cache.get(key)
        if info is None:
            try:
                raw = json.loads((self._step_dir(name, step) / META_FILE).read_bytes())
                info = (float(raw["time"]), bool(raw["checkpoint"]))
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._ckpt_cache[key] = info
        return info

    def _is_checkpoint_step(self, name: str, step: int, now: float) -> bool:
        if not self.checkpoint_interval and not self.checkpoint_interval_s:
            return False
        last: tuple[int, float] | None = None
        for earlier in reversed(self._listing(name)):
            info = self._ckpt_info(name, earlier)
            if info is not None and info[1]:
                last = (earlier, info[0])
                break
        if last is None:
            return True  # no checkpoint yet: the first step starts the pool (Bray's step 0)
        every = _step_interval(self.checkpoint_interval, step)
        if every and step - last[0] >= every:
            return True
        return bool(self.checkpoint_interval_s) and now - last[1] >= self.checkpoint_interval_s

    def checkpoint_steps(self, name: str) -> list[int]:
        """The kept checkpoint steps of ``name`` (retention never removes them), ascending.

        These are the steps a league samples opponents from (:class:`bray.ModelPool`).

        Raises:
            ConfigError: ``name`` is not a valid model name.
        """
        latest = self.latest(name)
        if latest is None:
            return []
        out = []
        for step in self._listing(name):
            info = self._ckpt_info(name, step) if step <= latest else None
            if info is not None and info[1]:
                out.append(step)
        return out

    def _retire(self, name: str, tmp_root: Path) -> list[Path]:
        """Move steps retention drops into ``.tmp/`` (call holding the lock).

        Kept: the newest ``keep_last``, checkpoint steps, and steps a fresh hold covers
        (:meth:`hold_steps`).

        Returns:
            The moved directories, for the caller to delete after releasing the lock.
        """
        listing = self._listing(name)
        keep = set(listing[-self.keep_last:])
        doomed = []
        holds: Retention | None = None
        for step in listing:
            if step in keep:
                continue
            info = self._ckpt_info(name, step)
            if info is not None and info[1]:
                continue
            if holds is None:  # read once, and only when a step is to go: one listdir, a read per hold
                holds = Retention(self.root / name, self.keep_last)
            if holds.held(step):
                continue
            target = tmp_root / tmp_name("del")
            try:
                os.rename(self._step_dir(name, step), target)
            except OSError as err:  # retention failing must not fail a committed publish
                logger.warning("could not retire step %d of %r: %s", step, name, err)
                continue
            self._ckpt_cache.pop((name, step), None)
            doomed.append(target)
            holds.pruned(step)
        if holds is not None:
            holds.finish()
        return doomed


def _step_interval(interval: int | float, step: int) -> int:
    """Steps between checkpoints at ``step``: an int as is; Bray's growing float rule."""
    if not isinstance(interval, float):
        return int(interval)
    base = int(interval)
    frac, s = interval - base, step // 10
    while s:
        frac, s = frac * 10, s // 10
    return max(base, int(frac))
