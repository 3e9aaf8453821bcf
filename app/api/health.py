"""GET {prefix}/healthz and GET {prefix}/readyz: whether a worker lives, and whether it can serve.

Both need no token and are not rate limited: load balancers and orchestrators call them.
``healthz`` touches nothing but the worker itself; ``readyz`` reads the database.
"""

from __future__ import annotations

import logging
from typing import Any

import peewee

from ..db import database, pending_migrations
from ..errors import ApiError
from . import bp

logger = logging.getLogger(__name__)

# What the last readiness check found wrong, so that a lasting problem is logged once.
_last_problem: list[str | None] = [None]


@bp.get("/healthz")
def healthz() -> Any:
    """Answer that this worker is alive; it asks the database nothing."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> Any:
    """Answer whether this worker can serve: its database answers and is fully migrated."""
    try:
        with database.connection_context():
            database.execute_sql("SELECT 1")
            pending = pending_migrations()
    except peewee.DatabaseError as error:
        # The detail stays vague for anonymous callers; the log says what happened.
        _not_ready("the database is not reachable: %s", error)
        raise ApiError(503, "The database is not reachable.") from None
    if pending:
        _not_ready("migrations are pending: %s", ", ".join(pending))
        raise ApiError(
            503, f"The database lacks {len(pending)} migration(s): {', '.join(pending)}."
        )
    if _last_problem[0] is not None:
        logger.info("ready again")
        _last_problem[0] = None
    return {"status": "ok"}


def _not_ready(reason: str, detail: Any) -> None:
    problem = reason % (detail,)
    if problem != _last_problem[0]:
        logger.warning("not ready: %s", problem)
        _last_problem[0] = problem
