"""One pipeline for a served model: decode and check, swap between batches, one forward, encode.

The TorchServe handler runs it for each batch TorchServe hands over (each request
decoded and checked on its own, so a bad one fails alone); local mode
(``RemoteModel(local_mode=True)``) runs it for each call, on arrays it already has. Both
therefore check inputs with the same rules and messages, swap staged weights at the same
point (before a forward, never inside one) and pad a fixed batch the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bray import wire
from bray.export import ModelSpec
from bray.handlers.engines.base import Engine
from bray.handlers.follower import StepFollower
from bray.handlers.request import Parsed, encode_outputs, parse_payload, parse_request, split_outputs

__all__ = ["Pipeline"]


class Pipeline:
    """The request path of one model on one engine, following the store through ``follower``.

    Not thread-safe: the handler is called by one TorchServe thread; local mode holds a lock.

    Args:
        spec: the model's spec.
        engine: the engine that runs forwards.
        follower: swaps staged weights into ``engine``.
        fixed_batch_size: ``> 0`` pads every forward to exactly this many samples.
        limits: size limits for request bodies.
        reject_nonfinite: refuse NaN and infinity in inputs.
    """

    def __init__(self, spec: ModelSpec, engine: Engine, follower: StepFollower, *, fixed_batch_size: int = 0,
                 limits: wire.WireLimits = wire.DEFAULT_LIMITS, reject_nonfinite: bool = False) -> None:
        self.spec = spec
        self.engine = engine
        self.follower = follower
        self.fixed_batch_size = fixed_batch_size
        self.limits = limits
        self.reject_nonfinite = reject_nonfinite

    def decode(self, body: Any) -> Parsed:
        """A request body (binary NestedArray or JSON), decoded and checked.

        Raises:
            InputError / WireError: as :func:`~bray.handlers.request.parse_request`.
        """
        return parse_request(body, self.spec, limits=self.limits, reject_nonfinite=self.reject_nonfinite)

    def check(self, payload: Any) -> Parsed:
        """Arrays already in memory (``{"args": [...], "kwargs": {...}}``), checked with the
        binary form's rules (exact dtypes), as the server checks ``RemoteModel``'s requests.

        Raises:
            InputError: as :func:`~bray.handlers.request.parse_payload`.
        """
        return parse_payload(payload, self.spec, binary=True, reject_nonfinite=self.reject_nonfinite)

    def swap(self) -> int:
        """Install staged weights, if any (between batches); returns the step the next forward uses."""
        return self.follower.swap_if_pending()

    def forward(self, batch: Sequence[Parsed], *, weights: Any = None) -> list[list[np.ndarray]]:
        """One forward over every request of ``batch``; each request's output leaves, in order.

        Args:
            batch: the requests, decoded and checked.
            weights: a weight set's prepared weights (``handlers/weight_sets.py``);
                ``None``: the model's own.

        Raises:
            EngineError: the engine failed, or answered with the wrong number of rows.
        """
        if len(batch) == 1:
            inputs = batch[0].leaves
        else:
            inputs = [np.concatenate([p.leaves[i] for p in batch]) for i in range(len(batch[0].leaves))]
        outputs = self.engine.forward_batch(inputs, fixed_batch_size=self.fixed_batch_size, weights=weights)
        return split_outputs(outputs, [p.batch for p in batch])

    def encode(self, leaves: Sequence[np.ndarray], parsed: Parsed) -> bytes | str:
        """One request's outputs in the wire form it came in (binary in, binary out)."""
        return encode_outputs(leaves, self.spec, binary=parsed.binary)

    def outputs(self, leaves: Sequence[np.ndarray]) -> Any:
        """One request's outputs in the model's own nesting (local mode's answer)."""
        return self.spec.build_outputs(list(leaves))
