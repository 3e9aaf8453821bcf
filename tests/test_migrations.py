"""The schema comes from migrations/ through playhouse.migrations, applied on start."""

from playhouse.migrations import Runner

from agent_runs import create_app
from agent_runs.db import database, migrate, migrations_directory
from agent_runs.models import MODELS


def test_start_applies_the_migrations_once(database_url):
    create_app({"AGENT_RUNS_DATABASE_URL": database_url})
    with database.connection_context():
        status = Runner(database.obj, directory=migrations_directory()).status()
        assert [m.name for m in status] == [
            "0001_initial",
            "0002_fewer_indexes",
            "0004_webhooks_and_idempotency",
            "0005_agents_and_run_listing",
            "0006_signing_keys",
        ]
        assert all(m.applied for m in status)
        tables = set(database.get_tables())
    assert {model._meta.table_name for model in MODELS} <= tables
    assert migrate() == []
    create_app({"AGENT_RUNS_DATABASE_URL": database_url})


def test_the_models_match_the_migrated_columns(database_url):
    create_app({"AGENT_RUNS_DATABASE_URL": database_url})
    with database.connection_context():
        for model in MODELS:
            columns = {c.name for c in database.get_columns(model._meta.table_name)}
            assert columns == {f.column_name for f in model._meta.sorted_fields}, model


def test_the_models_match_the_migrated_indexes(database_url):
    # Every index costs each write; the migrations create exactly those the models declare
    # (primary keys and unique constraints aside, which SQLite names itself).
    create_app({"AGENT_RUNS_DATABASE_URL": database_url})
    with database.connection_context():
        for model in MODELS:
            table = model._meta.table_name
            migrated = {
                index.name
                for index in database.get_indexes(table)
                if not index.name.startswith("sqlite_autoindex_")
            }
            assert migrated == {index._name for index in model._meta.fields_to_index()}, table


def test_migrations_go_down_and_up_again(database_url):
    create_app({"AGENT_RUNS_DATABASE_URL": database_url})
    runner = Runner(database.obj, directory=migrations_directory())
    with database.connection_context():
        runner.down()
        assert "signing_key" not in database.get_tables()
        runner.down()
        assert "agent_definition" not in database.get_tables()
        assert "agent_version" not in {c.name for c in database.get_columns("run")}
        runner.down()
        assert "webhook_delivery" not in database.get_tables()
        runner.down()
        assert "run_event_run_id" in {i.name for i in database.get_indexes("run_event")}
        assert runner.up() == [
            "0002_fewer_indexes",
            "0004_webhooks_and_idempotency",
            "0005_agents_and_run_listing",
            "0006_signing_keys",
        ]
        assert "run_event_run_id" not in {i.name for i in database.get_indexes("run_event")}
        assert "webhook_delivery" in database.get_tables()
        assert "agent_definition" in database.get_tables()
        assert "signing_key" in database.get_tables()


def test_sqlite_runs_in_wal_mode(database_url):
    create_app({"AGENT_RUNS_DATABASE_URL": database_url})
    with database.connection_context():
        assert database.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrate_on_start_can_be_turned_off(database_url):
    create_app({"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_MIGRATE_ON_START": False})
    with database.connection_context():
        assert database.get_tables() == []
