"""Exactly-once drills: whatever fails, every sink ends equal to the reference.

One pipeline writes all five sinks (Parquet, PostgreSQL, Redis, InfluxDB via
victoria-metrics, Kafka) with 2 workers over 4 partitions, checkpointing every
second; its consumption is throttled so that a fault lands mid-stream. Each
drill asserts that its fault really fired, then that every sink holds exactly
the DuckDB reference windows: no row lost, none doubled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest
import yaml

from actors import control
from pipeline.driver import run_pipeline
from pipeline.io.kafka import committed_offsets, produce_all
from pipeline.io.sinks.kafka import read_changelog
from pipeline.io.sinks.parquet import read_windows
from pipeline.io.sinks.postgres import read_table
from pipeline.spec import parse_spec
from pipeline.synthetic import events
from tests import reference
from tests.services import TcpProxy

pytestmark = pytest.mark.drill  # multi-process fault drills: CI runs them; -m 'not drill' skips them while iterating

PARTITIONS = 4
N = 24_000
BASE_MS = 1_765_000_000_000
WINDOWS = [
    {"name": "tumble", "type": "tumbling", "size": "2s", "group_by": ["tenant_id", "event_type"],
     "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
    {"name": "slide", "type": "sliding", "size": "4s", "slide": "2s", "group_by": ["tenant_id"],
     "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
]


@pytest.fixture(scope="module")
def dataset():
    values, keys, cols = events(N, BASE_MS, rate_per_s=1000, tenants=8, max_disorder_ms=800,
                                late_fraction=0.0, late_by_ms=0, seed=5)
    df = pd.DataFrame(cols)
    df["partition"] = df["tenant_id"].map(lambda t: int(t.split("-")[1]) % PARTITIONS)
    df["offset"] = df.groupby("partition").cumcount()
    return values, keys, df


def _spec_dict(name, broker, topic, tmp_path, postgres, redis_server, vm, checkpoint_uri, s3_endpoint=None, rate=1500):
    ck = {"uri": checkpoint_uri, "interval": "1s", "keep": 3, "timeout": "20s"}
    if s3_endpoint:
        ck["s3_endpoint_url"] = s3_endpoint
    return {
        "name": name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic, "max_batch_records": 400, "max_rate": rate}},
        "event_time": {"field": "ts", "max_out_of_orderness": "1s", "allowed_lateness": "0s", "idle_timeout": "30s"},
        "windows": WINDOWS,
        "sinks": [
            {"parquet": {"uri": f"file://{tmp_path}/out"}},
            {"postgres": {"dsn": postgres.extra["dsn"]}},
            {"redis": {"url": redis_server.extra["url"], "prefix": f"{name}:"}},
            {"influxdb": {"url": vm.extra["url"], "measurement_prefix": f"{name}_"}},
            {"kafka": {"topic": f"{topic}.windows"}},
        ],
        "checkpoint": ck,
        "health": {"heartbeat_timeout": "4s", "stall_timeout": "20s"},
        "workers": 2,
        "worker_cpus": 0.5,
    }


def _start(broker, topic, values, keys, df):
    broker.extra["broker"].create_topic(topic, PARTITIONS)
    produce_all(broker.address, topic, values, keys, df["partition"].tolist())


class Runner:
    """run_pipeline(until_end) in a thread, with the last status kept for the assertions."""

    def __init__(self, spec):
        self.spec = spec
        self.report = None
        self.error = None
        self.statuses: list[dict] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.report = run_pipeline(self.spec, until_end=True)
        except BaseException as exc:  # re-raised by join()
            self.error = exc

    def status(self) -> dict | None:
        try:
            st = control.pipeline_status(self.spec.name, timeout_s=15)
        except Exception:  # not started yet, or finished
            return None
        self.statuses.append(st)
        return st

    def wait_for(self, pred, timeout_s=60.0, what="condition", allow_end=False) -> dict | None:
        """The first status satisfying ``pred``; with ``allow_end``, None when the run ended first (the caller
        then checks the final report)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.status()
            if st is not None and pred(st):
                return st
            if not self.thread.is_alive():
                if allow_end and self.error is None:
                    return None
                raise AssertionError(f"the pipeline ended before {what}: {self.error!r}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last status: {self.statuses[-1:]}")

    def join(self, timeout_s=240.0):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "pipeline did not finish"
        if self.error is not None:
            raise self.error
        return self.report


def _mid_stream(st) -> bool:
    pos = [o for w in st["workers"] for o in (w.get("positions") or {}).values()]
    ck = st.get("last_checkpoint")
    return ck is not None and sum(pos) > N * 0.25 and all(w.get("state") == "running" for w in st["workers"])


def _influx_rows(url: str, name: str, window: str, expected: int) -> dict:
    deadline = time.monotonic() + 30
    while True:
        urllib.request.urlopen(f"{url}/internal/force_flush", timeout=5).read()
        q = urllib.request.quote(f'{{__name__=~"{name}_{window}_.*"}}')
        body = urllib.request.urlopen(f"{url}/api/v1/export?match[]={q}", timeout=10).read()
        by: dict = {}
        for line in body.splitlines():
            s = json.loads(line)
            field = s["metric"]["__name__"].removeprefix(f"{name}_{window}_")
            tags = s["metric"]
            for ts, v in zip(s["timestamps"], s["values"]):
                k = (ts, int(tags["partition"]) if "partition" in tags else None, tags.get("tenant_id"), tags.get("event_type"))
                by.setdefault(k, {}).setdefault(field, []).append(v)
        if len(by) >= expected or time.monotonic() > deadline:
            return by
        time.sleep(0.5)


def check_all_sinks(spec_dict, df, broker, postgres, redis_server, vm):
    spec = parse_spec(spec_dict)
    name = spec.name
    from pipeline.io.sinks.redis import RedisSink

    redis_sink = RedisSink(spec, spec.sinks[2].redis)
    kafka_rows = pd.DataFrame(read_changelog(broker.address, spec.sinks[4].kafka.topic))
    for w in spec.windows:
        keys = w.group_by
        want, late = reference.windows(df, w.type, keys, spec.event_time.max_out_of_orderness, spec.event_time.allowed_lateness,
                                       size=w.size, slide=w.slide or 0)
        assert late.empty
        got = {
            "parquet": read_windows(spec.sinks[0].parquet.uri, name, w.name).to_pandas(),
            "postgres": pd.DataFrame(read_table(postgres.extra["dsn"], "raystream_", name, w.name)),
            "redis": pd.DataFrame(redis_sink.read(w.name)),
            "kafka": kafka_rows[kafka_rows["window"] == w.name].drop(columns=["pipeline"]),
        }
        for sink, rows in got.items():
            rows = rows.copy()
            for c in ("window_start", "window_end"):
                if str(rows[c].dtype).startswith("datetime64"):
                    rows[c] = rows[c].astype("datetime64[ms, UTC]").astype("int64")
                rows[c] = rows[c].astype("int64")
            per_partition = "partition" in want.columns
            assert ("partition" in rows.columns) == per_partition, f"{sink}: partition column"
            assert not rows.duplicated([*keys, *(["partition"] if per_partition else []), "window_start"]).any(), \
                f"{sink}: duplicate rows"
            try:
                reference.compare(rows, want, keys)
            except AssertionError as exc:
                raise AssertionError(f"sink {sink}, window {w.name}: {exc}") from None
        # InfluxDB: every revision of a window is one point (overwritten in InfluxDB); the highest
        # revision written for each point carries the reference values
        by = _influx_rows(spec.sinks[3].influxdb.url, name, w.name, len(want))
        assert len(by) == len(want), f"influxdb {w.name}: {len(by)} points, {len(want)} expected"
        for r in want.itertuples():
            k = (int(r.window_start), int(r.partition) if hasattr(r, "partition") else None, r.tenant_id,
                 getattr(r, "event_type", None))
            f = by[k]
            assert max(f["count"]) == r.count and max(f["revision"]) == r.count
            assert min(abs(v - r.sum_value) for v in f["sum_value"]) <= 1e-9 * abs(r.sum_value)
    redis_sink.close()


@pytest.fixture
def env(broker, postgres, redis_server, victoria_metrics, ray_local, tmp_path, topic_name, pipeline_name, dataset):
    from actors.coordinator import kill_pipeline_actors

    values, keys, df = dataset
    _start(broker, topic_name, values, keys, df)
    yield {"broker": broker, "postgres": postgres, "redis": redis_server, "vm": victoria_metrics, "tmp": tmp_path,
           "topic": topic_name, "name": pipeline_name, "df": df}
    # a drill that failed leaves its detached actors holding CPUs: the next test must not inherit them
    kill_pipeline_actors(pipeline_name, 64)


def _dict(env, **kw):
    return _spec_dict(env["name"], env["broker"], env["topic"], env["tmp"], env["postgres"], env["redis"], env["vm"],
                      kw.pop("checkpoint_uri", f"file://{env['tmp']}/chk"), **kw)


def _check(env, d):
    check_all_sinks(d, env["df"], env["broker"], env["postgres"], env["redis"], env["vm"])


def test_worker_killed_mid_window_recovers_exactly(env):
    d = _dict(env)
    run = Runner(parse_spec(d))
    st = run.wait_for(_mid_stream, what="a checkpoint mid-stream")
    victim = st["workers"][0]
    killed = control.kill_worker(env["name"], victim["index"])
    # processing resumed: a new process for that worker that has consumed its first batch
    st2 = run.wait_for(lambda s: any(w["index"] == victim["index"] and w.get("pid") != killed["pid"]
                                     and w.get("first_batch_at") for w in s["workers"]), what="the restarted worker")
    w = next(w for w in st2["workers"] if w["index"] == victim["index"])
    recovery_s = w["first_batch_at"] - killed["killed_at"]
    print(f"\nworker kill -> processing resumed: {recovery_s:.2f}s")
    assert w["restarts"] == 1 and w["epoch"] > victim["epoch"] and w["restored_slots"] > 0
    assert any("restarted" in e["event"] for e in st2["events"])
    assert recovery_s < 30
    report = run.join()
    # every partition consumed to its end (the restarted worker counts only what it read since its checkpoint)
    assert all(w["positions"] == w["end_offsets"] for w in report.workers)
    _check(env, d)
    # the last checkpoint's offsets were committed to the consumer group
    committed = committed_offsets(env["broker"].address, f"raystream-{env['name']}", env["topic"], list(range(PARTITIONS)))
    assert all(o > 0 for o in committed.values())


def test_merge_owners_killed_and_frozen_mid_stream_recover_exactly(env):
    """A merge owner SIGKILLed mid-stream, then another frozen (SIGSTOP: alive, silent, its workers waiting on
    it): each time every owner and worker goes back to the latest checkpoint (owners from their snapshots,
    workers from their offsets), and every sink ends equal to the reference."""
    d = _dict(env)
    run = Runner(parse_spec(d))
    owners_up = lambda s: s.get("merge_owners") and all(o.get("pid") for o in s["merge_owners"])  # noqa: E731
    st = run.wait_for(lambda s: _mid_stream(s) and owners_up(s), what="a checkpoint mid-stream")
    os.kill(st["merge_owners"][-1]["pid"], signal.SIGKILL)
    st = run.wait_for(lambda s: s.get("global_restarts", 0) >= 1 and owners_up(s)
                      and all(o["pid"] != st["merge_owners"][-1]["pid"] for o in s["merge_owners"]),
                      what="the restore after the kill")
    assert any("died" in e["event"] and "every worker and merge owner restarted" in e["event"] for e in st["events"])
    frozen = st["merge_owners"][0]["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        st = run.wait_for(lambda s: s.get("global_restarts", 0) >= 2, timeout_s=60, what="the restore after the freeze")
        assert any("has not answered" in e["event"] for e in st["events"])
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)  # if it still exists, it wakes up replaced
        except ProcessLookupError:
            pass
    run.join()
    _check(env, d)


def test_coordinator_killed_workers_keep_running(env):
    d = _dict(env)
    run = Runner(parse_spec(d))
    st = run.wait_for(_mid_stream, what="a checkpoint mid-stream")
    pids = {w["index"]: w["pid"] for w in st["workers"]}
    killed = control.kill_coordinator(env["name"])
    st2 = run.wait_for(lambda s: s["coordinator_pid"] != killed["pid"] and s["coordinator_restarted"],
                       what="the restarted coordinator")
    # the workers were not its children: the same processes carry on, adopted
    assert {w["index"]: w["pid"] for w in st2["workers"]} == pids
    assert any("adopted 2 workers" in e["event"] for e in st2["events"])
    run.join()
    _check(env, d)


def test_s3_fails_during_checkpoints(env, s3):
    import boto3

    proxy = TcpProxy(int(s3.extra["endpoint"].rsplit(":", 1)[1]))
    endpoint = f"http://127.0.0.1:{proxy.port}"
    bucket = f"chk-{env['name']}"
    boto3.client("s3", endpoint_url=s3.extra["endpoint"]).create_bucket(Bucket=bucket)
    d = _dict(env, checkpoint_uri=f"s3://{bucket}/ck", s3_endpoint=endpoint)
    run = Runner(parse_spec(d))
    try:
        st = run.wait_for(_mid_stream, what="a checkpoint mid-stream")
        failed_before = st["checkpoints_failed"]
        proxy.set_broken(True)
        st = run.wait_for(lambda s: s["checkpoints_failed"] > failed_before, timeout_s=60, what="a failed checkpoint")
        ck_during = st["last_checkpoint"]["id"]
        proxy.set_broken(False)
        assert proxy.refused > 0
        st = run.wait_for(lambda s: s["last_checkpoint"]["id"] > ck_during, what="a checkpoint after S3 came back")
        # and a worker killed now recovers from the checkpoint written after the outage
        killed = control.kill_worker(env["name"], 1)
        run.wait_for(lambda s: any(w["index"] == 1 and w.get("pid") != killed["pid"] and w.get("first_batch_at")
                                   for w in s["workers"]), what="the restarted worker")
        run.join()
    finally:
        proxy.close()
    _check(env, d)


def test_whole_run_killed_and_restarted_resumes(env, ray_local, tmp_path):
    d = _dict(env)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(d))
    gcs = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(spec_file), "--quiet", "--address", gcs],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        control.connect(env["name"], gcs)
        deadline = time.monotonic() + 90
        while True:
            try:
                st = control.pipeline_status(env["name"], timeout_s=5)
                if _mid_stream(st):
                    break
            except Exception:  # not started yet
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint mid-stream"
            time.sleep(0.3)
        proc.kill()  # SIGKILL: no final checkpoint, no flush
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = st["last_checkpoint"]["id"]
    # started again with another number of workers: partitions and their state move (state is per partition)
    report = run_pipeline(parse_spec({**d, "workers": 1}), until_end=True)
    assert report.records < N  # it resumed from the checkpoint instead of starting over
    assert resumed is not None and len(report.workers) == 1 and report.workers[0]["restored_slots"] > 0
    _check(env, d)


def test_stalled_worker_is_replaced_and_fenced(env):
    d = _dict(env)
    run = Runner(parse_spec(d))
    st = run.wait_for(_mid_stream, what="a checkpoint mid-stream")
    victim = st["workers"][1]
    os.kill(victim["pid"], signal.SIGSTOP)  # alive but silent: no heartbeat
    try:
        st2 = run.wait_for(lambda s: any("worker 1 restarted" in e["event"] for e in s["events"]),
                           timeout_s=30, what="the stalled worker replaced")
    finally:
        try:
            os.kill(victim["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert any("no heartbeat" in e["event"] for e in st2["events"])
    assert next(w for w in st2["workers"] if w["index"] == 1)["epoch"] > victim["epoch"]
    run.join()
    _check(env, d)


def test_scale_and_status_from_another_process(env):
    # slower input (~24 s at 2 x 500/s): three CLI processes, each importing Ray, must find the run still going
    d = _dict(env, rate=500)
    run = Runner(parse_spec(d))
    run.wait_for(_mid_stream, what="a checkpoint mid-stream")
    cli = [sys.executable, "-m", "pipeline.cli"]
    out = subprocess.run([*cli, "status", env["name"], "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["pipeline"] == env["name"] and len(st["workers"]) == 2
    assert sorted(p for w in st["workers"] for p in w["partitions"]) == [0, 1, 2, 3]
    assert all(w["lag"] is not None and w["health"] == "running" for w in st["workers"])
    table = subprocess.run([*cli, "status", env["name"]], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "checkpointed" in table.stdout and "running" in table.stdout
    out = subprocess.run([*cli, "scale", env["name"], "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # on a loaded machine the (throttled) input may run out soon after the handoff: the final report then shows it
    st = run.wait_for(lambda s: len(s["workers"]) == 1, what="one worker", allow_end=True)
    report = run.join()
    workers = st["workers"] if st is not None else report.workers
    assert len(workers) == 1 and workers[0]["partitions"] == [0, 1, 2, 3] and workers[0]["restored_slots"] > 0, workers
    _check(env, d)


def test_crash_loop_marks_pipeline_degraded(env):
    from actors.coordinator import PipelineDegraded

    d = _dict(env)
    d["sinks"] = [{"postgres": {"dsn": "postgresql://postgres@127.0.0.1:1/none", "connect_timeout": "1s"}, "retries": 0}]
    d["health"] = {"max_restarts": 2, "restart_window": "5m", "heartbeat_timeout": "4s"}
    d["source"]["kafka"].pop("max_rate")
    with pytest.raises(PipelineDegraded, match=r"restarted 2 times within 300s, last because failed: SinkError"):
        run_pipeline(parse_spec(d), until_end=True)


def test_inline_run_checkpoints_and_resumes(broker, tmp_path, topic_name, pipeline_name, dataset):
    from pipeline.io.checkpoints import CheckpointStore

    values, keys, df = dataset
    half = df.index[df["offset"] < df.groupby("partition")["offset"].transform("max") // 2]
    first = sorted(half)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, [values[i] for i in first], [keys[i] for i in first], df["partition"].iloc[first].tolist())
    d = {
        "name": pipeline_name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name}},
        "event_time": {"field": "ts", "max_out_of_orderness": "1s", "idle_timeout": "30s"},
        "windows": WINDOWS[:1],
        "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}}],
        "checkpoint": {"uri": f"file://{tmp_path}/chk", "interval": "1h"},
    }
    r1 = run_pipeline(parse_spec(d), until_end=True, inline=True)
    assert r1.records == len(first)
    store = CheckpointStore(parse_spec(d).checkpoint, pipeline_name)
    m = store.latest()
    assert m is not None and sum(e["offset"] for e in m["partitions"].values()) == len(first)
    rest = sorted(set(range(len(df))) - set(first))
    produce_all(broker.address, topic_name, [values[i] for i in rest], [keys[i] for i in rest], df["partition"].iloc[rest].tolist())
    r2 = run_pipeline(parse_spec(d), until_end=True, inline=True)
    assert r2.records == len(rest)  # resumed where the first run's final checkpoint left off
    w = parse_spec(d).windows[0]
    got = read_windows(f"file://{tmp_path}/out", pipeline_name, w.name).to_pandas()
    want, _ = reference.windows(df, w.type, w.group_by, 1000, 0, size=w.size)
    reference.compare(got, want, w.group_by)


def test_coordinator_and_worker_killed_at_the_same_instant(env):
    """The restarted coordinator finds one worker; the other's partitions are owned again from the manifest."""
    d = _dict(env)
    run = Runner(parse_spec(d))
    st = run.wait_for(_mid_stream, what="a checkpoint mid-stream")
    victim = st["workers"][0]
    for pid in (st["coordinator_pid"], victim["pid"]):  # back to back: no tick of the monitor between them
        os.kill(pid, signal.SIGKILL)
    st2 = run.wait_for(lambda s: s["coordinator_pid"] != st["coordinator_pid"]
                       and any(w["index"] == victim["index"] and w.get("pid") not in (None, victim["pid"])
                               and w.get("first_batch_at") for w in s["workers"]),
                       timeout_s=90, what="the coordinator back and the dead worker's partitions consumed again")
    assert any("adopted 1 workers" in e["event"] for e in st2["events"]), st2["events"]
    assert sorted(p for w in st2["workers"] for p in w["partitions"]) == [0, 1, 2, 3]
    report = run.join()
    assert all(w["positions"] == w["end_offsets"] for w in report.workers)
    _check(env, d)


def test_faults_in_a_row_workers_and_coordinator(env):
    """Two workers killed in a row, the replacement killed while it restores, the coordinator killed
    three times across checkpoint rounds (1 s apart): every partition owned again, output exact."""
    d = _dict(env)
    run = Runner(parse_spec(d))
    st = run.wait_for(_mid_stream, what="a checkpoint mid-stream")
    k0 = control.kill_worker(env["name"], 0)
    k1 = control.kill_worker(env["name"], 1)
    # the replacement of worker 0, killed as soon as it exists (it is restoring or has just begun)
    st = run.wait_for(lambda s: any(w["index"] == 0 and w.get("pid") not in (None, k0["pid"]) for w in s["workers"]),
                      what="worker 0's replacement")
    w0 = next(w for w in st["workers"] if w["index"] == 0)
    os.kill(w0["pid"], signal.SIGKILL)
    coordinator_kills = 0
    for _ in range(3):
        time.sleep(0.7)  # checkpoints run every 1 s: some of these land during one
        try:
            control.kill_coordinator(env["name"])
            coordinator_kills += 1
        except Exception:  # restarting right now: the next round kills it
            continue
    assert coordinator_kills >= 1  # the fault really fired
    st = run.wait_for(lambda s: all(w.get("pid") not in (None, k0["pid"], k1["pid"], w0["pid"]) and w.get("first_batch_at")
                                    for w in s["workers"]) and len(s["workers"]) == 2,
                      timeout_s=120, what="both workers replaced and consuming")
    report = run.join()
    assert all(w["positions"] == w["end_offsets"] for w in report.workers)
    _check(env, d)


OUTAGE_S = float(os.environ.get("RAYSTREAM_SINK_OUTAGE_S", "15"))  # 180 for the long drill (bench/README.md)


def test_sink_outage_longer_than_every_timeout_is_backpressure_not_a_stall(env):
    """PostgreSQL unreachable for 15 s (3x stall_timeout, longer than the old retry budget) mid-run:
    the workers wait on it with their partitions paused, are never restarted, the pipeline never
    degrades, and every sink ends equal to the reference."""
    pg_port = int(env["postgres"].extra["dsn"].rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(pg_port)
    d = _dict(env)
    d["sinks"][1] = {"postgres": {"dsn": env["postgres"].extra["dsn"].replace(f":{pg_port}/", f":{proxy.port}/"),
                                  "connect_timeout": "1s"}, "retry_backoff": "100ms"}
    d["health"] = {"heartbeat_timeout": "4s", "stall_timeout": "5s"}
    run = Runner(parse_spec(d))
    try:
        run.wait_for(_mid_stream, what="a checkpoint mid-stream")
        proxy.set_broken(True)
        t0 = time.monotonic()
        st = run.wait_for(lambda s: any(w.get("health") == "waiting on store" for w in s["workers"]), timeout_s=30,
                          what="a worker reporting that it waits on the sink")
        waiting = next(w for w in st["workers"] if w.get("health") == "waiting on store")
        assert "postgres" in waiting["backpressure"] and waiting["store_wait"]["store"] == "postgres"
        while time.monotonic() - t0 < OUTAGE_S:
            st = run.status() or st
            assert not st["degraded"], st["degraded"]
            time.sleep(1)
        positions_during = {w["index"]: dict(w["positions"]) for w in st["workers"]}
        proxy.set_broken(False)
        assert proxy.refused > 0
        report = run.join()
    finally:
        proxy.close()
    final = run.statuses[-1]
    events = [e["event"] for e in final["events"] if "checkpointed without it" not in e["event"]]
    assert all(w["restarts"] == 0 for w in final["workers"]), ([w["restarts"] for w in final["workers"]], events)
    assert not any("restarted" in e for e in events), events
    assert all(w["positions"] == w["end_offsets"] for w in report.workers)
    assert any(w["positions"] != positions_during[w["index"]] for w in report.workers)  # it caught up afterwards
    assert sum(w["store_wait_s"] for w in report.workers) > OUTAGE_S * 0.5
    _check(env, d)


def test_revisions_never_go_backwards_through_a_replay_and_a_zombie(env):
    """Windows re-emitted within allowed lateness (ooo 0 s, lateness 2 s, records up to 0.8 s out of order),
    a worker killed (its replacement replays from the checkpoint) and another frozen until it is replaced
    and then woken (a fenced zombie). Every write to the Kafka changelog, in log order, never lowers a
    window's revision; PostgreSQL, Redis and Parquet polled during the run never show a lower revision
    than before; at the end every sink equals the reference."""
    from pipeline.io.kafka import read_to_end
    from pipeline.io.sinks.redis import RedisSink

    d = _dict(env)
    d["event_time"].update({"max_out_of_orderness": "0s", "allowed_lateness": "2s"})
    spec = parse_spec(d)
    redis_sink = RedisSink(spec, spec.sinks[2].redis)
    seen: dict[tuple, int] = {}
    backwards: list = []

    def poll():
        import psycopg

        views = {"redis": pd.DataFrame(redis_sink.read("tumble"))}
        try:
            views["postgres"] = pd.DataFrame(read_table(env["postgres"].extra["dsn"], "raystream_", env["name"], "tumble"))
        except psycopg.errors.UndefinedTable:
            pass  # no merged row yet: a partition not read yet holds every window open
        try:
            views["parquet"] = read_windows(spec.sinks[0].parquet.uri, env["name"], "tumble").to_pandas()
        except Exception:  # nothing written yet
            pass
        for sink, df in views.items():
            if df.empty:
                continue
            starts = pd.to_datetime(df["window_start"], utc=True) if not str(df["window_start"].dtype).startswith("int") \
                else pd.to_datetime(df["window_start"], unit="ms", utc=True)
            parts = df["partition"] if "partition" in df.columns else [-1] * len(df)  # merged rows: none
            for ws, t, e, p, r in zip(starts, df["tenant_id"], df["event_type"], parts, df["revision"]):
                k = (sink, ws.value, t, e, int(p))
                if int(r) < seen.get(k, -1):
                    backwards.append((k, seen[k], int(r)))
                seen[k] = max(seen.get(k, -1), int(r))

    run = Runner(spec)
    try:
        st = run.wait_for(_mid_stream, what="a checkpoint mid-stream")
        poll()
        control.kill_worker(env["name"], 0)
        st = run.wait_for(lambda s: any(w["index"] == 0 and w.get("first_batch_at") and w.get("restarts") for w in s["workers"]),
                          what="worker 0 replaced")
        poll()
        zombie = next(w for w in st["workers"] if w["index"] == 1)
        os.kill(zombie["pid"], signal.SIGSTOP)
        try:
            run.wait_for(lambda s: any("worker 1 restarted" in e["event"] for e in s["events"]), timeout_s=30,
                         what="the frozen worker replaced")
            poll()
        finally:
            os.kill(zombie["pid"], signal.SIGCONT)  # wakes up mid-batch with a stale epoch
        while run.thread.is_alive():
            poll()
            time.sleep(0.5)
        run.join()
    finally:
        redis_sink.close()
    poll()
    assert not backwards, backwards[:10]
    assert any(r > 0 for r in seen.values())
    # the changelog holds every write in order: per window identity, revisions never decrease
    last: dict[bytes, int] = {}
    lowered = []
    for m in read_to_end(env["broker"].address, spec.sinks[4].kafka.topic):
        r = json.loads(m.value())["revision"]
        if r < last.get(m.key(), -1):
            lowered.append((m.key(), last[m.key()], r))
        last[m.key()] = max(last.get(m.key(), -1), r)
    assert not lowered, lowered[:10]
    assert any(json.loads(m.value())["window"] == "tumble" for m in read_to_end(env["broker"].address, spec.sinks[4].kafka.topic)[:50])
    _check(env, d)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a disk that really fills up (ENOSPC from the kernel); big enough that the run's own
    output never fills it before the test does (8 MiB did, on a slow run)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_for_checkpoints_and_the_local_sink(env, small_disk):
    """The disk holding the Parquet output and the checkpoints fills up mid-run for 8 s: writes wait
    (the worker says so, nothing is restarted), checkpoints fail and are retried; after space is freed
    the run finishes and every sink equals the reference."""
    d = _dict(env, checkpoint_uri=f"file://{small_disk}/chk")
    d["sinks"][0] = {"parquet": {"uri": f"file://{small_disk}/out"}, "retry_backoff": "100ms"}
    d["health"] = {"heartbeat_timeout": "4s", "stall_timeout": "4s"}
    filler = small_disk / "filler"
    filler.touch()  # made while there is room: filling it later needs no new inode
    run = Runner(parse_spec(d))
    st = run.wait_for(_mid_stream, what="a checkpoint mid-stream")
    failed_before = st["checkpoints_failed"]
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC: the disk is full
    try:
        st = run.wait_for(lambda s: any(w.get("health") == "waiting on store" for w in s["workers"]), timeout_s=30,
                          what="a worker waiting on the full disk")
        assert any("parquet" in (w.get("backpressure") or "") and "No space left" in (w.get("store_wait") or {}).get("error", "")
                   for w in st["workers"])
        time.sleep(8)
        st = run.status() or st
        assert not st["degraded"]
    finally:
        filler.unlink()
    report = run.join()
    final = run.statuses[-1]
    assert final["checkpoints_failed"] > failed_before or any("checkpoint" in e["event"] and "failed" in e["event"]
                                                               for e in final["events"])
    assert all(w["restarts"] == 0 for w in final["workers"]), [e["event"] for e in final["events"]]
    assert all(w["positions"] == w["end_offsets"] for w in report.workers)
    _check(env, d)


def test_restore_from_an_older_checkpoint_and_past_a_corrupted_manifest(broker, postgres, tmp_path, topic_name,
                                                                       pipeline_name, dataset):
    """An operator resumes from checkpoint N-3 (``--from-checkpoint``), and later the newest manifest is
    corrupted: each run says loudly which checkpoint it uses instead of which, replays from there, and the
    sinks still equal the reference (re-emissions carry the same revisions)."""
    from pipeline.io.checkpoints import CheckpointStore
    from pipeline.io.kafka import produce_all as produce

    values, keys, df = dataset
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce(broker.address, topic_name, values, keys, df["partition"].tolist())
    d = {
        "name": pipeline_name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name, "max_batch_records": 1000,
                             "max_rate": 6000}},
        "event_time": {"field": "ts", "max_out_of_orderness": "1s", "idle_timeout": "30s"},
        "windows": WINDOWS[:1],
        "sinks": [{"parquet": {"uri": f"file://{tmp_path}/out"}}, {"postgres": {"dsn": postgres.extra["dsn"]}}],
        "checkpoint": {"uri": f"file://{tmp_path}/chk", "interval": "500ms", "keep": 10},
    }
    spec = parse_spec(d)
    run_pipeline(spec, until_end=True, inline=True)
    store = CheckpointStore(spec.checkpoint, pipeline_name)
    ids = store.ids()
    assert len(ids) >= 4, ids
    older = ids[-4]
    behind = N - sum(e["offset"] for e in store.manifest(older)["partitions"].values())
    assert behind > 0
    w = spec.windows[0]
    want, _ = reference.windows(df, w.type, w.group_by, 1000, 0, size=w.size)

    def check():
        reference.compare(read_windows(f"file://{tmp_path}/out", pipeline_name, w.name).to_pandas(), want, w.group_by)
        reference.compare(pd.DataFrame(read_table(postgres.extra["dsn"], "raystream_", pipeline_name, w.name)), want, w.group_by)

    report = run_pipeline(spec, until_end=True, inline=True, from_checkpoint=older)
    assert report.records == behind  # read again from checkpoint `older`, not from 0 and not from the newest
    assert any(f"restoring from checkpoint {older}, older than the latest {ids[-1]}" in x for x in report.warnings), report.warnings
    check()
    # the newest manifest is corrupted: the run before it is used, and says so
    newest = CheckpointStore(spec.checkpoint, pipeline_name).ids()
    path = tmp_path / "chk" / pipeline_name / f"chk-{newest[-1]:08d}" / "_manifest.json"
    path.write_text('{"id": 1, "partitions": {"0": ')
    report = run_pipeline(spec, until_end=True, inline=True)
    assert any(f"checkpoint {newest[-1]} has an unreadable manifest" in x and f"older checkpoint {newest[-2]}" in x
               for x in report.warnings), report.warnings
    check()
