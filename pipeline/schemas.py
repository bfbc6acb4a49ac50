"""Schemas and compatibility rules (pure: no storage, no network).

A registered schema is JSON Schema (a JSON object) or Protobuf (a serialized
``FileDescriptorSet`` plus the message name). Compatibility follows the
schema-registry conventions:

* ``BACKWARD``: the new schema reads data written with the old one;
* ``FORWARD``: the old schema reads data written with the new one;
* ``FULL``: both; ``NONE``: no check;
* ``*_TRANSITIVE``: against every earlier version, not just the latest.

``problems(old, new, mode)`` names each offending field and the rule it breaks,
e.g. ``field 'amount': type changed from number to string (BACKWARD: data
written with version 1 would not validate)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["MODES", "Schema", "check_compatibility", "json_problems", "proto_problems"]

MODES = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE", "NONE")
KINDS = ("json", "protobuf")


@dataclass(frozen=True)
class Schema:
    """One schema text: JSON Schema, or a base64 FileDescriptorSet with ``message`` naming the record type."""

    kind: str
    text: str
    message: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"schema kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "json":
            try:
                doc = json.loads(self.text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise ValueError("a JSON Schema is a JSON object")
            import fastjsonschema

            try:
                fastjsonschema.compile(doc)
            except fastjsonschema.JsonSchemaDefinitionException as exc:
                raise ValueError(f"invalid JSON Schema: {exc}") from None
        else:
            if not self.message:
                raise ValueError("a protobuf schema names its record message")
            self.descriptor()

    @property
    def doc(self) -> dict:
        return json.loads(self.text)

    @property
    def fingerprint(self) -> str:
        canon = json.dumps(self.doc, sort_keys=True, separators=(",", ":")) if self.kind == "json" else self.text
        return hashlib.sha256(f"{self.kind}|{self.message or ''}|{canon}".encode()).hexdigest()

    def descriptor(self):
        """The protobuf message descriptor (protobuf schemas)."""
        import base64

        from google.protobuf import descriptor_pb2, descriptor_pool

        fds = descriptor_pb2.FileDescriptorSet()
        try:
            fds.ParseFromString(base64.b64decode(self.text))
        except Exception as exc:  # the protobuf runtime raises its own DecodeError
            raise ValueError(f"not a serialized FileDescriptorSet: {exc}") from None
        pool = descriptor_pool.DescriptorPool()
        for f in fds.file:
            pool.Add(f)
        try:
            return pool.FindMessageTypeByName(self.message)
        except KeyError:
            raise ValueError(f"message {self.message!r} is not in the descriptor set") from None


# -- JSON Schema --------------------------------------------------------------

def _types(prop: dict) -> set[str]:
    t = prop.get("type")
    if t is None:
        return {"any"}
    out = set(t) if isinstance(t, list) else {t}
    if "number" in out:
        out.add("integer")  # every integer is a number
    return out


def _tname(prop: dict) -> str:
    t = _types(prop)
    if "number" in t:
        t = t - {"integer"}
    return "|".join(sorted(t))


def _accepts(reader: dict, writer: dict) -> set[str]:
    """Types the writer may produce that the reader refuses."""
    r, w = _types(reader), _types(writer)
    if "any" in r:
        return set()
    if "any" in w:
        return {"any"}
    return w - r


def json_problems(reader: dict, writer: dict, rule: str, path: str = "") -> list[str]:
    """Why data valid under ``writer`` may be invalid under ``reader`` (empty when compatible)."""
    out: list[str] = []
    label = lambda name: f"field '{path + name}'"  # noqa: E731
    rprops, wprops = reader.get("properties", {}), writer.get("properties", {})
    rreq, wreq = set(reader.get("required", [])), set(writer.get("required", []))
    for name in sorted(rreq - wreq):
        if "default" not in rprops.get(name, {}):
            out.append(f"{label(name)}: required by the reader but optional or absent in the writer ({rule})")
    if reader.get("additionalProperties") is False:
        for name in sorted(set(wprops) - set(rprops)):
            out.append(f"{label(name)}: written but refused by additionalProperties: false ({rule})")
        if writer.get("additionalProperties", True) is not False:
            extra = "any field" if not wprops else "fields beyond the writer's"
            out.append(f"record: the writer allows {extra} that additionalProperties: false refuses ({rule})")
    for name in sorted(set(rprops) & set(wprops)):
        rp, wp = rprops[name], wprops[name]
        bad = _accepts(rp, wp)
        if bad:
            out.append(f"{label(name)}: type {_tname(wp)} is not accepted as {_tname(rp)} ({rule})")
            continue
        if "enum" in rp:
            missing = [v for v in wp.get("enum", [None]) if v not in rp["enum"]] if "enum" in wp else ["(any value)"]
            if missing:
                out.append(f"{label(name)}: enum does not accept {missing} ({rule})")
        for key, tighter in (("minimum", lambda r, w: w is None or r > w), ("exclusiveMinimum", lambda r, w: w is None or r > w),
                             ("minLength", lambda r, w: w is None or r > w), ("minItems", lambda r, w: w is None or r > w),
                             ("maximum", lambda r, w: w is None or r < w), ("exclusiveMaximum", lambda r, w: w is None or r < w),
                             ("maxLength", lambda r, w: w is None or r < w), ("maxItems", lambda r, w: w is None or r < w)):
            if key in rp and tighter(rp[key], wp.get(key)):
                out.append(f"{label(name)}: {key} {rp[key]} is tighter than {wp.get(key, 'none')} ({rule})")
        for key in ("pattern", "format", "const"):
            if key in rp and rp[key] != wp.get(key):
                out.append(f"{label(name)}: {key} {rp[key]!r} differs from {wp.get(key, 'none')!r} ({rule})")
        if "object" in _types(rp) and ("properties" in rp or "required" in rp):
            out += json_problems(rp, wp, rule, f"{path}{name}.")
        if "array" in _types(rp) and isinstance(rp.get("items"), dict) and isinstance(wp.get("items"), dict):
            out += json_problems({"properties": {"[]": rp["items"]}}, {"properties": {"[]": wp["items"]}}, rule, f"{path}{name}")
    return out


# -- Protobuf ---------------------------------------------------------------

_WIRE_GROUPS = [
    {"int32", "int64", "uint32", "uint64", "bool", "enum"},  # varint, interchangeable on the wire
    {"sint32", "sint64"},
    {"fixed32", "sfixed32"},
    {"fixed64", "sfixed64"},
    {"string", "bytes"},
]


def _ptype(field) -> str:
    from google.protobuf.descriptor import FieldDescriptor

    names = {v: k.removeprefix("TYPE_").lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
    t = names.get(field.type, str(field.type))
    if t == "message":
        return f"message:{field.message_type.full_name}"
    return t


def _compatible_types(a: str, b: str) -> bool:
    return a == b or any(a in g and b in g for g in _WIRE_GROUPS)


def proto_problems(reader, writer, rule: str, path: str = "", seen: set | None = None) -> list[str]:
    """Field-number conflicts between two message descriptors, recursively."""
    seen = seen if seen is not None else set()
    key = (reader.full_name, writer.full_name, path)
    if key in seen:
        return []
    seen.add(key)
    out = []
    rby = {f.number: f for f in reader.fields}
    for f in writer.fields:
        r = rby.get(f.number)
        if r is None:
            continue  # unknown fields are kept and ignored by readers
        name = f"field {path}{f.name} (#{f.number})"
        ta, tb = _ptype(r), _ptype(f)
        if not _compatible_types(ta, tb):
            out.append(f"{name}: type {tb} is read as {ta} ({rule})")
        elif r.is_repeated != f.is_repeated:
            out.append(f"{name}: repeated in one version, singular in the other ({rule})")
        elif ta.startswith("message:"):
            out += proto_problems(r.message_type, f.message_type, rule, f"{path}{f.name}.", seen)
    wnums = {f.number for f in writer.fields}
    for r in reader.fields:
        if r.number not in wnums and r.is_required:
            out.append(f"field {path}{r.name} (#{r.number}): required by the reader, never written ({rule})")
    return out


def _pair(old: Schema, new: Schema, direction: str, version: int) -> list[str]:
    # BACKWARD: new reads old data; FORWARD: old reads new data
    reader, writer = (new, old) if direction == "BACKWARD" else (old, new)
    rule = f"{direction}: data written with version {version} would not be readable" if direction == "BACKWARD" \
        else f"FORWARD: version {version} could not read the new data"
    if old.kind != new.kind:
        return [f"schema kind changed from {old.kind} to {new.kind} ({rule})"]
    if new.kind == "json":
        return json_problems(reader.doc, writer.doc, rule)
    return proto_problems(reader.descriptor(), writer.descriptor(), rule)


def check_compatibility(new: Schema, previous: list[tuple[int, Schema]], mode: str) -> list[str]:
    """Problems of registering ``new`` after ``previous`` ((version, schema), oldest first) under ``mode``."""
    mode = mode.upper()
    if mode not in MODES:
        raise ValueError(f"compatibility {mode!r} is not one of {MODES}")
    if mode == "NONE" or not previous:
        return []
    against = previous if mode.endswith("_TRANSITIVE") else previous[-1:]
    base = mode.removesuffix("_TRANSITIVE")
    directions = ["BACKWARD", "FORWARD"] if base == "FULL" else [base]
    out: list[str] = []
    for version, old in against:
        for d in directions:
            out += _pair(old, new, d, version)
    return out


def arrow_type_of(prop: dict) -> str | None:
    """The ``fields:`` type a JSON Schema property decodes to (None for nested/untyped)."""
    t = _types(prop) - {"null"}
    if t == {"integer"}:
        return "int64"
    if t <= {"number", "integer"} and t:
        return "float64"
    if t == {"string"}:
        return "string"
    if t == {"boolean"}:
        return "bool"
    return None


def schema_of(obj: Any) -> Schema:
    """A JSON Schema given as a dict or text."""
    return Schema("json", obj if isinstance(obj, str) else json.dumps(obj))
