"""Enrichment, the pure part: key extraction, the L1 cache, the Arrow join, IP ranges.

Per batch only the distinct keys are looked up; the looked-up rows come back
as one small Arrow table and are joined onto the batch with ``index_in`` +
``take`` (no per-record Python loop). I/O (Redis, PostgreSQL) lives in
``pipeline.io.lookups``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["MISSING", "IpRanges", "LruTtlCache", "encode_keys", "ip_keys", "join_rows", "json_key_hints", "key_strings"]

_SEP = "\x1f"  # unit separator: joins the parts of a multi-field key
MISSING = object()  # a key known to have no row (negative cache entry)


def key_strings(table: pa.Table, fields: list[str]) -> pa.Array:
    """The lookup key of each row as a string (parts joined by U+001F); null if any part is null."""
    parts = [table.column(f).combine_chunks() for f in fields]
    parts = [p if pa.types.is_string(p.type) else p.cast(pa.string()) for p in parts]
    if len(parts) == 1:
        return parts[0]
    return pc.binary_join_element_wise(*parts, _SEP)


def json_key_hints(values: list[bytes], field: str) -> list[str]:
    """Distinct values of a top-level JSON field, read from the raw bytes with one vectorized regex.

    Only a hint for warming caches ahead of a batch (an escaped or nested value is
    simply not found): the batch itself is always decoded properly.
    """
    if not values:
        return []
    name = re.escape(json.dumps(field))
    raw = pa.array(values, pa.binary()).cast(pa.string(), safe=False)
    found = pc.extract_regex(raw, name + r'\s*:\s*(?:"(?P<s>[^"\\]*)"|(?P<n>-?[0-9]+)[,} ])')
    s, n = pc.struct_field(found, "s"), pc.struct_field(found, "n")
    keys = pc.if_else(pc.equal(s, ""), n, s)
    return [k for k in pc.unique(keys.drop_null()).to_pylist() if k]


def split_key(key: str, n: int) -> tuple:
    return tuple(key.split(_SEP)) if n > 1 else (key,)


class LruTtlCache:
    """Least-recently-used cache with a per-entry expiry (monotonic clock)."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        # the batch, the lookahead thread and the invalidation listener share the cache
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, keys: list[str]) -> tuple[dict[str, Any], list[str]]:
        """(found: key -> value or MISSING, keys not cached or expired)."""
        now = self.clock()
        found, missing = {}, []
        data = self._data
        with self._lock:
            # a dict probe per distinct key of the batch: the cache is a hash map
            for k in keys:
                entry = data.get(k)
                if entry is None or entry[0] <= now:
                    if entry is not None:
                        del data[k]
                    missing.append(k)
                else:
                    data.move_to_end(k)
                    found[k] = entry[1]
        return found, missing

    def put_many(self, items: dict[str, Any], ttl_s: float | None = None) -> None:
        expires = self.clock() + (self.ttl_s if ttl_s is None else ttl_s)
        data = self._data
        with self._lock:
            for k, v in items.items():
                data[k] = (expires, v)
                data.move_to_end(k)
            while len(data) > self.max_entries:
                data.popitem(last=False)

    def invalidate(self, key: str) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def encode_keys(keys: pa.Array) -> tuple[np.ndarray, list]:
    """(code per row into the distinct keys, -1 for a null key; the distinct keys), one hash pass."""
    enc = pc.dictionary_encode(keys)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, enc.dictionary.to_pylist()


def join_rows(table: pa.Table, codes: np.ndarray, distinct: list, found: dict[str, dict | Any],
              types: dict[str, pa.DataType]) -> tuple[pa.Table, np.ndarray]:
    """Append the enrichment fields to ``table``; returns (table, matched mask).

    ``codes``/``distinct`` come from ``encode_keys``; ``found`` maps a key to its
    row (a tuple of field values in ``types`` order) or MISSING. Values are
    built once per distinct key and spread to the rows with one ``take``.
    """
    none = (None,) * len(types)
    rows = [found.get(k, MISSING) for k in distinct]
    hit = np.array([r is not MISSING for r in rows], dtype=bool)
    take = pa.array(codes, mask=codes < 0)
    columns = list(zip(*[none if r is MISSING else r for r in rows])) if rows else [()] * len(types)
    for (f, t), vals in zip(types.items(), columns):
        values = pa.array(vals, t)
        col = values.take(take) if len(values) else pa.nulls(len(codes), t)
        table = table.append_column(f, col)
    matched = (codes >= 0) & hit[np.maximum(codes, 0)] if len(hit) else np.zeros(len(codes), bool)
    return table, matched


def ip_keys(addresses: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(16-byte big-endian keys that sort like the addresses, valid mask); IPv4 maps to ::ffff:a.b.c.d.

    numpy's S16 drops trailing zero bytes, which keeps the order; validity is a separate mask
    because ``::`` would otherwise look like an empty key.
    """
    out, valid = [], []
    for a in addresses:  # per distinct address: parsing is per string by nature
        try:
            ip = ipaddress.ip_address(a.strip()) if a is not None else None
        except ValueError:
            ip = None
        valid.append(ip is not None)
        if ip is None:
            out.append(b"")
        elif ip.version == 4:
            out.append(ipaddress.IPv6Address(f"::ffff:{ip}").packed)
        else:
            out.append(ip.packed)
    return np.array(out, dtype="S16"), np.array(valid, dtype=bool)


class IpRanges:
    """CIDR networks -> rows, looked up with one ``searchsorted`` per batch.

    Nested networks are flattened at load into disjoint segments, each owned by
    the most specific network that covers it (longest prefix wins).
    """

    def __init__(self, networks: list[str], rows: list[dict]):
        nets = []
        for net, row in zip(networks, rows):
            n = ipaddress.ip_network(net, strict=False)
            base = (0xFFFF << 32) if n.version == 4 else 0
            nets.append((base + int(n.network_address), base + int(n.broadcast_address), row))
        nets.sort(key=lambda x: (x[0], -x[1]))  # a parent comes before the networks inside it
        segments: list[tuple[int, int, dict]] = []
        stack: list[tuple[int, dict]] = []
        pos = 0

        def emit(a: int, b: int, row: dict) -> None:
            if a <= b:
                segments.append((a, b, row))

        for lo, hi, row in nets:
            while stack and stack[-1][0] < lo:
                h, r = stack.pop()
                emit(pos, h, r)
                pos = h + 1
            if stack:
                emit(pos, lo - 1, stack[-1][1])
            stack.append((hi, row))
            pos = lo
        while stack:
            h, r = stack.pop()
            emit(pos, h, r)
            pos = h + 1
        self.starts = np.array([a.to_bytes(16, "big") for a, _, _ in segments], dtype="S16")
        self.ends = np.array([b.to_bytes(16, "big") for _, b, _ in segments], dtype="S16")
        self.rows = [r for _, _, r in segments]

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Row index per 16-byte key, -1 when no network holds it (or the key is invalid)."""
        out = np.full(len(keys), -1, np.int64)
        if len(self.starts) == 0 or len(keys) == 0:
            return out
        pos = np.searchsorted(self.starts, keys, side="right") - 1
        ok = valid & (pos >= 0)
        cand = np.where(ok, pos, 0)
        inside = ok & (keys <= self.ends[cand])
        out[inside] = cand[inside]
        return out
