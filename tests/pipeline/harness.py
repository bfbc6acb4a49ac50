"""Drive the pure core over a DataFrame of events, cut into batches."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.merge import LocalMerge
from pipeline.process import Batch, BatchResult, PipelineState, advance, process_batch, udf_rejects
from pipeline.spec import parse_spec


def make_spec(windows: list[dict], ooo="0s", lateness="0s", time_format="epoch_ms", **extra):
    return parse_spec({
        "name": "t",
        "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events"}},
        "event_time": {"field": "ts", "format": time_format, "max_out_of_orderness": ooo, "allowed_lateness": lateness, "idle_timeout": "1h"},
        "windows": windows,
        "sinks": [{"parquet": {"uri": "file:///tmp/unused"}}],
        **extra,
    })


def encode(df: pd.DataFrame) -> list[bytes]:
    cols = [c for c in df.columns if c not in ("partition", "offset")]
    return [json.dumps(dict(zip(cols, row)), separators=(",", ":")).encode() for row in df[cols].itertuples(index=False)]


def run_core(spec, df: pd.DataFrame, cuts: list[int], values: list[bytes] | None = None):
    """Feed ``df`` in batches ending at ``cuts``; return (emitted tables by window, late tables, results)."""
    values = values if values is not None else encode(df)
    parts = df["partition"].to_numpy()
    offs = df["offset"].to_numpy()
    state = PipelineState(spec, sorted(set(parts.tolist())))
    merge = LocalMerge(spec, sorted(set(parts.tolist())))  # merged windows: partial states merged here
    emitted: dict[str, list[pa.Table]] = {}
    late, results = [], []
    bounds = sorted(set([0, *cuts, len(df)]))

    def take(r) -> None:
        merged, failures = merge.feed(r.partials, r.frontiers)
        if failures:  # the merge reports user-function failures of merged rows as the core does
            results.append(BatchResult(udf_failures=udf_rejects(spec, failures)))
        for t in [*r.closed, *merged]:
            emitted.setdefault(t.column("window")[0].as_py(), []).append(t)

    for a, b in zip(bounds[:-1], bounds[1:]):
        r = process_batch(spec, state, Batch.of("events", values[a:b], parts[a:b], offs[a:b]))
        results.append(r)
        take(r)
        if r.late is not None:
            late.append(r.late)
    r = advance(state, to_end=True)
    results.append(r)
    take(r)
    return emitted, late, results, state


def latest(tables: list[pa.Table], keys: list[str]) -> pd.DataFrame:
    """Highest revision per window identity."""
    if not tables:
        return pd.DataFrame()
    df = pa.concat_tables(tables).to_pandas()
    ident = [*keys, *(["partition"] if "partition" in df.columns and "partition" not in keys else []), "window_start"]
    df = df.sort_values("revision").drop_duplicates(ident, keep="last")
    return df.reset_index(drop=True)
