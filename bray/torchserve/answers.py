"""The one mapping from what TorchServe answered (or why it could not be reached) to a bray error.

Both clients raise through here: :class:`~bray.torchserve.management.ManagementClient`
(requests) and :class:`~bray.torchserve.inference.InferenceClient` (its HTTP/1.1 session,
or aiohttp's), and the
launcher's ping asks :func:`key_refused`.

TorchServe 0.12 facts this module relies on (checked against the 0.12.0 frontend):

- Error bodies are JSON ``{"code": ..., "type": "...Exception", "message": "..."}``.
- A missing, wrong or expired key is answered with **400** (403 on some paths) and
  ``"type": "InvalidKeyException"``, not 401.
- A URL that ``allowed_urls`` refuses is answered 404 "Given URL ... does not match any
  allowed URL(s)"; a name missing from the model store 404 "Model not found at: ...".
- The management API answers 405 when model registration is disabled, 409 for a version
  that exists, 403 ``InvalidModelVersionException`` for dropping the default version
  while others exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from bray.errors import (
    AuthError,
    BrayError,
    BrayTimeoutError,
    InputError,
    ManagementError,
    ModelApiDisabledError,
    ModelNotFoundError,
    NotServedError,
    ServerError,
    ServerUnreachableError,
    VersionExistsError,
)

__all__ = ["START_HINT", "answer_error", "broken_connection_error", "connection_error", "connection_failure",
           "error_message", "error_type", "key_refused", "unreachable_error"]

Api = Literal["inference", "management"]

START_HINT = "is the server running? start it with: bray-archive server start"

# connection_failure() kinds as the messages say them.
_FAILURE_TEXT = {"name": "name not resolved", "refused": "connection refused", "connect-timeout": "connect timed out",
                "read-timeout": "read timed out", "reset": "connection reset", "unreachable": "host unreachable"}


# --- why a connection failed -----------------------------------------------------------

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

    Works on requests/urllib3, aiohttp and :mod:`bray.torchserve.http1` exceptions alike,
    by walking down to the socket error underneath.

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
    said = _FAILURE_TEXT.get(kind, "")
    if kind == "connect-timeout":
        return BrayTimeoutError(
            f"{url} did not accept a connection within {timeout_s} s ({action}: {said}); "
            f"a firewall may be dropping packets or the host is down: check the address in {var}",
            timeout_s=timeout_s, reason=kind, url=url)
    if kind == "read-timeout":
        return BrayTimeoutError(
            f"TorchServe at {url} accepted the connection but did not answer {action} within "
            f"{timeout_s} s ({said}); the server may be stuck or busy: raise the timeout "
            "(--timeout-s, timeout_s=) or look at logs/ts_log.log in its working directory",
            timeout_s=timeout_s, reason=kind, url=url)
    text = {
        "name": f"cannot resolve the host name {host!r} of {url} ({said}); "
                f"check the address in {var}",
        "refused": f"nothing listens at {url} ({action}: {said}); {START_HINT}, "
                   f"or set {var} to where it listens",
        "reset": f"{url} dropped the connection during {action} ({said}); the server may "
                 "have crashed or restarted, or what listens there is not TorchServe's API: check "
                 "`bray-archive server status` and logs/ts_log.log in its working directory",
        "unreachable": f"no route to {host} for {url} ({action}: {said}); check the "
                       f"address in {var} and the network",
    }.get(kind, f"cannot reach {url} ({action}: {err}); {START_HINT}, or check {var}")
    return ServerUnreachableError(text, status=None, url=url, reason=kind)


def unreachable_error(why: Mapping[str, str], *, urls: Sequence[str], waited_s: float) -> ServerUnreachableError:
    """No inference node accepted a connection for ``waited_s``.

    Args:
        why: url -> :func:`connection_failure` of its last failed attempt.
        urls: every node, in order (a node missing from ``why`` is said as "no answer").
        waited_s: how long the client kept trying.
    """
    seen = ", ".join(f"{u}: {_FAILURE_TEXT.get(why.get(u, ''), 'no answer')}" for u in urls)
    return ServerUnreachableError(
        f"no TorchServe node accepted a connection for {waited_s:.0f} s "
        f"({seen}); {START_HINT}, or check BRAY_INFERENCE_URL",
        status=None, reason="mixed" if len(set(why.values())) > 1 else next(iter(why.values()), "other"),
    )


def broken_connection_error(err: BaseException, *, url: str, path: str, attempts: int) -> ServerError:
    """The connection to ``url`` broke on every one of ``attempts`` tries of ``path``."""
    kind = connection_failure(err)
    return ServerError(f"the connection to {url} broke {attempts} times during {path} "
                       f"(last: {_FAILURE_TEXT.get(kind, str(err) or type(err).__name__)}); "
                       "see logs/ts_log.log in the server's working directory",
                       status=None, reason=kind)


# --- what TorchServe answered ----------------------------------------------------------

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
    inference client and the launcher's ping.
    """
    if status == 401:
        return True
    return status in (400, 403) and _json_body(data).get("type") == "InvalidKeyException"


def error_message(data: bytes | str, reason: str = "") -> str:
    """TorchServe's ``message`` from an error body, else the start of the body (else ``reason``)."""
    message = _json_body(data).get("message")
    if message:
        return str(message)
    text = (data.decode("utf-8", "replace") if isinstance(data, bytes) else data).strip()
    return text[:500] if text else reason or "no message"


def error_type(data: bytes | str) -> str:
    """TorchServe's exception ``type`` from an error body (``""`` when it has none)."""
    return str(_json_body(data).get("type", ""))


def answer_error(status: int, data: bytes | str, *, api: Api, url: str, method: str, path: str,
                 what: str = "", reason: str = "", key_file: str | Path | None = None) -> BrayError:
    """The error for an answer of ``status`` (>= 400) from TorchServe's inference or management API.

    Args:
        status: the HTTP status.
        data: the answer's body.
        api: which API answered ("inference": a prediction; "management": the rest).
        url: the server address (the node, for inference).
        method, path: the request ("POST", "/predictions/policy").
        what: what was being done, for management messages ("registering policy-3.mar");
            default ``"<method> <path>"``.
        reason: the HTTP reason phrase, said when the body is empty.
        key_file: the key file whose key was sent (named when the key is refused).

    Returns:
        :class:`AuthError` for a refused key (whichever the API); for inference
        :class:`NotServedError` (404), :class:`InputError` (400, 413, 422, 424) or
        :class:`ServerError`; for management :class:`ModelNotFoundError` (404),
        :class:`VersionExistsError` (409), :class:`ModelApiDisabledError` (405) or
        :class:`ManagementError` (a refused archive URL, the default version, the rest).
    """
    message = error_message(data, reason)
    if key_refused(status, data):
        if api == "inference":
            return AuthError(f"TorchServe at {url} refused the inference key ({status}: {message}); "
                             "check BRAY_KEY_FILE points at this server's key_file.json (several nodes: one key "
                             "file per address, comma-separated in BRAY_INFERENCE_URL's order)", status=status)
        return AuthError(
            f"TorchServe's management API at {url} refused the management key "
            f"from {key_file or 'no key file'} ({message}); pass "
            "key_file= or set BRAY_KEY_FILE to the key_file.json in that server's working "
            "directory",
            status=status, key_file=str(key_file) if key_file else None,
        )
    if api == "inference":
        if status == 404 and error_type(data) == "InputError":  # the handler's: no such weight set
            return InputError(f"the server refused the request ({status}): {message}", status=status)
        if status == 404:
            return NotServedError(f"{path} is not served at {url}: {message}", status=status, url=url)
        if status in (400, 413, 422, 424):  # 424: a segment of a request in segments failed (the handler's)
            return InputError(f"the server refused the request ({status}): {message}", status=status)
        return ServerError(f"{path} failed at {url} with {status}: {message}", status=status)
    ts_type = error_type(data)
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
