"""JSON Schema validation of decoded Arrow batches (pure: no registry I/O).

Rules Arrow can express run once per batch over whole columns: required
fields, enums, ``const``, numeric ranges and ``multipleOf``, string lengths,
patterns (RE2 search, as JSON Schema's unanchored ``pattern``), the
``date-time``/``date``/``email``/``uuid`` formats, and
``additionalProperties: false`` on top-level fields. Types are enforced by the
decoder (a value of the wrong type is a ``type_mismatch:<field>`` reject).
Anything else (nested objects and arrays, ``oneOf``/``anyOf``/``allOf``,
``if``/``then``, pattern properties, a regex RE2 cannot run) sends every
record of the batch through ``fastjsonschema`` as well, so the verdict is
always the full schema's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schemas import arrow_type_of

__all__ = ["Validator", "Violation"]

_VECTOR_KEYS = {"type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                "minLength", "maxLength", "pattern", "format", "description", "title", "default", "examples", "$comment"}
_TOP_KEYS = {"type", "properties", "required", "additionalProperties", "$schema", "$id", "title", "description", "$comment"}
_FORMATS = {
    "date-time": r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$",
    "date": r"^\d{4}-\d{2}-\d{2}$",
    "email": r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
}


@dataclass
class Violation:
    row: int
    rule: str
    detail: str


class Validator:
    """Validates decoded rows (and, where needed, their raw bytes) against one JSON Schema."""

    def __init__(self, schema: dict, label: str = "schema"):
        import fastjsonschema

        self.schema = schema
        self.label = label
        self.props: dict[str, dict] = schema.get("properties", {}) if isinstance(schema.get("properties"), dict) else {}
        self.required = list(schema.get("required", []))
        self.closed = schema.get("additionalProperties") is False
        self.fields = {k: arrow_type_of(p) for k, p in self.props.items() if arrow_type_of(p) is not None}
        # fallback when the schema says more than the vectorized rules can check
        self.fallback = (set(schema) - _TOP_KEYS) or schema.get("additionalProperties") not in (None, True, False) or any(
            (set(p) - _VECTOR_KEYS) or k not in self.fields or (p.get("format") and p["format"] not in _FORMATS)
            for k, p in self.props.items()
        ) or any(k not in self.props for k in self.required)
        for p in self.props.values():
            if "pattern" in p:
                try:
                    pc.match_substring_regex(pa.array([""]), p["pattern"])
                except pa.ArrowInvalid:
                    self.fallback = True  # not an RE2 expression: the per-record check runs it
        self._full = fastjsonschema.compile(schema)

    def decoder_fields(self) -> dict[str, str]:
        """Top-level fields the decoder must read for the vectorized rules (name -> ``fields:`` type)."""
        return dict(self.fields)

    def validate(self, table: pa.Table, raw: list[bytes], extra_columns: list[str] = ()) -> list[Violation]:
        """Violations (row position in ``table``, rule, detail), at most one per row; ``raw`` are the rows' values."""
        n = table.num_rows
        bad = np.zeros(n, bool)
        out: list[Violation] = []

        def flag(mask: np.ndarray, rule: str, detail) -> None:
            new = mask & ~bad
            for i in np.flatnonzero(new).tolist():
                out.append(Violation(i, rule, detail(i)))
            bad[new] = True

        cols = {k: table.column(k).combine_chunks() for k in self.fields if k in table.column_names}
        for k in self.required:
            if k in cols:
                flag(cols[k].is_null().to_numpy(zero_copy_only=False), "required", lambda i, k=k: f"field {k!r} is required")
        if self.closed:
            for c in extra_columns:
                col = table.column(c)
                present = col.fill_null(False) if pa.types.is_boolean(col.type) else col.is_valid()
                flag(present.to_numpy(zero_copy_only=False), "additionalProperties",
                     lambda i, c=c: f"field {c!r} is not allowed (additionalProperties: false)")
        for k, p in self.props.items():
            col = cols.get(k)
            if col is None:
                continue
            null = col.is_null().to_numpy(zero_copy_only=False)
            if k not in self.required and null.any() and "null" not in _as_list(p.get("type")):
                # null is "absent" (fine) or an explicit null (a type error): look at those records only
                pat = re.compile(rb'"' + re.escape(k.encode()) + rb'"\s*:\s*null')
                explicit = np.zeros(n, bool)
                for i in np.flatnonzero(null & ~bad).tolist():
                    explicit[i] = bool(pat.search(raw[i]))
                flag(explicit, "type", lambda i, k=k, p=p: f"field {k!r} is null, not {p.get('type')}")
            for rule, mask, detail in _column_rules(k, p, col):
                flag(mask & ~null, rule, detail)
        if self.fallback:
            for i in np.flatnonzero(~bad).tolist():
                try:
                    self._full(json.loads(raw[i]))
                except Exception as exc:  # fastjsonschema.JsonSchemaValueException, or a decode problem
                    path = getattr(exc, "name", "data")
                    out.append(Violation(i, getattr(exc, "rule", None) or "schema", f"{path}: {getattr(exc, 'message', exc)}"))
                    bad[i] = True
        out.sort(key=lambda v: v.row)
        return out


def _as_list(t) -> list:
    return t if isinstance(t, list) else [t]


def _column_rules(k: str, p: dict, col: pa.Array):
    """(rule, bad mask, detail(i)) for the vectorized keywords of one property."""
    def np_(a):
        return a.fill_null(False).to_numpy(zero_copy_only=False)

    def value(i):
        return col[i].as_py()

    if "enum" in p:
        ok = pc.is_in(col, value_set=pa.array(p["enum"]).cast(col.type)) if len(p["enum"]) else pa.array([False] * len(col))
        yield "enum", ~np_(ok), lambda i: f"field {k!r}: {value(i)!r} is not one of {p['enum']}"
    if "const" in p:
        yield "const", ~np_(pc.equal(col, pa.scalar(p["const"]).cast(col.type))), lambda i: f"field {k!r}: {value(i)!r} is not {p['const']!r}"
    numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
    if numeric:
        for key, fn, word in (("minimum", pc.less, "below minimum"), ("maximum", pc.greater, "above maximum"),
                              ("exclusiveMinimum", pc.less_equal, "not above exclusiveMinimum"),
                              ("exclusiveMaximum", pc.greater_equal, "not below exclusiveMaximum")):
            if key in p:
                yield key, np_(fn(col, p[key])), lambda i, key=key, word=word: f"field {k!r}: {value(i)} is {word} {p[key]}"
        if "multipleOf" in p:
            v = col.cast(pa.float64()).fill_null(0).to_numpy(zero_copy_only=False)
            q = v / float(p["multipleOf"])
            yield "multipleOf", np.abs(q - np.round(q)) > 1e-9, lambda i: f"field {k!r}: {value(i)} is not a multiple of {p['multipleOf']}"
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if "minLength" in p or "maxLength" in p:
            length = pc.utf8_length(col)
            if "minLength" in p:
                yield "minLength", np_(pc.less(length, p["minLength"])), lambda i: f"field {k!r}: shorter than {p['minLength']} characters"
            if "maxLength" in p:
                yield "maxLength", np_(pc.greater(length, p["maxLength"])), lambda i: f"field {k!r}: longer than {p['maxLength']} characters"
        if "pattern" in p:
            try:
                m = pc.match_substring_regex(col, p["pattern"])
                yield "pattern", ~np_(m), lambda i: f"field {k!r}: {value(i)!r} does not match {p['pattern']!r}"
            except pa.ArrowInvalid:
                pass  # checked by the per-record fallback
        fmt = p.get("format")
        if fmt in _FORMATS:
            yield "format", ~np_(pc.match_substring_regex(col, _FORMATS[fmt])), lambda i: f"field {k!r}: {value(i)!r} is not a {fmt}"
