"""Lag-driven autoscaling on a Ray cluster whose nodes come and go by Ray's own autoscaler (v2, as KubeRay runs
it) with the fake multi-node provider of Ray's autoscaler tests: nodes are launched and removed as real
processes. A lag spike must give more workers, the workers more nodes, the lag must drain, the pipeline scale in
after its delay and the idle nodes go; the windows written throughout equal the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from actors.local_cluster import LocalCluster
from pipeline.io.kafka import produce_all
from pipeline.io.sinks.parquet import read_windows
from pipeline.spec import parse_spec
from pipeline.synthetic import events
from tests import reference
from tests.services import sigterm_and_wait
from tests.test_multinode import StatusProbe

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 8
BASE_MS = 1_765_000_000_000
WINDOWS = [{"name": "tumble", "type": "tumbling", "size": "2s", "group_by": ["tenant_id"],
            "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]}]

pytestmark = [pytest.mark.slow, pytest.mark.drill]


@pytest.fixture
def autoscaling_cluster(tmp_path):
    """Head with 1 CPU (coordinator, merge owners: no worker fits beside them), nodes of 1 CPU added and removed
    by Ray's autoscaler between 1 and 3; idle nodes go after 6 s."""
    c = LocalCluster(str(tmp_path / "cluster"), head_cpus=1)
    try:
        c.start_head(autoscaling={"available_node_types": {"cpu1": {"resources": {"CPU": 1}, "min_workers": 1,
                                                                    "max_workers": 3}},
                                  "idle_timeout_minutes": 0.1})
        c.probe = StatusProbe(c.address)
        yield c
        c.probe.close()
    finally:
        c.stop()


def _nodes(cluster) -> int:
    code = ("import ray\nray.init(address=%r, log_to_driver=False, configure_logging=False)\n"
            "print('NODES', sum(1 for n in ray.nodes() if n['Alive']))") % cluster.address
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("NODES ")))


def test_lag_spike_scales_out_adds_nodes_drains_scales_in_removes_nodes_output_exact(
        autoscaling_cluster, broker, s3, tmp_path, topic_name, pipeline_name):
    import boto3

    cluster = autoscaling_cluster
    n = 40_000
    values, keys, cols = events(n, BASE_MS, rate_per_s=1000, tenants=8, max_disorder_ms=800, seed=21)
    df = pd.DataFrame(cols)
    df["partition"] = df["tenant_id"].map(lambda t: int(t.split("-")[1]) % PARTITIONS)
    df["offset"] = df.groupby("partition").cumcount()
    parts = df["partition"].tolist()
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    boto3.client("s3", endpoint_url=s3.extra["endpoint"], region_name="us-east-1").create_bucket(Bucket=pipeline_name)
    spec_d = {"name": pipeline_name,
              "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name, "max_batch_records": 300,
                                   "max_rate": 600}},  # one worker's capacity: 600 records/s
              "event_time": {"field": "ts", "max_out_of_orderness": "1s", "allowed_lateness": "0s", "idle_timeout": "1h"},
              "windows": WINDOWS, "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}}],
              "checkpoint": {"uri": f"s3://{pipeline_name}/chk", "s3_endpoint_url": s3.extra["endpoint"],
                             "interval": "2s", "timeout": "20s"},
              "health": {"heartbeat_timeout": "5s", "stall_timeout": "60s"},
              "workers": 1, "worker_cpus": 1,
              "autoscale": {"min_workers": 1, "max_workers": 4, "target_lag": 3000, "catch_up": "15s",
                            "metrics_window": "6s", "stabilization": "3s", "scale_out_cooldown": "5s",
                            "scale_in_delay": "10s", "resources_timeout": "15s"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec_d))
    # phase 1: 3,000 records already waiting, then 300/s (half a worker)
    cut1, cut2 = 3_000, 33_000
    produce_all(broker.address, topic_name, values[:cut1], keys[:cut1], parts[:cut1])
    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "p.yaml"), "-q",
                            "--address", cluster.address], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    probe = cluster.probe
    timeline: list[tuple[float, int, int, str | None]] = []  # (t, workers, lag, the policy's reason)
    t0 = time.monotonic()
    sent = cut1

    def trickle(until: float):
        """300 records/s until ``until`` (monotonic), sampling status each half second."""
        nonlocal sent
        while time.monotonic() < until:
            k = min(sent + 150, n - 1)
            if k > sent:
                produce_all(broker.address, topic_name, values[sent:k], keys[sent:k], parts[sent:k])
                sent = k
            st = probe(pipeline_name)
            if st is not None:
                lag = sum(w.get("lag") or 0 for w in st["workers"])
                timeline.append((time.monotonic() - t0, len(st["workers"]), lag, json.dumps(st.get("autoscale"))))
            assert run.poll() is None, run.stderr.read()[-3000:]
            time.sleep(0.5)

    try:
        trickle(time.monotonic() + 12)
        assert timeline and max(w for _, w, _, _ in timeline) == 1, timeline[-5:]
        nodes_before = _nodes(cluster)
        # phase 2: the spike, 30,000 records at once (50 s of work for one worker)
        produce_all(broker.address, topic_name, values[sent:sent + (cut2 - cut1)], keys[sent:sent + (cut2 - cut1)],
                    parts[sent:sent + (cut2 - cut1)])
        sent += cut2 - cut1
        t_spike = time.monotonic() - t0
        peak_nodes = nodes_before
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            trickle(time.monotonic() + 2)
            peak_nodes = max(peak_nodes, _nodes(cluster))
            if max(w for _, w, _, _ in timeline) > 1 and timeline[-1][1] == 1 and timeline[-1][2] < 3000:
                break  # scaled out and back in
        workers = [w for _, w, _, _ in timeline]
        assert max(workers) > 1, [x for x in timeline if x[2] > 10_000][::10]
        t_out = next(t for t, w, _, _ in timeline if w > 1)
        t_in = next(t for t, w, _, _ in timeline if t > t_out and w == 1)
        assert peak_nodes > nodes_before, f"no node was added: {nodes_before} -> {peak_nodes}"
        # the idle nodes go once the workers left them
        deadline = time.monotonic() + 60
        while _nodes(cluster) > nodes_before and time.monotonic() < deadline:
            trickle(time.monotonic() + 2)
        nodes_after = _nodes(cluster)
        st = probe(pipeline_name) or {}
        assert nodes_after <= nodes_before, (f"idle nodes not removed: {nodes_after} alive",
                                             [e["event"] for e in st.get("events", [])][-12:],
                                             [(w["index"], w.get("node")) for w in st.get("workers", [])])
        # the rest of the input, then one record per partition far ahead so every real window closes
        produce_all(broker.address, topic_name, values[sent:], keys[sent:], parts[sent:])
        last = int(df["ts"].max())
        flush = [json.dumps({"event_id": f"f{p}", "tenant_id": f"tenant-{p:03d}", "event_type": "view",
                             "ts": last + 600_000, "value": 0.0, "user_id": "u0"}).encode() for p in range(PARTITIONS)]
        produce_all(broker.address, topic_name, flush, [f"tenant-{p:03d}".encode() for p in range(PARTITIONS)],
                    list(range(PARTITIONS)))
        st = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = probe(pipeline_name)
            if st and sum(sum(w["positions"].values()) for w in st["workers"]) >= n + PARTITIONS \
                    and st.get("last_checkpoint") and sum(st["last_checkpoint"]["offsets"].values()) >= n + PARTITIONS:
                break
            time.sleep(0.5)
        events_seen = [e["event"] for e in (st or {}).get("events", [])]
        err = sigterm_and_wait(run, 120)
        assert run.returncode == 0, err[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    print(f"spike at {t_spike:.0f}s, scaled out at {t_out:.0f}s (+{t_out - t_spike:.0f}s), back to 1 at {t_in:.0f}s; "
          f"nodes {nodes_before} -> {peak_nodes} -> {nodes_after}; workers {sorted(set(workers))}")
    assert any("autoscale" in e for e in events_seen), events_seen
    spec = parse_spec(spec_d)
    w = spec.windows[0]
    want, late = reference.windows(df, w.type, w.group_by, spec.event_time.max_out_of_orderness,
                                   spec.event_time.allowed_lateness, size=w.size)
    assert late.empty
    rows = read_windows(spec.sinks[0].parquet.uri, spec.name, w.name).to_pandas()
    for col in ("window_start", "window_end"):
        if str(rows[col].dtype).startswith("datetime64"):
            rows[col] = rows[col].astype("datetime64[ms, UTC]").astype("int64")
    rows = rows[rows["window_start"] <= last]  # the flush records' own windows stay open
    assert not rows.duplicated([*w.group_by, "window_start"]).any()
    reference.compare(rows, want, w.group_by)
