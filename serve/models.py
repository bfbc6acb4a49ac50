"""Request and response bodies of the REST API (one place, so the OpenAPI document and the handlers agree).

Request bodies forbid unknown fields: a client that sends ``tenant_id``,
``owner`` or ``revision`` where the API does not take them gets a 400 naming
the field, never a silently applied or ignored property.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ERRORS", "Problem", "ScaleRequest", "SchemaRequest", "errors"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """Every error response: what went wrong, for a person to read, and the parameter at fault when there is one."""

    detail: str
    parameter: Optional[str] = None


class ScaleRequest(_Body):
    """``POST /v1/pipelines/{name}/scale``."""

    workers: int = Field(ge=1, le=256, description="worker actors after the change")


class SchemaRequest(_Body):
    """``POST /v1/schemas/{subject}``: a JSON Schema (an object) or a base64 protobuf FileDescriptorSet with its message."""

    type: Literal["json", "protobuf"] = Field(default="json", description="schema kind")
    schema_: Union[dict[str, Any], str] = Field(alias="schema", description="the JSON Schema, or the base64 FileDescriptorSet")
    message: Optional[str] = Field(default=None, max_length=512, description="protobuf: the record message's full name")

    @field_validator("schema_", "message")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        # the registry keeps schemas in PostgreSQL, whose text cannot hold NUL: refused here as a 400, not a 500
        if _has_nul(v):
            raise ValueError("must not contain NUL (\\u0000) characters")
        return v


def _has_nul(v: Any) -> bool:
    if isinstance(v, str):
        return "\x00" in v
    if isinstance(v, dict):
        return any(_has_nul(k) or _has_nul(x) for k, x in v.items())
    if isinstance(v, list):
        return any(_has_nul(x) for x in v)
    return False


ERRORS = {400: "a filter, field, cursor, parameter or body this API does not accept (the parameter is named)",
          401: "no token, or an invalid or expired one", 403: "the token may not do this (another tenant, a missing scope)",
          404: "no such pipeline, window or schema", 409: "incompatible schema", 413: "request body or record count over the limit",
          429: "rate limit of the tenant and endpoint reached (see Retry-After)",
          503: "a store, the broker or the pipeline is unavailable (see Retry-After when given)"}


def errors(*codes: int) -> dict:
    """The ``responses`` entries of these error codes for a route's OpenAPI document."""
    return {c: {"model": Problem, "description": ERRORS[c]} for c in codes}
