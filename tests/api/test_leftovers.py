"""A run returns with nothing of it left in the caller's process (notebooks run many in one kernel)."""

from __future__ import annotations

import gc
import os
import threading
import time

from pipeline.api import Pipeline
from pipeline.io.kafka import produce_all
from pipeline.synthetic import events


def _librdkafka_threads() -> list[str]:
    """librdkafka names its threads ``rdk:…``: one set per client handle still alive."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended while listing
            continue
    return [n for n in names if n.startswith("rdk:")]


def _settled(deadline_s: float = 10.0) -> list[str]:
    end = time.monotonic() + deadline_s
    while True:
        gc.collect()
        left = _librdkafka_threads()
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.2)


def test_inline_run_leaves_no_kafka_client_or_thread(broker, topic_name, pipeline_name, tmp_path):
    values, keys, _ = events(3000, 1_760_000_000_000, rate_per_s=500, tenants=5, late_fraction=0.02, seed=3)
    # late records go to the dead-letter topic (no late output): the run's producer is used, then must be gone
    produce_all(broker.address, topic_name, values, keys)
    assert _settled() == [], "a Kafka client of the test itself is still alive"
    before = {t.ident for t in threading.enumerate()}
    p = (Pipeline(pipeline_name).kafka(broker.address, topic_name)
         .event_time("ts", max_out_of_orderness="1s")
         .tumbling("by_tenant", "10s", group_by=["tenant_id"], aggregations=["count"])
         .parquet(f"file://{tmp_path}/out")
         .kafka_sink(f"{topic_name}-windows"))
    report = p.run(until_end=True, inline=True)
    assert report.records == 3000 and report.late > 0
    assert _settled() == [], "librdkafka threads outlive the run"
    extra = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert extra == [], f"threads of the run still alive: {extra}"


def test_ray_run_leaves_no_kafka_client_in_the_caller(broker, ray_local, topic_name, pipeline_name, tmp_path):
    values, keys, _ = events(2000, 1_760_000_000_000, rate_per_s=500, tenants=5, seed=4)
    produce_all(broker.address, topic_name, values, keys)
    assert _settled() == []
    report = (Pipeline(pipeline_name).kafka(broker.address, topic_name).event_time("ts")
              .tumbling("w", "10s", group_by=["tenant_id"]).parquet(f"file://{tmp_path}/out")).run(until_end=True)
    assert report.records == 2000
    assert _settled() == [], "librdkafka threads outlive the run in the caller"
