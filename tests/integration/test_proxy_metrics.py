"""Client metrics through the node proxy: the caller's exporter and the proxy's own.

A caller process started with ``BRAY_METRICS_PORT`` starts the node proxy, which inherits
that variable; the proxy must not try the caller's port (it would fail to set up its model
and every call would fall back to direct HTTP) and serves its own view on
``BRAY_PROXY_METRICS_PORT``. The caller runs in its own Python: the exporter is one per
process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from bray.torchserve.launcher import free_ports
from tests.integration.test_node_proxy import NAME, env  # noqa: F401  (the module's fixture)

CALLER = textwrap.dedent("""
    import json, sys, time, urllib.request
    import numpy as np
    import bray

    def scrape(port):
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    rm = bray.RemoteModel(sys.argv[1], node_proxy=True)
    _, step = rm(np.ones((1, 4), np.float32), batch=True, return_step=True)
    proxy = rm.proxy_stats()
    deadline = time.monotonic() + 60
    while True:  # the proxy's exporter starts with its model
        try:
            proxy_text = scrape(int(sys.argv[3]))
            break
        except OSError:
            assert time.monotonic() < deadline, "the proxy serves no metrics"
            time.sleep(0.2)
    print(json.dumps({"step": step, "proxy": proxy, "fallbacks": rm.proxy_fallbacks,
                      "caller": scrape(int(sys.argv[2])), "proxy_metrics": proxy_text}))
    rm.close()
""")


def test_caller_and_proxy_each_export_their_own_view(env: dict[str, str]) -> None:  # noqa: F811
    caller_port, proxy_port = free_ports(2)
    run_env = {**env, "BRAY_METRICS_PORT": str(caller_port), "BRAY_PROXY_METRICS_PORT": str(proxy_port),
               "BRAY_PROXY_IDLE_S": "2"}
    out = subprocess.run([sys.executable, "-c", CALLER, NAME, str(caller_port), str(proxy_port)], env=run_env,
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["proxy"] is not None and got["fallbacks"] == 0, got  # answered by the proxy
    labels = f'{{model="{NAME}",version="latest"}}'
    assert f"bray_client_answered_step{labels} {float(got['step'])}" in got["caller"], got["caller"]
    assert f"bray_client_forwards_total{labels} 1.0" in got["caller"], got["caller"]
    # The one call of one sample, answered through the proxy, is counted and timed under route proxy.
    proxied = f'model="{NAME}",route="proxy",version="latest"'
    assert f"bray_client_forward_calls_total{{{proxied}}} 1.0" in got["caller"], got["caller"]
    assert f"bray_client_forward_samples_total{{{proxied}}} 1.0" in got["caller"], got["caller"]
    assert f"bray_client_forward_seconds_count{{{proxied}}} 1.0" in got["caller"], got["caller"]
    assert f"bray_client_requests_total{labels} 1.0" in got["proxy_metrics"], got["proxy_metrics"]
