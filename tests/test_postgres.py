"""PostgreSQL as the database: the same schema as SQLite, a pool that yields to gevent, clear
errors for a database that cannot be used."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import gevent
import gevent.event
import psycopg
import pytest

from agent_runs import create_app
from agent_runs.db import DatabaseUnavailable, database, is_postgres

from .conftest import make_token
from .sse import parse_stream


def _schema(url: str) -> dict:
    """Tables, their columns and their indexes' columns, as the migrations left them."""
    app = create_app({"AGENT_RUNS_DATABASE_URL": url, "TESTING": True})
    db = database.obj
    with database.connection_context():
        tables = [t for t in db.get_tables() if t != "schema_migration"]
        schema = {
            table: (
                sorted(c.name for c in db.get_columns(table)),
                sorted(
                    (tuple(i.columns), i.unique)
                    for i in db.get_indexes(table)
                    # SQLite names the primary key's index; PostgreSQL lists it as one.
                    if not i.name.endswith("_pkey") and not i.name.startswith("sqlite_")
                ),
                sorted((fk.column, fk.dest_table) for fk in db.get_foreign_keys(table)),
            )
            for table in tables
        }
    app.extensions["agent_runs"].executor.shutdown(timeout=5)
    return schema


def test_the_same_migrations_make_the_same_schema_on_both_databases(postgres, tmp_path):
    on_sqlite = _schema(f"sqlite:///{tmp_path / 'schema.sqlite3'}")
    on_postgres = _schema(postgres.new_database())
    assert {"api_token", "session", "run", "run_event", "message"} <= set(on_sqlite)
    assert on_postgres == on_sqlite


def test_postgres_urls_open_a_bounded_pool(postgres):
    url = postgres.new_database()
    app = create_app(
        {"AGENT_RUNS_DATABASE_URL": url, "AGENT_RUNS_DB_POOL_SIZE": 3, "TESTING": True}
    )
    try:
        assert is_postgres() and database.obj._max_connections == 3
        held = []

        def hold() -> None:
            with database.connection_context():
                held.append(database.execute_sql("SELECT pg_backend_pid()").fetchone()[0])
                gevent.sleep(0.2)

        # Six greenlets, three connections: the others wait their turn, cooperatively.
        gevent.joinall([gevent.spawn(hold) for _ in range(6)], raise_error=True)
        assert len(held) == 6 and len(set(held)) <= 3
    finally:
        app.extensions["agent_runs"].executor.shutdown(timeout=5)


def test_a_slow_query_lets_the_other_greenlets_run(postgres):
    """psycopg 3 waits for the server through gevent's hub: while one greenlet's query
    sleeps in PostgreSQL, another's runs and stream complete."""
    url = postgres.new_database()
    app = create_app({"AGENT_RUNS_DATABASE_URL": url, "TESTING": True})
    try:
        client = app.test_client()
        auth = make_token()
        order = []

        def slow() -> None:
            with database.connection_context():
                database.execute_sql("SELECT pg_sleep(2)")
            order.append("slow query")

        def stream() -> None:
            response = client.post(
                "/api/agents/assistant/runs/stream", headers=auth, json={"message": "hi"}
            )
            events = parse_stream(response.get_data(as_text=True))
            assert events[-1]["event"] == "STOP"
            order.append("stream")

        sleeper = gevent.spawn(slow)
        gevent.sleep(0.1)  # the query is on its way
        gevent.joinall([gevent.spawn(stream), sleeper], raise_error=True)
        assert order == ["stream", "slow query"]
    finally:
        app.extensions["agent_runs"].executor.shutdown(timeout=5)


@pytest.mark.parametrize(
    "url, says",
    [
        ("postgresql://postgres@127.0.0.1:1/agent_runs", "Connection refused"),
        ("postgresql://nobody:secret@127.0.0.1:{port}/agent_runs", 'role "nobody"'),
        ("mysqlx://somewhere/db", "Unrecognized or unsupported scheme"),
        ("sqlite:////no/such/folder/agent_runs.sqlite3", "unable to open database file"),
    ],
)
def test_a_database_that_cannot_be_used_is_one_clear_line_at_start(postgres, url, says):
    url = url.format(port=postgres.port)
    result = subprocess.run(
        [sys.executable, "-m", "agent_runs", "db", "upgrade"],
        env={"AGENT_RUNS_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0]
    assert "secret" not in result.stderr  # the password is not printed


def test_create_app_raises_database_unavailable():
    with pytest.raises(DatabaseUnavailable, match="Connection refused"):
        create_app({"AGENT_RUNS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"})


def test_db_upgrade_migrates_a_database_not_migrated_on_start(postgres):
    url = postgres.new_database()
    env = {"AGENT_RUNS_DATABASE_URL": url, "AGENT_RUNS_MIGRATE_ON_START": "false"}
    run = [sys.executable, "-m", "agent_runs", "db", "upgrade"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "Applied 0001_initial." in first.stdout
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_a_quiet_follower_sends_no_query_and_hears_the_run_go_on(postgres, agents):
    """A stream following a run that executes elsewhere waits on the worker's listener, not
    on reads of the log: while the run is quiet its greenlet sends no statement at all, and
    once the run goes on, the notification brings the rest."""
    release = gevent.event.Event()

    def wait_for_release(what: str) -> str:
        """Wait until the test lets the run go on."""
        release.wait(30)
        return "released"

    agents("quiet", instructions="Wait.", tools=[wait_for_release])
    url = postgres.new_database()
    # Host A executes the run; B, an application with an executor and a listener of its
    # own, follows it through the database.
    host_a = create_app({"AGENT_RUNS_DATABASE_URL": url, "TESTING": True})
    host_b = create_app(
        {"AGENT_RUNS_DATABASE_URL": url, "TESTING": True, "AGENT_RUNS_PING_INTERVAL": 0.1}
    )
    auth = make_token()
    started = host_a.test_client().post(
        "/api/agents/quiet/runs/background", headers=auth, json={"message": "hold on"}
    )
    assert started.status_code == 202, started.json
    run_id = started.json["runId"]

    seen: list[tuple[str, str]] = []  # ("sql", statement) or ("frame", frame), in order

    def follow() -> None:
        response = host_b.test_client().get(
            f"/api/agents/quiet/runs/{run_id}/events", headers=auth, buffered=False
        )
        for chunk in response.response:
            seen.append(("frame", chunk.decode()))

    def follow_too(chunks: list[bytes]) -> None:
        response = host_b.test_client().get(
            f"/api/agents/quiet/runs/{run_id}/events", headers=auth, buffered=False
        )
        chunks.extend(response.response)

    reader = gevent.spawn(follow)
    others: list[list[bytes]] = [[] for _ in range(9)]
    more = [gevent.spawn(follow_too, chunks) for chunks in others]

    class Statements(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if gevent.getcurrent() is reader:
                seen.append(("sql", str(record.msg)))

    peewee_logger = logging.getLogger("peewee")
    handler, level = Statements(), peewee_logger.level
    peewee_logger.addHandler(handler)
    peewee_logger.setLevel(logging.DEBUG)

    def pings_after_tool_start() -> list[int]:
        frames = [i for i, (kind, text) in enumerate(seen) if kind == "frame"]
        tool = next((i for i in frames if '"event":"TOOL_START"' in seen[i][1]), None)
        return (
            [] if tool is None else [i for i in frames if i > tool and seen[i][1] == ": ping\n\n"]
        )

    try:
        for _ in range(200):  # at most 20 s
            if len(pings_after_tool_start()) >= 4 or reader.dead:
                break
            gevent.sleep(0.1)
        pings = pings_after_tool_start()
        assert len(pings) >= 4, seen
        # Past the read that found the log at its end, only pings: not one statement.
        quiet = seen[pings[0] : pings[-1]]
        assert [text for kind, text in quiet if kind == "sql"] == [], quiet
        # Ten streams follow the run on B: one listening connection per application (worker).
        assert all(b": ping\n\n" in chunks for chunks in others)
        with psycopg.connect(url) as connection:
            (listening,) = connection.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN %%' AND datname = current_database()"
            ).fetchone()
        assert listening == 2
        release.set()
        gevent.joinall([reader, *more], timeout=20, raise_error=True)
    finally:
        release.set()
        peewee_logger.removeHandler(handler)
        peewee_logger.setLevel(level)
        for host in (host_a, host_b):
            host.extensions["agent_runs"].executor.shutdown(timeout=5)
    # The notification woke the follower, which read the rest: the probe sees its reads.
    after = seen[pings[-1] :]
    assert any(kind == "sql" and "run_event" in text for kind, text in after), after
    text = "".join(text for kind, text in seen if kind == "frame")
    events = parse_stream(text)
    assert [e["event"] for e in events][-1] == "STOP"
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert [parse_stream(b"".join(chunks).decode()) for chunks in others] == [events] * 9


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_gunicorn_on_a_database_out_of_reach_stops_with_one_line(repo_root, tmp_path, log_format):
    env = {
        **os.environ,
        "AGENT_RUNS_DATABASE_URL": "postgresql://postgres:secret@127.0.0.1:1/agent_runs",
        "AGENT_RUNS_LOG_FORMAT": log_format,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
    result = subprocess.run(
        # One worker: when two fail at once, gunicorn's master may itself print the
        # traceback of the HaltServer it raises while stopping the other.
        [*command, "-b", "127.0.0.1:0", "-w", "1", "wsgi:app"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    said = [line for line in result.stderr.splitlines() if "Connection refused" in line]
    assert len(said) == 1, result.stderr
    assert all("Cannot use the database postgresql://" in line for line in said), said
    assert "secret" not in result.stderr
    assert "App failed to load" in result.stderr
