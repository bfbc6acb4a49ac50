"""Helpers for notebooks and tutorials: a broker to play with and a topic of synthetic events."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from pipeline.io.kafka import ensure_topic, produce_all
from pipeline.synthetic import events

__all__ = ["local_broker", "produce_events"]


def local_broker():
    """``(bootstrap, broker)``: ``$KAFKA_BOOTSTRAP`` (broker None), or a throwaway embedded broker started now
    (call ``broker.stop()`` when done)."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        return os.environ["KAFKA_BOOTSTRAP"], None
    from pipeline.io.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    return broker.bootstrap, broker


def produce_events(bootstrap: str, topic: str, n: int, partitions: int = 4, start_ms: int = 1_760_000_000_000,
                   **options) -> pd.DataFrame:
    """Create ``topic`` and produce ``n`` synthetic click events to it (``pipeline.synthetic.events`` options:
    rate_per_s, tenants, max_disorder_ms, late_fraction, late_by_ms, seed), each tenant on one partition.
    Returns the raw events with their ``partition`` and ``offset``, for checking results."""
    options.setdefault("rate_per_s", 500)
    values, keys, cols = events(n, start_ms, **options)
    raw = pd.DataFrame(cols)
    raw["partition"] = [int(t.rsplit("-", 1)[1]) % partitions for t in raw["tenant_id"]]
    raw["offset"] = raw.groupby("partition").cumcount().astype(np.int64)
    ensure_topic(bootstrap, topic, partitions)
    produce_all(bootstrap, topic, values, keys, raw["partition"].tolist())
    return raw
