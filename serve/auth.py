"""JWT bearer authentication for every serving endpoint but health (pure: no network).

Tokens are RS256 or ES256, verified with the keys of a JWKS document (chosen by
``kid``); ``exp``, ``nbf``, ``iss`` and ``aud`` are checked (``exp`` is
required). HS256 is accepted only when a development secret is configured.
``alg: none`` is always refused, and so is algorithm confusion: the algorithm
comes from the key, never from the token, so an RSA public key can never be
used as an HMAC secret.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

__all__ = ["AuthError", "Authenticator", "Principal"]

_ASYMMETRIC = {"RS256", "ES256"}


class AuthError(Exception):
    """The request is not authenticated (401) or not allowed (403)."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    subject: str
    tenant: str
    scopes: frozenset[str]
    claims: dict


class Authenticator:
    """Verifies bearer tokens and extracts the tenant claim."""

    def __init__(self, jwks: dict | str | Path, issuer: str, audience: str, tenant_claim: str = "tenant",
                 hs256_secret: str | None = None, leeway_s: int = 0):
        if isinstance(jwks, (str, Path)):
            jwks = json.loads(Path(jwks).read_text())
        self._jwks = jwks
        self._keys: dict[str, tuple[object, str]] | None = None
        self._load()  # refuse a bad JWKS at once
        self.issuer, self.audience = issuer, audience
        self.tenant_claim = tenant_claim
        self.hs256_secret = hs256_secret
        self.leeway_s = leeway_s

    def _load(self) -> dict[str, tuple[object, str]]:
        keys = {}
        for k in self._jwks.get("keys", []):
            jwk = jwt.PyJWK.from_dict(k)
            alg = k.get("alg") or {"RSA": "RS256", "EC": "ES256"}.get(k.get("kty"))
            if alg not in _ASYMMETRIC:
                raise ValueError(f"JWKS key {k.get('kid')!r}: algorithm {alg!r} is not RS256/ES256")
            keys[k.get("kid", "")] = (jwk.key, alg)
        self._keys = keys
        return keys

    @property
    def keys(self) -> dict[str, tuple[object, str]]:
        return self._keys if self._keys is not None else self._load()

    def __getstate__(self) -> dict:
        # key objects do not pickle: a Serve replica rebuilds them from the JWKS
        return {**self.__dict__, "_keys": None, "_verified": {}}

    def verify(self, authorization: str | None) -> Principal:
        """``Authorization`` header value -> Principal; raises AuthError (401) on anything wrong.

        A verified token is remembered (by its exact text) for at most 30 s and never past its
        ``exp``: a client reusing its token skips the signature check on most requests.
        """
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError("missing bearer token")
        token = authorization[7:].strip()
        cache = self.__dict__.setdefault("_verified", {})
        hit = cache.get(token)
        now = time.time()
        if hit is not None and hit[0] > now and (hit[1].claims.get("nbf") is None or hit[1].claims["nbf"] <= now):
            return hit[1]
        who = self._verify(token)
        if len(cache) > 10_000:
            cache.clear()
        cache[token] = (min(now + 30, float(who.claims["exp"])), who)
        return who

    def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if alg in _ASYMMETRIC:
            entry = self.keys.get(header.get("kid", "")) or (next(iter(self.keys.values())) if len(self.keys) == 1 and "kid" not in header else None)
            if entry is None:
                raise AuthError("unknown signing key")
            key, key_alg = entry
            if key_alg != alg:
                raise AuthError(f"token algorithm {alg} does not match its key ({key_alg})")
            algorithms = [key_alg]
        elif alg == "HS256" and self.hs256_secret:
            key, algorithms = self.hs256_secret, ["HS256"]
        else:
            raise AuthError(f"algorithm {alg!r} is not accepted")
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, audience=self.audience, issuer=self.issuer,
                                leeway=self.leeway_s, options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise AuthError(f"token has no {self.tenant_claim!r} claim", 403)
        scopes = claims.get("scope", "")
        return Principal(str(claims.get("sub", "")), tenant, frozenset(scopes.split() if isinstance(scopes, str) else scopes), claims)
