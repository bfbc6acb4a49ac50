"""``raystream demo``: everything on one laptop with embedded defaults."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import yaml

from pipeline.io.broker import EmbeddedBroker
from pipeline.io.kafka import produce_all
from pipeline.spec import parse_spec
from pipeline.synthetic import events

__all__ = ["DEMO_SPEC", "run_demo"]

# The example spec of the README (examples/clicks.yaml), embedded so the demo needs no files.
DEMO_SPEC = """
name: clicks
source:
  kafka:
    bootstrap_servers: ${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
    topic: ${TOPIC:-events}
    format: json
event_time:
  field: ts
  max_out_of_orderness: 2s
  allowed_lateness: 0s
  idle_timeout: 5s
windows:
  - name: tenant_type_10s
    type: tumbling
    size: 10s
    group_by: [tenant_id, event_type]
    aggregations: [count, sum(value), min(value), max(value), mean(value), p95(value)]
sinks:
  - parquet: {uri: "${OUT_URI:-file://./out}"}
late_output:
  parquet: {uri: "${LATE_URI:-file://./late}"}
workers: 2
"""


def _producer(bootstrap: str, topic: str, rate: int, stop: threading.Event) -> None:
    """Produce ``rate`` events/s in 100 ms steps: event time = now - up to 2 s; 0.2 % late by 30 s."""
    step = max(1, rate // 10)
    seed = 0
    while not stop.is_set():
        t0 = time.monotonic()
        values, keys, _ = events(
            step, int(time.time() * 1000) - 100, rate, tenants=20, late_fraction=0.002,
            seed=seed, id_offset=seed * step,
        )
        produce_all(bootstrap, topic, values, keys, single_last=False)
        seed += 1
        stop.wait(max(0.0, 0.1 - (time.monotonic() - t0)))


# what POST /v1/events and gRPC Ingest check demo records against (registered as events-value)
EVENT_SCHEMA = {
    "type": "object", "required": ["event_id", "tenant_id", "event_type", "ts", "value"],
    "properties": {"event_id": {"type": "string"}, "tenant_id": {"type": "string"}, "event_type": {"type": "string"},
                   "ts": {"type": "integer", "minimum": 0}, "value": {"type": "number"}, "user_id": {"type": "string"}},
}


class DemoServing:
    """Throwaway PostgreSQL and Redis, the pipeline's postgres/redis sinks, and the Serve application.

    The signing key is made per run; the printed token (tenant-000, 24 h) is the only one it accepts.
    """

    def __init__(self, out: Path, http_port: int, grpc_port: int):
        self.out, self.http_port, self.grpc_port = out, http_port, grpc_port
        self.services: list = []
        self.urls: dict[str, str] = {}
        self.token = ""

    def start_stores(self) -> dict:
        from pipeline.io.local import start_postgres, start_redis

        pg, rd = start_postgres(), start_redis()
        self.services += [pg, rd]
        self.dsn, self.redis_url = pg.extra["dsn"], rd.extra["url"]
        from pipeline.io.registry import Registry
        from pipeline.schemas import schema_of

        Registry(self.dsn).register("events-value", schema_of(EVENT_SCHEMA), actor="demo")
        return {"postgres": {"dsn": self.dsn}, "redis": {"url": self.redis_url}}

    def start_api(self, spec_path: Path, bootstrap: str) -> None:
        import json
        import time

        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        from pipeline.io.broker import free_port
        from serve.config import ServeConfig
        from serve.runner import start_serve

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        folder = self.out / "serve"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "demo", "alg": "RS256", "use": "sig"}]}))
        now = int(time.time())
        self.token = jwt.encode({"sub": "demo", "tenant": "tenant-000", "iss": "raystream-demo", "aud": "raystream",
                                 "iat": now, "exp": now + 86_400, "scope": "schemas:write"}, key, algorithm="RS256",
                                headers={"kid": "demo"})
        cfg = ServeConfig.model_validate({
            "port": _port_or_free(self.http_port, free_port), "grpc_port": _port_or_free(self.grpc_port, free_port),
            "direct_port": _port_or_free(self.http_port + 1, free_port),
            "postgres_dsn": self.dsn, "pipelines": [str(spec_path)],
            "auth": {"jwks_file": str(folder / "jwks.json"), "issuer": "raystream-demo", "audience": "raystream"},
            "ingest": {"bootstrap_servers": bootstrap, "topic": "events", "subject": "events-value"},
            "stream": {"redis_url": self.redis_url},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        })
        self.urls = start_serve(cfg)
        (folder / "token").write_text(self.token)

    def describe(self, console) -> None:
        from rich.table import Table

        u = self.urls
        t = Table(title="serving (Ray Serve)", show_header=False)
        t.add_row("REST", u["http"])
        t.add_row("OpenAPI", u["docs"])
        t.add_row("WebSocket", u["ws"])
        t.add_row("gRPC", u.get("grpc", "-") + "  (serve/protos/raystream.proto)")
        if "direct" in u:
            t.add_row("direct", f"{u['direct']}  (the replica itself: same API, no proxy hop)")
        t.add_row("token", f"{self.out}/serve/token  (tenant-000, 24 h)")
        console.print(t)
        console.print(f'try: curl -H "Authorization: Bearer $(cat {self.out}/serve/token)" '
                      f'"{u["http"]}/v1/windows/clicks/tenant_type_10s?limit=5"')

    def stop(self) -> None:
        if self.urls:
            from serve.runner import stop_serve

            try:
                stop_serve()
            except Exception:  # Ray already went down with the pipeline: Serve went with it
                pass
        for svc in reversed(self.services):
            svc.stop()


def _port_or_free(port: int, free_port) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            return free_port()


def run_demo(duration, rate: int, out: Path, workers: int, console, run_and_report, serve: bool = True,
             http_port: int = 8000, grpc_port: int = 9000) -> None:
    out = out.resolve()
    serving = DemoServing(out, http_port, grpc_port) if serve else None
    with EmbeddedBroker() as broker:
        broker.create_topic("events", 4)
        console.print(f"[bold]raystream demo[/]: broker {broker.bootstrap}, topic events (4 partitions), "
                      f"{rate:,} events/s, {workers} workers, output under {out}")
        env = {"KAFKA_BOOTSTRAP": broker.bootstrap, "TOPIC": "events",
               "OUT_URI": f"file://{out}/windows", "LATE_URI": f"file://{out}/late"}
        data = yaml.safe_load(DEMO_SPEC)
        data["workers"] = workers
        try:
            if serving is not None:
                try:
                    sinks = serving.start_stores()
                    data["sinks"] += [{"postgres": sinks["postgres"]}, {"redis": sinks["redis"]}]
                except RuntimeError as exc:  # no PostgreSQL/Redis here: run without the serving layer
                    console.print(f"[yellow]serving layer off[/]: {exc}".splitlines()[0] + " (run scripts/setup.sh)")
                    serving.stop()
                    serving = None
            spec = parse_spec(data, env)
            if serving is not None:
                out.mkdir(parents=True, exist_ok=True)
                spec_path = out / "clicks.yaml"
                spec_path.write_text(yaml.safe_dump(_resolved(data, env)))
                serving.start_api(spec_path, broker.bootstrap)
                serving.describe(console)
            stop = threading.Event()
            producer = threading.Thread(target=_producer, args=(broker.bootstrap, "events", rate, stop), daemon=True)
            producer.start()
            try:
                run_and_report(spec, until_end=False, address=None, inline=False, quiet=False, duration=duration)
            finally:
                stop.set()
                producer.join(5)
        finally:
            if serving is not None:
                serving.stop()
        console.print(f"windows: {out}/windows/clicks/tenant_type_10s   late records: {out}/late/clicks/late")


def _resolved(data: dict, env: dict) -> dict:
    """The demo spec with its ${VAR:-default} references filled in (the serving layer reads it from a file)."""
    import re

    text = yaml.safe_dump(data)
    text = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), text)
    return yaml.safe_load(text)
