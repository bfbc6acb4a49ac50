"""Synthetic click events (~120-byte JSON) for the demo, the benchmarks and the tests."""

from __future__ import annotations

import json

import numpy as np

__all__ = ["EVENT_TYPES", "events"]

EVENT_TYPES = ["click", "view", "scroll", "hover", "purchase", "signup", "share", "search"]


def events(
    n: int,
    start_ms: int,
    rate_per_s: float,
    tenants: int = 100,
    max_disorder_ms: int = 2000,
    late_fraction: float = 0.0,
    late_by_ms: int = 30_000,
    seed: int = 0,
    id_offset: int = 0,
) -> tuple[list[bytes], list[bytes], dict[str, np.ndarray]]:
    """``n`` events: (JSON values, tenant keys, the raw columns for reference checks).

    Event times advance at ``rate_per_s`` from ``start_ms``, each pushed back by up
    to ``max_disorder_ms``; a ``late_fraction`` of them is pushed back by
    ``late_by_ms`` more.
    """
    rng = np.random.default_rng(seed)
    base = start_ms + (np.arange(n) * (1000.0 / rate_per_s)).astype(np.int64)
    ts = base - rng.integers(0, max_disorder_ms + 1, n)
    if late_fraction > 0:
        late = rng.random(n) < late_fraction
        ts = np.where(late, ts - late_by_ms, ts)
    tenant = rng.integers(0, tenants, n)
    etype = rng.integers(0, len(EVENT_TYPES), n)
    value = np.round(rng.gamma(2.0, 20.0, n), 3)
    user = rng.integers(0, 100_000, n)
    values, keys = [], []
    # building JSON text is per record by nature; this is the producer, not the hot path
    for i in range(n):
        t = f"tenant-{tenant[i]:03d}"
        values.append(
            json.dumps(
                {
                    "event_id": f"e{id_offset + i:012d}",
                    "tenant_id": t,
                    "event_type": EVENT_TYPES[etype[i]],
                    "ts": int(ts[i]),
                    "value": float(value[i]),
                    "user_id": f"u{user[i]:06d}",
                },
                separators=(",", ":"),
            ).encode()
        )
        keys.append(t.encode())
    cols = {
        "tenant_id": np.array([f"tenant-{x:03d}" for x in tenant], dtype=object),
        "event_type": np.array([EVENT_TYPES[x] for x in etype], dtype=object),
        "ts": ts,
        "value": value,
    }
    return values, keys, cols
