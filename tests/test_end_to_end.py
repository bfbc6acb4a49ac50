"""End to end through the real broker and Ray: 4 partitions, 2 workers, both Kafka clients.

Output Parquet (latest revision per window) must equal the DuckDB reference
computed from the same raw events; late records and rejects must be exactly
those the reference predicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, TopicPartition

from pipeline.driver import run_pipeline
from pipeline.io.kafka import produce_all
from pipeline.io.sinks.parquet import read_windows
from pipeline.io.storage import open_location
from pipeline.spec import parse_spec
from pipeline.synthetic import events
from tests import reference

PARTITIONS = 4
BASE_MS = 1_760_000_000_000


def _dataset(n: int, seed: int, bad: int = 0):
    values, keys, cols = events(n, BASE_MS, rate_per_s=2000, tenants=12, max_disorder_ms=1500,
                                late_fraction=0.01, late_by_ms=20_000, seed=seed)
    df = pd.DataFrame(cols)
    df["partition"] = df["tenant_id"].map(lambda t: int(t.split("-")[1]) % PARTITIONS)
    bad_rows = []
    if bad:
        rng = np.random.default_rng(seed + 1)
        junk = [b"not json", b'{"tenant_id": "tenant-001", "ts": ', b"", b'[1,2,3]',
                b'{"tenant_id":"tenant-001","event_type":"click","ts":1760000000000,"value":"NaN?"}']
        for j, pos in enumerate(sorted(rng.choice(n - 10, bad, replace=False))):
            bad_rows.append((int(pos), junk[j % len(junk)]))
    # interleave bad values at their positions (same partition as the neighbour)
    out_values, out_keys, parts, is_bad = [], [], [], []
    bad_at = dict(bad_rows)
    for i in range(n):
        if i in bad_at:
            out_values.append(bad_at[i]), out_keys.append(keys[i]), parts.append(int(df["partition"].iloc[i])), is_bad.append(True)
        out_values.append(values[i]), out_keys.append(keys[i]), parts.append(int(df["partition"].iloc[i])), is_bad.append(False)
    offsets = np.zeros(len(parts), np.int64)
    counters = [0] * PARTITIONS
    for i, p in enumerate(parts):
        offsets[i] = counters[p]
        counters[p] += 1
    is_bad = np.array(is_bad)
    df["offset"] = offsets[~is_bad]
    return out_values, out_keys, parts, df, offsets[is_bad], np.array(parts)[is_bad]


def _spec(name, bootstrap, topic, out, late, client="confluent", windows=None, workers=2):
    return parse_spec({
        "name": name,
        "source": {"kafka": {"bootstrap_servers": bootstrap, "topic": topic, "client": client,
                             "max_batch_records": 5000}},
        "event_time": {"field": "ts", "max_out_of_orderness": "2s", "allowed_lateness": "1s", "idle_timeout": "5s"},
        "windows": windows or [
            {"name": "tumble", "type": "tumbling", "size": "10s", "group_by": ["tenant_id", "event_type"],
             "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)", "p95(value)"]},
            {"name": "slide", "type": "sliding", "size": "10s", "slide": "5s", "group_by": ["tenant_id"],
             "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
            {"name": "sess", "type": "session", "gap": "2s", "group_by": ["tenant_id"],
             "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
        ],
        "sinks": [{"parquet": {"uri": out}}],
        "late_output": {"parquet": {"uri": late}},
        "workers": workers,
    })


def _read_dlq(bootstrap: str, topic: str, expect: int, timeout_s: float = 20.0) -> list:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "dlq-check", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < expect and time.monotonic() < deadline:
        got += [m for m in c.consume(1000, 0.5) if m.error() is None]
    # one more short poll: more than expected must show up as a failure, not be missed
    got += [m for m in c.consume(1000, 1.0) if m.error() is None]
    c.close()
    return got


def _check_outputs(spec, df, out_uri, late_uri):
    ooo, lateness = spec.event_time.max_out_of_orderness, spec.event_time.allowed_lateness
    total_late = set()
    for w in spec.windows:
        got = read_windows(out_uri, spec.name, w.name).to_pandas()
        want, late = reference.windows(df, w.type, w.group_by, ooo, lateness, size=w.size or 0,
                                       slide=w.slide or 0, gap=w.gap or 0,
                                       quantiles={"p95_value": 0.95} if w.name == "tumble" else None)
        reference.compare(got, want, w.group_by, sketch=("p95_value",) if w.name == "tumble" else ())
        total_late |= set(zip(late["partition"], late["offset"], [w.name] * len(late)))
    late_t = open_location(late_uri).read_parquet(f"{spec.name}/late")
    got_late = set() if late_t is None else set(zip(late_t["partition"].to_pylist(), late_t["offset"].to_pylist(),
                                                   late_t["window"].to_pylist()))
    assert got_late == total_late
    assert len(total_late) > 0, "the data set is meant to contain late records"


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_ray_workers_match_reference(broker, ray_local, tmp_path, topic_name, pipeline_name, client):
    values, keys, parts, df, bad_offsets, bad_parts = _dataset(20_000, seed=11, bad=25)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    out, late = f"file://{tmp_path}/out", f"file://{tmp_path}/late"
    spec = _spec(pipeline_name, broker.address, topic_name, out, late, client=client)
    report = run_pipeline(spec, until_end=True)
    assert len(report.workers) == 2 and sorted(p for w in report.workers for p in w["partitions"]) == [0, 1, 2, 3]
    assert report.records == len(values)
    assert report.rejected == 25
    _check_outputs(spec, df, out, late)
    dlq = _read_dlq(broker.address, spec.dead_letter_topic, 25)
    got = sorted((m.headers()[2][1].decode(), m.value()) for m in dlq)
    want = sorted((f"{topic_name}/{p}/{o}", values[i]) for i, (p, o) in enumerate(zip(parts, _all_offsets(parts)))
                  if (p, o) in set(zip(bad_parts.tolist(), bad_offsets.tolist())))
    assert got == want
    reasons = {dict(m.headers())["raystream.reason"].decode() for m in dlq}
    assert reasons <= {"decode_error", "type_mismatch:value"} and "decode_error" in reasons


def _all_offsets(parts):
    counters, out = {}, []
    for p in parts:
        out.append(counters.get(p, 0))
        counters[p] = counters.get(p, 0) + 1
    return out


def test_inline_run_equals_ray_run(broker, ray_local, tmp_path, topic_name, pipeline_name):
    values, keys, parts, df, _, _ = _dataset(8_000, seed=5)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    outs = {}
    for mode in ("inline", "ray"):
        out, late = f"file://{tmp_path}/{mode}/out", f"file://{tmp_path}/{mode}/late"
        spec = _spec(pipeline_name, broker.address, topic_name, out, late)
        run_pipeline(spec, until_end=True, inline=(mode == "inline"))
        _check_outputs(spec, df, out, late)
        outs[mode] = read_windows(out, spec.name, "tumble").to_pandas().sort_values(["window_start", "tenant_id", "event_type"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(outs["inline"], outs["ray"])


def test_rerun_leaves_identical_files(broker, ray_local, tmp_path, topic_name, pipeline_name):
    values, keys, parts, df, _, _ = _dataset(4_000, seed=9)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    out, late = f"file://{tmp_path}/out", f"file://{tmp_path}/late"
    spec = _spec(pipeline_name, broker.address, topic_name, out, late)
    snapshots = []
    for _ in range(2):
        run_pipeline(spec, until_end=True, inline=True)
        files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet"))
        snapshots.append((files, read_windows(out, spec.name, "tumble", latest=False).num_rows))
    assert snapshots[0] == snapshots[1]


def test_s3_parquet_sink(broker, s3, tmp_path, topic_name, pipeline_name, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.extra["endpoint"])
    boto3.client("s3", endpoint_url=s3.extra["endpoint"]).create_bucket(Bucket="windows")
    values, keys, parts, df, _, _ = _dataset(3_000, seed=2)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    spec = _spec(pipeline_name, broker.address, topic_name, "s3://windows/out", "s3://windows/late", workers=1)
    run_pipeline(spec, until_end=True, inline=True)
    _check_outputs(spec, df, "s3://windows/out", "s3://windows/late")
    listed = boto3.client("s3", endpoint_url=s3.extra["endpoint"]).list_objects_v2(Bucket="windows", Prefix="out/")
    assert listed["KeyCount"] > 0


def test_cli_run_until_end_exits_zero(broker, tmp_path, topic_name):
    """The command as an operator runs it: its own local Ray, the README's example spec."""
    values, keys, parts, df, _, _ = _dataset(3_000, seed=4)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    env = {**os.environ, "KAFKA_BOOTSTRAP": broker.address, "TOPIC": topic_name,
           "OUT_URI": f"file://{tmp_path}/out", "LATE_URI": f"file://{tmp_path}/late"}
    spec_path = os.path.join(os.path.dirname(__file__), "..", "examples", "clicks.yaml")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", spec_path, "--until-end", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_windows(f"file://{tmp_path}/out", "clicks", "tenant_type_10s").to_pandas()
    want, _ = reference.windows(df, "tumbling", ["tenant_id", "event_type"], 2000, 0, size=10_000,
                                quantiles={"p95_value": 0.95})
    reference.compare(got, want, ["tenant_id", "event_type"], sketch=("p95_value",))


def _users_table(postgres, pipeline_name: str) -> tuple[pd.DataFrame, str]:
    """A PostgreSQL table of users (1 in 7 of the user ids the data set uses), each with a tier."""
    import psycopg

    users = pd.DataFrame({"user_id": [f"u{i:06d}" for i in range(0, 100_000, 7)]})
    users["tier"] = [["free", "pro", "team", "enterprise"][i % 4] for i in range(len(users))]
    table = f"users_{pipeline_name}"
    with psycopg.connect(postgres.extra["dsn"], autocommit=True) as conn:
        conn.execute(f"create table {table} (user_id text primary key, tier text)")
        with conn.cursor().copy(f"copy {table} from stdin") as cp:
            for row in users.itertuples(index=False):
                cp.write_row(tuple(row))
    return users, table


def test_enriched_windows_on_ray_equal_duckdb_join(broker, ray_local, postgres, redis_server, tmp_path, topic_name, pipeline_name):
    """Windows grouped by an enriched field (user tier) = DuckDB join + group-by over the raw events."""
    import duckdb

    values, keys, parts, df, _, _ = _dataset(12_000, seed=21)
    users, table = _users_table(postgres, pipeline_name)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    out, late = f"file://{tmp_path}/out", f"file://{tmp_path}/late"
    base = _spec(pipeline_name, broker.address, topic_name, out, late,
                 windows=[{"name": "tier_10s", "type": "tumbling", "size": "10s", "group_by": ["tenant_id", "tier"],
                           "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]}])
    data = base.model_dump(mode="python")
    data["enrich"] = [{"name": "users", "key": ["user_id"], "fields": {"tier": "string"},
                       "source": {"postgres": {"dsn": postgres.extra["dsn"], "table": table}},
                       "l2": {"url": redis_server.extra["url"], "prefix": f"{pipeline_name}:"},
                       "on_miss": "default", "defaults": {"tier": "unknown"}}]
    data["source"]["kafka"]["max_batch_records"] = 1000  # many polls: the lookahead warms L1 for each next one
    spec = parse_spec(data)
    report = run_pipeline(spec, until_end=True)
    assert report.records == len(values) and report.rejected == 0
    raw = pd.DataFrame({"partition": df["partition"], "offset": df["offset"], "tenant_id": df["tenant_id"],
                        "ts": df["ts"], "value": df["value"],
                        "user_id": [json.loads(v)["user_id"] for v in values]})
    joined = duckdb.sql("select r.*, coalesce(u.tier, 'unknown') as tier from raw r left join users u using (user_id)"
                        " order by r.partition, r.offset").df()
    want, _ = reference.windows(joined, "tumbling", ["tenant_id", "tier"], 2000, 1000, size=10_000)
    got = read_windows(out, spec.name, "tier_10s").to_pandas()
    reference.compare(got, want, ["tenant_id", "tier"])
    stats = [w["enrich"]["users"] for w in report.workers]
    assert sum(s["l3_queries"] for s in stats) >= 1
    assert sum(s["l1_hits"] + s["l2_hits"] + s["l3_hits"] + s["misses"] for s in stats) > 0
    assert sum(s["prefetched"] for s in stats) > 0  # the lookahead ran, and the windows above are still exact


@pytest.mark.parametrize("mode", ["inline", "ray"])
def test_one_worker_behind_a_long_backlog_equals_reference(broker, ray_local, tmp_path, topic_name, pipeline_name, mode):
    """4 partitions of very different sizes, one worker, throttled so the backlog lasts far longer than idle_timeout.

    The broker hands the client partition 0's records first; at 2,500 records/s
    the others wait ~6 s for their turn with ``idle_timeout: 1s``. A partition
    waiting behind a backlog is never idle, so none of its records may turn
    late: output equals the reference exactly.
    """
    values, keys, _, df, _, _ = _dataset(20_000, seed=31)
    # tenants 0-7 -> partition 0 (2/3 of the records), 8-9 -> 1, 10 -> 2, 11 -> 3
    tenant = df["tenant_id"].map(lambda t: int(t.split("-")[1])).to_numpy()
    parts = np.select([tenant < 8, tenant < 10, tenant < 11], [0, 1, 2], 3).tolist()
    df["partition"] = parts
    df["offset"] = _all_offsets(parts)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    out, late = f"file://{tmp_path}/out", f"file://{tmp_path}/late"
    data = _spec(pipeline_name, broker.address, topic_name, out, late, workers=1).model_dump(mode="python")
    data["event_time"]["idle_timeout"] = "1s"
    data["source"]["kafka"].update({"max_batch_records": 500, "max_rate": 2500})
    spec = parse_spec(data)
    report = run_pipeline(spec, until_end=True, inline=(mode == "inline"))
    assert report.records == len(values)
    assert report.wall_s > 5 * spec.event_time.idle_timeout / 1000  # the backlog really outlasted idle_timeout
    _check_outputs(spec, df, out, late)


def test_lookup_store_down_10s_mid_run_pauses_instead_of_windowing_nulls(broker, ray_local, postgres, tmp_path, topic_name,
                                                                        pipeline_name):
    """PostgreSQL (the enrichment store) unreachable for 10 s mid-run: batches wait for it (the workers
    report the wait and are not restarted, with stall_timeout 3 s), and the windows still equal the
    DuckDB join; no record gets the miss default because the store was down."""
    import threading

    import duckdb

    from tests.services import TcpProxy

    values, keys, parts, df, _, _ = _dataset(12_000, seed=23)
    users, table = _users_table(postgres, pipeline_name)
    port = int(postgres.extra["dsn"].rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    out, late = f"file://{tmp_path}/out", f"file://{tmp_path}/late"
    data = _spec(pipeline_name, broker.address, topic_name, out, late,
                 windows=[{"name": "tier_10s", "type": "tumbling", "size": "10s", "group_by": ["tenant_id", "tier"],
                           "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]}]
                 ).model_dump(mode="python")
    data["enrich"] = [{"name": "users", "key": ["user_id"], "fields": {"tier": "string"},
                       "source": {"postgres": {"dsn": postgres.extra["dsn"].replace(f":{port}/", f":{proxy.port}/"),
                                               "table": table, "connect_timeout": "1s"}},
                       "l1": {"max_entries": 200, "ttl": "1s"}, "negative_ttl": "1s", "retry_backoff": "100ms",
                       "on_miss": "default", "defaults": {"tier": "unknown"}}]
    data["source"]["kafka"].update({"max_batch_records": 500, "max_rate": 800})
    data["health"] = {"stall_timeout": "3s", "heartbeat_timeout": "4s"}
    spec = parse_spec(data)
    statuses: list[dict] = []

    def outage():
        proxy.set_broken(True)
        time.sleep(10)
        proxy.set_broken(False)

    threading.Timer(3.0, outage).start()
    try:
        report = run_pipeline(spec, until_end=True, on_status=statuses.append, status_every_s=0.5)
    finally:
        proxy.close()
    assert proxy.refused > 0
    assert any(w.get("health") == "waiting on store" and "enrich:users" in (w.get("backpressure") or "")
               for st in statuses for w in st), "no worker reported waiting on the lookup store"
    assert all(w.get("restarts", 0) == 0 for w in statuses[-1])
    assert report.records == len(values) and report.rejected == 0
    assert sum(w["enrich"]["users"]["unresolved"] for w in report.workers) == 0
    raw = pd.DataFrame({"partition": df["partition"], "offset": df["offset"], "tenant_id": df["tenant_id"],
                        "ts": df["ts"], "value": df["value"], "user_id": [json.loads(v)["user_id"] for v in values]})
    joined = duckdb.sql("select r.*, coalesce(u.tier, 'unknown') as tier from raw r left join users u using (user_id)"
                        " order by r.partition, r.offset").df()
    want, _ = reference.windows(joined, "tumbling", ["tenant_id", "tier"], 2000, 1000, size=10_000)
    reference.compare(read_windows(out, spec.name, "tier_10s").to_pandas(), want, ["tenant_id", "tier"])


def test_backfill_ending_with_open_sessions_then_resumed_leaves_one_row_per_session(broker, tmp_path, topic_name,
                                                                                     pipeline_name, postgres):
    """A backfill ends with open sessions (flushed at the end of input), a resumed run extends them: every
    sink holds one row per session, equal to one uninterrupted run (DuckDB reference over all records)."""
    from pipeline.io.sinks.postgres import read_table

    n = 6000
    rng = np.random.default_rng(41)
    # in time order per partition, with pauses longer than the gap now and then: sessions open across the cut
    ts = BASE_MS + np.cumsum(rng.choice([20, 40, 4000], n, p=[0.6, 0.397, 0.003]))
    df = pd.DataFrame({"tenant_id": [f"tenant-{i:03d}" for i in rng.integers(0, 6, n)], "event_type": "click",
                       "ts": ts, "value": rng.normal(10, 2, n).round(3)})
    df["partition"] = df["tenant_id"].map(lambda t: int(t.split("-")[1]) % 2)
    df["offset"] = df.groupby("partition").cumcount()
    values = [json.dumps(r).encode() for r in df[["tenant_id", "event_type", "ts", "value"]].to_dict("records")]
    parts = df["partition"].tolist()
    broker.extra["broker"].create_topic(topic_name, 2)
    out = f"file://{tmp_path}/out"
    data = _spec(pipeline_name, broker.address, topic_name, out, f"file://{tmp_path}/late",
                 windows=[{"name": "sess", "type": "session", "gap": "2s", "group_by": ["tenant_id"],
                           "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]}]
                 ).model_dump(mode="python")
    data["sinks"].append({"postgres": {"dsn": postgres.extra["dsn"]}})
    data["checkpoint"] = {"uri": f"file://{tmp_path}/chk", "interval": "1h"}
    spec = parse_spec(data)
    cut = n // 2
    produce_all(broker.address, topic_name, values[:cut], None, parts[:cut])
    run_pipeline(spec, until_end=True, inline=True)
    first = read_windows(out, spec.name, "sess").to_pandas()
    produce_all(broker.address, topic_name, values[cut:], None, parts[cut:])
    run_pipeline(spec, until_end=True, inline=True)
    want, _ = reference.windows(df, "session", ["tenant_id"], 2000, 1000, gap=2000)
    got = {"parquet": read_windows(out, spec.name, "sess").to_pandas(),
           "postgres": pd.DataFrame(read_table(postgres.extra["dsn"], "raystream_", spec.name, "sess"))}
    for sink, rows in got.items():
        for c in ("window_start", "window_end"):
            if not str(rows[c].dtype).startswith("int"):
                rows[c] = pd.to_datetime(rows[c], utc=True).astype("datetime64[ms, UTC]").astype("int64")
        assert "partition" not in rows.columns and not rows.duplicated(["tenant_id", "window_start"]).any(), sink
        try:
            reference.compare(rows, want, ["tenant_id"])
        except AssertionError as exc:
            raise AssertionError(f"sink {sink}: {exc}") from None
    # the cut really fell inside sessions: some rows of the first run were extended by the second
    first_ends = {(r.tenant_id, pd.Timestamp(r.window_start).value // 10**6): pd.Timestamp(r.window_end).value // 10**6
                  for r in first.itertuples()}
    final = got["parquet"]
    assert any(first_ends.get((r.tenant_id, int(r.window_start)), int(r.window_end)) != int(r.window_end)
               for r in final.itertuples())


@pytest.mark.parametrize("skew_s", [3600, -3600])
def test_worker_wall_clock_an_hour_off_changes_nothing(broker, tmp_path, topic_name, monkeypatch, skew_s):
    """The worker's wall clock an hour off (every ``time.time`` in the process), idle advance on: output
    equals the reference, nothing is rejected (the future guard compares event time with the record's Kafka
    timestamp, not the worker's clock; idleness and health run on the monotonic clock)."""
    values, keys, parts, df, _, _ = _dataset(6_000, seed=8)
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    data = _spec("skewed", broker.address, topic_name, f"file://{tmp_path}/out", f"file://{tmp_path}/late",
                 workers=1).model_dump(mode="python")
    data["event_time"].update({"idle_timeout": "1s", "max_future": "10m"})  # far less than the skew
    spec = parse_spec(data)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + skew_s)
    report = run_pipeline(spec, until_end=True, inline=True)
    monkeypatch.undo()
    assert abs(report.workers[0]["first_batch_at"] - real() - skew_s) < 60  # the run really saw the skewed clock
    assert report.rejected == 0 and report.records == len(values)
    _check_outputs(spec, df, f"file://{tmp_path}/out", f"file://{tmp_path}/late")
