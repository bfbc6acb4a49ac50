"""Ingest shared by REST (``POST /v1/events``) and gRPC (``Ingest``).

Each record is checked on its own: an object, naming the caller's tenant (the
field is filled in from the token when absent, and a record naming another
tenant is rejected), valid against the registry subject's latest version (or a
schema file). Accepted records are produced to Kafka keyed by tenant with the
schema label in the ``raystream.schema`` header, and a record counts as
accepted only once the broker acknowledged it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import fastjsonschema

from serve.config import IngestConfig
from serve.errors import ApiError

__all__ = ["Ingestor", "QUEUE_MESSAGES", "Verdict"]

QUEUE_MESSAGES = 100_000  # the producer's local queue (queue.buffering.max.messages): a request that does not fit is refused

Verdict = dict  # {"index", "status": "accepted"|"rejected", "reason"?, "detail"?, "schema"?}


class Ingestor:
    """Validation and the idempotent producer of one serving process."""

    def __init__(self, cfg: IngestConfig, registry, tracer=None):
        from pipeline.tracing import NOOP

        self.cfg = cfg
        self.registry = registry
        self.tracer = tracer or NOOP
        self._producer = None
        self._validators: dict = {}
        self._cache = None
        self._lock = threading.Lock()

    def validator(self):
        """(check function, label) of the schema in force."""
        if self.cfg.schema_file:
            if "file" not in self._validators:
                with open(self.cfg.schema_file) as f:
                    self._validators["file"] = (fastjsonschema.compile(json.load(f)), self.cfg.schema_file)
            return self._validators["file"]
        if self._cache is None:
            from pipeline.io.registry import SchemaCache

            self._cache = SchemaCache(self.registry, self.cfg.subject, ttl_s=5.0)  # a new version is followed within 5 s
        v, schema = self._cache.get("latest")
        if v not in self._validators:
            self._validators[v] = (fastjsonschema.compile(schema.doc), f"{self.cfg.subject}/{v}")
        return self._validators[v]

    def producer(self):
        with self._lock:
            if self._producer is None:
                from confluent_kafka import Producer

                self._producer = Producer({"bootstrap.servers": self.cfg.bootstrap_servers, "enable.idempotence": True,
                                           "acks": "all", "linger.ms": 2, "message.timeout.ms": 10_000,
                                           "queue.buffering.max.messages": QUEUE_MESSAGES})
            return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None

    def check(self, records: list, tenant: str, first_index: int = 0) -> tuple[list[Verdict], list[tuple[int, bytes]], str]:
        """Verdicts for ``records`` (accepted ones provisionally), the encoded records to send, the schema label."""
        check, label = self.validator()
        field = self.cfg.tenant_field
        results: list[Verdict] = []
        to_send: list[tuple[int, bytes]] = []
        # per record on purpose: every record gets its own verdict and the batches are request-sized
        for i, rec in enumerate(records, first_index):
            if not isinstance(rec, dict):
                results.append({"index": i, "status": "rejected", "reason": "not_an_object"})
                continue
            if rec.setdefault(field, tenant) != tenant:
                results.append({"index": i, "status": "rejected", "reason": "tenant_mismatch",
                                "detail": f"{field} names another tenant than the token"})
                continue
            try:
                check(rec)
            except fastjsonschema.JsonSchemaValueException as exc:
                results.append({"index": i, "status": "rejected", "reason": f"schema_violation:{exc.rule}",
                                "detail": f"{exc.name}: {exc.message}", "schema": label})
                continue
            results.append({"index": i, "status": "accepted"})
            to_send.append((i, json.dumps(rec, separators=(",", ":")).encode()))
        return results, to_send, label

    def send(self, to_send: list[tuple[int, bytes]], tenant: str, label: str) -> dict[int, str | None]:
        """Produce without waiting (never blocks the event loop); returns the dict the delivery callbacks fill
        (index -> error or None).

        ApiError 503 (Retry-After 1) when the producer's queue cannot take the whole request, before anything is
        sent; a record the queue refuses anyway (its byte limit) is marked ``queue_full`` and never sent.
        """
        done: dict[int, str | None] = {}
        if not to_send:
            return done
        p = self.producer()
        p.poll(0)  # serve callbacks of earlier requests: frees queue space
        if len(p) + len(to_send) > QUEUE_MESSAGES:
            raise ApiError(503, "the broker is not keeping up: the producer queue is full", retry_after=1)
        with self.tracer.span("ingest", {"raystream.tenant": tenant, "raystream.records": len(to_send),
                                         "messaging.destination.name": self.cfg.topic}, kind="producer"):
            key, headers = tenant.encode(), [("raystream.schema", label.encode())]
            trace = self.tracer.current()
            if trace:  # every record carries the request's context to the worker that windows it
                headers.append(("traceparent", trace.encode()))
            for i, value in to_send:
                try:
                    p.produce(self.cfg.topic, value=value, key=key, headers=headers,
                              on_delivery=lambda err, _m, i=i: done.__setitem__(i, None if err is None else str(err)))
                except BufferError:  # the queue's byte limit: this record is refused, not waited for
                    done[i] = "queue_full"
        return done

    def _await(self, done: dict, n: int, timeout_s: float) -> None:
        # any thread's poll serves every request's callbacks: each waits only for its own records
        deadline = time.monotonic() + timeout_s
        p = self.producer()
        while len(done) < n and time.monotonic() < deadline:
            p.poll(0.01)

    async def confirm(self, results: list[Verdict], done: dict, sent: int, timeout_s: float = 15.0) -> None:
        """Wait for the broker's acknowledgements; an accepted record it did not take becomes rejected."""
        if not sent:
            return
        await asyncio.get_running_loop().run_in_executor(None, self._await, done, sent, timeout_s)
        for r in results:
            if r["status"] == "accepted" and done.get(r["index"], "not acknowledged") is not None:
                why = done.get(r["index"]) or "not acknowledged"
                r.update(status="rejected", reason="queue_full" if why == "queue_full" else "broker_unavailable", detail=why)

    async def ingest(self, records: list, tenant: str) -> tuple[list[Verdict], str]:
        # off the event loop: validation is per record, and the schema cache may ask PostgreSQL
        results, to_send, label = await asyncio.to_thread(self.check, records, tenant)
        done = self.send(to_send, tenant, label)
        await self.confirm(results, done, len(to_send))
        return results, label
