"""Engine timings for the policy MLP: installing a new step, and one forward, per engine.

    .venv/bin/python scripts/bench_engines.py

For ONNX Runtime it compares the two ways of taking new weights without a new export
(``engines/onnx.py``): a new session with the weights as initializers, or one session
with the weights fed as graph inputs at every run.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bray.export import export_model, load_spec
    from bray.handlers.engines import EngineOptions, get_engine
    from tests.models import PolicyMLP

    torch.manual_seed(0)
    model = PolicyMLP().eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, (torch.zeros(4, 64),), dest=Path(tmp) / "export", onnx=True)
        spec = load_spec(Path(tmp) / "export")
        weights = {k: v.numpy() for k, v in model.state_dict().items()}
        rows = []
        for label, engine, options in [
            ("torch", "torch", EngineOptions(threads=1)),
            ("onnx, weights as initializers (new session per step)", "onnx", EngineOptions(threads=1)),
            ("onnx, weights as graph inputs (one session)", "onnx", EngineOptions(threads=1, onnx_weights="inputs")),
            ("onnx, dynamic int8 (re-quantized per step)", "onnx", EngineOptions(threads=1, quantize=True)),
        ]:
            eng = get_engine(engine).load(Path(tmp) / "export", spec, options)
            swap = []
            for i in range(10):
                new = {k: v + 1e-3 * i for k, v in weights.items()}
                t0 = time.perf_counter()
                eng.set_weights(new)
                swap.append(time.perf_counter() - t0)
            row = {"engine": label, "set_weights_ms": statistics.median(swap) * 1e3}
            for batch in (1, 32):
                x = [np.random.default_rng(0).standard_normal((batch, 64)).astype(np.float32)]
                for _ in range(50):
                    eng.forward(x)
                n = 2000
                t0 = time.perf_counter()
                for _ in range(n):
                    eng.forward(x)
                row[f"forward_us_b{batch}"] = (time.perf_counter() - t0) / n * 1e6
            rows.append(row)
            eng.close()
    print("| engine | new step installed, ms (median) | forward batch 1, µs | forward batch 32, µs |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['set_weights_ms']:.2f} | {r['forward_us_b1']:.1f} | {r['forward_us_b32']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
