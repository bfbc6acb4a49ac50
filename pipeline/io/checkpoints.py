"""Checkpoint storage on file:// or s3:// (no Ray here).

Layout under ``<uri>/<pipeline>/``::

    chk-00000012/partition=3/epoch=5.arrow   one partition's snapshot (Arrow IPC)
    chk-00000012/_manifest.json              written last: the checkpoint exists only then

A manifest maps every partition to the snapshot to restore (offset, epoch,
path). Partitions are independent, so a manifest may reuse, for a partition
that missed this round, its entry from the previous manifest; a snapshot
written by a worker whose epoch is stale is never named by a manifest.
"""

from __future__ import annotations

import json
import re
import time

from pipeline.io.storage import Location, open_location
from pipeline.spec import CheckpointSpec

__all__ = ["CheckpointStore", "commit_checkpoint"]

_CHK = re.compile(r"^chk-(\d+)/_manifest\.json$")


class CheckpointStore:
    """Reads and writes the checkpoints of one pipeline."""

    def __init__(self, cfg: CheckpointSpec, pipeline: str):
        self.cfg = cfg
        self.pipeline = pipeline
        self.location: Location = open_location(cfg.uri, cfg.s3_endpoint_url, cfg.s3_region)
        self.warnings: list[str] = []

    @staticmethod
    def folder(checkpoint_id: int) -> str:
        return f"chk-{checkpoint_id:08d}"

    def write_partition(self, checkpoint_id: int, partition: int, epoch: int, data: bytes) -> str:
        rel = f"{self.folder(checkpoint_id)}/partition={partition}/epoch={epoch}.arrow"
        self.location.write_bytes(f"{self.pipeline}/{rel}", data)
        return rel

    def write_merge(self, checkpoint_id: int, shard: int, epoch: int, data: bytes) -> str:
        """A merge owner's snapshot (named in the manifest's ``merge`` entries)."""
        rel = f"{self.folder(checkpoint_id)}/merge={shard}/epoch={epoch}.arrow"
        self.location.write_bytes(f"{self.pipeline}/{rel}", data)
        return rel

    def read_partition(self, rel: str) -> bytes:
        data = self.location.read_bytes(f"{self.pipeline}/{rel}")
        if data is None:
            raise FileNotFoundError(f"checkpoint file {self.location.path(self.pipeline, rel)} is missing")
        return data

    def write_manifest(self, checkpoint_id: int, partitions: dict[int, dict], epoch: int, extra: dict | None = None) -> dict:
        manifest = {
            "id": checkpoint_id, "pipeline": self.pipeline, "created": time.time(), "epoch": epoch,
            "partitions": {str(p): e for p, e in sorted(partitions.items())}, **(extra or {}),
        }
        self.location.write_bytes(f"{self.pipeline}/{self.folder(checkpoint_id)}/_manifest.json",
                                  json.dumps(manifest, indent=1).encode())
        return manifest

    def ids(self) -> list[int]:
        """Ids of complete checkpoints (those with a manifest), ascending."""
        out = []
        for rel in self.location.list(self.pipeline):
            m = _CHK.match(rel.split("/", 1)[1] if "/" in rel else rel)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def all_ids(self) -> list[int]:
        """Ids of every checkpoint folder, complete or not."""
        ids = set()
        for rel in self.location.list(self.pipeline):
            part = rel.split("/", 2)[1] if rel.count("/") >= 1 else ""
            if part.startswith("chk-"):
                ids.add(int(part[4:]))
        return sorted(ids)

    def manifest(self, checkpoint_id: int) -> dict:
        data = self.location.read_bytes(f"{self.pipeline}/{self.folder(checkpoint_id)}/_manifest.json")
        if data is None:
            raise FileNotFoundError(f"checkpoint {checkpoint_id} has no manifest")
        m = json.loads(data)
        m["partitions"] = {int(p): e for p, e in m["partitions"].items()}
        return m

    def latest(self) -> dict | None:
        """The newest readable manifest (None without any).

        A newer manifest that cannot be read (corrupted, truncated) is skipped
        for the one before it, with a warning naming both ids in ``warnings``.
        """
        ids = self.ids()
        for i in range(len(ids) - 1, -1, -1):
            try:
                return self.manifest(ids[i])
            except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
                older = ids[i - 1] if i else None
                msg = (f"checkpoint {ids[i]} has an unreadable manifest ({type(exc).__name__}: {exc}); "
                       + (f"restoring from the older checkpoint {older}" if older is not None else "no older checkpoint"))
                if msg not in self.warnings:
                    self.warnings.append(msg)
        return None

    def rewind(self, checkpoint_id: int) -> dict:
        """Make checkpoint ``checkpoint_id`` the one a run resumes from, although newer ones exist.

        Steps, in order: 1. read its manifest (it must be complete and
        readable); 2. write its entries as a new manifest with the next id,
        marked ``restored_from`` and not final (the run that follows replays
        and holds back output it may already have written); 3. record a
        warning naming both ids. Newer checkpoints stay on disk until pruned.
        """
        target = self.manifest(checkpoint_id)
        newest = self.latest()
        cid = max(self.all_ids(), default=0) + 1
        extra = {"restored_from": checkpoint_id}
        if "merge" in target:  # the merge owners' state of that checkpoint goes with its partitions
            extra["merge"] = target["merge"]
        manifest = self.write_manifest(cid, target["partitions"], int((newest or target).get("epoch", 0)), extra)
        offsets = ", ".join(f"{p}: {e['offset']}" for p, e in sorted(target["partitions"].items()))
        self.warnings.append(
            f"restoring from checkpoint {checkpoint_id}, older than the latest {newest['id'] if newest else '?'}: "
            f"its input is read again, windows are re-emitted with the same revisions, and the consumer group's "
            f"offsets move back to {{{offsets}}} (written as checkpoint {cid})")
        return manifest

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` complete checkpoints, and abandoned folders older than them.

        Files a kept manifest still names (reused partition entries, merge owners' snapshots) stay.
        """
        ids = self.ids()
        kept = ids[-keep:]
        if not kept:
            return []
        needed = set()
        for cid in kept:
            try:
                m = self.manifest(cid)
                entries = [*m["partitions"].values(), *m.get("merge", {}).values()]
            except (ValueError, KeyError, TypeError, FileNotFoundError, AttributeError):
                continue  # an unreadable manifest names nothing to keep (latest() skips it too)
            for e in entries:
                if e.get("path"):  # a partition never checkpointed has no file
                    needed.add(e["path"].split("/", 1)[0])
        deleted = []
        for cid in self.all_ids():
            if cid >= kept[0] or self.folder(cid) in needed:
                continue
            self.location.delete(f"{self.pipeline}/{self.folder(cid)}")
            deleted.append(cid)
        return deleted


def commit_checkpoint(store: CheckpointStore, checkpoint_id: int, entries: dict[int, dict], partitions: list[int],
                      epoch: int, keep: int, commit_offsets, final: bool = False,
                      merge: dict[int, dict] | None = None) -> tuple[dict, list[str]]:
    """Complete checkpoint ``checkpoint_id`` from the partition snapshots written for it (coordinator and inline runs).

    Steps, in order:
    1. every partition of the run gets an entry: its new snapshot, else the
       previous manifest's entry (a partition that missed this round keeps its
       last snapshot), else "from the start" (offset 0, no file);
    2. write the manifest: the checkpoint exists from here on; it is marked
       ``final`` only when asked and every partition has a new snapshot in it;
    3. prune to the newest ``keep`` checkpoints;
    4. commit the manifest's offsets to the consumer group with
       ``commit_offsets(offsets)`` (for lag tools).
    A failure in step 2 raises (the checkpoint does not exist); failures in
    steps 3-4 are returned as problems (old files stay for the next prune; lag
    tools lag a little).
    """
    previous = store.latest()
    saved = previous["partitions"] if previous else {}
    merged = {p: entries.get(p) or saved.get(p) or {"offset": 0, "path": None} for p in sorted(partitions)}
    final = final and all(p in entries for p in partitions)
    extra: dict = {"final": True} if final else {}
    if merge is not None:
        # the merge owners' snapshots, taken after every partition snapshot above: they hold at least what those
        # partitions had shipped (a replay from the partitions' offsets re-ships nothing newer than they hold)
        extra["merge"] = {str(k): e for k, e in sorted(merge.items())}
    manifest = store.write_manifest(checkpoint_id, merged, epoch, extra or None)
    problems = []
    try:
        store.prune(keep)
    except Exception as exc:  # step 3 is housekeeping: the checkpoint is complete
        problems.append(f"prune failed: {type(exc).__name__}: {exc}")
    offsets = {p: e["offset"] for p, e in merged.items() if e.get("path")}
    try:
        commit_offsets(offsets)
    except Exception as exc:  # step 4 only informs lag tools: the checkpoint is complete
        problems.append(f"offset commit failed: {type(exc).__name__}: {exc}")
    return manifest, problems
