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

__all__ = ["AuthError", "Authenticator", "Principal", "UnknownKey"]

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


class UnknownKey(AuthError):
    """The token names a ``kid`` the cached JWKS does not have (the caller may refetch it once and retry)."""


class Authenticator:
    """Verifies bearer tokens and extracts the tenant claim.

    ``jwks`` is a JWKS document, a file path or an ``https://`` URL. Keys are
    cached; a token naming an unknown ``kid`` may trigger a refetch
    (``refresh``), at most one per ``refresh_min_s`` however many such tokens
    arrive, so rotated keys are picked up and random ``kid``s cost nothing. A
    malformed key in the set is skipped (with the reason in ``skipped``); a set
    with no usable key is refused at start. When a refetch fails, the cached
    keys stay in force.
    """

    def __init__(self, jwks: dict | str | Path, issuer: str, audience: str, tenant_claim: str = "tenant",
                 hs256_secret: str | None = None, leeway_s: int = 0, refresh_min_s: float = 30.0):
        self.source = jwks if isinstance(jwks, dict) else str(jwks)
        self.refresh_min_s = refresh_min_s
        self.refetches = 0
        self.skipped: list[str] = []
        self._fetched_at = time.monotonic()
        self._keys: dict[str, tuple[object, str]] | None = None
        self._jwks = self._fetch()
        if not self._load():  # refuse a JWKS without one usable key at once
            raise ValueError(f"JWKS has no usable RS256/ES256 key: {self.skipped}")
        self.issuer, self.audience = issuer, audience
        self.tenant_claim = tenant_claim
        self.hs256_secret = hs256_secret
        self.leeway_s = leeway_s

    def _fetch(self) -> dict:
        if isinstance(self.source, dict):
            return self.source
        if self.source.startswith(("https://", "http://")):
            import urllib.request

            with urllib.request.urlopen(self.source, timeout=3) as r:  # noqa: S310 (scheme checked above)
                return json.loads(r.read(1 << 20))
        return json.loads(Path(self.source).read_text())

    def _load(self) -> dict[str, tuple[object, str]]:
        keys, skipped = {}, []
        for k in self._jwks.get("keys", []) if isinstance(self._jwks, dict) else []:
            try:
                alg = k.get("alg") or {"RSA": "RS256", "EC": "ES256"}.get(k.get("kty"))
                if alg not in _ASYMMETRIC:
                    raise ValueError(f"algorithm {alg!r} is not RS256/ES256")
                keys[str(k.get("kid", ""))] = (jwt.PyJWK.from_dict(k).key, alg)
            except Exception as exc:  # a malformed key is skipped, never a 500
                skipped.append(f"{k.get('kid') if isinstance(k, dict) else k!r}: {type(exc).__name__}: {exc}")
        self._keys, self.skipped = keys, skipped
        return keys

    @property
    def keys(self) -> dict[str, tuple[object, str]]:
        return self._keys if self._keys is not None else self._load()

    def may_refresh(self) -> bool:
        return not isinstance(self.source, dict) and time.monotonic() - self._fetched_at >= self.refresh_min_s

    def refresh(self) -> bool:
        """Refetch the JWKS unless done less than ``refresh_min_s`` ago; True when new keys were loaded."""
        import threading

        with self.__dict__.setdefault("_refresh_lock", threading.Lock()):  # one refetch at a time; the others wait for it
            if not self.may_refresh():
                return False
            self._fetched_at = time.monotonic()  # also on failure: an endpoint that is down is not hammered
            return self._refetch()

    def _refetch(self) -> bool:
        self.refetches += 1
        try:
            doc = self._fetch()
        except Exception:  # endpoint down or garbage: the cached keys stay in force
            return False
        old_doc, old_keys, old_skipped = self._jwks, self._keys, self.skipped
        self._jwks = doc
        if not self._load():
            self._jwks, self._keys, self.skipped = old_doc, old_keys, old_skipped
            return False
        return True

    def __getstate__(self) -> dict:
        # key objects do not pickle: a Serve replica rebuilds them from the JWKS
        return {k: v for k, v in self.__dict__.items() if k != "_refresh_lock"} | {"_keys": None, "_verified": {}}

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

    async def averify(self, authorization: str | None) -> Principal:
        """``verify``, refetching the JWKS once (off the event loop, at most once per ``refresh_min_s``) when the
        token names a key the cache does not have."""
        try:
            return self.verify(authorization)
        except UnknownKey:
            if not self.may_refresh():
                raise
        import asyncio

        await asyncio.to_thread(self.refresh)
        return self.verify(authorization)

    def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if alg in _ASYMMETRIC:
            entry = self.keys.get(header.get("kid", "")) or (next(iter(self.keys.values())) if len(self.keys) == 1 and "kid" not in header else None)
            if entry is None:
                raise UnknownKey("unknown signing key")
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
