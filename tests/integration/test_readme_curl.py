"""The README's "Call it with curl" block, run as written, checked against the model's own weights.

The block uses the defaults a new user gets: ``~/.bray`` (here a temporary HOME) and the
bundled config's ports 8080/8081/8082 (gRPC 7070/7071). Where one of them is taken on
this machine the test skips and says which; a clean CI machine has them free.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bray.store import CheckpointStore
from bray.torchserve.launcher import DEFAULT_PORTS, _port_in_use

ROOT = Path(__file__).resolve().parents[2]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"<!-- {marker}:START -->", 1)[1].split(f"<!-- {marker}:END -->", 1)[0]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_curl_block_runs_as_written_and_answers_what_the_model_computes(tmp_path: Path) -> None:
    if not (ROOT / ".venv" / "bin" / "bray-archive").exists():
        pytest.skip("the README block runs .venv/bin/...; make it with bash scripts/setup.sh")
    if shutil.which("curl") is None:
        pytest.skip("the README block needs curl; none on PATH")
    taken = [p for p in DEFAULT_PORTS.values() if _port_in_use(p)]
    if taken:
        pytest.skip(f"the README block uses the default ports; {taken} in use on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAY_", "TS_"))}
    env["HOME"] = str(tmp_path)
    try:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block("CURL")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:  # whatever happened, no server is left on the default ports
        subprocess.run([str(ROOT / ".venv" / "bin" / "bray-archive"), "server", "stop"], env=env,
                       capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    answer = json.loads(next(line for line in lines if line.startswith("[[")))
    assert any(line.startswith("bray_served_step{") and 'model="policy"' in line for line in lines), done.stdout
    assert "stopped TorchServe" in done.stdout

    weights = CheckpointStore(tmp_path / ".bray" / "store").load("policy").weights
    obs = np.array([[0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]], dtype=np.float32)
    expected = obs @ weights["weight"].T + weights["bias"]
    np.testing.assert_allclose(np.array(answer), expected, rtol=1e-5, atol=1e-6)
