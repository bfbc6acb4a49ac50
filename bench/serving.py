"""Serving benchmark through Ray Serve: query latency, ingest rate, WebSocket fan-out.

Everything runs on this machine (local Ray on loopback, throwaway PostgreSQL,
Redis and broker, one Serve replica), and so does the load generator: the
numbers are for the whole system sharing the same cores.

* ``query``: ``GET /v1/windows/...`` for random tenants of a store holding
  100 tenants x 2 kinds x 600 windows, at fixed offered rates (open loop,
  aiohttp client); p50/p99 per rate.
* ``ingest``: events/s accepted (validated against the registry and
  acknowledged by the broker) through ``POST /v1/events`` (JSON arrays of 500)
  and through gRPC ``Ingest`` (client streams of 500-record messages), with 8
  concurrent clients each.
* ``fanout``: 1,000 WebSocket subscribers of one tenant's window; the Redis
  sink publishes window updates at a fixed rate; latency from the sink's write
  to each subscriber's receipt; p50/p99 over every delivery.

Usage: ``python bench/serving.py [--part query ingest fanout] [--throughput-optimized] [--direct] [--ray-direct-ingress]``.
``--ray-direct-ingress`` measures Ray 2.60's own direct ingress
(``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``: each ingress replica serves HTTP on a
port Serve allocates from 30000-31000 and gRPC from 40000-41000) against
``direct_port``; the replica's ports are found among its listening sockets.
``--throughput-optimized`` starts Ray with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``
(replicas take HTTP/gRPC directly, no proxy hop). Writes
``bench/results/serving[-to].json`` and ``.png``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "--throughput-optimized" in sys.argv:
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by Serve when it is imported, in every Ray process
if "--ray-direct-ingress" in sys.argv:
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # Ray 2.60's own: each ingress replica serves HTTP/gRPC itself

from actors.runtime import local_ray_env  # noqa: E402

local_ray_env()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import yaml  # noqa: E402

from pipeline.io.broker import free_port  # noqa: E402
from pipeline.io.local import start_postgres, start_redis  # noqa: E402
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


def _pct(lat_s: list[float]) -> dict:
    ms = np.array(lat_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def deploy_ceiling() -> None:
    """A second Serve application with one trivial async route: what Serve itself costs on this machine."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @app.get("/")
    async def hello() -> dict:
        return {"ok": True}

    @serve.deployment(max_ongoing_requests=2000, ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(app)
    class Ceiling:
        """No auth, no store: the floor of every request's cost."""

    serve.run(Ceiling.bind(), name="ceiling", route_prefix="/ceiling")


async def drive_queries(url: str, tokens: list[str], rps: float, seconds: float, path: str | None = None) -> dict:
    import aiohttp

    lat: list[float] = []
    errors = sent = 0
    rng = np.random.default_rng(0)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512), timeout=aiohttp.ClientTimeout(total=30)) as client:
        async def one():
            nonlocal errors
            tok = tokens[int(rng.integers(len(tokens)))]
            start = T0 + int(rng.integers(0, 500)) * 10_000
            t = time.perf_counter()
            try:
                target = f"{url}{path}" if path else f"{url}/v1/windows/bench/w"
                params = {} if path else {"start": start, "end": start + 100_000, "limit": 50}
                async with client.get(target, params=params, headers={"Authorization": f"Bearer {tok}"}) as r:
                    await r.read()
                    errors += r.status != 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1
            lat.append(time.perf_counter() - t)

        tasks = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            due = t0 + sent / rps
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one()))
            sent += 1
        await asyncio.gather(*tasks)
    return {"offered_rps": rps, "requests": sent, "errors": errors, "achieved_rps": sent / seconds, **_pct(lat)}


def _batch(n: int, seed: int) -> list[bytes]:
    from pipeline.synthetic import events

    values, _, _ = events(n, T0, 10_000, tenants=1, seed=seed)
    return values


async def ingest_rest(url: str, token: str, clients: int, seconds: float, per_request: int = 500) -> dict:
    import aiohttp

    bodies = [b"[" + b",".join(_batch(per_request, s)) + b"]" for s in range(8)]
    accepted = rejected = requests = 0
    lat: list[float] = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker(i: int):
            nonlocal accepted, rejected, requests
            k = i
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                async with client.post(f"{url}/v1/events", data=bodies[k % len(bodies)],
                                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
                    body = await r.json()
                lat.append(time.perf_counter() - t)
                accepted += body["accepted"]
                rejected += body["rejected"]
                requests += 1
                k += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"protocol": "REST", "clients": clients, "records_per_request": per_request, "requests": requests,
            "accepted": accepted, "rejected": rejected, "events_per_s": accepted / wall, **_pct(lat)}


async def ingest_grpc(target: str, token: str, clients: int, seconds: float, per_message: int = 500,
                      messages_per_stream: int = 20) -> dict:
    import grpc

    from serve.protos import raystream_pb2 as pb
    from serve.protos import raystream_pb2_grpc as pbg

    msgs = [pb.IngestRequest(records=_batch(per_message, s)) for s in range(8)]
    accepted = rejected = streams = 0
    lat: list[float] = []
    deadline = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pbg.RaystreamStub(channel)

        async def worker(i: int):
            nonlocal accepted, rejected, streams
            while time.perf_counter() < deadline:
                t = time.perf_counter()

                async def gen():
                    for k in range(messages_per_stream):
                        yield msgs[(i + k) % len(msgs)]

                resp = await stub.Ingest(gen(), metadata=[("authorization", f"Bearer {token}")], timeout=120)
                lat.append(time.perf_counter() - t)
                accepted += resp.accepted
                rejected += resp.rejected
                streams += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"protocol": "gRPC", "clients": clients, "records_per_message": per_message, "messages_per_stream": messages_per_stream,
            "streams": streams, "accepted": accepted, "rejected": rejected, "events_per_s": accepted / wall, **_pct(lat)}


async def fanout(ws_url: str, token: str, redis_url: str, spec, subscribers: int, updates_per_s: float, seconds: float) -> dict:
    """``subscribers`` WebSocket clients of tenant-000's window; the Redis sink writes one window update per tick."""
    import websockets

    from pipeline.io.sinks.redis import RedisSink

    sent_at: dict[int, float] = {}
    lat: list[float] = []
    got = [0] * subscribers
    notices = 0

    async def client(i: int, ready: asyncio.Event):
        nonlocal notices
        async with websockets.connect(f"{ws_url}?access_token={token}", max_queue=None, open_timeout=120) as ws:
            await ws.send(json.dumps({"subscribe": {"pipeline": "fan", "window": "w"}}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            ready.set()
            async for raw in ws:
                now = time.time()
                m = json.loads(raw)
                if m["type"] == "update":
                    rev = int(m["row"]["revision"])
                    if rev in sent_at:
                        lat.append(now - sent_at[rev])
                        got[i] += 1
                elif m["type"] == "ping":
                    await ws.send('{"type":"pong"}')
                elif m["type"] == "notice":
                    notices += 1

    readies = [asyncio.Event() for _ in range(subscribers)]
    tasks = []
    t_conn = time.perf_counter()
    for i in range(subscribers):
        tasks.append(asyncio.create_task(client(i, readies[i])))
        if i % 50 == 49:
            await asyncio.gather(*(r.wait() for r in readies[i - 49:i + 1]))
    await asyncio.gather(*(r.wait() for r in readies))
    connect_s = time.perf_counter() - t_conn
    sink = RedisSink(spec, spec.sinks[0].redis)
    n = int(updates_per_s * seconds)

    def write(rev: int) -> None:
        # each update its own window: none may be coalesced away, every one must reach every subscriber
        start = T0 + rev * 10_000
        table = pa.table({"window": ["w"], "window_start": pa.array([start], pa.timestamp("ms", tz="UTC")),
                          "window_end": pa.array([start + 10_000], pa.timestamp("ms", tz="UTC")),
                          "tenant_id": ["tenant-000"], "kind": ["a"], "count": pa.array([rev], pa.int64()),
                          "revision": pa.array([rev], pa.int64()), "partition": pa.array([0], pa.int32())})
        sent_at[rev] = time.time()
        sink.write(table)

    t0 = time.perf_counter()
    for rev in range(1, n + 1):
        due = t0 + rev / updates_per_s
        if due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())
        await asyncio.to_thread(write, rev)
    deadline = time.perf_counter() + 30
    while sum(got) < n * subscribers and time.perf_counter() < deadline:
        await asyncio.sleep(0.2)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    sink.close()
    return {"subscribers": subscribers, "updates": n, "updates_per_s": updates_per_s, "deliveries_expected": n * subscribers,
            "deliveries": sum(got), "notices": notices, "connect_s": connect_s, **_pct(lat)}


def replica_listeners() -> list[tuple[str, int]]:
    """(address, port) of every listening socket of the Serve replica's process."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:raystream" in c for c in (p.info["cmdline"] or [])):
            return sorted((c.laddr.ip, c.laddr.port) for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
    raise LookupError("no Serve replica process")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", nargs="+", default=["query", "ingest", "fanout"], choices=["query", "ingest", "fanout", "ceiling"])
    ap.add_argument("--rps", type=float, nargs="+", default=[100, 250, 400, 500])
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--updates-per-s", type=float, default=5)
    ap.add_argument("--throughput-optimized", action="store_true")
    ap.add_argument("--direct", action="store_true", help="query and fan-out through the replicas' own port (direct_port)")
    ap.add_argument("--ray-direct-ingress", action="store_true", help="query through Ray Serve's own direct ingress")
    args = ap.parse_args()
    pg, rd, broker = start_postgres(), start_redis(), services.start_broker()
    work = Path(tempfile.mkdtemp(prefix="raystream-serving-"))
    out: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                 "replicas": 1, "throughput_optimized": args.throughput_optimized}
    try:
        window = {"name": "w", "type": "tumbling", "size": "10s", "group_by": ["tenant_id", "kind"], "aggregations": ["count"]}
        spec_d = {"name": "bench", "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "e"}},
                  "event_time": {"field": "ts"}, "windows": [window], "sinks": [{"postgres": {"dsn": pg.extra["dsn"]}}]}
        fan_d = {**spec_d, "name": "fan", "sinks": [{"redis": {"url": rd.extra["url"]}}]}
        (work / "p.yaml").write_text(yaml.safe_dump(spec_d))
        (work / "fan.yaml").write_text(yaml.safe_dump(fan_d))
        out["rows_in_store"] = load(parse_spec(spec_d), 100, 600)
        from pipeline.demo import EVENT_SCHEMA
        from pipeline.io.registry import Registry
        from pipeline.schemas import schema_of

        Registry(pg.extra["dsn"]).register("events-value", schema_of(EVENT_SCHEMA))
        broker.extra["broker"].create_topic("events", 4)
        keys = Keys()
        (work / "jwks.json").write_text(json.dumps(keys.jwks()))
        cfg = ServeConfig.model_validate({
            "port": free_port(), "grpc_port": free_port(), "postgres_dsn": pg.extra["dsn"],
            "pipelines": [str(work / "p.yaml"), str(work / "fan.yaml")],
            "auth": {"jwks_file": str(work / "jwks.json"), "issuer": ISSUER, "audience": AUDIENCE},
            "ingest": {"bootstrap_servers": broker.address, "topic": "events", "subject": "events-value"},
            "stream": {"redis_url": rd.extra["url"], "heartbeat": 30, "max_pending": 256},
            **({"direct_port": free_port()} if args.direct else {}),
            "max_body_bytes": 4_000_000, "autoscaling": {"min_replicas": 1, "max_replicas": 1}})
        urls = start_serve(cfg)
        exp = int(time.time()) + 7200
        tokens = [keys.token(f"tenant-{t:03d}", exp=exp) for t in range(100)]
        import gc

        gc.freeze()  # the load generator's own long-lived objects stay out of its collections
        if "query" in args.part:
            asyncio.run(drive_queries(urls["http"], tokens, 50, 3))  # warm-up
            qkey, qurl = ("query_direct", urls["direct"]) if args.direct else ("query", urls["http"])
            if args.ray_direct_ingress:
                listening = replica_listeners()
                out["ray_direct_ingress_listeners"] = listening
                port = next(p for ip, p in listening if 30000 <= p <= 31000)
                qkey, qurl = "query_ray_direct_ingress", f"http://127.0.0.1:{port}"
                asyncio.run(drive_queries(qurl, tokens, 50, 3))
            out[qkey] = []
            for rps in args.rps:
                out[qkey].append(asyncio.run(drive_queries(qurl, tokens, rps, args.seconds)))
                print(qkey, out[qkey][-1], flush=True)
        if "ceiling" in args.part:
            deploy_ceiling()
            asyncio.run(drive_queries(urls["http"], tokens, 50, 3, path="/ceiling/"))
            out["ceiling"] = []
            for rps in args.rps:
                out["ceiling"].append(asyncio.run(drive_queries(urls["http"], tokens, rps, args.seconds, path="/ceiling/")))
                print("ceiling", out["ceiling"][-1], flush=True)
        if "ingest" in args.part:
            out["ingest"] = [asyncio.run(ingest_rest(urls["http"], tokens[0], 8, args.seconds)),
                             asyncio.run(ingest_grpc(urls["grpc"], tokens[0], 8, args.seconds))]
            for r in out["ingest"]:
                print(r, flush=True)
        if "fanout" in args.part:
            key = "fanout_direct" if args.direct else "fanout"
            out[key] = asyncio.run(fanout(urls["ws_direct" if args.direct else "ws"], tokens[0], rd.extra["url"], parse_spec(fan_d), args.subscribers,
                                               args.updates_per_s, args.seconds))
            out[key]["path"] = "replica's own port" if args.direct else "Serve HTTP proxy"
            print(out[key], flush=True)
        stop_serve()
        res = ROOT / "bench" / "results"
        res.mkdir(parents=True, exist_ok=True)
        stem = "serving-to" if args.throughput_optimized else "serving-rdi" if args.ray_direct_ingress else "serving"
        path = res / f"{stem}.json"
        if path.exists() and (set(args.part) != {"query", "ingest", "fanout", "ceiling"} or args.direct):
            out = {**json.loads(path.read_text()), **out}  # a partial run updates its parts only
        path.write_text(json.dumps(out, indent=2))
        plot(out, res / f"{stem}.png")
    finally:
        for svc in (broker, rd, pg):
            svc.stop()


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if out.get("query"):
        ax = axes[0]
        x = [r["offered_rps"] for r in out["query"]]
        ax.plot(x, [r["p50_ms"] for r in out["query"]], "o-", label="p50")
        ax.plot(x, [r["p99_ms"] for r in out["query"]], "o-", label="p99")
        if out.get("query_direct"):
            ax.plot([r["offered_rps"] for r in out["query_direct"]], [r["p99_ms"] for r in out["query_direct"]], "s-",
                    label="p99, direct_port")
        if out.get("ceiling"):
            ax.plot([r["offered_rps"] for r in out["ceiling"]], [r["p99_ms"] for r in out["ceiling"]], "x--",
                    label="p99, trivial Serve route")
        ax.axhline(50, color="grey", ls=":", label="target p99 50 ms")
        ax.set_yscale("log")
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel("latency ms")
        ax.set_title("GET /v1/aggregates")
        ax.legend()
    if out.get("ingest"):
        ax = axes[1]
        ax.bar([r["protocol"] for r in out["ingest"]], [r["events_per_s"] for r in out["ingest"]])
        ax.set_ylabel("events/s accepted")
        ax.set_title("ingest (8 clients, 500 records per message)")
    if out.get("fanout") or out.get("fanout_direct"):
        ax = axes[2]
        f = out.get("fanout") or out["fanout_direct"]
        labels, vals = [], []
        for key, tag in (("fanout", "proxy"), ("fanout_direct", "direct")):
            if out.get(key):
                for q in ("p50", "p99"):
                    labels.append(f"{tag} {q}")
                    vals.append(out[key][f"{q}_ms"])
        ax.bar(labels, vals)
        ax.axhline(250, color="grey", ls=":", label="target p99 250 ms")
        ax.set_ylabel("ms from sink write to client")
        ax.set_title(f"fan-out to {f['subscribers']} WebSocket subscribers")
        ax.legend()
    fig.suptitle(f"raystream serving on Ray Serve ({out['machine']}, 1 replica"
                 + (", throughput-optimized" if out.get("throughput_optimized") else "") + ")", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
