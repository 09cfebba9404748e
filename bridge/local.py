"""Local mode: the engine runs in this process, following the same store as the server.

``RemoteModel(..., local_mode=True)`` uses this instead of HTTP: the same export, the
same engines, the same :class:`~bray.handlers.follower.StepFollower` (steps are loaded
off the caller's path and swapped between forwards), the same input checks.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bray.bridge.transport import Transport, TransportStats, Watermark
from bray.export import load_spec
from bray.handlers.engines import EngineOptions, get_engine
from bray.handlers.follower import StepFollower
from bray.handlers.pipeline import Pipeline
from bray.store import CheckpointStore

__all__ = ["LocalRunner"]


class LocalRunner(Transport):
    """An engine plus a store follower, callable from any thread (one forward at a time): the local transport.

    Args:
        store: the checkpoint store.
        name: model name in the store.
        engine: engine name (``torch``, ``onnx``, ``tensorrt``).
        options: engine options.
        step: ``-1`` follows the latest step, ``N`` pins it.
        module: for the torch engine, the trainer's own module to run eagerly (faster
            than the exported graph's calling convention); weights still come from the store.
        fixed_batch_size: pad every forward to this many samples (0: off).
        watermark: the model's newest answered step (default: one of its own).
    """

    def __init__(self, store: CheckpointStore, name: str, *, engine: str, options: EngineOptions,
                 step: int = -1, module: Any = None, fixed_batch_size: int = 0,
                 watermark: Watermark | None = None) -> None:
        super().__init__(watermark or Watermark())
        self.calls = 0
        export_dir = store.export_dir(name)
        self.spec = load_spec(export_dir)
        cls = get_engine(engine)
        # Concurrent loads (clones built from several threads) are safe: load_torch_module
        # serializes torch.export.load, whose deserializer state is global.
        if module is not None and hasattr(cls, "from_module"):
            self.engine = cls.from_module(module, export_dir, self.spec, options)
        else:
            self.engine = cls.load(export_dir, self.spec, options)
        self._lock = threading.Lock()
        self.follower = StepFollower(store, name, self.engine, step=step)
        self.follower.start()
        self.pipeline = Pipeline(self.spec, self.engine, self.follower, fixed_batch_size=fixed_batch_size)

    def forward(self, payload: Any) -> tuple[Any, int]:
        """Run one batched payload (``{"args": [...], "kwargs": {...}}``); returns (outputs, step).

        The server's pipeline (:class:`~bray.handlers.pipeline.Pipeline`) without the
        encode/decode round trip: the same checks and messages, the same swap point.

        Raises:
            InputError: the inputs do not fit the model (structure, dtype, shape).
        """
        parsed = self.pipeline.check(payload)
        with self._lock:
            step = self.pipeline.swap()
            (outputs,) = self.pipeline.forward([parsed])
        return self.pipeline.outputs(outputs), step

    def call(self, payload: Any, n: int) -> tuple[Any, int]:
        started = time.perf_counter()
        outputs, step = self.forward(payload)
        self.calls += 1
        self.answered(step, n, started, "local")
        return outputs, step

    async def submit(self, payload: Any, n: int) -> tuple[Any, int]:
        # The engine runs on the caller's thread, as Bray's local worker does: no hop.
        return self.call(payload, n)

    def stats(self) -> TransportStats:
        return TransportStats(calls=self.calls, requests=0)

    def close(self) -> None:
        self.follower.close()
        self.engine.close()
