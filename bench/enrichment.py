"""Enrichment benchmark: cost of the lookup step with a warm L1 and with a cold cache.

Real Redis and PostgreSQL (throwaway, loopback), 100,000 users in PostgreSQL.
Events are decoded batches of the benchmark's JSON with a ``user_id`` field;
the pipeline's pure core runs in this process (no Kafka), once without and once
with the ``users`` enricher, so the difference is the enrichment's cost.

* warm: 95 % of events come from 5,000 hot users already in L1 (warming query),
  5 % from the other 95,000;
* cold: users uniform over all 100,000, empty L1 and empty Redis.

Writes bench/results/enrichment.json and enrichment.png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io.lookups import Enrichment  # noqa: E402
from pipeline.process import Batch, PipelineState, process_batch  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402
from tests import services  # noqa: E402

console = Console()
USERS = 100_000
BATCH = 50_000


def events(n: int, hot: bool, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    if hot:
        users = np.where(rng.random(n) < 0.95, rng.integers(0, 5_000, n), rng.integers(5_000, USERS, n))
    else:
        users = rng.integers(0, USERS, n)
    ts = 1_760_000_000_000 + np.arange(n) // 10
    return [json.dumps({"tenant_id": f"tenant-{u % 100:03d}", "user_id": f"u{u:06d}", "ts": int(t),
                        "value": float(u % 97)}, separators=(",", ":")).encode() for u, t in zip(users, ts)]


def spec(dsn: str, redis_url: str, enrich: bool, warm: bool):
    e = [{"name": "users", "key": ["user_id"], "fields": {"tier": "string", "country": "string"},
          "source": {"postgres": {"dsn": dsn, "table": "users",
                                  "warm_query": "select user_id, tier, country from users where id < 5000" if warm else None}},
          "l1": {"max_entries": 20_000, "ttl": "10m"}, "l2": {"url": redis_url, "ttl": "10m", "prefix": "bench:"}}]
    return parse_spec({
        "name": "enrich-bench", "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "e"}},
        "event_time": {"max_out_of_orderness": "2s"},
        "windows": [{"name": "w", "type": "tumbling", "size": "10s",
                     "group_by": ["tenant_id"],  # same windows with and without: the difference is the enrichment
                     "aggregations": ["count", "sum(value)", "p95(value)"]}],
        "sinks": [{"parquet": {"uri": "file:///tmp/unused"}}], "enrich": e if enrich else [],
    })


def run(sp, values: list[bytes], enrichment) -> float:
    state = PipelineState(sp, [0])
    t0 = time.perf_counter()
    for a in range(0, len(values), BATCH):
        chunk = values[a:a + BATCH]
        process_batch(sp, state, Batch.of("e", chunk, [0] * len(chunk), range(a, a + len(chunk))), enrichment)
    return time.perf_counter() - t0


def full_pipeline(dsn: str, url: str, n: int = 500_000) -> dict:
    """The warm case through the whole loop: broker, decode, enrich, windows, Parquet sink."""
    import tempfile

    import redis

    from pipeline.io.broker import EmbeddedBroker
    from pipeline.io.kafka import end_offsets, produce_all
    from pipeline.io.loop import PartitionLoop

    values = events(n, True, seed=3)
    out = {}
    with EmbeddedBroker() as broker:
        broker.create_topic("e", 1)
        produce_all(broker.bootstrap, "e", values, None, [0] * n)
        for label, enrich in (("warm-up", False), ("without", False), ("with", True)):
            redis.Redis.from_url(url).flushall()
            data = spec(dsn, url, enrich, True).model_dump()
            data["source"]["kafka"]["bootstrap_servers"] = broker.bootstrap
            data["sinks"][0]["parquet"]["uri"] = f"file://{tempfile.mkdtemp()}"
            sp = parse_spec(data)
            loop = PartitionLoop(sp, [0], {0: 0}, end_offsets(broker.bootstrap, "e", [0]))
            st = loop.run(until_end=True)
            out[label] = n / st["run_s"]
    return {"events": n, "without_enrichment_events_per_s": out["without"], "with_enrichment_events_per_s": out["with"],
            "enrichment_share_of_per_event_time": 1 - out["with"] / out["without"]}


def main() -> None:
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    pg, rd = services.start_postgres(), services.start_redis()
    try:
        dsn, url = pg.extra["dsn"], rd.extra["url"]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("create table users (id int, user_id text primary key, tier text, country text)")
            with conn.cursor().copy("copy users from stdin") as cp:
                for i in range(USERS):
                    cp.write_row((i, f"u{i:06d}", ["free", "pro", "team"][i % 3], ["DE", "US", "JP", "BR"][i % 4]))
        results = {}
        n = 500_000
        run(spec(dsn, url, False, False), events(100_000, True, seed=9), None)  # warm-up: imports, allocator
        for case, hot in (("warm", True), ("cold", False)):
            values = events(n, hot, seed=1)
            base = run(spec(dsn, url, False, False), values, None)
            import redis

            redis.Redis.from_url(url).flushall()
            sp = spec(dsn, url, True, hot)
            enr = Enrichment(sp)
            if hot:
                enr.warm()
            with_e = run(sp, values, enr)
            st = enr.stats()["users"]
            total_keys = st["l1_hits"] + st["l2_hits"] + st["l3_hits"] + st["misses"]
            results[case] = {
                "events": n, "batch": BATCH,
                "without_enrichment_events_per_s": n / base, "with_enrichment_events_per_s": n / with_e,
                "enrichment_share_of_per_event_time": (with_e - base) / with_e,
                "distinct_key_lookups": total_keys,
                "l1_hit_ratio_records": st["records_l1"] / st["records"],
                "l1_hit_ratio": st["l1_hits"] / total_keys, "l2_hit_ratio": st["l2_hits"] / total_keys,
                "l3_hit_ratio": st["l3_hits"] / total_keys, "l3_queries": st["l3_queries"],
                "lookup_latency_ms_p50": st.get("latency_ms_p50"), "lookup_latency_ms_p99": st.get("latency_ms_p99"),
            }
            enr.close()
            r = results[case]
            console.print(f"{case}: {r['with_enrichment_events_per_s']:,.0f} ev/s with enrichment vs "
                          f"{r['without_enrichment_events_per_s']:,.0f} without; enrichment share "
                          f"{r['enrichment_share_of_per_event_time']:.1%}; L1 hit ratio (records) {r['l1_hit_ratio_records']:.3f}; "
                          f"distinct-key L1/L2/L3 hit ratio "
                          f"{r['l1_hit_ratio']:.2f}/{r['l2_hit_ratio']:.2f}/{r['l3_hit_ratio']:.2f}")
        results["full_pipeline_warm"] = full_pipeline(dsn, url)
        fp = results["full_pipeline_warm"]
        console.print(f"full pipeline (Kafka -> windows -> Parquet, 1 loop): {fp['with_enrichment_events_per_s']:,.0f} ev/s "
                      f"with enrichment vs {fp['without_enrichment_events_per_s']:,.0f} without; enrichment share "
                      f"{fp['enrichment_share_of_per_event_time']:.1%}")
        (out_dir / "enrichment.json").write_text(json.dumps(results, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        cases = list(results)
        x = np.arange(len(cases))
        ax.bar(x - 0.2, [results[c]["without_enrichment_events_per_s"] / 1000 for c in cases], 0.4, label="without")
        ax.bar(x + 0.2, [results[c]["with_enrichment_events_per_s"] / 1000 for c in cases], 0.4, label="with enrichment")
        ax.set_xticks(x, [f"{c} cache" for c in cases])
        ax.set_ylabel("thousand events / s (1 core)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "enrichment.png", dpi=110)
    finally:
        pg.stop()
        rd.stop()


if __name__ == "__main__":
    main()
