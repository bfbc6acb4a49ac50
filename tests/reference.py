"""Independent reference: the windows recomputed from raw events with DuckDB.

It shares no code with ``pipeline``: lateness follows the documented rule (a
record is late for a window when window end + allowed lateness <= the largest
earlier event time of its partition - max out-of-orderness), and the windows
are plain SQL group-bys over the records that were not late.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd


def prefix_watermark(df: pd.DataFrame, ooo: int) -> np.ndarray:
    """Per record: max event time of earlier records of the same partition, minus ``ooo``."""
    out = np.full(len(df), np.iinfo(np.int64).min // 2, dtype=np.int64)
    for _, idx in df.groupby("partition", sort=False).indices.items():
        idx = np.sort(idx)  # rows are given in offset order per partition
        ts = df["ts"].to_numpy()[idx]
        cm = np.maximum.accumulate(ts)
        before = np.concatenate(([np.iinfo(np.int64).min // 2], cm[:-1]))
        out[idx] = np.where(before <= np.iinfo(np.int64).min // 2, before, before - ooo)
    return out


def _q(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q, method="inverted_cdf"))


def windows(df: pd.DataFrame, kind: str, keys: list[str], ooo: int, lateness: int,
            size: int = 0, slide: int = 0, gap: int = 0, quantiles: dict[str, float] | None = None,
            per_partition: bool = False, orders: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(window rows, late (record, window_start) pairs) for raw ``df``.

    ``df`` has columns partition, offset, ts (ms), value and the ``keys``, in
    offset order within each partition. Lateness is decided per partition;
    the rows group the records that were not late by ``keys`` over all
    partitions (with ``per_partition``, by ``keys`` and partition). With
    ``orders`` also ``distinct_value``, ``first_value`` and ``last_value``.
    """
    keys = [*keys, "partition"] if per_partition else list(keys)
    df = df.reset_index(drop=True).copy()
    df["rid"] = np.arange(len(df))
    df["wm"] = prefix_watermark(df, ooo)
    con = duckdb.connect()
    con.register("raw", df)
    k = ", ".join(f'"{c}"' for c in keys) if keys else ""
    kc = (k + ", ") if keys else ""
    if kind in ("tumbling", "sliding"):
        step = size if kind == "tumbling" else slide
        nwin = -(-size // step)
        pairs = con.execute(f"""
            select r.*, ws from (
              select *, unnest(range(0, {nwin})) as j from raw) r,
              lateral (select (floor(r.ts / {step}) * {step} - j * {step})::bigint as ws)
            where ws > r.ts - {size}
        """).df()
        pairs["late"] = pairs["ws"] + size + lateness <= pairs["wm"]
        con.register("pairs", pairs)
        rows = con.execute(f"""
            select {kc} ws as window_start, ws + {size} as window_end, count(*) as count,
                   sum(value) as sum_value, min(value) as min_value, max(value) as max_value,
                   avg(value) as mean_value
            from pairs where not late group by all
        """).df()
        late = pairs.loc[pairs["late"], ["rid", "partition", "offset", "ws"]].rename(columns={"ws": "window_start"})
        extra = [c for c in ("ts", "partition", "offset") if c not in keys]
        members = pairs.loc[~pairs["late"], [*keys, "ws", "value", *extra]].rename(columns={"ws": "window_start"})
    else:
        df["late"] = df["ts"] + gap + lateness <= df["wm"]
        con.register("raw2", df)
        part = f"partition by {k}" if keys else ""
        sess = con.execute(f"""
            with ordered as (
              select *, case when ts - lag(ts) over ({part} order by ts, rid) < {gap} then 0 else 1 end as brk
              from raw2 where not late),
            numbered as (
              select *, sum(brk) over ({part} order by ts, rid rows between unbounded preceding and current row) as sid
              from ordered)
            select *, min(ts) over (partition by {kc} sid) as window_start,
                      max(ts) over (partition by {kc} sid) + {gap} as window_end
            from numbered
        """).df()
        con.register("sess", sess)
        rows = con.execute(f"""
            select {kc} window_start, window_end, count(*) as count, sum(value) as sum_value,
                   min(value) as min_value, max(value) as max_value, avg(value) as mean_value
            from sess group by all
        """).df()
        late = df.loc[df["late"], ["rid", "partition", "offset", "ts"]].rename(columns={"ts": "window_start"})
        members = sess[[*keys, "window_start", "value", *[c for c in ("ts", "partition", "offset") if c not in keys]]]
    if orders:
        # count_distinct, and first/last by event time; ties across partitions go to the lower (first) or
        # higher (last) partition, within a partition to the earlier (first) or later (last) offset
        g = members.sort_values(["ts", "partition", "offset"], kind="stable").groupby([*keys, "window_start"], dropna=False)["value"]
        extra_cols = pd.concat([g.nunique().rename("distinct_value"), g.first().rename("first_value"),
                                g.last().rename("last_value")], axis=1).reset_index()
        rows = rows.merge(extra_cols, on=[*keys, "window_start"], how="left")
    if quantiles:
        for col, q in quantiles.items():
            qs = members.groupby([*keys, "window_start"], dropna=False)["value"].apply(lambda v, q=q: _q(v.to_numpy(), q))
            rows = rows.merge(qs.rename(col).reset_index(), on=[*keys, "window_start"], how="left")
    return rows, late


def compare(actual: pd.DataFrame, expected: pd.DataFrame, keys: list[str], exact=("count", "min_value", "max_value"),
            approx=("sum_value", "mean_value"), sketch=()) -> None:
    """Assert equal window sets; exact columns equal, float sums within 1e-9 relative, sketches within 1 %."""
    per_part = "partition" in expected.columns and "partition" not in keys
    ident = [*keys, *(["partition"] if per_part else []), "window_start", "window_end"]
    a = actual.copy()
    for c in ("window_start", "window_end"):
        if str(a[c].dtype).startswith("datetime64"):
            a[c] = a[c].astype("datetime64[ms, UTC]").astype("int64")
    e = expected.copy()
    for c in ("window_start", "window_end"):
        e[c] = e[c].astype("int64")
    m = a.merge(e, on=ident, how="outer", suffixes=("", "_ref"), indicator=True)
    missing = m[m["_merge"] != "both"]
    assert missing.empty, f"{len(missing)} windows differ from the reference:\n{missing[ident + ['_merge']].head(10)}"
    assert len(a) == len(e), f"duplicate windows: {len(a)} rows vs {len(e)} expected"
    for c in exact:
        bad = m[m[c] != m[f"{c}_ref"]]
        assert bad.empty, f"{c} differs:\n{bad[ident + [c, c + '_ref']].head()}"
    for c in approx:
        np.testing.assert_allclose(m[c].to_numpy(float), m[f"{c}_ref"].to_numpy(float), rtol=1e-9, err_msg=c)
    for c in sketch:
        got, ref = m[c].to_numpy(float), m[f"{c}_ref"].to_numpy(float)
        rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)
        assert (rel <= 0.01 + 1e-9).all(), f"{c}: relative error up to {rel.max():.4f}"
