"""Agents as data: an organisation's own agents, stored through the API as versions."""

import dataclasses
import json
import sys

import gevent
import pytest
import requests

from agent_runs.auth import create_token
from agent_runs.db import database
from agent_runs.models import AgentDefinition
from agent_runs.runtime.addresses import AddressPolicy
from agent_runs.runtime.agents import McpServer
from agent_runs.runtime.mcp import McpClients, McpError, McpSettings, McpTool, McpToolbox

from .conftest import make_token
from .fake_openai import FakeOpenAI, answer
from .mcp_servers import McpServerProcess
from .server import GunicornServer
from .sse import parse_stream
from .webhook_receiver import Receiver


def admin_token(org_id="acme", user_id=None):
    with database.connection_context():
        _, secret = create_token(org_id, user_id, scopes=("admin",))
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def admin(app):
    return admin_token()


SUPPORT = {
    "id": "support",
    "name": "Support",
    "description": "Answers support questions.",
    "instructions": "Be kind.",
    "model": "scripted",
    "tools": ["get_current_time"],
}


def create(client, headers, definition=SUPPORT):
    response = client.post("/api/agents", headers=headers, json=definition)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response


def run(client, headers, agent="support", message="hi", **body):
    response = client.post(
        f"/api/agents/{agent}/runs", headers=headers, json={"message": message, **body}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def test_an_admin_stores_an_agent_that_its_organisation_runs(client, admin, auth):
    response = create(client, admin)
    assert response.headers["Location"].endswith("/api/agents/support")
    assert response.headers["ETag"] == '"1"'
    body = response.json
    assert body["source"] == "organisation" and body["version"] == 1
    assert body["definition"] == SUPPORT
    assert [tool["name"] for tool in body["tools"]] == ["get_current_time"]

    listed = {agent["id"]: agent for agent in client.get("/api/agents", headers=auth).json}
    assert listed["support"]["version"] == 1 and listed["finance_agent"]["source"] == "server"
    assert "definition" not in listed["support"]

    done = run(client, auth, message="What time is it?")
    assert done["status"] == "COMPLETED" and done["metadata"]["agentVersion"] == 1
    assert done["tools"][0]["name"] == "get_current_time"
    status = client.get(f"/api/agents/support/runs/{done['runId']}/status", headers=auth).json
    assert status["agentVersion"] == 1
    # A file agent's run has no version.
    other = run(client, auth, agent="assistant")
    assert "agentVersion" not in other["metadata"]


def test_another_organisation_never_sees_it(client, admin):
    create(client, admin)
    other = make_token("globex")
    assert "support" not in [a["id"] for a in client.get("/api/agents", headers=other).json]
    assert client.get("/api/agents/support", headers=other).status_code == 404
    response = client.post("/api/agents/support/runs", headers=other, json={"message": "hi"})
    assert response.status_code == 404
    # Its own agent of the same id is its own.
    create(client, admin_token("globex"), {**SUPPORT, "instructions": "Be brief."})
    assert client.get("/api/agents/support", headers=other).json["definition"]["instructions"] == (
        "Be brief."
    )


def test_each_change_is_a_new_version_and_runs_record_theirs(client, admin, auth):
    create(client, admin)
    first = run(client, auth)
    replaced = client.put(
        "/api/agents/support",
        headers=admin,
        json={**SUPPORT, "tools": [], "model_options": {"content_deltas": 2}},
    )
    assert replaced.status_code == 200 and replaced.json["version"] == 2
    assert replaced.headers["ETag"] == '"2"'
    patched = client.patch(
        "/api/agents/support",
        headers={**admin, "Content-Type": "application/merge-patch+json"},
        json={"description": "Patched.", "model_options": None},
    )
    assert patched.status_code == 200, patched.json
    assert patched.json["version"] == 3
    assert patched.json["definition"] == {**SUPPORT, "tools": [], "description": "Patched."}
    third = run(client, auth)
    assert (first["metadata"]["agentVersion"], third["metadata"]["agentVersion"]) == (1, 3)
    assert third["tools"] == []
    versions = client.get("/api/agents/support/versions", headers=auth).json
    assert [v["version"] for v in versions] == [3, 2, 1]
    assert versions[2]["definition"] == SUPPORT and versions[0]["deleted"] is False


def test_deleting_keeps_the_runs_and_the_versions(client, admin, auth):
    create(client, admin)
    done = run(client, auth)
    assert client.delete("/api/agents/support", headers=admin).status_code == 204
    assert client.get("/api/agents/support", headers=auth).status_code == 404
    assert "support" not in [a["id"] for a in client.get("/api/agents", headers=auth).json]
    refused = client.post("/api/agents/support/runs", headers=auth, json={"message": "hi"})
    assert refused.status_code == 404
    # The runs of a deleted agent can still be read.
    status = client.get(f"/api/agents/support/runs/{done['runId']}/status", headers=auth)
    assert status.status_code == 200 and status.json["agentVersion"] == 1
    assert client.delete("/api/agents/support", headers=admin).status_code == 404
    assert client.put("/api/agents/support", headers=admin, json=SUPPORT).status_code == 404
    # Made again, it goes on from the deletion's version.
    assert create(client, admin).json["version"] == 3
    versions = client.get("/api/agents/support/versions", headers=auth).json
    assert [(v["version"], v["deleted"]) for v in versions] == [(3, False), (2, True), (1, False)]


def test_changes_need_the_admin_scope(client, admin, auth):
    assert client.post("/api/agents", headers=auth, json=SUPPORT).status_code == 403
    create(client, admin)
    for method in ("put", "patch", "delete"):
        response = getattr(client, method)("/api/agents/support", headers=auth, json=SUPPORT)
        assert response.status_code == 403, method
        assert response.mimetype == "application/problem+json"


def test_the_servers_agents_are_read_only(client, admin):
    for method, path, body in (
        ("post", "/api/agents", {**SUPPORT, "id": "finance_agent"}),
        ("put", "/api/agents/finance_agent", {**SUPPORT, "id": "finance_agent"}),
        ("patch", "/api/agents/finance_agent", {"description": "mine now"}),
        ("delete", "/api/agents/finance_agent", None),
        ("get", "/api/agents/finance_agent/versions", None),
    ):
        response = getattr(client, method)(path, headers=admin, json=body)
        assert response.status_code == 409, (method, path)
        assert response.mimetype == "application/problem+json"
        assert "read-only" in response.json["detail"]


def test_a_second_agent_of_an_id_and_a_stale_if_match_are_refused(client, admin):
    create(client, admin)
    again = client.post("/api/agents", headers=admin, json=SUPPORT)
    assert again.status_code == 409 and "PUT or PATCH" in again.json["detail"]
    stale = client.put("/api/agents/support", headers={**admin, "If-Match": '"7"'}, json=SUPPORT)
    assert stale.status_code == 412
    fresh = client.put("/api/agents/support", headers={**admin, "If-Match": '"1"'}, json=SUPPORT)
    assert fresh.status_code == 200 and fresh.json["version"] == 2
    gone = client.delete("/api/agents/support", headers={**admin, "If-Match": '"1"'})
    assert gone.status_code == 412
    bad = client.delete("/api/agents/support", headers={**admin, "If-Match": "W/x, y"})
    assert bad.status_code == 412


@pytest.mark.parametrize(
    "definition, field",
    [
        ({**SUPPORT, "tools": ["no_such_tool"]}, "tools"),
        # An import path would let an API caller import any module of the server.
        ({**SUPPORT, "tools": ["os:system"]}, "tools"),
        ({**SUPPORT, "model": "nope:model"}, "model"),
        ({**SUPPORT, "model": ""}, "model"),
        ({**SUPPORT, "allowed_models": ["scripted", "bogus:x"]}, "allowed_models"),
        ({**SUPPORT, "max_steps": 0}, "max_steps"),
        ({**SUPPORT, "colour": "red"}, "colour"),
        ({**SUPPORT, "id": "bad id"}, "id"),
        ({"name": "no id"}, "id"),
        (
            {**SUPPORT, "response_format": {"type": "json_schema", "schema": {"type": "strin"}}},
            "response_format",
        ),
        (
            {
                **SUPPORT,
                "mcp_servers": [
                    {
                        "name": "crm",
                        "url": "http://h/mcp",
                        "headers": {"Authorization": "Bearer x1"},
                    }
                ],
            },
            "mcp_servers",
        ),
        ({**SUPPORT, "instructions": "x" * 300_000}, "_schema"),
    ],
)
def test_a_bad_definition_is_422_naming_the_field(client, admin, definition, field):
    response = client.post("/api/agents", headers=admin, json=definition)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert field in response.json["errors"], response.json
    assert client.get("/api/agents/support", headers=admin).status_code == 404


def test_a_local_command_is_refused_from_the_api(client, admin, auth, tmp_path):
    """An MCP server that is a command runs on the server: only its own agents file may name
    one, never an organisation's admin."""
    ran = tmp_path / "ran"
    command = {
        "name": "files",
        "command": sys.executable,
        "args": ["-c", f"open({str(ran)!r}, 'w')"],
    }
    response = client.post("/api/agents", headers=admin, json={**SUPPORT, "mcp_servers": [command]})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert list(response.json["errors"]["mcp_servers"]["0"]) == ["command"]
    assert "agents file" in response.json["detail"]
    create(client, admin)
    patched = client.patch("/api/agents/support", headers=admin, json={"mcp_servers": [command]})
    assert patched.status_code == 422 and "mcp_servers" in patched.json["errors"]
    run(client, auth)
    # A version stored before API agents were refused commands is refused when it runs.
    with database.connection_context():
        AgentDefinition.create(
            org_id="acme",
            agent_id="support",
            version=2,
            definition=dict(mcp_servers=[command], **SUPPORT),
        )
    stale = client.post("/api/agents/support/runs", headers=auth, json={"message": "hi"})
    assert stale.status_code == 409 and "no longer fits" in stale.json["detail"]
    assert not ran.exists()
    # A server over HTTP is an API agent's to name.
    remote = {"name": "crm", "url": "https://93.184.215.14/mcp"}  # a public address
    changed = client.patch("/api/agents/support", headers=admin, json={"mcp_servers": [remote]})
    assert changed.status_code == 200, changed.json


def test_a_bad_change_is_422_and_keeps_the_version(client, admin):
    create(client, admin)
    for method, body, field in (
        ("put", {**SUPPORT, "tools": ["no_such_tool"]}, "tools"),
        ("put", {**SUPPORT, "id": "renamed"}, "id"),
        ("patch", {"model": "nope:x"}, "model"),
        ("patch", {"tools": [{"use": "get_current_time", "colour": "red"}]}, "tools"),
    ):
        response = getattr(client, method)("/api/agents/support", headers=admin, json=body)
        assert response.status_code == 422, (method, body, response.json)
        assert field in response.json["errors"]
    assert client.get("/api/agents/support", headers=admin).json["version"] == 1
    response = client.post("/api/agents", headers=admin, json=["not", "an", "object"])
    assert response.status_code == 422


def test_a_paused_run_resumes_with_the_version_it_ran(client, admin, auth):
    gated = {**SUPPORT, "tools": [{"use": "get_current_time", "requires_approval": True}]}
    create(client, admin, gated)
    paused = run(client, auth, message="What time is it?")
    assert paused["status"] == "PAUSED"
    # The agent changes meanwhile: its tool goes.
    client.put("/api/agents/support", headers=admin, json={**SUPPORT, "tools": []})
    resumed = client.post(
        f"/api/agents/support/runs/{paused['runId']}/continue",
        headers=auth,
        json={"action": "APPROVE"},
    )
    assert resumed.status_code == 200, resumed.json
    done = resumed.json
    assert done["status"] == "COMPLETED" and done["metadata"]["agentVersion"] == 1
    assert [t["name"] for t in done["tools"]] == ["get_current_time"]
    assert done["tools"][0]["isError"] is False


def test_every_worker_runs_the_current_version(tmp_path):
    """Changes made through one worker are what runs on any worker get next."""
    with GunicornServer(tmp_path, workers=2) as server:
        secret = server.cli("tokens", "create", "--org", "acme", "--scope", "admin")
        headers = {"Authorization": f"Bearer {secret.stdout.strip().splitlines()[-1]}"}

        def call(method, path, **kwargs):
            # A new connection each time, so requests land on either worker.
            return requests.request(
                method,
                server.url + path,
                headers={**headers, "Connection": "close"},
                timeout=15,
                **kwargs,
            )

        assert call("POST", "/api/agents", json=SUPPORT).status_code == 201
        for version in range(2, 12):
            changed = call("PUT", "/api/agents/support", json={**SUPPORT, "name": f"v{version}"})
            assert changed.status_code == 200 and changed.json()["version"] == version
            ran = call("POST", "/api/agents/support/runs", json={"message": "hi"})
            assert ran.status_code == 200, ran.text
            assert ran.json()["metadata"]["agentVersion"] == version
            assert call("GET", "/api/agents/support").json()["name"] == f"v{version}"

        # Changes at once, on both workers: each stored as a version, or refused with a 409
        # for having been made against one that another change replaced; never a 500.
        changes = [
            gevent.spawn(call, "PUT", "/api/agents/support", json={**SUPPORT, "name": f"c{n}"})
            for n in range(12)
        ]
        gevent.joinall(changes, timeout=60, raise_error=True)
        statuses = sorted(change.value.status_code for change in changes)
        assert set(statuses) <= {200, 409} and 200 in statuses, statuses
        versions = call("GET", "/api/agents/support/versions").json()
        assert [v["version"] for v in versions] == list(range(11 + statuses.count(200), 0, -1))


# What an organisation's agent may read of the server's environment ------------------------


def app_with(database_url, **settings):
    """Another application on the test's database, with settings of its own."""
    from agent_runs import create_app

    config = {"AGENT_RUNS_DATABASE_URL": database_url, "TESTING": True}
    return create_app({**config, **{f"AGENT_RUNS_{k.upper()}": v for k, v in settings.items()}})


def crm_server(**settings):
    return {"name": "crm", "url": "https://93.184.215.14/mcp", **settings}


@pytest.mark.parametrize(
    "changes, field",
    [
        (
            {"mcp_servers": [crm_server(headers={"Authorization": "Bearer ${SECRET_OF_SERVER}"})]},
            "mcp_servers.0.headers.Authorization",
        ),
        (
            {"mcp_servers": [crm_server(url="https://93.184.215.14/mcp?t=${SECRET_OF_SERVER}")]},
            "mcp_servers.0.url",
        ),
        (
            {"mcp_servers": [crm_server(url="https://${SECRET_OF_SERVER}.example.com/mcp")]},
            "mcp_servers.0.url",
        ),
        (
            {
                "model": "openai:gpt-4o-mini",
                "model_options": {
                    "base_url": "https://93.184.215.14/v1",
                    "api_key_env": "SECRET_OF_SERVER",
                },
            },
            "model_options.api_key_env",
        ),
        (
            {"mcp_servers": [crm_server(headers={"X-Db": "${AGENT_RUNS_DATABASE_URL}"})]},
            "mcp_servers.0.headers.X-Db",
        ),
        (
            {"mcp_servers": [crm_server(headers={"X-Jwt": "${AGENT_RUNS_JWT_SECRET}"})]},
            "mcp_servers.0.headers.X-Jwt",
        ),
    ],
)
def test_an_api_agent_reads_no_variable_the_server_does_not_allow(
    client, admin, monkeypatch, changes, field
):
    """Any organisation's admin writes these: a ${NAME} the operator did not allow would send
    the server's secret wherever the definition says."""
    monkeypatch.setenv("SECRET_OF_SERVER", "the-servers-own-secret")
    response = client.post("/api/agents", headers=admin, json={**SUPPORT, **changes})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert field in response.json["detail"], response.json
    assert "AGENT_RUNS_AGENT_ENV_ALLOW" in response.json["detail"]
    assert "the-servers-own-secret" not in response.get_data(as_text=True)
    create(client, admin)
    patched = client.patch("/api/agents/support", headers=admin, json=changes)
    assert patched.status_code == 422 and field in patched.json["detail"]
    assert client.get("/api/agents/support", headers=admin).json["version"] == 1


def test_the_variables_the_server_allows_may_be_named(database_url):
    app = app_with(database_url, agent_env_allow="CRM_TOKEN, ACME_*, AGENT_RUNS_*")
    client = app.test_client()
    with app.app_context():
        headers = admin_token()
    allowed = {
        "mcp_servers": [
            crm_server(headers={"Authorization": "Bearer ${CRM_TOKEN}", "X-Tenant": "${ACME_T}"})
        ],
        "model": "openai:gpt-4o-mini",
        "model_options": {"base_url": "https://93.184.215.14/v1", "api_key_env": "ACME_KEY"},
    }
    response = client.post("/api/agents", headers=headers, json={**SUPPORT, **allowed})
    assert response.status_code == 201, response.json
    for changes, field in (
        ({"mcp_servers": [crm_server(headers={"X-Other": "${CRM_TOKEN2}"})]}, "X-Other"),
        ({"model_options": {"api_key_env": "ACME"}}, "model_options.api_key_env"),
        # The server's own settings never, whatever the list says.
        ({"mcp_servers": [crm_server(headers={"X": "${AGENT_RUNS_JWT_SECRET}"})]}, "X"),
    ):
        patched = client.patch("/api/agents/support", headers=headers, json=changes)
        assert patched.status_code == 422, patched.json
        assert field in patched.json["detail"]
    # A credential written out stays refused, allowed variables or not.
    for written in ({"Authorization": "Bearer x1"}, {"X-Api-Key": "abcd1234"}):
        changes = {"mcp_servers": [crm_server(headers=written)]}
        patched = client.patch("/api/agents/support", headers=headers, json=changes)
        assert patched.status_code == 422, patched.json
        assert "written out" in patched.json["detail"]
    app.extensions["agent_runs"].executor.shutdown(timeout=5)


def test_a_version_naming_a_variable_no_longer_allowed_is_refused_when_it_runs(
    database_url, monkeypatch
):
    monkeypatch.setenv("CRM_TOKEN", "token-of-the-server")
    lenient = app_with(database_url, agent_env_allow="CRM_TOKEN")
    with lenient.app_context():
        headers = admin_token()
        auth = make_token()
    server = crm_server(headers={"Authorization": "Bearer ${CRM_TOKEN}"})
    stored = lenient.test_client().post(
        "/api/agents", headers=headers, json={**SUPPORT, "mcp_servers": [server]}
    )
    assert stored.status_code == 201, stored.json
    lenient.extensions["agent_runs"].executor.shutdown(timeout=5)
    # The operator took CRM_TOKEN off the list: the stored version no longer runs.
    strict = app_with(database_url)
    response = strict.test_client().post(
        "/api/agents/support/runs", headers=auth, json={"message": "hi"}
    )
    assert response.status_code == 409, response.json
    assert "no longer fits" in response.json["detail"]
    assert "mcp_servers.0.headers.Authorization" in response.json["detail"]
    strict.extensions["agent_runs"].executor.shutdown(timeout=5)


def test_the_allow_list_is_names_or_prefixes():
    from agent_runs.runtime.agents import StoredAgentPolicy, variable_allow_list

    assert variable_allow_list(" CRM_TOKEN, ACME_* ,") == ("CRM_TOKEN", "ACME_*")
    assert variable_allow_list("") == ()
    for bad in ("*", "CRM-TOKEN", "A*B", "${X}"):
        with pytest.raises(ValueError, match="AGENT_RUNS_AGENT_ENV_ALLOW"):
            variable_allow_list(bad)
    policy = StoredAgentPolicy(("CRM_TOKEN", "ACME_*", "AGENT_RUNS_*"))
    assert policy.allows_variable("CRM_TOKEN") and policy.allows_variable("ACME_")
    assert not policy.allows_variable("CRM_TOKEN_2") and not policy.allows_variable("ACM")
    assert not policy.allows_variable("AGENT_RUNS_JWT_SECRET")
    assert not StoredAgentPolicy().allows_variable("CRM_TOKEN")


def test_a_server_given_a_bad_allow_list_does_not_start(database_url):
    with pytest.raises(ValueError, match="AGENT_RUNS_AGENT_ENV_ALLOW"):
        app_with(database_url, agent_env_allow="*")


# Where an organisation's agent may make the server connect --------------------------------

PRIVATE_URLS = [
    "http://127.0.0.1:9/mcp",
    "http://localhost:8000/mcp",  # a name that resolves to loopback
    "http://169.254.169.254/latest/meta-data/",  # the cloud's metadata service
    "http://10.1.2.3/mcp",
    "http://192.168.1.1/mcp",
    "https://[::1]/mcp",
    "https://[::ffff:127.0.0.1]/mcp",
    "http://0.0.0.0:8080/mcp",
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_an_mcp_server_at_a_private_address_is_refused(client, admin, url):
    response = client.post(
        "/api/agents", headers=admin, json={**SUPPORT, "mcp_servers": [crm_server(url=url)]}
    )
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    [message] = response.json["errors"]["mcp_servers"]["0"]["url"]
    assert "private, loopback or link-local" in message
    assert "mcp_servers.0.url" in response.json["detail"]
    create(client, admin)
    patched = client.patch(
        "/api/agents/support", headers=admin, json={"mcp_servers": [crm_server(url=url)]}
    )
    assert patched.status_code == 422 and "mcp_servers.0.url" in patched.json["detail"]


@pytest.mark.parametrize(
    "base_url", ["http://169.254.169.254/v1", "http://localhost:11434/v1", "http://10.0.0.7/v1"]
)
def test_a_model_server_at_a_private_address_is_refused(client, admin, base_url):
    definition = {**SUPPORT, "model": "openai:m", "model_options": {"base_url": base_url}}
    response = client.post("/api/agents", headers=admin, json=definition)
    assert response.status_code == 422, response.get_data(as_text=True)
    [message] = response.json["errors"]["model_options"]["base_url"]
    assert "private, loopback or link-local" in message


def test_a_host_that_does_not_resolve_or_is_no_url_is_refused(client, admin):
    for changes, field in (
        ({"mcp_servers": [crm_server(url="https://nowhere.invalid/mcp")]}, "mcp_servers.0.url"),
        ({"model": "openai:m", "model_options": {"base_url": "ftp://x"}}, "base_url"),
        ({"model": "openai:m", "model_options": {"base_url": 7}}, "base_url"),
    ):
        response = client.post("/api/agents", headers=admin, json={**SUPPORT, **changes})
        assert response.status_code == 422, response.json
        assert field in response.json["detail"]


def test_the_host_an_allowed_variable_makes_is_the_one_checked(database_url, monkeypatch):
    monkeypatch.setenv("MCP_HOST", "127.0.0.1")
    app = app_with(database_url, agent_env_allow="MCP_HOST")
    with app.app_context():
        headers = admin_token()
    servers = [crm_server(url="http://${MCP_HOST}:9/mcp")]
    response = app.test_client().post(
        "/api/agents", headers=headers, json={**SUPPORT, "mcp_servers": servers}
    )
    assert response.status_code == 422, response.json
    assert "127.0.0.1" in response.json["errors"]["mcp_servers"]["0"]["url"][0]
    app.extensions["agent_runs"].executor.shutdown(timeout=5)


def mcp_events(client, auth, agent="support", message="A-17", **body):
    response = client.post(
        f"/api/agents/{agent}/runs/stream", headers=auth, json={"message": message, **body}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return parse_stream(response.get_data(as_text=True))


def tool_ends(events):
    return [json.loads(e["data"]) for e in events if e["event"] == "TOOL_END"]


def test_the_server_may_allow_private_addresses(database_url, monkeypatch):
    """With AGENT_RUNS_AGENT_ALLOW_PRIVATE an organisation's agent calls an MCP server on the
    server's own network, with the variables the server allows."""
    monkeypatch.setenv("CRM_TENANT", "acme-corp")
    app = app_with(database_url, agent_allow_private=True, agent_env_allow="CRM_TENANT")
    client = app.test_client()
    with app.app_context():
        headers, auth = admin_token(), make_token()
    with McpServerProcess() as crm:
        server = crm_server(
            url=crm.url, tools=["lookup_order", "whoami"], headers={"X-Tenant": "${CRM_TENANT}"}
        )
        definition = {**SUPPORT, "tools": [], "mcp_servers": [server]}
        assert client.post("/api/agents", headers=headers, json=definition).status_code == 201
        [end] = tool_ends(mcp_events(client, auth, message="A-17"))
        assert end["name"] == "crm__lookup_order" and end["result"] == "Order A-17: shipped"
        client.patch(
            "/api/agents/support",
            headers=headers,
            json={"mcp_servers": [{**server, "tools": ["whoami"]}]},
        )
        [end] = tool_ends(mcp_events(client, auth, message="who"))
        assert end["result"] == "user=nobody tenant=acme-corp"
    app.extensions["agent_runs"].executor.shutdown(timeout=5)


def test_a_private_address_is_refused_when_connecting(database_url, agents):
    """A server that stops allowing private addresses never connects to one for an
    organisation's agent, whatever was stored (or whatever a name resolves to by then); the
    run goes on without the server's tools. Its own agents' servers are not held to it."""
    lenient = app_with(database_url, agent_allow_private=True)
    with lenient.app_context():
        headers, auth = admin_token(), make_token()
    with Receiver() as receiver:
        url = f"http://localhost:{receiver.port}/mcp"
        definition = {**SUPPORT, "tools": [], "mcp_servers": [crm_server(url=url)]}
        stored = lenient.test_client().post("/api/agents", headers=headers, json=definition)
        assert stored.status_code == 201, stored.json
        lenient.extensions["agent_runs"].executor.shutdown(timeout=5)

        strict = app_with(database_url)
        client = strict.test_client()
        events = mcp_events(client, auth, message="A-17")
        assert [e["event"] for e in events if e["event"].startswith("TOOL")] == []
        assert events[-1]["event"] == "STOP"
        state = strict.extensions["agent_runs"]
        with database.connection_context():
            agent = state.agents.get("acme", "support")
        toolbox = McpToolbox(state.executor.mcp, agent.mcp_servers)
        assert toolbox.list(taken=set()) == []
        reason = toolbox.unavailable["crm"]
        assert "ConnectError: localhost resolves only to private, loopback or link-local" in (
            reason
        )
        assert receiver.received == []
        strict.extensions["agent_runs"].executor.shutdown(timeout=5)


def test_a_call_to_a_guarded_server_is_refused_as_it_connects():
    """The check is made for every connection, a tool call's too: its error is what TOOL_END
    carries. The same server, as the agents file names it, is reached."""
    with McpServerProcess() as crm:
        clients = McpClients(McpSettings(addresses=AddressPolicy()))
        trusted = McpServer(name="crm", url=crm.url.replace("127.0.0.1", "localhost"))
        guarded = dataclasses.replace(trusted, guarded=True)
        assert "lookup_order" in [t["name"] for t in clients.list_tools(trusted, {})]
        tool = McpTool("crm__lookup_order", guarded, "lookup_order", "", {"type": "object"})
        result, error = McpToolbox(clients, (guarded,)).call(tool, {"order_id": "A-1"}, 5)
        assert result is None
        assert "ConnectError: localhost resolves only to private, loopback or link-local" in error
        with pytest.raises(McpError, match="private, loopback or link-local"):
            clients.list_tools(guarded, {})
        allowed = McpClients(McpSettings(addresses=AddressPolicy(allow_private=True)))
        assert allowed.call(guarded, {}, "lookup_order", {"order_id": "A-2"}, 5) == (
            "Order A-2: shipped",
            None,
        )
        clients.close()
        allowed.close()


def test_a_model_server_at_a_private_address_is_refused_when_connecting(database_url):
    """An organisation's agent's base_url is reached through the same guard: a server that
    stops allowing private addresses never sends the model call there."""
    with FakeOpenAI() as fake:
        base_url = fake.url.replace("127.0.0.1", "localhost") + "/v1"
        definition = {
            **SUPPORT,
            "tools": [],
            "model": "openai:test-model",
            "model_options": {"base_url": base_url, "api_key": "k", "max_retries": 0},
        }
        lenient = app_with(database_url, agent_allow_private=True)
        with lenient.app_context():
            headers, auth = admin_token(), make_token()
        client = lenient.test_client()
        assert client.post("/api/agents", headers=headers, json=definition).status_code == 201
        fake.script(answer("Hello from the model"))
        done = run(client, auth)
        assert done["status"] == "COMPLETED" and done["content"] == "Hello from the model"
        assert len(fake.requests) == 1
        lenient.extensions["agent_runs"].executor.shutdown(timeout=5)

        strict = app_with(database_url)
        failed = strict.test_client().post(
            "/api/agents/support/runs", headers=auth, json={"message": "hi"}
        )
        assert failed.json["status"] == "FAILED", failed.json
        error = failed.json["error"]
        assert error["type"] == "model_error"
        assert "localhost resolves only to private, loopback or link-local" in error["message"]
        assert len(fake.requests) == 1
        strict.extensions["agent_runs"].executor.shutdown(timeout=5)


# What an organisation's agents, and runs, may have the model host open -------------------


def operators_server(database_url, tmp_path, **settings):
    """An application whose agents file names two embedded models by path (neither file
    need exist: they are compared, never opened, when an organisation names them), one of
    them in an agent that allows any model."""
    agents_file = tmp_path / "agents.yaml"
    agents_file.write_text(
        "agents:\n"
        "  - id: team\n"
        f"    model: 'local:{tmp_path}/team.gguf'\n"
        "    tools: [agent_runs.runtime.demo_tools:get_current_time]\n"
        "  - id: open\n"
        "    model: scripted\n"
        f"    allowed_models: ['*', 'local:{tmp_path}/listed.gguf']\n"
    )
    return app_with(
        database_url, agents_file=str(agents_file), load_models_on_start=False, **settings
    )


def refused_files(folder):
    """Files an organisation's admin might name: one that exists but is no model, one that
    is missing, and a GGUF the server can read under a name of the admin's (a link to the
    bundled model, which would load)."""
    from agent_runs.providers.local import bundled_model_path

    folder.mkdir(exist_ok=True)
    link = folder / "elsewhere.gguf"
    if not link.is_symlink():
        link.symlink_to(bundled_model_path())
    return ["/etc/hostname", str(folder / "missing.gguf"), str(link)]


def test_an_api_agent_names_no_model_file_of_its_own(client, admin, tmp_path):
    """The model host would open the file an admin named: its error would tell whether the
    file exists, and any GGUF the server's user can read would be loaded."""
    details = set()
    for path in refused_files(tmp_path):
        for changes, field in (
            ({"model": f"local:{path}"}, ["model"]),
            ({"allowed_models": ["scripted", f"local:{path}"]}, ["allowed_models", "1"]),
        ):
            response = client.post("/api/agents", headers=admin, json={**SUPPORT, **changes})
            assert response.status_code == 422, (path, response.get_data(as_text=True))
            assert response.mimetype == "application/problem+json"
            errors = response.json["errors"]
            assert list(errors) == [field[0]]
            if len(field) > 1:
                assert list(errors[field[0]]) == [field[1]]
            assert path not in response.get_data(as_text=True)
            details.add(response.json["detail"])
    # The same words whether the file exists, is no model, or is one.
    assert len(details) == 2, details
    create(client, admin)
    for changes in ({"model": "local:/etc/hostname"}, {"allowed_models": ["local:/etc/x"]}):
        patched = client.patch("/api/agents/support", headers=admin, json=changes)
        assert patched.status_code == 422, patched.json
        put = client.put("/api/agents/support", headers=admin, json={**SUPPORT, **changes})
        assert put.status_code == 422, put.json
    assert client.get("/api/agents/support", headers=admin).json["version"] == 1


def test_an_api_agent_may_name_the_embedded_models_the_server_offers(
    database_url, tmp_path, monkeypatch, agents
):
    """Its default (plain local, the file AGENT_RUNS_LOCAL_MODEL names) and those the
    operator's settings and agents name, as the agents file or Python writes them or
    normalised."""
    monkeypatch.setenv("AGENT_RUNS_LOCAL_MODEL", str(tmp_path / "env.gguf"))
    agents("from_python", model=f"local:{tmp_path}/python.gguf")
    app = operators_server(database_url, tmp_path, default_model=f"local:{tmp_path}/default.gguf")
    client = app.test_client()
    with app.app_context():
        headers = admin_token()
    for number, changes in enumerate(
        (
            {"model": "local"},
            {"model": f"local:{tmp_path}/env.gguf"},
            {"model": f"local:{tmp_path}/default.gguf"},
            {"model": f"local:{tmp_path}/team.gguf"},
            {"model": f"local:{tmp_path}/sub/../team.gguf"},
            {"model": f"local:{tmp_path}/python.gguf"},
            {"allowed_models": ["*", f"local:{tmp_path}/listed.gguf", "local"]},
        )
    ):
        definition = {**SUPPORT, "id": f"org_agent_{number}", **changes}
        response = client.post("/api/agents", headers=headers, json=definition)
        assert response.status_code == 201, (changes, response.json)
    refused = client.post(
        "/api/agents", headers=headers, json={**SUPPORT, "model": f"local:{tmp_path}/other.gguf"}
    )
    assert refused.status_code == 422 and list(refused.json["errors"]) == ["model"]
    app.extensions["agent_runs"].executor.shutdown(timeout=5)


def run_choosing(client, headers, agent, model):
    return client.post(
        f"/api/agents/{agent}/runs",
        headers=headers,
        json={"message": "hi", "options": {"model": model}},
    )


def test_a_run_chooses_no_model_file_of_its_own(database_url, tmp_path):
    """Any token of the organisation starts runs: an agent's allowed_models "*" (the
    operator's or an organisation's) lets it choose any model but an embedded one the
    server does not offer; the operator's agent still runs a path it lists."""
    app = operators_server(database_url, tmp_path)
    client = app.test_client()
    with app.app_context():
        admin = admin_token()
        auth = make_token()
    open_agent = {**SUPPORT, "allowed_models": ["*"]}
    assert client.post("/api/agents", headers=admin, json=open_agent).status_code == 201
    for agent in ("open", "support"):
        details = set()
        for path in refused_files(tmp_path):
            response = run_choosing(client, auth, agent, f"local:{path}")
            assert response.status_code == 422, (agent, path, response.json)
            assert response.mimetype == "application/problem+json"
            assert list(response.json["errors"]) == ["options.model"]
            assert "only those this server offers" in response.json["detail"]
            details.add(response.json["detail"].replace(path, "PATH"))
        assert len(details) == 1, details
        # Any other model, and the embedded models the server offers, stay the run's to pick.
        assert run_choosing(client, auth, agent, "scripted").json["status"] == "COMPLETED"
        offered = run_choosing(client, auth, agent, f"local:{tmp_path}/team.gguf")
        assert offered.status_code == 200, offered.json
        assert offered.json["status"] == "FAILED"  # it is offered, but there is no such file
    # The operator's agent runs the path it lists, as before.
    listed = run_choosing(client, auth, "open", f"local:{tmp_path}/listed.gguf")
    assert listed.status_code == 200 and listed.json["status"] == "FAILED", listed.json
    status = client.get(f"/api/agents/open/runs/{listed.json['runId']}/status", headers=auth)
    assert status.json["error"]["type"] == "model_unavailable"
    app.extensions["agent_runs"].executor.shutdown(timeout=5)


def test_a_version_naming_a_model_no_longer_offered_is_refused_when_it_runs(database_url, tmp_path):
    lenient = operators_server(database_url, tmp_path)
    with lenient.app_context():
        headers = admin_token()
        auth = make_token()
    team = {**SUPPORT, "model": f"local:{tmp_path}/team.gguf"}
    stored = lenient.test_client().post("/api/agents", headers=headers, json=team)
    assert stored.status_code == 201, stored.json
    lenient.extensions["agent_runs"].executor.shutdown(timeout=5)
    # The operator's agents file no longer names the model.
    strict = app_with(database_url, load_models_on_start=False)
    response = strict.test_client().post(
        "/api/agents/support/runs", headers=auth, json={"message": "hi"}
    )
    assert response.status_code == 409, response.json
    assert "no longer fits" in response.json["detail"] and "model:" in response.json["detail"]
    strict.extensions["agent_runs"].executor.shutdown(timeout=5)


@pytest.mark.parametrize("option", ["n_ctx", "n_threads"])
def test_an_api_agent_chooses_not_how_the_embedded_model_loads(client, admin, option):
    """Each n_ctx or n_threads is one more copy of the weights the model host keeps."""
    definition = {**SUPPORT, "model": "local", "model_options": {option: 2048, "seed": 7}}
    response = client.post("/api/agents", headers=admin, json=definition)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert list(response.json["errors"]["model_options"]) == [option]
    # Generation options stay the agent's own.
    create(client, admin, {**SUPPORT, "model": "local", "model_options": {"seed": 7}})
