"""Bad input answers a problem+json 4xx that names what is wrong, and stores nothing."""

import json

import pytest

from agent_runs.db import database
from agent_runs.models import Run

from .conftest import make_token

URL = "/api/agents/finance_agent/runs"


def assert_problem(response, status, *words):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.json
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    text = json.dumps(body)
    for word in words:
        assert word in text, (word, body)
    return body


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "message"),
        ({"message": ""}, "message"),
        ({"message": 42}, "message"),
        ({"message": "hi", "colour": "red"}, "colour"),
        ({"message": "hi", "sessionId": "has spaces"}, "sessionId"),
        ({"message": "hi", "sessionId": "x" * 129}, "sessionId"),
        ({"message": "hi", "generateFollowups": "perhaps"}, "generateFollowups"),
        ({"message": "hi", "media": [{"type": "image/png"}]}, "media"),
        ({"message": "hi", "media": [{"type": "not a mime", "data": "aGk="}]}, "media"),
        ({"message": "hi", "media": {"type": "image/png"}}, "media"),
        ({"message": "hi", "options": {"temperature": 2.5}}, "options.temperature"),
        ({"message": "hi", "options": {"temperature": -1}}, "options.temperature"),
        ({"message": "hi", "options": {"maxTokens": 0}}, "options.maxTokens"),
        ({"message": "hi", "options": {"maxTokens": "5"}}, "options.maxTokens"),
        ({"message": "hi", "options": {"maxTokens": 1.5}}, "options.maxTokens"),
        ({"message": "hi", "options": {"seed": 1}}, "options.seed"),
        ({"message": "hi", "options": {"model": "nonsense:model"}}, "options.model"),
        ({"message": "hi", "options": {"model": ""}}, "options.model"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(client, auth, body, field):
    for url in (URL, URL + "/stream"):
        problem = assert_problem(client.post(url, headers=auth, json=body), 422, field)
        assert "errors" in problem
    with database.connection_context():
        assert Run.select().count() == 0


def test_message_and_media_bounds_come_from_config(app, client, auth):
    limits = app.extensions["agent_runs"].config
    long = "x" * (limits["AGENT_RUNS_MAX_MESSAGE_LENGTH"] + 1)
    assert_problem(client.post(URL, headers=auth, json={"message": long}), 422, "at most")
    media = [{"type": "image/png", "data": "aGk="}] * (limits["AGENT_RUNS_MAX_MEDIA"] + 1)
    body = {"message": "hi", "media": media}
    assert_problem(client.post(URL, headers=auth, json=body), 422, "media", "At most")


def test_a_model_the_agent_does_not_allow_is_refused(client, auth):
    body = {"message": "hi", "options": {"model": "scripted:other"}}
    assert_problem(client.post(URL, headers=auth, json=body), 422, "options.model", "allow")


def test_body_must_be_a_json_object(client, auth):
    assert_problem(
        client.post(URL, headers=auth, data="{not json", content_type="application/json"),
        400,
        "not valid JSON",
    )
    assert_problem(client.post(URL, headers=auth, json=["a list"]), 422, "JSON object")
    assert_problem(client.post(URL, headers=auth, data="message=hi"), 415, "application/json")


def test_oversized_bodies_are_413(database_url):
    from agent_runs import create_app

    app = create_app(
        {"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_MAX_CONTENT_LENGTH": 1000}
    )
    response = app.test_client().post(URL, headers=make_token(), json={"message": "x" * 2000})
    assert_problem(response, 413)


def test_body_identity_must_match_the_token(client, auth):
    assert_problem(
        client.post(URL, headers=auth, json={"message": "hi", "orgId": "globex"}), 403, "orgId"
    )
    alice = make_token("acme", "alice")
    assert_problem(
        client.post(URL, headers=alice, json={"message": "hi", "userId": "bob"}), 403, "userId"
    )
    ok = client.post(
        "/api/agents/assistant/runs",
        headers=alice,
        json={"message": "hi", "userId": "alice", "orgId": "acme"},
    )
    assert ok.status_code == 200


def test_org_tokens_may_act_for_a_user(client, auth):
    run = client.post(
        "/api/agents/assistant/runs", headers=auth, json={"message": "hi", "userId": "carol"}
    ).json
    status = client.get(f"/api/agents/assistant/runs/{run['runId']}/status", headers=auth)
    assert status.json["userId"] == "carol"


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer ar_not_a_real_token", "ar_x"],
)
def test_requests_without_a_valid_token_are_401(client, header):
    headers = {} if header is None else {"Authorization": header}
    for method, url in [("get", "/api/agents"), ("post", URL), ("get", URL + "/run_x/status")]:
        response = getattr(client, method)(url, headers=headers, json={"message": "hi"})
        assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_and_expired_tokens_are_refused(client, auth):
    from agent_runs.models import ApiToken, utcnow

    assert client.get("/api/agents", headers=auth).status_code == 200
    with database.connection_context():
        ApiToken.update(revoked_at=utcnow()).execute()
    assert_problem(client.get("/api/agents", headers=auth), 401)
    expiring = make_token()
    with database.connection_context():
        ApiToken.update(expires_at=utcnow()).where(ApiToken.revoked_at.is_null()).execute()
    assert_problem(client.get("/api/agents", headers=expiring), 401)


def test_unknown_routes_and_methods_are_problems(client, auth):
    assert_problem(client.get("/api/nowhere", headers=auth), 404)
    response = client.get(URL + "/stream", headers=auth)
    assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]
