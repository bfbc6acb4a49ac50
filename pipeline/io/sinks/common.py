"""What every window sink shares: identity columns, retries, the factory."""

from __future__ import annotations

import json
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa

from pipeline.identity import identity_columns, identity_key
from pipeline.retry import GaveUp, RetryPolicy, call_with_retries
from pipeline.spec import PipelineSpec, SinkSpec

__all__ = ["WindowSink", "RetryingSink", "identity_columns", "identity_key", "make_sink", "row_dicts", "value_columns", "SinkError"]


class SinkError(RuntimeError):
    """A sink write failed after every retry."""


class WindowSink(Protocol):
    name: str

    def write(self, table: pa.Table) -> int: ...

    def close(self) -> None: ...


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


class RetryingSink:
    """Retries a sink's writes by one ``RetryPolicy`` (exponential backoff, full jitter).

    The worker loop waits while it retries, which is the backpressure: no new
    records are polled while a store is failing. ``on_retry(sink, attempt,
    error, since)`` tells the loop, which pauses its partitions and reports the
    wait in its heartbeat. With no ``retries`` and no ``max_outage`` (the
    default) it waits until the sink is back; when the policy is exhausted it
    raises ``SinkError`` naming the sink and the last error.
    """

    def __init__(self, inner: WindowSink, policy: RetryPolicy,
                 on_retry: Callable[[str, int, BaseException, float], None] | None = None):
        self.inner = inner
        self.name = inner.name
        self.policy = policy
        self.on_retry = on_retry
        self.retried = 0
        self.failures = 0

    def write(self, table: pa.Table) -> int:
        def retried(attempt: int, exc: BaseException, since: float) -> None:
            self.failures += 1
            self.retried += 1
            if self.on_retry is not None:
                self.on_retry(self.name, attempt, exc, since)

        try:
            return call_with_retries(lambda: self.inner.write(table), self.policy, f"sink {self.name}", on_retry=retried,
                                     reset=getattr(self.inner, "reset", None))
        except GaveUp as exc:
            self.failures += 1
            raise SinkError(f"{exc}") from exc.__cause__

    def close(self) -> None:
        self.inner.close()


def sink_policy(cfg: SinkSpec) -> RetryPolicy:
    """The retry policy of one ``sinks:`` entry: unbounded unless ``retries`` or ``max_outage`` bound it."""
    return RetryPolicy(attempts=cfg.retries, backoff_s=cfg.retry_backoff / 1000.0, max_backoff_s=10.0,
                       max_total_s=None if cfg.max_outage is None else cfg.max_outage / 1000.0)


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
    return RetryingSink(inner, sink_policy(cfg))
