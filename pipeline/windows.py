"""Event-time windows (tumbling, sliding, session) over Arrow batches.

Windows are aligned to the epoch (a window of size 10 s starts at a multiple of
10 s), so a restart computes the same window ids::

    # event time  0s       10s       20s
    # windows     [--w0---)[--w1---)
    # watermark              ^ 12s: w0 closes, w1 stays open

A window of one group is a *slot* whose aggregates live in ``AggregateStore``.
State is per source partition: a slot belongs to one (window, group keys,
partition), and is emitted and freed by the watermark *of its partition*, so a
partition's output depends only on that partition's records, whichever worker
owns it and however polls interleave partitions (this is what makes a replay
after recovery emit the same revisions). A slot is emitted when its
partition's watermark passes its end, again when a record within
``allowed_lateness`` changes it, and freed when the watermark passes end +
allowed lateness. Its ``revision`` is the number of records folded into it, so
a later emission always has a higher revision and the same contents always the
same revision. A record is *late* for a window when that
window's end + allowed lateness is at or before the watermark seen by the
record (``Rows.watermarks``: its partition's prefix watermark). Session windows
use the record's own session window ``[t, t + gap)`` for that test; a session
is emitted once, final, when its partition's watermark passes end + gap +
allowed lateness (the last moment a record could still extend or merge it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.aggregates import AggregateStore, FoldInput
from pipeline.spec import WindowSpec
from pipeline.watermarks import NEG_INF

__all__ = ["Rows", "WindowState", "tumbling_starts", "sliding_pairs"]

_TS = pa.timestamp("ms", tz="UTC")
_KID_BITS = 25
_WIDX_LIMIT = 1 << 37


@dataclass
class Rows:
    """Decoded, accepted records of one batch, ready for windowing."""

    times: np.ndarray  # int64 event time, ms
    partitions: np.ndarray  # int32
    watermarks: np.ndarray  # int64 prefix watermark seen by each record
    columns: dict[str, pa.Array]  # decoded fields
    numeric: dict[str, tuple[np.ndarray, np.ndarray]]  # float fields: values, valid
    offsets: np.ndarray | None = None  # source offsets (user functions report the records they failed on)

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
        self.slot_kid = np.zeros(0, np.int64)
        self.slot_ident = np.zeros(0, np.int64)
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
        # tumbling/sliding: keys get small integer ids (freed with their last window);
        # a window of a key is found by ident = (window index << 25 | key id) in a
        # sorted array, so a batch looks up all its (window, key) pairs at once
        self.key_ids: dict[tuple, int] = {}
        self.key_of_id: list[tuple | None] = []
        self.key_refs = np.zeros(0, np.int64)
        self.free_kids: list[int] = []
        self.idx_ident = np.zeros(0, np.int64)
        self.idx_slot = np.zeros(0, np.int64)
        self._base: int | None = None
        self.sessions: dict[tuple, list[int]] = {}  # keys -> open session slots
        self.key_types: list[pa.DataType] = []
        self.value_fields = sorted({a.field for a in spec.aggregations if a.field})
        self.failures: list[dict] = []  # user-function failures of emitted windows, taken by process_batch
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
        self.slot_kid, self.slot_ident = ext(self.slot_kid, np.int64), ext(self.slot_ident, np.int64)
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
    def add(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        """Fold ``rows`` into their windows; return late (record index, window start) pairs."""
        if len(rows) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if not self.key_types:
            self.key_types = [rows.columns[k].type for k in self.spec.group_by]
        if self.spec.type == "session":
            return self._add_sessions(rows)
        times = rows.times
        if self.spec.type == "tumbling":
            pair_rows = np.arange(len(times))
            starts = tumbling_starts(times, self.spec.size)
            step = self.spec.size
        else:
            pair_rows, starts = sliding_pairs(times, self.spec.size, self.spec.slide)
            step = self.spec.slide
        closes = starts + self.spec.size + self.lateness
        late = closes <= rows.watermarks[pair_rows]
        if late.any():
            late_rows, late_starts = pair_rows[late], starts[late]
            pair_rows, starts = pair_rows[~late], starts[~late]
        else:
            late_rows, late_starts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(pair_rows) == 0:
            return late_rows, late_starts
        if self._base is None:
            self._base = int(starts.min())
        widx = (starts - self._base) // step
        far = np.abs(widx) >= _WIDX_LIMIT
        if far.any():
            # a window ~2**37 windows away from the first one seen (years, for 1 ms
            # windows) cannot be indexed; such records are answered as late
            late_rows, late_starts = np.concatenate((late_rows, pair_rows[far])), np.concatenate((late_starts, starts[far]))
            pair_rows, starts, widx = pair_rows[~far], starts[~far], widx[~far]
            if len(pair_rows) == 0:
                return late_rows, late_starts
        codes, indices, dictionaries = _encode_keys(self._key_columns(rows), len(times))
        # persistent key ids: one dict lookup per distinct key of the batch
        ucodes, first_row, code_inv = np.unique(codes, return_index=True, return_inverse=True)
        kids = np.empty(len(ucodes), np.int64)
        for i, r in enumerate(first_row.tolist()):
            kids[i] = self._key_id(tuple(d[ix[r]] for d, ix in zip(dictionaries, indices)))
        pair_kids = kids[code_inv.reshape(-1)][pair_rows]
        ident = ((widx + _WIDX_LIMIT) << _KID_BITS) | pair_kids
        uident, first, inverse = np.unique(ident, return_index=True, return_inverse=True)
        group_slots = self._lookup(uident)
        new = np.flatnonzero(group_slots < 0)
        if len(new):
            taken = self._take(len(new))
            group_slots[new] = taken
            reps = first[new]
            self.start[taken] = starts[reps]
            self.end[taken] = starts[reps] + self.spec.size
            self.partition[taken] = rows.partitions[pair_rows[reps]]
            self.slot_kid[taken] = pair_kids[reps]
            self.slot_ident[taken] = uident[new]
            np.add.at(self.key_refs, pair_kids[reps], 1)
            for slot, kid in zip(taken.tolist(), pair_kids[reps].tolist()):
                self.keys[slot] = self.key_of_id[kid]
            self._index_add(uident[new], taken)
        pair_slots = group_slots[inverse.reshape(-1)]
        self._fold(rows, pair_rows, pair_slots)
        self.dirty[group_slots] = True
        return late_rows, late_starts

    def _key_columns(self, rows: Rows) -> list[pa.Array]:
        # the source partition is the last key component: state is per partition
        return [*(rows.columns[k] for k in self.spec.group_by), pa.array(rows.partitions, pa.int32())]

    # -- key ids and the (window, key) -> slot index --------------------------
    def _key_id(self, key: tuple) -> int:
        kid = self.key_ids.get(key)
        if kid is None:
            if self.free_kids:
                kid = self.free_kids.pop()
            else:
                kid = len(self.key_of_id)
                if kid >= (1 << _KID_BITS):
                    raise OverflowError(f"window {self.spec.name}: more than {1 << _KID_BITS} distinct open keys")
                self.key_of_id.append(None)
                if kid >= len(self.key_refs):
                    self.key_refs = np.concatenate((self.key_refs, np.zeros(max(1024, len(self.key_refs)), np.int64)))
            self.key_ids[key] = kid
            self.key_of_id[kid] = key
        return kid

    def _lookup(self, idents: np.ndarray) -> np.ndarray:
        """Slot of each ident, -1 where there is none (idents sorted, unique)."""
        out = np.full(len(idents), -1, np.int64)
        if len(self.idx_ident):
            pos = np.searchsorted(self.idx_ident, idents)
            pos_c = np.minimum(pos, len(self.idx_ident) - 1)
            hit = self.idx_ident[pos_c] == idents
            out[hit] = self.idx_slot[pos_c[hit]]
        return out

    def _index_add(self, idents: np.ndarray, slots: np.ndarray) -> None:
        ident = np.concatenate((self.idx_ident, idents))
        slot = np.concatenate((self.idx_slot, slots))
        order = np.argsort(ident, kind="stable")
        self.idx_ident, self.idx_slot = ident[order], slot[order]

    def _index_drop(self, slots: np.ndarray) -> None:
        keep = ~np.isin(self.idx_slot, slots)
        self.idx_ident, self.idx_slot = self.idx_ident[keep], self.idx_slot[keep]

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
        offsets = None
        if rows.offsets is not None and self.store.udf_values:
            offsets = rows.offsets if identity else rows.offsets[pair_rows]
        self.store.fold(FoldInput(pair_slots, times, numeric, arrays, offsets))

    def _add_sessions(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        gap = self.spec.gap
        times = rows.times
        closes = times + gap + self.lateness
        late = closes <= rows.watermarks
        late_rows = np.flatnonzero(late)
        ok_rows = np.flatnonzero(~late)
        if len(ok_rows) == 0:
            return late_rows, times[late_rows]
        codes, indices, dictionaries = _encode_keys(self._key_columns(rows), len(times))
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
    def _slot_watermarks(self, watermarks: dict[int, int] | int) -> np.ndarray | int:
        if not isinstance(watermarks, dict):
            return int(watermarks)
        out = np.full(self.capacity, NEG_INF, np.int64)
        for p, wm in watermarks.items():
            out[self.partition == p] = wm
        return out

    def close(self, watermarks: dict[int, int] | int) -> pa.Table | None:
        """Emit windows whose end their partition's watermark passed and that changed since last emitted.

        ``watermarks`` maps partition -> watermark (an int applies to all).
        Tumbling/sliding: every group of an affected (window start, partition)
        is emitted, so a sink can rewrite that file whole. Sessions: the
        changed sessions only.
        """
        end = self.end
        if self.spec.type == "session":
            # a session can still merge with a record until the watermark passes
            # end + gap + allowed lateness: it is emitted once, then, so a changed
            # session never leaves an outdated (start, end) row behind in a sink
            end = self.end + self.spec.gap + self.lateness
        ready = self.active & self.dirty & (end <= self._slot_watermarks(watermarks))
        if not ready.any():
            return None
        # revision = records folded into the window so far: it grows with every
        # change and depends only on the window's contents, never on batch cuts,
        # so a replay after recovery emits the same revisions (sinks keep the highest)
        self.revision[ready] = self.store.count[ready]
        self.dirty[ready] = False
        if self.spec.type == "session":
            emit = np.flatnonzero(ready)
        else:
            code = self.start * (1 << 20) + self.partition
            emit = np.flatnonzero(self.active & np.isin(code, np.unique(code[ready])))
        return self._table(emit)

    def ship(self, watermarks: dict[int, int] | int) -> np.ndarray:
        """Slots whose state goes to the merge owners now: changed, and past their end by their partition's
        watermark (sessions: end + gap + allowed lateness, final). Marks them shipped (revision = records folded)."""
        end = self.end
        if self.spec.type == "session":
            end = self.end + self.spec.gap + self.lateness
        ready = self.active & self.dirty & (end <= self._slot_watermarks(watermarks))
        self.revision[ready] = self.store.count[ready]
        self.dirty[ready] = False
        return np.flatnonzero(ready)

    def frontiers(self, watermarks: dict[int, int]) -> dict[int, int]:
        """Per partition: every window of it ending at or before this was shipped final or is still to come
        from records not yet read: a merged row ending there may be emitted once all partitions passed it.

        Tumbling/sliding: the partition's watermark (a later record for such a window is late or re-ships it
        within allowed lateness). Sessions: the watermark less gap and allowed lateness, and no later than the
        start of any session of the partition still open (it may still grow into a merged one)."""
        if self.spec.type != "session":
            return {int(p): int(wm) for p, wm in watermarks.items()}
        out = {int(p): int(wm) - self.spec.gap - self.lateness for p, wm in watermarks.items()}
        open_slots = np.flatnonzero(self.active)
        if len(open_slots):
            parts, first = np.unique(self.partition[open_slots], return_inverse=True)
            earliest = np.full(len(parts), np.iinfo(np.int64).max, np.int64)
            np.minimum.at(earliest, first.reshape(-1), self.start[open_slots])
            for p, e in zip(parts.tolist(), earliest.tolist()):
                if p in out:
                    out[p] = min(out[p], e)
        return out

    def free_slots(self, done: np.ndarray) -> None:
        """Free ``done`` slots now (their state is dropped)."""
        if len(done) == 0:
            return
        if self.spec.type == "session":
            for s in done.tolist():
                self._release(s)
        else:
            self._index_drop(done)
            kids = self.slot_kid[done]
            np.subtract.at(self.key_refs, kids, 1)
            for kid in np.unique(kids[self.key_refs[kids] == 0]).tolist():
                del self.key_ids[self.key_of_id[kid]]
                self.key_of_id[kid] = None
                self.free_kids.append(kid)
            self._retire(done)

    def expire(self, watermarks: dict[int, int] | int) -> int:
        """Free windows whose end + allowed lateness (+ gap for sessions) their partition's watermark passed."""
        extra = self.lateness + (self.spec.gap if self.spec.type == "session" else 0)
        done = np.flatnonzero(self.active & ~self.dirty & (self.end + extra <= self._slot_watermarks(watermarks)))
        if len(done) == 0:
            return 0
        self.free_slots(done)
        self.store.compact(self.active)
        return len(done)

    def _retire(self, slots: np.ndarray) -> None:
        self.active[slots] = False
        self.dirty[slots] = False
        for s in slots.tolist():
            self.keys[s] = None
        self.pending.extend(slots.tolist())

    def _release(self, slot: int) -> None:
        """Free one session slot."""
        key = self.keys[slot]
        lst = self.sessions.get(key)
        if lst is not None:
            if slot in lst:
                lst.remove(slot)
            if not lst:
                del self.sessions[key]
        self._retire(np.array([slot]))

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
        for f in self.store.take_failures():
            slot = int(slots[f["position"]])
            self.failures.append({**f, "window": self.spec.name, "window_start": int(self.start[slot]),
                                  "partition": int(self.partition[slot])})
        cols["revision"] = pa.array(self.revision[slots])
        cols["partition"] = pa.array(self.partition[slots])
        return pa.table(cols)


# -- checkpoints: one partition's slots as Arrow tables -------------------------
def snapshot_window(w: WindowState, partition: int) -> dict[str, pa.Table]:
    """Every open slot of ``partition`` in ``w`` as Arrow tables.

    ``slots`` has one row per slot (bounds, revision, dirty flag, keys and the
    fixed-size aggregate states); ``rows.<kind>.<field>`` hold row state
    (sketch buckets, distinct values, user-function inputs) by slot position.
    """
    return snapshot_slots(w, np.flatnonzero(w.active & (w.partition == partition)))


def snapshot_slots(w: WindowState, slots: np.ndarray, partition_column: bool = False) -> dict[str, pa.Table]:
    """``slots`` of ``w`` as the tables of ``snapshot_window`` (with ``partition_column``, ``slots`` also names
    each slot's source partition: the partial states shipped to the merge owners)."""
    st = w.store
    cols: dict[str, pa.Array] = {
        "start": pa.array(w.start[slots]),
        "end": pa.array(w.end[slots]),
        "revision": pa.array(w.revision[slots]),
        "dirty": pa.array(w.dirty[slots]),
        "count": pa.array(st.count[slots]),
    }
    if partition_column:
        cols["partition"] = pa.array(w.partition[slots])
    key_types = w.key_types or [pa.null()] * len(w.spec.group_by)
    for i, k in enumerate(w.spec.group_by):
        cols[f"key.{k}"] = pa.array([w.keys[s][i] for s in slots.tolist()], key_types[i])
    for f in st.numeric_fields:
        cols[f"nn.{f}"], cols[f"sum.{f}"] = pa.array(st.nn[f][slots]), pa.array(st.sum[f][slots])
        cols[f"min.{f}"], cols[f"max.{f}"] = pa.array(st.min[f][slots]), pa.array(st.max[f][slots])
    for f in st.order_fields:
        vt = st.value_types.get(f, pa.null())
        cols[f"first_t.{f}"], cols[f"last_t.{f}"] = pa.array(st.first_t[f][slots]), pa.array(st.last_t[f][slots])
        cols[f"first_v.{f}"] = pa.array(list(st.first_v[f][slots]), vt)
        cols[f"last_v.{f}"] = pa.array(list(st.last_v[f][slots]), vt)
    out = {"slots": pa.table(cols)}
    pos = np.full(w.capacity, -1, np.int64)
    pos[slots] = np.arange(len(slots))
    for kind, stores in (("sketch", st.sketches), ("distinct", st.distinct), ("values", st.udf_values)):
        for f, rs in stores.items():
            s, v, c = rs.rows_for(slots, w.capacity)
            t = {"slot": pa.array(pos[s]), "value": pa.array(v) if kind == "sketch" else v}
            if kind == "sketch":
                t["count"] = pa.array(c)
            elif kind == "values" and c is not None and len(c) == len(s):
                t["offset"] = pa.array(c)
            out[f"rows.{kind}.{f}"] = pa.table(t)
    return out


def restore_window(w: WindowState, partition: int | None, tables: dict[str, pa.Table]) -> int:
    """Add the slots of ``snapshot_window`` to ``w`` (a partition this state does not hold yet); with
    ``partition`` None, each slot's partition comes from the ``partition`` column (``snapshot_slots``)."""
    return len(restore_slots(w, partition, tables))


def restore_slots(w: WindowState, partition: int | None, tables: dict[str, pa.Table]) -> np.ndarray:
    """``restore_window``, returning the slots taken (in the order of the ``slots`` table)."""
    t = tables["slots"]
    n = t.num_rows
    if n == 0:
        return np.zeros(0, np.int64)
    st = w.store
    if not w.key_types:
        w.key_types = [t.schema.field(f"key.{k}").type for k in w.spec.group_by]
    taken = w._take(n)
    col = {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names if not name.startswith(("key.", "first_v.", "last_v."))}
    w.start[taken], w.end[taken] = col["start"], col["end"]
    w.revision[taken], w.dirty[taken] = col["revision"], col["dirty"]
    parts = np.full(n, partition, np.int32) if partition is not None else col["partition"].astype(np.int32)
    w.partition[taken] = parts
    st.count[taken] = col["count"]
    for f in st.numeric_fields:
        st.nn[f][taken], st.sum[f][taken] = col[f"nn.{f}"], col[f"sum.{f}"]
        st.min[f][taken], st.max[f][taken] = col[f"min.{f}"], col[f"max.{f}"]
    for f in st.order_fields:
        st.first_t[f][taken], st.last_t[f][taken] = col[f"first_t.{f}"], col[f"last_t.{f}"]
        first, last = t.column(f"first_v.{f}"), t.column(f"last_v.{f}")
        if not pa.types.is_null(first.type):
            st.value_types.setdefault(f, first.type)
        fv, lv = np.empty(n, object), np.empty(n, object)
        fv[:], lv[:] = first.to_pylist(), last.to_pylist()
        st.first_v[f][taken], st.last_v[f][taken] = fv, lv
    key_cols = [t.column(f"key.{k}").to_pylist() for k in w.spec.group_by]
    keys = [(*vals, int(p)) for vals, p in zip(zip(*key_cols), parts.tolist())] if key_cols else [(int(p),) for p in parts.tolist()]
    if w.spec.type == "session":
        for slot, key in zip(taken.tolist(), keys):
            w.keys[slot] = key
            w.sessions.setdefault(key, []).append(slot)
    else:
        step = w.spec.size if w.spec.type == "tumbling" else w.spec.slide
        starts = w.start[taken]
        if w._base is None:
            w._base = int(starts.min())
        kids = np.array([w._key_id(k) for k in keys], np.int64)
        for slot, key in zip(taken.tolist(), keys):
            w.keys[slot] = key
        w.slot_kid[taken] = kids
        np.add.at(w.key_refs, kids, 1)
        ident = (((starts - w._base) // step + _WIDX_LIMIT) << _KID_BITS) | kids
        w.slot_ident[taken] = ident
        w._index_add(ident, taken)
    for name, rt in tables.items():
        if not name.startswith("rows."):
            continue
        _, kind, f = name.split(".", 2)
        store = {"sketch": st.sketches, "distinct": st.distinct, "values": st.udf_values}[kind].get(f)
        if store is None or rt.num_rows == 0:
            continue
        slots = taken[rt.column("slot").to_numpy()]
        if kind == "sketch":
            store.add(slots, rt.column("value").to_numpy(), rt.column("count").to_numpy())
        else:
            vals = rt.column("value").combine_chunks()
            st.value_types.setdefault(f, vals.type)
            offs = rt.column("offset").to_numpy() if "offset" in rt.column_names else None
            store.add(slots, vals, offs)
    return taken


def open_rows(w: WindowState, filters: dict[str, str], emitted: bool = False) -> pa.Table | None:
    """Windows of ``w`` not emitted yet (still open), as rows with ``revision`` 0; read-only.

    ``filters`` compare group keys (and ``partition``) as text. This is the
    queryable state the serving layer exposes with ``include_open=true``.
    With ``emitted`` also the slots already emitted and kept for allowed
    lateness, with the revision they were emitted at (state inspection).
    """
    slots = np.flatnonzero(w.active & (True if emitted else (w.revision == 0)))
    if len(slots) == 0:
        return None
    keys = list(w.spec.group_by)
    if filters:
        keep = []
        for s in slots.tolist():
            key = w.keys[s]
            ok = all(str(key[keys.index(k)]) == str(v) if k in keys else (k == "partition" and str(w.partition[s]) == str(v))
                     for k, v in filters.items())
            if ok:
                keep.append(s)
        slots = np.array(keep, dtype=np.int64)
        if len(slots) == 0:
            return None
    before = len(w.store.failures)
    cols: dict[str, pa.Array] = {
        "window": pa.array([w.spec.name] * len(slots), pa.string()),
        "window_start": pa.array(w.start[slots], _TS),
        "window_end": pa.array(w.end[slots], _TS),
    }
    for i, k in enumerate(keys):
        cols[k] = pa.array([w.keys[s][i] for s in slots.tolist()], w.key_types[i] if w.key_types else None)
    cols.update(w.store.finalize(slots))
    del w.store.failures[before:]  # a preview is not an emission: user-function errors are reported when it closes
    cols["revision"] = pa.array(w.revision[slots].astype(np.int64) if emitted else np.zeros(len(slots), np.int64))
    cols["partition"] = pa.array(w.partition[slots])
    return pa.table(cols)
