"""Serving hardening on a real Serve deployment (Serve's HTTP proxy, each replica's direct port and
own gRPC server), real PostgreSQL, Redis and broker:

- every POST route of the OpenAPI document refuses a 100 MiB chunked body without a token (401)
  and with one (413) while the replica's memory stays flat, through the proxy and the direct port;
- gRPC refuses calls without a token and messages over the limit;
- a WebSocket or gRPC subscription ends when its token expires (a fresh token extends it);
- per-tenant caps on open subscriptions over all replicas, rate-limited subscribe/resume;
- a resume reads only the caller's tenant (every Redis command it makes is watched);
- a token whose tenant is the string "None" never sees rows whose tenant is null.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import jwt
import httpx
import pyarrow as pa
import pytest
import yaml

from pipeline.io.broker import free_port
from pipeline.io.sinks.redis import RedisSink
from serve.protos import raystream_pb2 as pb
from serve.protos import raystream_pb2_grpc as pbg
from tests.serve_keys import AUDIENCE, ISSUER, Keys

T0 = 1_700_000_000_000
WINDOW = {"name": "w", "type": "tumbling", "size": "1s", "group_by": ["tenant_id", "kind"], "aggregations": ["count", "sum(value)"],
          "per_partition": True}
MiB = 1 << 20


@pytest.fixture(scope="module")
def keys():
    return Keys()


SENTINELS = ("PgPw-Sentinel-4417", "Hs256-Sentinel-0123456789-abcdefghijkl", "Sasl-Sentinel-9931")


@pytest.fixture(scope="module")
def hardened(keys, broker, postgres, redis_server):
    """``raystream serve --config`` as an operator runs it: its own local Ray, in its own process group, with
    sentinel secrets in its configuration (a DSN password, a development HS256 secret, a SASL password)."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.services import Cli

    tmp = Path(tempfile.mkdtemp(prefix="rsh", dir="/tmp"))  # short: Ray's socket paths live under it
    name = f"hard{int(time.time()) % 10**6}"
    broker.extra["broker"].create_topic(f"{name}-events", 1)
    pg_pw, hs_secret, sasl_pw = SENTINELS
    dsn = postgres.extra["dsn"]
    spec_d = {"name": name, "source": {"kafka": {"bootstrap_servers": broker.address, "topic": f"{name}-events",
                                                 "config": {"sasl.password": sasl_pw}}},
              "event_time": {"field": "ts", "format": "epoch_ms"}, "windows": [WINDOW],
              "sinks": [{"postgres": {"dsn": dsn}}, {"redis": {"url": redis_server.extra["url"]}}]}
    (tmp / "p.yaml").write_text(yaml.safe_dump(spec_d))
    (tmp / "jwks.json").write_text(json.dumps(keys.jwks()))
    (tmp / "schema.json").write_text(json.dumps({"type": "object"}))
    ports = {"port": free_port(), "grpc_port": free_port(), "direct_port": free_port()}
    serve_cfg = {
        **ports, "postgres_dsn": f"{dsn}{'&' if '?' in dsn else '?'}password={pg_pw}",
        "pipelines": [str(tmp / "p.yaml")], "max_body_bytes": 1 * MiB,
        "auth": {"jwks_file": str(tmp / "jwks.json"), "issuer": ISSUER, "audience": AUDIENCE, "hs256_secret": hs_secret},
        "ingest": {"bootstrap_servers": broker.address, "topic": f"{name}-events", "schema_file": str(tmp / "schema.json")},
        "stream": {"redis_url": redis_server.extra["url"], "heartbeat": 1.0, "max_streams_per_tenant": 3},
        "rate_limit": {"redis_url": redis_server.extra["url"], "capacity": 10_000, "per_second": 1000.0,
                       "endpoints": {"subscribe": [6, 0.001], "resume": [2, 0.001]}},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    (tmp / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))
    cli = Cli(["serve", "--config", str(tmp / "serve.yaml")], tmp, "serve")
    http = f"http://127.0.0.1:{ports['port']}"
    try:
        cli.wait_up([f"{http}/healthz", f"http://127.0.0.1:{ports['direct_port']}/healthz"], 180)
        urls = {"http": http, "direct": f"http://127.0.0.1:{ports['direct_port']}", "grpc": f"127.0.0.1:{ports['grpc_port']}",
                "ws": f"ws://127.0.0.1:{ports['port']}/v1/stream", "ws_direct": f"ws://127.0.0.1:{ports['direct_port']}/v1/stream"}
        from pipeline.spec import parse_spec as parse

        sink = RedisSink(parse(spec_d), parse(spec_d).sinks[1].redis)
        yield {"urls": urls, "name": name, "sink": sink, "redis": redis_server.extra["url"], "proc": cli.proc, "tmp": tmp}
    finally:
        cli.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_titled(proc, title: str) -> int:
    import psutil

    # Ray titles an actor's process ray::<class>, a replica's ray::ServeReplica:<app>:<deployment>
    tree = psutil.Process(proc.pid).children(recursive=True)
    alive = [p.pid for p in tree if any(title in c for c in (p.cmdline() or []))]
    assert len(alive) == 1, (title, alive)
    return alive[0]


def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def _chunked_post(host: str, port: int, path: str, token: str | None, total: int = 100 * MiB) -> tuple[int, int, float]:
    """POST ``total`` bytes chunked (no Content-Length) and stop as soon as an answer comes:
    (status, bytes sent, seconds to the answer)."""
    import select

    s = socket.create_connection((host, port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    s.sendall((head + "\r\n").encode())
    chunk = b"[" + b"1," * (MiB // 2 - 1) + b"1"  # one MiB of a JSON array that never closes
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, t0, answer = 0, time.monotonic(), b""
    try:
        while sent < total:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                break
            try:
                s.sendall(frame)
            except OSError:  # the server closed the request after answering
                break
            sent += len(chunk)
        s.settimeout(30)
        while b"\r\n" not in answer:
            got = s.recv(4096)
            if not got:
                break
            answer += got
    finally:
        s.close()
    status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, sent, time.monotonic() - t0


def test_every_post_route_refuses_huge_chunked_bodies_before_buffering(hardened, keys):
    urls, name = hardened["urls"], hardened["name"]
    doc = httpx.get(f"{urls['http']}/openapi.json", timeout=30).json()
    posts = [p for p, ops in doc["paths"].items() if "post" in ops]
    assert {"/v1/events", "/v1/schemas/{subject}", "/v1/pipelines/{name}/scale"} <= set(posts)
    token = keys.token("acme", scope="schemas:write pipelines:write", exp=int(time.time()) + 600)
    pid, proxy = _pid_titled(hardened["proc"], "ServeReplica:raystream:raystream-api"), _pid_titled(hardened["proc"], "ray::ProxyActor")
    before, proxy_before = _rss(pid), _rss(proxy)
    results = []
    for base in (urls["http"], urls["direct"]):
        port = int(base.rsplit(":", 1)[1])
        for path in posts:
            concrete = path.replace("{subject}", "big").replace("{name}", name)
            for tok, want in ((None, 401), (token, 413)):
                status, sent, took = _chunked_post("127.0.0.1", port, concrete, tok)
                results.append((base, concrete, tok is not None, status, sent // MiB, round(took, 2),
                                int((_rss(pid) - before) / MiB), int((_rss(proxy) - proxy_before) / MiB)))
                assert status == want, results[-1]
                # refused long before 100 MiB went out (the socket buffers hold a few MiB)
                # answered at once, having read little more than the limit (the socket buffers hold a few MiB)
                assert took < 5 and sent < 16 * MiB, results[-1]
    grown, proxy_grown = _rss(pid) - before, _rss(proxy) - proxy_before
    print(f"replica RSS +{grown / MiB:.1f} MiB, proxy RSS +{proxy_grown / MiB:.1f} MiB; {results}")
    assert grown < 64 * MiB and proxy_grown < 64 * MiB, (grown / MiB, proxy_grown / MiB, results)
    # a body just under the limit still gets through to the handler
    small = httpx.post(f"{urls['direct']}/v1/events", json=[{"ts": T0}] * 10, timeout=30,
                       headers={"Authorization": f"Bearer {keys.token('acme')}"})
    assert small.status_code == 200, small.text


def test_grpc_refuses_missing_tokens_and_oversized_messages(hardened, keys):
    urls = hardened["urls"]
    channel = grpc.insecure_channel(urls["grpc"], options=[("grpc.max_send_message_length", 64 * MiB)])
    stub = pbg.RaystreamStub(channel)
    q = pb.QueryRequest(pipeline=hardened["name"], window="w")
    try:
        for call in (lambda md: stub.QueryWindows(q, metadata=md, timeout=30),
                     lambda md: stub.QueryAggregates(q, metadata=md, timeout=30),
                     lambda md: stub.Ingest(iter([pb.IngestRequest(records=[b"{}"])]), metadata=md, timeout=30),
                     lambda md: next(iter(stub.Subscribe(pb.SubscribeRequest(pipeline=hardened["name"], window="w"),
                                                         metadata=md, timeout=30)))):
            with pytest.raises(grpc.RpcError) as exc:
                call([])
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as exc:
                call([("authorization", f"Bearer {keys.token(exp=1)}")])
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = [("authorization", f"Bearer {keys.token('acme')}")]
        assert stub.QueryWindows(q, metadata=md, timeout=30).next_cursor == ""
        with pytest.raises(grpc.RpcError) as exc:
            stub.Ingest(iter([pb.IngestRequest(records=[b"x" * (2 * MiB)])]), metadata=md, timeout=30)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as exc:
            stub.QueryWindows(pb.QueryRequest(pipeline=hardened["name"], window="w", limit=-5), metadata=md, timeout=30)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            stub.QueryWindows(pb.QueryRequest(pipeline=hardened["name"], window="w", cursor="garbage"), metadata=md, timeout=30)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()


def _ws(url: str, token: str, sub: dict):
    from websockets.sync.client import connect

    ws = connect(f"{url}?access_token={token}", open_timeout=30)
    ws.send(json.dumps({"subscribe": sub}))
    return ws


def _close_code(ws, within: float) -> int | None:
    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            try:
                m = json.loads(ws.recv(timeout=max(0.05, deadline - time.monotonic())))
            except TimeoutError:
                return None
            if m.get("type") == "ping":
                ws.send(json.dumps({"type": "pong"}))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    return None


@pytest.mark.parametrize("via", ["ws", "ws_direct"])
def test_websocket_ends_when_its_token_expires_unless_refreshed(hardened, keys, via):
    url, sub = hardened["urls"][via], {"pipeline": hardened["name"], "window": "w"}
    short = _ws(url, keys.token("exp-a", exp=int(time.time()) + 3), sub)
    refreshed = _ws(url, keys.token("exp-a", exp=int(time.time()) + 3), sub)
    try:
        assert json.loads(short.recv(timeout=30))["type"] == "subscribed"
        assert json.loads(refreshed.recv(timeout=30))["type"] == "subscribed"
        refreshed.send(json.dumps({"type": "token", "access_token": keys.token("exp-a", exp=int(time.time()) + 120)}))
        assert _close_code(short, 8) == 4401
        assert _close_code(refreshed, 3) is None  # still open past the first token's expiry
        refreshed.send(json.dumps({"type": "token", "access_token": keys.token("exp-b", exp=int(time.time()) + 120)}))
        assert _close_code(refreshed, 5) == 4403  # a session keeps its tenant
    finally:
        short.close()
        refreshed.close()


def test_grpc_subscription_ends_when_its_token_expires(hardened, keys):
    channel = grpc.insecure_channel(hardened["urls"]["grpc"])
    try:
        call = pbg.RaystreamStub(channel).Subscribe(pb.SubscribeRequest(pipeline=hardened["name"], window="w"),
                                                    metadata=[("authorization", f"Bearer {keys.token('exp-g', exp=int(time.time()) + 3)}")],
                                                    timeout=30)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            for _ in call:
                pass
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in exc.value.details()
        assert time.monotonic() - t0 < 10
    finally:
        channel.close()


def test_subscriptions_are_capped_per_tenant_and_rate_limited(hardened, keys):
    url, sub = hardened["urls"]["ws"], {"pipeline": hardened["name"], "window": "w"}
    tok = keys.token("capped", exp=int(time.time()) + 600)
    channel = grpc.insecure_channel(hardened["urls"]["grpc"])
    opened = []
    try:
        for u in (url, hardened["urls"]["ws_direct"]):  # both listeners count against one cap
            ws = _ws(u, tok, sub)
            assert json.loads(ws.recv(timeout=30))["type"] == "subscribed"
            opened.append(ws)
        g = pbg.RaystreamStub(channel).Subscribe(pb.SubscribeRequest(pipeline=hardened["name"], window="w"),
                                                 metadata=[("authorization", f"Bearer {tok}")], timeout=60)
        assert next(iter(g)).type == "subscribed"
        fourth = _ws(url, tok, sub)
        assert _close_code(fourth, 10) == 4429  # the cap (3) over WebSocket and gRPC together
        other = _ws(url, keys.token("uncapped"), sub)
        assert json.loads(other.recv(timeout=30))["type"] == "subscribed"  # another tenant is not affected
        other.close()
        opened.pop().close()
        time.sleep(0.5)
        again = _ws(url, tok, sub)  # a closed subscription gave its lease back
        assert json.loads(again.recv(timeout=30))["type"] == "subscribed"
        opened.append(again)
        # the subscribe bucket (6, no refill) is spent after six starts: the seventh is refused with 4429
        for ws in opened:
            ws.close()
        g.cancel()
        time.sleep(0.5)
        sixth = _ws(url, tok, sub)
        assert json.loads(sixth.recv(timeout=30))["type"] == "subscribed"
        opened.append(sixth)
        late = _ws(url, tok, sub)
        assert _close_code(late, 10) == 4429
    finally:
        for ws in opened:
            ws.close()
        channel.close()


def _row_table(tenant, start: int, count: int, kind: str = "a") -> pa.Table:
    return pa.table({"window": ["w"], "window_start": pa.array([T0 + start], pa.timestamp("ms", tz="UTC")),
                     "window_end": pa.array([T0 + start + 1000], pa.timestamp("ms", tz="UTC")),
                     "tenant_id": pa.array([tenant], pa.string()), "kind": [kind], "count": [count],
                     "sum_value": [float(count)], "revision": [count], "partition": pa.array([0], pa.int32())})


def test_resume_reads_only_the_callers_tenant(hardened, keys):
    import redis

    sink = hardened["sink"]
    for i in range(5):
        sink.write(_row_table("res-acme", i * 1000, 1))
        sink.write(_row_table("res-globex", i * 1000, 1))
    url, sub = hardened["urls"]["ws"], {"pipeline": hardened["name"], "window": "w"}
    tok = keys.token("res-acme", exp=int(time.time()) + 600)
    client = redis.Redis.from_url(hardened["redis"])
    seen: list[str] = []
    mon = client.monitor()
    stop = threading.Event()

    def watch():
        with mon as m:
            for cmd in m.listen():
                seen.append(cmd["command"])
                if stop.is_set():
                    return

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    time.sleep(0.3)
    try:
        ws = _ws(url, tok, {**sub, "session": "fresh-session-1"})
        first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "subscribed" and first["replayed"] == 5
        rows = [json.loads(ws.recv(timeout=30))["row"] for _ in range(5)]
        assert {r["tenant_id"] for r in rows} == {"res-acme"}
        ws.close()
    finally:
        stop.set()
        client.ping()
        th.join(10)
    touched = [c for c in seen if "globex" in c]
    assert not [c for c in touched if not c.startswith(("EVALSHA", "EVAL", "PUBLISH"))], touched[:5]
    assert any("res-acme" in c for c in seen)
    # the resume bucket (2, no refill) is spent after two resumes
    for _ in range(1):
        ws = _ws(url, tok, {**sub, "session": "fresh-session-2"})
        assert json.loads(ws.recv(timeout=30))["type"] == "subscribed"
        ws.close()
    ws = _ws(url, tok, {**sub, "session": "fresh-session-3"})
    assert _close_code(ws, 10) == 4429


def test_a_tenant_named_None_never_sees_rows_without_a_tenant(hardened, keys):
    url, sub = hardened["urls"]["ws"], {"pipeline": hardened["name"], "window": "w"}
    none_ws = _ws(url, keys.token("None", exp=int(time.time()) + 600), sub)
    acme_ws = _ws(url, keys.token("null-acme", exp=int(time.time()) + 600), sub)
    try:
        assert json.loads(none_ws.recv(timeout=30))["type"] == "subscribed"
        assert json.loads(acme_ws.recv(timeout=30))["type"] == "subscribed"
        hardened["sink"].write(_row_table(None, 50_000, 3))
        hardened["sink"].write(_row_table("null-acme", 50_000, 4))
        m = json.loads(acme_ws.recv(timeout=30))
        while m["type"] == "ping":
            m = json.loads(acme_ws.recv(timeout=30))
        assert m["row"]["tenant_id"] == "null-acme"
        got = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                got.append(json.loads(none_ws.recv(timeout=0.5)))
            except TimeoutError:
                continue
        assert [x for x in got if x["type"] == "update"] == []
    finally:
        none_ws.close()
        acme_ws.close()


def _listeners(proc) -> list[tuple[str, str, int, str]]:
    """(process title, address, port, kind) of every listening TCP socket of ``proc`` and its descendants."""
    import psutil

    out = []
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        try:
            conns = p.net_connections(kind="tcp")
            title = " ".join(p.cmdline()[:1])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(title, c.laddr.ip, c.laddr.port, "listen") for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def assert_loopback_only(listeners) -> list:
    """Every listener on loopback, but for the one Ray binds with no setting: each Serve replica's
    inter-deployment gRPC server (``[::]:0`` in Ray's replica.py), named in the README's security section."""
    import ipaddress

    def loopback(ip: str) -> bool:
        a = ipaddress.ip_address(ip.split("%")[0])
        return (getattr(a, "ipv4_mapped", None) or a).is_loopback

    wild = [x for x in listeners if not loopback(x[1])]
    per_replica: dict[str, int] = {}
    for title, _ip, _port, _ in wild:
        assert "ServeReplica:" in title, (title, wild)
        per_replica[title] = per_replica.get(title, 0) + 1
    assert all(n == 1 for n in per_replica.values()), wild
    return wild


def test_every_listener_of_raystream_serve_is_on_loopback(hardened):
    listeners = _listeners(hardened["proc"])
    ports = {p for _, _, p, _ in listeners}
    for url in (hardened["urls"]["http"], hardened["urls"]["direct"], "http://" + hardened["urls"]["grpc"]):
        assert int(url.rsplit(":", 1)[1]) in ports  # the sockets we asked for are among them, on 127.0.0.1
    wild = assert_loopback_only(listeners)
    assert len(wild) == 1  # one replica


def test_no_secret_in_any_output_or_log(hardened, keys):
    """The sentinel secrets of the configuration appear in no answer, no output and no log file of the run."""
    from pathlib import Path

    urls, name = hardened["urls"], hardened["name"]
    tok = keys.token("acme", scope="operator")
    bodies = [httpx.get(f"{urls['http']}/openapi.json", timeout=30).text,
              httpx.get(f"{urls['http']}/v1/pipelines/{name}", headers={"Authorization": f"Bearer {tok}"}, timeout=30).text,
              httpx.get(f"{urls['http']}/v1/windows/{name}/w", headers={"Authorization": "Bearer " + jwt.encode(
                  {"sub": "x", "tenant": "acme", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60},
                  "wrong-secret-0123456789-0123456789-xx", algorithm="HS256")}, timeout=30).text,
              httpx.get(f"{urls['direct']}/v1/windows/{name}/w", params={"cursor": "x"},
                        headers={"Authorization": f"Bearer {tok}"}, timeout=30).text,
              httpx.get(f"{urls['http']}/readyz", timeout=30).text]
    # a HS256 token signed with the configured development secret works (the secret really is in force)
    good = jwt.encode({"sub": "x", "tenant": "acme", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60},
                      SENTINELS[1], algorithm="HS256")
    assert httpx.get(f"{urls['http']}/v1/windows/{name}/w", headers={"Authorization": f"Bearer {good}"}, timeout=30).status_code == 200
    import subprocess
    import sys

    spec = hardened["tmp"] / "p.yaml"
    validated = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(spec)], capture_output=True, text=True,
                               cwd=str(Path(__file__).resolve().parents[2]), timeout=120)
    assert validated.returncode == 0, validated.stderr
    texts = {"answers": "\n".join(bodies), "validate": validated.stdout + validated.stderr}
    time.sleep(1)  # let the log writers flush
    for path in hardened["tmp"].rglob("*"):
        if path.is_file() and not path.is_socket() and path.suffix not in (".yaml", ".json") and path.stat().st_size < 64 * MiB:
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert len(texts) > 10  # Ray's logs are among them
    leaks = [(where, s) for where, text in texts.items() for s in SENTINELS if s in text]
    assert not leaks, leaks


@pytest.mark.parametrize("via", ["ws", "ws_direct"])
def test_websocket_message_over_the_limit_closes_1009(hardened, keys, via):
    from websockets.sync.client import connect

    ws = connect(f"{hardened['urls'][via]}?access_token={keys.token('big-msg')}", open_timeout=30, max_size=None)
    try:
        ws.send(json.dumps({"subscribe": {"pipeline": hardened["name"], "window": "w", "filters": {"kind": "x" * 200_000}}}))
        assert _close_code(ws, 10) == 1009
    finally:
        ws.close()
