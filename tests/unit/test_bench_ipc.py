"""scripts/bench_ipc.py: every transport candidate answers each actor process its own request.

The actors check every answer against the request they sent (and raise otherwise), so a
transport that mixed up slots, lost a wake-up or answered twice fails here, not in the
published figures. Small counts: this is a correctness run, not a measurement.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_ipc.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_ipc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_ipc = _load()


@pytest.mark.parametrize("name", list(bench_ipc.TRANSPORTS), ids=list(bench_ipc.TRANSPORTS))
def test_transport_round_trips(name: str) -> None:
    needs = bench_ipc.TRANSPORTS[name].needs
    if needs:
        pytest.importorskip(needs.replace("-", "_").replace("pyzmq", "zmq"),
                            reason=f"{needs} is not installed (pip install 'bray-serve[bench]')")
    row = bench_ipc.measure(name, 16, clients=3, seconds=0.3, n_latency=50)
    assert "skipped" not in row, row
    assert row["n"] == 50
    assert row["clients"] == 3 and row["rt_per_s"] > 0


def test_main_writes_the_table(tmp_path: Path) -> None:
    assert bench_ipc.main(["--quick", "--transports", "shm+eventfd", "--rows", "1", "--clients", "2",
                           "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_ipc.json").read_text())
    (row,) = res["rows"]
    assert (row["transport"], row["rows"], row["n"]) == ("shm+eventfd", 1, 1000)
    assert "| shm+eventfd | 1x64 |" in (tmp_path / "bench_ipc.md").read_text()


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        bench_ipc.main(["--transports", "carrier-pigeon"])
    assert err.value.code == 2
    assert "carrier-pigeon" in capsys.readouterr().err
