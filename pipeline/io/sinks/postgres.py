"""PostgreSQL sink: idempotent upserts of closed windows through psycopg 3.

One table per window, ``<prefix><pipeline>_<window>_<digest>`` (see
``pipeline.identity``), created on first use
with a unique constraint on the window identity (``window_start``, group keys,
and ``partition`` for per_partition windows; NULLS NOT DISTINCT so a null key
is a value). A tumbling/sliding window with ``retention`` gets a table range-
partitioned by ``window_start`` (partitions about a quarter of the retention
wide); partitions whose every row ended more than ``retention`` before the
newest row's end are dropped (checked after writes, once a minute, and on
close). Sessions with a retention have such rows deleted. A write COPYs the
rows into a temporary table and upserts them with
``INSERT … ON CONFLICT … DO UPDATE … WHERE target.revision < EXCLUDED.revision``:
a replay writes the same rows again without effect, and an older revision
never replaces a newer one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time

import pyarrow as pa
import psycopg
from psycopg import sql

from pipeline.identity import sql_table
from pipeline.io.sinks.common import SinkContext, identity_columns, row_dicts, value_columns
from pipeline.spec import PipelineSpec, PostgresSink as PostgresSinkSpec

__all__ = ["PostgresSink", "table_name"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _partition_name(table: str, idx: int) -> str:
    """A partition of ``table``: a digest of the table's exact name and the partition's index (fits 63 bytes)."""
    return f"rsp_{hashlib.sha256(table.encode()).hexdigest()[:12]}_{idx}"


def table_name(prefix: str, pipeline: str, window: str) -> str:
    """The window's table (see ``pipeline.identity.sql_table``: unique per exact pipeline and window name)."""
    return sql_table(prefix, pipeline, window)


def _pg_type(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "timestamptz"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t):
        return "bigint"
    if pa.types.is_floating(t):
        return "double precision"
    return "text"


class PostgresSink:
    """Upserts closed-window tables into PostgreSQL."""

    def __init__(self, ctx: "SinkContext | PipelineSpec", cfg: PostgresSinkSpec):
        self.ctx = SinkContext.of(ctx)
        self.cfg = cfg
        self.name = "postgres"
        self.conn: psycopg.Connection | None = None
        self.created: set[str] = set()
        self.rows_written = 0
        self._expired_at: dict[str, float] = {}
        self._retained: dict[str, str] = {}  # table -> window, for windows with a retention
        self.partitioned: dict[str, bool] = {}  # table -> range-partitioned by window_start (windows with retention)
        self.partitions: dict[str, set[int]] = {}  # table -> partition indexes made by this sink
        self.partitions_dropped = 0

    def _connect(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(
                self.cfg.dsn.get_secret_value(), connect_timeout=max(1, self.cfg.connect_timeout // 1000), autocommit=False,
                # a peer that vanished (no FIN) is noticed in ~25 s instead of hanging the write for hours
                keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
            )
        return self.conn

    def reset(self) -> None:
        """Drop the connection after a failure; the next write reconnects."""
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass  # the connection is already broken
        self.conn = None
        self.created.clear()

    def _ensure_table(self, cur, table: str, window: str, schema: pa.Schema) -> list[str]:
        ident = identity_columns(self.ctx, window)
        bounds = [c for c in ("window_start", "window_end") if c not in ident]
        cols = [*ident, *bounds, *value_columns(self.ctx, window), "revision"]
        if table not in self.created:
            defs = [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(_pg_type(schema.field(c).type))) for c in cols]
            defs.append(sql.SQL("updated_at timestamptz NOT NULL DEFAULT now()"))
            defs.append(sql.SQL("CONSTRAINT {} UNIQUE NULLS NOT DISTINCT ({})").format(
                sql.Identifier(f"{table}_ident"), sql.SQL(", ").join(map(sql.Identifier, ident))))
            chunk = self._chunk(window)
            cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}){}").format(
                sql.Identifier(table), sql.SQL(", ").join(defs),
                sql.SQL(" PARTITION BY RANGE (window_start)") if chunk else sql.SQL("")))
            cur.execute("SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = to_regclass(%s)", [f'"{table}"'])
            row = cur.fetchone()
            self.partitioned[table] = bool(row and row[0])  # a table made before retention was set stays plain
            self.created.add(table)
        return cols

    def _chunk(self, window: str) -> int | None:
        """Width (ms of window_start) of the range partitions of a tumbling/sliding window with a retention:
        about a quarter of the retention, a whole number of windows; None without (sessions: rows deleted)."""
        w = self.ctx.windows[window]
        if not w.retention or not w.size or w.type == "session":
            return None
        return max(1, -(-(w.retention // 4) // w.size)) * w.size

    def _ensure_partitions(self, cur, table: str, window: str, starts_ms: list[int]) -> None:
        chunk = self._chunk(window)
        have = self.partitions.setdefault(table, set())
        for idx in sorted({s // chunk for s in starts_ms} - have):
            cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(_partition_name(table, idx)), sql.Identifier(table),  # DDL takes literals, not parameters
                sql.Literal(_EPOCH + dt.timedelta(milliseconds=idx * chunk)),
                sql.Literal(_EPOCH + dt.timedelta(milliseconds=(idx + 1) * chunk))))
            have.add(idx)

    def write(self, table: pa.Table) -> int:
        if table is None or table.num_rows == 0:
            return 0
        window = table.column("window")[0].as_py()
        target = table_name(self.cfg.table_prefix, self.ctx.pipeline, window)
        conn = self._connect()
        ident = identity_columns(self.ctx, window)
        with conn.cursor() as cur:
            cols = self._ensure_table(cur, target, window, table.schema)
            if self.partitioned.get(target):
                self._ensure_partitions(cur, target, window, table.column("window_start").cast(pa.int64()).to_pylist())
            tmp = f"_rs_stage_{target[-10:]}"  # the digest: unique per window, like the table
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS").format(
                sql.Identifier(tmp), sql.Identifier(target)))
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(tmp), sql.SQL(", ").join(map(sql.Identifier, cols)))
            rows = row_dicts(table.select(cols))
            with cur.copy(copy_sql) as copy:
                for r in rows:
                    copy.write_row([_to_pg(r[c], table.schema.field(c).type) for c in cols])
            collist = sql.SQL(", ").join(map(sql.Identifier, cols))
            updates = sql.SQL(", ").join(
                sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in cols if c not in ident
            )
            cur.execute(sql.SQL(
                "INSERT INTO {t} AS d ({cols}) SELECT DISTINCT ON ({ident}) {cols} FROM {tmp} ORDER BY {ident}, revision DESC "
                "ON CONFLICT ON CONSTRAINT {cons} DO UPDATE SET {updates}, updated_at = now() "
                "WHERE d.revision < EXCLUDED.revision"
            ).format(
                t=sql.Identifier(target), cols=collist, tmp=sql.Identifier(tmp),
                ident=sql.SQL(", ").join(map(sql.Identifier, ident)),
                cons=sql.Identifier(f"{target}_ident"), updates=updates,
            ))
        conn.commit()
        self.rows_written += table.num_rows
        self._expire(conn, target, window)
        return 1

    def _expire(self, conn, target: str, window: str) -> None:
        """A window with ``retention`` keeps rows whose end is within it of the newest row's end (event time,
        not wall time: a backfill keeps what a live run would); checked at most once a minute per table."""
        retention = self.ctx.windows[window].retention
        if retention:
            self._retained[target] = window
        now = time.monotonic()
        if not retention or now - self._expired_at.get(target, -1e9) < 60.0:
            return
        self._expired_at[target] = now
        with conn.cursor() as cur:
            if self.partitioned.get(target):
                # drop whole partitions whose every row ended before the newest end - retention
                chunk, size = self._chunk(window), self.ctx.windows[window].size
                cur.execute(sql.SQL("SELECT (extract(epoch FROM max(window_end)) * 1000)::bigint FROM {}").format(
                    sql.Identifier(target)))
                newest = cur.fetchone()[0]
                cur.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                            "WHERE i.inhparent = to_regclass(%s)", [f'"{target}"'])
                for (name,) in cur.fetchall():
                    idx = int(name.rsplit("_", 1)[1])
                    if newest is not None and (idx + 1) * chunk + size - 1 < newest - retention:
                        cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                        self.partitions.get(target, set()).discard(idx)
                        self.partitions_dropped += 1
            else:
                cur.execute(sql.SQL("DELETE FROM {t} WHERE window_end < (SELECT max(window_end) FROM {t}) - %s * interval '1 millisecond'")
                            .format(t=sql.Identifier(target)), [int(retention)])
        conn.commit()

    def close(self) -> None:
        try:  # the last expiry of every window with a retention, so a finished run leaves only what it keeps
            for target, window in list(self._retained.items()):
                self._expired_at.pop(target, None)
                self._expire(self._connect(), target, window)
        except psycopg.Error:
            pass  # the store is gone: the next run expires them
        self.reset()


def _to_pg(v, t: pa.DataType):
    if v is None:
        return None
    if pa.types.is_timestamp(t):
        return _EPOCH + dt.timedelta(milliseconds=v)
    return v


def read_table(dsn: str, prefix: str, pipeline: str, window: str) -> list[dict]:
    """Every row of a window's table (one per window identity)."""
    from psycopg.rows import dict_row

    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table_name(prefix, pipeline, window))))
        return cur.fetchall()
