"""WebSocket ``/v1/stream``: window updates as they are emitted, per tenant.

A client connects with ``?access_token=<JWT>`` (or an ``Authorization``
header), then sends ``{"subscribe": {"pipeline", "window", "filters",
"session"}}``. The token holds for the whole session: when it expires the
socket is closed with 4401, unless the client sent a fresh token of the same
tenant first (``{"type": "token", "access_token": …}``). A tenant has at most
``max_streams_per_tenant`` open subscriptions over all replicas (WebSocket and
gRPC together, leases in Redis; beyond, 4429), and subscribing and resuming
take from the tenant's ``subscribe`` / ``resume`` token buckets. Updates come from the Redis sink's pub/sub channel, filtered to
the token's tenant and the filters. Each connection has a session id (sent
back in ``{"type": "subscribed"}``); the revisions it delivered are kept in
Redis (``raystream:ws:<session>``) for ``session_ttl``, so a client that
reconnects with ``"session": id`` first gets every window of its tenant
(read from the Redis sink's per-tenant index, never another tenant's) whose
stored revision is newer than what it saw, then live updates (what a session saw is
written every 100 ms and when it ends, so a resumed client may see a revision
twice, never miss one). Heartbeats: the server
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

from serve.errors import ApiError
from serve.tenancy import can_see, scope_filters, tenant_of

__all__ = ["Feed", "Pending", "SubscribeError", "TEXT", "add_stream_route", "run_session", "tenant_index"]

TEXT = "__text__"  # key of a row's ready-encoded update message (never sent as a field)


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


class SubscribeError(ApiError):
    """A subscription that cannot start: ``status`` as in HTTP (400/403/404/429)."""


def tenant_index(prefix: str, window: str, tenant: str) -> str:
    """The Redis sink's sorted set of one tenant's window keys (the tenant length-prefixed: no tenant reaches another's)."""
    return f"{prefix}{window}:tenant:{len(tenant)}:{tenant}"


# KEYS[1] the tenant's lease set; ARGV: lease ttl ms, cap, lease id. 1 = held, 0 = the tenant is at its cap
_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


class Lease:
    """One open subscription counted against its tenant's cap over every replica (expires unless renewed)."""

    def __init__(self, redis, tenant: str, cap: int, ttl_s: float):
        self.redis, self.cap, self.ttl_ms = redis, cap, int(ttl_s * 1000)
        self.key = f"raystream:streams:{len(tenant)}:{tenant}"
        self.id = uuid.uuid4().hex

    async def renew(self) -> bool:
        return bool(await self.redis.eval(_LEASE, 1, self.key, self.ttl_ms, self.cap, self.id))

    async def release(self) -> None:
        try:
            await self.redis.zrem(self.key, self.id)
        except Exception:  # Redis is gone: the lease expires by itself
            pass


class Hub:
    """One Redis connection and one pub/sub subscription per (event loop, channel), fanned out in-process.

    A thousand subscribers of a replica cost one Redis subscription: each message
    is parsed once and handed to the feeds of its (window, tenant). If the
    subscription breaks, every feed ends (their clients reconnect and resume from
    their sessions) and the next subscriber starts a new hub.
    """

    def __init__(self, url: str, channel: str, tenant_key: str):
        import redis.asyncio as aredis

        # blocking pool: a burst of subscribers waits for a connection instead of failing
        self.redis = aredis.Redis(connection_pool=aredis.BlockingConnectionPool.from_url(url, max_connections=32, timeout=10))
        self.channel, self.tenant_key = channel, tenant_key
        self.marks: dict[str, tuple[dict, int]] = {}  # session key -> (identity -> revision, ttl)
        self._flusher: asyncio.Task | None = None
        self.feeds: dict[tuple[str, str], set] = {}
        self.broken = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.error: BaseException | None = None

    async def join(self, feed: "Feed") -> None:
        """Register ``feed``; returns once the hub's subscription is live (so nothing published after is missed)."""
        self.feeds.setdefault((feed.window, feed.tenant), set()).add(feed)
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        await asyncio.wait([asyncio.ensure_future(self._ready.wait()), asyncio.ensure_future(self.broken.wait())],
                           return_when=asyncio.FIRST_COMPLETED, timeout=10)
        if self.broken.is_set() or not self._ready.is_set():
            raise ConnectionError(f"update channel unavailable: {self.error!r}")

    def mark(self, skey: str, marks: dict, ttl: int) -> None:
        """Record delivered revisions; written to Redis together every 100 ms (one round trip for all feeds)."""
        self.marks.setdefault(skey, ({}, ttl))[0].update(marks)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0.1)
        marks, self.marks = self.marks, {}
        try:
            async with self.redis.pipeline(transaction=False) as p:
                for skey, (m, ttl) in marks.items():
                    p.hset(skey, mapping=m)
                    p.expire(skey, ttl)
                await p.execute()
        except Exception as exc:  # sessions are best effort: a resumed client may see some updates twice
            self.error = exc

    def leave(self, feed: "Feed") -> None:
        group = self.feeds.get((feed.window, feed.tenant))
        if group is not None:
            group.discard(feed)
            if not group:
                del self.feeds[(feed.window, feed.tenant)]

    async def _run(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            self._ready.set()
            async for m in pubsub.listen():
                if m.get("type") != "message":
                    continue
                try:
                    row = json.loads(m["data"])
                except ValueError:
                    continue
                feeds = tuple(self.feeds.get((row.get("window"), tenant_of(row, self.tenant_key)), ()))
                if feeds:  # the WebSocket message, encoded once for every subscriber
                    data = m["data"].decode() if isinstance(m["data"], bytes) else m["data"]
                    row[TEXT] = '{"type":"update","row":' + data + "}"
                for feed in feeds:
                    if feed.wanted(row):
                        feed._enqueue(row)
        except Exception as exc:  # Redis went away: end every feed, their clients resume
            self.error = exc
        finally:
            self.broken.set()
            try:
                await pubsub.aclose()
            except Exception:  # the connection is already gone
                pass


def _hub(core, url: str, channel: str) -> Hub:
    loop = asyncio.get_running_loop()
    hubs = core.__dict__.setdefault("_hubs", {})
    hub = hubs.get((id(loop), channel))
    if hub is None or hub.broken.is_set() or hub.loop is not loop:
        hub = Hub(url, channel, core.cfg.tenant_key)
        hub.loop = loop
        hubs[(id(loop), channel)] = hub
    return hub


class Feed:
    """One subscriber's updates of (pipeline, window, filters), shared by WebSocket and gRPC ``Subscribe``.

    ``start`` checks the subscription against the caller's tenant, subscribes
    to the sink's pub/sub channel and queues what a resumed session missed;
    ``listen`` (a task) queues live updates; ``next`` waits for queued ones;
    ``delivered`` records what the client got in the Redis session.
    """

    def __init__(self, core, who, pipeline: str, window: str, filters: dict, session: str | None):
        sc = core.cfg.stream
        if sc is None:
            raise SubscribeError(404, "streaming is not configured")
        if not isinstance(pipeline, str) or not isinstance(window, str):
            raise SubscribeError(400, "pipeline and window are strings", parameter="pipeline")
        info = core.windows.get((pipeline, window))
        if info is None:
            raise SubscribeError(404, "no such window")
        tkey = core.cfg.tenant_key
        if tkey not in info.keys:
            raise SubscribeError(403, f"window is not grouped by {tkey}")
        if not isinstance(filters, dict):
            raise SubscribeError(400, "filters is an object of group key -> value", parameter="filters")
        if session is not None and not (isinstance(session, str) and 0 < len(session) <= 128):
            raise SubscribeError(400, "session is the id a subscription was given", parameter="session")
        filters = scope_filters(who, {str(k): v for k, v in filters.items()}, tkey, info.identity)
        self.sc, self.info, self.window, self.pipeline = sc, info, window, pipeline
        self.filters = filters
        self.tkey = tkey
        self.who = who
        self.resuming = bool(session)
        self.session = str(session or uuid.uuid4())
        self.skey = f"raystream:ws:{len(who.tenant)}:{who.tenant}:{self.session}"  # a session id never crosses tenants
        self.prefix = sc.prefixes.get(pipeline, f"raystream:{pipeline}:")
        self.pending = Pending(info.keys, sc.max_pending)
        self.wake = asyncio.Event()
        self.tenant = who.tenant
        self.core = core
        self.hub: Hub | None = None
        self.redis = None
        self.lease: Lease | None = None
        self._counted = False  # in the replica's live subscribers gauge

    def wanted(self, row: dict) -> bool:
        return (row.get("window") == self.window and row.get("pipeline", self.pipeline) == self.pipeline
                and can_see(self.who, row, self.tkey)
                and all(str(row.get(k)) == str(v) for k, v in self.filters.items() if k != self.tkey))

    def _enqueue(self, row: dict) -> None:
        self.pending.add(row)
        self.wake.set()

    async def admit(self) -> None:
        """The tenant's subscribe (and resume) token buckets, then a lease under its cap: SubscribeError 429 when over."""
        await self.core.admit(self.who, "subscribe")
        if self.resuming:
            await self.core.admit(self.who, "resume")
        self.hub = _hub(self.core, self.sc.redis_url.get_secret_value(), f"{self.prefix}updates")
        self.redis = self.hub.redis
        lease = Lease(self.redis, self.tenant, self.sc.max_streams_per_tenant, 3 * self.sc.heartbeat + 5)
        try:
            held = await lease.renew()
        except Exception as exc:  # Redis is down: no stream can start (its client resumes later)
            raise ConnectionError(f"update channel unavailable: {type(exc).__name__}") from None
        if not held:
            raise SubscribeError(429, f"this tenant has {self.sc.max_streams_per_tenant} open subscriptions already")
        self.lease = lease

    async def renew(self) -> None:
        """Keep the lease (every heartbeat); a Redis that is gone ends the stream through the hub, not here."""
        if self.lease is not None:
            try:
                await self.lease.renew()
            except Exception:  # the hub's subscription breaks too and closes the stream with its session id
                pass

    async def start(self) -> dict:
        """Subscribe and queue what a resumed session has not seen; returns the ``subscribed`` message."""
        if self.lease is None:
            await self.admit()
        await self.hub.join(self)
        if not self._counted:
            self._counted = True
            self.core.metrics.subscriber(+1)
        seen = {k.decode(): int(v) for k, v in (await self.redis.hgetall(self.skey)).items()}
        if seen or self.resuming:
            # the tenant's own index: a resume never reads another tenant's windows
            for key in await self.redis.zrange(tenant_index(self.prefix, self.window, self.tenant), 0, -1):
                h = await self.redis.hgetall(key)
                if not h:
                    continue
                row = {k.decode(): json.loads(v) for k, v in h.items()}
                row.setdefault("window", self.window)
                if self.wanted(row) and row.get("revision", 0) > seen.get(_identity(row, self.info.keys), -1):
                    self._enqueue(row)
        return {"type": "subscribed", "session": self.session, "pipeline": self.pipeline, "window": self.window,
                "replayed": len(self.pending)}

    async def listen(self) -> None:
        """Returns (raising) only when the update channel broke: the caller ends the subscription."""
        await self.hub.broken.wait()
        raise ConnectionError(f"update channel lost: {self.hub.error!r}")

    async def next(self) -> list[dict]:
        """Wait until something is queued; the messages to send now (a notice first when updates were dropped)."""
        await self.wake.wait()
        self.wake.clear()
        out: list[dict] = []
        if self.pending.dropped:
            out.append({"type": "notice", "message": f"slow consumer: {self.pending.dropped} window updates dropped; "
                        f"reconnect with session {self.session} to catch up"})
            self.pending.dropped = 0
        while len(self.pending):
            ident, row = self.pending.pop()
            out.append({"type": "update", "row": row, "_ident": ident})
        return out

    async def delivered(self, messages: list[dict]) -> None:
        """Remember the revisions the client got (batched across feeds by the hub)."""
        marks = {m["_ident"]: int(m["row"].get("revision", 0)) for m in messages if m["type"] == "update"}
        if marks:
            self.hub.mark(self.skey, marks, int(self.sc.session_ttl))

    async def close(self) -> None:
        if self._counted:
            self._counted = False
            self.core.metrics.subscriber(-1)
        if self.lease is not None:
            await self.lease.release()
        if self.hub is not None:
            self.hub.leave(self)
            pending = self.hub.marks.pop(self.skey, None)
            if pending is not None:  # a client that reconnects at once must find what it saw
                try:
                    await self.redis.hset(self.skey, mapping=pending[0])
                    await self.redis.expire(self.skey, pending[1])
                except Exception:  # Redis is gone: the session is best effort
                    pass


class Gone(Exception):
    """The client's socket is closed."""


class _StarletteSocket:
    """``/v1/stream`` behind Serve's HTTP proxy."""

    def __init__(self, ws: WebSocket, max_bytes: int = 1 << 16):
        self.ws, self.max_bytes = ws, max_bytes

    def credentials(self) -> str | None:
        token = self.ws.query_params.get("access_token")
        return self.ws.headers.get("authorization") or (f"Bearer {token}" if token else None)

    async def accept(self) -> None:
        await self.ws.accept()

    async def receive_json(self):
        try:
            message = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            raise Gone() from None
        if message["type"] == "websocket.disconnect":
            raise Gone()
        data = message.get("text") if message.get("text") is not None else message.get("bytes") or b""
        if len(data) > self.max_bytes:  # the direct port's server cuts sooner; behind Serve's proxy this is the bound
            await self.close(1009, f"message over {self.max_bytes} bytes")
            raise Gone()
        try:
            return json.loads(data)
        except ValueError:
            return None  # not JSON: ignored (a first message that is not a subscription closes with 4400)

    async def send_text(self, text: str) -> None:
        try:
            await self.ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError):
            raise Gone() from None

    async def close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code=code, reason=reason[:120])
        except RuntimeError:
            pass  # already closed


def _exp(who) -> float:
    return float(who.claims.get("exp", 0))


async def run_session(core, sock) -> None:
    """One subscriber, whatever carries its socket: auth, subscribe, replay, live updates, heartbeats, token expiry."""
    import anyio

    sc = core.cfg.stream
    # accept first, then refuse with a close code and reason a client can read (a refused handshake says only 403)
    await sock.accept()
    try:
        who = await core.authenticate(sock.credentials())
    except ApiError as exc:
        await sock.close(4401 if exc.status == 401 else 4403, str(exc))
        return
    try:
        msg = await asyncio.wait_for(sock.receive_json(), timeout=30)
        sub = msg["subscribe"]
        feed = Feed(core, who, sub["pipeline"], sub["window"], sub.get("filters") or {}, sub.get("session"))
        await feed.admit()
    except ApiError as exc:
        await sock.close(4000 + exc.status, str(exc))
        return
    except ConnectionError as exc:
        await sock.close(1011, str(exc))
        return
    except Gone:
        return
    except (asyncio.TimeoutError, KeyError, TypeError, ValueError, AttributeError):
        await sock.close(4400, "first message: {\"subscribe\": {\"pipeline\", \"window\", \"filters\"}}")
        return
    last_pong = [time.monotonic()]
    expires = [_exp(who)]
    try:
        try:
            first = await feed.start()
        except (ConnectionError, OSError) as exc:
            await sock.close(1011, f"update channel unavailable: {type(exc).__name__}")
            return
        await sock.send_text(json.dumps(first))

        async def receive():
            while True:
                msg = await sock.receive_json()
                if not isinstance(msg, dict):
                    continue
                if msg.get("type") == "pong":
                    last_pong[0] = time.monotonic()
                elif msg.get("type") == "token":  # a fresh token of the same tenant extends the session
                    try:
                        fresh = await core.authenticate(f"Bearer {msg.get('access_token')}")
                    except ApiError as exc:
                        await sock.close(4401, str(exc))
                        return
                    if fresh.tenant != who.tenant:
                        await sock.close(4403, "a session keeps its tenant")
                        return
                    expires[0] = max(expires[0], _exp(fresh))

        async def expiry():
            while True:
                left = expires[0] - time.time()
                if left <= 0:
                    await sock.close(4401, "token expired")
                    return
                await asyncio.sleep(min(left, 60.0))

        async def heartbeat():
            while True:
                await asyncio.sleep(sc.heartbeat)
                if time.monotonic() - last_pong[0] > 2 * sc.heartbeat + 1:
                    await sock.close(4408, "missed pongs")
                    return
                await sock.send_text(json.dumps({"type": "ping", "time": time.time()}))
                await feed.renew()

        async def send():
            while True:
                batch = await feed.next()
                for m in batch:
                    if m["type"] == "update":
                        row = m["row"]
                        await sock.send_text(row.get(TEXT) or json.dumps({"type": "update", "row": row}, default=str))
                    else:
                        await sock.send_text(json.dumps(m))
                await feed.delivered(batch)

        async def until_first_ends(fn, tg):
            try:
                await fn()
            except Gone:
                pass  # the client went away
            except ConnectionError:  # the update channel broke: the client reconnects with its session
                await sock.close(1011, f"update channel lost; resume with session {feed.session}")
            finally:
                tg.cancel_scope.cancel()

        # when one side ends, the others are cancelled
        async with anyio.create_task_group() as tg:
            for fn in (feed.listen, receive, expiry, heartbeat, send):
                tg.start_soon(until_first_ends, fn, tg)
    finally:
        with anyio.CancelScope(shield=True):
            await feed.close()


def add_stream_route(app: FastAPI, core) -> None:
    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        await run_session(core, _StarletteSocket(ws, core.cfg.stream.max_message_bytes))
