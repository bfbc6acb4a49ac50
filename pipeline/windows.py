"""Event-time windows (tumbling, sliding, session) over Arrow batches.

Windows are aligned to the epoch (a window of size 10 s starts at a multiple of
10 s), so a restart computes the same window ids::

    # event time  0s       10s       20s
    # windows     [--w0---)[--w1---)
    # watermark              ^ 12s: w0 closes, w1 stays open

A window of one group is a *slot* whose aggregates live in ``AggregateStore``.
A slot is emitted (revision 1) when the worker watermark passes its end, again
with revision + 1 when a record within ``allowed_lateness`` changes it, and
freed when the watermark passes end + allowed lateness. A record is *late* for
a window when that window's end + allowed lateness is at or before the
watermark seen by the record (its partition's prefix watermark, or the worker
watermark when the window may already be freed). Session windows use the
record's own session window ``[t, t + gap)`` for that test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.aggregates import AggregateStore, FoldInput
from pipeline.spec import WindowSpec

__all__ = ["Rows", "WindowState", "tumbling_starts", "sliding_pairs"]

_TS = pa.timestamp("ms", tz="UTC")


@dataclass
class Rows:
    """Decoded, accepted records of one batch, ready for windowing."""

    times: np.ndarray  # int64 event time, ms
    partitions: np.ndarray  # int32
    watermarks: np.ndarray  # int64 prefix watermark seen by each record
    columns: dict[str, pa.Array]  # decoded fields
    numeric: dict[str, tuple[np.ndarray, np.ndarray]]  # float fields: values, valid

    def __len__(self) -> int:
        return len(self.times)


def tumbling_starts(times: np.ndarray, size: int) -> np.ndarray:
    """Start of the tumbling window of each time (epoch aligned, floor for negatives)."""
    return np.floor_divide(times, size) * size


def sliding_pairs(times: np.ndarray, size: int, slide: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (record index, window start) pair of sliding windows ``[s, s + size)``."""
    k = -(-size // slide)
    last = np.floor_divide(times, slide) * slide
    rows = np.repeat(np.arange(len(times)), k)
    starts = np.repeat(last, k) - np.tile(np.arange(k, dtype=np.int64) * slide, len(times))
    keep = starts > np.repeat(times, k) - size
    return rows[keep], starts[keep]


def _encode_keys(columns: list[pa.Array], n: int) -> tuple[np.ndarray, list[np.ndarray], list[list]]:
    """Integer code per row for the combination of key values (nulls are a value)."""
    codes = np.zeros(n, dtype=np.int64)
    indices, dictionaries = [], []
    radix = 1
    for col in columns:
        enc = pc.dictionary_encode(col, null_encoding="encode")
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        d = enc.dictionary.to_pylist()
        indices.append(idx)
        dictionaries.append(d)
        size = max(len(d), 1)
        if radix * size >= (1 << 40):  # keep room for the window index in the final code
            _, codes = np.unique(codes, return_inverse=True)
            radix = int(codes.max()) + 1 if n else 1
        codes = codes * size + idx
        radix *= size
    return codes, indices, dictionaries


class WindowState:
    """Open windows of one window spec for the partitions of one worker."""

    def __init__(self, spec: WindowSpec, allowed_lateness: int, capacity: int = 1024):
        self.spec = spec
        self.lateness = int(allowed_lateness)
        self.store = AggregateStore(spec.aggregations, capacity)
        self.capacity = 0
        self.active = np.zeros(0, bool)
        self.dirty = np.zeros(0, bool)
        self.start = np.zeros(0, np.int64)
        self.end = np.zeros(0, np.int64)
        self.revision = np.zeros(0, np.int64)
        self.partition = np.zeros(0, np.int32)
        self.keys: list[tuple | None] = []
        self.free: list[int] = []
        # freed slots wait here until their row state (sketch buckets, distinct values)
        # is compacted away; only then may a new window reuse them
        self.pending: list[int] = []
        self.slot_of: dict[tuple, int] = {}  # (start, *keys) -> slot, tumbling/sliding
        self.sessions: dict[tuple, list[int]] = {}  # keys -> open session slots
        self.key_types: list[pa.DataType] = []
        self.value_fields = sorted({a.field for a in spec.aggregations if a.field})
        self._grow(capacity)

    # -- slots ------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        old = self.capacity

        def ext(arr, dtype):
            new = np.zeros(capacity, dtype)
            new[:old] = arr[:old]
            return new

        self.active, self.dirty = ext(self.active, bool), ext(self.dirty, bool)
        self.start, self.end = ext(self.start, np.int64), ext(self.end, np.int64)
        self.revision, self.partition = ext(self.revision, np.int64), ext(self.partition, np.int32)
        self.keys.extend([None] * (capacity - old))
        self.free.extend(range(capacity - 1, old - 1, -1))
        self.store.ensure(capacity)
        self.capacity = capacity

    def _take(self, count: int) -> np.ndarray:
        if count > len(self.free) and self.pending:
            if self.store.has_rows:
                self.store.compact(self.active, force=True)
            self.free.extend(self.pending)
            self.pending.clear()
        if count > len(self.free):
            self._grow(max(2 * self.capacity, self.capacity + count))
        taken = np.array([self.free.pop() for _ in range(count)], dtype=np.int64)
        self.store.reset(taken)
        self.revision[taken] = 0
        self.dirty[taken] = False
        self.active[taken] = True
        return taken

    @property
    def open_slots(self) -> int:
        return int(self.active.sum())

    # -- update -----------------------------------------------------------
    def add(self, rows: Rows, worker_watermark: int) -> tuple[np.ndarray, np.ndarray]:
        """Fold ``rows`` into their windows; return late (record index, window start) pairs."""
        if len(rows) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if not self.key_types:
            self.key_types = [rows.columns[k].type for k in self.spec.group_by]
        if self.spec.type == "session":
            return self._add_sessions(rows, worker_watermark)
        times = rows.times
        if self.spec.type == "tumbling":
            pair_rows = np.arange(len(times))
            starts = tumbling_starts(times, self.spec.size)
            step = self.spec.size
        else:
            pair_rows, starts = sliding_pairs(times, self.spec.size, self.spec.slide)
            step = self.spec.slide
        closes = starts + self.spec.size + self.lateness
        late = (closes <= rows.watermarks[pair_rows]) | (closes <= worker_watermark)
        if late.any():
            late_rows, late_starts = pair_rows[late], starts[late]
            pair_rows, starts = pair_rows[~late], starts[~late]
        else:
            late_rows, late_starts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(pair_rows) == 0:
            return late_rows, late_starts
        codes, indices, dictionaries = _encode_keys([rows.columns[k] for k in self.spec.group_by], len(times))
        pair_codes = codes[pair_rows]
        base = starts.min()
        widx = (starts - base) // step
        ncodes = int(pair_codes.max()) + 1
        if int(widx.max()) + 1 < (np.iinfo(np.int64).max // max(ncodes, 1)):
            combined = widx * ncodes + pair_codes
            _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
        else:  # absurd spread of window starts: fall back to a 2-column unique
            _, first, inverse = np.unique(np.stack([widx, pair_codes], 1), axis=0, return_index=True, return_inverse=True)
        group_slots = np.empty(len(first), dtype=np.int64)
        new_pos, new_keys = [], []
        size = self.spec.size
        # one dict lookup per (window, group) of the batch, not per record
        for g, pi in enumerate(first.tolist()):
            r = int(pair_rows[pi])
            key = tuple(d[ix[r]] for d, ix in zip(dictionaries, indices))
            ident = (int(starts[pi]), *key)
            slot = self.slot_of.get(ident)
            if slot is None:
                new_pos.append(g)
                new_keys.append((ident, key, r))
            else:
                group_slots[g] = slot
        if new_pos:
            taken = self._take(len(new_pos))
            for slot, g, (ident, key, r) in zip(taken.tolist(), new_pos, new_keys):
                group_slots[g] = slot
                self.slot_of[ident] = slot
                self.keys[slot] = key
                self.start[slot] = ident[0]
                self.end[slot] = ident[0] + size
                self.partition[slot] = rows.partitions[r]
        pair_slots = group_slots[inverse.reshape(-1)]
        self._fold(rows, pair_rows, pair_slots)
        self.dirty[group_slots] = True
        return late_rows, late_starts

    def _fold(self, rows: Rows, pair_rows: np.ndarray, pair_slots: np.ndarray) -> None:
        # tumbling windows without late records map record i to pair i: skip the copies
        identity = len(pair_rows) == len(rows) and bool(np.array_equal(pair_rows, np.arange(len(rows))))
        take = None if identity else pa.array(pair_rows)
        numeric = {}
        for f in self.store.numeric_fields:
            v, ok = rows.numeric[f]
            numeric[f] = (v, ok) if identity else (v[pair_rows], ok[pair_rows])
        arrays = {}
        for f in self.store.array_fields:
            arr = rows.columns[f]
            arrays[f] = arr if identity else arr.take(take)
        times = rows.times if identity else rows.times[pair_rows]
        self.store.fold(FoldInput(pair_slots, times, numeric, arrays))

    def _add_sessions(self, rows: Rows, worker_watermark: int) -> tuple[np.ndarray, np.ndarray]:
        gap = self.spec.gap
        times = rows.times
        closes = times + gap + self.lateness
        late = (closes <= rows.watermarks) | (closes <= worker_watermark)
        late_rows = np.flatnonzero(late)
        ok_rows = np.flatnonzero(~late)
        if len(ok_rows) == 0:
            return late_rows, times[late_rows]
        codes, indices, dictionaries = _encode_keys([rows.columns[k] for k in self.spec.group_by], len(times))
        c, t = codes[ok_rows], times[ok_rows]
        order = np.lexsort((t, c))
        cs, ts, rs = c[order], t[order], ok_rows[order]
        brk = np.ones(len(cs), bool)
        brk[1:] = (cs[1:] != cs[:-1]) | (ts[1:] - ts[:-1] >= gap)
        local_id = np.cumsum(brk) - 1
        lfirst = np.flatnonzero(brk)
        llast = np.concatenate((lfirst[1:], [len(cs)])) - 1
        # entries: batch-local sessions, then open sessions of the same keys
        e_code, e_start, e_end, e_slot, e_local, e_key, e_row = [], [], [], [], [], [], []
        seen_keys: dict[int, tuple] = {}
        for li, (a, b) in enumerate(zip(lfirst.tolist(), llast.tolist())):
            code = int(cs[a])
            r = int(rs[a])
            key = seen_keys.get(code)
            if key is None:
                key = tuple(d[ix[r]] for d, ix in zip(dictionaries, indices))
                seen_keys[code] = key
                for slot in self.sessions.get(key, ()):
                    e_code.append(code), e_start.append(int(self.start[slot])), e_end.append(int(self.end[slot]))
                    e_slot.append(slot), e_local.append(-1), e_key.append(key), e_row.append(-1)
            e_code.append(code), e_start.append(int(ts[a])), e_end.append(int(ts[b]) + gap)
            e_slot.append(-1), e_local.append(li), e_key.append(key), e_row.append(r)
        order2 = sorted(range(len(e_code)), key=lambda i: (e_code[i], e_start[i]))
        local_slot = np.empty(len(lfirst), dtype=np.int64)
        # walk entries in (key, start) order; overlapping ones form one session
        i = 0
        while i < len(order2):
            j = i
            code, run_end = e_code[order2[i]], e_end[order2[i]]
            while j + 1 < len(order2) and e_code[order2[j + 1]] == code and e_start[order2[j + 1]] < run_end:
                j += 1
                run_end = max(run_end, e_end[order2[j]])
            members = [order2[k] for k in range(i, j + 1)]
            existing = sorted((e_slot[m] for m in members if e_slot[m] >= 0), key=lambda s: self.start[s])
            key = e_key[members[0]]
            run_start = min(e_start[m] for m in members)
            if existing:
                target = existing[0]
                others = existing[1:]
                if others:
                    self.store.merge(np.array([target] * len(others)), np.array(others))
                    for s in others:
                        self._release(s)
                    self.sessions[key] = [s for s in self.sessions[key] if s not in others]
            else:
                target = int(self._take(1)[0])
                self.keys[target] = key
                self.partition[target] = rows.partitions[e_row[members[0]]]
                self.sessions.setdefault(key, []).append(target)
            self.start[target] = min(int(self.start[target]) if existing else run_start, run_start)
            self.end[target] = max(int(self.end[target]) if existing else run_end, run_end)
            self.dirty[target] = True
            for m in members:
                if e_local[m] >= 0:
                    local_slot[e_local[m]] = target
            i = j + 1
        row_slots = local_slot[local_id]
        self._fold(rows, rs, row_slots)
        return late_rows, times[late_rows]

    # -- emit and expire ----------------------------------------------------
    def close(self, watermark: int) -> pa.Table | None:
        """Emit windows whose end the watermark passed and that changed since last emitted.

        Tumbling/sliding: every group of an affected window start is emitted, so
        a sink can rewrite that window start's file whole. Sessions: the changed
        sessions only.
        """
        ready = self.active & self.dirty & (self.end <= watermark)
        if not ready.any():
            return None
        self.revision[ready] += 1
        self.dirty[ready] = False
        if self.spec.type == "session":
            emit = np.flatnonzero(ready)
        else:
            starts = np.unique(self.start[ready])
            emit = np.flatnonzero(self.active & np.isin(self.start, starts))
        return self._table(emit)

    def expire(self, watermark: int) -> int:
        """Free windows whose end + allowed lateness (+ gap for sessions) the watermark passed."""
        extra = self.lateness + (self.spec.gap if self.spec.type == "session" else 0)
        done = np.flatnonzero(self.active & ~self.dirty & (self.end + extra <= watermark))
        for s in done.tolist():
            self._release(s)
        if len(done):
            self.store.compact(self.active)
        return len(done)

    def _release(self, slot: int) -> None:
        key = self.keys[slot]
        if self.spec.type == "session":
            lst = self.sessions.get(key)
            if lst is not None:
                if slot in lst:
                    lst.remove(slot)
                if not lst:
                    del self.sessions[key]
        else:
            self.slot_of.pop((int(self.start[slot]), *key), None)
        self.active[slot] = False
        self.dirty[slot] = False
        self.keys[slot] = None
        self.pending.append(slot)

    def _table(self, slots: np.ndarray) -> pa.Table:
        order = np.lexsort((self.partition[slots], self.start[slots]))
        slots = slots[order]
        n = len(slots)
        cols: dict[str, pa.Array] = {
            "window": pa.array([self.spec.name] * n, pa.string()),
            "window_start": pa.array(self.start[slots], _TS),
            "window_end": pa.array(self.end[slots], _TS),
        }
        for i, k in enumerate(self.spec.group_by):
            cols[k] = pa.array([self.keys[s][i] for s in slots.tolist()], self.key_types[i] if self.key_types else None)
        cols.update(self.store.finalize(slots))
        cols["revision"] = pa.array(self.revision[slots])
        cols["_partition"] = pa.array(self.partition[slots])
        return pa.table(cols)
