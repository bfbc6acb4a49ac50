"""Archive of the accepted raw records, on file:// or s3://, replayable by ``raystream backfill``.

Files: ``<uri>/<pipeline>/date=<YYYY-MM-DD>/hour=<HH>/p<partition>-<first offset>-<last offset>.parquet``,
by the broker timestamp in UTC (what Kafka's retention deletes by, so the hours line up with what the topic
lost). Each row keeps what a replay needs to make the same decisions as the stream: partition, offset, broker
timestamp, key, value and the schema version header. A replay after a failure may cut its batches elsewhere
and write overlapping offset ranges: readers keep one row per (partition, offset) (``read_archive``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.identity import SinkContext
from pipeline.io.storage import Location, open_location
from pipeline.process import Batch
from pipeline.spec import ArchiveSink as ArchiveSinkSpec
from pipeline.spec import PipelineSpec

__all__ = ["ARCHIVE_SCHEMA", "ArchiveSink", "accepted_records", "batches_of", "read_archive"]

ARCHIVE_SCHEMA = pa.schema([
    ("partition", pa.int32()),
    ("offset", pa.int64()),
    ("timestamp", pa.int64()),  # broker timestamp, ms (-1 unknown)
    ("key", pa.binary()),
    ("value", pa.binary()),
    ("schema_version", pa.int64()),  # the version header (-1 none, -2 unreadable)
])

_HOUR_MS = 3_600_000


def accepted_records(batch: Batch, rejects: pa.Table | None) -> pa.Table:
    """The records of ``batch`` not in ``rejects`` (matched by partition and offset), as an archive table."""
    keep = np.ones(len(batch), bool)
    if rejects is not None and rejects.num_rows:
        rej = set(zip(rejects.column("partition").to_pylist(), rejects.column("offset").to_pylist()))
        keep = np.fromiter(((int(p), int(o)) not in rej for p, o in zip(batch.partitions.tolist(), batch.offsets.tolist())),
                           bool, count=len(batch))
    idx = np.flatnonzero(keep)
    versions = batch.schema_versions if batch.schema_versions is not None else np.full(len(batch), -1, np.int64)
    return pa.table({
        "partition": pa.array(batch.partitions[idx], pa.int32()),
        "offset": pa.array(batch.offsets[idx], pa.int64()),
        "timestamp": pa.array(batch.timestamps[idx], pa.int64()),
        "key": pa.array([batch.keys[i] for i in idx.tolist()] if batch.keys is not None else [None] * len(idx), pa.binary()),
        "value": pa.array([batch.values[i] for i in idx.tolist()], pa.binary()),
        "schema_version": pa.array(np.asarray(versions)[idx], pa.int64()),
    }, schema=ARCHIVE_SCHEMA)


class ArchiveSink:
    """Writes accepted raw records (``accepted_records`` tables), one file per (hour, partition) and batch."""

    def __init__(self, ctx: "SinkContext | PipelineSpec", cfg: ArchiveSinkSpec):
        self.pipeline = SinkContext.of(ctx).pipeline
        self.location: Location = open_location(cfg.uri, cfg.s3_endpoint_url, cfg.s3_region)
        self.name = f"archive:{cfg.uri}"

    def close(self) -> None:
        """Nothing is held open between writes."""

    def write(self, table: pa.Table) -> int:
        """Write ``table``; returns the number of files."""
        if table is None or table.num_rows == 0:
            return 0
        ts = table.column("timestamp").to_numpy()
        hour = np.where(ts >= 0, ts // _HOUR_MS, 0)
        part = table.column("partition").to_numpy()
        order = np.lexsort((table.column("offset").to_numpy(), part, hour))
        table, hour, part = table.take(pa.array(order)), hour[order], part[order]
        change = np.ones(len(hour), bool)
        change[1:] = (hour[1:] != hour[:-1]) | (part[1:] != part[:-1])
        starts = np.flatnonzero(change).tolist() + [len(hour)]
        files = 0
        for a, b in zip(starts[:-1], starts[1:]):
            piece = table.slice(a, b - a)
            when = np.datetime64(int(hour[a]) * _HOUR_MS, "ms").astype("datetime64[h]").item()
            offs = piece.column("offset")
            rel = (f"{self.pipeline}/date={when:%Y-%m-%d}/hour={when:%H}/"
                   f"p{int(part[a])}-{pc.min(offs).as_py()}-{pc.max(offs).as_py()}.parquet")
            self.location.write_parquet(rel, piece)
            files += 1
        return files


def read_archive(uri: str, pipeline: str, s3_endpoint_url: str | None = None, s3_region: str | None = None) -> pa.Table | None:
    """Every archived record of ``pipeline``, one row per (partition, offset), in partition and offset order."""
    loc = open_location(uri, s3_endpoint_url, s3_region)
    t = loc.read_parquet(pipeline)
    if t is None:
        return None
    return dedup_archive(t.select(ARCHIVE_SCHEMA.names).cast(ARCHIVE_SCHEMA))


def dedup_archive(t: pa.Table) -> pa.Table:
    """One row per (partition, offset), sorted by them (overlapping files of a replay hold the same records)."""
    t = t.sort_by([("partition", "ascending"), ("offset", "ascending")])
    p, o = t.column("partition").to_numpy(), t.column("offset").to_numpy()
    keep = np.ones(len(o), bool)
    keep[1:] = (p[1:] != p[:-1]) | (o[1:] != o[:-1])
    return t.filter(pa.array(keep)) if not keep.all() else t


def batches_of(topic: str, table: pa.Table, max_records: int):
    """``Batch``es of ``table`` (archive columns, one partition's records in offset order), ``max_records`` each."""
    for a in range(0, table.num_rows, max_records):
        t = table.slice(a, max_records)
        b = Batch.of(topic, t.column("value").to_pylist(), t.column("partition").to_numpy(),
                     t.column("offset").to_numpy(), t.column("timestamp").to_numpy(), t.column("key").to_pylist())
        versions = t.column("schema_version").fill_null(-1).to_numpy()
        b.schema_versions = versions.astype(np.int64) if (versions != -1).any() else None
        yield b
