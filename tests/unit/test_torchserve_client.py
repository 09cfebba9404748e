"""bray.torchserve's clients with injected transports (no server): retry, failover, key refresh.

The management client gets a ``requests.Session`` with a transport adapter mounted that
answers as TorchServe 0.12 does; the inference client gets a scripted session from its
``session_factory``. The same paths run against a real TorchServe in
tests/integration/test_server_and_management.py, test_remote_model.py and test_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import requests
from aiohttp.client_reqrep import ConnectionKey
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from bray.errors import (
    AuthError,
    InputError,
    ManagementError,
    ModelApiDisabledError,
    ModelNotFoundError,
    NotServedError,
    ServerError,
    ServerUnreachableError,
    VersionExistsError,
)
from bray.torchserve.answers import answer_error
from bray.torchserve.auth import TokenAuth
from bray.torchserve.inference import InferenceClient
from bray.torchserve.management import ManagementClient

MGMT = "http://mgmt.test:8081"
NODE_A = "http://node-a.test:8080"
NODE_B = "http://node-b.test:8080"
# What TorchServe 0.12 answers a missing, wrong or expired key.
INVALID_KEY = (400, {"code": 400, "type": "InvalidKeyException",
                     "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"})


def write_keys(path: Path, *, management: str, inference: str, api: str = "api-key") -> None:
    path.write_text(json.dumps({"management": {"key": management, "expiration time": "2026-12-02T01:00:00Z"},
                                "inference": {"key": inference, "expiration time": "2026-12-02T01:00:00Z"},
                                "API": {"key": api}}))


def bearer(headers: Any) -> str:
    return str(headers.get("Authorization", "")).removeprefix("Bearer ")


# --- a requests transport that answers like TorchServe's management API -------------------


class Scripted(BaseAdapter):
    """Answers each request with ``answer(method, path, query, key)``: ``(status, json body)`` or an exception to raise."""

    def __init__(self, answer: Callable[[str, str, dict[str, list[str]], str], Any]) -> None:
        super().__init__()
        self.answer = answer
        self.seen: list[tuple[str, str, str]] = []  # (method, path, key sent)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        url = urlsplit(str(request.url))
        key = bearer(request.headers)
        self.seen.append((str(request.method), url.path, key))
        result = self.answer(str(request.method), url.path, parse_qs(url.query), key)
        if isinstance(result, BaseException):
            raise result
        status, body = result
        resp = requests.Response()
        resp.status_code = status
        resp.reason = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}.get(status, "")
        resp._content = b"" if body is None else json.dumps(body).encode()
        resp.headers = CaseInsensitiveDict({"Content-Type": "application/json"})
        resp.url = str(request.url)
        resp.request = request
        return resp

    def close(self) -> None:
        pass


def session_with(adapter: Scripted) -> requests.Session:
    session = requests.Session()
    session.mount("http://", adapter)
    return session


def reset() -> requests.ConnectionError:
    """What requests raises when the peer drops the connection."""
    return requests.ConnectionError(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))


def test_management_gets_are_retried_after_503s_and_resets_and_other_calls_are_not() -> None:
    answers: list[Any] = [(503, {"message": "starting"}), reset(), (200, {"models": [{"modelName": "policy"}]})]
    adapter = Scripted(lambda method, path, query, key: answers.pop(0) if method == "GET" else (503, {"message": "busy"}))
    with ManagementClient(MGMT, key_file=None, session=session_with(adapter)) as client:
        client.get_retry_delays_s = (0.0, 0.0)
        assert client.list_models() == ["policy"]
        assert [s[:2] for s in adapter.seen] == [("GET", "/models")] * 3

        with pytest.raises(ManagementError, match=r"registering policy-1.mar: TorchServe answered 503: busy") as err:
            client.register("policy-1.mar", initial_workers=0)
        assert err.value.status == 503
        assert [s[0] for s in adapter.seen[3:]] == ["POST"]  # a registration may have taken effect: never repeated

        answers[:] = [reset(), reset(), reset()]  # one more reset than retries: the error names it
        with pytest.raises(ServerUnreachableError, match=r"dropped the connection during GET /models \(connection reset\)"):
            client.list_models()


def test_management_refreshes_a_refused_key_once_through_the_api_key(tmp_path: Path) -> None:
    key_file = tmp_path / "key_file.json"
    write_keys(key_file, management="old", inference="inf")

    def answer(method: str, path: str, query: dict[str, list[str]], key: str) -> Any:
        if path == "/token":
            assert key == "api-key" and query == {"type": ["management"]}
            write_keys(key_file, management="new", inference="inf")  # TorchServe writes the new key to the file only
            return 200, None
        return (200, {"models": []}) if key == "new" else INVALID_KEY

    adapter = Scripted(answer)
    with ManagementClient(MGMT, key_file=key_file, session=session_with(adapter)) as client:
        assert client.list_models() == []
        assert adapter.seen == [("GET", "/models", "old"), ("GET", "/token", "api-key"), ("GET", "/models", "new")]

        write_keys(key_file, management="stale", inference="inf")
        adapter.answer = lambda method, path, query, key: (200, None) if path == "/token" else INVALID_KEY
        with pytest.raises(AuthError, match=f"refused the management key from {key_file} .*Token Authorization failed"):
            client.list_models()  # refused again after one refresh: said, not looped


# --- a scripted aiohttp-like session for the inference client ------------------------------

@dataclass
class Node:
    """One inference address: ``answer(key)`` gives ``(status, json body or bytes, step)`` or an
    exception to raise; ``refuses`` refuses connections like a closed port."""

    answer: Callable[[str], Any] = lambda key: (200, b"ok", 1)
    refuses: bool = False
    seen: list[str] = field(default_factory=list)  # the key each request sent


def in_turn(*answers: Any) -> Callable[[str], Any]:
    """Answers in this order, the last one from then on."""
    queue = list(answers)
    return lambda key: queue.pop(0) if len(queue) > 1 else queue[0]


class _Response:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status, self._body, self.headers = status, body, headers

    async def read(self) -> bytes:
        return self._body


class FakeNodes:
    """What ``InferenceClient(session_factory=...)`` is handed: ``post`` answers from the nodes' scripts."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        self.nodes = nodes
        self.closed = False

    def post(self, url: str, *, data: bytes, headers: dict[str, str]) -> Any:
        return self._exchange(url[: url.index("/predictions")], bearer(headers))

    async def close(self) -> None:
        self.closed = True

    @contextlib.asynccontextmanager
    async def _exchange(self, base: str, key: str) -> AsyncIterator[_Response]:
        node = self.nodes[base]
        node.seen.append(key)
        await asyncio.sleep(0)  # the network: concurrent callers all send before any is answered
        if node.refuses:
            split = urlsplit(base)
            conn_key = ConnectionKey(split.hostname, split.port, False, True, None, None, None)
            raise aiohttp.ClientConnectorError(conn_key, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
        result = node.answer(key)
        if isinstance(result, BaseException):
            raise result
        status, body, step = result
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        yield _Response(status, data, {"X-Bray-Step": str(step), "Content-Type": "application/json"})


def client_for(nodes: dict[str, Node], **kwargs: Any) -> InferenceClient:
    fake = FakeNodes(nodes)
    return InferenceClient(list(nodes), session_factory=lambda client: fake, **kwargs)


def test_inference_retries_5xx_and_dropped_connections_then_says_what_broke() -> None:
    node = Node(in_turn((503, {"message": "worker died"}, -1), aiohttp.ServerDisconnectedError(), (200, b"ok", 7)))
    client = client_for({NODE_A: node}, max_retries=2)
    reply = asyncio.run(client.predict("policy", b"x"))
    assert (reply.body, reply.step, reply.url) == (b"ok", 7, NODE_A)
    assert client.stats.retries == 2 and client.stats.connection_errors == 1 and len(node.seen) == 3

    node.answer = in_turn(aiohttp.ServerDisconnectedError())
    with pytest.raises(ServerError, match=r"broke 3 times during /predictions/policy \(last: connection reset\)") as err:
        asyncio.run(client.predict("policy", b"x"))
    assert err.value.reason == "reset"

    node.answer = in_turn((500, {"message": "engine crashed"}, -1))
    with pytest.raises(ServerError, match=f"/predictions/policy failed at {NODE_A} with 500: engine crashed"):
        asyncio.run(client.predict("policy", b"x"))
    assert len(node.seen) == 3 + 3 + 3  # max_retries=2: three tries each time

    node.answer = in_turn((400, {"message": "bad input: expected 4 features, got 3"}, -1))
    with pytest.raises(InputError, match=r"the server refused the request \(400\): bad input"):
        asyncio.run(client.predict("policy", b"x"))
    assert len(node.seen) == 10  # the caller's error: not retried


def test_inference_fails_over_to_the_other_node_and_probes_the_refusing_one_after_its_pause() -> None:
    a, b = Node(lambda key: (200, b"a", 1), refuses=True), Node(lambda key: (200, b"b", 1))
    client = client_for({NODE_A: a, NODE_B: b})
    now = [100.0]
    client._now = lambda: now[0]  # the balancer's clock, stepped by hand

    async def calls(n: int) -> list[str]:
        return [(await client.predict("policy", b"x")).url for _ in range(n)]

    assert asyncio.run(calls(4)) == [NODE_B] * 4  # A refused once, then it is set aside
    assert len(a.seen) == 1 and client.stats.connection_errors == 1

    now[0] += 0.6  # past A's 0.5 s pause; B goes down, A is back
    a.refuses, b.refuses = False, True
    assert asyncio.run(calls(1)) == [NODE_A]

    a.refuses = True  # both down: the client keeps trying for reconnect_timeout_s, then says why per node
    client.reconnect_timeout_s = 0.2
    with pytest.raises(ServerUnreachableError, match=f"{NODE_A}: connection refused, {NODE_B}: connection refused") as err:
        asyncio.run(client.predict("policy", b"x"))
    assert err.value.reason == "refused" and "bray-archive server start" in str(err.value)


def test_inference_refreshes_a_refused_key_once_for_concurrent_callers(tmp_path: Path) -> None:
    key_file = tmp_path / "key_file.json"
    write_keys(key_file, management="mk", inference="old")

    def token(method: str, path: str, query: dict[str, list[str]], key: str) -> Any:
        assert (method, path, key, query) == ("GET", "/token", "api-key", {"type": ["inference"]})
        write_keys(key_file, management="mk", inference="new")  # TorchServe writes the new key to the file only
        return 200, None

    adapter = Scripted(token)
    auth = TokenAuth(key_file, management_url=MGMT, session=session_with(adapter))
    node = Node(lambda key: (200, b"ok", 3) if key == "new" else (*INVALID_KEY, -1))
    client = client_for({NODE_A: node}, auth=auth)

    async def callers(n: int) -> list[Any]:
        return list(await asyncio.gather(*(client.predict("policy", b"x") for _ in range(n))))

    assert [r.step for r in asyncio.run(callers(3))] == [3, 3, 3]
    assert node.seen == ["old"] * 3 + ["new"] * 3
    assert [s[1] for s in adapter.seen] == ["/token"]  # one regeneration for three refused callers
    assert client.stats.auth_refreshes == 3

    node.answer = lambda key: (*INVALID_KEY, -1)  # refused again after a refresh: said, not looped
    with pytest.raises(AuthError, match=f"TorchServe at {NODE_A} refused the inference key \\(400: Token Authorization"):
        asyncio.run(client.predict("policy", b"x"))
    assert [s[1] for s in adapter.seen] == ["/token"] * 2


def test_a_key_file_rewritten_by_another_process_costs_a_rechecking_client_one_refused_call(tmp_path: Path) -> None:
    """recheck_s: the file is looked at every so often, and at once when its key is refused."""
    key_file = tmp_path / "key_file.json"
    write_keys(key_file, management="mk", inference="old")
    auth = TokenAuth(key_file, management_url=MGMT, recheck_s=3600.0)
    node = Node(lambda key: (200, b"ok", 3) if key == "new" else (*INVALID_KEY, -1))
    client = client_for({NODE_A: node}, auth=auth)
    assert auth.key("inference") == "old"
    write_keys(key_file, management="mk", inference="new")  # a restarted server, or another process's refresh
    assert auth.key("inference") == "old"  # not looked at again yet
    assert asyncio.run(client.predict("policy", b"x")).step == 3
    assert node.seen == ["old", "new"] and client.stats.auth_refreshes == 1  # read at the refusal, not regenerated
    assert TokenAuth(key_file, management_url=MGMT).key("inference") == "new"  # recheck_s 0: at every use


def test_a_refused_key_of_a_node_with_no_management_api_here_is_said_at_once(tmp_path: Path) -> None:
    """BRAY_MANAGEMENT_URL=none: no key can be regenerated from here. It looped, each node set aside
    0.25 s and asked again, until the caller's own timeout, never naming the key (a swapped key file)."""
    key_file = tmp_path / "key_file.json"
    write_keys(key_file, management="mk", inference="other-nodes-key")
    node = Node(lambda key: (*INVALID_KEY, -1))
    client = client_for({NODE_A: node}, auth=TokenAuth(key_file, management_url=""))
    with pytest.raises(AuthError, match="no management API is reachable from here to regenerate it") as err:
        asyncio.run(client.predict("policy", b"x"))
    assert err.value.key_file == str(key_file) and node.seen == ["other-nodes-key"]


# --- the one mapping from answers to errors ----------------------------------------------

@pytest.mark.parametrize(("api", "status", "body", "error", "said"), [
    ("inference", 404, {"type": "InputError", "message": "no weight set 'x' of 'policy'"}, InputError,
     "the server refused the request (404): no weight set 'x' of 'policy'"),
    ("inference", 404, {"message": "Model not found: policy"}, NotServedError,
     "/predictions/policy is not served at http://node-a.test:8080: Model not found: policy"),
    ("inference", 413, {"message": "body is 20480 bytes, 4096 over the limit"}, InputError,
     "the server refused the request (413): body is 20480 bytes"),
    ("inference", 507, {"message": "out of memory"}, ServerError, "/predictions/policy failed at"),
    ("inference", 400, INVALID_KEY[1], AuthError, "refused the inference key (400: Token Authorization failed"),
    ("management", 404, {"message": "Model not found: policy"}, ModelNotFoundError, "listing models: Model not found"),
    ("management", 404, {"message": "Given URL http://x/a.mar does not match any allowed URL(s)"}, ManagementError,
     "TorchServe refused the archive URL"),
    ("management", 409, {"message": "Model version 3 is already registered."}, VersionExistsError,
     "register it under another version"),
    ("management", 405, {"message": "Requested method is not allowed"}, ModelApiDisabledError, "enable_model_api=true"),
    ("management", 403, {"type": "InvalidModelVersionException", "message": "Cannot remove default version"},
     ManagementError, "make another version the default first"),
    ("management", 500, b"", ManagementError, "listing models: TorchServe answered 500: Internal Server Error"),
    ("management", 401, b"", AuthError, "refused the management key from /srv/key_file.json"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_every_answer_maps_to_its_error(api: Any, status: int, body: Any, error: type, said: str) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = NODE_A if api == "inference" else MGMT
    path = "/predictions/policy" if api == "inference" else "/models"
    err = answer_error(status, data, api=api, url=url, method="GET", path=path, what="listing models",
                       reason="Internal Server Error", key_file=Path("/srv/key_file.json"))
    assert type(err) is error and err.status == status
    assert said in str(err)


def test_the_public_names_still_import_from_their_old_homes() -> None:
    import bray.archiver
    import bray.torchserve
    import bray.ts_config.server
    from bray.torchserve import launcher

    for name in ("ManagementClient", "ModelVersion", "TokenAuth"):
        assert getattr(bray.archiver, name) is getattr(bray.torchserve, name)
    assert set(bray.ts_config.server.__all__) == set(launcher.__all__)
    for name in launcher.__all__:
        assert getattr(bray.ts_config.server, name) is getattr(launcher, name)
