"""Throughput benchmark of the streaming core (issue: events/s per worker vs raw consume).

1. generate N events (~120-byte JSON, 4 partitions, 100 tenants, 8 event types,
   up to 2 s out of order) and produce them to an embedded broker;
2. measure the raw confluent-kafka consume rate on that broker (one consumer,
   all partitions, ``consume(num_messages=…)``, values touched, nothing else);
3. run ``raystream run examples/clicks.yaml --until-end`` (same windows and
   aggregations) with 1 worker and with 2 workers, each in its own local Ray;
4. write ``bench/results/throughput.json`` and ``throughput.png``.

Usage: ``python bench/throughput.py [--events 1000000] [--workers 1 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io.broker import EmbeddedBroker  # noqa: E402
from pipeline.io.kafka import produce_all  # noqa: E402
from pipeline.synthetic import events  # noqa: E402

console = Console()


def raw_consume_rate(bootstrap: str, topic: str, total: int, repeats: int = 3) -> float:
    from confluent_kafka import Consumer, Message, TopicPartition

    best = 0.0
    for r in range(repeats):
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"raw-{r}", "enable.auto.commit": False,
                      "fetch.queue.backoff.ms": 10, "queued.max.messages.kbytes": 262144,
                      "fetch.max.bytes": 104857600, "max.partition.fetch.bytes": 16777216})
        c.assign([TopicPartition(topic, p, 0) for p in range(4)])
        n, t0 = 0, time.perf_counter()
        while n < total:
            msgs = c.consume(num_messages=100_000, timeout=1.0)
            values = list(map(Message.value, msgs))  # touch every value, as any consumer must
            n += len(values)
        best = max(best, n / (time.perf_counter() - t0))
        c.close()
    return best


def run_pipeline_cli(bootstrap: str, topic: str, workers: int, work: Path, per_partition: bool = False,
                     metrics: bool = True, inline: bool = False, tag: str | None = None) -> dict:
    spec = yaml.safe_load((ROOT / "examples" / "clicks.yaml").read_text())
    spec["workers"] = workers
    for w in spec["windows"]:
        w["per_partition"] = per_partition
    spec["worker_cpus"] = round(min(1.0, 1.9 / workers), 2)  # the coordinator needs 0.01 of the 2 CPUs
    spec["observability"] = {"metrics": metrics, "tenant_field": "tenant_id"}
    tag = tag or f"{workers}{'-pp' if per_partition else ''}"
    spec_path = work / f"spec-{tag}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    report = work / f"report-{tag}.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP": bootstrap, "TOPIC": topic,
           "OUT_URI": f"file://{work}/out-{tag}", "LATE_URI": f"file://{work}/late-{tag}"}
    t0 = time.perf_counter()
    extra = ["--inline"] if inline else []
    if metrics:  # served and exported as in production (Ray's metrics agent, or prometheus_client inline)
        from pipeline.io.broker import free_port

        extra += ["--metrics-port", str(free_port())]
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "raystream"), "run", str(spec_path), "--until-end", "--quiet",
                           "--report", str(report), *extra], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"raystream run failed:\n{proc.stderr[-3000:]}")
    out = json.loads(report.read_text())
    out["command_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--per-partition", action="store_true",
                    help="windows with per_partition: true (no merge across partitions); results in throughput-per-partition.*")
    ap.add_argument("--metrics-cost", type=int, metavar="REPEATS", default=0,
                    help="instead: 1 worker with metrics off and on (Ray, and inline with prometheus_client), "
                         "alternated REPEATS times; results in metrics-cost.*")
    args = ap.parse_args()
    if args.metrics_cost:
        metrics_cost(args)
        return
    name = "throughput-per-partition" if args.per_partition else "throughput"
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="raystream-bench-"))
    n = args.events
    values, keys, parts = _generate(n)
    mean_bytes = float(np.mean([len(v) for v in values[:10000]]))
    results: dict = {"events": n, "mean_event_bytes": mean_bytes, "per_partition": args.per_partition, "runs": []}
    with EmbeddedBroker() as broker:
        broker.create_topic("bench", 4)
        t0 = time.perf_counter()
        produce_all(broker.bootstrap, "bench", values, keys, parts)
        console.print(f"produced {n:,} events ({mean_bytes:.0f} B mean) in {time.perf_counter() - t0:.1f}s")
        del values, keys
        raw = raw_consume_rate(broker.bootstrap, "bench", n)
        results["raw_consume_events_per_s"] = raw
        console.print(f"raw confluent-kafka consume: {raw:,.0f} events/s")
        for w in args.workers:
            rep = run_pipeline_cli(broker.bootstrap, "bench", w, work, args.per_partition)
            per_worker = []
            for ws in rep["workers"]:
                per_worker.append({
                    "worker": ws["index"], "partitions": ws["partitions"], "records": ws["records"],
                    "run_s": ws["run_s"], "busy_s": ws["busy_s"], "consume_s": ws["consume_s"],
                    "process_s": ws["process_s"], "write_s": ws["write_s"],
                    "events_per_s": ws["records"] / ws["run_s"] if ws["run_s"] else 0.0,
                    "max_rss_mib": ws["max_rss_bytes"] / 2**20, "windows_emitted": ws["windows_emitted"],
                    "late": ws["late"], "rejected": ws["rejected"],
                })
            total = sum(p["records"] for p in per_worker)
            run = {"workers": w, "total_events": total, "pipeline_wall_s": rep["wall_s"], "command_s": rep["command_s"],
                   "aggregate_events_per_s": total / max(p["run_s"] for p in per_worker), "per_worker": per_worker}
            run["ratio_per_worker_to_raw"] = min(p["events_per_s"] for p in per_worker) / raw
            run["merge_owners"] = [{"shard": o["shard"], "partials": o["partials"], "rows_emitted": o["rows_emitted"],
                                    "max_rss_mib": o["max_rss_bytes"] / 2**20} for o in rep.get("merge_owners", [])]
            run["windows_emitted"] = sum(p["windows_emitted"] for p in per_worker) + sum(
                o["rows_emitted"] for o in run["merge_owners"])
            results["runs"].append(run)
            if run["merge_owners"]:
                console.print("merge owners: " + ", ".join(
                    f"m{o['shard']} {o['partials']:,} partials, {o['rows_emitted']:,} rows, peak RSS {o['max_rss_mib']:.0f} MiB"
                    for o in run["merge_owners"]))
            console.print(f"{w} worker(s): " + ", ".join(
                f"w{p['worker']} {p['events_per_s']:,.0f} ev/s, peak RSS {p['max_rss_mib']:.0f} MiB" for p in per_worker)
                + f"; ratio to raw {run['ratio_per_worker_to_raw']:.2f}")
    results["machine"] = {
        "cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"),
    }
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / f"{name}.png")
    console.print(f"wrote {args.out / name}.json and {name}.png")


def _generate(n: int):
    with Progress(console=console) as prog:
        task = prog.add_task("generating events", total=n)
        values, keys, parts = [], [], []
        for i in range(0, n, 100_000):
            m = min(100_000, n - i)
            v, k, cols = events(m, 1_760_000_000_000 + i, rate_per_s=1000, tenants=100, max_disorder_ms=2000,
                                seed=i, id_offset=i)
            values += v
            keys += k
            parts += [int(t.split("-")[1]) % 4 for t in cols["tenant_id"]]
            prog.update(task, advance=m)
    return values, keys, parts


def metrics_cost(args) -> None:
    """Events/s of one worker with metrics off and on, alternated (same broker, same input) so drift hits both."""
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="raystream-bench-"))
    values, keys, parts = _generate(args.events)
    configs = [("ray, metrics off", False, False), ("ray, metrics on (Ray metrics API)", True, False),
               ("inline, metrics off", False, True), ("inline, metrics on (prometheus_client)", True, True)]
    rates: dict[str, list[float]] = {c[0]: [] for c in configs}
    with EmbeddedBroker() as broker:
        broker.create_topic("bench", 4)
        produce_all(broker.bootstrap, "bench", values, keys, parts)
        del values, keys
        for r in range(args.metrics_cost):
            for label, metrics, inline in configs:
                rep = run_pipeline_cli(broker.bootstrap, "bench", 1, work, metrics=metrics, inline=inline,
                                       tag=f"mc-{r}-{int(metrics)}{int(inline)}")
                ws = rep["workers"]
                rate = sum(w["records"] for w in ws) / max(w["run_s"] for w in ws)
                rates[label].append(rate)
                console.print(f"repeat {r + 1}: {label}: {rate:,.0f} events/s")
    med = {k: float(np.median(v)) for k, v in rates.items()}
    per_batch = {"ray": _metrics_per_batch("ray"), "prometheus_client": _metrics_per_batch("prom")}
    batch_records = yaml.safe_load((ROOT / "examples" / "clicks.yaml").read_text())["source"]["kafka"].get(
        "max_batch_records", 100_000)
    batch_s = batch_records / med[configs[0][0]]  # one full batch at the measured rate without metrics
    console.print(f"metrics work per batch of {batch_records:,} records: Ray {per_batch['ray'] * 1e6:,.0f} us, "
                  f"prometheus_client {per_batch['prometheus_client'] * 1e6:,.0f} us; a batch takes {batch_s * 1e3:,.1f} ms")
    results = {"events": args.events, "repeats": args.metrics_cost, "events_per_s": rates, "median": med,
               "metrics_seconds_per_batch": per_batch, "batch_records": batch_records, "batch_seconds": batch_s,
               "cost_per_batch_ray": per_batch["ray"] / batch_s,
               "cost_per_batch_prometheus_client": per_batch["prometheus_client"] / batch_s,
               "cost_ray": 1 - med[configs[1][0]] / med[configs[0][0]],
               "cost_inline": 1 - med[configs[3][0]] / med[configs[2][0]],
               "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%d")}}
    (args.out / "metrics-cost.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    labels = list(med)
    ax.barh(labels, [med[k] / 1000 for k in labels], color=["#888", "#2a6", "#888", "#26a"])
    for i, k in enumerate(labels):
        ax.text(med[k] / 1000, i, f" {med[k] / 1000:,.0f}k", va="center")
    ax.set_xlabel("thousand events / s (median)")
    ax.set_title(f"metrics: end-to-end Ray {results['cost_ray']:+.1%}, inline {results['cost_inline']:+.1%}; "
                 f"per batch {results['cost_per_batch_ray']:.2%} / {results['cost_per_batch_prometheus_client']:.2%}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "metrics-cost.png", dpi=110)
    console.print(f"cost of metrics: Ray {results['cost_ray']:+.2%}, inline {results['cost_inline']:+.2%}; "
                  f"wrote {args.out / 'metrics-cost.json'} and .png")


def _metrics_per_batch(kind: str, repeats: int = 2000) -> float:
    """Seconds of metrics work the loop does per batch (100 tenants, 4 partitions, rejects, 2 windows, 2 sinks)."""
    import pyarrow as pa

    from pipeline.metrics import LoopMetrics, Metrics, PromClientBackend
    from pipeline.process import BatchResult

    if kind == "ray":
        from actors.runtime import local_ray_env

        local_ray_env()  # before Ray is imported
        import ray

        from actors.metrics import RayBackend

        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
        backend = RayBackend()
    else:
        backend = PromClientBackend()
    lm = LoopMetrics(Metrics(backend), "bench", "0", "tenant_id", 100)
    rejects = pa.table({"reason": ["decode_error"] * 5 + ["schema_violation:required"] * 5})
    result = BatchResult(records=10_000, rejected=10, late_records=5, rejects=rejects,
                         tenants={f"tenant-{i:03d}": 100 for i in range(100)})
    parts = np.repeat(np.arange(4, dtype=np.int32), 2500)
    table = pa.table({"window": ["w"] * 50, "window_end": pa.array(np.full(50, 1_760_000_000_000), pa.timestamp("ms"))})
    try:
        t0 = time.perf_counter()
        for _ in range(repeats):
            lm.batch(parts, result, 0.05, False, result.tenants)
            lm.watermark(1_760_000_000_000, 1000, 1 << 28)
            for w in ("tenant_type_10s", "tenant_1m"):
                lm.emitted(w, table)
                lm.sink_write("parquet", 0.001)
        return (time.perf_counter() - t0) / repeats
    finally:
        if kind == "ray":
            ray.shutdown()


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["raw consume"]
    vals = [results["raw_consume_events_per_s"]]
    for run in results["runs"]:
        for p in run["per_worker"]:
            labels.append(f"{run['workers']}w: worker {p['worker']}")
            vals.append(p["events_per_s"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(labels, [v / 1000 for v in vals], color=["#888"] + ["#2a6"] * (len(vals) - 1))
    ax.set_xlabel("thousand events / s")
    ax.set_title(f"raystream throughput, {results['events']:,} events ({results['machine']['cores']} cores)")
    for i, v in enumerate(vals):
        ax.text(v / 1000, i, f" {v / 1000:,.0f}k", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
