"""Output is a function of the records alone: not of assignment, poll sizes or arrival timing.

Each example cuts the same input differently: partitions spread over 1-4
workers (one ``PipelineState`` each), polls of random sizes that interleave the
partitions a worker owns in random order, and a fake clock that jumps by up to
a minute between polls (far past ``idle_timeout``, so the old rule that took a
quiet partition as idle would turn its backlog late). A partition whose
records were all delivered is either finished (a bounded run) or confirmed
caught up (an unbounded one). The latest row of every window and the set of
late records must equal one uninterrupted single-worker run.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.process import Batch, PipelineState, advance, process_batch
from pipeline.spec import parse_spec

SPEC = parse_spec({
    "name": "t",
    "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events"}},
    "event_time": {"field": "ts", "format": "epoch_ms", "max_out_of_orderness": "2s", "allowed_lateness": "1s",
                   "idle_timeout": "1s"},
    "windows": [
        {"name": "tumble", "type": "tumbling", "per_partition": True, "size": "10s", "group_by": ["tenant_id"],
         "aggregations": ["count", "sum(value)", "max(value)", "p95(value)"]},
        {"name": "slide", "type": "sliding", "per_partition": True, "size": "10s", "slide": "5s", "group_by": ["event_type"],
         "aggregations": ["count", "min(value)"]},
        {"name": "sess", "type": "session", "per_partition": True, "gap": "3s", "group_by": ["tenant_id"], "aggregations": ["count"]},
    ],
    "sinks": [{"parquet": {"uri": "file:///tmp/unused"}}],
})
PARTITIONS = [0, 1, 2, 3]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _events(seed: int) -> dict[int, list[tuple[int, bytes]]]:
    """Per partition: (offset, value), partitions of very different sizes, up to 3 s out of order."""
    rng = np.random.default_rng(seed)
    out = {}
    for p, n in zip(PARTITIONS, (400, 120, 30, 0 if seed % 3 == 0 else 5)):
        base = 1_760_000_000_000 + np.cumsum(rng.integers(0, 400, n)) - rng.integers(0, 3000, n)
        rows = [{"tenant_id": f"t{rng.integers(0, 3)}", "event_type": ["click", "view"][rng.integers(0, 2)],
                 "ts": int(t), "value": float(rng.integers(0, 100))} for t in base]
        out[p] = [(i, json.dumps(r).encode()) for i, r in enumerate(rows)]
    return out


def _run(events, assignment: list[list[int]], draw_poll, draw_gap, finish_by_offset: bool):
    rows: dict[str, list[pa.Table]] = {}
    late: set[tuple] = set()
    for parts in assignment:
        if not parts:
            continue
        clock = Clock()
        state = PipelineState(SPEC, parts, clock=clock)
        cursor = {p: 0 for p in parts}
        results = []
        while True:
            # a poll: a random slice (maybe none) of each owned partition's remaining records, in random order
            values, ps, offs = [], [], []
            mask, size = draw_poll()
            if not any(mask >> p & 1 and cursor[p] < len(events[p]) for p in parts):
                mask = 0xF  # this poll would deliver nothing: take from every partition
            for p in sorted(parts, key=lambda q: (mask * 7 + q * 3) % 5):
                k = min(size if mask >> p & 1 else 0, len(events[p]) - cursor[p])
                for off, v in events[p][cursor[p]:cursor[p] + k]:
                    values.append(v), ps.append(p), offs.append(off)
                cursor[p] += k
            results.append(process_batch(SPEC, state, Batch.of("events", values, ps, offs)))
            clock.t += draw_gap()  # wall time passes: possibly far beyond idle_timeout
            for p in parts:
                if cursor[p] == len(events[p]):  # nothing unread: the only case a partition may stop holding
                    if finish_by_offset:
                        state.tracker.finish(p)
                    else:
                        state.tracker.caught_up(p)
            if all(cursor[p] == len(events[p]) for p in parts):
                break
        results.append(advance(state, to_end=True))
        for r in results:
            for t in r.closed:
                rows.setdefault(t.column("window")[0].as_py(), []).append(t)
            if r.late is not None:
                late |= set(zip(r.late.column("partition").to_pylist(), r.late.column("offset").to_pylist(),
                                r.late.column("window").to_pylist()))
    latest = {}
    for w, tables in rows.items():
        df = pa.concat_tables(tables).to_pandas()
        ident = [c for c in df.columns if c not in ("revision",) and not c.startswith(("count", "sum", "max", "min", "p95"))]
        df = df.sort_values("revision").drop_duplicates(ident, keep="last")
        latest[w] = df.sort_values(ident).reset_index(drop=True)
    return latest, late


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 50),
    workers=st.integers(1, 4),
    polls=st.lists(st.tuples(st.integers(1, 15), st.integers(1, 200)), min_size=1, max_size=20),
    gaps=st.lists(st.floats(0.0, 60.0), min_size=1, max_size=20),
    finish_by_offset=st.booleans(),
)
@example(seed=1, workers=1, polls=[(1, 50), (15, 50)], gaps=[30.0], finish_by_offset=True)  # others starve for 30 s
def test_output_is_the_same_for_any_assignment_poll_size_and_timing(seed, workers, polls, gaps, finish_by_offset):
    """``polls``: per poll, a bit mask of the partitions it delivers from and how many records of each."""
    events = _events(seed)
    reference, ref_late = _run(events, [PARTITIONS], lambda: (0xF, 10**9), lambda: 0.0, True)
    i, j = iter(range(10**9)), iter(range(10**9))
    draw_poll = lambda: polls[next(i) % len(polls)]  # noqa: E731
    draw_gap = lambda: gaps[next(j) % len(gaps)]  # noqa: E731
    assignment = [PARTITIONS[k::workers] for k in range(workers)]
    got, got_late = _run(events, assignment, draw_poll, draw_gap, finish_by_offset)
    assert got_late == ref_late
    assert set(got) == set(reference)
    for w in reference:
        pd.testing.assert_frame_equal(got[w], reference[w], check_exact=False, rtol=1e-9)
    assert sum(len(v) for v in reference.values()) > 0
