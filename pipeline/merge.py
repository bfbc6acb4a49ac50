"""Windows across partitions: merging the partitions' partial window states (pure: no Ray, no network).

Two-phase aggregation. Each source partition keeps its window state as
before (deterministic, checkpointed with its offsets). When a slot closes in
its partition (``WindowState.ship``) its *state* — not finalized values — is
shipped as Arrow tables (``snapshot_slots``: counts, sums, min/max,
first/last with their times, sketch buckets, distinct values, user-function
inputs) to the merge owner of its group, ``shard_of(window, keys) % owners``.
After the partials of a batch, the worker sends each partition's *frontier*
(``WindowState.frontiers``): every window of that partition ending at or
before it was shipped final, or will be re-shipped within allowed lateness.

An owner (``Merger``) keeps, per (window, start, group keys), the latest
partial of each source partition: a partial *replaces* the one from its
partition with a lower revision and is ignored when it is not newer, so a
replay after a worker restart is harmless. A merged row is emitted when the
smallest frontier over all partitions of the topic has passed its end; it is
the ``AggregateStore.merge`` of the partials (so ``pNN``, ``count_distinct``,
``first``/``last`` and user functions are exact), and its revision is the sum
of the partials' revisions (records folded). A partial arriving later
(within allowed lateness) re-emits it with a higher revision. The last
revision is the highest, whatever the timing: partial revisions only grow.

Sessions merge across partitions as they do within one: partial sessions
(final in their partition) of a group that overlap (``[first, last + gap)``)
form one session, which is what the records of all partitions together give.
A merged session is emitted, once, when every partition's frontier is past
its end.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pyarrow as pa

from pipeline.aggregates import AggregateStore
from pipeline.spec import PipelineSpec
from pipeline.watermarks import NEG_INF
from pipeline.windows import WindowState, _KID_BITS, _TS, _WIDX_LIMIT, restore_slots, snapshot_slots

__all__ = ["LevelWindow", "LocalMerge", "MergeWindow", "Merger", "merge_open", "reshard", "root_window", "shard_of",
           "split_by_shard", "take_rows", "unshipped_partials"]


def shard_of(window: str, keys: list[tuple], owners: int) -> np.ndarray:
    """Owner of each group: CRC-32 of the JSON of (window, group keys) mod ``owners`` (stable across processes)."""
    if owners <= 1:
        return np.zeros(len(keys), np.int64)
    return np.array([zlib.crc32(json.dumps([window, *k], default=str).encode()) % owners for k in keys], np.int64)


def take_rows(tables: dict[str, pa.Table], rows: np.ndarray) -> dict[str, pa.Table]:
    """The partial tables restricted to slot rows ``rows`` (positions in ``slots``), row state renumbered."""
    t = tables["slots"]
    pos = np.full(t.num_rows, -1, np.int64)
    pos[rows] = np.arange(len(rows))
    out = {"slots": t.take(pa.array(rows, pa.int64()))}
    for name, rt in tables.items():
        if name == "slots":
            continue
        old = rt.column("slot").to_numpy()
        new = pos[old] if len(old) else old
        keep = new >= 0
        sub = rt.filter(pa.array(keep)) if not keep.all() else rt
        out[name] = sub.set_column(sub.schema.get_field_index("slot"), "slot", pa.array(new[keep], pa.int64()))
    return out


def _group_keys(tables: dict[str, pa.Table], group_by: list[str]) -> list[tuple]:
    t = tables["slots"]
    cols = [t.column(f"key.{k}").to_pylist() for k in group_by]
    return list(zip(*cols)) if cols else [()] * t.num_rows


def split_by_shard(window: str, group_by: list[str], tables: dict[str, pa.Table], owners: int) -> dict[int, dict[str, pa.Table]]:
    """Partial tables split by merge owner."""
    n = tables["slots"].num_rows
    if n == 0:
        return {}
    if owners <= 1:
        return {0: tables}
    shards = shard_of(window, _group_keys(tables, group_by), owners)
    return {int(k): take_rows(tables, np.flatnonzero(shards == k)) for k in np.unique(shards).tolist()}


_OFFSET_BITS = 40


def _copy_states(src: AggregateStore, slots: np.ndarray, dst: AggregateStore, partitions: np.ndarray | None = None) -> None:
    """Copy the states of ``slots`` of ``src`` into positions 0..n-1 of a fresh ``dst``."""
    n = len(slots)
    pos = np.arange(n)
    dst.ensure(max(n, 1))
    dst.count[pos] = src.count[slots]
    for f in src.numeric_fields:
        dst.nn[f][pos], dst.sum[f][pos] = src.nn[f][slots], src.sum[f][slots]
        dst.min[f][pos], dst.max[f][pos] = src.min[f][slots], src.max[f][slots]
    for f in src.order_fields:
        dst.first_t[f][pos], dst.last_t[f][pos] = src.first_t[f][slots], src.last_t[f][slots]
        dst.first_v[f][pos], dst.last_v[f][pos] = src.first_v[f][slots], src.last_v[f][slots]
    dst.value_types.update(src.value_types)
    where = np.full(src.capacity, -1, np.int64)
    where[slots] = pos
    for kind in ("sketches", "distinct", "udf_values"):
        for f, store in getattr(src, kind).items():
            s, v, c = store.rows_for(slots, src.capacity)
            if kind == "udf_values" and c is not None and partitions is not None:
                # user-function inputs keep their source: partition and offset in one int64
                c = (partitions[s].astype(np.int64) << _OFFSET_BITS) | c
            getattr(dst, kind)[f].add(where[s], v, c)


class MergeWindow:
    """The partials of one window held by one owner, and the merged rows they make."""

    def __init__(self, spec, allowed_lateness: int, partitions: list[int]):
        self.spec = spec
        self.lateness = int(allowed_lateness)
        self.w = WindowState(spec, allowed_lateness)  # key = (*group keys, source partition), as in a worker
        self.frontier: dict[int, int] = {int(p): NEG_INF for p in partitions}
        self.emitted: dict[tuple, int] = {}  # (start, group keys) -> revision last emitted (tumbling/sliding)
        self.child: "MergeWindow | None" = None  # the rollup level built from this window's merged states
        self.failures: list[dict] = []
        self.ignored = 0  # partials not newer than the one held (replays)

    # -- input ----------------------------------------------------------------
    def global_frontier(self) -> int:
        return min(self.frontier.values()) if self.frontier else NEG_INF

    def advance(self, frontiers: dict[int, int]) -> None:
        """Raise partition frontiers (never lowered: a restarted worker replays from behind)."""
        for p, f in frontiers.items():
            p = int(p)
            if p in self.frontier:
                self.frontier[p] = max(self.frontier[p], int(f))

    def add(self, tables: dict[str, pa.Table]) -> int:
        """Take partials (``snapshot_slots`` with ``partition``); returns how many replaced or added a partial."""
        t = tables["slots"]
        n = t.num_rows
        if n == 0:
            return 0
        w = self.w
        starts = t.column("start").to_numpy()
        ends = t.column("end").to_numpy()
        revs = t.column("count").to_numpy()
        parts = t.column("partition").to_numpy()
        gkeys = _group_keys(tables, self.spec.group_by)
        keys = [(*k, int(p)) for k, p in zip(gkeys, parts.tolist())]
        # a partial of a window every partition has finished with was merged and emitted final: a replay
        # (a rollup level takes every partial: the level below sends each one once it is merged, however far
        # the frontier has moved by then)
        done_by = ends if self.spec.type == "session" else ends + self.lateness
        keep = done_by > self.global_frontier() if not self.spec.rollup_of else np.ones(n, bool)
        old = np.full(n, -1, np.int64)
        if self.spec.type == "session":
            for i, key in enumerate(keys):
                for slot in w.sessions.get(key, ()):
                    if w.start[slot] == starts[i]:
                        old[i] = slot
        elif w._base is not None:
            step = self.spec.size if self.spec.type == "tumbling" else self.spec.slide
            kids = np.array([w.key_ids.get(key, -1) for key in keys], np.int64)
            known = kids >= 0
            if known.any():
                ident = (((starts[known] - w._base) // step + _WIDX_LIMIT) << _KID_BITS) | kids[known]
                order = np.argsort(ident, kind="stable")
                found = np.empty(len(ident), np.int64)
                found[order] = w._lookup(ident[order])
                old[known] = found
        has_old = old >= 0
        newer = ~has_old | (revs > np.where(has_old, w.store.count[np.maximum(old, 0)], -1))
        take = keep & newer
        self.ignored += int((~take).sum())
        if not take.any():
            return 0
        replaced = old[take & has_old]
        if len(replaced):
            w.free_slots(replaced)
        rows = np.flatnonzero(take)
        slots = restore_slots(w, None, take_rows(tables, rows) if len(rows) < n else tables)
        w.revision[slots] = w.store.count[slots]
        w.dirty[slots] = True
        return len(rows)

    # -- output ---------------------------------------------------------------
    def _groups(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Group id of each slot (same window start and group keys; sessions: overlapping), and leaders' order."""
        w = self.w
        keys = [w.keys[s][:-1] for s in slots.tolist()]
        code: dict[tuple, int] = {}
        if self.spec.type != "session":
            gid = np.array([code.setdefault((int(w.start[s]), k), len(code)) for s, k in zip(slots.tolist(), keys)], np.int64)
            return gid, slots
        kid = np.array([code.setdefault(k, len(code)) for k in keys], np.int64)
        order = np.lexsort((w.start[slots], kid))
        gid = np.empty(len(slots), np.int64)
        g, run_end, prev = -1, NEG_INF, -1
        for i in order.tolist():
            s = int(slots[i])
            if kid[i] != prev or w.start[s] >= run_end:
                g += 1
                run_end = int(w.end[s])
            else:
                run_end = max(run_end, int(w.end[s]))
            prev = kid[i]
            gid[i] = g
        return gid, slots

    def _merged(self, slots: np.ndarray, gid: np.ndarray, groups: np.ndarray, revision_zero: bool = False) -> pa.Table | None:
        """One merged row per group in ``groups`` (ids in ``gid`` of ``slots``)."""
        w = self.w
        member = np.isin(gid, groups)
        ms, mg = slots[member], gid[member]
        if len(ms) == 0:
            return None
        # merge in (group, partition, start) order: the leader is the lowest partition, so first/last ties in
        # event time across partitions go to the lower (first) and the higher (last) partition, whatever the timing
        order = np.lexsort((w.start[ms], w.partition[ms], mg))
        ms, mg = ms[order], mg[order]
        sw = WindowState(self.spec, self.lateness, capacity=max(len(ms), 1))  # scratch: merged states
        sw._take(len(ms))  # slots 0..n-1 of a fresh state, in order
        sw.key_types = w.key_types
        scratch = sw.store
        scratch.udfs = w.store.udfs
        _copy_states(w.store, ms, scratch, w.partition)
        ug, first = np.unique(mg, return_index=True)
        leaders = np.repeat(first, np.diff(np.append(first, len(mg))))  # members of a group are contiguous
        others = np.flatnonzero(leaders != np.arange(len(ms)))
        if len(others):
            scratch.merge(leaders[others], others)
        lead = first
        starts = np.minimum.reduceat(w.start[ms], first)
        ends = np.maximum.reduceat(w.end[ms], first)
        keys = [w.keys[int(ms[i])][:-1] for i in lead.tolist()]
        order = np.lexsort((np.array([json.dumps(k, default=str) for k in keys]), starts)) if len(keys) else np.zeros(0, np.int64)
        lead, starts, ends = lead[order], starts[order], ends[order]
        keys = [keys[i] for i in order.tolist()]
        if self.child is not None and not revision_zero:
            self._ship_up(sw, lead, starts, keys)
        n = len(lead)
        cols: dict[str, pa.Array] = {
            "window": pa.array([self.spec.name] * n, pa.string()),
            "window_start": pa.array(starts, _TS),
            "window_end": pa.array(ends, _TS),
        }
        for i, k in enumerate(self.spec.group_by):
            cols[k] = pa.array([key[i] for key in keys], w.key_types[i] if w.key_types else None)
        cols.update(scratch.finalize(lead))
        for f in scratch.take_failures():
            if revision_zero or self.spec.rollup_of:  # a level's inputs were reported by the level below
                continue
            coded = np.asarray(f["offsets"], np.int64)
            parts, offs = coded >> _OFFSET_BITS, coded & ((1 << _OFFSET_BITS) - 1)
            values = np.empty(len(f["values"]), object)
            values[:] = f["values"]
            for p in np.unique(parts).tolist():  # dead letters name each record's own partition
                sel = parts == p
                self.failures.append({**f, "window": self.spec.name, "window_start": int(starts[f["position"]]),
                                      "partition": int(p), "offsets": offs[sel].tolist(), "values": list(values[sel])})
        cols["revision"] = pa.array(np.zeros(n, np.int64) if revision_zero else scratch.count[lead])
        return pa.table(cols)

    def _ship_up(self, sw: WindowState, lead: np.ndarray, starts: np.ndarray, keys: list[tuple]) -> None:
        """The merged states of emitted groups, as partials of the rollup level above: its window start, and
        the position of this window inside it in place of the source partition (replaced by revision)."""
        size = self.child.spec.size
        coarse = np.floor_divide(starts, size) * size
        sub = (starts - coarse) // self.spec.size
        sw.start[lead], sw.end[lead] = coarse, coarse + size
        sw.partition[lead] = sub.astype(np.int32)
        for slot, k, p in zip(lead.tolist(), keys, sub.tolist()):
            sw.keys[slot] = (*k, int(p))
        sw.revision[lead] = sw.store.count[lead]
        self.child.add(snapshot_slots(sw, lead, partition_column=True))

    def close(self) -> pa.Table | None:
        """Merged rows of the groups every partition has passed and that changed since last emitted; frees
        what no partition can change any more."""
        w = self.w
        slots = np.flatnonzero(w.active)
        if len(slots) == 0:
            return None
        gf = self.global_frontier()
        gid, slots = self._groups(slots)
        ng = int(gid.max()) + 1
        gend = np.full(ng, NEG_INF, np.int64)
        np.maximum.at(gend, gid, w.end[slots])
        gdirty = np.zeros(ng, bool)
        np.logical_or.at(gdirty, gid, w.dirty[slots])
        ready = np.flatnonzero(gdirty & (gend <= gf))
        if len(ready) and self.spec.type != "session":
            # every group of an affected window start (of this owner) is emitted again: a sink that keeps one
            # file per (window start, shard) rewrites it whole
            gstart = np.zeros(ng, np.int64)
            gstart[gid] = w.start[slots]
            ready = np.flatnonzero(np.isin(gstart, np.unique(gstart[ready])) & (gend <= gf))
        out = None
        if len(ready):
            out = self._merged(slots, gid, ready)
            w.dirty[slots[np.isin(gid, ready)]] = False
            if out is not None and self.spec.type != "session":
                for st, rev, k in zip(out.column("window_start").cast(pa.int64()).to_pylist(), out.column("revision").to_pylist(),
                                      zip(*(out.column(c).to_pylist() for c in self.spec.group_by)) if self.spec.group_by else [()] * out.num_rows):
                    self.emitted[(st, tuple(k))] = rev
        # free: sessions once emitted (final); windows once every partition is past end + allowed lateness
        if self.spec.type == "session":
            done = slots[np.isin(gid, ready)]
        else:
            done = slots[(w.end[slots] + self.lateness <= gf) & ~w.dirty[slots]]
            for s in done.tolist():
                self.emitted.pop((int(w.start[s]), w.keys[s][:-1]), None)
        if len(done):
            w.free_slots(done)
            w.store.compact(w.active)
        return out

    def open_partials(self, filters: dict[str, str]) -> dict[str, pa.Table]:
        """Partials of groups not emitted yet (queryable state), filtered on group keys as text."""
        w = self.w
        slots = np.flatnonzero(w.active)
        keys = list(self.spec.group_by)
        keep = []
        for s in slots.tolist():
            key = w.keys[s]
            if self.spec.type != "session" and (int(w.start[s]), key[:-1]) in self.emitted:
                continue
            if all(k in keys and str(key[keys.index(k)]) == str(v) for k, v in filters.items()):
                keep.append(s)
        return snapshot_slots(w, np.array(keep, np.int64), partition_column=True)

    def open_rows(self) -> pa.Table | None:
        """Every group held, merged, with revision 0 (a preview: nothing is marked emitted)."""
        w = self.w
        slots = np.flatnonzero(w.active)
        if len(slots) == 0:
            return None
        gid, slots = self._groups(slots)
        return self._merged(slots, gid, np.unique(gid), revision_zero=True)

    # -- checkpoints ------------------------------------------------------------
    def snapshot(self) -> dict[str, pa.Table]:
        tables = snapshot_slots(self.w, np.flatnonzero(self.w.active), partition_column=True)
        tables["frontier"] = pa.table({"partition": pa.array(list(self.frontier), pa.int32()),
                                       "frontier": pa.array(list(self.frontier.values()), pa.int64())})
        em = list(self.emitted.items())
        tables["emitted"] = pa.table({"start": pa.array([k[0] for k, _ in em], pa.int64()),
                                      "keys": pa.array([json.dumps(list(k[1]), default=str) for k, _ in em], pa.string()),
                                      "revision": pa.array([v for _, v in em], pa.int64())})
        return tables

    def restore(self, tables: dict[str, pa.Table]) -> None:
        restore_slots(self.w, None, {k: v for k, v in tables.items() if k not in ("frontier", "emitted")})
        ft = tables.get("frontier")
        if ft is not None:
            self.advance(dict(zip(ft.column("partition").to_pylist(), ft.column("frontier").to_pylist())))
        et = tables.get("emitted")
        if et is not None and et.num_rows:
            # keys come back through the slots' key tuples (JSON loses types such as ints vs strings)
            by_text = {json.dumps(list(self.w.keys[s][:-1]), default=str): self.w.keys[s][:-1]
                       for s in np.flatnonzero(self.w.active).tolist()}
            for st, k, rev in zip(et.column("start").to_pylist(), et.column("keys").to_pylist(), et.column("revision").to_pylist()):
                if k in by_text:
                    self.emitted[(int(st), by_text[k])] = int(rev)


class LevelWindow(MergeWindow):
    """A rollup level: partials are the merged states of the level below (one per window of it inside this
    one, replaced by revision); it closes on the frontier of the level below."""

    def __init__(self, spec, allowed_lateness: int, below: MergeWindow):
        super().__init__(spec, allowed_lateness, [])
        self.below = below
        below.child = self

    def global_frontier(self) -> int:
        return self.below.global_frontier()

    def advance(self, frontiers: dict[int, int]) -> None:
        """Levels follow the level below."""


class Merger:
    """One merge owner: the merged windows of a pipeline for the groups of its shard."""

    def __init__(self, spec: PipelineSpec, partitions: list[int], windows: list[str] | None = None):
        self.spec = spec
        names = spec.merged_windows if windows is None else windows
        lateness = spec.event_time.allowed_lateness
        self.windows: dict[str, MergeWindow] = {}
        for w in spec.windows:  # a level comes after the window below it
            if w.name not in names:
                continue
            if w.rollup_of:
                self.windows[w.name] = LevelWindow(w, lateness, self.windows[w.rollup_of])
            else:
                self.windows[w.name] = MergeWindow(w, lateness, partitions)
        self.rows_emitted = 0

    def add(self, window: str, tables: dict[str, pa.Table]) -> int:
        return self.windows[window].add(tables)

    def advance(self, frontiers: dict[str, dict[int, int]]) -> None:
        for name, f in frontiers.items():
            if name in self.windows:
                self.windows[name].advance(f)

    def close(self) -> tuple[list[pa.Table], list[dict]]:
        """Merged rows ready now (one table per window) and user-function failures of them."""
        out, failures = [], []
        for mw in self.windows.values():
            t = mw.close()
            if t is not None and t.num_rows:
                out.append(t)
                self.rows_emitted += t.num_rows
            failures += mw.failures
            mw.failures = []
        return out, failures

    @property
    def open_slots(self) -> int:
        return sum(mw.w.open_slots for mw in self.windows.values())

    def snapshot(self) -> dict[str, dict[str, pa.Table]]:
        return {name: mw.snapshot() for name, mw in self.windows.items()}

    def restore(self, tables: dict[str, dict[str, pa.Table]]) -> None:
        for name, t in tables.items():
            if name in self.windows:
                self.windows[name].restore(t)


def root_window(spec: PipelineSpec, name: str) -> str:
    """The window a rollup level is built from, down to the one records fold into (a level lives in the owner
    of its base group, so it is sharded by the base window's name)."""
    by_name = {w.name: w for w in spec.windows}
    while by_name[name].rollup_of:
        name = by_name[name].rollup_of
    return name


def reshard(spec: PipelineSpec, partitions: list[int], snapshots: list, shard: int, owners: int, decode) -> Merger:
    """A merge owner's state rebuilt from the snapshots of a different number of owners: every group whose
    stable hash falls in ``shard`` of ``owners``, with the frontiers (the highest of each partition).
    ``decode(data, merger)`` loads one snapshot (``pipeline.checkpoint.decode_merge``)."""
    out = Merger(spec, partitions)
    for data in snapshots:
        old = Merger(spec, partitions)
        decode(data, old)
        for name, mw in old.windows.items():
            tables = {k: v for k, v in mw.snapshot().items() if k not in ("frontier", "emitted")}
            part = split_by_shard(root_window(spec, name), list(mw.spec.group_by), tables, owners).get(shard)
            if part is not None:
                out.windows[name].add(part)
            if not mw.spec.rollup_of:
                out.windows[name].advance(mw.frontier)
    return out


class LocalMerge:
    """Merging in this process (one owner for every group): the inline runner and the tests' core harness."""

    def __init__(self, spec: PipelineSpec, partitions: list[int]):
        self.merger = Merger(spec, partitions)

    def feed(self, partials: dict[str, dict[str, pa.Table]], frontiers: dict[str, dict[int, int]]
             ) -> tuple[list[pa.Table], list[dict]]:
        """Take one batch's partials, then its frontiers (in that order); return what is ready."""
        for name, tables in partials.items():
            self.merger.add(name, tables)
        self.merger.advance(frontiers)
        return self.merger.close()


def unshipped_partials(w: WindowState, filters: dict[str, str]) -> dict[str, pa.Table]:
    """A worker's slots of a merged window never shipped (still open in their partition), as partials."""
    slots = np.flatnonzero(w.active & (w.revision == 0))
    keys = list(w.spec.group_by)
    if filters:
        slots = np.array([s for s in slots.tolist()
                          if all(k in keys and str(w.keys[s][keys.index(k)]) == str(v) for k, v in filters.items())], np.int64)
    return snapshot_slots(w, slots, partition_column=True)


def merge_open(spec, allowed_lateness: int, partials: list[dict[str, pa.Table]]) -> pa.Table | None:
    """Open rows of a merged window from the partials held anywhere (workers and owners): the latest partial of
    each partition per group, merged; revision 0 (not emitted yet)."""
    parts = sorted({int(p) for t in partials for p in t["slots"].column("partition").to_pylist()})
    mw = MergeWindow(spec, allowed_lateness, parts)
    for t in partials:
        if t["slots"].num_rows:
            mw.add(t)
    return mw.open_rows()
