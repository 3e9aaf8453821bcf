"""GET /api/metrics: Prometheus metrics behind a token with scope metrics, right across workers.

In the test process (an application without gunicorn.conf.py) the metrics live in the one
process's registry; under gunicorn with two workers, prometheus-client's multiprocess files
add both workers up.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from flask import Flask
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from agent_runs import AgentRuns, create_app
from agent_runs.auth import create_token
from agent_runs.db import database

from .conftest import make_token
from .server import GunicornServer


def metrics_token(org_id: str = "acme", scopes: tuple[str, ...] = ("metrics",)) -> dict:
    with database.connection_context():
        _, secret = create_token(org_id, scopes=scopes)
    return {"Authorization": f"Bearer {secret}"}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def host(database_url):
    """A host application with the blueprint embedded: no gunicorn, one process's registry."""
    app = Flask("host")
    app.config.update(AGENT_RUNS_DATABASE_URL=database_url)
    AgentRuns(app)
    yield app
    app.extensions["agent_runs"].executor.shutdown(timeout=10)


def test_metrics_count_runs_events_tools_tokens_and_requests(host):
    client = host.test_client()
    scrape = metrics_token()
    before = samples(client.get("/api/metrics", headers=scrape).text)
    auth = make_token()
    run = client.post(
        "/api/agents/finance_agent/runs", headers=auth, json={"message": "What is NVDA at?"}
    )
    assert run.status_code == 200 and run.json["status"] == "COMPLETED"
    stream = client.post(
        "/api/agents/finance_agent/runs/stream", headers=auth, json={"message": "And AAPL?"}
    )
    frames = [line for line in stream.text.splitlines() if line.startswith("data: ")]
    response = client.get("/api/metrics", headers=scrape)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    after = samples(response.text)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("agent_runs_runs_total", agent="finance_agent", status="COMPLETED") == 2
    assert grew("agent_runs_run_duration_seconds_count", agent="finance_agent") == 2
    assert grew("agent_runs_time_to_first_event_seconds_count") == 2
    # Each run: START, two reasoning deltas, a tool call, content deltas and STOP.
    assert grew("agent_runs_events_total", type="START") == 2
    assert grew("agent_runs_events_total", type="TOOL_START") == 2
    assert grew("agent_runs_events_total", type="STOP") == 2
    streamed = sum(1 for frame in frames if frame.startswith('data: {"event":"CONTENT_DELTA"'))
    assert grew("agent_runs_events_total", type="CONTENT_DELTA") >= streamed > 0
    assert grew("agent_runs_tool_calls_total", tool="get_stock_price", outcome="ok") == 2
    assert grew("agent_runs_model_tokens_total", model="scripted", direction="input") > 0
    assert grew("agent_runs_model_tokens_total", model="scripted", direction="output") > 0
    assert grew("agent_runs_http_requests_total", endpoint="create_run", status="200") == 1
    assert grew("agent_runs_http_requests_total", endpoint="stream_run", status="200") == 1
    # The scrape before this one was counted too.
    assert grew("agent_runs_http_requests_total", endpoint="metrics", status="200") == 1
    # Nothing runs or streams any more.
    assert value(after, "agent_runs_active_runs") == value(before, "agent_runs_active_runs")
    assert value(after, "agent_runs_active_streams") == value(before, "agent_runs_active_streams")


def test_failed_requests_and_unknown_tools_are_counted_by_endpoint_and_status(host, agents):
    client = host.test_client()
    scrape = metrics_token()
    before = samples(client.get("/api/metrics", headers=scrape).text)
    auth = make_token()
    assert client.get("/api/agents/nobody", headers=auth).status_code == 404
    assert client.get("/api/agents").status_code == 401
    after = samples(client.get("/api/metrics", headers=scrape).text)
    found = value(after, "agent_runs_http_requests_total", endpoint="show_agent", status="404")
    assert (
        found - value(before, "agent_runs_http_requests_total", endpoint="show_agent", status="404")
        == 1
    )
    found = value(after, "agent_runs_http_requests_total", endpoint="list_agents", status="401")
    assert (
        found
        - value(before, "agent_runs_http_requests_total", endpoint="list_agents", status="401")
        == 1
    )


def test_metrics_need_the_metrics_or_admin_scope(host):
    client = host.test_client()
    assert client.get("/api/metrics").status_code == 401
    reader = client.get("/api/metrics", headers=make_token())
    assert reader.status_code == 403 and "metrics" in reader.json["detail"]
    assert client.get("/api/metrics", headers=metrics_token(scopes=("admin",))).status_code == 200
    # A metrics token reads nothing else.
    only_metrics = metrics_token()
    assert client.get("/api/agents", headers=only_metrics).status_code == 403


def test_openmetrics_is_served_when_asked_for(host):
    client = host.test_client()
    response = client.get(
        "/api/metrics",
        headers={**metrics_token(), "Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert response.status_code == 200
    assert response.mimetype == "application/openmetrics-text"
    assert response.text.rstrip().endswith("# EOF")


def test_metrics_can_be_turned_off(database_url):
    app = create_app({"AGENT_RUNS_DATABASE_URL": database_url, "AGENT_RUNS_METRICS": False})
    client = app.test_client()
    response = client.get("/api/metrics", headers=metrics_token())
    assert response.status_code == 404 and "AGENT_RUNS_METRICS" in response.json["detail"]
    assert app.extensions["agent_runs"].metrics is None


def test_tokens_create_takes_the_metrics_scope(app, runner, client):
    created = runner.invoke(args=["tokens", "create", "--org", "acme", "--scope", "metrics"])
    assert created.exit_code == 0, created.output
    secret = created.output.strip().splitlines()[-1]
    response = client.get("/api/metrics", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200


# Two workers ---------------------------------------------------------------------------------


def runs_by_worker(folder: Path) -> dict[int, float]:
    """Completed runs each worker counted, read from its prometheus-client file."""
    counted: dict[int, float] = {}
    for path in folder.glob("counter_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        for key, found, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name == "agent_runs_runs_total" and labels.get("status") == "COMPLETED":
                counted[pid] = counted.get(pid, 0) + found
    return counted


def make_runs(server: GunicornServer, count: int) -> None:
    """Start ``count`` streams at once, each on a connection of its own, and read them out."""
    errors: list[str] = []

    def one(index: int) -> None:
        response = requests.post(
            f"{server.url}/api/agents/assistant/runs/stream",
            headers={**server.headers, "Connection": "close"},
            json={"message": f"hello {index}"},
            timeout=30,
        )
        if response.status_code != 200 or '"event":"STOP"' not in response.text:
            errors.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def scrape(server: GunicornServer, token: str) -> dict:
    response = requests.get(
        f"{server.url}/api/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return samples(response.text)


def test_two_workers_count_as_one_server(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left by an earlier server")
    with GunicornServer(
        tmp_path, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    ) as server:
        token = server.cli("tokens", "create", "--org", "acme", "--scope", "metrics")
        token = token.stdout.strip().splitlines()[-1]
        # gunicorn.conf.py emptied the directory it was given.
        assert not (metrics_dir / "counter_1.db").exists()
        made = 0
        # Which worker accepts a connection is the kernel's choice: go on, ten runs at a
        # time, until both workers have made runs.
        while made < 50:
            make_runs(server, 10)
            made += 10
            if len([n for n in runs_by_worker(metrics_dir).values() if n]) >= 2:
                break
        by_worker = runs_by_worker(metrics_dir)
        assert len([n for n in by_worker.values() if n]) == 2, by_worker
        found = scrape(server, token)
        completed = value(found, "agent_runs_runs_total", agent="assistant", status="COMPLETED")
        assert completed == made == sum(by_worker.values())
        assert value(found, "agent_runs_active_runs") == 0
        assert value(found, "agent_runs_run_duration_seconds_count", agent="assistant") == made

        # A worker that dies: its counts stay, its gauges go (child_exit).
        dead = max(by_worker, key=lambda pid: by_worker[pid])
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and list(metrics_dir.glob(f"gauge_live*_{dead}.db")):
            time.sleep(0.1)
        assert not list(metrics_dir.glob(f"gauge_live*_{dead}.db"))
        assert (metrics_dir / f"counter_{dead}.db").exists()
        found = scrape(server, token)
        completed = value(found, "agent_runs_runs_total", agent="assistant", status="COMPLETED")
        assert completed == made
