"""GET /runs: the caller's runs of every agent, newest first, filtered, a keyset page at a time."""

import base64
import datetime
import json

import pytest

from agent_runs.db import database, refresh_statistics
from agent_runs.models import Run, RunStatus, Session
from agent_runs.runtime.runs import Principal, get_statuses, list_runs

from .conftest import make_token


def run(client, headers, agent="assistant", **body):
    body.setdefault("message", "hi")
    response = client.post(f"/api/agents/{agent}/runs", headers=headers, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def listing(client, headers, query=""):
    response = client.get(f"/api/runs?{query}", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def all_pages(client, headers, query="", limit=2):
    ids, cursor = [], None
    for _ in range(100):
        page = listing(
            client, headers, f"{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        )
        assert len(page["items"]) <= limit
        ids += [item["id"] for item in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            return ids
    raise AssertionError("the pages did not end")


def test_lists_the_organisations_runs_of_every_agent_newest_first(client, auth):
    first = run(client, auth, "assistant")
    second = run(client, auth, "finance_agent", message="What is NVDA at?")
    third = run(client, auth, "clock_agent", message="What time is it?")
    run(client, make_token("other"), "assistant")  # another organisation's
    page = listing(client, auth)
    assert [item["id"] for item in page["items"]] == [
        third["runId"],
        second["runId"],
        first["runId"],
    ]
    assert page["nextCursor"] is None
    item = page["items"][1]
    assert item["agentId"] == "finance_agent" and item["orgId"] == "acme"
    assert item["status"] == "COMPLETED" and item["sessionId"] == second["sessionId"]
    assert item["agentVersion"] is None and item["output"] is None


def test_a_user_token_sees_its_users_runs_only(client):
    org_wide = make_token("acme")
    alice = make_token("acme", "alice")
    bob = make_token("acme", "bob")
    mine = run(client, alice)
    run(client, bob)
    unbound = run(client, org_wide)
    assert [item["id"] for item in listing(client, alice)["items"]] == [mine["runId"]]
    assert len(listing(client, org_wide)["items"]) == 3
    # sessionId of another user's session finds nothing for alice.
    query = f"sessionId={unbound['sessionId']}"
    assert listing(client, alice, query)["items"] == []


def test_filters_by_agent_status_session_and_time(app, client, auth):
    a = run(client, auth, "assistant")
    b = run(client, auth, "assistant", sessionId=a["sessionId"], message="again")
    c = run(client, auth, "clock_agent", message="time?")
    with database.connection_context():
        Run.update(status=RunStatus.FAILED).where(Run.id == c["runId"]).execute()
        Run.update(created_at=datetime.datetime(2020, 1, 1)).where(Run.id == a["runId"]).execute()

    def ids(query):
        return [item["id"] for item in listing(client, auth, query)["items"]]

    assert ids("agentId=assistant") == [b["runId"], a["runId"]]
    assert ids("agentId=nobody") == []
    assert ids("status=FAILED") == [c["runId"]]
    assert ids("status=COMPLETED,FAILED") == [c["runId"], b["runId"], a["runId"]]
    assert ids(f"sessionId={a['sessionId']}") == [b["runId"], a["runId"]]
    assert ids("since=2021-01-01T00:00:00Z") == [c["runId"], b["runId"]]
    # An offset is converted; a time without one is UTC.
    assert ids("since=2020-01-01T01:00:00%2B02:00") == [c["runId"], b["runId"], a["runId"]]
    assert ids("since=2020-01-01T00:00:01") == [c["runId"], b["runId"]]
    assert ids(f"agentId=assistant&status=COMPLETED&sessionId={a['sessionId']}") == [
        b["runId"],
        a["runId"],
    ]


def test_pages_with_a_cursor_in_order_ties_included(app, client, auth):
    made = [run(client, auth)["runId"] for _ in range(7)]
    # Four runs created in the same microsecond, before the others: the id breaks the tie.
    tie = datetime.datetime(2020, 5, 6, 10, 0, 0)
    with database.connection_context():
        Run.update(created_at=tie).where(Run.id.in_(made[1:5])).execute()
    expected = [made[6], made[5], made[0], *sorted(made[1:5], reverse=True)]
    for limit in (1, 2, 3, 7):
        assert all_pages(client, auth, limit=limit) == expected, limit
    page = listing(client, auth, "limit=7")
    assert page["nextCursor"] is None  # a page that ends at the last run says so


def test_the_page_size_defaults_to_20_and_is_at_most_100(client, auth):
    for _ in range(21):
        run(client, auth)
    page = listing(client, auth)
    assert len(page["items"]) == 20 and page["nextCursor"]
    assert len(listing(client, auth, "limit=100")["items"]) == 21


def cursor_of(value):
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "query, field",
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("status=DONE", "status"),
        ("status=COMPLETED,", "status"),
        ("since=yesterday", "since"),
        ("since=2026-13-01T00:00:00Z", "since"),
        ("sessionId=bad%20id", "sessionId"),
        ("agentId=", "agentId"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=" + cursor_of(["2026-05-06T10:00:00", 3]), "cursor"),
        ("colour=red", "colour"),
    ],
)
def test_bad_queries_are_422_naming_the_field(client, auth, query, field):
    response = client.get(f"/api/runs?{query}", headers=auth)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert field in response.json["errors"]


def test_needs_a_token(client):
    assert client.get("/api/runs").status_code == 401


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"agent_id": "assistant"},
        {"statuses": ["RUNNING"]},
        {"session_id": "s1"},
        {"since": datetime.datetime(2026, 1, 1)},
    ],
)
@pytest.mark.parametrize("user_id", [None, "alice"])
@pytest.mark.parametrize("after", [None, (datetime.datetime(2026, 5, 6), "run_x")])
def test_each_listing_walks_an_index_newest_first(app, filters, user_id, after):
    """No listing scans the run table or sorts it whole, first page or a later one."""
    statements = []
    with database.connection_context():
        connection = database.connection()
        # SQLite hands the trace each statement with its values written in.
        connection.set_trace_callback(statements.append)
        try:
            list_runs(Principal(org_id="acme", user_id=user_id), after=after, **filters)
        finally:
            connection.set_trace_callback(None)
        [select] = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        plan = [row[-1] for row in database.execute_sql("EXPLAIN QUERY PLAN " + select)]
    assert not [step for step in plan if step.startswith("SCAN")], plan
    assert "USE TEMP B-TREE FOR ORDER BY" not in plan, plan


FILL_RUNS = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 999)
INSERT INTO session (id, uid, org_id, user_id, agent_id, created_at, updated_at)
SELECT i + 1, printf('sess_%04d', i), 'acme', '', 'assistant',
       '2026-11-01 00:00:00', '2026-11-01 00:00:00'
FROM n;

WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 19999)
INSERT INTO run (id, org_id, user_id, agent_id, session_id, status, model, input, request,
                 content, usage, cancel_requested, created_at, started_at, completed_at)
SELECT printf('run_%08d', i), 'acme', '', 'assistant', i % 1000 + 1, 'COMPLETED',
       'scripted', 'hi', '{}', 'hello', '{}', 0, '2026-11-01 00:00:00',
       '2026-11-01 00:00:00', '2026-11-01 00:00:00'
FROM n
"""


def plan_of(call) -> list[str]:
    """The query plan of the one SELECT that ``call`` sends."""
    statements = []
    connection = database.connection()
    connection.set_trace_callback(statements.append)
    try:
        call()
    finally:
        connection.set_trace_callback(None)
    [select] = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    return [row[-1] for row in database.execute_sql("EXPLAIN QUERY PLAN " + select)]


def test_runs_of_one_organisation_are_found_by_id_and_session_once_statistics_are_known(app):
    """Twenty thousand runs of one organisation and agent: once the statistics are refreshed
    (each worker's keeper does so at start and hourly), batch status finds its runs by id,
    and a session's listing by the session, not by walking the organisation's runs."""
    principal = Principal(org_id="acme", user_id=None)
    with database.connection_context():
        for statement in FILL_RUNS.split(";\n\n"):
            database.execute_sql(statement)
        refresh_statistics()
        by_id = plan_of(lambda: get_statuses(principal, "assistant", ["run_00000007"] * 3))
        session_id = Session.get(Session.uid == "sess_0007").uid
        by_session = plan_of(lambda: list_runs(principal, session_id=session_id))
    assert any("sqlite_autoindex_run_1" in step for step in by_id), by_id
    assert any("run_session_id_created_at" in step for step in by_session), by_session
