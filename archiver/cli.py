"""``bray-archive``: every published step a TorchServe model version, driven from the shell.

Exit codes: 0 done, 1 failed, 2 usage error, 3 no server answers at the address, 130
interrupted (Ctrl-C). Every failure is one line on stderr saying what to do, never a
traceback. Addresses and paths default from ``BRAY_STORE``, ``BRAY_MODEL_STORE``,
``BRAY_MANAGEMENT_URL`` and ``BRAY_KEY_FILE`` (see :mod:`bray.locations`).

Adding a subcommand: ``p = sub.add_parser(...)``, ``p.set_defaults(run=_mine)`` where
``_mine(args, opts, pack, out) -> int`` (in :mod:`.commands`) prints its result to ``out`` and returns 0, and
raises a :class:`~bray.errors.BrayError` (its message: what was wrong, what was got, what
to do) for anything that went wrong. It never prints tracebacks or calls ``sys.exit``;
:func:`main` turns every exception into the one line and exit code (:func:`failure`).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NoReturn, TextIO

from bray.archiver.commands import (
    run_dashboard,
    run_kserve,
    run_prune,
    run_proxy,
    run_publish,
    run_remove,
    run_rollback,
    run_scale,
    run_set_default,
    run_status,
    run_versions,
    run_watch,
)
from bray.locations import Locations, check_url
from bray.errors import BrayError, ConfigError, ServerUnreachableError
from bray.handlers.options import ServingOptions, int_at_least

if TYPE_CHECKING:  # pragma: no cover
    from bray.torchserve.management import ManagementClient

__all__ = ["failure", "main"]


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
        from bray.torchserve.management import ManagementClient

        return ManagementClient(self.locations.management_url, key_file=self.locations.key_file,
                                timeout_s=self.timeout_s)

    def store(self, *, must_exist: bool = False) -> Any:
        """The checkpoint store; ``must_exist`` refuses a path that is not a directory.

        Raises:
            ConfigError: ``must_exist`` and the path is missing or not a directory.
        """
        from bray.store import CheckpointStore

        root = self.locations.store
        if must_exist and not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a directory, so not a checkpoint store"
            raise ConfigError(
                f"the checkpoint store {root} {what}; pass --store (or set BRAY_STORE to) the directory "
                "the trainer publishes into (RemoteModel's store)")
        return CheckpointStore(root)


@dataclass(frozen=True)
class PackOptions:
    """What goes into an archive: the serving options (one flag each) and how to write it."""

    serving: ServingOptions = field(default_factory=ServingOptions)
    force: bool = False
    progress: bool = False

    def as_kwargs(self) -> dict[str, Any]:
        """``pack_archive``'s / ``publish_version``'s keyword arguments."""
        return {"options": self.serving, "force": self.force, "progress": self.progress}


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> tuple[ServerOptions, PackOptions | None]:
    """Build the option dataclasses from parsed arguments (``BRAY_*`` variables fill the gaps).

    Raises:
        ConfigError: a malformed address.
    """
    management = getattr(args, "management", None)
    env = os.environ if env is None else env
    if management is not None:
        check_url(management, what="--management", var="--management", example="http://127.0.0.1:8081")
    else:
        urls = [u.strip().rstrip("/") for u in env.get("BRAY_MANAGEMENT_URL", "").split(",") if u.strip()]
        if len(urls) > 1:
            raise ConfigError(
                f"BRAY_MANAGEMENT_URL lists {len(urls)} servers ({', '.join(urls)}); bray-archive talks to "
                f"one at a time: pass --management {urls[0]} (and so on for each)")
    locations = Locations.from_env(
        env, store=getattr(args, "store", None), model_store=getattr(args, "model_store", None),
        management_url=management, key_file=getattr(args, "key_file", None),
    )
    locations = _one_node(locations, env)
    server = ServerOptions(locations=locations, timeout_s=getattr(args, "timeout_s", 300.0),
                           json=getattr(args, "json", False))
    if not hasattr(args, "engine"):
        return server, None
    pack = PackOptions(
        serving=ServingOptions.from_args(args), force=getattr(args, "force", False),
        progress=not args.no_progress and not getattr(args, "json", False) and sys.stderr.isatty(),
    )
    return server, pack


def _one_node(locations: Locations, env: Mapping[str, str]) -> Locations:
    """The CLI talks to one server (``--management``): pick the key file of the chosen node.

    ``BRAY_MANAGEMENT_URL`` and ``BRAY_KEY_FILE`` may list one entry per node (for
    ``RemoteModel``); ``--management`` picks one node, and the key file at the same
    position in ``BRAY_KEY_FILE`` goes with it.
    """
    urls = [locations.management_url]
    keys = list(dict.fromkeys(node.key_file for node in locations.nodes))
    if len(keys) <= 1:
        return locations
    env_urls = [u.strip().rstrip("/") for u in env.get("BRAY_MANAGEMENT_URL", "").split(",") if u.strip()]
    if urls[0] in env_urls and len(env_urls) == len(locations.nodes):
        key_file = locations.nodes[env_urls.index(urls[0])].key_file
        return replace(locations, nodes=tuple(replace(node, key_file=key_file) for node in locations.nodes))
    raise ConfigError(
        f"BRAY_KEY_FILE lists {len(keys)} key files but it is not clear which belongs to {urls[0]}; "
        "pass --key-file PATH (the key_file.json in that server's working directory)")


# --- parser ----------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as argparse does, but prints "example(s):" epilogs line by line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def example(*lines: str) -> dict[str, Any]:
    """``add_parser`` keywords for a help page ending in "example(s):" printed as written."""
    text = "example:\n" if len(lines) == 1 else "examples:\n"
    return {"epilog": text + "".join(f"  {line}\n" for line in lines), "formatter_class": _HelpFormatter}


def _pack_parser(**defaults: Any) -> argparse.ArgumentParser:
    """The archive flags: one per serving option (declared with the option), and the progress bar.

    ``defaults`` are another command's defaults (``kserve``: ``poll_interval_ms=50``): its
    own flags, since ``parents=`` shares flag objects, and a default changed on one would
    change it for every command sharing them.
    """
    pack = argparse.ArgumentParser(add_help=False)
    g = pack.add_argument_group("archive")
    ServingOptions.add_arguments(g, **defaults)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return pack


def _parser() -> argparse.ArgumentParser:
    # Flag groups shared through parents=: each command takes only the groups it reads
    # (tests/unit/test_cli_help.py checks every listed flag is read by its command).
    server = argparse.ArgumentParser(add_help=False)
    group = server.add_argument_group("server")
    group.add_argument("--management", metavar="URL",
                       help="management API address (default $BRAY_MANAGEMENT_URL or http://127.0.0.1:8081)")
    group.add_argument("--key-file", metavar="PATH",
                       help="TorchServe's key_file.json (default $BRAY_KEY_FILE, ./key_file.json, "
                            "~/.bray/server/key_file.json)")
    calls = argparse.ArgumentParser(add_help=False)
    calls.add_argument("--timeout-s", type=_positive_float, default=300.0, metavar="S",
                       help="per management call, worker start included (default 300)")
    json_out = argparse.ArgumentParser(add_help=False)
    json_out.add_argument("--json", action="store_true", help="print JSON for scripts")
    register = argparse.ArgumentParser(add_help=False)
    r = register.add_argument_group("registration")
    r.add_argument("--set-default", action="store_true", help="make the new version the default")
    r.add_argument("--wait-timeout-s", type=_positive_float, default=300.0, metavar="S",
                   help="how long to wait for the workers to be ready (default 300)")
    managed = [server, calls, json_out]  # commands that call the management API and print a result
    model_store = argparse.ArgumentParser(add_help=False)
    model_store.add_argument("--model-store", metavar="DIR",
                             help="TorchServe's model store (default $BRAY_MODEL_STORE or ~/.bray/model_store)")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", metavar="DIR",
                       help="checkpoint store (default $BRAY_STORE or ~/.bray/store)")
    pack = _pack_parser()

    parser = _Parser(
        prog="bray-archive",
        description="Archive checkpoint-store steps as TorchServe model versions and manage them.",
        epilog="examples:\n"
               "  bray-archive server start\n"
               "  bray-archive publish --name policy --step 20 --set-default\n"
               "  bray-archive status\n"
               "  bray-archive COMMAND --help\n\n"
               "exit codes: 0 ok, 1 failure, 2 usage error, 3 no server at the address, 130 interrupted\n",
        formatter_class=_HelpFormatter,
    )
    from bray import __version__

    parser.add_argument("--version", action="version", version=f"bray-archive {__version__}")
    sub: Any = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("publish", parents=[store, model_store, pack, register, *managed],
                       help="pack a step into a .mar and register it as version <step>",
                       description="Pack a step of the store into <model-store>/<name>-<version>.mar, "
                                   "register it as version <step> of <name>, and wait for its workers.",
                       **example("bray-archive publish --store ~/.bray/store --name policy --step 20 --set-default",
                                  "bray-archive publish --name policy --live --engine onnx --batch-size 32"))
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
    p.set_defaults(run=run_publish)

    p = sub.add_parser("versions", parents=[model_store, store, *managed], help="list the versions of a model",
                       description="List the registered versions of a model, the default marked *.",
                       **example("bray-archive versions policy", "bray-archive versions policy --json"))
    p.add_argument("name", metavar="NAME", help="model name")
    p.set_defaults(run=run_versions)

    p = sub.add_parser("set-default", parents=managed, help="make a version the default",
                       description="Make VERSION the one /predictions/NAME serves.",
                       **example("bray-archive set-default policy 20", "bray-archive set-default policy latest"))
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("version", metavar="VERSION", help="the version: a published step, or 'latest'")
    p.set_defaults(run=run_set_default)

    p = sub.add_parser("rollback", parents=managed, help="make the previous version the default",
                       description="Make the highest numeric version below the current default the default.",
                       **example("bray-archive rollback policy"))
    p.add_argument("name", metavar="NAME", help="model name")
    p.set_defaults(run=run_rollback)

    p = sub.add_parser("prune", parents=[model_store, *managed], help="unregister and delete old versions",
                       description="Unregister the oldest numeric versions and delete their archives, "
                                   "keeping the newest K; never the default, never 'latest' (bray-archive remove "
                                   "takes a whole model, clones included).",
                       **example("bray-archive prune policy --keep 3"))
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("--keep", type=int_at_least(0), required=True, metavar="K",
                   help="numeric versions to keep besides the default")
    p.set_defaults(run=run_prune)

    p = sub.add_parser("remove", parents=[model_store, *managed], help="unregister models and delete their archives",
                       description="Unregister every version of each NAME (a clone, or any model no longer "
                                   "wanted; the default version last) and delete their archives from the model "
                                   "store. Every NAME must be registered, or nothing is removed. The checkpoint "
                                   "store is left alone.",
                       **example("bray-archive remove policy-clone-step-20",
                                 "bray-archive remove policy-clone-step-10 policy-clone-step-20 --json"))
    p.add_argument("names", metavar="NAME", nargs="+", help="registered model name(s)")
    p.set_defaults(run=run_remove)

    p = sub.add_parser("scale", parents=managed, help="set the worker count of a version",
                       description="Run W workers for a version of NAME (the default version unless "
                                   "--model-version), and wait until they are ready.",
                       **example("bray-archive scale policy --workers 4",
                                  "bray-archive scale policy --workers 0 --model-version 20"))
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("--workers", type=int_at_least(0), required=True, metavar="W",
                   help="worker processes to run (0 stops them all; the version stays registered)")
    p.add_argument("--model-version", dest="model_version", metavar="V", help="version (default: the default one)")
    p.set_defaults(run=run_scale)

    p = sub.add_parser("status", parents=[store, model_store, *managed],
                       help="models, versions, workers and the steps they serve",
                       description="Show every registered model (or NAME...), its versions, workers, "
                                   "default, and the step each version serves.",
                       **example("bray-archive status", "bray-archive status policy --json"))
    p.add_argument("names", metavar="NAME", nargs="*", help="only these models (default: every one)")
    p.set_defaults(run=run_status)

    p = sub.add_parser("watch", parents=[store, model_store, pack, register, *managed],
                       help="publish every N-th step as the trainer publishes it",
                       description="Archive and register every step divisible by N as it appears in the "
                                   "store, until interrupted (Ctrl-C).",
                       **example("bray-archive watch --store ~/.bray/store --name policy --every 100",
                                  "bray-archive watch --name policy --every 10 --poll-interval-s 2  # NFS"))
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--every", type=int_at_least(1), required=True, metavar="N",
                   help="publish the steps divisible by N (steps already in the store are left alone)")
    p.add_argument("--poll-interval-s", type=_positive_float, metavar="S",
                   help="poll the store instead of inotify (NFS and other shared file systems)")
    p.set_defaults(run=run_watch)

    p = sub.add_parser("proxy", parents=[store, model_store, server],
                       help="run a model's node proxy in the foreground",
                       description="Serve the node proxy of a model in this process: RemoteModel(..., "
                                   "node_proxy=True) callers on this machine attach to it instead of starting "
                                   "their own. Ctrl-C (or SIGTERM) stops it after answering the calls in flight.",
                       **example("bray-archive proxy --name policy --idle-exit-s 600"))
    p.add_argument("--name", required=True, help="model name (with its namespace prefix, if any)")
    p.add_argument("--inference-url", metavar="URL",
                   help="inference address(es), comma-separated (default $BRAY_INFERENCE_URL or http://127.0.0.1:8080)")
    p.add_argument("--step", type=int_at_least(0), metavar="N",
                   help="serve the pinned version N (a clone's) instead of the live one")
    p.add_argument("--idle-exit-s", type=_positive_float, metavar="S",
                   help="exit after S seconds without a caller (default: run until stopped)")
    p.set_defaults(run=run_proxy)

    from bray.archiver.kserve import BATCH_SIZE, POLL_INTERVAL_MS

    # Pods follow a shared store: poll it (inotify does not see other hosts' writes); and batch.
    p = sub.add_parser("kserve", parents=[store, _pack_parser(poll_interval_ms=POLL_INTERVAL_MS,
                                                              batch_size=BATCH_SIZE), json_out],
                       help="write the KServe storage layout and manifests for a published model",
                       description="Write DIR/models (config/config.properties + model-store/NAME-latest.mar, "
                                   "what KServe's TorchServe runtime loads from a storage URI) and "
                                   "DIR/kubernetes (ServingRuntime, InferenceService, ReadWriteMany claim for "
                                   "the live store).",
                       **example("bray-archive kserve policy --out deploy/policy --replicas 4 "
                                 "--storage-class nfs-client"))
    p.add_argument("name", metavar="NAME", help="a model published in the store")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    k = p.add_argument_group("kubernetes")
    k.add_argument("--storage-uri", metavar="URI", help="where DIR/models is uploaded (default pvc://bray-models/NAME)")
    k.add_argument("--replicas", type=int_at_least(1), default=2, metavar="N", help="predictor pods (default 2)")
    k.add_argument("--image", default="bray-serve-torchserve:0.12.0",
                   help="TorchServe 0.12 + bray-serve image (deploy/kserve/Dockerfile)")
    k.add_argument("--store-claim", default="bray-store", metavar="PVC", help="claim of the live store (default bray-store)")
    k.add_argument("--store-mount", default="/mnt/bray-store", metavar="PATH",
                   help="where every pod mounts the live store; BRAY_STORE (default /mnt/bray-store)")
    k.add_argument("--store-size-gi", type=int_at_least(1), default=20, metavar="G", help="claim size (default 20)")
    k.add_argument("--storage-class", metavar="CLASS", help="a storage class with ReadWriteMany (NFS, CephFS, EFS ...)")
    k.add_argument("--cpu", default="2", help="CPU per pod, requests = limits (default 2)")
    k.add_argument("--memory", default="4Gi", help="memory per pod (default 4Gi)")
    k.add_argument("--gpus", type=int_at_least(0), default=0, metavar="N", help="nvidia.com/gpu per pod (default 0)")
    p.set_defaults(run=run_kserve)

    p = sub.add_parser("dashboard", parents=[store, model_store, server],
                       help="a read-only web page of the store and the server serving it",
                       description="Serve a page that refreshes itself: the models in the store, their "
                                   "registered versions and default, the step each worker serves, and the "
                                   "league table with a plot of win rate by opponent step. Read-only; it "
                                   "never shows TorchServe's keys. /metrics serves the league to Prometheus.",
                       **example("bray-archive dashboard --store ~/.bray/store/pong/run1",
                                 "bray-archive dashboard --port 8091 --refresh-s 5"))
    p.add_argument("--port", type=int_at_least(1), default=8090, metavar="P", help="port (default 8090)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 lets other machines look)")
    p.add_argument("--refresh-s", type=_positive_float, default=2.0, metavar="S",
                   help="how often the page refreshes itself (default 2)")
    p.set_defaults(run=run_dashboard)

    from bray.archiver._server_cli import add_server_parser

    add_server_parser(sub, int_at_least=int_at_least, positive_float=_positive_float)

    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print a TAB-completion script for bray-archive (subcommands, "
                                   "flags, choices, file and directory arguments) generated from "
                                   "this parser by shtab.",
                       **example('eval "$(bray-archive completion bash)"            # this shell',
                                 "bray-archive completion bash > ~/.local/share/bash-completion/completions/bray-archive",
                                 "bray-archive completion zsh > \"${fpath[1]}/_bray-archive\""))
    p.add_argument("shell", choices=("bash", "zsh", "tcsh"), help="the shell to complete in")
    p.set_defaults(run=_completion)
    return parser


def _completion(args: argparse.Namespace, opts: Any, _: Any, out: TextIO) -> int:
    try:
        import shtab
    except ImportError as err:
        raise ConfigError("shell completion needs shtab: pip install shtab") from err
    parser = _parser()
    kinds = {"store": shtab.DIRECTORY, "model_store": shtab.DIRECTORY, "workdir": shtab.DIRECTORY,
             "key_file": shtab.FILE, "config": shtab.FILE}
    stack = [parser]
    while stack:  # every (sub)parser: complete path options with paths
        for action in stack.pop()._actions:
            if action.dest in kinds:
                action.complete = kinds[action.dest]  # type: ignore[attr-defined]
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    out.write(shtab.complete(parser, shell=args.shell))
    return 0


# --- failures: one line on stderr, one exit code ---------------------------------------

EXIT_OK = 0
EXIT_FAILURE = 1  # the command could not do what was asked (the line says why and what to do)
EXIT_USAGE = 2  # wrong arguments (argparse's convention)
# No server to talk to at the address: refused, name not resolved, no connection within the
# timeout, connection dropped; also `server status` of a server that is not running.
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report)


def failure(err: BaseException) -> tuple[str, int]:
    """The one line (without the ``bray-archive CMD:`` prefix) and exit code for ``err``.

    Every subcommand ends here: it raises a :class:`~bray.errors.BrayError` whose message
    says what was wrong, what was got and what to do; HTTP-library, file-system and
    interrupt exceptions that escape are translated here, so no traceback reaches a user
    (``BRAY_TRACEBACK=1`` prints it too, for bug reports).
    """
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", EXIT_INTERRUPTED
    if not isinstance(err, BrayError) and type(err).__module__.startswith(("requests", "urllib3")):
        err = _requests_error(err)
    if isinstance(err, BrayError) and "\n" in str(err):  # keep the promise of one line
        return failure(type(err)(str(err).splitlines()[0].rstrip(":") + " (the rest: rerun with BRAY_TRACEBACK=1)",
                                 **err.attrs))
    if isinstance(err, BrayError):
        unreachable = isinstance(err, ServerUnreachableError) or getattr(err, "reason", "") == "connect-timeout"
        code = EXIT_UNREACHABLE if unreachable else EXIT_FAILURE
        return str(err) or type(err).__name__, code
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}", EXIT_FAILURE
    return (f"unexpected {type(err).__name__}: {err} (a bug in bray-serve: please report it with "
            "the traceback that BRAY_TRACEBACK=1 prints)"), EXIT_FAILURE


def _requests_error(err: BaseException) -> BrayError:
    import requests

    from bray.torchserve.answers import connection_error

    request = getattr(err, "request", None)
    url = getattr(request, "url", None) or ""
    if isinstance(err, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidSchema)):
        return ConfigError(f"not a valid address: {err}; pass --management http://HOST:PORT "
                           "or set BRAY_MANAGEMENT_URL to one address")
    return connection_error(err, url=url or "the server", action=str(getattr(request, "method", "") or "a call"),
                            timeout_s=0.0)


def _command_name(args: argparse.Namespace) -> str:
    return " ".join(str(p) for p in (args.command, getattr(args, "subcommand", None)) if p)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line naming the subcommand and its --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


# --- entry point -----------------------------------------------------------------------


def main(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run ``bray-archive`` with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        0 on success, 1 on a failure, 2 on a usage error, 3 when no server answers at the
        address, 130 on Ctrl-C; every failure is one line on stderr.
    """
    out = out or sys.stdout
    try:
        parser = _parser()
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2) end here
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    try:
        server, pack = from_args(args)
        return int(args.run(args, server, pack, out))
    except BrokenPipeError:  # `bray-archive status | head`: the reader left, nothing to say
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except (Exception, KeyboardInterrupt) as err:
        if os.environ.get("BRAY_TRACEBACK"):
            traceback.print_exc()
        line, code = failure(err)
        print(f"bray-archive {_command_name(args)}: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
