"""bray-archive against a real TorchServe from the bundled config (token auth on).

Issue 4's scenario: steps 10, 20, 30 published into a store with weights all equal to
the step, each archived through ``main(argv)``; ``/predictions/NAME/20`` answers with
step 20's weights while the default is 30; rollback; prune; and the error answers
(version exists, unknown model, model API disabled) produced for real.

One server for the module (the session's), one worker per version, batch size 1. The
tests run in file order and share the registered versions.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from bray import wire
from bray.archiver import ManagementClient, TokenAuth, read_archive_config, watch_and_publish
from bray.archiver.cli import main
from bray.store import CheckpointStore
from bray.torchserve.launcher import TorchServeProcess

NAME = "arch-policy"
X = [[1.0, 1.0, 1.0, 1.0]]


def _weights(step: int) -> dict[str, np.ndarray]:
    return {"weight": np.full((2, 4), step, np.float32), "bias": np.full((2,), step, np.float32)}


def _expected(step: int) -> list[list[float]]:
    return [[5.0 * step, 5.0 * step]]  # 4 ones times step, plus a bias of step


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> CheckpointStore:
    import torch

    from bray.export import export_model

    s = CheckpointStore(tmp_path_factory.mktemp("archiver-store"), keep_last=10)
    export_model(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), dest=s.export_dir(NAME), onnx=False)
    for step in (10, 20, 30):
        s.publish(NAME, _weights(step), step=step)
    return s


@pytest.fixture(scope="module")
def server(torchserve: TorchServeProcess) -> TorchServeProcess:
    return torchserve


@pytest.fixture(scope="module")
def cli(server: TorchServeProcess, store: CheckpointStore) -> Any:
    """Run ``bray-archive`` against this server; returns (exit code, stdout)."""

    def run(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        common = ["--management", server.management_url, "--key-file", str(server.key_file)]
        command, rest = argv[0], list(argv[1:])
        if command in ("publish", "status", "versions", "watch"):
            common += ["--store", str(store.root)]
        if command in ("publish", "status", "versions", "watch", "prune", "remove"):
            common += ["--model-store", str(server.model_store)]
        code = main([command, *rest, *common], out=out)
        return code, out.getvalue()

    return run


@pytest.fixture(scope="module")
def published(cli: Any) -> list[dict[str, Any]]:
    """Versions 10, 20, 30 registered through the CLI, 30 the default."""
    results = []
    for step in (10, 20, 30):
        extra = ["--set-default"] if step == 30 else []
        code, out = cli("publish", "--name", NAME, "--step", str(step), "--json", "--no-progress", *extra)
        assert code == 0, out
        results.append(json.loads(out))
    return results


@pytest.fixture(scope="module")
def client(server: TorchServeProcess) -> ManagementClient:
    with ManagementClient(server.management_url, key_file=server.key_file) as c:
        yield c


def _predict(server: TorchServeProcess, path: str, *, binary: bool = False) -> requests.Response:
    headers = TokenAuth(server.key_file, management_url=server.management_url).headers("inference")
    url = f"{server.inference_url}/predictions/{path}"
    if binary:
        body = wire.encode(np.asarray(X, np.float32))
        return requests.post(url, data=body, headers={**headers, "Content-Type": wire.CONTENT_TYPE}, timeout=30)
    return requests.post(url, json=X, headers=headers, timeout=30)


def _answer(resp: requests.Response) -> tuple[int, list[list[float]]]:
    assert resp.status_code == 200, resp.text
    if resp.headers.get("content-type", "").startswith(wire.CONTENT_TYPE):
        value = np.asarray(wire.decode(resp.content)).tolist()
    else:
        value = resp.json()
    return int(resp.headers["X-Bray-Step"]), value


def test_publish_registers_each_step_as_a_ready_version(published: list[dict[str, Any]], server: TorchServeProcess) -> None:
    assert [(p["version"], p["step"], p["live"], p["ready_workers"]) for p in published] == [
        ("10", 10, False, 1), ("20", 20, False, 1), ("30", 30, False, 1)]
    assert [p["is_default"] for p in published] == [True, False, True]  # first one, then --set-default
    for p in published:
        assert Path(p["archive_path"]) == server.model_store / f"{NAME}-{p['version']}.mar"


def test_the_cli_publishes_with_the_options_defaults(published: list[dict[str, Any]]) -> None:
    from bray.handlers.options import ServingOptions

    defaults = ServingOptions()
    for p in published:
        assert read_archive_config(Path(p["archive_path"])).options == defaults
        assert (p["batch_size"], p["max_batch_delay_ms"], p["workers"]) == (
            defaults.batch_size, defaults.max_batch_delay_ms, defaults.workers)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_pinned_version_answers_with_its_steps_weights(published: Any, server: TorchServeProcess, binary: bool) -> None:
    assert _answer(_predict(server, f"{NAME}/20", binary=binary)) == (20, _expected(20))
    assert _answer(_predict(server, NAME, binary=binary)) == (30, _expected(30))  # the default


def test_versions_and_status_report_the_steps_served(published: Any, cli: Any) -> None:
    code, out = cli("versions", NAME, "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["version"], r["step"], r["is_default"], r["live"]) for r in rows] == [
        ("10", 10, False, False), ("20", 20, False, False), ("30", 30, True, False)]
    code, out = cli("status")
    assert code == 0
    assert NAME in out and "VERSION" in out and "1/1" in out


def test_publishing_the_same_step_twice_fails_saying_the_version_exists(
        published: Any, cli: Any, server: TorchServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in server.model_store.iterdir())
    code, _ = cli("publish", "--name", NAME, "--step", "20")
    err = capsys.readouterr().err
    assert code == 1
    assert "version 20 of 'arch-policy' is already registered" in err and "Traceback" not in err
    assert sorted(p.name for p in server.model_store.iterdir()) == before


def test_register_conflict_from_torchserve_is_a_version_exists_error(published: Any, client: ManagementClient) -> None:
    from bray.errors import VersionExistsError

    with pytest.raises(VersionExistsError, match="409|already"):
        client.register(f"{NAME}-20.mar", model_name=NAME, initial_workers=0)


def test_unknown_model_fails_with_exit_1(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (("versions", "no-such-model"), "model not found: no-such-model"),
        (("rollback", "no-such-model"), "model not found: no-such-model"),
        (("set-default", NAME, "999"), "model version 999 does not exist for model arch-policy"),
    ]
    for argv, said in cases:
        code, _ = cli(*argv)
        err = capsys.readouterr().err
        assert code == 1, argv
        assert said in err.lower() and "Traceback" not in err, err


def test_rollback_moves_the_default_to_the_previous_version(published: Any, cli: Any, server: TorchServeProcess,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("set-default", NAME, "30")[0] == 0
    code, out = cli("rollback", NAME, "--json")
    assert code == 0 and json.loads(out)["version"] == "20"
    assert _answer(_predict(server, NAME)) == (20, _expected(20))
    assert cli("rollback", NAME)[0] == 0
    assert _answer(_predict(server, NAME)) == (10, _expected(10))
    code, _ = cli("rollback", NAME)
    assert code == 1 and "no version older than the default 10" in capsys.readouterr().err
    assert cli("set-default", NAME, "30")[0] == 0


def test_prune_removes_the_oldest_versions_but_never_the_default(published: Any, cli: Any, client: ManagementClient,
                                                                 server: TorchServeProcess) -> None:
    assert cli("set-default", NAME, "10")[0] == 0  # the oldest is the default: it must survive
    code, out = cli("prune", NAME, "--keep", "1", "--json")
    assert code == 0 and json.loads(out)["removed"] == ["20"]
    assert sorted(v.version for v in client.versions(NAME)) == ["10", "30"]
    assert not (server.model_store / f"{NAME}-20.mar").exists()
    assert (server.model_store / f"{NAME}-10.mar").exists()
    assert cli("set-default", NAME, "30")[0] == 0
    code, out = cli("prune", NAME, "--keep", "0", "--json")
    assert code == 0 and json.loads(out)["removed"] == ["10"]
    assert [v.version for v in client.versions(NAME)] == ["30"]


def test_live_version_follows_the_store(published: Any, cli: Any, store: CheckpointStore,
                                        server: TorchServeProcess) -> None:
    code, out = cli("publish", "--name", NAME, "--live", "--json")
    assert code == 0
    assert (json.loads(out)["version"], json.loads(out)["live"]) == ("latest", True)
    assert _answer(_predict(server, f"{NAME}/latest")) == (30, _expected(30))
    store.publish(NAME, _weights(40), step=40)
    deadline = time.monotonic() + 30
    while (answer := _answer(_predict(server, f"{NAME}/latest")))[0] != 40 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answer == (40, _expected(40))
    code, out = cli("status", NAME, "--json")
    latest = [v for v in json.loads(out)[0]["versions"] if v["version"] == "latest"]
    assert latest[0]["step"] == 40 and latest[0]["live"]


def test_scale_changes_the_worker_count(published: Any, cli: Any) -> None:
    code, out = cli("scale", NAME, "--workers", "2", "--model-version", "30", "--json")
    assert code == 0 and (json.loads(out)["workers"], json.loads(out)["ready_workers"]) == (2, 2)
    code, out = cli("scale", NAME, "--workers", "1", "--model-version", "30", "--json")
    assert code == 0 and json.loads(out)["workers"] == 1


def test_watch_publishes_every_nth_step_as_it_appears(published: Any, store: CheckpointStore,
                                                      client: ManagementClient, server: TorchServeProcess) -> None:
    with watch_and_publish(store, NAME, 50, client=client, model_store=server.model_store,
                           poll_interval_s=0.2) as handle:
        store.publish(NAME, _weights(45), step=45)
        store.publish(NAME, _weights(50), step=50)
        deadline = time.monotonic() + 60
        while not handle.published and not handle.errors and time.monotonic() < deadline:
            time.sleep(0.2)
    assert handle.errors == []
    assert [v.version for v in handle.published] == ["50"]
    assert "45" not in {v.version for v in client.versions(NAME)}
    assert _answer(_predict(server, f"{NAME}/50")) == (50, _expected(50))


def test_a_fast_trainer_with_short_retention_gets_every_due_version_pinned_to_its_step(
        tmp_path: Path, client: ManagementClient, server: TorchServeProcess) -> None:
    """Issue 21: with keep_last small and a trainer faster than registration, due steps were
    pruned before the watch reached them (skipped without a word), and a version named N could
    pin another step. Here every 10th step up to 40 becomes version N serving step N."""
    import threading

    import torch

    from bray.export import export_model

    name = "arch-fast"
    fast = CheckpointStore(tmp_path / "store", keep_last=2)
    export_model(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), dest=fast.export_dir(name), onnx=False)
    fast.publish(name, _weights(0), step=0)

    def trainer() -> None:
        for step in range(1, 46):
            fast.publish(name, _weights(step), step=step)
            time.sleep(0.02)  # publishing on while the watch packs and registers

    try:
        with watch_and_publish(fast, name, 10, client=client, model_store=server.model_store,
                               poll_interval_s=0.05, workers=1) as handle:
            thread = threading.Thread(target=trainer)
            thread.start()
            thread.join()
            deadline = time.monotonic() + 180
            while len(handle.published) + len(handle.errors) < 4 and time.monotonic() < deadline:
                time.sleep(0.2)
        assert handle.errors == []
        assert sorted(v.version for v in handle.published) == ["10", "20", "30", "40"]
        for n in (10, 20, 30, 40):
            assert read_archive_config(server.model_store / f"{name}-{n}.mar").step == n
            assert _answer(_predict(server, f"{name}/{n}")) == (n, _expected(n))
        fast.publish(name, _weights(46), step=46)
        assert fast.steps(name) == [45, 46]  # held only until archived: the store does not grow
    finally:
        _remove_model(server, name)


def test_model_api_disabled_is_explained_and_leaves_no_archive(
        store: CheckpointStore, torchserve_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    locked = torchserve_factory(properties={"enable_model_api": "false"})
    code = main(["publish", "--name", NAME, "--step", "30", "--store", str(store.root),
                 "--model-store", str(locked.model_store), "--management", locked.management_url,
                 "--key-file", str(locked.key_file)])
    err = capsys.readouterr().err
    assert code == 1
    assert "enable_model_api=true" in err
    assert [p.name for p in locked.model_store.iterdir()] == []


@pytest.fixture(scope="module", autouse=True)
def _unregister_at_end(server: TorchServeProcess) -> Any:
    """Leave the shared session server as we found it."""
    yield
    _remove_model(server, NAME)
    shutil.rmtree(server.model_store / ".unused", ignore_errors=True)


def _remove_model(server: TorchServeProcess, name: str) -> None:
    """Unregister every version of ``name`` and delete its archives (best effort)."""
    with ManagementClient(server.management_url, key_file=server.key_file) as c:
        try:
            c.unregister(name)
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass
    for mar in server.model_store.glob(f"{name}-*.mar"):
        mar.unlink()
    shutil.rmtree(server.model_store / ".unused", ignore_errors=True)


# -- status reads the store each live version follows; remove takes whole models -------------

CLONE = f"{NAME}-clone-step-20"


@pytest.fixture(scope="module")
def clone(cli: Any, store: CheckpointStore, server: TorchServeProcess) -> Any:
    """A clone of step 20 as RemoteModel.clone makes one: versions ``latest`` (default) and ``20``."""
    store.record_clone_origin(CLONE, source=NAME, step=20)
    store.seed_clone(CLONE)
    for argv in (("--live",), ("--step", "20")):
        code, out = cli("publish", "--name", CLONE, *argv, "--json", "--no-progress")
        assert code == 0, out
    yield CLONE
    with ManagementClient(server.management_url, key_file=server.key_file) as c:
        for version in ("20", "latest"):
            try:
                c.unregister(CLONE, version)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
    for mar in server.model_store.glob(f"{CLONE}-*.mar"):
        mar.unlink()


def test_status_reads_the_store_each_live_version_follows(clone: str, server: TorchServeProcess,
                                                          store: CheckpointStore, tmp_path: Path) -> None:
    # Another run's store, the one --store names here, holds a model of the same name at step 0.
    other = CheckpointStore(tmp_path / "other-run")
    other.publish(CLONE, _weights(0), step=0)
    common = ["--store", str(other.root), "--model-store", str(server.model_store),
              "--management", server.management_url, "--key-file", str(server.key_file)]
    out = io.StringIO()
    assert main(["status", CLONE, "--json", *common], out=out) == 0
    rows = {v["version"]: v for v in json.loads(out.getvalue())[0]["versions"]}
    followed = str(store.root.resolve())
    assert (rows["latest"]["step"], rows["latest"]["live"], rows["latest"]["store"]) == (20, True, followed)
    assert (rows["20"]["step"], rows["20"]["live"], rows["20"]["store"]) == (20, False, followed)
    out = io.StringIO()
    assert main(["status", CLONE, *common], out=out) == 0
    latest = [line.split() for line in out.getvalue().splitlines() if line.split()[1:2] == ["latest"]]
    assert latest[0][3:5] == ["20", "(live)"] and latest[0][-1] == followed, out.getvalue()


def test_remove_refuses_an_unknown_name_and_removes_nothing(clone: str, cli: Any, client: ManagementClient,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = cli("remove", clone, "no-such-model")
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "no model 'no-such-model' is registered" in err and "nothing was removed" in err and clone in err
    assert sorted(v.version for v in client.versions(clone)) == ["20", "latest"]


def test_remove_unregisters_every_version_of_a_clone_and_deletes_its_archives(
        clone: str, cli: Any, client: ManagementClient, server: TorchServeProcess) -> None:
    assert sorted(server.model_store.glob(f"{clone}-*.mar")) != []
    code, out = cli("remove", clone, "--json")
    assert code == 0, out
    assert json.loads(out) == [{"name": clone, "removed": ["20", "latest"]}]  # the default last
    assert clone not in client.list_models()
    assert sorted(server.model_store.glob(f"{clone}-*.mar")) == []
    assert NAME in client.list_models()  # the model it was cloned from is left alone
