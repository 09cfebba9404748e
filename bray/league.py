"""League results kept in the checkpoint store: game results against opponents, shared by every process.

:class:`bray.ModelPool` records one value per game (``1``: the learner won, ``0``: it
lost, anything in between for a draw or a score) against the opponent it played, a
clone of one checkpoint step such as ``policy-clone-step-20``. The results live in the
store, so every actor process and every node sharing the store sees them, and they
survive restarts::

    <root>/<model>/league/<metric>/
        w-<host>-<pid>-<token>.json    one file per writer (one ModelPool object)
        .tmp/                          in-progress replacements

Each writer owns its file alone and replaces it whole after every result (temporary
file, fsync, :func:`os.replace`, see :func:`bray.store.replace_durable`): concurrent
writers never share a file, so nothing is lost, and a reader sees a file's previous or
next version, never a torn one, even when a writer is killed. A reader merges every
file. On a shared file system (NFS and similar) the same holds as long as ``rename`` is
atomic on the server, which NFS guarantees; a reader on another node may see a file a
little late (attribute caching), never half-written.

Per opponent, a writer keeps the count, the sum, and a time-decayed sum and weight
(each result's weight halves every ``half_life_s``), so the merged *recent* mean is
``sum_i ds_i * 2**(-(t_max - t_i) / h) / sum_i dw_i * 2**(-(t_max - t_i) / h)`` over the
writers ``i``, whatever their number and however long ago each last wrote.

The read side needs nothing but the store root and the model name (no server)::

    from bray.league import read_league
    for s in read_league("~/.bray/store/pong/run1", "policy"):
        print(s.step, s.games, s.mean, s.recent)
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bray.errors import ConfigError
from bray.store import TMP_DIR, CheckpointStore, replace_durable
from bray.store._durable import sweep_tmp

__all__ = ["LeagueResults", "Standing", "check_value", "read_league"]

FORMAT_VERSION = 1
DEFAULT_HALF_LIFE_S = 300.0
_WRITER_PREFIX = "w-"


@dataclass(frozen=True)
class Standing:
    """What the league knows about one opponent.

    Attributes:
        opponent: the opponent's name (a clone name, ``<model>-clone-step-<step>``).
        step: the checkpoint step it was cloned from.
        games: results recorded against it.
        mean: the mean of every result (the win rate, for the metric ``"win"``).
        recent: the time-decayed mean (half-life ``half_life_s``), which
            :class:`bray.ModelPool` weights opponents by.
        last_time: unix time of the newest result.
    """

    opponent: str
    step: int
    games: int
    mean: float
    recent: float
    last_time: float


def read_league(root: str | os.PathLike[str], name: str, *, metric: str = "win") -> list[Standing]:
    """The league table of ``name``, read from the store alone (no server, no ModelPool).

    Args:
        root: the checkpoint store root (``BRAY_STORE``, with ``<project>/<trial>`` when
            ``bray.init`` was given them).
        name: the learner's model name.
        metric: the metric recorded (``ModelPool(metric=...)``).

    Returns:
        One :class:`Standing` per opponent with at least one result, by step, then name.

    Raises:
        ConfigError: invalid name or metric.
    """
    folder = CheckpointStore(root).league_dir(name, metric)
    return _merge(_read_files(folder, {}).values())


class LeagueResults:
    """One writer's results for a model and metric, plus a merged view of every writer's.

    Args:
        store: the checkpoint store.
        name: the learner's model name.
        metric: the metric's name (a folder name).
        half_life_s: how fast old results lose weight in the recent mean.

    Raises:
        ConfigError: invalid name, metric or half-life.
    """

    def __init__(self, store: CheckpointStore, name: str, *, metric: str = "win",
                 half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        if isinstance(half_life_s, bool) or not isinstance(half_life_s, (int, float)) or not (
                math.isfinite(half_life_s) and half_life_s > 0):
            raise ConfigError(f"half_life_s must be a number of seconds > 0, got {half_life_s!r}")
        self.folder = store.league_dir(name, metric)
        self.half_life_s = float(half_life_s)
        host = socket.gethostname().replace("/", "_").replace("-", "_") or "host"
        self.writer = f"{_WRITER_PREFIX}{host}-{os.getpid()}-{secrets.token_hex(4)}"
        self._mine: dict[str, dict[str, Any]] = {}
        self._cache: dict[str, tuple[tuple[int, int], dict[str, dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def record(self, opponent: str, step: int, value: float) -> None:
        """Add one result against ``opponent`` (cloned from ``step``) and write it durably.

        Raises:
            ConfigError: ``value`` is not a finite number in [0, 1].
            StoreWriteError: the disk refused the write (the result is kept in memory
                and written with the next one).
        """
        value = check_value(value)
        now = time.time()
        with self._lock:
            entry = self._mine.setdefault(opponent, {"step": int(step), "n": 0, "sum": 0.0, "ds": 0.0, "dw": 0.0,
                                                     "t": now, "h": self.half_life_s})
            decay = 2.0 ** (-max(0.0, now - entry["t"]) / self.half_life_s)
            entry.update(n=entry["n"] + 1, sum=entry["sum"] + value, ds=entry["ds"] * decay + value,
                         dw=entry["dw"] * decay + 1.0, t=now)
            doc = {"format": FORMAT_VERSION, "writer": self.writer, "updated": now, "opponents": self._mine}
            data = json.dumps(doc).encode()
            self._write(data)

    def _write(self, data: bytes) -> None:
        from bray.errors import StoreWriteError

        tmp_dir = self.folder / TMP_DIR
        try:
            if not tmp_dir.is_dir():
                tmp_dir.mkdir(parents=True, exist_ok=True)
                sweep_tmp(tmp_dir)  # leftovers of writers killed mid-write
            replace_durable(self.folder / f"{self.writer}.json", data, tmp_dir=tmp_dir)
        except OSError as err:
            raise StoreWriteError(
                f"the disk refused the league results under {self.folder} ({err.strerror or err}); "
                "free space or fix the mount/permissions (the results are kept and written with the next one)",
            ) from err

    def standings(self) -> list[Standing]:
        """Every writer's results merged (this writer's from memory, the others' from disk)."""
        with self._lock:
            files = _read_files(self.folder, self._cache, skip=f"{self.writer}.json")
            files[self.writer] = {k: dict(v) for k, v in self._mine.items()}
        return _merge(files.values())


def check_value(value: object) -> float:
    """``value`` as a float, if it is a game result: a finite number in [0, 1].

    Raises:
        ConfigError: anything else (the message names it).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]  # numpy scalars
        except (TypeError, ValueError):
            raise ConfigError(f"a game result must be a number in [0, 1] (1: the learner won), got {value!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"a game result must be a number in [0, 1] (1: the learner won), got {value!r}")
    return float(value)


def _read_files(folder: Path, cache: dict[str, tuple[tuple[int, int], dict[str, dict[str, Any]]]],
                skip: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Every writer file's opponents, parsing only files that changed since ``cache`` saw them."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for entry in entries:
        if not (entry.name.startswith(_WRITER_PREFIX) and entry.name.endswith(".json")) or entry.name == skip:
            continue
        try:
            st = entry.stat()
            key = (st.st_mtime_ns, st.st_size)
            cached = cache.get(entry.name)
            if cached is None or cached[0] != key:
                doc = json.loads(Path(entry.path).read_bytes())
                opponents = {str(k): v for k, v in dict(doc["opponents"]).items()}
                cached = (key, opponents)
                cache[entry.name] = cached
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a file this version wrote; a whole file is never torn (os.replace)
        out[entry.name[:-len(".json")]] = cached[1]
    return out


def _merge(files: Any) -> list[Standing]:
    acc: dict[str, list[Any]] = {}
    for opponents in files:
        for opp, e in opponents.items():
            try:
                part = (int(e["step"]), int(e["n"]), float(e["sum"]), float(e["ds"]), float(e["dw"]), float(e["t"]),
                        float(e.get("h", DEFAULT_HALF_LIFE_S)))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            acc.setdefault(opp, []).append(part)
    table = []
    for opp, parts in acc.items():
        games = sum(p[1] for p in parts)
        if not games:
            continue
        t_max = max(p[5] for p in parts)
        # decaying every writer to the newest result's time; a common factor cancels out
        w = [2.0 ** (-(t_max - p[5]) / p[6]) for p in parts]
        den = sum(p[4] * wi for p, wi in zip(parts, w))
        recent = sum(p[3] * wi for p, wi in zip(parts, w)) / den if den > 0 else sum(p[2] for p in parts) / games
        table.append(Standing(opponent=opp, step=parts[0][0], games=games, mean=sum(p[2] for p in parts) / games,
                              recent=recent, last_time=t_max))
    return sorted(table, key=lambda s: (s.step, s.opponent))
