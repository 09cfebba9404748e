"""``bray-archive dashboard``'s bad input through ``main(argv)``, and its page without a server.

The page in a real browser, with a server and a publishing loop, is
``tests/integration/test_dashboard.py``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from bray.archiver.cli import main
from bray.archiver.dashboard import DashboardOptions, collect_state, render_page
from bray.store import CheckpointStore


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    s = CheckpointStore(root)
    for _ in range(3):
        s.publish("policy", {"w": np.zeros(3, np.float32)})
    return root


@pytest.mark.parametrize("kind", ["missing", "file", "empty-dir"], ids=str)
def test_not_a_store_exits_1_saying_so(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("")
    elif kind == "empty-dir":
        path.mkdir()
    assert main(["dashboard", "--store", str(path), "--management", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bray-archive dashboard: ") and "not a checkpoint store" in err and "--store" in err
    assert err.count("\n") == 1


def test_port_in_use_exits_1_naming_it(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["dashboard", "--store", str(store), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_port_out_of_range_exits_1(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", "--store", str(store), "--port", "70000"]) == 1
    assert "--port must be 1-65535, got 70000" in capsys.readouterr().err


def test_page_without_a_server_shows_the_store_and_says_why(store: Path) -> None:
    def unreachable():  # type: ignore[no-untyped-def]
        from bray.torchserve.management import ManagementClient

        return ManagementClient("http://127.0.0.1:9", timeout_s=2)

    state = collect_state(DashboardOptions(store=store, client=unreachable))
    (model,) = state["models"]
    assert model["name"] == "policy" and model["latest"] == 2 and model["steps"] == [0, 1, 2]
    assert "http://127.0.0.1:9" in state["management_error"]
    page = render_page(state, refresh_s=2)
    assert '<span class="step latest-step">2</span>' in page and "TorchServe: " in page
    assert '<meta http-equiv="refresh" content="2">' in page  # without JavaScript too
