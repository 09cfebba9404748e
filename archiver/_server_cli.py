"""``bray-archive server start|stop|status``: one TorchServe per working directory, from the bundled config.

The working directory (``--workdir``, default ``$BRAY_SERVER_DIR`` or ``~/.bray/server``)
holds what TorchServe writes (``key_file.json``, ``logs/``), the generated
``config.properties`` and ``server.json`` (what was started). With the default ports and
directory the ``BRAY_*`` defaults already point at the server, so ``bray-archive`` and
``RemoteModel`` find it and its key file without any variable set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from bray.errors import BrayTimeoutError, ServerError, ServerUnreachableError

if TYPE_CHECKING:  # pragma: no cover
    from bray.torchserve.launcher import ServerState

__all__ = ["add_server_parser"]



def add_server_parser(sub: Any, *, int_at_least: Callable[[int], Callable[[str], int]],
                      positive_float: Callable[[str], float]) -> None:
    """Add ``server`` and its three subcommands to ``bray-archive``'s subparsers."""
    from bray.archiver.cli import example
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", metavar="DIR", type=Path,
                        help="the server's working directory: key_file.json, logs/, server.json "
                             "(default $BRAY_SERVER_DIR or ~/.bray/server)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    server = sub.add_parser(
        "server", help="start, stop or look at a TorchServe with the bundled config",
        description="Run TorchServe from bray-serve's bundled config.properties and log4j2.xml, "
                    "token authorization on, loopback only, in one working directory.",
        **example("bray-archive server start                      # ~/.bray/server, ports 8080/8081/8082",
                  "bray-archive server start --workdir /tmp/ts2 --any-ports --json",
                  "bray-archive server status", "bray-archive server stop"))
    verbs = server.add_subparsers(dest="subcommand", metavar="start|stop|status", required=True)

    p = verbs.add_parser(
        "start", parents=[common], help="start TorchServe and print its addresses and key file",
        description="Start TorchServe in the background from the bundled config, wait until it "
                    "answers /ping, print its addresses, key file and logs. It keeps running "
                    "after this command returns; stop it with `bray-archive server stop`.",
        **example("bray-archive server start --model-store ~/.bray/model_store",
                  "bray-archive server start --workdir /tmp/ts2 --any-ports   # a second server"))
    p.add_argument("--model-store", metavar="DIR", type=Path,
                   help="TorchServe's model store (default $BRAY_MODEL_STORE or ~/.bray/model_store)")
    for name, port in (("inference", 8080), ("management", 8081), ("metrics", 8082)):
        p.add_argument(f"--{name}-port", type=int_at_least(0), metavar="PORT",
                       help=f"{name} API port on 127.0.0.1 (default {port}; 0: any free port)")
    p.add_argument("--any-ports", action="store_true",
                   help="free ports for every API, gRPC included, instead of 8080/8081/8082/7070/7071 "
                        "(for a second server on the machine)")
    p.add_argument("--models", metavar="NAME=FILE.mar", nargs="+",
                   help="archives of the model store to register at start (TorchServe's --models)")
    p.add_argument("--config", metavar="FILE", type=Path,
                   help="base config.properties instead of the bundled one (addresses are set here)")
    p.add_argument("--timeout-s", type=positive_float, default=120.0, metavar="S",
                   help="how long to wait for the server to answer /ping (default 120)")
    p.set_defaults(run=_start)

    p = verbs.add_parser(
        "stop", parents=[common], help="stop the server started from the working directory",
        description="Stop the TorchServe that `server start` started from the working directory, "
                    "its Python workers included. Nothing running is not an error.",
        **example("bray-archive server stop --workdir /tmp/ts2"))
    p.add_argument("--timeout-s", type=positive_float, default=60.0, metavar="S",
                   help="grace period before what is left is killed (default 60)")
    p.set_defaults(run=_stop)

    p = verbs.add_parser(
        "status", parents=[common], help="is it running, where, and does it answer",
        description="Say whether the server started from the working directory runs and answers "
                    "/ping, and where its addresses, key file and logs are. Exit code 0 when it "
                    "answers, 3 when it is not running, 1 when it runs but does not answer.",
        **example("bray-archive server status || bray-archive server start",
                  "bray-archive server status --workdir /tmp/ts2 --json"))
    p.set_defaults(run=_status)


def _workdir(args: argparse.Namespace) -> Path:
    from bray.locations import server_dir

    return (args.workdir or server_dir()).expanduser().resolve()


def _describe(state: ServerState, o: TextIO) -> None:
    rows = [("inference", state.inference_url), ("management", state.management_url),
            ("metrics", f"{state.metrics_url}/metrics"), ("key file", str(state.key_file)),
            ("logs", str(state.log_dir)), ("model store", str(state.model_store)),
            ("working dir", str(state.workdir))]
    for label, value in rows:
        print(f"  {label:<12}{value}", file=o)


def _exports(state: ServerState) -> str:
    return (f"export BRAY_INFERENCE_URL={state.inference_url} BRAY_MANAGEMENT_URL={state.management_url} "
            f"BRAY_KEY_FILE={state.key_file} BRAY_MODEL_STORE={state.model_store}")


def _start(args: argparse.Namespace, opts: Any, _: Any, out: TextIO) -> int:
    from bray.torchserve.launcher import DEFAULT_PORTS, start_server

    ports: dict[str, int | None] = {k: 0 for k in DEFAULT_PORTS} if args.any_ports else {}
    for name in ("inference", "management", "metrics"):
        value = getattr(args, f"{name}_port")
        if value is not None:
            ports[name] = value
    workdir = _workdir(args)
    started = time.perf_counter()
    try:
        state = start_server(workdir=workdir, model_store=opts.locations.model_store, ports=ports,
                             config=args.config, models=args.models, timeout_s=args.timeout_s)
    except (ServerError, BrayTimeoutError) as err:
        # The library's message carries the last log lines; the CLI's is one line saying where they are.
        first = str(err).splitlines()[0].rstrip(":")
        if "\n" not in str(err):
            raise
        raise type(err)(f"{first}; the server was stopped again, its logs are in {workdir / 'logs'} "
                        "(torchserve.out, ts_log.log)", **err.attrs) from err
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({**state.as_json(), "seconds": round(seconds, 3)}, indent=1), file=out)
        return 0
    print(f"TorchServe started in {seconds:.1f} s (pid {state.java_pid or state.launcher_pid}):", file=out)
    _describe(state, out)
    from bray.locations import Locations, find_key_file

    defaults = Locations.from_env({})
    if (state.inference_url, state.management_url) != (defaults.inference_urls[0], defaults.management_url) \
            or find_key_file(env={}) != state.key_file:
        print("point bray at it (other shells, jobs) with:", file=out)
        print(f"  {_exports(state)}", file=out)
    print("stop it with: bray-archive server stop" + (f" --workdir {workdir}" if args.workdir else ""), file=out)
    return 0


def _stop(args: argparse.Namespace, opts: Any, _: Any, out: TextIO) -> int:
    from bray.torchserve.launcher import stop_server

    workdir = _workdir(args)
    started = time.perf_counter()
    state = stop_server(workdir, timeout_s=args.timeout_s)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"stopped": state is not None, "workdir": str(workdir),
                          "seconds": round(seconds, 3)}), file=out)
    elif state is None:
        print(f"no server running from {workdir}: nothing to stop", file=out)
    else:
        print(f"stopped TorchServe (pid {state.java_pid or state.launcher_pid}) of {workdir} "
              f"in {seconds:.1f} s", file=out)
    return 0


def _status(args: argparse.Namespace, opts: Any, _: Any, out: TextIO) -> int:
    from bray.torchserve.launcher import ServerState

    workdir = _workdir(args)
    state = ServerState.read(workdir)
    running = state.running_pids() if state is not None else []
    if state is None or not running:
        raise ServerUnreachableError(
            f"no server running from {workdir}"
            + (" (it was started there but its processes are gone; see its logs/)" if state else "")
            + "; start it with: bray-archive server start" + (f" --workdir {workdir}" if args.workdir else ""),
            status=None, url=None, reason="not-running")
    answers = state.ping(timeout_s=5.0)
    if args.json:
        print(json.dumps({**state.as_json(), "running": True, "answers": answers,
                          "uptime_s": round(time.time() - state.started_at, 1)}, indent=1), file=out)
    else:
        uptime = time.time() - state.started_at
        how = "answers /ping" if answers else "does NOT answer /ping (see the logs)"
        print(f"TorchServe runs (pid {state.java_pid or state.launcher_pid}, up {uptime:.0f} s) and {how}:",
              file=out)
        _describe(state, out)
    return 0 if answers else 1
