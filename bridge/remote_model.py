"""``bray.RemoteModel``: Bray's forward / publish / clone semantics on TorchServe.

::

    import bray
    bray.init(project="pong", trial="run1")
    rm = bray.RemoteModel("policy", model=Policy(), forward_args=(obs_batch,), max_batch_size=32)
    out = rm(obs_batch)                       # sync, batch=True (Bray's __call__ default)
    out = await rm.forward(obs)               # async, one sample: batch=False (Bray's default)
    rm.publish_weights(net.state_dict()).wait(timeout_s=5)   # step=-1: the next step
    opp = rm.clone(step=120, name="opp")      # "policy-clone-step-120-opp"; snaps down to a kept step

How Bray's constructor arguments map onto TorchServe:

=====================  =====================================================================
argument               meaning here
=====================  =====================================================================
``max_batch_size``     ``0``: no batching (each call is one request, TorchServe batch 1);
                       ``> 0``: TorchServe batches up to this many requests (``batchSize``)
                       waiting ``max_batch_delay_ms`` (``maxBatchDelay``), and calls in this
                       process are coalesced into requests of up to ``max_batch_size ** 2``
                       samples (so one full server batch holds every caller's samples);
                       ``< 0``: the same with every forward padded to exactly ``-n`` samples;
                       not given when attaching (no ``model``): the registered version's
num_workers            TorchServe workers (processes) of the model (attaching: the registered
                       version's)
cpus_per_worker        intra-op threads per worker (``torch.set_num_threads`` / ORT threads)
gpus_per_worker        ``> 0`` serves on the GPU TorchServe assigns each worker, ``0`` on CPU;
                       fractions are not applied (TorchServe gives each worker one GPU)
memory_per_worker      not applicable: TorchServe has no per-worker memory limit; accepted
                       for Bray compatibility and ignored (a warning says so)
use_onnx               ``None`` torch engine, ``"infer"`` ONNX Runtime (weights baked in,
                       a new session per step), ``"train"`` ONNX Runtime with the weights
                       as graph inputs (one session, nothing to rebuild per step),
                       ``"quantize"`` ONNX Runtime with dynamic int8 quantization
use_tensorrt           TensorRT engine (refitted per step; needs a GPU)
checkpoint_interval    steps kept for cloning for good by the store's retention (Bray's
                       rule): ``int`` N, a step N after the previous checkpoint; ``float``
                       ``B.F``, an interval growing with the step (see ``CheckpointStore``);
                       ``None``, every 10 minutes (``checkpoint_interval_s=600``). The first
                       step is always a checkpoint (Bray's step 0)
local_mode             ``True``: the engine runs in this process, following the same store;
                       no server. ``"proxy"``: Bray's client-side batching in front of the
                       remote workers, which is what the remote path always does here
                       (concurrent calls of a process are coalesced); it selects
                       ``client_batching=True``. ``False``: remote, ``client_batching`` as given
override_model         ``True``: re-export, publish the given weights as a new step and
                       re-register; ``False``: reuse what the store and server already have
namespace              prefixes the model name (store folder and TorchServe name)
max_batch_delay_ms     (not Bray's) TorchServe's ``maxBatchDelay``; default 0 because the
                       client coalesces already, and TorchServe holds a lone request for
                       the whole delay
client_batching        (not Bray's) ``False`` sends every call as its own request
checkpoint_interval_s  (not Bray's) time-based checkpoints, in seconds
metrics_port           (not Bray's) serve this process's client metrics (policy lag as the
                       callers see it) to Prometheus on this port (``"host:port"`` for another
                       address than 127.0.0.1); default ``$BRAY_METRICS_PORT``, else off
                       (see :mod:`bray.bridge.metrics`)
node_proxy             (not Bray's) calls go through the node proxy, one process per model
                       (and its weight-set clones) on this machine that coalesces every
                       process's calls into requests to TorchServe (see ``bray.bridge.proxy``).
                       Default ``None``: on, unless ``BRAY_NODE_PROXY=0``; started by the
                       first call, which goes direct meanwhile. ``True``: on, and waited for
                       here; ``False``: off. Ignored in local mode
=====================  =====================================================================
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bray import tree
from bray.bridge.registration import LIVE_VERSION, Registration
from bray.bridge.session import current, init
from bray.bridge.transport import Transport, Watermark
from bray.errors import (
    BrayTimeoutError,
    ConfigError,
    ManagementError,
    StepNotFoundError,
)
from bray.export import EAGER_FILE, SPEC_FILE, export_model, load_spec, load_torch_module, to_numpy
from bray.handlers.options import ServingOptions
from bray.store import CheckpointStore

__all__ = ["LIVE_VERSION", "PublishHandle", "RemoteModel", "init"]

log = logging.getLogger(__name__)


class PublishHandle(int):
    """The published step (an ``int``), with :meth:`wait` for it to be served."""

    _wait: Callable[..., float]

    def __new__(cls, step: int, wait: Callable[..., float]) -> "PublishHandle":
        obj = super().__new__(cls, step)
        obj._wait = wait
        return obj

    @property
    def step(self) -> int:
        return int(self)

    def wait(self, timeout_s: float = 30.0) -> float:
        """Block until every worker of the model serves this step (or a later one).

        Returns:
            Seconds waited.

        Raises:
            BrayTimeoutError: not every worker had the step within ``timeout_s``.
        """
        return self._wait(int(self), timeout_s=timeout_s)


def _add_batch(obj: Any) -> Any:
    return tree.map_leaves(lambda a: a[None], obj)


def _drop_batch(obj: Any) -> Any:
    if type(obj) is np.ndarray:  # the usual answer: one array, no tree to walk
        return obj[0]
    return tree.map_leaves(lambda a: a[0], obj)


def _serving_options(*, max_batch_size: int, num_workers: int | None, cpus_per_worker: float | None,
                     use_onnx: str | None, use_tensorrt: bool, max_batch_delay_ms: int) -> ServingOptions:
    """Bray's constructor arguments as the serving options (the module docstring's table).

    Raises:
        ConfigError: a value the options refuse (``max_batch_delay_ms < 0``, ...).
    """
    options = ServingOptions(
        engine="tensorrt" if use_tensorrt else ("onnx" if use_onnx else "torch"),
        batch_size=abs(max_batch_size) or 1,
        max_batch_delay_ms=max_batch_delay_ms,
        workers=num_workers or 1,
        threads=max(1, int(cpus_per_worker or 1)),
        fixed_batch_size=-max_batch_size if max_batch_size < 0 else 0,
        onnx_weights="inputs" if use_onnx == "train" else "initializers",
        quantize=use_onnx == "quantize",
    )
    # No batching: TorchServe must not hold a lone request for the delay.
    return options if max_batch_size else replace(options, max_batch_delay_ms=0)


def _batch_of(payload: Any) -> int:
    """The leading dimension of the first array (all arrays share it; the server checks)."""
    leaves = tree.leaves(payload)
    if not leaves:
        raise ConfigError("forward needs at least one input array")
    if leaves[0].ndim == 0:
        raise ConfigError("forward inputs need a leading batch dimension; pass batch=False for a single sample")
    return int(leaves[0].shape[0])


@dataclass(frozen=True)
class _Settings:
    """Bray's constructor arguments, checked, with Bray's defaults filled in (what clones get)."""

    checkpoint_interval: int | float | None
    checkpoint_interval_s: float | None
    max_batch_size: int
    num_workers: int | None
    cpus_per_worker: float | None
    gpus_per_worker: float | None
    use_onnx: str | None
    local_mode: bool
    use_tensorrt: bool
    client_batching: bool
    node_proxy: bool | None
    max_batch_delay_ms: int
    keep_last: int
    timeout_s: float
    metrics_port: int | str | None
    #: Attaching (no ``model``) without ``max_batch_size`` / ``num_workers``: take the registered version's.
    adopt: tuple[bool, bool] = (False, False)

    @classmethod
    def check(cls, *, model: Any, forward_args: Sequence[Any], forward_kwargs: Mapping[str, Any] | None,
              memory_per_worker: int | None, local_mode: bool | str, max_batch_size: int | None,
              checkpoint_interval: int | float | None, checkpoint_interval_s: float | None,
              use_onnx: str | None, num_workers: int | None, **rest: Any) -> "_Settings":
        """Raises ConfigError for an argument Bray would not take (the message says which)."""
        if use_onnx not in (None, "", "infer", "train", "quantize"):
            raise ConfigError(f"use_onnx must be None, 'infer', 'train' or 'quantize', got {use_onnx!r}")
        if local_mode not in (True, False, "proxy"):
            raise ConfigError(f"local_mode must be True, False or 'proxy', got {local_mode!r}")
        if local_mode == "proxy":
            # Bray's proxy mode batches a process's calls before they reach the workers,
            # which the remote path here always does when client batching is on.
            rest["client_batching"], local_mode = True, False
        if checkpoint_interval is None and checkpoint_interval_s is None:
            checkpoint_interval_s = 600.0  # Bray saves a checkpoint every 10 minutes
        adopt = (model is None and max_batch_size is None, model is None and num_workers is None)
        if max_batch_size is None:
            max_batch_size = 1
        if not isinstance(max_batch_size, int):
            raise ConfigError(f"max_batch_size must be an integer, got {max_batch_size!r}")
        if num_workers is not None and num_workers < 1:
            raise ConfigError(f"num_workers must be an integer >= 1, got {num_workers}")
        if memory_per_worker:
            log.warning("bray: memory_per_worker=%s is not applied: TorchServe has no per-worker memory limit",
                        memory_per_worker)
        if model is not None and not forward_args and not forward_kwargs:
            raise ConfigError("a model needs example inputs to be exported: pass forward_args=(obs_batch,)")
        settings = cls(checkpoint_interval=checkpoint_interval, checkpoint_interval_s=checkpoint_interval_s,
                       max_batch_size=max_batch_size, num_workers=num_workers, use_onnx=use_onnx,
                       local_mode=bool(local_mode), adopt=adopt, **rest)
        settings.options()  # the serving options refuse what they cannot serve, here and now
        return settings

    def options(self) -> ServingOptions:
        return _serving_options(max_batch_size=self.max_batch_size, num_workers=self.num_workers,
                                cpus_per_worker=self.cpus_per_worker, use_onnx=self.use_onnx,
                                use_tensorrt=self.use_tensorrt, max_batch_delay_ms=self.max_batch_delay_ms)

    def kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments these settings came from (for :meth:`RemoteModel.clone`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        del out["adopt"]
        return out


class RemoteModel:
    """A policy served by TorchServe (or in-process in local mode), with Bray's API.

    Args:
        name: model name (letters, digits, ``_ . -``).
        model: the ``torch.nn.Module``; given, it is exported and its weights published
            (see ``override_model``); omitted, the model must already be in the store.
        forward_args / forward_kwargs: example inputs with a batch dimension (needed with
            ``model``), as in Bray.
        checkpoint_interval: which steps are kept for cloning, Bray's rule (see the
            module docstring's table); ``None``: Bray's default, every 10 minutes.
        checkpoint_interval_s: (not Bray's) keep a step this many seconds after the
            previous checkpoint; with ``checkpoint_interval=None`` it defaults to 600.
        max_batch_size, num_workers, cpus_per_worker, gpus_per_worker, memory_per_worker,
        use_onnx, use_tensorrt, local_mode, override_model, namespace: see the module
            docstring's table.
        max_batch_delay_ms: TorchServe's ``maxBatchDelay`` when batching.
        client_batching: coalesce concurrent calls of this process into one request
            (what Bray's ``local_mode="proxy"`` does); ``False`` sends every call as its
            own request.
        node_proxy: send calls through the node proxy, which coalesces the calls of every
            process on this machine. ``None`` (default): on unless ``BRAY_NODE_PROXY=0``,
            started by the first call (direct meanwhile); ``True``: started or attached to
            here, waited for (while it cannot be reached, calls go to TorchServe directly
            and a warning says why); ``False``: every call goes to TorchServe directly.
        keep_last: newest steps the store keeps besides checkpoint steps.
        timeout_s: limit for one forward (and for registration waits, x10).
        metrics_port: serve client metrics on this port (see the module docstring);
            ``None`` reads ``BRAY_METRICS_PORT``; ``0`` turns them off.

    Attributes:
        options: the :class:`~bray.handlers.options.ServingOptions` Bray's arguments map
            onto (engine, TorchServe batching and workers, threads, fixed batch): what
            the version is registered and archived with, and what local mode runs.

    Raises:
        ConfigError: invalid arguments (the message says which and why).
        ServerError: TorchServe refused the registration (see the message).
    """

    def __init__(
        self,
        name: str,
        model: Any = None,
        forward_args: Sequence[Any] = (),
        forward_kwargs: Mapping[str, Any] | None = None,
        checkpoint_interval: int | float | None = None,
        max_batch_size: int | None = None,
        num_workers: int | None = None,
        cpus_per_worker: float | None = None,
        gpus_per_worker: float | None = None,
        memory_per_worker: int | None = None,
        use_onnx: str | None = None,
        local_mode: bool | str = False,
        override_model: bool = True,
        namespace: str | None = None,
        *,
        use_tensorrt: bool = False,
        client_batching: bool = True,
        node_proxy: bool | None = None,
        max_batch_delay_ms: int = 0,
        checkpoint_interval_s: float | None = None,
        keep_last: int = 5,
        timeout_s: float = 60.0,
        metrics_port: int | str | None = None,
        _pinned_step: int | None = None,
    ) -> None:
        settings = _Settings.check(
            model=model, forward_args=forward_args, forward_kwargs=forward_kwargs,
            checkpoint_interval=checkpoint_interval, checkpoint_interval_s=checkpoint_interval_s,
            max_batch_size=max_batch_size, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker, memory_per_worker=memory_per_worker, use_onnx=use_onnx,
            local_mode=local_mode, use_tensorrt=use_tensorrt, client_batching=client_batching, node_proxy=node_proxy,
            max_batch_delay_ms=max_batch_delay_ms, keep_last=keep_last, timeout_s=timeout_s, metrics_port=metrics_port,
        )
        self._set_up(f"{namespace}.{name}" if namespace else name, model, forward_args, forward_kwargs, settings,
                     pinned=_pinned_step)
        self._ensure_export(name, override=override_model)
        if model is not None and (override_model or self.store.latest(self.name) is None):
            self.store.publish(self.name, model.state_dict())
        if self.local_mode:
            self.transport: Transport = self._local_transport()
        else:
            self._register(override=model is not None and override_model and not self.weight_set)
            self.transport = self._remote_transport(node_proxy=settings.node_proxy)
        self._track_metrics()

    @property
    def engine_name(self) -> str:
        """The engine serving the model (``torch``, ``onnx``, ``tensorrt``)."""
        return self.options.engine

    # --- set-up -------------------------------------------------------------------------

    def _set_up(self, name: str, model: Any, forward_args: Sequence[Any], forward_kwargs: Mapping[str, Any] | None,
                settings: "_Settings", *, pinned: int | None) -> None:
        """This object's state: where it lives, what it serves, and nothing sent anywhere yet."""
        session = current()
        self.locations = session.locations
        self.name = name
        self._use(settings)
        self.local_mode = settings.local_mode
        self.client_batching = settings.client_batching
        self.timeout_s = settings.timeout_s
        self._model = model
        self._forward_args = tuple(forward_args)
        self._forward_kwargs = dict(forward_kwargs or {})
        self._device = "cuda" if (settings.gpus_per_worker or 0) > 0 else "cpu"
        self._pinned = pinned
        self.store = CheckpointStore(session.store_root, keep_last=settings.keep_last,
                                     checkpoint_interval=settings.checkpoint_interval or 0,
                                     checkpoint_interval_s=settings.checkpoint_interval_s or 0.0)
        #: The model whose workers serve this one: itself, or for a clone served as a weight
        #: set (the default for the torch engine) its family's root (``handlers/weight_sets.py``).
        self.served_by = self._served_by(settings.local_mode)
        self._registration = Registration(self.served_by, self.store, self.locations, options=self.options,
                                          pinned=pinned, timeout_s=self.timeout_s)
        self._seen = Watermark()

    @property
    def weight_set(self) -> bool:
        """Served as a weight set of :attr:`served_by`'s workers, not as a TorchServe model of its own."""
        return self.served_by != self.name

    def _served_by(self, local_mode: bool) -> str:
        from bray.handlers.weight_sets import weight_set_of

        return self.name if local_mode else weight_set_of(self.store, self.name) or self.name

    def _ensure_export(self, given_name: str, *, override: bool) -> None:
        """Export the model into the store (given one), or check the store has a usable export."""
        export_dir = self.store.export_dir(self.name)
        has_export = (export_dir / SPEC_FILE).is_file()
        if self._model is not None and (override or not has_export):
            # A module torch.export refuses is served eagerly from its class; local mode
            # runs the given module itself, so there even a class no server could import is fine.
            export_model(self._model, self._forward_args, self._forward_kwargs, dest=export_dir,
                         onnx=self.engine_name != "torch", fallback="local" if self.local_mode else "eager")
        elif not has_export:
            raise StepNotFoundError(
                f"no model named {self.name!r} in the store {self.store.root}; create it once with "
                f"RemoteModel({given_name!r}, model=..., forward_args=...)"
            )
        elif self.engine_name != "torch" and not load_spec(export_dir).has_onnx:
            raise ConfigError(f"{self.name!r} was exported without ONNX; construct it with model=... to re-export")

    def _register(self, *, override: bool) -> None:
        """Make sure every node serves the version; attaching without settings adopts the registered ones."""
        try:
            existing = self._registration.ensure(override=override)
        except ManagementError:
            spec = load_spec(self.store.export_dir(self.name))
            if spec.has_eager:  # TorchServe says only "Failed to start workers"; the likely reason:
                log.warning("bray: %s: TorchServe could not register it; it is served eagerly, so its workers "
                            "import its class (%s in %s): is that module importable in the server's environment "
                            "(installed, or on the PYTHONPATH torchserve was started with)? The server's "
                            "model_log.log says why its workers stopped", self.name, EAGER_FILE,
                            self.store.export_dir(self.name))
            raise
        if existing is not None and any(self._settings.adopt):
            self._adopt_settings(existing)

    def _track_metrics(self) -> None:
        from bray.locations import metrics_address

        address = metrics_address(self._settings.metrics_port)
        if address is not None:
            from bray.bridge.metrics import track

            stats = track(self, address)
            self.transport.on_answer = lambda route, n, seconds: stats.record(route, samples=n, seconds=seconds)


    def _engine_options(self) -> Any:
        return self.options.engine_options(device="cuda:0" if self._device == "cuda" else "cpu")

    def _local_transport(self) -> Transport:
        """Local mode: the engine in this process (the trainer's own module for the torch engine)."""
        from bray.bridge.local import LocalRunner

        module = copy.deepcopy(self._model) if self._model is not None and self.engine_name == "torch" else None
        return LocalRunner(self.store, self.name, engine=self.engine_name, options=self._engine_options(),
                           step=self._pinned if self._pinned is not None else -1, module=module,
                           fixed_batch_size=self.options.fixed_batch_size, watermark=self._seen)

    def _remote_transport(self, *, node_proxy: bool | None) -> Transport:
        """HTTP to TorchServe, through the node proxy unless off (made after registering: adopted settings count)."""
        from bray.locations import node_proxy_default

        from bray.bridge.direct import DirectTransport

        urls = self.locations.inference_urls
        samples = abs(self.max_batch_size) * self.options.batch_size if self.max_batch_size and self.client_batching else 0
        direct = DirectTransport(self._registration, inference_urls=urls, max_batch_samples=samples,
                                 max_inflight=max(2, self.num_workers * len(urls)), timeout_s=self.timeout_s,
                                 watermark=self._seen, weight_set=self.name if self.weight_set else None)
        if not (node_proxy if node_proxy is not None else node_proxy_default()):
            return direct
        from bray.bridge.proxy_client import NodeProxyTransport

        return NodeProxyTransport.start(direct, name=self.served_by, version=self.version, pinned=self._pinned,
                                        locations=self.locations, store_root=self.store.root,
                                        timeout_s=self.timeout_s, wait_s=self.timeout_s if node_proxy else 0.0)

    def _management(self) -> Any:
        """The first node's management client (tests and tools reach the server through it)."""
        return self._registration.nodes()[0][0]

    def _use(self, settings: "_Settings") -> None:
        """Take ``settings`` and what follows from them: batching, workers, the serving options."""
        self._settings = settings  # what clones are made with
        self.max_batch_size = settings.max_batch_size
        self.num_workers = settings.num_workers or 1
        self.options = settings.options()  # what the version is served with (archive, registration, local engine)

    def _adopt_settings(self, desc: Any) -> None:
        """Attaching without settings: take the registered version's batching and workers."""
        adopt_batching, adopt_workers = self._settings.adopt
        registered: dict[str, Any] = {}
        if adopt_batching and desc.batch_size > 1:
            registered.update(max_batch_size=int(desc.batch_size), max_batch_delay_ms=int(desc.max_batch_delay_ms))
        if adopt_workers and desc.workers:
            registered["num_workers"] = int(desc.workers)
        self._use(replace(self._settings, **registered))
        self._registration.options = self.options  # what a re-registration archives

    # --- forward ----------------------------------------------------------------------

    @property
    def version(self) -> str:
        """The TorchServe version called: ``latest`` (follows the store), or a clone's pinned step."""
        return self._registration.version

    @property
    def answered_step(self) -> int:
        """The newest step that answered this process (``-1`` before any answer)."""
        return self._seen.value

    def batching_stats(self) -> tuple[int, int]:
        """``(forward calls, HTTP requests this process sent)`` so far, over every event loop used.

        Calls answered through the node proxy count as calls; the proxy's own requests
        are in :meth:`proxy_stats`.
        """
        stats = self.transport.stats()
        return stats.calls, stats.requests

    @property
    def proxy_fallbacks(self) -> int:
        """Calls sent to TorchServe directly because the node proxy was unavailable."""
        from bray.bridge.proxy_client import NodeProxyTransport

        return self.transport.fallbacks if isinstance(self.transport, NodeProxyTransport) else 0

    def proxy_stats(self) -> dict[str, Any] | None:
        """The node proxy's counters over every process it serves, ``None`` without a proxy.

        Returns:
            ``calls`` and ``samples`` answered, ``requests`` sent to TorchServe (and
            ``requests_by_url``), ``clients`` connected now and ``clients_seen``, its
            ``pid``, ``cpu_s`` and ``max_rss_mb``; ``None`` also while it is unreachable.
        """
        from bray.bridge.proxy_client import NodeProxyTransport

        return self.transport.proxy_stats() if isinstance(self.transport, NodeProxyTransport) else None

    def _payload(self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: bool) -> tuple[Any, int]:
        if args and not kwargs and all(type(a) is np.ndarray for a in args):
            # The usual call, arrays as arguments: what the general path below makes, without its walks.
            if not batch:
                return {"args": [a[None] for a in args]}, 1
            if args[0].ndim:
                return {"args": list(args)}, int(args[0].shape[0])
        payload: dict[str, Any] = {"args": [to_numpy(a) for a in args]}
        if kwargs:
            payload["kwargs"] = {k: to_numpy(v) for k, v in kwargs.items()}
        if not batch:
            return _add_batch(payload), 1
        return payload, _batch_of(payload)

    async def forward(self, *args: Any, batch: bool = False, return_step: bool = False, **kwargs: Any) -> Any:
        """Run the policy on NestedArray inputs (async).

        Args:
            *args / **kwargs: the model's inputs (numpy arrays or tensors, nested in
                lists, tuples and dicts as the model takes them).
            batch: ``False`` (Bray's default): one sample, the batch dimension is added
                and removed here; ``True``: inputs carry a leading batch dimension.
            return_step: also return the step whose weights answered.

        Returns:
            The outputs as NestedArrays of numpy arrays (and the step).

        Raises:
            InputError: the server refused the inputs (its message says what it expects).
            ServerUnreachableError / ServerError: the call could not be served.
        """
        payload, n = self._payload(args, kwargs, batch)
        outputs, step = await self.transport.submit(payload, n)
        if not batch:
            outputs = _drop_batch(outputs)
        return (outputs, step) if return_step else outputs

    def __call__(self, *args: Any, batch: bool = True, return_step: bool = False, **kwargs: Any) -> Any:
        """Synchronous :meth:`forward`, ``batch=True`` by default as in Bray (safe from any thread)."""
        payload, n = self._payload(args, kwargs, batch)
        outputs, step = self.transport.call(payload, n)
        if not batch:
            outputs = _drop_batch(outputs)
        return (outputs, step) if return_step else outputs

    # --- weights ----------------------------------------------------------------------

    def publish_weights(self, weights: Any, step: int = -1) -> PublishHandle:
        """Publish new weights (a state dict, or a NestedArray of numpy arrays).

        Args:
            weights: the new weights; keys must match the model's state dict.
            step: ``-1`` (Bray's default): the next step, latest + 1; else an explicit
                step above the latest.

        Returns:
            The step, as a handle whose ``wait(timeout_s)`` returns once every worker
            serves it.

        Raises:
            StepConflictError: ``step`` is not above the latest.
            StoreWriteError: the disk refused the write; nothing was published.
        """
        if self._pinned is not None:
            raise ConfigError(f"{self.name!r} serves pinned step {self._pinned}; publish to the model it was cloned from")
        return PublishHandle(self.store.publish(self.name, weights, None if step == -1 else step), self._wait_served)

    @property
    def step(self) -> int:
        """The latest published step (``-1`` before any)."""
        if self._pinned is not None:
            return self._pinned
        latest = self.store.latest(self.name)
        return -1 if latest is None else latest

    def _wait_served(self, step: int, *, timeout_s: float) -> float:
        from bray.bridge.local import LocalRunner

        if self.weight_set:
            # Every worker reads a weight set's LATEST before a batch uses it: once the
            # publish returned, every answer for this clone carries this step or a later one.
            return 0.0
        if not isinstance(self.transport, LocalRunner):
            return self._registration.wait_served(step, timeout_s=timeout_s)
        started = time.monotonic()
        if not self.transport.follower.wait_staged(step, timeout_s=timeout_s):
            raise BrayTimeoutError(f"local engine of {self.name!r} did not load step {step} within {timeout_s} s")
        return time.monotonic() - started

    def get_model(self) -> Any:
        """A ``torch.nn.Module`` with the latest weights (the given model's class when known)."""
        import torch

        ckpt = self.store.load(self.name, self.step if self._pinned is not None else -1, framework="pt")
        if self._model is not None:
            net = copy.deepcopy(self._model)
        else:
            net = load_torch_module(self.store.export_dir(self.name))
        net.load_state_dict({k: torch.as_tensor(v) for k, v in ckpt.weights.items()})
        return net

    def clone(self, step: int = -1, name: str | None = None, *, dedicated: bool = False,
              **overrides: Any) -> "RemoteModel":
        """An independent model starting from ``step``'s weights (Bray's clone).

        The clone is named ``<model>-clone-step-<step>``, or ``<model>-clone-step-<step>-<name>``
        with ``name`` (Bray's ``<model>/clone-step-<step>-<name>``, with ``-`` for ``/``,
        which TorchServe model names cannot hold). A step that is no longer kept snaps
        down to the largest kept step below it, and the name carries the step cloned.
        Cloning the same step with the same ``name`` again returns the same model, in
        any process. The clone is a model of its own: it serves its starting weights
        until weights are published to it, and the original keeps training. Its origin
        (source model and step) is recorded in its store folder.

        Beyond Bray: by default (torch engine, remote) the clone is a *weight set* of the
        model it came from: its own steps in the store, served by the source model's
        TorchServe workers (requests carry ``X-Bray-Weights: <clone name>``), so a
        league of many opponents costs their weights, not a TorchServe model and
        workers each. A clone of a clone is a weight set of the same model.

        Args:
            step: the step to clone (``-1``: the latest).
            name: an extra suffix telling clones of the same step apart (Bray's meaning).
            dedicated: serve the clone as a TorchServe model of its own, with workers of
                its own (isolation; engines other than torch always do).
            **overrides: constructor arguments that differ from this model's.

        Returns:
            The clone.

        Raises:
            ConfigError: the clone's name already belongs to a clone of another model or
                step, or to a model that is not a clone (the message says which).
            StepNotFoundError: no kept step at or below ``step``.
        """
        real = self.store.resolve(self.name, step if self._pinned is None or step != -1 else self._pinned)
        # torch and ONNX Runtime run weight sets in the model's workers; TensorRT (an engine
        # built per weight set) and local mode get a model of their own.
        dedicated = dedicated or self.engine_name not in ("torch", "onnx") or self.local_mode
        clone_name = f"{self.name}-clone-step-{real}" + (f"-{name}" if name else "")
        self.store.model_dir(clone_name)  # a name TorchServe and the store accept, or ConfigError
        origin = self.store.clone_origin(clone_name)
        if origin is None:
            if self.store.latest(clone_name) is not None:
                raise ConfigError(
                    f"{clone_name!r} is already a model of its own in {self.store.root}, not a clone of "
                    f"{self.name!r} at step {real}; clone with another name= suffix"
                )
            origin = self.store.record_clone_origin(clone_name, source=self.name, step=real, dedicated=dedicated)
        elif (recorded := self.store.clone_dedicated(clone_name)) != dedicated:
            kind = "a model of its own" if recorded else "a weight set"
            raise ConfigError(f"{clone_name!r} was cloned as {kind} before; clone it the same way (dedicated=) "
                              "or with another name= suffix")
        if origin != (self.name, real):
            raise ConfigError(
                f"{clone_name!r} already names a clone of {origin[0]!r} at step {origin[1]}, not of "
                f"{self.name!r} at step {real}; clone with another name= suffix"
            )
        self.store.seed_clone(clone_name)  # the source's export and the origin step, once
        kwargs = {**self._settings.kwargs(), **overrides}
        clone = RemoteModel(clone_name, override_model=False, **kwargs)
        clone._model = self._model
        return clone

    def close(self) -> None:
        """Stop local followers and close connections (the server keeps the model)."""
        self.transport.close()
        self._registration.close()

    def __repr__(self) -> str:
        mode = "local" if self.local_mode else ",".join(self.locations.inference_urls)
        return f"RemoteModel({self.name!r}, step={self.step}, engine={self.engine_name}, {mode})"
