"""Inputs that once made the server fail (a 500, a broken stream, bad data stored), found by
the schemathesis fuzz run (test_fuzz.py) and by hostile-input probes of the same endpoints.
Each now answers a problem+json 4xx that says what is wrong."""

import base64
import json

import pytest

from agent_runs.db import database
from agent_runs.models import Run

from .test_validation import assert_problem

URL = "/api/agents/assistant/runs"


def run(client, auth, **body):
    body.setdefault("message", "hi")
    response = client.post(URL, headers=auth, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def cursor(*position):
    raw = json.dumps(position).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_errors_of_list_items_mixed_with_list_errors_are_a_422(client, auth):
    # Found by schemathesis: nine invalid media. marshmallow keys the items' errors by index
    # (int) next to "_schema" (str); sorting those keys while encoding the JSON raised.
    body = {"message": "hi", "media": [{"type": "image/gif", "data": "0"}] * 9}
    problem = assert_problem(client.post(URL, headers=auth, json=body), 422, "At most 8")
    media = problem["errors"]["media"]
    assert media["0"] == {"data": ["Must be base64 data or an http(s) URL."]}
    assert media["_schema"] == ["At most 8 items (got 9)."]


@pytest.mark.parametrize("header", ["\u00b2", "9" * 19, "9" * 5000, "-1", "1.5"])
def test_a_last_event_id_that_no_event_can_have_is_a_422(client, auth, header):
    # "²" passed str.isdigit() and failed int(): a 500. Ids past 64 bits passed, and the
    # stream broke after its 200 when the database refused the number.
    run_id = run(client, auth)["runId"]
    response = client.get(
        f"{URL}/{run_id}/events", headers={**auth, "Last-Event-ID": header.encode("latin-1")}
    )
    assert_problem(response, 422, "Last-Event-ID")


def test_the_largest_event_id_is_still_an_id(client, auth):
    run_id = run(client, auth)["runId"]
    headers = {**auth, "Last-Event-ID": str(2**63 - 1)}
    response = client.get(f"{URL}/{run_id}/events", headers=headers)
    assert response.status_code == 200 and response.get_data(as_text=True) == ""


@pytest.mark.parametrize("after", [str(2**63), "9" * 30])
def test_after_past_64_bits_is_a_422_not_a_broken_stream(client, auth, after):
    run_id = run(client, auth)["runId"]
    response = client.get(f"{URL}/{run_id}/events?after={after}", headers=auth)
    assert_problem(response, 422, "after")


@pytest.mark.parametrize(
    "body, field",
    [
        ('{"message": "\\ud800"}', "message"),
        ('{"message": "a\\u0000b"}', "message"),
        ('{"message": "hi", "options": {"model": "scripted:\\udfff"}}', "options.model"),
        (
            '{"message": "hi", "media": [{"type": "image/png", "data": "https://x.test/\\ud83d"}]}',
            "media.0.data",
        ),
    ],
)
def test_text_no_database_can_store_is_a_422(client, auth, body, field):
    # An unpaired surrogate (valid JSON, not Unicode) failed to encode on the way into SQLite:
    # a 500. NUL is refused too: PostgreSQL cannot store it in text.
    for url in (URL, URL + "/stream", URL + "/background"):
        response = client.post(url, headers=auth, data=body, content_type="application/json")
        assert_problem(response, 422, field)
    with database.connection_context():
        assert Run.select().count() == 0


def test_a_surrogate_pair_is_text(client, auth):
    body = '{"message": "\\ud83d\\ude00"}'
    response = client.post(URL, headers=auth, data=body, content_type="application/json")
    assert response.status_code == 200 and response.json["content"].endswith("\U0001f600")


@pytest.mark.parametrize("field", ["sessionId", "userId", "orgId"])
def test_an_identifier_with_a_trailing_newline_is_a_422(client, auth, field):
    # Python's "$" matches before a final "\n": "abc\n" passed the pattern the document
    # publishes (which JSON Schema reads as refusing it), and became a session id.
    body = {"message": "hi", field: "acme\n"}
    assert_problem(client.post(URL, headers=auth, json=body), 422, field)


def test_a_user_filter_with_a_trailing_newline_is_a_422(client, auth):
    assert_problem(client.get("/api/sessions?userId=alice%0A", headers=auth), 422, "userId")


@pytest.mark.parametrize(
    "url",
    [
        "/api/sessions?cursor=" + cursor("2026-01-01T00:00:00", 10**30),
        "/api/sessions?cursor=" + cursor("2026-01-01T00:00:00", -(2**63) - 1),
        "/api/sessions/{session}/runs?cursor=" + cursor("2026-01-01T00:00:00", "run_\ud800"),
        "/api/sessions/{session}/runs?cursor=" + cursor("2026-01-01T00:00:00", "run_\x00"),
    ],
)
def test_a_cursor_with_a_key_the_database_cannot_take_is_a_422(client, auth, url):
    # A forged cursor's key went into the query as is: an integer past 64 bits, or text with
    # a lone surrogate, made the database driver raise.
    session = run(client, auth)["sessionId"]
    response = client.get(url.format(session=session), headers=auth)
    assert_problem(response, 422, "cursor")


def test_json_nested_too_deeply_is_a_400(client, auth):
    # json.loads recursed until RecursionError: a 500.
    body = "[" * 100_000 + "]" * 100_000
    response = client.post(URL, headers=auth, data=body, content_type="application/json")
    assert_problem(response, 400, "nested too deeply")


@pytest.mark.parametrize("body", ["null", "[]", '"hi"', "42"])
def test_json_that_is_not_an_object_is_a_422(client, auth, body):
    # "null" is valid JSON; it was answered 400 "not valid JSON".
    response = client.post(URL, headers=auth, data=body, content_type="application/json")
    assert_problem(response, 422, "JSON object")


def test_the_document_needs_no_token_but_everything_else_does(client):
    assert client.get("/api/openapi.json").status_code == 200
    assert_problem(client.get("/api/agents"), 401, "Authorization")
