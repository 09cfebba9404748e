"""The one error tree of bray-serve.

Every error raised on purpose by this package derives from :class:`BrayError`,
and also from the built-in it resembles, so ``except ValueError`` keeps working
for callers who do not know about bray::

    BrayError
    ├── ConfigError(ValueError)              an option or argument is invalid
    │   └── ModelOwnedError                  the name is served from another run's store
    ├── WireError(ValueError)                a NestedArray body cannot be decoded
    ├── InputError(ValueError)               decoded inputs do not fit the model
    ├── StoreError
    │   ├── StepConflictError(ValueError)    step not above the latest, or lost a race
    │   ├── StepNotFoundError(LookupError)   no such model or step in the store
    │   ├── CorruptCheckpointError(ValueError)  checksum, size or format mismatch
    │   └── StoreWriteError(OSError)         the disk refused the write (full, read-only)
    ├── EngineError(RuntimeError)            an engine failed to build, load or run
    │   └── EngineUnavailableError(ImportError)  optional engine or device missing
    ├── ServerError(ConnectionError)         talking to TorchServe failed
    │   ├── ServerUnreachableError           connection refused / no answer
    │   ├── AuthError(PermissionError)       401/403 from token authorization
    │   ├── NotServedError(LookupError)      a prediction's 404: no such model or version there
    │   └── ManagementError                  the management API answered an error
    │       ├── ModelNotFoundError(LookupError)   404
    │       ├── VersionExistsError           409
    │       └── ModelApiDisabledError        405, registration API turned off
    ├── BatchMismatchError(RuntimeError)     an answer with another number of rows than asked
    ├── ProxyUnavailableError(ConnectionError)  the node proxy cannot be reached or went away
    └── BrayTimeoutError(TimeoutError)       a bounded wait ran out

All errors pickle (they cross TorchServe worker processes and multiprocessing
pools): extra attributes are passed through ``__reduce__``. The attributes a class
carries are declared on it with their defaults, so callers read ``err.status``, never
``getattr(err, "status", ...)``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "BatchMismatchError",
    "BrayError",
    "BrayTimeoutError",
    "ConfigError",
    "CorruptCheckpointError",
    "EngineError",
    "EngineUnavailableError",
    "InputError",
    "ManagementError",
    "ModelApiDisabledError",
    "ModelNotFoundError",
    "ModelOwnedError",
    "NotServedError",
    "ProxyUnavailableError",
    "ServerError",
    "ServerUnreachableError",
    "StepConflictError",
    "StepNotFoundError",
    "StoreError",
    "StoreWriteError",
    "VersionExistsError",
    "WireError",
]


class BrayError(Exception):
    """Root of every error bray-serve raises on purpose."""

    def __init__(self, message: str = "", **attrs: Any) -> None:
        super().__init__(message)
        self._attrs = attrs
        for key, value in attrs.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's default reduce drops keyword-only state; keep it.
        return (_rebuild, (type(self), str(self), self._attrs))

    @property
    def message(self) -> str:
        return str(self)

    @property
    def attrs(self) -> dict[str, Any]:
        """The keyword attributes it was made with (to make another error of the same facts)."""
        return dict(self._attrs)


def _rebuild(cls: type[BrayError], message: str, attrs: dict[str, Any]) -> BrayError:
    return cls(message, **attrs)


class ConfigError(BrayError, ValueError):
    """An option, argument or environment variable has an invalid value.

    Attributes: ``path``, the file the value came from or is about, where there is one.
    """

    path: str | None = None


class ModelOwnedError(ConfigError):
    """The TorchServe model name is already served from another checkpoint store.

    TorchServe's model names are global to a server, while stores are per project and
    trial: a second run registering the same name would make the first run's callers
    get its weights. Attributes: ``name``, ``url`` (the management address), ``owner``
    (the store the registered model serves), ``store`` (the one refused).
    """

    name: str
    url: str
    owner: str
    store: str


class WireError(BrayError, ValueError):
    """A NestedArray body (binary or JSON) is malformed or over the limits.

    Attributes: ``status``, the HTTP status a server answers it with (413 over a limit).
    """

    status: int = 400


class InputError(BrayError, ValueError):
    """Decoded inputs do not match what the model takes (shape, dtype, count).

    Attributes: ``status``, the HTTP status it is (or was) answered with.
    """

    status: int = 400


class StoreError(BrayError):
    """The checkpoint store could not do what was asked.

    Attributes: ``name`` and ``step``, the model and step concerned, where known.
    """

    name: str | None = None
    step: int | None = None


class StepConflictError(StoreError, ValueError):
    """A step was not greater than the latest, or another publisher took it first.

    Attributes: ``name``, ``step`` (asked), ``latest`` (what the store holds).
    """

    latest: int | None = None


class StepNotFoundError(StoreError, LookupError):
    """No such model, or no kept step at or below the one asked for."""


class CorruptCheckpointError(StoreError, ValueError):
    """A stored step fails its checksum, size or format check."""


class StoreWriteError(StoreError, OSError):
    """The file system refused a write (disk full, read-only, permissions)."""


class EngineError(BrayError, RuntimeError):
    """An engine failed to build, load weights or run."""


class EngineUnavailableError(EngineError, ImportError):
    """The engine needs an optional package or a device that is not here."""


class ServerError(BrayError, ConnectionError):
    """A call to TorchServe failed.

    Attributes: ``status``, the HTTP status when there was one; ``url``, the server;
    ``reason``, how a connection failed (``refused``, ``reset``, ... see
    :func:`bray.torchserve.answers.connection_failure`), ``""`` for an answer.
    """

    status: int | None = None
    url: str | None = None
    reason: str = ""


class ServerUnreachableError(ServerError):
    """TorchServe did not accept the connection (not started, wrong address)."""


class AuthError(ServerError, PermissionError):
    """Token authorization refused the call (missing, wrong or expired key).

    Attributes: ``key_file``, the key file whose key was refused, where there was one.
    """

    key_file: str | None = None


class NotServedError(ServerError, LookupError):
    """A prediction was answered 404: the model or version is not registered on that node.

    The inference API's answer, not the management API's (:class:`ModelNotFoundError`):
    a restarted server has forgotten its models, or the name or version is wrong.
    """


class ManagementError(ServerError):
    """The management API answered with an error status.

    Attributes: ``ts_type``, TorchServe's exception type from the answer's body.
    """

    ts_type: str = ""


class ModelNotFoundError(ManagementError, LookupError):
    """The model or version is not registered."""


class VersionExistsError(ManagementError):
    """That version of the model is already registered."""


class ModelApiDisabledError(ManagementError):
    """The server runs with the model-registration API turned off."""


class BatchMismatchError(BrayError, RuntimeError):
    """The server answered a coalesced request with another number of rows than it was sent."""


class ProxyUnavailableError(BrayError, ConnectionError):
    """The node proxy could not be reached, refused this caller, or went away mid-call.

    Attributes: ``starting``, no proxy serves the model yet and one is being started.
    """

    starting: bool = False


class BrayTimeoutError(BrayError, TimeoutError):
    """A bounded wait ran out before the condition held.

    Attributes: ``timeout_s``, the limit; ``url`` and ``reason`` for a connection's wait.
    """

    timeout_s: float | None = None
    url: str | None = None
    reason: str = ""
