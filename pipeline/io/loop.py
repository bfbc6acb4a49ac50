"""PartitionLoop: consume a set of partitions, run the core, write the outputs.

This is the whole job of a worker without Ray: the ``PartitionWorker`` actor
wraps one, and ``pipeline.api`` runs one inline (all partitions, no cluster).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.io.kafka import DeadLetterProducer, make_source
from pipeline.io.sinks.common import make_sink
from pipeline.io.sinks.parquet import LateParquetWriter
from pipeline.process import BatchResult, PipelineState, advance, process_batch
from pipeline.spec import PipelineSpec
from pipeline.watermarks import NEG_INF, POS_INF

__all__ = ["LoopStats", "PartitionLoop"]


@dataclass
class LoopStats:
    """Counters of one loop; every record is accepted, late or rejected."""

    records: int = 0
    rejected: int = 0
    late: int = 0
    windows_emitted: int = 0
    files_written: int = 0
    batches: int = 0
    busy_s: float = 0.0
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
    ):
        self.spec = spec
        self.partitions = sorted(int(p) for p in partitions)
        self.epoch = epoch
        self.positions = {p: int((start_offsets or {}).get(p, 0)) for p in self.partitions}
        self.end_offsets = {int(p): int(o) for p, o in end_offsets.items()} if end_offsets is not None else None
        self.state = PipelineState(spec, self.partitions)
        self.sinks = [make_sink(spec, s) for s in spec.sinks]
        self.late_writer = LateParquetWriter(spec, spec.late_output.parquet) if spec.late_output else None
        kafka = spec.source.kafka
        self.dlq = DeadLetterProducer(kafka.bootstrap_servers, spec.dead_letter_topic, spec.name)
        self.enrichment = None
        if spec.enrich:
            from pipeline.io.lookups import Enrichment

            self.enrichment = Enrichment(spec)
            self.enrichment.warm()
        self.source = make_source(kafka, spec.group_id)
        self.source.assign(self.positions)
        self.stats = LoopStats()
        self._stop = threading.Event()
        self.max_rss = _rss_bytes()
        if self.end_offsets is not None:
            for p in self.partitions:
                if self.positions[p] >= self.end_offsets.get(p, 0):
                    self.state.tracker.finish(p)

    # -- one step -----------------------------------------------------------
    def poll_once(self) -> BatchResult:
        """Poll one batch, process it and write its outputs; positions advance last."""
        kafka = self.spec.source.kafka
        tp = time.perf_counter()
        batch = self.source.poll(kafka.max_batch_records, kafka.poll_timeout / 1000.0)
        t0 = time.perf_counter()
        result = process_batch(self.spec, self.state, batch, self.enrichment)
        t1 = time.perf_counter()
        self._write(result)
        if len(batch):
            self.stats.consume_s += t0 - tp
            self.stats.process_s += t1 - t0
            self.stats.write_s += time.perf_counter() - t1
        if len(batch):
            for p in np.unique(batch.partitions).tolist():
                self.positions[p] = max(self.positions.get(p, 0), int(batch.offsets[batch.partitions == p].max()) + 1)
            self._finish_reached()
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
        return result

    def _finish_reached(self) -> None:
        if self.end_offsets is None:
            return
        for p in self.partitions:
            if p not in self.state.tracker.finished and self.positions[p] >= self.end_offsets.get(p, 0):
                self.state.tracker.finish(p)

    def _write(self, result: BatchResult) -> None:
        for table in result.closed:
            self.stats.windows_emitted += table.num_rows
            for sink in self.sinks:
                self.stats.files_written += sink.write(table)
        if result.late is not None:
            if self.late_writer is not None:
                self.late_writer.write(result.late)
            else:
                self.dlq.write(_late_as_rejects(result.late))
        if result.rejects is not None:
            self.dlq.write(result.rejects)

    # -- whole runs -----------------------------------------------------------
    @property
    def done(self) -> bool:
        """A bounded run is done when every partition reached its end offset."""
        return self.end_offsets is not None and all(
            self.positions[p] >= self.end_offsets.get(p, 0) for p in self.partitions
        )

    def run(self, until_end: bool = False) -> dict:
        """Loop until stopped (or, with ``until_end``, until every end offset is reached).

        Steps, in order: poll and process batches; at the end of input move the
        watermark past every window and write them; close the clients.
        """
        t0 = time.perf_counter()
        try:
            while not self._stop.is_set():
                if until_end and self.done:
                    break
                self.poll_once()
            if until_end and self.done:
                self._write(advance(self.state, to_end=True))
            else:
                self._write(advance(self.state))
            self.max_rss = max(self.max_rss, _rss_bytes())
            self.stats.run_s = time.perf_counter() - t0
            return self.status()
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        closers = [self.source.close, self.dlq.close, *(s.close for s in self.sinks)]
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
            "enrich": self.enrichment.stats() if self.enrichment is not None else {},
            **self.stats.as_dict(),
        }


def _late_as_rejects(late):
    """Without a late output, late records go to the dead-letter topic with reason ``late``."""
    import pyarrow as pa

    from pipeline.process import REJECT_SCHEMA

    n = late.num_rows
    cols = {name: late.column(name) for name in ("topic", "partition", "offset", "timestamp", "key", "value")}
    cols["reason"] = pa.array(["late"] * n, pa.string())
    cols["detail"] = pa.array(
        [f"window {w} starting {s} closed (watermark {m})" for w, s, m in zip(
            late.column("window").to_pylist(), late.column("window_start").to_pylist(), late.column("watermark").to_pylist())],
        pa.string(),
    )
    return pa.table(cols, schema=REJECT_SCHEMA)
