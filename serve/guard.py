"""The gate every REST request passes before its handler runs (plain ASGI).

For every HTTP request under ``/v1/``, before a byte of its body is read:
the bearer token is verified (401/403), the tenant's token bucket for the
route is taken (429), and a declared ``Content-Length`` over the limit is
refused (413). Then the body is counted while the handler reads it: the
moment it passes the limit — chunked or not — reading stops and the answer
is 413, whatever the handler was doing. So no route, present or future, can
buffer an unauthenticated or oversized body; the check order is the same for
all of them.

The verified caller is left in ``scope["state"]["principal"]`` for the
handlers (``request.state.principal``). Plain ASGI on purpose: an
``@app.middleware("http")`` wrapper watches the request stream for
disconnects, which under Serve costs a call back to the proxy per request.

Serve's HTTP proxy reads a request body ahead of the replica and hands the
replica everything it has read in one pull, so a gate in the replica alone
would still see tens of MiB arrive. ``ProxyGate`` runs the same token and
body checks inside the proxy itself (Serve's proxy callback,
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.guard.proxy_gate``, read
when the proxy starts): a request without a valid token, or a body past the
limit, is answered there and never leaves the proxy.
"""

from __future__ import annotations

import json

from starlette.routing import Match

from serve.errors import ApiError, http_headers, problem

__all__ = ["CALLBACK", "CONFIG_ENV", "GATE_ENV", "Guard", "ProxyGate", "bounded", "error_response", "gate", "gate_settings", "proxy_gate"]

PROTECTED = "/v1/"


async def error_response(exc: ApiError, send) -> None:
    """Send ``exc`` as a JSON error response on a raw ASGI ``send``."""
    body = json.dumps(problem(exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in http_headers(exc).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _flat_routes(routes) -> list:
    """The routes under ``routes``, looking into routers FastAPI keeps as one node (``include_router``)."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out += _flat_routes(inner.routes) if inner is not None else [route]
    return out


class Guard:
    """ASGI middleware in the replica: token, the tenant's bucket for the route, body size — before the handler reads."""

    def __init__(self, app, core, routes, limit: int):
        self.app, self.core, self.routes, self.limit = app, core, routes, limit
        self._flat: list | None = None

    def endpoint(self, scope) -> str:
        """The rate-limit bucket of a request: its route's name (the path when no route matches), so every path of
        one route (any pipeline or window, old and new names) shares the bucket."""
        if self._flat is None:  # the routes are all in place once requests come
            self._flat = _flat_routes(self.routes)
        for route in self._flat:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "name", None) or scope["path"]
        return scope["path"]

    async def admit(self, scope, authorization: str | None):
        who = await self.core.authenticate(authorization)
        await self.core.admit(who, self.endpoint(scope))
        return who

    async def __call__(self, scope, receive, send):
        await gate(self.app, scope, receive, send, self.limit, self.admit)


async def gate(app, scope, receive, send, limit: int, admit, refused=None) -> None:
    """The one check sequence of the Guard and the ProxyGate: for ``/v1/`` HTTP requests, ``admit`` (token, and in
    the replica the rate limit), then a declared ``Content-Length`` over ``limit``, then the body cut at ``limit``
    while it is read. What ``admit`` returns (the caller, in the replica) is left in ``scope["state"]``."""
    if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
        await app(scope, receive, send)
        return
    headers = dict(scope.get("headers") or ())
    try:
        who = await admit(scope, headers.get(b"authorization", b"").decode("latin-1") or None)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError(413, f"request body over {limit} bytes")
    except ApiError as exc:
        await error_response(exc, send)
        if refused is not None:
            refused(scope, exc.status)
        return
    if who is not None:
        scope.setdefault("state", {})["principal"] = who
    await bounded(app, scope, receive, send, limit)


async def bounded(app, scope, receive, send, limit: int) -> None:
    """Run ``app`` with its request body cut at ``limit`` bytes: past it, 413 is the answer, whatever the app did."""
    seen, tripped, started = 0, False, False

    async def receive_bounded():
        nonlocal seen, tripped
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                tripped = True
                raise ApiError(413, f"request body over {limit} bytes")
        return message

    async def send_unless_tripped(message):
        nonlocal started
        if tripped:
            return  # the 413 below is the answer, whatever the handler made of the cut body
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive_bounded, send_unless_tripped)
    except Exception:
        if not tripped:
            raise
    if tripped and not started:
        await error_response(ApiError(413, f"request body over {limit} bytes"), send)


class ProxyGate:
    """The token and body checks inside Serve's HTTP proxy (see the module doc); the replica's Guard stays the rule."""

    def __init__(self, app, auth: dict, limit: int):
        from serve.auth import Authenticator

        self.app, self.limit = app, limit
        self.metrics = None
        self.auth = Authenticator(auth["jwks"], auth["issuer"], auth["audience"], auth["tenant_claim"],
                                  auth.get("hs256_secret"), refresh_min_s=auth["refresh_min_s"])

    async def admit(self, scope, authorization: str | None) -> None:
        from serve.auth import AuthError

        try:
            await self.auth.averify(authorization)
        except AuthError as exc:
            raise ApiError(exc.status, str(exc)) from None
        return None  # the replica verifies again and keeps the caller; nothing travels from the proxy

    async def __call__(self, scope, receive, send):
        await gate(self.app, scope, receive, send, self.limit, self.admit, self._refused)

    def _refused(self, scope, status: int) -> None:
        """A request answered here never reaches a replica: the proxy counts it (route ``proxy_gate``: no route
        templates here, and raw paths would be unbounded labels)."""
        if self.metrics is None:
            from serve.metrics import ServeMetrics

            self.metrics = ServeMetrics()
        self.metrics.request("proxy_gate", scope.get("method", "GET"), status, 0.0)


GATE_ENV = "RAYSTREAM_PROXY_GATE"  # path of the ProxyGate's settings (JSON, mode 0600) in the proxy's environment
CONFIG_ENV = "RAYSTREAM_SERVE_CONFIG"  # or the path of the serve config (YAML) they come from
CALLBACK = "serve.guard.proxy_gate"  # Serve calls it in each proxy (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)


def gate_settings(cfg) -> dict:
    """What a ProxyGate needs of a ServeConfig."""
    a = cfg.auth
    return {"auth": {"jwks": a.jwks, "issuer": a.issuer, "audience": a.audience, "tenant_claim": a.tenant_claim,
                     "hs256_secret": a.hs256_secret.get_secret_value() if a.hs256_secret else None,
                     "refresh_min_s": a.jwks_refresh_min_s},
            "limit": cfg.max_body_bytes}


def proxy_gate() -> list:
    """Serve's proxy callback: the ProxyGate middleware from the settings file named in ``RAYSTREAM_PROXY_GATE``
    (or the serve config named in ``RAYSTREAM_SERVE_CONFIG``)."""
    import os
    from pathlib import Path

    from starlette.middleware import Middleware

    path = os.environ.get(GATE_ENV)
    if path:
        conf = json.loads(Path(path).read_text())
    elif os.environ.get(CONFIG_ENV):  # a cluster's pods mount the serve config itself
        from serve.config import load_config

        conf = gate_settings(load_config(os.environ[CONFIG_ENV]))
    else:
        return []
    return [Middleware(ProxyGate, auth=conf["auth"], limit=conf["limit"])]
