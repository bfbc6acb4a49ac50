"""Validation on the pure core: a bad-input matrix where each record's fate and
reason is asserted, vectorized rules equal fastjsonschema's verdict, and the
counts add up."""

from __future__ import annotations

import json

import fastjsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.process import Batch, PipelineState, process_batch
from pipeline.validate import Validator
from tests.pipeline.harness import make_spec

SCHEMA = {
    "type": "object",
    "properties": {
        "event_id": {"type": "string", "pattern": "^e[0-9]+$"},
        "tenant_id": {"type": "string", "minLength": 3, "maxLength": 12},
        "kind": {"type": "string", "enum": ["click", "view"]},
        "ts": {"type": "integer"},
        "value": {"type": "number", "minimum": 0, "maximum": 1000},
        "qty": {"type": "integer", "multipleOf": 2},
        "at": {"type": "string", "format": "date-time"},
    },
    "required": ["event_id", "tenant_id", "ts", "value"],
    "additionalProperties": False,
}
WINDOW = [{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["tenant_id"], "aggregations": ["count", "sum(value)"]}]
T0 = 1_700_000_000_000


class FileSource:
    """What ``pipeline.io.validation.SchemaSource`` gives the core, without a registry."""

    def __init__(self, schema, versions=None):
        self.v = (Validator(schema, "events v1"), "events/1")
        self.versions = versions or {}

    def default(self):
        return self.v

    def get(self, version):
        if version not in self.versions:
            raise LookupError(f"subject 'events' has no version {version}")
        return (Validator(self.versions[version], f"events v{version}"), f"events/{version}")


def _ok(**over):
    rec = {"event_id": "e1", "tenant_id": "acme", "kind": "click", "ts": T0 + 10, "value": 5.5, "qty": 2,
           "at": "2026-01-01T00:00:00Z"}
    rec.update(over)
    return rec


def _enc(rec) -> bytes:
    return json.dumps(rec).encode()


MATRIX = [
    ("valid", _enc(_ok()), None),
    ("valid, optional fields absent", _enc({k: v for k, v in _ok().items() if k not in ("kind", "qty", "at")}), None),
    ("malformed JSON", b'{"event_id": "e1", ', "decode_error"),
    ("not an object", b"[1, 2]", "decode_error"),
    ("empty message", b"", "decode_error"),
    ("invalid UTF-8", b'{"event_id": "e\xff\xfe", "tenant_id": "acme", "ts": 1700000000010, "value": 1}', "decode_error"),
    ("wrong type", _enc(_ok(value="five")), "type_mismatch:value"),
    ("integer field with a fraction", _enc(_ok(qty=2.5)), "type_mismatch:qty"),
    ("missing required", _enc({k: v for k, v in _ok().items() if k != "tenant_id"}), "schema_violation:required"),
    ("explicit null", _enc(_ok(kind=None)), "schema_violation:type"),
    ("extra field", _enc(_ok(debug=True)), "schema_violation:additionalProperties"),
    ("enum", _enc(_ok(kind="purchase")), "schema_violation:enum"),
    ("minimum", _enc(_ok(value=-1)), "schema_violation:minimum"),
    ("maximum", _enc(_ok(value=1e6)), "schema_violation:maximum"),
    ("multipleOf", _enc(_ok(qty=3)), "schema_violation:multipleOf"),
    ("minLength", _enc(_ok(tenant_id="ab")), "schema_violation:minLength"),
    ("maxLength", _enc(_ok(tenant_id="a-very-long-tenant")), "schema_violation:maxLength"),
    ("pattern", _enc(_ok(event_id="x1")), "schema_violation:pattern"),
    ("format", _enc(_ok(at="yesterday")), "schema_violation:format"),
    ("NaN", b'{"event_id": "e1", "tenant_id": "acme", "ts": 1700000000010, "value": NaN}', "non_finite"),
    ("infinity", b'{"event_id": "e1", "tenant_id": "acme", "ts": 1700000000010, "value": 1e999}', "non_finite"),
    ("exotic unicode (valid)", _enc(_ok(tenant_id="𝔞𝔠𝔪𝔢-🦄")), None),
    ("event time far in the future", _enc(_ok(ts=T0 + 10 * 86_400_000)), "timestamp_out_of_range"),
    ("event time far in the past", _enc(_ok(ts=T0 - 30 * 86_400_000)), "late"),
    ("oversized", _enc(_ok(pad="x" * 5000)), "oversized"),
    ("missing event time", _enc({k: v for k, v in _ok().items() if k != "ts"}), "missing_field:ts"),
]


def _run(values, versions=None, source=None, spec=None):
    spec = spec or make_spec(WINDOW, source={"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "events",
                                                        "max_message_bytes": 4096}})
    src = source or FileSource(SCHEMA)
    v = src.default()[0]
    state = PipelineState(spec, [0], schema_fields=v.decoder_fields(), keep_unexpected=v.closed)
    n = len(values)
    batch = Batch.of("events", values, [0] * n, range(n), timestamps=[T0] * n)
    if versions is not None:
        batch.schema_versions = np.asarray(versions, np.int64)
    return process_batch(spec, state, batch, validate=src)


def test_bad_input_matrix_every_record_accounted_for():
    values = [v for _, v, _ in MATRIX]
    r = _run(values)
    got = {}
    if r.late is not None:
        for off in r.late["offset"].to_pylist():
            got[off] = ("late", "window closed", None)
    if r.rejects is not None:
        for off, reason, detail, schema in zip(r.rejects["offset"].to_pylist(), r.rejects["reason"].to_pylist(),
                                               r.rejects["detail"].to_pylist(), r.rejects["schema"].to_pylist()):
            assert off not in got, f"record {off} rejected twice"
            got[off] = (reason, detail, schema)
    for i, (name, _, want) in enumerate(MATRIX):
        if want is None:
            assert i not in got, f"{name}: rejected as {got.get(i)}"
        else:
            assert i in got and got[i][0] == want, f"{name}: got {got.get(i)}, want {want}"
            assert got[i][1], f"{name}: no detail"
            if want.startswith("schema_violation"):
                assert got[i][2] == "events/1" and "field" in got[i][1] or "required" in got[i][1]
    accepted = sum(1 for _, _, w in MATRIX if w is None)
    late = sum(1 for _, _, w in MATRIX if w == "late")
    # input = valid + dead-lettered + late
    assert r.records == len(MATRIX) and r.rejected == len(MATRIX) - accepted - late and r.late_records == late
    assert int(sum(t["count"].to_numpy().sum() for t in r.closed)) in (0, accepted)


def test_header_versions_and_unknown_version():
    v2 = {**SCHEMA, "properties": {**SCHEMA["properties"], "value": {"type": "number", "minimum": 100}}}
    src = FileSource(SCHEMA, versions={2: v2})
    values = [_enc(_ok(value=5)), _enc(_ok(value=5)), _enc(_ok(value=500)), _enc(_ok()), _enc(_ok())]
    r = _run(values, versions=[-1, 2, 2, 7, -2], source=src)
    rej = dict(zip(r.rejects["offset"].to_pylist(), zip(r.rejects["reason"].to_pylist(), r.rejects["schema"].to_pylist())))
    assert rej == {1: ("schema_violation:minimum", "events/2"), 3: ("unknown_schema_version", None),
                   4: ("unknown_schema_version", None)}


def test_fallback_rules_run_per_record():
    schema = {"type": "object", "properties": {"tenant_id": {"type": "string"}, "ts": {"type": "integer"},
                                                "value": {"type": "number"},
                                                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
              "required": ["tenant_id", "ts", "value"]}
    v = Validator(schema)
    assert v.fallback
    values = [_enc({"tenant_id": "acme", "ts": T0, "value": 1, "tags": ["a"]}),
              _enc({"tenant_id": "acme", "ts": T0, "value": 1, "tags": ["a", "b", "c"]}),
              _enc({"tenant_id": "acme", "ts": T0, "value": 1, "tags": [1]})]
    r = _run(values, source=FileSource(schema))
    assert r.rejects["offset"].to_pylist() == [1, 2]
    assert all(x.startswith("schema_violation:") for x in r.rejects["reason"].to_pylist())


_value = st.one_of(st.none(), st.integers(-5, 2000), st.floats(-5, 2000, allow_nan=False), st.text(max_size=14),
                   st.sampled_from(["click", "view", "e12", "2026-01-01T00:00:00Z", "acme"]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({}, optional={k: _value for k in ("event_id", "tenant_id", "kind", "value", "qty", "at", "x")}),
                min_size=1, max_size=30))
def test_vectorized_verdict_equals_fastjsonschema(records):
    # only type-correct records reach the validator, so compare on those: the decoder answers the rest
    full = fastjsonschema.compile(SCHEMA)
    values, expect = [], []
    for rec in records:
        rec = {**rec, "ts": T0}
        values.append(_enc(rec))
        try:
            full(rec)
            expect.append(True)
        except fastjsonschema.JsonSchemaValueException:
            expect.append(False)
    r = _run(values)
    rejected = set(r.rejects["offset"].to_pylist()) if r.rejects is not None else set()
    for i, ok in enumerate(expect):
        assert (i not in rejected) == ok, f"record {values[i]!r}: fastjsonschema says {'valid' if ok else 'invalid'}"


def test_a_raising_user_function_dead_letters_only_its_windows_records():
    from tests.pipeline.harness import run_core
    import pandas as pd

    df = pd.DataFrame({"tenant_id": ["a", "a", "b", "b", "a", "b"], "ts": [T0, T0 + 10, T0 + 20, T0 + 30, T0 + 2000, T0 + 2001],
                       "value": [1.0, 13.0, 2.0, 3.0, 4.0, 5.0], "partition": [0] * 6, "offset": range(6)})
    spec = make_spec([{"name": "w", "type": "tumbling", "size": "1s", "group_by": ["tenant_id"],
                       "aggregations": ["count", "tests.pipeline.udfs:fragile(value) as total"]}])
    emitted, _, results, _ = run_core(spec, df, cuts=[3])
    rows = {(r["tenant_id"], r["window_start"].timestamp() * 1000 - T0): r for r in pa_rows(emitted["w"])}
    assert rows[("a", 0)]["total"] is None and rows[("a", 0)]["count"] == 2  # the window is still emitted, counted
    assert rows[("b", 0)]["total"] == 5.0 and rows[("a", 2000)]["total"] == 4.0
    failed = [r.udf_failures for r in results if r.udf_failures is not None]
    assert len(failed) == 1
    f = failed[0]
    assert f["offset"].to_pylist() == [0, 1] and set(f["reason"].to_pylist()) == {"udf_error:tests.pipeline.udfs:fragile"}
    assert "ValueError: unlucky window" in f["detail"][0].as_py() and "Traceback" in f["detail"][0].as_py()
    assert sum(r.rejected for r in results) == 0  # the records are in their window and in the dead-letter topic


def pa_rows(tables):
    import pyarrow as pa

    return pa.concat_tables(tables).to_pylist()


def test_duplicate_event_ids_are_dead_lettered_across_batches_and_checkpoints():
    from pipeline.checkpoint import decode_partition, encode_partition, restore_partition

    spec = make_spec(WINDOW, dedup={"field": "event_id", "horizon": "1h"})
    recs = [_ok(event_id=f"e{i % 7}", ts=T0 + i) for i in range(10)]  # e0..e2 come twice
    values = [_enc(r) for r in recs]
    state = PipelineState(spec, [0, 1])
    r1 = process_batch(spec, state, Batch.of("events", values[:5], [0] * 5, range(5), timestamps=[T0] * 5))
    # the state moves through a checkpoint between the batches
    moved = PipelineState(spec, [])
    restore_partition(moved, decode_partition(encode_partition(state, 0, 5, 1, 1)))
    r2 = process_batch(spec, moved, Batch.of("events", values[5:], [0] * 5, range(5, 10), timestamps=[T0] * 5))
    assert r1.rejects is None
    assert r2.rejects["offset"].to_pylist() == [7, 8, 9] and set(r2.rejects["reason"].to_pylist()) == {"duplicate"}
    assert "first delivered at offset 0" in r2.rejects["detail"][0].as_py()
    # the same id on another partition is not a duplicate (ids are per partition)
    r3 = process_batch(spec, moved, Batch.of("events", [values[0]], [1], [0], timestamps=[T0]))
    assert r3.rejects is None


def test_a_rejected_record_resent_or_replayed_counts_once():
    """Rejected records leave no id behind: the corrected resend is accepted, a second resend is a duplicate."""
    spec = make_spec(WINDOW, dedup={"field": "event_id", "horizon": "1h"})
    state = PipelineState(spec, [0])
    future = _enc(_ok(event_id="x", ts=T0 + 86_400_000))  # a day past its broker timestamp: rejected
    r1 = process_batch(spec, state, Batch.of("events", [future], [0], [0], timestamps=[T0]))
    assert r1.rejects["reason"].to_pylist() == ["timestamp_out_of_range"]
    assert "x" not in state.seen.get(0, {})
    fixed = _enc(_ok(event_id="x", ts=T0))
    r2 = process_batch(spec, state, Batch.of("events", [fixed, fixed], [0, 0], [1, 2], timestamps=[T0, T0]))
    assert r2.rejects["offset"].to_pylist() == [2] and r2.rejects["reason"].to_pylist() == ["duplicate"]
    assert "first delivered at offset 1" in r2.rejects["detail"][0].as_py()


def test_dedup_memory_is_bounded_by_the_horizon_and_the_verdicts_do_not_depend_on_batches():
    spec = make_spec(WINDOW, dedup={"field": "event_id", "horizon": "10s"})
    n = 6000  # one id per 10 ms for 60 s of event time: 6 horizons; every 5th id comes again 3 s later
    recs = []
    for i in range(n):
        recs.append(_ok(event_id=f"e{i}", ts=T0 + i * 10))
        if i % 5 == 0 and i >= 300:
            recs.append(_ok(event_id=f"e{i - 300}", ts=T0 + i * 10))  # 3 s after its first delivery: within 10 s
    values = [_enc(r) for r in recs]
    verdicts = []
    for cut in (37, 500, len(values)):
        state = PipelineState(spec, [0])
        dups, sizes = [], []
        for a in range(0, len(values), cut):
            chunk = values[a:a + cut]
            r = process_batch(spec, state, Batch.of("events", chunk, [0] * len(chunk), range(a, a + len(chunk)),
                                                    timestamps=[T0 + 10**7] * len(chunk)))
            if r.rejects is not None:
                dups += r.rejects["offset"].to_pylist()
            sizes.append(len(state.seen[0]))
        verdicts.append(dups)
        if cut == 37:  # pruned every 32 batches: never more than ~horizon + 32 batches of ids
            assert max(sizes) < 1000 + 32 * 37 + 300, max(sizes)
    assert verdicts[0] == verdicts[1] == verdicts[2]
    assert len(verdicts[0]) == sum(1 for i in range(300, n) if i % 5 == 0)
