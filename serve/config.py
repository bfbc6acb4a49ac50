"""Configuration of the serving layer (``raystream serve --config serve.yaml``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pipeline.spec import PipelineSpec, SpecError, load_spec

__all__ = ["ServeConfig", "load_config"]


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AuthConfig(_M):
    jwks_file: str | None = Field(default=None, description="JWKS document with the RS256/ES256 verification keys (re-read on an unknown kid)")
    jwks_url: str | None = Field(default=None, description="or the URL of the identity provider's JWKS (https; refetched on an unknown kid)")
    jwks_refresh_min_s: float = Field(default=30.0, ge=1, description="at most one JWKS refetch per this many seconds")
    issuer: str = Field(description="required 'iss'")
    audience: str = Field(description="required 'aud'")
    tenant_claim: str = Field(default="tenant", description="claim naming the caller's tenant")
    hs256_secret: SecretStr | None = Field(default=None, description=(
        "development only: also accept HS256 tokens signed with this (at least 32 bytes; refused on a non-loopback host)"))

    @field_validator("hs256_secret")
    @classmethod
    def _long_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().encode()) < 32:
            raise ValueError("an HS256 secret shorter than 32 bytes can be brute-forced; use a longer one or RS256/ES256 keys")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "AuthConfig":
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwks_file and jwks_url")
        if self.jwks_url is not None and not self.jwks_url.startswith("https://"):
            from urllib.parse import urlsplit

            if not (self.jwks_url.startswith("http://") and is_loopback(urlsplit(self.jwks_url).hostname or "")):
                raise ValueError("jwks_url must be https:// (plain http only on loopback)")
        return self

    @property
    def jwks(self) -> str:
        return self.jwks_url or self.jwks_file


class Autoscaling(_M):
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    max_ongoing_requests: int = Field(default=2000, ge=1, description="per replica; every open WebSocket or gRPC stream counts as one")


class RateLimitConfig(_M):
    redis_url: SecretStr = Field(description="Redis holding the token buckets (shared by all replicas)")
    capacity: int = Field(default=100, ge=1, description="burst size per tenant and endpoint")
    per_second: float = Field(default=50.0, gt=0, description="refill rate per tenant and endpoint")
    endpoints: dict[str, tuple[int, float]] = Field(default_factory=dict, description="endpoint name -> (capacity, per_second)")


class TracingConfig(_M):
    otlp_endpoint: str = Field(pattern=r"^https?://", description="OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces")
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0, description="share of ingest requests traced")


class IngestConfig(_M):
    bootstrap_servers: str = Field(description="Kafka bootstrap servers")
    topic: str = Field(description="topic records are produced to, keyed by tenant")
    subject: str | None = Field(default=None, description="registry subject records are validated against (latest version)")
    schema_file: str | None = Field(default=None, description="or a JSON Schema file")
    tenant_field: str = Field(default="tenant_id", description="record field naming the tenant (filled in from the token when absent)")
    max_records: int = Field(default=10_000, ge=1, description="records per request")


class StreamConfig(_M):
    redis_url: SecretStr = Field(description="Redis of the pipelines' redis sinks (their pub/sub channels and hashes)")
    prefixes: dict[str, str] = Field(default_factory=dict, description="pipeline -> its redis sink prefix (default raystream:<pipeline>:)")
    heartbeat: float = Field(default=15.0, gt=0, description="seconds between pings; two missed pongs close the socket")
    max_pending: int = Field(default=256, ge=1, description="updates buffered per client; beyond, a slow client gets the latest state and a notice")
    session_ttl: float = Field(default=3600.0, gt=0, description="seconds a resumable session is kept in Redis")
    max_streams_per_tenant: int = Field(default=100, ge=1, description=(
        "open WebSocket and gRPC subscriptions of one tenant over all replicas; beyond, 429"))
    max_message_bytes: int = Field(default=65_536, ge=256, description="largest WebSocket message a client may send (close 1009)")


class ServeConfig(_M):
    host: str = Field(default="127.0.0.1", description="listen address of every listener (Serve's HTTP proxy, direct_port, gRPC)")
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int | None = Field(default=9000, ge=0, le=65535, description=(
        "gRPC port, served by each replica itself on host (SO_REUSEPORT), null: no gRPC"))
    grpc_proxy: bool = Field(default=False, description=(
        "serve gRPC through Ray Serve's gRPC proxy instead (it binds every interface, [::], whatever host says)"))
    direct_port: int | None = Field(default=None, ge=0, le=65535, description=(
        "each replica also serves the same REST and WebSocket app on this port itself (SO_REUSEPORT: the replicas "
        "of a node share it), skipping the Serve proxy's relay; Serve's autoscaling does not see this traffic"))
    postgres_dsn: SecretStr = Field(description="the PostgreSQL sink's database (closed windows) and the schema registry")
    table_prefix: str = Field(default="raystream_", description="as the pipelines' postgres sinks")
    pipelines: list[str] = Field(default_factory=list, description="pipeline spec files whose windows are served")
    tenant_key: str = Field(default="tenant_id", description="group key holding the tenant; every read is scoped by it")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="larger request bodies get 413")
    max_page_size: int = Field(default=1000, ge=1, le=100_000)
    auth: AuthConfig
    stream: StreamConfig | None = Field(default=None, description="WebSocket /v1/stream")
    ingest: IngestConfig | None = Field(default=None, description="POST /v1/events")
    rate_limit: RateLimitConfig | None = Field(default=None, description="token buckets per tenant and endpoint (429 + Retry-After)")
    tracing: TracingConfig | None = Field(default=None, description="OpenTelemetry spans of ingest requests (their context "
                                          "travels in each record's traceparent header to the pipelines' batches)")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)

    @model_validator(mode="after")
    def _secure(self) -> "ServeConfig":
        if not is_loopback(self.host):
            if self.auth.hs256_secret is not None:
                raise ValueError(f"host {self.host} is not loopback: the development HS256 secret is refused there")
            if self.grpc_proxy:
                raise ValueError("grpc_proxy binds every interface; it is refused unless host is loopback too")
        return self

    def specs(self) -> dict[str, PipelineSpec]:
        out = {}
        for p in self.pipelines:
            s = load_spec(p)
            out[s.name] = s
        return out


def load_config(path: str | Path) -> ServeConfig:
    """Read a serve config (YAML); ``${VAR}`` and ``${VAR:-default}`` come from the environment, as in pipeline specs."""
    import os

    from pipeline.spec import _expand

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError([f"{path}: {exc}"]) from None
    problems: list[str] = []
    data = _expand(data, "", problems, dict(os.environ))
    if problems:
        raise SpecError(problems)
    return ServeConfig.model_validate(data)
