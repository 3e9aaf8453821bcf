"""Graceful shutdown: SIGTERM lets runs finish within the grace period and fails the rest."""

import signal
import sqlite3
import time

import pytest
import requests

from .server import GunicornServer

AGENTS = """
agents:
  - id: quick
    model: scripted
    model_options: {delay: 0.1, content_deltas: 10}
  - id: endless
    model: scripted
    model_options: {delay: 1.0, content_deltas: 120}
"""


@pytest.mark.timeout(120)
def test_sigterm_finishes_short_runs_and_fails_long_ones(tmp_path):
    agents = tmp_path / "agents.yaml"
    agents.write_text(AGENTS)
    env = {"AGENT_RUNS_AGENTS_FILE": str(agents), "AGENT_RUNS_SHUTDOWN_TIMEOUT": "4"}
    with GunicornServer(tmp_path, workers=1, env=env) as server:
        started = {}
        for agent in ("quick", "endless"):
            response = requests.post(
                f"{server.url}/api/agents/{agent}/runs/background",
                headers=server.headers,
                json={"message": "keep going"},
                timeout=10,
            )
            assert response.status_code == 202, response.text
            started[agent] = response.json()["runId"]
        time.sleep(0.5)  # both are RUNNING now
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
        log = server.log_path.read_text()
    database = server.env["AGENT_RUNS_DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        statuses = dict(db.execute("SELECT id, status FROM run").fetchall())
        error_type = db.execute(
            "SELECT error_type FROM run WHERE id = ?", (started["endless"],)
        ).fetchone()[0]
        last = {
            run_id: db.execute(
                "SELECT type, data FROM run_event WHERE run_id = ? ORDER BY seq DESC LIMIT 1",
                (run_id,),
            ).fetchone()
            for run_id in started.values()
        }
    assert statuses[started["quick"]] == "COMPLETED", log
    assert last[started["quick"]] == ("STOP", "")
    assert statuses[started["endless"]] == "FAILED" and error_type == "worker_lost", log
    assert last[started["endless"]][0] == "ERROR"
    assert "shut down" in last[started["endless"]][1]
    assert "RUNNING" not in statuses.values()
