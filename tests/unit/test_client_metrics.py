"""RemoteModel's client-side metrics exporter (prometheus-client), in local mode: no server.

The exporter is one per process, so the scenarios that start one run in a fresh Python.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bray.locations import metrics_address
from bray.errors import ConfigError


@pytest.mark.parametrize(("given", "env", "want"), [
    (None, {}, None),
    (None, {"BRAY_METRICS_PORT": "9500"}, ("127.0.0.1", 9500)),
    (None, {"BRAY_METRICS_PORT": "0.0.0.0:9501"}, ("0.0.0.0", 9501)),
    (9502, {"BRAY_METRICS_PORT": "9500"}, ("127.0.0.1", 9502)),
    (0, {"BRAY_METRICS_PORT": "9500"}, None),
], ids=["off-by-default", "env", "env-host", "keyword-wins", "zero-turns-off"])
def test_metrics_address(given: int | None, env: dict[str, str], want: tuple[str, int] | None) -> None:
    assert metrics_address(given, env) == want


@pytest.mark.parametrize("bad", ["http", "70000", "-1", "host:"], ids=str)
def test_bad_metrics_port_says_what_it_wants(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"port 1-65535 or host:port, got"):
        metrics_address(None, {"BRAY_METRICS_PORT": bad})


def test_importing_the_bridge_starts_no_exporter() -> None:
    code = ("import sys, threading; import bray.bridge.metrics, bray.bridge; "
            "assert 'prometheus_client' not in sys.modules; assert threading.active_count() == 1; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


SCENARIO = textwrap.dedent("""
    import sys, urllib.request
    import numpy as np, torch
    import bray
    from bray.errors import ConfigError
    from bray.torchserve.launcher import free_ports
    from tests.models import PolicyMLP

    bray.init(store=sys.argv[1])
    port, other = free_ports(2)
    rm = bray.RemoteModel("lagging", model=PolicyMLP(), forward_args=(torch.zeros(2, 64),),
                          local_mode=True, metrics_port=port)
    rm(np.zeros((2, 64), np.float32))
    rm.publish_weights(PolicyMLP().state_dict())  # published, not yet answered with
    rm.publish_weights(PolicyMLP().state_dict())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    print(text)
    try:
        bray.RemoteModel("other", model=PolicyMLP(), forward_args=(torch.zeros(2, 64),), local_mode=True,
                         metrics_port=other)
    except ConfigError as err:
        print("REFUSED:", err)
""")


def test_exporter_reports_policy_lag_and_refuses_a_second_port(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-c", SCENARIO, str(tmp_path / "store")], capture_output=True,
                         text=True, timeout=300, cwd=str(Path(__file__).parents[2]))
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert 'bray_client_policy_lag_steps{model="lagging",version=""} 2.0' in text, text
    assert 'bray_client_answered_step{model="lagging",version=""} 0.0' in text, text
    assert 'bray_client_published_step{model="lagging",version=""} 2.0' in text, text
    # One call of a batch of 2: counted as one call of two samples, and timed (route local).
    local = 'model="lagging",route="local",version=""'
    assert f"bray_client_forward_calls_total{{{local}}} 1.0" in text, text
    assert f"bray_client_forward_samples_total{{{local}}} 2.0" in text, text
    assert f'bray_client_forward_seconds_bucket{{le="+Inf",{local}}} 1.0' in text, text
    assert f"bray_client_forward_seconds_count{{{local}}} 1.0" in text, text
    assert "# HELP bray_client_forward_calls_total Answered forward calls of this process, one per call" in text
    assert "REFUSED: this process already serves client metrics on 127.0.0.1:" in text
    assert "every RemoteModel of a process shares that exporter" in text


def test_port_in_use_is_a_config_error(tmp_path) -> None:
    code = textwrap.dedent("""
        import socket
        from bray.bridge.metrics import track
        from bray.errors import ConfigError
        with socket.create_server(("127.0.0.1", 0)) as busy:
            port = busy.getsockname()[1]
            try:
                track(object(), ("127.0.0.1", port))
            except ConfigError as err:
                print(err)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cannot serve client metrics on 127.0.0.1:" in out.stdout and "choose another metrics_port" in out.stdout
