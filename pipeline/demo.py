"""``raystream demo``: everything on one laptop with embedded defaults."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import yaml

from pipeline.io.broker import EmbeddedBroker
from pipeline.io.kafka import produce_all
from pipeline.spec import parse_spec
from pipeline.synthetic import events

__all__ = ["DEMO_SPEC", "run_demo"]

# The example spec of the README (examples/clicks.yaml), embedded so the demo needs no files.
DEMO_SPEC = """
name: clicks
source:
  kafka:
    bootstrap_servers: ${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
    topic: ${TOPIC:-events}
    format: json
event_time:
  field: ts
  max_out_of_orderness: 2s
  allowed_lateness: 0s
  idle_timeout: 5s
windows:
  - name: tenant_type_10s
    type: tumbling
    size: 10s
    group_by: [tenant_id, event_type]
    aggregations: [count, sum(value), min(value), max(value), mean(value), p95(value)]
sinks:
  - parquet: {uri: "${OUT_URI:-file://./out}"}
late_output:
  parquet: {uri: "${LATE_URI:-file://./late}"}
workers: 2
"""


def _producer(bootstrap: str, topic: str, rate: int, stop: threading.Event) -> None:
    """Produce ``rate`` events/s in 100 ms steps: event time = now - up to 2 s; 0.2 % late by 30 s."""
    step = max(1, rate // 10)
    seed = 0
    while not stop.is_set():
        t0 = time.monotonic()
        values, keys, _ = events(
            step, int(time.time() * 1000) - 100, rate, tenants=20, late_fraction=0.002,
            seed=seed, id_offset=seed * step,
        )
        produce_all(bootstrap, topic, values, keys, single_last=False)
        seed += 1
        stop.wait(max(0.0, 0.1 - (time.monotonic() - t0)))


def run_demo(duration, rate: int, out: Path, workers: int, console, run_and_report) -> None:
    out = out.resolve()
    with EmbeddedBroker() as broker:
        broker.create_topic("events", 4)
        console.print(f"[bold]raystream demo[/]: broker {broker.bootstrap}, topic events (4 partitions), "
                      f"{rate:,} events/s, {workers} workers, output under {out}")
        env = {"KAFKA_BOOTSTRAP": broker.bootstrap, "TOPIC": "events",
               "OUT_URI": f"file://{out}/windows", "LATE_URI": f"file://{out}/late"}
        data = yaml.safe_load(DEMO_SPEC)
        data["workers"] = workers
        spec = parse_spec(data, env)
        stop = threading.Event()
        producer = threading.Thread(target=_producer, args=(broker.bootstrap, "events", rate, stop), daemon=True)
        producer.start()
        try:
            run_and_report(spec, until_end=False, address=None, inline=False, quiet=False, duration=duration)
        finally:
            stop.set()
            producer.join(5)
        console.print(f"windows: {out}/windows/clicks/tenant_type_10s   late records: {out}/late/clicks/late")
