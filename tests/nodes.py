"""A cluster of namespace nodes (:mod:`tests.netns`): server nodes, actor nodes, a lossy relay, a trainer.

Shared by ``tests/integration/test_nodes.py`` and ``scripts/nodes.py``. The checkpoint
store is one directory every node sees (as a shared volume), followed by polling; the
trainer is the calling process, which needs only the store (it reaches no node: the
management APIs stay on each server node's loopback, and ``wait()`` counts the workers'
heartbeating announcements).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.netns import Fabric, NetnsNode

__all__ = ["Actors", "Cluster", "ServerNode"]

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class ServerNode:
    """A server node: its TorchServe's inference address, key file (written at its start) and log."""

    node: NetnsNode
    workdir: Path
    proc: subprocess.Popen[bytes]
    url: str = field(init=False)
    key_file: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://{self.node.address}:8080"
        self.key_file, self.log = self.workdir / "key_file.json", self.workdir / "node.log"

    def worker_pids(self) -> list[int]:
        """Its TorchServe workers' pids (processes of the node running ts.model_service_worker)."""
        return self.pids_running(b"model_service_worker")

    def pids_running(self, what: bytes) -> list[int]:
        """The node's processes whose command line holds ``what``."""
        out = []
        for pid in self.node.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if what in cmd:
                out.append(pid)
        return out


@dataclass
class Actors:
    """The actor processes started on some nodes; :meth:`stop` collects their records."""

    stop_file: Path
    procs: list[tuple[subprocess.Popen[bytes], Path, str]] = field(default_factory=list)

    def stop(self, *, timeout_s: float = 120) -> list[dict[str, Any]]:
        self.stop_file.touch()
        records = []
        for proc, out, node in self.procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                raise AssertionError(f"an actor on {node} did not stop within {timeout_s} s (a call hung?)")
            record = json.loads(out.read_text()) if out.is_file() else {"exit": proc.returncode, "calls": 0}
            record["node"] = node
            records.append(record)
        return records


class Cluster:
    """A fabric with ``servers`` server nodes and ``actor_nodes`` actor nodes, the store under ``root``."""

    name = "policy"

    def __init__(self, root: Path, *, servers: int, actor_nodes: int, relay: bool = False, probe_n: int = 4) -> None:
        self.root = root
        self.probe_n = probe_n  # StepProbe's input width: its weights are 2 x (probe_n + 1) floats
        self.store = root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.fabric = Fabric()
        try:
            self.server_nodes = [self.fabric.add_node(f"server{i + 1}") for i in range(servers)]
            self.actor_nodes = [self.fabric.add_node(f"actors{i + 1}") for i in range(actor_nodes)]
            self.relay_node = self.fabric.add_node("relay") if relay else None
        except BaseException:
            self.fabric.close()
            raise
        self.servers: list[ServerNode] = []
        self.caches: list[Path] = []  # the nodes' weight caches in /dev/shm, removed at close
        self.relay_proc: subprocess.Popen[bytes] | None = None
        self._actor_runs = 0

    def close(self) -> None:
        """Stop everything (SIGTERM first so TorchServe stops its workers, then the fabric kills the rest)."""
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in self.servers:
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.fabric.close()
        for cache in self.caches:
            shutil.rmtree(cache, ignore_errors=True)

    # --- the trainer ------------------------------------------------------------------

    def init_trainer(self, *, workers: int, poll_interval_ms: int) -> Any:
        """The trainer's ``RemoteModel`` (StepProbe at step 0), created before any server registers it."""
        import torch

        import bray
        from tests.models import StepProbe, probe_weights

        bray.init(store=self.store, model_store=self.root / "unused-model-store",
                  inference_url=[f"http://{n.address}:8080" for n in self.server_nodes], management_url="none",
                  key_file=[self.root / f"server{i + 1}" / "key_file.json" for i in range(len(self.server_nodes))])
        model = StepProbe(self.probe_n)
        model.load_state_dict(probe_weights(0, self.probe_n))
        return bray.RemoteModel(self.name, model=model, forward_args=(torch.zeros(1, self.probe_n),), num_workers=workers,
                                max_batch_size=16, node_proxy=False, timeout_s=30)

    # --- server nodes -----------------------------------------------------------------

    def start_servers(self, *, workers: int, poll_interval_ms: int, loader: bool = False,
                      timeout_s: float = 300) -> list[ServerNode]:
        """TorchServe on every server node, the live version registered there; waits until each says ready.

        ``loader``: each node runs its one weight loader, into a cache in ``/dev/shm``.
        """
        def start(node: NetnsNode) -> ServerNode:
            workdir = self.root / node.name
            workdir.mkdir(parents=True, exist_ok=True)
            cache = []
            if loader:
                self.caches.append(Path(f"/dev/shm/{node.netns}"))
                cache = ["--cache", str(self.caches[-1])]
            proc = node.popen([PY, "-m", "tests.netns_procs", "server", "--workdir", str(workdir),
                               "--address", node.address, "--store", str(self.store), "--name", self.name,
                               "--workers", str(workers), "--poll-interval-ms", str(poll_interval_ms), *cache],
                              log=workdir / "node.log", cwd=REPO)
            server = ServerNode(node, workdir, proc)
            with lock:
                starting.append(server)  # stopped at close even if another node's start fails
            deadline = time.monotonic() + timeout_s
            while b"ready" not in server.log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server node {node.name} did not start:\n{server.log.read_text()[-3000:]}")
                time.sleep(0.25)
            return server

        lock = threading.Lock()
        starting: list[ServerNode] = []
        try:
            with ThreadPoolExecutor(len(self.server_nodes)) as pool:
                started = list(pool.map(start, self.server_nodes))
        except BaseException:
            self.servers = starting
            raise
        # In node order: the key files handed to actors are matched to the URLs by position
        # (the order the threads got to append in swapped them now and then: every key refused).
        self.servers = started
        return started

    def start_relay(self, target: ServerNode, *, delay_ms: float, drop: float) -> str:
        """The lossy relay in front of ``target``, on the relay node; returns its address (an inference URL)."""
        assert self.relay_node is not None
        listen = f"{self.relay_node.address}:8080"
        self.relay_counts = self.root / "relay.json"
        self.relay_proc = self.relay_node.popen(
            [PY, "-m", "tests.netns_procs", "relay", "--listen", listen, "--to", f"{target.node.address}:8080",
             "--delay-ms", str(delay_ms), "--drop", str(drop), "--counts", str(self.relay_counts)],
            log=self.root / "relay.log", cwd=REPO)
        deadline = time.monotonic() + 30
        while b"relay" not in (self.root / "relay.log").read_bytes():
            assert self.relay_proc.poll() is None and time.monotonic() < deadline, (self.root / "relay.log").read_text()
            time.sleep(0.05)
        return f"http://{listen}"

    def stop_relay(self) -> dict[str, int]:
        assert self.relay_proc is not None
        self.relay_proc.terminate()
        self.relay_proc.wait(timeout=20)
        return dict(json.loads(self.relay_counts.read_text()))

    # --- actor nodes ------------------------------------------------------------------

    def actor_env(self, urls: list[str], keys: list[Path]) -> dict[str, str]:
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith("BRAY_")}
        env.update(BRAY_STORE=str(self.store), BRAY_INFERENCE_URL=",".join(urls), BRAY_MANAGEMENT_URL="none",
                   BRAY_KEY_FILE=",".join(str(k) for k in keys), BRAY_MODEL_STORE=str(self.root / "unused-model-store"),
                   BRAY_PROXY_IDLE_S="20", PYTHONPATH=str(REPO))
        return env

    def start_actors(self, per_node: int, *, urls: list[str] | None = None, node_proxy: bool = True,
                     nodes: list[NetnsNode] | None = None) -> Actors:
        """``per_node`` actor processes on each actor node, calling ``urls`` (default every server directly)."""
        self._actor_runs += 1
        run = self.root / f"actors-{self._actor_runs}"
        run.mkdir()
        env = self.actor_env(urls or [s.url for s in self.servers], [s.key_file for s in self.servers])
        actors = Actors(stop_file=run / "stop")
        for n, node in enumerate(nodes or self.actor_nodes):
            for i in range(per_node):
                out = run / f"{node.name}-{i}.json"
                proc = node.popen([PY, "-m", "tests.netns_procs", "actor", "--name", self.name,
                                   "--value", str(0.25 * (n * per_node + i + 1)), "--stop-file", str(actors.stop_file),
                                   "--out", str(out), "--node-proxy", "on" if node_proxy else "off",
                                   "--n", str(self.probe_n)],
                                  log=run / f"{node.name}-{i}.log", env=env, cwd=REPO)
                actors.procs.append((proc, out, node.name))
        return actors

    def proxy_pids(self, node: NetnsNode) -> list[int]:
        """The node proxies running on ``node``."""
        out = []
        for pid in node.pids():
            try:
                if b"bray.bridge.proxy" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
            except OSError:
                continue
        return out


def read_bytes(pids: list[int]) -> int:
    """``rchar`` summed over ``pids``: bytes their read() calls returned (page cache included)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("rchar:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total
