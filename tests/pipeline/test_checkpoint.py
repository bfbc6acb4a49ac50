"""Snapshot/restore of per-partition state: a run cut by a checkpoint at any
point, restored into fresh states (partitions regrouped differently), emits
exactly what an uninterrupted run emits (including revisions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.checkpoint import decode_partition, encode_partition, restore_partition
from pipeline.process import Batch, PipelineState, advance, process_batch
from tests.pipeline.harness import encode, make_spec

WINDOWS = [
    {"name": "t", "type": "tumbling", "per_partition": True, "size": "1s", "group_by": ["k"],
     "aggregations": ["count", "sum(value)", "min(value)", "max(value)", "p50(value)", "count_distinct(value)",
                      "first(value)", "last(value)"]},
    {"name": "s", "type": "sliding", "per_partition": True, "size": "2s", "slide": "500ms", "group_by": ["k"], "aggregations": ["count", "sum(value)"]},
    {"name": "g", "type": "session", "per_partition": True, "gap": "700ms", "group_by": ["k"], "aggregations": ["count", "mean(value)", "p90(value)"]},
]


def _events(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = rng.integers(0, 4, n)
    ts = 1_700_000_000_000 + np.sort(rng.integers(0, 20_000, n)) + rng.integers(-1500, 300, n)
    df = pd.DataFrame({"partition": parts, "ts": ts, "k": [f"k{int(x)}" for x in rng.integers(0, 5, n)],
                       "value": np.round(rng.normal(50, 20, n), 3)})
    df["offset"] = df.groupby("partition").cumcount()
    return df


def _feed(spec, state, df, values, a, b, out):
    r = process_batch(spec, state, Batch.of("events", values[a:b], df["partition"].to_numpy()[a:b], df["offset"].to_numpy()[a:b]))
    out.extend(r.closed)


def _rows(tables):
    t = pa.concat_tables(tables, promote_options="default").to_pandas()
    t["window_start"] = t["window_start"].astype("int64")
    t["window_end"] = t["window_end"].astype("int64")
    return t.sort_values(["window", "partition", "window_start", "k", "revision"]).reset_index(drop=True)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), cut=st.floats(0.05, 0.95), split=st.integers(1, 3))
def test_restored_run_emits_what_an_uninterrupted_run_emits(seed, cut, split):
    spec = make_spec(WINDOWS, ooo="400ms", lateness="1s")
    df = _events(seed, 1500)
    values = encode(df)
    n, c = len(df), int(len(df) * cut)
    # uninterrupted
    ref_out: list = []
    ref = PipelineState(spec, range(4))
    for a in range(0, n, 211):
        _feed(spec, ref, df, values, a, min(n, a + 211), ref_out)
    ref_out.extend(advance(ref, to_end=True).closed)
    # cut at c: checkpoint every partition, restore into two fresh states (partitions regrouped)
    first = PipelineState(spec, range(4))
    out: list = []
    for a in range(0, c, 211):
        _feed(spec, first, df, values, a, min(c, a + 211), out)
    offsets = {p: int((df["partition"].to_numpy()[:c] == p).sum()) for p in range(4)}
    blobs = {p: encode_partition(first, p, offsets[p], epoch=1, checkpoint_id=7) for p in range(4)}
    groups = [list(range(0, split)), list(range(split, 4))]
    for group in groups:
        state = PipelineState(spec, [])
        for p in group:
            snap = decode_partition(blobs[p])
            assert snap.offset == offsets[p]
            restore_partition(state, snap)
        sub = df[df["partition"].isin(group)]
        sub = sub[sub["offset"] >= sub["partition"].map(offsets)]
        sv = encode(sub)
        for a in range(0, len(sub), 97):
            _feed(spec, state, sub, sv, a, min(len(sub), a + 97), out)
        out.extend(advance(state, to_end=True).closed)
    got, want = _latest(_rows(out)), _latest(_rows(ref_out))
    # the latest revision of each window is the same row (same revision number too),
    # whatever the checkpoint cut, the regrouping of partitions and the batch cuts
    assert len(got) > 100
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-9)


def _latest(df: pd.DataFrame) -> pd.DataFrame:
    ident = ["window", "partition", "window_start", "window_end", "k"]
    return df.sort_values("revision").drop_duplicates(ident, keep="last").sort_values(ident).reset_index(drop=True)


def test_changed_window_refuses_restore():
    spec = make_spec(WINDOWS[:1])
    df = _events(1, 200)
    state = PipelineState(spec, range(4))
    process_batch(spec, state, Batch.of("events", encode(df), df["partition"].to_numpy(), df["offset"].to_numpy()))
    blob = encode_partition(state, 0, 10, 1, 1)
    changed = make_spec([{**WINDOWS[0], "size": "2s"}])
    with pytest.raises(ValueError, match="window 't' changed since checkpoint 1"):
        restore_partition(PipelineState(changed, []), decode_partition(blob))


def test_a_fenced_loop_writes_nothing(tmp_path, broker, topic_name):
    from pipeline.io.kafka import produce_all
    from pipeline.io.loop import Fenced, PartitionLoop

    broker.extra["broker"].create_topic(topic_name, 1)
    df = _events(2, 300)
    df["partition"] = 0
    produce_all(broker.address, topic_name, encode(df), None, [0] * len(df))
    spec = make_spec(WINDOWS[:1], ooo="100ms")
    spec = spec.model_copy(update={
        "source": spec.source.model_copy(update={"kafka": spec.source.kafka.model_copy(update={"bootstrap_servers": broker.address, "topic": topic_name})}),
        "sinks": [spec.sinks[0].model_copy(update={"parquet": spec.sinks[0].parquet.model_copy(update={"uri": f"file://{tmp_path}"})})],
    })
    asked = []
    loop = PartitionLoop(spec, [0], {0: 0}, {0: len(df)}, epoch=3, fence=lambda: asked.append(1) or False)
    with pytest.raises(Fenced, match="epoch 3 is stale"):
        loop.run(until_end=True)
    assert asked and loop.fenced
    assert not any(tmp_path.rglob("*.parquet"))
