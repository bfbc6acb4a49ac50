"""WebSocket /v1/stream: live updates from the Redis sink per tenant, resume, heartbeats, slow clients."""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from pipeline.io.sinks.redis import RedisSink
from pipeline.spec import parse_spec
from serve.app import build_app
from serve.config import StreamConfig
from tests.serve_keys import Keys

T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def keys():
    return Keys()


def _table(tenant: str, start: int, count: int, kind: str = "a", partition: int = 0) -> pa.Table:
    return pa.table({"window": ["w"], "window_start": pa.array([T0 + start], pa.timestamp("ms", tz="UTC")),
                     "window_end": pa.array([T0 + start + 1000], pa.timestamp("ms", tz="UTC")),
                     "tenant_id": [tenant], "kind": [kind], "count": [count], "sum_value": [float(count)],
                     "revision": [count], "partition": pa.array([partition], pa.int32())})


@pytest.fixture
def env(keys, redis_server, tmp_path):
    from tests.serve.test_rest import WINDOW

    import yaml

    name = f"ws{int(time.time() * 1000) % 10**8}"
    spec_d = {"name": name, "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events"}},
              "event_time": {"field": "ts", "format": "epoch_ms"}, "windows": [WINDOW],
              "sinks": [{"redis": {"url": redis_server.extra["url"]}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec_d))
    (tmp_path / "jwks.json").write_text(json.dumps(keys.jwks()))
    from serve.config import ServeConfig
    from tests.serve_keys import AUDIENCE, ISSUER

    cfg = ServeConfig.model_validate({
        "postgres_dsn": "postgresql://unused@127.0.0.1:1/x", "pipelines": [str(tmp_path / "p.yaml")],
        "auth": {"jwks_file": str(tmp_path / "jwks.json"), "issuer": ISSUER, "audience": AUDIENCE}})
    cfg = cfg.model_copy(update={"stream": StreamConfig(redis_url=redis_server.extra["url"], heartbeat=0.5, max_pending=4)})
    sink = RedisSink(parse_spec(spec_d), parse_spec(spec_d).sinks[0].redis)
    return TestClient(build_app(cfg)), sink, name


def _until(ws, kind: str, n: int = 1, limit: int = 50) -> list[dict]:
    out = []
    for _ in range(limit):
        m = ws.receive_json()
        if m["type"] == "ping":
            ws.send_json({"type": "pong"})
            continue
        if m["type"] == kind:
            out.append(m)
            if len(out) == n:
                return out
    raise AssertionError(f"no {n} {kind} messages")


def _later(fn, delay=0.3):
    threading.Timer(delay, fn).start()


def test_updates_are_per_tenant_and_resume_after_disconnect(env, keys):
    client, sink, name = env
    with client.websocket_connect(f"/v1/stream?access_token={keys.token('acme')}") as ws:
        ws.send_json({"subscribe": {"pipeline": name, "window": "w"}})
        session = _until(ws, "subscribed")[0]["session"]
        _later(lambda: [sink.write(_table("globex", 0, 9)), sink.write(_table("acme", 0, 1)), sink.write(_table("acme", 0, 2))])
        ups = _until(ws, "update")
        while ups[-1]["row"]["revision"] != 2:  # revision 1 may have been coalesced into 2
            ups += _until(ws, "update")
        revs = [u["row"]["revision"] for u in ups]
        assert revs in ([1, 2], [2]) and all(u["row"]["tenant_id"] == "acme" for u in ups)  # globex never arrives
    # while disconnected: two windows change
    sink.write(_table("acme", 0, 5))
    sink.write(_table("acme", 1000, 3))
    sink.write(_table("globex", 1000, 3))
    with client.websocket_connect(f"/v1/stream?access_token={keys.token('acme')}") as ws:
        ws.send_json({"subscribe": {"pipeline": name, "window": "w", "session": session}})
        sub = _until(ws, "subscribed")[0]
        assert sub["session"] == session and sub["replayed"] == 2
        got = {(u["row"]["window_start"], u["row"]["revision"]) for u in _until(ws, "update", 2)}
        assert got == {(T0, 5), (T0 + 1000, 3)}


def test_heartbeat_and_cross_tenant_and_bad_tokens(env, keys):
    client, sink, name = env
    with client.websocket_connect(f"/v1/stream?access_token={keys.token('acme')}") as ws:
        ws.send_json({"subscribe": {"pipeline": name, "window": "w"}})
        _until(ws, "subscribed")
        m = ws.receive_json()
        assert m["type"] == "ping"
    with pytest.raises(WebSocketDisconnect) as exc:
        with client.websocket_connect(f"/v1/stream?access_token={keys.token('acme')}") as ws:
            ws.send_json({"subscribe": {"pipeline": name, "window": "w", "filters": {"tenant_id": "globex"}}})
            ws.receive_json()
    assert exc.value.code == 4403
    for token in ("", keys.token(exp=1), keys.token(key=keys.other)):
        with pytest.raises(WebSocketDisconnect) as exc:
            with client.websocket_connect(f"/v1/stream?access_token={token}") as ws:
                ws.receive_json()
        assert exc.value.code == 4401


def test_slow_client_buffer_keeps_latest_revisions_and_is_bounded():
    from serve.stream import Pending

    p = Pending(("tenant_id", "kind"), limit=4)
    for i in range(1, 30):  # 8 windows updated over and over while the client reads nothing
        p.add({"window": "w", "window_start": T0 + 1000 * (i % 8), "tenant_id": "acme", "kind": "a", "partition": 0, "revision": i})
    p.add({"window": "w", "window_start": T0 + 1000 * (29 % 8), "tenant_id": "acme", "kind": "a", "partition": 0, "revision": 3})
    assert len(p) == 4 and p.dropped > 0  # bounded, and the client will be told
    rows = [p.pop()[1] for _ in range(4)]
    assert sorted(r["revision"] for r in rows) == [26, 27, 28, 29]  # the latest revision of each kept window, never an older one


def test_redis_lost_mid_stream_closes_subscribers_instead_of_hanging(keys, tmp_path):
    """The update channel is one Redis subscription per replica: when Redis dies, every subscriber
    is closed with 1011 and its session id (to resume), and a new subscription is refused cleanly."""
    import yaml

    from serve.config import ServeConfig
    from tests import services
    from tests.serve.test_rest import WINDOW
    from tests.serve_keys import AUDIENCE, ISSUER

    own = services.start_redis()
    try:
        spec_d = {"name": "lost", "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events"}},
                  "event_time": {"field": "ts", "format": "epoch_ms"}, "windows": [WINDOW],
                  "sinks": [{"redis": {"url": own.extra["url"]}}]}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec_d))
        (tmp_path / "jwks.json").write_text(json.dumps(keys.jwks()))
        cfg = ServeConfig.model_validate({
            "postgres_dsn": "postgresql://unused@127.0.0.1:1/x", "pipelines": [str(tmp_path / "p.yaml")],
            "auth": {"jwks_file": str(tmp_path / "jwks.json"), "issuer": ISSUER, "audience": AUDIENCE},
            "stream": {"redis_url": own.extra["url"], "heartbeat": 0.5}})
        sink = RedisSink(parse_spec(spec_d), parse_spec(spec_d).sinks[0].redis)
        with TestClient(build_app(cfg)) as client:
            with client.websocket_connect(f"/v1/stream?access_token={keys.token('acme')}") as ws:
                ws.send_json({"subscribe": {"pipeline": "lost", "window": "w"}})
                session = _until(ws, "subscribed")[0]["session"]
                _later(lambda: sink.write(_table("acme", 0, 4)))
                assert _until(ws, "update")[0]["row"]["revision"] == 4
                own.proc.kill()
                own.proc.wait(10)
                with pytest.raises(WebSocketDisconnect) as exc:
                    for _ in range(50):
                        m = ws.receive_json()
                        if m["type"] == "ping":
                            ws.send_json({"type": "pong"})
                assert exc.value.code == 1011 and session in exc.value.reason
            with pytest.raises(WebSocketDisconnect) as exc:
                with client.websocket_connect(f"/v1/stream?access_token={keys.token('acme')}") as ws:
                    ws.send_json({"subscribe": {"pipeline": "lost", "window": "w"}})
                    ws.receive_json()
            assert exc.value.code == 1011
    finally:
        own.stop()
