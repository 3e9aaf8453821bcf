"""Statements built once by peewee and run many times: app.db.Statement."""

import datetime
import os
import time
from contextlib import ExitStack, closing, contextmanager

import gevent
import pytest
from peewee import (
    fn,
    sqlite3,  # the driver peewee uses: pysqlite3 where it is installed
)

from agent_runs import create_app
from agent_runs.db import (
    SQLITE_PRAGMAS,
    Statement,
    WalCheckpointer,
    checkpoint_wal,
    database,
    insert_statement,
)
from agent_runs.models import ApiToken, Run, Session
from agent_runs.runtime.runs import new_run_id


def test_a_statement_takes_its_values_by_name_wherever_the_sql_wants_them(app):
    claim = Statement(
        lambda uid, run_id: Session.update({Session.active_run_id: run_id}).where(
            (Session.uid == uid) & (Session.active_run_id.is_null() | (Session.agent_id == uid))
        )
    )
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901)
    with database.connection_context():
        Session.create(uid="s1", org_id="o", user_id="u", agent_id="s1", created_at=now)
        Session.create(uid="s2", org_id="o", user_id="u", agent_id="a", created_at=now)
        assert claim.execute(run_id="r1", uid="s1").rowcount == 1
        # "uid" is used twice; the constant NULL test stays in the SQL.
        assert claim.execute(uid="s1", run_id="r2").rowcount == 1
        assert [s.active_run_id for s in Session.select().order_by(Session.uid)] == ["r2", None]


def test_rows_come_back_as_python_values(app):
    select = Statement(
        lambda org_id: Session.select(
            Session.id, Session.created_at, fn.COUNT(Session.id).alias("n"), fn.MAX(1)
        ).where(Session.org_id == org_id)
    )
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901)
    with database.connection_context():
        created = Session.create(uid="s", org_id="o", user_id="u", agent_id="a", created_at=now)
        assert select.rows(org_id="o") == [{"id": created.id, "created_at": now, "n": 1, "3": 1}]
        assert select.rows(org_id="nobody") == [{"id": None, "created_at": None, "n": 0, "3": None}]


def test_an_insert_statement_converts_values_as_its_fields_do(app):
    insert = insert_statement(
        ApiToken, [ApiToken.token_hash, ApiToken.prefix, ApiToken.org_id, ApiToken.created_at]
    )
    run_insert = insert_statement(
        Run, [Run.id, Run.org_id, Run.agent_id, Run.session, Run.usage, Run.created_at]
    )
    with database.connection_context():
        now = datetime.datetime(2026, 1, 2, 3, 4, 5)
        insert.execute(token_hash="h", prefix="p", org_id="o", created_at=now)
        token = ApiToken.get()
        # Columns left out take their defaults, as peewee's own insert gives them.
        assert (token.prefix, token.name, token.scopes) == ("p", "", "runs:read runs:write")
        session = Session.create(uid="s", org_id="o", user_id="u", agent_id="a")
        run_insert.execute(
            id="r", org_id="o", agent_id="a", session=session, usage={"a": [1]}, created_at=now
        )
        assert Run.get_by_id("r").usage == {"a": [1]}


def test_a_statement_is_built_again_for_another_database(tmp_path):
    count = Statement(
        lambda org_id: ApiToken.select(fn.COUNT(ApiToken.id)).where(ApiToken.org_id == org_id)
    )
    for name, tokens in (("one", 2), ("two", 1)):
        create_app({"AGENT_RUNS_DATABASE_URL": f"sqlite:///{tmp_path / name}.sqlite3"})
        with database.connection_context():
            for n in range(tokens):
                ApiToken.create(token_hash=f"{name}{n}", prefix="p", org_id="o")
            assert count.execute(org_id="o").fetchone()[0] == tokens


def test_run_ids_sort_in_the_order_runs_were_created():
    ids = [new_run_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(len(i) == 36 and i.startswith("run_") for i in ids)
    # Within one millisecond the random part decides; across milliseconds, time does.
    by_millisecond = [i[:16] for i in ids]
    assert by_millisecond == sorted(by_millisecond)


def _rows_in_database_file(path, table):
    """Count a table's rows in the database file alone, as if the write-ahead log were not there.

    -1 if the file was caught half written by a checkpoint (immutable=1 takes no lock).
    """
    with closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as connection:
        try:
            return connection.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
        except sqlite3.OperationalError:  # the table itself is still in the log only
            return 0
        except sqlite3.DatabaseError:
            return -1


def test_checkpoint_wal_copies_the_log_into_the_database_file(app, database_url):
    path = database_url.removeprefix("sqlite:///")
    with database.connection_context():
        for n in range(20):
            ApiToken.create(token_hash=f"h{n}", prefix="p", org_id="o")
    assert _rows_in_database_file(path, "api_token") == 0
    checkpoint_wal()
    assert _rows_in_database_file(path, "api_token") == 20


def _wal_salts(path):
    """Return the salts of the write-ahead log's header: they change when the log starts over."""
    with open(f"{path}-wal", "rb") as wal:
        return wal.read(32)[16:24]


def test_checkpoint_wal_starts_the_log_over_itself_so_the_next_commit_does_not(app, database_url):
    # Starting the log over syncs its header to disk: in the checkpoint's thread, not in the
    # next commit, which runs on the worker's event loop.
    path = database_url.removeprefix("sqlite:///")
    with database.connection_context():
        for n in range(20):
            ApiToken.create(token_hash=f"h{n}", prefix="p", org_id="o")
    before = _wal_salts(path)
    checkpoint_wal()
    after = _wal_salts(path)
    assert after != before
    with database.connection_context():
        ApiToken.create(token_hash="next", prefix="p", org_id="o")
        assert database.execute_sql("PRAGMA user_version").fetchone()[0] == 0
    assert _wal_salts(path) == after
    assert _rows_in_database_file(path, "api_token") == 20


def test_checkpoint_wal_leaves_the_log_alone_while_a_reader_holds_it(app, database_url):
    path = database_url.removeprefix("sqlite:///")
    with database.connection_context():
        ApiToken.create(token_hash="h", prefix="p", org_id="o")
    with closing(sqlite3.connect(path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        assert reader.execute("SELECT COUNT(*) FROM api_token").fetchone()[0] == 1
        with database.connection_context():
            ApiToken.create(token_hash="h2", prefix="p", org_id="o")
        before = _wal_salts(path)
        checkpoint_wal()  # copies what it may; neither blocks nor fails
        assert _wal_salts(path) == before
        assert reader.execute("SELECT COUNT(*) FROM api_token").fetchone()[0] == 1
        reader.execute("COMMIT")
    with database.connection_context():
        assert ApiToken.select().count() == 2


def test_checkpoint_wal_leaves_the_restart_to_the_next_commit_while_a_writer_holds_the_lock(
    app, database_url
):
    path = database_url.removeprefix("sqlite:///")
    with database.connection_context():
        ApiToken.create(token_hash="h", prefix="p", org_id="o")
    with closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as writer:
        writer.execute("BEGIN IMMEDIATE")
        before = _wal_salts(path)
        started = time.monotonic()
        checkpoint_wal()  # copies the log, finds the lock taken: neither waits nor fails
        assert time.monotonic() - started < 2.5  # not its connection's 5 s busy timeout
        assert _wal_salts(path) == before
        assert _rows_in_database_file(path, "api_token") == 1
        writer.execute("ROLLBACK")


def test_checkpoint_wal_cuts_a_grown_log_back_to_the_size_limit(app, database_url, monkeypatch):
    path = database_url.removeprefix("sqlite:///")
    monkeypatch.setitem(SQLITE_PRAGMAS, "journal_size_limit", 32 * 1024)
    with database.connection_context(), database.atomic():
        for n in range(200):
            ApiToken.create(token_hash=f"{n}" + "x" * 5000, prefix="p", org_id="o")
    assert os.path.getsize(f"{path}-wal") > 1_000_000
    checkpoint_wal()
    assert os.path.getsize(f"{path}-wal") <= 32 * 1024
    with database.connection_context():
        assert ApiToken.select().count() == 200


def _eventually(check, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        gevent.sleep(0.02)


@contextmanager
def _checkpointing(path):
    """A WalCheckpointer on ``path`` every 10 ms while the block runs."""
    checkpointer = WalCheckpointer(str(path), interval=0.01)
    checkpointer.start()
    try:
        yield checkpointer
    finally:
        checkpointer.stop()


def test_a_wal_checkpointer_copies_the_log_from_its_own_thread_until_stopped(app, database_url):
    path = database_url.removeprefix("sqlite:///")
    with _checkpointing(path) as checkpointer:
        with database.connection_context():
            for n in range(5):
                ApiToken.create(token_hash=f"h{n}", prefix="p", org_id="o")
        _eventually(lambda: _rows_in_database_file(path, "api_token") == 5)
    assert checkpointer.take_error() is None


def _files(path):
    """What a checkpoint or a write changes: the log's header, the files' sizes and times."""
    stats = [os.stat(name) for name in (path, f"{path}-wal")]
    return _wal_salts(path), [(st.st_size, st.st_mtime_ns) for st in stats]


def _settled(path):
    """A check for _eventually: the files stay as they are for ten intervals."""

    def check():
        before = _files(path)
        gevent.sleep(0.1)
        return _files(path) == before

    return check


@pytest.mark.parametrize("workers", [1, 2])
def test_idle_wal_checkpointers_write_nothing(app, database_url, workers):
    # A restart of the log is a write: copied and restarted in turn, by the same worker or
    # by the other, it would have idle workers writing (and syncing) every interval forever.
    path = database_url.removeprefix("sqlite:///")
    with ExitStack() as stack:
        checkpointers = [stack.enter_context(_checkpointing(path)) for _ in range(workers)]
        with database.connection_context():
            ApiToken.create(token_hash="h", prefix="p", org_id="o")
        _eventually(lambda: _rows_in_database_file(path, "api_token") == 1)
        _eventually(_settled(path))
        before = _files(path)
        gevent.sleep(0.3)
        assert _files(path) == before
        with database.connection_context():  # a write wakes them again
            ApiToken.create(token_hash="h2", prefix="p", org_id="o")
        _eventually(lambda: _rows_in_database_file(path, "api_token") == 2)
    assert [checkpointer.take_error() for checkpointer in checkpointers] == [None] * workers


def test_a_wal_checkpointer_tells_its_error_once_and_makes_no_database_where_there_is_none(
    tmp_path,
):
    path = tmp_path / "gone.sqlite3"
    with _checkpointing(path) as checkpointer:
        errors = []
        _eventually(lambda: bool(errors.append(checkpointer.take_error()) or any(errors)))
        gevent.sleep(0.1)  # ten more failed checkpoints
        assert checkpointer.take_error() is None
    assert "unable to open database" in next(e for e in errors if e)
    assert not path.exists()


def test_the_server_checkpoints_its_database_while_it_serves(app, client, auth, database_url):
    path = database_url.removeprefix("sqlite:///")
    response = client.post("/api/agents/assistant/runs", json={"message": "hi"}, headers=auth)
    assert response.status_code == 200
    _eventually(lambda: _rows_in_database_file(path, "run") == 1)


def test_an_insert_statement_must_set_the_fields_whose_default_is_computed(app):
    # peewee would compute the default once, when the statement is built, for every row.
    with pytest.raises(ValueError, match="created_at"):
        insert_statement(Session, [Session.uid, Session.org_id])


def test_aliased_fields_come_back_by_alias_as_python_values(app):
    select = Statement(
        lambda uid: Session.select(Session.created_at.alias("at")).where(Session.uid == uid)
    )
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901)
    with database.connection_context():
        Session.create(uid="s", org_id="o", user_id="u", agent_id="a", created_at=now)
        assert select.rows(uid="s") == [{"at": now}]


def test_event_rows_are_in_the_order_the_event_insert_takes_them(app):
    from agent_runs.runtime.events import INSERT_EVENT, Event, event_row

    event = Event("run_x", 7, "STOP", "{}", 123)
    with database.connection_context():
        names = INSERT_EVENT.param_names
    assert dict(zip(names, event_row(event), strict=True)) == {
        "run": "run_x",
        "seq": 7,
        "type": "STOP",
        "data": "{}",
        "timestamp": 123,
    }
