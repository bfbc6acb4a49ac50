"""Window identity and sink names, built in one place for every sink and for ``serve/``.

A window row is identified by (pipeline, window, window start, group keys),
and by its source partition too for a ``per_partition`` window. Names derived from it must never let two pipelines or two windows
share a table, key space or series: names that differ only by case, by
``-``/``_``, or past a length limit are different names. So every derived name
that has to be squeezed (a PostgreSQL identifier: lower case, ``[a-z0-9_]``, at
most 63 bytes) carries a digest of the exact (pipeline, window) pair, and every
key or series that several pipelines may share names the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from pipeline.spec import PipelineSpec

__all__ = ["SHARD_KEY", "SinkContext", "shard_of_table", "with_shard", "WindowLayout", "identity_columns", "identity_key", "sql_table", "value_columns",
           "window_digest", "POSTGRES_MAX_IDENT"]

POSTGRES_MAX_IDENT = 63


@dataclass(frozen=True)
class WindowLayout:
    """What a sink needs to know of one window: its kind, keys, identity and value columns."""

    name: str
    type: str
    group_by: tuple[str, ...]
    identity: tuple[str, ...]
    values: tuple[str, ...]
    retention: int | None = None  # ms of rows kept where the sink can expire them
    size: int | None = None  # ms (tumbling, sliding)


@dataclass(frozen=True)
class SinkContext:
    """What every sink gets besides its own config: the pipeline's name, its windows, and its source
    (the Kafka sink defaults to the source's brokers and partition count). Not the whole spec."""

    pipeline: str
    windows: dict[str, WindowLayout]
    source_bootstrap: str
    source_topic: str
    connect_timeout_s: float

    @classmethod
    def of(cls, spec: "PipelineSpec | SinkContext") -> "SinkContext":
        if isinstance(spec, SinkContext):
            return spec
        windows = {w.name: WindowLayout(w.name, w.type, tuple(w.group_by), tuple(identity_columns(spec, w.name)),
                                        tuple(a.column for a in w.aggregations), w.retention, w.size) for w in spec.windows}
        kafka = spec.source.kafka
        return cls(spec.name, windows, kafka.bootstrap_servers, kafka.topic, kafka.connect_timeout / 1000.0)


def value_columns(spec: "PipelineSpec | SinkContext", window: str) -> list[str]:
    """The aggregation columns of a window row, in spec order."""
    if isinstance(spec, SinkContext):
        return list(spec.windows[window].values)
    w = next(w for w in spec.windows if w.name == window)
    return [a.column for a in w.aggregations]


def identity_columns(spec: "PipelineSpec | SinkContext", window: str) -> list[str]:
    """Columns naming one window row: start (and, for tumbling/sliding, end), group keys, and the source partition
    for a ``per_partition`` window.

    A session's end is not part of its identity: a session extended after it
    was written (a backfill flushed it at the end of input, the resumed run
    added records) is the same session with a higher revision, and replaces
    the earlier row instead of standing beside it.
    """
    if isinstance(spec, SinkContext):
        return list(spec.windows[window].identity)
    w = next(w for w in spec.windows if w.name == window)
    bounds = ["window_start"] if w.type == "session" else ["window_start", "window_end"]
    return [*bounds, *w.group_by, *(["partition"] if w.per_partition else [])]


def identity_key(pipeline: str, row: dict, ident: list[str]) -> str:
    """A stable string for one window row: JSON ``[pipeline, window, *identity values]`` (no value can break out)."""
    return json.dumps([pipeline, row["window"], *(row[c] for c in ident)], separators=(",", ":"), default=str)


def window_digest(pipeline: str, window: str) -> str:
    """10 hex digits of SHA-256 over the exact names (40 bits: collisions need ~10^6 windows on one database)."""
    return hashlib.sha256(f"{pipeline}\x00{window}".encode()).hexdigest()[:10]


def sql_table(prefix: str, pipeline: str, window: str) -> str:
    """PostgreSQL table of one window: ``<prefix><pipeline>_<window>`` made a plain identifier, cut to fit,
    then ``_<digest>`` of the exact names, so a-b / a_b, A / a and long names stay apart."""
    digest = window_digest(pipeline, window)
    readable = re.sub(r"[^a-z0-9_]", "_", f"{prefix}{pipeline}_{window}".lower())
    room = POSTGRES_MAX_IDENT - len(digest) - 1 - 6  # 6: the "_ident" constraint suffix must fit as well
    return f"{readable[:room]}_{digest}"


SHARD_KEY = b"raystream.shard"


def with_shard(table, shard: str):
    """Mark a table of rows without ``partition`` as one shard's groups (``p<partition>`` or ``m<owner>``): a sink
    that rewrites files whole (Parquet) keeps one file per shard, so writers of different shards never clash."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), SHARD_KEY: shard.encode()})


def shard_of_table(table) -> str:
    return (table.schema.metadata or {}).get(SHARD_KEY, b"0").decode()
