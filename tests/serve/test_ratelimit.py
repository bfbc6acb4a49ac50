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


def test_one_client_per_event_loop(redis_server):
    """Serve's loop and direct_port's loop alternate on one limiter: each keeps its own client (no reconnect per call)."""
    import asyncio
    import threading

    rl = RateLimiter(redis_server.extra["url"], capacity=100, per_second=1.0)
    loops = [asyncio.new_event_loop(), asyncio.new_event_loop()]
    threads = [threading.Thread(target=lp.run_forever, daemon=True) for lp in loops]
    for t in threads:
        t.start()
    try:
        seen = []
        for i in range(6):
            lp = loops[i % 2]
            assert asyncio.run_coroutine_threadsafe(rl.acheck("loops", "windows"), lp).result(10)[0]
            seen.append(id(rl._aclients[id(lp)][1]))
        assert len(rl._aclients) == 2 and len(set(seen)) == 2 and seen[0] == seen[2] == seen[4]
    finally:
        for lp in loops:
            lp.call_soon_threadsafe(lp.stop)
