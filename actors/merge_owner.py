"""MergeOwner: a Ray actor shell around ``pipeline.merge.Merger``, and the workers' side of the shuffle.

Each owner holds the merged windows of the groups whose stable hash falls in
its shard. Workers call ``feed`` with a batch's partial states (only the
owner's groups) and then every partition's frontier; a worker has at most one
batch in flight and waits for it before sending the next, before its
checkpoint snapshot and before it drains: so when a worker's snapshot is taken
every partial it shipped is already in its owners, and an owner snapshot
taken after the workers' holds at least what their checkpointed positions
shipped (see ``Coordinator._checkpoint``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import ray

from actors.metrics import ray_metrics
from actors.runtime import NAMESPACE, actor_name
from actors.fence import EpochFence
from pipeline.checkpoint import decode_merge, encode_merge
from pipeline.identity import with_shard
from pipeline.io.checkpoints import CheckpointStore
from pipeline.logs import configure_logging
from pipeline.io.kafka import DeadLetterProducer
from pipeline.io.loop import Fenced
from pipeline.io.sinks.common import Backpressure, make_sink
from pipeline.merge import Merger, reshard, root_window, split_by_shard
from pipeline.metrics import LoopMetrics
from pipeline.process import udf_rejects
from pipeline.spec import PipelineSpec
from pipeline.tracing import make_tracer

__all__ = ["MergeOwner", "RemoteMerge", "owner_name"]


def owner_name(pipeline: str, shard: int) -> str:
    return actor_name(pipeline, f"merge-{shard}")


@ray.remote(max_restarts=0, max_concurrency=16)
class MergeOwner:
    """Merges the partial states of one shard of the groups and writes the merged rows to the sinks."""

    def __init__(self, spec: PipelineSpec, shard: int, partitions: list[int], snapshot_path: str | None = None,
                 reshard_from: list[str] | None = None, epoch: int = 0):
        """``snapshot_path``: this shard's snapshot; ``reshard_from``: every owner's snapshot of a checkpoint
        taken with another number of owners (this owner keeps the groups that hash to it now)."""
        self.spec = spec
        self.shard = shard
        self.epoch = epoch
        self.fence = EpochFence(spec.name, "owner_epoch_of")
        self.store = CheckpointStore(spec.checkpoint, spec.name) if spec.checkpoint else None
        self.restored_from = snapshot_path or reshard_from
        if reshard_from:
            self.merger = reshard(spec, partitions, [self.store.read_partition(p) for p in reshard_from], shard,
                                  spec.owners, decode_merge)
        else:
            self.merger = Merger(spec, partitions)
            if snapshot_path:
                decode_merge(self.store.read_partition(snapshot_path), self.merger)
        self.sinks = [make_sink(spec, s) for s in spec.window_sinks]
        self.dlq = DeadLetterProducer(spec.source.kafka.bootstrap_servers, spec.dead_letter_topic, spec.name)
        self.lock = threading.Lock()
        self.stats = {"feeds": 0, "partials": 0, "rows_emitted": 0, "udf_errors": 0, "sink_wait_s": 0.0}
        self.store_wait: dict | None = None
        self.finished = False
        self.metrics = LoopMetrics(ray_metrics(spec.observability.metrics), spec.name, f"merge-{shard}")
        self.tracer = make_tracer(spec.observability.tracing, "raystream-merge-owner")
        configure_logging()  # the format of the process that started Ray (RAYSTREAM_LOG_FORMAT)

    def pid(self) -> int:
        return os.getpid()

    def feed(self, partials: dict, frontiers: dict, trace: str | None = None) -> int:
        """One worker batch: its partials for this shard, then its partitions' frontiers; writes what is ready.
        ``trace``: the worker's batch span (this owner's emit and sink write spans are its children)."""
        with self.lock, (self.tracer.span("merge", {"raystream.shard": self.shard}, parent=trace) if trace
                         else contextlib.nullcontext()):
            if self.finished:
                raise RuntimeError(f"merge owner {self.shard} has finished")
            n = 0
            for window, tables in partials.items():
                n += self.merger.add(window, tables)
            self.merger.advance(frontiers)
            merged, failures = self.merger.close()
            if (merged or failures) and not self._fence():
                # replaced while it was frozen or cut off: a newer set of owners writes these windows now
                self.finished = True
                raise Fenced(f"merge owner {self.shard} of epoch {self.epoch} was replaced: it writes nothing")
            for t in merged:
                self._write(with_shard(t, f"m{self.shard}"))
            if failures:
                self.stats["udf_errors"] += len(failures)
                self.dlq.write(udf_rejects(self.spec, failures))
            self.stats["feeds"] += 1
            self.stats["partials"] += n
            self.stats["rows_emitted"] += sum(t.num_rows for t in merged)
            return n

    def _fence(self) -> bool:
        """This owner's epoch is still the coordinator's (see ``actors.fence``)."""
        return self.fence.confirm(self.epoch)

    def _write(self, table) -> None:
        window = table.column("window")[0].as_py() if table.num_rows else None
        if table.num_rows:
            self.metrics.emitted(window, table)
        with self.tracer.span("window emit", {"raystream.window": window, "raystream.rows": table.num_rows}):
            for sink in self.sinks:
                with self.tracer.span("sink write", {"raystream.sink": sink.name, "raystream.rows": table.num_rows}):
                    self._write_sink(sink, table)

    def _write_sink(self, sink, table) -> None:
        waited = 0.0
        while True:
            try:
                t0 = time.perf_counter()
                sink.write(table)
                self.metrics.sink_write(sink.name, time.perf_counter() - t0)
                break
            except Backpressure as bp:  # the workers wait on this call: backpressure reaches them
                self.store_wait = {"store": bp.store, "attempts": bp.attempt, "error": str(bp.error)[:300]}
                self.metrics.store_wait(bp.store)
                t0 = time.monotonic()
                time.sleep(bp.delay_s)
                waited += time.monotonic() - t0
        self.stats["sink_wait_s"] += waited
        if self.store_wait is not None:
            self.metrics.store_back(self.store_wait["store"], waited)
        self.store_wait = None

    def snapshot(self, checkpoint_id: int, epoch: int) -> dict:
        """Write this owner's state for checkpoint ``checkpoint_id``; returns its manifest entry."""
        with self.lock:
            data = encode_merge(self.merger, self.shard, checkpoint_id)
            return {"path": self.store.write_merge(checkpoint_id, self.shard, epoch, data), "bytes": len(data)}

    def open_partials(self, window: str, filters: dict[str, str]) -> dict | None:
        with self.lock:
            mw = self.merger.windows.get(window)
            return None if mw is None else mw.open_partials(filters)

    def finish(self) -> dict:
        """After every worker flushed: close the clients."""
        with self.lock:
            self.finished = True
            for c in (*(s.close for s in self.sinks), self.dlq.close):
                try:
                    c()
                except Exception:  # closing a client that lost its store must not hide the result
                    pass
            return self.status()

    def status(self) -> dict:
        from pipeline.io.loop import _rss_bytes

        self.max_rss = max(getattr(self, "max_rss", 0), _rss_bytes())
        return {"shard": self.shard, "epoch": self.epoch, "pid": os.getpid(), "open_slots": self.merger.open_slots, "max_rss_bytes": self.max_rss,
                "store_wait": self.store_wait, "restored_from": self.restored_from, **self.stats}


class RemoteMerge:
    """The worker's side: route a batch's partials to their owners and wait for them (``PartitionLoop.merge_out``)."""

    def __init__(self, spec: PipelineSpec, owners: int, on_wait=None):
        self.spec = spec
        self.owners = owners
        self.handles: dict[int, object] = {}
        self.group_by = {w.name: list(w.group_by) for w in spec.windows}
        self.on_wait = on_wait  # (store, attempt, error, since): the loop reports the wait as backpressure
        self._last: dict | None = None
        self._pending: list = []

    def _owner(self, k: int):
        h = self.handles.get(k)
        if h is None:
            h = self.handles[k] = ray.get_actor(owner_name(self.spec.name, k), namespace=NAMESPACE)
        return h

    def __call__(self, partials: dict, frontiers: dict, trace: str | None = None) -> None:
        """Send one batch's partials and frontiers. At most one batch is in flight: the previous one is waited
        for first (its owners' work overlaps this worker's next batch, and an owner, which runs calls on
        several threads, never sees one worker's batches out of order)."""
        by_owner: dict[int, dict] = {}
        for window, tables in partials.items():
            for k, part in split_by_shard(root_window(self.spec, window), self.group_by[window], tables, self.owners).items():
                by_owner.setdefault(k, {})[window] = part
        if not by_owner and frontiers == self._last:
            return
        self.flush()
        # every owner gets the batch's context: the windows its frontiers close are emitted under it
        self._pending = [self._owner(k).feed.remote(by_owner.get(k, {}), frontiers, trace) for k in range(self.owners)]
        self._last = frontiers

    def flush(self) -> None:
        """Wait until the owners applied every batch sent (before a checkpoint snapshot, and at the end)."""
        refs, self._pending = self._pending, []
        if not refs:
            return
        since, attempt = time.monotonic(), 0
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
            if len(ready) == len(refs):
                break
            attempt += 1
            if self.on_wait is not None:  # an owner waits on a sink: this worker is held back, not stalled
                store, error = "merge owners", "waiting for the merge owners"
                for k in range(self.owners):
                    try:
                        wait = ray.get(self._owner(k).status.remote(), timeout=1.0).get("store_wait")
                    except Exception:  # busy or gone: the next round asks again
                        continue
                    if wait:  # the store itself, as if this worker wrote it (the owner writes for it)
                        store, error = wait["store"], f"{wait['error']} (merge owner {k} writing)"
                        break
                self.on_wait(store, attempt, RuntimeError(error), since)
        try:
            ray.get(refs)
        except ray.exceptions.RayActorError:
            self.handles.clear()  # the coordinator restores the owners (and every worker with them)
            raise
        except ray.exceptions.RayTaskError as exc:  # the owner's own error (a sink that gave up), as itself
            raise exc.cause from None
