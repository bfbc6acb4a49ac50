"""Every window sink against its real store: contents equal the latest revision
of each window, a replay (in any order, older revisions last) changes nothing."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.io.sinks.common import make_sink
from pipeline.spec import parse_spec
from tests.pipeline.harness import encode, run_core

WINDOW = {"name": "w", "type": "tumbling", "size": "1s", "group_by": ["tenant_id"], "per_partition": True,
          "aggregations": ["count", "sum(value)", "max(value)"]}


def _emitted() -> tuple[list[pa.Table], pd.DataFrame]:
    rng = np.random.default_rng(3)
    n = 600
    df = pd.DataFrame({
        "partition": rng.integers(0, 2, n), "ts": 1_700_000_000_000 + np.sort(rng.integers(0, 8000, n)) + rng.integers(-900, 0, n),
        "tenant_id": [None if x == 0 else f"t{x}" for x in rng.integers(0, 4, n)], "value": rng.normal(10, 3, n).round(3),
    })
    df["offset"] = df.groupby("partition").cumcount()
    spec = _spec({"parquet": {"uri": "file:///tmp/unused"}})
    emitted, _, _, _ = run_core(spec, df, cuts=list(range(0, n, 37)), values=encode(df))
    tables = emitted["w"]
    allrows = pa.concat_tables(tables).to_pandas()
    allrows["window_start"] = allrows["window_start"].astype("int64")
    latest = allrows.sort_values("revision").drop_duplicates(["window_start", "tenant_id", "partition"], keep="last")
    assert allrows["revision"].nunique() > 1 and len(allrows) > len(latest)  # there really are re-emissions
    return tables, latest


def _spec(sink: dict, name: str = "sinktest"):
    return parse_spec({
        "name": name, "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events"}},
        "event_time": {"field": "ts", "format": "epoch_ms", "max_out_of_orderness": "300ms", "allowed_lateness": "2s"},
        "windows": [WINDOW], "sinks": [sink],
    })


def _check(rows: list[dict], latest: pd.DataFrame) -> None:
    got = pd.DataFrame(rows)
    got["window_start"] = got["window_start"].map(lambda v: int(v.timestamp() * 1000) if hasattr(v, "timestamp") else int(v))
    got["tenant_id"] = got["tenant_id"].where(got["tenant_id"].notna(), None)
    key = ["window_start", "tenant_id", "partition"]
    assert not got.duplicated(key).any()
    m = got.merge(latest, on=key, suffixes=("", "_ref"), how="outer", indicator=True)
    assert (m["_merge"] == "both").all(), m[m["_merge"] != "both"][key]
    bad = m[(m["count"] != m["count_ref"]) | (m["revision"] != m["revision_ref"])]
    assert bad.empty, bad[[*key, "count", "count_ref", "revision", "revision_ref"]]
    np.testing.assert_allclose(m["sum_value"].astype(float), m["sum_value_ref"].astype(float), rtol=1e-9)


def _write_with_replay(sink, tables):
    for t in tables:
        sink.write(t)
    for t in reversed(tables):  # a replay: every revision again, the older ones last
        sink.write(t)


def test_postgres_sink_upserts_by_revision(postgres):
    from pipeline.io.sinks.postgres import read_table

    tables, latest = _emitted()
    spec = _spec({"postgres": {"dsn": postgres.extra["dsn"]}}, "pgsink")
    sink = make_sink(spec, spec.sinks[0])
    _write_with_replay(sink, tables)
    sink.close()
    _check(read_table(postgres.extra["dsn"], "raystream_", "pgsink", "w"), latest)


def test_redis_sink_hashes_and_pubsub(redis_server):
    import redis

    tables, latest = _emitted()
    spec = _spec({"redis": {"url": redis_server.extra["url"], "prefix": "rs-test:"}}, "redissink")
    sub = redis.Redis.from_url(redis_server.extra["url"]).pubsub()
    sub.subscribe("rs-test:updates")
    sub.get_message(timeout=1)  # subscription confirmation
    sink = make_sink(spec, spec.sinks[0])
    _write_with_replay(sink, tables)
    rows = sink.inner.read("w")
    _check(rows, latest)
    msgs = []
    while (m := sub.get_message(timeout=0.5)) is not None:
        if m["type"] == "message":
            msgs.append(json.loads(m["data"]))
    # one message per write that changed something: the replay published nothing
    assert len(msgs) == sum(t.num_rows for t in tables) - _unchanged_rewrites(tables)
    assert {(m["window_start"], m["revision"]) for m in msgs} >= {(int(r.window_start), int(r.revision)) for r in latest.itertuples()}
    ttl = redis.Redis.from_url(redis_server.extra["url"]).pttl(sink.inner.key("w", rows[0]))
    assert 0 < ttl <= 86_400_000


def _unchanged_rewrites(tables) -> int:
    # tumbling emissions rewrite every group of a window start; unchanged groups keep their revision
    seen, same = {}, 0
    for t in tables:
        for r in t.to_pylist():
            k = (r["window_start"], r["tenant_id"], r["partition"])
            if seen.get(k, -1) >= r["revision"]:
                same += 1
            seen[k] = max(seen.get(k, -1), r["revision"])
    return same


def test_influx_sink_overwrites_points(victoria_metrics):
    tables, latest = _emitted()
    url = victoria_metrics.extra["url"]
    spec = _spec({"influxdb": {"url": url, "measurement_prefix": "sinktest_"}})
    sink = make_sink(spec, spec.sinks[0])
    for t in tables:  # in order: the last write of each point is its latest revision
        sink.write(t)
    sink.close()
    deadline = time.monotonic() + 20
    while True:
        urllib.request.urlopen(f"{url}/internal/force_flush", timeout=5).read()
        body = urllib.request.urlopen(f"{url}/api/v1/export?match[]={{__name__=~%22sinktest_w_.*%22}}", timeout=5).read()
        series = [json.loads(x) for x in body.splitlines() if x.strip()]
        by = {}
        for s in series:
            field = s["metric"]["__name__"].removeprefix("sinktest_w_")
            tenant = s["metric"].get("tenant_id")
            for ts, v in zip(s["timestamps"], s["values"]):
                k = (ts, None if tenant == "∅" else tenant, int(s["metric"]["partition"]))
                by.setdefault(k, {}).setdefault(field, []).append(v)
        samples = sum(len(f.get("revision", [])) for f in by.values())
        if samples >= sum(t.num_rows for t in tables) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    # every revision of a window is the same point (measurement, tags, timestamp), which InfluxDB
    # overwrites; victoria-metrics keeps each sample, so check the latest revision is among them
    assert len(by) == len(latest)
    for r in latest.itertuples():
        fields = by[(int(r.window_start), r.tenant_id, int(r.partition))]
        assert max(fields["revision"]) == r.revision and max(fields["count"]) == r.count
        assert min(abs(v - r.sum_value) for v in fields["sum_value"]) <= 1e-9 * abs(r.sum_value)
    points = {}
    for t in tables:
        for p in sink.inner.points(t):
            line = p.to_line_protocol()
            points.setdefault(line.split(" ")[0] + " " + line.split(" ")[-1], set()).add(line)
    assert len(points) == len(latest)


def test_kafka_sink_changelog(broker, topic_name):
    from pipeline.io.kafka import ensure_topic
    from pipeline.io.sinks.kafka import read_changelog

    ensure_topic(broker.address, topic_name, 2)
    tables, latest = _emitted()
    spec = parse_spec({**_spec({"kafka": {"topic": f"{topic_name}.out"}}).model_dump(mode="json", exclude_none=True),
                       "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name}}})
    sink = make_sink(spec, spec.sinks[0])
    _write_with_replay(sink, tables)
    sink.close()
    _check(read_changelog(broker.address, f"{topic_name}.out"), latest)


def test_failing_sink_retries_then_raises(postgres):
    from pipeline.io.sinks.common import Backpressure, SinkError

    tables, _ = _emitted()
    spec = _spec({"postgres": {"dsn": "postgresql://postgres@127.0.0.1:1/postgres", "connect_timeout": "1s"},
                  "retries": 2, "retry_backoff": "10ms"})
    sink = make_sink(spec, spec.sinks[0])
    with pytest.raises(Backpressure) as bp:  # a failed attempt is a typed signal for the loop
        sink.write(tables[0])
    assert bp.value.store == "postgres" and bp.value.attempt == 1 and bp.value.delay_s <= 0.01
    with pytest.raises(SinkError, match="after 3 attempts"):
        sink.write_waiting(tables[0])  # attempts 2 and 3, then the policy is spent
    assert sink.retried == 2


def test_a_failing_sink_pauses_consumption_and_nothing_is_lost(broker, postgres, tmp_path, topic_name, pipeline_name):
    """PostgreSQL unreachable for 2 s mid-run: the sink retries, fetching pauses, the table ends exact."""
    import threading

    from pipeline.driver import run_pipeline
    from pipeline.io.kafka import produce_all
    from pipeline.io.sinks.postgres import read_table
    from tests.services import TcpProxy

    port = int(postgres.extra["dsn"].rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    dsn = postgres.extra["dsn"].replace(f":{port}/", f":{proxy.port}/")
    n = 6000
    t0 = 1_700_000_000_000
    values = [json.dumps({"tenant_id": "t1", "ts": t0 + i * 5, "value": 1.0}).encode() for i in range(n)]
    broker.extra["broker"].create_topic(topic_name, 1)
    produce_all(broker.address, topic_name, values, None, [0] * n)
    spec = parse_spec({
        "name": pipeline_name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name, "max_batch_records": 200, "max_rate": 2000}},
        "event_time": {"field": "ts", "format": "epoch_ms"},
        "windows": [{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["tenant_id"], "aggregations": ["count"]}],
        "sinks": [{"postgres": {"dsn": dsn, "connect_timeout": "1s"}, "retries": 30, "retry_backoff": "100ms"}],
    })

    def outage():
        proxy.set_broken(True)
        time.sleep(2.0)
        proxy.set_broken(False)

    threading.Timer(1.0, outage).start()
    try:
        report = run_pipeline(spec, until_end=True, inline=True)
    finally:
        proxy.close()
    w = report.workers[0]
    assert proxy.refused > 0 and w["sink_retries"] > 0 and w["backpressure_pauses"] > 0
    rows = read_table(postgres.extra["dsn"], "raystream_", pipeline_name, "w")
    assert sum(r["count"] for r in rows) == n and len(rows) == n * 5 // 1000


LONG = "x" * 60
# names that a lossy mapping would merge: -/_, case, and long names that differ only past any cut
CLASHING = [("id-a", "w"), ("id_a", "w"), ("id_a", "W"), (f"{LONG}1", "w"), (f"{LONG}2", "w")]


def _clashing_tables(window: str, mark: int) -> pa.Table:
    _, latest = _emitted()
    t = pa.Table.from_pandas(latest.head(20).reset_index(drop=True), preserve_index=False)
    t = t.set_column(t.schema.get_field_index("window"), "window", pa.array([window] * t.num_rows))
    t = t.set_column(t.schema.get_field_index("count"), "count", pa.array([mark] * t.num_rows, t.schema.field("count").type))
    return t.set_column(t.schema.get_field_index("window_start"), "window_start",
                        pa.array(latest.head(20)["window_start"].to_numpy(), pa.int64()).cast(pa.timestamp("ms", tz="UTC")))


def _clash_spec(sink: dict, pipeline: str, window: str):
    return parse_spec({
        "name": pipeline, "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events"}},
        "event_time": {"field": "ts", "format": "epoch_ms"},
        "windows": [{**WINDOW, "name": window}], "sinks": [sink],
    })


@pytest.mark.parametrize("kind", ["postgres", "redis", "influxdb", "kafka", "parquet"])
def test_pipelines_and_windows_with_clashing_names_never_share_a_table_key_or_series(
        kind, postgres, redis_server, victoria_metrics, broker, tmp_path, topic_name):
    from pipeline.io.sinks.kafka import read_changelog
    from pipeline.io.sinks.parquet import read_windows
    from pipeline.io.sinks.postgres import read_table

    sink_cfg = {"postgres": {"postgres": {"dsn": postgres.extra["dsn"]}},
                "redis": {"redis": {"url": redis_server.extra["url"]}},
                "influxdb": {"influxdb": {"url": victoria_metrics.extra["url"], "measurement_prefix": f"{topic_name[2:]}_"}},
                "kafka": {"kafka": {"topic": f"{topic_name}.out"}},
                "parquet": {"parquet": {"uri": f"file://{tmp_path}/out"}}}[kind]
    if kind == "kafka":
        from pipeline.io.kafka import ensure_topic

        ensure_topic(broker.address, topic_name, 2)
    marks = {}
    for mark, (pipeline, window) in enumerate(CLASHING, start=1):
        spec = _clash_spec(sink_cfg, pipeline, window)
        if kind == "kafka":
            spec = parse_spec({**spec.model_dump(mode="json", exclude_none=True),
                               "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name}}})
        sink = make_sink(spec, spec.sinks[0])
        sink.write(_clashing_tables(window, mark))
        marks[(pipeline, window)] = (mark, sink)
    if kind == "kafka":
        changelog = read_changelog(broker.address, f"{topic_name}.out")
    for (pipeline, window), (mark, sink) in marks.items():
        if kind == "postgres":
            rows = read_table(postgres.extra["dsn"], "raystream_", pipeline, window)
        elif kind == "redis":
            rows = sink.inner.read(window)
        elif kind == "kafka":
            rows = [r for r in changelog if r["pipeline"] == pipeline and r["window"] == window]
        elif kind == "parquet":
            rows = read_windows(f"file://{tmp_path}/out", pipeline, window).to_pylist()
        else:
            url = victoria_metrics.extra["url"]
            deadline = time.monotonic() + 20
            while True:
                urllib.request.urlopen(f"{url}/internal/force_flush", timeout=5).read()
                q = urllib.request.quote(f'{{__name__="{topic_name[2:]}_{window}_count",pipeline="{pipeline}"}}')
                body = urllib.request.urlopen(f"{url}/api/v1/export?match[]={q}", timeout=5).read()
                rows = [{"count": v} for line in body.splitlines() if line.strip() for v in json.loads(line)["values"]]
                if len(rows) >= 20 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
        sink.close()
        assert len(rows) == 20, (kind, pipeline, window, len(rows))
        assert {r["count"] for r in rows} == {mark}, (kind, pipeline, window)


def test_sql_table_names_are_valid_and_distinct():
    from pipeline.identity import sql_table

    names = {sql_table("raystream_", p, w) for p, w in CLASHING}
    assert len(names) == len(CLASHING)
    assert all(len(n) + len("_ident") <= 63 and n == n.lower() for n in names)
    assert sql_table("raystream_", "id-a", "w") == sql_table("raystream_", "id-a", "w")  # stable


def test_postgres_retention_drops_whole_partitions(postgres):
    """A window with a retention: its table is range-partitioned by window_start, and partitions whose rows all
    ended more than the retention before the newest row's end are dropped; rows within it stay."""
    import pyarrow as pa

    from pipeline.io.sinks.postgres import read_table
    from pipeline.spec import parse_spec

    spec = parse_spec({"name": "pgret", "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "e"}},
                       "windows": [{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["k"],
                                    "aggregations": ["count"], "retention": "4s"}],
                       "sinks": [{"postgres": {"dsn": postgres.extra["dsn"]}}]})
    sink = make_sink(spec, spec.sinks[0])
    t0 = 1_700_000_000_000
    ts = pa.timestamp("ms", tz="UTC")
    for i in range(12):  # 12 one-second windows, written as they close
        start = t0 + i * 1000
        sink.write(pa.table({"window": ["w"], "window_start": pa.array([start], ts), "window_end": pa.array([start + 1000], ts),
                             "k": ["a"], "count": [i + 1], "revision": [i + 1]}))
    sink.close()
    rows = read_table(postgres.extra["dsn"], "raystream_", "pgret", "w")
    ends = sorted(int(r["window_end"].timestamp() * 1000) - t0 for r in rows)
    assert ends[-1] == 12_000 and all(e in ends for e in range(8_000, 12_001, 1000))  # within the retention: kept
    assert ends[0] > 1000 and sink.inner.partitions_dropped >= 1  # the oldest partitions are gone
