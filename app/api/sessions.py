"""Conversation sessions: list them, read one with its messages or its runs, delete one."""

from __future__ import annotations

from typing import Any

from flask import g, request

from ..runtime.sessions import (
    delete_session,
    get_session_with_messages,
    list_session_runs,
    list_sessions,
)
from ..schemas import (
    SessionDetailSchema,
    SessionListQuerySchema,
    SessionPageSchema,
    SessionQuerySchema,
    SessionRunsPageSchema,
    SessionRunsQuerySchema,
)
from . import bp


@bp.get("/sessions")
def sessions() -> Any:
    """List the caller's sessions, most recently active first, a page at a time."""
    query = SessionListQuerySchema().load(request.args.to_dict())
    page = list_sessions(
        g.principal,
        agent_id=query.get("agent_id"),
        user_id=query.get("user_id"),
        limit=query["limit"],
        after=query.get("cursor"),
    )
    return SessionPageSchema().dump(page)


@bp.get("/sessions/<session_id>")
def session_detail(session_id: str) -> Any:
    """Return one session with its messages in the order the model saw them."""
    query = SessionQuerySchema().load(request.args.to_dict())
    found = get_session_with_messages(g.principal, session_id, query.get("user_id"))
    return SessionDetailSchema().dump(found)


@bp.get("/sessions/<session_id>/runs")
def session_runs(session_id: str) -> Any:
    """List the session's runs, oldest first, a page at a time."""
    query = SessionRunsQuerySchema().load(request.args.to_dict())
    page = list_session_runs(
        g.principal,
        session_id,
        user_id=query.get("user_id"),
        limit=query["limit"],
        after=query.get("cursor"),
    )
    return SessionRunsPageSchema().dump(page)


@bp.delete("/sessions/<session_id>")
def remove_session(session_id: str) -> Any:
    """Delete the session with its messages, runs and events."""
    query = SessionQuerySchema().load(request.args.to_dict())
    delete_session(g.principal, session_id, query.get("user_id"))
    return "", 204
