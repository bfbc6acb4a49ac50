"""Enrichment through real Redis and PostgreSQL: results, tiers, invalidation, outages."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
import uuid

import numpy as np
import psycopg
import pyarrow as pa
import pytest
import redis

from pipeline.io.lookups import Enrichment
from pipeline.spec import parse_spec
from tests import services


def _spec(dsn: str, redis_url: str | None, table: str, **over) -> object:
    e = {
        "name": "users", "key": ["user_id"], "fields": {"tier": "string", "score": "float64"},
        "source": {"postgres": {"dsn": dsn, "table": table}},
        "l1": {"max_entries": 1000, "ttl": "60s"}, "negative_ttl": "1s", "retries": 1, "retry_backoff": "50ms",
        **over,
    }
    if redis_url:
        e["l2"] = {"url": redis_url, "ttl": "60s", "prefix": f"{table}:"}
    return parse_spec({
        "name": "enr", "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events"}},
        "windows": [{"name": "w", "type": "tumbling", "size": "10s", "group_by": ["tier"], "aggregations": ["count"]}],
        "sinks": [{"parquet": {"uri": "file:///tmp/unused"}}], "enrich": [e],
    })


def _users_table(dsn: str, n: int = 500) -> tuple[str, dict]:
    table = f"users_{uuid.uuid4().hex[:8]}"
    rows = {f"u{i:04d}": (["free", "pro", "team"][i % 3], round(i * 0.25, 2)) for i in range(n)}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"create table {table} (user_id text primary key, tier text not null, score double precision)")
        with conn.cursor().copy(f"copy {table} (user_id, tier, score) from stdin") as cp:
            for k, (t, s) in rows.items():
                cp.write_row((k, t, s))
    return table, rows


def _batch(keys: list[str | None]) -> pa.Table:
    return pa.table({"user_id": pa.array(keys, pa.string()), "value": pa.array(np.arange(len(keys), dtype=float))})


def _reference(keys, rows):
    """Left join computed with pyarrow's own join (independent of index_in + take)."""
    left = pa.table({"i": pa.array(range(len(keys))), "user_id": pa.array(keys, pa.string())})
    right = pa.table({"user_id": list(rows), "tier": [v[0] for v in rows.values()], "score": [v[1] for v in rows.values()]})
    j = left.join(right, "user_id", join_type="left outer").sort_by("i")
    return j["tier"].to_pylist(), j["score"].to_pylist()


def test_enriched_batch_equals_reference_join(postgres, redis_server):
    table, rows = _users_table(postgres.extra["dsn"])
    spec = _spec(postgres.extra["dsn"], redis_server.extra["url"], table)
    enr = Enrichment(spec)
    rng = np.random.default_rng(0)
    keys = [f"u{x:04d}" for x in rng.integers(0, 700, 5000)] + [None]  # 200 ids have no row
    out, rejects = enr(_batch(keys))
    assert rejects == []
    tiers, scores = _reference(keys, rows)
    assert out["tier"].to_pylist() == tiers and out["score"].to_pylist() == scores
    st = enr.stats()["users"]
    assert st["l3_queries"] == 1  # one query for all distinct keys
    assert st["l3_hits"] + st["misses"] == len(set(k for k in keys if k))
    enr.close()


def test_second_batch_never_reaches_postgres_then_l2_then_ttl(postgres, redis_server):
    dsn = postgres.extra["dsn"]
    table, rows = _users_table(dsn)
    spec = _spec(dsn, redis_server.extra["url"], table, l1={"max_entries": 1000, "ttl": "300ms"})
    keys = [f"u{i:04d}" for i in range(0, 300, 3)]
    first = Enrichment(spec)
    want = first(_batch(keys))[0]["tier"].to_pylist()
    first.flush()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"alter table {table} rename to {table}_gone")  # any L3 query now fails
    # same worker: L1 answers
    assert first(_batch(keys))[0]["tier"].to_pylist() == want
    # a fresh worker (empty L1): Redis answers
    second = Enrichment(spec)
    assert second(_batch(keys))[0]["tier"].to_pylist() == want
    assert second.stats()["users"]["l2_hits"] == len(keys) and second.stats()["users"]["l3_errors"] == 0
    # after the L1 TTL the worker reads L2 again: a changed L2 value shows through
    r = redis.Redis.from_url(redis_server.extra["url"])
    r.set(f"{table}:{keys[0]}", "changed\x1f1.0")
    time.sleep(0.4)
    assert first(_batch(keys[:1]))[0]["tier"].to_pylist() == ["changed"]
    first.close(), second.close()


def test_invalidation_drops_the_key_from_every_worker_l1(postgres, redis_server):
    table, rows = _users_table(postgres.extra["dsn"])
    spec = _spec(postgres.extra["dsn"], redis_server.extra["url"], table)
    workers = [Enrichment(spec), Enrichment(spec)]
    for w in workers:
        assert w(_batch(["u0001"]))[0]["tier"].to_pylist() == ["pro"]
    r = redis.Redis.from_url(redis_server.extra["url"])
    r.set(f"{table}:u0001", "team\x1f9.0")
    time.sleep(0.6)  # listeners subscribed
    r.publish(f"{table}:invalidate", "u0001")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(w.stats()["users"]["invalidations"] for w in workers):
        time.sleep(0.05)
    for w in workers:
        assert w(_batch(["u0001"]))[0]["tier"].to_pylist() == ["team"]
        w.close()


def test_miss_policies_and_negative_cache(postgres, redis_server):
    dsn = postgres.extra["dsn"]
    table, rows = _users_table(dsn, 10)
    keys = ["u0001", "nobody", "u0002"]
    out, rej = Enrichment(_spec(dsn, None, table, on_miss="default", defaults={"tier": "unknown", "score": 0.0}))(_batch(keys))
    assert out["tier"].to_pylist() == ["pro", "unknown", "team"] and rej == []
    enr = Enrichment(_spec(dsn, None, table, on_miss="dead_letter"))
    out, rej = enr(_batch(keys))
    assert [(i, r) for i, r, _ in rej] == [(1, "enrichment_miss:users")] and "no row for key" in rej[0][2]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"insert into {table} values ('nobody', 'pro', 1.5)")
    assert enr(_batch(["nobody"]))[1] != []  # still cached as missing (negative TTL 1 s)
    time.sleep(1.1)
    out, rej = enr(_batch(["nobody"]))
    assert rej == [] and out["tier"].to_pylist() == ["pro"]


def test_warming_loads_hot_keys_into_l1(postgres):
    dsn = postgres.extra["dsn"]
    table, rows = _users_table(dsn, 50)
    enr = Enrichment(_spec(dsn, None, table, source={"postgres": {
        "dsn": dsn, "table": table, "warm_query": f"select user_id, tier, score from {table} where score < 5"}}))
    assert enr.warm() == {"users": 20}
    out, _ = enr(_batch(["u0003", "u0004"]))
    st = enr.stats()["users"]
    assert st["l1_hits"] == 2 and st["l3_queries"] == 0 and out["tier"].to_pylist() == ["free", "pro"]


def test_ip_enricher_at_range_boundaries_v4_and_v6(postgres):
    dsn = postgres.extra["dsn"]
    table = f"ip_{uuid.uuid4().hex[:8]}"
    nets = {"10.0.0.0/8": ("A", "a"), "10.1.0.0/16": ("B", "b"), "10.1.2.0/24": ("C", "c"), "192.168.0.0/30": ("D", "d"),
            "2001:db8::/32": ("E", "e"), "2001:db8:1::/48": ("F", "f"), "::/127": ("G", "g")}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"create table {table} (network cidr primary key, country text, region text)")
        for n, (c, r) in nets.items():
            conn.execute(f"insert into {table} values (%s, %s, %s)", (n, c, r))
    probes = []
    for n in nets:
        net = ipaddress.ip_network(n)
        first, last = net.network_address, net.broadcast_address
        probes += [str(first), str(last), str(first - 1) if int(first) > 0 else str(first), str(last + 1)]
    probes += ["not-an-ip", "", None, "::ffff:10.1.2.3", "2001:DB8:1::FFFF"]
    spec = _spec(dsn, None, table, name="geo", type="ip", key=["ip"], fields={"country": "string", "region": "string"},
                 source={"postgres": {"dsn": dsn, "table": table, "key_columns": ["network"]}})
    out, _ = Enrichment(spec)(pa.table({"ip": pa.array(probes, pa.string())}))

    def expected(ip):
        try:
            a = ipaddress.ip_address(ip)
        except (ValueError, TypeError):
            return None
        if a.version == 6 and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        best = None
        for n, (c, _) in nets.items():
            net = ipaddress.ip_network(n)
            if a.version == net.version and a in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, c)
        return best[1] if best else None

    assert out["country"].to_pylist() == [expected(p) for p in probes]


def test_redis_killed_mid_run_falls_through_to_postgres(postgres):
    own = services.start_redis()
    try:
        dsn = postgres.extra["dsn"]
        table, rows = _users_table(dsn)
        enr = Enrichment(_spec(dsn, own.extra["url"], table))
        keys1 = [f"u{i:04d}" for i in range(0, 100)]
        assert enr(_batch(keys1))[0]["tier"].to_pylist() == _reference(keys1, rows)[0]
        pid = own.proc.pid
        os.kill(pid, signal.SIGKILL)
        own.proc.wait(5)
        keys2 = [f"u{i:04d}" for i in range(100, 250)]
        t0 = time.monotonic()
        out, rej = enr(_batch(keys2))
        assert rej == [] and out["tier"].to_pylist() == _reference(keys2, rows)[0]
        assert time.monotonic() - t0 < 10
        st = enr.stats()["users"]
        assert st["l2_errors"] >= 1 and st["l3_hits"] >= len(keys2)
        enr.close()
    finally:
        own.stop()


def test_postgres_stopped_mid_run_applies_miss_policy_then_recovers():
    own = services.start_postgres()
    try:
        dsn = own.extra["dsn"]
        table, rows = _users_table(dsn)
        enr = Enrichment(_spec(dsn, None, table, on_miss="dead_letter"))
        assert enr(_batch(["u0001"]))[1] == []
        subprocess.run(["runuser", "-u", "postgres", "--", services._pg_bin("pg_ctl"), "-D", own.extra["data"],
                        "-m", "immediate", "-w", "stop"], check=True, capture_output=True)
        t0 = time.monotonic()
        out, rej = enr(_batch(["u0001", "u0002", "u0003"]))
        assert time.monotonic() - t0 < 15
        # u0001 is in L1; the others cannot be resolved: dead-lettered, not lost, not cached as missing
        assert [(i, r) for i, r, _ in rej] == [(1, "enrichment_miss:users"), (2, "enrichment_miss:users")]
        assert all("lookup store unavailable" in d for _, _, d in rej)
        assert out["tier"].to_pylist()[0] == "pro"
        subprocess.run(["runuser", "-u", "postgres", "--", services._pg_bin("pg_ctl"), "-D", own.extra["data"],
                        "-l", own.extra["log"], "-w", "start", "-o",
                        f"-p {own.port} -k {os.path.dirname(own.extra['data'])} -c listen_addresses=127.0.0.1"],
                       check=True, capture_output=True)
        out, rej = enr(_batch(["u0002", "u0003"]))
        assert rej == [] and out["tier"].to_pylist() == ["team", "free"]
        assert enr.stats()["users"]["l3_errors"] >= 1
        enr.close()
    finally:
        own.stop()


def test_lookahead_warms_l1_for_the_next_batch_without_changing_results(postgres, redis_server):
    """Prefetching the raw records of the next poll fills L1: that batch then never reaches Redis or
    PostgreSQL, its hits are counted once, and its enriched rows equal the reference join."""
    import json

    dsn = postgres.extra["dsn"]
    table, rows = _users_table(dsn, 300)
    enr = Enrichment(_spec(dsn, redis_server.extra["url"], table))
    try:
        rng = np.random.default_rng(4)
        keys = [f"u{int(i):04d}" for i in rng.integers(0, 400, 2000)]  # a quarter have no row
        raw = [json.dumps({"ts": 1, "user_id": k, "nested": {"user_id": "decoy"}}).encode() for k in keys]
        assert enr.prefetch(raw).result(30) == len(set(keys))
        rt = enr.runtimes[0]
        queries = rt.stats.l3_queries
        assert rt.stats.l1_hits == 0 and rt.stats.l3_hits == 0  # the prefetch counts only as prefetched
        out, _ = enr(_batch(keys))
        assert rt.stats.l3_queries == queries and rt.stats.l1_hits == len(set(keys))
        assert (out["tier"].to_pylist(), out["score"].to_pylist()) == _reference(keys, rows)
    finally:
        enr.close()
