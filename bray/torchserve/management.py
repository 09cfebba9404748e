"""The one client for TorchServe's management API, shared by ``bray-archive`` and the bridge.

TorchServe 0.12 facts this module relies on (checked against the 0.12.0 frontend):

- With token authorization on, the server writes ``key_file.json`` into its working
  directory at each start::

      {"management": {"key": "...", "expiration time": "2024-...Z"},
       "inference":  {"key": "...", "expiration time": "..."},
       "API":        {"key": "..."}}

  Calls send ``Authorization: Bearer <key>``. A missing, wrong or expired key is answered
  with **400** and ``"type": "InvalidKeyException"`` (not 401/403).
- ``GET <management>/token?type=management|inference`` with the API key regenerates that
  key; the new key is only written to the key file (the response body is empty), so
  refreshing needs the server's own key file (same machine or a shared file system).
- A URL that ``allowed_urls`` refuses is answered 404 "Given URL ... does not match any
  allowed URL(s)"; a name missing from the model store 404 "Model not found at: ...".
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import requests

from bray.config import Locations, check_url, find_key_file
from bray.errors import (
    AuthError,
    BrayError,
    BrayTimeoutError,
    ConfigError,
    ManagementError,
    ModelApiDisabledError,
    ModelNotFoundError,
    ServerError,
    ServerUnreachableError,
    VersionExistsError,
)

__all__ = ["ManagementClient", "ModelVersion", "TokenAuth"]

KeyKind = Literal["inference", "management"]
_KINDS = ("inference", "management")


# --- why a connection failed -----------------------------------------------------------

START_HINT = "is the server running? start it with: bray-archive server start"


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and everything it wraps (causes, contexts, urllib3's ``reason``, exception args)."""
    seen: list[BaseException] = []
    stack = [err]
    while stack:
        e = stack.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        wrapped = [getattr(e, "reason", None), getattr(e, "os_error", None), e.__cause__, e.__context__, *e.args]
        stack.extend(w for w in wrapped if isinstance(w, BaseException))
    return seen


def connection_failure(err: BaseException) -> str:
    """Why a connection failed, from the exception and what it wraps.

    Works on requests/urllib3 and aiohttp exceptions alike, by walking down to the
    socket error underneath.

    Returns:
        ``"name"`` (host name not resolved), ``"refused"`` (nothing listens on the port),
        ``"connect-timeout"`` (no answer to the connection attempt), ``"read-timeout"``
        (connected, no answer in time), ``"reset"`` (the peer dropped the connection),
        ``"unreachable"`` (no route to the host) or ``"other"``.
    """
    import errno
    import socket

    causes = _causes(err)
    names = {type(e).__name__ for e in causes}
    if any(isinstance(e, socket.gaierror) for e in causes) or names & {"NameResolutionError", "ClientConnectorDNSError"}:
        return "name"
    if any(isinstance(e, ConnectionRefusedError) for e in causes):
        return "refused"
    # requests/urllib3 and aiohttp (ConnectionTimeoutError; its SocketTimeoutError is a read timeout).
    if names & {"ConnectTimeout", "ConnectTimeoutError", "ConnectionTimeoutError"} and "ReadTimeout" not in names:
        return "connect-timeout"
    if names & {"ReadTimeout", "ReadTimeoutError"} or any(isinstance(e, TimeoutError) for e in causes):
        return "read-timeout"
    reset = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
    if (any(isinstance(e, reset) for e in causes) or names & {"ServerDisconnectedError", "RemoteDisconnected"}
            or any(isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.EPIPE) for e in causes)):
        return "reset"
    if any(isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH) for e in causes):
        return "unreachable"
    if "ProtocolError" in names:  # urllib3: "Connection aborted." without a socket error
        return "reset"
    return "other"


def connection_error(err: BaseException, *, url: str, action: str, timeout_s: float,
                     var: str = "BRAY_MANAGEMENT_URL") -> BrayError:
    """The error to raise for a failed connection to ``url``, saying what happened and what to do.

    Args:
        err: the HTTP library's exception.
        url: the server address tried.
        action: what was being done ("GET /models"), for the message.
        timeout_s: the limit that was in force.
        var: where the address came from (named in the advice).

    Returns:
        :class:`BrayTimeoutError` for timeouts, else :class:`ServerUnreachableError`;
        ``reason`` holds :func:`connection_failure`'s answer.
    """
    from urllib.parse import urlsplit

    kind = connection_failure(err)
    host = urlsplit(url).hostname or url
    if kind == "connect-timeout":
        return BrayTimeoutError(
            f"{url} did not accept a connection within {timeout_s} s ({action}: connect timed out); "
            f"a firewall may be dropping packets or the host is down: check the address in {var}",
            timeout_s=timeout_s, reason=kind, url=url)
    if kind == "read-timeout":
        return BrayTimeoutError(
            f"TorchServe at {url} accepted the connection but did not answer {action} within "
            f"{timeout_s} s (read timed out); the server may be stuck or busy: raise the timeout "
            "(--timeout-s, timeout_s=) or look at logs/ts_log.log in its working directory",
            timeout_s=timeout_s, reason=kind, url=url)
    text = {
        "name": f"cannot resolve the host name {host!r} of {url} (name not resolved); "
                f"check the address in {var}",
        "refused": f"nothing listens at {url} ({action}: connection refused); {START_HINT}, "
                   f"or set {var} to where it listens",
        "reset": f"{url} dropped the connection during {action} (connection reset); the server may "
                 "have crashed or restarted, or what listens there is not TorchServe's API: check "
                 "`bray-archive server status` and logs/ts_log.log in its working directory",
        "unreachable": f"no route to {host} for {url} ({action}: host unreachable); check the "
                       f"address in {var} and the network",
    }.get(kind, f"cannot reach {url} ({action}: {err}); {START_HINT}, or check {var}")
    return ServerUnreachableError(text, status=None, url=url, reason=kind)


def _json_body(data: bytes | str) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def key_refused(status: int, data: bytes | str) -> bool:
    """True when token authorization refused a call, from its status and body.

    TorchServe 0.12 answers a missing, wrong or expired key with 400 (403 on some paths)
    and ``"type": "InvalidKeyException"``, not 401. Shared by the management client, the
    inference transport and the server launcher's ping.
    """
    if status == 401:
        return True
    return status in (400, 403) and _json_body(data).get("type") == "InvalidKeyException"


def error_message(data: bytes | str, reason: str = "") -> str:
    """TorchServe's ``message`` from an error body, else the start of the body."""
    message = _json_body(data).get("message")
    if message:
        return str(message)
    text = (data.decode("utf-8", "replace") if isinstance(data, bytes) else data).strip()
    return text[:500] if text else reason or "no message"


# Answers worth asking a GET again for: a gateway in between or a server restarting.
_RETRY_STATUSES = frozenset({502, 503, 504})


def _transient(error: BrayError) -> bool:
    """A dropped connection, which a moment may cure.

    Not "refused" (almost always a server that is not started: say so at once), not
    timeouts (each try already waited the whole timeout), not a name that does not resolve.
    """
    return getattr(error, "reason", "") == "reset"


def _is_auth_failure(resp: requests.Response) -> bool:
    return key_refused(resp.status_code, resp.content)


def _error_type(resp: requests.Response) -> str:
    return str(_json_body(resp.content).get("type", ""))


def _error_message(resp: requests.Response) -> str:
    return error_message(resp.content, resp.reason or "")


class TokenAuth:
    """Reads TorchServe's ``key_file.json`` and hands out ``Authorization`` headers.

    The file is re-read whenever it changes on disk (the server rewrites it at each start
    and at each refresh), so one ``TokenAuth`` outlives server restarts. Thread-safe.

    Args:
        key_file: path of ``key_file.json``; ``None`` looks where
            :func:`bray.config.find_key_file` looks, at each use until found.
        management_url: the management API, where expired keys are regenerated.
    """

    def __init__(self, key_file: str | Path | None, *, management_url: str) -> None:
        self._explicit = Path(key_file) if key_file is not None else None
        self.management_url = management_url.rstrip("/")
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._path: Path | None = None
        self._session: requests.Session | None = None

    @property
    def key_file(self) -> Path | None:
        """The key file in use (``None`` while none is found: token authorization off)."""
        return self._explicit if self._explicit is not None else (self._path or find_key_file())

    def _load_locked(self) -> None:
        path = self._explicit if self._explicit is not None else find_key_file()
        self._path = path
        if path is None:
            self._keys, self._stamp = {}, None
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            if self._explicit is not None:
                raise AuthError(
                    f"TorchServe key file {path} does not exist; start the server (bray-archive "
                    "server start writes it into its working directory, ~/.bray/server) or pass the "
                    "right key_file / BRAY_KEY_FILE",
                    status=None, key_file=str(path),
                ) from None
            self._keys, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        for attempt in range(3):
            try:
                data = json.loads(path.read_text())
                keys = {kind: str(data[kind]["key"]) for kind in _KINDS}
                keys["API"] = str(data["API"]["key"])
                break
            except (OSError, ValueError, KeyError, TypeError) as err:
                # The server truncates and rewrites the file at each refresh: look again shortly.
                if attempt < 2:
                    time.sleep(0.05)
                    continue
                raise AuthError(
                    f"cannot read TorchServe key file {path}: {err}; expected "
                    '{"management": {"key": ...}, "inference": {"key": ...}, "API": {"key": ...}}',
                    status=None, key_file=str(path),
                ) from err
        self._keys, self._stamp = keys, stamp

    def key(self, kind: KeyKind | Literal["API"]) -> str | None:
        """The current key of one kind, or ``None`` when there is no key file.

        Raises:
            AuthError: an explicit key file is missing or unreadable.
        """
        with self._lock:
            self._load_locked()
            return self._keys.get(kind)

    def headers(self, kind: KeyKind) -> dict[str, str]:
        """``{"Authorization": "Bearer <key>"}`` for ``kind``; ``{}`` without a key file.

        Raises:
            ConfigError: ``kind`` is not "inference" or "management".
            AuthError: an explicit key file is missing or unreadable.
        """
        if kind not in _KINDS:
            raise ConfigError(f"key kind must be 'inference' or 'management', got {kind!r}")
        key = self.key(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def refresh(self, kind: KeyKind, *, stale_key: str | None = None, timeout_s: float = 10.0) -> None:
        """Regenerate the ``kind`` key with the API key, then re-read the key file.

        Args:
            kind: "inference" or "management".
            stale_key: the key that was refused; when the file already holds another one
                (a restart, or another thread refreshed) nothing is regenerated.
            timeout_s: for the HTTP call.

        Raises:
            ServerUnreachableError: the management API does not answer.
            AuthError: no key file, or the server refused the API key.
        """
        if kind not in _KINDS:
            raise ConfigError(f"key kind must be 'inference' or 'management', got {kind!r}")
        with self._lock:
            self._stamp = None  # force a re-read: mtime granularity can hide a fast rewrite
            self._load_locked()
            if not self._keys:
                raise AuthError(
                    "TorchServe refused the call and no key_file.json was found; pass key_file= "
                    "or set BRAY_KEY_FILE to the key_file.json in the server's working directory",
                    status=None, key_file=None,
                )
            if stale_key is not None and self._keys.get(kind) != stale_key:
                return
            url = f"{self.management_url}/token"
            if self._session is None:
                self._session = requests.Session()
            try:
                resp = self._session.get(
                    url, params={"type": kind},
                    headers={"Authorization": f"Bearer {self._keys['API']}"}, timeout=timeout_s,
                )
            except requests.RequestException as err:
                raise connection_error(err, url=self.management_url, action=f"refreshing the {kind} key",
                                       timeout_s=timeout_s) from err
            if resp.status_code != 200:
                raise AuthError(
                    f"TorchServe refused to regenerate the {kind} key with the API key from "
                    f"{self._path} ({resp.status_code}: {_error_message(resp)}); the key file "
                    "probably belongs to another server run; point key_file / BRAY_KEY_FILE at "
                    "the key_file.json in this server's working directory",
                    status=resp.status_code, key_file=str(self._path),
                )
            self._stamp = None
            self._load_locked()

    def close(self) -> None:
        """Close the HTTP session used for refreshes."""
        if self._session is not None:
            self._session.close()
            self._session = None


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model, as the management API describes it."""

    name: str
    version: str
    is_default: bool
    workers: int
    ready_workers: int
    batch_size: int
    max_batch_delay_ms: int
    url: str
    min_workers: int = 0
    max_workers: int = 0
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_describe(cls, raw: dict[str, Any], *, is_default: bool) -> "ModelVersion":
        """Build from one entry of ``GET /models/<name>/<version>``."""
        workers = raw.get("workers") or []
        return cls(
            name=str(raw.get("modelName", "")),
            version=str(raw.get("modelVersion", "")),
            is_default=is_default,
            workers=len(workers),
            ready_workers=sum(1 for w in workers if str(w.get("status", "")).upper() == "READY"),
            batch_size=int(raw.get("batchSize", 1) or 1),
            max_batch_delay_ms=int(raw.get("maxBatchDelay", 0) or 0),
            url=str(raw.get("modelUrl", "")),
            min_workers=int(raw.get("minWorkers", 0) or 0),
            max_workers=int(raw.get("maxWorkers", 0) or 0),
            raw=raw,
        )


class ManagementClient:
    """Synchronous client for TorchServe's management API (one keep-alive session).

    Args:
        url: management API address; default ``BRAY_MANAGEMENT_URL`` or http://127.0.0.1:8081.
        key_file: TorchServe's ``key_file.json``; default as :func:`bray.config.find_key_file`.
        timeout_s: per HTTP call (registration waits for the workers to start: be generous).

    Raises:
        ConfigError: a malformed address or a non-positive timeout.
    """

    def __init__(self, url: str | None = None, *, key_file: str | Path | None = None,
                 timeout_s: float = 60.0) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if url is None:
            url = Locations.from_env().management_url
        check_url(url, what="management address", var="BRAY_MANAGEMENT_URL (or the url argument)",
                  example="http://127.0.0.1:8081")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.auth = TokenAuth(key_file, management_url=self.url)
        self.page_size = 100  # models per GET /models page (TorchServe's limit parameter)
        # Pauses before asking a GET again after a dropped connection or a 502/503/504
        # (a proxy in between, a frontend restarting): two retries, 0.6 s in all.
        self.get_retry_delays_s: tuple[float, ...] = (0.1, 0.5)
        self._session = requests.Session()

    # -- plumbing -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP sessions."""
        self._session.close()
        self.auth.close()

    def __enter__(self) -> "ManagementClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                 timeout_s: float | None = None, what: str = "") -> requests.Response:
        url = f"{self.url}{path}"
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        refreshed = False
        failures = 0
        while True:
            headers = self.auth.headers("management")
            try:
                resp = self._session.request(method, url, params=params, headers=headers,
                                             timeout=timeout)
            except requests.RequestException as err:
                error = connection_error(err, url=self.url, action=f"{method} {path}", timeout_s=timeout)
                if method == "GET" and failures < len(self.get_retry_delays_s) and _transient(error):
                    # A GET changes nothing, so asking again is safe; POST/PUT/DELETE are not
                    # repeated: the first try may have taken effect before the connection dropped.
                    time.sleep(self.get_retry_delays_s[failures])
                    failures += 1
                    continue
                raise error from err
            if _is_auth_failure(resp):
                stale = headers.get("Authorization", "").removeprefix("Bearer ") or None
                if not refreshed and stale is not None:
                    refreshed = True
                    self.auth.refresh("management", stale_key=stale)
                    continue
                raise AuthError(
                    f"TorchServe's management API at {self.url} refused the management key "
                    f"from {self.auth.key_file or 'no key file'} ({_error_message(resp)}); pass "
                    "key_file= or set BRAY_KEY_FILE to the key_file.json in that server's working "
                    "directory",
                    status=resp.status_code, key_file=str(self.auth.key_file) if self.auth.key_file else None,
                )
            if (resp.status_code in _RETRY_STATUSES and method == "GET"
                    and failures < len(self.get_retry_delays_s)):
                time.sleep(self.get_retry_delays_s[failures])
                failures += 1
                continue
            if resp.status_code >= 400:
                raise self._error(resp, method=method, path=path, what=what)
            return resp

    def _error(self, resp: requests.Response, *, method: str, path: str, what: str) -> ServerError:
        status = resp.status_code
        message = _error_message(resp)
        ts_type = _error_type(resp)
        where = what or f"{method} {path}"
        if status == 404 and "does not match any allowed URL" in message:
            return ManagementError(
                f"{where}: TorchServe refused the archive URL ({message}); the bundled config "
                "only registers archives by name from the model store: copy the .mar into the "
                "model store (bray-archive does) and register it by file name",
                status=status, ts_type=ts_type,
            )
        if status == 404:
            return ModelNotFoundError(f"{where}: {message}", status=status, ts_type=ts_type)
        if status == 409:
            return VersionExistsError(
                f"{where}: {message}; register it under another version or unregister the old one first",
                status=status, ts_type=ts_type,
            )
        if status == 405:
            return ModelApiDisabledError(
                f"{where}: TorchServe's model API is disabled ({message}); enable it with "
                "enable_model_api=true in config.properties (the bundled one, which bray-archive "
                "server start uses, has it) or `torchserve --start --enable-model-api`",
                status=status, ts_type=ts_type,
            )
        if status == 403 and (ts_type == "InvalidModelVersionException" or method == "DELETE"):
            return ManagementError(
                f"{where}: {message}; make another version the default first "
                "(set_default) or unregister the other versions",
                status=status, ts_type=ts_type,
            )
        return ManagementError(f"{where}: TorchServe answered {status}: {message}",
                               status=status, ts_type=ts_type)

    @staticmethod
    def _path(name: str, version: str | None = None) -> str:
        if not name:
            raise ConfigError("model name must be a non-empty string")
        path = f"/models/{quote(name, safe='')}"
        if version is not None:
            if not str(version):
                raise ConfigError("version must be a non-empty string or None")
            path += f"/{quote(str(version), safe='')}"
        return path

    # -- API ----------------------------------------------------------------------------

    def register(self, mar: str, *, model_name: str | None = None, initial_workers: int = 1,
                 batch_size: int | None = None, max_batch_delay_ms: int | None = None,
                 response_timeout_s: int | None = None, synchronous: bool = True) -> dict:
        """Register an archive from the model store (``POST /models``).

        Args:
            mar: the ``.mar`` file name in the server's model store (or a URL that
                ``allowed_urls`` permits).
            model_name: overrides the name recorded in the archive.
            initial_workers: workers started now (0: none until :meth:`scale`).
            batch_size: TorchServe's server-side batch size.
            max_batch_delay_ms: how long TorchServe waits to fill a batch.
            response_timeout_s: per-batch worker timeout.
            synchronous: return only once the workers are up.

        Returns:
            TorchServe's JSON answer (``{"status": "..."}``).

        Raises:
            ConfigError: a negative or zero option.
            VersionExistsError: that name and version are already registered.
            ModelNotFoundError: no such archive in the model store.
            ModelApiDisabledError: registration is turned off on the server.
            ManagementError: any other refusal (URL not allowed, handler failed to load...).
        """
        if initial_workers < 0:
            raise ConfigError(f"initial_workers must be >= 0, got {initial_workers}")
        params: dict[str, Any] = {"url": mar, "initial_workers": initial_workers,
                                  "synchronous": str(synchronous).lower()}
        if model_name is not None:
            params["model_name"] = model_name
        for key, value, low in (("batch_size", batch_size, 1), ("max_batch_delay", max_batch_delay_ms, 0),
                                ("response_timeout", response_timeout_s, 1)):
            if value is not None:
                if value < low:
                    raise ConfigError(f"{key} must be >= {low}, got {value}")
                params[key] = value
        resp = self._request("POST", "/models", params=params, what=f"registering {mar}")
        return resp.json() if resp.content.strip() else {}

    def list_models(self) -> list[str]:
        """Names of all registered models (every page of ``GET /models``)."""
        names: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": self.page_size}
            if token:
                params["next_page_token"] = token
            body = self._request("GET", "/models", params=params, what="listing models").json()
            names.extend(str(m["modelName"]) for m in body.get("models", []))
            token = body.get("nextPageToken")
            if not token:
                return names

    def _describe_raw(self, name: str, version: str | None) -> list[dict[str, Any]]:
        what = f"describing {name}" + (f" version {version}" if version else "")
        body = self._request("GET", self._path(name, version), what=what).json()
        return body if isinstance(body, list) else [body]

    def describe(self, name: str, version: str | None = None) -> list[ModelVersion]:
        """Describe one version, or every version when ``version`` is ``None``.

        Raises:
            ModelNotFoundError: no such model or version.
        """
        raws = self._describe_raw(name, version if version is not None else "all")
        # Only "GET /models/<name>" (no version) says which version is the default.
        default = self._describe_raw(name, None)[0].get("modelVersion")
        return [ModelVersion.from_describe(r, is_default=r.get("modelVersion") == default) for r in raws]

    def versions(self, name: str) -> list[ModelVersion]:
        """Every registered version of ``name``.

        Raises:
            ModelNotFoundError: no such model.
        """
        return self.describe(name)

    def default_version(self, name: str) -> ModelVersion:
        """The version ``/predictions/<name>`` serves.

        Raises:
            ModelNotFoundError: no such model.
        """
        return ModelVersion.from_describe(self._describe_raw(name, None)[0], is_default=True)

    def set_default(self, name: str, version: str) -> None:
        """Make ``version`` the one ``/predictions/<name>`` serves.

        Raises:
            ModelNotFoundError: no such model or version.
        """
        self._request("PUT", self._path(name, version) + "/set-default",
                      what=f"making {name} version {version} the default")

    def scale(self, name: str, *, version: str | None = None, min_workers: int,
              max_workers: int | None = None, synchronous: bool = True,
              timeout_s: float | None = None) -> None:
        """Set the worker count of one version (the default one when ``version`` is ``None``).

        Args:
            min_workers: workers to keep running.
            max_workers: upper bound (default ``min_workers``).
            synchronous: return once the workers are started or stopped.
            timeout_s: how long a stopping worker may finish its pending requests
                (TorchServe's ``timeout``; 0 stops at once; default: wait for them).

        Raises:
            ConfigError: negative counts or ``max_workers < min_workers``.
            ModelNotFoundError: no such model or version.
        """
        max_workers = min_workers if max_workers is None else max_workers
        if min_workers < 0 or max_workers < min_workers:
            raise ConfigError(
                f"need 0 <= min_workers <= max_workers, got min_workers={min_workers}, max_workers={max_workers}"
            )
        params: dict[str, Any] = {"min_worker": min_workers, "max_worker": max_workers,
                                  "synchronous": str(synchronous).lower()}
        if timeout_s is not None:
            params["timeout"] = int(timeout_s)
        self._request("PUT", self._path(name, version), params=params,
                      timeout_s=max(self.timeout_s, (timeout_s or 0) + self.timeout_s),
                      what=f"scaling {name}" + (f" version {version}" if version else ""))

    def unregister(self, name: str, version: str | None = None) -> None:
        """Unregister one version, or every version when ``version`` is ``None``.

        With ``None`` the non-default versions go first and the default last, because
        TorchServe refuses to drop the default while other versions exist.

        Raises:
            ModelNotFoundError: no such model or version.
            ManagementError: the default version while others exist (set another default first).
        """
        if version is not None:
            self._request("DELETE", self._path(name, version),
                          what=f"unregistering {name} version {version}")
            return
        ordered = sorted(self.versions(name), key=lambda v: v.is_default)
        for v in ordered:
            self._request("DELETE", self._path(name, v.version),
                          what=f"unregistering {name} version {v.version}")

    def wait_ready(self, name: str, version: str | None = None, *, timeout_s: float = 120.0,
                   min_ready: int | None = None, poll_s: float = 0.2) -> ModelVersion:
        """Wait until the version's workers are READY.

        Args:
            version: ``None`` for the default version.
            timeout_s: give up after this long.
            min_ready: READY workers needed; default every worker and at least ``minWorkers``.
            poll_s: pause between polls.

        Returns:
            The version as last described.

        Raises:
            BrayTimeoutError: not ready in time (the message gives the last worker states).
            ModelNotFoundError: no such model or version.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if version is None:
                mv = self.default_version(name)
            else:
                mv = ModelVersion.from_describe(self._describe_raw(name, version)[0], is_default=False)
            if min_ready is not None:
                ready = mv.ready_workers >= min_ready
            else:
                ready = mv.ready_workers == mv.workers and mv.ready_workers >= mv.min_workers
            if ready:
                return mv if version is None else self.describe(name, version)[0]
            if time.monotonic() >= deadline:
                states = [w.get("status") for w in mv.raw.get("workers", [])]
                raise BrayTimeoutError(
                    f"{name} version {mv.version} not ready after {timeout_s} s: "
                    f"{mv.ready_workers} of {mv.workers} workers READY (states {states}, "
                    f"min_workers {mv.min_workers}); see model_log.log in the server's log directory",
                    timeout_s=timeout_s,
                )
            time.sleep(poll_s)
