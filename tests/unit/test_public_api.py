"""The public surface: explicit, sorted, resolvable, cheap to import, errors from one tree."""

from __future__ import annotations

import importlib
import inspect
import pickle
import subprocess
import sys

import pytest

import bray
from bray import errors

MODULES = ["bray", "bray.errors", "bray.store", "bray.league", "bray.wire", "bray.locations", "bray.export",
           "bray.torchserve", "bray.archiver", "bray.bridge", "bray.bridge.metrics", "bray.handlers.options",
           "bray.handlers.engines", "bray.handlers.metrics", "bray.handlers.request", "bray.handlers.oip",
           "bray.archiver.kserve", "bray.ts_config.probe", "bray.ts_config.server"]


@pytest.mark.parametrize("module", MODULES, ids=MODULES)
def test_all_is_sorted_and_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    names = list(mod.__all__)
    assert names == sorted(names), f"{module}.__all__ is not sorted"
    for name in names:
        assert getattr(mod, name) is not None


def test_errors_all_matches_the_classes_defined() -> None:
    defined = {n for n, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, errors.BrayError)}
    assert defined == set(errors.__all__)


def test_every_error_class_lives_in_the_one_tree() -> None:
    """A BrayError subclass defined in another module is outside the tree's docstring and this file's checks."""
    import pkgutil
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]
    modules = [f"{pkg}.{info.name}" for pkg in packages
               for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__)
               if not info.ispkg and info.name != "__main__"]
    assert "bray.bridge._slot" in modules and "bray.handlers.handler" in modules
    elsewhere = []
    for name in modules:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, errors.BrayError) and obj.__module__ == name != "bray.errors":
                elsewhere.append(f"{name}.{attr}")
    assert not elsewhere, f"errors defined outside bray/errors.py: {elsewhere}"


def test_error_attributes_are_declared_with_defaults() -> None:
    """Callers read ``err.status`` without ``getattr(err, "status", ...)``: the class declares it."""
    assert errors.InputError("x").status == 400
    assert errors.WireError("x").status == 400
    assert errors.ServerError("x").status is None and errors.ServerError("x").reason == ""
    assert errors.ProxyUnavailableError("x").starting is False
    assert errors.StepConflictError("x", latest=3).latest == 3
    assert issubclass(errors.NotServedError, errors.ServerError) and not issubclass(errors.NotServedError,
                                                                                    errors.ManagementError)


@pytest.mark.parametrize("name", errors.__all__, ids=errors.__all__)
def test_every_error_is_a_bray_error_and_pickles_with_its_attributes(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.BrayError)
    err = cls("something was wrong; do this", status=409, name="policy")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err)
    assert back.status == 409 and back.name == "policy"


@pytest.mark.parametrize(("cls", "builtin"), [
    (errors.ConfigError, ValueError), (errors.WireError, ValueError), (errors.InputError, ValueError),
    (errors.StepConflictError, ValueError), (errors.StepNotFoundError, LookupError), (errors.StoreWriteError, OSError),
    (errors.EngineUnavailableError, ImportError), (errors.ServerUnreachableError, ConnectionError),
    (errors.AuthError, PermissionError), (errors.BrayTimeoutError, TimeoutError),
], ids=lambda x: x.__name__)
def test_errors_inherit_the_matching_builtin(cls: type, builtin: type) -> None:
    assert issubclass(cls, builtin)


def test_import_bray_is_cheap_and_has_no_side_effects() -> None:
    code = ("import sys, threading; import bray; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'aiohttp' not in sys.modules, 'aiohttp imported'; "
            "assert threading.active_count() == 1, 'a thread was started'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_front_door() -> None:
    from bray import RemoteModel, init

    assert RemoteModel.__module__ == "bray.bridge.remote_model"
    assert callable(init)
    with pytest.raises(AttributeError, match="no attribute"):
        bray.NotAThing  # noqa: B018
