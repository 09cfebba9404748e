"""Start and stop real TorchServe instances: the test fixtures (:func:`start_torchserve`, tied to
the caller) and ``bray-archive server start|stop|status`` (:func:`start_server`, which leaves
the server running and records it in ``<workdir>/server.json``; the main job uses it too).

Each instance gets its own working directory, which holds everything TorchServe would
otherwise share between instances on one machine:

- ``key_file.json``: TorchServe writes it into the JVM's working directory.
- ``tmp/``: ``TMPDIR`` and ``TEMP`` point here. ``torchserve --start`` keeps its pid file
  at ``tempfile.gettempdir()/.model_server.pid`` (so ``/tmp/.model_server.pid`` by default,
  one per machine: a second ``--start`` refuses to run and ``--stop`` stops whichever
  instance wrote it), and the frontend puts worker sockets at ``java.io.tmpdir/.ts.sock.<port>``
  with ports counted from 9000 in every instance. A private temp directory keeps both apart.
- ``logs/``: ``LOG_LOCATION`` and ``METRICS_LOCATION`` (ts_log.log, model_log.log, and
  ``torchserve.out`` with the launcher's stdout and stderr).
- ``config.properties``: the base config (bundled by default) with this instance's
  addresses and ports appended. A generated file, rather than ``TS_*`` variables, because
  those only work when the base config says ``enable_envvars_config=true``; ``TS_*``
  variables that would override the generated addresses are removed from the server's
  environment for the same reason.

``stop()`` never uses ``torchserve --stop``: it terminates this instance's process tree
(launcher, Java frontend, Python workers) with psutil.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

from bray.errors import BrayError, BrayTimeoutError, ConfigError, ServerError

if TYPE_CHECKING:  # pragma: no cover
    from bray.torchserve.auth import TokenAuth

__all__ = ["ServerState", "TorchServeProcess", "free_ports", "ping_status", "start_server", "start_torchserve",
           "stop_server"]

# Keys this launcher writes into the per-instance config.
_ADDRESS_KEYS = (
    "inference_address",
    "management_address",
    "metrics_address",
    "grpc_inference_address",
    "grpc_management_address",
    "grpc_inference_port",
    "grpc_management_port",
)
# AF_UNIX paths are limited to 108 bytes; leave room for "/.ts.sock.65535".
_MAX_TMP_DIR_LEN = 90


def free_ports(count: int, *, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel calls free on ``host`` now (all distinct; racy by nature).

    Args:
        count: how many.
        host: the address to bind.

    Returns:
        ``count`` distinct port numbers.
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _tail(path: Path, n_lines: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n_lines:])


@dataclass
class TorchServeProcess:
    """A running TorchServe instance started by :func:`start_torchserve`.

    Use as a context manager, or call :meth:`stop`.
    """

    workdir: Path
    model_store: Path
    config_file: Path
    log_dir: Path
    tmp_dir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    grpc_ports: tuple[int, int]
    _launcher: subprocess.Popen = field(repr=False)
    _owns_tmp_dir: bool = field(default=False, repr=False)
    _java_pid: int | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _auth: "TokenAuth | None" = field(default=None, repr=False)

    @property
    def key_file(self) -> Path:
        """``key_file.json`` in the working directory (absent when token auth is off)."""
        return self.workdir / "key_file.json"

    @property
    def pid(self) -> int:
        """The Java frontend's pid (the launcher's until the frontend is known)."""
        return self._java_pid if self._java_pid is not None else self._launcher.pid

    @property
    def launcher_pid(self) -> int:
        """The ``torchserve --start --foreground`` process (parent of the frontend)."""
        return self._launcher.pid

    @property
    def stdout_file(self) -> Path:
        """The launcher's stdout and stderr (frontend console output included)."""
        return self.log_dir / "torchserve.out"

    @property
    def auth(self) -> "TokenAuth":
        """A :class:`~bray.torchserve.auth.TokenAuth` on this instance's key file."""
        from bray.torchserve.auth import TokenAuth

        if self._auth is None:
            self._auth = TokenAuth(self.key_file, management_url=self.management_url)
        return self._auth

    def headers(self, kind: Literal["inference", "management"] = "inference") -> dict[str, str]:
        """``Authorization`` header for ``kind``, or ``{}`` while there is no key file."""
        if not self.key_file.is_file():
            return {}
        return self.auth.headers(kind)

    def is_running(self) -> bool:
        """True while the launcher process lives."""
        return self._launcher.poll() is None

    def ping(self, *, timeout_s: float = 2.0) -> bool:
        """True when ``GET /ping`` answers 200 with the inference key."""
        return _ping(self.inference_url, self.key_file, self.auth, timeout_s=timeout_s)

    def tail_logs(self, *, n_lines: int = 40) -> str:
        """The last lines of torchserve.out, ts_log.log and model_log.log, labelled."""
        parts = []
        for name in ("torchserve.out", "ts_log.log", "model_log.log"):
            text = _tail(self.log_dir / name, n_lines)
            if text:
                parts.append(f"--- {self.log_dir / name} (last {n_lines} lines) ---\n{text}")
        return "\n".join(parts) or f"(no logs under {self.log_dir})"

    def _read_java_pid(self) -> int | None:
        try:
            return int((self.tmp_dir / ".model_server.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the frontend, its Python workers and the launcher. Idempotent.

        SIGTERM to the frontend first (it stops its workers), then SIGTERM and after a
        grace period SIGKILL to whatever of the process tree is left.

        Args:
            timeout_s: total time allowed before everything left is killed.
        """
        if self._stopped:
            return
        self._stopped = True
        _stop_tree(self._launcher.pid, self._java_pid or self._read_java_pid(), timeout_s=timeout_s)
        try:
            self._launcher.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._launcher.kill()
        (self.tmp_dir / ".model_server.pid").unlink(missing_ok=True)
        if self._auth is not None:
            self._auth.close()
        if self._owns_tmp_dir:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "TorchServeProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ping(inference_url: str, key_file: Path, auth: "TokenAuth", *, timeout_s: float) -> bool:
    """True when ``GET /ping`` answers 200, with the inference key while ``key_file`` exists."""
    return ping_status(inference_url, auth if key_file.is_file() else None, timeout_s=timeout_s) == 200


def ping_status(inference_url: str, auth: "TokenAuth | None", *, timeout_s: float = 2.0) -> int | None:
    """The status ``GET <inference_url>/ping`` answers with the inference key; ``None``: no answer.

    TorchServe 0.12 answers a ping without a valid key 400 (InvalidKeyException), so an
    expired key (60 minutes by default) is regenerated once through the API key and the
    ping sent again. Shared by the launchers here and the Kubernetes probe
    (``python -m bray.ts_config.probe``).

    Args:
        inference_url: the inference address.
        auth: the server's keys; ``None`` sends no key (token authorization off).
        timeout_s: per HTTP call.
    """
    import requests

    from bray.torchserve.answers import key_refused
    from bray.torchserve.auth import bearer_key

    status = None
    for attempt in range(2):
        try:
            headers = auth.headers("inference") if auth is not None else {}
            resp = requests.get(f"{inference_url.rstrip('/')}/ping", headers=headers, timeout=timeout_s)
            status = resp.status_code
            if attempt == 0 and auth is not None and headers and key_refused(resp.status_code, resp.content):
                # Keys expire (60 min by default): regenerate through the API key, once.
                auth.refresh("inference", stale_key=bearer_key(headers), timeout_s=timeout_s)
                continue
        except (requests.RequestException, BrayError):
            return status
        return status
    return status


def _stop_tree(launcher_pid: int | None, java_pid: int | None, *, timeout_s: float,
               started: Mapping[int, float] | None = None) -> None:
    """Terminate a TorchServe process tree: the frontend first (it stops its workers), then the rest.

    ``started`` maps pids to their recorded start times: a pid whose process started at
    another time was reused by an unrelated process and is left alone.
    """
    import psutil

    deadline = time.monotonic() + timeout_s
    procs: dict[int, psutil.Process] = {}
    for pid in (launcher_pid, java_pid):
        if pid is None:
            continue
        try:
            root = psutil.Process(pid)
            if started is not None and pid in started and abs(root.create_time() - started[pid]) > 1.0:
                continue
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.Error:
            continue
    java = procs.get(java_pid) if java_pid is not None else None
    if java is not None:
        try:
            java.terminate()
            java.wait(timeout=max(0.1, 0.75 * (deadline - time.monotonic())))
        except psutil.Error:  # TimeoutExpired included: the next round kills it
            pass
    alive = []
    for p in procs.values():
        try:
            if p.is_running():
                p.terminate()
                alive.append(p)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(alive, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5.0)


def _write_config(base: Path, dest: Path, overrides: Mapping[str, str]) -> None:
    # Java Properties and TorchServe's launcher both let the last duplicate key win.
    lines = [base.read_text().rstrip("\n"), "",
             "# --- per-instance values written by bray.torchserve.launcher ---"]
    lines += [f"{key}={value}" for key, value in overrides.items()]
    dest.write_text("\n".join(lines) + "\n")


def start_torchserve(
    *,
    workdir: Path,
    model_store: Path,
    inference_port: int | None = None,
    management_port: int | None = None,
    metrics_port: int | None = None,
    grpc_ports: tuple[int, int] | None = None,
    config: Path | None = None,
    log_config: Path | None = None,
    properties: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    models: str | Sequence[str] | None = None,
    timeout_s: float = 120.0,
) -> TorchServeProcess:
    """Start TorchServe on loopback and wait until ``/ping`` answers.

    Args:
        workdir: working directory of the server (created); holds key_file.json, logs/,
            tmp/ and the generated config.properties.
        model_store: directory of ``.mar`` files (created).
        inference_port, management_port, metrics_port: ``None`` picks a free port.
        grpc_ports: (inference, management); ``None`` picks two free ports.
        config: base config.properties; default the bundled one.
        log_config: log4j2 file; default the bundled one.
        properties: extra ``key=value`` lines for the generated config (win over ``config``).
        extra_env: added to the server's environment (``TS_*`` overrides included).
        models: TorchServe's ``--models`` (``"name=file.mar"`` items, or ``"ALL"``).
        timeout_s: how long to wait for ``/ping``.

    Returns:
        The running instance; call ``stop()`` (or use it as a context manager).

    Raises:
        ConfigError: a config file is missing.
        ServerError: TorchServe exited during start (the message holds its last log lines).
        BrayTimeoutError: ``/ping`` did not answer in time (the server is stopped).
    """
    # The bundled files are bray.ts_config's package data (that package imports nothing of bray).
    from bray.ts_config import config_path, log_config_path

    config = Path(config) if config is not None else config_path()
    log_config = Path(log_config) if log_config is not None else log_config_path()
    for what, path in (("config", config), ("log_config", log_config)):
        if not path.is_file():
            raise ConfigError(f"{what} file {path} does not exist")
    workdir = Path(workdir).resolve()
    model_store = Path(model_store).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_store.mkdir(parents=True, exist_ok=True)
    log_dir = workdir / "logs"
    log_dir.mkdir(exist_ok=True)

    wanted = [inference_port, management_port, metrics_port,
              *(grpc_ports if grpc_ports is not None else (None, None))]
    picked = iter(free_ports(sum(p is None for p in wanted)))
    ports = [p if p is not None else next(picked) for p in wanted]
    inf, mgmt, met, grpc_inf, grpc_mgmt = ports
    overrides = {
        "inference_address": f"http://127.0.0.1:{inf}",
        "management_address": f"http://127.0.0.1:{mgmt}",
        "metrics_address": f"http://127.0.0.1:{met}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": str(grpc_inf),
        "grpc_management_port": str(grpc_mgmt),
        **dict(properties or {}),
    }
    config_file = workdir / "config.properties"
    _write_config(config, config_file, overrides)

    tmp_dir = workdir / "tmp"
    owns_tmp_dir = False
    if len(str(tmp_dir)) > _MAX_TMP_DIR_LEN:
        tmp_dir = Path(tempfile.mkdtemp(prefix="bray-ts-"))
        owns_tmp_dir = True
    tmp_dir.mkdir(exist_ok=True)
    (tmp_dir / ".model_server.pid").unlink(missing_ok=True)
    # A key file left by an earlier run would make the first pings use dead keys.
    (workdir / "key_file.json").unlink(missing_ok=True)

    env = {k: v for k, v in os.environ.items()
           if k != "TS_CONFIG_FILE" and k.removeprefix("TS_").lower() not in _ADDRESS_KEYS}
    env.update(TMPDIR=str(tmp_dir), TEMP=str(tmp_dir), LOG_LOCATION=str(log_dir),
               METRICS_LOCATION=str(log_dir))
    env.update(extra_env or {})

    cmd = [sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs",
           "--ts-config", str(config_file), "--log-config", str(log_config),
           "--model-store", str(model_store)]
    if models:
        items = models.replace(",", " ").split() if isinstance(models, str) else list(models)
        cmd += ["--models", *items]
    with open(log_dir / "torchserve.out", "ab") as out:
        launcher = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    server = TorchServeProcess(
        workdir=workdir, model_store=model_store, config_file=config_file, log_dir=log_dir,
        tmp_dir=tmp_dir, inference_url=overrides["inference_address"],
        management_url=overrides["management_address"], metrics_url=overrides["metrics_address"],
        grpc_ports=(int(grpc_inf), int(grpc_mgmt)), _launcher=launcher, _owns_tmp_dir=owns_tmp_dir,
    )
    try:
        _wait_started(server, timeout_s=timeout_s)
    except BaseException:
        server.stop(timeout_s=15.0)
        raise
    return server


def _wait_started(server: TorchServeProcess, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server._java_pid is None:
            server._java_pid = server._read_java_pid()
        if server.ping(timeout_s=2.0):
            return
        code = server._launcher.poll()
        if code is not None:
            raise ServerError(
                f"TorchServe exited with code {code} while starting in {server.workdir} "
                f"(ports {server.inference_url}, {server.management_url}, {server.metrics_url}, "
                f"gRPC {server.grpc_ports}):\n{server.tail_logs(n_lines=30)}",
                status=None,
            )
        if time.monotonic() >= deadline:
            raise BrayTimeoutError(
                f"TorchServe in {server.workdir} did not answer {server.inference_url}/ping "
                f"within {timeout_s} s:\n{server.tail_logs(n_lines=30)}",
                timeout_s=timeout_s,
            )
        time.sleep(0.25)



# --- a server that outlives the command that started it (bray-archive server) ----------

STATE_FILE = "server.json"
# The bundled config's ports: the BRAY_* defaults point at them.
DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082,
                 "grpc_inference": 7070, "grpc_management": 7071}


@dataclass(frozen=True)
class ServerState:
    """What :func:`start_server` started, as recorded in ``<workdir>/server.json``.

    Attributes:
        workdir: the server's working directory (key file, logs, config, this record).
        key_file: ``<workdir>/key_file.json``, written by TorchServe at each start.
        pids: launcher and Java frontend pids mapped to their start times (a pid reused
            by another process after a crash is not mistaken for the server).
    """

    workdir: Path
    model_store: Path
    inference_url: str
    management_url: str
    metrics_url: str
    grpc_ports: tuple[int, int]
    launcher_pid: int
    java_pid: int | None
    pids: dict[int, float]
    started_at: float

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def as_json(self) -> dict[str, object]:
        """The record as JSON-ready values (what ``server.json`` and ``--json`` hold)."""
        return {"workdir": str(self.workdir), "model_store": str(self.model_store),
                "inference_url": self.inference_url, "management_url": self.management_url,
                "metrics_url": self.metrics_url, "grpc_ports": list(self.grpc_ports),
                "key_file": str(self.key_file), "log_dir": str(self.log_dir),
                "launcher_pid": self.launcher_pid, "java_pid": self.java_pid,
                "pids": {str(k): v for k, v in self.pids.items()}, "started_at": self.started_at}

    @classmethod
    def read(cls, workdir: str | os.PathLike[str]) -> "ServerState | None":
        """The record in ``workdir``, or ``None`` when there is none.

        Raises:
            ConfigError: the record is not one this module wrote.
        """
        import json

        path = Path(workdir).expanduser().resolve() / STATE_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(workdir=Path(raw["workdir"]), model_store=Path(raw["model_store"]),
                       inference_url=str(raw["inference_url"]), management_url=str(raw["management_url"]),
                       metrics_url=str(raw["metrics_url"]),
                       grpc_ports=(int(raw["grpc_ports"][0]), int(raw["grpc_ports"][1])),
                       launcher_pid=int(raw["launcher_pid"]),
                       java_pid=None if raw["java_pid"] is None else int(raw["java_pid"]),
                       pids={int(k): float(v) for k, v in raw["pids"].items()},
                       started_at=float(raw["started_at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise ConfigError(f"{path} is not a server record written by bray-archive server start ({err}); "
                              "remove it if no server runs from that directory") from err

    def running_pids(self) -> list[int]:
        """The recorded processes still alive (same pid, same start time)."""
        import psutil

        alive = []
        for pid, created in self.pids.items():
            try:
                if abs(psutil.Process(pid).create_time() - created) <= 1.0:
                    alive.append(pid)
            except psutil.Error:
                continue
        return alive

    def ping(self, *, timeout_s: float = 2.0) -> bool:
        """True when the server answers ``GET /ping`` (with its inference key)."""
        from bray.torchserve.auth import TokenAuth

        auth = TokenAuth(self.key_file, management_url=self.management_url)
        try:
            return _ping(self.inference_url, self.key_file, auth, timeout_s=timeout_s)
        finally:
            auth.close()


def _port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as Java's listeners use it: a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def start_server(*, workdir: str | os.PathLike[str], model_store: str | os.PathLike[str],
                 ports: Mapping[str, int | None] | None = None, config: Path | None = None,
                 models: str | Sequence[str] | None = None, timeout_s: float = 120.0) -> ServerState:
    """Start TorchServe in ``workdir`` and leave it running after this process exits.

    The bundled config and log config are used; what was started is recorded in
    ``<workdir>/server.json`` for :func:`stop_server` and :func:`ServerState.read`.

    Args:
        workdir: working directory (created): key_file.json, logs/, config.properties.
        model_store: directory of ``.mar`` files (created).
        ports: ``inference``, ``management``, ``metrics``, ``grpc_inference``,
            ``grpc_management``; a missing key takes the bundled config's port, ``None``
            or 0 picks a free one.
        config: base config.properties (default the bundled one).
        models: TorchServe's ``--models`` (``"name=file.mar"`` items, or ``"ALL"``).
        timeout_s: how long to wait for ``/ping``.

    Raises:
        ServerError: a server recorded in ``workdir`` is still running, a port is taken,
            or TorchServe exited while starting (its last log lines included).
        BrayTimeoutError: ``/ping`` did not answer in time (the server is stopped again).
    """
    import json

    import psutil

    workdir = Path(workdir).expanduser().resolve()
    unknown = set(ports or {}) - set(DEFAULT_PORTS)
    if unknown:
        raise ConfigError(f"unknown port name(s) {sorted(unknown)}; expected some of {sorted(DEFAULT_PORTS)}")
    old = ServerState.read(workdir)
    if old is not None and old.running_pids():
        raise ServerError(
            f"a TorchServe started from {workdir} is still running (pid {old.java_pid or old.launcher_pid}, "
            f"{old.inference_url}); stop it with: bray-archive server stop --workdir {workdir}",
            status=None, url=old.inference_url)
    wanted = {k: (ports or {}).get(k, v) for k, v in DEFAULT_PORTS.items()}
    taken = [f"{k.replace('_', ' ')} {p}" for k, p in wanted.items() if p and _port_in_use(p)]
    if taken:
        raise ServerError(
            f"port(s) already in use on 127.0.0.1: {', '.join(taken)}; another TorchServe may run there "
            "(`bray-archive server status --workdir DIR` tells whether one of ours does): stop it, or "
            "pass other ports (--inference-port ...) or --any-ports",
            status=None)
    free = lambda p: p or None  # noqa: E731 - 0 means "any free port", as for bind()
    proc = start_torchserve(
        workdir=workdir, model_store=Path(model_store).expanduser(), config=config, models=models,
        inference_port=free(wanted["inference"]), management_port=free(wanted["management"]),
        metrics_port=free(wanted["metrics"]),
        grpc_ports=(free(wanted["grpc_inference"]), free(wanted["grpc_management"]))  # type: ignore[arg-type]
        if wanted["grpc_inference"] and wanted["grpc_management"] else None,
        timeout_s=timeout_s)
    pids: dict[int, float] = {}
    for pid in (proc.launcher_pid, proc._java_pid):
        if pid is not None:
            try:
                pids[pid] = psutil.Process(pid).create_time()
            except psutil.Error:
                continue
    state = ServerState(workdir=workdir, model_store=proc.model_store, inference_url=proc.inference_url,
                        management_url=proc.management_url, metrics_url=proc.metrics_url,
                        grpc_ports=proc.grpc_ports, launcher_pid=proc.launcher_pid, java_pid=proc._java_pid,
                        pids=pids, started_at=time.time())
    tmp = workdir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state.as_json(), indent=1) + "\n")
    os.replace(tmp, workdir / STATE_FILE)
    return state


def stop_server(workdir: str | os.PathLike[str], *, timeout_s: float = 60.0) -> ServerState | None:
    """Stop the server :func:`start_server` recorded in ``workdir`` (its workers too).

    Returns:
        The record of the server that was stopped, or ``None`` when none was running.

    Raises:
        ConfigError: ``server.json`` is not a record this module wrote.
    """
    workdir = Path(workdir).expanduser().resolve()
    state = ServerState.read(workdir)
    if state is None:
        return None
    running = state.running_pids()
    if running:
        _stop_tree(state.launcher_pid, state.java_pid, timeout_s=timeout_s, started=state.pids)
    (workdir / STATE_FILE).unlink(missing_ok=True)
    (workdir / "tmp" / ".model_server.pid").unlink(missing_ok=True)
    return state if running else None
