"""A real Prometheus (Debian's package) scraping a real TorchServe from the bundled config.

The scrape config is the bundled ``ts_config/prometheus.yml`` with its targets pointed at
this test's ports and a 1 s interval. A ``RemoteModel`` (2 workers, batch 8) serves its
client metrics on a free port; a thread keeps calling it while the test publishes. Checked
over Prometheus's HTTP API with PromQL: the served step of every worker follows each
publish, batch and request sizes are reported, the callers' policy lag is there, the league
comes from ``bray-archive dashboard``'s ``/metrics``, and every query of the bundled Grafana
dashboard names a metric that Prometheus actually scraped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import requests
import torch
import yaml

import bray
from bray.league import LeagueResults
from bray.torchserve.launcher import TorchServeProcess, free_ports
from bray.ts_config import grafana_dashboard_path, prometheus_config_path
from tests.models import PolicyMLP
from tests.serving import dashboard_process, init_for, unregister_all

NAME = "prom-policy"
WORKERS = 2
BATCH = 8
WAIT_S = 90.0  # bound on every wait for Prometheus to show something

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="needs Debian's prometheus package: apt-get install prometheus (scripts/setup.sh installs it "
           "where apt-get can)")


class Prometheus:
    """A Prometheus server on loopback, queried over its HTTP API."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def query(self, promql: str) -> list[dict[str, Any]]:
        resp = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", f"{promql}: {resp.text}"
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single value of an instant query (``None``: no series)."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql} gave {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def names(self) -> set[str]:
        resp = requests.get(f"{self.url}/api/v1/label/__name__/values", timeout=10)
        return set(resp.json()["data"])

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not check():
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
            if time.monotonic() > deadline:
                targets = requests.get(f"{self.url}/api/v1/targets", timeout=10).text
                pytest.fail(f"Prometheus did not show {what} within {WAIT_S} s; targets: {targets[:3000]}")
            time.sleep(0.5)


def scrape_config(targets: dict[str, str], *, interval_s: int = 1) -> dict[str, Any]:
    """The bundled scrape config with each job's target replaced and a short interval."""
    config = yaml.safe_load(prometheus_config_path().read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{interval_s}s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(targets) <= set(jobs), f"bundled jobs are {sorted(jobs)}"
    for name, target in targets.items():
        jobs[name]["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [jobs[name] for name in targets]
    return config


@pytest.fixture(scope="module")
def served(torchserve: TorchServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[bray.RemoteModel, int]]:
    """The model on the session server, with its client exporter on a free port."""
    store = tmp_path_factory.mktemp("prom-store")
    init_for(torchserve, store)
    (port,) = free_ports(1)
    rm = bray.RemoteModel(NAME, model=PolicyMLP(), forward_args=(torch.zeros(2, 64),), max_batch_size=BATCH,
                          num_workers=WORKERS, metrics_port=port)
    league = LeagueResults(rm.store, NAME)
    for won in (1.0, 0.0, 1.0):
        league.record(f"{NAME}-clone-step-0", 0, won)
    try:
        yield rm, port
    finally:
        rm.close()
        unregister_all(torchserve, {NAME})


@pytest.fixture(scope="module")
def dashboard(served: tuple[bray.RemoteModel, int], torchserve: TorchServeProcess,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("dashboard") / "dashboard.out"
    with dashboard_process(served[0].store.root, torchserve, log) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(served: tuple[bray.RemoteModel, int], torchserve: TorchServeProcess, dashboard: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    config = scrape_config({"torchserve": torchserve.metrics_url.removeprefix("http://"),
                            "bray-clients": f"127.0.0.1:{served[1]}",
                            "bray-dashboard": dashboard.removeprefix("http://").rstrip("/")})
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        prom.wait_for("/-/ready", lambda: _ready(prom.url))
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def traffic(served: tuple[bray.RemoteModel, int]) -> Iterator[None]:
    """Callers that keep forwarding while the tests publish."""
    rm, _ = served
    stop = threading.Event()
    errors: list[BaseException] = []

    def call() -> None:
        obs = np.ones((2, 64), np.float32)
        while not stop.is_set():
            try:
                rm(obs)
            except BaseException as err:  # reported by the fixture, never swallowed
                errors.append(err)
                return
            time.sleep(0.005)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    yield
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors


def test_served_step_of_every_worker_follows_each_publish(served: tuple[bray.RemoteModel, int],
                                                         prometheus: Prometheus, traffic: None) -> None:
    rm, _ = served
    sel = f'bray_served_step{{model="{NAME}",version="latest"}}'
    for _ in range(2):
        step = rm.publish_weights(PolicyMLP().state_dict())
        step.wait(timeout_s=60)
        prometheus.wait_for(f"every worker at step {step}",
                            lambda: prometheus.value(f"count({sel} == {int(step)})") == WORKERS)
        assert prometheus.value(f"max({sel})") == int(step)
    # Each swap observed one publish-to-served time per worker.
    count = prometheus.value(f'sum(bray_publish_to_served_seconds_count{{model="{NAME}"}})')
    assert count is not None and count >= 2 * WORKERS
    p50 = prometheus.value(f'histogram_quantile(0.5, sum by (le) (bray_publish_to_served_seconds_bucket{{model="{NAME}"}}))')
    assert p50 is not None and p50 >= 0


def test_batch_and_request_sizes_are_reported(prometheus: Prometheus, traffic: None) -> None:
    sel = f'{{model="{NAME}"}}'
    prometheus.wait_for("forwarded batches", lambda: (prometheus.value(f"sum(bray_batches_total{sel})") or 0) > 0)
    # Each ratio in one query: one evaluation instant for both counters.
    per_request = prometheus.value(f"sum(bray_samples_total{sel}) / sum(bray_requests_total{sel})")
    per_batch = prometheus.value(f"sum(bray_requests_total{sel}) / sum(bray_batches_total{sel})")
    # Every caller sends 2 samples per call; client batching may merge calls, never split them.
    assert per_request is not None and per_request >= 2, per_request
    assert per_batch is not None and 1 <= per_batch <= BATCH, per_batch
    assert prometheus.value(f"max(bray_max_batch_requests{sel})") == BATCH
    assert prometheus.value(f"sum(bray_refused_steps_total{sel})") == 0


def test_callers_policy_lag_is_scraped_from_the_client(served: tuple[bray.RemoteModel, int],
                                                       prometheus: Prometheus, traffic: None) -> None:
    rm, _ = served
    sel = f'{{model="{NAME}",job="bray-clients"}}'
    prometheus.wait_for("the client's answered step",
                        lambda: prometheus.value(f"bray_client_answered_step{sel}") == rm.step)
    assert prometheus.value(f"bray_client_published_step{sel}") == rm.step
    assert prometheus.value(f"bray_client_policy_lag_steps{sel}") == 0
    assert (prometheus.value(f"bray_client_requests_total{sel}") or 0) > 0


def _client_series(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The client exporter's samples, ``{(name, sorted labels): value}``, read from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_client_counts_calls_and_samples_apart_and_times_each_call(served: tuple[bray.RemoteModel, int],
                                                                  traffic: None) -> None:
    """The caller's exporter, read directly after real calls: calls, samples and latency by route.

    The ``traffic`` threads keep calling with 2 samples each, so the check is on what the
    scrapes before and after this test's own calls (3 samples each) must satisfy.
    """
    rm, port = served
    http = (("model", NAME), ("route", "http"), ("version", "latest"))
    http_inf = tuple(sorted((*http, ("le", "+Inf"))))

    def read() -> tuple[float, float, float, float]:
        got = _client_series(port)
        return (got.get(("bray_client_forward_calls_total", http), 0.0),
                got.get(("bray_client_forward_samples_total", http), 0.0),
                got.get(("bray_client_forward_seconds_count", http), 0.0),
                got.get(("bray_client_forward_seconds_bucket", http_inf), 0.0))

    calls0, samples0, _, _ = read()
    mine = 5
    for _ in range(mine):
        rm(np.ones((3, 64), np.float32))
    calls1, samples1, timed, inf = read()
    others = calls1 - calls0 - mine
    assert others >= 0, (calls0, calls1)
    assert samples1 - samples0 == 3 * mine + 2 * others, "samples are not the sum of the calls' batch sizes"
    assert timed == inf == calls1, "every answered call is timed once"
    got = _client_series(port)
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in got.items()
                     if name == "bray_client_forward_seconds_bucket" and dict(labels)["route"] == "http")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), f"buckets not cumulative: {buckets}"
    assert got[("bray_client_forward_seconds_sum", http)] > 0
    # The old name stays for one release, counting calls as before.
    assert got[("bray_client_forwards_total", (("model", NAME), ("version", "latest")))] >= calls1


def test_league_is_scraped_from_the_dashboard(prometheus: Prometheus) -> None:
    sel = f'{{model="{NAME}",opponent="{NAME}-clone-step-0",opponent_step="0",job="bray-dashboard"}}'
    prometheus.wait_for("the league's win rate", lambda: prometheus.value(f"bray_league_games{sel}") == 3)
    assert prometheus.value(f"bray_league_win_rate{sel}") == pytest.approx(2 / 3)


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "le", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (function names, label matchers and
    durations dropped)."""
    expr = re.sub(r'\{[^}]*\}', " ", expr)          # label matchers
    expr = re.sub(r'\[[^\]]*\]', " ", expr)         # range durations
    expr = re.sub(r'\b(by|without|on|ignoring)\s*\([^)]*\)', " ", expr)  # grouping labels
    expr = re.sub(r'"[^"]*"', " ", expr)
    names = set()
    for m in re.finditer(r'\$?[A-Za-z_:][A-Za-z0-9_:]*', expr):
        if not m.group().startswith("$") and not re.match(r"\s*\(", expr[m.end():]):  # not a function
            names.add(m.group())
    return names - _PROMQL_WORDS


def test_metric_names_reads_promql() -> None:
    assert metric_names('sum by (model) (rate(bray_samples_total{model=~"$model"}[1m])) '
                        '/ on (model) bray_max_batch_requests') == {"bray_samples_total", "bray_max_batch_requests"}


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every target of the bundled dashboard, and its variables."""
    board = json.loads(grafana_dashboard_path().read_text())
    out = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
        if match:
            out.append((f"variable {var['name']}", match.group(1)))
    return out


def test_every_dashboard_query_names_a_scraped_metric(prometheus: Prometheus, traffic: None,
                                                       served: tuple[bray.RemoteModel, int]) -> None:
    # After the tests above every kind of series exists (a swap, batches, client answers).
    queries = dashboard_queries()
    assert len({title for title, _ in queries}) >= 7, queries
    wanted = set().union(*(metric_names(q) for _, q in queries))
    prometheus.wait_for("every dashboard metric", lambda: wanted <= prometheus.names())
    for title, query in queries:
        assert metric_names(query), f"panel {title!r}: no metric in {query!r}"
        assert prometheus.query(query.replace("$model", NAME).replace("$__rate_interval", "1m")) is not None
