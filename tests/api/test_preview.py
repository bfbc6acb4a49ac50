"""``Pipeline.preview(n)``: the windows over the last n records, equal to the reference, touching nothing."""

from __future__ import annotations

import os

import matplotlib
import numpy as np
import pandas as pd
from confluent_kafka import Consumer, TopicPartition

from pipeline.api import Pipeline
from pipeline.io.kafka import produce_all, topic_partitions
from tests import reference
from tests.test_end_to_end import _dataset

matplotlib.use("Agg")


def test_preview_is_the_windows_of_the_last_records_and_writes_nothing(broker, topic_name, pipeline_name, tmp_path):
    values, keys, parts, df, bad_offsets, bad_parts = _dataset(6000, seed=8, bad=5)
    # broker time = event time (the producer sets it), so "the last n" is known from the input alone
    ts_all = np.empty(len(values), np.int64)
    # offsets per record in produce order, to give each its event time (bad records: the previous record's)
    counters, order = {}, []
    for p in parts:
        order.append((p, counters.get(p, 0)))
        counters[p] = counters.get(p, 0) + 1
    ts_of = {(int(r.partition), int(r.offset)): int(r.ts) for r in df.itertuples()}
    last = 1_760_000_000_000
    for i, key in enumerate(order):
        last = ts_of.get(key, last)
        ts_all[i] = last
    produce_all(broker.address, topic_name, values, keys, parts, timestamps=ts_all)

    n = 2500
    p = (Pipeline(pipeline_name).kafka(broker.address, topic_name, max_batch_records=400)
         .event_time("ts", max_out_of_orderness="2s", allowed_lateness="1s")
         .tumbling("tumble", "10s", group_by=["tenant_id"], aggregations=["count", "sum(value)", "min(value)", "max(value)", "mean(value)"])
         .session("sess", "2s", group_by=["tenant_id"], aggregations=["count", "sum(value)", "min(value)", "max(value)", "mean(value)"])
         .parquet(f"file://{tmp_path}/out").late_parquet(f"file://{tmp_path}/late"))
    got = p.preview(n=n)

    # the expected records: the n newest by (broker time, partition, offset), each partition's share up to its end
    rec = pd.DataFrame({"partition": [k[0] for k in order], "offset": [k[1] for k in order], "bt": ts_all})
    newest = rec.sort_values(["bt", "partition", "offset"]).tail(n)
    first = newest.groupby("partition")["offset"].min()
    chosen = rec[rec["offset"] >= rec["partition"].map(first).fillna(np.inf)]
    assert got.records == len(chosen) >= n
    bad_chosen = sum(1 for bp, bo in zip(bad_parts, bad_offsets) if bo >= first.get(bp, np.inf))
    assert got.rejected == bad_chosen
    sub = df.merge(chosen[["partition", "offset"]], on=["partition", "offset"])
    for w in p.spec().windows:
        want, late = reference.windows(sub, w.type, w.group_by, 2000, 1000, size=w.size or 0, gap=w.gap or 0)
        reference.compare(got.to_pandas(w.name), want, w.group_by)
    assert got.late > 0 and got.late == len(set(zip(*[reference.windows(sub, "tumbling", ["tenant_id"], 2000, 1000, size=10_000)[1][c]
                                        for c in ("partition", "offset")])) |
                              set(zip(*[reference.windows(sub, "session", ["tenant_id"], 2000, 1000, gap=2000)[1][c]
                                        for c in ("partition", "offset")])))

    ax = got.plot("tumble")
    assert ax.get_lines() and ax.get_ylabel() == "count"
    assert "<h4>tumble" in got._repr_html_()

    # nothing was written or committed
    assert not os.path.exists(tmp_path / "out" / pipeline_name) and not os.path.exists(tmp_path / "late" / pipeline_name)
    c = Consumer({"bootstrap.servers": broker.address, "group.id": p.spec().group_id})
    committed = c.committed([TopicPartition(topic_name, q) for q in topic_partitions(broker.address, topic_name, 5)], 10)
    c.close()
    assert all(tp.offset < 0 for tp in committed), committed
    assert topic_name + ".dlq" not in Consumer({"bootstrap.servers": broker.address, "group.id": "x"}).list_topics(timeout=5).topics
