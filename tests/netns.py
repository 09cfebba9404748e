"""Machines for real on one machine: nodes as Linux network namespaces joined by a bridge.

A :class:`Fabric` is one switch (a network namespace holding a bridge) and the nodes
plugged into it. Each :class:`NetnsNode` is

- a network namespace of its own (``ip netns``), so its own loopback, its own address on a
  veth pair whose other end is on the bridge, and its own abstract-socket namespace (a node
  proxy per node, with no change to the proxy);
- a UTS namespace of its own, held by one ``sleep`` process, so its own host name (what its
  workers announce themselves as);
- the processes started in it with ``nsenter`` into both.

Nothing is added to the machine's own network namespace: the bridge lives in the switch's,
so traffic between nodes never leaves these namespaces. The names carry a per-run prefix
(``b25-<pid>-<random>``), so runs side by side do not collide. :meth:`Fabric.close` kills
every process of every node, deletes the namespaces (which deletes their veths and the
bridge) and is safe to call twice; the fixtures call it in their finalizers, the script at
exit; a run killed before it could (SIGKILL) is swept by the next one. Needs root (or
CAP_NET_ADMIN and CAP_SYS_ADMIN): :func:`unavailable` says why not.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["Fabric", "NetnsNode", "sweep_orphans", "unavailable"]

IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "ip"
SUBNET = "10.225.0"  # per fabric: each fabric's switch is its own namespace, so runs never share it


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (``None`` when they can): tried, not guessed."""
    if os.geteuid() != 0:
        return "needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to make network namespaces; running as uid " \
               f"{os.geteuid()}"
    for tool in ("nsenter", "unshare"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"needs util-linux's {tool}; not found"
    probe = f"b25-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "needs iproute2's ip; not found"
    if made.returncode != 0:
        return f"cannot make a network namespace here (ip netns add: {made.stderr.strip()})"
    try:
        veth = _ip("-n", probe, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1", check=False)
        bridge = _ip("-n", probe, "link", "add", "name", "br0", "type", "bridge", check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    for what, res in (("veth pair", veth), ("bridge", bridge)):
        if res.returncode != 0:
            return f"this kernel cannot make a {what} ({res.stderr.strip()})"
    return None


@dataclass
class NetnsNode:
    """One machine: a network and a UTS namespace, an address on the fabric, its processes."""

    fabric: "Fabric"
    name: str  # its host name, and the suffix of its namespace's name
    index: int
    netns: str
    address: str
    holder: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def switch_port(self) -> str:
        """The bridge side of its veth pair (in the switch's namespace)."""
        return f"p{self.index}"

    def _nsenter(self) -> list[str]:
        assert self.holder is not None
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--uts=/proc/{self.holder.pid}/ns/uts", "--"]

    def popen(self, argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this node (stdout and stderr to ``log``); stopped by :meth:`Fabric.close`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen([*self._nsenter(), *argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=dict(env if env is not None else os.environ),
                                    cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this node to its end; its output returned."""
        return subprocess.run([*self._nsenter(), *argv], capture_output=True, text=True, timeout=timeout_s)

    def pids(self) -> list[int]:
        """Every process in this node's network namespace (the host-name holder left out)."""
        res = _ip("netns", "pids", self.netns, check=False)
        held = self.holder.pid if self.holder is not None else -1
        return [int(p) for p in res.stdout.split() if p.strip() and int(p) != held]

    def kill_all(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process of this node at once (a machine that dies). Returns their pids."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def link(self, *, up: bool) -> None:
        """Plug its cable in or pull it out (the switch's side of its veth: packets vanish, no error)."""
        _ip("-n", self.fabric.switch, "link", "set", self.switch_port, "up" if up else "down")


def _delete(netns: str) -> None:
    """SIGKILL whatever still runs in ``netns``, then delete it (its veths, and a bridge in it, go with it)."""
    for pid in _ip("netns", "pids", netns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", netns, check=False)


def sweep_orphans() -> list[str]:
    """Delete what runs whose process died without closing left (SIGKILLed pytest): returns the namespaces.

    Names carry their creator's pid (``b25-<pid>-...``); those of live processes are left
    alone, so runs side by side never sweep each other.
    """
    swept = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "b25" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its creator still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _delete(name)
        swept.append(name)
    for cache in Path("/dev/shm").glob("b25-*"):
        parts = cache.name.split("-")
        if len(parts) >= 3 and parts[1].isdigit() and not Path(f"/proc/{parts[1]}").exists():
            shutil.rmtree(cache, ignore_errors=True)
    return swept


class Fabric:
    """A switch and the nodes on it; a context manager that always tears everything down.

    Made, it first sweeps what dead runs left (:func:`sweep_orphans`).
    """

    def __init__(self, *, run_id: str | None = None) -> None:
        sweep_orphans()
        self.prefix = f"b25-{run_id or f'{os.getpid()}-{secrets.token_hex(2)}'}"
        self.switch = f"{self.prefix}-sw"
        self.nodes: list[NetnsNode] = []
        self._made: list[str] = []
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def __enter__(self) -> "Fabric":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_node(self, name: str) -> NetnsNode:
        """A new machine called ``name`` (its host name), plugged into the switch, loopback up."""
        index = len(self.nodes) + 1
        netns = f"{self.prefix}-{name}"
        _ip("netns", "add", netns)
        self._made.append(netns)
        node = NetnsNode(self, name, index, netns, f"{SUBNET}.{index + 1}")
        self.nodes.append(node)
        _ip("-n", self.switch, "link", "add", node.switch_port, "type", "veth", "peer", "name", "eth0",
            "netns", netns)
        _ip("-n", self.switch, "link", "set", node.switch_port, "master", "br0", "up")
        _ip("-n", netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        # The host-name holder: every process of the node joins its UTS namespace.
        node.holder = subprocess.Popen(
            [IP, "netns", "exec", netns, "unshare", "--uts", "--", "sh", "-c", f'hostname "$0" && exec sleep infinity',
             name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while node.run(["hostname"]).stdout.strip() != name:
            if node.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {name}: its host name was not set "
                                   f"({node.holder.stderr.read().decode() if node.holder.stderr else ''})")
            time.sleep(0.02)
        return node

    def close(self) -> None:
        """Kill every process of every node, then delete every namespace made (idempotent)."""
        for node in self.nodes:
            node.kill_all()
            for proc in node.procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if node.holder is not None and node.holder.poll() is None:
                node.holder.kill()
                node.holder.wait(timeout=10)
        for netns in reversed(self._made):
            _delete(netns)
        self._made.clear()
