"""JSON record values -> Arrow table, with every undecodable record answered.

The fast path joins the values with newlines and hands them to
``pyarrow.json.read_json`` with an explicit schema (fields the spec does not
use are skipped while parsing). When that fails, blocks of records are parsed
separately and failing blocks are bisected down to single records, so one bad
record costs O(log n) parses and never the batch.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from pipeline.spec import PipelineSpec

__all__ = ["Decoded", "JsonDecoder", "enriched_types", "input_schema"]

FIELD_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
_TYPES = FIELD_TYPES
_BLOCK = 1024


def input_schema(spec: PipelineSpec) -> dict[str, pa.DataType]:
    """Fields the pipeline reads, with their Arrow types (event time excluded)."""
    out: dict[str, pa.DataType] = {}
    for w in spec.windows:
        for k in w.group_by:
            out[k] = _TYPES[spec.fields.get(k, "string")]
    for w in spec.windows:
        for a in w.aggregations:
            if a.field and a.field not in out:
                out[a.field] = _TYPES[spec.fields.get(a.field, "float64")]
    for name, kind in spec.fields.items():
        out.setdefault(name, _TYPES[kind])
    for e in spec.enrich:
        for k in e.key:
            out.setdefault(k, _TYPES[spec.fields.get(k, "string")])
    if spec.dedup is not None:
        out.setdefault(spec.dedup.field, _TYPES[spec.fields.get(spec.dedup.field, "string")])
    tenant = spec.observability.tenant_field
    if tenant is not None:
        out.setdefault(tenant, _TYPES[spec.fields.get(tenant, "string")])
    for e in spec.enrich:
        for f, kind in e.fields.items():
            out.pop(f, None)
    out.pop(spec.event_time.field, None)
    return out


def enriched_types(spec: PipelineSpec) -> dict[str, pa.DataType]:
    """Types of the fields the enrichers add."""
    return {f: _TYPES[kind] for e in spec.enrich for f, kind in e.fields.items()}


@dataclass
class Decoded:
    """Result of decoding one batch of values.

    ``table`` holds the decoded rows of the records at ``rows`` (indices into the
    input); ``times`` their event times (ms). ``rejects`` lists ``(index, reason,
    detail)`` for every record that could not be used.
    """

    table: pa.Table
    rows: np.ndarray
    times: np.ndarray
    rejects: list[tuple[int, str, str]] = field(default_factory=list)


class JsonDecoder:
    """Decodes JSON object values into the pipeline's input schema."""

    def __init__(self, spec: PipelineSpec, schema_fields: dict[str, str] | None = None, keep_unexpected: bool = False):
        self.time_field = spec.event_time.field
        self.time_format = spec.event_time.format
        self.fields = input_schema(spec)
        # fields a validation schema checks are read too (the spec's own types win)
        for name, kind in (schema_fields or {}).items():
            if name != self.time_field:
                self.fields.setdefault(name, _TYPES[kind])
        self.keep_unexpected = keep_unexpected
        self.schema_names = {self.time_field, *self.fields}
        self.proto_class = None  # format: protobuf: values are parsed as this message first
        self._schema: pa.Schema | None = None
        if self.time_format != "auto":
            self._schema = self._make_schema(self.time_format)

    def _from_protobuf(self, values: list) -> tuple[list, list[tuple[int, str, str]]]:
        """Protobuf values -> JSON object values; unparseable ones become rejects (kept as None)."""
        from google.protobuf.json_format import MessageToDict

        fields = self.proto_class.DESCRIPTOR.fields
        out, rejects = [], []
        for i, v in enumerate(values):
            msg = self.proto_class()
            try:
                if v is None:
                    raise ValueError("empty value (tombstone)")
                msg.ParseFromString(v)
            except Exception as exc:  # google.protobuf.message.DecodeError and friends
                rejects.append((i, "decode_error", f"not a {self.proto_class.DESCRIPTOR.full_name}: {exc}"))
                out.append(None)
                continue
            obj = {}
            for f in fields:
                val = getattr(msg, f.name)
                if f.message_type is not None:
                    val = MessageToDict(val, preserving_proto_field_name=True) if not f.is_repeated else \
                        [MessageToDict(x, preserving_proto_field_name=True) for x in val]
                elif f.is_repeated:
                    val = list(val)
                elif isinstance(val, bytes):
                    val = val.decode("latin-1")
                obj[f.name] = val
            out.append(json.dumps(obj).encode())
        return out, rejects

    def _make_schema(self, fmt: str) -> pa.Schema:
        self.time_format = fmt
        ttype = pa.timestamp("ms", tz="UTC") if fmt == "iso8601" else pa.float64()
        return pa.schema([(self.time_field, ttype), *self.fields.items()])

    def _detect(self, values: list) -> None:
        """auto format: the first record carrying the time field decides number vs string."""
        for v in values[:1000]:
            try:
                obj = json.loads(v)
            except Exception:  # undecodable records are answered later, in decode
                continue
            if isinstance(obj, dict) and self.time_field in obj:
                ts = obj[self.time_field]
                self._schema = self._make_schema("iso8601" if isinstance(ts, str) else "auto")
                return

    def _read(self, data: bytes, n: int) -> pa.Table:
        opts = pj.ParseOptions(explicit_schema=self._schema,
                               unexpected_field_behavior="infer" if self.keep_unexpected else "ignore")
        block = max(1 << 20, min(len(data) // 4 + 1, 1 << 26))
        try:
            t = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=block), parse_options=opts)
        except pa.ArrowInvalid as exc:
            if "straddling" not in str(exc) and "block" not in str(exc).lower():
                raise
            t = pj.read_json(
                io.BytesIO(data), read_options=pj.ReadOptions(block_size=len(data) + 1), parse_options=opts
            )
        if t.num_rows != n:
            raise pa.ArrowInvalid(f"expected {n} JSON objects, found {t.num_rows}")
        if self.keep_unexpected:
            # fields outside the schema only matter as present or not (additionalProperties:
            # false); a boolean keeps blocks whose values differ in type concatenable
            for i, name in enumerate(t.column_names):
                if name not in self.schema_names:
                    t = t.set_column(i, name, pc.is_valid(t.column(i)))
        return t

    def decode(self, values: list) -> Decoded:
        """Decode a list of record values (bytes or None)."""
        if self.proto_class is not None:
            values, proto_rejects = self._from_protobuf(values)
            if proto_rejects:
                keep = [i for i, v in enumerate(values) if v is not None]
                inner = self._decode_json([values[i] for i in keep])
                idx = np.array(keep, np.int64)
                inner.rows = idx[inner.rows] if len(idx) else inner.rows
                inner.rejects = sorted(proto_rejects + [(int(idx[i]), r, d) for i, r, d in inner.rejects])
                return inner
        return self._decode_json(values)

    def _decode_json(self, values: list) -> Decoded:
        if self._schema is None:
            self._detect(values)
            if self._schema is None:
                self._schema = self._make_schema("auto")
        n = len(values)
        rejects: list[tuple[int, str, str]] = []
        table = None
        rows = np.arange(n)
        try:
            data = b"\n".join(values)
            if data.count(b"\n") == n - 1 and n:
                data.decode("utf-8")  # pyarrow.json passes invalid UTF-8 through; one C pass finds it
                table = self._read(data, n)
        except (TypeError, pa.ArrowInvalid, UnicodeDecodeError):
            table = None
        if table is None and n:
            table, rows, rejects = self._slow(values)
        elif table is None:
            table = self._schema.empty_table()
        times, bad = self._times(table)
        if bad is not None:
            keep = np.ones(len(rows), bool)
            for pos, reason, detail in bad:
                rejects.append((int(rows[pos]), reason, detail))
                keep[pos] = False
            table = table.filter(pa.array(keep))
            rows, times = rows[keep], times[keep]
        rejects.sort()
        return Decoded(table, rows, times, rejects)

    def _slow(self, values: list) -> tuple[pa.Table, np.ndarray, list]:
        rejects: list[tuple[int, str, str]] = []
        clean: list[tuple[int, bytes]] = []
        # per record here: only batches that already failed the fast path come this way
        for i, v in enumerate(values):
            if v is None:
                rejects.append((i, "decode_error", "empty value (tombstone)"))
            elif not isinstance(v, (bytes, bytearray)):
                rejects.append((i, "decode_error", f"value is {type(v).__name__}, not bytes"))
            elif not v.strip():
                rejects.append((i, "decode_error", "empty value"))
            elif not _utf8(v):
                rejects.append((i, "decode_error", "value is not valid UTF-8"))
            elif b"\n" in v or b"\r" in v:
                # newlines are legal whitespace between JSON tokens; raw ones inside strings are not
                try:
                    json.loads(v)
                except (ValueError, UnicodeDecodeError) as exc:
                    rejects.append((i, "decode_error", f"not valid JSON: {exc}"))
                    continue
                clean.append((i, v.replace(b"\r", b" ").replace(b"\n", b" ")))
            else:
                clean.append((i, bytes(v)))
        tables, rows = [], []

        def parse(part: list[tuple[int, bytes]]) -> None:
            try:
                tables.append(self._read(b"\n".join(v for _, v in part), len(part)))
                rows.extend(i for i, _ in part)
            except pa.ArrowInvalid as exc:
                if len(part) == 1:
                    reason, detail = _reason(str(exc)), _detail(str(exc))
                    if reason == "decode_error":
                        # pyarrow does not always name the column: find it (one record, rare path)
                        reason, detail = self._which_field(part[0][1]) or (reason, detail)
                    rejects.append((part[0][0], reason, detail))
                else:
                    mid = len(part) // 2
                    parse(part[:mid])
                    parse(part[mid:])

        for s in range(0, len(clean), _BLOCK):
            parse(clean[s : s + _BLOCK])
        table = pa.concat_tables(tables, promote_options="permissive") if tables else self._schema.empty_table()
        return table, np.array(rows, dtype=np.int64), rejects

    def _which_field(self, value: bytes) -> tuple[str, str] | None:
        try:
            obj = json.loads(value)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        for f, t in [(self.time_field, self._schema.field(self.time_field).type), *self.fields.items()]:
            v = obj.get(f)
            if v is None:
                continue
            ok = {pa.int64(): isinstance(v, int) and not isinstance(v, bool),
                  pa.float64(): isinstance(v, (int, float)) and not isinstance(v, bool),
                  pa.string(): isinstance(v, str), pa.bool_(): isinstance(v, bool)}.get(t, True)
            if not ok:
                return f"type_mismatch:{f}", f"field {f!r} is {json.dumps(v)[:80]}, not {t}"
        return None

    def _times(self, table: pa.Table) -> tuple[np.ndarray, list | None]:
        col = table.column(self.time_field)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        missing = col.is_null().to_numpy(zero_copy_only=False)
        if self.time_format == "iso8601":
            times = col.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
            nonfinite = np.zeros(len(times), bool)
        else:
            raw = col.fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
            nonfinite = ~np.isfinite(raw)
            raw = np.where(nonfinite, 0.0, raw)
            if self.time_format == "epoch_s":
                ms = raw * 1000.0
            elif self.time_format == "epoch_ms":
                ms = raw
            else:  # auto: seconds below 1e11 (year 5138 in seconds, 1973 in ms)
                ms = np.where(np.abs(raw) < 1e11, raw * 1000.0, raw)
            out_of_range = np.abs(ms) > 1e15  # ~ year 33658: not a real event time
            nonfinite |= out_of_range
            times = np.round(ms).astype(np.int64)
        bad = []
        for f, t in self.fields.items():
            if t == pa.float64():
                c = table.column(f).combine_chunks()
                nf = ~pc.is_finite(c).fill_null(True).to_numpy(zero_copy_only=False)
                for pos in np.flatnonzero(nf).tolist():
                    bad.append((pos, "non_finite", f"field {f!r} is {c[pos].as_py()!r}"))
        for pos in np.flatnonzero(missing).tolist():
            bad.append((pos, f"missing_field:{self.time_field}", f"event-time field {self.time_field!r} is missing or null"))
        for pos in np.flatnonzero(nonfinite & ~missing).tolist():
            bad.append((pos, "timestamp_out_of_range", f"event time {col[pos].as_py()!r} is not a usable time"))
        if not bad:
            return times, None
        seen, uniq = set(), []
        for b in bad:
            if b[0] not in seen:
                seen.add(b[0])
                uniq.append(b)
        return times, uniq


def _utf8(v: bytes) -> bool:
    try:
        v.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _reason(message: str) -> str:
    """Reason code from a pyarrow JSON error, e.g. ``type_mismatch:value`` or ``decode_error``."""
    m = re.search(r"Column\((/[^)]*)?\) changed from (\w+) to (\w+)", message)
    if m and m.group(1):
        return "type_mismatch:" + m.group(1).lstrip("/").replace("/", ".")
    if "Number too big" in message:
        return "non_finite"
    return "decode_error"


def _detail(message: str) -> str:
    if re.search(r"Column\(\) changed from", message):
        return "the value is not a JSON object"
    return message.replace("JSON parse error: ", "").strip()[:500]
