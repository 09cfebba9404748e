"""``bray-archive``: every published step a TorchServe model version, driven from the shell.

Exit codes: 0 done, 1 failed (the reason on stderr, no traceback), 2 usage error.
Addresses and paths default from ``BRAY_STORE``, ``BRAY_MODEL_STORE``,
``BRAY_MANAGEMENT_URL`` and ``BRAY_KEY_FILE`` (see :mod:`bray.config`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TextIO

from bray.config import Locations
from bray.errors import BrayError

if TYPE_CHECKING:  # pragma: no cover
    from bray.archiver.management import ManagementClient, ModelVersion

__all__ = ["main"]

_ENGINES = ("torch", "onnx", "tensorrt")


# --- options ---------------------------------------------------------------------------


def _step_arg(text: str) -> int:
    if text == "latest":
        return -1
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number >= 0 or 'latest', got {text!r}") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"expected a step number >= 0 or 'latest', got {text!r}")
    return step


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


@dataclass(frozen=True)
class ServerOptions:
    """Where the server, the stores and the key file are, and how to print."""

    locations: Locations
    timeout_s: float
    json: bool

    def client(self) -> ManagementClient:
        from bray.archiver.management import ManagementClient

        return ManagementClient(self.locations.management_url, key_file=self.locations.key_file,
                                timeout_s=self.timeout_s)

    def store(self) -> Any:
        from bray.store import CheckpointStore

        return CheckpointStore(self.locations.store)


@dataclass(frozen=True)
class PackOptions:
    """What goes into an archive (``pack_archive``'s keyword arguments)."""

    engine: str = "torch"
    batch_size: int = 1
    max_batch_delay_ms: int = 5
    workers: int = 1
    threads: int = 1
    fixed_batch_size: int = 0
    onnx_weights: str = "initializers"
    quantize: bool = False
    reject_nonfinite: bool = False
    max_request_bytes: int = 64 << 20
    force: bool = False
    progress: bool = False

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> tuple[ServerOptions, PackOptions | None]:
    """Build the option dataclasses from parsed arguments (``BRAY_*`` variables fill the gaps).

    Raises:
        ConfigError: a malformed address.
    """
    locations = Locations.from_env(
        env, store=getattr(args, "store", None), model_store=getattr(args, "model_store", None),
        management_url=args.management, key_file=args.key_file,
    )
    server = ServerOptions(locations=locations, timeout_s=args.timeout_s, json=args.json)
    if not hasattr(args, "engine"):
        return server, None
    pack = PackOptions(
        engine=args.engine, batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
        workers=args.workers, threads=args.threads, fixed_batch_size=args.fixed_batch_size,
        onnx_weights=args.onnx_weights, quantize=args.quantize, reject_nonfinite=args.reject_nonfinite,
        max_request_bytes=args.max_request_mb << 20, force=getattr(args, "force", False),
        progress=not args.no_progress and not args.json and sys.stderr.isatty(),
    )
    return server, pack


# --- parser ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    server = argparse.ArgumentParser(add_help=False)
    group = server.add_argument_group("server")
    group.add_argument("--management", metavar="URL",
                       help="management API address (default $BRAY_MANAGEMENT_URL or http://127.0.0.1:8081)")
    group.add_argument("--key-file", metavar="PATH",
                       help="TorchServe's key_file.json (default $BRAY_KEY_FILE, ./key_file.json, "
                            "~/.bray/server/key_file.json)")
    group.add_argument("--timeout-s", type=_positive_float, default=300.0, metavar="S",
                       help="per management call, worker start included (default 300)")
    group.add_argument("--json", action="store_true", help="print JSON for scripts")

    model_store = argparse.ArgumentParser(add_help=False)
    model_store.add_argument("--model-store", metavar="DIR",
                             help="TorchServe's model store (default $BRAY_MODEL_STORE or ~/.bray/model_store)")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", metavar="DIR",
                       help="checkpoint store (default $BRAY_STORE or ~/.bray/store)")

    pack = argparse.ArgumentParser(add_help=False)
    g = pack.add_argument_group("archive")
    g.add_argument("--engine", choices=_ENGINES, default="torch", help="inference engine (default torch)")
    g.add_argument("--batch-size", type=_int_at_least(1), default=1, metavar="B",
                   help="TorchServe batch size (default 1)")
    g.add_argument("--max-batch-delay-ms", type=_int_at_least(0), default=5, metavar="D",
                   help="how long TorchServe waits to fill a batch (default 5)")
    g.add_argument("--workers", type=_int_at_least(0), default=1, metavar="W",
                   help="workers for the new version (default 1)")
    g.add_argument("--threads", type=_int_at_least(1), default=1, metavar="T",
                   help="intra-op threads per worker (default 1)")
    g.add_argument("--fixed-batch-size", type=_int_at_least(0), default=0, metavar="N",
                   help="pad every forward to N samples (default 0: off)")
    g.add_argument("--onnx-weights", choices=("initializers", "inputs"), default="initializers",
                   help="how the onnx engine takes weights (default initializers)")
    g.add_argument("--quantize", action="store_true", help="dynamic int8 quantization (onnx engine)")
    g.add_argument("--reject-nonfinite", action="store_true", help="answer 400 to inputs holding NaN or infinity")
    g.add_argument("--max-request-mb", type=_int_at_least(1), default=64, metavar="MB",
                   help="largest request body the handler decodes (default 64)")
    g.add_argument("--set-default", action="store_true", help="make the new version the default")
    g.add_argument("--wait-timeout-s", type=_positive_float, default=300.0, metavar="S",
                   help="how long to wait for the workers to be ready (default 300)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    parser = argparse.ArgumentParser(
        prog="bray-archive",
        description="Archive checkpoint-store steps as TorchServe model versions and manage them.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage error.",
    )
    from bray import __version__

    parser.add_argument("--version", action="version", version=f"bray-archive {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("publish", parents=[store, model_store, pack, server],
                       help="pack a step into a .mar and register it as version <step>",
                       description="Pack a step of the store into <model-store>/<name>-<version>.mar, "
                                   "register it as version <step> of <name>, and wait for its workers.")
    p.add_argument("--name", required=True, help="model name")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=_step_arg, default=-1, metavar="N|latest",
                       help="step to pin; a step retention removed snaps down to the kept one "
                            "below it (default latest)")
    which.add_argument("--live", action="store_true",
                       help="register version 'latest' that follows the store's newest step instead")
    p.add_argument("--model-version", dest="model_version", metavar="V",
                   help="register under this version string instead of the step")
    p.add_argument("--force", action="store_true", help="overwrite an unregistered archive file of that version")
    p.set_defaults(run=_publish)

    p = sub.add_parser("versions", parents=[model_store, store, server], help="list the versions of a model",
                       description="List the registered versions of a model.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=_versions)

    p = sub.add_parser("set-default", parents=[server], help="make a version the default",
                       description="Make VERSION the one /predictions/NAME serves.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="STEP", help="the version (a step, or 'latest')")
    p.set_defaults(run=_set_default)

    p = sub.add_parser("rollback", parents=[server], help="make the previous version the default",
                       description="Make the highest numeric version below the current default the default.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=_rollback)

    p = sub.add_parser("prune", parents=[model_store, server], help="unregister and delete old versions",
                       description="Unregister the oldest numeric versions and delete their archives, "
                                   "keeping the newest K; never the default, never 'latest'.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--keep", type=_int_at_least(0), required=True, metavar="K",
                   help="numeric versions to keep besides the default")
    p.set_defaults(run=_prune)

    p = sub.add_parser("scale", parents=[server], help="set the worker count of a version",
                       description="Run W workers for a version of NAME (the default version unless --version).")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--workers", type=_int_at_least(0), required=True, metavar="W")
    p.add_argument("--model-version", dest="model_version", metavar="V", help="version (default: the default one)")
    p.set_defaults(run=_scale)

    p = sub.add_parser("status", parents=[store, model_store, server],
                       help="models, versions, workers and the steps they serve",
                       description="Show every registered model (or NAME...), its versions, workers, "
                                   "default, and the step each version serves.")
    p.add_argument("names", metavar="NAME", nargs="*")
    p.set_defaults(run=_status)

    p = sub.add_parser("watch", parents=[store, model_store, pack, server],
                       help="publish every N-th step as the trainer publishes it",
                       description="Archive and register every step divisible by N as it appears in the "
                                   "store, until interrupted (Ctrl-C).")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--every", type=_int_at_least(1), required=True, metavar="N")
    p.add_argument("--poll-interval-s", type=_positive_float, metavar="S",
                   help="poll the store instead of inotify (NFS and other shared file systems)")
    p.set_defaults(run=_watch)
    return parser


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


def _publish(args: argparse.Namespace, opts: ServerOptions, pack: PackOptions, out: TextIO) -> int:
    from bray.archiver.pack import read_archive_config
    from bray.archiver.publish import publish_version

    started = time.perf_counter()
    with opts.client() as client:
        mv = publish_version(
            opts.store(), args.name, step=None if args.live else args.step, client=client,
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


def _versions(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import status

    with opts.client() as client:
        (model,) = status(client=client, model_store=opts.locations.model_store,
                          store=opts.store(), names=[args.name])
    data = [asdict(v) for v in model.versions]

    def human(o: TextIO) -> None:
        rows = [("VERSION", "DEFAULT", "STEP", "WORKERS", "ARCHIVE")]
        rows += [(v.version, "*" if v.is_default else "", _step_text(v.step, v.live),
                  f"{v.ready_workers}/{v.workers}", v.archive) for v in model.versions]
        _table(rows, o)

    _emit(opts, data, human, out)
    return 0


def _step_text(step: int | None, live: bool) -> str:
    text = "?" if step is None else str(step)
    return f"{text} (live)" if live else text


def _set_default(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import set_default

    with opts.client() as client:
        mv = set_default(args.name, args.version, client=client)
    _emit(opts, _version_json(mv), lambda o: print(f"{mv.name}: default is now version {mv.version}", file=o), out)
    return 0


def _rollback(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import rollback

    with opts.client() as client:
        mv = rollback(args.name, client=client)
    _emit(opts, _version_json(mv),
          lambda o: print(f"{mv.name}: rolled back, default is now version {mv.version}", file=o), out)
    return 0


def _prune(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
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


def _scale(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import scale

    with opts.client() as client:
        mv = scale(args.name, args.workers, client=client, version=args.model_version)
    _emit(opts, _version_json(mv),
          lambda o: print(f"{mv.name} version {mv.version}: {mv.ready_workers}/{mv.workers} workers ready", file=o),
          out)
    return 0


def _status(args: argparse.Namespace, opts: ServerOptions, _: Any, out: TextIO) -> int:
    from bray.archiver.publish import status

    with opts.client() as client:
        models = status(client=client, model_store=opts.locations.model_store, store=opts.store(),
                        names=args.names or None)
    data = [asdict(m) for m in models]

    def human(o: TextIO) -> None:
        if not models:
            print(f"no models registered on {opts.locations.management_url}", file=o)
            return
        rows = [("MODEL", "VERSION", "DEFAULT", "STEP", "WORKERS", "ARCHIVE")]
        for m in models:
            rows += [(m.name, v.version, "*" if v.is_default else "", _step_text(v.step, v.live),
                      f"{v.ready_workers}/{v.workers}", v.archive) for v in m.versions]
        _table(rows, o)

    _emit(opts, data, human, out)
    return 0


def _watch(args: argparse.Namespace, opts: ServerOptions, pack: PackOptions, out: TextIO) -> int:
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
            opts.store(), args.name, args.every, client=client, model_store=opts.locations.model_store,
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


# --- entry point -----------------------------------------------------------------------


def main(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run ``bray-archive`` with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        0 on success, 1 on a failure (message on stderr), 2 on a usage error.
    """
    out = out or sys.stdout
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2) end here
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    try:
        server, pack = from_args(args)
        return int(args.run(args, server, pack, out))
    except BrayError as err:
        print(f"bray-archive {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
