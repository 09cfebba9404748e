"""Time ``bray-archive publish`` against the same job done the way TorchServe's docs teach.

For each model (the policy MLP 64 -> 256 -> 256 -> 16, and a ~100 MB MLP) and each
repeat, on one TorchServe started here from the bundled config:

- **bray**: ``bray-archive publish --step N`` through ``main(argv)``: pack the step into a
  stored (not deflated) ``.mar`` in the model store, register it synchronously, wait for
  its worker to be READY.
- **docs**: ``torch.save(state_dict)``, then the ``torch-model-archiver`` CLI in a
  subprocess (``--model-file model.py --serialized-file weights.pt --handler base_handler``,
  default archive format) and the curl-equivalent ``POST /models?url=...&synchronous=true``
  with the management token. (The docs' first step, writing model.py, is free here.)

Each registered version is unregistered before the next measurement, so every run
starts one worker on an otherwise idle server. Prints a Markdown table (medians).

    .venv/bin/python scripts/bench_archive.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import requests
import torch

from bray.archiver import ManagementClient
from bray.archiver.cli import main as bray_archive
from bray.archiver.pack import pack_archive
from bray.export import export_model
from bray.store import CheckpointStore
from bray.torchserve.launcher import start_torchserve

MODELS = {
    # name: (layer sizes, label)
    "policy": ((64, 256, 256, 16), "policy MLP 64-256-256-16"),
    "big": ((64, 5000, 5000, 16), "MLP 64-5000-5000-16"),
}

MODEL_PY = """
import torch


class Net(torch.nn.Sequential):
    def __init__(self):
        sizes = {sizes!r}
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        super().__init__(*layers[:-1])
"""


def build(sizes: tuple[int, ...]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def nbytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    archiver_cli = Path(sys.executable).parent / "torch-model-archiver"

    with tempfile.TemporaryDirectory(prefix="bray-bench-") as tmp_name:
        tmp = Path(tmp_name)
        store = CheckpointStore(tmp / "store", keep_last=args.repeats + 1)
        server = start_torchserve(workdir=tmp / "ts", model_store=tmp / "model_store")
        rows = []
        try:
            client = ManagementClient(server.management_url, key_file=server.key_file, timeout_s=300)
            for key, (sizes, label) in MODELS.items():
                model = build(sizes)
                name = f"bench-{key}"
                t0 = time.perf_counter()
                export_model(model, (torch.zeros(1, sizes[0]),), dest=store.export_dir(name), onnx=False)
                export_s = time.perf_counter() - t0
                docs_dir = tmp / f"docs-{key}"
                docs_dir.mkdir()
                (docs_dir / "model.py").write_text(textwrap.dedent(MODEL_PY.format(sizes=sizes)))
                bray_s, docs_s, bray_pack_s, docs_pack_s = [], [], [], []
                bray_size = docs_size = 0
                for i in range(1, args.repeats + 1):
                    with torch.no_grad():
                        for p in model.parameters():
                            p.normal_(0, 0.05)
                    step = store.publish(name, model.state_dict(), step=i)

                    # --- bray: pack alone (scratch dir), then the whole publish ---------
                    t0 = time.perf_counter()
                    scratch = pack_archive(store, name, step=step, model_store=tmp / "scratch", force=True)
                    bray_pack_s.append(time.perf_counter() - t0)
                    bray_size = scratch.path.stat().st_size
                    t0 = time.perf_counter()
                    code = bray_archive(["publish", "--name", name, "--step", str(step), "--store", str(store.root),
                                         "--model-store", str(server.model_store), "--management",
                                         server.management_url, "--key-file", str(server.key_file),
                                         "--json", "--no-progress"], out=io.StringIO())
                    bray_s.append(time.perf_counter() - t0)
                    if code != 0:
                        raise SystemExit(f"bray-archive publish failed with {code}")
                    client.unregister(name, str(step))

                    # --- docs: torch.save + torch-model-archiver CLI + POST /models ----
                    docs_name = f"docs-{key}"
                    t0 = time.perf_counter()
                    torch.save(model.state_dict(), docs_dir / "weights.pt")
                    subprocess.run([str(archiver_cli), "--model-name", docs_name, "--version", str(step),
                                    "--model-file", str(docs_dir / "model.py"),
                                    "--serialized-file", str(docs_dir / "weights.pt"),
                                    "--handler", "base_handler", "--export-path", str(server.model_store), "-f"],
                                   check=True, capture_output=True)
                    docs_pack_s.append(time.perf_counter() - t0)
                    docs_size = (server.model_store / f"{docs_name}.mar").stat().st_size
                    resp = requests.post(
                        f"{server.management_url}/models",
                        params={"url": f"{docs_name}.mar", "initial_workers": 1, "synchronous": "true",
                                "batch_size": 1, "max_batch_delay": 5},
                        headers=client.auth.headers("management"), timeout=300,
                    )
                    docs_s.append(time.perf_counter() - t0)
                    if resp.status_code != 200:
                        raise SystemExit(f"POST /models failed: {resp.status_code} {resp.text}")
                    client.unregister(docs_name, str(step))
                rows.append((label, nbytes(model), export_s, statistics.median(bray_pack_s),
                             statistics.median(docs_pack_s), statistics.median(bray_s),
                             statistics.median(docs_s), bray_size, docs_size))
        finally:
            server.stop()

    print(f"\n{args.repeats} repeats each, medians; one TorchServe 0.12 (bundled config), 1 worker, CPU.\n")
    print("| model | weights | bray pack | docs pack (torch.save + archiver CLI) | pack ratio "
          "| **bray-archive publish** | **docs: archiver CLI + POST /models** | publish ratio "
          "| bray .mar | docs .mar |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, size, _export, bp, dp, b, d, bs, ds in rows:
        print(f"| {label} | {size / 2**20:.1f} MiB | {bp:.2f} s | {dp:.2f} s | {dp / bp:.1f}x faster "
              f"| {b:.2f} s | {d:.2f} s | {d / b:.2f}x | {bs / 2**20:.1f} MiB | {ds / 2**20:.1f} MiB |")
    print("\nOne-time export (torch.export, not part of publish): "
          + ", ".join(f"{r[0]}: {r[2]:.1f} s" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
