"""scripts/bench_procs.py and bench_league.py (bench.py's multi-process and league tables) against a real TorchServe.

Real actor processes call the policy MLP through ``RemoteModel`` direct and through the
node proxy. What the table reports must be what happened: direct sends exactly one
TorchServe request per call (so samples per request equals the observations per call,
read from TorchServe's own request counter), the proxy's own counters saw the calls, no
call failed, and a system that cannot run is listed with its reason, not measured.
A league actor alternates the learner and its opponents round robin, and the opponents
(weight-set clones) are answered by the learner's workers. Nothing is timed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import bray
from bray.errors import ModelNotFoundError
from bray.torchserve.launcher import TorchServeProcess
from bray.torchserve.management import ManagementClient
from tests.models import PolicyMLP

NAME = "bench-procs-policy"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def bench_procs() -> Any:
    sys.path.insert(0, str(SCRIPTS))  # the forkserver imports it by name, with this sys.path
    try:
        import bench_procs

        yield bench_procs
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def bench_league(bench_procs: Any) -> Any:
    import bench_league

    return bench_league


@pytest.fixture(scope="module")
def locations(torchserve: TorchServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    values = dict(store=str(tmp_path_factory.mktemp("bench-procs-store")), model_store=str(torchserve.model_store),
                  inference_url=torchserve.inference_url, management_url=torchserve.management_url,
                  key_file=str(torchserve.key_file))
    saved = os.environ.get("BRAY_PROXY_IDLE_S")
    os.environ["BRAY_PROXY_IDLE_S"] = "2"  # the actors' proxy goes soon after the test
    bray.init(**values)
    bray.RemoteModel(NAME, model=PolicyMLP().eval(), forward_args=(torch.zeros(2, 64),), num_workers=1,
                     max_batch_size=8).close()
    try:
        yield values
    finally:
        if saved is None:
            os.environ.pop("BRAY_PROXY_IDLE_S", None)
        else:
            os.environ["BRAY_PROXY_IDLE_S"] = saved
        with ManagementClient(torchserve.management_url, key_file=torchserve.key_file, timeout_s=120) as client:
            try:
                client.unregister(NAME)
            except ModelNotFoundError:
                pass


def test_the_table_reports_what_happened(bench_procs: Any, locations: dict[str, str], torchserve: TorchServeProcess,
                                         tmp_path: Path) -> None:
    systems = [
        {"label": "direct", "kind": "bray", "model": NAME, "name": NAME, "locations": locations,
         "options": {"node_proxy": False}},
        {"label": "proxy", "kind": "bray", "model": NAME, "name": NAME, "locations": locations,
         "options": {"node_proxy": True}, "skip": bench_procs.proxy_unsupported()},
        {"label": "absent", "kind": "bray", "model": NAME, "name": NAME, "locations": locations,
         "skip": "not built here"},
        # TorchRL's shared-memory server, the same model in this process (the bench extra installs torchrl).
        {"label": "torchrl", "kind": "torchrl", "model": "", "server": bench_procs.TorchRL(PolicyMLP().eval(), max_batch_size=8),
         "skip": bench_procs.torchrl_unsupported()},
    ]
    res = bench_procs.measure(systems, procs=(2,), rows=(1, 3), duration_s=0.5, warmup_s=0.3, metrics_url=torchserve.metrics_url,
                              log=lambda line: None)
    assert res["skipped"]["absent"] == "not built here"
    points = {(p["system"], p["rows"]): p for p in res["points"]}
    assert {s for s, _ in points} == {"direct", "proxy", "torchrl"} - set(res["skipped"])
    for (system, rows), p in points.items():
        assert p["errors"] == 0, p["first_error"]
        assert p["calls"] > 0 and p["forwards_per_s"] == pytest.approx(p["calls_per_s"] * rows)
        assert p["p50_ms"] <= p["p99_ms"]
        # The machine was busy during the calls (callers and server at least), within its cores.
        assert 0 < p["cpu_cores"] <= (os.cpu_count() or 1) + 0.5, p
        assert p["cpu_us_per_forward"] > 0, p
        if system == "direct":  # one request per call, counted by TorchServe itself
            assert p["requests"] == p["calls"]
            assert p["samples_per_request"] == pytest.approx(rows)
            assert p["proxy"] is None
        elif system == "torchrl":  # no TorchServe request, no proxy
            assert p["requests"] is None and p["samples_per_request"] is None and p["proxy"] is None
        else:  # the proxy answered the calls (one actor's reading spans the run)
            assert p["proxy"]["calls"] > 0
            assert p["proxy"]["samples"] >= p["proxy"]["calls"] * rows
    md = bench_procs.write(res, "test run", [], tmp_path)
    assert "Not measured: absent: not built here." in md
    assert (tmp_path / "bench_procs.json").is_file()


def test_the_league_table_reports_what_happened(bench_procs: Any, bench_league: Any, locations: dict[str, str],
                                                torchserve: TorchServeProcess, tmp_path: Path) -> None:
    learner = bray.RemoteModel(NAME, node_proxy=False)
    opponents: list[str] = []
    made_s, stopped = bench_league.grow(opponents, 2, bench_league.bray_opponent(
        learner, [learner.step], dedicated=False, prefix="bench-test-"), server_pid=torchserve.pid, cap_mb=1e9)
    assert stopped == "" and len(made_s) == 2 == len(opponents)
    assert bench_league.grow([], 1, lambda i: pytest.fail("made past the cap"), server_pid=torchserve.pid,
                             cap_mb=0)[1].startswith("stopped at 0 opponents")
    net = PolicyMLP()
    learner.publish_weights({k: v + 1.0 for k, v in net.state_dict().items()}).wait(timeout_s=30)
    base = {"kind": "bray", "model": NAME, "name": NAME, "locations": locations, "opponents": opponents}

    # One actor's calls: the learner, then the opponents round robin from its index.
    game, _ = bench_procs._client({**base, "options": {"node_proxy": False}}, 1)
    obs = torch.randn(1, 64).numpy()
    alone = {name: bray.RemoteModel(name, node_proxy=False)(obs, batch=True) for name in [NAME, *opponents]}
    assert not torch.allclose(torch.as_tensor(alone[NAME]), torch.as_tensor(alone[opponents[0]]))
    for expected in [NAME, opponents[0], NAME, opponents[1], NAME, opponents[0]]:
        assert torch.allclose(torch.as_tensor(game(obs)), torch.as_tensor(alone[expected]), atol=1e-5), expected

    systems = [{**base, "label": bench_league.DEFAULT},
               {**base, "label": bench_league.DIRECT, "options": {"node_proxy": False}}]
    measured = bench_procs.measure(systems, procs=(2,), rows=(1,), duration_s=0.5, warmup_s=0.3,
                                   metrics_url=torchserve.metrics_url, log=lambda line: None)
    points = bench_league.points(measured, k=2, made_s=made_s,
                                 mem=bench_league.memory(torchserve.pid, Path(locations["store"])))
    assert {p["system"] for p in points} == {bench_league.DEFAULT, bench_league.DIRECT}
    for p in points:
        assert p["errors"] == 0, p["first_error"]
        assert p["torchserve_mb"] > 0 and p["processes"] >= 2 and p["made"] == 2
    direct = next(p for p in points if p["system"] == bench_league.DIRECT)
    # The opponents' calls reached the learner's model: one TorchServe request per call, all counted under it.
    assert direct["samples_per_request"] == pytest.approx(1)
    res = {"ks": [2], "actors": 2, "duration_s": 0.5, "cap_mb": 1e9, "points": points, "notes": ["a note."]}
    md = bench_league.write(res, "test run", tmp_path)
    assert "a note." in md and (tmp_path / "bench_league.json").is_file()
