"""The one error type of the serving layer, and how each protocol says it.

Every refusal — a bad parameter, no token, another tenant's data, a body over
the limit, an empty token bucket, a store that is down — is an ``ApiError``
with an HTTP-style status. REST answers it as JSON ``{"detail", "parameter"?}``
(with ``WWW-Authenticate`` on 401 and ``Retry-After`` on 429/503), gRPC as a
status code, WebSocket as close code ``4000 + status``. Nothing else reaches a
client: an unexpected exception is answered 500 with a correlation id only.
"""

from __future__ import annotations

__all__ = ["ApiError", "GRPC_CODES", "grpc_code", "http_headers", "problem"]


class ApiError(Exception):
    """A request that cannot be answered: ``status`` (400/401/403/404/409/413/429/503), why, and which parameter."""

    def __init__(self, status: int, message: str, *, parameter: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.parameter = parameter
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        return str(self)


def problem(exc: ApiError) -> dict:
    """The JSON body of an error response."""
    body: dict = {"detail": exc.message}
    if exc.parameter is not None:
        body["parameter"] = exc.parameter
    return body


def http_headers(exc: ApiError) -> dict[str, str]:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return headers


# gRPC status names by HTTP status (imported lazily by the gRPC layer as grpc.StatusCode members)
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              409: "FAILED_PRECONDITION", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


def grpc_code(status: int):
    import grpc

    return getattr(grpc.StatusCode, GRPC_CODES.get(status, "INTERNAL"))
