"""schemathesis against the OpenAPI document: generated requests (valid and invalid: positive and
negative modes) to every operation of the REST app with a real PostgreSQL store, registry and
broker behind it, and stateful sequences following the document's links (register a schema, read
it back). No answer may be a server error, and every answer must match the document."""

from __future__ import annotations

import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import checks

from serve.app import build_app
from serve.config import IngestConfig
from tests.serve.test_rest import keys, served  # noqa: F401  (module fixtures)


@pytest.fixture(scope="module")
def api(served, keys, broker):  # noqa: F811
    _, _, cfg = served
    broker.extra["broker"].create_topic("openapi-events", 1)
    cfg = cfg.model_copy(update={"ingest": IngestConfig(bootstrap_servers=broker.address, topic="openapi-events",
                                                        schema_file=None, subject="openapi-events-value")})
    from pipeline.io.registry import Registry
    from pipeline.schemas import schema_of

    Registry(cfg.postgres_dsn.get_secret_value()).register("openapi-events-value", schema_of(
        {"type": "object", "required": ["ts"], "properties": {"ts": {"type": "integer"}, "tenant_id": {"type": "string"}}}))
    app = build_app(cfg)
    with TestClient(app):  # keeps one event loop for the app's async pool
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def token(keys):  # noqa: F811
    return keys.token("acme", scope="schemas:write", exp=int(time.time()) + 3600)


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_per_its_document(case, token):
    if case.path == "/v1/schemas/{subject}" and case.method == "POST":
        # registered subjects stay: keep generated ones apart from the real ones
        case.path_parameters = {**(case.path_parameters or {}), "subject": f"fuzz-{case.path_parameters.get('subject', '')}"[:200]}
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"},
                           checks=[checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                                   checks.response_schema_conformance])


def test_stateful_sequences_follow_the_links(api, token):
    from hypothesis.stateful import run_state_machine_as_test

    machine = api.as_state_machine()

    class Authorized(machine):
        def get_call_kwargs(self, case):
            if case.path == "/v1/schemas/{subject}" and case.method == "POST":
                case.path_parameters = {**(case.path_parameters or {}),
                                        "subject": f"fuzz-{case.path_parameters.get('subject', '')}"[:200]}
            return {"headers": {"Authorization": f"Bearer {token}"}}

        def validate_response(self, response, case, **kwargs):
            case.validate_response(response, checks=[checks.not_a_server_error, checks.status_code_conformance,
                                                     checks.content_type_conformance, checks.response_schema_conformance])

    run_state_machine_as_test(Authorized, settings=settings(max_examples=15, stateful_step_count=5, deadline=None,
                                                            suppress_health_check=list(HealthCheck)))
