"""Token buckets in Redis: exactly the capacity gets through a concurrent burst."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from serve.ratelimit import RateLimiter


def test_concurrent_burst_lets_exactly_capacity_through(redis_server):
    rl = RateLimiter(redis_server.extra["url"], capacity=25, per_second=0.001, prefix="rl-test:")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: rl.check("acme", "aggregates"), range(200)))
    allowed = [r for r in results if r[0]]
    assert len(allowed) == 25
    assert all(retry >= 1 for ok, retry in results if not ok)
    # buckets are per tenant and per endpoint; a tenant name cannot reach another's bucket
    assert rl.check("globex", "aggregates")[0] and rl.check("acme", "pipelines")[0]
    assert rl.key("x", "a:b") != rl.key("x:1", "b")


def test_bucket_refills(redis_server):
    import time

    rl = RateLimiter(redis_server.extra["url"], capacity=2, per_second=20, prefix="rl-refill:")
    assert rl.check("t", "e")[0] and rl.check("t", "e")[0]
    assert not rl.check("t", "e")[0]
    time.sleep(0.15)
    assert rl.check("t", "e")[0]
