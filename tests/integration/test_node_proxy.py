"""The node proxy with real actor processes and a real TorchServe on loopback.

Actors are separate Python processes (``tests/proxy_actor.py``) calling a StepProbe model
(``y = step * (sum(x) + 1)``) through ``RemoteModel(..., node_proxy=True)``, each with
its own input value, so a crossed answer or a wrong step label is caught. Every wait is
bounded; nothing is timed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

import bray
from bray.bridge._slot import proxy_address
from bray.errors import ModelNotFoundError
from bray.torchserve.launcher import TorchServeProcess
from bray.torchserve.management import ManagementClient
from tests.models import StepProbe, probe_weights

NAME = "proxy-probe"
REPO = Path(__file__).resolve().parents[2]
X = np.full((1, 4), 0.5, np.float32)


@pytest.fixture(scope="module")
def env(torchserve: TorchServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``BRAY_*`` for this module's store and the session server; the probe registered at step 0."""
    store = tmp_path_factory.mktemp("proxy-store")
    values = {"BRAY_STORE": str(store), "BRAY_MODEL_STORE": str(torchserve.model_store),
              "BRAY_INFERENCE_URL": torchserve.inference_url, "BRAY_MANAGEMENT_URL": torchserve.management_url,
              "BRAY_KEY_FILE": str(torchserve.key_file), "BRAY_PROXY_IDLE_S": "2"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    bray.init()
    net = StepProbe()
    net.load_state_dict(probe_weights(0))
    bray.RemoteModel(NAME, model=net, forward_args=(torch.zeros(1, 4),), num_workers=1, max_batch_size=8).close()
    try:
        yield {**os.environ, **values}
    finally:
        with ManagementClient(torchserve.management_url, key_file=torchserve.key_file, timeout_s=120) as client:
            try:
                client.unregister(NAME)
            except ModelNotFoundError:
                pass
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_actor(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.proxy_actor", "--name", NAME, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen[str], timeout_s: float = 240) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, f"actor exited with {proc.returncode}: {err[-3000:]}"
    return dict(json.loads(out.strip().splitlines()[-1]))


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped yet by the actor that started it) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def listening(address: str) -> bool:
    """Whether the abstract socket ``address`` is bound (``/proc/net/unix`` shows it as ``@name``)."""
    return ("@" + address[1:]) in Path("/proc/net/unix").read_text()


def test_actor_processes_share_one_proxy_and_each_gets_its_own_answers(env: dict[str, str]) -> None:
    rm = bray.RemoteModel(NAME, node_proxy=True)  # starts the proxy (or attaches)
    try:
        before = rm.proxy_stats()
        assert before is not None, rm.transport.proxy.last_error
        out, step = rm(X, batch=True, return_step=True)
        np.testing.assert_allclose(out, np.full((1, 2), step * (X.sum() + 1)))
        procs = [start_actor(env, "--value", str(k + 1), "--calls", "60") for k in range(4)]
        rm.publish_weights(probe_weights(1)).wait(timeout_s=60)  # steps change while they call
        results = [result(p) for p in procs]
        after = rm.proxy_stats()
    finally:
        rm.close()
    for r in results:
        assert r["answers"] == 60 and r["n_errors"] == 0, r
        assert r["wrong"] == 0 and r["backwards"] == 0, r
        assert r["fallbacks"] == 0, r
    assert {r["proxy_pid"] for r in results} == {before["pid"]}, "every actor used the one proxy"
    assert after is not None and after["calls"] - before["calls"] == 4 * 60 + 1
    assert after["requests"] <= after["calls"]


def test_an_actor_killed_mid_call_frees_its_slot_and_disturbs_nobody(env: dict[str, str]) -> None:
    rm = bray.RemoteModel(NAME, node_proxy=True)
    try:
        before = rm.proxy_stats()
        assert before is not None
        dying = start_actor(env, "--value", "3", "--die-mid-call")
        dying.communicate(timeout=120)
        assert dying.returncode == -signal.SIGKILL
        calm = start_actor(env, "--value", "2", "--calls", "30")
        r = result(calm)
        assert r["answers"] == 30 and r["n_errors"] == 0 and r["wrong"] == 0, r
        # The dead actor's connection is gone: the proxy counts only ours again.
        stats = wait_for(lambda: (s := rm.proxy_stats()) and s["clients"] == before["clients"] and s,
                         60, "the dead actor's connection to be dropped")
        assert stats["pid"] == before["pid"]
        out, step = rm(X, batch=True, return_step=True)
        np.testing.assert_allclose(out, np.full((1, 2), step * (X.sum() + 1)))
    finally:
        rm.close()


def test_a_proxy_killed_under_load_loses_no_call(env: dict[str, str], tmp_path: Path) -> None:
    rm = bray.RemoteModel(NAME, node_proxy=True)
    stop = tmp_path / "stop"
    try:
        first = rm.proxy_stats()
        assert first is not None
        procs = [start_actor(env, "--value", str(k + 1), "--calls", "20", "--until-file", str(stop)) for k in range(3)]
        wait_for(lambda: (s := rm.proxy_stats()) and s["calls"] > first["calls"] + 60, 120, "the actors to call")
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(lambda: not alive(first["pid"]), 30, "the killed proxy to be gone")
        # Calls in flight went to TorchServe directly; a new proxy is started by the next callers.
        def restarted() -> Any:
            rm(X, batch=True)
            s = rm.proxy_stats()
            return s if s and s["pid"] != first["pid"] else None

        second = wait_for(restarted, 120, "a new proxy to serve")
        # Every actor back on the new proxy (this process's connection and one per actor), not
        # just some: an actor whose retry fell after the others' can still be calling direct.
        wait_for(lambda: (s := rm.proxy_stats()) and s["calls"] > second["calls"] + 30 and s["clients"] >= 4, 120,
                 "every actor to call through the new proxy")
        stop.touch()
        results = [result(p) for p in procs]
    finally:
        stop.touch()
        rm.close()
    for r in results:
        assert r["n_errors"] == 0 and r["wrong"] == 0 and r["backwards"] == 0, r
    assert {r["proxy_pid"] for r in results} == {second["pid"]}


def test_the_proxy_exits_when_idle_and_leaves_nothing_behind(env: dict[str, str]) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    address = proxy_address(NAME, "latest", [env["BRAY_INFERENCE_URL"]], env["BRAY_STORE"])
    rm = bray.RemoteModel(NAME, node_proxy=True)
    stats = rm.proxy_stats()
    assert stats is not None and listening(address)
    rm(X, batch=True)
    rm.close()  # no caller left: it exits after BRAY_PROXY_IDLE_S (2 s)
    wait_for(lambda: not alive(stats["pid"]), 60, "the idle proxy to exit")
    assert not listening(address)
    assert set(os.listdir("/dev/shm")) <= shm_before, "the proxy left shared memory behind"


def test_bray_archive_proxy_runs_one_in_the_foreground_until_sigterm(env: dict[str, str]) -> None:
    address = proxy_address(NAME, "latest", [env["BRAY_INFERENCE_URL"]], env["BRAY_STORE"])
    wait_for(lambda: not listening(address), 60, "an earlier test's proxy to exit")
    cli = subprocess.Popen([sys.executable, "-m", "bray.archiver.cli", "proxy", "--name", NAME, "--idle-exit-s", "600"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = cli.stdout.readline() if cli.stdout else ""
        assert "serving" in line, line + (cli.stderr.read() if cli.stderr else "")
        rm = bray.RemoteModel(NAME, node_proxy=True)
        stats = rm.proxy_stats()
        r = result(start_actor(env, "--value", "4", "--calls", "10"))
        rm.close()
        assert stats is not None and stats["pid"] == cli.pid, (stats, cli.pid)
        assert r["answers"] == 10 and r["fallbacks"] == 0 and r["proxy_pid"] == cli.pid, r
        cli.send_signal(signal.SIGTERM)  # what a process manager sends: a clean exit
        cli.wait(timeout=60)
        assert cli.returncode == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert not listening(address)


def test_the_proxy_balances_over_several_nodes(env: dict[str, str], torchserve: TorchServeProcess,
                                              torchserve_factory: Any, tmp_path: Path) -> None:
    a, b = torchserve, torchserve_factory()
    bray.init(store=tmp_path / "store", inference_url=f"{a.inference_url},{b.inference_url}",
              management_url=f"{a.management_url},{b.management_url}", key_file=f"{a.key_file},{b.key_file}",
              model_store=f"{a.model_store},{b.model_store}")
    rm = None
    try:
        net = StepProbe()
        net.load_state_dict(probe_weights(0))
        rm = bray.RemoteModel("proxy-two-nodes", model=net, forward_args=(torch.zeros(1, 4),), num_workers=1,
                              max_batch_size=8, node_proxy=True)
        rm.publish_weights(probe_weights(1)).wait(timeout_s=60)  # every worker of both nodes serves step 1
        for _ in range(20):
            out, step = rm(X, batch=True, return_step=True)
            assert step == 1 and np.allclose(out, X.sum() + 1)
        stats = rm.proxy_stats()
        assert stats is not None and rm.proxy_fallbacks == 0
        assert set(stats["requests_by_url"]) == {a.inference_url, b.inference_url}, stats
    finally:
        if rm is not None:
            rm.close()
            with ManagementClient(a.management_url, key_file=a.key_file, timeout_s=120) as client:
                client.unregister(rm.name)
        bray.init()  # back to this module's BRAY_* variables


def test_clones_served_as_weight_sets_share_their_models_proxy(env: dict[str, str]) -> None:
    """One proxy process for the learner and its opponents: each caller's hello names its weight set."""
    learner = bray.RemoteModel(NAME, node_proxy=True)
    opponents = [learner.clone(step=0, name=f"ws{i}", node_proxy=True) for i in range(3)]
    try:
        for i, opp in enumerate(opponents):
            opp.publish_weights(probe_weights(10 + i))
        assert {o.transport.proxy.address for o in opponents} == {learner.transport.proxy.address}
        own = learner.get_model().lin.bias[0].detach().item()  # StepProbe: every weight is one value
        for _ in range(5):
            for i, opp in enumerate(opponents):
                out, step = opp(X, return_step=True)
                np.testing.assert_allclose(out, (10 + i) * (X.sum(-1, keepdims=True) + 1).repeat(2, -1))
                assert step == opp.step
            np.testing.assert_allclose(learner(X), own * (X.sum(-1, keepdims=True) + 1).repeat(2, -1))
        stats = learner.proxy_stats()
        assert stats is not None and stats["weight_sets"] == sorted(o.name for o in opponents)
        assert all(o.proxy_fallbacks == 0 for o in opponents) and learner.proxy_fallbacks == 0
    finally:
        for model in (learner, *opponents):
            model.close()


def test_the_node_proxy_is_on_by_default_started_by_the_first_call(env: dict[str, str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Bray code unchanged (no node_proxy argument) gets the proxy; BRAY_NODE_PROXY=0 and node_proxy=False don't."""
    from bray.bridge.direct import DirectTransport
    from bray.bridge.proxy_client import NodeProxyTransport

    monkeypatch.delenv("BRAY_NODE_PROXY", raising=False)  # and so for the proxy this test starts
    address = proxy_address(NAME, "latest", [env["BRAY_INFERENCE_URL"]], env["BRAY_STORE"])
    wait_for(lambda: not listening(address), 60, "the module's earlier proxy to exit (idle)")
    rm = bray.RemoteModel(NAME)
    try:
        assert isinstance(rm.transport, NodeProxyTransport)
        want = rm.get_model().lin.bias[0].detach().item() * (X.sum(-1, keepdims=True) + 1).repeat(2, -1)
        np.testing.assert_allclose(rm(X), want)  # answered at once: directly while the proxy starts
        wait_for(lambda: rm(X) is not None and rm.proxy_stats(), 120, "the proxy the first call started")
        before = rm.batching_stats()[0] - rm.proxy_fallbacks
        for _ in range(20):
            np.testing.assert_allclose(rm(X), want)
        assert rm.batching_stats()[0] - rm.proxy_fallbacks >= before + 20  # through the proxy now
    finally:
        rm.close()
    monkeypatch.setenv("BRAY_NODE_PROXY", "0")
    off = bray.RemoteModel(NAME)
    assert isinstance(off.transport, DirectTransport)
    off.close()
    monkeypatch.delenv("BRAY_NODE_PROXY")
    explicit = bray.RemoteModel(NAME, node_proxy=False)
    assert isinstance(explicit.transport, DirectTransport)
    explicit.close()


def test_a_killed_proxy_loses_no_opponents_call_and_answers_each_with_its_weights(env: dict[str, str]) -> None:
    learner = bray.RemoteModel(NAME, node_proxy=True)
    opponent = learner.clone(step=0, name="sigkill", node_proxy=True)
    try:
        opponent.publish_weights(probe_weights(21))
        want = {learner.name: learner.get_model().lin.bias[0].detach().item(), opponent.name: 21.0}
        stats = learner.proxy_stats()
        assert stats is not None and opponent.transport.proxy.address == learner.transport.proxy.address
        os.kill(stats["pid"], signal.SIGKILL)
        wait_for(lambda: not alive(stats["pid"]), 30, "the proxy to die")
        for _ in range(30):  # direct while it is away, through a new one once the next call restarted it
            for model in (learner, opponent):
                out = model(X)
                np.testing.assert_allclose(out, want[model.name] * (X.sum(-1, keepdims=True) + 1).repeat(2, -1))
        assert learner.proxy_fallbacks + opponent.proxy_fallbacks >= 1
        restarted = wait_for(lambda: (learner(X) is not None) and learner.proxy_stats(), 120, "a new proxy")
        assert restarted["pid"] != stats["pid"]
    finally:
        learner.close()
        opponent.close()


def test_a_league_round_goes_out_in_one_request_and_every_row_gets_its_own_weight_sets_answer(
        env: dict[str, str], tmp_path: Path) -> None:
    """Four actor processes play the learner and three weight-set opponents through one proxy while the
    learner and every opponent are published: calls of different weight sets share TorchServe requests
    (in segments), and every answer's value says which weight set and which step produced it."""
    learner = bray.RemoteModel(NAME, node_proxy=False)
    opponents = [learner.clone(step=0, name=f"league{i}", node_proxy=False) for i in range(3)]
    stop = tmp_path / "stop"
    actors: list[subprocess.Popen[str]] = []
    try:
        def publish(model: bray.RemoteModel, code: int, skip: int = 0) -> Any:  # weights naming (set, step)
            step = model.step + 1 + skip
            return model.publish_weights(probe_weights(code + step), step=step)

        publish(learner, 0).wait(timeout_s=60)
        for i, opp in enumerate(opponents):  # steps apart from the learner's and each other's
            publish(opp, 1000 * (i + 1), skip=100 * (i + 1)).wait(timeout_s=60)
        names = ",".join(o.name for o in opponents)
        actors = [start_actor(env, "--value", str(0.1 * (a + 1)), "--calls", "40", "--until-file", str(stop),
                              "--opponents", names, "--first-opponent", str(a)) for a in range(4)]
        for _ in range(6):  # published while the actors play
            publish(learner, 0)
            for i, opp in enumerate(opponents):
                publish(opp, 1000 * (i + 1))
            time.sleep(0.3)
        stop.touch()
        results = [result(proc) for proc in actors]
        for got in results:
            assert got["n_errors"] == 0, got["errors"]
            assert got["wrong"] == 0 and got["backwards"] == 0, got
            assert got["answers"] >= 80, got
        # As the actors' proxy last counted them: requests that held several weight sets. The proxy's wait
        # for the callers it has just answered keeps the actors in step, round by round (a CI run saw no
        # mixed request when every actor played the same opponent in the same round): each starts at
        # another opponent, so a round's opponent calls are of different weight sets.
        assert max(got["mixed_requests"] or 0 for got in results) >= 1, results
    finally:
        stop.touch()
        for proc in actors:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for model in (learner, *opponents):
            model.close()
