"""``raystream state show`` reads a checkpoint into tables equal to what the raw input says they must hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from pipeline.api import Pipeline
from pipeline.io.kafka import produce_all
from pipeline.io.state import read_state
from tests.test_end_to_end import _dataset

OOO = 2000
SIZE = 10_000


def test_state_show_matches_the_input(broker, topic_name, pipeline_name, tmp_path):
    values, keys, parts, df, _, _ = _dataset(4000, seed=21)
    produce_all(broker.address, topic_name, values, keys, parts)
    chk = f"file://{tmp_path}/chk"
    p = (Pipeline(pipeline_name).kafka(broker.address, topic_name, max_batch_records=500)
         .event_time("ts", max_out_of_orderness="2s")
         .tumbling("tumble", "10s", group_by=["tenant_id"], aggregations=["count", "sum(value)"])
         .parquet(f"file://{tmp_path}/out").late_parquet(f"file://{tmp_path}/late")
         .checkpoint(chk, interval="1h"))
    p.run(until_end=True, inline=True)  # its final checkpoint is taken before the end-of-input flush

    st = read_state(chk)  # the only pipeline there: found by itself
    assert st.pipeline == pipeline_name and st.final
    parts_t = st.partitions.to_pandas().set_index("partition")
    got = st.windows["tumble"].to_pandas()
    # every partition finished: each follows the most advanced watermark (README, Semantics)
    wm = int(df["ts"].max()) - OOO
    for part, g in df.groupby("partition"):
        ts = g.sort_values("offset")["ts"].to_numpy()
        assert parts_t.loc[part, "offset"] == len(g)
        assert parts_t.loc[part, "max_event_time"].value // 10**6 == int(ts.max())
        assert parts_t.loc[part, "watermark"].value // 10**6 == wm
        # independent: records of this partition in windows its watermark has not passed, not late on arrival
        seen_max = pd.Series(ts).cummax().shift(fill_value=-(2**62)).to_numpy() - OOO
        start = (ts // SIZE) * SIZE
        live = (start + SIZE > wm) & (start + SIZE > seen_max)
        want = (pd.DataFrame({"window_start": start[live], "tenant_id": g.sort_values("offset")["tenant_id"].to_numpy()[live],
                              "value": g.sort_values("offset")["value"].to_numpy()[live]})
                .groupby(["window_start", "tenant_id"]).agg(count=("value", "size"), sum_value=("value", "sum")).reset_index())
        mine = got[got["partition"] == part].copy()
        mine["window_start"] = mine["window_start"].astype("datetime64[ms, UTC]").astype("int64")
        mine = mine[["window_start", "tenant_id", "count", "sum_value"]].sort_values(["window_start", "tenant_id"])
        assert len(want) > 0
        pd.testing.assert_frame_equal(mine.reset_index(drop=True), want.sort_values(["window_start", "tenant_id"])
                                      .reset_index(drop=True), check_dtype=False)
        assert (got.loc[got["partition"] == part, "revision"] == 0).all()

    one = subprocess.run([sys.executable, "-m", "pipeline.cli", "state", "show", f"{chk}/{pipeline_name}", "--partition", "2",
                          "--json"], capture_output=True, text=True, timeout=60)
    assert one.returncode == 0, one.stderr
    doc = json.loads(one.stdout)
    assert [r["partition"] for r in doc["partitions"]] == [2]
    assert {r["partition"] for r in doc["windows"]["tumble"]} == {2}
    assert len(doc["windows"]["tumble"]) == int((got["partition"] == 2).sum())
    text = subprocess.run([sys.executable, "-m", "pipeline.cli", "state", "show", chk], capture_output=True, text=True,
                          timeout=60)
    assert text.returncode == 0 and "window tumble" in text.stdout and "partitions" in text.stdout, text.stdout + text.stderr
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "state", "show", chk, "--partition", "99"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no partition 99" in bad.stderr


def test_state_show_merges_what_the_owners_hold(broker, topic_name, pipeline_name, tmp_path):
    """With a long allowed lateness every merged group stays held by the owner after it is emitted: the state's
    merged rows are the reference windows the watermark closed (shipped by their partitions), and the rest are
    the partitions' open slots."""
    from tests import reference

    values, keys, parts, df, _, _ = _dataset(3000, seed=22)
    produce_all(broker.address, topic_name, values, keys, parts)
    chk = f"file://{tmp_path}/chk"
    (Pipeline(pipeline_name).kafka(broker.address, topic_name, max_batch_records=500)
     .event_time("ts", max_out_of_orderness="2s", allowed_lateness="1h")
     .tumbling("tumble", "10s", group_by=["tenant_id"], aggregations=["count", "sum(value)"])
     .parquet(f"file://{tmp_path}/out").checkpoint(chk, interval="1h")).run(until_end=True, inline=True)
    st = read_state(chk, pipeline_name)
    assert st.merge_snapshots == 1
    got = st.merged["tumble"].to_pandas()
    want, late = reference.windows(df, "tumbling", ["tenant_id"], OOO, 3_600_000, size=SIZE)
    assert len(late) == 0
    got["window_start"] = got["window_start"].astype("datetime64[ms, UTC]").astype("int64")
    mine = got[["window_start", "tenant_id", "count", "sum_value"]].sort_values(["window_start", "tenant_id"])
    ref = want[["window_start", "tenant_id", "count", "sum_value"]].copy()
    if ref["window_start"].dtype.kind == "M":
        ref["window_start"] = ref["window_start"].astype("datetime64[ms, UTC]").astype("int64")
    wm = int(df["ts"].max()) - OOO  # every partition finished: each follows the most advanced watermark
    closed = ref[ref["window_start"] + SIZE <= wm].sort_values(["window_start", "tenant_id"]).reset_index(drop=True)
    assert len(closed) > 0
    pd.testing.assert_frame_equal(mine.reset_index(drop=True), closed, check_dtype=False, rtol=1e-9)
    # the partitions still hold every window, shipped ones with the revision they were shipped at
    slots = st.windows["tumble"].to_pandas()
    slots["window_start"] = slots["window_start"].astype("datetime64[ms, UTC]").astype("int64")
    shipped = slots[slots["window_start"] + SIZE <= wm]
    assert len(shipped) == len(closed) and (shipped["revision"] == shipped["count"]).all()
    assert (slots.loc[slots["window_start"] + SIZE > wm, "revision"] == 0).all()
