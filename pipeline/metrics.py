"""Prometheus metrics: one catalogue, two exporters, and the pure bookkeeping the shells call.

Every process of a run records through ``Metrics``. On Ray (workers, merge
owners, the coordinator, Serve replicas) the backend is Ray's metrics API
(``actors.metrics.RayBackend``): each node's metrics agent serves every actor
of that node on one port (``--metrics-export-port``), which is what KubeRay's
PodMonitors and Ray's own service-discovery file point Prometheus at, so a
cluster needs no port per actor. An inline run (no Ray) serves the same
catalogue with ``prometheus_client`` on a port of its own
(``PromClientBackend``). Ray prefixes every name with ``ray_``; the
``prometheus_client`` backend adds the same prefix so that rules and
dashboards name one set of series whichever backend exported them.

This module imports neither Ray nor any network code beyond
``prometheus_client``'s own HTTP server.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["CATALOGUE", "PREFIX", "MetricDef", "Metrics", "NullBackend", "PromClientBackend", "LoopMetrics",
           "TenantCap", "exported_name", "reason_counts", "reason_family",
           "checkpoint_metrics", "series_names", "tenant_counts"]

PREFIX = "ray_"  # what Ray puts before every metric name; the prometheus_client backend does the same
OTHER = "_other"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
EMIT_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RECOVERY_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


def _m(name, kind, help_, labels, buckets=()):
    return MetricDef(name, kind, help_, tuple(labels), tuple(buckets))


_P = ("pipeline",)
_PW = ("pipeline", "worker")
CATALOGUE: dict[str, MetricDef] = {m.name: m for m in [
    # records (workers)
    _m("raystream_records_in", "counter", "records polled from Kafka", _PW + ("partition",)),
    _m("raystream_records_accepted", "counter", "records folded into windows", _PW),
    _m("raystream_records_rejected", "counter", "records rejected, by reason family (dead-lettered)", _PW + ("reason",)),
    _m("raystream_records_late", "counter", "records for windows past allowed lateness (late output)", _PW),
    _m("raystream_records_dead_lettered", "counter", "records written to the dead letter (rejects, udf errors, "
       "late records without a late sink)", _PW),
    _m("raystream_tenant_records", "counter", "accepted records by tenant (capped: the rest are _other)",
       ("pipeline", "tenant")),
    _m("raystream_windows_emitted", "counter", "window rows written to the sinks", _P + ("window",)),
    _m("raystream_watermark_seconds", "gauge", "event-time watermark (Unix seconds)", _PW),
    _m("raystream_watermark_lag_seconds", "gauge", "wall time minus the watermark", _PW),
    _m("raystream_consumer_lag", "gauge", "records between the broker's end offset and the position", _PW + ("partition",)),
    _m("raystream_batch_seconds", "histogram", "time to process and write one batch", _PW, LATENCY_BUCKETS),
    _m("raystream_event_to_emit_seconds", "histogram", "wall time at emit minus the window's end (latest row of "
       "each written table)", _P + ("window",), EMIT_BUCKETS),
    _m("raystream_sink_write_seconds", "histogram", "time of one successful sink write", _P + ("sink",), LATENCY_BUCKETS),
    _m("raystream_sink_errors", "counter", "failed sink writes and lookups (each is retried)", _P + ("sink",)),
    _m("raystream_backpressure", "gauge", "1 while the worker waits on a failing store", _PW + ("store",)),
    _m("raystream_backpressure_seconds", "counter", "time spent waiting on failing stores", _PW + ("store",)),
    _m("raystream_enrich_lookups", "counter", "distinct keys looked up per batch, by the tier that answered "
       "(l1, l2, l3, miss)", _P + ("enricher", "tier")),
    _m("raystream_open_windows", "gauge", "open window slots held in memory", _PW),
    _m("raystream_worker_rss_bytes", "gauge", "resident memory of the worker", _PW),
    # coordinator
    _m("raystream_checkpoint_seconds", "histogram", "time to take a checkpoint (snapshots and manifest)", _P,
       RECOVERY_BUCKETS),
    _m("raystream_checkpoint_bytes", "gauge", "bytes of the latest checkpoint's state files", _P),
    _m("raystream_checkpoint_last_success_timestamp", "gauge", "when the latest checkpoint was committed (Unix s)", _P),
    _m("raystream_checkpoint_interval_seconds", "gauge", "the spec's checkpoint interval", _P),
    _m("raystream_checkpoints", "counter", "checkpoints committed", _P),
    _m("raystream_checkpoint_failures", "counter", "checkpoint rounds that wrote no manifest", _P),
    _m("raystream_recovery_actions", "counter", "recovery actions the coordinator took", _P + ("action",)),
    _m("raystream_worker_restarts", "counter", "worker restarts", _P + ("worker",)),
    _m("raystream_recovery_seconds", "histogram", "from a worker's restart until it consumes again", _P,
       RECOVERY_BUCKETS),
    _m("raystream_degraded", "gauge", "1 while the pipeline is degraded", _P),
    _m("raystream_workers_running", "gauge", "workers that answer and run", _P),
    _m("raystream_workers_desired", "gauge", "workers the autoscaling policy wants", _P),
    _m("raystream_unowned_partitions", "gauge", "partitions no live worker owns (must stay 0)", _P),
    # serving
    _m("raystream_api_requests", "counter", "API requests by route, method and status", ("route", "method", "status")),
    _m("raystream_api_request_seconds", "histogram", "API request latency", ("route", "method"), LATENCY_BUCKETS),
    _m("raystream_api_rate_limited", "counter", "requests refused by the rate limiter", ("tenant",)),
    _m("raystream_api_subscribers", "gauge", "live WebSocket/gRPC subscribers in this replica", ("replica",)),
]}


def exported_name(name: str) -> str:
    """The series name Prometheus stores (``_total`` on counters; histograms add ``_bucket``/``_sum``/``_count``)."""
    d = CATALOGUE[name]
    return PREFIX + name + ("_total" if d.kind == "counter" else "")


def reason_family(reason: str) -> str:
    """Reject reasons carry details after ':' (``schema_violation:required``); the metric keeps the family."""
    return reason.split(":", 1)[0]


class TenantCap:
    """Keeps label cardinality bounded: the first ``limit`` tenants seen keep their name, later ones are ``_other``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.known: set[str] = set()

    def __call__(self, tenant: Any) -> str:
        t = "" if tenant is None else str(tenant)
        if t in self.known:
            return t
        if len(self.known) < self.limit:
            self.known.add(t)
            return t
        return OTHER


# -- backends ---------------------------------------------------------------
class NullBackend:
    """Records nothing (metrics off)."""

    def instrument(self, d: MetricDef):
        return _Null()


class _Null:
    def inc(self, value, labels):
        pass

    set = observe = inc


class PromClientBackend:
    """``prometheus_client`` instruments in a registry of their own, served by ``serve(host, port)``."""

    def __init__(self):
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.server = None

    def instrument(self, d: MetricDef):
        import prometheus_client as pc_

        cls = {"counter": pc_.Counter, "gauge": pc_.Gauge, "histogram": pc_.Histogram}[d.kind]
        kw = {"buckets": d.buckets} if d.kind == "histogram" else {}
        return _PromInstrument(cls(PREFIX + d.name, d.help, d.labels, registry=self.registry, **kw), d.kind)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics``; returns the port (``0`` picks a free one)."""
        from prometheus_client import start_http_server

        self.server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self.server.server_address[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class _PromInstrument:
    def __init__(self, metric, kind):
        self.metric, self.kind = metric, kind

    def inc(self, value, labels):
        self.metric.labels(**labels).inc(value)

    def set(self, value, labels):
        self.metric.labels(**labels).set(value)

    def observe(self, value, labels):
        self.metric.labels(**labels).observe(value)


class Metrics:
    """The catalogue's instruments on one backend; instruments are made on first use.

    Every call is cheap (a dict lookup and the backend's update) and never
    raises: a metric must not take a pipeline down.
    """

    def __init__(self, backend=None, refresh_s: float = 1.0):
        self.backend = backend or NullBackend()
        self._instruments: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.enabled = not isinstance(self.backend, NullBackend)
        # Ray exports a gauge only while it is being set: the last value of each is set again every refresh_s
        self._held: dict[tuple[str, tuple], float] | None = {} if getattr(self.backend, "gauges_fade", False) else None
        self.refresh_s = refresh_s
        self._refresher: threading.Thread | None = None

    def _get(self, name: str):
        inst = self._instruments.get(name)
        if inst is None:
            with self._lock:
                inst = self._instruments.get(name)
                if inst is None:
                    inst = self._instruments[name] = self.backend.instrument(CATALOGUE[name])
        return inst

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        if value:
            self._call(name, "inc", value, labels)

    def set(self, name: str, value: float, **labels) -> None:
        self._call(name, "set", value, labels)
        if self._held is not None and self.enabled:
            with self._lock:
                self._held[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))] = float(value)
                if self._refresher is None:
                    self._refresher = threading.Thread(target=self._refresh, name="metrics-refresh", daemon=True)
                    self._refresher.start()

    def forget(self, **labels) -> None:
        """Stop re-setting the gauges carrying all of ``labels`` (a loop that closed: its partitions moved on)."""
        if self._held is None:
            return
        want = {(k, str(v)) for k, v in labels.items()}
        with self._lock:
            for key in [k for k in self._held if want <= set(k[1])]:
                del self._held[key]

    def _refresh(self) -> None:
        while True:
            time.sleep(self.refresh_s)
            with self._lock:
                held = list(self._held.items())
            for (name, labels), value in held:
                self._call(name, "set", value, dict(labels))

    def observe(self, name: str, value: float, **labels) -> None:
        self._call(name, "observe", value, labels)

    def _call(self, name, op, value, labels):
        if not self.enabled:
            return
        try:
            getattr(self._get(name), op)(float(value), {k: str(v) for k, v in labels.items()})
        except Exception:  # a broken exporter must not stop the records
            pass


# -- what a worker's loop reports ---------------------------------------------
class LoopMetrics:
    """Turns one loop's batches, writes and waits into the catalogue's series.

    Pure bookkeeping: the loop calls it with what it already has (the batch's
    partitions, the ``BatchResult``, timings); consumer lag is set from end
    offsets the loop asks the broker for at most every ``lag_every_s``.
    """

    def __init__(self, metrics: Metrics, pipeline: str, worker: str, tenant_field: str | None = None,
                 max_tenants: int = 100, lag_every_s: float = 5.0):
        self.m = metrics
        self.labels = {"pipeline": pipeline, "worker": worker}
        self.pipeline = pipeline
        self.tenant_field = tenant_field
        self.tenants = TenantCap(max_tenants)
        self.lag_every_s = lag_every_s
        self._lag_at = float("-inf")
        self._enrich_seen: dict[tuple[str, str], int] = {}
        self._waiting: str | None = None

    @property
    def enabled(self) -> bool:
        return self.m.enabled

    def batch(self, partitions: np.ndarray, result, seconds: float, late_to_dead_letter: bool,
              tenants: dict[str, int] | None = None) -> None:
        """One processed batch: records in per partition, accepted, rejected by reason, late, dead-lettered."""
        if not self.m.enabled or result.records == 0:
            return
        ps, counts = np.unique(partitions, return_counts=True)
        for p, c in zip(ps.tolist(), counts.tolist()):
            self.m.inc("raystream_records_in", c, partition=p, **self.labels)
        accepted = result.records - result.rejected - result.late_records
        self.m.inc("raystream_records_accepted", accepted, **self.labels)
        self.m.inc("raystream_records_late", result.late_records, **self.labels)
        dead = result.rejected + (result.late_records if late_to_dead_letter else 0)
        if result.rejects is not None:
            for reason, n in reason_counts(result.rejects).items():
                self.m.inc("raystream_records_rejected", n, reason=reason, **self.labels)
        if result.udf_failures is not None:
            dead += result.udf_failures.num_rows
        self.m.inc("raystream_records_dead_lettered", dead, **self.labels)
        for tenant, n in (tenants or {}).items():
            self.m.inc("raystream_tenant_records", n, pipeline=self.pipeline, tenant=self.tenants(tenant))
        self.m.observe("raystream_batch_seconds", seconds, **self.labels)

    def watermark(self, watermark_ms: int | None, open_windows: int, rss: int) -> None:
        if not self.m.enabled:
            return
        if watermark_ms is not None:
            self.m.set("raystream_watermark_seconds", watermark_ms / 1000.0, **self.labels)
            self.m.set("raystream_watermark_lag_seconds", max(0.0, time.time() - watermark_ms / 1000.0), **self.labels)
        self.m.set("raystream_open_windows", open_windows, **self.labels)
        self.m.set("raystream_worker_rss_bytes", rss, **self.labels)

    def close(self) -> None:
        """This loop's gauges are no longer kept alive (its partitions may be another worker's now)."""
        self.m.forget(**self.labels)

    def lag_due(self) -> bool:
        if not self.m.enabled:
            return False
        now = time.monotonic()
        if now - self._lag_at < self.lag_every_s:
            return False
        self._lag_at = now
        return True

    def lag(self, ends: dict[int, int], positions: dict[int, int]) -> None:
        for p, end in ends.items():
            self.m.set("raystream_consumer_lag", max(0, int(end) - int(positions.get(p, 0))), partition=p, **self.labels)

    def emitted(self, window: str, table: pa.Table, now_ms: int | None = None) -> None:
        """A window table written to the sinks: rows emitted, and event-to-emit latency of its latest window end."""
        if not self.m.enabled or table.num_rows == 0:
            return
        self.m.inc("raystream_windows_emitted", table.num_rows, pipeline=self.pipeline, window=window)
        if "window_end" in table.column_names:
            end = pc.max(table.column("window_end")).cast(pa.int64()).as_py()
            if end is not None:
                now_ms = int(time.time() * 1000) if now_ms is None else now_ms
                self.m.observe("raystream_event_to_emit_seconds", max(0.0, (now_ms - end) / 1000.0),
                               pipeline=self.pipeline, window=window)

    def sink_write(self, sink: str, seconds: float) -> None:
        self.m.observe("raystream_sink_write_seconds", seconds, pipeline=self.pipeline, sink=sink)

    def store_wait(self, store: str) -> None:
        """A failing store is being retried (one call per failed attempt)."""
        self.m.inc("raystream_sink_errors", 1, pipeline=self.pipeline, sink=store)
        if self._waiting != store:
            self._waiting = store
            self.m.set("raystream_backpressure", 1, store=store, **self.labels)

    def store_back(self, store: str, waited_s: float) -> None:
        self.m.set("raystream_backpressure", 0, store=store, **self.labels)
        self.m.inc("raystream_backpressure_seconds", waited_s, store=store, **self.labels)
        self._waiting = None

    def enrich(self, stats: dict[str, dict]) -> None:
        """Cumulative enrichment counters (``EnrichStats``) to per-tier increments."""
        if not self.m.enabled:
            return
        for name, s in stats.items():
            tiers = {"l1": s.get("l1_hits", 0), "l2": s.get("l2_hits", 0), "l3": s.get("l3_hits", 0),
                     "miss": s.get("misses", 0)}
            for tier, total in tiers.items():
                prev = self._enrich_seen.get((name, tier), 0)
                if total > prev:
                    self.m.inc("raystream_enrich_lookups", total - prev, pipeline=self.pipeline, enricher=name, tier=tier)
                self._enrich_seen[(name, tier)] = total


def reason_counts(rejects: pa.Table) -> dict[str, int]:
    """Rejected records per reason family."""
    out: dict[str, int] = {}
    vc = pc.value_counts(rejects.column("reason").combine_chunks())
    for item in vc.to_pylist():
        fam = reason_family(item["values"] or "")
        out[fam] = out.get(fam, 0) + int(item["counts"])
    return out


def tenant_counts(table: pa.Table, field: str) -> dict[str, int]:
    """Accepted records per value of ``field`` (vectorized)."""
    if field not in table.column_names or table.num_rows == 0:
        return {}
    vc = pc.value_counts(table.column(field).combine_chunks())
    return {("" if v["values"] is None else str(v["values"])): int(v["counts"]) for v in vc.to_pylist()}


def series_names() -> list[str]:
    """Every series name the catalogue exports (histograms as their three series)."""
    out = []
    for d in CATALOGUE.values():
        base = PREFIX + d.name
        if d.kind == "counter":
            out.append(base + "_total")
        elif d.kind == "histogram":
            out += [base + "_bucket", base + "_sum", base + "_count"]
        else:
            out.append(base)
    return out


def checkpoint_metrics(metrics: Metrics, spec, manifest: dict, seconds: float) -> None:
    """A committed checkpoint: duration, state bytes, commit time, count and the interval (for age alerts)."""
    size = sum(int(e.get("bytes") or 0) for e in manifest.get("partitions", {}).values())
    size += sum(int(e.get("bytes") or 0) for e in (manifest.get("merge") or {}).values())
    labels = {"pipeline": spec.name}
    metrics.observe("raystream_checkpoint_seconds", seconds, **labels)
    metrics.set("raystream_checkpoint_bytes", size, **labels)
    metrics.set("raystream_checkpoint_last_success_timestamp", manifest.get("created", time.time()), **labels)
    metrics.set("raystream_checkpoint_interval_seconds", spec.checkpoint.interval / 1000.0, **labels)
    metrics.inc("raystream_checkpoints", 1, **labels)
