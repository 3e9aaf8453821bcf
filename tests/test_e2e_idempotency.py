"""Idempotency-Key against a real gunicorn with two workers: retries that race.

- Twenty simultaneous requests with one key, on both workers: one run, every answer names it.
- A streaming retry sent to the other worker while the first stream runs: the same run's
  events, START to STOP, and no second run.
- A synchronous retry on the other worker while the first waits: the same RunResponse.
"""

from __future__ import annotations

import contextlib
import sqlite3

import gevent
import pytest

from .test_e2e_resilience import open_on, serve, wait_for_workers


@pytest.fixture(scope="module")
def server2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idempotency")
    with serve(folder, workers=2, env={"AGENT_RUNS_RATE_LIMIT": "0"}) as server:
        for worker in wait_for_workers(server, 2):
            open_on(server, lambda pid, worker=worker: pid == worker, timeout=30)[0].close()
        yield server


def runs_in_database(server) -> int:
    path = server.env["AGENT_RUNS_DATABASE_URL"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT COUNT(*) FROM run").fetchone()[0]


def send_on(server, worker, path, body, key):
    connection, _ = open_on(server, lambda pid: pid == worker)
    connection.send("POST", path, body, headers={"Idempotency-Key": key})
    return connection


def test_simultaneous_retries_on_two_workers_make_one_run(server2):
    before = runs_in_database(server2)
    body = {"message": "hello there"}
    # Ten on each worker: which worker accepts a connection is the kernel's choice, and
    # twenty left to it all landed on one now and then.
    connections = [
        open_on(server2, lambda pid, worker=worker: pid == worker)[0]
        for worker in wait_for_workers(server2, 2)
        for _ in range(10)
    ]
    assert len({connection.worker for connection in connections}) == 2
    for connection in connections:
        connection.send(
            "POST", "/api/agents/busy/runs/background", body, headers={"Idempotency-Key": "k1"}
        )
    gevent.joinall([gevent.spawn(c.read_to_end) for c in connections], raise_error=True)
    assert {c.status for c in connections} == {202}, [c.raw for c in connections]
    run_ids = {c.json()["runId"] for c in connections}
    assert len(run_ids) == 1
    replayed = [c for c in connections if c.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 19
    assert runs_in_database(server2) == before + 1


def test_a_streaming_retry_on_the_other_worker_follows_the_same_run(server2):
    first_worker, other_worker = wait_for_workers(server2, 2)
    body = {"message": "stream me"}
    path = "/api/agents/slow/runs/stream"
    before = runs_in_database(server2)
    first = send_on(server2, first_worker, path, body, "k2")
    first.read_until(lambda c: len(c.frames()) >= 5, timeout=15)
    retry = send_on(server2, other_worker, path, body, "k2")
    first.read_to_end()
    retry.read_to_end()
    assert retry.status == 200 and retry.headers["idempotent-replayed"] == "true"
    original, replayed = first.frames(), retry.frames()
    assert replayed == original
    assert original[0].event == "START" and original[-1].event == "STOP"
    assert runs_in_database(server2) == before + 1


def test_a_synchronous_retry_on_the_other_worker_gets_the_same_answer(server2):
    first_worker, other_worker = wait_for_workers(server2, 2)
    body = {"message": "wait for me"}
    path = "/api/agents/busy/runs"
    first = send_on(server2, first_worker, path, body, "k3")
    gevent.sleep(0.3)  # the first run is under way: the retry comes while it executes
    retry = send_on(server2, other_worker, path, body, "k3")
    first.read_to_end()
    retry.read_to_end()
    assert first.status == retry.status == 200
    assert retry.json() == first.json()
    assert first.json()["status"] == "COMPLETED"
    assert retry.headers["idempotent-replayed"] == "true"


def test_another_body_with_the_key_is_a_422_on_either_worker(server2):
    first_worker, other_worker = wait_for_workers(server2, 2)
    path = "/api/agents/busy/runs/background"
    first = send_on(server2, first_worker, path, {"message": "one"}, "k4")
    first.read_to_end()
    assert first.status == 202
    other = send_on(server2, other_worker, path, {"message": "two"}, "k4")
    other.read_to_end()
    assert other.status == 422
    assert "Idempotency-Key" in other.json()["errors"]
