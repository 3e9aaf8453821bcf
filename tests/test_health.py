"""GET /api/healthz and /api/readyz: no token, no rate limit; readyz reads the database."""

from __future__ import annotations

import shutil

import requests

from agent_runs import create_app
from agent_runs.db import database, migrate

from .conftest import make_token
from .server import GunicornServer

PROBLEM = "application/problem+json"


def test_healthz_answers_without_a_token(client):
    response = client.get("/api/healthz")
    assert response.status_code == 200 and response.json == {"status": "ok"}


def test_readyz_answers_ready_on_a_migrated_database(client):
    response = client.get("/api/readyz")
    assert response.status_code == 200 and response.json == {"status": "ok"}


def test_readyz_is_503_while_migrations_are_pending(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    app = create_app({"AGENT_RUNS_DATABASE_URL": url, "AGENT_RUNS_MIGRATE_ON_START": False})
    client = app.test_client()
    response = client.get("/api/readyz")
    assert response.status_code == 503 and response.mimetype == PROBLEM
    assert response.json["status"] == 503
    assert "0001_initial" in response.json["detail"]
    # Alive all the same.
    assert client.get("/api/healthz").status_code == 200
    migrate()
    assert client.get("/api/readyz").status_code == 200


def test_readyz_is_503_when_the_database_cannot_be_reached(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    url = f"sqlite:///{folder / 'db.sqlite3'}"
    app = create_app({"AGENT_RUNS_DATABASE_URL": url})
    client = app.test_client()
    assert client.get("/api/readyz").status_code == 200
    # The database's folder goes away, and with it every way to open the database.
    database.obj.close_all()
    shutil.rmtree(folder)
    response = client.get("/api/readyz")
    assert response.status_code == 503 and response.mimetype == PROBLEM
    assert response.json["detail"] == "The database is not reachable."
    # healthz asks the database nothing.
    assert client.get("/api/healthz").json == {"status": "ok"}


def test_health_checks_are_not_rate_limited(database_url):
    app = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_RATE_LIMIT": 2})
    client = app.test_client()
    auth = make_token()
    try:
        for _ in range(5):
            assert client.get("/api/healthz", headers=auth).status_code == 200
            assert client.get("/api/readyz", headers=auth).status_code == 200
        # The token's two requests a minute are all still there.
        assert client.get("/api/agents", headers=auth).status_code == 200
        assert client.get("/api/agents", headers=auth).status_code == 200
        assert client.get("/api/agents", headers=auth).status_code == 429
    finally:
        app.extensions["agent_runs"].executor.shutdown(timeout=5)


def test_a_real_server_answers_both(tmp_path):
    with GunicornServer(tmp_path, workers=2) as server:
        for path in ("/api/healthz", "/api/readyz"):
            response = requests.get(server.url + path, timeout=10)
            assert response.status_code == 200 and response.json() == {"status": "ok"}
