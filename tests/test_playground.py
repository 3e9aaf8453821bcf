"""The playground's files, served by the blueprint (the browser tests drive the page itself)."""

import fnmatch
import re
from pathlib import Path

from flask import Flask
from setuptools.config.setupcfg import read_configuration

from agent_runs import AgentRuns, create_app

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "app" / "playground"


def test_the_page_needs_no_token_and_locks_itself_down(client):
    page = client.get("/api/playground")
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    # No inline script, nothing from elsewhere, no framing.
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = page.get_data(as_text=True)
    # Relative to the page ({prefix}/playground), so any prefix works.
    assert 'src="playground/playground.js"' in html
    assert 'href="playground/playground.css"' in html
    assert "<script>" not in html and " style=" not in html


def test_its_script_and_style_sheet(client):
    script = client.get("/api/playground/playground.js")
    assert script.status_code == 200 and script.mimetype in (
        "text/javascript",
        "application/javascript",
    )
    style = client.get("/api/playground/playground.css")
    assert style.status_code == 200 and style.mimetype == "text/css"
    # Revalidated on each load, so a new version of the package shows at once.
    assert "no-cache" in script.headers["Cache-Control"] and script.headers["ETag"]
    again = client.get(
        "/api/playground/playground.js", headers={"If-None-Match": script.headers["ETag"]}
    )
    assert again.status_code == 304


def test_nothing_else_is_served_from_its_folder(client):
    for name in ("index.html", "..%2Fauth.py", "secret.txt", "playground.js.map"):
        response = client.get(f"/api/playground/{name}")
        assert response.status_code == 404, name
        assert response.mimetype == "application/problem+json"


def test_it_can_be_turned_off(database_url):
    app = create_app(
        {"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_PLAYGROUND": False, "TESTING": True}
    )
    client = app.test_client()
    try:
        for path in ("/api/playground", "/api/playground/playground.js"):
            response = client.get(path)
            assert response.status_code == 404 and "turned off" in response.json["detail"]
        assert "/playground" not in client.get("/api/openapi.json").json["paths"]
    finally:
        app.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_the_environment_turns_it_off(monkeypatch, database_url):
    monkeypatch.setenv("AGENT_RUNS_PLAYGROUND", "false")
    app = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "TESTING": True})
    try:
        assert app.test_client().get("/api/playground").status_code == 404
    finally:
        app.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_embedded_under_the_host_applications_prefix(database_url):
    host = Flask("host")
    host.config["AGENT_RUNS_DATABASE_URL"] = database_url
    AgentRuns(host, url_prefix="/v2/assistants")
    client = host.test_client()
    try:
        assert client.get("/v2/assistants/playground").status_code == 200
        assert client.get("/v2/assistants/playground/playground.js").status_code == 200
    finally:
        host.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_the_files_ship_in_the_package():
    patterns = read_configuration(REPO / "setup.cfg")["options"]["package_data"]["agent_runs"]
    files = sorted(path.relative_to(REPO / "app").as_posix() for path in FOLDER.iterdir())
    assert files == [
        "playground/index.html",
        "playground/playground.css",
        "playground/playground.js",
    ]
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_the_page_loads_nothing_from_elsewhere():
    # Offline and without a CDN: every URL the files name is the page's own.
    for path in FOLDER.iterdir():
        text = path.read_text(encoding="utf-8")
        for url in re.findall(r"""(?:src|href)=["']([^"']+)""", text):
            assert not re.match(r"(https?:)?//", url), (path.name, url)
        assert "@import" not in text and "localStorage" not in text, path.name
