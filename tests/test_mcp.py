"""MCP client tools, against real MCP servers built with the official SDK (tests/mcp_server.py),
over streamable HTTP (SSE and JSON answers) and over stdio."""

from __future__ import annotations

import json
import sqlite3

import gevent
import pytest

from agent_runs import create_app
from agent_runs.runtime.agents import mcp_server
from agent_runs.runtime.mcp import McpClients, McpError, McpSettings, McpToolbox, exposed_name

from .conftest import make_token
from .mcp_servers import McpServerProcess, stdio_server
from .sse import parse_stream

BASE = "/api/agents"


@pytest.fixture(scope="module")
def crm():
    with McpServerProcess() as server:
        yield server


@pytest.fixture(scope="module")
def crm_json():
    with McpServerProcess("--json") as server:
        yield server


def run(client, auth, agent, message="A-17", **body):
    response = client.post(
        f"{BASE}/{agent}/runs/stream", headers=auth, json={"message": message, **body}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return parse_stream(response.get_data(as_text=True))


def of_type(events, kind):
    return [json.loads(e["data"]) for e in events if e["event"] == kind]


def content(events):
    return "".join(e["data"] for e in events if e["event"] == "CONTENT_DELTA")


def http(url, **settings):
    return {"name": "crm", "url": url, **settings}


def toolbox_of(client, agent):
    """The MCP tools a run of ``agent`` gets, through the application's own clients."""
    state = client.application.extensions["agent_runs"]
    return McpToolbox(state.executor.mcp, state.registry.get(agent).mcp_servers)


# Listing and naming ----------------------------------------------------------------------


def test_a_servers_tools_are_listed_under_names_the_model_apis_accept(crm):
    clients = McpClients(McpSettings())
    try:
        toolbox = McpToolbox(clients, (mcp_server(http(crm.url)),))
        tools = {tool.name: tool for tool in toolbox.list(taken=set())}
    finally:
        clients.close()
    assert {"crm__lookup_order", "crm__orders_search", "crm__whoami", "crm__slow"} <= set(tools)
    lookup = tools["crm__lookup_order"]
    assert lookup.remote_name == "lookup_order"
    assert lookup.description == "Look an order up by its id."
    assert lookup.parameters["properties"]["order_id"]["type"] == "string"
    assert lookup.parameters["required"] == ["order_id"]
    # A dot is not allowed in a function name by OpenAI or Anthropic.
    assert tools["crm__orders_search"].remote_name == "orders.search"


def test_names_stay_apart_and_within_64_characters():
    taken = {"crm__a_b"}
    assert exposed_name("crm", "a.b", taken) != "crm__a_b"
    long = exposed_name("crm", "x" * 100, set())
    assert len(long) == 64 and long.startswith("crm__xxx")
    assert exposed_name("crm", "x" * 100, set()) != exposed_name("crm", "x" * 99 + "y", set())


def test_the_allow_list_limits_what_the_model_sees(crm):
    clients = McpClients(McpSettings())
    try:
        server = mcp_server(http(crm.url, tools=["whoami", "no_such_tool", "lookup_order"]))
        names = [tool.name for tool in McpToolbox(clients, (server,)).list(taken=set())]
    finally:
        clients.close()
    # In the allow-list's order; a name the server does not have is left out.
    assert names == ["crm__whoami", "crm__lookup_order"]


# Runs that call MCP tools ----------------------------------------------------------------


def test_a_run_calls_an_mcp_tool_between_tool_start_and_tool_end(client, auth, agents, crm):
    agent = agents("mcp_caller", mcp_servers=[http(crm.url, tools=["lookup_order"])])
    events = run(client, auth, agent, "A-17")
    [start] = of_type(events, "TOOL_START")
    [end] = of_type(events, "TOOL_END")
    assert start["name"] == end["name"] == "crm__lookup_order"
    assert start["arguments"] == {"order_id": "A-17"}
    assert end["result"] == "Order A-17: shipped" and "error" not in end
    assert content(events) == "crm__lookup_order returned Order A-17: shipped."
    assert events[-1]["event"] == "STOP"


def test_python_tools_and_mcp_tools_sit_side_by_side(client, auth, agents, crm):
    def local_lookup(order_id: str) -> str:
        return f"local {order_id}"

    agent = agents(
        "side_by_side",
        tools=[local_lookup],
        mcp_servers=[http(crm.url, tools=["lookup_order"])],
    )
    sync = client.post(f"{BASE}/{agent}/runs", headers=auth, json={"message": "B-2"}).json
    # The scripted model calls the first tool it is offered: the Python one comes first.
    assert [t["name"] for t in sync["tools"]] == ["local_lookup"]
    toolbox = toolbox_of(client, agent)
    assert [t.name for t in toolbox.list(taken={"local_lookup"})] == ["crm__lookup_order"]


def test_an_answer_as_json_rather_than_events_works_the_same(client, auth, agents, crm_json):
    agent = agents("mcp_json", mcp_servers=[http(crm_json.url, tools=["lookup_order"])])
    [end] = of_type(run(client, auth, agent, "C-3"), "TOOL_END")
    assert end["result"] == "Order C-3: shipped"


def test_a_structured_result_reaches_the_model_as_its_text(client, auth, agents, crm):
    agent = agents("mcp_structured", mcp_servers=[http(crm.url, tools=["orders.search"])])
    [end] = of_type(run(client, auth, agent, "red shoes"), "TOOL_END")
    assert end["name"] == "crm__orders_search"
    assert json.loads(end["result"]) == {"query": "red shoes", "orders": ["A-1", "A-2"]}


def test_a_tool_error_is_fed_back_to_the_model_and_the_run_goes_on(client, auth, agents, crm):
    agent = agents("mcp_failing", mcp_servers=[http(crm.url, tools=["fail"])])
    events = run(client, auth, agent, "the warehouse is closed")
    [end] = of_type(events, "TOOL_END")
    assert end["result"] is None and "the warehouse is closed" in end["error"]
    assert content(events).startswith("crm__fail returned Error: ")
    assert events[-1]["event"] == "STOP"


def test_a_slow_tool_is_stopped_at_the_servers_timeout(client, auth, agents, crm):
    agent = agents("mcp_slow", mcp_servers=[http(crm.url, tools=["slow"], timeout=0.5)])
    response = client.post(f"{BASE}/{agent}/runs", headers=auth, json={"message": "wait 30"})
    body = response.json
    assert body["status"] == "COMPLETED"
    [call] = body["tools"]
    assert call["isError"] and "0.5 seconds" in call["result"], call
    # Cut off at the timeout, not left to run the thirty seconds it asked for.
    assert call["durationMs"] < 30_000


def test_a_result_over_the_size_limit_is_cut_with_a_note(database_url, agents, crm):
    app = create_app(
        {"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_TOOL_RESULT_MAX_CHARS": 1000}
    )
    try:
        client = app.test_client()
        with app.app_context():
            auth = make_token()
        agent = agents("mcp_huge", mcp_servers=[http(crm.url, tools=["huge"])])
        [end] = of_type(run(client, auth, agent, "5000"), "TOOL_END")
    finally:
        app.extensions["agent_runs"].executor.shutdown(timeout=10)
    assert end["result"].startswith("x" * 1000 + "\n[The result was cut: it had 5000 characters")
    assert "error" not in end


def test_an_answer_over_the_response_limit_fails_the_call(database_url, agents, crm):
    app = create_app(
        {"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_MCP_MAX_RESPONSE_BYTES": 100_000}
    )
    try:
        client = app.test_client()
        with app.app_context():
            auth = make_token()
        agent = agents("mcp_too_big", mcp_servers=[http(crm.url, tools=["huge"])])
        events = run(client, auth, agent, "500000")
    finally:
        app.extensions["agent_runs"].executor.shutdown(timeout=10)
    [end] = of_type(events, "TOOL_END")
    assert "larger than 100000 bytes" in end["error"]
    assert events[-1]["event"] == "STOP"


# Servers that are down, hang or answer garbage -------------------------------------------


@pytest.mark.parametrize("path", ["/garbage", "/hang", "/endless", "/nowhere"])
def test_a_server_that_cannot_list_its_tools_leaves_the_run_without_them(
    database_url, agents, crm, path
):
    app = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_TOOL_TIMEOUT": 1})
    try:
        client = app.test_client()
        with app.app_context():
            auth = make_token()
        agent = agents("mcp_broken", mcp_servers=[http(crm.base + path)])
        events = run(client, auth, agent, "hello")
    finally:
        app.extensions["agent_runs"].executor.shutdown(timeout=10)
    assert not of_type(events, "TOOL_START")
    assert content(events) == "You said: hello" and events[-1]["event"] == "STOP"


def test_garbage_endless_and_missing_answers_are_errors_the_model_can_read(crm):
    clients = McpClients(McpSettings(max_response_bytes=100_000))
    try:
        for path, complaint in [
            ("/garbage", "the answer is not JSON-RPC"),
            ("/endless", "larger than 100000 bytes"),
            ("/nowhere", "HTTP 404"),
        ]:
            connection = clients.connection(mcp_server(http(crm.base + path)), {})
            with pytest.raises(McpError, match=complaint) as raised:
                connection.request("tools/list", {}, timeout=5)
            assert str(raised.value).startswith(f"MCP server 'crm' at {crm.base}{path}: ")
        connection = clients.connection(mcp_server(http(crm.base + "/hang")), {})
        with pytest.raises(McpError, match="no answer within 0.5 seconds"):
            connection.request("tools/list", {}, timeout=0.5)
    finally:
        clients.close()


def test_a_server_that_goes_down_gives_tool_end_errors_and_the_run_goes_on(client, auth, agents):
    with McpServerProcess() as doomed:
        agent = agents("mcp_doomed", mcp_servers=[http(doomed.url, tools=["lookup_order"])])
        [end] = of_type(run(client, auth, agent, "D-4"), "TOOL_END")
        assert end["result"] == "Order D-4: shipped"
    # The tool list is still cached; the call finds nobody there.
    events = run(client, auth, agent, "D-5")
    [end] = of_type(events, "TOOL_END")
    assert end["name"] == "crm__lookup_order" and end["result"] is None
    assert end["error"].startswith(f"MCP server 'crm' at {doomed.url}: ConnectError")
    assert events[-1]["event"] == "STOP"


# Credentials ----------------------------------------------------------------------------


def test_each_run_calls_as_its_own_user_and_no_credential_is_stored(
    client, auth, agents, crm, monkeypatch, database_url
):
    monkeypatch.setenv("CRM_TENANT", "acme-corp")
    agent = agents(
        "mcp_as_user",
        mcp_servers=[http(crm.url, tools=["whoami"], headers={"X-Tenant": "${CRM_TENANT}"})],
    )
    seen = {}
    for user in ("alice", "bob"):
        headers = {"crm": {"Authorization": f"Bearer token-of-{user}"}}
        events = run(client, auth, agent, "who", options={"mcpHeaders": headers})
        [end] = of_type(events, "TOOL_END")
        seen[user] = end["result"]
        run_id = json.loads(events[0]["data"])["runId"]
        stored = client.get(f"{BASE}/{agent}/runs/{run_id}/status", headers=auth).json
        assert stored["status"] == "COMPLETED"
    assert seen == {"alice": "user=alice tenant=acme-corp", "bob": "user=bob tenant=acme-corp"}
    # A run without headers of its own calls with the definition's alone.
    [end] = of_type(run(client, auth, agent, "who"), "TOOL_END")
    assert end["result"] == "user=nobody tenant=acme-corp"

    # Neither the tokens nor the expanded variable are anywhere in the database.
    client.application.extensions["agent_runs"].executor.log.flush()
    path = database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        dump = "\n".join(connection.iterdump())
    assert "token-of-alice" not in dump and "token-of-bob" not in dump
    assert "mcpHeaders" not in dump and "mcp_headers" not in dump
    assert "Bearer" not in dump


def test_run_headers_must_name_an_http_server_of_the_agent(client, auth, agents, crm):
    agent = agents("mcp_headers_checked", mcp_servers=[http(crm.url), stdio_server("files")])
    for servers, field in [
        ({"nope": {"Authorization": "Bearer x"}}, "options.mcpHeaders.nope"),
        ({"files": {"Authorization": "Bearer x"}}, "options.mcpHeaders.files"),
    ]:
        response = client.post(
            f"{BASE}/{agent}/runs",
            headers=auth,
            json={"message": "hi", "options": {"mcpHeaders": servers}},
        )
        assert response.status_code == 422, response.json
        assert list(response.json["errors"]) == [field]
    for servers in [
        {"crm": {"Bad Header": "x"}},
        {"crm": {"Authorization": "Bearer x\r\nX-Injected: 1"}},
        {"crm": "Bearer x"},
    ]:
        response = client.post(
            f"{BASE}/{agent}/runs",
            headers=auth,
            json={"message": "hi", "options": {"mcpHeaders": servers}},
        )
        assert response.status_code == 422, response.json
        assert "options.mcpHeaders.crm" in response.json["detail"]


def test_an_unset_variable_leaves_the_run_without_that_servers_tools(
    client, auth, agents, crm, monkeypatch
):
    monkeypatch.delenv("CRM_TOKEN_NOT_SET", raising=False)
    agent = agents(
        "mcp_unset",
        mcp_servers=[http(crm.url, headers={"Authorization": "Bearer ${CRM_TOKEN_NOT_SET}"})],
    )
    events = run(client, auth, agent, "hello")
    assert not of_type(events, "TOOL_START") and events[-1]["event"] == "STOP"
    toolbox = toolbox_of(client, agent)
    assert toolbox.list(taken=set()) == []
    assert "CRM_TOKEN_NOT_SET is not set" in toolbox.unavailable["crm"]


# Approval -------------------------------------------------------------------------------


def test_an_mcp_tool_that_requires_approval_pauses_the_run(client, auth, agents, crm):
    agent = agents(
        "mcp_approval",
        mcp_servers=[http(crm.url, tools=["whoami"], requires_approval=["whoami"])],
    )
    headers = {"crm": {"Authorization": "Bearer token-of-alice"}}
    paused = client.post(
        f"{BASE}/{agent}/runs",
        headers=auth,
        json={"message": "who", "options": {"mcpHeaders": headers}},
    ).json
    assert paused["status"] == "PAUSED" and paused["tools"] == []
    url = f"{BASE}/{agent}/runs/{paused['runId']}"
    action = client.get(f"{url}/status", headers=auth).json["requiredAction"]
    assert action["type"] == "TOOL_APPROVAL" and action["tool"] == "crm__whoami"
    # The run's headers were never stored: the approval brings them again.
    done = client.post(
        f"{url}/continue",
        headers=auth,
        json={"action": "APPROVE", "options": {"mcpHeaders": headers}},
    ).json
    assert done["status"] == "COMPLETED"
    assert done["tools"][0]["result"] == "user=alice tenant="


def test_a_rejected_mcp_call_is_not_made(client, auth, agents, crm):
    agent = agents(
        "mcp_rejected", mcp_servers=[http(crm.url, tools=["fail"], requires_approval=["fail"])]
    )
    paused = client.post(f"{BASE}/{agent}/runs", headers=auth, json={"message": "x"}).json
    url = f"{BASE}/{agent}/runs/{paused['runId']}"
    done = client.post(f"{url}/continue", headers=auth, json={"action": "REJECT"}).json
    assert done["status"] == "COMPLETED"
    assert done["tools"][0]["isError"] and "rejected" in done["tools"][0]["result"]


# The tool list cache --------------------------------------------------------------------


def test_the_tool_list_is_cached_and_refreshed_when_the_server_says_it_changed():
    with McpServerProcess() as server:
        clients = McpClients(McpSettings(tools_ttl=3600))
        try:
            definition = mcp_server(http(server.url))
            before = [t["name"] for t in clients.list_tools(definition, {})]
            assert "fresh_tool" not in before
            result, error = clients.call(definition, {}, "add_tool", {"name": "fresh_tool"}, 5)
            assert (result, error) == ("added fresh_tool", None)
            # The server's notification arrives on the session's GET stream; until then the
            # cached list stands. Waited for, at most ten seconds.
            names = before
            with gevent.Timeout(10, AssertionError("tools/list_changed was not heard")):
                while "fresh_tool" not in names:
                    gevent.sleep(0.05)
                    names = [t["name"] for t in clients.list_tools(definition, {})]
        finally:
            clients.close()


def test_a_fresh_list_is_not_asked_for_again(crm):
    clients = McpClients(McpSettings(tools_ttl=3600))
    try:
        definition = mcp_server(http(crm.url))
        first = clients.list_tools(definition, {})
        # Same list object: no request was made.
        assert clients.list_tools(definition, {}) is first
        expired = McpClients(McpSettings(tools_ttl=0))
        try:
            one = expired.list_tools(definition, {})
            assert expired.list_tools(definition, {}) is not one
        finally:
            expired.close()
    finally:
        clients.close()


# stdio ----------------------------------------------------------------------------------


def test_a_local_command_serves_tools_over_stdio(client, auth, agents):
    agent = agents("mcp_stdio", mcp_servers=[stdio_server(tools=["lookup_order"])])
    [end] = of_type(run(client, auth, agent, "E-5"), "TOOL_END")
    assert end["name"] == "files__lookup_order"
    assert end["result"] == "Order E-5: shipped"


def test_a_stdio_server_that_exits_is_started_again():
    clients = McpClients(McpSettings())
    try:
        definition = mcp_server(stdio_server())
        assert clients.call(definition, {}, "lookup_order", {"order_id": "F"}, 20)[0] == (
            "Order F: shipped"
        )
        connection = clients.connection(definition, {})
        connection.process.kill()  # type: ignore[attr-defined]
        connection.process.wait()  # type: ignore[attr-defined]
        with gevent.Timeout(20):
            result = clients.call(definition, {}, "lookup_order", {"order_id": "G"}, 20)
        assert result == ("Order G: shipped", None)
    finally:
        clients.close()


def test_a_stdio_tool_that_hangs_times_out_and_the_server_stays_usable():
    clients = McpClients(McpSettings())
    try:
        definition = mcp_server(stdio_server())
        with pytest.raises(McpError, match="no answer within 0.5 seconds"):
            clients.call(definition, {}, "slow", {"seconds": "30"}, 0.5)
        assert clients.call(definition, {}, "lookup_order", {"order_id": "H"}, 20) == (
            "Order H: shipped",
            None,
        )
    finally:
        clients.close()
