"""process_batch: accounting and the far-future guard."""

from __future__ import annotations

import json

import numpy as np

from pipeline.process import Batch, PipelineState, process_batch
from tests.pipeline.harness import make_spec

SPEC = make_spec([{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["tenant_id"], "aggregations": ["count"]}],
                 ooo="0s")


def _v(ts: int, tenant: str = "a") -> bytes:
    return json.dumps({"tenant_id": tenant, "ts": ts, "value": 1.0}).encode()


def test_far_future_record_is_rejected_and_does_not_move_the_watermark():
    state = PipelineState(SPEC, [0])
    broker_ts = 1_760_000_000_000
    values = [_v(broker_ts - 500), _v(broker_ts + 86_400_000), _v(broker_ts - 100), b"nope"]
    r = process_batch(SPEC, state, Batch.of("events", values, [0] * 4, [0, 1, 2, 3], [broker_ts] * 4))
    assert r.records == 4 and r.rejected == 2
    reasons = dict(zip(r.rejects.column("offset").to_pylist(), r.rejects.column("reason").to_pylist()))
    assert reasons == {1: "timestamp_out_of_range", 3: "decode_error"}
    assert r.rejects.column("value").to_pylist() == [values[1], values[3]]
    assert state.tracker.watermark == broker_ts - 100  # the outlier did not drag it a day ahead
    assert r.late is None


def test_every_record_is_accepted_late_or_rejected():
    state = PipelineState(SPEC, [0, 1])
    rng = np.random.default_rng(1)
    total = rejected = late = 0
    for b in range(20):
        n = 200
        ts = 1_760_000_000_000 + b * 300 + rng.integers(-3000, 300, n)
        values = [_v(int(t), f"t{i % 3}") if i % 37 else b"{bad" for i, t in enumerate(ts)]
        r = process_batch(SPEC, state, Batch.of("events", values, rng.integers(0, 2, n), np.arange(b * n, b * n + n)))
        total, rejected, late = total + r.records, rejected + r.rejected, late + r.late_records
        assert r.rejected == (0 if r.rejects is None else r.rejects.num_rows)
        assert r.late_records == (0 if r.late is None else r.late.num_rows)  # tumbling: one window per record
    assert total == 4000 and rejected == sum(1 for i in range(200) if i % 37 == 0) * 20 and late > 0
