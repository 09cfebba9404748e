"""EngineHandler: the TorchServe handler that serves a bray model and hot-reloads its weights.

What a TorchServe worker runs. It rebuilds the model from the export (no trainer
source), serves the pinned step or follows the latest one, and:

- decodes each request on its own, so a bad one gets its own 4xx and its neighbours
  are answered normally (the worker never dies of a request);
- concatenates the good requests into one forward, splits the outputs back;
- loads new weights on the store watcher's thread and swaps them in *between*
  batches, never inside one; a step that fails to load is refused with a logged
  reason and the old weights keep serving;
- answers with ``X-Bray-Step`` (the step that produced the answer) and
  ``X-Bray-Worker`` (the worker's pid);
- also speaks the Open Inference Protocol (``POST /v2/models/<name>/infer``, which
  TorchServe routes here like ``/predictions/<name>``): see ``oip.py``;
- reports Prometheus metrics through TorchServe's metrics API (``metrics.py``);
- announces each staged step in ``<store>/<name>/.serving/`` (``follower.py``), which is
  how ``RemoteModel.publish_weights(...).wait()`` knows every worker has it.

TorchServe wants exactly one class in the handler module it imports; archives ship a
one-class shim (``bray_handler.py``) that subclasses this one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from ts.torch_handler.base_handler import BaseHandler

from bray import wire
from bray.errors import BrayError, InputError, WireError
from bray.export import EXPORT_DIRNAME, SPEC_FILE, load_spec
from bray.handlers.options import ARCHIVE_WEIGHTS_FILE, ServingConfig
from bray.locations import node_cache
from bray.handlers.engines import get_engine
from bray.handlers.follower import StepFollower
from bray.handlers.metrics import ServingMetrics
from bray.handlers.oip import HEADER_LENGTH, OipRequest, encode_response, is_oip, parse_oip
from bray.handlers.pipeline import Pipeline
from bray.handlers.request import Parsed
from bray.handlers.ts_worker import (WorkerTimeline, buffer_frontend_reads, fast_frames, quiet_per_batch_log,
                                     throttle_prediction_time, worker_timeline)
from bray.handlers.weight_sets import WeightSets
from bray.store import CheckpointStore

__all__ = ["EngineHandler"]

log = logging.getLogger(__name__)

STEP_HEADER, WORKER_HEADER, MIN_STEP_HEADER = wire.STEP_HEADER, wire.WORKER_HEADER, wire.MIN_STEP_HEADER
WEIGHTS_HEADER, SEGMENTS_HEADER, STEPS_HEADER = wire.WEIGHTS_HEADER, wire.SEGMENTS_HEADER, wire.STEPS_HEADER
# How long a worker waits to catch up to a step its caller has already seen elsewhere.
MIN_STEP_WAIT_S = 1.0
# Counters are summed and reported once per period (a report is a line the frontend parses).
METRIC_PERIOD_S = 1.0


def _body(request: dict[str, Any]) -> Any:
    """The request body TorchServe decoded: ``data`` or ``body``.

    Raises:
        InputError: neither is there. TorchServe parses an
            ``application/x-www-form-urlencoded`` body (what ``curl -d`` sends without a
            Content-Type) as form fields and hands over none of it, and a multipart body
            arrives under its field names.
    """
    body = request.get("data")
    if body is None:
        body = request.get("body")
    if body is None:
        got = (f"form fields {', '.join(repr(str(k)[:40]) for k in list(request)[:3])}" if request
               else "no body (empty, or form-encoded)")
        raise InputError(
            f"the request reached the model with {got}; send JSON with -H 'Content-Type: application/json' "
            "(curl -d alone sends application/x-www-form-urlencoded, which TorchServe drops) or "
            "bray.wire bytes as application/octet-stream"
        )
    return body


class EngineHandler(BaseHandler):
    """Serves one model version on the engine its archive names."""

    def __init__(self) -> None:
        super().__init__()
        self.config: ServingConfig | None = None
        self.engine: Any = None
        self.spec: Any = None
        self.follower: StepFollower | None = None
        self._store: CheckpointStore | None = None
        self.pipeline: Pipeline | None = None
        self.weight_sets: WeightSets | None = None
        self.metrics = ServingMetrics(None, model="", version="")
        self._model_name = ""
        self._version = ""
        self._pid = os.getpid()  # X-Bray-Worker: read once, not a system call per request
        self._timeline: WorkerTimeline | None = None  # BRAY_WORKER_TIMELINE: per-batch timestamps

    # --- start-up ----------------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        """Build the engine, load the first weights and start following the store."""
        props = context.system_properties
        model_dir = Path(props.get("model_dir") or ".")
        cfg = ServingConfig.from_yaml_dict(getattr(context, "model_yaml_config", None))
        self.config = cfg
        manifest = getattr(context, "manifest", None) or {}
        # The registered name and version: metric labels, and the OIP answer's model_name/_version.
        self._model_name = str(getattr(context, "model_name", "") or cfg.name)
        self._version = str((manifest.get("model") or {}).get("modelVersion", ""))
        ts_metrics = getattr(context, "metrics", None)
        self.metrics = ServingMetrics(ts_metrics, model=self._model_name, version=self._version,
                                      period_s=METRIC_PERIOD_S)
        quiet_per_batch_log()
        reader = buffer_frontend_reads()
        fast_frames(reader)
        self._timeline = worker_timeline(reader)
        throttle_prediction_time(ts_metrics, METRIC_PERIOD_S)
        self._store = CheckpointStore(cfg.store)
        export_dir = self._find_export(model_dir, cfg)
        self.spec = load_spec(export_dir)
        options = cfg.options.engine_options(device=self._device(cfg, props.get("gpu_id")), extra=cfg.extra)
        self.engine = get_engine(cfg.options.engine).load(export_dir, self.spec, options)
        started = time.perf_counter()
        # A node's weight loader (bray.store.node_loader) hands steps over in shared memory.
        cache = node_cache()
        self.follower = StepFollower(self._store, cfg.name, self.engine, step=cfg.step,
                                     announce=not cfg.pinned, on_swap=self._on_swap,
                                     on_refuse=self.metrics.refused,
                                     poll_interval_s=cfg.options.poll_interval_ms / 1e3 if cfg.options.poll_interval_ms else None,
                                     node_cache=CheckpointStore(cache) if cache and not cfg.pinned else None)
        step = self.follower.start(initial=self._packed_weights(model_dir, cfg))
        self.pipeline = Pipeline(self.spec, self.engine, self.follower, fixed_batch_size=cfg.options.fixed_batch_size,
                                 limits=wire.WireLimits(max_total_bytes=cfg.options.max_request_bytes),
                                 reject_nonfinite=cfg.options.reject_nonfinite)
        self.weight_sets = WeightSets(self._store, cfg.name, self.engine, budget_bytes=cfg.options.weight_sets_bytes,
                                      on_load=self.metrics.weight_set_loaded,
                                      poll_interval_s=cfg.options.poll_interval_ms / 1e3 if cfg.options.poll_interval_ms else None)
        log.info("bray: serving %s step %d on %s (%s) in %.0f ms", cfg.name, step, cfg.options.engine,
                 options.device, (time.perf_counter() - started) * 1e3)
        self.metrics.start(step=step, max_batch_requests=int(props.get("batch_size") or 1))
        self.initialized = True

    @property
    def step(self) -> int:
        """The step the next batch is served with."""
        return self.follower.step if self.follower is not None else -1

    @staticmethod
    def _device(cfg: ServingConfig, gpu_id: Any) -> str:
        device = cfg.options.device
        if device == "cpu":
            return "cpu"
        if device.startswith("cuda:"):
            return device
        import torch

        if torch.cuda.is_available() and (gpu_id is not None or device == "cuda"):
            return f"cuda:{int(gpu_id or 0)}"
        return "cpu"

    def _find_export(self, model_dir: Path, cfg: ServingConfig) -> Path:
        for candidate in (model_dir / EXPORT_DIRNAME, model_dir):
            if (candidate / SPEC_FILE).is_file():
                return candidate
        assert self._store is not None
        return self._store.export_dir(cfg.name)

    @staticmethod
    def _packed_weights(model_dir: Path, cfg: ServingConfig) -> tuple[int, Any] | None:
        """A pinned archive carries its step's weights: it serves even after retention."""
        packed = model_dir / ARCHIVE_WEIGHTS_FILE
        if not (cfg.pinned and packed.is_file()):
            return None
        from safetensors.numpy import load_file

        return cfg.step, load_file(str(packed))

    def _on_swap(self, step: int, load_ms: float, published_time: float) -> None:
        self.metrics.swapped(step, load_s=load_ms / 1e3, published_time=published_time)

    # --- requests --------------------------------------------------------------------

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        """Answer every request of the batch: outputs, or a 4xx/5xx of its own.

        Requests naming a weight set (``X-Bray-Weights``: a clone of this model) run in one
        forward per set, with that set's newest step; the others with the model's own. A
        request in segments (``X-Bray-Segments``: the node proxy's round of a league) has its
        rows answered by several weight sets, each segment joining its set's forward.
        """
        assert self.config is not None and self.follower is not None and self.pipeline is not None
        timeline = self._timeline
        if timeline is not None:
            timeline.mark("handle")
            timeline.batch(len(data))
        pipeline = self.pipeline
        results: list[Any] = [None] * len(data)
        # What one forward answers, keyed by weight set (None: the model's own): a whole
        # request (key idx) or one segment of one (key (idx, k)).
        good: dict[str | None, list[tuple[Any, Any]]] = {}
        min_steps: dict[str | None, int] = {}
        oip: dict[int, OipRequest] = {}
        decoded: dict[int, tuple[Parsed, str | None, list[wire.Segment] | None]] = {}
        for idx, request in enumerate(data):
            try:
                decoded[idx] = self._decode(context, idx, request, good, min_steps, oip)
            except (InputError, WireError) as err:
                results[idx] = self._error(context, idx, err.status, err)
        if timeline is not None:
            timeline.mark("decoded")
        self.follower.catch_up(min_steps.get(None, -1), timeout_s=MIN_STEP_WAIT_S)
        step = pipeline.swap()
        steps: dict[Any, int] = {}
        answers: dict[Any, Any] = {}  # key -> output leaves, or (status, error)
        for name, group in good.items():
            weights, set_step = None, step
            if name is not None:  # one load at most per set, and only when it is new or newer
                assert self.weight_sets is not None
                try:
                    set_step, weights = self.weight_sets.get(name, min_step=min_steps.get(name, -1))
                except BrayError as err:  # those rows fail alone: the set is unknown or cannot load
                    status = err.status if isinstance(err, InputError) else 503
                    answers.update((key, (status, err)) for key, _ in group)
                    continue
            steps.update((key, set_step) for key, _ in group)
            try:
                outputs = pipeline.forward([p for _, p in group], weights=weights)
                answers.update((key, leaves) for (key, _), leaves in zip(group, outputs))
            except Exception as err:  # an engine failure fails these requests, not the worker
                log.exception("bray: forward failed for a batch of %d request(s)", len(group))
                answers.update((key, (500, err)) for key, _ in group)
        if timeline is not None:
            timeline.mark("forwarded")
        for idx in range(len(data)):
            context.set_response_header(idx, WORKER_HEADER, str(self._pid))
            if idx not in decoded:  # refused at decoding
                context.set_response_header(idx, STEP_HEADER, str(step))
                continue
            parsed, weight_set, segments = decoded[idx]
            if segments is not None:
                results[idx] = self._segmented_answer(context, idx, parsed, segments, answers, steps)
                continue
            results[idx] = self._answer(context, idx, parsed, weight_set, answers[idx], oip, steps.get(idx, step))
        if timeline is not None:
            timeline.mark("encoded")
        self.metrics.batch(requests=len(data), samples=sum(p.batch for g in good.values() for _, p in g),
                           forwarded=bool(good))
        if timeline is not None:
            timeline.mark("answered")
        return results

    def _decode(self, context: Any, idx: int, request: dict[str, Any], good: dict[str | None, list[tuple[Any, Any]]],
                min_steps: dict[str | None, int],
                oip: dict[int, OipRequest]) -> tuple[Parsed, str | None, list[wire.Segment] | None]:
        """Decode request ``idx`` into the forward groups ``good`` (whole, or one entry per segment).

        Returns:
            The request, the weight set it names (``None``: the model's own, or segments),
            and its segments (``None``: answered whole).

        Raises:
            InputError / WireError: the request is refused alone.
        """
        assert self.config is not None and self.pipeline is not None
        body = _body(request)
        weight_set = self._header(context, idx, WEIGHTS_HEADER) or None
        segments_value = self._header(context, idx, SEGMENTS_HEADER)
        header_length = self._header_length(context, idx)
        if is_oip(body, header_length):
            if segments_value:
                raise InputError(f"{SEGMENTS_HEADER} is for bray.wire bodies, not Open Inference Protocol ones")
            oip[idx] = parse_oip(body, self.spec, header_length=header_length,
                                 reject_nonfinite=self.config.options.reject_nonfinite)
            parsed = oip[idx].parsed
        else:
            parsed = self.pipeline.decode(body)
        if not segments_value:
            good.setdefault(weight_set, []).append((idx, parsed))
            hint = self._int_header(context, idx, MIN_STEP_HEADER)
            min_steps[weight_set] = max(min_steps.get(weight_set, -1), hint)
            return parsed, weight_set, None
        if weight_set is not None:
            raise InputError(f"a request names its weight sets in {SEGMENTS_HEADER} or in {WEIGHTS_HEADER}, not both")
        segments = wire.parse_segments(segments_value, rows=parsed.batch)
        start = 0
        for k, segment in enumerate(segments):
            part = Parsed([leaf[start:start + segment.rows] for leaf in parsed.leaves], segment.rows, parsed.binary)
            start += segment.rows
            good.setdefault(segment.weight_set, []).append(((idx, k), part))
            min_steps[segment.weight_set] = max(min_steps.get(segment.weight_set, -1), segment.min_step)
        return parsed, None, segments

    def _answer(self, context: Any, idx: int, parsed: Parsed, weight_set: str | None, answer: Any,
                oip: dict[int, OipRequest], step: int) -> Any:
        """One whole request's reply: its outputs in the form it came in, or its error."""
        assert self.pipeline is not None
        context.set_response_header(idx, STEP_HEADER, str(step))
        if isinstance(answer, tuple):
            return self._error(context, idx, *answer)
        if weight_set is not None:
            # Which weights answered: a client asking for a weight set refuses an answer
            # without it (a server whose handler predates weight sets ignores the header).
            context.set_response_header(idx, WEIGHTS_HEADER, weight_set)
        if idx in oip:
            return self._oip_answer(context, idx, answer, oip[idx], step)
        context.set_response_content_type(idx, wire.CONTENT_TYPE if parsed.binary else "application/json")
        return self.pipeline.encode(answer, parsed)

    def _segmented_answer(self, context: Any, idx: int, parsed: Parsed, segments: list[wire.Segment],
                          answers: dict[Any, Any], steps: dict[Any, int]) -> Any:
        """A request in segments: every segment's rows in order, or, when a segment failed,
        424 naming it (the proxy then sends the segments apart, so each caller gets its own
        answer or error)."""
        assert self.pipeline is not None
        parts = [answers[(idx, k)] for k in range(len(segments))]
        failed = [(segment, part) for segment, part in zip(segments, parts) if isinstance(part, tuple)]
        if failed:
            context.set_response_header(idx, STEP_HEADER, "-1")
            why = "; ".join(f"weight set {s.weight_set or '(the model)'!r}: {err}" for s, (_, err) in failed)
            return self._error(context, idx, 424, InputError(
                f"{len(failed)} of {len(segments)} segments failed ({why}); send those rows apart"))
        seg_steps = [steps[(idx, k)] for k in range(len(segments))]
        context.set_response_header(idx, STEP_HEADER, str(seg_steps[0]))
        context.set_response_header(idx, STEPS_HEADER, ",".join(map(str, seg_steps)))
        leaves = parts[0] if len(parts) == 1 else [np.concatenate(col) for col in zip(*parts)]
        context.set_response_content_type(idx, wire.CONTENT_TYPE if parsed.binary else "application/json")
        return self.pipeline.encode(leaves, parsed)

    @staticmethod
    def _header(context: Any, idx: int, key: str) -> str | None:
        try:
            return context.get_request_header(idx, key) or context.get_request_header(idx, key.lower())
        except (IndexError, KeyError, TypeError):
            return None

    @classmethod
    def _int_header(cls, context: Any, idx: int, key: str) -> int:
        """An integer header (``-1`` when absent or malformed: a hint is never an error)."""
        try:
            return int(cls._header(context, idx, key) or -1)
        except ValueError:
            return -1

    @staticmethod
    def _header_length(context: Any, idx: int) -> int | None:
        """The binary OIP extension's JSON header length, when the request has one.

        Raises:
            WireError: the header is there but is not a byte count.
        """
        value = EngineHandler._header(context, idx, HEADER_LENGTH)
        if not value:
            return None
        try:
            return int(value)
        except ValueError:
            raise WireError(f"{HEADER_LENGTH} must be a byte count, got {str(value)[:40]!r}") from None

    def _oip_answer(self, context: Any, idx: int, leaves: list[np.ndarray], request: OipRequest,
                    step: int) -> bytes | str:
        reply = encode_response(leaves, self.spec, request, model_name=self._model_name,
                                model_version=self._version, step=step, worker=self._pid)
        context.set_response_content_type(idx, reply.content_type)
        if reply.header_length is not None:
            context.set_response_header(idx, HEADER_LENGTH, str(reply.header_length))
        return reply.body

    @staticmethod
    def _error(context: Any, idx: int, status: int, err: Exception) -> str:
        message = str(err) or type(err).__name__
        context.set_response_status(status, message[:200], idx)
        context.set_response_content_type(idx, "application/json")
        # "error" is where Open Inference Protocol clients look for the reason.
        return json.dumps({"code": status, "type": type(err).__name__, "message": message, "error": message})

    # --- shutdown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop following the store and release the engine."""
        if self.follower is not None:
            self.follower.close()
        if self.weight_sets is not None:
            self.weight_sets.close()
        if self.engine is not None:
            self.engine.close()
