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
"""

from __future__ import annotations

import json

from starlette.routing import Match

from serve.errors import ApiError, http_headers, problem

__all__ = ["Guard", "error_response"]

PROTECTED = "/v1/"


async def error_response(exc: ApiError, send) -> None:
    """Send ``exc`` as a JSON error response on a raw ASGI ``send``."""
    body = json.dumps(problem(exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in http_headers(exc).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: authenticate, rate limit, bound the body — in that order, before the handler reads."""

    def __init__(self, app, core, routes, limit: int):
        self.app, self.core, self.routes, self.limit = app, core, routes, limit

    def endpoint(self, scope) -> str:
        """The rate-limit bucket of a request: its route's name (the path when no route matches)."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "name", None) or scope["path"]
        return scope["path"]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        try:
            who = await self.core.authenticate(headers.get(b"authorization", b"").decode("latin-1") or None)
            declared = headers.get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                raise ApiError(413, f"request body over {self.limit} bytes")
            await self.core.admit(who, self.endpoint(scope))
        except ApiError as exc:
            await error_response(exc, send)
            return
        scope.setdefault("state", {})["principal"] = who
        seen, tripped, started = 0, False, False

        async def receive_bounded():
            nonlocal seen, tripped
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    tripped = True
                    raise ApiError(413, f"request body over {self.limit} bytes")
            return message

        async def send_unless_tripped(message):
            nonlocal started
            if tripped:
                return  # the 413 below is the answer, whatever the handler made of the cut body
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_bounded, send_unless_tripped)
        except Exception:
            if not tripped:
                raise
        if tripped and not started:
            await error_response(ApiError(413, f"request body over {self.limit} bytes"), send)
