"""Stream tokens: POST .../events/token, then GET .../events?access_token= (RFC 6750 2.3)."""

import datetime
import json
import time
import urllib.parse

import jwt
import pytest

from agent_runs import create_app
from agent_runs.auth import STREAM_TOKEN_AUDIENCE, stream_token_key
from agent_runs.db import database
from agent_runs.models import ApiToken, SigningKey, utcnow

from .conftest import BOTH_DATABASES, make_token
from .sse import parse_stream

pytestmark = BOTH_DATABASES

BASE = "/api/agents"


def finished_run(client, auth, agent="finance_agent"):
    """Run the agent to its end; return its run id and its events."""
    text = client.post(
        f"{BASE}/{agent}/runs/stream", headers=auth, json={"message": "NVDA?"}
    ).get_data(as_text=True)
    events = parse_stream(text)
    return json.loads(events[0]["data"])["runId"], events


def stream_token(client, auth, run_id, agent="finance_agent"):
    response = client.post(f"{BASE}/{agent}/runs/{run_id}/events/token", headers=auth)
    assert response.status_code == 200, response.json
    return response.json


def assert_problem(response, status, *words):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    for word in words:
        assert word in response.json["detail"]


def test_a_stream_token_reads_its_runs_events_without_a_header(client, auth):
    run_id, events = finished_run(client, auth)
    answer = stream_token(client, auth, run_id)
    assert set(answer) == {"token", "expiresAt", "url"}
    path, _, query = answer["url"].partition("?")
    assert path == f"{BASE}/finance_agent/runs/{run_id}/events"
    assert urllib.parse.parse_qs(query) == {"access_token": [answer["token"]]}
    response = client.get(answer["url"])
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert parse_stream(response.get_data(as_text=True)) == events


def test_a_stream_token_expires_after_five_minutes_by_default(client, auth):
    run_id, _ = finished_run(client, auth)
    before = utcnow()
    answer = stream_token(client, auth, run_id)
    expires = datetime.datetime.fromisoformat(answer["expiresAt"].removesuffix("Z"))
    assert answer["expiresAt"].endswith("Z")
    assert datetime.timedelta(seconds=299) <= expires - before <= datetime.timedelta(seconds=302)
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert claims["exp"] == int(expires.replace(tzinfo=datetime.timezone.utc).timestamp())


def test_the_lifetime_is_a_setting(database_url):
    app = create_app(
        {
            "AGENT_RUNS_DATABASE_URL": database_url,
            "AGENT_RUNS_STREAM_TOKEN_TTL": 30,
            "TESTING": True,
        }
    )
    client = app.test_client()
    auth = make_token()
    run_id, _ = finished_run(client, auth)
    claims = jwt.decode(
        stream_token(client, auth, run_id)["token"], options={"verify_signature": False}
    )
    assert 30 <= claims["exp"] - claims["iat"] <= 31
    app.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_a_stream_token_is_reusable_and_resumes_after_last_event_id(client, auth):
    run_id, events = finished_run(client, auth)
    url = stream_token(client, auth, run_id)["url"]
    assert parse_stream(client.get(url).get_data(as_text=True)) == events
    # EventSource's reconnect: the same URL, and the id of the last event it got.
    again = client.get(url, headers={"Last-Event-ID": "3"})
    assert parse_stream(again.get_data(as_text=True)) == events[3:]


def test_last_event_id_beyond_after_wins(client, auth):
    # An EventSource opened on ?after=2 reconnects to the same URL with Last-Event-ID.
    run_id, events = finished_run(client, auth)
    url = stream_token(client, auth, run_id)["url"]
    later = client.get(f"{url}&after=2", headers={"Last-Event-ID": "4"})
    assert parse_stream(later.get_data(as_text=True)) == events[4:]
    earlier = client.get(f"{url}&after=4", headers={"Last-Event-ID": "2"})
    assert parse_stream(earlier.get_data(as_text=True)) == events[4:]


def test_an_api_token_in_the_url_is_refused(client, auth):
    run_id, _ = finished_run(client, auth)
    secret = auth["Authorization"].removeprefix("Bearer ")
    response = client.get(f"{BASE}/finance_agent/runs/{run_id}/events?access_token={secret}")
    assert_problem(response, 401, "never accepted in a URL")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("value", ["", "garbage", "a.b.c", "eyJhbGciOiJub25lIn0.e30."])
def test_anything_but_a_stream_token_is_refused(client, auth, value):
    run_id, _ = finished_run(client, auth)
    response = client.get(f"{BASE}/finance_agent/runs/{run_id}/events?access_token={value}")
    assert_problem(response, 401, "stream token")


def test_a_token_signed_with_another_key_is_refused(client, auth):
    run_id, _ = finished_run(client, auth)
    forged = jwt.encode(
        {"aud": STREAM_TOKEN_AUDIENCE, "run": run_id, "org": "acme", "sub": "x", "exp": 2**31},
        "not the key of this server, but as long as one",
        algorithm="HS256",
    )
    response = client.get(f"{BASE}/finance_agent/runs/{run_id}/events?access_token={forged}")
    assert_problem(response, 401, "stream token")


def test_an_expired_stream_token_is_a_401_problem(client, auth):
    run_id, _ = finished_run(client, auth)
    with database.connection_context():
        key = stream_token_key()
    expired = jwt.encode(
        {
            "aud": STREAM_TOKEN_AUDIENCE,
            "run": run_id,
            "org": "acme",
            "sub": "token:1",
            "exp": int(time.time()) - 1,
        },
        key,
        algorithm="HS256",
    )
    response = client.get(f"{BASE}/finance_agent/runs/{run_id}/events?access_token={expired}")
    assert_problem(response, 401, "expired", "events/token")


def test_a_stream_token_of_another_run_is_a_404(client, auth):
    first, _ = finished_run(client, auth)
    second, _ = finished_run(client, auth)
    token = stream_token(client, auth, first)["token"]
    response = client.get(f"{BASE}/finance_agent/runs/{second}/events?access_token={token}")
    assert_problem(response, 404)


def test_a_stream_token_reads_nothing_else(client, auth):
    run_id, _ = finished_run(client, auth)
    token = stream_token(client, auth, run_id)["token"]
    # Not in the URL of another endpoint...
    status = client.get(f"{BASE}/finance_agent/runs/{run_id}/status?access_token={token}")
    assert_problem(status, 401, "access_token")
    # ...and not as a bearer token either.
    for path in (f"/runs/{run_id}/status", f"/runs/{run_id}/events"):
        response = client.get(
            f"{BASE}/finance_agent{path}", headers={"Authorization": f"Bearer {token}"}
        )
        assert_problem(response, 401)
    cancel = client.delete(f"{BASE}/finance_agent/runs/{run_id}?access_token={token}")
    assert_problem(cancel, 401)


def test_one_token_at_a_time(client, auth):
    run_id, _ = finished_run(client, auth)
    url = stream_token(client, auth, run_id)["url"]
    assert_problem(client.get(url, headers=auth), 400, "not both")


def test_another_organisations_run_gets_no_token(client, auth):
    run_id, _ = finished_run(client, auth)
    other = make_token("globex")
    response = client.post(f"{BASE}/finance_agent/runs/{run_id}/events/token", headers=other)
    assert_problem(response, 404)
    unknown = client.post(f"{BASE}/finance_agent/runs/run_nope/events/token", headers=auth)
    assert_problem(unknown, 404)
    agent = client.post(f"{BASE}/no_such_agent/runs/{run_id}/events/token", headers=auth)
    assert_problem(agent, 404)


def test_a_user_tokens_stream_token_reads_that_users_runs(client):
    alice = make_token("acme", "alice")
    bob = make_token("acme", "bob")
    run_id, events = finished_run(client, alice)
    assert_problem(
        client.post(f"{BASE}/finance_agent/runs/{run_id}/events/token", headers=bob), 404
    )
    url = stream_token(client, alice, run_id)["url"]
    assert parse_stream(client.get(url).get_data(as_text=True)) == events


def test_a_read_only_token_may_ask_for_one(client, app):
    with database.connection_context():
        from agent_runs.auth import create_token

        _, reader = create_token("acme", scopes=("runs:read",))
        _, scraper = create_token("acme", scopes=("metrics",))
    run_id, _ = finished_run(client, make_token())
    reads = client.post(
        f"{BASE}/finance_agent/runs/{run_id}/events/token",
        headers={"Authorization": f"Bearer {reader}"},
    )
    assert reads.status_code == 200
    refused = client.post(
        f"{BASE}/finance_agent/runs/{run_id}/events/token",
        headers={"Authorization": f"Bearer {scraper}"},
    )
    assert_problem(refused, 403, "runs:read")


def test_revoking_the_api_token_cuts_its_stream_tokens(client, auth):
    run_id, _ = finished_run(client, auth)
    url = stream_token(client, auth, run_id)["url"]
    with database.connection_context():
        ApiToken.update(revoked_at=utcnow()).execute()
    assert_problem(client.get(url), 401, "no longer valid")


def test_a_jwt_callers_stream_token_works_too(database_url):
    secret = "a-shared-secret-of-the-identity-provider"
    app = create_app(
        {"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_JWT_SECRET": secret, "TESTING": True}
    )
    client = app.test_client()
    bearer = jwt.encode({"org_id": "acme", "sub": "carol", "exp": 2**31}, secret, algorithm="HS256")
    auth = {"Authorization": f"Bearer {bearer}"}
    run_id, events = finished_run(client, auth)
    url = stream_token(client, auth, run_id)["url"]
    assert parse_stream(client.get(url).get_data(as_text=True)) == events
    # The identity provider's JWT is no stream token.
    refused = client.get(f"{BASE}/finance_agent/runs/{run_id}/events?access_token={bearer}")
    assert_problem(refused, 401)
    app.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_the_key_is_made_by_the_migration_and_shared(database_url, app):
    with database.connection_context():
        keys = list(SigningKey.select())
    assert [key.name for key in keys] == ["stream_token"]
    assert len(keys[0].secret) >= 43
    # Another application on the same database (another worker, another host) verifies it.
    client = app.test_client()
    auth = make_token()
    run_id, events = finished_run(client, auth)
    url = stream_token(client, auth, run_id)["url"]
    other = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "TESTING": True})
    assert parse_stream(other.test_client().get(url).get_data(as_text=True)) == events
    other.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_a_database_without_the_key_gets_one(app):
    with database.connection_context():
        SigningKey.delete().execute()
        first = stream_token_key()
        assert stream_token_key() == first
        assert SigningKey.select().count() == 1
