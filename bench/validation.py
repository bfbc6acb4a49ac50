"""Validation benchmark: records/s of the JSON Schema check on one core.

The benchmark events (``pipeline.synthetic``, ~128-byte JSON) are decoded into
Arrow batches of 100,000; the benchmark schema (required fields, patterns on
ids, an enum, a numeric range, ``additionalProperties: false``) is checked by
``pipeline.validate.Validator`` (vectorized), and for comparison by
fastjsonschema record by record. 1 % of the records are made invalid. Runs in
one process, one thread (numpy/Arrow threads pinned to 1).

Usage: ``python bench/validation.py [--events 1000000]``; writes
``bench/results/validation.json`` and ``validation.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402

pa.set_cpu_count(1)
pa.set_io_thread_count(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.process import PipelineState  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402
from pipeline.synthetic import EVENT_TYPES, events  # noqa: E402
from pipeline.validate import Validator  # noqa: E402

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["event_id", "tenant_id", "event_type", "ts", "value", "user_id"],
    "properties": {
        "event_id": {"type": "string", "pattern": "^e[0-9]{12}$"},
        "tenant_id": {"type": "string", "pattern": "^tenant-[0-9]{3}$"},
        "event_type": {"type": "string", "enum": list(EVENT_TYPES)},
        "ts": {"type": "integer", "minimum": 0},
        "value": {"type": "number", "minimum": 0, "maximum": 1_000_000},
        "user_id": {"type": "string", "minLength": 7, "maxLength": 7},
    },
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    values, _, _ = events(args.events, 1_765_000_000_000, rate_per_s=10_000, seed=2)
    for i in range(0, len(values), 100):  # 1 % invalid: a negative value
        values[i] = values[i].replace(b'"value":', b'"value":-')
    spec = parse_spec({"name": "vbench", "source": {"kafka": {"bootstrap_servers": "x:1", "topic": "t"}},
                       "event_time": {"format": "epoch_ms"},
                       "windows": [{"name": "w", "type": "tumbling", "size": "10s", "aggregations": ["count"]}],
                       "sinks": [{"parquet": {"uri": "file:///tmp/unused"}}]})
    v = Validator(SCHEMA, "bench")
    assert not v.fallback, "the benchmark schema is meant to be fully vectorized"
    state = PipelineState(spec, [0], schema_fields=v.decoder_fields(), keep_unexpected=True)
    batch = 100_000
    decoded = []
    t0 = time.perf_counter()
    for a in range(0, len(values), batch):
        d = state.decoder.decode(values[a:a + batch])
        decoded.append((d.table, values[a:a + batch]))
    decode_s = time.perf_counter() - t0
    best = float("inf")
    invalid = 0
    for _ in range(3):
        t0 = time.perf_counter()
        invalid = 0
        for table, raw in decoded:
            extra = [c for c in table.column_names if c not in state.decoder.schema_names]
            invalid += len(v.validate(table, raw, extra))
        best = min(best, time.perf_counter() - t0)
    import fastjsonschema

    check = fastjsonschema.compile(SCHEMA)
    sample = values[:100_000]
    t0 = time.perf_counter()
    for raw in sample:
        try:
            check(json.loads(raw))
        except fastjsonschema.JsonSchemaValueException:
            pass  # a rejection is a verdict too: only the time per record is measured here
    per_record_rate = len(sample) / (time.perf_counter() - t0)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread, Python {platform.python_version()}",
        "events": len(values), "batch": batch, "invalid_found": invalid, "invalid_made": len(range(0, len(values), 100)),
        "validate_records_per_s": len(values) / best,
        "decode_records_per_s": len(values) / decode_s,
        "decode_plus_validate_records_per_s": len(values) / (decode_s + best),
        "fastjsonschema_per_record_records_per_s": per_record_rate,
    }
    assert invalid == result["invalid_made"]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["vectorized validate", "decode (JSON→Arrow)", "decode + validate", "fastjsonschema per record"]
    vals = [result["validate_records_per_s"], result["decode_records_per_s"], result["decode_plus_validate_records_per_s"],
            result["fastjsonschema_per_record_records_per_s"]]
    ax.barh(labels, [x / 1e6 for x in vals])
    ax.axvline(0.5, color="tab:red", ls="--", label="target 0.5 M/s")
    ax.set_xlabel("million records/s, one core")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "validation.png", dpi=120)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
