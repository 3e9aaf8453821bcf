"""The agent-runs command: tokens and agents."""

import pytest

from agent_runs.db import database
from agent_runs.models import ApiToken


def test_tokens_create_prints_the_secret_alone_on_the_last_line(app, runner, client):
    result = runner.invoke(args=["tokens", "create", "--org", "acme", "--user", "alice"])
    assert result.exit_code == 0, result.output
    secret = result.output.strip().splitlines()[-1]
    assert secret.startswith("ar_") and " " not in secret
    response = client.post(
        "/api/agents/assistant/runs",
        json={"message": "hi"},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert response.status_code == 200
    with database.connection_context():
        token = ApiToken.get()
    assert token.org_id == "acme" and token.user_id == "alice"
    assert secret not in (token.token_hash, token.prefix)


def test_tokens_list_and_revoke(app, runner, client):
    secret = runner.invoke(args=["tokens", "create", "--org", "acme", "--name", "ci"]).output
    secret = secret.strip().splitlines()[-1]
    listing = runner.invoke(args=["tokens", "list"]).output
    assert "org=acme" in listing and "ci" in listing and secret not in listing
    token_id = listing.split("\t")[0]
    assert runner.invoke(args=["tokens", "revoke", token_id]).exit_code == 0
    response = client.get("/api/agents", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 401
    again = runner.invoke(args=["tokens", "revoke", token_id])
    assert again.exit_code != 0 and "No active token" in again.output


def test_tokens_create_needs_an_org(app, runner):
    result = runner.invoke(args=["tokens", "create"])
    assert result.exit_code != 0 and "--org" in result.output


def test_agents_lists_the_agents(app, runner):
    from agent_runs.cli import cli

    result = runner.invoke(cli, ["agents"])
    assert result.exit_code == 0
    assert "finance_agent\tscripted\tget_stock_price, calculate" in result.output


@pytest.mark.parametrize("duration", ["0h", "12", "h", "²h", "-5m", "1.5h", "99999999999999d"])
def test_tokens_create_refuses_what_is_not_a_duration(app, runner, duration):
    result = runner.invoke(args=["tokens", "create", "--org", "acme", "--expires-in", duration])
    assert result.exit_code == 2, result.output
    assert "is not a duration like 90s" in result.output
