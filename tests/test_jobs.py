"""Ray Jobs: a pipeline submitted to a running cluster (token auth on) through the Jobs API, from Python and the CLI.

The cluster is a real Ray head started with ``ray start`` (dashboard on loopback, token authentication): the
job's driver runs ``raystream run`` against it with the spec from ``runtime_env``; its windows must equal the
reference of the raw input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from actors.local_cluster import LocalCluster
from pipeline.api import Pipeline
from pipeline.io.kafka import produce_all
from pipeline.io.sinks.parquet import read_windows
from pipeline.jobs import Job, client, list_jobs
from pipeline.synthetic import events
from tests import reference
from tests.test_end_to_end import _dataset

AGGS = ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("jobs-cluster")), head_cpus=2, dashboard=True)
    c.start_head()
    try:
        yield c
    finally:
        c.stop()


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_submit_bounded_job_from_python(cluster, broker, topic_name, pipeline_name, tmp_path):
    values, keys, parts, df, _, _ = _dataset(5000, seed=31)
    produce_all(broker.address, topic_name, values, keys, parts)
    out = f"file://{tmp_path}/out"
    p = (Pipeline(pipeline_name).kafka(broker.address, topic_name).event_time("ts", max_out_of_orderness="2s")
         .tumbling("tumble", "10s", group_by=["tenant_id"], aggregations=AGGS).parquet(out).workers(2, cpus=0.5))
    job = p.submit(cluster.dashboard_url, until_end=True, python=sys.executable)
    status = job.wait(240)
    log = job.logs()
    assert status == "SUCCEEDED", log[-3000:]
    assert "done 5,000 records" in log
    info = job.info()
    assert info["metadata"]["pipeline"] == pipeline_name and "RAYSTREAM_SPEC_JSON" in info["entrypoint"]
    want, _ = reference.windows(df, "tumbling", ["tenant_id"], 2000, 0, size=10_000)
    reference.compare(read_windows(out, pipeline_name, "tumble").to_pandas(), want, ["tenant_id"])
    assert any(j["id"] == job.id and j["status"] == "SUCCEEDED" for j in list_jobs(cluster.dashboard_url))


def test_cli_submit_follow_list_logs_stop(cluster, broker, topic_name, pipeline_name, tmp_path):
    values, keys, _ = events(4000, 1_760_000_000_000, rate_per_s=200, tenants=6, seed=32)  # 20 s of event time
    produce_all(broker.address, topic_name, values, keys)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
name: {pipeline_name}
source: {{kafka: {{bootstrap_servers: "${{BOOT}}", topic: {topic_name}}}}}
event_time: {{field: ts, max_out_of_orderness: 2s}}
windows: [{{name: tumble, type: tumbling, size: 10s, group_by: [tenant_id], aggregations: [count]}}]
sinks: [{{parquet: {{uri: "file://{tmp_path}/out"}}}}]
""")
    # a streaming job (no --until-end): runs until stopped
    # --no-expand: ${BOOT} is not known here; the job's environment (--env) supplies it on the cluster
    sub = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(spec), "--address", cluster.dashboard_url,
                          "--python", sys.executable, "--no-expand", "--env", f"BOOT={broker.address}"],
                         capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "BOOT"})
    assert sub.returncode == 0, sub.stderr
    jid = sub.stdout.strip().splitlines()[-1]
    job = Job(jid, cluster.dashboard_url)
    assert "${BOOT}" in job.info()["entrypoint"] or "${BOOT}" in json.dumps(
        client(cluster.dashboard_url).get_job_info(jid).runtime_env), "the spec was sent unexpanded"
    deadline = time.monotonic() + 180
    # running: the windows its watermark closed are written while it streams
    while time.monotonic() < deadline and read_windows(f"file://{tmp_path}/out", pipeline_name, "tumble") is None:
        assert job.status() not in ("FAILED", "STOPPED", "SUCCEEDED"), job.logs()[-3000:]
        time.sleep(1)
    assert job.status() == "RUNNING", job.logs()[-3000:]
    listed = json.loads(_cli("jobs", "list", "--address", cluster.dashboard_url, "--json").stdout)
    assert any(j["id"] == jid and j["pipeline"] == pipeline_name and j["status"] == "RUNNING" for j in listed)
    logs = _cli("jobs", "logs", jid, "--address", cluster.dashboard_url)
    assert logs.returncode == 0 and logs.stdout
    stop = _cli("jobs", "stop", jid, "--address", cluster.dashboard_url, "--wait", "90", timeout=150)
    assert stop.returncode == 0 and "STOPPED" in stop.stderr, stop.stderr
    # a clean stop: SIGTERM to the driver flushed what it had
    assert "SIGTERM: flushing and stopping" in job.logs() and "done 4,000 records" in job.logs(), job.logs()[-3000:]
    rows = read_windows(f"file://{tmp_path}/out", pipeline_name, "tumble").to_pandas()
    assert 0 < int(rows["count"].sum()) < 4000  # the last window is still open at a stop (README: run)


def test_bad_token_and_bad_spec_are_clear(cluster, tmp_path):
    with pytest.raises(Exception, match="403|Forbidden|nvalid"):
        client(cluster.dashboard_url, token="not-the-token").list_jobs()
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nsource: {kafka: {bootstrap_servers: a, topic: t}}\nwindows: [{name: w, type: tumbling, size: 10 parsecs}]\n"
                    "sinks: [{parquet: {uri: 'file:///tmp/x'}}]\n")
    r = _cli("submit", str(spec), "--address", cluster.dashboard_url)
    assert r.returncode == 2 and "windows[0].size" in r.stderr
