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
    assert set(finance) == {"id", "name", "description", "model", "tools"}


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
        ("agents:\n  - id: a\n    colour: red", "unknown keys"),
        ("agents:\n  - id: a\n  - id: a", "appears twice"),
        ("agents:\n  - id: a\n    tools: [no_such_tool]", "unknown tool"),
        ("agents:\n  - id: a\n    tools: ['os:no_such_fn']", "cannot import"),
        ("agents:\n  - id: 'bad id'", "agent id"),
        ("agents: [", "not valid YAML"),
    ],
)
def test_bad_agents_files_are_refused_with_a_reason(tmp_path, text, message):
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    with pytest.raises(AgentDefinitionError, match=message):
        load_agents_file(str(path))
