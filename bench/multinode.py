"""Multi-node benchmark: throughput for 1, 2 and 4 workers on a multi-node Ray cluster, and the time to
recover when a whole node is lost.

A loopback cluster of processes (``actors.local_cluster``: a head with no CPUs and ``--nodes`` worker nodes of
``--node-cpus`` CPUs, token auth) runs the pipeline over an embedded broker (8 partitions, tumbling and sliding
windows merged across partitions, Parquet sink, checkpoints every 2 s on local disk every node reaches).

- **Scaling**: ``--events`` records to the end (``until_end``), once per worker count; events/s is records over
  the wall time from start to the last window written.
- **Node loss**: 2 workers, consumption throttled; a node running a worker (not the coordinator) is killed
  ``--kills`` times (a new node joins after each); "recovered" is the moment the replacement worker has
  restored its partitions and consumes again (a new process, its offsets moving).

Usage: ``python bench/multinode.py [--events 400000] [--kills 3] [--workers 1 2 4]``; writes
``bench/results/multinode.json`` and ``multinode.png``. On this project's 2-core machine every node shares the
same two cores: the scaling figures show the overhead of spreading, not a speedup; run it on a bigger machine
for scaling.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.runtime import local_ray_env  # noqa: E402

local_ray_env()

from actors import control  # noqa: E402
from actors.local_cluster import LocalCluster  # noqa: E402
from bench.cluster_common import save, teardown  # noqa: E402
from pipeline.driver import run_pipeline  # noqa: E402
from pipeline.io.broker import EmbeddedBroker  # noqa: E402
from pipeline.io.kafka import produce_all  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402
from pipeline.synthetic import events  # noqa: E402

console = Console()
PARTITIONS = 8


def _spec(name: str, broker: str, topic: str, work: Path, workers: int, rate: int | None = None):
    kafka = {"bootstrap_servers": broker, "topic": topic, "max_batch_records": 20_000}
    if rate:
        kafka.update(max_rate=rate, max_batch_records=500)
    return parse_spec({
        "name": name, "source": {"kafka": kafka},
        "event_time": {"field": "ts", "max_out_of_orderness": "2s", "idle_timeout": "1h"},
        "windows": [{"name": "tumble", "type": "tumbling", "size": "10s", "group_by": ["tenant_id", "event_type"],
                     "aggregations": ["count", "sum(value)", "mean(value)"]},
                    {"name": "slide", "type": "sliding", "size": "20s", "slide": "10s", "group_by": ["tenant_id"],
                     "aggregations": ["count", "max(value)"]}],
        "sinks": [{"parquet": {"uri": f"file://{work}/out-{name}"}}],
        "checkpoint": {"uri": f"file://{work}/chk-{name}", "interval": "2s", "timeout": "30s"},
        "health": {"heartbeat_timeout": "3s"},
        "workers": workers, "worker_cpus": 0.5})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--node-cpus", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raystream-multinode-"))
    broker = EmbeddedBroker().start()
    cluster = LocalCluster(str(work / "cluster"), head_cpus=0,
                           env={"RAY_health_check_failure_threshold": "8"})
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "nodes": args.nodes, "node_cpus": args.node_cpus, "events": args.events, "scaling": [], "recovery": []}
    try:
        console.print(f"[bold]cluster[/]: head (0 CPUs) + {args.nodes} nodes x {args.node_cpus} CPUs")
        cluster.start_head()
        for k in range(args.nodes):
            cluster.add_node(f"n{k}", args.node_cpus)
        import ray

        ray.init(address=cluster.address, namespace="raystream", log_to_driver=False, configure_logging=False)
        values, keys, cols = events(args.events, 1_765_000_000_000, rate_per_s=5000, tenants=64, seed=3)
        parts = [int(k.decode().split("-")[1]) % PARTITIONS for k in keys]
        broker.create_topic("events", PARTITIONS)
        produce_all(broker.bootstrap, "events", values, keys, parts)

        with Progress(console=console) as progress:
            task = progress.add_task("scaling", total=len(args.workers))
            for w in args.workers:
                spec = _spec(f"scale{w}", broker.bootstrap, "events", work, w)
                t0 = time.perf_counter()
                report = run_pipeline(spec, until_end=True, address=cluster.address)
                wall = time.perf_counter() - t0
                records = sum(x.get("records", 0) for x in report.workers)
                result["scaling"].append({"workers": w, "wall_s": round(wall, 2), "events_per_s": round(args.events / wall),
                                          "records": records})
                progress.console.print(f"{w} workers: {args.events / wall:,.0f} events/s ({wall:.1f}s)")
                progress.advance(task)

            # node loss: a throttled run long enough for every kill
            name = "nodeloss"
            spec = _spec(name, broker.bootstrap, "events", work, 2, rate=4000)
            done = threading.Event()
            err: list = []

            def _run():
                try:
                    run_pipeline(spec, until_end=True, address=cluster.address)
                except BaseException as exc:  # reported after the kills
                    err.append(exc)
                finally:
                    done.set()

            threading.Thread(target=_run, daemon=True).start()
            task = progress.add_task("node loss", total=args.kills)
            ids = {}
            spare = 0
            for _ in range(args.kills):
                st = _wait(name, lambda s: s.get("last_checkpoint") and all(
                    w.get("state") == "running" for w in s["workers"]) and len(s["workers"]) == 2, 120)
                ids = {v: k for k, v in cluster.node_ids().items()}
                coordinator = st["coordinator_node"]
                victim_w = next(w for w in st["workers"] if w.get("node") != coordinator)
                victim = ids[victim_w["node"]]
                old_pid, before = victim_w["pid"], sum(victim_w["positions"].values())
                t_kill = time.monotonic()
                cluster.kill_node(victim)
                _wait(name, lambda s: any(w["index"] == victim_w["index"] and w.get("pid") != old_pid
                                          and w.get("state") == "running" and w.get("first_batch_at")
                                          for w in s["workers"]), 120)
                recovered = time.monotonic() - t_kill
                result["recovery"].append({"node": victim, "recovered_s": round(recovered, 2), "positions_before": before})
                progress.console.print(f"node {victim} lost: worker consuming again after {recovered:.1f}s")
                spare += 1
                cluster.add_node(f"spare{spare}", args.node_cpus)
                progress.advance(task)
            done.wait(600)
            if err:
                raise err[0]
    finally:
        teardown(cluster, broker)
    save("multinode", result, _plot, console)


def _wait(name: str, pred, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            st = control.pipeline_status(name, timeout_s=5)
            if pred(st):
                return st
        except Exception:  # the coordinator restarting, or not started yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name}: condition not met in {timeout_s}s")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["workers"] for r in result["scaling"]]
    a.bar([str(x) for x in xs], [r["events_per_s"] for r in result["scaling"]], color="#4c72b0")
    a.set_xlabel("workers")
    a.set_ylabel("events/s")
    a.set_title(f"throughput, {result['nodes']} nodes x {result['node_cpus']} CPUs ({result['machine']})", fontsize=8)
    b.bar(range(1, len(result["recovery"]) + 1), [r["recovered_s"] for r in result["recovery"]], color="#dd8452")
    b.set_xlabel("node lost (kill #)")
    b.set_ylabel("seconds until its worker consumes again")
    b.set_title("recovery after node loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
