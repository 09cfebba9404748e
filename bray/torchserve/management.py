"""The one client for TorchServe's management API, shared by ``bray-archive`` and the bridge.

Register, describe, scale, set-default and unregister model versions; token authorization
through :class:`~bray.torchserve.auth.TokenAuth`, answers mapped to errors by
:func:`~bray.torchserve.answers.answer_error`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from bray.locations import Locations, check_url
from bray.errors import BrayError, BrayTimeoutError, ConfigError
from bray.torchserve.answers import answer_error, connection_error, key_refused
from bray.torchserve.auth import TokenAuth, bearer_key

__all__ = ["ManagementClient", "ModelVersion"]

# Answers worth asking a GET again for: a gateway in between or a server restarting.
_RETRY_STATUSES = frozenset({502, 503, 504})


def _transient(error: BrayError) -> bool:
    """A dropped connection, which a moment may cure.

    Not "refused" (almost always a server that is not started: say so at once), not
    timeouts (each try already waited the whole timeout), not a name that does not resolve.
    """
    return getattr(error, "reason", "") == "reset"


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
        key_file: TorchServe's ``key_file.json``; default as :func:`bray.locations.find_key_file`.
        timeout_s: per HTTP call (registration waits for the workers to start: be generous).
        session: the HTTP session to send every call with, key refreshes included (a test
            mounts a transport adapter on one); default a new one. :meth:`close` closes it.

    Raises:
        ConfigError: a malformed address or a non-positive timeout.
    """

    def __init__(self, url: str | None = None, *, key_file: str | Path | None = None,
                 timeout_s: float = 60.0, session: requests.Session | None = None) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if url is None:
            url = Locations.from_env().management_url
        check_url(url, what="management address", var="BRAY_MANAGEMENT_URL (or the url argument)",
                  example="http://127.0.0.1:8081")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = session if session is not None else requests.Session()
        self.auth = TokenAuth(key_file, management_url=self.url, session=self._session)
        self.page_size = 100  # models per GET /models page (TorchServe's limit parameter)
        # Pauses before asking a GET again after a dropped connection or a 502/503/504
        # (a proxy in between, a frontend restarting): two retries, 0.6 s in all.
        self.get_retry_delays_s: tuple[float, ...] = (0.1, 0.5)

    # -- plumbing -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP session (key refreshes use it too)."""
        self._session.close()

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
            if key_refused(resp.status_code, resp.content) and not refreshed and bearer_key(headers):
                refreshed = True
                self.auth.refresh("management", stale_key=bearer_key(headers))
                continue
            if (resp.status_code in _RETRY_STATUSES and method == "GET"
                    and failures < len(self.get_retry_delays_s)):
                time.sleep(self.get_retry_delays_s[failures])
                failures += 1
                continue
            if resp.status_code >= 400:
                raise answer_error(resp.status_code, resp.content, api="management", url=self.url, method=method,
                                   path=path, what=what, reason=resp.reason or "", key_file=self.auth.key_file)
            return resp

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
