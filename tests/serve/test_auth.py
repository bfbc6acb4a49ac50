"""JWT checks: every row of the security table the serving layer relies on."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from serve.auth import AuthError, Authenticator
from tests.serve_keys import AUDIENCE, ISSUER, Keys


@pytest.fixture(scope="module")
def keys():
    return Keys()


@pytest.fixture(scope="module")
def auth(keys):
    return Authenticator(keys.jwks(), ISSUER, AUDIENCE)


def _confused(k) -> str:
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import serialization

    pem = k.rsa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing = _b64({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}) + "." + _b64(
        {"sub": "x", "tenant": "acme", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60})
    sig = base64.urlsafe_b64encode(hmac.new(pem, signing.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    return signing + "." + sig


def _b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def test_valid_rs256_and_es256(auth, keys):
    assert auth.verify("Bearer " + keys.token()).tenant == "acme"
    assert auth.verify("Bearer " + keys.token("globex", alg="ES256")).tenant == "globex"


@pytest.mark.parametrize("case, make, message", [
    ("no token", lambda k: None, "missing bearer token"),
    ("not bearer", lambda k: "Basic abc", "missing bearer token"),
    ("garbage", lambda k: "Bearer not.a.token", "malformed token"),
    ("expired", lambda k: "Bearer " + k.token(exp=int(time.time()) - 10), "token expired"),
    ("not yet valid", lambda k: "Bearer " + k.token(nbf=int(time.time()) + 600), "nbf"),
    ("wrong audience", lambda k: "Bearer " + k.token(aud="other"), "wrong audience"),
    ("wrong issuer", lambda k: "Bearer " + k.token(iss="https://evil"), "wrong issuer"),
    ("no exp", lambda k: "Bearer " + k.token(exp=None), "invalid token"),
    ("forged signature", lambda k: "Bearer " + k.token(key=k.other), "invalid token"),
    ("unknown kid", lambda k: "Bearer " + k.token(kid="nope"), "unknown signing key"),
    ("alg none", lambda k: "Bearer " + _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(
        {"sub": "x", "tenant": "acme", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}) + ".", "not accepted"),
    # algorithm confusion: HS256 "signed" with the RSA public key (PEM) as the HMAC secret
    ("HS256 with the public key", lambda k: "Bearer " + _confused(k), "not accepted"),
    ("ES256 token naming the RSA key", lambda k: "Bearer " + k.token(alg="ES256", kid="rsa1"), "does not match"),
])
def test_refused(auth, keys, case, make, message):
    with pytest.raises(AuthError, match=message) as exc:
        auth.verify(make(keys))
    assert exc.value.status == 401


def test_tenant_claim_required(auth, keys):
    with pytest.raises(AuthError, match="no 'tenant' claim") as exc:
        auth.verify("Bearer " + keys.token(tenant=None))
    assert exc.value.status == 403


def test_hs256_only_when_configured(keys):
    dev = Authenticator(keys.jwks(), ISSUER, AUDIENCE, hs256_secret="dev-secret-0123456789abcdef0123456789")
    tok = keys.token(alg="HS256", key="dev-secret-0123456789abcdef0123456789")
    assert dev.verify("Bearer " + tok).tenant == "acme"
    with pytest.raises(AuthError):
        Authenticator(keys.jwks(), ISSUER, AUDIENCE).verify("Bearer " + tok)


def test_generated_grpc_modules_match_the_proto(tmp_path):
    """serve/protos/*_pb2*.py are generated from raystream.proto (`make protos`); a stale copy fails here."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "serve" / "protos").mkdir(parents=True)
    shutil.copy(root / "serve/protos/raystream.proto", tmp_path / "serve/protos/raystream.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
                    "serve/protos/raystream.proto"], cwd=tmp_path, check=True)
    for name in ("raystream_pb2.py", "raystream_pb2.pyi", "raystream_pb2_grpc.py"):
        assert (tmp_path / "serve/protos" / name).read_text() == (root / "serve/protos" / name).read_text(), name
