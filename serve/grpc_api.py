"""The gRPC service (``serve/protos/raystream.proto``) as methods of the Serve deployment.

Serve's gRPC proxy calls a deployment method named after each RPC. Every call
needs ``authorization: Bearer <JWT>`` metadata; the token's tenant scopes it as
on REST. Errors map to gRPC codes: 400 → INVALID_ARGUMENT, 401 →
UNAUTHENTICATED, 403 → PERMISSION_DENIED, 404 → NOT_FOUND, 413 →
RESOURCE_EXHAUSTED (with a detail saying the size), 429 → RESOURCE_EXHAUSTED
(``retry-after`` in the detail), 503 → UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json

import grpc
from google.protobuf import json_format, struct_pb2

from serve.core import ApiError
from serve.protos import raystream_pb2 as pb
from serve.stream import TEXT, Feed, SubscribeError

__all__ = ["GRPC_SERVICER", "GrpcMethods", "struct_of"]

# what Serve's gRPC proxy registers (grpc_servicer_functions)
GRPC_SERVICER = "serve.protos.raystream_pb2_grpc.add_RaystreamServicer_to_server"

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
          404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def struct_of(row: dict) -> struct_pb2.Struct:
    """A result row as a protobuf Struct (numbers travel as doubles: exact up to 2**53)."""
    s = struct_pb2.Struct()
    s.update(json.loads(json.dumps(row, default=str)))
    return s


class Aborted(Exception):
    """Ends a call with the status set on its context (Serve keeps a code set before an exception)."""


def _fail(context, status: int, message: str):
    context.set_code(_CODES.get(status, grpc.StatusCode.INTERNAL))
    context.set_details(message)
    # a streaming call yields nothing here: only an exception carries the code to the client
    raise Aborted(message)


def _authorization(context) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k.lower() == "authorization":
            return v
    return None


class GrpcMethods:
    """Ingest (client streaming), QueryAggregates (unary), Subscribe (server streaming)."""

    def __init__(self, core):
        self.core = core

    async def _caller(self, context, endpoint: str):
        who = self.core.principal(_authorization(context))
        await self.core.admit(who, endpoint)
        return who

    async def QueryAggregates(self, request: pb.QueryRequest, grpc_context) -> pb.QueryResponse:
        try:
            who = await self._caller(grpc_context, "grpc:QueryAggregates")
            result = await self.core.query(
                who, request.pipeline, request.window, dict(request.filters),
                request.start if request.HasField("start") else None, request.end if request.HasField("end") else None,
                request.order or "asc", list(request.fields) or None, request.limit or 100, request.cursor or None,
                request.include_open)
        except ApiError as exc:
            _fail(grpc_context, exc.status, str(exc) + (f" (retry-after {exc.retry_after:g}s)" if exc.retry_after else ""))
            return pb.QueryResponse()
        return pb.QueryResponse(items=[struct_of(r) for r in result["items"]], next_cursor=result["next_cursor"] or "",
                                open=[struct_of(r) for r in result.get("open", [])])

    async def Ingest(self, request_stream, grpc_context) -> pb.IngestResponse:
        ing = self.core.ingestor
        try:
            who = await self._caller(grpc_context, "grpc:Ingest")
            if ing is None:
                raise ApiError(404, "ingest is not configured")
        except ApiError as exc:
            _fail(grpc_context, exc.status, str(exc))
            return pb.IngestResponse()
        rejections: list[pb.Rejection] = []
        accepted, index, label = 0, 0, ""
        waits = []
        async for msg in request_stream:
            records: list = []
            bad: list[tuple[int, str]] = []
            for raw in msg.records:  # per record: each gets its own verdict
                try:
                    records.append(json.loads(raw))
                except ValueError as exc:
                    records.append(None)
                    bad.append((index + len(records) - 1, f"not JSON: {exc}"))
            if index + len(records) > ing.cfg.max_records * 100:
                _fail(grpc_context, 413, f"more than {ing.cfg.max_records * 100} records in one stream")
                return pb.IngestResponse()
            results, to_send, label = ing.check(records, who.tenant, first_index=index)
            bad_idx = dict(bad)
            for r in results:
                if r["index"] in bad_idx:
                    r.update(reason="not_json", detail=bad_idx[r["index"]])
            # produce each message at once; acknowledgements are awaited together at the end
            waits.append((results, ing.send(to_send, who.tenant, label), len(to_send)))
            index += len(records)
        for results, done, sent in waits:
            await ing.confirm(results, done, sent)
            for r in results:
                if r["status"] == "accepted":
                    accepted += 1
                else:
                    rejections.append(pb.Rejection(index=r["index"], reason=r["reason"], detail=r.get("detail", "")))
        return pb.IngestResponse(accepted=accepted, rejected=len(rejections), rejections=rejections, schema=label)

    async def Subscribe(self, request: pb.SubscribeRequest, grpc_context):
        try:
            who = await self._caller(grpc_context, "grpc:Subscribe")
            feed = Feed(self.core, who, request.pipeline, request.window, dict(request.filters), request.session or None)
        except ApiError as exc:
            _fail(grpc_context, exc.status, str(exc))
            return
        except SubscribeError as exc:
            _fail(grpc_context, exc.status, str(exc))
            return
        try:
            try:
                first = await feed.start()
            except (ConnectionError, OSError) as exc:
                _fail(grpc_context, 503, f"update channel unavailable: {type(exc).__name__}")
            yield pb.WindowUpdate(type="subscribed", session=first["session"], replayed=first["replayed"])
            while True:
                if feed.hub.broken.is_set():
                    _fail(grpc_context, 503, f"update channel lost; resume with session {feed.session}")
                try:
                    batch = await asyncio.wait_for(feed.next(), timeout=feed.sc.heartbeat)
                except asyncio.TimeoutError:
                    yield pb.WindowUpdate(type="ping")  # keeps idle streams alive through proxies
                    continue
                for m in batch:
                    if m["type"] == "update":
                        yield pb.WindowUpdate(type="update", row=struct_of({k: v for k, v in m["row"].items() if k != TEXT}))
                    else:
                        yield pb.WindowUpdate(type=m["type"], message=m.get("message", ""))
                await feed.delivered(batch)
        finally:
            await feed.close()


def row_of(s: struct_pb2.Struct) -> dict:
    """A Struct row back to a dict (client side)."""
    return json_format.MessageToDict(s)
