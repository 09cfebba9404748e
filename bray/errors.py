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
    │   └── ManagementError                  the management API answered an error
    │       ├── ModelNotFoundError(LookupError)   404
    │       ├── VersionExistsError           409
    │       └── ModelApiDisabledError        405, registration API turned off
    └── BrayTimeoutError(TimeoutError)       a bounded wait ran out

All errors pickle (they cross TorchServe worker processes and multiprocessing
pools): extra attributes are passed through ``__reduce__``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
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


def _rebuild(cls: type[BrayError], message: str, attrs: dict[str, Any]) -> BrayError:
    return cls(message, **attrs)


class ConfigError(BrayError, ValueError):
    """An option, argument or environment variable has an invalid value."""


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
    """A NestedArray body (binary or JSON) is malformed or over the limits."""


class InputError(BrayError, ValueError):
    """Decoded inputs do not match what the model takes (shape, dtype, count)."""


class StoreError(BrayError):
    """The checkpoint store could not do what was asked."""


class StepConflictError(StoreError, ValueError):
    """A step was not greater than the latest, or another publisher took it first.

    Attributes: ``name``, ``step`` (asked), ``latest`` (what the store holds).
    """


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
    """A call to TorchServe failed. ``status`` is the HTTP status when there was one."""


class ServerUnreachableError(ServerError):
    """TorchServe did not accept the connection (not started, wrong address)."""


class AuthError(ServerError, PermissionError):
    """Token authorization refused the call (missing, wrong or expired key)."""


class ManagementError(ServerError):
    """The management API answered with an error status."""


class ModelNotFoundError(ManagementError, LookupError):
    """The model or version is not registered."""


class VersionExistsError(ManagementError):
    """That version of the model is already registered."""


class ModelApiDisabledError(ManagementError):
    """The server runs with the model-registration API turned off."""


class BrayTimeoutError(BrayError, TimeoutError):
    """A bounded wait ran out before the condition held."""
