"""WebSocket ``/v1/stream``: window updates as they are emitted, per tenant.

A client connects with ``?access_token=<JWT>`` (or an ``Authorization``
header), then sends ``{"subscribe": {"pipeline", "window", "filters",
"session"}}``. Updates come from the Redis sink's pub/sub channel, filtered to
the token's tenant and the filters. Each connection has a session id (sent
back in ``{"type": "subscribed"}``); the revisions it delivered are kept in
Redis (``raystream:ws:<session>``) for ``session_ttl``, so a client that
reconnects with ``"session": id`` first gets every window whose stored
revision is newer than what it saw, then live updates. Heartbeats: the server
sends ``{"type": "ping"}`` every ``heartbeat`` seconds and closes a socket that
missed two pongs. A slow client never grows an unbounded buffer: pending
updates are coalesced per window (only the latest revision is kept), and when
more than ``max_pending`` windows wait the oldest are dropped and the client
gets ``{"type": "notice"}`` telling it to resume.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from serve.auth import AuthError

__all__ = ["Pending", "add_stream_route"]


def _identity(row: dict, keys: tuple[str, ...]) -> str:
    return json.dumps([row.get("window"), row.get("window_start"), *(row.get(k) for k in keys), row.get("partition")], default=str)


class Pending:
    """A client's unsent updates: the latest revision per window, at most ``limit`` windows."""

    def __init__(self, keys: tuple[str, ...], limit: int):
        self.keys, self.limit = keys, limit
        self.rows: OrderedDict[str, dict] = OrderedDict()
        self.dropped = 0

    def add(self, row: dict) -> None:
        ident = _identity(row, self.keys)
        old = self.rows.pop(ident, None)
        if old is not None and old.get("revision", 0) > row.get("revision", 0):
            row = old  # never replace a newer revision by an older one
        self.rows[ident] = row
        while len(self.rows) > self.limit:
            self.rows.popitem(last=False)
            self.dropped += 1

    def pop(self) -> tuple[str, dict]:
        return self.rows.popitem(last=False)

    def __len__(self) -> int:
        return len(self.rows)


def add_stream_route(app: FastAPI, cfg, auth, windows: dict) -> None:
    import redis.asyncio as aredis

    sc = cfg.stream
    url = sc.redis_url.get_secret_value()

    def prefix_of(pipeline: str) -> str:
        return sc.prefixes.get(pipeline, f"raystream:{pipeline}:")

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        token = ws.query_params.get("access_token")
        header = ws.headers.get("authorization") or (f"Bearer {token}" if token else None)
        try:
            who = auth.verify(header)
        except AuthError as exc:
            await ws.close(code=4401 if exc.status == 401 else 4403, reason=str(exc)[:120])
            return
        await ws.accept()
        try:
            msg = await asyncio.wait_for(ws.receive_json(), timeout=30)
            sub = msg["subscribe"]
            pipeline, window = sub["pipeline"], sub["window"]
            filters = dict(sub.get("filters") or {})
        except (asyncio.TimeoutError, KeyError, TypeError, ValueError):
            await ws.close(code=4400, reason="first message: {\"subscribe\": {\"pipeline\", \"window\", \"filters\"}}")
            return
        info = windows.get((pipeline, window))
        if info is None:
            await ws.close(code=4404, reason="no such window")
            return
        tkey = cfg.tenant_key
        if tkey not in info.keys:
            await ws.close(code=4403, reason=f"window is not grouped by {tkey}")
            return
        bad = [k for k in filters if k not in (*info.keys, "partition")]
        if bad:
            await ws.close(code=4400, reason=f"cannot filter on {bad}")
            return
        if filters.get(tkey, who.tenant) != who.tenant:
            await ws.close(code=4403, reason="a token may only read its own tenant")
            return
        filters[tkey] = who.tenant
        r = aredis.Redis.from_url(url)
        session = str(sub.get("session") or uuid.uuid4())
        skey = f"raystream:ws:{len(who.tenant)}:{who.tenant}:{session}"  # a session id never crosses tenants
        prefix = prefix_of(pipeline)
        pending = Pending(info.keys, sc.max_pending)
        wake = asyncio.Event()
        last_pong = [time.monotonic()]

        def wanted(row: dict) -> bool:
            return row.get("window") == window and row.get("pipeline", pipeline) == pipeline and all(
                str(row.get(k)) == str(v) for k, v in filters.items())

        def enqueue(row: dict) -> None:
            pending.add(row)
            wake.set()

        pubsub = r.pubsub()
        await pubsub.subscribe(f"{prefix}updates")
        # resume: windows whose stored revision is newer than what this session saw
        seen = {k.decode(): int(v) for k, v in (await r.hgetall(skey)).items()}
        if seen or sub.get("session"):
            for key in await r.zrange(f"{prefix}{window}:index", 0, -1):
                h = await r.hgetall(key)
                if not h:
                    continue
                row = {k.decode(): json.loads(v) for k, v in h.items()}
                row.setdefault("window", window)
                if wanted(row) and row.get("revision", 0) > seen.get(_identity(row, info.keys), -1):
                    enqueue(row)
        await ws.send_json({"type": "subscribed", "session": session, "pipeline": pipeline, "window": window,
                            "replayed": len(pending)})

        async def listen():
            async for m in pubsub.listen():
                if m.get("type") != "message":
                    continue
                try:
                    row = json.loads(m["data"])
                except ValueError:
                    continue
                if wanted(row):
                    enqueue(row)

        async def receive():
            while True:
                msg = await ws.receive_json()
                if isinstance(msg, dict) and msg.get("type") == "pong":
                    last_pong[0] = time.monotonic()

        async def heartbeat():
            while True:
                await asyncio.sleep(sc.heartbeat)
                if time.monotonic() - last_pong[0] > 2 * sc.heartbeat + 1:
                    await ws.close(code=4408, reason="missed pongs")
                    return
                await ws.send_json({"type": "ping", "time": time.time()})

        async def send():
            while True:
                await wake.wait()
                wake.clear()
                if pending.dropped:
                    await ws.send_json({"type": "notice", "message": f"slow consumer: {pending.dropped} window updates dropped; "
                                        f"reconnect with session {session} to catch up"})
                    pending.dropped = 0
                while len(pending):
                    ident, row = pending.pop()
                    await ws.send_json({"type": "update", "row": row})
                    await r.hset(skey, ident, int(row.get("revision", 0)))
                    await r.expire(skey, int(sc.session_ttl))

        import anyio

        async def until_first_ends(fn, tg):
            try:
                await fn()
            except (WebSocketDisconnect, RuntimeError):
                pass  # the client went away (or the socket closed under a send)
            finally:
                tg.cancel_scope.cancel()

        try:
            # anyio, as the server runs the app: when one side ends, the others are cancelled
            async with anyio.create_task_group() as tg:
                for fn in (listen, receive, heartbeat, send):
                    tg.start_soon(until_first_ends, fn, tg)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await pubsub.aclose()
                    await r.aclose()
                except Exception:  # Redis went away with the client: nothing left to release
                    pass
