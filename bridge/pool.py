"""``bray.ModelPool``: pick league opponents among a model's checkpoint steps by win rate (Bray's ModelPool).

::

    pool = bray.ModelPool(rm)                  # metric="win", explore_rate=0.3
    opponent = pool.sample()                   # a clone of one kept checkpoint step
    ...play a game of rm against opponent...
    pool.record(opponent, 1.0)                 # 1: the learner won, 0: it lost
    pool.stats()                               # {"policy-clone-step-20": (0.71, 38), ...}

The candidates are the model's kept checkpoint steps (``checkpoint_interval``; the
first step is always one), as clones named ``<model>-clone-step-<step>``; new steps join
as they are published. ``sample()`` picks uniformly with probability ``explore_rate``
(and while no result is recorded); otherwise among the opponents with results, with
prioritized fictitious self-play weights, Bray's formula::

    p(opponent) ∝ exp(-k * |recent_mean(opponent) - 0.5|),   k = 100

so the opponents closest to an even match are played most, and one the learner always
beats (or always loses to) is left to exploration. ``recent_mean`` is the opponent's
time-decayed mean result (half-life ``half_life_s``; Bray smooths per-minute means by
7/8). With ``pool`` (clones made with ``rm.clone(step, name=...)``), ``sample()``
returns one of those models instead, into which sampled checkpoint weights are
published: all of them on the first sample, then each with probability 0.2 per
``refresh_s`` (Bray's ``pool_update_rate``), so a fixed set of served models plays the
whole league.

Without ``pool`` every checkpoint sampled is a clone, served as a weight set of the
learner's own TorchServe workers (``RemoteModel.clone``; the torch engine): a league of
hundreds of kept checkpoints costs their weights in the workers that are asked for
them, not a TorchServe model each. With another engine each clone is a TorchServe model
with ``clone_workers`` workers of its own: space the checkpoints or use ``pool`` there.

Results go to the checkpoint store (:mod:`bray.league`): every process and node sharing
the store shares them, they survive restarts, and concurrent writers never tear or lose
one. Beyond Bray: Bray's ModelPool is one Ray actor for the cluster; here each process
has its own ``ModelPool`` object over the shared results, so with ``pool`` give each
process its own pool clones (the assignment of checkpoint weights to a pool clone is
known to the process that published them). Bray leaves step 0 out of the candidates;
here it is one (the first checkpoint), so a league can start before the second.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import TYPE_CHECKING, Sequence

from bray.errors import ConfigError, StepNotFoundError
from bray.league import DEFAULT_HALF_LIFE_S, LeagueResults, Standing, check_value

if TYPE_CHECKING:  # pragma: no cover
    from bray.bridge.remote_model import RemoteModel

__all__ = ["ModelPool"]

SHARPNESS = 100.0  # Bray's k in exp(-k * |mean - 0.5|)
POOL_UPDATE_RATE = 0.2  # Bray's chance that a pool clone gets new weights per update


class ModelPool:
    """League opponents for ``remote_model``, weighted by recorded results.

    Args:
        remote_model: the learner; its kept checkpoint steps are the candidates.
        metric: the result's name (a folder in the store); Bray's default ``"win"``.
        explore_rate: chance of a uniform pick among every candidate (Bray: 0.3).
        pool: fixed clones to publish sampled checkpoints into (Bray's ``pool``);
            ``None``: ``sample()`` returns a clone per checkpoint step.
        clone_workers: (not Bray's) TorchServe workers per opponent clone, where clones
            are models of their own (engines other than torch); weight sets share the
            learner's.
        half_life_s: (not Bray's) how fast old results lose weight.
        refresh_s: (not Bray's) how often the shared results and the checkpoint steps
            are read again (results recorded here count at once).
        seed: (not Bray's) seed of the sampling, for reproducible leagues.

    Raises:
        ConfigError: an invalid option.
    """

    def __init__(self, remote_model: RemoteModel, metric: str = "win", explore_rate: float = 0.3,
                 pool: Sequence[RemoteModel] | None = None, *, clone_workers: int | None = 1,
                 half_life_s: float = DEFAULT_HALF_LIFE_S, refresh_s: float = 1.0, seed: int | None = None) -> None:
        if isinstance(explore_rate, bool) or not isinstance(explore_rate, (int, float)) or not 0 <= explore_rate <= 1:
            raise ConfigError(f"explore_rate must be a probability in [0, 1], got {explore_rate!r}")
        if clone_workers is not None and (not isinstance(clone_workers, int) or clone_workers < 1):
            raise ConfigError(f"clone_workers must be an integer >= 1 or None (the model's own), got {clone_workers!r}")
        if isinstance(refresh_s, bool) or not isinstance(refresh_s, (int, float)) or not (
                math.isfinite(refresh_s) and refresh_s >= 0):
            raise ConfigError(f"refresh_s must be a number of seconds >= 0, got {refresh_s!r}")
        pool = list(pool or [])
        if any(m.name == remote_model.name for m in pool):
            raise ConfigError(f"pool holds the learner {remote_model.name!r} itself; pass clones (rm.clone(0, name=...))")
        self.remote_model = remote_model
        self.metric = metric
        self.explore_rate = float(explore_rate)
        self.pool = pool
        self.refresh_s = float(refresh_s)
        self._clone_workers = clone_workers
        self._results = LeagueResults(remote_model.store, remote_model.name, metric=metric, half_life_s=half_life_s)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._clones: dict[str, RemoteModel] = {}
        self._making: dict[str, threading.Lock] = {}
        self._steps: dict[str, int] = {}  # candidate name -> checkpoint step
        self._table: dict[str, Standing] = {}
        self._read_at = -math.inf
        self._assigned: dict[str, str] = {}  # pool clone name -> candidate it serves

    # --- reading -----------------------------------------------------------------------

    def _candidate_name(self, step: int) -> str:
        return f"{self.remote_model.name}-clone-step-{step}"

    def _refresh(self, *, force: bool = False) -> None:
        """Read the checkpoint steps and every writer's results again, at most every ``refresh_s``."""
        now = time.monotonic()
        if not force and now - self._read_at < self.refresh_s:
            return
        steps = self.remote_model.store.checkpoint_steps(self.remote_model.name)
        self._steps = {self._candidate_name(s): s for s in steps}
        self._table = {s.opponent: s for s in self._results.standings()}
        self._read_at = now

    def candidates(self) -> dict[str, int]:
        """``{opponent name: checkpoint step}`` of every candidate now, by step."""
        with self._lock:
            self._refresh()
            return dict(sorted(self._steps.items(), key=lambda kv: kv[1]))

    def stats(self) -> dict[str, tuple[float, int]]:
        """``{opponent: (recent mean, games)}`` over every process's results (Bray's metrics).

        The mean is the time-decayed one the weighting uses; :func:`bray.league.read_league`
        gives the all-time mean too.
        """
        with self._lock:
            self._refresh()
            return {name: (s.recent, s.games) for name, s in self._table.items()}

    def weights(self) -> dict[str, float]:
        """The probability of each candidate in a weighted (non-exploring) draw."""
        with self._lock:
            self._refresh()
            return self._weights()

    def _weights(self) -> dict[str, float]:
        played = [(n, self._table[n].recent) for n in self._steps if n in self._table]
        if not played:
            return {n: 1.0 / len(self._steps) for n in self._steps} if self._steps else {}
        logits = [-SHARPNESS * abs(mean - 0.5) for _, mean in played]
        top = max(logits)
        raw = [math.exp(x - top) for x in logits]  # shifted: exp(-100) alone underflows nothing, but sums do
        total = sum(raw)
        return {n: r / total for (n, _), r in zip(played, raw)}

    # --- sampling ----------------------------------------------------------------------

    def _sample_name(self) -> str:
        self._refresh()
        if not self._steps:
            self._refresh(force=True)
        if not self._steps:
            store = self.remote_model.store
            latest = store.latest(self.remote_model.name)
            raise StepNotFoundError(
                f"{self.remote_model.name!r} has no kept checkpoint step to sample an opponent from "
                f"({'nothing published yet' if latest is None else f'latest step {latest}'}, store {store.root}); "
                "construct its RemoteModel with checkpoint_interval=N (a step every N is kept) and publish",
                name=self.remote_model.name,
            )
        if self._rng.random() < self.explore_rate:
            return self._rng.choice(sorted(self._steps, key=self._steps.__getitem__))
        weights = self._weights()  # uniform while no candidate has a result
        chosen = list(weights)
        return self._rng.choices(chosen, weights=[weights[n] for n in chosen])[0]

    def sample(self) -> RemoteModel:
        """An opponent: a clone of one kept checkpoint step (or, with ``pool``, one of the
        pool's clones serving a sampled checkpoint's weights).

        Returns:
            A RemoteModel to play against; pass it (or its name) to :meth:`record`.

        Raises:
            StepNotFoundError: no kept checkpoint step (set ``checkpoint_interval``).
        """
        with self._lock:
            if self.pool:
                return self._sample_pool()
            name = self._sample_name()
            step = self._steps[name]
            clone = self._clones.get(name)
            making = self._making.setdefault(name, threading.Lock())
        if clone is None:
            with making:  # one clone per name, however many threads sample it at once
                clone = self._clones.get(name)
                if clone is None:
                    overrides = {} if self._clone_workers is None else {"num_workers": self._clone_workers}
                    clone = self.remote_model.clone(step, **overrides)
                    with self._lock:
                        self._clones[name] = clone
        return clone

    def _sample_pool(self) -> RemoteModel:
        stale = time.monotonic() - self._read_at >= self.refresh_s
        for member in self.pool:
            if member.name not in self._assigned or (stale and self._rng.random() < POOL_UPDATE_RATE):
                self._publish_into(member, self._sample_name())
        return self._rng.choice(self.pool)

    def _publish_into(self, member: RemoteModel, name: str) -> None:
        store = self.remote_model.store
        ckpt = store.load(self.remote_model.name, self._steps[name], framework="pt")
        member.publish_weights(ckpt.weights).wait(timeout_s=member.timeout_s)
        self._assigned[member.name] = name

    # --- results -----------------------------------------------------------------------

    def record(self, model_or_name: RemoteModel | str, value: float) -> None:
        """Record one game's result against an opponent (Bray: ``merge(f"win/{name}", value)``).

        Args:
            model_or_name: what :meth:`sample` returned, or its name.
            value: in [0, 1]; 1: the learner won, 0: it lost.

        Raises:
            ConfigError: ``value`` outside [0, 1] or NaN, or an unknown opponent.
            StoreWriteError: the disk refused the write.
        """
        value = check_value(value)
        name = model_or_name if isinstance(model_or_name, str) else getattr(model_or_name, "name", model_or_name)
        with self._lock:
            name = self._assigned.get(name, name)  # a pool clone stands for what it serves
            if name not in self._steps:
                self._refresh(force=True)
            if name not in self._steps:
                known = sorted(self._steps, key=self._steps.__getitem__)
                raise ConfigError(
                    f"{name!r} is not an opponent of {self.remote_model.name!r}'s league; record what sample() "
                    f"returned (candidates: {known[:5]}{'...' if len(known) > 5 else ''})"
                )
            self._results.record(name, self._steps[name], value)
            self._table[name] = next(s for s in self._results.standings() if s.opponent == name)

    def clones(self) -> list[RemoteModel]:
        """The opponent clones :meth:`sample` has made in this object so far."""
        with self._lock:
            return list(self._clones.values())

    def close(self) -> None:
        """Close the clones this pool made (the server keeps them registered)."""
        with self._lock:
            clones, self._clones = list(self._clones.values()), {}
        for clone in clones:
            clone.close()

    def __repr__(self) -> str:
        return (f"ModelPool({self.remote_model.name!r}, metric={self.metric!r}, explore_rate={self.explore_rate}, "
                f"pool={[m.name for m in self.pool] or None})")
