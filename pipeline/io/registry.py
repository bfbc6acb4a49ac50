"""Schema registry stored in PostgreSQL (tables created on first use).

Subjects (one per topic or event type) hold numbered versions; registering a
schema checks it against the subject's compatibility mode first and refuses it
with the problems found. Registering the same schema again returns its
existing version. ``SchemaCache`` is what workers keep: versions by number and
the latest, refreshed every ``ttl`` and whenever an unknown version is asked
for.
"""

from __future__ import annotations

import threading
import time

import psycopg
from psycopg.rows import dict_row

from pipeline.schemas import MODES, Schema, check_compatibility

__all__ = ["Incompatible", "Registry", "SchemaCache", "UnknownVersion"]

_DDL = """
create table if not exists raystream_schema_subjects (
  subject text primary key,
  compatibility text not null default 'BACKWARD',
  created timestamptz not null default now()
);
create table if not exists raystream_schema_versions (
  subject text not null references raystream_schema_subjects(subject),
  version int not null,
  kind text not null,
  schema text not null,
  message text,
  fingerprint text not null,
  created timestamptz not null default now(),
  primary key (subject, version),
  unique (subject, fingerprint)
);
create table if not exists raystream_audit (
  id bigserial primary key,
  at timestamptz not null default now(),
  actor text not null,
  action text not null,
  target text not null,
  detail jsonb
);
"""


class Incompatible(ValueError):
    """A schema that breaks the subject's compatibility mode."""

    def __init__(self, subject: str, mode: str, problems: list[str]):
        self.subject, self.mode, self.problems = subject, mode, problems
        super().__init__(f"schema for {subject!r} is not {mode} compatible: " + "; ".join(problems))


class UnknownVersion(LookupError):
    """No such subject or version."""


class Registry:
    """Subjects and versions in PostgreSQL."""

    def __init__(self, dsn: str, connect_timeout_s: int = 5):
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._ready = False

    def _conn(self) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn, connect_timeout=self.connect_timeout_s, row_factory=dict_row)
        if not self._ready:
            with conn.transaction():
                conn.execute("select pg_advisory_xact_lock(7243001)")  # concurrent first uses create once
                conn.execute(_DDL)
            self._ready = True
        return conn

    def audit(self, conn, actor: str, action: str, target: str, detail: dict) -> None:
        from psycopg.types.json import Jsonb

        conn.execute("insert into raystream_audit (actor, action, target, detail) values (%s, %s, %s, %s)",
                     (actor, action, target, Jsonb(detail)))

    def record(self, actor: str, action: str, target: str, detail: dict) -> None:
        """One audit row on its own (changes made outside the registry: scaling a pipeline)."""
        with self._conn() as conn:
            self.audit(conn, actor, action, target, detail)

    def set_compatibility(self, subject: str, mode: str, actor: str = "cli") -> None:
        mode = mode.upper()
        if mode not in MODES:
            raise ValueError(f"compatibility {mode!r} is not one of {MODES}")
        with self._conn() as conn, conn.transaction():
            conn.execute("insert into raystream_schema_subjects (subject, compatibility) values (%s, %s) "
                         "on conflict (subject) do update set compatibility = excluded.compatibility", (subject, mode))
            self.audit(conn, actor, "set_compatibility", subject, {"compatibility": mode})

    def compatibility(self, subject: str) -> str:
        with self._conn() as conn:
            row = conn.execute("select compatibility from raystream_schema_subjects where subject = %s", (subject,)).fetchone()
        return row["compatibility"] if row else "BACKWARD"

    def versions(self, subject: str) -> list[tuple[int, Schema]]:
        with self._conn() as conn:
            rows = conn.execute("select version, kind, schema, message from raystream_schema_versions where subject = %s "
                                "order by version", (subject,)).fetchall()
        return [(r["version"], Schema(r["kind"], r["schema"], r["message"])) for r in rows]

    def check(self, subject: str, schema: Schema, mode: str | None = None) -> list[str]:
        """Problems registering ``schema`` would meet (empty: compatible)."""
        return check_compatibility(schema, self.versions(subject), mode or self.compatibility(subject))

    def register(self, subject: str, schema: Schema, actor: str = "cli") -> int:
        """Add ``schema`` as the next version (or return the version it already is); raises ``Incompatible``."""
        with self._conn() as conn, conn.transaction():
            conn.execute("insert into raystream_schema_subjects (subject) values (%s) on conflict do nothing", (subject,))
            # one registration per subject at a time: the compatibility check sees the latest version
            mode = conn.execute("select compatibility from raystream_schema_subjects where subject = %s for update",
                                (subject,)).fetchone()["compatibility"]
            same = conn.execute("select version from raystream_schema_versions where subject = %s and fingerprint = %s",
                                (subject, schema.fingerprint)).fetchone()
            if same:
                return same["version"]
            rows = conn.execute("select version, kind, schema, message from raystream_schema_versions where subject = %s "
                                "order by version", (subject,)).fetchall()
            previous = [(r["version"], Schema(r["kind"], r["schema"], r["message"])) for r in rows]
            problems = check_compatibility(schema, previous, mode)
            if problems:
                raise Incompatible(subject, mode, problems)
            version = (previous[-1][0] if previous else 0) + 1
            conn.execute("insert into raystream_schema_versions (subject, version, kind, schema, message, fingerprint) "
                         "values (%s, %s, %s, %s, %s, %s)",
                         (subject, version, schema.kind, schema.text, schema.message, schema.fingerprint))
            self.audit(conn, actor, "register_schema", subject, {"version": version, "kind": schema.kind})
        return version

    def get(self, subject: str, version: int | str = "latest") -> tuple[int, Schema]:
        with self._conn() as conn:
            if version == "latest":
                row = conn.execute("select version, kind, schema, message from raystream_schema_versions where subject = %s "
                                   "order by version desc limit 1", (subject,)).fetchone()
            else:
                row = conn.execute("select version, kind, schema, message from raystream_schema_versions "
                                   "where subject = %s and version = %s", (subject, int(version))).fetchone()
        if row is None:
            raise UnknownVersion(f"subject {subject!r} has no version {version}")
        return row["version"], Schema(row["kind"], row["schema"], row["message"])

    def subjects(self) -> list[dict]:
        with self._conn() as conn:
            return conn.execute(
                "select s.subject, s.compatibility, count(v.version) as versions, max(v.version) as latest "
                "from raystream_schema_subjects s left join raystream_schema_versions v using (subject) "
                "group by s.subject, s.compatibility order by s.subject").fetchall()


class SchemaCache:
    """A worker's view of one subject: versions by number, refreshed on a TTL and on unknown versions."""

    def __init__(self, registry: Registry, subject: str, ttl_s: float = 30.0, clock=time.monotonic):
        self.registry, self.subject, self.ttl_s, self.clock = registry, subject, ttl_s, clock
        self.versions: dict[int, Schema] = {}
        self.loaded_at = -1e18
        self.refreshes = 0
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        self.versions = dict(self.registry.versions(self.subject))
        self.loaded_at = self.clock()
        self.refreshes += 1

    def get(self, version: int | str = "latest") -> tuple[int, Schema]:
        with self._lock:
            now = self.clock()
            unknown = version != "latest" and int(version) not in self.versions
            # an unknown version refreshes at most once a second: bad headers cannot hammer the database
            if now - self.loaded_at > self.ttl_s or (unknown and now - self.loaded_at > 1.0):
                self._refresh()
            if not self.versions:
                raise UnknownVersion(f"subject {self.subject!r} has no versions")
            v = max(self.versions) if version == "latest" else int(version)
            if v not in self.versions:
                raise UnknownVersion(f"subject {self.subject!r} has no version {version}")
            return v, self.versions[v]
