"""Engines, one module each, chosen by name from explicit config: the one engine registry.

:data:`ENGINES` names every engine and the module and class it maps to; the serving
options (``bray.handlers.options.ServingOptions``), the CLI's ``--engine`` choices and
``RemoteModel`` all ask it. ``get_engine("torch" | "onnx" | "tensorrt")`` returns the
class. Importing this package is cheap (no numpy, no engine package): ``Engine`` and
``EngineOptions`` resolve on first use, and heavy packages are imported only when an
engine is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bray._lazy import lazy_exports
from bray.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from bray.handlers.engines.base import Engine, EngineOptions

__all__ = ["ENGINES", "Engine", "EngineOptions", "get_engine"]

# name -> (module, class); the first one is the default engine
ENGINES: dict[str, tuple[str, str]] = {
    "torch": ("bray.handlers.engines.torch", "TorchEngine"),
    "onnx": ("bray.handlers.engines.onnx", "OnnxEngine"),
    "tensorrt": ("bray.handlers.engines.tensorrt", "TensorRTEngine"),
}


def get_engine(name: str) -> type[Engine]:
    """The engine class for ``name``.

    Raises:
        ConfigError: unknown engine name.
    """
    try:
        module, cls = ENGINES[name]
    except KeyError:
        raise ConfigError(f"unknown engine {name!r}; choose one of {list(ENGINES)}") from None
    engine: type[Engine] = getattr(importlib.import_module(module), cls)
    return engine


__getattr__, __dir__ = lazy_exports(
    __name__, {"Engine": "bray.handlers.engines.base", "EngineOptions": "bray.handlers.engines.base"}, __all__)
