"""What every window sink shares: identity columns, retries, the factory."""

from __future__ import annotations

import json
import random
import time
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa

from pipeline.spec import PipelineSpec, SinkSpec

__all__ = ["WindowSink", "RetryingSink", "identity_columns", "make_sink", "row_dicts", "value_columns", "SinkError"]


class SinkError(RuntimeError):
    """A sink write failed after every retry."""


class WindowSink(Protocol):
    name: str

    def write(self, table: pa.Table) -> int: ...

    def close(self) -> None: ...


def identity_columns(spec: PipelineSpec, window: str) -> list[str]:
    """Columns naming one window row: bounds, group keys and the source partition (state is per partition)."""
    w = next(w for w in spec.windows if w.name == window)
    return ["window_start", "window_end", *w.group_by, "partition"]


def value_columns(spec: PipelineSpec, window: str) -> list[str]:
    w = next(w for w in spec.windows if w.name == window)
    return [a.column for a in w.aggregations]


def _plain(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def row_dicts(table: pa.Table) -> list[dict]:
    """Rows as dicts with timestamps as epoch ms (JSON- and Redis-friendly)."""
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.int64())
        cols[name] = [_plain(v) for v in col.to_pylist()]
    names = list(cols)
    return [dict(zip(names, vals)) for vals in zip(*cols.values())]


def identity_key(row: dict, ident: list[str]) -> str:
    """A stable string for one window identity (JSON, so no key value can break out of it)."""
    return json.dumps([row["window"], *(row[c] for c in ident)], separators=(",", ":"), default=str)


class RetryingSink:
    """Retries a sink's writes with exponential backoff and full jitter, bounded in attempts and time.

    The worker loop waits while it retries, which is the backpressure: no new
    records are polled while a store is failing.
    """

    def __init__(self, inner: WindowSink, retries: int, backoff_ms: int, max_total_s: float = 120.0,
                 on_retry: Callable[[str, int, BaseException], None] | None = None):
        self.inner = inner
        self.name = inner.name
        self.retries = retries
        self.backoff_s = backoff_ms / 1000.0
        self.max_total_s = max_total_s
        self.on_retry = on_retry
        self.retried = 0
        self.failures = 0

    def write(self, table: pa.Table) -> int:
        t0 = time.monotonic()
        attempt = 0
        while True:
            try:
                return self.inner.write(table)
            except Exception as exc:  # every store raises its own error types
                attempt += 1
                self.failures += 1
                delay = random.uniform(0, min(10.0, self.backoff_s * (2 ** (attempt - 1))))
                if attempt > self.retries or time.monotonic() - t0 + delay > self.max_total_s:
                    raise SinkError(f"sink {self.name}: write failed after {attempt} attempts: {type(exc).__name__}: {exc}") from exc
                self.retried += 1
                if self.on_retry is not None:
                    self.on_retry(self.name, attempt, exc)
                time.sleep(delay)
                if hasattr(self.inner, "reset"):
                    self.inner.reset()

    def close(self) -> None:
        self.inner.close()


def make_sink(spec: PipelineSpec, cfg: SinkSpec) -> WindowSink:
    """The sink for one ``sinks:`` entry, wrapped in retries."""
    kind = cfg.kind
    if kind == "parquet":
        from pipeline.io.sinks.parquet import ParquetWindowSink

        inner = ParquetWindowSink(spec, cfg.parquet)
    elif kind == "postgres":
        from pipeline.io.sinks.postgres import PostgresSink

        inner = PostgresSink(spec, cfg.postgres)
    elif kind == "redis":
        from pipeline.io.sinks.redis import RedisSink

        inner = RedisSink(spec, cfg.redis)
    elif kind == "influxdb":
        from pipeline.io.sinks.influx import InfluxSink

        inner = InfluxSink(spec, cfg.influxdb)
    else:
        from pipeline.io.sinks.kafka import KafkaSink

        inner = KafkaSink(spec, cfg.kafka)
    return RetryingSink(inner, cfg.retries, cfg.retry_backoff)
