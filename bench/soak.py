"""Soak: a pipeline writing all five sinks runs for minutes at a steady rate, with faults on a schedule.

1. start throwaway servers on loopback (tansu broker, PostgreSQL, Redis,
   victoria-metrics as the InfluxDB write API) and a local Ray;
2. produce events at ``--rate`` per second for ``--minutes`` (event time
   follows the clock, up to 0.8 s out of order, keyed by tenant);
3. run the pipeline (tumbling 2 s and sliding 4 s/2 s windows, checkpoints every
   2 s) into Parquet, PostgreSQL (through a breakable proxy), Redis, InfluxDB
   and Kafka, while the schedule injects: a worker kill, a coordinator kill,
   both at once, the broker paused for 10 s, PostgreSQL unreachable for 30 s;
4. every 2 s record each worker's RSS, the lag, positions and health;
5. stop producing, wait for lag 0, stop cleanly, flush the last windows with a
   bounded run from the final checkpoint, and compare every sink with the
   reference computed by DuckDB from what the topic holds;
6. write ``bench/results/soak.json`` and ``soak.png`` (RSS per worker and lag
   over time, faults marked) and print recovery times.

Usage: ``python bench/soak.py [--minutes 10] [--rate 1500] [--workers 2]``.
It is a benchmark, not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "token")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

console = Console()


class Producer(threading.Thread):
    """Produces ``rate`` events/s (event time = wall clock, up to 0.8 s out of order) until stopped."""

    def __init__(self, bootstrap: str, topic: str, rate: int, partitions: int):
        super().__init__(daemon=True)
        from confluent_kafka import Producer as KafkaProducer

        self.topic, self.rate, self.partitions = topic, rate, partitions
        self.producer = KafkaProducer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True,
                                       "message.timeout.ms": 600_000})
        self.stop_event = threading.Event()
        self.sent = 0
        self.failed = 0

    def run(self) -> None:
        from pipeline.synthetic import events

        t0 = time.time()
        tick = 0.1
        chunk = 0
        while not self.stop_event.is_set():
            due = int((time.time() - t0) * self.rate) - self.sent
            if due > 0:
                start_ms = int(time.time() * 1000)
                values, keys, cols = events(due, start_ms, rate_per_s=self.rate, tenants=16, max_disorder_ms=800,
                                            seed=chunk, id_offset=self.sent)
                chunk += 1
                for v, k, t in zip(values, keys, cols["tenant_id"]):
                    self._produce(v, k, int(t.split("-")[1]) % self.partitions)
                self.sent += due
            self.producer.poll(0)
            self.stop_event.wait(tick)
        self.producer.flush(600)
        # the last record of each partition goes alone, so the broker reports its end offset exactly
        from pipeline.synthetic import events as final_events

        values, keys, _ = final_events(self.partitions, int(time.time() * 1000), rate_per_s=1000, seed=10**6)
        for p in range(self.partitions):
            self._produce(values[p], keys[p], p)
            self.producer.flush(60)
        self.sent += self.partitions

    def _produce(self, value: bytes, key: bytes, partition: int) -> None:
        def cb(err, _msg):
            if err is not None:
                self.failed += 1

        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, partition=partition, on_delivery=cb)
                return
            except BufferError:
                self.producer.poll(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=1500, help="events per second produced")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60

    import ray

    from actors import control
    from pipeline.driver import run_pipeline
    from pipeline.io.kafka import read_to_end
    from pipeline.spec import parse_spec
    from tests import services
    from tests.services import TcpProxy
    from tests.test_recovery import check_all_sinks

    work = Path(tempfile.mkdtemp(prefix="raystream-soak-"))
    svcs = {name: getattr(services, f"start_{name}")() for name in ("broker", "postgres", "redis", "victoria_metrics")}
    broker, pg, redis_svc, vm = svcs["broker"], svcs["postgres"], svcs["redis"], svcs["victoria_metrics"]
    pg_port = int(pg.extra["dsn"].rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(pg_port)
    ray.init(address="local", namespace="raystream", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    name, topic, partitions = "soak", "soak-events", 4
    broker.extra["broker"].create_topic(topic, partitions)
    d = {
        "name": name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic, "max_batch_records": 5000}},
        "event_time": {"field": "ts", "max_out_of_orderness": "1s", "allowed_lateness": "0s", "idle_timeout": "10s"},
        "windows": [
            {"name": "tumble", "type": "tumbling", "size": "2s", "group_by": ["tenant_id", "event_type"],
             "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
            {"name": "slide", "type": "sliding", "size": "4s", "slide": "2s", "group_by": ["tenant_id"],
             "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
        ],
        "sinks": [
            {"parquet": {"uri": f"file://{work}/out"}},
            {"postgres": {"dsn": pg.extra["dsn"].replace(f":{pg_port}/", f":{proxy.port}/"), "connect_timeout": "1s"}},
            {"redis": {"url": redis_svc.extra["url"], "prefix": f"{name}:"}},
            {"influxdb": {"url": vm.extra["url"], "measurement_prefix": f"{name}_"}},
            {"kafka": {"topic": f"{topic}.windows"}},
        ],
        "checkpoint": {"uri": f"file://{work}/chk", "interval": "2s", "keep": 3},
        "health": {"heartbeat_timeout": "4s", "stall_timeout": "20s"},
        "workers": args.workers,
        "worker_cpus": round(min(0.5, 1.8 / args.workers), 2),
    }
    spec = parse_spec(d)
    producer = Producer(broker.address, topic, args.rate, partitions)
    stop = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = run_pipeline(spec, stop=stop)
        except BaseException as exc:  # reported at the end
            outcome["error"] = exc

    samples: list[dict] = []
    faults: list[dict] = []
    recoveries: list[dict] = []
    t_start = time.time()
    producer.start()
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    control.connect(name, ray.get_runtime_context().gcs_address)

    def status() -> dict | None:
        try:
            return control.pipeline_status(name, timeout_s=10)
        except Exception:  # restarting: the next sample has it
            return None

    def sample() -> None:
        st = status()
        if st is None:
            return
        samples.append({"t": time.time() - t_start, "lag": sum(w.get("lag") or 0 for w in st["workers"]),
                        "rss_mib": {w["index"]: (w.get("rss_bytes") or 0) / 2**20 for w in st["workers"]},
                        "health": {w["index"]: w.get("health") for w in st["workers"]},
                        "degraded": st["degraded"], "produced": producer.sent})

    def kill_worker(index: int) -> None:
        k = control.kill_worker(name, index)
        faults.append({"t": time.time() - t_start, "fault": f"worker {index} killed"})
        threading.Thread(target=watch_recovery, args=(index, k["pid"], k["killed_at"], f"worker {index} kill"),
                         daemon=True).start()

    def watch_recovery(index: int, pid: int, killed_at: float, what: str) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            st = status()
            w = next((w for w in (st or {}).get("workers", []) if w["index"] == index), None)
            if w and w.get("pid") not in (None, pid) and w.get("first_batch_at"):
                recoveries.append({"fault": what, "recovery_s": w["first_batch_at"] - killed_at})
                return
            time.sleep(0.2)
        recoveries.append({"fault": what, "recovery_s": None})

    def kill_coordinator(with_worker: int | None = None) -> None:
        st = status()
        if with_worker is not None:
            w = next(w for w in st["workers"] if w["index"] == with_worker)
            os.kill(st["coordinator_pid"], signal.SIGKILL)
            os.kill(w["pid"], signal.SIGKILL)
            killed = time.time()
            faults.append({"t": killed - t_start, "fault": f"coordinator + worker {with_worker} killed together"})
            threading.Thread(target=watch_recovery, args=(with_worker, w["pid"], killed, "coordinator + worker kill"),
                             daemon=True).start()
        else:
            control.kill_coordinator(name)
            faults.append({"t": time.time() - t_start, "fault": "coordinator killed"})

    def pause_broker(seconds: float) -> None:
        faults.append({"t": time.time() - t_start, "fault": f"broker paused {seconds:.0f}s"})
        os.kill(broker.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(broker.proc.pid, signal.SIGCONT)

    def sink_outage(seconds: float) -> None:
        faults.append({"t": time.time() - t_start, "fault": f"PostgreSQL unreachable {seconds:.0f}s"})
        proxy.set_broken(True)
        time.sleep(seconds)
        proxy.set_broken(False)

    schedule = [(0.15, lambda: kill_worker(0)), (0.30, kill_coordinator), (0.45, lambda: kill_coordinator(1)),
                (0.60, lambda: pause_broker(10)), (0.75, lambda: sink_outage(30))]
    cols = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*cols, console=console) as prog:
        task = prog.add_task("soak", total=duration, info="")
        next_sample = 0.0
        while time.time() - t_start < duration:
            el = time.time() - t_start
            while schedule and el >= schedule[0][0] * duration:
                _, fault = schedule.pop(0)
                threading.Thread(target=fault, daemon=True).start()
            if el >= next_sample:
                sample()
                next_sample = el + 2.0
            last = samples[-1] if samples else {}
            prog.update(task, completed=el, info=f"produced {producer.sent:,}  lag {last.get('lag', '?')}  "
                                                  f"faults {len(faults)}")
            time.sleep(0.5)
        producer.stop_event.set()
        producer.join(600)
        prog.update(task, description="draining", info="")
        deadline = time.time() + 600
        while time.time() < deadline:
            sample()
            if samples and samples[-1]["lag"] == 0:
                break
            time.sleep(2)
    drained_at = time.time() - t_start
    stop.set()
    runner.join(600)
    if "error" in outcome:
        raise SystemExit(f"the soak run failed: {outcome['error']!r}")
    console.print("flushing the last windows (bounded run from the final checkpoint)")
    flush = run_pipeline(spec, until_end=True)
    msgs = read_to_end(broker.address, topic)
    raw = [json.loads(m.value()) for m in msgs]
    df = pd.DataFrame(raw)
    df["partition"] = [m.partition() for m in msgs]
    df["offset"] = [m.offset() for m in msgs]
    df = df.sort_values(["partition", "offset"]).reset_index(drop=True)
    verdict = "all five sinks equal the reference"
    try:
        check_all_sinks(d, df, broker, pg, redis_svc, vm)
    except AssertionError as exc:
        verdict = f"MISMATCH: {exc}"
    rss = _rss_summary(samples)
    result = {
        "minutes": args.minutes, "rate": args.rate, "workers": args.workers, "events": len(df),
        "produced": producer.sent, "produce_failures": producer.failed, "drained_at_s": drained_at,
        "faults": faults, "recoveries": recoveries, "degraded_ever": any(s["degraded"] for s in samples),
        "max_lag": max((s["lag"] for s in samples), default=0), "rss": rss, "verdict": verdict,
        "flush_records": flush.records, "samples": samples,
        "machine": {"cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
    }
    (args.out / "soak.json").write_text(json.dumps(result, indent=1, default=str))
    _plot(result, args.out / "soak.png")
    proxy.close()
    ray.shutdown()
    for s in svcs.values():
        s.stop()
    console.print(f"{len(df):,} events in {args.minutes:g} min at {args.rate}/s; {verdict}")
    for r in recoveries:
        console.print(f"  {r['fault']}: processing resumed after {r['recovery_s']:.2f}s" if r["recovery_s"] is not None
                      else f"  {r['fault']}: no recovery seen within 120 s")
    for w, v in rss.items():
        console.print(f"  worker {w} RSS: first half mean {v['first_half_mib']:.0f} MiB, second half {v['second_half_mib']:.0f} "
                      f"MiB, max {v['max_mib']:.0f} MiB")
    console.print(f"  max lag {result['max_lag']:,}; degraded ever: {result['degraded_ever']}")
    console.print(f"wrote {args.out / 'soak.json'} and soak.png")
    if verdict.startswith("MISMATCH"):
        raise SystemExit(1)


def _rss_summary(samples: list[dict]) -> dict:
    by: dict[int, list[tuple[float, float]]] = {}
    for s in samples:
        for w, v in s["rss_mib"].items():
            if v:
                by.setdefault(int(w), []).append((s["t"], v))
    out = {}
    for w, pts in by.items():
        vals = np.array([v for _, v in pts])
        half = len(vals) // 2
        out[w] = {"first_half_mib": float(vals[:half].mean()) if half else float(vals.mean()),
                  "second_half_mib": float(vals[half:].mean()), "max_mib": float(vals.max())}
    return out


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    by: dict[int, list] = {}
    for s in result["samples"]:
        for w, v in s["rss_mib"].items():
            by.setdefault(int(w), []).append((s["t"], v))
    for w, pts in sorted(by.items()):
        a1.plot([t for t, _ in pts], [v for _, v in pts], label=f"worker {w}")
    a1.set_ylabel("RSS (MiB)")
    a1.legend(loc="upper left")
    a2.plot([s["t"] for s in result["samples"]], [s["lag"] for s in result["samples"]], color="#a33")
    a2.set_ylabel("lag (records)")
    a2.set_xlabel("seconds")
    for f in result["faults"]:
        for ax in (a1, a2):
            ax.axvline(f["t"], color="#888", ls="--", lw=0.8)
        a1.text(f["t"], a1.get_ylim()[1], f" {f['fault']}", rotation=90, va="top", fontsize=7)
    a1.set_title(f"soak: {result['minutes']:g} min at {result['rate']}/s, {result['workers']} workers, five sinks "
                 f"— {'exact' if not result['verdict'].startswith('MISMATCH') else 'MISMATCH'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
