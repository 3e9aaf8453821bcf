"""Resume, cancel, background runs, human approval and crash recovery, through the API."""

import datetime
import json
import time

import gevent
import pytest

import agent_runs
from agent_runs.db import database
from agent_runs.models import Run, RunEvent, RunStatus, Session
from agent_runs.runtime.store import request_cancel, sweep_expired_runs

from .conftest import BOTH_DATABASES, make_token
from .sse import parse_stream

pytestmark = BOTH_DATABASES

BASE = "/api/agents"


def start_stream(client, auth, agent, **body):
    """Start a streaming run; return the response (unread) and its run id."""
    body.setdefault("message", "hello there")
    response = client.post(f"{BASE}/{agent}/runs/stream", headers=auth, json=body)
    chunks = iter(response.response)
    first = next(chunks).decode()
    run_id = json.loads(parse_stream(first)[0]["data"])["runId"]
    return response, chunks, first, run_id


def status(client, auth, agent, run_id):
    return client.get(f"{BASE}/{agent}/runs/{run_id}/status", headers=auth).json


def wait_for_status(client, auth, agent, run_id, wanted, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = status(client, auth, agent, run_id)
        if current["status"] in wanted:
            return current
        gevent.sleep(0.02)
    raise AssertionError(f"run {run_id} stayed {current['status']}")


# Resume ----------------------------------------------------------------------------------


def test_events_replay_a_finished_run_completely(client, auth):
    text = client.post(
        f"{BASE}/finance_agent/runs/stream", headers=auth, json={"message": "NVDA?"}
    ).get_data(as_text=True)
    original = parse_stream(text)
    run_id = json.loads(original[0]["data"])["runId"]
    replay = client.get(f"{BASE}/finance_agent/runs/{run_id}/events", headers=auth)
    assert replay.mimetype == "text/event-stream"
    assert parse_stream(replay.get_data(as_text=True)) == original


@pytest.mark.parametrize("how", ["query", "header"])
def test_events_resume_after_the_last_seen_id(client, auth, how):
    text = client.post(
        f"{BASE}/finance_agent/runs/stream", headers=auth, json={"message": "NVDA?"}
    ).get_data(as_text=True)
    original = parse_stream(text)
    run_id = json.loads(original[0]["data"])["runId"]
    url = f"{BASE}/finance_agent/runs/{run_id}/events"
    if how == "query":
        response = client.get(f"{url}?after=4", headers=auth)
    else:
        response = client.get(url, headers={**auth, "Last-Event-ID": "4"})
    assert parse_stream(response.get_data(as_text=True)) == original[4:]


def test_events_of_a_live_run_replay_then_tail(client, auth, agents):
    agent = agents("paced", model_options={"delay": 0.02, "content_deltas": 10})
    response, chunks, first, run_id = start_stream(client, auth, agent)
    follower = client.get(f"{BASE}/{agent}/runs/{run_id}/events", headers=auth)
    followed = parse_stream(follower.get_data(as_text=True))
    streamed = parse_stream(first + "".join(chunk.decode() for chunk in chunks))
    assert followed == streamed
    assert followed[-1]["event"] == "STOP"


@pytest.mark.parametrize(
    "query, headers",
    [("?after=-1", {}), ("?after=x", {}), ("?from=2", {}), ("", {"Last-Event-ID": "abc"})],
)
def test_events_reject_bad_positions(client, auth, query, headers):
    run = client.post(f"{BASE}/assistant/runs", headers=auth, json={"message": "hi"}).json
    response = client.get(
        f"{BASE}/assistant/runs/{run['runId']}/events{query}", headers={**auth, **headers}
    )
    assert response.status_code == 422 and response.mimetype == "application/problem+json"


def test_events_of_another_orgs_run_are_404(client, auth):
    run = client.post(f"{BASE}/assistant/runs", headers=auth, json={"message": "hi"}).json
    other = make_token("globex")
    response = client.get(f"{BASE}/assistant/runs/{run['runId']}/events", headers=other)
    assert response.status_code == 404


def test_a_client_that_leaves_does_not_stop_the_run(client, auth, agents):
    agent = agents("paced2", model_options={"delay": 0.02, "content_deltas": 10})
    response, chunks, _, run_id = start_stream(client, auth, agent)
    response.close()  # the client goes away after START
    final = wait_for_status(client, auth, agent, run_id, {"COMPLETED"})
    assert final["content"]


def test_on_disconnect_cancel_cancels_the_run(client, auth, agents):
    agent = agents("paced3", model_options={"delay": 0.05, "content_deltas": 20})
    response, chunks, _, run_id = start_stream(
        client, auth, agent, options={"onDisconnect": "cancel"}
    )
    next(chunks)
    response.close()
    final = wait_for_status(client, auth, agent, run_id, {"CANCELLED"})
    assert final["completedAt"]


# Cancel ----------------------------------------------------------------------------------


def test_cancel_during_model_streaming(client, auth, agents):
    agent = agents("chatty", model_options={"delay": 0.05, "content_deltas": 100})
    response, chunks, _, run_id = start_stream(client, auth, agent)
    next(chunks), next(chunks)  # reasoning, first content delta
    started = time.monotonic()
    assert client.delete(f"{BASE}/{agent}/runs/{run_id}", headers=auth).status_code == 202
    rest = parse_stream("".join(chunk.decode() for chunk in chunks))
    assert time.monotonic() - started < 1
    assert rest[-1]["event"] == "STOP"
    assert json.loads(rest[-1]["data"]) == {"reason": "cancelled"}
    final = status(client, auth, agent, run_id)
    assert final["status"] == "CANCELLED" and final["content"]
    assert client.delete(f"{BASE}/{agent}/runs/{run_id}", headers=auth).status_code == 204


def test_cancel_during_a_slow_tool(client, auth, agents):
    calls = []

    def slow_lookup(query: str) -> str:
        calls.append(query)
        if len(calls) == 1:
            gevent.sleep(20)
        return "found"

    agent = agents("slowtool", tools=[slow_lookup])
    response, chunks, seen, run_id = start_stream(client, auth, agent)
    while "TOOL_START" not in seen:
        seen += next(chunks).decode()
    started = time.monotonic()
    assert client.delete(f"{BASE}/{agent}/runs/{run_id}", headers=auth).status_code == 202
    rest = parse_stream("".join(chunk.decode() for chunk in chunks))
    assert time.monotonic() - started < 1
    assert [e["event"] for e in rest] == ["STOP"]
    assert status(client, auth, agent, run_id)["status"] == "CANCELLED"
    # The cancelled call is answered in the session's history, so the next run can proceed.
    session = json.loads(parse_stream(seen)[0]["data"])["sessionId"]
    again = client.post(
        f"{BASE}/{agent}/runs", headers=auth, json={"message": "again", "sessionId": session}
    )
    assert again.status_code == 200


def test_cancel_requested_through_the_database_is_picked_up(client, auth, agents, app):
    """What a cancel received by another worker looks like to the run's own worker."""
    agent = agents("remote", model_options={"delay": 0.05, "content_deltas": 100})
    response, chunks, _, run_id = start_stream(client, auth, agent)
    with database.connection_context():
        request_cancel(run_id)
    rest = parse_stream("".join(chunk.decode() for chunk in chunks))
    assert json.loads(rest[-1]["data"]) == {"reason": "cancelled"}


def test_cancel_unknown_or_foreign_runs_is_404(client, auth):
    run = client.post(f"{BASE}/assistant/runs", headers=auth, json={"message": "hi"}).json
    assert client.delete(f"{BASE}/assistant/runs/run_nope", headers=auth).status_code == 404
    other = make_token("globex")
    assert client.delete(f"{BASE}/assistant/runs/{run['runId']}", headers=other).status_code == 404


# Background runs -------------------------------------------------------------------------


def test_background_runs_are_queued_then_complete(client, auth, agents):
    agent = agents("bg", model_options={"delay": 0.01})
    response = client.post(
        f"{BASE}/{agent}/runs/background", headers=auth, json={"message": "later"}
    )
    assert response.status_code == 202
    body = response.json
    assert set(body) == {"runId", "sessionId", "status"} and body["status"] == "QUEUED"
    events = client.get(f"{BASE}/{agent}/runs/{body['runId']}/events", headers=auth)
    parsed = parse_stream(events.get_data(as_text=True))
    assert parsed[0]["event"] == "START" and parsed[-1]["event"] == "STOP"
    final = status(client, auth, agent, body["runId"])
    assert final["status"] == "COMPLETED" and final["startedAt"]


def test_background_runs_validate_like_the_others(client, auth):
    response = client.post(f"{BASE}/assistant/runs/background", headers=auth, json={})
    assert response.status_code == 422


# Human approval --------------------------------------------------------------------------


@pytest.fixture
def approvals(agents):
    calls = []

    @agent_runs.tool(requires_approval=True)
    def wire_money(amount: str) -> str:
        """Send money."""
        calls.append(amount)
        return f"sent {amount}"

    return agents("banker", tools=[wire_money]), calls


def test_a_tool_needing_approval_pauses_the_run(client, auth, approvals):
    agent, calls = approvals
    run = client.post(f"{BASE}/{agent}/runs", headers=auth, json={"message": "pay 5"}).json
    assert run["status"] == "PAUSED" and calls == []
    current = status(client, auth, agent, run["runId"])
    assert current["requiredAction"]["type"] == "TOOL_APPROVAL"
    assert current["requiredAction"]["tool"] == "wire_money"
    assert current["requiredAction"]["arguments"] == {"amount": "pay 5"}
    events = parse_stream(
        client.get(f"{BASE}/{agent}/runs/{run['runId']}/events", headers=auth).get_data(
            as_text=True
        )
    )
    assert events[-1]["event"] == "STOP"
    assert json.loads(events[-1]["data"])["reason"] == "paused"
    # The session is still held by the paused run.
    busy = client.post(
        f"{BASE}/{agent}/runs",
        headers=auth,
        json={"message": "again", "sessionId": run["sessionId"]},
    )
    assert busy.status_code == 409


def test_approve_calls_the_tool_and_finishes_the_run(client, auth, approvals):
    agent, calls = approvals
    run = client.post(f"{BASE}/{agent}/runs", headers=auth, json={"message": "pay 5"}).json
    url = f"{BASE}/{agent}/runs/{run['runId']}"
    done = client.post(f"{url}/continue", headers=auth, json={"action": "APPROVE"}).json
    assert done["status"] == "COMPLETED" and calls == ["pay 5"]
    assert done["tools"][0]["result"] == "sent pay 5"
    assert "wire_money returned sent pay 5" in done["content"]
    events = parse_stream(client.get(f"{url}/events", headers=auth).get_data(as_text=True))
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    types = [e["event"] for e in events]
    assert types.count("STOP") == 2 and types[-1] == "STOP"
    assert types[types.index("STOP") + 1 :][:2] == ["TOOL_START", "TOOL_END"]
    resumed = client.get(f"{url}/events?after={types.index('STOP') + 1}", headers=auth)
    assert parse_stream(resumed.get_data(as_text=True))[0]["event"] == "TOOL_START"


def test_reject_tells_the_model_and_skips_the_tool(client, auth, approvals):
    agent, calls = approvals
    run = client.post(f"{BASE}/{agent}/runs", headers=auth, json={"message": "pay 5"}).json
    url = f"{BASE}/{agent}/runs/{run['runId']}"
    done = client.post(f"{url}/continue", headers=auth, json={"action": "REJECT"}).json
    assert done["status"] == "COMPLETED" and calls == []
    assert done["tools"][0]["isError"] is True
    assert "rejected" in done["content"]


def test_approval_on_a_streamed_run_continues_on_events(client, auth, approvals):
    agent, calls = approvals
    text = client.post(
        f"{BASE}/{agent}/runs/stream", headers=auth, json={"message": "pay 7"}
    ).get_data(as_text=True)
    paused = parse_stream(text)
    run_id = json.loads(paused[0]["data"])["runId"]
    assert json.loads(paused[-1]["data"])["requiredAction"]["tool"] == "wire_money"
    client.post(f"{BASE}/{agent}/runs/{run_id}/continue", headers=auth, json={"action": "APPROVE"})
    rest = client.get(
        f"{BASE}/{agent}/runs/{run_id}/events",
        headers={**auth, "Last-Event-ID": str(paused[-1]["id"])},
    )
    events = parse_stream(rest.get_data(as_text=True))
    assert events[0]["id"] == paused[-1]["id"] + 1
    assert events[-1]["event"] == "STOP" and events[-1]["data"] == ""
    assert calls == ["pay 7"]


def test_continue_requires_a_paused_run_and_a_valid_action(client, auth, approvals):
    agent, _ = approvals
    run = client.post(f"{BASE}/{agent}/runs", headers=auth, json={"message": "pay"}).json
    url = f"{BASE}/{agent}/runs/{run['runId']}/continue"
    assert client.post(url, headers=auth, json={"action": "MAYBE"}).status_code == 422
    assert client.post(url, headers=auth, json={}).status_code == 422
    client.post(url, headers=auth, json={"action": "APPROVE"})
    again = client.post(url, headers=auth, json={"action": "APPROVE"})
    assert again.status_code == 409 and "COMPLETED" in again.json["detail"]


def test_cancelling_a_paused_run(client, auth, approvals):
    agent, calls = approvals
    run = client.post(f"{BASE}/{agent}/runs", headers=auth, json={"message": "pay"}).json
    url = f"{BASE}/{agent}/runs/{run['runId']}"
    assert client.delete(url, headers=auth).status_code == 202
    assert status(client, auth, agent, run["runId"])["status"] == "CANCELLED"
    events = parse_stream(client.get(f"{url}/events", headers=auth).get_data(as_text=True))
    assert json.loads(events[-1]["data"]) == {"reason": "cancelled"}
    assert (
        client.post(f"{url}/continue", headers=auth, json={"action": "APPROVE"}).status_code == 409
    )
    # The session is free again, and its history stays valid for the model.
    again = client.post(
        f"{BASE}/{agent}/runs", headers=auth, json={"message": "pay", "sessionId": run["sessionId"]}
    )
    assert again.status_code == 200 and calls == []


# Crash recovery --------------------------------------------------------------------------


def test_the_sweep_fails_runs_whose_lease_expired(client, auth, app):
    run = client.post(f"{BASE}/assistant/runs", headers=auth, json={"message": "hi"}).json
    past = datetime.datetime(2020, 1, 1)
    with database.connection_context():
        # As if the run's worker had died mid-run: RUNNING, holding its session, lease expired.
        Run.update(status=RunStatus.RUNNING, lease_expires_at=past, completed_at=None).where(
            Run.id == run["runId"]
        ).execute()
        Session.update(active_run_id=run["runId"]).execute()
        assert sweep_expired_runs() == [run["runId"]]
        assert sweep_expired_runs() == []
        last = (
            RunEvent.select()
            .where(RunEvent.run == run["runId"])
            .order_by(RunEvent.seq.desc())
            .first()
        )
    assert last.type == "ERROR"
    failed = status(client, auth, "assistant", run["runId"])
    assert failed["status"] == "FAILED" and failed["error"]["type"] == "worker_lost"
    again = client.post(
        f"{BASE}/assistant/runs",
        headers=auth,
        json={"message": "hi", "sessionId": run["sessionId"]},
    )
    assert again.status_code == 200


def test_an_event_the_database_refuses_does_not_hold_back_the_others(client, auth, app):
    from agent_runs.runtime.events import Event, EventLog

    run = client.post(f"{BASE}/assistant/runs", headers=auth, json={"message": "hi"}).json
    log = EventLog(flush_interval=60)
    log.append(Event("run_that_does_not_exist", 1, "CONTENT_DELTA", "lost", 1))
    log.append(Event(run["runId"], 99, "CONTENT_DELTA", "kept", 2))
    log.flush()  # does not raise, and does not keep the refused event for ever
    log.flush()
    with database.connection_context():
        kept = RunEvent.get_or_none((RunEvent.run == run["runId"]) & (RunEvent.seq == 99))
        assert kept is not None and kept.data == "kept"
        assert not RunEvent.select().where(RunEvent.run == "run_that_does_not_exist").exists()


def test_a_large_backlog_is_written_in_bounded_transactions_in_order(app):
    from agent_runs.runtime.events import (
        MAX_ENDINGS_PER_COMMIT,
        MAX_EVENTS_PER_COMMIT,
        EventLog,
        RunChannel,
    )
    from agent_runs.runtime.runs import new_run_id

    runs = [new_run_id() for _ in range(2 * MAX_ENDINGS_PER_COMMIT + 5)]
    with database.connection_context():
        session = Session.create(uid="backlog", org_id="acme", user_id="", agent_id="assistant")
        Run.insert_many(
            [{"id": r, "org_id": "acme", "agent_id": "assistant", "session": session} for r in runs]
        ).execute()
    recorded, finished = [], []
    log = EventLog(flush_interval=60, record_endings=recorded.extend)
    channels = {run_id: RunChannel(run_id, first_seq=100) for run_id in runs}
    for n in range(MAX_EVENTS_PER_COMMIT // len(runs) + 2):
        for run_id in runs:
            log.append(channels[run_id].make_event("CONTENT_DELTA", f"{n}"), channels[run_id])
    for run_id in runs:
        channel = channels[run_id]

        def done(run_id=run_id, channel=channel):
            # Told after the commit that holds its end, with all its events published...
            assert run_id in recorded and channel.closed
            # ...and before the runs that ended after it were written: a transaction holds
            # at most MAX_ENDINGS_PER_COMMIT of them.
            assert len(recorded) <= len(finished) + MAX_ENDINGS_PER_COMMIT
            finished.append(run_id)

        log.end_run(channel.make_event("STOP", "{}"), channel, run_id, done)
    log.flush()
    assert finished == runs
    for run_id, channel in channels.items():
        seqs = [int(frame.split(b"\n")[0].removeprefix(b"id: ")) for frame in channel.frames]
        assert seqs == list(range(100, 100 + len(seqs)))
        with database.connection_context():
            stored = RunEvent.select(RunEvent.seq).where(
                RunEvent.run == run_id, RunEvent.seq >= 100
            )
            assert sorted(e.seq for e in stored) == seqs


def test_a_run_end_the_database_refuses_does_not_undo_the_others(app):
    from agent_runs.runtime.events import EventLog, RunChannel
    from agent_runs.runtime.runs import new_run_id
    from agent_runs.runtime.store import RunEnding, message_rows, record_run_endings

    runs = [new_run_id() for _ in range(3)]
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    with database.connection_context():
        session = Session.create(uid="ends", org_id="acme", user_id="", agent_id="assistant")
        Run.insert_many(
            [{"id": r, "org_id": "acme", "agent_id": "assistant", "session": session} for r in runs]
        ).execute()
    log = EventLog(flush_interval=60, record_endings=record_run_endings)
    done = []
    for index, run_id in enumerate(runs):
        channel = RunChannel(run_id, first_seq=2)
        # The middle run's messages name a session that does not exist: refused.
        session_pk = session.id if index != 1 else 999_999
        ending = RunEnding(
            outcome={
                "run_id": run_id,
                "status": RunStatus.COMPLETED,
                "content": "done",
                "output": None,
                "reasoning_steps": [],
                "tool_calls": [],
                "followups": None,
                "usage": {"input_tokens": 1},
                "error_type": None,
                "error": None,
                "cancel_requested": False,
                "required_action": None,
                "pending_calls": None,
                "lease_expires_at": None,
                "completed_at": now,
            },
            messages=message_rows(
                session_pk, run_id, [{"role": "assistant", "content": "done"}], now
            ),
            release=None,
        )
        log.end_run(
            channel.make_event("STOP", "{}"), channel, ending, lambda r=run_id: done.append(r)
        )
    log.flush()
    assert done == runs
    with database.connection_context():
        statuses = {r.id: r.status for r in Run.select(Run.id, Run.status)}
        assert [statuses[r] for r in runs] == [RunStatus.COMPLETED, "RUNNING", RunStatus.COMPLETED]
        # The refused run's STOP is in the log all the same; the sweep will fail the run.
        assert RunEvent.select().where(RunEvent.type == "STOP").count() == 3
