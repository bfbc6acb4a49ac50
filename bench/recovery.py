"""Recovery benchmark: time from a worker SIGKILL to processing resumed, and
from a coordinator SIGKILL to a restarted coordinator that adopted its workers.

A pipeline (2 workers, 4 partitions, Parquet sink, a checkpoint every 2 s,
consumption throttled so the run lasts long enough) runs on a local Ray over an
embedded broker; ``raystream chaos``'s functions kill a worker ``--kills``
times (waiting for each recovery) and the coordinator once. "Resumed" is the
moment the new worker process has restored its partitions from the latest
checkpoint and processed its first batch.

Usage: ``python bench/recovery.py [--kills 5]``; writes
``bench/results/recovery.json`` and ``recovery.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.runtime import ensure_ray, local_ray_env  # noqa: E402

local_ray_env()

from actors import control  # noqa: E402
from pipeline.driver import run_pipeline  # noqa: E402
from pipeline.io.broker import EmbeddedBroker  # noqa: E402
from pipeline.io.kafka import produce_all  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402
from pipeline.synthetic import events  # noqa: E402

console = Console()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--events", type=int, default=400_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raystream-recovery-"))
    broker = EmbeddedBroker().start()
    try:
        values, keys, cols = events(args.events, 1_765_000_000_000, rate_per_s=5000, tenants=100, seed=1)
        parts = [int(k.decode().split("-")[1]) % 4 for k in keys]
        broker.create_topic("events", 4)
        produce_all(broker.bootstrap, "events", values, keys, parts)
        spec = parse_spec({
            "name": "recovery-bench",
            "source": {"kafka": {"bootstrap_servers": broker.bootstrap, "topic": "events", "max_batch_records": 5000,
                                 "max_rate": 10_000}},
            "event_time": {"field": "ts", "max_out_of_orderness": "2s", "allowed_lateness": "1s"},
            "windows": [{"name": "tumble", "type": "tumbling", "size": "10s", "group_by": ["tenant_id", "event_type"],
                         "aggregations": ["count", "sum(value)", "p95(value)"]}],
            "sinks": [{"parquet": {"uri": f"file://{work}/out"}}],
            "checkpoint": {"uri": f"file://{work}/chk", "interval": "2s"},
            "health": {"max_restarts": args.kills + 2},
            "workers": 2,
        })
        ensure_ray(None, num_cpus=2)
        done = threading.Event()
        report: list = []
        t = threading.Thread(target=lambda: (report.append(run_pipeline(spec, until_end=True)), done.set()), daemon=True)
        t.start()
        name = spec.name

        def status():
            try:
                return control.pipeline_status(name, timeout_s=10)
            except Exception:  # starting or restarting
                return None

        def wait(pred, timeout=120):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                st = status()
                if st is not None and pred(st):
                    return st
                time.sleep(0.05)
            raise TimeoutError("no recovery")

        worker_s, coord_s = [], []
        with Progress(console=console) as progress:
            task = progress.add_task("kills", total=args.kills + 1)
            for k in range(args.kills):
                wait(lambda s: s["last_checkpoint"] is not None and all(w.get("state") == "running" and w.get("first_batch_at")
                                                                      for w in s["workers"]))
                killed = control.kill_worker(name, k % 2)
                st = wait(lambda s: any(w["index"] == killed["index"] and w.get("pid") != killed["pid"]
                                        and w.get("first_batch_at") for w in s["workers"]))
                w = next(w for w in st["workers"] if w["index"] == killed["index"])
                worker_s.append(w["first_batch_at"] - killed["killed_at"])
                progress.advance(task)
            killed = control.kill_coordinator(name)
            wait(lambda s: s["coordinator_pid"] != killed["pid"] and len(s["workers"]) == 2)
            coord_s.append(time.time() - killed["killed_at"])
            progress.advance(task)
        done.wait(600)
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "events": args.events,
            "worker_kill_to_resumed_s": worker_s,
            "worker_kill_to_resumed_median_s": float(np.median(worker_s)),
            "worker_kill_to_resumed_max_s": float(np.max(worker_s)),
            "coordinator_kill_to_adopted_s": coord_s[0],
            "records": report[0].records if report else None,
        }
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "recovery.json").write_text(json.dumps(result, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(1, len(worker_s) + 1), worker_s, label="worker SIGKILL → first batch of the new worker")
        ax.axhline(coord_s[0], color="tab:red", ls="--", label="coordinator SIGKILL → restarted and adopted")
        ax.axhline(10, color="grey", ls=":", label="target 10 s")
        ax.set_xlabel("kill #")
        ax.set_ylabel("seconds")
        ax.set_title("raystream recovery time (2 workers, 4 partitions)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "recovery.png", dpi=120)
        console.print_json(data=result)
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
