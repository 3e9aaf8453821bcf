"""Sessions: listing, one session with its messages, its runs, deletion, and tenancy."""

import base64
import json

import pytest
from playhouse.test_utils import count_queries

import agent_runs
from agent_runs.db import database
from agent_runs.models import Message, Run, RunEvent, Session
from agent_runs.runtime.agents import unregister_agent

from .conftest import make_token
from .sse import parse_stream

NVDA = "What is the current NVDA stock price?"
SESSION_KEYS = {"id", "agentId", "userId", "orgId", "createdAt", "updatedAt", "activeRunId"}


def run(client, headers, message="hi", agent="assistant", **body):
    """Make a synchronous run; return its RunResponse."""
    response = client.post(
        f"/api/agents/{agent}/runs", headers=headers, json={"message": message, **body}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def get(client, url, headers, status=200):
    response = client.get(url, headers=headers)
    assert response.status_code == status, response.get_data(as_text=True)
    if status >= 400:
        assert response.mimetype == "application/problem+json"
    return response.json


def ids(page):
    return [item["id"] for item in page["items"]]


def walk(client, url, headers, limit):
    """Follow nextCursor from the first page to the last; return the pages."""
    pages, cursor = [], None
    while True:
        query = f"limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page = get(client, f"{url}{'&' if '?' in url else '?'}{query}", headers)
        pages.append(page)
        cursor = page["nextCursor"]
        if cursor is None:
            return pages


@pytest.fixture
def slow_agent():
    agent_runs.register_agent("slow", model="scripted", model_options={"delay": 0.05})
    yield "slow"
    unregister_agent("slow")


def test_list_sessions_newest_activity_first(client, auth):
    for uid in ("s1", "s2", "s3"):
        run(client, auth, sessionId=uid)
    run(client, auth, "again", sessionId="s1")
    page = get(client, "/api/sessions", auth)
    assert ids(page) == ["s1", "s3", "s2"]
    assert page["nextCursor"] is None
    first = page["items"][0]
    assert set(first) == SESSION_KEYS
    assert first["agentId"] == "assistant" and first["orgId"] == "acme"
    assert first["userId"] is None and first["activeRunId"] is None
    assert first["createdAt"].endswith("Z") and first["updatedAt"].endswith("Z")
    assert first["updatedAt"] >= first["createdAt"]


def test_list_sessions_filters_by_agent_and_user(client, auth):
    run(client, auth, sessionId="plain")
    run(client, auth, NVDA, agent="finance_agent", sessionId="stocks")
    run(client, auth, sessionId="alices", userId="alice")
    run(client, auth, NVDA, agent="finance_agent", sessionId="bobs", userId="bob")
    assert ids(get(client, "/api/sessions", auth)) == ["bobs", "alices", "stocks", "plain"]
    url = "/api/sessions?agentId=finance_agent"
    assert ids(get(client, url, auth)) == ["bobs", "stocks"]
    assert ids(get(client, "/api/sessions?userId=alice", auth)) == ["alices"]
    # An empty userId picks the sessions that are not bound to any user.
    assert ids(get(client, "/api/sessions?userId=", auth)) == ["stocks", "plain"]
    assert ids(get(client, "/api/sessions?agentId=finance_agent&userId=bob", auth)) == ["bobs"]
    assert ids(get(client, "/api/sessions?agentId=assistant&userId=bob", auth)) == []
    assert ids(get(client, "/api/sessions?agentId=ghost", auth)) == []
    assert get(client, "/api/sessions?userId=alice", auth)["items"][0]["userId"] == "alice"


def test_list_sessions_pages_with_a_cursor(client, auth):
    for number in range(7):
        run(client, auth, sessionId=f"page-{number}")
    expected = [f"page-{number}" for number in reversed(range(7))]
    pages = walk(client, "/api/sessions", auth, 3)
    assert [len(page["items"]) for page in pages] == [3, 3, 1]
    assert [uid for page in pages for uid in ids(page)] == expected
    # A page that ends exactly at the last item says so: no cursor to an empty page.
    pages = walk(client, "/api/sessions", auth, 7)
    assert len(pages) == 1 and ids(pages[0]) == expected
    assert ids(get(client, "/api/sessions?limit=100", auth)) == expected


def test_sessions_active_at_the_same_instant_page_by_id(client, auth):
    for number in range(5):
        run(client, auth, sessionId=f"tie-{number}")
    with database.connection_context():
        moment = Session.select(Session.updated_at).scalar()
        Session.update(updated_at=moment).execute()
    pages = walk(client, "/api/sessions", auth, 2)
    assert [uid for page in pages for uid in ids(page)] == [f"tie-{n}" for n in (4, 3, 2, 1, 0)]


def test_filters_apply_across_pages(client, auth):
    for number in range(5):
        run(client, auth, sessionId=f"a-{number}")
        run(client, auth, NVDA, agent="finance_agent", sessionId=f"f-{number}")
    pages = walk(client, "/api/sessions?agentId=finance_agent", auth, 2)
    assert [uid for page in pages for uid in ids(page)] == [f"f-{n}" for n in (4, 3, 2, 1, 0)]


def test_session_has_its_messages_in_order(client, auth):
    first = run(client, auth, "one", sessionId="chat")
    second = run(client, auth, "two", sessionId="chat")
    session = get(client, "/api/sessions/chat", auth)
    assert set(session) == SESSION_KEYS | {"messages"}
    assert session["id"] == "chat" and session["agentId"] == "assistant"
    assert session["activeRunId"] is None
    assert [(m["role"], m["content"], m["runId"]) for m in session["messages"]] == [
        ("user", "one", first["runId"]),
        ("assistant", "You said: one", first["runId"]),
        ("user", "two", second["runId"]),
        ("assistant", "(turn 2) You said: two", second["runId"]),
    ]
    for message in session["messages"]:
        assert set(message) == {"role", "content", "runId", "createdAt"}
        assert message["createdAt"].endswith("Z")


def test_session_messages_include_tool_calls_and_results(client, auth):
    answer = run(client, auth, NVDA, agent="finance_agent", sessionId="stocks")
    messages = get(client, "/api/sessions/stocks", auth)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    user, calling, result, final = messages
    assert user["content"] == NVDA
    [call] = calling["toolCalls"]
    assert call["name"] == "get_stock_price" and call["arguments"] == {"ticker": "NVDA"}
    assert call["id"]
    assert result["toolCallId"] == call["id"] and result["name"] == "get_stock_price"
    assert float(result["content"]) == float(answer["tools"][0]["result"])
    assert final["content"] == answer["content"] and "toolCalls" not in final
    assert {m["runId"] for m in messages} == {answer["runId"]}


def test_session_lists_its_runs_oldest_first(client, auth):
    made = [run(client, auth, f"turn {n}", sessionId="many")["runId"] for n in range(5)]
    run(client, auth, sessionId="other")
    page = get(client, "/api/sessions/many/runs", auth)
    assert ids(page) == made and page["nextCursor"] is None
    first = page["items"][0]
    assert first["sessionId"] == "many" and first["agentId"] == "assistant"
    assert first["status"] == "COMPLETED" and first["content"] == "You said: turn 0"
    assert first == get(client, f"/api/agents/assistant/runs/{made[0]}/status", auth)
    pages = walk(client, "/api/sessions/many/runs", auth, 2)
    assert [len(p["items"]) for p in pages] == [2, 2, 1]
    assert [run_id for p in pages for run_id in ids(p)] == made


def test_session_queries_are_few_and_fixed(client, auth):
    for number in range(3):
        run(client, auth, NVDA, agent="finance_agent", sessionId=f"q-{number}")
        run(client, auth, NVDA, agent="finance_agent", sessionId="q-0")
    counts = {}
    for url in ("/api/sessions", "/api/sessions/q-0", "/api/sessions/q-0/runs"):
        with count_queries() as counter:
            get(client, url, auth)
        counts[url] = counter.count
    # One query authenticates the token; the rest do not grow with sessions, runs or messages.
    assert counts == {"/api/sessions": 2, "/api/sessions/q-0": 3, "/api/sessions/q-0/runs": 3}


def rows_of(session_uid, run_ids):
    with database.connection_context():
        return {
            "sessions": Session.select().where(Session.uid == session_uid).count(),
            "runs": Run.select().where(Run.id.in_(run_ids)).count(),
            "messages": Message.select().where(Message.run.in_(run_ids)).count(),
            "events": RunEvent.select().where(RunEvent.run.in_(run_ids)).count(),
        }


def test_delete_removes_the_session_with_its_messages_runs_and_events(client, auth):
    gone = [
        run(client, auth, NVDA, agent="finance_agent", sessionId="doomed")["runId"],
        run(client, auth, NVDA, agent="finance_agent", sessionId="doomed")["runId"],
    ]
    kept = [run(client, auth, NVDA, agent="finance_agent", sessionId="kept")["runId"]]
    before = rows_of("doomed", gone)
    assert before["sessions"] == 1 and before["runs"] == 2
    assert before["messages"] == 8 and before["events"] > 0
    kept_before = rows_of("kept", kept)

    response = client.delete("/api/sessions/doomed", headers=auth)
    assert response.status_code == 204 and response.data == b""
    assert rows_of("doomed", gone) == {"sessions": 0, "runs": 0, "messages": 0, "events": 0}
    assert rows_of("kept", kept) == kept_before

    get(client, "/api/sessions/doomed", auth, 404)
    get(client, "/api/sessions/doomed/runs", auth, 404)
    get(client, f"/api/agents/finance_agent/runs/{gone[0]}/status", auth, 404)
    assert client.delete("/api/sessions/doomed", headers=auth).status_code == 404
    assert ids(get(client, "/api/sessions", auth)) == ["kept"]

    # The id is free again: the next run on it starts a new conversation.
    again = run(client, auth, "hello", sessionId="doomed")
    assert again["content"] == "You said: hello"
    assert [m["content"] for m in get(client, "/api/sessions/doomed", auth)["messages"]] == [
        "hello",
        "You said: hello",
    ]


def test_delete_while_a_run_is_active_is_409(client, auth, slow_agent):
    body = {"message": "take your time", "sessionId": "busy"}
    running = client.post("/api/agents/slow/runs/stream", headers=auth, json=body)
    assert running.status_code == 200
    session = get(client, "/api/sessions/busy", auth)
    run_id = session["activeRunId"]
    assert run_id and run_id.startswith("run_")
    assert get(client, "/api/sessions?agentId=slow", auth)["items"][0]["activeRunId"] == run_id

    response = client.delete("/api/sessions/busy", headers=auth)
    assert response.status_code == 409
    assert response.mimetype == "application/problem+json"
    assert response.json["status"] == 409 and run_id in response.json["detail"]
    assert get(client, "/api/sessions/busy", auth)["messages"][0]["content"] == "take your time"

    events = parse_stream(running.get_data(as_text=True))
    assert events[-1]["event"] == "STOP"
    assert get(client, "/api/sessions/busy", auth)["activeRunId"] is None
    assert client.delete("/api/sessions/busy", headers=auth).status_code == 204
    assert rows_of("busy", [run_id]) == {"sessions": 0, "runs": 0, "messages": 0, "events": 0}


def test_another_orgs_sessions_are_404_everywhere(client, auth):
    run(client, auth, sessionId="ours")
    other = make_token("globex")
    assert get(client, "/api/sessions", other) == {"items": [], "nextCursor": None}
    get(client, "/api/sessions/ours", other, 404)
    get(client, "/api/sessions/ours/runs", other, 404)
    get(client, "/api/sessions/ours?userId=", other, 404)
    response = client.delete("/api/sessions/ours", headers=other)
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    # The same id in the other organisation is another session, and deleting it spares ours.
    run(client, other, "theirs", sessionId="ours")
    assert client.delete("/api/sessions/ours", headers=other).status_code == 204
    assert get(client, "/api/sessions/ours", auth)["messages"][0]["content"] == "hi"


def test_user_bound_tokens_see_only_their_users_sessions(client, auth):
    alice, bob = make_token("acme", "alice"), make_token("acme", "bob")
    run(client, alice, "from alice", sessionId="shared")
    run(client, alice, sessionId="alice-only")
    run(client, bob, "from bob", sessionId="shared")
    run(client, auth, "from nobody", sessionId="shared")

    assert ids(get(client, "/api/sessions", alice)) == ["alice-only", "shared"]
    assert ids(get(client, "/api/sessions", bob)) == ["shared"]
    assert get(client, "/api/sessions", bob)["items"][0]["userId"] == "bob"
    # A userId filter narrows a user-bound token's view; it never widens it.
    assert ids(get(client, "/api/sessions?userId=alice", bob)) == []
    assert ids(get(client, "/api/sessions?userId=", bob)) == []

    assert get(client, "/api/sessions/shared", alice)["messages"][0]["content"] == "from alice"
    assert get(client, "/api/sessions/shared", bob)["messages"][0]["content"] == "from bob"
    bobs_runs = get(client, "/api/sessions/shared/runs", bob)["items"]
    assert [r["userId"] for r in bobs_runs] == ["bob"]
    for url in ("/api/sessions/alice-only", "/api/sessions/alice-only/runs"):
        get(client, url, bob, 404)
    get(client, "/api/sessions/shared?userId=alice", bob, 404)
    assert client.delete("/api/sessions/alice-only", headers=bob).status_code == 404
    assert client.delete("/api/sessions/shared?userId=alice", headers=bob).status_code == 404
    assert get(client, "/api/sessions/alice-only", alice)["id"] == "alice-only"


def test_org_wide_tokens_pick_a_user_when_an_id_is_ambiguous(client, auth):
    alice, bob = make_token("acme", "alice"), make_token("acme", "bob")
    run(client, alice, "from alice", sessionId="shared")
    run(client, bob, "from bob", sessionId="shared")
    run(client, auth, "from nobody", sessionId="shared")
    run(client, auth, sessionId="single", userId="bob")

    assert sorted(i["userId"] or "" for i in get(client, "/api/sessions", auth)["items"]) == [
        "",
        "alice",
        "bob",
        "bob",
    ]
    for url in ("/api/sessions/shared", "/api/sessions/shared/runs"):
        problem = get(client, url, auth, 422)
        assert "userId" in problem["errors"] and "userId" in problem["detail"]
    response = client.delete("/api/sessions/shared", headers=auth)
    assert response.status_code == 422 and "userId" in response.json["errors"]

    picked = get(client, "/api/sessions/shared?userId=alice", auth)
    assert picked["userId"] == "alice" and picked["messages"][0]["content"] == "from alice"
    unbound = get(client, "/api/sessions/shared?userId=", auth)
    assert unbound["userId"] is None and unbound["messages"][0]["content"] == "from nobody"
    runs = get(client, "/api/sessions/shared/runs?userId=bob", auth)["items"]
    assert [r["userId"] for r in runs] == ["bob"]
    # An id only one user has needs no userId.
    assert get(client, "/api/sessions/single", auth)["userId"] == "bob"

    assert client.delete("/api/sessions/shared?userId=bob", headers=auth).status_code == 204
    get(client, "/api/sessions/shared", bob, 404)
    assert get(client, "/api/sessions/shared", alice)["userId"] == "alice"
    assert sorted(i["userId"] or "" for i in get(client, "/api/sessions", auth)["items"]) == [
        "",
        "alice",
        "bob",
    ]


def cursor_of(value):
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "url, field",
    [
        ("/api/sessions?limit=0", "limit"),
        ("/api/sessions?limit=101", "limit"),
        ("/api/sessions?limit=ten", "limit"),
        ("/api/sessions?cursor=not-a-cursor", "cursor"),
        ("/api/sessions?cursor=" + cursor_of({"after": 3}), "cursor"),
        ("/api/sessions?cursor=" + cursor_of(["yesterday", 3]), "cursor"),
        ("/api/sessions?cursor=" + cursor_of(["2026-05-06T10:00:00", "run_x"]), "cursor"),
        ("/api/sessions?cursor=" + cursor_of(["2026-05-06T10:00:00+02:00", 3]), "cursor"),
        ("/api/sessions?agentId=", "agentId"),
        ("/api/sessions?userId=no%20spaces", "userId"),
        ("/api/sessions?colour=red", "colour"),
        ("/api/sessions?sessionId=s1", "sessionId"),
        ("/api/sessions/s1?limit=5", "limit"),
        ("/api/sessions/s1?userId=%2Fslash", "userId"),
        ("/api/sessions/s1/runs?limit=-1", "limit"),
        ("/api/sessions/s1/runs?agentId=assistant", "agentId"),
        # A sessions cursor does not fit a list of runs.
        ("/api/sessions/s1/runs?cursor=" + cursor_of(["2026-05-06T10:00:00", 3]), "cursor"),
    ],
)
def test_bad_query_parameters_are_422_naming_them(client, auth, url, field):
    run(client, auth, sessionId="s1")
    problem = get(client, url, auth, 422)
    assert problem["status"] == 422 and field in problem["errors"]
    assert field in problem["detail"]


def test_delete_rejects_unknown_query_parameters(client, auth):
    run(client, auth, sessionId="s1")
    response = client.delete("/api/sessions/s1?force=true", headers=auth)
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    assert "force" in response.json["errors"]
    assert get(client, "/api/sessions/s1", auth)["id"] == "s1"


def test_unknown_session_is_404_and_no_token_is_401(client, auth):
    for url in ("/api/sessions/nope", "/api/sessions/nope/runs"):
        problem = get(client, url, auth, 404)
        assert "nope" in problem["detail"]
    assert client.delete("/api/sessions/nope", headers=auth).status_code == 404
    for url in ("/api/sessions", "/api/sessions/nope", "/api/sessions/nope/runs"):
        response = client.get(url)
        assert response.status_code == 401
        assert response.mimetype == "application/problem+json"
    assert client.delete("/api/sessions/nope").status_code == 401
