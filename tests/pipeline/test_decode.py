"""JSON decoding: every bad value answered with a reason, the rest of the batch kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.decode import JsonDecoder
from tests.pipeline.harness import make_spec

SPEC = make_spec([{"name": "w", "type": "tumbling", "size": "10s", "group_by": ["tenant_id"],
                   "aggregations": ["count", "sum(value)"]}], time_format="auto")


def _good(i: int) -> bytes:
    return json.dumps({"tenant_id": f"t{i % 3}", "ts": 1_760_000_000_000 + i, "value": i * 1.5, "extra": {"x": [1]}}).encode()


@pytest.mark.parametrize(
    "value,reason",
    [
        (b'{"tenant_id": "a", "ts": 1760000000000, "value": 1', "decode_error"),  # truncated
        (b'{"tenant_id": "a", "ts": 1760000000000, "value": 1} trailing', "decode_error"),
        (b"", "decode_error"),
        (None, "decode_error"),  # tombstone
        (b"   ", "decode_error"),
        (b"\xff\xfe{}", "decode_error"),  # invalid UTF-8
        (b"[1, 2, 3]", "decode_error"),  # top-level array
        (b'{"tenant_id": "a", "ts": 1760000000000, "value": "12"}', "type_mismatch:value"),
        (b'{"tenant_id": 5, "ts": 1760000000000, "value": 1}', "type_mismatch:tenant_id"),
        (b'{"tenant_id": "a", "ts": 1760000000000, "value": NaN}', "non_finite"),
        (b'{"tenant_id": "a", "ts": 1760000000000, "value": 1e400}', "non_finite"),
        (b'{"tenant_id": "a", "value": 1}', "missing_field:ts"),
        (b'{"tenant_id": "a", "ts": "2025-01-01T00:00:00Z", "value": 1}', "type_mismatch:ts"),
    ],
)
def test_bad_value_is_rejected_alone(value, reason):
    values = [_good(i) for i in range(50)]
    values.insert(17, value)
    d = JsonDecoder(SPEC).decode(values)
    assert [(i, r) for i, r, _ in d.rejects] == [(17, reason)]
    assert d.table.num_rows == 50 and 17 not in d.rows.tolist()
    assert d.table.column("value").to_pylist() == [i * 1.5 for i in range(50)]


def test_pretty_printed_json_with_newlines_is_accepted():
    values = [_good(0), b'{\n  "tenant_id": "z",\n  "ts": 1760000000000,\n  "value": 2\n}', _good(1)]
    d = JsonDecoder(SPEC).decode(values)
    assert not d.rejects and d.table.column("tenant_id").to_pylist() == ["t0", "z", "t1"]


def test_event_time_units_and_iso_strings():
    dec = JsonDecoder(SPEC)
    d = dec.decode([b'{"ts": 1760000000.25}', b'{"ts": 1760000000250}'])
    assert d.times.tolist() == [1_760_000_000_250, 1_760_000_000_250]
    iso = JsonDecoder(SPEC).decode([b'{"ts": "2025-01-01T00:00:01.5+01:00"}'])
    assert iso.times.tolist() == [1_735_686_001_500]


def test_many_bad_records_cost_bounded_work():
    values = [_good(i) if i % 10 else b"{broken" for i in range(20_000)]
    d = JsonDecoder(SPEC).decode(values)
    assert len(d.rejects) == 2000 and d.table.num_rows == 18_000
    assert np.array_equal(d.rows, np.array([i for i in range(20_000) if i % 10]))
