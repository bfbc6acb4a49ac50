"""Autoscaler reaction time: from a lag spike to more workers on new nodes, and back.

A Ray cluster whose nodes are added and removed by Ray's own autoscaler (v2, the fake multi-node provider of
Ray's autoscaler tests: nodes are real processes on this machine; ``actors.local_cluster``), a head with 1 CPU
and nodes of 1 CPU (1 to ``--max-nodes``); the pipeline starts with 1 worker of 1 CPU, throttled to
``--rate`` records/s (one worker's capacity), ``autoscale`` between 1 and 4 workers. A spike of ``--spike``
records lands at once; measured from the coordinator's own event times:

- decision: spike -> the policy asks for more workers (room reserved);
- nodes: spike -> Ray's autoscaler has added the nodes (the room exists);
- scaled: spike -> the new workers run (after the checkpointed handoff);
- drained: spike -> lag under target again; scale-in: spike -> back to 1 worker; nodes removed: spike -> the
  idle nodes are gone.

Usage: ``python bench/autoscale.py [--spike 40000]``; writes ``bench/results/autoscale.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.runtime import local_ray_env  # noqa: E402

local_ray_env()

from actors import control  # noqa: E402
from actors.local_cluster import LocalCluster  # noqa: E402
from bench.cluster_common import save, teardown  # noqa: E402
from pipeline.io.broker import EmbeddedBroker  # noqa: E402
from pipeline.io.kafka import produce_all  # noqa: E402
from pipeline.synthetic import events  # noqa: E402

console = Console()
PARTITIONS = 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spike", type=int, default=40_000)
    ap.add_argument("--rate", type=int, default=800)
    ap.add_argument("--max-nodes", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raystream-autoscale-"))
    broker = EmbeddedBroker().start()
    cluster = LocalCluster(str(work / "cluster"), head_cpus=1)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "spike": args.spike,
              "rate_per_worker": args.rate}
    import subprocess
    import yaml

    run = None
    try:
        cluster.start_head(autoscaling={"available_node_types": {"cpu1": {"resources": {"CPU": 1}, "min_workers": 1,
                                                                          "max_workers": args.max_nodes}},
                                        "idle_timeout_minutes": 0.1})
        import ray

        ray.init(address=cluster.address, namespace="raystream", log_to_driver=False, configure_logging=False)
        nodes = lambda: sum(1 for n in ray.nodes() if n["Alive"])  # noqa: E731
        values, keys, _ = events(args.spike + 2_000, 1_765_000_000_000, rate_per_s=1000, tenants=8, seed=4)
        parts = [int(k.decode().split("-")[1]) % PARTITIONS for k in keys]
        broker.create_topic("events", PARTITIONS)
        produce_all(broker.bootstrap, "events", values[:2_000], keys[:2_000], parts[:2_000])
        spec = {"name": "autoscale", "source": {"kafka": {"bootstrap_servers": broker.bootstrap, "topic": "events",
                                                          "max_batch_records": 400, "max_rate": args.rate}},
                "event_time": {"field": "ts", "max_out_of_orderness": "1s", "idle_timeout": "1h"},
                "windows": [{"name": "w", "type": "tumbling", "size": "2s", "group_by": ["tenant_id"],
                             "aggregations": ["count"]}],
                "sinks": [{"parquet": {"uri": f"file://{work}/out"}}],
                "checkpoint": {"uri": f"file://{work}/chk", "interval": "2s"},
                "workers": 1, "worker_cpus": 1,
                "autoscale": {"min_workers": 1, "max_workers": 4, "target_lag": 3000, "catch_up": "15s",
                              "metrics_window": "6s", "stabilization": "3s", "scale_out_cooldown": "5s",
                              "scale_in_delay": "10s", "resources_timeout": "60s"}}
        (work / "p.yaml").write_text(yaml.safe_dump(spec))
        run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(work / "p.yaml"), "-q", "--address",
                                cluster.address], cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        st = _wait(lambda s: s["workers"] and all(w.get("state") == "running" for w in s["workers"])
                   and sum(w.get("lag") or 0 for w in s["workers"]) == 0, 180)
        before = nodes()
        console.print(f"steady: 1 worker, {before} nodes; spike of {args.spike:,} records")
        produce_all(broker.bootstrap, "events", values[2_000:], keys[2_000:], parts[2_000:])
        t_spike = time.time()
        marks: dict[str, float] = {}
        peak_nodes, peak_workers = before, 1
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            st = control.pipeline_status("autoscale", timeout_s=10)
            now = time.time()
            n, w = nodes(), len(st["workers"])
            lag = sum(x.get("lag") or 0 for x in st["workers"])
            for e in st["events"]:
                if e["time"] >= t_spike and "reserving room" in e["event"]:
                    marks.setdefault("decision", e["time"] - t_spike)
                if e["time"] >= t_spike and e["event"].startswith("scaled from 1"):
                    marks.setdefault("scaled", e["time"] - t_spike)
                if e["time"] >= t_spike and "scaled from" in e["event"] and e["event"].split()[4] == "1":
                    marks.setdefault("scale_in", e["time"] - t_spike)
            if n > before:
                marks.setdefault("nodes_added", now - t_spike)
            reporting = all(x.get("state") == "running" and x.get("positions") for x in st["workers"])
            if "scaled" in marks and reporting and lag <= 3000:
                marks.setdefault("drained", now - t_spike)
            if "scale_in" in marks and n <= before:
                marks.setdefault("nodes_removed", now - t_spike)
                break
            peak_nodes, peak_workers = max(peak_nodes, n), max(peak_workers, w)
            time.sleep(0.5)
        result.update(marks={k: round(v, 1) for k, v in marks.items()}, nodes_before=before, peak_nodes=peak_nodes,
                      peak_workers=peak_workers)
    finally:
        if run is not None and run.poll() is None:
            run.terminate()
            try:
                run.wait(60)
            except subprocess.TimeoutExpired:
                run.kill()
        teardown(cluster, broker)
    save("autoscale", result, _plot, console)


def _wait(pred, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            st = control.pipeline_status("autoscale", timeout_s=5)
            if pred(st):
                return st
        except Exception:  # not started yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"not met in {timeout_s}s")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["decision", "nodes_added", "scaled", "drained", "scale_in", "nodes_removed"]
    marks = result.get("marks", {})
    names = [k for k in order if k in marks]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names[::-1], [marks[k] for k in names][::-1], color="#55a868")
    ax.set_xlabel("seconds after the spike")
    ax.set_title(f"autoscaling reaction: {result['spike']:,}-record spike, peak {result.get('peak_workers')} workers on "
                 f"{result.get('peak_nodes')} nodes ({result['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
