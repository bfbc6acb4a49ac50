"""PartitionLoop: consume a set of partitions, run the core, write the outputs.

This is the whole job of a worker without Ray: the ``PartitionWorker`` actor
wraps one, and ``pipeline.api`` runs one inline (all partitions, no cluster).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline.io.kafka import BrokerUnavailable, DeadLetterProducer, OffsetOutOfRange, make_source
from pipeline.io.sinks.common import Backpressure, make_sink
from pipeline.io.sinks.parquet import LateParquetWriter
from pipeline.checkpoint import decode_partition, encode_partition, restore_partition
from pipeline.identity import shard_of_table, with_shard
from pipeline.metrics import LoopMetrics, Metrics
from pipeline.tracing import make_tracer
from pipeline.process import Batch, BatchResult, PipelineState, advance, process_batch, udf_rejects
from pipeline.spec import PipelineSpec
from pipeline.watermarks import NEG_INF, POS_INF

__all__ = ["Fenced", "HeldOutput", "LoopStats", "PartitionLoop", "resolve_positions"]


log = logging.getLogger("raystream.worker")


class Fenced(RuntimeError):
    """The loop's epoch is stale: another worker owns its partitions now."""


class HeldOutput(RuntimeError):
    """A checkpoint was asked for while a resumed loop holds window output back (see ``PartitionLoop``)."""


@dataclass
class LoopStats:
    """Counters of one loop; every record is accepted, late or rejected."""

    records: int = 0
    rejected: int = 0
    late: int = 0
    udf_errors: int = 0
    sink_retries: int = 0
    held_partitions: int = 0  # partitions replaying output a crashed owner may have written (held back)
    held_rows: int = 0  # window rows held back during that replay (only the highest revision is written)
    offset_resets: int = 0  # checkpointed positions the broker no longer had, moved by the spec's policy
    records_skipped: int = 0  # records those moves skipped (deleted by retention before they were read)
    redelivered: int = 0  # records the client delivered again below the position (dropped: processed once)
    store_wait_s: float = 0.0  # time spent waiting on failing sinks (backpressure)
    backpressure_pauses: int = 0  # times a failing sink paused fetching  # records of window groups whose user function raised (dead-lettered, still in the windows)
    windows_emitted: int = 0
    files_written: int = 0
    batches: int = 0
    busy_s: float = 0.0
    throttled_s: float = 0.0
    run_s: float = 0.0
    consume_s: float = 0.0
    process_s: float = 0.0
    write_s: float = 0.0
    started: float = field(default_factory=time.time)
    min_event_time: int | None = None
    max_event_time: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PartitionLoop:
    """Owns one source (a set of partitions), the window state and the writers."""

    def __init__(
        self,
        spec: PipelineSpec,
        partitions: list[int],
        start_offsets: dict[int, int] | None = None,
        end_offsets: dict[int, int] | None = None,
        epoch: int = 0,
        snapshots: dict[int, bytes] | None = None,
        fence: Callable[[], bool] | None = None,
        resumed: bool = False,
        merge_out: Callable[[dict, dict, str | None], None] | None = None,
        merge_snapshots: list[bytes] | None = None,
        all_partitions: list[int] | None = None,
        metrics=None,
        worker: str = "0",
        source=None,
    ):
        """``resumed``: this loop takes over partitions whose previous owner may have written output past
        their start positions (it crashed, or the run was killed); their window output is held back until
        they pass the broker's end offset as of now (see ``_hold``).

        Merged windows ship their partial states with ``merge_out(partials, frontiers, traceparent)`` (the merge owners);
        without it this loop merges them itself (one owner: it must hold every partition of the topic,
        ``all_partitions``), restored from ``merge_snapshots`` (one per owner of the run that wrote them).

        ``metrics`` (a ``pipeline.metrics.Metrics``) receives this loop's series, labelled ``worker``.
        ``source``: records from somewhere else than Kafka (a ``Source``; backfills replay stored records)."""
        self.spec = spec
        obs = spec.observability
        self.metrics = LoopMetrics(metrics or Metrics(), spec.name, worker, obs.tenant_field, obs.max_tenants)
        self.partitions = sorted(int(p) for p in partitions)
        self.epoch = epoch
        self.positions = {p: int((start_offsets or {}).get(p, 0)) for p in self.partitions}
        self.end_offsets = {int(p): int(o) for p, o in end_offsets.items()} if end_offsets is not None else None
        self.fence = fence
        self.fenced = False
        self.validation = None
        schema_fields, keep_unexpected = None, False
        if spec.validate_ is not None:
            from pipeline.io.validation import SchemaSource

            self.validation = SchemaSource(spec)
            default = self.validation.default()[0]
            schema_fields, keep_unexpected = default.decoder_fields(), default.closed
        self.state = PipelineState(spec, [p for p in self.partitions if p not in (snapshots or {})],
                                   schema_fields=schema_fields, keep_unexpected=keep_unexpected)
        if spec.source.kafka.format == "protobuf":
            self.state.decoder.proto_class = self.validation.message_class()
        self.restored_slots = 0
        for p, data in (snapshots or {}).items():
            snap = decode_partition(data)
            if int(snap.meta["partition"]) != int(p):
                raise ValueError(f"checkpoint for partition {snap.meta['partition']} given as partition {p}")
            self.restored_slots += restore_partition(self.state, snap)
            self.positions[int(p)] = snap.offset
        self.sinks = [make_sink(spec, s) for s in spec.window_sinks]
        self.archives = [make_sink(spec, s) for s in spec.archives]  # accepted raw records, before their windows
        self.merge_out = merge_out
        self.local_merge = None
        if spec.merged_windows and merge_out is None:
            from pipeline.checkpoint import decode_merge
            from pipeline.merge import LocalMerge

            parts = sorted(all_partitions or self.partitions)
            self.local_merge = LocalMerge(spec, parts)
            if merge_snapshots and len(merge_snapshots) == 1:
                decode_merge(merge_snapshots[0], self.local_merge.merger)
            elif merge_snapshots:  # written by several owners: every group comes here
                from pipeline.merge import reshard

                self.local_merge.merger = reshard(spec, parts, merge_snapshots, 0, 1, decode_merge)
        self.local_windows = {w.name for w in spec.windows if spec.window_mode(w.name) == "local"}
        self.late_writer = LateParquetWriter(spec, spec.late_output.parquet) if spec.late_output else None
        kafka = spec.source.kafka
        self.dlq = DeadLetterProducer(kafka.bootstrap_servers, spec.dead_letter_topic, spec.name)
        self.enrichment = None
        if spec.enrich:
            from pipeline.io.lookups import Enrichment

            self.enrichment = Enrichment(spec)
            for runtime in self.enrichment.runtimes:
                runtime.on_wait = self._backpressure  # a lookup store outage pauses the partitions like a sink's
            self.enrichment.warm()
        self.source = source if source is not None else make_source(kafka, spec.group_id)
        self.tracer = make_tracer(spec.observability.tracing, "raystream-worker")
        self._last_trace: str | None = None  # traceparent of the last traced batch
        self._last_frontiers: dict | None = None
        self.source.trace_header = self.tracer.enabled
        self.paused = False
        self.store_wait: dict | None = None  # while a sink write is retried: which, since when, why
        self._store_retry = threading.Event()  # waited on between attempts of a failing sink (never set)
        if self.validation is not None:
            self.source.version_header = spec.validate_.version_header
        self.stats = LoopStats()
        # a partition without a checkpoint starts at the earliest offset the broker still has; a
        # checkpointed position must still be there (retention may have deleted it): see resolve_positions
        fresh = {p for p in self.partitions if p not in (snapshots or {}) and self.positions[p] == 0}
        restored = [p for p in self.partitions if p not in fresh]
        if restored:
            ranges = self.source.offset_range(restored, kafka.connect_timeout / 1000.0)
            moved, self.offset_resets = resolve_positions({p: self.positions[p] for p in restored}, ranges,
                                                          kafka.on_offset_out_of_range, kafka.topic)
            self.positions.update(moved)
            self.stats.offset_resets = len(self.offset_resets)
            self.stats.records_skipped = sum(r["skipped"] for r in self.offset_resets)
        else:
            self.offset_resets = []
        self.source.assign(self.positions, fresh)
        self._log = {"pipeline": spec.name, "worker": worker}
        for r in self.offset_resets:
            log.warning("partition %s: checkpointed offset no longer on the broker, moved by policy: %s", r.get("partition"),
                        r, extra={**self._log, "partition": r.get("partition")})
        log.info("consuming partitions %s from %s (epoch %s, %d slots restored)", self.partitions, self.positions, epoch,
                 self.restored_slots, extra={**self._log, "partition": self.partitions, "epoch": epoch})
        # Revisions never go backwards in a sink: a replay re-emits, in order, revisions the previous owner
        # already wrote (and maybe raised since). Closed windows are held back while the positions are below
        # the end offset as of now (which the previous owner cannot have passed), then only the highest
        # revision of each window is written. No checkpoint is taken meanwhile (it would lose the held rows).
        self.hold_until: dict[int, int] = {}
        self._held: list = []
        if resumed and self.partitions:
            ends = self.source.end_offsets(self.partitions, kafka.connect_timeout / 1000.0)
            unknown = [p for p in self.partitions if p not in ends]
            if unknown:  # the worker fails and is started again: never resume without knowing where to hold
                raise BrokerUnavailable(f"cannot read the end offsets of partitions {unknown} to resume them")
            for p in self.partitions:
                until = ends[p]
                if self.end_offsets is not None:
                    until = min(until, self.end_offsets.get(p, 0))
                if self.positions[p] < until:
                    self.hold_until[p] = until
            self.stats.held_partitions = len(self.hold_until)
        self._stop = threading.Event()
        self._requests: list[tuple[Callable[[], object], "Future"]] = []
        self._requests_lock = threading.Lock()
        self.drained = False
        self._running = False
        self.first_batch_at: float | None = None
        # lookahead: with enrichers, the next poll is taken before this batch is processed so that
        # its lookups (Redis, PostgreSQL) overlap this batch's processing; it only warms caches
        self._ahead: Batch | None = None
        self.lookahead = self.enrichment is not None and kafka.format == "json"
        self.max_rss = _rss_bytes()
        self._backlog_checked = float("-inf")
        if self.end_offsets is not None:
            for p in self.partitions:
                if self.positions[p] >= self.end_offsets.get(p, 0):
                    self.state.tracker.finish(p)

    # -- one step -----------------------------------------------------------
    def poll_once(self) -> BatchResult:
        """Poll one batch, process it and write its outputs; positions advance last."""
        kafka = self.spec.source.kafka
        tp = time.perf_counter()
        if self._ahead is not None:
            batch, self._ahead = self._ahead, None
        else:
            batch = self.source.poll(kafka.max_batch_records, kafka.poll_timeout / 1000.0)
        seen = batch.below(self.positions)
        if seen.any():
            # a client may deliver records again after pause/resume (librdkafka races): each offset is processed once
            self.stats.redelivered += int(seen.sum())
            log.warning("%d records delivered again below the position were dropped", int(seen.sum()),
                        extra={**self._log, "partition": sorted(set(batch.partitions[seen].tolist()))})
            batch = batch.take(np.flatnonzero(~seen))
        if self.lookahead and len(batch) and not self.paused:
            # only what already arrived (no wait); positions advance only when it is processed,
            # so a checkpoint or a stop before that simply reads it again
            nxt = self.source.poll(kafka.max_batch_records, 0.0)
            if len(nxt):
                self._ahead = nxt
                self.enrichment.prefetch(nxt.values)
        t0 = time.perf_counter()
        traced = self.tracer.enabled and len(batch)
        with (self.tracer.span("batch", {"raystream.pipeline": self.spec.name, "raystream.worker": self._log["worker"],
                                         "raystream.records": len(batch)}, links=batch.traceparents or (), kind="consumer")
              if traced else contextlib.nullcontext()) as span:
            result = process_batch(self.spec, self.state, batch, self.enrichment, self.validation)
            t1 = time.perf_counter()
            if self.archives and len(batch):
                from pipeline.io.sinks.archive import accepted_records

                accepted = accepted_records(batch, result.rejects)
                for archive in self.archives:
                    self._write_sink(archive, accepted)  # an outage is backpressure; _write below resumes the partitions
            if self.tracer.enabled and not len(batch) and self._last_trace and self._emits(result):
                # windows closed by time alone (idle partitions): their spans link to the last traced batch
                with self.tracer.span("watermark advance", {"raystream.pipeline": self.spec.name},
                                      links=[self._last_trace]):
                    self._write(result)
            else:
                self._write(result)
            if span is not None:
                span.set_attributes({"raystream.rejected": result.rejected, "raystream.late": result.late_records,
                                     "raystream.partitions": sorted(set(batch.partitions.tolist()))})
                self._last_trace = self.tracer.current() or self._last_trace
        if len(batch) and self.first_batch_at is None:
            self.first_batch_at = time.time()
        if len(batch):
            self.stats.consume_s += t0 - tp
            self.stats.process_s += t1 - t0
            self.stats.write_s += time.perf_counter() - t1
        if len(batch):
            for p in np.unique(batch.partitions).tolist():
                self.positions[p] = max(self.positions.get(p, 0), int(batch.offsets[batch.partitions == p].max()) + 1)
            self._finish_reached()
            self._release_held()
        self._check_backlog()
        self.stats.records += result.records
        self.stats.rejected += result.rejected
        self.stats.late += result.late_records
        self.stats.batches += 1 if len(batch) else 0
        if result.min_event_time is not None:
            lo, hi = self.stats.min_event_time, self.stats.max_event_time
            self.stats.min_event_time = result.min_event_time if lo is None else min(lo, result.min_event_time)
            self.stats.max_event_time = result.max_event_time if hi is None else max(hi, result.max_event_time)
        self.stats.busy_s += time.perf_counter() - t0 if len(batch) else 0.0
        if self.stats.batches % 16 == 1:
            self.max_rss = max(self.max_rss, _rss_bytes())
        if self.metrics.enabled:
            self._record(batch, result, time.perf_counter() - t0)
        if kafka.max_rate and len(batch):
            # throttle: this batch may take no less than len / max_rate seconds
            rest = len(batch) / kafka.max_rate - (time.perf_counter() - tp)
            if rest > 0:
                self._stop.wait(rest)
                self.stats.throttled_s += rest  # at its max_rate the worker is saturated: autoscaling counts it busy
        return result

    def _emits(self, result: BatchResult) -> bool:
        """Whether writing ``result`` may emit windows (closed tables, partials, or frontiers that moved)."""
        moved = bool(result.frontiers) and result.frontiers != self._last_frontiers
        if result.frontiers:
            self._last_frontiers = result.frontiers
        return bool(result.closed or result.partials) or moved

    def _record(self, batch, result: BatchResult, seconds: float) -> None:
        m = self.metrics
        if len(batch):
            m.batch(batch.partitions, result, seconds, self.late_writer is None, result.tenants)
        wm = self.state.tracker.watermark
        m.watermark(None if wm <= NEG_INF or wm >= POS_INF else int(wm), self.state.open_windows, self.max_rss)
        if m.lag_due():
            if self.end_offsets is not None:
                ends = {p: self.end_offsets.get(p, 0) for p in self.partitions}
            else:
                try:
                    ends = self.source.end_offsets(self.partitions, 1.0)
                except Exception:  # broker away: the lag is unknown, not zero
                    ends = {}
            m.lag(ends, self.positions)
            if self.enrichment is not None:
                m.enrich(self.enrichment.stats())

    def _finish_reached(self) -> None:
        if self.end_offsets is None:
            return
        for p in self.partitions:
            if p not in self.state.tracker.finished and self.positions[p] >= self.end_offsets.get(p, 0):
                self.state.tracker.finish(p)

    def _write_sink(self, sink, table) -> int:
        """Write ``table`` to ``sink``; each ``Backpressure`` pauses the partitions, is reported, and waited out."""
        while True:
            try:
                t0 = time.perf_counter()
                written = sink.write(table)
                self.metrics.sink_write(sink.name, time.perf_counter() - t0)
                return written
            except Backpressure as bp:
                self._backpressure(bp.store, bp.attempt, bp.error, bp.since)
                self._store_retry.wait(bp.delay_s)

    def _release_held(self) -> None:
        """Write the held windows (highest revision each) once every held partition passed its end offset."""
        if not self.hold_until:
            return
        if any(self.positions[p] < e for p, e in self.hold_until.items()):
            return
        self.hold_until = {}
        held, self._held = _highest_revisions(self.spec, self._held), []
        if held:
            self._write(BatchResult(closed=held))

    def _check_backlog(self) -> None:
        """Confirm quiet partitions as caught up when their position reached the broker's end offset.

        Only such a partition may become idle (see ``pipeline.watermarks``).
        A bounded run never asks: its unfinished partitions have a backlog by
        definition, and finished ones stop holding the watermark anyway. The
        broker is asked at most once a second, and only about quiet partitions;
        a partition it does not answer for keeps holding the watermark.
        """
        if self.end_offsets is not None:
            return
        tracker = self.state.tracker
        candidates = [p for p in self.partitions if tracker.quiet(p) and not tracker.idle(p)]
        now = time.monotonic()
        if not candidates or now - self._backlog_checked < 1.0:
            return
        self._backlog_checked = now
        asked_at = tracker.clock()
        ends = self.source.end_offsets(candidates, 2.0)
        for p in candidates:
            if p in ends and self.positions[p] >= ends[p]:
                tracker.caught_up(p, asked_at)

    def _backpressure(self, store: str, attempt: int, exc: BaseException, since: float) -> None:
        """A sink write or a lookup is being retried: pause fetching and say so in the heartbeat (``store_wait``)."""
        self.store_wait = {"store": store, "since": time.time() - (time.monotonic() - since), "attempts": attempt,
                          "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        self.stats.sink_retries += 1
        self.metrics.store_wait(store)
        if attempt == 1:
            log.warning("waiting on %s (attempt %d): %s; partitions paused", store, attempt, self.store_wait["error"],
                        extra={**self._log, "store": store, "partition": self.partitions})
        if not self.paused:
            try:
                self.source.pause()
                self.paused = True
                self.stats.backpressure_pauses += 1
            except Exception:  # a client that cannot pause still does not poll while we wait
                pass

    def _write(self, result: BatchResult) -> None:
        try:
            self._write_all(result)
        finally:
            if self.store_wait is not None:
                waited = time.time() - self.store_wait["since"]
                self.stats.store_wait_s += waited
                self.metrics.store_back(self.store_wait["store"], waited)
                log.info("%s is back after %.1fs; partitions resumed", self.store_wait["store"], waited,
                         extra={**self._log, "store": self.store_wait["store"]})
                self.store_wait = None
            if self.paused:
                try:
                    self.source.resume()
                except Exception:  # the next poll reports a broken client
                    pass
                self.paused = False

    def _write_all(self, result: BatchResult) -> None:
        if self.fence is not None and (result.closed or result.late is not None or result.rejects is not None
                                       or result.udf_failures is not None or result.partials):
            if not self.fence():
                # this loop's partitions were given to another worker (a newer epoch):
                # it must not write anything any more
                self.fenced = True
                self._stop.set()
                log.warning("epoch %s is stale: partitions %s were reassigned; writing nothing", self.epoch,
                            self.partitions, extra={**self._log, "epoch": self.epoch})
                raise Fenced(f"epoch {self.epoch} is stale: partitions {self.partitions} were reassigned")
        closed = self._shards(result.closed)
        if result.partials or result.frontiers:
            if self.merge_out is not None:  # partials first, then frontiers, in order; the owner's spans follow ours
                self.merge_out(result.partials, result.frontiers, self.tracer.current())
            elif self.local_merge is not None:
                merged, failures = self.local_merge.feed(result.partials, result.frontiers)
                closed += [with_shard(t, "m0") for t in merged]
                if failures:
                    self.stats.udf_errors += len(failures)
                    self.dlq.write(udf_rejects(self.spec, failures))
        if self.hold_until and closed:
            self._held += closed
            self.stats.held_rows += sum(t.num_rows for t in closed)
            closed = []
            if len(self._held) > 256:
                self._held = _highest_revisions(self.spec, self._held)
        for table in closed:
            self.stats.windows_emitted += table.num_rows
            window = table.column("window")[0].as_py() if table.num_rows else None
            if self.metrics.enabled and table.num_rows:
                self.metrics.emitted(window, table)
            with self.tracer.span("window emit", {"raystream.window": window, "raystream.rows": table.num_rows}):
                for sink in self.sinks:
                    with self.tracer.span("sink write", {"raystream.sink": sink.name, "raystream.rows": table.num_rows}):
                        self.stats.files_written += self._write_sink(sink, table)
        if result.late is not None:
            if self.late_writer is not None:
                self.late_writer.write(result.late)
            else:
                self.dlq.write(_late_as_rejects(result.late))
        if result.rejects is not None:
            self.dlq.write(result.rejects)
        if result.udf_failures is not None:
            self.stats.udf_errors += result.udf_failures.num_rows
            self.dlq.write(result.udf_failures)

    def _flush_merge(self) -> None:
        flush = getattr(self.merge_out, "flush", None)
        if flush is not None:
            flush()

    def _shards(self, tables: list) -> list:
        """Rows of windows grouped by the Kafka key lose ``partition`` (each group lives in one partition);
        they are written per source partition as one shard each."""
        if not self.local_windows:
            return list(tables)
        out = []
        for t in tables:
            if t.column("window")[0].as_py() not in self.local_windows or "partition" not in t.column_names:
                out.append(t)
                continue
            parts = t.column("partition").to_numpy()
            for p in np.unique(parts).tolist():
                piece = t.filter(pa.array(parts == p)).drop_columns(["partition"])
                out.append(with_shard(piece, f"p{int(p)}"))
        return out

    # -- whole runs -----------------------------------------------------------
    @property
    def done(self) -> bool:
        """A bounded run is done when every partition reached its end offset (a polled-ahead batch past it is dropped)."""
        return self.end_offsets is not None and all(
            self.positions[p] >= self.end_offsets.get(p, 0) for p in self.partitions
        )

    def run(self, until_end: bool = False, finish: bool = True) -> dict:
        """Loop until stopped (or, with ``until_end``, until every end offset is reached).

        Steps, in order: poll and process batches (answering checkpoint
        requests between batches); emit what the watermark allows; with
        ``finish`` (the default), ``finish()``: at the end of input move the
        watermark past every window and write them, then close the clients.
        Without it the loop stays *drained*: a final checkpoint can be taken
        before ``finish``.
        """
        t0 = time.perf_counter()
        ok = False
        with self._requests_lock:
            self._running = True
        try:
            while not self._stop.is_set():
                self._answer_requests()
                if until_end and self.done:
                    break
                self.poll_once()
            self._answer_requests()
            self._write(advance(self.state))
            self._flush_merge()
            self.max_rss = max(self.max_rss, _rss_bytes())
            self.stats.run_s = time.perf_counter() - t0
            self.drained = True
            ok = True
        finally:
            with self._requests_lock:
                self._running = False
            if not ok or finish:
                self._fail_requests()
                if ok:
                    self.finish(until_end and self.done)
                else:
                    self.close()
        return self.status()

    def finish(self, to_end: bool) -> dict:
        """After ``run(finish=False)``: flush every window at the end of input (``to_end``), close the clients."""
        try:
            if to_end:
                self._write(advance(self.state, to_end=True))
            self._flush_merge()
            st = self.status()
            log.info("finished: %d records (%d rejected, %d late), %d window rows written", st["records"], st["rejected"],
                     st["late"], st["windows_emitted"], extra={**self._log, "partition": self.partitions})
            return st
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def open_windows_rows(self, window: str, filters: dict[str, str], timeout_s: float = 10.0) -> list[dict]:
        """Rows of the windows still open in this loop (queryable state), read between batches."""
        from pipeline.io.sinks.common import row_dicts
        from pipeline.windows import open_rows

        w = self.state.windows.get(window)
        if w is None:
            raise KeyError(f"no window {window!r}")
        table = self.call_between_batches(lambda: open_rows(w, filters), timeout_s)
        return row_dicts(table) if table is not None else []

    # -- checkpoints --------------------------------------------------------
    def snapshot(self, checkpoint_id: int, write: Callable[[int, bytes], str]) -> dict[int, dict]:
        """Snapshot every partition (between batches) and store it with ``write(partition, data) -> path``.

        Refused while window output is held back after a resume: the state no
        longer holds those windows, so the checkpoint would lose them (the
        previous checkpoint stays the latest for these partitions)."""
        if self.hold_until:
            behind = {p: (self.positions[p], e) for p, e in self.hold_until.items() if self.positions[p] < e}
            raise HeldOutput(f"replaying output written before the restart, no checkpoint until partitions pass their end "
                             f"offsets (position, end): {behind}")
        self._flush_merge()  # every partial shipped so far is in the merge owners before they are snapshotted
        out = {}
        for p in self.partitions:
            data = encode_partition(self.state, p, self.positions[p], self.epoch, checkpoint_id)
            out[p] = {"offset": self.positions[p], "epoch": self.epoch, "path": write(p, data), "bytes": len(data),
                      "watermark": self.state.tracker.effective.get(p)}
        return out

    def snapshot_merge(self, checkpoint_id: int, write: Callable[[bytes], str]) -> dict | None:
        """The local merge's state (between batches, after ``snapshot``); None when this loop merges nothing."""
        if self.local_merge is None:
            return None
        from pipeline.checkpoint import encode_merge

        data = encode_merge(self.local_merge.merger, 0, checkpoint_id)
        return {"path": write(data), "bytes": len(data)}

    def call_between_batches(self, fn: Callable[[], object], timeout_s: float) -> object:
        """Run ``fn`` in the loop thread between two batches (directly when the loop is not running)."""
        if not self._running:
            return fn()
        fut: Future = Future()
        with self._requests_lock:
            queued = self._running
            if queued:
                self._requests.append((fn, fut))
        if not queued:
            return fn()
        return fut.result(timeout=timeout_s)

    def _answer_requests(self) -> None:
        with self._requests_lock:
            reqs, self._requests = self._requests, []
        for fn, fut in reqs:
            try:
                fut.set_result(fn())
            except Exception as exc:  # handed to the caller, which decides
                fut.set_exception(exc)

    def _fail_requests(self) -> None:
        with self._requests_lock:
            reqs, self._requests = self._requests, []
        for _, fut in reqs:
            fut.set_exception(RuntimeError("the loop stopped before answering"))

    def close(self) -> None:
        self.metrics.close()
        closers = [self.source.close, self.dlq.close, *(s.close for s in [*self.sinks, *self.archives])]
        if self.enrichment is not None:
            closers.append(self.enrichment.close)
        for closer in closers:
            try:
                closer()
            except Exception:  # closing a client that lost its broker must not hide the real error
                pass

    def status(self) -> dict:
        wm = self.state.tracker.watermark
        lag = None
        if self.end_offsets is not None:
            lag = int(sum(max(0, self.end_offsets.get(p, 0) - self.positions[p]) for p in self.partitions))
        return {
            "partitions": self.partitions,
            "positions": dict(self.positions),
            "end_offsets": dict(self.end_offsets) if self.end_offsets is not None else None,
            "lag": lag,
            "watermark": None if wm <= NEG_INF or wm >= POS_INF else int(wm),
            "watermark_end": wm >= POS_INF,
            "open_windows": self.state.open_windows,
            "rss_bytes": _rss_bytes(),
            "max_rss_bytes": self.max_rss,
            "pid": os.getpid(),
            "epoch": self.epoch,
            "drained": self.drained,
            "fenced": self.fenced,
            "restored_slots": self.restored_slots,
            "first_batch_at": self.first_batch_at,
            "store_wait": dict(self.store_wait) if self.store_wait is not None else None,
            "offset_reset_detail": list(self.offset_resets),
            "holding": {int(p): int(e) for p, e in self.hold_until.items()},
            "enrich": self.enrichment.stats() if self.enrichment is not None else {},
            **self.stats.as_dict(),
        }


def _highest_revisions(spec: PipelineSpec, tables: list) -> list:
    """Per window: one table with the highest revision of each window identity among ``tables``."""
    import pyarrow as pa

    from pipeline.identity import identity_columns

    by_window: dict[tuple[str, str], list] = {}
    for t in tables:
        if t.num_rows:
            by_window.setdefault((t.column("window")[0].as_py(), shard_of_table(t)), []).append(t)
    out = []
    for (window, shard), ts in by_window.items():
        table = pa.concat_tables(ts)
        df = table.to_pandas()
        # a handful of closed-window rows (one per group and window): pandas is the simple, null-safe tool
        df = df.sort_values("revision", kind="stable").drop_duplicates(identity_columns(spec, window), keep="last")
        out.append(with_shard(pa.Table.from_pandas(df, schema=table.schema, preserve_index=False), shard))
    return out


def resolve_positions(positions: dict[int, int], ranges: dict[int, tuple[int, int]], policy: str,
                      topic: str) -> tuple[dict[int, int], list[dict]]:
    """Check checkpointed positions against the broker's (earliest, end) offsets.

    A position below the earliest offset lost records to retention; one past
    the end belongs to another life of the topic. With ``policy`` ``fail``
    raise ``OffsetOutOfRange`` naming every such partition and its lost range;
    with ``earliest`` / ``latest`` move there and return each move (partition,
    from, to, records skipped) so it is counted and reported, never silent.
    """
    moved, resets, problems = {}, [], []
    for p, pos in sorted(positions.items()):
        low, high = ranges[p]
        if low <= pos <= high:
            continue
        if pos < low:
            what = f"{topic}[{p}]: checkpointed offset {pos} was deleted (the broker keeps {low}..{high}); records {pos}..{low - 1} are lost"
        else:
            what = f"{topic}[{p}]: checkpointed offset {pos} is past the end offset {high} (was the topic recreated?)"
        if policy == "fail":
            problems.append(what)
            continue
        to = low if policy == "earliest" else high
        moved[p] = to
        resets.append({"partition": p, "from": pos, "to": to, "skipped": max(0, to - pos), "reason": what})
    if problems:
        raise OffsetOutOfRange("; ".join(problems) + " (source.kafka.on_offset_out_of_range: fail; set earliest or latest "
                               "to move on, counting what is skipped)")
    return moved, resets


def _late_as_rejects(late):
    """Without a late output, late records go to the dead-letter topic with reason ``late``."""
    import pyarrow as pa

    from pipeline.process import REJECT_SCHEMA

    n = late.num_rows
    cols = {name: late.column(name) for name in ("topic", "partition", "offset", "timestamp", "key", "value")}
    cols["reason"] = pa.array(["late"] * n, pa.string())
    cols["schema"] = pa.nulls(n, pa.string())
    cols["detail"] = pa.array(
        [f"window {w} starting {s} closed (watermark {m})" for w, s, m in zip(
            late.column("window").to_pylist(), late.column("window_start").to_pylist(), late.column("watermark").to_pylist())],
        pa.string(),
    )
    return pa.table(cols, schema=REJECT_SCHEMA)
