"""Triton's client library calls a bray-serve model on a real TorchServe, over the Open Inference Protocol.

``tritonclient.http`` is what a user of another serving system already has: it posts to
``/v2/models/<name>/infer``, which TorchServe 0.12 routes to the model's default version.
Token authorization stays on, so every call carries the inference key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

import bray
from bray.errors import ModelNotFoundError
from bray.torchserve.launcher import TorchServeProcess
from bray.torchserve.management import ManagementClient
from tests.models import PolicyMLP

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the test extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

OBS = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
NAME = "oip_policy"


@pytest.fixture
def served(torchserve: TorchServeProcess, tmp_path: Path) -> Iterator[tuple[bray.RemoteModel, torch.nn.Module]]:
    bray.init(store=tmp_path / "store", model_store=torchserve.model_store, inference_url=torchserve.inference_url,
              management_url=torchserve.management_url, key_file=torchserve.key_file)
    net = PolicyMLP()
    rm = bray.RemoteModel(NAME, model=net, forward_args=(OBS,), num_workers=1)
    try:
        yield rm, net
    finally:
        rm.close()
        with ManagementClient(torchserve.management_url, key_file=torchserve.key_file, timeout_s=120) as client:
            try:
                client.unregister(NAME)
            except ModelNotFoundError:
                pass


def infer(client: Any, server: TorchServeProcess, x: np.ndarray, *, binary: bool, outputs: bool = True) -> Any:
    inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    requested = [httpclient.InferRequestedOutput("OUTPUT__0", binary_data=binary)] if outputs else None
    return client.infer(NAME, [inp], outputs=requested, headers=server.headers("inference"))


def reference(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize(("binary", "outputs"), [(False, True), (True, True), (True, False)],
                         ids=["json", "binary-extension", "binary-default-outputs"])
def test_tritonclient_outputs_equal_the_torch_module(
    served: tuple[bray.RemoteModel, torch.nn.Module], torchserve: TorchServeProcess, binary: bool, outputs: bool,
) -> None:
    rm, net = served
    client = httpclient.InferenceServerClient(url=torchserve.inference_url.removeprefix("http://"))
    try:
        result = infer(client, torchserve, OBS, binary=binary, outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), reference(net, OBS), rtol=1e-5, atol=1e-5)
        answer = result.get_response()
        assert answer["model_name"] == NAME and answer["parameters"]["step"] == rm.step == 0
    finally:
        client.close()


def test_the_oip_answer_follows_published_weights_and_bad_requests_say_why(
    served: tuple[bray.RemoteModel, torch.nn.Module], torchserve: TorchServeProcess,
) -> None:
    rm, _ = served
    client = httpclient.InferenceServerClient(url=torchserve.inference_url.removeprefix("http://"))
    try:
        newer = PolicyMLP()
        rm.publish_weights(newer.state_dict()).wait(timeout_s=60)
        result = infer(client, torchserve, OBS, binary=True)
        assert result.get_response()["parameters"]["step"] == rm.step == 1
        np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), reference(newer, OBS), rtol=1e-5, atol=1e-5)

        wrong = httpclient.InferInput("INPUT__0", [5, 63], "FP32")
        wrong.set_data_from_numpy(OBS[:, :63].copy(), binary_data=False)
        with pytest.raises(InferenceServerException, match=r"expected \[batch, 64\]"):
            client.infer(NAME, [wrong], headers=torchserve.headers("inference"))
        with pytest.raises(InferenceServerException, match="InvalidKeyException|Token Authorization"):
            inp = httpclient.InferInput("INPUT__0", list(OBS.shape), "FP32")
            inp.set_data_from_numpy(OBS)
            client.infer(NAME, [inp])  # no key: token authorization is on
    finally:
        client.close()


def test_without_the_key_tritonclient_shows_torchserves_refusal_and_the_plugin_sends_the_key(
    served: tuple[bray.RemoteModel, torch.nn.Module], torchserve: TorchServeProcess, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a tritonclient user without the inference key gets, and the way out.

    TorchServe's frontend refuses the call before our handler runs, with its own JSON
    (``{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed..."}``);
    tritonclient reads only ``{"error": ...}``, so its message starts ``an exception occurred
    in the client while decoding the response: 'error'`` and has TorchServe's body after it.
    Both are theirs, not ours to change: asserted as they are. The way out is
    :class:`~bray.torchserve.InferenceKeyPlugin` (or ``headers=`` with the key, the README's
    example); with no key file to read, the plugin says so before anything is sent.
    """
    from bray.errors import AuthError
    from bray.torchserve import InferenceKeyPlugin

    _, net = served
    url = torchserve.inference_url.removeprefix("http://")
    inp = httpclient.InferInput("INPUT__0", list(OBS.shape), "FP32")
    inp.set_data_from_numpy(OBS)
    client = httpclient.InferenceServerClient(url=url)
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.infer(NAME, [inp])
        said = str(refused.value)
        assert "while decoding the response: 'error'" in said, said  # tritonclient's words
        assert "InvalidKeyException" in said and "Token Authorization failed" in said, said  # TorchServe's body
        assert refused.value.status() == "400"

        client.register_plugin(InferenceKeyPlugin(key_file=torchserve.key_file))
        result = client.infer(NAME, [inp])
        np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), reference(net, OBS), rtol=1e-5, atol=1e-5)
    finally:
        client.close()

    monkeypatch.delenv("BRAY_KEY_FILE", raising=False)
    monkeypatch.setenv("BRAY_SERVER_DIR", str(tmp_path / "no-server"))
    monkeypatch.chdir(tmp_path)
    client = httpclient.InferenceServerClient(url=url)
    try:
        client.register_plugin(InferenceKeyPlugin())
        with pytest.raises(AuthError, match=r"no TorchServe key file found.*InferenceKeyPlugin\(key_file=\.\.\.\)"):
            client.infer(NAME, [inp])
    finally:
        client.close()
