"""Per-partition state snapshots as Arrow IPC (pure: no storage, no Ray).

A partition's snapshot holds everything needed to continue it elsewhere: its
open window slots (bounds, revisions, keys, aggregate states, sketch/distinct
rows), its watermark, and the next offset to read. It is one Arrow IPC file
with one row per table (``name``, ``ipc``): partitions are independent (window
state is per partition), so they can be checkpointed, moved and restored one
by one.
"""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.process import PipelineState
from pipeline.windows import restore_window, snapshot_window

__all__ = ["PartitionSnapshot", "decode_merge", "decode_partition", "encode_merge", "encode_partition", "restore_partition"]

FORMAT = 1
_OUTER = pa.schema([("name", pa.string()), ("ipc", pa.large_binary())])


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class PartitionSnapshot:
    """Decoded snapshot of one partition."""

    def __init__(self, meta: dict, tables: dict[str, dict[str, pa.Table]]):
        self.meta = meta
        self.tables = tables  # window name -> table name -> table

    @property
    def offset(self) -> int:
        return int(self.meta["offset"])


def encode_partition(state: PipelineState, partition: int, offset: int, epoch: int, checkpoint_id: int) -> bytes:
    """Snapshot ``partition`` of ``state`` (after every record before ``offset``)."""
    names, blobs = [], []
    meta = {
        "format": FORMAT,
        "partition": int(partition),
        "offset": int(offset),
        "epoch": int(epoch),
        "checkpoint": int(checkpoint_id),
        "pipeline": state.spec.name,
        "windows": {w.name: w.model_dump(mode="json") for w in state.spec.windows},
        "watermark": state.tracker.snapshot(partition),
    }
    names.append("meta")
    blobs.append(json.dumps(meta).encode())
    for name, w in state.windows.items():
        for tname, t in snapshot_window(w, partition).items():
            names.append(f"{name}/{tname}")
            blobs.append(_ipc(t))
    seen = state.seen.get(int(partition))
    if seen:
        items = list(seen.items())
        names.append("dedup")
        blobs.append(_ipc(pa.table({"id": pa.array([str(k) for k, _ in items]), "time": pa.array([v[0] for _, v in items], pa.int64()),
                                    "offset": pa.array([v[1] for _, v in items], pa.int64())})))
    return _ipc(pa.table([pa.array(names, pa.string()), pa.array(blobs, pa.large_binary())], schema=_OUTER))


def decode_partition(data: bytes) -> PartitionSnapshot:
    meta, tables = decode_partition_tables(data)
    if "dedup" in tables:  # stored under its own name, not a window's
        tables.setdefault("", {})["dedup"] = tables.pop("dedup")[""]
    return PartitionSnapshot(meta, tables)


def restore_partition(state: PipelineState, snap: PartitionSnapshot) -> int:
    """Load ``snap`` into ``state`` (which must not hold that partition's windows yet); returns slots restored."""
    p = int(snap.meta["partition"])
    saved = snap.meta.get("windows", {})
    for w in state.spec.windows:
        if w.name in saved and not same_window(saved[w.name], w.model_dump(mode="json")):
            raise ValueError(
                f"window {w.name!r} changed since checkpoint {snap.meta['checkpoint']}: its state cannot be restored; "
                "give the changed window a new name (or start from no checkpoint)"
            )
    state.tracker.add_partition(p)
    state.tracker.restore(p, snap.meta["watermark"])
    restored = 0
    dedup = snap.tables.get("", {}).get("dedup")
    if dedup is not None:
        state.seen[p] = {k: (t, o) for k, t, o in zip(dedup["id"].to_pylist(), dedup["time"].to_pylist(), dedup["offset"].to_pylist())}
    for name, tables in snap.tables.items():
        if name == "":
            continue
        w = state.windows.get(name)
        if w is None:
            continue  # a window removed from the spec: its state is dropped (a new one starts empty)
        restored += restore_window(w, p, tables)
    return restored


def same_window(saved: dict, current: dict) -> bool:
    """A window definition as checkpointed equals the current one (options added since, left at their
    defaults, do not count as a change)."""
    return all(saved[k] == v if k in saved else v in (None, False, []) for k, v in current.items())


def encode_merge(merger, shard: int, checkpoint_id: int) -> bytes:
    """Snapshot of a merge owner (``pipeline.merge.Merger``): its partials, frontiers and emitted revisions."""
    meta = {"format": FORMAT, "shard": int(shard), "checkpoint": int(checkpoint_id), "pipeline": merger.spec.name,
            "windows": {w.name: w.model_dump(mode="json") for w in merger.spec.windows if w.name in merger.windows}}
    names, blobs = ["meta"], [json.dumps(meta).encode()]
    for window, tables in merger.snapshot().items():
        for tname, t in tables.items():
            names.append(f"{window}/{tname}")
            blobs.append(_ipc(t))
    return _ipc(pa.table([pa.array(names, pa.string()), pa.array(blobs, pa.large_binary())], schema=_OUTER))


def decode_merge(data: bytes, merger) -> dict:
    """Load an ``encode_merge`` snapshot into ``merger`` (fresh); returns its meta. A window whose definition
    changed since is refused, as for partitions."""
    meta, tables = decode_partition_tables(data)
    for name, saved in meta.get("windows", {}).items():
        w = next((w for w in merger.spec.windows if w.name == name), None)
        if w is not None and not same_window(saved, w.model_dump(mode="json")):
            raise ValueError(f"window {name!r} changed since checkpoint {meta['checkpoint']}: its merged state cannot be "
                             "restored; give the changed window a new name (or start from no checkpoint)")
    merger.restore(tables)
    return meta


def decode_partition_tables(data: bytes) -> tuple[dict, dict[str, dict[str, pa.Table]]]:
    """(meta, window name -> table name -> table) of a partition or merge-owner snapshot."""
    outer = _table(data)
    meta: dict = {}
    tables: dict[str, dict[str, pa.Table]] = {}
    for name, blob in zip(outer.column("name").to_pylist(), outer.column("ipc").to_pylist()):
        if name == "meta":
            meta = json.loads(blob)
        else:
            window, _, tname = name.partition("/")
            tables.setdefault(window, {})[tname] = _table(blob)
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {meta.get('format')!r} is not {FORMAT}")
    return meta, tables
