"""What every window sink shares: identity columns, retries, the factory."""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline.identity import SinkContext, identity_columns, identity_key, value_columns
from pipeline.retry import RetryPolicy
from pipeline.spec import PipelineSpec, SinkSpec

__all__ = ["Backpressure", "SINKS", "SinkContext", "WindowSink", "value_columns", "RetryingSink", "identity_columns", "identity_key", "make_sink", "row_dicts", "value_columns", "SinkError"]


class SinkError(RuntimeError):
    """A sink write failed after every retry."""


class WindowSink(Protocol):
    name: str

    def write(self, table: pa.Table) -> int: ...

    def close(self) -> None: ...


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


class Backpressure(Exception):
    """A sink cannot take a write now: the caller pauses its partitions and tries again after ``delay_s``.

    ``attempt`` counts the failed attempts of this write, ``since`` is the
    monotonic time of the first, ``error`` the store's last error.
    """

    def __init__(self, store: str, attempt: int, since: float, delay_s: float, error: BaseException):
        super().__init__(f"sink {store}: attempt {attempt} failed ({type(error).__name__}: {error}); retry in {delay_s:.2f}s")
        self.store, self.attempt, self.since, self.delay_s, self.error = store, attempt, since, delay_s, error


class RetryingSink:
    """One attempt per ``write``; a failure is a typed ``Backpressure`` signal until the policy is spent.

    The worker loop catches ``Backpressure``, pauses its partitions, reports
    the wait in its heartbeat and calls ``write`` again after the delay (one
    ``RetryPolicy``: exponential backoff, full jitter). With no ``retries`` and
    no ``max_outage`` (the default) that goes on until the sink is back; when
    the policy is spent ``write`` raises ``SinkError`` naming the sink and the
    last error.
    """

    def __init__(self, inner: WindowSink, policy: RetryPolicy, clock=time.monotonic):
        self.inner = inner
        self.name = inner.name
        self.policy = policy
        self.clock = clock
        self.retried = 0
        self.failures = 0
        self._attempt = 0
        self._since: float | None = None

    def write(self, table: pa.Table) -> int:
        try:
            written = self.inner.write(table)
        except Exception as exc:  # every store raises its own error types
            self.failures += 1
            self._attempt += 1
            now = self.clock()
            if self._since is None:
                self._since = now
            delay = self.policy.delay(self._attempt)
            if self.policy.exhausted(self._attempt, now - self._since, delay):
                attempts, self._attempt, self._since = self._attempt, 0, None
                raise SinkError(f"sink {self.name}: write failed after {attempts} attempts: {type(exc).__name__}: {exc}") from exc
            self.retried += 1
            if hasattr(self.inner, "reset"):
                try:
                    self.inner.reset()  # reconnect before the next attempt
                except Exception:  # the next attempt reports the store's state
                    pass
            raise Backpressure(self.name, self._attempt, self._since, delay, exc) from exc
        self._attempt, self._since = 0, None
        return written

    def write_waiting(self, table: pa.Table) -> int:
        """``write`` until it goes through or fails for good, waiting out each ``Backpressure`` (tools, tests)."""
        while True:
            try:
                return self.write(table)
            except Backpressure as bp:
                time.sleep(bp.delay_s)

    def close(self) -> None:
        self.inner.close()


def sink_policy(cfg: SinkSpec) -> RetryPolicy:
    """The retry policy of one ``sinks:`` entry: unbounded unless ``retries`` or ``max_outage`` bound it."""
    return RetryPolicy(attempts=cfg.retries, backoff_s=cfg.retry_backoff / 1000.0, max_backoff_s=10.0,
                       max_total_s=None if cfg.max_outage is None else cfg.max_outage / 1000.0)


# kind -> (module, class): imported when first used, so a sink module may import this one
# (identity, rows, retries) without a cycle, and a pipeline loads only the clients it writes to
SINKS: dict[str, tuple[str, str]] = {
    "parquet": ("pipeline.io.sinks.parquet", "ParquetWindowSink"),
    "postgres": ("pipeline.io.sinks.postgres", "PostgresSink"),
    "redis": ("pipeline.io.sinks.redis", "RedisSink"),
    "influxdb": ("pipeline.io.sinks.influx", "InfluxSink"),
    "kafka": ("pipeline.io.sinks.kafka", "KafkaSink"),
    "archive": ("pipeline.io.sinks.archive", "ArchiveSink"),
}


def make_sink(spec: "PipelineSpec | SinkContext", cfg: SinkSpec) -> WindowSink:
    """The sink for one ``sinks:`` entry: its own config and the pipeline's ``SinkContext``, wrapped in retries."""
    import importlib

    module, name = SINKS[cfg.kind]
    inner = getattr(importlib.import_module(module), name)(SinkContext.of(spec), getattr(cfg, cfg.kind))
    return RetryingSink(inner, sink_policy(cfg))
