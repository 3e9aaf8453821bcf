"""PostgreSQL as the database: the same schema as SQLite, a pool that yields to gevent, clear
errors for a database that cannot be used."""

from __future__ import annotations

import subprocess
import sys

import gevent
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
