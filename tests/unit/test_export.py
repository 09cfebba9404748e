"""The export the server rebuilds from: structure, dynamic batch, no code execution on load."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bray.errors import ConfigError, EngineError
from bray.export import export_model, load_spec, load_torch_module
from tests.models import BranchyPolicy, DictPolicy, PolicyMLP


def test_spec_records_structure_dtypes_and_dynamic_batch(tmp_path: Path) -> None:
    model = DictPolicy().eval()
    spec = export_model(model, ({"x": torch.zeros(1, 4), "y": torch.zeros(1, 2)},), {"mask": torch.ones(1, 3)},
                        dest=tmp_path / "export", onnx=False)
    assert load_spec(tmp_path / "export") == spec
    assert [x.shape for x in spec.input_leaves] == [(4,), (2,), (3,)]
    assert [x.dtype for x in spec.output_leaves] == ["float32", "float32"]
    module = load_torch_module(tmp_path / "export")
    for batch in (1, 5, 64):  # exported from a batch of 1: the dimension must stay dynamic
        out = module({"x": torch.zeros(batch, 4), "y": torch.zeros(batch, 2)}, mask=torch.ones(batch, 3))
        assert out["logits"].shape == (batch, 3)


def test_the_rebuilt_module_skips_the_shape_checks_the_handler_already_made(tmp_path: Path) -> None:
    # The handler checks every input against spec.json; the export's own checks (a pre-hook,
    # and in torch 2.9+ a _guards_fn node) are removed on load (issue 24: ~15% of a forward).
    model = PolicyMLP().eval()
    export_model(model, (torch.zeros(2, 64),), dest=tmp_path / "export", onnx=False)
    module = load_torch_module(tmp_path / "export")
    assert not [n for n in module.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]
    assert not any(getattr(h, "__name__", "") == "_check_input_constraints_pre_hook"
                   for h in module._forward_pre_hooks.values())
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), model(x))


def test_inputs_without_a_batch_dimension_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch dimension"):
        export_model(PolicyMLP(), (np.float32(1.0),), dest=tmp_path / "export", onnx=False)


def test_missing_export_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="forward_args"):
        load_spec(tmp_path / "nothing")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # runs on unpickling
        return (Path.touch, (self.marker,))


def test_a_tampered_export_cannot_run_code(tmp_path: Path) -> None:
    export_model(PolicyMLP(), (torch.zeros(2, 64),), dest=tmp_path / "export", onnx=False)
    pt2 = tmp_path / "export" / "model.pt2"
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"x": _Evil(marker)}, payload)
    with zipfile.ZipFile(pt2) as src:
        entries = [(i, src.read(i.filename)) for i in src.infolist()]
    # torch.export.load unpickles the sample inputs, retrying without weights_only
    tampered = [i.filename for i, _ in entries if i.filename.endswith("sample_inputs/model.pt")]
    assert tampered, f"no sample-inputs pickle in model.pt2 to tamper with: {[i.filename for i, _ in entries]}"
    with zipfile.ZipFile(pt2, "w") as dst:
        for info, data in entries:
            dst.writestr(info, payload.getvalue() if info.filename in tampered else data)
    with pytest.raises(EngineError, match="cannot load the torch export"):
        load_torch_module(tmp_path / "export")
    assert not marker.exists(), "unpickling a tampered model.pt2 ran code"


def test_a_format_1_spec_still_loads(tmp_path: Path) -> None:
    """Stores exported by bray-serve 0.1 keep serving after an upgrade."""
    spec = export_model(DictPolicy().eval(), ({"x": torch.zeros(1, 4), "y": torch.zeros(1, 2)},),
                        {"mask": torch.ones(1, 3)}, dest=tmp_path / "export", onnx=False)
    v1 = spec.to_json() | {
        "format": 1,
        "inputs": {"k": "tuple", "items": [
            {"k": "tuple", "items": [{"k": "dict", "keys": ["x", "y"], "items": [
                {"k": "a", "dtype": "float32", "shape": [4]}, {"k": "a", "dtype": "float32", "shape": [2]}]}]},
            {"k": "dict", "keys": ["mask"], "items": [{"k": "a", "dtype": "float32", "shape": [3]}]}]},
        "outputs": {"k": "dict", "keys": ["logits", "value"], "items": [
            {"k": "a", "dtype": "float32", "shape": [3]},
            {"k": "tuple", "items": [{"k": "a", "dtype": "float32", "shape": [1]}]}]},
    }
    (tmp_path / "export" / "spec.json").write_text(json.dumps(v1))
    assert load_spec(tmp_path / "export") == spec


# --- modules torch.export refuses: the eager definition -------------------------------

POS = np.ones((2, 4), np.float32)  # x.sum() > 0: BranchyPolicy answers lin(x)
NEG = -POS  # x.sum() <= 0: it answers -lin(x)


def _answers(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def test_a_module_torch_export_refuses_is_recorded_eagerly_in_one_log_line(tmp_path: Path, caplog, capfd) -> None:
    net = BranchyPolicy(n=4, actions=3).eval()
    with caplog.at_level(logging.DEBUG, logger="bray.export"):
        spec = export_model(net, (torch.zeros(2, 4),), dest=tmp_path / "export", onnx=False)
    assert spec.has_eager and not spec.has_torch and load_spec(tmp_path / "export") == spec
    assert [x.shape for x in spec.output_leaves] == [(3,)]
    assert json.loads((tmp_path / "export" / "eager.json").read_text()) == {
        "class": "tests.models:BranchyPolicy", "kwargs": {"n": 4, "actions": 3}}
    assert not (tmp_path / "export" / "model.pt2").exists()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage() and warnings[0].exc_info is None
    message = warnings[0].getMessage()
    assert "torch.export could not export BranchyPolicy" in message and "eagerly" in message
    assert "tests.models:BranchyPolicy" in message and "must import tests.models" in message
    assert "def forward" not in capfd.readouterr().err  # torch's own print of the partial graph stays out
    rebuilt = load_torch_module(tmp_path / "export")
    rebuilt.load_state_dict(net.state_dict())
    for x in (POS, NEG):  # both branches of the control flow, as the module answers
        np.testing.assert_allclose(_answers(rebuilt, x), _answers(net, x))


def _local_class() -> torch.nn.Module:
    class Local(BranchyPolicy):
        pass

    return Local()


class _Tuples(BranchyPolicy):
    def __init__(self, n: int = 4) -> None:
        super().__init__(n=n)
        self.bray_init_kwargs = {"n": (n,)}


@pytest.mark.parametrize("make, match", [
    (_local_class, "defined inside a function.*move the class into a module"),
    (lambda: type("Script", (BranchyPolicy,), {"__module__": "__main__"})(), "defined in __main__.*PYTHONPATH"),
    (lambda: _Tuples(), "JSON values only"),
], ids=["function-body", "main", "tuple-kwargs"])
def test_a_class_a_server_cannot_rebuild_is_refused(tmp_path: Path, make, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        export_model(make(), (torch.zeros(2, 4),), dest=tmp_path / "export", onnx=False)
    assert "torch.export could not export" in str(info.value) and info.value.__cause__ is None
    assert not (tmp_path / "export").exists()


def test_constructor_arguments_that_are_not_recorded_are_refused(tmp_path: Path) -> None:
    net = BranchyPolicy(n=6)
    del net.bray_init_kwargs  # BranchyPolicy() would build n=4: the server's weights would not fit
    with pytest.raises(ConfigError, match=r"'lin.weight': \[2, 4\], the model has \[2, 6\].*bray_init_kwargs"):
        export_model(net, (torch.zeros(2, 6),), dest=tmp_path / "export", onnx=False)


def test_fallback_local_writes_the_spec_alone_and_onnx_says_use_torch(tmp_path: Path) -> None:
    spec = export_model(_local_class(), (torch.zeros(2, 4),), dest=tmp_path / "export", onnx=False, fallback="local")
    assert not spec.has_eager and not spec.has_torch and [x.shape for x in spec.input_leaves] == [(4,)]
    with pytest.raises(EngineError, match=r"only RemoteModel\(.*local_mode=True\) runs it"):
        load_torch_module(tmp_path / "export")
    with pytest.raises(EngineError, match="serve it with the torch engine") as info:
        export_model(BranchyPolicy(), (torch.zeros(2, 4),), dest=tmp_path / "onnx", onnx=True)
    assert info.value.__cause__ is None and len(str(info.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="fallback must be one of"):
        export_model(BranchyPolicy(), (torch.zeros(2, 4),), dest=tmp_path / "x", onnx=False, fallback="pickle")


def test_an_eager_definition_only_ever_builds_a_module_class(tmp_path: Path) -> None:
    export_model(BranchyPolicy(), (torch.zeros(2, 4),), dest=tmp_path / "export", onnx=False)
    eager = tmp_path / "export" / "eager.json"
    eager.write_text(json.dumps({"class": "os:system", "kwargs": {"command": f"touch {tmp_path / 'pwned'}"}}))
    with pytest.raises(EngineError, match="not a torch.nn.Module class"):
        load_torch_module(tmp_path / "export")
    assert not (tmp_path / "pwned").exists()
    eager.write_text(json.dumps({"class": "no_such_module_here:Policy", "kwargs": {}}))
    with pytest.raises(EngineError, match="make no_such_module_here importable"):
        load_torch_module(tmp_path / "export")
