"""Every way a request can be refused, over real HTTP: each answer is one problem+json document.

The server here takes bodies of at most MAX_BODY bytes, so the 413 needs no 25 MiB upload.
"""

from __future__ import annotations

import json
import re

import pytest
import requests

from .server import GunicornServer

MAX_BODY = 2048
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors")
    with GunicornServer(folder, env={"AGENT_RUNS_MAX_CONTENT_LENGTH": str(MAX_BODY)}) as running:
        yield running


def call(server, method, path, *, headers=None, auth=True, **kwargs) -> requests.Response:
    sent = {**(server.headers if auth else {}), **(headers or {})}
    return requests.request(method, server.url + path, headers=sent, timeout=10, **kwargs)


def assert_problem(response: requests.Response, status: int, *detail_parts: str) -> dict:
    """Assert an RFC 9457 problem document of ``status``; return its body."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"] == PROBLEM, response.headers
    body = json.loads(response.text)
    assert isinstance(body, dict), body
    assert {"type", "title", "status", "detail"} <= set(body), body
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    for part in detail_parts:
        assert part in body["detail"], (part, body["detail"])
    return body


def assert_unauthorized(response: requests.Response, *detail_parts: str) -> dict:
    body = assert_problem(response, 401, *detail_parts)
    assert response.headers["WWW-Authenticate"].startswith("Bearer"), response.headers
    return body


ENDPOINTS = [
    ("GET", "/api/agents", None),
    ("GET", "/api/agents/finance_agent", None),
    ("POST", "/api/agents/finance_agent/runs", {"message": "hi"}),
    ("POST", "/api/agents/finance_agent/runs/stream", {"message": "hi"}),
    ("GET", "/api/agents/finance_agent/runs/status?runIds=run_a", None),
    ("GET", "/api/agents/finance_agent/runs/run_a/status", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_401_without_a_token(small_server, method, path, body):
    response = call(small_server, method, path, auth=False, json=body)
    assert_unauthorized(response, "Authorization")
    # No stream was started for an anonymous caller.
    assert "text/event-stream" not in response.headers["Content-Type"]


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer ar_not-a-real-token",
        "Bearer ",
        "Basic YWxhZGRpbjpvcGVuc2VzYW1l",
        "ar_token-without-a-scheme",
    ],
)
@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS[1::2])
def test_401_with_a_bad_token(small_server, authorization, method, path, body):
    response = call(
        small_server, method, path, auth=False, headers={"Authorization": authorization}, json=body
    )
    assert_unauthorized(response)


def test_401_once_a_token_is_revoked(small_server):
    created = small_server.cli("tokens", "create", "--org", "acme", "--name", "short-lived")
    secret = created.stdout.strip().splitlines()[-1]
    token_id = re.search(r"Created token (\d+)", created.stderr).group(1)
    headers = {"Authorization": f"Bearer {secret}"}
    assert call(small_server, "GET", "/api/agents", auth=False, headers=headers).status_code == 200
    small_server.cli("tokens", "revoke", token_id)
    response = call(small_server, "GET", "/api/agents", auth=False, headers=headers)
    assert_unauthorized(response, "not valid")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/agents/nobody", None),
        ("POST", "/api/agents/nobody/runs", {"message": "hi"}),
        ("POST", "/api/agents/nobody/runs/stream", {"message": "hi"}),
        ("GET", "/api/agents/nobody/runs/status?runIds=run_a", None),
        ("GET", "/api/agents/nobody/runs/run_a/status", None),
    ],
)
def test_404_unknown_agent(small_server, method, path, body):
    assert_problem(call(small_server, method, path, json=body), 404, "'nobody'")


def test_404_unknown_run(small_server):
    response = call(small_server, "GET", "/api/agents/finance_agent/runs/run_missing/status")
    assert_problem(response, 404, "'run_missing'")


def test_404_for_a_run_under_another_agent_or_of_another_org(small_server):
    started = call(small_server, "POST", "/api/agents/assistant/runs", json={"message": "hi"})
    assert started.status_code == 200, started.text
    run_id = started.json()["runId"]
    assert call(small_server, "GET", f"/api/agents/assistant/runs/{run_id}/status").ok

    # The run exists, but not for this agent...
    response = call(small_server, "GET", f"/api/agents/finance_agent/runs/{run_id}/status")
    assert_problem(response, 404, run_id)
    # ...nor for another tenant, which is told no more than for a run that never existed.
    other = small_server.cli("tokens", "create", "--org", "other-org").stdout.strip()
    other_headers = {"Authorization": f"Bearer {other.splitlines()[-1]}"}
    response = call(
        small_server,
        "GET",
        f"/api/agents/assistant/runs/{run_id}/status",
        auth=False,
        headers=other_headers,
    )
    assert_problem(response, 404, run_id)
    batch = call(
        small_server,
        "GET",
        f"/api/agents/assistant/runs/status?runIds={run_id}",
        auth=False,
        headers=other_headers,
    )
    assert batch.status_code == 200 and batch.json() == []


@pytest.mark.parametrize(
    "path",
    ["/api/nothing-here", "/api/agents/finance_agent/runs/run_a/status/extra", "/api/"],
)
def test_404_unknown_route_under_the_api(small_server, path):
    assert_problem(call(small_server, "GET", path), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/agents/finance_agent/runs/stream", "POST"),
        ("PUT", "/api/agents/finance_agent/runs", "POST"),
        ("DELETE", "/api/agents", "GET"),
        ("POST", "/api/agents/finance_agent/runs/status", "GET"),
    ],
)
def test_405_wrong_method(small_server, method, path, allowed):
    response = call(small_server, method, path)
    assert_problem(response, 405)
    assert allowed in {value.strip() for value in response.headers["Allow"].split(",")}
    assert method not in response.headers["Allow"]


@pytest.mark.parametrize("endpoint", ["runs", "runs/stream"])
@pytest.mark.parametrize(
    ("body", "field", "message_part"),
    [
        ({}, "message", "Missing data"),
        ({"message": ""}, "message", ""),
        ({"message": "hi", "unknownField": 1}, "unknownField", "Unknown field"),
        ({"message": "hi", "options": {"temperature": 5}}, "options.temperature", ""),
        ({"message": "hi", "options": {"maxTokens": "ten"}}, "options.maxTokens", ""),
        ({"message": "hi", "sessionId": "has spaces/and slashes"}, "sessionId", ""),
        ({"message": "hi", "generateFollowups": "perhaps"}, "generateFollowups", ""),
        ({"message": "hi", "media": [{"type": "not a mime"}]}, "media.0.", ""),
    ],
)
def test_422_invalid_body_names_the_field(small_server, endpoint, body, field, message_part):
    response = call(small_server, "POST", f"/api/agents/finance_agent/{endpoint}", json=body)
    problem = assert_problem(response, 422, field)
    errors = problem["errors"]
    node = errors
    for part in [p for p in field.split(".") if p]:
        assert part in node, (field, errors)
        node = node[part]
    assert message_part in json.dumps(node), (message_part, node)


def test_422_body_that_is_not_an_object(small_server):
    response = call(small_server, "POST", "/api/agents/finance_agent/runs/stream", json=[1, 2])
    assert_problem(response, 422, "object")


def test_422_batch_status_with_more_than_100_ids(small_server):
    ids = ",".join(f"run_{index}" for index in range(101))
    response = call(small_server, "GET", f"/api/agents/finance_agent/runs/status?runIds={ids}")
    problem = assert_problem(response, 422, "runIds")
    assert "At most 100 run ids" in problem["errors"]["runIds"][0]
    assert "101" in problem["errors"]["runIds"][0]
    # A hundred is still one request's worth: unknown ids are simply absent.
    hundred = ",".join(f"run_{index}" for index in range(100))
    response = call(small_server, "GET", f"/api/agents/finance_agent/runs/status?runIds={hundred}")
    assert response.status_code == 200 and response.json() == []


@pytest.mark.parametrize("query", ["", "?runIds=", "?runIds=,,", "?runIds=a&extra=1"])
def test_422_batch_status_bad_queries(small_server, query):
    response = call(small_server, "GET", f"/api/agents/finance_agent/runs/status{query}")
    assert_problem(response, 422)


@pytest.mark.parametrize("endpoint", ["runs", "runs/stream"])
@pytest.mark.parametrize("raw", ['{"message": "hi"', "{message: 'hi'}", "", "\xff\xfe"])
def test_400_malformed_json(small_server, endpoint, raw):
    response = call(
        small_server,
        "POST",
        f"/api/agents/finance_agent/{endpoint}",
        headers={"Content-Type": "application/json"},
        data=raw.encode("latin-1"),
    )
    assert_problem(response, 400, "JSON")


@pytest.mark.parametrize("endpoint", ["runs", "runs/stream"])
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_415_body_that_is_not_json(small_server, endpoint, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = call(
        small_server,
        "POST",
        f"/api/agents/finance_agent/{endpoint}",
        headers=headers,
        data=b'{"message": "hi"}',
    )
    assert_problem(response, 415, "application/json")


@pytest.mark.parametrize("endpoint", ["runs", "runs/stream"])
def test_413_body_larger_than_the_limit(small_server, endpoint):
    body = {"message": "x" * MAX_BODY}
    response = call(small_server, "POST", f"/api/agents/finance_agent/{endpoint}", json=body)
    assert_problem(response, 413)
    # Just under the limit the same request is fine.
    fits = {"message": "x" * (MAX_BODY - 100)}
    response = call(small_server, "POST", "/api/agents/assistant/runs", json=fits)
    assert response.status_code == 200, response.text


def test_413_for_a_chunked_body_larger_than_the_limit(small_server):
    headers = {"Content-Type": "application/json"}
    # A generator body goes out with Transfer-Encoding: chunked and no Content-Length.
    padded = b'{"message": "hi"}' + b" " * (MAX_BODY * 2)
    response = call(
        small_server, "POST", "/api/agents/assistant/runs", headers=headers, data=iter([padded])
    )
    assert_problem(response, 413)
    small = call(
        small_server,
        "POST",
        "/api/agents/assistant/runs",
        headers=headers,
        data=iter([b'{"message": "hi"}']),
    )
    assert small.status_code == 200, small.text
