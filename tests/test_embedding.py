"""The API mounted on a host application under its own prefix."""

from flask import Flask

from agent_runs import AgentRuns

from .conftest import make_token
from .sse import parse_stream


def test_embedded_in_a_host_app_under_another_prefix(database_url):
    host = Flask("host")
    host.config["AGENT_RUNS_DATABASE_URL"] = database_url

    @host.get("/")
    def home():
        return "host home"

    AgentRuns(host, url_prefix="/v2/assistants")
    client = host.test_client()
    headers = make_token()
    try:
        assert client.get("/").get_data(as_text=True) == "host home"
        assert client.get("/api/agents", headers=headers).status_code == 404
        agents = client.get("/v2/assistants/agents", headers=headers)
        assert {"finance_agent", "assistant"} <= {agent["id"] for agent in agents.json}

        response = client.post(
            "/v2/assistants/agents/finance_agent/runs/stream",
            headers=headers,
            json={"message": "NVDA?"},
        )
        events = parse_stream(response.get_data(as_text=True))
        assert events[0]["event"] == "START" and events[-1]["event"] == "STOP"
        # Errors of the API keep their problem+json shape inside the host application.
        missing = client.get("/v2/assistants/agents/nobody", headers=headers)
        assert missing.status_code == 404
        assert missing.mimetype == "application/problem+json"
        assert "tokens" in host.cli.commands
    finally:
        host.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_host_app_config_wins_over_the_environment(monkeypatch, database_url):
    monkeypatch.setenv("AGENT_RUNS_URL_PREFIX", "/from-env")
    monkeypatch.setenv("AGENT_RUNS_DEFAULT_MODEL", "scripted:env")
    host = Flask("host")
    host.config.update(AGENT_RUNS_DATABASE_URL=database_url, AGENT_RUNS_DEFAULT_MODEL="scripted")
    AgentRuns(host)
    state = host.extensions["agent_runs"]
    assert state.default_model == "scripted"
    assert any(rule.rule.startswith("/from-env/agents") for rule in host.url_map.iter_rules())
