"""process_batch: the functional core of a worker (no Ray, no network).

One call takes a polled batch of raw Kafka records and the worker's state, and
returns what to write: closed windows, late records and rejected records. Every
input record ends up accepted (folded into at least one window), late, or
rejected, and the counters say how many went where.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.decode import JsonDecoder
from pipeline.metrics import tenant_counts
from pipeline.spec import PipelineSpec
from pipeline.watermarks import NEG_INF, POS_INF, WatermarkTracker
from pipeline.windows import Rows, WindowState

__all__ = ["Batch", "BatchResult", "PipelineState", "advance", "process_batch", "REJECT_SCHEMA", "LATE_SCHEMA"]

_TS = pa.timestamp("ms", tz="UTC")

# enrich(table) -> (table with added fields, rejects as (row position, reason, detail))
Enrich = Callable[[pa.Table], tuple[pa.Table, list[tuple[int, str, str]]]]

REJECT_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("schema", pa.string()),  # subject/version a record was validated against, when it was
    ]
)

LATE_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("event_time", _TS),
        ("window", pa.string()),
        ("window_start", _TS),
        ("watermark", _TS),
    ]
)


@dataclass
class Batch:
    """Raw records of one poll, in offset order within each partition."""

    topic: str
    values: list
    partitions: np.ndarray
    offsets: np.ndarray
    timestamps: np.ndarray  # broker timestamps, ms (-1 when unknown)
    keys: list | None = None
    schema_versions: np.ndarray | None = None  # from the version header: -1 none, -2 unreadable
    traceparents: list | None = None  # distinct W3C traceparent headers of the records (when tracing)

    def __len__(self) -> int:
        return len(self.values)

    def take(self, rows: np.ndarray) -> "Batch":
        """The records at positions ``rows`` (ascending), in order."""
        idx = rows.tolist()
        return Batch(self.topic, [self.values[i] for i in idx], self.partitions[rows], self.offsets[rows],
                     self.timestamps[rows], None if self.keys is None else [self.keys[i] for i in idx],
                     None if self.schema_versions is None else self.schema_versions[rows], self.traceparents)

    def below(self, positions: dict[int, int]) -> np.ndarray:
        """Mask of records whose offset is below their partition's position (already processed)."""
        if not len(self) or not positions:
            return np.zeros(len(self), bool)
        top = max(max(positions), int(self.partitions.max())) + 1
        lut = np.zeros(top, np.int64)
        for p, o in positions.items():
            lut[int(p)] = o
        return self.offsets < lut[self.partitions]

    @classmethod
    def of(cls, topic: str, values: list, partitions, offsets, timestamps=None, keys=None) -> "Batch":
        n = len(values)
        return cls(
            topic,
            values,
            np.asarray(partitions, dtype=np.int32).reshape(n),
            np.asarray(offsets, dtype=np.int64).reshape(n),
            np.full(n, -1, np.int64) if timestamps is None else np.asarray(timestamps, dtype=np.int64).reshape(n),
            keys,
        )


@dataclass
class BatchResult:
    """What one batch produced; tables are None when empty."""

    closed: list[pa.Table] = field(default_factory=list)
    late: pa.Table | None = None
    rejects: pa.Table | None = None
    udf_failures: pa.Table | None = None  # records of window groups whose user function raised (also in the windows)
    partials: dict[str, dict[str, pa.Table]] = field(default_factory=dict)  # merged windows: states shipped to owners
    frontiers: dict[str, dict[int, int]] = field(default_factory=dict)  # merged windows: per partition, see WindowState.frontiers
    records: int = 0
    rejected: int = 0
    late_records: int = 0
    watermark: int = NEG_INF
    min_event_time: int | None = None
    max_event_time: int | None = None
    tenants: dict[str, int] | None = None  # records past every reject stage per tenant (observability.tenant_field)


class PipelineState:
    """Everything a worker keeps between batches: decoder, watermarks, open windows."""

    def __init__(self, spec: PipelineSpec, partitions: Iterable[int], clock: Callable[[], float] = time.monotonic,
                 schema_fields: dict[str, str] | None = None, keep_unexpected: bool = False):
        self.spec = spec
        self.decoder = JsonDecoder(spec, schema_fields, keep_unexpected)
        self.tracker = WatermarkTracker(
            partitions, spec.event_time.max_out_of_orderness, spec.event_time.idle_timeout, clock
        )
        # rollup levels fold no records: the merge owners build them from the level below
        self.windows = {w.name: WindowState(w, spec.event_time.allowed_lateness) for w in spec.windows if not w.rollup_of}
        self.merged = set(spec.merged_windows) & set(self.windows)  # their closed slots are shipped as partial states, not emitted
        self.windows_emitted = 0
        # dedup: per partition, event id -> (event time, offset) of its first delivery
        self.seen: dict[int, dict] = {}
        self._dedup_batches = 0

    @property
    def open_windows(self) -> int:
        return sum(w.open_slots for w in self.windows.values())


def _numeric(table: pa.Table, fields: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for f in fields:
        col = table.column(f).combine_chunks() if table.num_columns else pa.array([], pa.float64())
        if not pa.types.is_floating(col.type):
            col = col.cast(pa.float64())
        valid = ~col.is_null().to_numpy(zero_copy_only=False)
        values = col.fill_null(0.0).to_numpy(zero_copy_only=False)
        out[f] = (values, valid)
    return out


def _records(batch: Batch, idx: np.ndarray) -> dict[str, pa.Array]:
    take = idx.tolist()
    values = [batch.values[i] for i in take]
    keys = [batch.keys[i] for i in take] if batch.keys is not None else [None] * len(take)
    return {
        "topic": pa.array([batch.topic] * len(take), pa.string()),
        "partition": pa.array(batch.partitions[idx], pa.int32()),
        "offset": pa.array(batch.offsets[idx], pa.int64()),
        "timestamp": pa.array(batch.timestamps[idx], pa.int64()),
        "key": pa.array(keys, pa.binary()),
        "value": pa.array(values, pa.binary()),
    }


def _close(state: PipelineState, result: BatchResult) -> None:
    """Emit and free windows by their partition's effective watermark.

    Sets the result's closed windows and, when a user function raised for some
    window groups, their records as dead letters (``udf_error:<function>``,
    the exception and traceback in the detail; the group's column is null).
    Merged windows ship the partial states of their closed slots instead
    (``result.partials``) and every partition's frontier (``result.frontiers``).
    """
    from pipeline.windows import snapshot_slots

    watermarks = state.tracker.partition_watermarks()
    closed, failures = [], []
    for name, w in state.windows.items():
        if name in state.merged:
            slots = w.ship(watermarks)
            if len(slots):
                result.partials[name] = snapshot_slots(w, slots, partition_column=True)
            w.expire(watermarks)
            result.frontiers[name] = w.frontiers(watermarks)
            continue
        t = w.close(watermarks)
        if t is not None:
            closed.append(t)
            state.windows_emitted += t.num_rows
        failures += w.failures
        w.failures = []
        w.expire(watermarks)
    result.closed, result.udf_failures = closed, _udf_rejects(state.spec, failures)


def udf_rejects(spec: PipelineSpec, failures: list[dict]) -> pa.Table | None:
    """Dead letters for the records of window groups whose user function raised."""
    return _udf_rejects(spec, failures)


def _udf_rejects(spec: PipelineSpec, failures: list[dict]) -> pa.Table | None:
    if not failures:
        return None
    import json

    cols: dict[str, list] = {n: [] for n in REJECT_SCHEMA.names}
    # per record of a failed window group: user-function failures are rare by nature
    for f in failures:
        detail = f"window {f['window']} starting {f['window_start']}: {f['function']}({f['field']}) raised {f['error']}\n{f['traceback']}"
        for off, value in zip(f["offsets"], f["values"]):
            cols["topic"].append(spec.source.kafka.topic)
            cols["partition"].append(f["partition"])
            cols["offset"].append(off)
            cols["timestamp"].append(-1)
            cols["key"].append(None)
            cols["value"].append(json.dumps({"window": f["window"], "window_start": f["window_start"], f["field"]: value},
                                            default=str).encode())
            cols["reason"].append(f"udf_error:{f['function']}")
            cols["detail"].append(detail[:4000])
            cols["schema"].append(None)
    return pa.table(cols, schema=REJECT_SCHEMA)


def process_batch(spec: PipelineSpec, state: PipelineState, batch: Batch, enrich: Enrich | None = None,
                  validate=None) -> BatchResult:
    """Decode, window and close one batch.

    Steps, in order:
    0. values over ``max_message_bytes`` become rejects (``oversized``);
    1. decode values to Arrow; undecodable records become rejects;
    1b. ``validate`` (a source of JSON Schema validators, see
       ``pipeline.io.validation``) checks each record against its schema
       version (the header's, else the spec's); violations become rejects
       ``schema_violation:<rule>``, an unknown version ``unknown_schema_version``;
    2. reject records whose event time is more than ``max_future`` past their
       broker timestamp (they must not move the watermark);
    2b. ``enrich`` (I/O supplied by the caller) adds fields; records it rejects
       (``enrichment_miss:<name>``) become rejects;
    2c. with ``dedup``, records whose id was accepted before become rejects
       (``duplicate``); only ids of records that pass every reject stage are kept;
    3. compute each record's prefix watermark and fold accepted records into
       every window; records for windows already past allowed lateness are late;
    4. advance the watermarks, emit closed windows and free expired ones (per
       partition).
    """
    result = BatchResult(records=len(batch))
    if len(batch) == 0:
        _close(state, result)
        result.watermark = state.tracker.watermark
        return result
    limit = spec.source.kafka.max_message_bytes
    sizes = np.fromiter((len(v) if v is not None else 0 for v in batch.values), dtype=np.int64, count=len(batch))
    big = sizes > limit
    pre: list[tuple[int, str, str, str | None]] = []
    if big.any():
        for i in np.flatnonzero(big).tolist():
            pre.append((i, "oversized", f"value of {int(sizes[i])} bytes is over max_message_bytes {limit}", None))
        kept = np.flatnonzero(~big)
        decoded = state.decoder.decode([batch.values[i] for i in kept.tolist()])
        decoded.rows = kept[decoded.rows]
        decoded.rejects = [(int(kept[i]), r, d) for i, r, d in decoded.rejects]
    else:
        decoded = state.decoder.decode(batch.values)
    rejects = [(i, r, d, None) for i, r, d in decoded.rejects] + pre
    times, rows = decoded.times, decoded.rows
    table = decoded.table
    if validate is not None and len(rows):
        table, times, rows, vrejects = _validate(validate, state, batch, table, times, rows)
        rejects += vrejects
    extra = [c for c in table.column_names if c not in state.decoder.schema_names]
    if extra:
        table = table.drop_columns(extra)
    ts = batch.timestamps[rows]
    future = (ts >= 0) & (times > ts + spec.event_time.max_future)
    if future.any():
        for pos in np.flatnonzero(future).tolist():
            rejects.append(
                (int(rows[pos]), "timestamp_out_of_range",
                 f"event time {int(times[pos])} ms is more than {spec.event_time.max_future} ms after the broker timestamp {int(ts[pos])} ms",
                 None)
            )
        keep = ~future
        table, times, rows = table.filter(pa.array(keep)), times[keep], rows[keep]
    if enrich is not None:
        table, erejects = enrich(table)
        if erejects:
            keep = np.ones(len(rows), bool)
            for pos, reason, detail in erejects:
                rejects.append((int(rows[pos]), reason, detail, None))
                keep[pos] = False
            table, times, rows = table.filter(pa.array(keep)), times[keep], rows[keep]
    if spec.dedup is not None and len(rows):
        # last of the reject stages: only ids of records that are accepted are remembered, so a
        # dead-lettered record that is replayed (or a corrected resend) is not taken as a duplicate
        table, times, rows, drejects = _dedup(spec, state, batch, table, times, rows)
        rejects += drejects
    tenant_field = spec.observability.tenant_field
    if tenant_field is not None:
        result.tenants = tenant_counts(table, tenant_field)
    parts = batch.partitions[rows]
    state.tracker.touch(np.unique(batch.partitions).tolist())
    seen_before = state.tracker.seen(parts)
    prefix = np.maximum(state.tracker.prefix(parts, times, np.ones(len(times), bool)), seen_before)
    numeric_fields = sorted({f for w in state.windows.values() for f in w.store.numeric_fields})
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    r = Rows(times, parts, prefix, columns, _numeric(table, numeric_fields), batch.offsets[rows])
    late_idx, late_window, late_start = [], [], []
    for name, w in state.windows.items():
        lrows, lstarts = w.add(r)
        if len(lrows):
            late_idx.append(lrows)
            late_start.append(lstarts)
            late_window.extend([name] * len(lrows))
    if late_idx:
        li = np.concatenate(late_idx)
        src = rows[li]
        cols = _records(batch, src)
        cols["event_time"] = pa.array(times[li], _TS)
        cols["window"] = pa.array(late_window, pa.string())
        cols["window_start"] = pa.array(np.concatenate(late_start), _TS)
        cols["watermark"] = pa.array(prefix[li], _TS)
        result.late = pa.table(cols, schema=LATE_SCHEMA)
        result.late_records = len(np.unique(li))
    if rejects:
        rejects.sort(key=lambda r: r[0])
        idx = np.array([r[0] for r in rejects], dtype=np.int64)
        cols = _records(batch, idx)
        cols["reason"] = pa.array([r[1] for r in rejects], pa.string())
        cols["detail"] = pa.array([r[2] for r in rejects], pa.string())
        cols["schema"] = pa.array([r[3] for r in rejects], pa.string())
        result.rejects = pa.table(cols, schema=REJECT_SCHEMA)
        result.rejected = len(rejects)
    if len(times):
        result.min_event_time, result.max_event_time = int(times.min()), int(times.max())
    _close(state, result)
    result.watermark = state.tracker.watermark
    return result


def _dedup(spec, state, batch, table, times, rows):
    """Reject records whose event id their partition already accepted within the horizon.

    A record is a duplicate when its id was accepted before in its partition
    and that first delivery's event time is within ``dedup.horizon`` of the
    partition's largest accepted event time before this record. The rule looks
    at the records alone (not at batch boundaries or at when state is pruned),
    and ids whose first time has fallen out of the horizon are pruned: memory
    stays bounded by the horizon, far-future event times included (they move
    the partition's largest event time themselves).
    """
    field = spec.dedup.field
    horizon = spec.dedup.horizon
    ids = table.column(field).to_pylist()
    parts = batch.partitions[rows].tolist()
    offs = batch.offsets[rows].tolist()
    tlist = times.tolist()
    keep = np.ones(len(rows), bool)
    out = []
    running: dict[int, int] = {}  # per partition: largest accepted event time so far
    # per record: the first occurrence in offset order wins, within the batch and across
    # batches; one dict probe each (~0.1 us), and only when dedup is configured
    for i, (eid, p) in enumerate(zip(ids, parts)):
        m = running.get(p)
        if m is None:
            m = state.tracker.max_event.get(p, NEG_INF)
        if eid is not None:  # no id: nothing to compare (a schema can require it)
            eid = str(eid)  # ids are kept as text (checkpoints store them so)
            seen = state.seen.setdefault(p, {})
            first = seen.get(eid)
            if first is not None and first[0] >= m - horizon:
                keep[i] = False
                out.append((int(rows[i]), "duplicate", f"{field} {eid!r} was first delivered at offset {first[1]}", None))
                continue
            seen[eid] = (tlist[i], offs[i])
        running[p] = max(m, tlist[i])
    state._dedup_batches += 1
    if state._dedup_batches % 32 == 0:
        for p, seen in state.seen.items():
            top = max(running.get(p, NEG_INF), state.tracker.max_event.get(p, NEG_INF))
            if top > NEG_INF:
                floor = top - horizon  # such ids can never be matched again: the largest time only grows
                state.seen[p] = {k: v for k, v in seen.items() if v[0] >= floor}
    if not keep.all():
        table, times, rows = table.filter(pa.array(keep)), times[keep], rows[keep]
    return table, times, rows, out


def _validate(validate, state, batch, table, times, rows):
    """Split the decoded rows by schema version and validate each group."""
    versions = batch.schema_versions[rows] if batch.schema_versions is not None else np.full(len(rows), -1, np.int64)
    keep = np.ones(len(rows), bool)
    out = []
    extra = [c for c in table.column_names if c not in state.decoder.schema_names]
    for v in np.unique(versions).tolist():
        pos = np.flatnonzero(versions == v)
        if v == -2:
            for p in pos.tolist():
                out.append((int(rows[p]), "unknown_schema_version", "the schema version header is not a number", None))
            keep[pos] = False
            continue
        try:
            validator, label = validate.default() if v == -1 else validate.get(v)
        except LookupError as exc:
            for p in pos.tolist():
                out.append((int(rows[p]), "unknown_schema_version", str(exc), None))
            keep[pos] = False
            continue
        sub = table if len(pos) == len(rows) else table.take(pa.array(pos))
        raw = [batch.values[int(rows[p])] for p in pos.tolist()]
        for viol in validator.validate(sub, raw, extra):
            p = int(pos[viol.row])
            out.append((int(rows[p]), f"schema_violation:{viol.rule}", viol.detail, label))
            keep[p] = False
    if not keep.all():
        table, times, rows = table.filter(pa.array(keep)), times[keep], rows[keep]
    return table, times, rows, out


def advance(state: PipelineState, to_end: bool = False) -> BatchResult:
    """Re-evaluate the watermark without input (idle partitions) or, at end of input, pass every window."""
    if to_end:
        state.tracker.advance_to_end()
    result = BatchResult()
    _close(state, result)
    result.watermark = state.tracker.watermark
    return result


def describe_watermark(wm: int) -> str:
    if wm <= NEG_INF:
        return "-inf"
    if wm >= POS_INF:
        return "+inf"
    return pc.cast(pa.scalar(wm, pa.int64()), _TS).as_py().isoformat()
