"""What each ``bray-archive`` subcommand does (the parser and the exit codes are in :mod:`.cli`).

Every command is ``run(args, opts, pack, out) -> int``: it prints its result to ``out``
(``--json``: one JSON document) and returns 0, or raises a
:class:`~bray.errors.BrayError` whose message says what was wrong and what to do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Sequence, TextIO

from bray.locations import Locations
from bray.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from bray.archiver.cli import PackOptions, ServerOptions
    from bray.torchserve.management import ModelVersion


# --- output ----------------------------------------------------------------------------


def _version_json(v: ModelVersion) -> dict[str, Any]:
    return {"name": v.name, "version": v.version, "is_default": v.is_default, "workers": v.workers,
            "ready_workers": v.ready_workers, "batch_size": v.batch_size,
            "max_batch_delay_ms": v.max_batch_delay_ms, "archive": v.url}


def _table(rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def _emit(opts: ServerOptions, data: Any, human: Callable[[TextIO], None], out: TextIO) -> None:
    if opts.json:
        json.dump(data, out, indent=1)
        out.write("\n")
    else:
        human(out)


# --- commands --------------------------------------------------------------------------


def run_publish(args: argparse.Namespace, opts: ServerOptions, pack: PackOptions, out: TextIO) -> int:
    from bray.archiver.pack import read_archive_config
    from bray.archiver.publish import publish_version

    started = time.perf_counter()
    with opts.client() as client:
        mv = publish_version(
            opts.store(must_exist=True), args.name, step=None if args.live else args.step, client=client,
            model_store=opts.locations.model_store, set_default=args.set_default,
            wait_timeout_s=args.wait_timeout_s, version=args.model_version, **pack.as_kwargs(),
        )
    seconds = time.perf_counter() - started
    archive = opts.locations.model_store / mv.url
    cfg = read_archive_config(archive)
    step = cfg.step if cfg.pinned else None
    data = {**_version_json(mv), "step": step, "live": step is None,
            "archive_path": str(archive), "seconds": round(seconds, 3)}

    def human(o: TextIO) -> None:
        what = "following the latest step" if step is None else f"step {step}"
        print(f"published {mv.name} version {mv.version} ({what}) from {data['archive_path']}: "
              f"{mv.ready_workers}/{mv.workers} workers ready in {seconds:.1f} s"
              + ("; it is the default" if mv.is_default else ""), file=o)

    _emit(opts, data, human, out)
    return 0


def run_versions(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import status

    with opts.client() as client:
        (model,) = status(client=client, model_store=opts.locations.model_store,
                          store=opts.store(), names=[args.name])
    data = [asdict(v) for v in model.versions]

    def human(o: TextIO) -> None:
        rows = [("VERSION", "DEFAULT", "STEP", "WORKERS", "ARCHIVE", "STORE")]
        rows += [(v.version, "*" if v.is_default else "", _step_text(v.step, v.live),
                  f"{v.ready_workers}/{v.workers}", v.archive, v.store or "?") for v in model.versions]
        _table(rows, o)

    _emit(opts, data, human, out)
    return 0


def _step_text(step: int | None, live: bool) -> str:
    text = "?" if step is None else str(step)
    return f"{text} (live)" if live else text


def run_set_default(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import set_default

    with opts.client() as client:
        mv = set_default(args.name, args.version, client=client)
    _emit(opts, _version_json(mv), lambda o: print(f"{mv.name}: default is now version {mv.version}", file=o), out)
    return 0


def run_rollback(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import rollback

    with opts.client() as client:
        mv = rollback(args.name, client=client)
    _emit(opts, _version_json(mv),
          lambda o: print(f"{mv.name}: rolled back, default is now version {mv.version}", file=o), out)
    return 0


def run_prune(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import prune

    with opts.client() as client:
        removed = prune(args.name, keep=args.keep, client=client, model_store=opts.locations.model_store)

    def human(o: TextIO) -> None:
        if removed:
            print(f"{args.name}: removed version(s) {', '.join(removed)}", file=o)
        else:
            print(f"{args.name}: nothing to prune (keeping {args.keep} besides the default)", file=o)

    _emit(opts, {"name": args.name, "removed": removed}, human, out)
    return 0


def run_remove(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import remove

    with opts.client() as client:
        removed = remove(args.names, client=client, model_store=opts.locations.model_store)

    def human(o: TextIO) -> None:
        for name, versions in removed.items():
            print(f"{name}: unregistered version(s) {', '.join(versions)} and deleted their archives from "
                  f"{opts.locations.model_store}", file=o)

    _emit(opts, [{"name": n, "removed": v} for n, v in removed.items()], human, out)
    return 0


def run_scale(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import scale

    with opts.client() as client:
        mv = scale(args.name, args.workers, client=client, version=args.model_version)
    _emit(opts, _version_json(mv),
          lambda o: print(f"{mv.name} version {mv.version}: {mv.ready_workers}/{mv.workers} workers ready", file=o),
          out)
    return 0


def run_status(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import status

    with opts.client() as client:
        models = status(client=client, model_store=opts.locations.model_store, store=opts.store(),
                        names=args.names or None)
    data = [asdict(m) for m in models]

    def human(o: TextIO) -> None:
        if not models:
            print(f"no models registered on {opts.locations.management_url}", file=o)
            return
        rows = [("MODEL", "VERSION", "DEFAULT", "STEP", "WORKERS", "ARCHIVE", "STORE")]
        for m in models:
            rows += [(m.name, v.version, "*" if v.is_default else "", _step_text(v.step, v.live),
                      f"{v.ready_workers}/{v.workers}", v.archive, v.store or "?") for v in m.versions]
        _table(rows, o)
        for m in models:
            held = [w for w in m.weight_sets if w.held_by]
            if m.weight_sets:
                shown = ", ".join(f"{w.name} (step {w.step}, {len(w.held_by)} worker(s))" for w in held[:8])
                more = f" and {len(held) - 8} more" if len(held) > 8 else ""
                print(f"{m.name}: {len(m.weight_sets)} clone(s) served as weight sets, {len(held)} held by its "
                      f"workers now" + (f": {shown}{more}" if held else ""), file=o)

    _emit(opts, data, human, out)
    return 0


def run_kserve(args: argparse.Namespace, opts: ServerOptions, pack: PackOptions, out: TextIO) -> int:
    from bray.archiver.kserve import KServeOptions, export_kserve

    kserve = KServeOptions(storage_uri=args.storage_uri, replicas=args.replicas, image=args.image,
                           store_claim=args.store_claim, store_mount=args.store_mount,
                           store_size_gi=args.store_size_gi, storage_class=args.storage_class, cpu=args.cpu,
                           memory=args.memory, gpus=args.gpus)
    root = opts.locations.store
    if not root.is_dir():
        # --store is this machine's path to the trainer's store; --store-mount is the pods'.
        what = "does not exist" if not root.exists() else "is not a directory"
        raise ConfigError(
            f"the checkpoint store {root} {what} on this machine; pass --store (or set BRAY_STORE to) the "
            f"folder the trainer publishes into, as this machine sees it; --store-mount ({kserve.store_mount}) "
            "is where the pods mount it, which may be another path")
    done = export_kserve(opts.store(), args.name, out=args.out, options=kserve, force=args.force,
                         serving=pack.serving, progress=pack.progress)
    data = {"out": str(done.out), "models": str(done.models), "config": str(done.config),
            "archive": str(done.archive), "manifests": [str(m) for m in done.manifests],
            "storage_uri": done.storage_uri}

    def human(o: TextIO) -> None:
        print(f"wrote {done.out}: upload {done.models} to {done.storage_uri}, then "
              f"kubectl apply -f {done.out / 'kubernetes'}", file=o)

    _emit(opts, data, human, out)
    return 0


def run_watch(args: argparse.Namespace, opts: ServerOptions, pack: PackOptions, out: TextIO) -> int:
    from bray.archiver.publish import watch_and_publish

    def published(mv: ModelVersion) -> None:
        if opts.json:
            print(json.dumps(_version_json(mv)), file=out, flush=True)
        else:
            print(f"published {mv.name} version {mv.version}: {mv.ready_workers}/{mv.workers} workers ready",
                  file=out, flush=True)

    def failed(step: int, err: BaseException) -> None:
        print(f"bray-archive: publishing step {step} of {args.name} failed: {err}", file=sys.stderr, flush=True)

    with opts.client() as client:
        handle = watch_and_publish(
            opts.store(must_exist=True), args.name, args.every, client=client, model_store=opts.locations.model_store,
            set_default=args.set_default, wait_timeout_s=args.wait_timeout_s,
            poll_interval_s=args.poll_interval_s, on_published=published, on_error=failed,
            **pack.as_kwargs(),
        )
        if not opts.json:
            print(f"watching {args.name} in {opts.locations.store}: publishing every step divisible by "
                  f"{args.every} (Ctrl-C to stop)", file=out, flush=True)
        try:
            while handle.running:
                handle.join(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            handle.stop()
    return 0


def run_dashboard(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.dashboard import DashboardOptions, run_dashboard
    from bray.torchserve.management import ManagementClient

    if args.port > 65535:
        raise ConfigError(f"--port must be 1-65535, got {args.port}")
    locations = opts.locations

    def client() -> ManagementClient:  # short: a page refresh must not hang on a stuck server
        return ManagementClient(locations.management_url, key_file=locations.key_file, timeout_s=3.0)

    def started(url: str) -> None:
        print(f"dashboard of {locations.store} on {url} (read-only; Ctrl-C to stop)", file=out, flush=True)

    try:
        run_dashboard(DashboardOptions(store=locations.store, host=args.host, port=args.port,
                                       refresh_s=args.refresh_s, model_store=locations.model_store,
                                       client=client), started=started)
    except KeyboardInterrupt:
        pass
    return 0


def run_proxy(args: argparse.Namespace, opts: ServerOptions, pack: None, out: TextIO) -> int:
    from bray.bridge.proxy import serve

    loc = opts.locations
    if args.inference_url:
        loc = Locations.from_env(store=loc.store, model_store=loc.model_store, inference_url=args.inference_url,
                                 management_url=loc.management_url, key_file=loc.key_file)
    return serve(args.name, locations=loc, step=args.step, idle_exit_s=args.idle_exit_s, linger_on_failure=False,
                 ready=lambda line: print(line, file=out, flush=True))
