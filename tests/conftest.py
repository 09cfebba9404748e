"""Shared fixtures: path-based markers, GPU skipping, real TorchServe instances.

- Tests under ``tests/unit``, ``tests/integration`` and ``tests/e2e`` get the marker of
  that name, so ``pytest -m unit`` needs no decorator in the test files.
- ``@pytest.mark.gpu`` tests (and those using the ``cuda_device`` fixture) are skipped
  with "needs a CUDA GPU; none found" where torch sees no CUDA device.
- ``torchserve`` is one server for the whole session; ``torchserve_factory`` starts more
  (stopped at the end of the test). Both use the bundled config on loopback with free
  ports, and their own working directory under pytest's temporary directory.
- When a test that used a server fails, its report gets the log directory and the last
  lines of torchserve.out, ts_log.log and model_log.log (the files stay under pytest's
  basetemp, which pytest keeps for the last three runs).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from bray.torchserve.launcher import TorchServeProcess, start_torchserve

_TIERS = ("unit", "integration", "e2e")
GPU_SKIP_REASON = "needs a CUDA GPU; none found"


def pytest_configure(config: pytest.Config) -> None:
    # RemoteModel's node proxy is on by default; tests that are not about it call TorchServe
    # directly, so no proxy process of theirs outlives them. Tests of the proxy ask for it
    # (node_proxy=True), and test_node_proxy.py checks the default itself.
    os.environ.setdefault("BRAY_NODE_PROXY", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).resolve().parent
    for item in items:
        try:
            rel = Path(str(item.fspath)).resolve().relative_to(root)
        except ValueError:
            continue
        if rel.parts and rel.parts[0] in _TIERS:
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when torch sees a CUDA device (torch imported on first call only)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def skip_without_gpu() -> None:
    """Skip the calling test unless a CUDA GPU is available."""
    if not cuda_available():
        pytest.skip(GPU_SKIP_REASON)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        skip_without_gpu()


@pytest.fixture
def cuda_device() -> str:
    """``"cuda"``, or skip the test where there is no CUDA GPU."""
    skip_without_gpu()
    return "cuda"


# -- TorchServe -------------------------------------------------------------------------


def _require_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if not (shutil.which("java") or (java_home and Path(java_home, "bin", "java").exists())):
        pytest.skip("needs Java 17+ for TorchServe's frontend; no java on PATH or JAVA_HOME")


StartServer = Callable[..., TorchServeProcess]


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeProcess]:
    """One TorchServe for the session: bundled config, free loopback ports, own model store."""
    _require_java()
    workdir = tmp_path_factory.mktemp("torchserve")
    server = start_torchserve(workdir=workdir, model_store=workdir / "model_store")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def torchserve_factory(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Start extra servers for one test: ``start(**start_torchserve_kwargs)``; all stopped after.

    ``workdir`` and ``model_store`` default to fresh temporary directories.
    """
    _require_java()
    started: list[TorchServeProcess] = []
    request.node._bray_servers = started  # read by pytest_runtest_makereport

    def start(**kwargs: Any) -> TorchServeProcess:
        workdir = kwargs.pop("workdir", None) or tmp_path_factory.mktemp("torchserve-extra")
        kwargs.setdefault("model_store", Path(workdir) / "model_store")
        server = start_torchserve(workdir=Path(workdir), **kwargs)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {}) or {}
    servers = [v for v in funcargs.values() if isinstance(v, TorchServeProcess)]
    servers += [s for s in getattr(item, "_bray_servers", []) if s not in servers]
    for server in servers:
        report.sections.append(
            (f"TorchServe logs ({server.log_dir})", server.tail_logs(n_lines=40))
        )
