"""Starting runs (synchronous and streamed), their status, and batch status."""

import json

import pytest
from playhouse.test_utils import count_queries

import agent_runs
from agent_runs.db import database
from agent_runs.models import Run
from agent_runs.runtime.agents import unregister_agent

from .conftest import make_token
from .sse import parse_stream

NVDA = "What is the current NVDA stock price?"


def stream(client, headers, agent="finance_agent", **body):
    body.setdefault("message", NVDA)
    response = client.post(f"/api/agents/{agent}/runs/stream", headers=headers, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response, parse_stream(response.get_data(as_text=True))


@pytest.fixture
def slow_agent():
    agent_runs.register_agent("slow", model="scripted", model_options={"delay": 0.05})
    yield "slow"
    unregister_agent("slow")


def test_stream_carries_the_seed_events_in_order(client, auth):
    response, events = stream(client, auth)
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    types = [e["event"] for e in events]
    assert types[0] == "START" and types[-1] == "STOP"
    # The model's reasoning, then the "thought" of its tool call (finance_agent explains its
    # tool calls), then the call, then the answer.
    assert types[1:6] == ["REASONING_DELTA"] * 3 + ["TOOL_START", "TOOL_END"]
    assert events[3]["data"] == "get_stock_price has the answer to this."
    assert set(types[6:-1]) == {"CONTENT_DELTA"} and len(types[6:-1]) > 1
    start = json.loads(events[0]["data"])
    assert start["runId"].startswith("run_") and start["sessionId"]
    assert json.loads(events[4]["data"])["arguments"] == {"ticker": "NVDA"}
    tool_end = json.loads(events[5]["data"])
    assert tool_end["name"] == "get_stock_price" and float(tool_end["result"]) > 0
    assert events[-1]["data"] == ""
    assert all(isinstance(e["timestamp"], int) for e in events)


def test_synchronous_run_answers_a_run_response(client, auth):
    response = client.post(
        "/api/agents/finance_agent/runs",
        headers=auth,
        json={"message": NVDA, "generateFollowups": True},
    )
    assert response.status_code == 200
    body = response.json
    assert body["status"] == "COMPLETED"
    assert body["runId"].startswith("run_")
    assert "get_stock_price returned" in body["content"]
    assert body["reasoningSteps"] == [
        f'The user asks: "{NVDA}". I should call get_stock_price.',
        "get_stock_price has the answer to this.",
    ]
    [tool] = body["tools"]
    assert tool["name"] == "get_stock_price" and tool["arguments"] == {"ticker": "NVDA"}
    assert tool["isError"] is False and isinstance(tool["durationMs"], int)
    assert len(body["followups"]) == 3
    assert all(q.endswith("?") and "NVDA" in q for q in body["followups"])
    assert body["usage"]["modelCalls"] == 3 and body["usage"]["outputTokens"] > 0
    assert body["metadata"] == {"model": "scripted"}


def test_followups_ride_on_the_stop_event_with_the_usage(client, auth):
    _, events = stream(client, auth, generateFollowups=True)
    stop = json.loads(events[-1]["data"])
    assert len(stop["followups"]) == 3
    run_id = json.loads(events[0]["data"])["runId"]
    status = client.get(f"/api/agents/finance_agent/runs/{run_id}/status", headers=auth).json
    assert stop["usage"] == status["usage"] and stop["usage"]["modelCalls"] == 3


def test_status_of_a_finished_run(client, auth):
    _, events = stream(client, auth, sessionId="sess_xyz")
    run_id = json.loads(events[0]["data"])["runId"]
    response = client.get(f"/api/agents/finance_agent/runs/{run_id}/status", headers=auth)
    assert response.status_code == 200
    run = response.json
    assert run["id"] == run_id and run["status"] == "COMPLETED"
    assert run["agentId"] == "finance_agent" and run["sessionId"] == "sess_xyz"
    assert run["orgId"] == "acme" and run["userId"] is None
    assert run["createdAt"].endswith("Z") and run["completedAt"].endswith("Z")
    assert run["content"] == "".join(e["data"] for e in events if e["event"] == "CONTENT_DELTA")


def test_status_of_an_unknown_run_or_under_another_agent_is_404(client, auth):
    _, events = stream(client, auth)
    run_id = json.loads(events[0]["data"])["runId"]
    for url in (
        "/api/agents/finance_agent/runs/run_nope/status",
        f"/api/agents/assistant/runs/{run_id}/status",
        f"/api/agents/ghost/runs/{run_id}/status",
    ):
        assert client.get(url, headers=auth).status_code == 404


def run_ids(client, auth, count):
    ids = []
    for _ in range(count):
        response = client.post("/api/agents/assistant/runs", headers=auth, json={"message": "hi"})
        ids.append(response.json["runId"])
    return ids


def test_batch_status_keeps_order_drops_unknown_and_duplicate_ids(client, auth):
    first, second = run_ids(client, auth, 2)
    query = f"{second},run_unknown,{first},{second}"
    response = client.get(f"/api/agents/assistant/runs/status?runIds={query}", headers=auth)
    assert response.status_code == 200
    assert [run["id"] for run in response.json] == [second, first]
    assert all(run["status"] == "COMPLETED" for run in response.json)


def test_batch_status_is_one_query_however_many_ids(client, auth):
    ids = run_ids(client, auth, 3)
    counts = []
    for batch in (ids[:1], ids + [f"run_missing_{i}" for i in range(97)]):
        with count_queries() as counter:
            response = client.get(
                "/api/agents/assistant/runs/status?runIds=" + ",".join(batch), headers=auth
            )
        assert response.status_code == 200
        counts.append(counter.count)
    # One query authenticates the token, one reads the runs, whatever the number of ids.
    assert counts == [2, 2]


def test_batch_status_agrees_with_the_stored_run_and_the_session_listing(client, auth):
    for _ in range(2):
        client.post(
            "/api/agents/assistant/runs", headers=auth, json={"message": "hi", "sessionId": "s"}
        )
    listed = client.get("/api/sessions/s/runs", headers=auth).json["items"]
    ids = ",".join(run["id"] for run in listed)
    batch = client.get(f"/api/agents/assistant/runs/status?runIds={ids}", headers=auth).json
    # Batch status prints the times SQLite stores as text; the listing reads them as datetimes.
    assert batch == listed
    with client.application.app_context(), database.connection_context():
        stored = Run.get_by_id(listed[0]["id"])
    assert batch[0]["createdAt"] == stored.created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert batch[0]["completedAt"] == stored.completed_at.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    "query, detail",
    [
        ("runIds=" + ",".join(f"run_{i}" for i in range(101)), "At most 100 run ids"),
        ("runIds=", "at least one run id"),
        ("runIds=,,", "at least one run id"),
        ("", "runIds"),
        ("runIds=a&colour=red", "colour"),
    ],
)
def test_batch_status_rejects_bad_queries(client, auth, query, detail):
    response = client.get(f"/api/agents/assistant/runs/status?{query}", headers=auth)
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    assert detail in json.dumps(response.json)


def test_a_second_run_in_a_session_sees_the_first(client, auth):
    first = client.post("/api/agents/assistant/runs", headers=auth, json={"message": "one"}).json
    second = client.post(
        "/api/agents/assistant/runs",
        headers=auth,
        json={"message": "two", "sessionId": first["sessionId"]},
    ).json
    assert first["content"] == "You said: one"
    assert second["content"] == "(turn 2) You said: two"
    assert second["sessionId"] == first["sessionId"]


def test_a_missing_session_id_starts_a_new_session(client, auth):
    _, first = stream(client, auth, agent="assistant", message="hello")
    _, second = stream(client, auth, agent="assistant", message="hello")
    first_session = json.loads(first[0]["data"])["sessionId"]
    assert first_session != json.loads(second[0]["data"])["sessionId"]
    assert "(turn" not in "".join(e["data"] for e in second)


def test_same_session_id_in_two_orgs_are_two_conversations(client, auth):
    other = make_token("globex")
    body = {"message": "hi", "sessionId": "550e8400-e29b-41d4-a716-446655440000"}
    client.post("/api/agents/assistant/runs", headers=auth, json=body)
    answer = client.post("/api/agents/assistant/runs", headers=other, json=body).json
    assert answer["content"] == "You said: hi"


def test_a_session_belongs_to_one_agent(client, auth):
    first = client.post("/api/agents/assistant/runs", headers=auth, json={"message": "hi"}).json
    response = client.post(
        "/api/agents/finance_agent/runs",
        headers=auth,
        json={"message": NVDA, "sessionId": first["sessionId"]},
    )
    assert response.status_code == 422
    assert "sessionId" in response.json["errors"]


def test_one_active_run_per_session(client, auth, slow_agent):
    body = {"message": "take your time", "sessionId": "busy-session"}
    running = client.post("/api/agents/slow/runs/stream", headers=auth, json=body)
    assert running.status_code == 200
    response = client.post("/api/agents/slow/runs", headers=auth, json=body)
    assert response.status_code == 409
    assert response.mimetype == "application/problem+json"
    events = parse_stream(running.get_data(as_text=True))
    assert events[-1]["event"] == "STOP"
    # Once the first run ended, the session takes the next one.
    assert client.post("/api/agents/slow/runs", headers=auth, json=body).status_code == 200


def test_another_orgs_runs_are_invisible(client, auth):
    _, events = stream(client, auth)
    run_id = json.loads(events[0]["data"])["runId"]
    other = make_token("globex")
    status = client.get(f"/api/agents/finance_agent/runs/{run_id}/status", headers=other)
    assert status.status_code == 404
    batch = client.get(f"/api/agents/finance_agent/runs/status?runIds={run_id}", headers=other)
    assert batch.status_code == 200 and batch.json == []


def test_user_bound_tokens_see_only_their_users_runs(client, auth):
    alice, bob = make_token("acme", "alice"), make_token("acme", "bob")
    run = client.post("/api/agents/assistant/runs", headers=alice, json={"message": "hi"}).json
    url = f"/api/agents/assistant/runs/{run['runId']}/status"
    assert client.get(url, headers=alice).json["userId"] == "alice"
    assert client.get(url, headers=bob).status_code == 404
    # An organisation-wide token sees every user's runs of its organisation.
    assert client.get(url, headers=auth).status_code == 200


def test_events_are_persisted_in_order(client, auth, app):
    from agent_runs.db import database
    from agent_runs.models import RunEvent

    _, events = stream(client, auth)
    run_id = json.loads(events[0]["data"])["runId"]
    with database.connection_context():
        rows = list(RunEvent.select().where(RunEvent.run == run_id).order_by(RunEvent.seq))
    assert [(r.seq, r.type, r.data, r.timestamp) for r in rows] == [
        (e["id"], e["event"], e["data"], e["timestamp"]) for e in events
    ]


def test_quiet_streams_get_pings(database_url):
    from agent_runs import create_app

    agent_runs.register_agent("sleepy", model_options={"delay": 0.3})
    app = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_PING_INTERVAL": 0.1})
    try:
        response = app.test_client().post(
            "/api/agents/sleepy/runs/stream", headers=make_token(), json={"message": "hi"}
        )
        text = response.get_data(as_text=True)
        assert ": ping\n\n" in text
        assert parse_stream(text)[-1]["event"] == "STOP"
    finally:
        unregister_agent("sleepy")
        app.extensions["agent_runs"].executor.shutdown(timeout=10)
