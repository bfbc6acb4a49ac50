"""Closed windows read from the PostgreSQL sink: tenant-scoped, filtered, paged.

Nothing from a request reaches SQL as text: column names are checked against
the window's allow-list (group keys, ``partition`` for per_partition windows,
bounds, aggregations, ``revision``) and quoted as identifiers; values are
parameters. Pages are keyset-paginated on (window_start, group keys[,
partition]) with an opaque cursor.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass

from psycopg import sql

from pipeline.io.sinks.postgres import table_name
from pipeline.spec import PipelineSpec
from serve.errors import ApiError

__all__ = ["BadQuery", "MAX_MS", "WindowInfo", "aquery_windows", "build_query", "catalog", "query_windows"]

MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last instant PostgreSQL's to_timestamp and Python both take


class BadQuery(ApiError):
    """A request naming something not allowed (400), or a window that cannot be tenant-scoped (403)."""

    def __init__(self, message: str, status: int = 400, parameter: str | None = None):
        super().__init__(status, message, parameter=parameter)


@dataclass(frozen=True)
class WindowInfo:
    pipeline: str
    window: str
    keys: tuple[str, ...]
    values: tuple[str, ...]
    per_partition: bool = False  # rows per source partition (a ``partition`` column); else merged, one per group

    @property
    def identity(self) -> tuple[str, ...]:
        """The row's key columns after the window start (group keys, and ``partition`` for per_partition windows)."""
        return (*self.keys, "partition") if self.per_partition else self.keys

    @property
    def columns(self) -> tuple[str, ...]:
        return ("window_start", "window_end", *self.identity, *self.values, "revision")


def catalog(specs: dict[str, PipelineSpec]) -> dict[tuple[str, str], WindowInfo]:
    return {(s.name, w.name): WindowInfo(s.name, w.name, tuple(w.group_by), tuple(a.column for a in w.aggregations),
                                         w.per_partition)
            for s in specs.values() for w in s.windows}


def _encode_cursor(values: list) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, default=str).encode()).decode()


def _decode_cursor(cursor: str, n: int, partition_last: bool = True) -> list:
    """The sort key a cursor carries: window_start as epoch ms in range, then ``n - 1`` scalars (the last one the
    source partition with ``partition_last``)."""
    bad = BadQuery("cursor is not one this API gave out", parameter="cursor")
    try:
        out = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, UnicodeError):
        raise bad from None
    if not isinstance(out, list) or len(out) != n:
        raise bad
    first, last = out[0], out[-1]
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= MAX_MS:
        raise bad
    if partition_last and (isinstance(last, bool) or not isinstance(last, int) or not 0 <= last < 2**31):
        raise bad
    for v in out[1:]:
        if isinstance(v, (dict, list)) or (isinstance(v, float) and v != v) or (isinstance(v, str) and "\x00" in v):
            raise bad
    return out


def _ms(v) -> int:
    return int(v.timestamp() * 1000) if isinstance(v, dt.datetime) else int(v)


def build_query(prefix: str, info: WindowInfo, tenant_key: str, tenant: str, filters: dict[str, str],
                start_ms: int | None = None, end_ms: int | None = None, order: str = "asc", fields: list[str] | None = None,
                limit: int = 100, cursor: str | None = None) -> tuple[sql.Composed, list, list[str]]:
    """The checked SQL of one page (one row more than ``limit`` tells whether another page follows)."""
    if tenant_key not in info.keys:
        raise BadQuery(f"window {info.window} is not grouped by {tenant_key!r}: it cannot be served per tenant", 403)
    allowed_filters = set(info.identity)
    for name in filters:
        if name not in allowed_filters:
            raise BadQuery(f"cannot filter on {name!r}; allowed: {sorted(allowed_filters)}", parameter=name)
    if tenant_key in filters and filters[tenant_key] != tenant:
        raise BadQuery("a token may only read its own tenant", 403, parameter=tenant_key)
    if order not in ("asc", "desc"):
        raise BadQuery("order is asc or desc", parameter="order")
    cols = list(info.columns)
    if fields:
        bad = [f for f in fields if f not in cols]
        if bad:
            raise BadQuery(f"unknown fields {bad}; allowed: {cols}", parameter="fields")
    for name, value in filters.items():
        if not isinstance(value, str) or "\x00" in value:
            raise BadQuery(f"filter {name} is a text value without NUL", parameter=name)
    sort_cols = ["window_start", *info.identity]
    where = [sql.SQL("{} = %s").format(sql.Identifier(tenant_key))]
    params: list = [tenant]
    for name, value in filters.items():
        if name == tenant_key:
            continue
        where.append(sql.SQL("{}::text = %s").format(sql.Identifier(name)))
        params.append(str(value))
    if start_ms is not None:
        where.append(sql.SQL("window_start >= to_timestamp(%s / 1000.0)"))
        params.append(start_ms)
    if end_ms is not None:
        where.append(sql.SQL("window_start < to_timestamp(%s / 1000.0)"))
        params.append(end_ms)
    if cursor:
        last = _decode_cursor(cursor, len(sort_cols), info.per_partition)
        # row comparison on the sort key; window_start travels as epoch ms
        op = sql.SQL(">") if order == "asc" else sql.SQL("<")
        where.append(sql.SQL("({}) {} (to_timestamp(%s / 1000.0), {})").format(
            sql.SQL(", ").join(map(sql.Identifier, sort_cols)), op,
            sql.SQL(", ").join(sql.Placeholder() for _ in sort_cols[1:])))
        params += last
    direction = sql.SQL("ASC") if order == "asc" else sql.SQL("DESC")
    q = sql.SQL("SELECT {cols} FROM {t} WHERE {where} ORDER BY {order} LIMIT %s").format(
        cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
        t=sql.Identifier(table_name(prefix, info.pipeline, info.window)),
        where=sql.SQL(" AND ").join(where),
        order=sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), direction) for c in sort_cols),
    )
    params.append(limit + 1)
    return q, params, sort_cols


def _page(names: list[str], raw: list[tuple], sort_cols: list[str], limit: int, fields: list[str] | None) -> tuple[list[dict], str | None]:
    rows = [dict(zip(names, r)) for r in raw]
    more = len(rows) > limit
    rows = rows[:limit]
    for r in rows:
        r["window_start"], r["window_end"] = _ms(r["window_start"]), _ms(r["window_end"])
    nxt = _encode_cursor([rows[-1][c] for c in sort_cols]) if more and rows else None
    if fields:
        rows = [{k: r[k] for k in fields} for r in rows]
    return rows, nxt


def query_windows(conn, prefix: str, info: WindowInfo, tenant_key: str, tenant: str, filters: dict[str, str],
                  start_ms: int | None = None, end_ms: int | None = None, order: str = "asc", fields: list[str] | None = None,
                  limit: int = 100, cursor: str | None = None) -> tuple[list[dict], str | None]:
    """One page of closed windows of ``tenant``; returns (rows, next cursor or None)."""
    q, params, sort_cols = build_query(prefix, info, tenant_key, tenant, filters, start_ms, end_ms, order, fields, limit, cursor)
    with conn.cursor() as cur:
        cur.execute(q, params)
        return _page([d.name for d in cur.description], cur.fetchall(), sort_cols, limit, fields)


async def aquery_windows(aconn, prefix: str, info: WindowInfo, tenant_key: str, tenant: str, filters: dict[str, str],
                         start_ms: int | None = None, end_ms: int | None = None, order: str = "asc",
                         fields: list[str] | None = None, limit: int = 100, cursor: str | None = None) -> tuple[list[dict], str | None]:
    """``query_windows`` on an async connection (the serving path: no thread per request)."""
    q, params, sort_cols = build_query(prefix, info, tenant_key, tenant, filters, start_ms, end_ms, order, fields, limit, cursor)
    async with aconn.cursor() as cur:
        await cur.execute(q, params)
        return _page([d.name for d in cur.description], await cur.fetchall(), sort_cols, limit, fields)
