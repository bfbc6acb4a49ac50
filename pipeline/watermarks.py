"""Per-partition event-time watermarks and the worker watermark over them.

A partition's watermark is the largest event time it has delivered minus
``max_out_of_orderness``. The worker's watermark is the minimum over its
partitions that are neither idle nor finished (a bounded run reached their end
offset); when every partition is idle it follows the most advanced one. It
never moves back.

A partition is *idle* only when it has had no record for ``idle_timeout`` of
monotonic time **and** it was confirmed to have no unread backlog (its
position had reached the broker's end offset) after its last record
(``caught_up``). A partition waiting its turn behind a backlog is never idle,
so wall time cannot turn its records late: the output of a bounded run
depends on the records alone, not on worker count, poll sizes or speed.

Lateness is decided per record against the watermark *before* that record in
its own partition (``prefix``), so a replay that cuts the same records into
other batches makes the same late/on-time decisions.

Window state is per partition and closes on the partition's *effective*
watermark (``partition_watermarks``): its own watermark, raised to the worker
watermark while the partition is idle or finished (an idle partition must not
keep its last windows open forever). Without idleness a partition's output is
a function of its own records only.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np

__all__ = ["NEG_INF", "POS_INF", "WatermarkTracker"]

NEG_INF = np.iinfo(np.int64).min // 4
POS_INF = np.iinfo(np.int64).max // 4


class WatermarkTracker:
    """Tracks event-time progress of a set of partitions (times in epoch ms)."""

    def __init__(
        self,
        partitions: Iterable[int],
        max_out_of_orderness: int,
        idle_timeout: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ooo = int(max_out_of_orderness)
        self.idle_timeout_s = idle_timeout / 1000.0
        self.clock = clock
        now = clock()
        self.max_event: dict[int, int] = {int(p): NEG_INF for p in partitions}
        self.last_seen: dict[int, float] = {p: now for p in self.max_event}
        self.finished: set[int] = set()
        # clock time at which a partition was last confirmed to have no unread backlog
        self.confirmed: dict[int, float] = {}
        self._watermark = NEG_INF
        self.effective: dict[int, int] = {p: NEG_INF for p in self.max_event}

    def add_partition(self, partition: int, max_event: int = NEG_INF) -> None:
        self.max_event.setdefault(int(partition), max_event)
        self.effective.setdefault(int(partition), NEG_INF)
        self.last_seen[int(partition)] = self.clock()

    def remove_partition(self, partition: int) -> None:
        for d in (self.max_event, self.last_seen, self.effective, self.confirmed):
            d.pop(int(partition), None)
        self.finished.discard(int(partition))

    def partition_watermark(self, partition: int) -> int:
        m = self.max_event.get(int(partition), NEG_INF)
        return NEG_INF if m <= NEG_INF else m - self.ooo

    def prefix(self, partitions: np.ndarray, times: np.ndarray, accepted: np.ndarray) -> np.ndarray:
        """Watermark seen by each record (before it), updating partition maxima.

        ``accepted`` marks records whose time may advance the watermark (rejected
        outliers must not drag it forward).
        """
        out = np.empty(len(times), dtype=np.int64)
        if len(times) == 0:
            return out
        now = self.clock()
        tt = np.where(accepted, times, NEG_INF)
        for p in np.unique(partitions).tolist():
            idx = np.flatnonzero(partitions == p)
            prev = self.max_event.get(p, NEG_INF)
            cm = np.maximum.accumulate(tt[idx])
            before = np.empty(len(idx), dtype=np.int64)
            before[0] = prev
            if len(idx) > 1:
                before[1:] = np.maximum(cm[:-1], prev)
            out[idx] = np.where(before <= NEG_INF, NEG_INF, before - self.ooo)
            self.max_event[p] = max(prev, int(cm[-1]))
            self.last_seen[p] = now
        return out

    def touch(self, partitions: Iterable[int]) -> None:
        """Mark partitions as active (records arrived) without event times."""
        now = self.clock()
        for p in partitions:
            self.last_seen[int(p)] = now

    def finish(self, partition: int) -> None:
        """A bounded run reached this partition's end offset: stop waiting for it."""
        self.finished.add(int(partition))

    def caught_up(self, partition: int, at: float | None = None) -> None:
        """The partition's position reached the broker's end offset, as read at clock time ``at``.

        Read ``at`` *before* asking the broker: a record that arrives after it
        moves ``last_seen`` past the confirmation, which then no longer counts.
        """
        self.confirmed[int(partition)] = self.clock() if at is None else at

    def quiet(self, partition: int) -> bool:
        """No record for ``idle_timeout`` (a candidate for idleness, pending the backlog check)."""
        return self.clock() - self.last_seen.get(partition, 0.0) > self.idle_timeout_s

    def idle(self, partition: int) -> bool:
        """Quiet for ``idle_timeout`` and confirmed without backlog since its last record."""
        last = self.last_seen.get(partition, 0.0)
        return self.quiet(partition) and self.confirmed.get(partition, float("-inf")) >= last

    def current(self) -> int:
        """The worker watermark (monotonic: never lower than before)."""
        live = [p for p in self.max_event if p not in self.finished and not self.idle(p)]
        if live:
            wm = min(self.partition_watermark(p) for p in live)
        else:
            wms = [self.partition_watermark(p) for p in self.max_event]
            wm = max(wms) if wms else NEG_INF
        self._watermark = max(self._watermark, wm)
        return self._watermark

    def partition_watermarks(self) -> dict[int, int]:
        """Effective watermark per partition (monotonic), updating the worker watermark too."""
        worker = self.current()
        for p in self.max_event:
            own = self.partition_watermark(p)
            if p in self.finished or self.idle(p):
                own = max(own, worker)
            self.effective[p] = max(self.effective.get(p, NEG_INF), own)
        return dict(self.effective)

    def seen(self, partitions: np.ndarray) -> np.ndarray:
        """Effective watermark of each record's partition (before the batch)."""
        out = np.full(len(partitions), NEG_INF, np.int64)
        for p, wm in self.effective.items():
            out[partitions == p] = wm
        return out

    def advance_to_end(self) -> int:
        """End of input: move the watermark past every window."""
        self._watermark = POS_INF
        for p in self.effective:
            self.effective[p] = POS_INF
        return self._watermark

    @property
    def watermark(self) -> int:
        return self._watermark

    def snapshot(self, partition: int) -> dict:
        """What a checkpoint keeps of one partition."""
        p = int(partition)
        return {"max_event": int(self.max_event.get(p, NEG_INF)), "effective": int(self.effective.get(p, NEG_INF))}

    def restore(self, partition: int, snap: dict) -> None:
        p = int(partition)
        self.max_event[p] = int(snap["max_event"])
        self.effective[p] = int(snap["effective"])
        self.last_seen[p] = self.clock()
