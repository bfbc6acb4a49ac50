"""Test signing keys and tokens (generated per run, never stored)."""

from __future__ import annotations

import json
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER, AUDIENCE = "https://auth.test", "raystream"


class Keys:
    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict:
        r = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        e = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        return {"keys": [{**r, "kid": "rsa1", "alg": "RS256", "use": "sig"}, {**e, "kid": "ec1", "alg": "ES256", "use": "sig"}]}

    def token(self, tenant: str | None = "acme", alg: str = "RS256", key=None, kid: str | None = None, **claims) -> str:
        now = int(time.time())
        body = {"sub": "user-1", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, **claims}
        if tenant is not None:
            body["tenant"] = tenant
        body = {k: v for k, v in body.items() if v is not None}
        if alg == "RS256":
            return jwt.encode(body, key or self.rsa, algorithm="RS256", headers={"kid": kid or "rsa1"})
        if alg == "ES256":
            return jwt.encode(body, key or self.ec, algorithm="ES256", headers={"kid": kid or "ec1"})
        return jwt.encode(body, key, algorithm=alg)
