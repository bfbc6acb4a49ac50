"""Enrichment lookups through three tiers: L1 memory -> L2 Redis -> L3 PostgreSQL.

Per batch each enricher looks up only the batch's distinct keys: L1 first, then
one pipelined MGET on Redis, then one ``= ANY(%s)`` query on PostgreSQL; rows
found below are written back above (read-through), and keys found nowhere are
cached as missing for ``negative_ttl``. Independent enrichers run concurrently.

Degraded modes: when Redis fails, lookups go straight to PostgreSQL for a
while (counted as ``l2_errors``); when PostgreSQL fails, the batch waits
(retrying with backoff and jitter, the worker's partitions paused and the wait
in its heartbeat) until it is back, so records are never windowed with
enrichment a store outage withheld. Only an explicit ``retries`` or
``max_outage`` ends the wait: then the miss policy applies to the keys it could
not resolve (detail ``lookup store unavailable``; not cached as missing).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.decode import FIELD_TYPES as _TYPES
from pipeline.enrich import (MISSING, IpRanges, LruTtlCache, encode_keys, ip_keys, join_rows, json_key_hints, key_strings,
                             split_key)
from pipeline.retry import RetryPolicy, call_with_retries
from pipeline.sketch import bucket_of, quantiles
from pipeline.spec import Enricher, PipelineSpec

__all__ = ["EnricherRuntime", "Enrichment", "EnrichStats"]

_NEG = "\x00missing"  # the L2 value of a key known to have no row
_US = "\x1f"
_PY = {"string": str, "float64": float, "int64": int, "bool": bool}
_HINT_POLICY = RetryPolicy(attempts=0, max_total_s=None)  # lookahead prefetch: no retries, no waiting
_L2_COOLDOWN_S = 5.0  # after a Redis error, skip L2 this long instead of timing out on every batch
# SET with expiry for every key of a write-back, in one round trip
_SET_MANY = "for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1]) end return #KEYS"


@dataclass
class EnrichStats:
    """Per-enricher counters: hits and misses count distinct keys per batch; ``records*`` count records."""

    l1_hits: int = 0
    records: int = 0
    records_l1: int = 0
    l2_hits: int = 0
    l3_hits: int = 0
    misses: int = 0
    unresolved: int = 0
    l2_errors: int = 0
    l2_writeback_dropped: int = 0
    l2_bad_values: int = 0
    l3_errors: int = 0
    l3_queries: int = 0
    invalidations: int = 0
    records_missed: int = 0
    prefetched: int = 0
    latency_ms: list = field(default_factory=list)

    def as_dict(self) -> dict:
        lat = np.array(self.latency_ms[-10_000:], dtype=np.float64)
        out = {k: v for k, v in self.__dict__.items() if k != "latency_ms"}
        if len(lat):
            g = np.zeros(len(lat), np.int64)
            b = bucket_of(lat)
            out["latency_ms_p50"] = float(quantiles(g, b, np.ones(len(lat)), 1, 0.5)[0])
            out["latency_ms_p99"] = float(quantiles(g, b, np.ones(len(lat)), 1, 0.99)[0])
        return out


class EnricherRuntime:
    """One enricher: its caches, its PostgreSQL connection, its counters."""

    def __init__(self, pipeline: str, cfg: Enricher, key_types: dict[str, pa.DataType]):
        self.cfg = cfg
        self.types = {f: _TYPES[t] for f, t in cfg.fields.items()}
        self.key_types = key_types
        self.l1 = LruTtlCache(cfg.l1.max_entries, cfg.l1.ttl / 1000.0)
        self.stats = EnrichStats()
        self.prefix = (cfg.l2.prefix if cfg.l2 and cfg.l2.prefix else f"raystream:{pipeline}:{cfg.name}:")
        self.channel = cfg.invalidation_channel or f"{self.prefix}invalidate"
        self._pg = None
        self._redis = None
        self.policy = RetryPolicy(attempts=cfg.retries, backoff_s=cfg.retry_backoff / 1000.0, max_backoff_s=10.0,
                                  max_total_s=None if cfg.max_outage is None else cfg.max_outage / 1000.0)
        # (store, attempt, error, since) while a lookup waits on PostgreSQL: the loop pauses and reports it
        self.on_wait = None
        self._last_l1: object = ()
        self._set_many = None
        self._l2_down_until = 0.0
        self._ranges: IpRanges | None = None
        self._ranges_at = 0.0
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        pg = cfg.source.postgres
        self.key_columns = pg.key_columns or list(cfg.key)
        if cfg.l2 is not None:
            import redis

            self._redis = redis.Redis.from_url(cfg.l2.url.get_secret_value(), socket_timeout=2.0, socket_connect_timeout=2.0)
            self._listener = threading.Thread(target=self._listen, name=f"invalidate-{cfg.name}", daemon=True)
            self._listener.start()
            # write-backs to Redis run beside the batch instead of inside it
            self._writeback: queue.Queue = queue.Queue(maxsize=16)
            threading.Thread(target=self._writer, name=f"l2-writer-{cfg.name}", daemon=True).start()

    # -- L3 ----------------------------------------------------------------
    def _conn(self):
        import psycopg

        if self._pg is None or self._pg.closed:
            pg = self.cfg.source.postgres
            self._pg = psycopg.connect(pg.dsn.get_secret_value(), autocommit=True,
                                       connect_timeout=max(1, pg.connect_timeout // 1000))
        return self._pg

    def _query_l3(self, keys: list[str], policy: RetryPolicy | None = None) -> dict[str, dict]:
        """One query for all ``keys``, retried by ``policy`` (the enricher's); raises ``GaveUp`` when it is exhausted."""
        pg = self.cfg.source.postgres
        fields = list(self.cfg.fields)
        n = len(self.cfg.key)
        if pg.query is not None:
            sql, params = pg.query, {"keys": keys if n == 1 else [list(split_key(k, n)) for k in keys]}
        else:
            cols = ", ".join(f'"{c}"' for c in [*self.key_columns, *fields])
            if n == 1:
                # no cast on the column: the key column's index must stay usable
                # the keys travel as one text parameter split by the server: dumping a
                # Python list element by element costs more than the query itself
                kind = self.key_types.get(self.cfg.key[0])
                cast = "::bigint[]" if kind == pa.int64() else ""
                sql = (f'select {cols} from {pg.table} '
                       f'where "{self.key_columns[0]}" = ANY(string_to_array(%(keys)s, chr(31)){cast})')
                params = {"keys": _US.join(keys)}
            else:
                tuple_expr = "(" + ", ".join(f'"{c}"::text' for c in self.key_columns) + ")"
                sql = f"select {cols} from {pg.table} where {tuple_expr} in (select * from unnest({', '.join(['%(k' + str(i) + ')s::text[]' for i in range(n)])}))"
                parts = [split_key(k, n) for k in keys]
                params = {f"k{i}": [p[i] for p in parts] for i in range(n)}
        def query() -> list[tuple]:
            try:
                with self._conn().cursor() as cur:
                    cur.execute(sql, params)
                    return cur.fetchall()
            except Exception:
                self.stats.l3_errors += 1
                self._drop_conn()
                raise

        policy = policy or self.policy

        def waiting(attempt: int, exc: BaseException, since: float) -> None:
            if self.on_wait is not None and policy is self.policy:  # a prefetch hint never reports a wait
                self.on_wait(f"enrich:{self.cfg.name}", attempt, exc, since)

        rows = call_with_retries(query, policy, f"lookup {self.cfg.name}", on_retry=waiting)
        self.stats.l3_queries += 1
        return self._rows_by_key(rows, n)

    def _drop_conn(self) -> None:
        if self._pg is not None:
            try:
                self._pg.close()
            except Exception:  # the connection is already broken; a new one is made next try
                pass
            self._pg = None

    def _rows_by_key(self, rows: list[tuple], n: int) -> dict[str, tuple]:
        """key -> field values (a tuple in ``fields`` order) for PostgreSQL rows ``(keys..., fields...)``."""
        if not rows:
            return {}
        # rows whose columns already have the declared Python types (the usual case) are kept as they are
        want = [_PY.get(kind) for kind in self.cfg.fields.values()]
        exact = all(v is None or type(v) is t for row in rows[:64] for v, t in zip(row[n:], want))
        if n == 1:
            if exact:
                return {str(row[0]): row[1:] for row in rows}
            return {str(row[0]): self._coerce(row[1:]) for row in rows}
        return {"\x1f".join(str(v) for v in row[:n]): (row[n:] if exact else self._coerce(row[n:])) for row in rows}

    def _coerce(self, values) -> tuple:
        """Values (from PostgreSQL, or strings from L2) as the declared Python types, in field order."""
        out = []
        for kind, v in zip(self.cfg.fields.values(), values):
            if v is None:
                out.append(None)
            elif kind == "float64":
                out.append(float(v))
            elif kind == "int64":
                out.append(int(v))
            elif kind == "bool":
                out.append(v if isinstance(v, bool) else v in ("True", "true", "t", "1"))
            else:
                out.append(str(v))
        return tuple(out)

    # L2 values: the fields in spec order joined by U+001F, U+0000 for null. Cheaper
    # than JSON both ways (the write-back runs beside the batch and shares its GIL).
    def _encode(self, row: tuple) -> str:
        try:
            return _US.join(row)  # all fields present and text: the common case, one C call
        except TypeError:
            return _US.join("\x00" if v is None else str(v) for v in row)

    def _decode(self, raw: bytes) -> tuple:
        parts = raw.decode().split(_US)
        if len(parts) != len(self.cfg.fields):
            raise ValueError("L2 value does not match the enricher's fields")
        return self._coerce([None if p == "\x00" else p for p in parts])

    # -- L2 ----------------------------------------------------------------
    def _l2_ok(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._l2_down_until

    def _l2_failed(self) -> None:
        self.stats.l2_errors += 1
        self._l2_down_until = time.monotonic() + _L2_COOLDOWN_S

    def _get_l2(self, keys: list[str]) -> dict[str, dict | object]:
        if not keys or not self._l2_ok():
            return {}
        try:
            values = self._redis.mget([self.prefix + k for k in keys])
        except Exception:
            self._l2_failed()
            return {}
        out = {}
        for k, v in zip(keys, values):
            if v is None:
                continue
            try:
                out[k] = MISSING if v == _NEG.encode() else self._decode(v)
            except (ValueError, UnicodeDecodeError):
                self.stats.l2_bad_values += 1  # not ours or an older layout: ask L3 instead
        return out

    def _put_l2(self, rows: dict[str, dict], missing: list[str]) -> None:
        """Queue a read-through write-back; a full queue drops it (L2 is a cache) and counts it."""
        if not self._l2_ok() or not (rows or missing):
            return
        try:
            self._writeback.put_nowait((rows, missing))
        except queue.Full:
            self.stats.l2_writeback_dropped += 1

    def _writer(self) -> None:
        while True:
            item = self._writeback.get()
            if item is None:
                return
            try:
                self._write_l2(*item)
            finally:
                self._writeback.task_done()

    def _write_l2(self, rows: dict[str, dict], missing: list[str]) -> None:
        try:
            if self._set_many is None:
                self._set_many = self._redis.register_script(_SET_MANY)
            ttl = max(1, self.cfg.l2.ttl // 1000)
            neg = max(1, self.cfg.negative_ttl // 1000)
            # one script call per TTL instead of a SET per key: ~10x less client CPU
            if rows:
                self._set_many(keys=[self.prefix + k for k in rows],
                               args=[ttl, *map(self._encode, rows.values())])
            if missing:
                self._set_many(keys=[self.prefix + k for k in missing], args=[neg, *([_NEG] * len(missing))])
        except Exception:
            self._l2_failed()

    def _listen(self) -> None:
        """Drop invalidated keys from L1; reconnects after Redis outages."""
        while not self._stop.is_set():
            try:
                ps = self._redis.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(self.channel)
                while not self._stop.is_set():
                    msg = ps.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        key = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
                        self.l1.invalidate(key)
                        self.stats.invalidations += 1
            except Exception:
                self._stop.wait(1.0)

    # -- warming -------------------------------------------------------------
    def warm(self) -> int:
        """Load the rows of ``warm_query`` into L1; returns how many."""
        q = self.cfg.source.postgres.warm_query
        if not q or self.cfg.type == "ip":
            return 0
        n = len(self.cfg.key)
        with self._conn().cursor() as cur:
            cur.execute(q)
            rows = cur.fetchall()
        items = self._rows_by_key(rows, n)
        self.l1.put_many(items)
        return len(items)

    # -- one batch -------------------------------------------------------------
    def prefetch(self, values: list[bytes]) -> int:
        """Warm L1 with the keys of raw records not processed yet (the next poll); returns keys looked up.

        Runs beside the current batch: the Redis and PostgreSQL round trips of the
        next batch overlap this one's processing. It only fills caches (as a lookup
        would), so the batch's own lookup still decides; hits of the batch are
        counted there, the prefetch's keys as ``prefetched``.
        """
        if self.cfg.type == "ip" or len(self.cfg.key) != 1:
            return 0
        keys = json_key_hints(values, self.cfg.key[0])
        _, todo = self.l1.get_many(keys)
        if todo:
            self.resolve(todo, count=False, policy=_HINT_POLICY)  # a hint: one attempt, never waits
        self.stats.prefetched += len(todo)
        return len(todo)

    def resolve(self, keys: list[str], count: bool = True, policy: RetryPolicy | None = None
                ) -> tuple[dict[str, dict | object], list[str]]:
        """Rows for distinct ``keys``: (found incl. MISSING, keys left unresolved because L3 failed).

        With the enricher's policy (the default) a PostgreSQL outage makes this
        wait, reporting through ``on_wait``, until the store is back or the
        spec's ``retries`` / ``max_outage`` are spent; only then are keys left
        unresolved (the miss policy applies, and they are not cached as missing).
        """
        t0 = time.perf_counter()
        found, todo = self.l1.get_many(keys)
        if count:
            self.stats.l1_hits += len(found)
            self._last_l1 = set(found)
        unresolved: list[str] = []
        if todo:
            from_l2 = self._get_l2(todo)
            if count:
                self.stats.l2_hits += len(from_l2)
            found.update(from_l2)
            self.l1.put_many({k: v for k, v in from_l2.items() if v is not MISSING})
            self.l1.put_many({k: v for k, v in from_l2.items() if v is MISSING}, self.cfg.negative_ttl / 1000.0)
            todo = [k for k in todo if k not in from_l2]
        if todo:
            try:
                rows = self._query_l3(todo, policy)
            except Exception:
                unresolved = todo
                rows = None
            if rows is not None:
                missing = [k for k in todo if k not in rows]
                if count:
                    self.stats.l3_hits += len(rows)
                    self.stats.misses += len(missing)
                found.update(rows)
                found.update({k: MISSING for k in missing})
                self.l1.put_many(rows)
                self.l1.put_many({k: MISSING for k in missing}, self.cfg.negative_ttl / 1000.0)
                self._put_l2(rows, missing)
        if count:
            self.stats.unresolved += len(unresolved)
            self.stats.latency_ms.append((time.perf_counter() - t0) * 1000)
        return found, unresolved

    def _ip_table(self) -> IpRanges | None:
        """The CIDR table, reloaded every ``l1.ttl``; the old copy is kept if PostgreSQL is down."""
        now = time.monotonic()
        if self._ranges is not None and now - self._ranges_at < self.cfg.l1.ttl / 1000.0:
            return self._ranges
        fields = list(self.cfg.fields)
        cols = ", ".join(f'"{c}"' for c in fields)

        def load() -> list[tuple]:
            try:
                with self._conn().cursor() as cur:
                    cur.execute(f'select "{self.key_columns[0]}"::text, {cols} from {self.cfg.source.postgres.table}')
                    return cur.fetchall()
            except Exception:
                self.stats.l3_errors += 1
                self._drop_conn()
                raise

        def waiting(attempt: int, exc: BaseException, since: float) -> None:
            if self.on_wait is not None:
                self.on_wait(f"enrich:{self.cfg.name}", attempt, exc, since)

        # with a copy in hand a refresh is tried once (the copy stays when PostgreSQL is down);
        # without one, the batch waits for the table like any lookup
        policy = _HINT_POLICY if self._ranges is not None else self.policy
        try:
            rows = call_with_retries(load, policy, f"ip ranges {self.cfg.name}", on_retry=waiting)
        except Exception:  # GaveUp: keep the old copy (or none: the miss policy applies)
            return self._ranges
        self.stats.l3_queries += 1
        self._ranges = IpRanges([r[0] for r in rows], [self._coerce(r[1:]) for r in rows])
        self._ranges_at = now
        return self._ranges

    def lookup(self, table: pa.Table) -> tuple[dict, tuple[np.ndarray, list], list[str]]:
        """Resolve the distinct keys of ``table``: (found, (code per row, distinct keys), unresolved keys)."""
        codes, distinct = encode_keys(key_strings(table, self.cfg.key))
        self.stats.records += len(codes)
        if self.cfg.type == "ip":
            t0 = time.perf_counter()
            ranges = self._ip_table()
            if ranges is None:
                self.stats.unresolved += len(distinct)
                return {}, (codes, distinct), list(distinct)
            idx = ranges.lookup(*ip_keys(distinct))
            found = {k: (ranges.rows[i] if i >= 0 else MISSING) for k, i in zip(distinct, idx.tolist())}
            self.stats.l1_hits += int((idx >= 0).sum())
            self.stats.misses += int((idx < 0).sum())
            self.stats.latency_ms.append((time.perf_counter() - t0) * 1000)
            return found, (codes, distinct), []
        found, unresolved = self.resolve(distinct)
        # records served by L1 (the hit ratio an operator sizes L1 by)
        counts = np.bincount(codes[codes >= 0], minlength=len(distinct))
        in_l1 = np.fromiter((k in self._last_l1 for k in distinct), dtype=bool, count=len(distinct))
        self.stats.records_l1 += int(counts[in_l1].sum())
        return found, (codes, distinct), unresolved

    def flush_l2(self, timeout_s: float = 10.0) -> None:
        """Wait until queued write-backs reached Redis (tests, clean stops)."""
        deadline = time.monotonic() + timeout_s
        while self._redis is not None and self._writeback.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        if self._redis is not None:
            self.flush_l2(5.0)
            self._writeback.put(None)
        for c in (self._pg, self._redis):
            try:
                if c is not None:
                    c.close()
            except Exception:  # a store that went away cannot be closed politely; nothing is pending
                pass


class Enrichment:
    """All enrichers of a pipeline; ``__call__`` is the hook ``process_batch`` takes."""

    def __init__(self, spec: PipelineSpec):
        from pipeline.decode import input_schema

        types = input_schema(spec)
        self.runtimes = [EnricherRuntime(spec.name, e, types) for e in spec.enrich]
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.runtimes)), thread_name_prefix="enrich")
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enrich-ahead")

    def warm(self) -> dict[str, int]:
        return {r.cfg.name: r.warm() for r in self.runtimes}

    def prefetch(self, values: list[bytes]):
        """Start warming every enricher's L1 with the keys of ``values`` (raw JSON records); returns the future."""
        def run() -> int:
            try:
                return sum(r.prefetch(values) for r in self.runtimes)
            except Exception:  # a hint only: the batch's own lookup handles every failure
                return 0

        return self._ahead.submit(run)

    def __call__(self, table: pa.Table) -> tuple[pa.Table, list[tuple[int, str, str]]]:
        """Add every enricher's fields; returns (table, rejects as (row, reason, detail))."""
        if table.num_rows == 0 or not self.runtimes:
            for r in self.runtimes:
                for f, t in r.types.items():
                    table = table.append_column(f, pa.nulls(table.num_rows, t))
            return table, []
        # independent enrichers look up concurrently (network-bound: threads suffice)
        if len(self.runtimes) == 1:
            results = [self.runtimes[0].lookup(table)]
        else:
            results = list(self._pool.map(lambda r: r.lookup(table), self.runtimes))
        reject = np.zeros(table.num_rows, bool)
        reasons: dict[int, tuple[str, str]] = {}
        for r, (found, (codes, distinct), unresolved) in zip(self.runtimes, results):
            table, matched = join_rows(table, codes, distinct, found, r.types)
            missed = ~matched
            r.stats.records_missed += int(missed.sum())
            if r.cfg.on_miss == "default" and missed.any():
                for f, t in r.types.items():
                    col = table.column(f).combine_chunks()
                    filled = col.fill_null(pa.scalar(r.cfg.defaults[f], t)) if r.cfg.defaults[f] is not None else col
                    table = table.set_column(table.schema.get_field_index(f), f, filled)
            elif r.cfg.on_miss == "dead_letter" and missed.any():
                unresolved_set = set(unresolved)
                for i in np.flatnonzero(missed & ~reject).tolist():
                    key = distinct[codes[i]] if codes[i] >= 0 else None
                    why = "lookup store unavailable" if key in unresolved_set else "no row for key"
                    reasons[i] = (f"enrichment_miss:{r.cfg.name}", f"{why}: {r.cfg.key}={key!r}")
                reject |= missed
        rejects = [(i, reason, detail) for i, (reason, detail) in sorted(reasons.items())]
        return table, rejects

    def flush(self) -> None:
        for r in self.runtimes:
            r.flush_l2()

    def stats(self) -> dict[str, dict]:
        return {r.cfg.name: r.stats.as_dict() for r in self.runtimes}

    def close(self) -> None:
        self._ahead.shutdown(wait=True)
        for r in self.runtimes:
            r.close()
        self._pool.shutdown(wait=False)
