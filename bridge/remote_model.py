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
node_proxy             (not Bray's) ``True``: calls go through the node proxy, one process per
                       model on this machine that coalesces every process's calls into
                       requests to TorchServe (started on first use, see ``bray.bridge.proxy``);
                       ignored in local mode
=====================  =====================================================================
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bray import tree, wire
from bray.config import Locations
from bray.errors import (
    BrayTimeoutError,
    ConfigError,
    ModelNotFoundError,
    StepConflictError,
    StepNotFoundError,
    VersionExistsError,
)
from bray.export import SPEC_FILE, export_model, load_spec, load_torch_module, to_numpy
from bray.handlers.config import ServingOptions
from bray.store import CheckpointStore

__all__ = ["PublishHandle", "RemoteModel", "init"]

log = logging.getLogger(__name__)

LIVE_VERSION = "latest"


@dataclass(frozen=True)
class _Session:
    locations: Locations
    store_root: Path


_session: _Session | None = None
_session_lock = threading.Lock()


def init(project: str | None = None, trial: str | None = None, *, store: str | os.PathLike[str] | None = None,
         model_store: str | os.PathLike[str] | None = None, inference_url: str | Sequence[str] | None = None,
         management_url: str | None = None, key_file: str | os.PathLike[str] | None = None) -> Locations:
    """Say where the checkpoint store lives and which TorchServe to use.

    Keyword arguments win over the ``BRAY_*`` environment variables, which win over the
    defaults (the bundled config started as the README says). ``project`` and ``trial``
    give the store a sub-folder each (``<store>/<project>/<trial>``), as in Bray.

    Several nodes (``inference_url="http://a:8080,http://b:8080"``, sharing one store):
    every TorchServe writes its own keys, so ``key_file`` lists one key file per address,
    comma-separated in the same order, and ``management_url`` and ``model_store`` may too:
    models are then registered through every management address.

    Returns:
        The resolved locations.

    Raises:
        ConfigError: a malformed address.
    """
    global _session
    locations = Locations.from_env(store=store, model_store=model_store, inference_url=inference_url,
                                   management_url=management_url, key_file=key_file)
    root = locations.store
    for part in (project, trial):
        if part:
            root = root / str(part)
    with _session_lock:
        _session = _Session(locations=locations, store_root=root)
    return locations


def _current() -> _Session:
    with _session_lock:
        session = _session
    if session is None:
        locations = Locations.from_env()
        return _Session(locations=locations, store_root=locations.store)
    return session


class PublishHandle(int):
    """The published step (an ``int``), with :meth:`wait` for it to be served."""

    _model: "RemoteModel"

    def __new__(cls, step: int, model: "RemoteModel") -> "PublishHandle":
        obj = super().__new__(cls, step)
        obj._model = model
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
        return self._model._wait_served(int(self), timeout_s=timeout_s)


def _add_batch(obj: Any) -> Any:
    return tree.map_leaves(lambda a: a[None], obj)


def _drop_batch(obj: Any) -> Any:
    return tree.map_leaves(lambda a: a[0], obj)


class _Watermark:
    """The newest step this process has been answered with: raised from any thread, never lowered.

    Every caller sends it as the minimum step of its next request, so a caller's steps
    never go backwards when its requests alternate between workers.
    """

    __slots__ = ("value", "_lock")

    def __init__(self) -> None:
        self.value = -1
        self._lock = threading.Lock()

    def advance(self, step: int) -> None:
        if step > self.value:  # an int read is atomic: most answers take no lock
            with self._lock:
                if step > self.value:
                    self.value = step


def _per_node(locations: Locations) -> tuple[list[str], list[Path | None]]:
    """Management URLs and key files, each one or one per inference address.

    ``BRAY_KEY_FILE`` (and ``BRAY_MANAGEMENT_URL``) may list one entry per inference
    address, comma-separated in ``BRAY_INFERENCE_URL``'s order; the model is registered
    through every management address given.
    """
    n = len(locations.inference_urls)
    mgmt = [u.strip().rstrip("/") for u in locations.management_url.split(",") if u.strip()]
    keys: list[Path | None] = (
        [Path(k.strip()) for k in str(locations.key_file).split(",") if k.strip()]
        if locations.key_file is not None else [None]
    )
    for what, items, var in (("management URL", mgmt, "BRAY_MANAGEMENT_URL"), ("key file", keys, "BRAY_KEY_FILE")):
        if len(items) not in (1, n):
            raise ConfigError(
                f"{len(items)} {what}s for {n} inference address(es); give one, or one per address "
                f"in BRAY_INFERENCE_URL's order ({var}=a,b,...)"
            )
    return mgmt, keys


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
            process on this machine (it is started, or attached to, here; while it cannot
            be reached, calls go to TorchServe directly and a warning says why).
        keep_last: newest steps the store keeps besides checkpoint steps.
        timeout_s: limit for one forward (and for registration waits, x10).
        metrics_port: serve client metrics on this port (see the module docstring);
            ``None`` reads ``BRAY_METRICS_PORT``; ``0`` turns them off.

    Attributes:
        options: the :class:`~bray.handlers.config.ServingOptions` Bray's arguments map
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
        node_proxy: bool = False,
        max_batch_delay_ms: int = 0,
        checkpoint_interval_s: float | None = None,
        keep_last: int = 5,
        timeout_s: float = 60.0,
        metrics_port: int | str | None = None,
        _pinned_step: int | None = None,
    ) -> None:
        from bray.config import metrics_address

        metrics_at = metrics_address(metrics_port)
        if use_onnx not in (None, "", "infer", "train", "quantize"):
            raise ConfigError(f"use_onnx must be None, 'infer', 'train' or 'quantize', got {use_onnx!r}")
        if local_mode not in (True, False, "proxy"):
            raise ConfigError(f"local_mode must be True, False or 'proxy', got {local_mode!r}")
        if local_mode == "proxy":
            # Bray's proxy mode batches a process's calls before they reach the workers,
            # which the remote path here always does when client batching is on.
            client_batching, local_mode = True, False
        if checkpoint_interval is None and checkpoint_interval_s is None:
            checkpoint_interval_s = 600.0  # Bray saves a checkpoint every 10 minutes
        # Attaching without settings adopts the registered version's batching and workers.
        self._adopt = model is None and max_batch_size is None, model is None and num_workers is None
        if max_batch_size is None:
            max_batch_size = 1
        if not isinstance(max_batch_size, int):
            raise ConfigError(f"max_batch_size must be an integer, got {max_batch_size!r}")
        if num_workers is not None and num_workers < 1:
            raise ConfigError(f"num_workers must be an integer >= 1, got {num_workers}")
        options = _serving_options(max_batch_size=max_batch_size, num_workers=num_workers,
                                   cpus_per_worker=cpus_per_worker, use_onnx=use_onnx, use_tensorrt=use_tensorrt,
                                   max_batch_delay_ms=max_batch_delay_ms)
        if memory_per_worker:
            log.warning("bray: memory_per_worker=%s is not applied: TorchServe has no per-worker memory limit",
                        memory_per_worker)
        if model is not None and not forward_args and not forward_kwargs:
            raise ConfigError("a model needs example inputs to be exported: pass forward_args=(obs_batch,)")
        session = _current()
        if not local_mode:
            _per_node(session.locations)  # one key file / management URL, or one per node
        self.locations = session.locations
        self.name = f"{namespace}.{name}" if namespace else name
        self.local_mode = local_mode
        self.max_batch_size = max_batch_size
        self.client_batching = client_batching
        self.num_workers = num_workers or 1
        self.timeout_s = timeout_s
        self._model = model
        self._forward_args = tuple(forward_args)
        self._forward_kwargs = dict(forward_kwargs or {})
        self._init_kwargs = dict(
            checkpoint_interval=checkpoint_interval, checkpoint_interval_s=checkpoint_interval_s,
            max_batch_size=max_batch_size, num_workers=num_workers,
            cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, use_onnx=use_onnx,
            local_mode=local_mode, use_tensorrt=use_tensorrt, max_batch_delay_ms=max_batch_delay_ms,
            keep_last=keep_last, timeout_s=timeout_s, client_batching=client_batching,
            metrics_port=metrics_port, node_proxy=node_proxy,
        )
        self.options = options  # what the version is served with (archive, registration, local engine)
        self._device = "cuda" if (gpus_per_worker or 0) > 0 else "cpu"
        self._pinned = _pinned_step
        self.store = CheckpointStore(session.store_root, keep_last=keep_last,
                                     checkpoint_interval=checkpoint_interval or 0,
                                     checkpoint_interval_s=checkpoint_interval_s or 0.0)
        self._lock = threading.Lock()
        self._local: Any = None
        self._client: Any = None
        self._batchers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._batcher_stats: list[Any] = []
        self._mgmt_nodes: list[tuple[Any, Path]] | None = None
        self._worker_pids: tuple[int, ...] = ()
        self._register_lock = threading.Lock()
        self._not_registering = threading.Event()
        self._not_registering.set()
        self._registrations = 0  # re-registrations so far: callers that saw the same 404 skip theirs
        self._seen = _Watermark()
        self._proxy: Any = None
        self._proxy_ok = True
        self.proxy_fallbacks = 0  # calls sent to TorchServe directly because the proxy was unavailable
        self._proxy_calls = 0

        export_dir = self.store.export_dir(self.name)
        has_export = (export_dir / SPEC_FILE).is_file()
        if model is not None and (override_model or not has_export):
            export_model(model, self._forward_args, self._forward_kwargs, dest=export_dir,
                         onnx=self.engine_name != "torch")
        elif not has_export:
            raise StepNotFoundError(
                f"no model named {self.name!r} in the store {self.store.root}; create it once with "
                f"RemoteModel({name!r}, model=..., forward_args=...)"
            )
        elif self.engine_name != "torch" and not load_spec(export_dir).has_onnx:
            raise ConfigError(f"{self.name!r} was exported without ONNX; construct it with model=... to re-export")
        if model is not None and (override_model or self.store.latest(self.name) is None):
            self.store.publish(self.name, model.state_dict())
        if local_mode:
            self._start_local()
        else:
            self._register(override=model is not None and override_model)
            if node_proxy:
                self._start_proxy()
        if metrics_at is not None:
            from bray.bridge.metrics import track

            track(self, metrics_at)

    @property
    def engine_name(self) -> str:
        """The engine serving the model (``torch``, ``onnx``, ``tensorrt``)."""
        return self.options.engine

    # --- set-up -------------------------------------------------------------------------

    def _engine_options(self) -> Any:
        return self.options.engine_options(device="cuda:0" if self._device == "cuda" else "cpu")

    def _start_local(self) -> None:
        from bray.bridge.local import LocalRunner

        self._local = LocalRunner(self.store, self.name, engine=self.engine_name, options=self._engine_options(),
                                  step=self._pinned if self._pinned is not None else -1,
                                  module=copy.deepcopy(self._model) if self._model is not None and self.engine_name == "torch" else None,
                                  fixed_batch_size=self.options.fixed_batch_size)

    def _start_proxy(self) -> None:
        """Attach to this model's node proxy, starting it when none runs (bounded by ``timeout_s``)."""
        import sys

        from bray.bridge._slot import proxy_address
        from bray.bridge.proxy import DEFAULT_IDLE_EXIT_S
        from bray.bridge.proxy_client import ProxyClient

        loc = self.locations
        root = self.store.root.resolve()
        env = {**os.environ, "BRAY_STORE": str(root), "BRAY_INFERENCE_URL": ",".join(loc.inference_urls),
               "BRAY_MANAGEMENT_URL": loc.management_url,
               "BRAY_MODEL_STORE": ",".join(os.path.abspath(p) for p in str(loc.model_store).split(","))}
        if loc.key_file is not None:
            env["BRAY_KEY_FILE"] = ",".join(os.path.abspath(p) for p in str(loc.key_file).split(","))
        idle = os.environ.get("BRAY_PROXY_IDLE_S") or str(DEFAULT_IDLE_EXIT_S)
        argv = [sys.executable, "-m", "bray.bridge.proxy", "--name", self.name, "--timeout-s", str(self.timeout_s),
                "--idle-exit-s", idle] + (["--step", str(self._pinned)] if self._pinned is not None else [])
        self._proxy = ProxyClient(proxy_address(self.name, self._version, loc.inference_urls, root),
                                  argv=argv, env=env, timeout_s=self.timeout_s)
        if not self._proxy.start(wait_s=self.timeout_s):
            self._proxy_ok = False
            log.warning("bray: %s: no node proxy (%s); calling TorchServe directly until one answers",
                        self.name, self._proxy.last_error)

    def _nodes(self) -> list[tuple[Any, Path]]:
        """``(management client, model store)`` of every node the model is registered on.

        One per management address: ``BRAY_MANAGEMENT_URL`` (and ``BRAY_KEY_FILE``,
        ``BRAY_MODEL_STORE``) may list one entry per node, comma-separated in the same
        order; a single model store is taken as shared by every node.
        """
        if self._mgmt_nodes is None:
            from bray.torchserve.management import ManagementClient

            mgmt_urls, key_files = _per_node(self.locations)
            stores = [Path(p.strip()) for p in str(self.locations.model_store).split(",") if p.strip()]
            if len(stores) not in (1, len(mgmt_urls)):
                raise ConfigError(
                    f"{len(stores)} model stores for {len(mgmt_urls)} management address(es); give one "
                    "shared by every node, or one per node in BRAY_MANAGEMENT_URL's order (BRAY_MODEL_STORE=a,b)"
                )
            self._mgmt_nodes = [
                (ManagementClient(url, key_file=key_files[i % len(key_files)], timeout_s=max(self.timeout_s * 10, 300)),
                 stores[i % len(stores)])
                for i, url in enumerate(mgmt_urls)
            ]
        return self._mgmt_nodes

    def _management(self) -> Any:
        return self._nodes()[0][0]

    def _inference_auth(self) -> Any:
        from bray.torchserve.auth import TokenAuth

        mgmt_urls, key_files = _per_node(self.locations)
        urls = self.locations.inference_urls
        if len(key_files) == 1 and len(mgmt_urls) == 1:
            return TokenAuth(key_files[0], management_url=mgmt_urls[0])
        # Each TorchServe generates its own keys at start: one TokenAuth per node, refreshed
        # through that node's management API (or the one given, when only one is).
        return {url: TokenAuth(key_files[i % len(key_files)], management_url=mgmt_urls[i % len(mgmt_urls)])
                for i, url in enumerate(urls)}

    def _register(self, *, override: bool) -> None:
        """Make sure every node serves the version (registering it where it is missing)."""
        version = LIVE_VERSION if self._pinned is None else str(self._pinned)
        for i, (client, model_store) in enumerate(self._nodes()):
            existing = self._register_on(client, model_store, version, override=override)
            if i == 0 and existing is not None and any(self._adopt):
                self._adopt_settings(existing)
        self._version = version

    def _register_on(self, client: Any, model_store: Path, version: str, *, override: bool) -> Any:
        """Register ``version`` on one node; returns what was registered there already, if anything."""
        from bray.archiver.publish import publish_version

        try:
            existing = client.describe(self.name, version)
        except ModelNotFoundError:
            existing = []
        if existing and override:
            client.unregister(self.name, version)
            existing = []
        if existing:
            return existing[0]
        try:
            publish_version(
                self.store, self.name, step=self._pinned, client=client, model_store=model_store,
                set_default=True, wait_timeout_s=max(self.timeout_s * 10, 300), options=self.options,
                version=version, force=True,
            )
        except VersionExistsError:
            # Another process (an actor cloning the same opponent) registered it first.
            client.wait_ready(self.name, version, timeout_s=max(self.timeout_s * 10, 300))
        return None

    def _adopt_settings(self, desc: Any) -> None:
        """Attaching without settings: take the registered version's batching and workers."""
        if self._adopt[0] and desc.batch_size > 1:
            self.max_batch_size = int(desc.batch_size)
            self.options = replace(self.options, batch_size=self.max_batch_size,
                                   max_batch_delay_ms=int(desc.max_batch_delay_ms))
            self._init_kwargs.update(max_batch_size=self.max_batch_size,
                                     max_batch_delay_ms=self.options.max_batch_delay_ms)
        if self._adopt[1] and desc.workers:
            self.num_workers = int(desc.workers)
            self.options = replace(self.options, workers=self.num_workers)
            self._init_kwargs.update(num_workers=self.num_workers)

    # --- forward ----------------------------------------------------------------------

    def _batcher_here(self) -> Any:
        """The client-side batcher of the running event loop (made on first use).

        Callers on one loop share a batcher and an HTTP session on that loop, so an
        ``await forward(...)`` never hops threads; sync ``__call__`` uses the bridge loop's.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is not None:
            return batcher
        with self._lock:
            from bray.bridge._loop import loop_session
            from bray.bridge.batching import ForwardBatcher
            from bray.torchserve.inference import InferenceClient

            if self._client is None:
                self._client = InferenceClient(self.locations.inference_urls, auth=self._inference_auth(),
                                               timeout_s=self.timeout_s, session_factory=loop_session)
            batcher = self._batchers.get(loop)
            if batcher is None:
                samples = abs(self.max_batch_size) * self.options.batch_size if self.max_batch_size and self.client_batching else 0
                batcher = ForwardBatcher(self._send, max_batch_samples=samples,
                                         max_inflight=max(2, self.num_workers * len(self.locations.inference_urls)))
                self._batchers[loop] = batcher
                self._batcher_stats.append(batcher)
        return batcher

    def batching_stats(self) -> tuple[int, int]:
        """``(forward calls, HTTP requests this process sent)`` so far, over every event loop used.

        Calls answered through the node proxy count as calls; the proxy's own requests
        are in :meth:`proxy_stats`.
        """
        return (sum(b.calls for b in self._batcher_stats) + self._proxy_calls,
                sum(b.requests_sent for b in self._batcher_stats))

    async def _send(self, payload: Any) -> tuple[Any, int]:
        import asyncio

        body = wire.encode(payload)
        if not self._not_registering.is_set():  # its workers are not up yet: 503s otherwise
            await asyncio.get_running_loop().run_in_executor(None, self._not_registering.wait, self.timeout_s * 10)
        seen = self._registrations
        try:
            reply = await self._client.predict(self.name, body, version=self._version, min_step=self._seen.value)
        except ModelNotFoundError:
            # A restarted TorchServe has forgotten its models (config snapshots are off):
            # register ours again from the store, whose latest step the live version
            # serves, so no published step is lost; then retry once.
            await asyncio.get_running_loop().run_in_executor(None, self._reregister, seen)
            reply = await self._client.predict(self.name, body, version=self._version, min_step=self._seen.value)
        self._seen.advance(reply.step)  # monotonic reads across workers, for every caller here
        return wire.decode(bytearray(reply.body)), reply.step

    def _reregister(self, seen: int) -> None:
        """Register again, once for all callers that saw the same 404 (any loop or thread)."""
        with self._register_lock:
            if self._registrations != seen:
                return  # done by another caller since this one's request went out
            self._not_registering.clear()
            try:
                self._register_again()
                self._registrations += 1
            finally:
                self._not_registering.set()

    def _register_again(self) -> None:
        from bray.errors import VersionExistsError

        log.warning("bray: %s version %s is not registered on the server (restarted?); registering it again "
                    "from the store %s", self.name, self._version, self.store.root)
        try:
            self._register(override=False)  # a no-op when it is registered again already
        except VersionExistsError:
            pass  # another process registered it first
        self._worker_pids = ()

    async def _forward_on_loop(self, payload: Any, n: int) -> tuple[Any, int]:
        return await self._batcher_here().submit(payload, n)

    async def _forward_remote(self, payload: Any, n: int) -> tuple[Any, int]:
        """One remote forward: through the node proxy when there is one, else (or while it is away) direct."""
        from bray.bridge._slot import ProxyUnavailableError

        if self._proxy is not None:
            try:
                outputs, step = await self._proxy.acall(payload, n, self._seen.value)
                return self._answered(outputs, step, n, "proxy")
            except ProxyUnavailableError as err:
                self._proxy_unavailable(err)
        outputs, step = await self._forward_on_loop(payload, n)
        return self._answered(outputs, step, n, "http")

    def _forward_remote_sync(self, payload: Any, n: int) -> tuple[Any, int]:
        """:meth:`_forward_remote` from a plain thread: the proxy is called on this thread's own socket."""
        from bray.bridge._loop import run_sync
        from bray.bridge._slot import ProxyUnavailableError

        if self._proxy is not None:
            try:
                outputs, step = self._proxy.call(payload, n, self._seen.value)
                return self._answered(outputs, step, n, "proxy")
            except ProxyUnavailableError as err:
                self._proxy_unavailable(err)
        outputs, step = run_sync(self._forward_on_loop(payload, n), timeout_s=self.timeout_s * 2)
        return self._answered(outputs, step, n, "http")

    def _answered(self, outputs: Any, step: int, n: int, route: str) -> tuple[Any, int]:
        """Every answered remote forward passes here (``route``: ``"proxy"`` or ``"http"``).

        It keeps the newest step this process was answered with (sent as the minimum step
        of its next requests), and is the one place to count calls by route.
        """
        self._seen.advance(step)
        if route == "proxy":
            self._proxy_calls += 1
            if not self._proxy_ok:
                self._proxy_ok = True
                log.warning("bray: %s: the node proxy answers again", self.name)
        return outputs, step

    def _proxy_unavailable(self, err: Exception) -> None:
        self.proxy_fallbacks += 1
        if self._proxy_ok:
            self._proxy_ok = False
            log.warning("bray: %s: the node proxy is not available (%s); calling TorchServe directly until it "
                        "answers again", self.name, err)

    def proxy_stats(self) -> dict[str, Any] | None:
        """The node proxy's counters over every process it serves, ``None`` without a proxy.

        Returns:
            ``calls`` and ``samples`` answered, ``requests`` sent to TorchServe (and
            ``requests_by_url``), ``clients`` connected now and ``clients_seen``, its
            ``pid``, ``cpu_s`` and ``max_rss_mb``; ``None`` also while it is unreachable.
        """
        from bray.bridge._slot import ProxyUnavailableError

        if self._proxy is None:
            return None
        try:
            return self._proxy.stats()
        except ProxyUnavailableError:
            return None

    def _payload(self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: bool) -> tuple[Any, int]:
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
        if self._local is not None:
            outputs, step = self._local.forward(payload)
            self._seen.advance(step)
        else:
            outputs, step = await self._forward_remote(payload, n)
        if not batch:
            outputs = _drop_batch(outputs)
        return (outputs, step) if return_step else outputs

    def __call__(self, *args: Any, batch: bool = True, return_step: bool = False, **kwargs: Any) -> Any:
        """Synchronous :meth:`forward`, ``batch=True`` by default as in Bray (safe from any thread)."""
        payload, n = self._payload(args, kwargs, batch)
        if self._local is not None:
            outputs, step = self._local.forward(payload)
            self._seen.advance(step)
        else:
            outputs, step = self._forward_remote_sync(payload, n)
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
        return PublishHandle(self.store.publish(self.name, weights, None if step == -1 else step), self)

    @property
    def step(self) -> int:
        """The latest published step (``-1`` before any)."""
        if self._pinned is not None:
            return self._pinned
        latest = self.store.latest(self.name)
        return -1 if latest is None else latest

    def _wait_served(self, step: int, *, timeout_s: float) -> float:
        started = time.monotonic()
        if self._local is not None:
            if not self._local.follower.wait_staged(step, timeout_s=timeout_s):
                raise BrayTimeoutError(f"local engine of {self.name!r} did not load step {step} within {timeout_s} s")
            return time.monotonic() - started
        deadline = started + timeout_s
        next_refresh = started + 0.5
        while True:
            pids = self._worker_pids or self._refresh_pids()
            serving = {int(v["pid"]): int(v["step"]) for v in self.store.serving(self.name).values() if "pid" in v}
            if pids and all(serving.get(pid, -1) >= step for pid in pids):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                behind = {pid: serving.get(pid) for pid in pids if serving.get(pid, -1) < step}
                raise BrayTimeoutError(f"step {step} of {self.name!r} not served by every worker within {timeout_s} s; "
                                       f"workers behind (pid: step): {behind}")
            if any(pid not in serving for pid in pids) or time.monotonic() > next_refresh:
                # A restarted worker has a new pid; a SIGKILLed one leaves its announcement
                # behind, so a behind worker is looked up again now and then too.
                self._refresh_pids()
                next_refresh = time.monotonic() + 0.5
            time.sleep(0.002)

    def _refresh_pids(self) -> tuple[int, ...]:
        """READY worker pids of the version on every node."""
        pids: list[int] = []
        for client, _ in self._nodes():
            try:
                (desc,) = client.describe(self.name, self._version)
            except (ModelNotFoundError, ValueError):
                continue
            pids += [int(w["pid"]) for w in desc.raw.get("workers", []) if w.get("pid") and w.get("status") == "READY"]
        self._worker_pids = tuple(pids)
        return self._worker_pids

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

    def clone(self, step: int = -1, name: str | None = None, **overrides: Any) -> "RemoteModel":
        """An independent model starting from ``step``'s weights (Bray's clone).

        The clone is named ``<model>-clone-step-<step>``, or ``<model>-clone-step-<step>-<name>``
        with ``name`` (Bray's ``<model>/clone-step-<step>-<name>``, with ``-`` for ``/``,
        which TorchServe model names cannot hold). A step that is no longer kept snaps
        down to the largest kept step below it, and the name carries the step cloned.
        Cloning the same step with the same ``name`` again returns the same model, in
        any process. The clone is a model of its own: it serves its starting weights
        until weights are published to it, and the original keeps training. Its origin
        (source model and step) is recorded in its store folder.

        Args:
            step: the step to clone (``-1``: the latest).
            name: an extra suffix telling clones of the same step apart (Bray's meaning).
            **overrides: constructor arguments that differ from this model's.

        Returns:
            The clone.

        Raises:
            ConfigError: the clone's name already belongs to a clone of another model or
                step, or to a model that is not a clone (the message says which).
            StepNotFoundError: no kept step at or below ``step``.
        """
        real = self.store.resolve(self.name, step if self._pinned is None or step != -1 else self._pinned)
        clone_name = f"{self.name}-clone-step-{real}" + (f"-{name}" if name else "")
        self.store.model_dir(clone_name)  # a name TorchServe and the store accept, or ConfigError
        origin = self.store.clone_origin(clone_name)
        if origin is None:
            if self.store.latest(clone_name) is not None:
                raise ConfigError(
                    f"{clone_name!r} is already a model of its own in {self.store.root}, not a clone of "
                    f"{self.name!r} at step {real}; clone with another name= suffix"
                )
            origin = self.store.record_clone_origin(clone_name, source=self.name, step=real)
        if origin != (self.name, real):
            raise ConfigError(
                f"{clone_name!r} already names a clone of {origin[0]!r} at step {origin[1]}, not of "
                f"{self.name!r} at step {real}; clone with another name= suffix"
            )
        dest = self.store.model_dir(clone_name)
        if self.store.latest(clone_name) is None:
            export_src = self.store.export_dir(self.name)
            tmp = dest.parent / f".{clone_name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            shutil.copytree(export_src, tmp)
            dest.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, self.store.export_dir(clone_name))
            except OSError:
                if not (self.store.export_dir(clone_name) / SPEC_FILE).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process cloned it first
            ckpt = self.store.load(self.name, real, framework="pt")
            try:
                self.store.publish(clone_name, ckpt.weights, step=real)
            except StepConflictError:
                if self.store.latest(clone_name) is None:
                    raise
        kwargs = {**self._init_kwargs, **overrides}
        clone = RemoteModel(clone_name, override_model=False, **kwargs)
        clone._model = self._model
        return clone

    def close(self) -> None:
        """Stop local followers and close connections (the server keeps the model)."""
        if self._local is not None:
            self._local.close()
        if self._proxy is not None:
            self._proxy.close()
        if self._client is not None:
            from bray.bridge._loop import run_sync

            try:
                run_sync(self._client.close(), timeout_s=5)
            except Exception:  # closing is best effort
                pass
        for client, _ in self._mgmt_nodes or []:
            client.close()

    def __repr__(self) -> str:
        mode = "local" if self.local_mode else ",".join(self.locations.inference_urls)
        return f"RemoteModel({self.name!r}, step={self.step}, engine={self.engine_name}, {mode})"
