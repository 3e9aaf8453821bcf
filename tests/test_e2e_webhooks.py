"""Webhooks against a real gunicorn, delivered to a real receiver on loopback.

- Runs on both of two workers: each end is delivered once, signed as Standard Webhooks says
  (verified with the ``standardwebhooks`` library), whichever worker's deliverer claims it.
- The four events, and a webhook that asked for one of them only.
- A receiver that fails: retried with the same webhook-id until it answers 2xx, then never.
- A receiver that hangs: its attempt is cut at the timeout, other webhooks and runs go on.
- A server restart: what was not delivered before is delivered after.
- A host that resolves to a private address, with the policy on: never connected to.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import pytest
import requests
from standardwebhooks import Webhook as Verifier

from .test_e2e_resilience import (
    AGENTS_YAML,
    open_on,
    wait_for_status,
    wait_for_workers,
)
from .test_e2e_resilience import serve as serve_agents
from .webhook_receiver import HANG, Receiver, closed_port

AGENTS = (
    AGENTS_YAML
    + f"""\
  - id: assistant
    description: Answers at once.
  - id: broken
    description: Its model server is not there.
    model: openai:missing
    model_options: {{base_url: "http://127.0.0.1:{closed_port()}/v1", max_retries: 0}}
"""
)

# Webhooks to loopback over http, as test receivers are; attempts quick to retry and cut.
OPEN = {
    "AGENT_RUNS_WEBHOOK_ALLOW_HTTP": "true",
    "AGENT_RUNS_WEBHOOK_ALLOW_PRIVATE": "true",
    "AGENT_RUNS_WEBHOOK_POLL_INTERVAL": "0.1",
    "AGENT_RUNS_WEBHOOK_RETRY_DELAY": "0.3",
    "AGENT_RUNS_WEBHOOK_TIMEOUT": "1",
    "AGENT_RUNS_RATE_LIMIT": "0",
}


@contextlib.contextmanager
def serve(folder: Path, *, workers: int = 2, env: dict[str, str] | None = None):
    """A gunicorn with an admin token (``server.admin``), every worker's deliverer started."""
    with serve_agents(folder, workers=workers, env=env, agents=AGENTS) as server:
        server.admin = (
            server.cli("tokens", "create", "--org", "acme", "--scope", "admin")
            .stdout.strip()
            .splitlines()[-1]
        )
        # Every worker serves a request first: its deliverer starts with its first request.
        for worker in wait_for_workers(server, workers):
            open_on(server, lambda pid, worker=worker: pid == worker, timeout=30)[0].close()
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("webhooks"), env=OPEN) as running:
        yield running


def api(server, method, path, *, admin=False, **kwargs):
    token = server.admin if admin else server.token
    headers = {"Authorization": f"Bearer {token}", "Connection": "close"}
    return requests.request(
        method, server.url + "/api" + path, headers=headers, timeout=15, **kwargs
    )


def register(server, url, events=None):
    body = {"url": url} if events is None else {"url": url, "events": events}
    answer = api(server, "POST", "/webhooks", admin=True, json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()


@contextlib.contextmanager
def webhook(server, receiver, events=None):
    """A webhook to ``receiver`` for the block; removed after, so other tests' runs skip it."""
    hook = register(server, receiver.url, events)
    try:
        yield hook
    finally:
        api(server, "DELETE", f"/webhooks/{hook['id']}", admin=True)


def run(server, agent="assistant", message="hi", worker=None):
    """A finished run, on the given worker if asked; returns its status."""
    if worker is None:
        answer = api(server, "POST", f"/agents/{agent}/runs", json={"message": message})
        assert answer.status_code == 200, answer.text
        run_id = answer.json()["runId"]
    else:
        connection, _ = open_on(server, lambda pid: pid == worker)
        connection.send("POST", f"/api/agents/{agent}/runs", {"message": message})
        connection.read_to_end()
        assert connection.status == 200, connection.raw
        run_id = connection.json()["runId"]
    return api(server, "GET", f"/agents/{agent}/runs/{run_id}/status").json()


def verified(hook, received):
    """The body of a delivery, once its signature has verified."""
    return Verifier(hook["secret"]).verify(received.body, received.headers)


def test_each_run_end_on_either_worker_is_delivered_once_and_verifies(server):
    workers = wait_for_workers(server, 2)
    with Receiver() as receiver, webhook(server, receiver) as hook:
        statuses = [run(server, worker=workers[n % 2]) for n in range(10)]
        received = receiver.wait_for(10)
        time.sleep(1.0)  # ten poll intervals of both deliverers: time for any repeat
        received = list(receiver.received)
    assert len(received) == 10, [r.json for r in received]
    assert len({r.message_id for r in received}) == 10
    by_run = {verified(hook, r)["data"]["runId"]: verified(hook, r) for r in received}
    for status in statuses:
        message = by_run[status["id"]]
        assert message["type"] == "run.completed"
        assert message["data"] == {
            "runId": status["id"],
            "agentId": "assistant",
            "sessionId": status["sessionId"],
            "status": "COMPLETED",
            "usage": status["usage"],
            "completedAt": status["completedAt"],
        }
        assert message["timestamp"].endswith("Z")


def test_the_four_events_and_a_webhook_that_wants_one(server):
    with (
        Receiver() as everything,
        Receiver() as failures,
        webhook(server, everything) as hook,
        webhook(server, failures, ["run.failed"]) as failures_hook,
    ):
        completed = run(server)
        failed = run(server, agent="broken")
        assert failed["status"] == "FAILED", failed
        paused = api(server, "POST", "/agents/banker/runs", json={"message": "100"}).json()
        assert paused["status"] == "PAUSED", paused
        chatty = api(server, "POST", "/agents/chatty/runs/background", json={"message": "go"})
        chatty_id = chatty.json()["runId"]
        wait_for_status(server, "chatty", chatty_id, {"RUNNING"})
        assert api(server, "DELETE", f"/agents/chatty/runs/{chatty_id}").status_code == 202
        wait_for_status(server, "chatty", chatty_id, {"CANCELLED"})
        everything.wait_for(4)
        failures.wait_for(1)
        time.sleep(0.5)
        got = {m["type"]: m["data"] for m in map(lambda r: verified(hook, r), everything.received)}
        only = [verified(failures_hook, r) for r in failures.received]
    assert set(got) == {"run.completed", "run.failed", "run.cancelled", "run.paused"}
    assert len(everything.received) == 4
    assert got["run.completed"]["runId"] == completed["id"]
    assert got["run.failed"] == {**got["run.failed"], "runId": failed["id"], "status": "FAILED"}
    assert got["run.paused"]["runId"] == paused["runId"] and got["run.paused"]["status"] == "PAUSED"
    assert got["run.paused"]["completedAt"] is None
    assert got["run.cancelled"]["runId"] == chatty_id
    assert got["run.cancelled"]["status"] == "CANCELLED"
    assert [m["type"] for m in only] == ["run.failed"] and only[0]["data"]["runId"] == failed["id"]


def test_a_failing_receiver_is_retried_until_it_answers_2xx_then_never_again(server):
    replies = {1: 500, 2: 503}
    with Receiver(lambda n: replies.get(n, 204)) as receiver, webhook(server, receiver) as hook:
        status = run(server)
        receiver.wait_for(3)
        time.sleep(2.0)  # several retry delays past the 2xx
        received = list(receiver.received)
    assert len(received) == 3, [r.headers for r in received]
    assert len({r.message_id for r in received}) == 1
    assert len({r.body for r in received}) == 1
    # Each attempt is signed anew, with its own timestamp; every one verifies.
    assert [verified(hook, r)["data"]["runId"] for r in received] == [status["id"]] * 3
    # The delay doubles: 0.3 s, then 0.6 s, give or take a fifth.
    first, second = received[1].at - received[0].at, received[2].at - received[1].at
    assert second > first


def test_a_hanging_receiver_holds_neither_runs_nor_other_webhooks(server):
    with (
        Receiver(lambda n: HANG) as hanging,
        Receiver() as healthy,
        webhook(server, hanging),
        webhook(server, healthy),
    ):
        statuses = [run(server) for _ in range(5)]
        assert {s["status"] for s in statuses} == {"COMPLETED"}
        healthy.wait_for(5)
        assert len(healthy.received) == 5
        # Each hung attempt is cut at the timeout (1 s), and the message tried again.
        hanging.wait_for(6, timeout=20)
        assert len(hanging.received) >= 6
        deadline = time.monotonic() + 10
        while len(hanging.closed) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(hanging.closed) >= 5, "the server kept hung connections open"
        # The server answers at once meanwhile.
        assert api(server, "GET", "/agents").status_code == 200


def read_deliveries(server) -> list[dict]:
    path = server.env["AGENT_RUNS_DATABASE_URL"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM webhook_delivery ORDER BY id")]


def test_what_was_not_delivered_before_a_restart_is_delivered_after(tmp_path):
    up = False
    with Receiver(lambda n: 204 if up else 503) as receiver:
        with serve(tmp_path, env=OPEN) as before:
            hook = register(before, receiver.url)
            status = run(before)
            receiver.wait_for(1)
        assert receiver.received, "not even tried before the restart"
        tried = len(receiver.received)
        up = True
        with serve(tmp_path, env=OPEN) as after:
            receiver.wait_for(tried + 1, timeout=30)
            time.sleep(1.0)
            [row] = read_deliveries(after)
    delivered = receiver.received[tried:]
    assert len(delivered) == 1, [r.headers for r in receiver.received]
    assert delivered[0].message_id == receiver.received[0].message_id
    assert verified(hook, delivered[0])["data"]["runId"] == status["id"]
    assert row["status"] == "DELIVERED" and row["attempts"] == tried + 1


def test_a_host_resolving_to_a_private_address_is_never_connected_to(tmp_path):
    with Receiver() as receiver:
        with serve(tmp_path, workers=1, env=OPEN) as lenient:
            # localhost resolves to 127.0.0.1: allowed here, with private addresses allowed.
            register(lenient, f"http://localhost:{receiver.port}/hooks")
        strict = {**OPEN, "AGENT_RUNS_WEBHOOK_ALLOW_PRIVATE": "false"}
        with serve(tmp_path, workers=1, env=strict) as server:
            run(server)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                rows = read_deliveries(server)
                if rows and rows[0]["attempts"] >= 2:
                    break
                time.sleep(0.1)
        assert receiver.received == []
    [row] = rows
    assert row["status"] == "PENDING" and row["attempts"] >= 2
    assert "private, loopback or link-local" in row["last_error"], row


def test_registering_a_private_address_is_a_422_on_a_strict_server(tmp_path):
    with serve(tmp_path, workers=1, env={"AGENT_RUNS_WEBHOOK_ALLOW_HTTP": "true"}) as server:
        for url in ("http://127.0.0.1:9/x", "http://localhost/x", "http://[::1]/", "nope"):
            answer = api(server, "POST", "/webhooks", admin=True, json={"url": url})
            assert answer.status_code == 422, (url, answer.text)
            assert "url" in answer.json()["errors"]
        assert api(server, "GET", "/webhooks", admin=True).json() == []
