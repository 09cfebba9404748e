"""The export the server rebuilds from: structure, dynamic batch, no code execution on load."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bray.errors import ConfigError, EngineError
from bray.export import export_model, load_spec, load_torch_module
from tests.models import DictPolicy, PolicyMLP


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
