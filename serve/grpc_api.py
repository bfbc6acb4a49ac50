"""The gRPC service (``serve/protos/raystream.proto``): methods of the Serve deployment.

By default each replica serves them itself on ``host:grpc_port`` (``start_grpc``,
SO_REUSEPORT so the replicas of a node share the port), because Ray Serve's
gRPC proxy binds every interface; ``grpc_proxy: true`` serves them through that
proxy instead (Serve calls a deployment method named after each RPC). Every
call needs ``authorization: Bearer <JWT>`` metadata, checked before a stream's
first message is read; the token's tenant scopes it as on REST, and a
``Subscribe`` stream ends UNAUTHENTICATED when its token expires. A message
over ``max_body_bytes`` is refused by the server (RESOURCE_EXHAUSTED) before
any handler runs. Errors are ``ApiError`` statuses mapped by ``serve.errors``:
400 → INVALID_ARGUMENT, 401 → UNAUTHENTICATED, 403 → PERMISSION_DENIED,
404 → NOT_FOUND, 413/429 → RESOURCE_EXHAUSTED, 503 → UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import time

from google.protobuf import json_format, struct_pb2

from serve.errors import ApiError, grpc_code
from serve.protos import raystream_pb2 as pb
from serve.stream import TEXT, Feed

__all__ = ["GRPC_SERVICER", "GrpcMethods", "row_of", "start_grpc", "struct_of"]

# what Serve's gRPC proxy registers (grpc_servicer_functions) when grpc_proxy is on
GRPC_SERVICER = "serve.protos.raystream_pb2_grpc.add_RaystreamServicer_to_server"


def struct_of(row: dict) -> struct_pb2.Struct:
    """A result row as a protobuf Struct (numbers travel as doubles: exact up to 2**53)."""
    s = struct_pb2.Struct()
    s.update(json.loads(json.dumps(row, default=str)))
    return s


class Aborted(Exception):
    """Ends a call with ``status`` (set on the context first: Serve's proxy keeps a code set before an exception)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _fail(context, exc: ApiError):
    message = str(exc) + (f" (retry-after {int(exc.retry_after)}s)" if exc.retry_after else "")
    context.set_code(grpc_code(exc.status))
    context.set_details(message)
    raise Aborted(exc.status, message)


def _authorization(context) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k.lower() == "authorization":
            return v
    return None


def _measured(fn):
    """Count a unary/client-streaming call in the API metrics: route = the method, status = its gRPC code."""
    import functools
    import time

    @functools.wraps(fn)
    async def call(self, request, context):
        t0, status = time.perf_counter(), "OK"
        try:
            return await fn(self, request, context)
        except Aborted as exc:
            status = grpc_code(exc.status).name
            raise
        except BaseException:
            status = "INTERNAL"
            raise
        finally:
            self.core.metrics.request(f"grpc:{fn.__name__}", "grpc", status, time.perf_counter() - t0)
    return call


class GrpcMethods:
    """Ingest (client streaming), QueryWindows (unary; QueryAggregates its deprecated name), Subscribe (server streaming)."""

    def __init__(self, core):
        self.core = core

    async def _caller(self, context, endpoint: str):
        who = await self.core.authenticate(_authorization(context))
        await self.core.admit(who, endpoint)
        return who

    @_measured
    async def QueryWindows(self, request: pb.QueryRequest, grpc_context) -> pb.QueryResponse:
        try:
            who = await self._caller(grpc_context, "windows")
            result = await self.core.query(
                who, request.pipeline, request.window, dict(request.filters),
                request.start if request.HasField("start") else None, request.end if request.HasField("end") else None,
                request.order or "asc", list(request.fields) or None, request.limit or 100, request.cursor or None,
                request.include_open)
        except ApiError as exc:
            _fail(grpc_context, exc)
        return pb.QueryResponse(items=[struct_of(r) for r in result["items"]], next_cursor=result["next_cursor"] or "",
                                open=[struct_of(r) for r in result.get("open", [])])

    async def QueryAggregates(self, request: pb.QueryRequest, grpc_context) -> pb.QueryResponse:
        """Deprecated name of ``QueryWindows``."""
        return await self.QueryWindows(request, grpc_context)

    @_measured
    async def Ingest(self, request_stream, grpc_context) -> pb.IngestResponse:
        ing = self.core.ingestor
        try:
            who = await self._caller(grpc_context, "ingest")  # before the first message is read
            if ing is None:
                raise ApiError(404, "ingest is not configured")
        except ApiError as exc:
            _fail(grpc_context, exc)
        rejections: list[pb.Rejection] = []
        accepted, index, label = 0, 0, ""
        waits = []
        async for msg in request_stream:
            records: list = []
            bad: list[tuple[int, str]] = []
            for raw in msg.records:  # per record: each gets its own verdict
                try:
                    records.append(json.loads(raw))
                except (ValueError, RecursionError) as exc:
                    records.append(None)
                    bad.append((index + len(records) - 1, f"not JSON: {type(exc).__name__}"))
            if index + len(records) > ing.cfg.max_records * 100:
                _fail(grpc_context, ApiError(413, f"more than {ing.cfg.max_records * 100} records in one stream"))
            results, to_send, label = await asyncio.to_thread(ing.check, records, who.tenant, index)
            bad_idx = dict(bad)
            for r in results:
                if r["index"] in bad_idx:
                    r.update(reason="not_json", detail=bad_idx[r["index"]])
            try:  # produce each message at once; acknowledgements are awaited together at the end
                waits.append((results, ing.send(to_send, who.tenant, label), len(to_send)))
            except ApiError as exc:  # queue full: earlier messages' records were sent, this one's were not
                for r in results:
                    if r["status"] == "accepted":
                        r.update(status="rejected", reason="queue_full", detail=str(exc))
                waits.append((results, {}, 0))
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
            who = await self.core.authenticate(_authorization(grpc_context))
            feed = Feed(self.core, who, request.pipeline, request.window, dict(request.filters), request.session or None)
            await feed.admit()
        except ApiError as exc:
            _fail(grpc_context, exc)
        except ConnectionError as exc:
            _fail(grpc_context, ApiError(503, str(exc)))
        expires = float(who.claims.get("exp", 0))
        try:
            try:
                first = await feed.start()
            except (ConnectionError, OSError) as exc:
                _fail(grpc_context, ApiError(503, f"update channel unavailable: {type(exc).__name__}"))
            yield pb.WindowUpdate(type="subscribed", session=first["session"], replayed=first["replayed"])
            while True:
                if feed.hub.broken.is_set():
                    _fail(grpc_context, ApiError(503, f"update channel lost; resume with session {feed.session}"))
                left = expires - time.time()
                if left <= 0:
                    _fail(grpc_context, ApiError(401, "token expired"))
                try:
                    batch = await asyncio.wait_for(feed.next(), timeout=min(feed.sc.heartbeat, left))
                except asyncio.TimeoutError:
                    if time.time() < expires:
                        await feed.renew()
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


class _Servicer:
    """``GrpcMethods`` on a grpc.aio server: an ``Aborted`` call ends with its status through ``context.abort``."""

    def __init__(self, methods: GrpcMethods):
        self.m = methods

    async def _unary(self, fn, request, context):
        try:
            return await fn(request, context)
        except Aborted as exc:
            await context.abort(grpc_code(exc.status), exc.message)

    async def QueryWindows(self, request, context):
        return await self._unary(self.m.QueryWindows, request, context)

    async def QueryAggregates(self, request, context):
        return await self._unary(self.m.QueryAggregates, request, context)

    async def Ingest(self, request_iterator, context):
        return await self._unary(self.m.Ingest, request_iterator, context)

    async def Subscribe(self, request, context):
        try:
            async for update in self.m.Subscribe(request, context):
                yield update
        except Aborted as exc:
            await context.abort(grpc_code(exc.status), exc.message)


def _token_gate(core):
    """A server interceptor: a call without a valid token is refused from its metadata alone, before its request
    message is parsed."""
    import grpc

    from serve.auth import AuthError

    class TokenGate(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            auth = next((v for k, v in details.invocation_metadata or () if k.lower() == "authorization"), None)
            try:
                await core.auth.averify(auth)
            except AuthError as exc:
                code, message = grpc_code(exc.status), str(exc)
                core.metrics.request(f"grpc:{details.method.rsplit('/', 1)[-1]}", "grpc", code.name, 0.0)

                async def refuse(_request, context):
                    await context.abort(code, message)

                # no deserializer: the refused call's message is never parsed
                if details.method.endswith("/Ingest"):
                    return grpc.stream_unary_rpc_method_handler(refuse)
                if details.method.endswith("/Subscribe"):
                    return grpc.unary_stream_rpc_method_handler(refuse)
                return grpc.unary_unary_rpc_method_handler(refuse)
            return await continuation(details)

    return TokenGate()


async def start_grpc(methods: GrpcMethods, host: str, port: int, max_message_bytes: int):
    """A grpc.aio server on the running event loop serving ``methods`` on ``host:port`` only."""
    import grpc

    from serve.protos import raystream_pb2_grpc as pbg

    server = grpc.aio.server(interceptors=[_token_gate(methods.core)], options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", 64 << 20)])
    pbg.add_RaystreamServicer_to_server(_Servicer(methods), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server


def row_of(s: struct_pb2.Struct) -> dict:
    """A Struct row back to a dict (client side)."""
    return json_format.MessageToDict(s)
