"""Idempotency-Key on POST .../runs, .../runs/stream and .../runs/background, in-process.

Concurrent retries on two workers are tested against a real gunicorn in
test_e2e_idempotency.py.
"""

from __future__ import annotations

import datetime
import json

import peewee
import pytest

from agent_runs.db import database
from agent_runs.models import IdempotencyKey, Run, utcnow
from agent_runs.runtime.idempotency import KeyInvalid, parse_key

from .conftest import make_token
from .sse import parse_stream

BODY = {"message": "What is the current NVDA stock price?"}


def post(client, auth, path, key, body=BODY):
    headers = dict(auth)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(f"/api/agents/assistant/runs{path}", headers=headers, json=body)


def run_count():
    with database.connection_context():
        return Run.select().count()


def test_a_background_retry_gets_the_same_run(client, auth):
    first = post(client, auth, "/background", "key-1")
    again = post(client, auth, "/background", "key-1")
    assert first.status_code == again.status_code == 202
    assert again.json["runId"] == first.json["runId"]
    assert again.json["sessionId"] == first.json["sessionId"]
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert run_count() == 1


def test_a_synchronous_retry_gets_the_same_answer(client, auth):
    first = post(client, auth, "", "key-2")
    again = post(client, auth, "", "key-2")
    assert first.status_code == again.status_code == 200
    assert again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert run_count() == 1


def test_a_streaming_retry_replays_the_same_runs_events(client, auth):
    first = parse_stream(post(client, auth, "/stream", "key-3").get_data(as_text=True))
    again = post(client, auth, "/stream", "key-3")
    assert again.headers["Idempotent-Replayed"] == "true"
    replayed = parse_stream(again.get_data(as_text=True))
    assert replayed == first
    assert json.loads(first[0]["data"])["runId"] and first[-1]["event"] == "STOP"
    assert run_count() == 1


def test_without_a_key_every_request_is_a_new_run(client, auth):
    runs = {post(client, auth, "/background", None).json["runId"] for _ in range(3)}
    assert len(runs) == 3


def test_the_same_key_with_another_body_is_a_422(client, auth):
    first = post(client, auth, "/background", "key-4")
    for path, body in [
        ("/background", {"message": "Something else"}),
        ("/background", {**BODY, "generateFollowups": True}),
        ("", BODY),  # the same body to another operation is another request
        ("/stream", BODY),
    ]:
        answer = post(client, auth, path, "key-4", body)
        assert answer.status_code == 422, (path, body)
        assert answer.content_type == "application/problem+json"
        assert "Idempotency-Key" in answer.json["errors"]
    assert post(client, auth, "/background", "key-4").json["runId"] == first.json["runId"]
    assert run_count() == 1


def test_keys_belong_to_one_organisation(client, auth):
    mine = post(client, auth, "/background", "shared-key").json
    theirs = post(client, make_token("globex"), "/background", "shared-key")
    assert theirs.status_code == 202
    assert theirs.json["runId"] != mine["runId"]
    assert run_count() == 2


def test_another_user_of_the_organisation_never_gets_the_run(client):
    alice, bob = make_token("acme", "alice"), make_token("acme", "bob")
    first = post(client, alice, "/background", "user-key")
    assert first.status_code == 202
    answer = post(client, bob, "/background", "user-key")
    assert answer.status_code == 422
    assert first.json["runId"] not in answer.get_data(as_text=True)


def test_a_quoted_key_is_the_same_key(client, auth):
    first = post(client, auth, "/background", '"abc-123"')
    assert post(client, auth, "/background", "abc-123").json["runId"] == first.json["runId"]


@pytest.mark.parametrize(
    "key",
    ["", "   ", '"unterminated', '"a"b', '"bad\\escape"', "x" * 256, "tab\there", '""'],
)
def test_a_malformed_key_is_a_422_naming_the_header(client, auth, key):
    answer = post(client, auth, "/background", key)
    assert answer.status_code == 422, key
    assert "Idempotency-Key" in answer.json["errors"]
    assert run_count() == 0


def test_parse_key():
    assert parse_key("abc") == "abc"
    assert parse_key('"8e03978e-40d5-43e8-bc93-6894a57f9324"') == (
        "8e03978e-40d5-43e8-bc93-6894a57f9324"
    )
    assert parse_key('"say \\"hi\\""') == 'say "hi"'
    assert parse_key("x" * 255) == "x" * 255
    for bad in ("é", "\x7f", '"a" '[:-1] + "x"):
        with pytest.raises(KeyInvalid):
            parse_key(bad)


def test_an_expired_key_starts_a_new_run(client, auth):
    first = post(client, auth, "/background", "old-key").json
    with database.connection_context():
        IdempotencyKey.update(created_at=utcnow() - datetime.timedelta(hours=25)).execute()
    again = post(client, auth, "/background", "old-key")
    assert again.status_code == 202 and "Idempotent-Replayed" not in again.headers
    assert again.json["runId"] != first["runId"]
    # The new run holds the key now.
    assert post(client, auth, "/background", "old-key").json["runId"] == again.json["runId"]


def test_a_refused_request_leaves_its_key_free(client, auth, agents):
    agents("slow_one", model_options={"delay": 0.05, "content_deltas": 40})
    body = {"message": "hi", "sessionId": "busy-session"}
    holding = client.post("/api/agents/slow_one/runs/background", headers=auth, json=body)
    assert holding.status_code == 202
    keyed = {**auth, "Idempotency-Key": "retry-me"}
    busy = client.post("/api/agents/slow_one/runs/background", headers=keyed, json=body)
    assert busy.status_code == 409
    client.delete(f"/api/agents/slow_one/runs/{holding.json['runId']}", headers=auth)
    app = client.application
    app.extensions["agent_runs"].executor.wait(holding.json["runId"])
    retried = client.post("/api/agents/slow_one/runs/background", headers=keyed, json=body)
    assert retried.status_code == 202, retried.json
    assert retried.json["runId"] != holding.json["runId"]


def test_a_deleted_session_takes_its_keys_with_it(client, auth):
    first = post(client, auth, "", "session-key").json
    assert client.delete(f"/api/sessions/{first['sessionId']}", headers=auth).status_code == 204
    again = post(client, auth, "", "session-key")
    assert again.status_code == 200 and again.json["runId"] != first["runId"]


def test_the_database_holds_keys_unique_per_organisation(app):
    with database.connection_context():
        IdempotencyKey.create(org_id="acme", key="k", fingerprint="a" * 64)
        IdempotencyKey.create(org_id="globex", key="k", fingerprint="a" * 64)
        with pytest.raises(peewee.IntegrityError), database.atomic():
            IdempotencyKey.create(org_id="acme", key="k", fingerprint="b" * 64)


def test_the_openapi_document_offers_the_header(client):
    document = client.get("/api/openapi.json").json
    for path in (
        "/agents/{agentId}/runs",
        "/agents/{agentId}/runs/stream",
        "/agents/{agentId}/runs/background",
    ):
        names = [p.get("name") for p in document["paths"][path]["post"].get("parameters", [])]
        assert "Idempotency-Key" in names, path
