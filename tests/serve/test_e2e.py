"""End to end on a real Serve (HTTP, WebSocket and gRPC proxies on loopback), a real
broker, PostgreSQL and Redis: records ingested over REST and gRPC run through a
pipeline on Ray, then come back by REST and gRPC queries and by WebSocket and
gRPC subscriptions — each equal to a reference computed from the accepted
records, and never another tenant's."""

from __future__ import annotations

import json
import threading
import time

import grpc
import httpx
import jwt
import pandas as pd
import pytest
import yaml

from pipeline.io.broker import free_port
from pipeline.io.registry import Registry
from pipeline.schemas import schema_of
from pipeline.spec import parse_spec
from serve.grpc_api import row_of
from serve.protos import raystream_pb2 as pb
from serve.protos import raystream_pb2_grpc as pbg
from tests.dashboards import check_dashboards
from tests.serve_keys import AUDIENCE, ISSUER, Keys
from tests.services import OtlpReceiver, prom_query, prom_value

T0 = 1_700_000_000_000
SCHEMA = {"type": "object", "required": ["tenant_id", "ts", "kind", "value"], "additionalProperties": False,
          "properties": {"tenant_id": {"type": "string"}, "ts": {"type": "integer"}, "kind": {"enum": ["a", "b"]},
                         "value": {"type": "number", "minimum": 0}}}


class WsClient(threading.Thread):
    """A real WebSocket client collecting messages (answers pings)."""

    def __init__(self, url: str, token: str, sub: dict):
        super().__init__(daemon=True)
        from websockets.sync.client import connect

        self.ws = connect(f"{url}?access_token={token}", open_timeout=30)
        self.ws.send(json.dumps({"subscribe": sub}))
        self.first = json.loads(self.ws.recv(timeout=30))
        self.messages: list[dict] = []
        self.start()

    def run(self) -> None:
        try:
            for raw in self.ws:
                m = json.loads(raw)
                if m["type"] == "ping":
                    self.ws.send(json.dumps({"type": "pong"}))
                self.messages.append(m)
        except Exception:  # closed by the test
            pass

    def close(self) -> None:
        self.ws.close()
        self.join(10)


class GrpcSubscriber(threading.Thread):
    def __init__(self, stub, md, request):
        super().__init__(daemon=True)
        self.call = stub.Subscribe(request, metadata=md)
        self.messages: list = []
        self.start()

    def run(self) -> None:
        try:
            for m in self.call:
                self.messages.append(m)
        except grpc.RpcError:  # cancelled by the test
            pass

    def close(self) -> None:
        self.call.cancel()
        self.join(10)


def _records(tenant: str, n: int, seed: int, first_ms: int) -> list[dict]:
    """``n`` records in event-time order over 6 s from T0 + first_ms (each batch after the last: none is late)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ts = first_ms + np.sort(rng.integers(0, 6_000, n))
    return [{"tenant_id": tenant, "ts": int(T0 + t), "kind": str(k), "value": float(v)}
            for t, k, v in zip(ts, rng.choice(["a", "b"], n), rng.integers(0, 100, n) / 4)]


def _reference(recs: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(recs)
    df = df[df.ts < T0 + 60_000]  # the closing record's window stays open
    df["window_start"] = df.ts // 1000 * 1000
    return df.groupby(["window_start", "kind"]).agg(count=("value", "size"), sum_value=("value", "sum")).reset_index()


def _frame(items: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(items)
    df["window_start"] = df["window_start"].astype("int64")
    df["count"] = df["count"].astype("int64")
    return df.groupby(["window_start", "kind"]).agg(count=("count", "sum"), sum_value=("sum_value", "sum")).reset_index()


def _equal(got: pd.DataFrame, ref: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got.sort_values(["window_start", "kind"]).reset_index(drop=True),
                                  ref.sort_values(["window_start", "kind"]).reset_index(drop=True), check_dtype=False, rtol=1e-9)


@pytest.fixture(scope="module")
def keys():
    return Keys()


def test_ingest_pipeline_query_subscribe_on_all_protocols(keys, broker, postgres, redis_server, ray_local, monitoring,
                                                          tmp_path, topic_name, pipeline_name):
    from pipeline.driver import run_pipeline
    from serve.config import ServeConfig
    from serve.runner import start_serve, stop_serve

    otlp = OtlpReceiver()
    subject = f"{topic_name}-value"
    Registry(postgres.extra["dsn"]).register(subject, schema_of(SCHEMA))
    broker.extra["broker"].create_topic(topic_name, 2)
    spec_d = {"name": pipeline_name, "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name}},
              "event_time": {"field": "ts", "format": "epoch_ms", "idle_timeout": "1s"},
              "windows": [{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["tenant_id", "kind"],
                           "aggregations": ["count", "sum(value)"]}],
              "sinks": [{"postgres": {"dsn": postgres.extra["dsn"]}}, {"redis": {"url": redis_server.extra["url"]}}],
              "checkpoint": {"uri": f"file://{tmp_path}/chk", "interval": "2s"}, "workers": 1,
              # ratio 0: a batch is traced only because records of traced ingest requests are in it
              "observability": {"tracing": {"otlp_endpoint": otlp.url, "sample_ratio": 0.0}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec_d))
    (tmp_path / "jwks.json").write_text(json.dumps(keys.jwks()))
    gport = free_port()
    cfg = ServeConfig.model_validate({
        "port": free_port(), "grpc_port": gport, "postgres_dsn": postgres.extra["dsn"], "pipelines": [str(tmp_path / "p.yaml")],
        "auth": {"jwks_file": str(tmp_path / "jwks.json"), "issuer": ISSUER, "audience": AUDIENCE},
        "ingest": {"bootstrap_servers": broker.address, "topic": topic_name, "subject": subject},
        "stream": {"redis_url": redis_server.extra["url"], "heartbeat": 1.0}, "direct_port": free_port(),
        # only GET /v1/schemas ("subjects") is tight: one request a tenant, the second is refused (429)
        "rate_limit": {"redis_url": redis_server.extra["url"], "capacity": 100_000, "per_second": 10_000.0,
                       "endpoints": {"subjects": [1, 0.001]}},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "tracing": {"otlp_endpoint": otlp.url, "sample_ratio": 1.0}})
    urls = start_serve(cfg)
    stop = threading.Event()
    th = threading.Thread(target=lambda: run_pipeline(parse_spec(spec_d), stop=stop), daemon=True)
    subs: list = []
    channel = grpc.insecure_channel(urls["grpc"])
    try:
        stub = pbg.RaystreamStub(channel)
        acme, globex = keys.token("acme", exp=int(time.time()) + 600), keys.token("globex", exp=int(time.time()) + 600)
        md = lambda tok: [("authorization", f"Bearer {tok}")]  # noqa: E731
        ws = WsClient(urls["ws"], acme, {"pipeline": pipeline_name, "window": "w"})
        assert ws.first["type"] == "subscribed"
        gsub = GrpcSubscriber(stub, md(acme), pb.SubscribeRequest(pipeline=pipeline_name, window="w"))
        direct = WsClient(urls["ws_direct"], acme, {"pipeline": pipeline_name, "window": "w"})  # the replica's own port
        assert direct.first["type"] == "subscribed"
        subs += [ws, gsub, direct]
        th.start()

        # REST ingest: acme's records plus rows that must be refused, with their reasons
        rest_recs = _records("acme", 600, 1, 0)
        bad = [{"tenant_id": "globex", "ts": T0, "kind": "a", "value": 1.0}, {"ts": T0, "kind": "z", "value": 1.0}, "x"]
        r = httpx.post(f"{urls['http']}/v1/events", json=rest_recs[:300] + bad, timeout=60,
                       headers={"Authorization": f"Bearer {acme}"})
        assert r.status_code == 207, r.text
        body = r.json()
        assert body["accepted"] == 300 and [x.get("reason") for x in body["results"][300:]] == [
            "tenant_mismatch", "schema_violation:enum", "not_an_object"]
        nd = "\n".join(json.dumps({k: v for k, v in x.items() if k != "tenant_id"}) for x in rest_recs[300:])
        r = httpx.post(f"{urls['http']}/v1/events", content=nd, timeout=60,
                       headers={"Authorization": f"Bearer {acme}", "Content-Type": "application/x-ndjson"})
        assert r.status_code == 200 and r.json()["accepted"] == 300

        # gRPC client-streaming ingest: acme in several messages (one bad JSON, one naming another tenant), globex
        grpc_recs = _records("acme", 500, 2, 6_000)
        msgs = [pb.IngestRequest(records=[json.dumps(x).encode() for x in grpc_recs[i:i + 100]]) for i in range(0, 500, 100)]
        msgs.insert(2, pb.IngestRequest(records=[b"{not json", json.dumps({**grpc_recs[0], "tenant_id": "globex"}).encode()]))
        resp = stub.Ingest(iter(msgs), metadata=md(acme), timeout=60)
        assert resp.accepted == 500 and resp.rejected == 2 and resp.schema == f"{subject}/1"
        assert [(x.index, x.reason) for x in resp.rejections] == [(200, "not_json"), (201, "tenant_mismatch")]
        globex_recs = _records("globex", 400, 3, 12_000)
        resp = stub.Ingest(iter([pb.IngestRequest(records=[json.dumps(x).encode() for x in globex_recs])]), metadata=md(globex),
                           timeout=60)
        assert resp.accepted == 400
        # one record per tenant far ahead closes every window before it
        for tok, tenant in ((acme, "acme"), (globex, "globex")):
            closer = {"tenant_id": tenant, "ts": T0 + 3_600_000, "kind": "a", "value": 0.0}
            assert httpx.post(f"{urls['http']}/v1/events", json=[closer], timeout=30,
                              headers={"Authorization": f"Bearer {tok}"}).status_code == 200
        ref_acme, ref_globex = _reference(rest_recs + grpc_recs), _reference(globex_recs)

        def rest_items(tok: str, **params) -> list[dict]:
            items, cursor = [], None
            while True:
                q = {"limit": 50, **params, **({"cursor": cursor} if cursor else {})}
                r = httpx.get(f"{urls['http']}/v1/aggregates/{pipeline_name}/w", params=q, timeout=30,
                              headers={"Authorization": f"Bearer {tok}"})
                assert r.status_code == 200, r.text
                items += r.json()["items"]
                cursor = r.json()["next_cursor"]
                if not cursor:
                    return items

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            a, g = rest_items(acme), rest_items(globex)
            if sum(x["count"] for x in a) >= ref_acme["count"].sum() and sum(x["count"] for x in g) >= ref_globex["count"].sum():
                break
            time.sleep(0.5)
        # REST: exactly the reference, each tenant only its own
        assert {x["tenant_id"] for x in a} == {"acme"} and {x["tenant_id"] for x in g} == {"globex"}
        _equal(_frame(a), ref_acme)
        _equal(_frame(g), ref_globex)
        # the replica's own port (direct_port) answers the same, with the same checks
        r = httpx.get(f"{urls['direct']}/v1/aggregates/{pipeline_name}/w", params={"limit": 1000}, timeout=30,
                      headers={"Authorization": f"Bearer {acme}"})
        assert r.status_code == 200 and sorted(map(json.dumps, r.json()["items"])) == sorted(map(json.dumps, a))
        assert httpx.get(f"{urls['direct']}/v1/aggregates/{pipeline_name}/w", timeout=30).status_code == 401
        # gRPC query, paged with its cursor
        items, cursor = [], ""
        while True:
            page = stub.QueryAggregates(pb.QueryRequest(pipeline=pipeline_name, window="w", limit=7, cursor=cursor),
                                        metadata=md(acme), timeout=30)
            items += [row_of(x) for x in page.items]
            cursor = page.next_cursor
            if not cursor:
                break
        assert {x["tenant_id"] for x in items} == {"acme"}
        _equal(_frame(items), ref_acme)
        one = stub.QueryAggregates(pb.QueryRequest(pipeline=pipeline_name, window="w", filters={"kind": "b"},
                                                   fields=["window_start", "kind", "count"], start=T0 + 2000, end=T0 + 9000),
                                   metadata=md(acme), timeout=30)
        want = ref_acme[(ref_acme.kind == "b") & (ref_acme.window_start >= T0 + 2000) & (ref_acme.window_start < T0 + 9000)]
        assert sorted((int(row_of(x)["window_start"]), int(row_of(x)["count"])) for x in one.items) == sorted(
            zip(want.window_start.astype(int), want["count"].astype(int)))
        assert all(set(row_of(x)) == {"window_start", "kind", "count"} for x in one.items)

        # security rows on gRPC: no token, expired, wrong audience, alg none, another tenant, unknown window
        q = pb.QueryRequest(pipeline=pipeline_name, window="w")
        none_tok = jwt.encode({"tenant": "acme", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}, None, algorithm="none")
        for metadata, code in (([], grpc.StatusCode.UNAUTHENTICATED),
                               (md(keys.token("acme", exp=int(time.time()) - 10)), grpc.StatusCode.UNAUTHENTICATED),
                               (md(keys.token("acme", aud="elsewhere")), grpc.StatusCode.UNAUTHENTICATED),
                               (md(none_tok), grpc.StatusCode.UNAUTHENTICATED),
                               (md(keys.token("acme", key=keys.other)), grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as exc:
                stub.QueryAggregates(q, metadata=metadata, timeout=30)
            assert exc.value.code() == code
        with pytest.raises(grpc.RpcError) as exc:
            stub.QueryAggregates(pb.QueryRequest(pipeline=pipeline_name, window="w", filters={"tenant_id": "acme"}),
                                 metadata=md(globex), timeout=30)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as exc:
            stub.QueryAggregates(pb.QueryRequest(pipeline=pipeline_name, window="nope"), metadata=md(acme), timeout=30)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.Subscribe(pb.SubscribeRequest(pipeline=pipeline_name, window="w", filters={"tenant_id": "acme"}),
                                metadata=md(globex), timeout=30))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as exc:
            stub.Ingest(iter([pb.IngestRequest(records=[b"{}"])]), metadata=[], timeout=30)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the replicas' own stream port checks tokens and tenants the same way
        import websockets
        from websockets.sync.client import connect

        for url, sub, code in ((f"{urls['ws_direct']}?access_token=forged", None, 4401),
                               (f"{urls['ws_direct']}?access_token={globex}",
                                {"pipeline": pipeline_name, "window": "w", "filters": {"tenant_id": "acme"}}, 4403)):
            with connect(url, open_timeout=30) as c:
                if sub:
                    c.send(json.dumps({"subscribe": sub}))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    c.recv(timeout=30)
                assert closed.value.rcvd.code == code
        r = httpx.get(f"{urls['http']}/v1/aggregates/{pipeline_name}/w", params={"tenant_id": "acme"}, timeout=30,
                      headers={"Authorization": f"Bearer {globex}"})
        assert r.status_code == 403

        # subscriptions: every acme window reached its final revision (= its record count), nothing else arrived
        n_windows = len(ref_acme)

        def finals(rows: list[dict]) -> dict:
            out: dict = {}
            for row in rows:
                k = (int(row["window_start"]), row["kind"])
                out[k] = max(out.get(k, 0), int(row["revision"]))
            return out

        want = {(int(w), k): int(c) for w, k, c in zip(ref_acme.window_start, ref_acme.kind, ref_acme["count"])}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ws_rows = [m["row"] for m in ws.messages if m["type"] == "update"]
            g_rows = [row_of(m.row) for m in gsub.messages if m.type == "update"]
            d_rows = [m["row"] for m in direct.messages if m["type"] == "update"]
            if finals(ws_rows) == want and finals(g_rows) == want and finals(d_rows) == want:
                break
            time.sleep(0.3)
        assert {r["tenant_id"] for r in ws_rows + g_rows + d_rows} == {"acme"}
        assert finals(ws_rows) == want and finals(g_rows) == want and finals(d_rows) == want
        assert any(m["type"] == "ping" for m in ws.messages)
        assert gsub.messages[0].type == "subscribed"
        # resume: the WebSocket session saw everything, so reconnecting replays nothing; a new
        # gRPC session asking to resume gets every window of the tenant once
        session = ws.first["session"]
        ws.close()
        ws2 = WsClient(urls["ws"], acme, {"pipeline": pipeline_name, "window": "w", "session": session})
        subs.append(ws2)
        assert ws2.first["type"] == "subscribed" and ws2.first["replayed"] == 0
        fresh = GrpcSubscriber(stub, md(acme), pb.SubscribeRequest(pipeline=pipeline_name, window="w", session="never-used-1"))
        subs.append(fresh)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len([m for m in fresh.messages if m.type == "update"]) < n_windows:
            time.sleep(0.2)
        assert fresh.messages[0].replayed == n_windows
        assert finals([row_of(m.row) for m in fresh.messages if m.type == "update"]) == want

        # a pipeline change through the API: needs its scope, happens, and is audited with the caller
        scale = f"{urls['http']}/v1/pipelines/{pipeline_name}/scale"
        assert httpx.post(scale, json={"workers": 2}, headers={"Authorization": f"Bearer {acme}"}, timeout=30).status_code == 403
        admin = keys.token("acme", scope="pipelines:write")
        assert httpx.post(scale, json={"workers": 0}, headers={"Authorization": f"Bearer {admin}"}, timeout=30).status_code == 400
        r = httpx.post(scale, json={"workers": 2}, headers={"Authorization": f"Bearer {admin}"}, timeout=300)
        assert r.status_code == 200, r.text
        assert (r.json()["from"], r.json()["to"]) == (1, 2)
        # a tenant sees a redacted summary; the operator scope sees every worker
        st = httpx.get(f"{urls['http']}/v1/pipelines/{pipeline_name}", headers={"Authorization": f"Bearer {acme}"}, timeout=30)
        assert st.status_code == 200 and st.json()["workers"] == 2
        assert not {"events", "failure", "coordinator_pid"} & set(st.json()) and "partitions" not in st.text
        op = keys.token("ops", scope="operator")
        st = httpx.get(f"{urls['http']}/v1/pipelines/{pipeline_name}", headers={"Authorization": f"Bearer {op}"}, timeout=30)
        assert st.status_code == 200 and len(st.json()["workers"]) == 2 and "events" in st.json()
        import psycopg

        with psycopg.connect(postgres.extra["dsn"]) as conn:
            rows = conn.execute("select actor, detail from raystream_audit where action = 'scale_pipeline' and target = %s",
                                (pipeline_name,)).fetchall()
        assert rows == [("api:user-1@acme", {"from": 1, "to": 2})]

        # metrics: Prometheus scraped the replica's series through the node's metrics port
        assert [httpx.get(f"{urls['http']}/v1/schemas", headers={"Authorization": f"Bearer {globex}"},
                          timeout=30).status_code for _ in range(2)] == [200, 429]
        prom = monitoring["prometheus"]

        def value(expr: str) -> float:
            return prom_value(prom, f"sum({expr})") or 0.0

        agg = 'route="/v1/aggregates/{pipeline}/{window}"'
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and value('ray_raystream_api_rate_limited_total{tenant="globex"}') < 1:
            time.sleep(0.5)
        assert value(f'ray_raystream_api_requests_total{{{agg},status="200"}}') >= 10
        assert value(f'ray_raystream_api_requests_total{{{agg},status="403"}}') >= 1
        assert value('ray_raystream_api_requests_total{route="/v1/events",method="POST",status="207"}') == 1
        assert value('ray_raystream_api_requests_total{route="/v1/schemas",status="429"}') == 1
        assert value('ray_raystream_api_rate_limited_total{tenant="globex"}') == 1
        assert value('ray_raystream_api_requests_total{route="grpc:QueryWindows",status="OK"}') >= 2
        grpc_calls = {(r["metric"]["route"], r["metric"]["status"]): float(r["value"][1]) for r in prom_query(
            prom, "sum by (route, status) (ray_raystream_api_requests_total{method=\"grpc\"})")}
        assert grpc_calls.get(("grpc:QueryAggregates", "UNAUTHENTICATED"), 0) >= 5, grpc_calls  # refused by the token gate
        assert value('ray_raystream_api_requests_total{route="grpc:Ingest",status="OK"}') == 2
        assert value(f'ray_raystream_api_request_seconds_count{{{agg}}}') == \
            value(f'ray_raystream_api_requests_total{{{agg}}}')
        # live subscribers: the WebSocket (proxy and direct) and gRPC streams still open
        assert value("ray_raystream_api_subscribers") >= 3
        # a refusal without a token is counted where it is answered (the replica here; Serve's proxy when the
        # ProxyGate runs there, as route "proxy_gate")
        before = value('ray_raystream_api_requests_total{status="401"}')
        assert httpx.get(f"{urls['http']}/v1/aggregates/{pipeline_name}/w", timeout=30).status_code == 401
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and value('ray_raystream_api_requests_total{status="401"}') < before + 1:
            time.sleep(0.5)
        assert value('ray_raystream_api_requests_total{status="401"}') == before + 1
        check_dashboards(prom, ["raystream-serving.json"])

        # traces (real OTLP, decoded): ingest -> Kafka header -> the batch (linked) -> window emit -> sink write
        def chains() -> list[list[dict]]:
            by_id = {s["span_id"]: s for s in otlp.spans}
            out = []
            for s in otlp.spans:
                if s["name"] == "sink write":
                    chain = [s]
                    while chain[-1]["parent"] in by_id:
                        chain.append(by_id[chain[-1]["parent"]])
                    out.append(chain)
            return out

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(c[-1]["name"] in ("batch", "watermark advance") for c in chains()):
            time.sleep(0.5)
        ingests = [s for s in otlp.spans if s["name"] == "ingest"]
        assert {s["service"] for s in ingests} == {"raystream-api"} and len(ingests) >= 4  # REST and gRPC requests
        ingest_ids = {(s["trace_id"], s["span_id"]) for s in ingests}
        batches = [s for s in otlp.spans if s["name"] == "batch"]
        assert batches and all(s["service"] == "raystream-worker" and s["links"] for s in batches)
        assert all(set(s["links"]) <= ingest_ids for s in batches)
        # a chain ends at the batch whose records closed the windows, or at a watermark advance (windows closed by
        # time alone) linked to the last traced batch
        batch_ids = {(s["trace_id"], s["span_id"]) for s in batches}
        full = [c for c in chains() if c[-1]["name"] == "batch" or
                (c[-1]["name"] == "watermark advance" and set(c[-1]["links"]) & batch_ids)]
        assert full, ([[s["name"] for s in c] for c in chains()], sorted({(s["service"], s["name"], s["parent"] is None) for s in otlp.spans}))
        for chain in full:
            names = [s["name"] for s in chain]
            assert names[:2] == ["sink write", "window emit"] and names[-1] in ("batch", "watermark advance"), names
            assert len({s["trace_id"] for s in chain}) == 1  # one trace from the batch to the write
        assert {c[0]["attributes"]["raystream.sink"] for c in full} >= {"postgres"}
    finally:
        for s in subs:
            s.close()
        channel.close()
        stop.set()
        th.join(60)
        stop_serve()
        otlp.close()
