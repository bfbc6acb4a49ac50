"""Compatibility rules for JSON Schema and Protobuf, every mode incl. transitive,
and the registry on a real PostgreSQL."""

from __future__ import annotations

import base64
import json

import pytest

from pipeline.schemas import Schema, check_compatibility, schema_of

V1 = {"type": "object", "properties": {"id": {"type": "string"}, "amount": {"type": "number", "minimum": 0}},
      "required": ["id"]}
ADD_OPTIONAL = {**V1, "properties": {**V1["properties"], "note": {"type": "string"}}}
ADD_REQUIRED = {**ADD_OPTIONAL, "required": ["id", "note"]}
ADD_REQUIRED_DEFAULT = {**ADD_OPTIONAL, "properties": {**ADD_OPTIONAL["properties"], "note": {"type": "string", "default": ""}},
                        "required": ["id", "note"]}
RETYPE = {**V1, "properties": {**V1["properties"], "amount": {"type": "string"}}}
WIDEN = {**V1, "properties": {**V1["properties"], "amount": {"type": "number"}}}  # minimum dropped
DROP_REQUIRED = {**V1, "required": []}


def _chk(old, new, mode, history=None):
    prev = [(i + 1, schema_of(s)) for i, s in enumerate(history or [old])]
    return check_compatibility(schema_of(new), prev, mode)


@pytest.mark.parametrize("new, backward, forward", [
    (ADD_OPTIONAL, True, True),
    (ADD_REQUIRED, False, True),          # old data lacks 'note'; old readers ignore it
    (ADD_REQUIRED_DEFAULT, True, True),
    (RETYPE, False, False),
    (WIDEN, True, False),                 # new reads all old data; old refuses negative amounts
    (DROP_REQUIRED, True, False),
])
def test_json_modes(new, backward, forward):
    assert (not _chk(V1, new, "BACKWARD")) == backward
    assert (not _chk(V1, new, "FORWARD")) == forward
    assert (not _chk(V1, new, "FULL")) == (backward and forward)
    assert _chk(V1, new, "NONE") == []


def test_messages_name_field_and_rule():
    p = _chk(V1, RETYPE, "BACKWARD")
    assert p == ["field 'amount': type string is not accepted as number (BACKWARD: data written with version 1 would not be readable)"] or \
        any("field 'amount'" in x and "BACKWARD" in x for x in p)
    p = _chk(V1, ADD_REQUIRED, "BACKWARD")
    assert any("field 'note': required by the reader" in x for x in p)
    p = _chk(V1, WIDEN, "FORWARD")
    assert any("field 'amount': minimum 0 is tighter than none" in x and "FORWARD" in x for x in p)


def test_transitive_checks_every_version():
    # v1 -> v2 (drop 'amount') -> v3 (re-add 'amount' as a string): v3 is BACKWARD compatible with v2
    # (v2 data has no 'amount') but not with v1, so only the transitive mode refuses it
    v2 = {**V1, "properties": {"id": {"type": "string"}}}
    v3 = {**V1, "properties": {"id": {"type": "string"}, "amount": {"type": "string"}}}
    assert _chk(None, v3, "BACKWARD", history=[V1, v2]) == []
    p = _chk(None, v3, "BACKWARD_TRANSITIVE", history=[V1, v2])
    assert p and all("version 1" in x for x in p)
    assert _chk(None, v3, "FULL_TRANSITIVE", history=[V1, v2])
    assert _chk(None, v3, "FORWARD_TRANSITIVE", history=[V1, v2])


def test_additional_properties_false():
    closed = {**V1, "additionalProperties": False}
    p = _chk(ADD_OPTIONAL, closed, "BACKWARD", history=[ADD_OPTIONAL])
    assert any("field 'note': written but refused by additionalProperties: false" in x for x in p)


def test_enum_narrowing():
    a = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["a", "b"]}}}
    b = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["a"]}}}
    assert any("enum does not accept ['b']" in x for x in _chk(a, b, "BACKWARD"))
    assert _chk(a, b, "FORWARD") == []


def _proto(fields: list[tuple[str, int, int, int]]) -> Schema:
    """A message 'Event' with (name, number, type, label) fields as a base64 FileDescriptorSet."""
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    f = fds.file.add(name="event.proto", package="rs", syntax="proto3")
    m = f.message_type.add(name="Event")
    for name, number, ftype, label in fields:
        m.field.add(name=name, number=number, type=ftype, label=label)
    return Schema("protobuf", base64.b64encode(fds.SerializeToString()).decode(), "rs.Event")


def test_protobuf_rules():
    from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    v1 = _proto([("id", 1, F.TYPE_STRING, opt), ("amount", 2, F.TYPE_DOUBLE, opt)])
    added = _proto([("id", 1, F.TYPE_STRING, opt), ("amount", 2, F.TYPE_DOUBLE, opt), ("n", 3, F.TYPE_INT64, opt)])
    retyped = _proto([("id", 1, F.TYPE_STRING, opt), ("amount", 2, F.TYPE_STRING, opt)])
    widened = _proto([("id", 1, F.TYPE_STRING, opt), ("amount", 2, F.TYPE_DOUBLE, opt), ("n", 3, F.TYPE_INT32, opt)])
    repeated = _proto([("id", 1, F.TYPE_STRING, rep), ("amount", 2, F.TYPE_DOUBLE, opt)])
    assert check_compatibility(added, [(1, v1)], "FULL") == []
    assert check_compatibility(widened, [(1, added)], "FULL") == []  # int32/int64 share the varint wire type
    p = check_compatibility(retyped, [(1, v1)], "BACKWARD")
    assert p == ["field amount (#2): type double is read as string (BACKWARD: data written with version 1 would not be readable)"]
    assert any("repeated in one version" in x for x in check_compatibility(repeated, [(1, v1)], "FORWARD"))
    with pytest.raises(ValueError, match="not in the descriptor set"):
        Schema("protobuf", v1.text, "rs.Missing")


def test_invalid_schemas_are_refused():
    with pytest.raises(ValueError, match="not JSON"):
        Schema("json", "{nope")
    with pytest.raises(ValueError, match="invalid JSON Schema"):
        Schema("json", json.dumps({"type": 12}))


def test_registry_on_postgres(postgres):
    from pipeline.io.registry import Incompatible, Registry, SchemaCache, UnknownVersion

    reg = Registry(postgres.extra["dsn"])
    subject = "events-registry-test"
    assert reg.register(subject, schema_of(V1)) == 1
    assert reg.register(subject, schema_of(V1)) == 1  # the same schema again: its version
    assert reg.register(subject, schema_of(ADD_OPTIONAL)) == 2
    with pytest.raises(Incompatible, match="field 'amount'"):
        reg.register(subject, schema_of(RETYPE))
    reg.set_compatibility(subject, "NONE")
    assert reg.register(subject, schema_of(RETYPE)) == 3
    assert reg.get(subject)[0] == 3 and reg.get(subject, 1)[1].doc == V1
    with pytest.raises(UnknownVersion):
        reg.get(subject, 9)
    assert any(s["subject"] == subject and s["latest"] == 3 and s["compatibility"] == "NONE" for s in reg.subjects())
    cache = SchemaCache(reg, subject, ttl_s=3600)
    assert cache.get()[0] == 3
    reg.set_compatibility(subject, "BACKWARD")
    reg.set_compatibility(subject, "NONE")
    reg.register(subject, schema_of({"type": "object"}))
    assert cache.get()[0] == 3  # within the TTL
    cache.loaded_at -= 2
    assert cache.get(4)[0] == 4  # an unknown version refreshes
    with pytest.raises(UnknownVersion):
        cache.get(99)
