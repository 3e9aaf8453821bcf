"""The database: one proxy for the whole package, connected by URL, migrated on start."""

from __future__ import annotations

import logging
import os

import peewee
from playhouse.db_url import connect as connect_url
from playhouse.db_url import schemes as db_url_schemes
from playhouse.migrations import Runner

logger = logging.getLogger(__name__)

database = peewee.DatabaseProxy()

# SQLite is shared by every greenlet of a worker and by every worker of a server: WAL lets
# readers run beside the one writer, busy_timeout makes a writer wait for the lock rather than
# fail, and NORMAL synchronous is durable across application crashes (WAL's recommended mode).
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "busy_timeout": 10_000,
    "foreign_keys": 1,
    "cache_size": -16_000,
}


def open_database(url: str, pool_size: int = 32) -> peewee.Database:
    """Create (not connect) the database named by ``url`` and bind the package's proxy to it.

    Connections come from a pool: requests, runs and the event writer each hold one only for
    a few statements, thousands of times a second, and opening one (with its pragmas) costs
    far more than the statements themselves.
    """
    scheme, _, rest = url.partition("://")
    kwargs: dict = {}
    if "+pool" not in scheme and f"{scheme}+pool" in db_url_schemes:
        url = f"{scheme}+pool://{rest}"
        kwargs.update(max_connections=pool_size, stale_timeout=300, timeout=30)
    if scheme.startswith("sqlite"):
        kwargs["pragmas"] = SQLITE_PRAGMAS
    previous = database.obj
    if previous is not None and hasattr(previous, "close_all"):
        previous.close_all()
    db = connect_url(url, **kwargs)
    # Connections are taken and given back explicitly: per request, per run step, per flush.
    db.autoconnect = False
    database.initialize(db)
    return db


def migrations_directory() -> str:
    """Return the folder that holds the migration scripts shipped with the package."""
    from agent_runs import migrations

    return os.path.dirname(os.path.abspath(migrations.__file__))


def migrate() -> list[str]:
    """Apply every pending migration; return the names applied.

    Several gunicorn workers may start at once, each migrating: the loser of a race finds the
    migration recorded (or its table present) and tries once more against the new state.
    """
    runner = Runner(database.obj, directory=migrations_directory())
    for attempt in range(3):
        try:
            with database.connection_context():
                applied = runner.up()
            for name in applied:
                logger.info("applied migration %s", name)
            return applied
        except (peewee.IntegrityError, peewee.OperationalError):
            if attempt == 2:
                raise
    return []
