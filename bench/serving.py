"""Serving benchmark: REST query latency and throughput through Ray Serve.

A throwaway PostgreSQL holds the closed windows of a pipeline (written by the
PostgreSQL sink: 100 tenants x 2 kinds x 600 windows); the REST ingress runs
on Ray Serve (local Ray, loopback, 1 replica); an asyncio client sends
``GET /v1/aggregates/...`` for random tenants at a fixed offered rate (open
loop) for ``--seconds`` and records every latency.

Usage: ``python bench/serving.py [--rps 500] [--seconds 20]``; writes
``bench/results/serving.json`` and ``serving.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.runtime import local_ray_env  # noqa: E402

local_ray_env()

from pipeline.io.broker import free_port  # noqa: E402
from pipeline.io.sinks.common import make_sink  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402
from serve.config import ServeConfig  # noqa: E402
from serve.runner import start_serve, stop_serve  # noqa: E402
from tests import services  # noqa: E402
from tests.serve_keys import AUDIENCE, ISSUER, Keys  # noqa: E402

T0 = 1_765_000_000_000


def load(spec, tenants: int, windows: int) -> int:
    sink = make_sink(spec, spec.sinks[0])
    rows = 0
    for w in range(0, windows, 50):
        starts, tids, kinds, counts = [], [], [], []
        for s in range(w, min(windows, w + 50)):
            for t in range(tenants):
                for k in ("a", "b"):
                    starts.append(T0 + s * 10_000), tids.append(f"tenant-{t:03d}"), kinds.append(k), counts.append(s + t)
        n = len(starts)
        table = pa.table({"window": ["w"] * n, "window_start": pa.array(starts, pa.timestamp("ms", tz="UTC")),
                          "window_end": pa.array([x + 10_000 for x in starts], pa.timestamp("ms", tz="UTC")),
                          "tenant_id": tids, "kind": kinds, "count": pa.array(counts, pa.int64()),
                          "revision": pa.array(counts, pa.int64()), "partition": pa.array([0] * n, pa.int32())})
        sink.write(table)
        rows += n
    sink.close()
    return rows


async def drive(url: str, tokens: list[str], rps: float, seconds: float) -> tuple[list[float], int, int]:
    import httpx

    lat: list[float] = []
    errors = 0
    sent = 0
    rng = np.random.default_rng(0)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        async def one(i: int):
            nonlocal errors
            tok = tokens[int(rng.integers(len(tokens)))]
            start = T0 + int(rng.integers(0, 500)) * 10_000
            t = time.perf_counter()
            try:
                r = await client.get(f"{url}/v1/aggregates/bench/w", params={"start": start, "end": start + 100_000, "limit": 50},
                                     headers={"Authorization": f"Bearer {tok}"})
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            lat.append(time.perf_counter() - t)

        tasks = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            due = t0 + sent / rps
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(sent)))
            sent += 1
        await asyncio.gather(*tasks)
    return lat, errors, sent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rps", type=float, nargs="+", default=[100, 250, 500])
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    pg = services.start_postgres()
    work = Path(tempfile.mkdtemp(prefix="raystream-serving-"))
    try:
        spec_d = {"name": "bench", "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "e"}},
                  "event_time": {"field": "ts"},
                  "windows": [{"name": "w", "type": "tumbling", "size": "10s", "group_by": ["tenant_id", "kind"], "aggregations": ["count"]}],
                  "sinks": [{"postgres": {"dsn": pg.extra["dsn"]}}]}
        (work / "p.yaml").write_text(yaml.safe_dump(spec_d))
        rows = load(parse_spec(spec_d), 100, 600)
        keys = Keys()
        (work / "jwks.json").write_text(json.dumps(keys.jwks()))
        cfg = ServeConfig.model_validate({"port": free_port(), "postgres_dsn": pg.extra["dsn"], "pipelines": [str(work / "p.yaml")],
                                          "auth": {"jwks_file": str(work / "jwks.json"), "issuer": ISSUER, "audience": AUDIENCE},
                                          "autoscaling": {"min_replicas": 1, "max_replicas": 1}})
        url = start_serve(cfg)["http"]
        tokens = [keys.token(f"tenant-{t:03d}", exp=int(time.time()) + 3600) for t in range(100)]
        asyncio.run(drive(url, tokens, 50, 3))  # warm-up
        results = []
        for rps in args.rps:
            lat, errors, sent = asyncio.run(drive(url, tokens, rps, args.seconds))
            ms = np.array(lat) * 1000
            results.append({"offered_rps": rps, "requests": sent, "errors": errors, "achieved_rps": sent / args.seconds,
                            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                            "max_ms": float(ms.max())})
            print(results[-1], flush=True)
        stop_serve()
        out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "rows_in_store": rows, "replicas": 1, "results": results}
        res = ROOT / "bench" / "results"
        res.mkdir(parents=True, exist_ok=True)
        (res / "serving.json").write_text(json.dumps(out, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = [r["offered_rps"] for r in results]
        ax.plot(x, [r["p50_ms"] for r in results], "o-", label="p50")
        ax.plot(x, [r["p99_ms"] for r in results], "o-", label="p99")
        ax.axhline(50, color="grey", ls=":", label="target p99 50 ms")
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel("latency ms")
        ax.set_title("GET /v1/aggregates through Ray Serve (1 replica)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(res / "serving.png", dpi=120)
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
