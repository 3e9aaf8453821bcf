"""GET /agents and /agents/{id}; agents from files and from Python."""

import json

import pytest

import agent_runs
from agent_runs import create_app
from agent_runs.runtime.agents import AgentDefinitionError, load_agents_file, unregister_agent


def test_list_agents_requires_a_token(client):
    response = client.get("/api/agents")
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"


def test_list_agents_shows_the_bundled_agents_with_their_tools(client, auth):
    response = client.get("/api/agents", headers=auth)
    assert response.status_code == 200
    agents = {agent["id"]: agent for agent in response.json}
    finance = agents["finance_agent"]
    assert finance["model"] == "scripted"
    tool = next(t for t in finance["tools"] if t["name"] == "get_stock_price")
    assert tool["parameters"]["required"] == ["ticker"]
    assert set(finance) == {"id", "name", "description", "model", "tools", "source", "version"}
    assert finance["source"] == "server" and finance["version"] is None


def test_show_agent_and_unknown_agent(client, auth):
    assert client.get("/api/agents/finance_agent", headers=auth).json["id"] == "finance_agent"
    response = client.get("/api/agents/nobody", headers=auth)
    assert response.status_code == 404
    assert "nobody" in response.json["detail"]


def test_python_registered_agent_is_served_and_derives_tool_schemas(client, auth):
    def lookup(city: str, days: int = 1) -> str:
        """Look a city up."""
        return city

    agent_runs.register_agent("py_agent", instructions="Be brief.", tools=[lookup])
    try:
        agent = client.get("/api/agents/py_agent", headers=auth).json
        assert agent["tools"] == [
            {
                "name": "lookup",
                "description": "Look a city up.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"],
                },
            }
        ]
    finally:
        unregister_agent("py_agent")
    assert client.get("/api/agents/py_agent", headers=auth).status_code == 404


def test_agents_file_in_json(tmp_path, database_url):
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"agents": [{"id": "only", "instructions": "Hi."}]}))
    app = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_AGENTS_FILE": str(path)})
    registry = app.extensions["agent_runs"].registry
    assert [agent.id for agent in registry.all()] == ["only"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("agents: nope", "top-level 'agents' list"),
        ("agents:\n  - name: no id", "'id'"),
        ("agents:\n  - id: a\n    colour: red", "colour: Unknown field"),
        ("agents:\n  - id: a\n  - id: a", "appears twice"),
        ("agents:\n  - id: a\n    tools: [no_such_tool]", "unknown tool"),
        ("agents:\n  - id: a\n    tools: ['os:no_such_fn']", "cannot import"),
        ("agents:\n  - id: 'bad id'", "id: Must be 1-128 letters"),
        ("agents:\n  - id: a\n    max_steps: 0", "max_steps: Must be greater than or equal to 1"),
        ("agents:\n  - id: a\n    tools: [{use: x, colour: red}]", "tools.0.colour: Unknown"),
        ("agents:\n  - id: a\n    tools: [no_such_tool]", "tools.0: unknown tool"),
        ("agents:\n  - id: a\n    model: 'nope:x'", "model: unknown model provider 'nope'"),
        ("agents:\n  - id: a\n    allowed_models: ['*', 'nope']", "allowed_models.1: unknown"),
        ("agents: [", "not valid YAML"),
    ],
)
def test_bad_agents_files_are_refused_with_a_reason(tmp_path, text, message):
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    with pytest.raises(AgentDefinitionError, match=message):
        load_agents_file(str(path))


MCP_AGENT = """\
agents:
  - id: a
    mcp_servers:
      - {server}
"""


def test_an_agent_lists_mcp_servers_whose_secrets_stay_references(tmp_path):
    path = tmp_path / "agents.yaml"
    path.write_text(
        "agents:\n"
        "  - id: a\n"
        "    mcp_servers:\n"
        "      - name: crm\n"
        "        url: http://127.0.0.1:9/mcp\n"
        "        headers: {Authorization: 'Bearer ${CRM_TOKEN}', X-Tenant: acme}\n"
        "        tools: [lookup_order, refund]\n"
        "        requires_approval: [refund]\n"
        "        timeout: 5\n"
        "      - name: files\n"
        "        command: python\n"
        "        args: [-m, files_server]\n"
        "        env: {FILES_TOKEN: '${FILES_TOKEN}'}\n"
    )
    [crm, files] = load_agents_file(str(path))["a"].mcp_servers
    assert crm.url == "http://127.0.0.1:9/mcp"
    assert crm.headers == {"Authorization": "Bearer ${CRM_TOKEN}", "X-Tenant": "acme"}
    assert crm.tools == ("lookup_order", "refund")
    assert crm.requires_approval == {"refund"} and crm.timeout == 5
    assert (files.command, files.args, files.env) == (
        "python",
        ("-m", "files_server"),
        {"FILES_TOKEN": "${FILES_TOKEN}"},
    )


@pytest.mark.parametrize(
    "server, message",
    [
        (
            "{name: crm, url: 'http://h/mcp', headers: {Authorization: Bearer abc123}}",
            r"mcp_servers\.0\.headers\.Authorization: Holds a secret written out; write it as a "
            r"\$\{NAME\} reference",
        ),
        (
            "{name: crm, url: 'http://h/mcp', headers: {X-Api-Key: abc123}}",
            r"mcp_servers\.0\.headers\.X-Api-Key: Holds a secret",
        ),
        (
            "{name: crm, url: 'http://h/mcp', headers: {X-Custom: sk-proj-0123456789abcdef}}",
            r"mcp_servers\.0\.headers\.X-Custom: Holds a secret",
        ),
        (
            "{name: gh, command: gh-mcp, env: {GITHUB_TOKEN: ghp_0123456789}}",
            r"mcp_servers\.0\.env\.GITHUB_TOKEN: Holds a secret",
        ),
        ("{name: crm, url: 'http://me:pw@h/mcp'}", r"mcp_servers\.0\.url: Holds a password"),
        ("{name: crm, url: 'http://h/mcp?token=abc'}", r"mcp_servers\.0\.url: Query parameter"),
        ("{name: crm, url: 'ftp://h/mcp'}", r"mcp_servers\.0\.url: Must be an http\(s\) URL"),
        ("{name: crm}", r"mcp_servers\.0\.url: Give either url"),
        ("{name: crm, url: 'http://h/mcp', command: x}", r"mcp_servers\.0\.command: Give either"),
        ("{name: crm, command: x, headers: {A: b}}", r"mcp_servers\.0\.headers: Only for"),
        ("{name: c__rm, url: 'http://h/mcp'}", r"mcp_servers\.0\.name: Must be 1-32"),
        ("{url: 'http://h/mcp'}", r"mcp_servers\.0\.name: Missing data"),
        ("{name: crm, url: 'http://h/mcp', colour: red}", r"mcp_servers\.0\.colour: Unknown"),
        (
            "{name: crm, url: 'http://h/mcp', tools: [a], requires_approval: [b]}",
            r"mcp_servers\.0\.requires_approval: 'b' is not in this server's tools",
        ),
        (
            "{name: crm, url: 'http://h/mcp', headers: {X-A: \"a\\nb\"}}",
            r"mcp_servers\.0\.headers\.X-A\.value: Must be one line",
        ),
        (
            "{name: crm, url: 'http://h/mcp'}\n      - {name: crm, command: x}",
            r"mcp_servers: Two MCP servers are named 'crm'",
        ),
    ],
)
def test_bad_mcp_servers_are_refused_naming_the_field(tmp_path, server, message):
    path = tmp_path / "agents.yaml"
    path.write_text(MCP_AGENT.format(server=server))
    with pytest.raises(AgentDefinitionError, match=message):
        load_agents_file(str(path))


def test_a_python_tool_may_not_take_an_mcp_servers_namespace():
    def crm__lookup() -> str:
        return ""

    with pytest.raises(AgentDefinitionError, match="'crm__lookup' would clash"):
        agent_runs.register_agent(
            "clash", tools=[crm__lookup], mcp_servers=[{"name": "crm", "url": "http://h/mcp"}]
        )
    with pytest.raises(AgentDefinitionError, match=r"mcp_servers\[0\]: headers\.Authorization"):
        agent_runs.register_agent(
            "secret",
            mcp_servers=[
                {"name": "crm", "url": "http://h/mcp", "headers": {"Authorization": "Basic eA=="}}
            ],
        )
