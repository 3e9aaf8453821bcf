"""Reading and deleting conversation sessions, always within one tenant's data.

Every query of sessions goes through :func:`sessions_of`, the one place that scopes them to the
caller's organisation (and user, when the caller's token is bound to one). A session's public
id is unique only per (org, user), so an organisation-wide caller may have to say which user's
session it means.
"""

from __future__ import annotations

import peewee

from ..db import database
from ..models import Message, Run, RunEvent, Session
from .runs import (
    NotFound,
    Page,
    Position,
    Principal,
    RunRequestRejected,
    SessionBusy,
    page_of,
    status_rows,
    statuses_of,
)


def sessions_of(principal: Principal, user_id: str | None = None) -> peewee.ModelSelect[Session]:
    """Select the sessions the caller may see; ``user_id`` ("" for none) narrows the pick."""
    query = Session.select().where(Session.org_id == principal.org_id)
    if principal.user_id is not None:
        query = query.where(Session.user_id == principal.user_id)
    if user_id is not None:
        query = query.where(Session.user_id == user_id)
    return query


def list_sessions(
    principal: Principal,
    *,
    agent_id: str | None = None,
    user_id: str | None = None,
    limit: int = 20,
    after: Position | None = None,
) -> Page:
    """Return a page of the caller's sessions, most recently active first, in one query."""
    query = sessions_of(principal, user_id)
    if agent_id is not None:
        query = query.where(Session.agent_id == agent_id)
    if after is not None:
        updated_at, pk = after
        query = query.where(
            (Session.updated_at < updated_at)
            | ((Session.updated_at == updated_at) & (Session.id < pk))
        )
    rows = list(query.order_by(Session.updated_at.desc(), Session.id.desc()).limit(limit + 1))
    return page_of(rows, limit, lambda session: (session.updated_at, session.id))


def _one(matches: list[Session], uid: str) -> Session:
    """Return the only session among ``matches``, or raise what the caller has to fix."""
    if not matches:
        raise NotFound(f"No session {uid!r}.")
    if len(matches) > 1:
        raise RunRequestRejected(
            "userId", f"Several users have a session {uid!r}; pass userId to pick one."
        )
    return matches[0]


def get_session(principal: Principal, uid: str, user_id: str | None = None) -> Session:
    """Return the caller's session ``uid``, in one query."""
    # Two rows are enough to tell "one" from "ambiguous".
    return _one(list(sessions_of(principal, user_id).where(Session.uid == uid).limit(2)), uid)


def get_session_with_messages(
    principal: Principal, uid: str, user_id: str | None = None
) -> Session:
    """Return the caller's session ``uid`` with ``messages`` in order, in two queries."""
    sessions = sessions_of(principal, user_id).where(Session.uid == uid).limit(2)
    messages = Message.select().order_by(Message.id)
    return _one(peewee.prefetch(sessions, messages), uid)


def list_session_runs(
    principal: Principal,
    uid: str,
    *,
    user_id: str | None = None,
    limit: int = 20,
    after: Position | None = None,
) -> Page:
    """Return a page of the runs of the caller's session ``uid``, oldest first."""
    session = get_session(principal, uid, user_id)
    query = statuses_of(principal).where(Run.session == session.id)
    if after is not None:
        created_at, run_id = after
        query = query.where(
            (Run.created_at > created_at) | ((Run.created_at == created_at) & (Run.id > run_id))
        )
    rows = status_rows(query.order_by(Run.created_at, Run.id).limit(limit + 1))
    return page_of(rows, limit, lambda run: (run["created_at"], run["id"]))


def _busy(uid: str, run_id: str | None) -> SessionBusy:
    which = f" ({run_id})" if run_id else ""
    return SessionBusy(
        "sessionId",
        f"Session {uid!r} has a run in progress{which}; cancel it or wait for it to end, "
        "then delete the session.",
    )


def delete_session(principal: Principal, uid: str, user_id: str | None = None) -> None:
    """Delete the caller's session ``uid`` with its messages, runs and their events.

    A session with an active run is refused. The session row goes last and only if it is still
    idle, so a run that claims the session meanwhile rolls the whole deletion back.
    """
    session = get_session(principal, uid, user_id)
    if session.active_run_id is not None:
        raise _busy(uid, session.active_run_id)
    with database.atomic():
        runs = Run.select(Run.id).where(Run.session == session.id)
        RunEvent.delete().where(RunEvent.run.in_(runs)).execute()
        Message.delete().where(Message.session == session.id).execute()
        Run.delete().where(Run.session == session.id).execute()
        deleted = (
            Session.delete()
            .where((Session.id == session.id) & Session.active_run_id.is_null())
            .execute()
        )
        if not deleted:
            # Raising inside the transaction undoes the deletes above.
            current = Session.get_or_none(Session.id == session.id)
            if current is None:
                raise NotFound(f"No session {uid!r}.")
            raise _busy(uid, current.active_run_id)
