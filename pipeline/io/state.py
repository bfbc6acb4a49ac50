"""Read a checkpoint into tables: what ``raystream state show`` prints (no Ray here).

Like Flink's State Processor API, but read-only: per partition its next offset, watermark and epoch, and every
window slot still held (open, or emitted and kept for allowed lateness) with its group keys, revision and
aggregate values, computed by the same code that finalizes emitted rows. The window definitions come from the
snapshots themselves, so no spec is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from pipeline.checkpoint import decode_partition
from pipeline.io.storage import open_location
from pipeline.spec import CheckpointSpec, WindowSpec
from pipeline.watermarks import NEG_INF, POS_INF
from pipeline.windows import WindowState, open_rows, restore_window

__all__ = ["CheckpointState", "read_state"]


@dataclass
class CheckpointState:
    """One checkpoint, decoded: ``partitions`` (one row each) and ``windows`` (name -> slot rows)."""

    pipeline: str
    checkpoint: int
    created: float
    final: bool
    partitions: pa.Table
    windows: dict[str, pa.Table] = field(default_factory=dict)
    merge_snapshots: int = 0
    merged: dict[str, pa.Table] = field(default_factory=dict)  # the merge owners' held groups, merged (revision 0)


def _ms(v: int) -> datetime | None:
    return None if v <= NEG_INF or v >= POS_INF else datetime.fromtimestamp(v / 1000, timezone.utc)


def _pipelines(uri: str, s3_endpoint_url: str | None) -> list[str]:
    loc = open_location(uri, s3_endpoint_url)
    return sorted({rel.split("/")[0] for rel in loc.list("") if "/chk-" in rel and rel.endswith("_manifest.json")})


def read_state(uri: str, pipeline: str | None = None, checkpoint: int | None = None, partition: int | None = None,
               s3_endpoint_url: str | None = None) -> CheckpointState:
    """Checkpoint ``checkpoint`` (default: the newest readable) of ``pipeline`` under ``uri`` (a spec's
    ``checkpoint.uri``; ``uri`` may also end with the pipeline's folder). Only ``partition`` when given."""
    from pipeline.io.checkpoints import CheckpointStore

    if pipeline is None:
        found = _pipelines(uri, s3_endpoint_url)
        if not found:  # the uri may be the pipeline's own folder
            base, _, name = uri.rstrip("/").rpartition("/")
            if name and _pipelines(base, s3_endpoint_url).count(name):
                uri, found = base, [name]
        if len(found) != 1:
            raise ValueError(f"{uri}: " + (f"checkpoints of several pipelines ({', '.join(found)}): name one with --pipeline"
                                           if found else "no checkpoint found"))
        pipeline = found[0]
    store = CheckpointStore(CheckpointSpec(uri=uri, s3_endpoint_url=s3_endpoint_url), pipeline)
    manifest = store.manifest(checkpoint) if checkpoint is not None else store.latest()
    if manifest is None:
        raise ValueError(f"{uri}: pipeline {pipeline!r} has no readable checkpoint")
    rows: dict[str, list] = {k: [] for k in ("partition", "offset", "epoch", "watermark", "max_event_time", "slots", "bytes")}
    windows: dict[str, list[pa.Table]] = {}
    for p, entry in sorted(manifest["partitions"].items()):
        if partition is not None and int(p) != int(partition) or not entry.get("path"):
            continue
        snap = decode_partition(store.read_partition(entry["path"]))
        wm = snap.meta["watermark"]
        slots = 0
        for name, tables in snap.tables.items():
            saved = snap.meta["windows"].get(name)
            if name == "" or saved is None or "slots" not in tables:
                continue
            w = WindowState(WindowSpec.model_validate(saved), 0)
            slots += restore_window(w, int(p), tables)
            t = open_rows(w, {}, emitted=True)
            if t is not None:
                windows.setdefault(name, []).append(t)
        rows["partition"].append(int(p))
        rows["offset"].append(snap.offset)
        rows["epoch"].append(int(snap.meta["epoch"]))
        rows["watermark"].append(_ms(int(wm["effective"])))
        rows["max_event_time"].append(_ms(int(wm["max_event"])))
        rows["slots"].append(slots)
        rows["bytes"].append(int(entry.get("bytes", 0)))
    if partition is not None and not rows["partition"]:
        raise ValueError(f"checkpoint {manifest['id']} of {pipeline!r} has no partition {partition} "
                         f"(it has {sorted(manifest['partitions'])})")
    merged = {} if partition is not None else _merged(store, manifest, pipeline)
    parts = pa.table({**rows, "watermark": pa.array(rows["watermark"], pa.timestamp("ms", "UTC")),
                      "max_event_time": pa.array(rows["max_event_time"], pa.timestamp("ms", "UTC"))})
    return CheckpointState(pipeline, int(manifest["id"]), float(manifest.get("created", 0)), bool(manifest.get("final")),
                           parts, {n: pa.concat_tables(ts, promote_options="default").sort_by(
                               [("partition", "ascending"), ("window_start", "ascending")]) for n, ts in windows.items()},
                           len(manifest.get("merge", {}) or {}), merged)


def _merged(store, manifest: dict, pipeline: str) -> dict[str, pa.Table]:
    """What the merge owners of a checkpoint hold: per merged window, every group's partials merged (as a preview,
    revision 0). The owners' window definitions come from their snapshots."""
    from pipeline.checkpoint import decode_merge, decode_partition_tables
    from pipeline.merge import Merger
    from pipeline.spec import PipelineSpec

    out: dict[str, list[pa.Table]] = {}
    partitions = sorted(int(p) for p in manifest["partitions"])
    for _, entry in sorted((manifest.get("merge") or {}).items(), key=lambda kv: int(kv[0])):
        if not entry.get("path"):
            continue
        data = store.read_partition(entry["path"])
        saved = decode_partition_tables(data)[0].get("windows", {})
        if not saved:
            continue
        # a spec holding just these windows (source and sink are placeholders: nothing is read or written)
        spec = PipelineSpec.model_validate({"name": pipeline, "windows": list(saved.values()),
                                            "source": {"kafka": {"bootstrap_servers": "-:0", "topic": "-"}},
                                            "sinks": [{"parquet": {"uri": "file:///-"}}]})
        merger = Merger(spec, partitions, windows=list(saved))
        decode_merge(data, merger)
        for name, mw in merger.windows.items():
            t = mw.open_rows()
            if t is not None and t.num_rows:
                out.setdefault(name, []).append(t)
    return {n: pa.concat_tables(ts, promote_options="default").sort_by([("window_start", "ascending")])
            for n, ts in out.items()}
