"""InfluxDB sink: closed windows as line protocol through influxdb-client.

Measurement ``<prefix><window>``, tags = the group keys, ``pipeline``, ``window``
and, for ``per_partition`` windows, ``partition`` (the pipeline tag keeps pipelines with equal window names
apart), timestamp = window start (ms), fields = the aggregations,
``revision`` and ``window_end_ms``. A point with the same measurement, tags and
timestamp overwrites the earlier one, so rewriting a window is idempotent. A
null key is written as the tag value ``∅`` (InfluxDB has no null tags).
"""

from __future__ import annotations

import pyarrow as pa
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

from pipeline.io.sinks.common import SinkContext, row_dicts, value_columns
from pipeline.spec import InfluxSink as InfluxSinkSpec, PipelineSpec

__all__ = ["InfluxSink", "NULL_TAG"]

NULL_TAG = "∅"


class InfluxSink:
    """Writes closed windows as InfluxDB points."""

    def __init__(self, ctx: "SinkContext | PipelineSpec", cfg: InfluxSinkSpec):
        self.ctx = ctx = SinkContext.of(ctx)
        self.cfg = cfg
        self.name = "influxdb"
        self.client = InfluxDBClient(url=cfg.url, token=cfg.token.get_secret_value(), org=cfg.org, timeout=cfg.timeout)
        self.api = self.client.write_api(write_options=SYNCHRONOUS)
        self.keys = {name: list(w.group_by) for name, w in ctx.windows.items()}

    def points(self, table: pa.Table) -> list[Point]:
        window = table.column("window")[0].as_py()
        values = value_columns(self.ctx, window)
        out = []
        for row in row_dicts(table):
            p = Point(f"{self.cfg.measurement_prefix}{window}").tag("pipeline", self.ctx.pipeline).tag("window", window)
            if "partition" in row:  # per_partition windows only
                p = p.tag("partition", str(row["partition"]))
            for k in self.keys[window]:
                v = row[k]
                p = p.tag(k, NULL_TAG if v is None or v == "" else str(v))
            for c in values:
                v = row[c]
                if v is None:
                    continue  # a field that is absent reads as null
                p = p.field(c, float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            p = p.field("revision", float(row["revision"])).field("window_end_ms", float(row["window_end"]))
            out.append(p.time(int(row["window_start"]), WritePrecision.MS))
        return out

    def write(self, table: pa.Table) -> int:
        if table is None or table.num_rows == 0:
            return 0
        self.api.write(bucket=self.cfg.bucket, org=self.cfg.org, record=self.points(table), write_precision=WritePrecision.MS)
        return 1

    def close(self) -> None:
        self.client.close()
