"""Batch/stream parity: ``raystream backfill`` writes exactly what the streaming run writes for the same input.

One topic (4 partitions, late records, rejected records) is consumed by a streaming run on Ray (2 workers,
merge owners, an archive sink). The same spec is then run as a Ray Data backfill over the Kafka offset range
and over the archive's Parquet files, into other folders: every window (merged, per-partition, session, a
rollup level) and the late output must be equal row for row, revisions included, and equal to the DuckDB
reference of the raw input.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.backfill import BackfillSource, parse_source, run_backfill
from pipeline.driver import run_pipeline
from pipeline.io.kafka import produce_all
from pipeline.io.sinks.archive import read_archive
from pipeline.io.sinks.parquet import read_windows
from pipeline.io.storage import open_location
from pipeline.spec import parse_spec
from tests import reference
from tests.test_end_to_end import PARTITIONS, _dataset

WINDOWS = [
    {"name": "tumble", "type": "tumbling", "size": "10s", "group_by": ["tenant_id"], "rollups": ["1m"],
     "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)", "p95(value)"]},
    {"name": "slide", "type": "sliding", "size": "10s", "slide": "5s", "group_by": ["tenant_id"], "per_partition": True,
     "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
    {"name": "sess", "type": "session", "gap": "2s", "group_by": ["tenant_id"], "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "mean(value)"]},
]


def _spec(name, bootstrap, topic, root, tag, archive=False, workers=2, dsn=None):
    sinks = [{"parquet": {"uri": f"file://{root}/{tag}/out"}}]
    if dsn:  # one table prefix per run: the same pipeline's tables side by side
        sinks.append({"postgres": {"dsn": dsn, "table_prefix": f"{tag}_"}})
    if archive:
        sinks.append({"archive": {"uri": f"file://{root}/archive"}})
    return parse_spec({
        "name": name,
        "source": {"kafka": {"bootstrap_servers": bootstrap, "topic": topic, "max_batch_records": 700}},
        "event_time": {"field": "ts", "max_out_of_orderness": "2s", "allowed_lateness": "1s"},
        "windows": WINDOWS, "sinks": sinks,
        "late_output": {"parquet": {"uri": f"file://{root}/{tag}/late"}},
        "workers": workers, "merge_owners": 2,
    })


def _rows(spec, window: str) -> pd.DataFrame:
    t = read_windows(spec.sinks[0].parquet.uri, spec.name, window)
    df = t.to_pandas()
    keys = [c for c in ("window_start", "tenant_id", "partition") if c in df.columns]
    return df.sort_values(keys).reset_index(drop=True)


def _late(spec) -> pd.DataFrame:
    t = open_location(spec.late_output.parquet.uri).read_parquet(f"{spec.name}/late")
    return t.to_pandas().sort_values(["partition", "offset", "window", "window_start"]).reset_index(drop=True)


def test_parse_source():
    assert parse_source("kafka:0..500") == BackfillSource("kafka", 0, 500)
    assert parse_source("kafka:..") == BackfillSource("kafka", "earliest", "latest")
    assert parse_source("kafka:2026-01-01T00:00..latest").start.tzinfo is not None
    assert parse_source("parquet:s3://b/p").uri == "s3://b/p"
    for bad in ("kafka:5..2", "kafka:5", "parquet:/x", "hdfs://x", "kafka:latest..", "kafka:x..y"):
        with pytest.raises(ValueError):
            parse_source(bad)


def _pg(dsn, tag, spec, window) -> pd.DataFrame:
    from pipeline.io.sinks.postgres import read_table

    df = pd.DataFrame(read_table(dsn, f"{tag}_", spec.name, window)).drop(columns=["updated_at"])  # the write's time
    keys = [c for c in ("window_start", "tenant_id", "partition") if c in df.columns]
    return df.sort_values(keys).reset_index(drop=True)


def test_backfill_equals_stream(broker, postgres, ray_local, topic_name, pipeline_name, tmp_path):
    values, keys, parts, df, bad_offsets, _ = _dataset(12_000, seed=11, bad=6)
    produce_all(broker.address, topic_name, values, keys, parts)
    dsn = postgres.extra["dsn"]
    stream = _spec(pipeline_name, broker.address, topic_name, tmp_path, "stream", archive=True, dsn=dsn)
    report = run_pipeline(stream, until_end=True)
    assert report.records == len(values) and report.rejected == len(bad_offsets) and report.late > 0

    archived = read_archive(f"file://{tmp_path}/archive", pipeline_name)
    assert archived.num_rows == len(values) - len(bad_offsets), "the archive holds the accepted records, once each"
    assert sorted(zip(archived["partition"].to_pylist(), archived["offset"].to_pylist())) == \
        sorted(zip(df["partition"], df["offset"]))

    for tag, source in (("kafka", "kafka:earliest..latest"), ("parquet", f"parquet:file://{tmp_path}/archive")):
        spec = _spec(pipeline_name, broker.address, topic_name, tmp_path, tag, dsn=dsn)
        got = run_backfill(spec, source)
        assert got.records == (len(values) if tag == "kafka" else len(df))
        assert got.late == report.late
        for w in stream.windows:
            pd.testing.assert_frame_equal(_rows(spec, w.name), _rows(stream, w.name), check_like=True,
                                          obj=f"{tag} backfill, window {w.name}")
            pd.testing.assert_frame_equal(_pg(dsn, tag, spec, w.name), _pg(dsn, "stream", stream, w.name),
                                          check_like=True, obj=f"{tag} backfill, PostgreSQL, window {w.name}")
        pd.testing.assert_frame_equal(_late(spec), _late(stream), obj=f"{tag} backfill, late output")

    # and both equal the independent reference (the base windows)
    ooo, lateness = stream.event_time.max_out_of_orderness, stream.event_time.allowed_lateness
    for w in stream.windows:
        if w.rollup_of:
            continue
        want, _ = reference.windows(df, w.type, w.group_by + (["partition"] if w.per_partition else []), ooo, lateness,
                                    size=w.size or 0, slide=w.slide or 0, gap=w.gap or 0,
                                    quantiles={"p95_value": 0.95} if w.name == "tumble" else None)
        reference.compare(_rows(stream, w.name), want, w.group_by + (["partition"] if w.per_partition else []),
                          sketch=("p95_value",) if w.name == "tumble" else ())


def test_backfill_cli_kafka_range(broker, topic_name, pipeline_name, tmp_path):
    """The command a user runs: a bounded offset range, through a Ray the command starts itself."""
    values, keys, parts, df, _, _ = _dataset(3000, seed=5)
    produce_all(broker.address, topic_name, values, keys, parts)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(f"""
name: {pipeline_name}
source: {{kafka: {{bootstrap_servers: "{broker.address}", topic: {topic_name}}}}}
event_time: {{field: ts, max_out_of_orderness: 2s}}
windows: [{{name: tumble, type: tumbling, size: 10s, group_by: [tenant_id], aggregations: [count, sum(value), min(value), max(value), mean(value)]}}]
sinks: [{{parquet: {{uri: "file://{tmp_path}/out"}}}}]
""")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "backfill", str(spec_file), "--from", "kafka:100..400",
                           "--report", str(tmp_path / "report.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done 1200 records" in proc.stdout, proc.stdout
    totals = json.loads((tmp_path / "report.json").read_text())
    rows = read_windows(f"file://{tmp_path}/out", pipeline_name, "tumble").to_pandas()
    assert int(rows["count"].sum()) + totals["late"] == 1200 == totals["records"]
    sub = df[(df["offset"] >= 100) & (df["offset"] < 400)]
    want, _ = reference.windows(sub, "tumbling", ["tenant_id"], 2000, 0, size=10_000)
    reference.compare(rows, want, ["tenant_id"])


def test_archive_on_s3_replays_to_the_same_windows(broker, s3, ray_local, topic_name, pipeline_name, tmp_path, monkeypatch):
    """The archive on S3 (moto), written by an inline run, replayed by a backfill whose Ray Data tasks read S3."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.extra["endpoint"])
    bucket = f"arch-{pipeline_name}"
    boto3.client("s3", endpoint_url=s3.extra["endpoint"]).create_bucket(Bucket=bucket)
    values, keys, parts, df, _, _ = _dataset(4000, seed=13)
    produce_all(broker.address, topic_name, values, keys, parts)

    def spec(tag, archive):
        data = _spec(pipeline_name, broker.address, topic_name, tmp_path, tag).model_dump(mode="json", by_alias=True,
                                                                                          exclude_defaults=True)
        data["windows"] = [w for w in data["windows"] if not w.get("rollup_of")]
        if archive:
            data["sinks"].append({"archive": {"uri": f"s3://{bucket}/raw", "s3_endpoint_url": s3.extra["endpoint"]}})
        data["workers"] = 1
        return parse_spec(data)

    stream = spec("s3stream", True)
    run_pipeline(stream, until_end=True, inline=True)
    keys_listed = boto3.client("s3", endpoint_url=s3.extra["endpoint"]).list_objects_v2(Bucket=bucket, Prefix="raw/")
    assert any("/date=" in o["Key"] and "/hour=" in o["Key"] for o in keys_listed.get("Contents", []))
    back = spec("s3back", False)
    got = run_backfill(back, f"parquet:s3://{bucket}/raw")
    assert got.records == len(df)
    for w in stream.windows:
        pd.testing.assert_frame_equal(_rows(back, w.name), _rows(stream, w.name), check_like=True)
    pd.testing.assert_frame_equal(_late(back), _late(stream))
