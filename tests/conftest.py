"""Fixtures: an application on a fresh database, its test client, a token, a live server.

Tests run on SQLite; a module marked ``pytestmark = BOTH_DATABASES`` runs each of its tests
that use a database on PostgreSQL too (a throwaway cluster, see tests/pg.py), and a test
that needs PostgreSQL fails, never skips, when there is none.

The standalone server runs under gunicorn's gevent worker, which monkey-patches the standard
library before loading the app; the tests patch it the same way, first thing, so greenlets,
sockets and the database behave here as they do in production.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# The tests expect the deterministic scripted model wherever an agent names no model, also
# when the embedded model is installed (it would otherwise be the default); servers started
# by the tests inherit this.
os.environ.setdefault("AGENT_RUNS_DEFAULT_MODEL", "scripted")
# The embedded model's host that the tests and their servers share is theirs alone: killing it
# (as a test does) touches no other server or test session on the machine.
os.environ.setdefault("AGENT_RUNS_MODEL_HOST_DIR", tempfile.mkdtemp(prefix="agent-runs-host-"))

import agent_runs  # noqa: E402
from agent_runs import create_app  # noqa: E402
from agent_runs.auth import create_token  # noqa: E402
from agent_runs.db import database  # noqa: E402
from agent_runs.runtime.agents import unregister_agent  # noqa: E402
from agent_runs.runtime.executor import shutdown_all  # noqa: E402

from .pg import PostgresCluster, PostgresMissing  # noqa: E402
from .server import GunicornServer  # noqa: E402

DATABASES = ("sqlite", "postgresql")
# Mark a module with this to run its tests on both databases.
BOTH_DATABASES = pytest.mark.databases(*DATABASES)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "databases(*kinds): run the tests on each database (sqlite, postgresql)"
    )


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("databases")
    if marker is not None and "database_url" in metafunc.fixturenames:
        metafunc.parametrize("database_url", marker.args, indirect=True)


@pytest.fixture(scope="session")
def postgres():
    """The tests' PostgreSQL server: a cluster of their own, or AGENT_RUNS_TEST_POSTGRES_URL."""
    cluster = PostgresCluster()
    try:
        cluster.__enter__()
    except PostgresMissing as missing:
        pytest.fail(str(missing), pytrace=False)
    yield cluster
    cluster.__exit__(None, None, None)


def server_database(request) -> dict[str, str]:
    """The settings of a server fixture parametrised with ``params=DATABASES``: a new
    PostgreSQL database for ``postgresql``; nothing (its own SQLite file) for ``sqlite``."""
    if request.param == "postgresql":
        return {"AGENT_RUNS_DATABASE_URL": request.getfixturevalue("postgres").new_database()}
    return {}


@pytest.fixture
def database_url(request, tmp_path):
    """A new empty database: a SQLite file, or a PostgreSQL database for ``[postgresql]``."""
    if getattr(request, "param", "sqlite") == "postgresql":
        return request.getfixturevalue("postgres").new_database()
    return f"sqlite:///{tmp_path / 'agent_runs.sqlite3'}"


@pytest.fixture(autouse=True)
def _stop_services():
    """After each test, stop the background services of every app it made: they would go on
    polling whatever database the next test binds."""
    yield
    shutdown_all(timeout=5)


@pytest.fixture
def app(database_url):
    app = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "TESTING": True})
    yield app
    # Let runs started by the test finish before the next test rebinds the database.
    app.extensions["agent_runs"].executor.shutdown(timeout=10)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def make_token(org_id="acme", user_id=None):
    """Create a token in the current database; return the Authorization headers for it."""
    with database.connection_context():
        _, secret = create_token(org_id, user_id)
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def auth(app):
    return make_token()


@pytest.fixture
def agents():
    """Register agents from Python for one test: ``agents("name", **definition)``."""
    names = []

    def register(name, **kwargs):
        agent_runs.register_agent(name, **kwargs)
        names.append(name)
        return name

    yield register
    for name in names:
        unregister_agent(name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real gunicorn (gevent worker) on a free loopback port, on its own SQLite file."""
    folder = tmp_path_factory.mktemp("server")
    with GunicornServer(folder) as running:
        yield running


@pytest.fixture(scope="session")
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
