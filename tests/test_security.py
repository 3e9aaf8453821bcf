"""Tenancy and security: scopes, JWTs, limits, and isolation across every endpoint."""

import datetime
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import agent_runs
from agent_runs import create_app
from agent_runs.auth import create_token
from agent_runs.db import database
from agent_runs.runtime.agents import unregister_agent

from .conftest import BOTH_DATABASES, make_token
from .sse import parse_stream

pytestmark = BOTH_DATABASES


def token_with(**kwargs):
    with database.connection_context():
        _, secret = create_token("acme", **kwargs)
    return {"Authorization": f"Bearer {secret}"}


# Scopes ----------------------------------------------------------------------------------


def test_a_read_only_token_reads_but_cannot_start_runs(client, auth):
    run = client.post("/api/agents/assistant/runs", headers=auth, json={"message": "hi"}).json
    reader = token_with(scopes=("runs:read",))
    assert client.get("/api/agents", headers=reader).status_code == 200
    url = f"/api/agents/assistant/runs/{run['runId']}"
    assert client.get(f"{url}/status", headers=reader).status_code == 200
    for method, path, body in [
        ("post", "/api/agents/assistant/runs", {"message": "hi"}),
        ("post", "/api/agents/assistant/runs/stream", {"message": "hi"}),
        ("delete", url, None),
        ("delete", f"/api/sessions/{run['sessionId']}", None),
    ]:
        response = getattr(client, method)(path, headers=reader, json=body)
        assert response.status_code == 403, (method, path)
        assert "runs:write" in response.json["detail"]


def test_a_write_only_token_cannot_read_and_admin_can_do_both(client):
    writer = token_with(scopes=("runs:write",))
    assert (
        client.post(
            "/api/agents/assistant/runs", headers=writer, json={"message": "hi"}
        ).status_code
        == 200
    )
    assert client.get("/api/agents", headers=writer).status_code == 403
    admin = token_with(scopes=("admin",))
    assert client.get("/api/agents", headers=admin).status_code == 200
    assert (
        client.post("/api/agents/assistant/runs", headers=admin, json={"message": "hi"}).status_code
        == 200
    )


def test_unknown_scopes_are_refused_when_creating_a_token(app):
    with database.connection_context(), pytest.raises(ValueError, match="unknown scopes"):
        create_token("acme", scopes=("runs:everything",))


def test_cli_creates_scoped_expiring_tokens(app, runner, client):
    result = runner.invoke(
        args=["tokens", "create", "--org", "acme", "--scope", "runs:read", "--expires-in", "1h"]
    )
    assert result.exit_code == 0, result.output
    secret = result.output.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/agents", headers=headers).status_code == 200
    assert (
        client.post(
            "/api/agents/assistant/runs", headers=headers, json={"message": "hi"}
        ).status_code
        == 403
    )
    listing = runner.invoke(args=["tokens", "list"]).output
    assert "scopes=runs:read\tactive until" in listing
    bad = runner.invoke(args=["tokens", "create", "--org", "a", "--expires-in", "soon"])
    assert bad.exit_code != 0 and "duration" in bad.output


# JWTs ------------------------------------------------------------------------------------

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


@pytest.fixture
def jwt_app(database_url):
    app = create_app(
        {
            "AGENT_RUNS_DATABASE_URL": database_url,
            "AGENT_RUNS_JWT_SECRET": SECRET,
            "AGENT_RUNS_JWT_AUDIENCE": "agent-runs",
            "AGENT_RUNS_JWT_ISSUER": "https://idp.example",
        }
    )
    yield app
    app.extensions["agent_runs"].executor.shutdown(timeout=10)


def bearer(claims, key=SECRET, algorithm="HS256"):
    base = {
        "aud": "agent-runs",
        "iss": "https://idp.example",
        "exp": datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5),
    }
    return {"Authorization": f"Bearer {jwt.encode({**base, **claims}, key, algorithm=algorithm)}"}


def test_jwt_claims_map_to_org_user_and_scopes(jwt_app):
    client = jwt_app.test_client()
    alice = bearer({"org_id": "acme", "sub": "alice", "scope": "runs:read runs:write"})
    run = client.post("/api/agents/assistant/runs", headers=alice, json={"message": "hi"}).json
    status = client.get(f"/api/agents/assistant/runs/{run['runId']}/status", headers=alice).json
    assert status["orgId"] == "acme" and status["userId"] == "alice"
    bob = bearer({"org_id": "acme", "sub": "bob"})
    assert (
        client.get(f"/api/agents/assistant/runs/{run['runId']}/status", headers=bob).status_code
        == 404
    )
    reader = bearer({"org_id": "acme", "sub": "carol", "scope": ["runs:read"]})
    assert (
        client.post(
            "/api/agents/assistant/runs", headers=reader, json={"message": "hi"}
        ).status_code
        == 403
    )
    # The server's own tokens keep working beside JWTs.
    assert client.get("/api/agents", headers=make_token()).status_code == 200


@pytest.mark.parametrize(
    "claims, key, says",
    [
        ({"org_id": "acme", "exp": 1}, SECRET, "expired"),
        ({"org_id": "acme", "aud": "someone-else"}, SECRET, "audience"),
        ({"org_id": "acme", "iss": "https://evil.example"}, SECRET, "issuer"),
        ({"sub": "alice"}, SECRET, "org_id"),
        ({"org_id": "acme"}, "another-secret-that-is-long-enough-too", "Signature"),
        # Claims of the wrong shape, or ids no table could hold: 401, never a 500 later.
        ({"org_id": "acme", "scope": 5}, SECRET, "'scope' claim must be"),
        ({"org_id": "acme", "scope": ["runs:read", 7]}, SECRET, "'scope' claim must be"),
        ({"org_id": ["acme"]}, SECRET, "'org_id' claim must be a string"),
        ({"org_id": True}, SECRET, "'org_id' claim must be a string"),
        ({"org_id": "\ud800"}, SECRET, "valid text"),
        ({"org_id": "acme\x00"}, SECRET, "valid text"),
        ({"org_id": "a" * 129}, SECRET, "at most 128"),
        ({"org_id": "acme", "sub": {"id": 1}}, SECRET, "must be a string"),
    ],
)
def test_bad_jwts_are_401(jwt_app, claims, key, says):
    response = jwt_app.test_client().get("/api/agents", headers=bearer(claims, key))
    assert response.status_code == 401 and response.mimetype == "application/problem+json"
    assert says.lower() in response.json["detail"].lower()


def test_rs256_jwts_with_a_public_key(database_url, tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "idp.pem").write_bytes(pem)
    app = create_app(
        {
            "AGENT_RUNS_DATABASE_URL": database_url,
            "AGENT_RUNS_JWT_PUBLIC_KEY": str(tmp_path / "idp.pem"),
        }
    )
    client = app.test_client()
    claims = {"org_id": "acme", "exp": int(time.time()) + 60}
    good = jwt.encode(claims, private, algorithm="RS256")
    assert client.get("/api/agents", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    # A token signed with HS256 using the public key as secret must not pass.
    forged = jwt.encode(claims, "not-the-key-but-long-enough-for-hmac-usage", algorithm="HS256")
    assert (
        client.get("/api/agents", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    )


# Limits ----------------------------------------------------------------------------------


def test_per_token_rate_limit_answers_429_with_retry_after(database_url):
    app = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_RATE_LIMIT": 3})
    client = app.test_client()
    first, second = make_token(), make_token()
    statuses = [client.get("/api/agents", headers=first).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    limited = client.get("/api/agents", headers=first)
    assert limited.mimetype == "application/problem+json"
    assert 1 <= int(limited.headers["Retry-After"]) <= 20
    assert client.get("/api/agents", headers=second).status_code == 200


def test_per_org_cap_on_active_runs(database_url):
    agent_runs.register_agent("slowpoke", model_options={"delay": 0.05})
    app = create_app(
        {"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_MAX_ACTIVE_RUNS_PER_ORG": 1}
    )
    client = app.test_client()
    acme, globex = make_token("acme"), make_token("globex")
    try:
        running = client.post(
            "/api/agents/slowpoke/runs/stream", headers=acme, json={"message": "one"}
        )
        refused = client.post("/api/agents/slowpoke/runs", headers=acme, json={"message": "two"})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert "at once" in refused.json["detail"]
        assert (
            client.post(
                "/api/agents/slowpoke/runs", headers=globex, json={"message": "other org"}
            ).status_code
            == 200
        )
        running.get_data()
        assert (
            client.post(
                "/api/agents/slowpoke/runs", headers=acme, json={"message": "three"}
            ).status_code
            == 200
        )
    finally:
        unregister_agent("slowpoke")
        app.extensions["agent_runs"].executor.shutdown(timeout=10)


# Isolation -------------------------------------------------------------------------------


@pytest.fixture
def tenants(client):
    """Two organisations, each with two users; one run of every kind for acme's alice."""
    agent_runs.register_agent(
        "gated",
        tools=[
            agent_runs.tool(
                lambda amount: amount,
                name="pay",
                requires_approval=True,
                parameters={
                    "type": "object",
                    "properties": {"amount": {"type": "string"}},
                    "required": ["amount"],
                },
            )
        ],
    )
    people = {
        (org, user): make_token(org, user)
        for org in ("acme", "globex")
        for user in ("alice", "bob")
    }
    alice = people[("acme", "alice")]
    done = client.post(
        "/api/agents/assistant/runs",
        headers=alice,
        json={"message": "secret plans", "sessionId": "shared-id"},
    ).json
    paused = client.post("/api/agents/gated/runs", headers=alice, json={"message": "100"}).json
    yield people, done, paused
    unregister_agent("gated")


def test_every_endpoint_hides_another_tenants_data(client, tenants):
    people, done, paused = tenants
    run, session = done["runId"], done["sessionId"]
    for intruder in (
        people[("globex", "alice")],
        people[("globex", "bob")],
        people[("acme", "bob")],
    ):
        for method, path, body in [
            ("get", f"/api/agents/assistant/runs/{run}/status", None),
            ("get", f"/api/agents/assistant/runs/{run}/events", None),
            ("delete", f"/api/agents/assistant/runs/{run}", None),
            ("post", f"/api/agents/gated/runs/{paused['runId']}/continue", {"action": "APPROVE"}),
            ("delete", f"/api/agents/gated/runs/{paused['runId']}", None),
            ("get", f"/api/sessions/{session}", None),
            ("get", f"/api/sessions/{session}/runs", None),
            ("delete", f"/api/sessions/{session}", None),
        ]:
            response = getattr(client, method)(path, headers=intruder, json=body)
            assert response.status_code == 404, (method, path, response.status_code)
            assert "secret plans" not in response.get_data(as_text=True)
        batch = client.get(f"/api/agents/assistant/runs/status?runIds={run}", headers=intruder)
        assert batch.json == []
        listing = client.get("/api/sessions", headers=intruder).json
        assert session not in [item["id"] for item in listing["items"]]
    # Nothing the intruders tried changed anything.
    alice = people[("acme", "alice")]
    assert (
        client.get(f"/api/agents/gated/runs/{paused['runId']}/status", headers=alice).json["status"]
        == "PAUSED"
    )
    assert client.get(f"/api/sessions/{session}", headers=alice).status_code == 200


def test_the_same_session_id_in_another_org_is_another_conversation(client, tenants):
    people, done, _ = tenants
    mine = client.post(
        "/api/agents/assistant/runs",
        headers=people[("globex", "alice")],
        json={"message": "hello", "sessionId": done["sessionId"]},
    ).json
    assert mine["content"] == "You said: hello"  # no trace of acme's first turn


def test_bodies_naming_another_org_or_user_are_403_saying_so(client, tenants):
    people, _, _ = tenants
    alice = people[("acme", "alice")]
    for field, value in (("orgId", "globex"), ("userId", "bob")):
        response = client.post(
            "/api/agents/assistant/runs/stream", headers=alice, json={"message": "hi", field: value}
        )
        assert response.status_code == 403 and field in response.json["detail"]


def test_streams_carry_only_their_own_runs_events(client, tenants):
    people, done, _ = tenants
    text = client.post(
        "/api/agents/assistant/runs/stream",
        headers=people[("globex", "bob")],
        json={"message": "mine"},
    ).get_data(as_text=True)
    events = parse_stream(text)
    assert "secret plans" not in text
    assert {json.loads(events[0]["data"])["runId"]} != {done["runId"]}
