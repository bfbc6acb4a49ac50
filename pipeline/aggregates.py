"""Mergeable aggregate states for window slots, kept in columnar numpy arrays.

A *slot* is one open window of one group (window start + group keys). Its
aggregate state lives at index ``slot`` of flat arrays, so folding a batch is a
handful of ``bincount``/``ufunc.at`` calls over the whole batch rather than a
loop over records:

* ``zero``: ``reset(slots)`` clears the states of newly taken slots;
* ``update``: ``fold(slots, batch)`` adds the batch's records to their slots;
* ``merge``: ``merge(dst, src)`` folds whole slot states into others (sessions);
* ``finalize``: ``finalize(slots)`` gives one Arrow column per aggregation.

Percentiles (sketch buckets), ``count_distinct`` (distinct values) and user
functions (raw values) keep their state as rows ``(slot, ...)`` in a
``_RowStore`` that is compacted as slots are freed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import sketch
from pipeline.spec import Aggregation

__all__ = ["AggregateStore", "FoldInput", "load_udf"]


@dataclass
class FoldInput:
    """The records that contribute to slots: one entry per (record, window) pair.

    ``numeric`` maps a field to ``(values float64, valid bool)``; ``arrays``
    maps a field to its Arrow array (any type); ``times`` are event times (ms).
    """

    slots: np.ndarray
    times: np.ndarray
    numeric: dict[str, tuple[np.ndarray, np.ndarray]]
    arrays: dict[str, pa.Array]
    offsets: np.ndarray | None = None


def load_udf(ref: str) -> Callable[[pa.Array], Any]:
    """Import ``module:function``; raises ValueError naming the reference if it fails."""
    module_name, _, func_name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # import errors of user code come in every shape
        raise ValueError(f"cannot import module {module_name!r} for aggregation {ref!r}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"{ref!r}: {module_name} has no function {func_name!r}")
    return func


class _RowStore:
    """Rows of ``(slot, value[, count])`` for state that is not a fixed-size number."""

    def __init__(self, kind: str):
        self.kind = kind  # "sketch" | "distinct" | "values"
        self.slots: list[np.ndarray] = []
        self.values: list[Any] = []  # np.ndarray (sketch buckets) or pa.Array
        self.counts: list[np.ndarray] = []
        self.length = 0
        self.compacted_length = 0

    def add(self, slots: np.ndarray, values: Any, counts: np.ndarray | None = None) -> None:
        if len(slots) == 0:
            return
        self.slots.append(slots.astype(np.int64, copy=False))
        self.values.append(values)
        if counts is not None:
            self.counts.append(counts)
        self.length += len(slots)

    def _concat(self):
        if not self.slots:
            empty_v = np.zeros(0, np.int64) if self.kind == "sketch" else pa.array([], pa.null())
            return np.zeros(0, np.int64), empty_v, np.zeros(0, np.int64)
        slots = np.concatenate(self.slots) if len(self.slots) > 1 else self.slots[0]
        if self.kind == "sketch":
            values = np.concatenate(self.values) if len(self.values) > 1 else self.values[0]
            counts = np.concatenate(self.counts) if len(self.counts) > 1 else self.counts[0]
        else:
            values = pa.concat_arrays([v.cast(self.values[0].type) for v in self.values]) if len(self.values) > 1 else self.values[0]
            # "values" rows may carry their source offsets (user functions name failed records)
            counts = None
            if self.kind == "values" and self.counts and sum(len(c) for c in self.counts) == len(slots):
                counts = np.concatenate(self.counts) if len(self.counts) > 1 else self.counts[0]
        return slots, values, counts

    def compact(self, alive: np.ndarray) -> None:
        """Drop rows of freed slots and merge duplicate rows."""
        slots, values, counts = self._concat()
        keep = alive[slots] if len(slots) else np.zeros(0, bool)
        slots = slots[keep]
        if self.kind == "sketch":
            values, counts = values[keep], counts[keep]
            key = slots * (1 << 20) + (values + (1 << 19))
            ukey, inv = np.unique(key, return_inverse=True)
            counts = np.bincount(inv, weights=counts).astype(np.int64)
            slots, values = ukey >> 20, (ukey & ((1 << 20) - 1)) - (1 << 19)
            self.slots, self.values, self.counts = [slots], [values], [counts]
        else:
            values = values.filter(pa.array(keep)) if len(keep) else values
            kept_counts = [counts[keep]] if counts is not None else []
            if self.kind == "distinct" and len(slots):
                t = pa.table({"s": slots, "v": values}).group_by(["s", "v"], use_threads=False).aggregate([])
                slots, values = t["s"].to_numpy(), t["v"].combine_chunks()
            self.slots, self.values, self.counts = [slots], [values], kept_counts
        self.length = self.compacted_length = len(slots)

    def maybe_compact(self, alive: np.ndarray) -> None:
        if self.length > max(4 * self.compacted_length, 50_000):
            self.compact(alive)

    def relabel(self, mapping: np.ndarray) -> None:
        """Rewrite slot ids through ``mapping`` (old slot -> new slot)."""
        self.slots = [mapping[s] for s in self.slots]

    def rows_for(self, wanted: np.ndarray, capacity: int):
        """Rows whose slot is in ``wanted``: (slots, values, counts)."""
        slots, values, counts = self._concat()
        mask = np.zeros(capacity, bool)
        mask[wanted] = True
        sel = mask[slots] if len(slots) else np.zeros(0, bool)
        if self.kind == "sketch":
            return slots[sel], values[sel], counts[sel]
        return slots[sel], values.filter(pa.array(sel)) if len(sel) else values, counts[sel] if counts is not None else None


class AggregateStore:
    """Aggregate states of every slot of one window, for a fixed list of aggregations."""

    def __init__(self, aggregations: list[Aggregation], capacity: int = 1024):
        self.aggregations = aggregations
        self.capacity = 0
        self.count = np.zeros(0, np.int64)
        # numeric fields: non-null count, sum, min, max
        self.numeric_fields = sorted(
            {a.field for a in aggregations if a.fn in ("sum", "min", "max", "mean") or a.quantile is not None}
        )
        self.nn: dict[str, np.ndarray] = {}
        self.sum: dict[str, np.ndarray] = {}
        self.min: dict[str, np.ndarray] = {}
        self.max: dict[str, np.ndarray] = {}
        self.order_fields = sorted({a.field for a in aggregations if a.fn in ("first", "last")})
        self.first_t: dict[str, np.ndarray] = {}
        self.first_v: dict[str, np.ndarray] = {}
        self.last_t: dict[str, np.ndarray] = {}
        self.last_v: dict[str, np.ndarray] = {}
        self.sketches = {a.field: _RowStore("sketch") for a in aggregations if a.quantile is not None}
        self.distinct = {a.field: _RowStore("distinct") for a in aggregations if a.fn == "count_distinct"}
        self.udf_values = {a.field: _RowStore("values") for a in aggregations if a.is_udf}
        self.udfs = {a.fn: load_udf(a.fn) for a in aggregations if a.is_udf}
        self.failures: list[dict] = []
        self.value_types: dict[str, pa.DataType] = {}
        self.array_fields = sorted({*self.order_fields, *self.distinct, *self.udf_values})
        self._grow(capacity)

    # -- storage ----------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        old = self.capacity

        def ext(arr: np.ndarray | None, fill, dtype) -> np.ndarray:
            new = np.full(capacity, fill, dtype=dtype)
            if arr is not None and old:
                new[:old] = arr[:old]
            return new

        self.count = ext(self.count, 0, np.int64)
        for f in self.numeric_fields:
            self.nn[f] = ext(self.nn.get(f), 0, np.int64)
            self.sum[f] = ext(self.sum.get(f), 0.0, np.float64)
            self.min[f] = ext(self.min.get(f), np.inf, np.float64)
            self.max[f] = ext(self.max.get(f), -np.inf, np.float64)
        big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        for f in self.order_fields:
            self.first_t[f] = ext(self.first_t.get(f), big, np.int64)
            self.last_t[f] = ext(self.last_t.get(f), small, np.int64)
            self.first_v[f] = ext(self.first_v.get(f), None, object)
            self.last_v[f] = ext(self.last_v.get(f), None, object)
        self.capacity = capacity

    def ensure(self, capacity: int) -> None:
        if capacity > self.capacity:
            self._grow(max(capacity, 2 * self.capacity))

    def reset(self, slots: np.ndarray) -> None:
        """zero: clear the states of slots that are (re)used for new windows."""
        if len(slots) == 0:
            return
        self.count[slots] = 0
        for f in self.numeric_fields:
            self.nn[f][slots] = 0
            self.sum[f][slots] = 0.0
            self.min[f][slots] = np.inf
            self.max[f][slots] = -np.inf
        for f in self.order_fields:
            self.first_t[f][slots] = np.iinfo(np.int64).max
            self.last_t[f][slots] = np.iinfo(np.int64).min
            self.first_v[f][slots] = None
            self.last_v[f][slots] = None

    # -- update -----------------------------------------------------------
    def fold(self, inp: FoldInput) -> None:
        """update: add every (record, slot) pair of ``inp`` to the slot states."""
        slots = inp.slots
        if len(slots) == 0:
            return
        cap = self.capacity
        self.count += np.bincount(slots, minlength=cap)[:cap]
        for f in self.numeric_fields:
            values, valid = inp.numeric[f]
            vs, vv = slots[valid], values[valid]
            self.nn[f] += np.bincount(vs, minlength=cap)[:cap]
            self.sum[f] += np.bincount(vs, weights=vv, minlength=cap)[:cap]
            np.minimum.at(self.min[f], vs, vv)
            np.maximum.at(self.max[f], vs, vv)
            if f in self.sketches:
                # pre-aggregate (slot, bucket) pairs of this batch: far fewer rows to keep
                key = vs * (1 << 20) + (sketch.bucket_of(vv) + (1 << 19))
                ukey, counts = np.unique(key, return_counts=True)
                self.sketches[f].add(ukey >> 20, (ukey & ((1 << 20) - 1)) - (1 << 19), counts)
        if self.order_fields:
            # sort by (slot, time); ties keep input (offset) order, so first = earliest offset
            order = np.lexsort((inp.times, slots))
            s_sorted = slots[order]
            bounds = np.flatnonzero(np.diff(s_sorted)) + 1
            starts = np.concatenate(([0], bounds))
            ends = np.concatenate((bounds, [len(s_sorted)])) - 1
            us = s_sorted[starts]
            t_first, t_last = inp.times[order[starts]], inp.times[order[ends]]
            for f in self.order_fields:
                arr = inp.arrays[f]
                self.value_types.setdefault(f, arr.type)
                first_vals = arr.take(pa.array(order[starts])).to_numpy(zero_copy_only=False)
                last_vals = arr.take(pa.array(order[ends])).to_numpy(zero_copy_only=False)
                better_first = t_first < self.first_t[f][us]
                self.first_t[f][us[better_first]] = t_first[better_first]
                self.first_v[f][us[better_first]] = first_vals[better_first]
                better_last = t_last >= self.last_t[f][us]
                self.last_t[f][us[better_last]] = t_last[better_last]
                self.last_v[f][us[better_last]] = last_vals[better_last]
        for f, store in self.distinct.items():
            arr = inp.arrays[f]
            self.value_types.setdefault(f, arr.type)
            t = pa.table({"s": slots, "v": arr}).group_by(["s", "v"], use_threads=False).aggregate([])
            store.add(t["s"].to_numpy(), t["v"].combine_chunks())
        for f, store in self.udf_values.items():
            arr = inp.arrays[f]
            self.value_types.setdefault(f, arr.type)
            store.add(slots.copy(), arr, inp.offsets.copy() if inp.offsets is not None else None)

    # -- merge ------------------------------------------------------------
    def merge(self, dst: np.ndarray, src: np.ndarray) -> None:
        """merge: fold the states of slots ``src`` into slots ``dst`` (pairwise)."""
        if len(src) == 0:
            return
        np.add.at(self.count, dst, self.count[src])
        for f in self.numeric_fields:
            np.add.at(self.nn[f], dst, self.nn[f][src])
            np.add.at(self.sum[f], dst, self.sum[f][src])
            np.minimum.at(self.min[f], dst, self.min[f][src])
            np.maximum.at(self.max[f], dst, self.max[f][src])
        for f in self.order_fields:
            for d, s in zip(dst.tolist(), src.tolist()):  # few session merges per batch
                if self.first_t[f][s] < self.first_t[f][d]:
                    self.first_t[f][d], self.first_v[f][d] = self.first_t[f][s], self.first_v[f][s]
                if self.last_t[f][s] >= self.last_t[f][d]:
                    self.last_t[f][d], self.last_v[f][d] = self.last_t[f][s], self.last_v[f][s]
        mapping = np.arange(self.capacity)
        mapping[src] = dst
        for store in (*self.sketches.values(), *self.distinct.values(), *self.udf_values.values()):
            store.relabel(mapping)

    @property
    def has_rows(self) -> bool:
        return bool(self.sketches or self.distinct or self.udf_values)

    def compact(self, alive: np.ndarray, force: bool = False) -> None:
        """Drop row state of slots not in ``alive`` (always with ``force``, else when it pays)."""
        for store in (*self.sketches.values(), *self.distinct.values(), *self.udf_values.values()):
            if force:
                store.compact(alive)
            else:
                store.maybe_compact(alive)

    # -- finalize ---------------------------------------------------------
    def finalize(self, slots: np.ndarray) -> dict[str, pa.Array]:
        """finalize: one Arrow column per aggregation for ``slots`` (in that order)."""
        n = len(slots)
        pos = np.full(self.capacity, -1, np.int64)
        pos[slots] = np.arange(n)
        out: dict[str, pa.Array] = {}
        for a in self.aggregations:
            f = a.field
            if a.fn == "count":
                out[a.column] = pa.array(self.count[slots])
            elif a.fn in ("sum", "min", "max", "mean"):
                nn = self.nn[f][slots]
                empty = nn == 0
                if a.fn == "sum":
                    vals = self.sum[f][slots]
                elif a.fn == "min":
                    vals = self.min[f][slots]
                elif a.fn == "max":
                    vals = self.max[f][slots]
                else:
                    with np.errstate(invalid="ignore", divide="ignore"):
                        vals = self.sum[f][slots] / nn
                out[a.column] = pa.array(vals, mask=empty if empty.any() else None)
            elif a.quantile is not None:
                s, b, c = self.sketches[f].rows_for(slots, self.capacity)
                q = sketch.quantiles(pos[s], b, c, n, a.quantile)
                out[a.column] = pa.array(q, mask=np.isnan(q) if np.isnan(q).any() else None)
            elif a.fn in ("first", "last"):
                vals = (self.first_v if a.fn == "first" else self.last_v)[f][slots]
                out[a.column] = pa.array(list(vals), type=self.value_types.get(f, pa.null()))
            elif a.fn == "count_distinct":
                s, v, _ = self.distinct[f].rows_for(slots, self.capacity)
                counts = np.zeros(n, np.int64)
                if len(s):
                    # batches were deduplicated one by one; a value may still repeat across them
                    t = pa.table({"p": pos[s], "v": v}).filter(pc.is_valid(v))
                    t = t.group_by(["p", "v"], use_threads=False).aggregate([])
                    counts = np.bincount(t["p"].to_numpy(), minlength=n).astype(np.int64)
                out[a.column] = pa.array(counts)
            else:
                out[a.column] = self._udf(a, slots, pos, n)
        return out

    def take_failures(self) -> list[dict]:
        out, self.failures = self.failures, []
        return out

    def _udf(self, a: Aggregation, slots: np.ndarray, pos: np.ndarray, n: int) -> pa.Array:
        s, v, offs = self.udf_values[a.field].rows_for(slots, self.capacity)
        order = np.argsort(pos[s], kind="stable")
        v = v.take(pa.array(order))
        offs = offs[order] if offs is not None else None
        counts = np.bincount(pos[s], minlength=n)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        fn = self.udfs[a.fn]
        results = []
        # a user function is called once per window group: that is its contract
        for i in range(n):
            piece = v.slice(offsets[i], counts[i])
            try:
                res = fn(piece)
                if isinstance(res, pa.Scalar):
                    res = res.as_py()
                pa.array([res])  # a result Arrow cannot hold fails this group, not the batch
            except Exception as exc:  # user code raises anything: the group's records are dead-lettered
                import traceback

                self.failures.append({
                    "position": i, "function": a.fn, "field": a.field,
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": "".join(traceback.format_exception(exc, limit=-3)),
                    "offsets": offs[offsets[i]:offsets[i] + counts[i]].tolist() if offs is not None else [],
                    "values": piece.to_pylist(),
                })
                res = None
            results.append(res)
        try:
            return pa.array(results)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # results of different types: every group's result as text, so nothing is lost
            return pa.array([None if r is None else str(r) for r in results], pa.string())
