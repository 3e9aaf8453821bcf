"""The database: one proxy for the whole package, connected by URL, migrated on start.

SQLite (a file in WAL mode) serves one host; PostgreSQL (``postgresql://...``, the
``postgres`` extra) serves many workers on many hosts, through psycopg 3, whose waits go
through gevent's hub once gevent has patched the process (psycopg2's C calls would stop
the whole worker for every query).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import peewee
from gevent import monkey
from playhouse.db_url import connect as connect_url
from playhouse.db_url import parse as parse_url
from playhouse.db_url import schemes as db_url_schemes
from playhouse.migrations import Runner
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase

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
    # A commit that takes the write-ahead log past this many pages (40 MB; SQLite's default is
    # 1,000) copies them back into the database itself, stalling its worker. A serving worker's
    # WalCheckpointer does that in a thread long before; the mark is the backstop for
    # processes that never call it (the command line tools, a worker before its first request).
    "wal_autocheckpoint": 10_000,
    # Once a checkpoint has emptied it, a log grown larger than this is cut back to it.
    "journal_size_limit": 64 * 1024 * 1024,
}


POSTGRES_SCHEMES = ("postgres", "postgresql")

# What a database that went away raises: requests answer 503 and streams wait for it.
DATABASE_DOWN = (peewee.OperationalError, peewee.InterfaceError, MaxConnectionsExceeded)


class DatabaseUnavailable(RuntimeError):
    """The configured database cannot be opened or reached; the message says why."""


class PostgresDatabase(PooledPostgresqlDatabase):
    """PostgreSQL through psycopg 3, with a bounded pool of connections per worker.

    The pool waits for a free connection on a condition of the threading module, which
    gevent patches: a greenlet waiting for one yields to the others. Two changes to peewee's
    pool: it asked the server (SELECT 1) whether every connection it handed out was still
    alive, a round trip per request, where psycopg knows a connection is broken once a
    statement on it failed; and a broken connection means the server most likely restarted,
    so the idle ones, opened before, are closed rather than handed out to fail in turn.
    """

    def _is_closed(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)

    def _close(self, conn: Any, close_conn: bool = False) -> None:
        broken = conn.broken
        super()._close(conn, close_conn)
        if broken:
            self.close_idle()


def is_postgres() -> bool:
    """Whether the package's database is PostgreSQL."""
    return isinstance(database.obj, peewee.PostgresqlDatabase)


def describe_url(url: str) -> str:
    """The database URL without its password, to name it in messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _open_postgres(url: str, pool_size: int) -> peewee.Database:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise DatabaseUnavailable(
            f"{describe_url(url)} is a PostgreSQL database, whose driver is not installed: "
            "pip install 'agent-runs[postgres]'."
        ) from None
    _, _, rest = url.partition("://")
    params = parse_url(f"postgresql://{rest}")
    name = params.pop("database")
    # connect_timeout: an unreachable server is an error within seconds, not a hang.
    params.setdefault("connect_timeout", 10)
    return PostgresDatabase(
        name, max_connections=pool_size, stale_timeout=300, timeout=30, **params
    )


def open_database(url: str, pool_size: int = 32) -> peewee.Database:
    """Create (not connect) the database named by ``url`` and bind the package's proxy to it.

    Connections come from a pool: requests, runs and the event writer each hold one only for
    a few statements, thousands of times a second, and opening one (with its pragmas) costs
    far more than the statements themselves. ``pool_size`` bounds each worker's connections.
    """
    scheme, _, rest = url.partition("://")
    previous = database.obj
    if previous is not None and hasattr(previous, "close_idle"):
        # Only the idle ones: a connection in use belongs to a greenlet waiting on it, and
        # closing it under that greenlet frees what psycopg's C code is still reading.
        previous.close_idle()
    if scheme.removesuffix("+pool") in POSTGRES_SCHEMES:
        db = _open_postgres(url, pool_size)
        db.autoconnect = False
        database.initialize(db)
        return db
    kwargs: dict = {}
    if "+pool" not in scheme and f"{scheme}+pool" in db_url_schemes:
        url = f"{scheme}+pool://{rest}"
        kwargs.update(max_connections=pool_size, stale_timeout=300, timeout=30)
    if scheme.startswith("sqlite"):
        kwargs["pragmas"] = SQLITE_PRAGMAS
    try:
        db = connect_url(url, **kwargs)
    except RuntimeError as error:  # an unknown scheme
        raise DatabaseUnavailable(f"AGENT_RUNS_DATABASE_URL {url!r}: {error}") from None
    # Connections are taken and given back explicitly: per request, per run step, per flush.
    db.autoconnect = False
    database.initialize(db)
    return db


def check_database(url: str) -> None:
    """Connect once; raise DatabaseUnavailable naming the database and what went wrong."""
    try:
        with database.connection_context():
            database.execute_sql("SELECT 1")
    except peewee.DatabaseError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatabaseUnavailable(
            f"Cannot use the database {describe_url(url)}: {reason}"
        ) from None


# Rows ANALYZE samples of each index: enough for the shape of the tables, and a pass over a
# database of millions of runs stays a moment on the worker's loop.
ANALYSIS_LIMIT = 1000


def refresh_statistics() -> None:
    """Tell SQLite's query planner the shape of the tables again (call within a connection).

    Without statistics SQLite guesses from the indexes alone, and on a large table it guessed
    wrong: runs looked up by id (batch status) or listed by session walked an organisation's
    index instead of the one that finds them at once. ANALYZE, sampling at most
    ANALYSIS_LIMIT rows per index, gives it the figures. PostgreSQL keeps its own
    statistics (autovacuum); nothing is done there.
    """
    if isinstance(database.obj, peewee.SqliteDatabase):
        database.execute_sql(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT}")
        database.execute_sql("ANALYZE")


def sqlite_path() -> str | None:
    """Return the file of the package's SQLite database; None for other databases.

    Also None for an in-memory database, and for one named by a URI, which names its file in
    ways a plain path would not (SQLite then checkpoints it itself, see SQLITE_PRAGMAS).
    """
    db = database.obj
    if not isinstance(db, peewee.SqliteDatabase) or db.database in ("", ":memory:"):
        return None
    if db.connect_params.get("uri"):
        return None
    return db.database


def checkpoint_wal() -> None:
    """Copy the SQLite write-ahead log back into the database now, in the calling thread.

    It blocks that thread (and a gevent worker's loop, if called from a greenlet) while
    SQLite copies: for tests and one-off tools. A serving worker has its
    :class:`WalCheckpointer` do this.
    """
    path = sqlite_path()
    if path is not None:
        with contextlib.closing(_connect_for_checkpoints(path)) as connection:
            _checkpoint(connection)


class WalCheckpointer:
    """Checkpoints a SQLite database every ``interval`` seconds, from a thread of its own.

    SQLite checkpoints inside whichever commit fills the log past its mark: copying the pages
    and syncing the file stalls the worker's event loop (and every stream on it) for tens of
    milliseconds. A thread checkpoints instead: SQLite releases the GIL while it copies, so
    the loop runs on. The thread is a plain OS thread, not one of gevent's pool: a greenlet
    waiting for the pool's answer hears back only when the busy loop gets round to it,
    seconds late under load, while the log grows towards the mark. A PASSIVE checkpoint never
    waits for readers or writers: what it cannot copy now, the next one will.

    The thread uses no gevent primitive (greenlet locks and sleeps do not work across
    threads): it sleeps with the unpatched time.sleep, and keeps its error for a greenlet to
    log (:meth:`take_error`). It holds one connection for its life and closes it when it
    stops, within an interval of :meth:`stop`.
    """

    def __init__(self, path: str, interval: float) -> None:
        self.path = os.path.abspath(path)
        self.interval = interval
        self._stopped = False
        self._error: str | None = None
        self._reported: str | None = None

    def start(self) -> None:
        monkey.get_original("_thread", "start_new_thread")(self._run, ())

    def stop(self) -> None:
        self._stopped = True

    def take_error(self) -> str | None:
        """Return the checkpoints' error if it is new: a lasting one is told once, and again
        only after a checkpoint has succeeded in between."""
        error = self._error
        if error is None:
            self._reported = None
            return None
        if error == self._reported:
            return None
        self._reported = error
        return error

    def _run(self) -> None:
        sleep = monkey.get_original("time", "sleep")
        connection = None
        try:
            while True:
                sleep(self.interval)
                if self._stopped:
                    return
                try:
                    if connection is None:
                        connection = _connect_for_checkpoints(self.path)
                    _checkpoint(connection)
                    self._error = None
                except Exception as error:  # the database went away, a full disk: try again
                    self._error = f"{type(error).__name__}: {error}"
                    if connection is not None:
                        connection.close()
                        connection = None
        finally:
            if connection is not None:
                connection.close()


def _connect_for_checkpoints(path: str) -> Any:
    # A connection of its own: peewee's connections belong to greenlets. Opened with the
    # driver peewee uses (pysqlite3 where installed): two copies of SQLite in one process
    # would drop each other's POSIX locks on the file. mode=rw: a database removed meanwhile
    # is not made anew. The connection that starts the log over is the one that cuts it back
    # to journal_size_limit, so it gets the pragma too.
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
    connect = peewee.sqlite3.connect  # type: ignore[attr-defined]
    connection = connect(uri, uri=True, timeout=5, isolation_level=None)
    for name in ("synchronous", "journal_size_limit"):
        connection.execute(f"PRAGMA {name} = {SQLITE_PRAGMAS[name]}")
    return connection


def _checkpoint(connection: Any) -> None:
    """Checkpoint; start the log over if it was copied whole.

    A log whose one frame is a restart's own write (this connection's, or another worker's)
    is not started over again: that would be a write for the next pass, or the other worker,
    to answer with one of its own, and idle workers would write forever. A pass over a log
    copied whole writes nothing.
    """
    busy, frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if not busy and frames > 1 and copied == frames:
        _restart_wal(connection)


def _restart_wal(connection: Any) -> None:
    """Start the write-ahead log over from its first frame, here rather than on the loop.

    Once a checkpoint has copied the whole log, the next commit writes it again from the
    start, and at NORMAL synchronous that commit first syncs the log's new header to disk.
    A worker's commits run on its event loop, where that sync stopped every stream, a few
    times a second under load. So the checkpointing thread makes that first commit itself:
    it rewrites the database's user_version with its own value, which changes nothing but is
    a write. If a writer holds the lock, the restart is left to the next commit, as before.
    (A commit on the loop that comes while this one syncs waits for it, in SQLite's busy
    handler: seldom, and for no longer than the sync it no longer makes itself.) A reader
    still on the old log means the write goes to its end instead, for the next pass to copy.
    """
    connection.execute("PRAGMA busy_timeout = 0")
    try:
        connection.execute("BEGIN IMMEDIATE")
    except peewee.sqlite3.OperationalError:  # type: ignore[attr-defined]
        return  # a writer is at work: the log is no longer copied whole anyway
    finally:
        connection.execute("PRAGMA busy_timeout = 5000")
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        connection.execute(f"PRAGMA user_version = {int(version)}")
        connection.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already: the first error is the one to raise.
        with contextlib.suppress(peewee.sqlite3.Error):  # type: ignore[attr-defined]
            connection.execute("ROLLBACK")
        raise


def migrations_directory() -> str:
    """Return the folder that holds the migration scripts shipped with the package."""
    from agent_runs import migrations

    return os.path.dirname(os.path.abspath(migrations.__file__))


# The key of the advisory lock migrations take on PostgreSQL.
MIGRATION_LOCK = 0x41520003


def migrate() -> list[str]:
    """Apply every pending migration; return the names applied.

    Several gunicorn workers may start at once, each migrating: the loser of a race finds the
    migration recorded (or its table present) and tries once more against the new state. On
    PostgreSQL, whose DDL is transactional, racing creators of one table fail in other ways:
    there, migrators of every host take turns on an advisory lock held by their connection.
    """
    runner = Runner(database.obj, directory=migrations_directory())
    for attempt in range(3):
        try:
            with database.connection_context():
                if is_postgres():
                    database.execute_sql("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
                try:
                    applied = runner.up()
                finally:
                    if is_postgres():
                        database.execute_sql("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            for name in applied:
                logger.info("applied migration %s", name)
            return applied
        except (peewee.IntegrityError, peewee.OperationalError):
            if attempt == 2:
                raise
    return []


def pending_migrations() -> list[str]:
    """Return the names of the migrations the database lacks (call within a connection)."""
    runner = Runner(database.obj, directory=migrations_directory())
    return [m.name for m in runner.status() if m.path is not None and not m.applied]


class _Slot:
    """Stands for a named value in a query built once by :class:`Statement`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Statement:
    """A query whose SQL peewee generates once per database, then runs with new values.

    peewee builds a query's SQL from a tree of Python objects each time it runs. On the paths
    every run and request takes (authenticate, start a run, end it) building costs more than
    the database's work, so those queries are built once: ``build`` receives one placeholder
    per parameter it names and returns the query; :meth:`execute` runs its SQL with the
    values given by name. Values go to the driver as they are, except those ``convert``
    names, which go through the given function first (a JSON field's ``db_value``, say);
    constants written in the query stay as they are. :meth:`rows` reads each selected column
    back as its field does, except those ``as_stored`` names, which keep the driver's value
    for a caller that reads the stored form more cheaply itself.
    """

    def __init__(
        self,
        build: Callable[..., peewee.Query],
        convert: dict[str, Callable[[Any], Any]] | None = None,
        names: Iterable[str] | None = None,
        as_stored: Iterable[str] = (),
    ) -> None:
        self._build = build
        self._names = tuple(names if names is not None else inspect.signature(build).parameters)
        self._convert = convert or {}
        self._as_stored = frozenset(as_stored)
        self._compiled: _Compiled | None = None

    def _compile(self) -> _Compiled:
        db = database.obj
        if self._compiled is None or self._compiled.database is not db:
            slots = {
                name: peewee.Value(_Slot(name), converter=False, unpack=False)
                for name in self._names
            }
            query = self._build(**slots)
            sql, params = query.sql()
            # What each selected (or returned) column is called and how to read it back.
            columns = [
                _column(column, index)
                for index, column in enumerate(getattr(query, "_returning", None) or ())
            ]
            readers = tuple(
                (name, read)
                for name, read in columns
                if read is not None and name not in self._as_stored
            )
            names = tuple(name for name, _ in columns)
            if len(set(names)) != len(names):
                raise ValueError(f"a Statement's columns need distinct names: {names}")
            if unknown := self._as_stored - set(names):
                raise ValueError(f"as_stored names columns the query does not select: {unknown}")
            self._compiled = _Compiled(db, sql, tuple(params), names, readers)
        return self._compiled

    def params(self, values: dict[str, Any]) -> list[Any]:
        """The statement's parameters, in the order its SQL takes them."""
        if self._convert:
            values = {
                name: self._convert[name](value) if name in self._convert else value
                for name, value in values.items()
            }
        return [values[p.name] if isinstance(p, _Slot) else p for p in self._compile().params]

    def execute(self, **values: Any) -> Any:
        """Run the statement; return the database cursor."""
        return database.execute_sql(self.sql, self.params(values))

    def rows(self, **values: Any) -> list[dict[str, Any]]:
        """Run the statement; return its rows as dicts of the fields' Python values."""
        compiled = self._compile()
        names, readers = compiled.names, compiled.readers
        rows = [dict(zip(names, row, strict=True)) for row in self.execute(**values).fetchall()]
        for name, read in readers:
            for row in rows:
                if (value := row[name]) is not None:
                    row[name] = read(value)
        return rows

    def execute_many(self, rows: list[dict[str, Any]]) -> None:
        """Run the statement once for each row of values, as one prepared statement."""
        self.execute_rows([self.params(row) for row in rows])

    @property
    def sql(self) -> str:
        return self._compile().sql

    @property
    def param_names(self) -> tuple[str | None, ...]:
        """The names of the values the SQL takes, in order (None for a constant)."""
        return tuple(p.name if isinstance(p, _Slot) else None for p in self._compile().params)

    def execute_rows(self, rows: list[Any]) -> None:
        """Run the statement for each row of parameters, already in :attr:`param_names` order
        and converted: for the event log, whose rows are tuples made once per event."""
        # The wrapper turns the driver's errors into peewee's, whatever the driver.
        with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
            database.cursor().executemany(self.sql, rows)


def _reader(field: peewee.Field) -> Callable[[Any], Any] | None:
    """How to turn a column's stored value into the field's; None where drivers already do.

    Text and integer columns come back from every driver as str and int, which peewee's
    conversion would only check again, value by value.
    """
    plain = type(field).python_value is peewee.Field.python_value
    if plain and isinstance(field, (peewee.CharField, peewee.TextField, peewee.IntegerField)):
        return None
    return field.python_value


def _column(column: Any, index: int) -> tuple[str, Callable[[Any], Any] | None]:
    """The key of a selected column in :meth:`Statement.rows`, and how to read its values."""
    name = None
    if isinstance(column, peewee.Alias):
        name, column = column._alias, column.unalias()  # type: ignore[attr-defined]
    if isinstance(column, peewee.Field):
        return name or column.name, _reader(column)
    return name or str(index), None


class _Compiled(NamedTuple):
    database: peewee.Database
    sql: str
    params: tuple[Any, ...]
    # The keys of the selected columns in rows(), in order.
    names: tuple[str, ...]
    # The columns read through their field, and how: the others come as the driver gives them.
    readers: tuple[tuple[str, Callable[[Any], Any]], ...]


def insert_statement(
    model: type[peewee.Model], fields: Iterable[peewee.Field], *, ignore_conflicts: bool = False
) -> Statement:
    """A :class:`Statement` inserting one row of ``model``: values by field name, converted
    by each field as peewee converts them."""
    fields = list(fields)
    # peewee fills in the defaults of the fields left out, calling callable ones: once, here,
    # when the statement is built, so every row would get that first value.
    given = {field.name for field in fields}
    frozen = [
        field.name
        for field, default in model._meta.defaults.items()  # type: ignore[attr-defined]
        if callable(default) and field.name not in given
    ]
    if frozen:
        raise ValueError(f"insert_statement({model.__name__}) must set {frozen}")

    def build(**slots: Any) -> peewee.Query:
        query = model.insert({field: slots[field.name] for field in fields})
        return query.on_conflict_ignore() if ignore_conflicts else query

    return Statement(
        build,
        convert={field.name: field.db_value for field in fields},
        names=[field.name for field in fields],
    )
