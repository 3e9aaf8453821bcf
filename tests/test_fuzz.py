"""Fuzz a live server from its own OpenAPI document with schemathesis.

A real gunicorn on a loopback port serves ``/api/openapi.json``; schemathesis loads it and sends
generated requests, valid and invalid, to every operation, with a valid bearer token. Every
answer must be: no 5xx, a status the document lists, of the content type and schema it
documents (each SSE event included), and every 4xx a problem+json document.

Two tests: one that fuzzes each operation on its own, and one that follows the document's
links (start a run, then read, follow, cancel or continue it, read or delete its session).
Both are bounded in requests, and the streams too: the scripted model finishes a run in
milliseconds, and schemathesis reads at most ``MAX_STREAM_EVENTS`` events of a stream within
``REQUEST_TIMEOUT`` seconds. Run with ``-s`` to see how many requests were sent.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import Flaky
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .server import GunicornServer

# Generated cases per operation and generation phase.
MAX_EXAMPLES = 50
# Link-following scenarios: at most SCENARIOS of STEPS_PER_SCENARIO requests per attempt.
SCENARIOS = 50
STEPS_PER_SCENARIO = 8
STATEFUL_REQUESTS = 400
STATEFUL_ATTEMPTS = 10
REQUEST_TIMEOUT = 10
MAX_STREAM_EVENTS = 50

PROBLEM_FIELDS = ("type", "title", "status", "detail")
# gunicorn refuses longer request lines (414) and header fields (400) with its own text/html
# page before the application sees the request (limit_request_line, limit_request_field_size).
GUNICORN_MAX_REQUEST_LINE = 4094
GUNICORN_MAX_HEADER_FIELD = 8190
REFUSED_BY_GUNICORN = "(refused by gunicorn: request line or header too long)"

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Answers received, by operation and status; printed when the server stops.
SENT: dict[str, Counter[int]] = {}


def count(label: str, status: int) -> None:
    SENT.setdefault(label, Counter())[status] += 1


def problem_details(ctx, response, case) -> None:
    """Every 4xx is an application/problem+json document with type, title, status, detail."""
    count(case.operation.label, response.status_code)
    if not 400 <= response.status_code < 500:
        return
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/problem+json"), (
        f"a {response.status_code} answered {content_type!r}, not application/problem+json"
    )
    body = json.loads(response.content)
    missing = [name for name in PROBLEM_FIELDS if name not in body]
    assert not missing, f"the problem document lacks {missing}: {body}"
    assert body["status"] == response.status_code, body


def beyond_gunicorn_limits(case, base_url: str) -> bool:
    """Whether gunicorn answers this request itself: its request line or a header too long."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    request = requests.Request(
        method=kwargs["method"],
        url=kwargs["url"],
        params=kwargs.get("params"),
        headers=kwargs.get("headers"),
    ).prepare()
    line = f"{request.method} {request.path_url} HTTP/1.1"
    fields = [f"{name}: {value}" for name, value in request.headers.items()]
    return len(line) > GUNICORN_MAX_REQUEST_LINE or any(
        len(field) > GUNICORN_MAX_HEADER_FIELD for field in fields
    )


def check_gunicorn_refusal(response) -> None:
    """A request beyond gunicorn's limits gets gunicorn's 4xx, and nothing worse."""
    count(REFUSED_BY_GUNICORN, response.status_code)
    assert response.status_code in (400, 414, 431), response.status_code


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    # Thousands of requests a minute from one token: the rate limit is not under test here.
    with GunicornServer(folder, env={"AGENT_RUNS_RATE_LIMIT": "0"}) as server:
        yield server
    total = sum(sum(statuses.values()) for statuses in SENT.values())
    print(f"\nschemathesis sent {total} generated requests:")
    for label, statuses in sorted(SENT.items()):
        answers = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        print(f"  {sum(statuses.values()):5d}  {label}  ({answers})")


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    assert fuzzed_server.url.startswith("http://127.0.0.1:")
    config = SchemathesisConfig.from_dict(
        {
            "headers": {"Authorization": f"Bearer {fuzzed_server.token}"},
            "request-timeout": REQUEST_TIMEOUT,
            "max-stream-events": MAX_STREAM_EVENTS,
            "generation": {"max-examples": MAX_EXAMPLES},
            "suppress-health-check": ["too_slow", "filter_too_much"],
        }
    )
    return schemathesis.openapi.from_url(
        f"{fuzzed_server.url}/api/openapi.json", config=config, timeout=10
    )


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_the_api_answers_as_documented(case, fuzzed_server):
    base_url = f"{fuzzed_server.url}/api"
    if beyond_gunicorn_limits(case, base_url):
        check_gunicorn_refusal(case.call(base_url=base_url, timeout=REQUEST_TIMEOUT))
        return
    case.call_and_validate(
        base_url=base_url,
        timeout=REQUEST_TIMEOUT,
        checks=CHECKS,
        additional_checks=[problem_details],
    )


def test_run_lifecycles_answer_as_documented(api_schema, fuzzed_server):
    base_url = f"{fuzzed_server.url}/api"
    failures: list[str] = []
    answered = []

    class RunLifecycles(api_schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"base_url": base_url, "timeout": REQUEST_TIMEOUT}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            answered.append(response.status_code)
            try:
                if beyond_gunicorn_limits(case, base_url):
                    check_gunicorn_refusal(response)
                    return
                case.validate_response(
                    response,
                    checks=CHECKS,
                    additional_checks=[problem_details],
                    transport_kwargs=kwargs,
                )
            except Exception as failure:
                failures.append(str(failure))
                raise

    # No shrinking, no example database: a scenario replayed against a live server gets other
    # answers (new run ids, runs that finished meanwhile), which Hypothesis reports as flaky
    # data generation, ending the attempt. Like schemathesis's own runner, start again, until
    # the scenarios have sent STATEFUL_REQUESTS requests.
    machine_settings = settings(
        max_examples=SCENARIOS,
        stateful_step_count=STEPS_PER_SCENARIO,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    for _ in range(STATEFUL_ATTEMPTS):
        try:
            RunLifecycles.run(settings=machine_settings)
        except Flaky:
            pass  # an API failure was recorded when it happened, and fails the test below
        if failures or len(answered) >= STATEFUL_REQUESTS:
            break
    assert not failures, failures[0]
    assert len(answered) >= STATEFUL_REQUESTS // 2, f"only {len(answered)} stateful requests"
