"""Parquet sink for closed windows and the late output, on file:// or s3://.

File names are a function of what they hold, so writing the same windows twice
leaves the same files:

* tumbling/sliding: ``<pipeline>/<window>/window_start=<ms>/partition=<p>.parquet``
  holds every group of that window start from that source partition and is
  rewritten whole when a revision changes; rows merged across partitions are
  written per shard (``shard=p<partition>`` for windows grouped by the Kafka
  key, ``shard=m<owner>`` for the merge owners' rows) instead;
* session: ``<pipeline>/<window>/partition=<p>/<first start>-<content hash>.parquet``
  (``shard=<shard>/…`` for merged rows);
* late output: ``<pipeline>/late/partition=<p>/<first offset>-<last offset>-<window>.parquet``.

Readers take the highest revision per window identity (``read_windows``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.identity import SinkContext, shard_of_table
from pipeline.io.storage import Location, open_location
from pipeline.spec import ParquetSink, PipelineSpec

__all__ = ["LateParquetWriter", "ParquetWindowSink", "read_windows"]


def _runs(*keys: np.ndarray) -> list[tuple[int, int]]:
    n = len(keys[0])
    change = np.zeros(n, bool)
    if n:
        change[0] = True
        for k in keys:
            change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change)
    ends = np.concatenate((starts[1:], [n]))
    return list(zip(starts.tolist(), ends.tolist()))


class ParquetWindowSink:
    """Writes closed-window tables produced by ``process_batch``."""

    def __init__(self, ctx: "SinkContext | PipelineSpec", cfg: ParquetSink):
        ctx = SinkContext.of(ctx)
        self.pipeline = ctx.pipeline
        self.types = {name: w.type for name, w in ctx.windows.items()}
        self.identity = {name: ",".join(["window", *w.identity]) for name, w in ctx.windows.items()}
        self.location: Location = open_location(cfg.uri, cfg.s3_endpoint_url, cfg.s3_region)
        self.files_written = 0
        self.name = f"parquet:{cfg.uri}"

    def close(self) -> None:
        """Nothing is held open between writes."""

    def write(self, table: pa.Table) -> int:
        """Write one closed-window table (one window name); returns files written."""
        if table is None or table.num_rows == 0:
            return 0
        window = table.column("window")[0].as_py()
        if "partition" in table.column_names:
            parts, shard = table.column("partition").to_numpy(), None
        else:
            # merged rows: the table holds one shard's groups (a source partition, or a merge owner)
            parts, shard = np.zeros(table.num_rows, np.int64), shard_of_table(table)
        data = table
        data = data.replace_schema_metadata({"raystream.identity": self.identity[window]})
        written = 0
        if self.types[window] == "session":
            order = np.argsort(parts, kind="stable")
            data, parts = data.take(pa.array(order)), parts[order]
            for a, b in _runs(parts):
                piece = data.slice(a, b - a)
                digest = hashlib.sha1()
                for col in piece.columns:
                    digest.update(str(col.to_pylist()).encode())
                first = int(pc.min(piece.column("window_start")).cast(pa.int64()).as_py())
                where = f"partition={int(parts[a])}" if shard is None else f"shard={shard}"
                self.location.write_parquet(f"{self.pipeline}/{window}/{where}/{first}-{digest.hexdigest()[:16]}.parquet", piece)
                written += 1
        else:
            starts = data.column("window_start").cast(pa.int64()).to_numpy()
            order = np.lexsort((parts, starts))
            data, parts, starts = data.take(pa.array(order)), parts[order], starts[order]
            for a, b in _runs(starts, parts):
                where = f"partition={int(parts[a])}" if shard is None else f"shard={shard}"
                self.location.write_parquet(f"{self.pipeline}/{window}/window_start={int(starts[a])}/{where}.parquet",
                                            data.slice(a, b - a))
                written += 1
        self.files_written += written
        return written


class LateParquetWriter:
    """Writes late records (original bytes, offsets, window) as Parquet."""

    def __init__(self, spec: PipelineSpec, cfg: ParquetSink):
        self.pipeline = spec.name
        self.location = open_location(cfg.uri, cfg.s3_endpoint_url, cfg.s3_region)

    def write(self, late: pa.Table | None) -> int:
        if late is None or late.num_rows == 0:
            return 0
        parts = late.column("partition").to_numpy()
        windows = np.array(late.column("window").to_pylist(), dtype=object)
        order = np.lexsort((late.column("offset").to_numpy(), windows, parts))
        late, parts, windows = late.take(pa.array(order)), parts[order], windows[order]
        offsets = late.column("offset").to_numpy()
        for a, b in _runs(parts, windows):
            self.location.write_parquet(
                f"{self.pipeline}/late/partition={int(parts[a])}/{int(offsets[a])}-{int(offsets[b - 1])}-{windows[a]}.parquet",
                late.slice(a, b - a),
            )
        return late.num_rows


def read_windows(uri: str, pipeline: str, window: str, s3_endpoint_url: str | None = None, latest: bool = True) -> pa.Table | None:
    """Read a window's output; with ``latest`` keep only the highest revision of each window identity."""
    loc = open_location(uri, s3_endpoint_url)
    table = loc.read_parquet(f"{pipeline}/{window}")
    if table is None or not latest:
        return table
    keys = [c for c in table.column_names if c != "revision" and not _is_value(table, c)]
    # identity code per row (null keys are a value, as in the windows themselves)
    codes = np.zeros(table.num_rows, np.int64)
    for k in keys:
        col = table.column(k).combine_chunks()
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.int64())
        enc = pc.dictionary_encode(col, null_encoding="encode")
        _, codes = np.unique(codes * (len(enc.dictionary) + 1) + enc.indices.to_numpy(zero_copy_only=False), return_inverse=True)
        codes = codes.reshape(-1).astype(np.int64)
    order = np.lexsort((table.column("revision").to_numpy(), codes))
    last = np.ones(len(order), bool)
    last[:-1] = codes[order][1:] != codes[order][:-1]
    return table.take(pa.array(np.sort(order[last])))


def _is_value(table: pa.Table, column: str) -> bool:
    # identity columns (window, bounds, group keys) are named in the file metadata
    ident = (table.schema.metadata or {}).get(b"raystream.identity", b"window,window_start,window_end")
    return column not in ident.decode().split(",")
