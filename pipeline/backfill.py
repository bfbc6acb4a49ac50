"""``raystream backfill``: the same spec over stored records, as a Ray Data job, writing what the stream writes.

Records come from a bounded Kafka offset range (Ray Data's Kafka reader, one read task per partition) or from
an ``archive`` sink's Parquet files (file:// or s3://). They are grouped by source partition and each group is
replayed by a worker's own loop (``pipeline.io.replay``) in a Ray Data task: a bounded run's output is a
function of each partition's records alone, so per-partition rows, late records and dead letters come out
as the streaming run writes them. Merged windows leave those tasks as partial states; one Ray task per merge
owner merges its groups over every partition (the merge owners' code) and writes them to the sinks.

Like ``pipeline.driver``, this is a composition root: Ray is imported lazily.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pipeline.driver import Totals
from pipeline.spec import PipelineSpec

__all__ = ["BackfillReport", "BackfillSource", "parse_source", "run_backfill"]


@dataclass(frozen=True)
class BackfillSource:
    """Where a backfill reads: ``kind`` ``kafka`` (``start``..``end``, end exclusive) or ``parquet`` (``uri``)."""

    kind: str
    start: object = "earliest"
    end: object = "latest"
    uri: str | None = None


def _bound(text: str, default: str, which: str) -> object:
    text = text.strip()
    if not text:
        return default
    if text in ("earliest", "latest"):
        if (which, text) in (("start", "latest"), ("end", "earliest")):
            raise ValueError(f"kafka range: {which} cannot be {text!r}")
        return text
    if re.fullmatch(r"\d+", text):
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"kafka range: {text!r} is not an offset, earliest/latest or an ISO-8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def parse_source(text: str) -> BackfillSource:
    """``kafka:START..END`` (offsets, ``earliest``/``latest`` or ISO-8601 times; END exclusive; each side may be
    left empty) or ``parquet:URI`` (an archive sink's uri: ``file://…`` or ``s3://…``)."""
    kind, sep, rest = text.partition(":")
    if kind == "kafka" and sep:
        if ".." not in rest:
            raise ValueError(f"{text!r}: a Kafka range is kafka:START..END, e.g. kafka:0..500000 or kafka:earliest..latest")
        a, _, b = rest.partition("..")
        start, end = _bound(a, "earliest", "start"), _bound(b, "latest", "end")
        if isinstance(start, int) and isinstance(end, int) and end < start:
            raise ValueError(f"{text!r}: END is before START")
        return BackfillSource("kafka", start, end)
    if kind == "parquet" and sep:
        if not (rest.startswith("file://") or rest.startswith("s3://")):
            raise ValueError(f"{text!r}: parquet:URI takes file://path or s3://bucket/prefix")
        return BackfillSource("parquet", uri=rest)
    raise ValueError(f"{text!r}: --from takes kafka:START..END or parquet:URI")


@dataclass
class BackfillReport(Totals):
    """Totals of a backfill; ``partitions`` holds each replayed partition's final loop status."""

    partitions: list[dict] = field(default_factory=list)
    merged_rows: int = 0
    wall_s: float = 0.0

    def _loops(self) -> list[dict]:
        return self.partitions

    @property
    def windows_emitted(self) -> int:
        return self._sum("windows_emitted") + self.merged_rows


def _kafka_dataset(spec: PipelineSpec, src: BackfillSource, partitions: int):
    import numpy as np
    import pyarrow as pa
    import ray.data

    from pipeline.io.sinks.archive import ARCHIVE_SCHEMA

    kafka = spec.source.kafka
    header = spec.validate_.version_header if spec.validate_ is not None else None
    extra = {k: v for k, v in kafka.config.items() if k.startswith(("security.", "sasl.", "ssl."))}
    ds = ray.data.read_kafka(kafka.topic, bootstrap_servers=kafka.bootstrap_servers, start_offset=src.start,
                             end_offset=src.end, consumer_config=extra or None,
                             timeout_ms=int(max(kafka.connect_timeout, 60_000)),
                             override_num_blocks=partitions)  # one block per read task: less to shuffle

    def to_archive(t: pa.Table) -> pa.Table:
        if header is not None:
            from pipeline.io.kafka import header_versions

            heads = [list(h.items()) if h else [] for h in t.column("headers").to_pylist()]
            versions = header_versions(iter(heads), header, t.num_rows)
        else:
            versions = np.full(t.num_rows, -1, np.int64)
        return pa.table({"partition": t.column("partition").cast(pa.int32()), "offset": t.column("offset"),
                         "timestamp": t.column("timestamp").cast(pa.int64()), "key": t.column("key").cast(pa.binary()),
                         "value": t.column("value").cast(pa.binary()), "schema_version": pa.array(versions, pa.int64())},
                        schema=ARCHIVE_SCHEMA)

    return ds.map_batches(to_archive, batch_format="pyarrow")


def _parquet_dataset(spec: PipelineSpec, src: BackfillSource):
    import ray.data

    from pipeline.io.sinks.archive import ARCHIVE_SCHEMA
    from pipeline.io.storage import open_location

    cfg = next((s.archive for s in spec.archives if s.archive.uri.rstrip("/") == src.uri.rstrip("/")), None)
    loc = open_location(src.uri, cfg.s3_endpoint_url if cfg else None, cfg.s3_region if cfg else None)
    files = [loc.path(f) for f in loc.list(spec.name) if f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"no archived records of pipeline {spec.name!r} under {src.uri}")
    ds = ray.data.read_parquet(files, filesystem=loc.fs, columns=ARCHIVE_SCHEMA.names, partitioning=None)
    return ds.map_batches(lambda t: t.select(ARCHIVE_SCHEMA.names).cast(ARCHIVE_SCHEMA), batch_format="pyarrow")


def run_backfill(spec: PipelineSpec, source: str | BackfillSource, address: str | None = None,
                 on_progress=None) -> BackfillReport:
    """Run ``spec`` over ``source`` on Ray (``address``, or a local Ray) and write its sinks; see the module doc.

    ``on_progress(stage, done, total)`` is told of each stage (read, replay, merge)."""
    import pyarrow as pa

    from actors.runtime import ensure_ray, local_ray_env

    src = parse_source(source) if isinstance(source, str) else source
    if address is None:
        local_ray_env()
    import ray
    import ray.data

    from pipeline.io.kafka import ensure_topic, topic_partitions
    from pipeline.io.replay import merge_partials, replay_partition, write_rows

    ensure_ray(address)
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the command shows its own progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    kafka = spec.source.kafka
    ensure_topic(kafka.bootstrap_servers, spec.dead_letter_topic, 1, kafka.connect_timeout / 1000.0)
    t0 = time.perf_counter()
    topic_parts = topic_partitions(kafka.bootstrap_servers, kafka.topic, kafka.connect_timeout / 1000.0)
    ds = _kafka_dataset(spec, src, len(topic_parts)) if src.kind == "kafka" else _parquet_dataset(spec, src)

    def replay(group: pa.Table) -> pa.Table:
        out = replay_partition(spec, group)
        part = int(group.column("partition")[0].as_py()) if group.num_rows else -1
        return pa.table({"partition": [part], "status": [json.dumps(out["status"], default=str)],
                         "partials": pa.array([out["partials"]], pa.binary())})

    if on_progress:
        on_progress("replay", 0, None)
    # one group per source partition, each replayed whole by one task
    done = ds.groupby("partition", num_partitions=len(topic_parts)).map_groups(replay, batch_format="pyarrow").take_all()
    report = BackfillReport(partitions=[json.loads(r["status"]) for r in done if r["partition"] >= 0])
    if on_progress:
        on_progress("replay", len(done), len(done))
    if spec.merged_windows:
        # every partition of the topic, as a streaming run knows them (one without records ends too); an archive
        # may outlive the topic: its own partitions then
        partitions = sorted(set(topic_parts) | {int(r["partition"]) for r in done if r["partition"] >= 0})
        shipped = ray.put([r["partials"] for r in done])
        owners = max(1, spec.owners)

        @ray.remote(num_cpus=0.5)
        def merge(owner: int, blobs) -> int:
            rows, failures = merge_partials(spec, partitions, blobs, owner, owners)
            return write_rows(spec, rows, failures)

        if on_progress:
            on_progress("merge", 0, owners)
        report.merged_rows = sum(ray.get([merge.remote(k, shipped) for k in range(owners)]))
        if on_progress:
            on_progress("merge", owners, owners)
    report.wall_s = time.perf_counter() - t0
    return report
