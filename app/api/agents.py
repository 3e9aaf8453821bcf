"""GET /agents and GET /agents/{agentId}."""

from __future__ import annotations

from typing import Any

from flask import current_app

from ..runtime.agents import Agent
from ..runtime.runs import get_agent
from ..schemas import AgentSchema
from . import bp


def agent_view(agent: Agent) -> dict[str, Any]:
    """Return an agent as the API describes it, its model resolved to what runs will use."""
    state = current_app.extensions["agent_runs"]
    return {
        "id": agent.id,
        "name": agent.name,
        "description": agent.description,
        "model": agent.model or state.default_model,
        "tools": [
            {"name": t.name, "description": t.description, "parameters": dict(t.parameters)}
            for t in agent.tools
        ],
    }


@bp.get("/agents")
def list_agents() -> Any:
    agents = current_app.extensions["agent_runs"].registry.all()
    return AgentSchema(many=True).dump([agent_view(agent) for agent in agents])


@bp.get("/agents/<agent_id>")
def show_agent(agent_id: str) -> Any:
    agent = get_agent(current_app.extensions["agent_runs"].registry, agent_id)
    return AgentSchema().dump(agent_view(agent))
