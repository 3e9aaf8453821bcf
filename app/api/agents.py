"""Agents: the server's (read-only) and the organisation's own, which admins change here.

GET lists and reads them. POST, PUT, PATCH and DELETE (scope ``admin``) keep an
organisation's own agents, each change a new version; the server's agents answer those with
409. Bodies are agent definitions as the agents file writes them (snake_case keys).
"""

from __future__ import annotations

from typing import Any

from flask import current_app, g, request, url_for

from ..auth import require_scope
from ..errors import ApiError
from ..models import AgentDefinition
from ..runtime.agents import Agent
from ..runtime.runs import NotFound
from ..schemas import AgentDetailSchema, AgentSchema, AgentVersionSchema
from . import bp
from .runs import _json_body


def _state() -> Any:
    return current_app.extensions["agent_runs"]


def agent_view(agent: Agent, stored: AgentDefinition | None = None) -> dict[str, Any]:
    """Return an agent as the API describes it, its model resolved to what runs will use."""
    return {
        "id": agent.id,
        "name": agent.name,
        "description": agent.description,
        "model": agent.model or _state().default_model,
        "tools": [
            {"name": t.name, "description": t.description, "parameters": dict(t.parameters)}
            for t in agent.tools
        ],
        "source": "server" if stored is None else "organisation",
        "version": None if stored is None else stored.version,
        "definition": None if stored is None else stored.definition,
    }


def _expected_version() -> int | None:
    """The version an If-Match header says the change was made against; None without one."""
    if not request.if_match:
        return None
    if request.if_match.star_tag:
        return None
    tags = list(request.if_match)
    if len(tags) != 1 or not tags[0].isascii() or not tags[0].isdigit() or len(tags[0]) > 9:
        raise ApiError(412, 'If-Match must be one version of the agent, as its ETag: "3".')
    return int(tags[0])


def _changed(stored: AgentDefinition, status: int = 200) -> Any:
    """Answer a change with the agent as it now is, and its version as the ETag."""
    agent = _state().agents.get(g.principal.org_id, stored.agent_id, stored.version)
    response = current_app.json.response(AgentDetailSchema().dump(agent_view(agent, stored)))
    response.status_code = status
    response.set_etag(str(stored.version))
    if status == 201:
        response.headers["Location"] = url_for(".show_agent", agent_id=stored.agent_id)
    return response


def _author() -> str:
    return g.principal.user_id or g.principal.subject or ""


@bp.get("/agents")
def list_agents() -> Any:
    """List the server's agents and the organisation's own."""
    agents = _state().agents.all(g.principal.org_id)
    return AgentSchema(many=True).dump([agent_view(agent, row) for agent, row in agents])


@bp.get("/agents/<agent_id>")
def show_agent(agent_id: str) -> Any:
    """Read one agent; an organisation's own comes with its definition and version."""
    found = _state().agents.find(g.principal.org_id, agent_id)
    if found is None:
        raise NotFound(f"No agent with id {agent_id!r}.")
    agent, stored = found
    response = current_app.json.response(AgentDetailSchema().dump(agent_view(agent, stored)))
    if stored is not None:
        response.set_etag(str(stored.version))
    return response


@bp.post("/agents")
def create_agent() -> Any:
    """Store a new agent of the organisation (its version 1)."""
    require_scope(g.principal, "admin")
    stored = _state().agents.create(g.principal.org_id, _author(), _json_body())
    return _changed(stored, 201)


@bp.put("/agents/<agent_id>")
def replace_agent(agent_id: str) -> Any:
    """Store a new version of an organisation's agent: the whole definition."""
    require_scope(g.principal, "admin")
    stored = _state().agents.replace(
        g.principal.org_id, agent_id, _author(), _json_body(), expected=_expected_version()
    )
    return _changed(stored)


@bp.patch("/agents/<agent_id>")
def patch_agent(agent_id: str) -> Any:
    """Store a new version of an organisation's agent: a JSON Merge Patch of the current."""
    require_scope(g.principal, "admin")
    stored = _state().agents.replace(
        g.principal.org_id,
        agent_id,
        _author(),
        _json_body(),
        expected=_expected_version(),
        patch=True,
    )
    return _changed(stored)


@bp.delete("/agents/<agent_id>")
def delete_agent(agent_id: str) -> Any:
    """Delete an organisation's agent; its runs and past versions stay readable."""
    require_scope(g.principal, "admin")
    _state().agents.delete(g.principal.org_id, agent_id, _author(), expected=_expected_version())
    return "", 204


@bp.get("/agents/<agent_id>/versions")
def agent_versions(agent_id: str) -> Any:
    """List the stored versions of an organisation's agent, newest first."""
    rows = _state().agents.versions(g.principal.org_id, agent_id)
    return AgentVersionSchema(many=True).dump(rows)
