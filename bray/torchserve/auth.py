"""TorchServe's token authorization: the key file, ``Authorization`` headers, key refresh.

TorchServe 0.12 facts this module relies on (checked against the 0.12.0 frontend):

- With token authorization on, the server writes ``key_file.json`` into its working
  directory at each start::

      {"management": {"key": "...", "expiration time": "2024-...Z"},
       "inference":  {"key": "...", "expiration time": "..."},
       "API":        {"key": "..."}}

  Calls send ``Authorization: Bearer <key>``; a refused key is answered 400
  ``InvalidKeyException`` (:func:`bray.torchserve.answers.key_refused`). Keys expire
  after 60 minutes by default.
- ``GET <management>/token?type=management|inference`` with the API key regenerates that
  key; the new key is only written to the key file (the response body is empty), so
  refreshing needs the server's own key file (same machine or a shared file system).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Literal, Mapping

import requests

from bray.locations import find_key_file, server_dir
from bray.errors import AuthError, ConfigError
from bray.torchserve.answers import connection_error, error_message

__all__ = ["InferenceKeyPlugin", "KeyKind", "TokenAuth", "bearer_key"]

KeyKind = Literal["inference", "management"]
_KINDS = ("inference", "management")


def bearer_key(headers: Mapping[str, str]) -> str | None:
    """The key an ``Authorization: Bearer <key>`` header sent (``None`` without one)."""
    return headers.get("Authorization", "").removeprefix("Bearer ") or None


class TokenAuth:
    """Reads TorchServe's ``key_file.json`` and hands out ``Authorization`` headers.

    The file is re-read whenever it changes on disk (the server rewrites it at each start
    and at each refresh), so one ``TokenAuth`` outlives server restarts. Thread-safe.

    Args:
        key_file: path of ``key_file.json``; ``None`` looks where
            :func:`bray.locations.find_key_file` looks, at each use until found.
        management_url: the management API, where expired keys are regenerated.
        session: the HTTP session for refreshes (a test mounts a transport adapter on
            one); default one made on the first refresh, closed by :meth:`close`. A
            session given here is the caller's to close.
        recheck_s: look at the file (a ``stat``, a read when it changed) at most this
            often; ``0``: at every use. For a caller that refreshes a refused key (which
            reads the file at once), so a rewritten file costs it at most one refused
            call; the inference client's, where a ``stat`` per call was ~2 µs of ~20.
    """

    def __init__(self, key_file: str | Path | None, *, management_url: str,
                 session: requests.Session | None = None, recheck_s: float = 0.0) -> None:
        self._explicit = Path(key_file) if key_file is not None else None
        self.management_url = management_url.rstrip("/")
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self.recheck_s = recheck_s
        self._recheck_at = 0.0  # time.monotonic() after which key() looks at the file again
        self._path: Path | None = None
        self._session: requests.Session | None = session
        self._owns_session = session is None

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
            now = time.monotonic()
            if now >= self._recheck_at:
                self._load_locked()
                self._recheck_at = now + self.recheck_s
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
            AuthError: no key file, the server refused the API key, or there is no
                management API to ask (``management_url`` empty).
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
            if not self.management_url:
                # Another machine's node (BRAY_MANAGEMENT_URL=none): looping on a refused key
                # would only end at the caller's timeout, with no word of the key.
                raise AuthError(
                    f"TorchServe refused the {kind} key from {self._path}, and no management API is "
                    "reachable from here to regenerate it (BRAY_MANAGEMENT_URL is 'none' for this node); "
                    "check that BRAY_KEY_FILE names each node's own key_file.json in BRAY_INFERENCE_URL's "
                    "order, or regenerate an expired key on the server node",
                    status=None, key_file=str(self._path),
                )
            url = f"{self.management_url}/token"
            if self._session is None:
                self._session = requests.Session()
                self._owns_session = True
            try:
                resp = self._session.get(
                    url, params={"type": kind},
                    headers={"Authorization": f"Bearer {self._keys['API']}"}, timeout=timeout_s,
                )
            except requests.RequestException as err:
                raise connection_error(err, url=self.management_url, action=f"refreshing the {kind} key",
                                       timeout_s=timeout_s) from err
            if resp.status_code != 200:
                message = error_message(resp.content, resp.reason or "")
                raise AuthError(
                    f"TorchServe refused to regenerate the {kind} key with the API key from "
                    f"{self._path} ({resp.status_code}: {message}); the key file "
                    "probably belongs to another server run; point key_file / BRAY_KEY_FILE at "
                    "the key_file.json in this server's working directory",
                    status=resp.status_code, key_file=str(self._path),
                )
            self._stamp = None
            self._load_locked()

    def close(self) -> None:
        """Close the HTTP session made for refreshes (not one given to the constructor)."""
        if self._session is not None and self._owns_session:
            self._session.close()
            self._session = None



class InferenceKeyPlugin:
    """A ``tritonclient`` plugin that sends TorchServe's inference key with every call.

    TorchServe refuses a call without the key before the handler runs, answering its own
    JSON (``{"code": 400, "type": "InvalidKeyException", "message": ...}``), not the
    ``{"error": ...}`` that ``tritonclient`` reads: its exception then says only ``an
    exception occurred in the client while decoding the response: 'error'``, with
    TorchServe's body after it. Register this plugin and every call carries the key::

        client = tritonclient.http.InferenceServerClient("127.0.0.1:8080")
        client.register_plugin(InferenceKeyPlugin())   # or key_file="~/.bray/server/key_file.json"

    The key file is re-read whenever it changes (the server rewrites it at each start and
    at each key refresh), so the plugin outlives restarts. It does not regenerate an
    expired key itself: keys last 60 minutes by default, and a ``RemoteModel`` or
    ``bray-archive`` command on the same server refreshes them.

    Args:
        key_file: TorchServe's ``key_file.json``; ``None`` looks where
            :func:`bray.locations.find_key_file` looks (``BRAY_KEY_FILE``,
            ``./key_file.json``, ``~/.bray/server/key_file.json``), at each call until found.

    Raises (at the call):
        AuthError: no key file is found, or it cannot be read (the message says where
            it looked and what to pass); the request is not sent.
    """

    def __init__(self, *, key_file: str | Path | None = None) -> None:
        self._auth = TokenAuth(Path(key_file).expanduser() if key_file is not None else None,
                               management_url="")  # never refreshes, so no management API

    def __call__(self, request: Any) -> None:
        """Add ``Authorization: Bearer <inference key>`` to ``request.headers`` (tritonclient's hook)."""
        headers = self._auth.headers("inference")
        if not headers:
            raise AuthError(
                "no TorchServe key file found, so the call would carry no inference key and "
                f"TorchServe would refuse it (looked at BRAY_KEY_FILE, {Path.cwd() / 'key_file.json'} "
                f"and {server_dir() / 'key_file.json'}); pass InferenceKeyPlugin(key_file=...) the "
                "key_file.json in the server's working directory, or set BRAY_KEY_FILE",
                status=None, key_file=None,
            )
        request.headers = {**(request.headers or {}), **headers}
