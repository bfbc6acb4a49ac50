"""Replay stored records through the streaming code: the per-partition half of a backfill (no Ray here).

A backfill must write exactly what the streaming run writes for the same records. It does so by running the
very ``PartitionLoop`` of a worker over one partition's records (in offset order, as a bounded run: its output
is a function of the records alone, see README *Semantics*), with the records served from an Arrow table
instead of a Kafka client. Rows of per-partition and Kafka-keyed windows, late records and dead letters are
written by that loop as a worker writes them; merged windows leave it as partial states, which
``merge_partials`` merges for every partition together (the merge owners' code) and writes to the sinks.
"""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa

from pipeline.io.sinks.archive import batches_of, dedup_archive
from pipeline.process import Batch, udf_rejects
from pipeline.spec import PipelineSpec
from pipeline.watermarks import POS_INF

__all__ = ["TableSource", "merge_partials", "replay_partition", "write_rows"]


class TableSource:
    """A ``Source`` over stored records (archive columns) of some partitions, in offset order per partition."""

    def __init__(self, topic: str, table: pa.Table, max_records: int):
        self.topic = topic
        self.table = dedup_archive(table)
        parts = self.table.column("partition").to_numpy()
        offs = self.table.column("offset").to_numpy()
        self.ranges = {int(p): (int(offs[parts == p].min()), int(offs[parts == p].max()) + 1) for p in np.unique(parts)}
        self._batches = iter(batches_of(topic, self.table, max_records))
        self.version_header = None
        self.trace_header = False

    def assign(self, positions: dict[int, int], from_beginning=frozenset()) -> None:
        """Records are served from the first stored one; a position past it would be a resumed run (not a backfill)."""
        for p, o in positions.items():
            first = self.ranges.get(int(p), (0, 0))[0]
            if int(p) not in from_beginning and int(o) > first:
                raise ValueError(f"partition {p}: a replay starts at its first stored offset {first}, not {o}")

    def poll(self, max_records: int, timeout_s: float) -> Batch:
        return next(self._batches, None) or Batch.of(self.topic, [], [], [])

    def commit(self, positions: dict[int, int]) -> None:
        """A backfill commits no offsets."""

    def end_offsets(self, partitions: list[int], timeout_s: float) -> dict[int, int]:
        return {int(p): self.ranges.get(int(p), (0, 0))[1] for p in partitions}

    def offset_range(self, partitions: list[int], timeout_s: float) -> dict[int, tuple[int, int]]:
        return {int(p): self.ranges.get(int(p), (0, 0)) for p in partitions}

    def pause(self) -> None:
        """Nothing is prefetched."""

    def resume(self) -> None:
        """Nothing is prefetched."""

    def close(self) -> None:
        self._batches = iter(())


class _Collect:
    """``merge_out`` of a replayed loop: keeps the partial states (frontiers are not needed: every partition
    ends, so the merge advances them all past the end of input)."""

    def __init__(self):
        self.partials: list[dict[str, dict[str, pa.Table]]] = []

    def __call__(self, partials, _frontiers, _traceparent=None) -> None:
        if partials:
            self.partials.append(partials)


def replay_partition(spec: PipelineSpec, table: pa.Table) -> dict:
    """Run a worker's loop over the stored records of one or more partitions to their end.

    Returns the loop's final status (``status``) and the merged windows' partial states (``partials``, pickled:
    Arrow tables inside) for ``merge_partials``."""
    from pipeline.io.loop import PartitionLoop

    if table.num_rows == 0:
        return {"status": {}, "partials": pickle.dumps([])}
    if spec.source.kafka.max_rate:  # a throttle for live consumption (drills), not for history
        spec = spec.model_copy(update={"source": spec.source.model_copy(update={
            "kafka": spec.source.kafka.model_copy(update={"max_rate": None})})})
    source = TableSource(spec.source.kafka.topic, table, spec.source.kafka.max_batch_records)
    parts = sorted(source.ranges)
    start = {p: r[0] for p, r in source.ranges.items()}
    end = {p: r[1] for p, r in source.ranges.items()}
    collect = _Collect()
    loop = PartitionLoop(spec, parts, start, end, epoch=1, merge_out=collect if spec.merged_windows else None,
                         source=source, worker="backfill")
    status = loop.run(until_end=True)
    return {"status": status, "partials": pickle.dumps(collect.partials)}


def merge_partials(spec: PipelineSpec, partitions: list[int], shipped: list[bytes], owner: int = 0,
                   owners: int = 1) -> tuple[list[pa.Table], list[dict]]:
    """Merge owner ``owner`` of ``owners``: its groups' partials of every partition, merged past the end of input.

    Returns the merged rows (marked as shard ``m<owner>``, as a streaming owner writes them) and the
    user-function failures."""
    from pipeline.identity import with_shard
    from pipeline.merge import Merger, split_by_shard

    merger = Merger(spec, partitions)
    groups = {w.name: list(w.group_by) for w in spec.windows}
    for blob in shipped:
        for partials in pickle.loads(blob):
            for name, tables in partials.items():
                mine = split_by_shard(name, groups[name], tables, owners).get(owner)
                if mine is not None:
                    merger.add(name, mine)
    # every partition ended: each one's frontier is past every window (a partition without records too)
    merger.advance({name: {p: POS_INF for p in partitions} for name in spec.merged_windows})
    rows, failures = merger.close()
    return [with_shard(t, f"m{owner}") for t in rows], failures


def write_rows(spec: PipelineSpec, tables: list[pa.Table], failures: list[dict]) -> int:
    """Write merged rows to every window sink (retrying as a worker does) and user-function failures to the
    dead-letter topic; returns the rows written."""
    from pipeline.io.kafka import DeadLetterProducer
    from pipeline.io.sinks.common import make_sink

    sinks = [make_sink(spec, s) for s in spec.window_sinks]
    try:
        for t in tables:
            for s in sinks:
                s.write_waiting(t)
        if failures:
            dlq = DeadLetterProducer(spec.source.kafka.bootstrap_servers, spec.dead_letter_topic, spec.name)
            try:
                dlq.write(udf_rejects(spec, failures))
            finally:
                dlq.close()
    finally:
        for s in sinks:
            s.close()
    return sum(t.num_rows for t in tables)
