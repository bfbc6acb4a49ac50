"""A real multi-node Ray cluster on one machine (``actors.local_cluster``): a head with no CPUs (as KubeRay
clusters are often run), worker nodes started with ``ray start`` in their own process groups, everything on
loopback with token auth, checkpoints on S3 (moto) that every node reaches, GCS fault tolerance on an
external Redis. Whole nodes are killed (raylet and every process on it) mid-run; the head's GCS is killed and
restarted. Every run's Parquet output must equal the reference windows of the raw input.
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
from tests import reference, services

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
N = 24_000
WINDOWS = [{"name": "tumble", "type": "tumbling", "size": "2s", "group_by": ["tenant_id", "event_type"],
            "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
           {"name": "slide", "type": "sliding", "size": "4s", "slide": "2s", "group_by": ["tenant_id"],
            "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]}]

pytestmark = [pytest.mark.slow, pytest.mark.drill]


class StatusProbe:
    """One long-lived process connected to the cluster (through the head's raylet, which is never killed here),
    answering ``status`` of a pipeline as JSON: polling without a Ray start per question."""

    CODE = r"""
import json, sys
from actors import control
control.connect("probe", sys.argv[1])
for line in sys.stdin:
    try:
        print("STATUS", json.dumps(control.pipeline_status(line.strip(), timeout_s=5)), flush=True)
    except Exception as exc:
        print("STATUS", json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
"""

    def __init__(self, address: str):
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, address], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT),
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def __call__(self, name: str) -> dict | None:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        while line and not line.startswith("STATUS "):  # Ray prints its own notices on stdout too
            line = self.proc.stdout.readline()
        got = json.loads(line[7:] or "{}")
        return None if "error" in got or not got else got

    def close(self) -> None:
        self.proc.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """Head (0 CPUs, GCS on an external Redis) + nodes a, b, c of 2 CPUs; Ray declares a silent node dead after
    ~8 s, so a replacement started in between could land on it if placement trusted Ray alone."""
    redis = services.start_redis()
    c = LocalCluster(str(tmp_path_factory.mktemp("cluster")), head_cpus=0, redis=redis.address,
                     env={"RAY_health_check_failure_threshold": "8"})
    try:
        c.start_head()
        for name in ("a", "b", "c"):
            c.add_node(name, 2)
        probe = StatusProbe(c.address)
        c.probe = probe
        yield c
        probe.close()
    finally:
        c.stop()
        redis.stop()


@pytest.fixture(scope="module")
def data():
    values, keys, cols = events(N, 1_765_000_000_000, rate_per_s=1000, tenants=8, max_disorder_ms=800,
                                late_fraction=0.0, late_by_ms=0, seed=11)
    df = pd.DataFrame(cols)
    df["partition"] = df["tenant_id"].map(lambda t: int(t.split("-")[1]) % PARTITIONS)
    df["offset"] = df.groupby("partition").cumcount()
    return values, keys, df


def _spec(name, broker, topic, tmp, s3, rate):
    import boto3

    boto3.client("s3", endpoint_url=s3.extra["endpoint"], region_name="us-east-1").create_bucket(Bucket=name)
    return {"name": name,
            "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic, "max_batch_records": 400,
                                 "max_rate": rate}},
            "event_time": {"field": "ts", "max_out_of_orderness": "1s", "allowed_lateness": "0s", "idle_timeout": "30s"},
            "windows": WINDOWS, "sinks": [{"parquet": {"uri": f"file://{tmp}/out"}}],
            "checkpoint": {"uri": f"s3://{name}/chk", "s3_endpoint_url": s3.extra["endpoint"], "interval": "1s",
                           "timeout": "20s"},
            "health": {"heartbeat_timeout": "3s", "stall_timeout": "30s"},
            "workers": 2, "worker_cpus": 0.5}


def _prepare(data, broker, s3, tmp, topic, name, rate) -> dict:
    """The input on its topic and the spec in ``tmp/p.yaml``; returns the spec."""
    values, keys, df = data
    broker.extra["broker"].create_topic(topic, PARTITIONS)
    produce_all(broker.address, topic, values, keys, df["partition"].tolist())
    spec_d = _spec(name, broker, topic, tmp, s3, rate)
    (tmp / "p.yaml").write_text(yaml.safe_dump(spec_d))
    return spec_d


def _check(spec_d, df):
    spec = parse_spec(spec_d)
    for w in spec.windows:
        want, late = reference.windows(df, w.type, w.group_by, spec.event_time.max_out_of_orderness,
                                       spec.event_time.allowed_lateness, size=w.size, slide=w.slide or 0)
        assert late.empty
        rows = read_windows(spec.sinks[0].parquet.uri, spec.name, w.name).to_pandas()
        for col in ("window_start", "window_end"):
            if str(rows[col].dtype).startswith("datetime64"):
                rows[col] = rows[col].astype("datetime64[ms, UTC]").astype("int64")
        assert not rows.duplicated([*w.group_by, "window_start"]).any(), f"{w.name}: duplicate rows"
        reference.compare(rows, want, w.group_by)


def _wait(probe, name, pred, proc, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        assert proc.poll() is None or pred(last or {}), f"the run ended before {what}"
        st = probe(name)
        if st is not None:
            last = st
            if pred(st):
                return st
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {json.dumps(last)[:3000]}")


def _consumed(st) -> int:
    return sum(sum((w.get("positions") or {}).values()) for w in st.get("workers", []))


def test_nodes_lost_mid_run_the_coordinators_too_output_exact(cluster, broker, s3, data, tmp_path, topic_name,
                                                              pipeline_name):
    """`raystream run --address`: workers spread over nodes; a node running a worker is killed (its replacement
    goes elsewhere although Ray still lists the node alive); then the node running the coordinator and a worker
    together is killed: both come back on the last node from the checkpoint; output exact."""
    df = data[2]
    spec_d = _prepare(data, broker, s3, tmp_path, topic_name, pipeline_name, rate=700)
    log = open(tmp_path / "run.out", "w")
    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "p.yaml"), "--until-end", "-q",
                            "--address", cluster.address, "--report", str(tmp_path / "report.json")],
                           stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    probe, ids = cluster.probe, {v: k for k, v in cluster.node_ids().items()}
    try:
        st = _wait(probe, pipeline_name, lambda s: s.get("last_checkpoint") and _consumed(s) > N * 0.15
                   and all(w.get("state") == "running" for w in s["workers"]), run, 120, "a checkpoint mid-stream")
        coordinator = ids[st["coordinator_node"]]
        nodes = {w["index"]: ids[w["node"]] for w in st["workers"]}
        assert len(set(nodes.values())) == 2, f"workers not spread: {nodes}"
        assert coordinator not in nodes.values(), f"workers placed with the coordinator while other nodes were free: {nodes}"

        # 1. a node running only a worker: Ray keeps listing it alive for ~8 s, the replacement must not go there
        victim_index, victim = sorted(nodes.items())[0]
        old_pid = next(w["pid"] for w in st["workers"] if w["index"] == victim_index)
        cluster.kill_node(victim)
        t_kill = time.monotonic()
        st = _wait(probe, pipeline_name, lambda s: any(w["index"] == victim_index and w.get("pid") != old_pid
                                                       and w.get("state") == "running" for w in s["workers"]),
                   run, 90, "the lost worker restarted")
        recovered_1 = time.monotonic() - t_kill
        moved = {w["index"]: ids.get(w["node"]) for w in st["workers"]}
        assert moved[victim_index] != victim and moved[victim_index] is not None, moved
        assert any("does not answer" in e["event"] for e in st["events"]), [e["event"] for e in st["events"]]
        still = {w["index"]: w["positions"] for w in st["workers"]}

        # 2. the node now running the coordinator and a worker together
        coordinator = ids[st["coordinator_node"]]
        assert coordinator in moved.values(), f"expected a worker beside the coordinator: {moved}, coordinator {coordinator}"
        cluster.kill_node(coordinator)
        t_kill = time.monotonic()
        left = ({"a", "b", "c"} - {victim, coordinator}).pop()
        st = _wait(probe, pipeline_name, lambda s: s.get("coordinator_restarted") and len(s["workers"]) == 2
                   and all(w.get("state") in ("running", "drained") and ids.get(w.get("node")) == left for w in s["workers"]),
                   run, 120, "the coordinator and its worker back on the last node")
        recovered_2 = time.monotonic() - t_kill
        assert run.wait(240) == 0, (tmp_path / "run.out").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    print(f"recovery: worker node {recovered_1:.1f}s, coordinator+worker node {recovered_2:.1f}s; positions {still}")
    _check(spec_d, df)
    # the lost nodes come back for the next test (a KubeRay cluster replaces a lost pod the same way)
    for name in (victim, coordinator):
        cluster.add_node(name + "2", 2)


PIPELINE_RUN = r"""
import json, sys
from pipeline.api import Pipeline
d = json.loads(sys.argv[1])
k = d["source"]["kafka"]
p = (Pipeline(d["name"]).kafka(k["bootstrap_servers"], k["topic"], max_batch_records=k["max_batch_records"], max_rate=k["max_rate"])
     .event_time(**d["event_time"]))
for w in d["windows"]:
    opts = {x: w[x] for x in ("size", "slide") if x in w}
    p = getattr(p, w["type"])(w["name"], group_by=w["group_by"], aggregations=w["aggregations"], **opts)
p = (p.parquet(d["sinks"][0]["parquet"]["uri"]).checkpoint(**d["checkpoint"]).health(**d["health"])
     .workers(d["workers"], cpus=d["worker_cpus"]))
from pipeline.spec import parse_spec
assert p.spec() == parse_spec(d), "the builder's spec differs from the YAML's"
report = p.run(until_end=True, address=sys.argv[2])
print("RECORDS", sum(w.get("records", 0) for w in report.workers))
"""


def test_gcs_restarted_workers_keep_running_and_the_run_finishes_exact(cluster, broker, s3, data, tmp_path, topic_name,
                                                                        pipeline_name):
    """The head's GCS killed and started again (state in Redis, as KubeRay runs it): the same worker processes
    keep consuming through it, the run (through the Python API, ``Pipeline.run(address=...)``) ends exact."""
    df = data[2]
    spec_d = _prepare(data, broker, s3, tmp_path, topic_name, pipeline_name, rate=900)
    log = open(tmp_path / "run.out", "w")
    run = subprocess.Popen([sys.executable, "-c", PIPELINE_RUN, json.dumps(spec_d), cluster.address],
                           stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    probe = cluster.probe
    try:
        st = _wait(probe, pipeline_name, lambda s: s.get("last_checkpoint") and _consumed(s) > N * 0.15
                   and all(w.get("state") == "running" for w in s["workers"]), run, 120, "a checkpoint mid-stream")
        pids = {w["index"]: w["pid"] for w in st["workers"]}
        before = _consumed(st)
        down = cluster.restart_gcs(down_s=3.0)
        st = _wait(probe, pipeline_name, lambda s: _consumed(s) > before + 2_000, run, 90, "consumption after the GCS restart")
        assert {w["index"]: w["pid"] for w in st["workers"]} == pids, "workers were replaced: they should have kept running"
        assert all(w.get("restarts", 0) == 0 for w in st["workers"]), st["workers"]
        assert run.wait(240) == 0, (tmp_path / "run.out").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    out = (tmp_path / "run.out").read_text()
    assert f"RECORDS {N}" in out, out[-2000:]
    print(f"GCS down {down:.1f}s")
    _check(spec_d, df)
