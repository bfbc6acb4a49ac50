"""Per-tenant, per-endpoint token buckets in Redis, one atomic Lua script per request.

The bucket (a hash with ``tokens`` and ``ts``) refills at ``rate`` tokens/s up
to ``capacity`` using the Redis server's clock, so every replica shares one
bucket and one clock; under N concurrent requests exactly the available tokens
get through. Keys are ``<prefix><endpoint>:<tenant>`` with the tenant
length-prefixed, so no tenant string can reach another bucket.
"""

from __future__ import annotations

import math

import redis

__all__ = ["RateLimiter"]

# KEYS[1] bucket; ARGV: capacity, rate per s; returns {allowed 0/1, retry_after ms}
_BUCKET = """
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil then tokens = cap; ts = now end
tokens = math.min(cap, tokens + (now - ts) * rate / 1000)
local allowed = 0
local retry = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  retry = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(cap * 1000 / rate) + 1000)
return {allowed, retry}
"""


class RateLimiter:
    """Token buckets shared by every Serve replica."""

    def __init__(self, url: str, capacity: int, per_second: float, prefix: str = "raystream:rl:",
                 endpoints: dict[str, tuple[int, float]] | None = None):
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.script = self.client.register_script(_BUCKET)
        self.capacity, self.per_second = capacity, per_second
        self.prefix = prefix
        self.endpoints = endpoints or {}

    def key(self, endpoint: str, tenant: str) -> str:
        return f"{self.prefix}{endpoint}:{len(tenant)}:{tenant}"

    def check(self, tenant: str, endpoint: str) -> tuple[bool, float]:
        """(allowed, seconds to wait before retrying)."""
        cap, rate = self.endpoints.get(endpoint, (self.capacity, self.per_second))
        allowed, retry_ms = self.script(keys=[self.key(endpoint, tenant)], args=[cap, rate])
        return bool(allowed), math.ceil(int(retry_ms) / 1000) if not allowed else 0.0

    async def acheck(self, tenant: str, endpoint: str) -> tuple[bool, float]:
        """``check`` on an asyncio Redis client (one per event loop), for async handlers."""
        import asyncio

        import redis.asyncio as aredis

        loop = asyncio.get_running_loop()
        clients = self.__dict__.setdefault("_aclients", {})
        entry = clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            # one client per event loop (Serve's and direct_port's): an asyncio client belongs to the loop that made it
            for k in [k for k, v in clients.items() if v[0].is_closed()]:
                del clients[k]
            client = aredis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            entry = clients[id(loop)] = (loop, client.register_script(_BUCKET))
        cap, rate = self.endpoints.get(endpoint, (self.capacity, self.per_second))
        allowed, retry_ms = await entry[1](keys=[self.key(endpoint, tenant)], args=[cap, rate])
        return bool(allowed), math.ceil(int(retry_ms) / 1000) if not allowed else 0.0

    def __getstate__(self) -> dict:
        # a Serve replica opens its own connection pool
        return {k: v for k, v in self.__dict__.items() if k not in ("client", "script", "_aclients")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.client = redis.Redis.from_url(state["url"], socket_timeout=2, socket_connect_timeout=2)
        self.script = self.client.register_script(_BUCKET)
