"""Pure pieces of the serving hardening: the tenancy rule, secret masking, JWT mutations, JWKS
rotation against a real HTTP server, insecure configurations, and the ingest queue bound."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings, strategies as st
from pydantic import ValidationError

from pipeline.redact import redact, redact_text
from serve.auth import AuthError, Authenticator, Principal
from serve.config import ServeConfig
from serve.errors import ApiError
from serve.tenancy import can_see, pipeline_view, scope_filters, visible_rows
from tests.serve_keys import AUDIENCE, ISSUER, Keys


@pytest.fixture(scope="module")
def keys():
    return Keys()


def _who(tenant: str, *scopes: str) -> Principal:
    return Principal("u", tenant, frozenset(scopes), {"exp": time.time() + 60})


# -- one tenancy rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("tenant, value, seen", [
    ("None", None, False), ("None", "None", True), ("7", 7, False), ("7", "7", True), ("true", True, False),
    ("acme", "acme", True), ("acme", "ACME", False), ("acme", "acme ", False), ("", "", False),
])
def test_rows_are_compared_as_typed_values(tenant, value, seen):
    who = _who(tenant)
    assert can_see(who, {"tenant_id": value}, "tenant_id") is seen
    assert can_see(who, {}, "tenant_id") is False


@given(st.lists(st.one_of(st.none(), st.integers(-3, 3), st.sampled_from(["None", "0", "1", "acme", "", "null"])), max_size=30),
       st.sampled_from(["None", "0", "1", "acme", "null"]))
def test_visible_rows_are_exactly_the_tenants_strings(values, tenant):
    rows = [{"tenant_id": v, "i": i} for i, v in enumerate(values)]
    got = visible_rows(_who(tenant), rows, "tenant_id")
    assert [r["i"] for r in got] == [i for i, v in enumerate(values) if isinstance(v, str) and v == tenant]


def test_filters_pin_the_tenant_and_refuse_others():
    who = _who("acme")
    assert scope_filters(who, {"kind": "a"}, "tenant_id", ["tenant_id", "kind"]) == {"kind": "a", "tenant_id": "acme"}
    with pytest.raises(ApiError) as exc:
        scope_filters(who, {"tenant_id": "globex"}, "tenant_id", ["tenant_id", "kind"])
    assert exc.value.status == 403
    with pytest.raises(ApiError) as exc:
        scope_filters(who, {"secret": "x"}, "tenant_id", ["tenant_id", "kind"])
    assert (exc.value.status, exc.value.parameter) == (400, "secret")


def test_pipeline_status_is_redacted_for_tenants():
    status = {"pipeline": "p", "phase": "running", "degraded": True, "failure": "Traceback ... globex secret",
              "workers": [{"index": 0, "health": "running", "error": "Traceback (most recent call last)", "partitions": [0, 1],
                           "pid": 4242}], "events": ["worker 0 restarted: KeyError('globex')"],
              "last_checkpoint": {"id": 7, "created": 1.5, "offsets": {0: 10}}}
    tenant = pipeline_view(_who("acme"), status)
    assert tenant == {"pipeline": "p", "phase": "running", "degraded": True, "workers": 1, "healthy_workers": 1,
                      "last_checkpoint": {"id": 7, "created": 1.5}}
    assert "Traceback" not in json.dumps(tenant) and "globex" not in json.dumps(tenant)
    assert pipeline_view(_who("ops", "operator"), status) is status


# -- secrets --------------------------------------------------------------------------------------

SENTINEL = "S3ntinel-Zq9x"


def test_secrets_are_masked_in_structures_and_text():
    doc = {"source": {"kafka": {"config": {"sasl.password": SENTINEL, "sasl.username": "svc", "ssl.key.password": SENTINEL}}},
           "sinks": [{"postgres": {"dsn": f"postgresql://app:{SENTINEL}@db:5432/x"}}, {"redis": {"url": f"redis://:{SENTINEL}@r:6379/0"}}],
           "auth": {"hs256_secret": SENTINEL, "issuer": "i"}, "aws_secret_access_key": SENTINEL, "group_by": ["tenant_id"]}
    out = json.dumps(redact(doc))
    assert SENTINEL not in out and '"sasl.username": "svc"' in out and "tenant_id" in out and "postgresql://app:***@db" in out
    for text in (f"connect failed: postgresql://app:{SENTINEL}@db/x", f"host=db password={SENTINEL} user=app",
                 f"password='{SENTINEL}'", f"Authorization: Bearer {SENTINEL}.abc.def"):
        assert SENTINEL not in redact_text(text), text


def test_validate_prints_no_secret(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    spec = {"name": "sec", "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "t",
                                                "config": {"sasl.password": SENTINEL, "security.protocol": "SASL_PLAINTEXT"}}},
            "event_time": {"field": "ts", "format": "epoch_ms"},
            "windows": [{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["k"], "aggregations": ["count"]}],
            "sinks": [{"postgres": {"dsn": f"postgresql://app:{SENTINEL}@127.0.0.1:1/x"}}, {"redis": {"url": f"redis://:{SENTINEL}@127.0.0.1:1/0"}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "s.yaml")])
    assert r.exit_code == 0, r.output
    assert SENTINEL not in r.output and "sasl.password" in r.output and '"security.protocol": "SASL_PLAINTEXT"' in r.output


# -- JWT mutations: only genuine tokens pass ------------------------------------------------------------

def _mutate(token: str, part: int, pos: int, byte: int) -> str:
    parts = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(parts[part] + "=" * (-len(parts[part]) % 4)))
    if not raw:
        raw = bytearray(b"\0")
    raw[pos % len(raw)] ^= byte or 1
    parts[part] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    return ".".join(parts)


@settings(max_examples=300, deadline=None)
@given(part=st.integers(0, 2), pos=st.integers(0, 600), byte=st.integers(1, 255), alg=st.sampled_from(["RS256", "ES256"]))
def test_random_jwt_mutations_never_pass(keys, part, pos, byte, alg):
    auth = Authenticator(keys.jwks(), ISSUER, AUDIENCE)
    token = keys.token("acme", alg=alg)
    assert auth.verify(f"Bearer {token}").tenant == "acme"
    bad = _mutate(token, part, pos, byte)
    with pytest.raises(AuthError):
        auth.verify(f"Bearer {bad}")


@settings(max_examples=100, deadline=None)
@given(claims=st.dictionaries(st.sampled_from(["tenant", "exp", "iss", "aud", "nbf", "sub", "scope"]),
                              st.one_of(st.none(), st.integers(-2**40, 2**40), st.text(max_size=8), st.lists(st.text(max_size=3), max_size=2)),
                              max_size=4))
def test_tampered_payloads_with_the_original_signature_never_pass(keys, claims):
    auth = Authenticator(keys.jwks(), ISSUER, AUDIENCE)
    token = keys.token("acme")
    header, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    changed = {**body, **claims}
    forged = ".".join([header, base64.urlsafe_b64encode(json.dumps(changed).encode()).rstrip(b"=").decode(), sig])
    if changed == body:
        return
    with pytest.raises(AuthError):
        auth.verify(f"Bearer {forged}")


# -- JWKS rotation ---------------------------------------------------------------------------------------

class _Jwks(BaseHTTPRequestHandler):
    doc: dict = {}
    hits = 0
    down = False

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).hits += 1
        if type(self).down:
            self.send_response(503)
            self.end_headers()
            return
        body = json.dumps(type(self).doc).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_jwks_rotation_refetches_on_unknown_kid_at_most_once_per_interval(keys):
    from serve.core import Core

    first = keys.jwks()
    new = Keys()
    rotated = {"keys": first["keys"] + [{**new.jwks()["keys"][0], "kid": "rsa2"}]}
    handler = type("H", (_Jwks,), {"doc": first, "hits": 0, "down": False})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        auth = Authenticator(f"http://127.0.0.1:{server.server_port}/jwks", ISSUER, AUDIENCE, refresh_min_s=2.0)
        core = Core.__new__(Core)
        core.auth = auth
        assert handler.hits == 1
        handler.doc = rotated
        fresh = new.token("acme", kid="rsa2")
        auth._fetched_at -= 5  # the last fetch is older than the interval
        who = asyncio.run(core.authenticate(f"Bearer {fresh}"))
        assert who.tenant == "acme" and handler.hits == 2 and auth.refetches == 1

        async def storm():
            out = []
            for i in range(1000):  # random kids: at most one refetch per interval
                try:
                    await core.authenticate(f"Bearer {new.token('acme', kid=f'random-{i}')}")
                except ApiError as exc:
                    out.append(exc.status)
            return out

        t0 = time.monotonic()
        codes = asyncio.run(storm())
        assert set(codes) == {401}
        assert handler.hits - 2 <= 1 + int((time.monotonic() - t0) / 2.0)
        # the endpoint down: cached keys stay in force
        handler.down = True
        auth._fetched_at -= 5
        assert not auth.refresh()
        assert auth.verify(f"Bearer {keys.token('acme')}").tenant == "acme"
        assert auth.verify(f"Bearer {fresh}").tenant == "acme"
    finally:
        server.shutdown()


def test_malformed_key_in_the_set_is_skipped(keys):
    doc = keys.jwks()
    doc["keys"].append({"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB", "alg": "RS256"})
    doc["keys"].append({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"})
    auth = Authenticator(doc, ISSUER, AUDIENCE)
    assert {s.split(":")[0].strip("'") for s in auth.skipped} == {"broken", "hmac"}
    assert auth.verify(f"Bearer {keys.token('acme')}").tenant == "acme"
    with pytest.raises(ValueError, match="no usable"):
        Authenticator({"keys": doc["keys"][2:]}, ISSUER, AUDIENCE)


# -- insecure configurations are refused --------------------------------------------------------------------

def _cfg(**over) -> dict:
    base = {"postgres_dsn": "postgresql://x@127.0.0.1:1/x", "auth": {"jwks_file": "/dev/null", "issuer": "i", "audience": "a"}}
    for k, v in over.items():
        if k == "auth":
            base["auth"] = {**base["auth"], **v}
        else:
            base[k] = v
    return base


@pytest.mark.parametrize("over, message", [
    ({"auth": {"hs256_secret": "short"}}, "shorter than 32 bytes"),
    ({"host": "0.0.0.0", "auth": {"hs256_secret": "x" * 40}}, "not loopback"),
    ({"host": "10.0.0.5", "grpc_proxy": True}, "binds every interface"),
    ({"auth": {"jwks_url": "http://idp.example.com/jwks", "jwks_file": None}}, "https"),
    ({"auth": {"jwks_url": "https://idp.example.com/jwks"}}, "exactly one"),
])
def test_insecure_configurations_are_refused(over, message):
    with pytest.raises(ValidationError, match=message):
        ServeConfig.model_validate(_cfg(**over))
    assert ServeConfig.model_validate(_cfg(host="0.0.0.0")).host == "0.0.0.0"  # RS256/ES256 on any host is fine


# -- ingest never blocks on a full producer queue ------------------------------------------------------------

def test_full_producer_queue_answers_503_before_sending(monkeypatch):
    import serve.ingest as ingest
    from serve.config import IngestConfig

    monkeypatch.setattr(ingest, "QUEUE_MESSAGES", 10)
    ing = ingest.Ingestor(IngestConfig(bootstrap_servers="127.0.0.1:1", topic="t", schema_file="/dev/null"), None)

    def queued() -> int:
        # len() also counts undelivered error events (broker down): serve those first, count messages only
        ing.producer().poll(0)
        return len(ing.producer())

    try:
        done = ing.send([(i, b"{}") for i in range(8)], "acme", "x")  # no broker: they stay queued
        assert done == {} and queued() == 8
        t0 = time.monotonic()
        with pytest.raises(ApiError) as exc:
            ing.send([(i, b"{}") for i in range(5)], "acme", "x")
        assert exc.value.status == 503 and exc.value.retry_after == 1 and time.monotonic() - t0 < 1
        assert queued() == 8  # nothing of the refused request was queued
    finally:
        ing._producer = None  # the queued records go nowhere: do not wait for them


def test_stream_leases_of_a_dead_replica_expire(redis_server):
    """A replica killed with open subscriptions never releases their leases: the tenant is at its cap only until
    the leases' time runs out (renewed every heartbeat by live streams), then new subscriptions get through."""
    import redis.asyncio as aredis

    from serve.stream import Lease

    async def run():
        r = aredis.Redis.from_url(redis_server.extra["url"])
        try:
            held = [Lease(r, "dead-replica", cap=2, ttl_s=1.0) for _ in range(2)]
            assert [await x.renew() for x in held] == [True, True]
            late = Lease(r, "dead-replica", cap=2, ttl_s=1.0)
            assert await late.renew() is False  # at the cap
            assert await Lease(r, "other-tenant", cap=2, ttl_s=1.0).renew() is True
            await asyncio.sleep(0.6)
            assert await held[0].renew() is True  # a live stream renews its lease ...
            await asyncio.sleep(0.6)
            assert await late.renew() is True  # ... the dead one's expired: one place is free again
            assert await Lease(r, "dead-replica", cap=2, ttl_s=1.0).renew() is False
            await held[0].release()
            assert await Lease(r, "dead-replica", cap=2, ttl_s=1.0).renew() is True
        finally:
            await r.aclose()

    asyncio.run(run())
