"""Where a worker's validators come from: a schema file, or a registry subject."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.spec import PipelineSpec
from pipeline.validate import Validator

__all__ = ["SchemaSource"]


class SchemaSource:
    """``default()`` is the spec's version; ``get(v)`` a version a record names in its header."""

    def __init__(self, spec: PipelineSpec):
        cfg = spec.validate_
        self.cfg = cfg
        self._validators: dict[int, tuple[Validator, str]] = {}
        self.cache = None
        if cfg.schema_file:
            path = Path(cfg.schema_file)
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"validate.schema_file {path}: {exc}") from None
            self._file = (Validator(doc, str(path)), path.name)
        else:
            from pipeline.io.registry import Registry, SchemaCache

            self._file = None
            self.cache = SchemaCache(Registry(cfg.registry.dsn.get_secret_value()), cfg.subject, cfg.cache_ttl / 1000.0)
            self.default()  # fail at start, not at the first batch, when the subject has no such version

    def _for(self, version: int | str) -> tuple[Validator, str]:
        v, schema = self.cache.get(version)
        if v not in self._validators:
            if schema.kind == "protobuf":
                # the descriptor is the contract: a record that parses as the message is valid
                self._validators[v] = (Validator({"type": "object"}, f"{self.cfg.subject} v{v}"), f"{self.cfg.subject}/{v}")
            else:
                self._validators[v] = (Validator(schema.doc, f"{self.cfg.subject} v{v}"), f"{self.cfg.subject}/{v}")
        return self._validators[v]

    def message_class(self):
        """The protobuf message class of the spec's version (``format: protobuf``)."""
        from google.protobuf import message_factory

        v, schema = self.cache.get(self.cfg.version)
        if schema.kind != "protobuf":
            raise ValueError(f"{self.cfg.subject} v{v} is a {schema.kind} schema, not protobuf")
        return message_factory.GetMessageClass(schema.descriptor())

    def default(self) -> tuple[Validator, str]:
        if self._file is not None:
            return self._file
        return self._for(self.cfg.version)

    def get(self, version: int) -> tuple[Validator, str]:
        """The validator of ``version``; raises ``UnknownVersion`` (or ``LookupError``) when there is none."""
        if self._file is not None:
            raise LookupError("records name a schema version but the spec validates with a schema file")
        return self._for(int(version))
