"""Starting runs and reading them back, always within one tenant's data.

Every read of runs goes through :func:`runs_of`, the one place that scopes queries to the
caller's organisation (and user, when the caller's token is bound to one).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import gevent
import peewee

from ..db import database
from ..models import Message, Run, RunStatus, Session, utcnow
from ..providers.base import UnknownModel, resolve_model
from .agents import Agent, AgentRegistry
from .events import RunChannel
from .executor import Executor, RunJob


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the organisation and user its token is bound to."""

    org_id: str
    user_id: str | None
    scopes: frozenset[str] = frozenset()
    token_id: int | None = None


class RunRequestRejected(Exception):
    """A run request the server understood but will not start. ``field`` names the culprit."""

    status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class IdentityMismatch(RunRequestRejected):
    """The body names another organisation or user than the caller's token."""

    status = 403


class SessionBusy(RunRequestRejected):
    """The session already has a run in progress."""

    status = 409


class NotFound(Exception):
    """An agent, run or session that does not exist for this caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class StartedRun:
    run: Run
    session_uid: str
    channel: RunChannel
    greenlet: gevent.Greenlet


def get_agent(registry: AgentRegistry, agent_id: str) -> Agent:
    agent = registry.get(agent_id)
    if agent is None:
        raise NotFound(f"No agent with id {agent_id!r}.")
    return agent


def _acting_user(principal: Principal, body: dict[str, Any]) -> str:
    """Return the user a run is for; a body that contradicts the token is refused."""
    org_id = body.get("org_id")
    if org_id is not None and org_id != principal.org_id:
        raise IdentityMismatch("orgId", "orgId does not match the organisation of your token.")
    user_id = body.get("user_id")
    if principal.user_id is not None:
        if user_id is not None and user_id != principal.user_id:
            raise IdentityMismatch("userId", "userId does not match the user of your token.")
        return principal.user_id
    return user_id or ""


def _claim_session(principal: Principal, user_id: str, agent: Agent, uid: str, run_id: str):
    """Find or create the session and make ``run_id`` its active run, atomically."""
    now = utcnow()
    (
        Session.insert(
            uid=uid,
            org_id=principal.org_id,
            user_id=user_id,
            agent_id=agent.id,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_ignore()
        .execute()
    )
    session = Session.get(
        (Session.org_id == principal.org_id) & (Session.user_id == user_id) & (Session.uid == uid)
    )
    if session.agent_id != agent.id:
        raise RunRequestRejected(
            "sessionId", f"This session belongs to agent {session.agent_id!r}."
        )
    claimed = (
        Session.update(active_run_id=run_id, updated_at=now)
        .where((Session.id == session.id) & Session.active_run_id.is_null())
        .execute()
    )
    if not claimed:
        raise SessionBusy("sessionId", "This session already has a run in progress.")
    return session


def start_run(
    executor: Executor,
    agent: Agent,
    principal: Principal,
    body: dict[str, Any],
    *,
    default_model: str,
) -> StartedRun:
    """Record a new run of ``agent`` for the caller and start executing it."""
    user_id = _acting_user(principal, body)
    options = body.get("options") or {}
    model = agent.model_for(options.get("model"), default_model)
    if model is None:
        raise RunRequestRejected(
            "options.model", f"Agent {agent.id!r} does not allow model {options['model']!r}."
        )
    try:
        provider, model_name = resolve_model(model, agent.model_options)
    except UnknownModel as error:
        raise RunRequestRejected("options.model", str(error)) from None

    run_id = "run_" + uuid.uuid4().hex
    uid = body.get("session_id") or str(uuid.uuid4())
    now = utcnow()
    with database.atomic():
        session = _claim_session(principal, user_id, agent, uid, run_id)
        run = Run.create(
            id=run_id,
            org_id=principal.org_id,
            user_id=user_id,
            agent_id=agent.id,
            session=session,
            status=RunStatus.RUNNING,
            model=model,
            input=body["message"],
            request={
                "generateFollowups": body.get("generate_followups", False),
                "media": body.get("media") or [],
                "options": {k: v for k, v in options.items() if v is not None},
            },
            created_at=now,
            started_at=now,
        )
        Message.create(session=session, run=run, role="user", content=body["message"])
    channel, greenlet = executor.start(
        RunJob(
            run_id=run_id,
            session_pk=session.id,
            session_uid=uid,
            agent=agent,
            provider=provider,
            model=model_name,
            message=body["message"],
            media=body.get("media") or [],
            temperature=options.get("temperature"),
            max_tokens=options.get("max_tokens"),
            generate_followups=body.get("generate_followups", False),
        )
    )
    return StartedRun(run=run, session_uid=uid, channel=channel, greenlet=greenlet)


def runs_of(principal: Principal) -> peewee.ModelSelect[Run]:
    """Select the runs the caller may see, each with its session's public id."""
    query = Run.select(Run, Session.uid).join(Session).where(Run.org_id == principal.org_id)
    if principal.user_id is not None:
        query = query.where(Run.user_id == principal.user_id)
    return query


def get_run(principal: Principal, agent_id: str, run_id: str) -> Run:
    run = runs_of(principal).where(Run.id == run_id, Run.agent_id == agent_id).first()
    if run is None:
        raise NotFound(f"No run {run_id!r} for agent {agent_id!r}.")
    return run


def get_runs(principal: Principal, agent_id: str, run_ids: list[str]) -> list[Run]:
    """Return the caller's runs among ``run_ids``, in the order asked, in one query."""
    found = {
        run.id: run
        for run in runs_of(principal).where(Run.id.in_(run_ids), Run.agent_id == agent_id)
    }
    return [found[run_id] for run_id in run_ids if run_id in found]
