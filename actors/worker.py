"""PartitionWorker: a Ray actor shell around ``PartitionLoop``.

The loop runs in a thread of the actor; ``status``, ``checkpoint``, ``stop``
and ``finish`` answer in others. Before writing anything the loop checks, at
most once a second, that the coordinator still gives its partitions to this
worker's epoch (the fence): a worker replaced while it was stalled stops
without writing when it wakes up.
"""

from __future__ import annotations

import os
import threading
import time
import traceback

import ray

from actors.fence import EpochFence
from actors.metrics import ray_metrics
from pipeline.io.checkpoints import CheckpointStore
from pipeline.logs import configure_logging
from pipeline.io.loop import Fenced, PartitionLoop
from pipeline.spec import PipelineSpec

__all__ = ["PartitionWorker"]

@ray.remote(max_restarts=0, max_concurrency=8)
class PartitionWorker:
    """Owns a set of partitions for one epoch."""

    def __init__(self, spec: PipelineSpec, index: int):
        self.spec = spec
        self.index = index
        self.loop: PartitionLoop | None = None
        self.thread: threading.Thread | None = None
        self.state = "idle"
        self.error: str | None = None
        self.result: dict | None = None
        self.created_at = time.time()
        self.store = CheckpointStore(spec.checkpoint, spec.name) if spec.checkpoint else None
        self.fence = EpochFence(spec.name, "epoch_of", index)
        self.metrics = None
        self.node_id = ray.get_runtime_context().get_node_id()
        configure_logging()  # the format of the process that started Ray (RAYSTREAM_LOG_FORMAT)

    def pid(self) -> int:
        return os.getpid()

    def start(self, partitions: list[int], epoch: int, entries: dict[int, dict], end_offsets: dict[int, int] | None,
              until_end: bool, resumed: bool = False) -> dict:
        """Restore ``partitions`` from their checkpoint entries (offset, path) and start consuming.

        ``resumed``: the previous owner may have written output past these positions (see ``PartitionLoop``)."""
        snapshots = {}
        for p, e in entries.items():
            if e.get("path"):
                snapshots[int(p)] = self.store.read_partition(e["path"])
        start = {int(p): int(e.get("offset", 0)) for p, e in entries.items()}
        merge_out = None
        if self.spec.owners:
            from actors.merge_owner import RemoteMerge

            merge_out = RemoteMerge(self.spec, self.spec.owners)
        if self.metrics is None:
            self.metrics = ray_metrics(self.spec.observability.metrics)
        self.loop = PartitionLoop(self.spec, partitions, start, end_offsets, epoch, snapshots, fence=self._fence,
                                  resumed=resumed, merge_out=merge_out, metrics=self.metrics, worker=str(self.index))
        if merge_out is not None:
            merge_out.on_wait = self.loop._backpressure
        self.state = "running"
        self.thread = threading.Thread(target=self._run, args=(until_end,), name="partition-loop", daemon=True)
        self.thread.start()
        return {"index": self.index, "pid": os.getpid(), "node": self.node_id, "restored_slots": self.loop.restored_slots,
                "positions": dict(self.loop.positions)}

    def _run(self, until_end: bool) -> None:
        try:
            self.result = self.loop.run(until_end, finish=False)
            self.state = "drained"
        except Fenced as exc:
            self.state, self.error = "fenced", str(exc)
        except Exception as exc:  # reported to the coordinator, which restarts this worker
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"

    def _fence(self) -> bool:
        return self.fence.confirm(self.loop.epoch, stopping=lambda: self.loop is not None and self.loop._stop.is_set())

    def checkpoint(self, checkpoint_id: int, epoch: int, timeout_s: float) -> dict[int, dict]:
        """Snapshot every partition between two batches; returns the manifest entries."""
        if self.loop is None or self.store is None:
            raise RuntimeError("no loop or no checkpoint store")
        if epoch != self.loop.epoch or self.state not in ("running", "drained"):
            raise RuntimeError(f"worker {self.index} is {self.state} at epoch {self.loop.epoch}, not {epoch}")
        if self.loop.store_wait:
            # the loop answers between batches only once the store is back: do not hold a thread for it
            raise RuntimeError(f"worker {self.index} waits on {self.loop.store_wait.get('store')}: no checkpoint now")

        def snap():
            return self.loop.snapshot(checkpoint_id, lambda p, data: self.store.write_partition(checkpoint_id, p, epoch, data))

        return self.loop.call_between_batches(snap, timeout_s)

    def open_windows(self, window: str, filters: dict[str, str]) -> list[dict]:
        """Windows still open here (queryable state)."""
        if self.loop is None or self.state not in ("running", "drained"):
            return []
        return self.loop.open_windows_rows(window, filters)

    def open_partials(self, window: str, filters: dict[str, str]) -> dict | None:
        """Partial states of the merged window's slots not shipped yet (queryable state, merged by the caller)."""
        if self.loop is None or self.state not in ("running", "drained"):
            return None
        from pipeline.merge import unshipped_partials

        w = self.loop.state.windows.get(window)
        return None if w is None else self.loop.call_between_batches(lambda: unshipped_partials(w, filters), 10.0)

    def finish(self, to_end: bool) -> dict:
        """After the loop drained: flush (at the end of input) and close."""
        if self.state != "drained":
            raise RuntimeError(f"worker {self.index} is {self.state}, not drained")
        self.result = self.loop.finish(to_end)
        self.state = "finished"
        return {"index": self.index, **self.result}

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()

    def status(self) -> dict:
        base = {"index": self.index, "state": self.state, "error": self.error, "pid": os.getpid(), "heartbeat": time.time(),
                "node": self.node_id}
        if self.loop is None:
            return {**base, "partitions": []}
        return {**self.loop.status(), **base}
