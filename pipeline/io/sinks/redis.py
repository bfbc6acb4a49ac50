"""Redis sink: one hash per window and group, plus a pub/sub message per update.

Keys are ``<prefix><window>:<identity JSON>`` (the identity is JSON-encoded, so
a key value can never reach into another key); each hash holds the row's
columns as JSON values and expires after the window's ``retention``, else ``ttl``. A sorted set
``<prefix><window>:index`` scores every key by its window start for range
reads, and ``<prefix><window>:tenant:<len>:<tenant>`` does the same for the
keys of one tenant (``tenant_key``, when the window is grouped by it).
One Lua script per row writes only when the stored revision is lower
(a replay or an older revision never overwrites a newer one) and then
publishes the row as JSON on ``channel`` — so subscribers see each revision
once per write that changed something.
"""

from __future__ import annotations

import json

import pyarrow as pa
import redis

from pipeline.io.sinks.common import SinkContext, identity_columns, identity_key, row_dicts
from pipeline.spec import PipelineSpec, RedisSink as RedisSinkSpec

__all__ = ["RedisSink"]

# KEYS[1] hash, KEYS[2] index, KEYS[3] the tenant's index (optional); ARGV: revision, ttl ms, channel, message, score,
# field/value pairs...
_UPSERT = """
local cur = redis.call('HGET', KEYS[1], 'revision')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[5], KEYS[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if KEYS[3] then
  redis.call('ZADD', KEYS[3], ARGV[5], KEYS[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""


class RedisSink:
    """Writes closed windows as Redis hashes and publishes each update."""

    def __init__(self, ctx: "SinkContext | PipelineSpec", cfg: RedisSinkSpec):
        self.ctx = ctx = SinkContext.of(ctx)
        self.cfg = cfg
        self.name = "redis"
        self.prefix = cfg.prefix or f"raystream:{ctx.pipeline}:"
        self.channel = cfg.channel or f"{self.prefix}updates"
        self.client = redis.Redis.from_url(cfg.url.get_secret_value(), socket_timeout=10, socket_connect_timeout=5)
        self.script = self.client.register_script(_UPSERT)
        self.updated = 0

    def key(self, window: str, row: dict) -> str:
        return f"{self.prefix}{window}:{identity_key(self.ctx.pipeline, row, identity_columns(self.ctx, window))}"

    def write(self, table: pa.Table) -> int:
        if table is None or table.num_rows == 0:
            return 0
        window = table.column("window")[0].as_py()
        index = f"{self.prefix}{window}:index"
        by_tenant = self.cfg.tenant_key is not None and self.cfg.tenant_key in identity_columns(self.ctx, window)
        pipe = self.client.pipeline(transaction=False)
        for row in row_dicts(table):
            key = self.key(window, row)
            fields = []
            for k, v in row.items():
                fields += [k, json.dumps(v)]
            message = json.dumps({"pipeline": self.ctx.pipeline, "key": key, **row}, separators=(",", ":"))
            keys = [key, index]
            tenant = row.get(self.cfg.tenant_key) if by_tenant else None
            if isinstance(tenant, str):
                keys.append(f"{self.prefix}{window}:tenant:{len(tenant)}:{tenant}")
            ttl = self.ctx.windows[window].retention or self.cfg.ttl  # a window's retention (a rollup level's) wins
            self.script(keys=keys, args=[row["revision"], ttl, self.channel, message, row["window_start"], *fields],
                        client=pipe)
        self.updated += sum(int(r) for r in pipe.execute())
        return 1

    def reset(self) -> None:
        self.client.connection_pool.disconnect()

    def close(self) -> None:
        self.client.close()

    def read(self, window: str) -> list[dict]:
        """Every stored row of ``window`` (decoded from its hash)."""
        keys = self.client.zrange(f"{self.prefix}{window}:index", 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.hgetall(k)
        return [{k.decode(): json.loads(v) for k, v in h.items()} for h in pipe.execute() if h]
