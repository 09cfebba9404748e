"""Engines, one module each, chosen by name from explicit config.

``get_engine("torch" | "onnx" | "tensorrt")`` returns the class; heavy packages are
imported only when the engine is loaded.
"""

from __future__ import annotations

import importlib

from bray.errors import ConfigError
from bray.handlers.engines.base import Engine, EngineOptions

__all__ = ["ENGINES", "Engine", "EngineOptions", "get_engine"]

# name -> (module, class)
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
        raise ConfigError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}") from None
    return getattr(importlib.import_module(module), cls)
