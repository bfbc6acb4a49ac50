"""Windows across partitions end to end: the real broker, Ray, 2 workers and 2 merge owners over 4 partitions
keyed by tenant; windows grouped by keys that do not follow the Kafka key, a window that does (no merge), and
rollup levels; every sink's rows against the DuckDB reference."""

from __future__ import annotations

import pandas as pd
import redis

from pipeline.driver import run_pipeline
from pipeline.io.kafka import produce_all
from pipeline.io.sinks.parquet import read_windows
from pipeline.io.sinks.postgres import read_table
from pipeline.spec import parse_spec
from tests import reference
from tests.test_end_to_end import PARTITIONS, _dataset

AGGS = ["count", "sum(value)", "min(value)", "max(value)", "mean(value)", "p95(value)", "count_distinct(value)",
        "first(value)", "last(value)"]
EXACT = ("count", "min_value", "max_value", "distinct_value", "first_value", "last_value")


def _rows(t: pd.DataFrame) -> pd.DataFrame:
    t = t.rename(columns={"count_distinct_value": "distinct_value", "p95_value": "p95"}).copy()
    for c in ("window_start", "window_end"):
        if not str(t[c].dtype).startswith("int"):
            t[c] = pd.to_datetime(t[c], utc=True).astype("datetime64[ms, UTC]").astype("int64")
    return t


def test_merged_windows_and_rollups_equal_the_reference_in_every_sink(broker, ray_local, postgres, redis_server, tmp_path,
                                                                      topic_name, pipeline_name):
    values, keys, parts, df, _, _ = _dataset(32_000, seed=23)  # 16 s of event time
    broker.extra["broker"].create_topic(topic_name, PARTITIONS)
    produce_all(broker.address, topic_name, values, keys, parts)
    out = f"file://{tmp_path}/out"
    spec = parse_spec({
        "name": pipeline_name,
        "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name, "max_batch_records": 3000,
                             "key_fields": ["tenant_id"]}},
        "event_time": {"field": "ts", "max_out_of_orderness": "2s", "allowed_lateness": "1s", "idle_timeout": "5s"},
        "windows": [
            {"name": "by_type", "type": "tumbling", "size": "1s", "group_by": ["event_type"], "aggregations": AGGS,
             "rollups": ["2s", {"size": "4s", "name": "by_type_slow", "retention": "6s"}]},
            {"name": "by_type_sliding", "type": "sliding", "size": "4s", "slide": "2s", "group_by": ["event_type"],
             "aggregations": AGGS},
            {"name": "sessions", "type": "session", "gap": "300ms", "group_by": ["event_type"], "aggregations": AGGS},
            {"name": "by_tenant", "type": "tumbling", "size": "2s", "group_by": ["tenant_id"], "aggregations": AGGS},
        ],
        "sinks": [{"parquet": {"uri": out}}, {"postgres": {"dsn": postgres.extra["dsn"]}},
                  {"redis": {"url": redis_server.extra["url"], "prefix": f"{pipeline_name}:"}}],
        "late_output": {"parquet": {"uri": f"file://{tmp_path}/late"}},
        "workers": 2,
        "merge_owners": 2,
    })
    assert spec.window_mode("by_type") == "merge" and spec.window_mode("by_tenant") == "local"
    report = run_pipeline(spec, until_end=True)
    assert len(report.workers) == 2
    ooo, lateness = spec.event_time.max_out_of_orderness, spec.event_time.allowed_lateness
    _, base_late = reference.windows(df, "tumbling", ["event_type"], ooo, lateness, size=1000)
    taken = df.reset_index(drop=True).drop(index=base_late["rid"].to_numpy())
    checked = 0
    for w in spec.windows:
        if w.rollup_of:  # a level: the records its base window took, grouped at the level's size
            want, _ = reference.windows(taken, "tumbling", w.group_by, ooo, 10**12, size=w.size, quantiles={"p95": 0.95},
                                        orders=True)
        else:
            want, _ = reference.windows(df, w.type, w.group_by, ooo, lateness, size=w.size or 0, slide=w.slide or 0,
                                        gap=w.gap or 0, quantiles={"p95": 0.95}, orders=True)
        got = {"parquet": read_windows(out, spec.name, w.name).to_pandas(),
               "postgres": pd.DataFrame(read_table(postgres.extra["dsn"], "raystream_", spec.name, w.name))}
        for sink, rows in got.items():
            rows = _rows(rows)
            assert "partition" not in rows.columns, f"{sink} {w.name}: merged rows carry no partition"
            want_here = want
            if w.retention and sink == "postgres":
                # whole partitions (window_start ranges) older than the newest end - retention were dropped: every
                # row within the retention is there, some older ones are gone, and what is there is right
                recent = want[want["window_end"] >= want["window_end"].max() - w.retention]
                ident = ["event_type", "window_start"]
                have = set(map(tuple, rows[ident].to_numpy().tolist()))
                assert set(map(tuple, recent[ident].to_numpy().tolist())) <= have
                assert len(rows) < len(want), "nothing was dropped"
                want_here = want[[tuple(x) in have for x in want[ident].to_numpy().tolist()]]
            try:
                reference.compare(rows, want_here, w.group_by, exact=EXACT, sketch=("p95",))
            except AssertionError as exc:
                raise AssertionError(f"sink {sink}, window {w.name}: {exc}") from None
            checked += 1
    assert checked == 2 * len(spec.windows) == 12
    # Redis: a level's retention is its rows' TTL
    r = redis.Redis.from_url(redis_server.extra["url"])
    slow = r.zrange(f"{pipeline_name}:by_type_slow:index", 0, 0)
    base = r.zrange(f"{pipeline_name}:by_type:index", 0, 0)
    assert slow and base
    # the level's rows live 6 s: on a slow machine the row may already be gone (-2), which its TTL did
    slow_ttl = r.pttl(slow[0])
    assert (slow_ttl == -2 or 0 < slow_ttl <= 6_000) and r.pttl(base[0]) > 6_000, (slow_ttl, r.pttl(base[0]))
    r.close()
