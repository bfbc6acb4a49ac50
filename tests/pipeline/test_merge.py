"""Windows across partitions: the merged rows equal the reference for any partitioning, assignment, batch cuts,
owner count, restarts and interleaving (the core and the merge owners driven in one process)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.checkpoint import decode_partition, encode_partition, restore_partition
from pipeline.merge import Merger, split_by_shard
from pipeline.process import Batch, PipelineState, advance, process_batch
from tests.pipeline.harness import encode, make_spec
from tests.reference import compare, windows

AGGS = ["count", "sum(value)", "min(value)", "max(value)", "mean(value)", "p95(value)", "count_distinct(value)",
        "first(value)", "last(value)", "tests.pipeline.udfs:spread(value) as spread"]
KINDS = {
    "tumbling": {"size": "1s"},
    "sliding": {"size": "2s", "slide": "500ms"},
    "session": {"gap": "400ms"},
}


def _events(seed: int, n: int, partitions: int) -> pd.DataFrame:
    """Keys spread over every partition (the topic is not keyed by them); partitions of uneven size."""
    rng = np.random.default_rng(seed)
    weights = rng.random(partitions) + 0.05
    parts = rng.choice(partitions, n, p=weights / weights.sum())
    ts = 1_700_000_000_000 + np.sort(rng.integers(0, 12_000, n)) + rng.integers(-800, 200, n)
    df = pd.DataFrame({"partition": parts, "ts": ts, "k": [f"k{int(x)}" for x in rng.integers(0, 4, n)],
                       "value": rng.integers(0, 40, n).astype(float)})  # small ints: ties for first/last, repeats
    df["offset"] = df.groupby("partition").cumcount()
    return df


class _Owners:
    """M merge owners fed the way workers feed them: partials of a batch, then its frontiers."""

    def __init__(self, spec, partitions, m):
        self.spec, self.partitions, self.m = spec, partitions, m
        self.owners = [Merger(spec, partitions) for _ in range(m)]
        self.out: list[pa.Table] = []

    def feed(self, r) -> None:
        for name, tables in r.partials.items():
            w = next(w for w in self.spec.windows if w.name == name)
            for k, part in split_by_shard(name, w.group_by, tables, self.m).items():
                self.owners[k].add(name, part)
        for o in self.owners:
            o.advance(r.frontiers)
            self.out += o.close()[0]

    def restart(self, k: int) -> None:
        """Owner ``k`` dies and comes back from a snapshot of itself taken now."""
        snap = self.owners[k].snapshot()
        self.owners[k] = Merger(self.spec, self.partitions)
        self.owners[k].restore(snap)


def _run(spec, df, assignment, cuts, m, order_seed, restart_at, owner_restart_at):
    values = encode(df)
    workers = sorted(set(assignment.values()))
    owners = _Owners(spec, sorted(assignment), m)
    queues = {}
    for w in workers:
        mine = df.index[df["partition"].map(assignment) == w].to_numpy()
        bounds = sorted({0, len(mine), *[int(c * len(mine)) for c in cuts]})
        queues[w] = [mine[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    states = {w: PipelineState(spec, [p for p, x in assignment.items() if x == w]) for w in workers}
    checkpoints: dict = {}
    rng = np.random.default_rng(order_seed)
    step = 0
    pending = {w: list(q) for w, q in queues.items()}
    done_batches = {w: 0 for w in workers}
    while any(pending.values()):
        w = rng.choice([x for x in workers if pending[x]])
        idx = pending[w].pop(0)
        r = process_batch(spec, states[w], Batch.of("events", [values[i] for i in idx], df["partition"].to_numpy()[idx],
                                                    df["offset"].to_numpy()[idx]))
        owners.feed(r)
        done_batches[w] += 1
        step += 1
        if step == 2:  # a checkpoint of every worker: state and the batches behind it
            checkpoints = {x: ({p: encode_partition(states[x], p, 0, 0, 1) for p in states[x].tracker.max_event},
                               done_batches[x]) for x in workers}
        if step == restart_at and checkpoints:
            # worker w crashes: back to its checkpoint, replaying the batches after it (its partials go again)
            snaps, at = checkpoints[w]
            fresh = PipelineState(spec, [])
            for data in snaps.values():
                restore_partition(fresh, decode_partition(data))
            states[w] = fresh
            pending[w] = queues[w][at:done_batches[w]] + pending[w]
            done_batches[w] = at
        if step == owner_restart_at:
            owners.restart(int(rng.integers(0, m)))
    for w in workers:
        owners.feed(advance(states[w], to_end=True))
    return owners.out


def _latest(tables: list[pa.Table], keys: list[str]) -> pd.DataFrame:
    df = pa.concat_tables(tables).to_pandas()
    assert "partition" not in df.columns  # merged rows carry no partition
    return df.sort_values("revision", kind="stable").drop_duplicates([*keys, "window_start"], keep="last")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(sorted(KINDS)), partitions=st.integers(2, 6),
       workers=st.integers(1, 3), owners=st.integers(1, 3), cuts=st.lists(st.floats(0.01, 0.99), max_size=6),
       order_seed=st.integers(0, 1000), restart_at=st.integers(0, 12), owner_restart_at=st.integers(0, 12),
       lateness=st.sampled_from(["0s", "700ms"]))
@example(seed=1, kind="session", partitions=4, workers=2, owners=2, cuts=[0.3, 0.6], order_seed=3, restart_at=5,
         owner_restart_at=4, lateness="700ms")
def test_merged_rows_equal_the_reference_for_any_partitioning_assignment_and_cuts(
        seed, kind, partitions, workers, owners, cuts, order_seed, restart_at, owner_restart_at, lateness):
    spec = make_spec([{"name": "w", "type": kind, "group_by": ["k"], "aggregations": AGGS, **KINDS[kind]}],
                     ooo="300ms", lateness=lateness)
    df = _events(seed, 400, partitions)
    rng = np.random.default_rng(seed + 1)
    assignment = {p: int(rng.integers(0, workers)) for p in range(partitions)}
    out = _run(spec, df, assignment, cuts, owners, order_seed, restart_at, owner_restart_at)
    got = _latest(out, ["k"]).rename(columns={"count_distinct_value": "distinct_value", "p95_value": "p95"})
    w = spec.windows[0]
    ref, _ = windows(df, kind, ["k"], spec.event_time.max_out_of_orderness, spec.event_time.allowed_lateness,
                     size=w.size or 0, slide=w.slide or 0, gap=w.gap or 0, quantiles={"p95": 0.95}, orders=True)
    compare(got, ref, ["k"], exact=("count", "min_value", "max_value", "distinct_value", "first_value", "last_value"),
            sketch=("p95",))
    # the user function saw every value of the group, from every partition
    assert (got["spread"] == got["max_value"] - got["min_value"]).all()


def test_merged_revision_is_the_sum_of_the_partials_and_only_grows():
    """A late record within allowed lateness in one partition re-emits the merged row with a higher revision."""
    spec = make_spec([{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["k"], "aggregations": ["count"]}],
                     lateness="2s")
    t0 = 1_700_000_000_000
    rows = [(0, t0 + 100, "a"), (1, t0 + 200, "a"), (0, t0 + 1500, "a"), (1, t0 + 1600, "a"),  # both pass 1 s
            (1, t0 + 300, "a"),  # late for partition 1's watermark, within allowed lateness
            (0, t0 + 4000, "a"), (1, t0 + 4000, "a")]
    df = pd.DataFrame({"partition": [r[0] for r in rows], "ts": [r[1] for r in rows], "k": [r[2] for r in rows],
                       "value": 1.0})
    df["offset"] = df.groupby("partition").cumcount()
    out = _run(spec, df, {0: 0, 1: 0}, [i / len(rows) for i in range(1, len(rows))], 1, 0, -1, -1)
    first = pa.concat_tables(out).to_pandas()
    w0 = first[first["window_start"] == pd.Timestamp(t0 // 1000 * 1000, unit="ms", tz="UTC")]
    assert w0["revision"].tolist() == [2, 3] and w0["count"].tolist() == [2, 3]


def test_key_following_the_kafka_key_needs_no_merge():
    spec = make_spec([{"name": "by_tenant", "type": "tumbling", "size": "1s", "group_by": ["k"], "aggregations": ["count"]},
                      {"name": "by_type", "type": "tumbling", "size": "1s", "group_by": ["t"], "aggregations": ["count"]},
                      {"name": "raw", "type": "tumbling", "size": "1s", "group_by": ["k"], "per_partition": True,
                       "aggregations": ["count"]}],
                     source={"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events", "key_fields": ["k"]}})
    assert [spec.window_mode(w.name) for w in spec.windows] == ["local", "merge", "partition"]
    assert spec.merged_windows == ["by_type"] and spec.owners == 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), partitions=st.integers(1, 5), workers=st.integers(1, 3), owners=st.integers(1, 3),
       cuts=st.lists(st.floats(0.01, 0.99), max_size=6), order_seed=st.integers(0, 1000),
       restart_at=st.integers(0, 12), owner_restart_at=st.integers(0, 12), lateness=st.sampled_from(["0s", "700ms"]))
def test_rollups_equal_the_reference_at_every_level(seed, partitions, workers, owners, cuts, order_seed, restart_at,
                                                    owner_restart_at, lateness):
    """1 s windows rolled up to 3 s and 6 s: every level equals a group-by of the records the 1 s windows took
    (a record late for its 1 s window is in no level), at any partitioning, assignment, cuts and restarts."""
    aggs = ["count", "sum(value)", "min(value)", "max(value)", "mean(value)", "p95(value)", "count_distinct(value)",
            "first(value)", "last(value)"]
    spec = make_spec([{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["k"], "aggregations": aggs,
                       "rollups": ["3s", {"size": "6s", "name": "w_big"}]}], ooo="300ms", lateness=lateness)
    assert [w.name for w in spec.windows] == ["w", "w_3s", "w_big"]
    df = _events(seed, 400, partitions)
    rng = np.random.default_rng(seed + 1)
    assignment = {p: int(rng.integers(0, workers)) for p in range(partitions)}
    out = _run(spec, df, assignment, cuts, owners, order_seed, restart_at, owner_restart_at)
    ooo, late_ms = spec.event_time.max_out_of_orderness, spec.event_time.allowed_lateness
    _, late = windows(df, "tumbling", ["k"], ooo, late_ms, size=1000)
    taken = df.reset_index(drop=True).drop(index=late["rid"].to_numpy())
    by_window: dict[str, list] = {}
    for t in out:
        by_window.setdefault(t.column("window")[0].as_py(), []).append(t)
    assert set(by_window) == {"w", "w_3s", "w_big"}
    for name, size in (("w", 1000), ("w_3s", 3000), ("w_big", 6000)):
        got = _latest(by_window[name], ["k"]).rename(columns={"count_distinct_value": "distinct_value", "p95_value": "p95"})
        ref, _ = windows(taken, "tumbling", ["k"], ooo, 10**12, size=size, quantiles={"p95": 0.95}, orders=True)
        try:
            compare(got, ref, ["k"], exact=("count", "min_value", "max_value", "distinct_value", "first_value", "last_value"),
                    sketch=("p95",))
        except AssertionError as exc:
            raise AssertionError(f"level {name}: {exc}") from None


def test_owner_state_reshards_to_another_owner_count():
    """Owners snapshotted with 3 owners and restored as 2 (or 1): every group lands in its new owner, and the run
    goes on to the same rows as without the change."""
    from pipeline.checkpoint import decode_merge, encode_merge
    from pipeline.merge import reshard

    spec = make_spec([{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["k"], "aggregations": AGGS,
                       "rollups": ["3s"]}], ooo="300ms", lateness="700ms")
    df = _events(7, 600, 4)
    values = encode(df)
    parts = sorted(set(df["partition"].tolist()))
    state = PipelineState(spec, parts)
    owners = _Owners(spec, parts, 3)
    half = len(df) // 2
    idx = np.arange(half)
    owners.feed(process_batch(spec, state, Batch.of("events", values[:half], df["partition"].to_numpy()[idx],
                                                    df["offset"].to_numpy()[idx])))
    snaps = [encode_merge(o, k, 1) for k, o in enumerate(owners.owners)]
    for m in (2, 1):
        st = PipelineState(spec, [])
        for p in parts:
            restore_partition(st, decode_partition(encode_partition(state, p, 0, 0, 1)))
        after = _Owners(spec, parts, m)
        after.owners = [reshard(spec, parts, snaps, k, m, decode_merge) for k in range(m)]
        after.out = list(owners.out)
        rest = np.arange(half, len(df))
        after.feed(process_batch(spec, st, Batch.of("events", values[half:], df["partition"].to_numpy()[rest],
                                                    df["offset"].to_numpy()[rest])))
        after.feed(advance(st, to_end=True))
        for name, size in (("w", 1000), ("w_3s", 3000)):
            got = _latest([t for t in after.out if t.column("window")[0].as_py() == name], ["k"])
            got = got.rename(columns={"count_distinct_value": "distinct_value", "p95_value": "p95"})
            _, late = windows(df, "tumbling", ["k"], 300, 700, size=1000)
            taken = df.reset_index(drop=True).drop(index=late["rid"].to_numpy())
            ref, _ = windows(taken, "tumbling", ["k"], 300, 10**12, size=size, quantiles={"p95": 0.95}, orders=True)
            compare(got, ref, ["k"], exact=("count", "min_value", "max_value", "distinct_value"), sketch=("p95",))
