"""The REST ingress against a real PostgreSQL sink table: tenant scoping, filters,
pagination, ETag, gzip, the security rows, and a real Serve deployment."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml
from fastapi.testclient import TestClient

from pipeline.io.sinks.common import make_sink
from pipeline.spec import parse_spec
from serve.app import build_app
from serve.config import ServeConfig
from tests.pipeline.harness import encode, run_core
from tests.serve_keys import AUDIENCE, ISSUER, Keys

WINDOW = {"name": "w", "type": "tumbling", "size": "1s", "group_by": ["tenant_id", "kind"], "aggregations": ["count", "sum(value)"],
          "per_partition": True}


@pytest.fixture(scope="module")
def keys():
    return Keys()


served_merged: dict = {}


@pytest.fixture(scope="module")
def served(postgres, tmp_path_factory, keys):
    tmp = tmp_path_factory.mktemp("serve")
    name = "restp"
    spec_d = {"name": name, "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events"}},
              "event_time": {"field": "ts", "format": "epoch_ms"},
              "windows": [WINDOW, {**WINDOW, "name": "m", "per_partition": False}],  # m: one row per group
              "sinks": [{"postgres": {"dsn": postgres.extra["dsn"]}}]}
    (tmp / "p.yaml").write_text(yaml.safe_dump(spec_d))
    spec = parse_spec(spec_d)
    rng = np.random.default_rng(1)
    n = 3000
    df = pd.DataFrame({"partition": rng.integers(0, 2, n), "ts": 1_700_000_000_000 + np.sort(rng.integers(0, 20_000, n)),
                       "tenant_id": rng.choice(["acme", "globex", "o'hara; drop table x"], n), "kind": rng.choice(["a", "b"], n),
                       "value": rng.normal(5, 1, n).round(3)})
    df["offset"] = df.groupby("partition").cumcount()
    emitted, _, _, _ = run_core(spec, df, cuts=[], values=encode(df))
    sink = make_sink(spec, spec.sinks[0])
    for t in [*emitted["w"], *emitted["m"]]:
        sink.write(t)
    sink.close()
    merged = pa.concat_tables(emitted["m"]).to_pandas()
    merged["window_start"] = merged["window_start"].astype("int64")
    merged = merged.sort_values("revision").drop_duplicates(["window_start", "tenant_id", "kind"], keep="last")
    served_merged.update(rows=merged, raw=df)
    latest = pa.concat_tables(emitted["w"]).to_pandas()
    latest["window_start"] = latest["window_start"].astype("int64")
    latest = latest.sort_values("revision").drop_duplicates(["window_start", "tenant_id", "kind", "partition"], keep="last")
    (tmp / "jwks.json").write_text(json.dumps(keys.jwks()))
    cfg = ServeConfig.model_validate({"postgres_dsn": postgres.extra["dsn"], "pipelines": [str(tmp / "p.yaml")],
                                      "auth": {"jwks_file": str(tmp / "jwks.json"), "issuer": ISSUER, "audience": AUDIENCE},
                                      "max_body_bytes": 4096})
    with TestClient(build_app(cfg)) as client:  # one event loop for the module's requests
        yield client, latest, cfg


def _get(client, url, token, **kw):
    return client.get(url, headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})}, **kw)


def test_health_needs_no_token(served):
    client, _, _ = served
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_pages_cover_exactly_the_tenants_windows(served, keys):
    client, latest, _ = served
    for tenant in ("acme", "o'hara; drop table x"):
        token = keys.token(tenant)
        got, cursor, pages = [], None, 0
        while True:
            r = _get(client, "/v1/aggregates/restp/w", token, params={"limit": 7, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            body = r.json()
            got += body["items"]
            pages += 1
            cursor = body["next_cursor"]
            if not cursor:
                break
        want = latest[latest["tenant_id"] == tenant]
        assert pages > 2 and len(got) == len(want)
        assert {(g["window_start"], g["kind"], g["partition"]) for g in got} == \
            {(int(r.window_start), r.kind, int(r.partition)) for r in want.itertuples()}
        assert all(g["tenant_id"] == tenant for g in got)
        starts = [g["window_start"] for g in got]
        assert starts == sorted(starts)


def test_merged_window_pages_one_row_per_group_without_partition(served, keys):
    """A merged window: one row per (window start, tenant, kind) over both partitions, equal to a plain group-by
    of the raw records; no partition column, filter or cursor element."""
    client, _, _ = served
    raw = served_merged["raw"]
    token = keys.token("acme")
    got, cursor = [], None
    while True:
        r = _get(client, "/v1/windows/restp/m", token, params={"limit": 9, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        got += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if not cursor:
            break
    assert got and all("partition" not in g for g in got)
    acme = raw[raw["tenant_id"] == "acme"].assign(window_start=lambda d: d["ts"] // 1000 * 1000)
    want = acme.groupby(["window_start", "kind"]).agg(count=("ts", "size"), total=("value", "sum")).reset_index()
    assert sorted((g["window_start"], g["kind"], g["count"]) for g in got) == \
        sorted((int(r.window_start), r.kind, int(r.count)) for r in want.itertuples())
    bad = _get(client, "/v1/windows/restp/m", token, params={"partition": "0"})
    assert bad.status_code == 400 and bad.json()["parameter"] == "partition"


def test_filters_fields_order_and_time_range(served, keys):
    client, latest, _ = served
    t0 = int(latest["window_start"].min()) + 5000
    r = _get(client, "/v1/aggregates/restp/w", keys.token("acme"),
             params={"kind": "b", "start": t0, "end": t0 + 5000, "order": "desc", "fields": "window_start,kind,count", "limit": 1000})
    items = r.json()["items"]
    want = latest[(latest.tenant_id == "acme") & (latest.kind == "b") & (latest.window_start >= t0) & (latest.window_start < t0 + 5000)]
    assert len(items) == len(want) and all(set(i) == {"window_start", "kind", "count"} for i in items)
    assert [i["window_start"] for i in items] == sorted((i["window_start"] for i in items), reverse=True)
    assert sum(i["count"] for i in items) == int(want["count"].sum())


def test_etag_and_gzip(served, keys):
    client, _, _ = served
    token = keys.token("globex")
    r = _get(client, "/v1/aggregates/restp/w", token, params={"limit": 500}, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers.get("content-encoding") == "gzip"
    again = _get(client, "/v1/aggregates/restp/w", token, params={"limit": 500}, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content


def _cursor(values) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode()


@pytest.mark.parametrize("params, status, parameter", [
    ({"tenant_id": "globex"}, 403, "tenant_id"),             # another tenant's rows: never
    ({"value; drop table x": "1"}, 400, "value; drop table x"),  # not a group key
    ({"revision": "1"}, 400, "revision"),
    ({"fields": "count,secret"}, 400, "fields"),
    ({"order": "sideways"}, 400, "order"),
    ({"cursor": "bm90IGEgY3Vyc29y"}, 400, "cursor"),
    ({"cursor": "%%%not base64"}, 400, "cursor"),
    ({"cursor": _cursor(["x", "acme", "a", 0])}, 400, "cursor"),          # right shape, wrong types
    ({"cursor": _cursor([10**20, "acme", "a", 0])}, 400, "cursor"),       # window_start out of range
    ({"cursor": _cursor([1_700_000_000_000, "acme", "a", "zero"])}, 400, "cursor"),
    ({"cursor": _cursor([1_700_000_000_000, {"a": 1}, "a", 0])}, 400, "cursor"),
    ({"limit": 10**6}, 400, "limit"),
    ({"limit": -1}, 400, "limit"),
    ({"limit": "NaN"}, 400, "limit"),
    ({"start": "yesterday"}, 400, "start"),
    ({"start": -5}, 400, "start"),
    ({"end": 10**20}, 400, "end"),
    ({"include_open": "perhaps"}, 400, "include_open"),
    ({"kind": "a\x00b"}, 400, "kind"),
])
def test_hostile_queries(served, keys, params, status, parameter):
    """Bad values are 400s (or 403 for another tenant) naming the parameter, in one error shape: never a 500."""
    client, _, _ = served
    for url in ("/v1/windows/restp/w", "/v1/aggregates/restp/w"):
        r = _get(client, url, keys.token("acme"), params=params)
        assert r.status_code == status, (params, r.text)
        assert r.json()["parameter"] == parameter and r.json()["detail"]


@pytest.mark.parametrize("url", ["/v1/pipelines", "/v1/schemas", "/v1/pipelines/restp", "/v1/schemas/x/versions/latest"])
def test_unknown_query_parameters_are_400s(served, keys, url):
    client, _, _ = served
    r = _get(client, url, keys.token("acme"), params={"limit": "5", "tenant_id": "globex"})
    assert r.status_code == 400 and r.json()["parameter"] in ("limit", "tenant_id"), r.text


def test_typed_cursor_of_the_right_types_pages_on(served, keys):
    client, latest, _ = served
    first = _get(client, "/v1/windows/restp/w", keys.token("acme"), params={"limit": 3}).json()
    assert first["next_cursor"] and len(first["items"]) == 3
    nxt = _get(client, "/v1/windows/restp/w", keys.token("acme"), params={"limit": 3, "cursor": first["next_cursor"]})
    assert nxt.status_code == 200 and nxt.json()["items"][0] != first["items"][-1]


def test_security_rows(served, keys):
    client, _, _ = served
    url = "/v1/aggregates/restp/w"
    assert client.get(url).status_code == 401
    assert _get(client, url, keys.token(exp=1)).status_code == 401
    assert _get(client, url, keys.token(aud="someone-else")).status_code == 401
    assert _get(client, url, keys.token(key=keys.other)).status_code == 401
    assert _get(client, url, keys.token(tenant=None)).status_code == 403
    big = client.request("GET", url, content=b"x" * 10_000, headers={"Authorization": f"Bearer {keys.token()}"})
    assert big.status_code == 413
    assert _get(client, "/v1/aggregates/restp/nope", keys.token()).status_code == 404


def test_openapi_document(served):
    client, _, _ = served
    doc = client.get("/openapi.json").json()
    assert "/v1/aggregates/{pipeline}/{window}" in doc["paths"] and client.get("/docs").status_code == 200


def test_real_serve_deployment(served, keys, ray_local):
    import httpx

    from pipeline.io.broker import free_port
    from serve.runner import start_serve, stop_serve

    _, latest, cfg = served
    cfg = cfg.model_copy(update={"port": free_port(), "grpc_port": None})
    url = start_serve(cfg)["http"]  # the session's Ray is already connected
    try:
        assert httpx.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
        r = httpx.get(f"{url}/v1/aggregates/restp/w", params={"limit": 1000},
                      headers={"Authorization": f"Bearer {keys.token('acme')}"}, timeout=30)
        assert r.status_code == 200
        assert len(r.json()["items"]) == int((latest.tenant_id == "acme").sum())
        assert httpx.get(f"{url}/v1/aggregates/restp/w", timeout=30).status_code == 401
    finally:
        stop_serve()


def test_rate_limit_answers_429_with_retry_after(served, keys, redis_server):
    _, _, cfg = served
    from serve.config import RateLimitConfig

    limited = cfg.model_copy(update={"rate_limit": RateLimitConfig(redis_url=redis_server.extra["url"], capacity=3, per_second=0.01)})
    with TestClient(build_app(limited)) as client:
        _limited(client, keys)


def _limited(client, keys):
    # one bucket per route, whatever the path: new and old names and unknown windows all draw from "windows"
    paths = ["/v1/windows/restp/w", "/v1/aggregates/restp/w", "/v1/windows/restp/nope", "/v1/windows/other/w",
             "/v1/aggregates/restp/w"]
    codes = [_get(client, p, keys.token("ratelimited-tenant"), params={"kind": "a"}).status_code for p in paths]
    assert codes == [200, 200, 404, 429, 429]
    assert _get(client, "/v1/pipelines", keys.token("ratelimited-tenant")).status_code == 200  # another route's bucket
    r = _get(client, "/v1/aggregates/restp/w", keys.token("ratelimited-tenant"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert _get(client, "/v1/aggregates/restp/w", keys.token("acme")).status_code == 200  # another tenant's bucket


def test_schemas_and_ingest(served, keys, broker, postgres, topic_name):
    from pipeline.io.registry import Registry
    from pipeline.schemas import schema_of

    _, _, cfg = served
    subject = f"{topic_name}-ingest"
    schema = {"type": "object", "required": ["tenant_id", "ts", "value"], "additionalProperties": False,
              "properties": {"tenant_id": {"type": "string"}, "ts": {"type": "integer"}, "value": {"type": "number", "minimum": 0}}}
    Registry(postgres.extra["dsn"]).register(subject, schema_of(schema))
    broker.extra["broker"].create_topic(topic_name, 2)
    from serve.config import IngestConfig

    with TestClient(build_app(cfg.model_copy(update={"ingest": IngestConfig(
            bootstrap_servers=broker.address, topic=topic_name, subject=subject)}))) as client:
        _ingest_and_schemas(client, keys, broker, postgres, topic_name, subject, schema)


def _ingest_and_schemas(client, keys, broker, postgres, topic_name, subject, schema):
    from pipeline.io.dead_letter import read_topic

    token = keys.token("acme")
    body = [{"ts": 1, "value": 1.5}, {"tenant_id": "acme", "ts": 2, "value": 2.0}, {"tenant_id": "globex", "ts": 3, "value": 1.0},
            {"ts": 4, "value": -1}, {"ts": 5, "value": 1, "extra": True}, "nope"]
    r = client.post("/v1/events", json=body, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 207, r.text
    res = r.json()["results"]
    assert [x["status"] for x in res] == ["accepted", "accepted", "rejected", "rejected", "rejected", "rejected"]
    assert [x.get("reason") for x in res[2:]] == ["tenant_mismatch", "schema_violation:minimum",
                                                  "schema_violation:additionalProperties", "not_an_object"]
    nd = b'{"ts": 6, "value": 3}\n{"ts": 7, "value": 4}\n'
    r = client.post("/v1/events", content=nd, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"})
    assert r.status_code == 200 and r.json()["accepted"] == 2
    got = read_topic(broker.address, topic_name)
    assert len(got) == 4 and {x.key for x in got} == {b"acme"}
    assert sorted(json.loads(x.value)["ts"] for x in got) == [1, 2, 6, 7]
    # schemas: list, read, register needs the scope, incompatible is 409 with the problems
    auth = {"Authorization": f"Bearer {token}"}
    assert any(s["subject"] == subject for s in client.get("/v1/schemas", headers=auth).json()["subjects"])
    assert client.get(f"/v1/schemas/{subject}/versions/latest", headers=auth).json()["version"] == 1
    bad = {**schema, "properties": {**schema["properties"], "value": {"type": "string"}}}
    assert client.post(f"/v1/schemas/{subject}", json={"schema": bad}, headers=auth).status_code == 403
    writer = {"Authorization": f"Bearer {keys.token('acme', scope='schemas:write')}"}
    r = client.post(f"/v1/schemas/{subject}", json={"schema": bad}, headers=writer)
    assert r.status_code == 409 and any("field 'value'" in p for p in r.json()["problems"])
    # a NUL character anywhere in the schema cannot be stored: a 400 naming the field, never a 500
    nul = client.post(f"/v1/schemas/{subject}", json={"schema": {**schema, "description": "a\u0000b"}}, headers=writer)
    assert nul.status_code == 400 and nul.json()["parameter"] == "schema", nul.text
    ok = {**schema, "properties": {**schema["properties"], "note": {"type": "string"}}}
    # property-level authorization: properties the API does not take are refused by name, never applied
    for extra in ("tenant_id", "owner", "version"):
        r = client.post(f"/v1/schemas/{subject}", json={"schema": ok, extra: "globex"}, headers=writer)
        assert r.status_code == 400 and r.json()["parameter"] == extra, r.text
    r = client.post(f"/v1/schemas/{subject}", json={"schema": ok}, headers=writer)
    assert r.status_code == 201 and r.json()["version"] == 2
    import psycopg

    with psycopg.connect(postgres.extra["dsn"]) as conn:
        rows = conn.execute("select action, actor from raystream_audit where target = %s", (subject,)).fetchall()
    assert ("register_schema", "api:user-1@acme") in rows
    assert ("register_denied", "api:user-1@acme") in rows  # the refused attempt is audited too
    versions = client.get(f"/v1/schemas/{subject}/versions/latest", headers=auth).json()
    assert versions["version"] == 2 and "globex" not in json.dumps(versions)


def test_include_open_reads_live_worker_state(keys, broker, postgres, ray_local, tmp_path, topic_name, pipeline_name):
    """Closed windows from PostgreSQL plus open ones from the workers add up to every record of the tenant."""
    import threading
    import time as _time

    from actors import control
    from pipeline.driver import run_pipeline
    from pipeline.io.kafka import produce_all
    from serve.config import ServeConfig
    from tests.serve_keys import AUDIENCE, ISSUER

    n = 2000
    t0 = 1_700_000_000_000
    recs = [{"tenant_id": ["acme", "globex"][i % 2], "kind": "a", "ts": t0 + i * 10, "value": 1.0} for i in range(n)]
    broker.extra["broker"].create_topic(topic_name, 2)
    # each tenant's records over both partitions: open windows are merged from both workers' state
    produce_all(broker.address, topic_name, [json.dumps(r).encode() for r in recs], None, [(i // 2) % 2 for i in range(n)])
    spec_d = {"name": pipeline_name, "source": {"kafka": {"bootstrap_servers": broker.address, "topic": topic_name}},
              "event_time": {"field": "ts", "format": "epoch_ms", "idle_timeout": "1h"},
              "windows": [{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["tenant_id", "kind"], "aggregations": ["count"]}],
              "sinks": [{"postgres": {"dsn": postgres.extra["dsn"]}}], "workers": 2}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec_d))
    (tmp_path / "jwks.json").write_text(json.dumps(keys.jwks()))
    stop = threading.Event()
    th = threading.Thread(target=lambda: run_pipeline(parse_spec(spec_d), stop=stop), daemon=True)
    th.start()
    try:
        deadline = _time.monotonic() + 60
        while _time.monotonic() < deadline:
            try:
                st = control.pipeline_status(pipeline_name, timeout_s=5)
                if sum(sum(w["positions"].values()) for w in st["workers"]) >= n and all(w["state"] == "running" for w in st["workers"]):
                    break
            except Exception:  # not started yet
                pass
            _time.sleep(0.3)
        cfg = ServeConfig.model_validate({"postgres_dsn": postgres.extra["dsn"], "pipelines": [str(tmp_path / "p.yaml")],
                                          "auth": {"jwks_file": str(tmp_path / "jwks.json"), "issuer": ISSUER, "audience": AUDIENCE}})
        with TestClient(build_app(cfg)) as client:
            # every offset consumed does not mean every closed window is in PostgreSQL yet: merged windows reach the
            # sink through the merge owner a moment later, so read until the closed rows stop changing
            deadline = _time.monotonic() + 30
            while True:
                r = client.get(f"/v1/aggregates/{pipeline_name}/w", params={"include_open": "true", "limit": 1000},
                               headers={"Authorization": f"Bearer {keys.token('acme')}"})
                assert r.status_code == 200, r.text
                body = r.json()
                total = sum(x["count"] for x in body["items"]) + sum(x["count"] for x in body["open"])
                if total == n // 2 or _time.monotonic() > deadline:
                    break
                _time.sleep(0.5)
        assert body["open"], "the last windows of each partition are still open"
        assert all(x["tenant_id"] == "acme" and x["revision"] == 0 and "partition" not in x for x in body["open"])
        assert len({x["window_start"] for x in body["open"]}) == len(body["open"])  # one row per group, merged
        closed_starts = {x["window_start"] for x in body["items"]}
        assert not closed_starts & {x["window_start"] for x in body["open"]}
        assert sum(x["count"] for x in body["items"]) + sum(x["count"] for x in body["open"]) == n // 2
    finally:
        stop.set()
        th.join(60)
