"""Configuration of the serving layer (``raystream serve --config serve.yaml``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from pipeline.spec import PipelineSpec, SpecError, load_spec

__all__ = ["ServeConfig", "load_config"]


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthConfig(_M):
    jwks_file: str = Field(description="JWKS document with the RS256/ES256 verification keys")
    issuer: str = Field(description="required 'iss'")
    audience: str = Field(description="required 'aud'")
    tenant_claim: str = Field(default="tenant", description="claim naming the caller's tenant")
    hs256_secret: SecretStr | None = Field(default=None, description="development only: also accept HS256 tokens signed with this")


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


class ServeConfig(_M):
    host: str = Field(default="127.0.0.1", description="HTTP listen address of the Serve proxy")
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int | None = Field(default=9000, ge=0, le=65535, description="gRPC proxy port (null: no gRPC)")
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
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)

    def specs(self) -> dict[str, PipelineSpec]:
        out = {}
        for p in self.pipelines:
            s = load_spec(p)
            out[s.name] = s
        return out


def load_config(path: str | Path) -> ServeConfig:
    try:
        return ServeConfig.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError([f"{path}: {exc}"]) from None
