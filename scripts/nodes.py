"""Several machines on one: server and actor nodes as network namespaces, a trainer publishing.

    sudo .venv/bin/python scripts/nodes.py --servers 2 --actor-nodes 3 --actors 4 --seconds 20
    sudo .venv/bin/python scripts/nodes.py --servers 1 --hold      # keep it up; prints how to enter a node

Each node has its own address (10.225.0.x on a bridge inside a namespace of its own), host
name and node proxy (tests/netns.py); server nodes run TorchServe on their address with
the management API on their own loopback, registering the live version from the shared
store (polled every --poll-interval-ms). The trainer (this process) publishes a StepProbe
step every --period-ms and waits for every worker of every node (heartbeating
announcements: no management API is reachable from here). Prints JSON: publish -> every
worker staged (median, max), what the workers of each server node read per publish, and
the actors' forwards/s, errors and steps that went backwards. Needs root; everything
is torn down at exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.netns import unavailable  # noqa: E402
from tests.nodes import Cluster, read_bytes  # noqa: E402


def publish_for(rm, seconds: float, period_s: float, *, n: int, timeout_s: float = 30) -> list[float]:  # type: ignore[no-untyped-def]
    """Publish a step every ``period_s`` for ``seconds`` (once at least); each publish -> wait() returned, in ms."""
    from tests.models import probe_weights

    waits = []
    end = time.monotonic() + seconds
    while True:
        t0 = time.monotonic()
        handle = rm.publish_weights(probe_weights(rm.step + 1, n))
        handle.wait(timeout_s=timeout_s)
        waits.append((time.monotonic() - t0) * 1e3)
        if time.monotonic() >= end:
            return waits
        time.sleep(max(0.0, period_s - (time.monotonic() - t0)))


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": round(statistics.median(values), 1), "max": round(max(values), 1)} \
        if values else {"n": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="TorchServe workers per server node")
    parser.add_argument("--actor-nodes", type=int, default=3)
    parser.add_argument("--actors", type=int, default=4, help="actor processes per actor node")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the actors call")
    parser.add_argument("--period-ms", type=float, default=200.0, help="the trainer publishes this often")
    parser.add_argument("--poll-interval-ms", type=int, default=50)
    parser.add_argument("--probe-n", type=int, default=4096, help="StepProbe width: weights of 2 x (n + 1) floats")
    parser.add_argument("--loader", action="store_true",
                        help="one weight loader per server node (bray.store.node_loader), workers map its cache")
    parser.add_argument("--relay", action="store_true", help="reach the last server through a 2 ms, 1%%-drop relay")
    parser.add_argument("--cut-s", type=float, default=0.0,
                        help="pull the last server node's cable this long, from the middle of the actors' run")
    parser.add_argument("--quiet-publishes", type=int, default=10, help="publishes with no actor calling, for bytes")
    parser.add_argument("--hold", action="store_true", help="keep the nodes up until Ctrl-C")
    parser.add_argument("--root", type=Path, help="where the store and logs go (default a temporary directory)")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"cannot make nodes here: {reason}", file=sys.stderr)
        return 2
    root = args.root or Path(tempfile.mkdtemp(prefix="bray-nodes-"))
    print(f"store, logs and the actors' records: {root} (kept)", file=sys.stderr, flush=True)
    cluster = Cluster(root, servers=args.servers, actor_nodes=args.actor_nodes, relay=args.relay,
                      probe_n=args.probe_n)
    try:
        rm = cluster.init_trainer(workers=args.workers, poll_interval_ms=args.poll_interval_ms)
        servers = cluster.start_servers(workers=args.workers, poll_interval_ms=args.poll_interval_ms,
                                        loader=args.loader)
        publish_for(rm, 0.0, 0.0, n=args.probe_n, timeout_s=120)  # step 1: every worker of every node is up and serving
        steps = cluster.store / cluster.name / "steps"
        weights_bytes = next(steps.glob("*/weights.safetensors")).stat().st_size
        # What the node's workers (and its loader) read: rchar, every read() of the store, of the
        # cache and of LATEST polls (not the mapped pages), over publishes with no call in between.
        readers = {s.node.name: s.worker_pids() + s.pids_running(b"bray.store.node_loader") for s in servers}
        before = {name: read_bytes(pids) for name, pids in readers.items()}
        quiet = publish_for(rm, args.quiet_publishes * args.period_ms / 1e3, args.period_ms / 1e3, n=args.probe_n)
        per_publish = {name: (read_bytes(pids) - before[name]) // len(quiet) for name, pids in readers.items()}
        urls = [s.url for s in servers]
        if args.relay:
            urls[-1] = cluster.start_relay(servers[-1], delay_ms=2.0, drop=0.01)
        report: dict[str, object] = {"servers": args.servers, "workers_per_server": args.workers,
                                     "actor_nodes": args.actor_nodes, "actors_per_node": args.actors,
                                     "poll_interval_ms": args.poll_interval_ms, "loader": args.loader,
                                     "weights_file_bytes": weights_bytes,
                                     "bytes_read_per_publish_per_node": per_publish,
                                     "quiet_publish_wait_ms": summary(quiet)}
        if args.hold:
            for node in cluster.fabric.nodes:
                print(f"{node.name}: {node.address}  enter: nsenter --net=/run/netns/{node.netns} "
                      f"--uts=/proc/{node.holder.pid}/ns/uts bash" if node.holder else node.name)
            print(json.dumps(report, indent=1), flush=True)
            print("holding; Ctrl-C tears everything down", flush=True)
            while True:
                time.sleep(3600)
        if args.actor_nodes and args.actors:
            actors = cluster.start_actors(args.actors, urls=urls)
            time.sleep(5)  # actors attach, proxies start
            if args.cut_s > 0:
                waits = publish_for(rm, args.seconds / 2, args.period_ms / 1e3, n=args.probe_n)
                servers[-1].node.link(up=False)
                try:
                    waits += publish_for(rm, args.cut_s, args.period_ms / 1e3, n=args.probe_n)
                finally:
                    servers[-1].node.link(up=True)
                waits += publish_for(rm, args.seconds / 2, args.period_ms / 1e3, n=args.probe_n)
            else:
                waits = publish_for(rm, args.seconds, args.period_ms / 1e3, n=args.probe_n)
            records = actors.stop()
            calls = sum(r["calls"] for r in records)
            seconds = max(r["seconds"] for r in records)
            report.update(publish_wait_ms=summary(waits), calls=calls, cut_s=args.cut_s,
                          forwards_per_s=round(calls / seconds, 1) if seconds else 0.0,
                          errors=sum(r["errors"] for r in records), backwards=sum(r["backwards"] for r in records),
                          wrong=sum(r["wrong"] for r in records), slowest_call_s=max(r["slowest_s"] for r in records),
                          error_messages=[m for r in records for m in r["error_messages"]][:5])
            if args.relay:
                report["relay"] = cluster.stop_relay()
        print(json.dumps(report, indent=1))
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
