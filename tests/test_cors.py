"""CORS (AGENT_RUNS_CORS_ORIGINS): headers on the API's answers only, never the host's."""

import json

import pytest
from flask import Flask

from agent_runs import AgentRuns, create_app
from agent_runs.config import cors_origins

from .conftest import make_token
from .sse import parse_stream

ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, idempotency-key, last-event-id",
}


@pytest.fixture
def cors_app(database_url):
    app = create_app(
        {
            "AGENT_RUNS_DATABASE_URL": database_url,
            "AGENT_RUNS_CORS_ORIGINS": f"{ORIGIN}, http://127.0.0.1:8001",
            "TESTING": True,
        }
    )
    yield app
    app.extensions["agent_runs"].executor.shutdown(timeout=10)


def cors_headers(response):
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def test_without_the_setting_no_cors_headers(client, auth):
    answer = client.get("/api/agents", headers={**auth, "Origin": ORIGIN})
    assert answer.status_code == 200 and cors_headers(answer) == {}
    preflight = client.options("/api/agents/assistant/runs/stream", headers=PREFLIGHT)
    assert cors_headers(preflight) == {}


def test_a_preflight_answers_the_methods_and_headers_the_api_uses(cors_app):
    client = cors_app.test_client()
    answer = client.options("/api/agents/assistant/runs/stream", headers=PREFLIGHT)
    assert answer.status_code == 200
    headers = cors_headers(answer)
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed
    methods = set(headers["Access-Control-Allow-Methods"].replace(" ", "").split(","))
    assert {"GET", "POST", "DELETE", "PUT", "PATCH"} <= methods
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in answer.headers.get("Vary", "")


def test_answers_to_an_allowed_origin_carry_the_headers(cors_app):
    client = cors_app.test_client()
    auth = make_token()
    answer = client.get("/api/agents", headers={**auth, "Origin": ORIGIN})
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = answer.headers["Access-Control-Expose-Headers"]
    assert "Retry-After" in exposed and "ETag" in exposed
    assert "Access-Control-Allow-Credentials" not in answer.headers
    # Errors too, so a page can read what went wrong.
    refused = client.get("/api/agents", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_streams_carry_the_headers(cors_app):
    client = cors_app.test_client()
    auth = make_token()
    stream = client.post(
        "/api/agents/assistant/runs/stream",
        headers={**auth, "Origin": ORIGIN},
        json={"message": "hello"},
    )
    assert stream.mimetype == "text/event-stream"
    assert stream.headers["Access-Control-Allow-Origin"] == ORIGIN
    events = parse_stream(stream.get_data(as_text=True))
    assert events[-1]["event"] == "STOP"
    run_id = json.loads(events[0]["data"])["runId"]
    token = client.post(
        f"/api/agents/assistant/runs/{run_id}/events/token", headers={**auth, "Origin": ORIGIN}
    )
    assert token.headers["Access-Control-Allow-Origin"] == ORIGIN
    replay = client.get(token.json["url"], headers={"Origin": ORIGIN})
    assert replay.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert parse_stream(replay.get_data(as_text=True)) == events


def test_other_origins_get_no_headers(cors_app):
    client = cors_app.test_client()
    auth = make_token()
    answer = client.get("/api/agents", headers={**auth, "Origin": "https://evil.example.com"})
    assert answer.status_code == 200 and cors_headers(answer) == {}
    preflight = client.options(
        "/api/agents/assistant/runs/stream",
        headers={**PREFLIGHT, "Origin": "https://evil.example.com"},
    )
    assert cors_headers(preflight) == {}
    # A request with no Origin (not a browser's cross-origin one) gets none either.
    assert cors_headers(client.get("/api/agents", headers=auth)) == {}


def test_any_origin_with_a_star(database_url):
    app = create_app(
        {"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_CORS_ORIGINS": "*", "TESTING": True}
    )
    answer = app.test_client().get("/api/agents", headers={**make_token(), "Origin": ORIGIN})
    assert answer.headers["Access-Control-Allow-Origin"] in (ORIGIN, "*")
    app.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_the_host_applications_routes_are_left_alone(database_url):
    host = Flask("host")
    host.config["AGENT_RUNS_DATABASE_URL"] = database_url
    host.config["AGENT_RUNS_CORS_ORIGINS"] = ORIGIN

    @host.route("/hello", methods=["GET", "POST"])
    def hello():
        return "hello from the host"

    AgentRuns(host, url_prefix="/assistants")
    client = host.test_client()
    try:
        mine = client.get("/hello", headers={"Origin": ORIGIN})
        assert mine.get_data(as_text=True) == "hello from the host"
        assert cors_headers(mine) == {}
        assert cors_headers(client.options("/hello", headers=PREFLIGHT)) == {}
        api = client.get("/assistants/agents", headers={**make_token(), "Origin": ORIGIN})
        assert api.status_code == 200
        assert api.headers["Access-Control-Allow-Origin"] == ORIGIN
        preflight = client.options("/assistants/agents/assistant/runs/stream", headers=PREFLIGHT)
        assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    finally:
        host.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_two_applications_keep_their_own_origins(cors_app, database_url):
    # The blueprint is one object for every application that mounts it.
    plain = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "TESTING": True})
    try:
        auth = make_token()
        headers = {**auth, "Origin": ORIGIN}
        assert cors_headers(plain.test_client().get("/api/agents", headers=headers)) == {}
        with_cors = cors_app.test_client().get("/api/agents", headers=headers)
        assert with_cors.headers["Access-Control-Allow-Origin"] == ORIGIN
    finally:
        plain.extensions["agent_runs"].executor.shutdown(timeout=10)


@pytest.mark.parametrize(
    "value", ["app.example.com", "https://app.example.com/", "https://a.example/path", "https://*"]
)
def test_a_setting_that_is_no_origin_fails_the_start(value):
    with pytest.raises(ValueError, match="AGENT_RUNS_CORS_ORIGINS"):
        cors_origins(value)


def test_origins_are_read_comma_separated():
    assert cors_origins(None) == [] and cors_origins(" , ") == []
    assert cors_origins("https://a.example, http://127.0.0.1:8080 ,*") == [
        "https://a.example",
        "http://127.0.0.1:8080",
        "*",
    ]
