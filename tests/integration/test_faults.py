"""Faults a trainer's serving side must survive, and the security defaults (issue 7).

Each fault is injected into a real TorchServe started from the bundled config (token
authorization on), serving :class:`tests.models.StepProbe` through ``RemoteModel``: every
weight equals the step, so each answer can be checked against the step that claims to
have produced it (a torn or half-loaded step would show). Each test prints one line for
the note: how the fault was injected, what the callers saw, how long recovery took.

Kept small for a 2-core machine shared with other test runs: one server for the module
(plus one for the restart and one for token expiry), one or two workers per model, loads
bounded in time (seconds) and in count (callers, kills).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import requests

import bray
from bray.archiver.cli import main as archive_cli
from bray.bridge.remote_model import RemoteModel
from bray.errors import ManagementError, ServerUnreachableError, StepConflictError, StoreWriteError
from bray.store import CheckpointStore
from bray.torchserve.launcher import TorchServeProcess, free_ports, start_torchserve
from bray.torchserve.management import ManagementClient
from bray.ts_config import config_path, read_properties
from tests.load import Publisher, probe_input, probe_ok, run_callers, wait_workers, worker_pids
from tests.models import StepProbe, probe_weights

ROOT = Path(__file__).resolve().parents[2]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _note(text: str) -> None:
    print(f"\n[issue-7] {text}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeProcess]:
    """One server for the module's faults (stopped at the end)."""
    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        pytest.skip("needs Java 17+ for TorchServe's frontend")
    workdir = tmp_path_factory.mktemp("faults")
    srv = start_torchserve(workdir=workdir, model_store=workdir / "model_store")
    yield srv
    srv.stop()


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[Callable[..., RemoteModel]]:
    """``probe(server, name, workers=1, n=4)``: a StepProbe RemoteModel at step 0; unregistered after."""
    made: list[tuple[RemoteModel, TorchServeProcess]] = []

    def make(srv: TorchServeProcess, name: str, *, workers: int = 1, n: int = 4,
             store: Path | None = None) -> RemoteModel:
        import torch

        bray.init(store=store or tmp_path / "store", model_store=srv.model_store, inference_url=srv.inference_url,
                  management_url=srv.management_url, key_file=srv.key_file)
        net = StepProbe(n)
        net.load_state_dict(probe_weights(0, n))
        rm = RemoteModel(name, model=net, forward_args=(torch.zeros(1, n),), num_workers=workers,
                         max_batch_size=8, timeout_s=30)
        made.append((rm, srv))
        return rm

    yield make
    for rm, srv in made:
        try:
            if srv.ping():
                rm._management().unregister(rm.name)
        except Exception:  # cleanup is best effort; the server is stopped later anyway
            pass
        rm.close()


def _wait_for_log(srv: TorchServeProcess, pattern: str, *, timeout_s: float = 30.0) -> str:
    """The first model_log.log line matching ``pattern`` (regex), waiting for it."""
    deadline = time.monotonic() + timeout_s
    log_file = srv.log_dir / "model_log.log"
    while True:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        for line in text.splitlines():
            if re.search(pattern, line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no line matching {pattern!r} in {log_file} after {timeout_s} s:\n{text[-3000:]}")
        time.sleep(0.2)


# -- faults --------------------------------------------------------------------------------


def test_worker_sigkill_under_64_callers_is_retried_and_the_worker_comes_back_on_the_latest_step(
        server: TorchServeProcess, probe: Callable[..., RemoteModel]) -> None:
    rm = probe(server, "kill-probe", workers=2)
    rm.publish_weights(probe_weights(1), step=1).wait(30)
    rm(probe_input())  # open the transport, so its counters exist before the fault
    client = rm._management()
    before = worker_pids(client, rm.name, "latest")
    assert len(before) == 2, before
    victim = sorted(before)[0]
    retries_before = rm.transport.client.stats.retries
    timing: dict[str, float] = {}

    async def kill_one_worker() -> None:
        await asyncio.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, _ = await asyncio.to_thread(wait_workers, client, rm.name, "latest", count=2, exclude={victim})
        timing["worker_back_s"] = time.monotonic() - killed

    report = run_callers(rm, callers=64, seconds=6.0, during=kill_one_worker)
    retried = rm.transport.client.stats.retries - retries_before
    _note(f"worker SIGKILL | os.kill(worker pid, SIGKILL) 1.5 s into 64 callers | {report.line()} | "
          f"forwards retried {retried} | replacement worker READY after {timing['worker_back_s']:.2f} s")

    assert report.failures == [], report.failures[:5]
    assert report.inconsistent == [] and report.backwards == 0
    assert report.answers > 64
    after = worker_pids(client, rm.name, "latest")
    assert victim not in after and len(after) == 2 and set(after.values()) == {"READY"}, after
    (new_pid,) = set(after) - set(before)
    serving = {v["pid"]: v["step"] for v in rm.store.serving(rm.name).values()}
    assert serving.get(new_pid) == 1, f"the restarted worker should start on the latest step 1: {serving}"
    rm.publish_weights(probe_weights(2), step=2).wait(30)  # waits for every worker, the new one too
    out, step = rm(probe_input(), return_step=True)
    assert step == 2 and probe_ok(out, 2)


def test_worker_sigkill_in_a_league_answers_every_opponent_with_its_own_weights(
        server: TorchServeProcess, probe: Callable[..., RemoteModel]) -> None:
    """Clones served as weight sets of the killed worker's model: no call lost, no wrong opponent."""
    from bray.errors import BrayError

    rm = probe(server, "kill-league", workers=2)
    rm.publish_weights(probe_weights(1), step=1).wait(30)
    clones = [rm.clone(step=1, name=f"k{i}") for i in range(2)]
    for i, clone in enumerate(clones):
        clone.publish_weights(probe_weights(11 + i)).wait(30)
    want = {rm.name: 1, clones[0].name: 11, clones[1].name: 12}
    client = rm._management()
    before = worker_pids(client, rm.name, "latest")
    assert len(before) == 2, before
    victim = sorted(before)[0]

    async def league() -> tuple[list[str], list[str], int]:
        wrong: list[str] = []
        failures: list[str] = []
        answers = 0
        stop = time.monotonic() + 6.0

        async def caller(model: RemoteModel) -> None:
            nonlocal answers
            while time.monotonic() < stop:
                try:
                    out = await model.forward(probe_input(), batch=True)
                except BrayError as err:
                    failures.append(f"{model.name}: {err}")
                    continue
                answers += 1
                if not probe_ok(out, want[model.name]):
                    wrong.append(f"{model.name}: {out}")

        async def kill() -> None:
            await asyncio.sleep(1.5)
            os.kill(victim, signal.SIGKILL)

        await asyncio.gather(kill(), *(caller(m) for m in (rm, *clones) for _ in range(8)))
        return wrong, failures, answers

    wrong, failures, answers = asyncio.run(league())
    assert failures == [], failures[:5]
    assert wrong == [], wrong[:5]
    assert answers > 24
    wait_workers(client, rm.name, "latest", count=2, exclude={victim})
    for _ in range(8):  # the replacement worker loads each weight set on its first use
        for model in (rm, *clones):
            assert probe_ok(model(probe_input()), want[model.name]), model.name
    for clone in clones:
        clone.close()


def test_torchserve_restart_while_publishing_reregisters_from_the_store_and_loses_no_step(
        torchserve_factory: Callable[..., TorchServeProcess], probe: Callable[..., RemoteModel]) -> None:
    first = torchserve_factory()
    rm = probe(first, "restart-probe", workers=1)
    rm(probe_input())
    ports = dict(inference_port=_port(first.inference_url), management_port=_port(first.management_url),
                 metrics_port=_port(first.metrics_url), grpc_ports=first.grpc_ports)
    timing: dict[str, Any] = {}

    async def restart() -> None:
        await asyncio.sleep(2.0)
        t0 = time.monotonic()
        timing["step_at_stop"] = rm.step
        await asyncio.to_thread(first.stop)
        timing["stop_s"] = time.monotonic() - t0
        await asyncio.sleep(1.0)  # nothing serves; the trainer keeps publishing
        timing["second"] = await asyncio.to_thread(torchserve_factory, workdir=first.workdir, **ports)
        timing["down_s"] = time.monotonic() - t0

    retries_before = rm.transport.client.stats.retries
    with Publisher(rm, interval_s=0.1) as pub:
        report = run_callers(rm, callers=32, seconds=22.0, during=restart)
    second: TorchServeProcess = timing["second"]
    _note(f"TorchServe restart | stop() the whole server 2 s in, start_torchserve on the same ports and workdir "
          f"1 s later, publishing every 100 ms throughout | {report.line()} | forwards retried "
          f"{rm.transport.client.stats.retries - retries_before} | server down {timing['down_s']:.1f} s "
          f"(model re-registered by the bridge on the first 404) | {len(pub.published)} steps published")

    assert pub.errors == [] and len(pub.published) > 100
    assert report.failures == [], report.failures[:5]
    assert report.inconsistent == [] and report.backwards == 0
    assert min(report.last_steps) > timing["step_at_stop"], "callers should see steps published after the restart"
    with ManagementClient(second.management_url, key_file=second.key_file) as c:
        mv = c.describe(rm.name, "latest")[0]
        assert mv.is_default and mv.ready_workers == 1
    # No published step is lost: the store has the latest, and the server serves it.
    assert rm.store.latest(rm.name) == pub.published[-1]
    final = rm.publish_weights(probe_weights(pub.published[-1] + 1), step=pub.published[-1] + 1)
    final.wait(30)
    out, step = rm(probe_input(), return_step=True)
    assert step == int(final) and probe_ok(out, step)


def test_a_restarted_server_serves_a_weight_set_clone_again_with_its_own_weights(
        torchserve_factory: Callable[..., TorchServeProcess], probe: Callable[..., RemoteModel]) -> None:
    """A restarted TorchServe forgot the model: the clone's first call re-registers its root from the store."""
    first = torchserve_factory()
    rm = probe(first, "restart-league", workers=1)
    rm.publish_weights(probe_weights(3), step=1).wait(30)
    clone = rm.clone(step=1, name="r")
    clone.publish_weights(probe_weights(17)).wait(30)
    assert probe_ok(clone(probe_input()), 17) and probe_ok(rm(probe_input()), 3)
    ports = dict(inference_port=_port(first.inference_url), management_port=_port(first.management_url),
                 metrics_port=_port(first.metrics_url), grpc_ports=first.grpc_ports)
    first.stop()
    second = torchserve_factory(workdir=first.workdir, **ports)
    with ManagementClient(second.management_url, key_file=second.key_file) as c:
        assert rm.name not in c.list_models()  # forgotten (snapshots are off)
    for _ in range(5):  # the clone first: its 404 registers rm's live version again, once
        assert probe_ok(clone(probe_input()), 17)
        assert probe_ok(rm(probe_input()), 3)
    with ManagementClient(second.management_url, key_file=second.key_file) as c:
        assert [m for m in c.list_models() if m.startswith("restart-league")] == ["restart-league"]
    clone.close()


def test_reconnect_is_bounded_with_a_clear_error() -> None:
    from bray.bridge._loop import run_sync
    from bray.torchserve.inference import InferenceClient

    (port,) = free_ports(1)
    client = InferenceClient([f"http://127.0.0.1:{port}"], reconnect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError, match="is the server running") as err:
        run_sync(client.predict("nothing", b"{}"), timeout_s=30)
    waited = time.monotonic() - started
    run_sync(client.close(), timeout_s=5)
    assert 1.0 <= waited < 5.0
    assert f"127.0.0.1:{port}" in str(err.value) and "BRAY_INFERENCE_URL" in str(err.value)


PUBLISHER = r"""
import sys
import numpy as np
from bray.errors import StepConflictError
from bray.store import CheckpointStore

root, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = CheckpointStore(root, keep_last=5)
step = (store.latest(name) or 0) + 1
print("ready", flush=True)
while True:
    try:
        store.publish(name, {"lin.weight": np.full((2, n), step, np.float32),
                             "lin.bias": np.full((2,), step, np.float32)}, step=step)
        step += 1
    except StepConflictError as err:
        # A publisher killed after renaming its step but before moving LATEST leaves that
        # step committed but never visible; steps only grow, so go past it.
        step = err.latest + 1
"""


def test_publisher_killed_mid_publish_never_shows_a_torn_step(
        server: TorchServeProcess, probe: Callable[..., RemoteModel]) -> None:
    n, kills = 4096, 12  # 32 KiB per step: each publish writes, fsyncs and renames
    rm = probe(server, "torn-probe", workers=1, n=n)
    rng = random.Random(7)
    killed_at: list[int] = []

    async def kill_publishers() -> None:
        for _ in range(kills):
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PUBLISHER, str(rm.store.root), rm.name, str(n),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT))
            assert child.stdout is not None and child.stderr is not None
            assert (await child.stdout.readline()).strip() == b"ready"
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            if child.returncode is not None:
                raise AssertionError(f"the publisher died by itself: {(await child.stderr.read()).decode()[-2000:]}")
            child.send_signal(signal.SIGKILL)
            await child.wait()  # reaped: its pid is dead for the store's sweep
            killed_at.append(rm.store.latest(rm.name) or 0)

    report = run_callers(rm, callers=8, seconds=10.0, n=n, during=kill_publishers)
    _note(f"publisher SIGKILL | {kills} publisher processes each SIGKILLed 50-300 ms into a publish loop "
          f"(latest step after each kill: {killed_at}) | {report.line()}")

    assert len(killed_at) == kills and killed_at[-1] > 0
    assert report.failures == [] and report.inconsistent == [] and report.backwards == 0
    # The store stays readable: every kept step loads and passes its checksum.
    for step in rm.store.steps(rm.name):
        assert rm.store.load(rm.name, step).step == step
    # The next publish sweeps what the killed publishers left in .tmp.
    # Explicit steps: a publisher killed after its rename leaves a committed but hidden step,
    # and step=None would number past it while these weights say rm.step + 1.
    target = rm.step + 1
    while True:
        try:
            nxt = rm.publish_weights(probe_weights(target, n), step=target)
            break
        except StepConflictError as err:
            target = err.latest + 1
    nxt.wait(30)
    tmp = rm.store.model_dir(rm.name) / ".tmp"
    deadline = time.monotonic() + 5  # retired steps are deleted in the background
    while (leftovers := [p.name for p in tmp.iterdir()]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leftovers == [], leftovers
    out, step = rm(probe_input(n), return_step=True)
    assert step == int(nxt) and probe_ok(out, step, n)
    log = (server.log_dir / "model_log.log").read_text(errors="replace")
    assert not re.search(r"refusing step \d+ of torn-probe", log), "a worker saw a torn step"


def _place_corrupt_step(store: CheckpointStore, name: str, step: int, scratch: Path) -> None:
    """Put a step whose weights fail their checksum into ``store``, as a damaged disk would."""
    other = CheckpointStore(scratch)
    other.publish(name, probe_weights(step), step=step)
    src = other._step_dir(name, step)  # noqa: SLF001
    weights = src / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\xff\xff\xff\x7f"  # the last float becomes NaN-ish garbage; size unchanged
    weights.write_bytes(bytes(data))
    dest = store._step_dir(name, step)  # noqa: SLF001
    os.rename(src, dest)
    tmp = store.model_dir(name) / "LATEST.tmp-test"
    tmp.write_text(f"{step}\n")
    os.replace(tmp, store.model_dir(name) / "LATEST")


def test_corrupt_or_wrong_shaped_checkpoints_are_refused_and_the_previous_step_keeps_serving(
        server: TorchServeProcess, probe: Callable[..., RemoteModel], tmp_path: Path) -> None:
    rm = probe(server, "corrupt-probe", workers=1)
    rm.publish_weights(probe_weights(1), step=1).wait(30)

    bad = {
        2: ("wrong shape", {"lin.weight": np.full((3, 4), 2.0, np.float32), "lin.bias": np.full((3,), 2.0, np.float32)}),
        3: ("missing key", {"lin.weight": np.full((2, 4), 3.0, np.float32)}),
    }
    reasons = {}
    for step, (what, weights) in bad.items():
        rm.store.publish(rm.name, weights, step=step)
        reasons[what] = _wait_for_log(server, rf"refusing step {step} of corrupt-probe")
        out, served = rm(probe_input(), return_step=True)
        assert served == 1 and probe_ok(out, 1), (what, served)
    _place_corrupt_step(rm.store, rm.name, 4, tmp_path / "scratch")
    reasons["checksum"] = _wait_for_log(server, r"refusing step 4 of corrupt-probe")
    out, served = rm(probe_input(), return_step=True)
    assert served == 1 and probe_ok(out, 1)
    _note("corrupt checkpoint | wrong-shaped and missing-key steps published into the store, a step with "
          "damaged bytes renamed into it | callers: 0 failed, still answered by step 1 | refused: "
          + "; ".join(f"{k}: {v.split('refusing', 1)[1][:160]}" for k, v in reasons.items()))

    assert re.search(r"size mismatch|shape", reasons["wrong shape"], re.I), reasons["wrong shape"]
    assert re.search(r"missing|lin\.bias", reasons["missing key"], re.I), reasons["missing key"]
    assert re.search(r"checksum|sha256", reasons["checksum"], re.I), reasons["checksum"]
    # The worker was not restarted, and the next good step is taken up.
    rm.publish_weights(probe_weights(5), step=5).wait(30)
    out, served = rm(probe_input(), return_step=True)
    assert served == 5 and probe_ok(out, 5)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (mounting needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs to fill: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(path: Path) -> Path:
    """Write ``path`` until the file system says ENOSPC."""
    chunk = bytes(4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)
    return path


def test_disk_full_while_publishing_is_a_clear_error_and_serving_goes_on(
        server: TorchServeProcess, probe: Callable[..., RemoteModel], small_tmpfs: Path) -> None:
    rm = probe(server, "full-probe", workers=1, store=small_tmpfs / "store")
    rm.publish_weights(probe_weights(1), step=1).wait(30)
    filler = _fill(small_tmpfs / "filler")
    with pytest.raises(StoreWriteError) as err:
        rm.publish_weights(probe_weights(2), step=2)
    message = str(err.value)
    _note(f"disk full | a 4 MiB tmpfs store filled to ENOSPC, then publish_weights | trainer got "
          f"StoreWriteError: {message[:200]} | callers: answered by step 1")
    assert "No space left" in message and "not published" in message and "Free space" in message
    assert rm.store.latest(rm.name) == 1 and rm.store.steps(rm.name)[-1] == 1
    assert rm.store.load(rm.name, 1).step == 1
    assert list((rm.store.model_dir(rm.name) / ".tmp").iterdir()) == []
    report = run_callers(rm, callers=8, seconds=1.0)
    assert report.failures == [] and set(report.last_steps) == {1}
    filler.unlink()
    rm.publish_weights(probe_weights(2), step=2).wait(30)
    out, step = rm(probe_input(), return_step=True)
    assert step == 2 and probe_ok(out, 2)


def test_bridge_and_cli_keep_working_across_token_expiry(
        torchserve_factory: Callable[..., TorchServeProcess], probe: Callable[..., RemoteModel]) -> None:
    srv = torchserve_factory(extra_env={"TS_TOKEN_EXPIRATION_TIME_MIN": "0.05"})  # keys live 3 s
    rm = probe(srv, "expiry-probe", workers=1)  # registration outlives the first management key
    first_key = json.loads(srv.key_file.read_text())["inference"]["key"]
    report = run_callers(rm, callers=16, seconds=8.0)
    refreshes = rm.transport.client.stats.auth_refreshes
    assert report.failures == [] and report.inconsistent == [], report.failures[:5]
    assert refreshes >= 1 and json.loads(srv.key_file.read_text())["inference"]["key"] != first_key

    def cli(*argv: str) -> int:
        import io

        return archive_cli([*argv, "--management", srv.management_url, "--key-file", str(srv.key_file),
                            "--store", str(rm.store.root), "--model-store", str(srv.model_store)],
                           out=io.StringIO())

    assert cli("status") == 0
    time.sleep(3.5)  # the management key the CLI just used expires
    assert cli("status") == 0
    with ManagementClient(srv.management_url, key_file=srv.key_file) as c:
        time.sleep(3.5)
        assert rm.name in c.list_models()
    _note(f"token expiry | TS_TOKEN_EXPIRATION_TIME_MIN=0.05 (3 s keys) | {report.line()} | "
          f"inference key refreshes {refreshes}; bray-archive status and ManagementClient after expiry: ok")


# -- security defaults ----------------------------------------------------------------------


def test_bundled_config_keeps_token_auth_on_loopback_addresses_and_allowed_urls_closed() -> None:
    props = read_properties(config_path())
    assert props.get("disable_token_authorization", "false").lower() != "true"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert re.fullmatch(r"https?://127\.0\.0\.1:\d+", props[key]), (key, props[key])
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert props[key] == "127.0.0.1", (key, props[key])
    pattern = re.compile(props["allowed_urls"])
    for url in ("http://example.com/m.mar", "https://127.0.0.1/m.mar", "file:///tmp/m.mar", "/tmp/m.mar",
                "s3://bucket/m.mar", "m.mar"):
        assert not pattern.fullmatch(url) and not pattern.match(url), url
    assert props.get("use_env_allowed_urls", "false").lower() != "true"
    assert props.get("install_py_dep_per_model", "false").lower() == "false"


def test_running_server_needs_keys_and_listens_on_loopback_only(server: TorchServeProcess) -> None:
    import psutil

    for url in (f"{server.inference_url}/ping", f"{server.management_url}/models"):
        resp = requests.get(url, timeout=10)
        assert resp.status_code == 400 and resp.json()["type"] == "InvalidKeyException", (url, resp.text)
    deadline = time.monotonic() + 20  # the gRPC pair opens a moment after /ping answers
    while True:
        listening = [c.laddr for c in psutil.Process(server.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        if len(listening) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ports = {_port(server.inference_url), _port(server.management_url), _port(server.metrics_url), *server.grpc_ports}
    assert {addr.port for addr in listening} >= ports, listening
    for addr in listening:  # Java binds IPv6 sockets: 127.0.0.1 shows as ::ffff:127.0.0.1
        ip = ipaddress.ip_address(addr.ip)
        ip = getattr(ip, "ipv4_mapped", None) or ip
        assert ip == ipaddress.ip_address("127.0.0.1"), listening


@pytest.fixture(scope="module")
def packed_mar(server: TorchServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid bray archive of StepProbe in the server's model store (not registered)."""
    import torch

    from bray.archiver.pack import pack_archive
    from bray.export import export_model

    store = CheckpointStore(tmp_path_factory.mktemp("outside-store"))
    export_model(StepProbe(), (torch.zeros(1, 4),), dest=store.export_dir("inside"), onnx=False)
    store.publish("inside", probe_weights(1))
    return pack_archive(store, "inside", step=None, model_store=server.model_store).path


@pytest.mark.parametrize(
    "where",
    ["absolute", "file-url", "http-url", "parent-of-store"],
    ids=["absolute-path", "file-url", "http-url", "dot-dot-from-the-store"],
)
def test_registering_a_mar_from_outside_the_model_store_is_refused(
        server: TorchServeProcess, packed_mar: Path, tmp_path: Path, where: str) -> None:
    outside = tmp_path / "outside.mar"
    shutil.copy(packed_mar, outside)
    above = server.model_store.parent / "outside.mar"
    shutil.copy(packed_mar, above)
    url = {"absolute": str(outside), "file-url": f"file://{outside}", "http-url": "http://127.0.0.1:9/outside.mar",
           "parent-of-store": "../outside.mar"}[where]
    with ManagementClient(server.management_url, key_file=server.key_file) as client:
        try:
            with pytest.raises(ManagementError) as err:
                client.register(url, model_name="outside", initial_workers=0)
        finally:
            above.unlink()
        assert err.value.status in (400, 404), err.value
        assert "outside" not in client.list_models()


_SOURCE_DIRS = ("bray", "handlers", "bridge", "archiver", "ts_config")
_UNSAFE = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", re.M), "pickle-family import"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),
]


def test_no_code_path_unpickles_request_data_or_checkpoints() -> None:
    findings = []
    for folder in _SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for pattern, what in _UNSAFE:
                for m in pattern.finditer(text):
                    findings.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
            for m in re.finditer(r"\btorch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    findings.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert findings == []
    # The checkpoint format is safetensors; the wire format is bray.wire (a JSON header and raw buffers).
    store_src = "".join(p.read_text() for p in sorted((ROOT / "bray" / "store").glob("*.py")))
    assert "safetensors" in store_src and not re.search(r"(?<!safetensors\.)torch\.save\(", store_src)
