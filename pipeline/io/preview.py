"""``Pipeline.preview``: the spec's windows over the last records of the topic, with no side effect (no Ray).

The records are read with the worker's Kafka client under a group that never commits; they go through the
same decode, validation, enrichment and windowing code as a run, as a bounded run over the last records of
each partition (so its windows are those a run starting there would write), and every window is flushed at the
end. Nothing is written: no sink, no dead letter, no late output, no offset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.io.kafka import make_source
from pipeline.io.sinks.archive import accepted_records, batches_of
from pipeline.process import PipelineState, advance, process_batch
from pipeline.spec import PipelineSpec

__all__ = ["Preview", "last_records", "preview"]


def last_records(spec: PipelineSpec, n: int, timeout_s: float = 30.0) -> pa.Table:
    """The last ``n`` records of the topic by broker time (ties: partition, offset), as archive columns; each
    partition's share is a contiguous run up to its end offset."""
    kafka = spec.source.kafka
    src = make_source(kafka, "raystream-preview")  # assigned by hand, never commits: the group stays untouched
    if spec.validate_ is not None:
        src.version_header = spec.validate_.version_header  # records carry their schema version as in a run
    try:
        from pipeline.io.kafka import topic_partitions

        parts = topic_partitions(kafka.bootstrap_servers, kafka.topic, kafka.connect_timeout / 1000.0)
        ranges = src.offset_range(parts, kafka.connect_timeout / 1000.0)
        start = {p: max(lo, hi - n) for p, (lo, hi) in ranges.items()}
        want = {p for p, (lo, hi) in ranges.items() if hi > start[p]}
        src.assign({p: start[p] for p in parts})
        tables, reached = [], {p: start[p] for p in parts}
        deadline = time.monotonic() + timeout_s
        while any(reached[p] < ranges[p][1] for p in want):
            if time.monotonic() > deadline:
                short = {p: (reached[p], ranges[p][1]) for p in want if reached[p] < ranges[p][1]}
                raise TimeoutError(f"preview: the broker did not deliver up to the end offsets in {timeout_s:.0f}s: {short}")
            batch = src.poll(min(kafka.max_batch_records, 50_000), 0.5)
            if len(batch):
                t = accepted_records(batch, None)
                keep = pa.array(t.column("offset").to_numpy() < np.array([ranges[int(p)][1] for p in batch.partitions]))
                tables.append(t.filter(keep))
                for p in np.unique(batch.partitions).tolist():
                    reached[p] = max(reached[p], int(batch.offsets[batch.partitions == p].max()) + 1)
    finally:
        src.close()
    if not tables:
        return accepted_records(_empty(kafka.topic), None)
    t = pa.concat_tables(tables)
    if t.num_rows > n:
        ts, part, off = (t.column(c).to_numpy() for c in ("timestamp", "partition", "offset"))
        newest = np.lexsort((off, part, ts))[-n:]
        first = {}
        for p, o in zip(part[newest].tolist(), off[newest].tolist()):
            first[p] = min(first.get(p, o), o)
        keep = np.array([o >= first.get(p, np.iinfo(np.int64).max) for p, o in zip(part.tolist(), off.tolist())])
        t = t.filter(pa.array(keep))
    return t.sort_by([("partition", "ascending"), ("offset", "ascending")])


def _empty(topic: str):
    from pipeline.process import Batch

    return Batch.of(topic, [], [], [])


@dataclass
class Preview:
    """Window rows of a preview (every window, every row flushed at the end of the records read)."""

    tables: dict[str, pa.Table]
    records: int = 0
    rejected: int = 0
    late: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(t.num_rows for t in self.tables.values())

    def __getitem__(self, window: str) -> pa.Table:
        return self.tables[window]

    def to_arrow(self, window: str | None = None) -> pa.Table:
        """One window's rows (default: the first window), sorted by window start."""
        if not self.tables:
            return pa.table({})
        return self.tables[window or next(iter(self.tables))]

    def to_pandas(self, window: str | None = None):
        return self.to_arrow(window).to_pandas()

    def plot(self, window: str | None = None, y: str | None = None, top: int = 8, ax=None):
        """A line per group (the ``top`` largest by ``y``) of ``y`` (default: the first aggregation) over window
        start; returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        df = self.to_pandas(window)
        if df.empty:
            raise ValueError("nothing to plot: the preview has no rows")
        name = window or next(iter(self.tables))
        fixed = {"window", "window_start", "window_end", "revision", "partition"}
        values = [c for c in df.columns if c not in fixed and df[c].dtype.kind in "iuf"]
        keys = [c for c in df.columns if c not in fixed and c not in values]
        y = y or values[0]
        ax = ax or plt.subplots(figsize=(9, 4))[1]
        if keys:
            label = df[keys].astype(str).agg("/".join, axis=1)
            biggest = df.groupby(label)[y].sum().nlargest(top).index
            for g in biggest:
                part = df[label == g].groupby("window_start")[y].sum()
                ax.plot(part.index, part.to_numpy(), marker=".", label=g)
            ax.legend(fontsize="small", ncol=2)
        else:
            part = df.groupby("window_start")[y].sum()
            ax.plot(part.index, part.to_numpy(), marker=".")
        ax.set_title(f"{name}: {y} ({self.records:,} records previewed)")
        ax.set_xlabel("window start (UTC)")
        ax.set_ylabel(y)
        return ax

    def _repr_html_(self) -> str:
        parts = [f"<p>preview: {self.records:,} records ({self.rejected:,} rejected, {self.late:,} late)</p>"]
        for name, t in self.tables.items():
            parts.append(f"<h4>{name} ({t.num_rows} rows)</h4>" + t.slice(0, 20).to_pandas().to_html(max_rows=20))
        return "".join(parts)


def preview(spec: PipelineSpec, n: int) -> Preview:
    """The spec's windows over the last ``n`` records of its topic; see the module doc."""
    if n < 1:
        raise ValueError("preview: n must be at least 1")
    records = last_records(spec, n)
    validation, enrichment = None, None
    schema_fields, keep_unexpected = None, False
    if spec.validate_ is not None:
        from pipeline.io.validation import SchemaSource

        validation = SchemaSource(spec)
        default = validation.default()[0]
        schema_fields, keep_unexpected = default.decoder_fields(), default.closed
    parts = sorted(set(records.column("partition").to_pylist()))
    state = PipelineState(spec, parts, schema_fields=schema_fields, keep_unexpected=keep_unexpected)
    if spec.source.kafka.format == "protobuf":
        state.decoder.proto_class = validation.message_class()
    if spec.enrich:
        from pipeline.io.lookups import Enrichment

        enrichment = Enrichment(spec)
    from pipeline.merge import LocalMerge

    merge = LocalMerge(spec, parts) if spec.merged_windows else None
    out: dict[str, list[pa.Table]] = {w.name: [] for w in spec.windows}
    result = Preview({})
    try:
        ends = {}  # a partition is finished (stops holding the watermark) at its last record read, as in a bounded run
        for p in parts:
            offs = records.filter(pa.compute.equal(records.column("partition"), p)).column("offset")
            ends[p] = pa.compute.max(offs).as_py() + 1

        def take(res) -> None:
            for t in res.closed:
                out[t.column("window")[0].as_py()].append(t)
            if merge is not None and (res.partials or res.frontiers):
                merged, _ = merge.feed(res.partials, res.frontiers)
                for t in merged:
                    out[t.column("window")[0].as_py()].append(t)
            result.records += res.records
            result.rejected += res.rejected
            result.late += res.late_records
            if res.rejects is not None:
                for r in res.rejects.column("reason").to_pylist():
                    result.reasons[r] = result.reasons.get(r, 0) + 1

        for batch in batches_of(spec.source.kafka.topic, records, spec.source.kafka.max_batch_records):
            take(process_batch(spec, state, batch, enrichment, validation))
            for p in np.unique(batch.partitions).tolist():
                if int(batch.offsets[batch.partitions == p].max()) + 1 >= ends[p]:
                    state.tracker.finish(p)
        take(advance(state, to_end=True))
    finally:
        if enrichment is not None:
            enrichment.close()
    for w in spec.windows:
        if out[w.name]:
            t = pa.concat_tables(out[w.name], promote_options="default")
            ident = ["window_start", *w.group_by] + (["partition"] if w.per_partition else [])
            # the highest revision of each row (a row is emitted again by a record within allowed lateness)
            df = t.to_pandas().sort_values("revision", kind="stable").drop_duplicates(ident, keep="last")
            result.tables[w.name] = pa.Table.from_pandas(df.sort_values(ident, kind="stable"), preserve_index=False)
    return result
