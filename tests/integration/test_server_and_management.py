"""A real TorchServe with the bundled config, driven through ManagementClient.

One session server serves most tests; tests that need another configuration (model API
off, keys that expire in seconds, side-by-side instances) start their own.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import requests

from bray.errors import (
    AuthError,
    BrayTimeoutError,
    ManagementError,
    ModelApiDisabledError,
    ModelNotFoundError,
    ServerUnreachableError,
    VersionExistsError,
)
from bray.torchserve.launcher import TorchServeProcess, free_ports
from bray.torchserve.auth import TokenAuth
from bray.torchserve.management import ManagementClient, ModelVersion
from bray.ts_config import config_path, read_properties

HANDLER = '''\
"""Docs-style custom handler: answers JSON naming the archive version."""
import json


class EchoHandler:
    def __init__(self):
        self.initialized = False
        self.version = None

    def initialize(self, context):
        self.version = context.manifest["model"].get("modelVersion")
        self.initialized = True

    def handle(self, data, context):
        out = []
        for idx, _ in enumerate(data):
            context.set_response_header(idx, "X-Bray-Step", str(self.version))
            out.append(json.dumps({"version": self.version}))
        return out
'''


# A bray handler from before weight sets, as far as a client sees: bray.wire answers with
# X-Bray-Step, and the X-Bray-Weights request header ignored (the model's own weights answer).
OLD_BRAY_HANDLER = '''\
import numpy as np
from bray import wire


class OldBrayHandler:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        out = []
        for idx, request in enumerate(data):
            rows = wire.decode(request.get("body") or request.get("data"))["args"][0].shape[0]
            context.set_response_header(idx, "X-Bray-Step", "7")
            context.set_response_content_type(idx, wire.CONTENT_TYPE)
            out.append(wire.encode(np.zeros((rows, 2), np.float32)))
        return out
'''


def build_mar(dest_dir: Path, *, name: str, version: str, work: Path, handler_source: str = HANDLER) -> Path:
    """Pack the echo handler (or ``handler_source``) as ``<dest_dir>/<name>-<version>.mar`` with torch-model-archiver."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    work.mkdir(parents=True, exist_ok=True)
    handler = work / "echo_handler.py"
    handler.write_text(handler_source)
    generate_model_archive(ModelArchiverConfig(
        model_name=name, handler=str(handler), version=version, export_path=str(work), force=True,
    ))
    dest = dest_dir / f"{name}-{version}.mar"
    shutil.move(str(work / f"{name}.mar"), dest)
    return dest


@pytest.fixture(scope="module")
def archives(torchserve: TorchServeProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("mar")
    return {v: build_mar(torchserve.model_store, name="echo", version=v, work=work) for v in ("1.0", "2.0")}


@pytest.fixture
def client(torchserve: TorchServeProcess) -> ManagementClient:
    with ManagementClient(torchserve.management_url, key_file=torchserve.key_file) as c:
        yield c


@pytest.fixture
def echo(client: ManagementClient, archives: dict[str, Path]) -> str:
    """``echo`` registered as versions 1.0 (the default) and 2.0; unregistered after."""
    client.register(archives["1.0"].name)
    client.register(archives["2.0"].name, initial_workers=1, batch_size=4, max_batch_delay_ms=5)
    yield "echo"
    if "echo" in client.list_models():
        client.unregister("echo")


def predict(server: TorchServeProcess, path: str) -> requests.Response:
    return requests.post(f"{server.inference_url}/predictions/{path}", json={"x": 1},
                         headers=server.headers("inference"), timeout=30)


# -- the server and its config -----------------------------------------------------------


def test_bundled_config_keys() -> None:
    props = read_properties(config_path())
    assert props["enable_model_api"] == "true"
    assert props["enable_envvars_config"] == "true"
    assert "disable_token_authorization" not in props
    assert props["inference_address"] == "http://127.0.0.1:8080"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("7070", "7071")
    assert not any(v.startswith((".", "logs")) for v in props.values()), "relative paths resolve against cwd"


def test_ping_needs_the_inference_key(torchserve: TorchServeProcess) -> None:
    url = f"{torchserve.inference_url}/ping"
    ok = requests.get(url, headers=torchserve.headers("inference"), timeout=10)
    assert ok.status_code == 200 and ok.json()["status"] == "Healthy"
    for headers in ({}, torchserve.headers("management"), {"Authorization": "Bearer wrong"}):
        refused = requests.get(url, headers=headers, timeout=10)
        # TorchServe 0.12 answers token failures with 400 InvalidKeyException, not 401.
        assert refused.status_code == 400 and refused.json()["type"] == "InvalidKeyException"


def test_instance_files_stay_in_its_workdir(torchserve: TorchServeProcess) -> None:
    assert torchserve.key_file.is_file()
    assert set(json.loads(torchserve.key_file.read_text())) == {"management", "inference", "API"}
    pid_file = torchserve.tmp_dir / ".model_server.pid"
    assert int(pid_file.read_text()) == torchserve.pid
    assert (torchserve.log_dir / "ts_log.log").is_file()


def test_no_snapshots_and_no_per_request_log_files(torchserve: TorchServeProcess, echo: str) -> None:
    for _ in range(3):
        assert predict(torchserve, echo).status_code == 200
    names = {p.name for p in torchserve.log_dir.iterdir()}
    assert "config" not in names, "config snapshots should be off (--ncs)"
    assert not names & {"access_log.log", "model_metrics.log", "ts_metrics.log"}, names


def test_handler_response_header_reaches_the_client(torchserve: TorchServeProcess, echo: str) -> None:
    resp = predict(torchserve, f"{echo}/2.0")
    assert resp.status_code == 200
    assert resp.headers["X-Bray-Step"] == "2.0"
    assert resp.json() == {"version": "2.0"}


# -- every ManagementClient method ------------------------------------------------------


def test_register_versions_default_scale_unregister(torchserve: TorchServeProcess, client: ManagementClient,
                                                    archives: dict[str, Path]) -> None:
    out = client.register(archives["1.0"].name)
    assert "registered" in out["status"]
    client.register(archives["2.0"].name, batch_size=4, max_batch_delay_ms=5, response_timeout_s=30)
    assert "echo" in client.list_models()

    versions = {v.version: v for v in client.versions("echo")}
    assert set(versions) == {"1.0", "2.0"}
    assert versions["1.0"].is_default and not versions["2.0"].is_default  # the first stays default
    assert isinstance(versions["2.0"], ModelVersion)
    assert (versions["2.0"].batch_size, versions["2.0"].max_batch_delay_ms) == (4, 5)
    assert versions["2.0"].url == "echo-2.0.mar"
    assert predict(torchserve, "echo").json() == {"version": "1.0"}

    client.set_default("echo", "2.0")
    assert client.default_version("echo").version == "2.0"
    assert predict(torchserve, "echo").json() == {"version": "2.0"}
    assert predict(torchserve, "echo/1.0").json() == {"version": "1.0"}

    client.scale("echo", version="1.0", min_workers=2)
    mv = client.wait_ready("echo", "1.0", timeout_s=60)
    assert (mv.workers, mv.ready_workers, mv.min_workers, mv.is_default) == (2, 2, 2, False)
    client.scale("echo", version="1.0", min_workers=0, timeout_s=0)
    assert client.describe("echo", "1.0")[0].workers == 0
    with pytest.raises(BrayTimeoutError, match="not ready"):
        client.wait_ready("echo", "1.0", timeout_s=0.5, min_ready=1)

    with pytest.raises(ManagementError, match="default") as err:
        client.unregister("echo", "2.0")
    assert err.value.status == 403 and "set_default" in str(err.value)
    client.unregister("echo", "1.0")
    assert [v.version for v in client.versions("echo")] == ["2.0"]
    client.unregister("echo")
    assert "echo" not in client.list_models()


def test_unregister_all_versions_at_once(client: ManagementClient, echo: str) -> None:
    client.unregister(echo)
    with pytest.raises(ModelNotFoundError):
        client.versions(echo)


def test_list_models_follows_pages(client: ManagementClient, archives: dict[str, Path]) -> None:
    names = [f"page{i}" for i in range(3)]
    for name in names:
        client.register(archives["1.0"].name, model_name=name, initial_workers=0)
    try:
        client.page_size = 2  # three models and echo's absence: at least two pages
        assert set(names) <= set(client.list_models())
    finally:
        for name in names:
            client.unregister(name)


# -- errors, produced for real ----------------------------------------------------------


def test_duplicate_version_is_409(client: ManagementClient, echo: str, archives: dict[str, Path]) -> None:
    with pytest.raises(VersionExistsError, match="already registered") as err:
        client.register(archives["1.0"].name)
    assert err.value.status == 409


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.describe("nope"),
        lambda c: c.default_version("nope"),
        lambda c: c.set_default("nope", "1"),
        lambda c: c.scale("nope", min_workers=1),
        lambda c: c.unregister("nope", "1"),
        lambda c: c.register("nope.mar"),
    ],
    ids=["describe", "default_version", "set_default", "scale", "unregister", "register-missing-mar"],
)
def test_unknown_model_is_404(client: ManagementClient, call) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        call(client)
    assert err.value.status == 404


def test_connection_refused_says_what_to_do() -> None:
    (port,) = free_ports(1)
    with ManagementClient(f"http://127.0.0.1:{port}", key_file=None) as c:
        with pytest.raises(ServerUnreachableError, match="connection refused") as err:
            c.list_models()
    assert f"http://127.0.0.1:{port}" in str(err.value)
    assert "BRAY_MANAGEMENT_URL" in str(err.value) and "bray-archive server start" in str(err.value)
    assert err.value.reason == "refused"


@pytest.mark.parametrize(
    "url",
    ["http://example.com/echo.mar", "file://{outside}", "{outside}"],
    ids=["http-url", "file-url-outside-store", "absolute-path-outside-store"],
)
def test_allowed_urls_only_take_names_from_the_model_store(client: ManagementClient, archives: dict[str, Path],
                                                           tmp_path: Path, url: str) -> None:
    outside = tmp_path / "outside.mar"
    shutil.copy(archives["1.0"], outside)
    with pytest.raises(ManagementError) as err:
        client.register(url.format(outside=outside), model_name="outside")
    assert err.value.status == 404
    assert "outside" not in client.list_models()


def test_wrong_keys_give_auth_error_naming_the_key_file(torchserve: TorchServeProcess, tmp_path: Path) -> None:
    keys = json.loads(torchserve.key_file.read_text())
    for kind in ("management", "inference", "API"):
        keys[kind]["key"] = "wrong"
    bad = tmp_path / "key_file.json"
    bad.write_text(json.dumps(keys))
    with ManagementClient(torchserve.management_url, key_file=bad) as c:
        with pytest.raises(AuthError, match=str(bad)):
            c.list_models()


def test_missing_explicit_key_file_is_auth_error(torchserve: TorchServeProcess, tmp_path: Path) -> None:
    with ManagementClient(torchserve.management_url, key_file=tmp_path / "none.json") as c:
        with pytest.raises(AuthError, match="does not exist"):
            c.list_models()


def test_model_api_off_is_405_and_expired_keys_refresh(torchserve_factory, torchserve: TorchServeProcess,
                                                       archives: dict[str, Path]) -> None:
    # Both through TS_* variables, which the bundled config honours (enable_envvars_config).
    other = torchserve_factory(extra_env={"TS_ENABLE_MODEL_API": "false",
                                          "TS_TOKEN_EXPIRATION_TIME_MIN": "0.03"})  # keys live 1.8 s
    assert len({torchserve.grpc_ports, other.grpc_ports}) == 2
    shutil.copy(archives["1.0"], other.model_store)
    with ManagementClient(other.management_url, key_file=other.key_file) as c:
        with pytest.raises(ModelApiDisabledError, match="enable_model_api=true") as err:
            c.register(archives["1.0"].name)
        assert err.value.status == 405

        old = c.auth.key("management")
        time.sleep(2.5)
        refused = requests.get(f"{other.management_url}/models", headers={"Authorization": f"Bearer {old}"},
                               timeout=10)
        assert refused.status_code == 400  # expired
        assert c.list_models() == []  # refreshed through the API key, then retried
        assert other.ping(), "ping regenerates an expired inference key"
        assert c.auth.key("management") != old

    auth = TokenAuth(other.key_file, management_url=other.management_url)
    before = auth.key("inference")
    auth.refresh("inference")
    assert auth.key("inference") != before
    assert requests.get(f"{other.inference_url}/ping", headers=auth.headers("inference"), timeout=10).ok
    auth.close()


def test_two_servers_side_by_side(torchserve_factory, torchserve: TorchServeProcess) -> None:
    other = torchserve_factory()
    ports = {torchserve.inference_url, torchserve.management_url, torchserve.metrics_url,
             other.inference_url, other.management_url, other.metrics_url}
    assert len(ports) == 6 and set(torchserve.grpc_ports).isdisjoint(other.grpc_ports)
    assert other.ping() and torchserve.ping()
    import psutil

    java = psutil.Process(other.pid)
    other.stop()
    assert not java.is_running() or java.status() == psutil.STATUS_ZOMBIE
    assert not other.ping()
    assert torchserve.ping(), "stopping one instance must leave the other serving"
    with ManagementClient(other.management_url, key_file=other.key_file, timeout_s=5) as c:
        with pytest.raises(ServerUnreachableError):
            c.list_models()


def test_stop_takes_the_workers_down(torchserve_factory, archives: dict[str, Path]) -> None:
    import psutil

    other = torchserve_factory()
    shutil.copy(archives["1.0"], other.model_store)
    with ManagementClient(other.management_url, key_file=other.key_file) as c:
        c.register(archives["1.0"].name, initial_workers=1)
        c.wait_ready("echo", timeout_s=60)
    tree = psutil.Process(other.launcher_pid).children(recursive=True)
    assert any("model_service_worker" in " ".join(p.cmdline()) for p in tree)
    other.stop()
    gone, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive


def test_port_clash_fails_fast_with_logs(torchserve_factory, torchserve: TorchServeProcess) -> None:
    from bray.errors import ServerError

    port = int(torchserve.inference_url.rsplit(":", 1)[1])
    with pytest.raises((ServerError, BrayTimeoutError)) as err:
        torchserve_factory(inference_port=port, timeout_s=30)
    assert "ts_log.log" in str(err.value) or "torchserve.out" in str(err.value)
    assert torchserve.ping()


def test_a_weight_set_answer_that_does_not_name_its_weight_set_is_refused(torchserve: TorchServeProcess,
                                                                         client: ManagementClient,
                                                                         tmp_path: Path) -> None:
    """A server whose handler predates weight sets answers X-Bray-Weights requests with the model's own
    weights: the client refuses such an answer, saying so, instead of returning it as the clone's."""
    import asyncio
    import threading
    from types import SimpleNamespace

    import numpy as np

    from bray.bridge.direct import DirectTransport
    from bray.bridge.transport import Watermark
    from bray.errors import ServerError

    build_mar(torchserve.model_store, name="oldbray", version="1.0", work=tmp_path, handler_source=OLD_BRAY_HANDLER)
    client.register("oldbray-1.0.mar", initial_workers=1)
    idle = threading.Event()
    idle.set()
    registration = SimpleNamespace(  # what DirectTransport reads of a Registration: the version called
        name="oldbray", version=None, idle=idle, count=0,
        inference_auth=lambda: TokenAuth(torchserve.key_file, management_url=torchserve.management_url))
    own = DirectTransport(registration, inference_urls=[torchserve.inference_url], max_batch_samples=32,  # type: ignore[arg-type]
                          max_inflight=2, timeout_s=30, watermark=Watermark())
    clone = own.sibling("oldbray-clone-step-3")
    payload = {"args": [np.zeros((1, 4), np.float32)]}

    async def main() -> None:
        outputs, step = await own.submit(payload, 1)  # the model's own weights: answered
        assert step == 7 and outputs.shape == (1, 2)
        with pytest.raises(ServerError, match="predates weight sets.*dedicated=True"):
            await clone.submit(payload, 1)
        await own.aclose()

    try:
        asyncio.run(main())
    finally:
        client.unregister("oldbray")
