"""GET /api/openapi.json: a valid OpenAPI 3.1 document of the whole API; answers match it."""

import jsonschema
import pytest
from flask import Flask
from openapi_spec_validator import validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from agent_runs import AgentRuns, create_app
from agent_runs.runtime.events import EventType

from .conftest import make_token

DOCUMENT = "/api/openapi.json"
PROBLEM = {"$ref": "#/components/schemas/Problem"}
PROBLEM_TYPE = "application/problem+json"


def validator(document, schema):
    """A JSON Schema 2020-12 validator for ``schema``, its $refs resolved in the document."""
    contents = {**document, "x-checked": schema}
    registry = Registry().with_resource("urn:openapi", DRAFT202012.create_resource(contents))
    return jsonschema.Draft202012Validator({"$ref": "urn:openapi#/x-checked"}, registry=registry)


def response_schema(document, path, method, status, media="application/json"):
    response = document["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    return response["content"][media]["schema"]


def assert_matches(document, path, method, response):
    media = response.mimetype
    schema = response_schema(document, path, method, response.status_code, media)
    validator(document, schema).validate(response.json)


def test_the_document_needs_no_token_and_is_valid_openapi_3_1(client):
    response = client.get(DOCUMENT)
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.json
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_route_of_the_api_is_described(app, client):
    document = client.get(DOCUMENT).json
    described = {
        (method.upper(), "/api" + path.replace("{", "<").replace("}", ">"))
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    routes = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("agent_runs.")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    # Flask names path variables in snake_case, the API in camelCase.
    for name, camel in (
        ("agent_id", "agentId"),
        ("run_id", "runId"),
        ("session_id", "sessionId"),
        ("webhook_id", "webhookId"),
    ):
        routes = {(m, r.replace(f"<{name}>", f"<{camel}>")) for m, r in routes}
    assert described == routes


# What anyone may call: the document itself and the health checks.
PUBLIC_PATHS = ("/openapi.json", "/healthz", "/readyz", "/playground", "/playground/{name}")
# Read with a bearer token, or with a stream token in the URL (a browser's EventSource).
STREAM_TOKEN_PATHS = ("/agents/{agentId}/runs/{runId}/events",)


def test_every_operation_but_the_public_ones_takes_the_bearer_token(client):
    document = client.get(DOCUMENT).json
    assert document["security"] == [{"bearerAuth": []}]
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
    }
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            if path in PUBLIC_PATHS:
                assert operation["security"] == [] and "401" not in operation["responses"]
            elif path in STREAM_TOKEN_PATHS:
                assert operation["security"] == [{"bearerAuth": []}, {"streamToken": []}]
                assert {"401", "403", "429"} <= set(operation["responses"]), (method, path)
            else:
                assert "security" not in operation
                assert {"401", "403", "429"} <= set(operation["responses"]), (method, path)


def test_errors_are_documented_as_problem_documents(client):
    document = client.get(DOCUMENT).json
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert set(problem["properties"]) == {"type", "title", "status", "detail", "errors"}
    start = document["paths"]["/agents/{agentId}/runs"]["post"]["responses"]
    assert set(start) == {"200", "400", "401", "403", "404", "409", "413", "415", "422", "429"}
    for status in ("400", "422", "429"):
        schema = response_schema(document, "/agents/{agentId}/runs", "post", status, PROBLEM_TYPE)
        assert schema == PROBLEM
    retry_after = document["components"]["responses"]["TooManyRequests"]["headers"]
    assert "Retry-After" in retry_after


def test_limits_and_agents_come_from_the_app(database_url, agents):
    agents("weather", model="scripted")
    app = create_app(
        {
            "AGENT_RUNS_DATABASE_URL": database_url,
            "AGENT_RUNS_MAX_MESSAGE_LENGTH": 500,
            "AGENT_RUNS_MAX_MEDIA": 2,
            "AGENT_RUNS_MAX_BATCH_IDS": 7,
        }
    )
    try:
        document = app.test_client().get(DOCUMENT).json
    finally:
        app.extensions["agent_runs"].executor.shutdown(timeout=10)
    request = document["components"]["schemas"]["RunRequest"]
    assert request["properties"]["message"]["maxLength"] == 500
    assert request["properties"]["media"]["maxItems"] == 2
    assert request["additionalProperties"] is False and request["required"] == ["message"]
    batch = document["paths"]["/agents/{agentId}/runs/status"]["get"]["parameters"]
    assert "at most 7" in batch[0]["description"]
    agent_id = document["paths"]["/agents/{agentId}"]["parameters"][0]["schema"]
    server_agents = agent_id["anyOf"][0]["enum"]
    assert "weather" in server_agents and "finance_agent" in server_agents


def test_the_document_is_built_once_per_app(app, client):
    first = client.get(DOCUMENT).json
    assert app.extensions["agent_runs"].openapi_document is not None
    built = app.extensions["agent_runs"].openapi_document
    assert client.get(DOCUMENT).json == first
    assert app.extensions["agent_runs"].openapi_document is built


def test_a_host_app_gets_its_own_prefix(database_url):
    host = Flask("host")
    host.config["AGENT_RUNS_DATABASE_URL"] = database_url
    AgentRuns(host, url_prefix="/assistants")
    try:
        response = host.test_client().get("/assistants/openapi.json")
    finally:
        host.extensions["agent_runs"].executor.shutdown(timeout=10)
    assert response.status_code == 200
    assert response.json["servers"] == [{"url": "/assistants"}]


def test_streams_are_documented_event_by_event(client):
    document = client.get(DOCUMENT).json
    schema = response_schema(
        document, "/agents/{agentId}/runs/stream", "post", 200, "text/event-stream"
    )
    assert schema["properties"]["data"]["contentMediaType"] == "application/json"
    event = document["components"]["schemas"]["AgentStreamEvent"]
    assert event["properties"]["event"]["enum"] == list(EventType.ALL)
    assert set(event["required"]) == {"event", "data", "timestamp"}


def test_answers_match_the_document(client, auth):
    document = client.get(DOCUMENT).json
    assert_matches(document, "/agents", "get", client.get("/api/agents", headers=auth))
    run = client.post(
        "/api/agents/finance_agent/runs",
        headers=auth,
        json={"message": "What is NVDA at?", "generateFollowups": True},
    )
    assert run.status_code == 200
    assert_matches(document, "/agents/{agentId}/runs", "post", run)
    run_id, session_id = run.json["runId"], run.json["sessionId"]
    status = client.get(f"/api/agents/finance_agent/runs/{run_id}/status", headers=auth)
    assert_matches(document, "/agents/{agentId}/runs/{runId}/status", "get", status)
    assert status.json["userId"] is None  # documented as string or null
    batch = client.get(f"/api/agents/finance_agent/runs/status?runIds={run_id}", headers=auth)
    assert_matches(document, "/agents/{agentId}/runs/status", "get", batch)
    queued = client.post(
        "/api/agents/assistant/runs/background", headers=auth, json={"message": "hi"}
    )
    assert_matches(document, "/agents/{agentId}/runs/background", "post", queued)
    for path, url in (
        ("/sessions", "/api/sessions?limit=1"),
        ("/sessions/{sessionId}", f"/api/sessions/{session_id}"),
        ("/sessions/{sessionId}/runs", f"/api/sessions/{session_id}/runs"),
    ):
        assert_matches(document, path, "get", client.get(url, headers=auth))
    missing = client.get("/api/agents/nobody", headers=auth)
    assert_matches(document, "/agents/{agentId}", "get", missing)
    invalid = client.post("/api/agents/finance_agent/runs", headers=auth, json={"x": 1})
    assert_matches(document, "/agents/{agentId}/runs", "post", invalid)
    assert_matches(document, "/agents", "get", client.get("/api/agents"))
    for path in ("/healthz", "/readyz"):
        assert_matches(document, path, "get", client.get("/api" + path))


@pytest.mark.parametrize("user", [None, "alice"])
def test_a_run_of_a_user_token_matches_too(app, client, user):
    headers = make_token("acme", user)
    document = client.get(DOCUMENT).json
    run = client.post("/api/agents/assistant/runs", headers=headers, json={"message": "hi"})
    assert_matches(document, "/agents/{agentId}/runs", "post", run)
