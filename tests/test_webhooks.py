"""Webhooks through the API (registration, the URL policy) and the outbox, in-process.

Delivery itself, across workers, restarts and misbehaving receivers, is tested against a real
gunicorn in test_e2e_webhooks.py.
"""

from __future__ import annotations

import base64
import datetime
import json
import time

import pytest
from standardwebhooks import Webhook as Verifier

import agent_runs
from agent_runs import create_app
from agent_runs.auth import create_token
from agent_runs.db import database
from agent_runs.models import DeliveryStatus, Run, RunStatus, Webhook, WebhookDelivery
from agent_runs.runtime.addresses import address_allowed
from agent_runs.runtime.delivery import (
    Answer,
    Attempt,
    DeliverySettings,
    WebhookDeliverer,
    claim_due,
    record,
    retry_delay,
    sign,
)
from agent_runs.runtime.outbox import EVENT_OF_STATUS
from agent_runs.runtime.store import sweep_expired_runs
from agent_runs.runtime.webhooks import WebhookPolicy
from agent_runs.schemas import WEBHOOK_EVENTS

from .webhook_receiver import HANG, Receiver, closed_port


def admin_token(org_id="acme"):
    with database.connection_context():
        _, secret = create_token(org_id, scopes=("admin",))
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def admin(app):
    return admin_token()


@pytest.fixture
def open_app(database_url):
    """An application that lets webhooks point at loopback over http, as test receivers do."""
    app = create_app(
        {
            "AGENT_RUNS_DATABASE_URL": database_url,
            "TESTING": True,
            "AGENT_RUNS_WEBHOOK_ALLOW_HTTP": True,
            "AGENT_RUNS_WEBHOOK_ALLOW_PRIVATE": True,
            "AGENT_RUNS_WEBHOOK_POLL_INTERVAL": 0.05,
        }
    )
    yield app
    app.extensions["agent_runs"].executor.shutdown(timeout=10)


def deliveries():
    with database.connection_context():
        return list(WebhookDelivery.select().order_by(WebhookDelivery.id))


def park_webhook(events, id="wh_parked"):
    """A webhook to a loopback address the default policy refuses at delivery: its rows stay
    PENDING for the test to read."""
    with database.connection_context():
        Webhook.create(
            id=id,
            org_id="acme",
            url="https://127.0.0.1:9/",
            events=events,
            secret="whsec_a2s=",
        )


# Registering ------------------------------------------------------------------------------

# A public address given as such: registering it resolves nothing. No test runs anything for
# its organisation, so nothing is ever sent there.
PUBLIC_URL = "https://93.184.215.14/hooks/agent-runs"


def test_an_admin_registers_a_webhook_and_sees_its_secret_once(client, admin):
    created = client.post("/api/webhooks", headers=admin, json={"url": PUBLIC_URL})
    assert created.status_code == 201, created.json
    webhook = created.json
    assert webhook["url"] == PUBLIC_URL
    assert webhook["events"] == list(WEBHOOK_EVENTS)
    assert webhook["id"].startswith("wh_") and webhook["createdAt"].endswith("Z")
    assert webhook["secret"].startswith("whsec_")
    assert len(base64.b64decode(webhook["secret"].removeprefix("whsec_"))) == 32
    listed = client.get("/api/webhooks", headers=admin).json
    assert listed == [{k: v for k, v in webhook.items() if k != "secret"}]
    one = client.get(f"/api/webhooks/{webhook['id']}", headers=admin).json
    assert one == listed[0]
    assert client.delete(f"/api/webhooks/{webhook['id']}", headers=admin).status_code == 204
    assert client.get(f"/api/webhooks/{webhook['id']}", headers=admin).status_code == 404
    assert client.delete(f"/api/webhooks/{webhook['id']}", headers=admin).status_code == 404
    assert client.get("/api/webhooks", headers=admin).json == []


def test_a_webhook_takes_the_events_it_names_once_each(client, admin):
    body = {"url": PUBLIC_URL, "events": ["run.failed", "run.paused", "run.failed"]}
    created = client.post("/api/webhooks", headers=admin, json=body)
    assert created.status_code == 201
    assert created.json["events"] == ["run.failed", "run.paused"]


def test_webhooks_need_an_admin_token(client, auth, admin):
    hook = client.post("/api/webhooks", headers=admin, json={"url": PUBLIC_URL}).json
    for method, path in [
        ("post", "/api/webhooks"),
        ("get", "/api/webhooks"),
        ("get", f"/api/webhooks/{hook['id']}"),
        ("delete", f"/api/webhooks/{hook['id']}"),
    ]:
        answer = getattr(client, method)(path, headers=auth, json={"url": PUBLIC_URL})
        assert answer.status_code == 403, (method, path)
        assert "admin" in answer.json["detail"]
    assert client.get("/api/webhooks", headers=admin).json[0]["id"] == hook["id"]


def test_another_organisations_webhooks_are_not_there(client, admin):
    hook = client.post("/api/webhooks", headers=admin, json={"url": PUBLIC_URL}).json
    other = admin_token("globex")
    assert client.get("/api/webhooks", headers=other).json == []
    assert client.get(f"/api/webhooks/{hook['id']}", headers=other).status_code == 404
    assert client.delete(f"/api/webhooks/{hook['id']}", headers=other).status_code == 404
    assert client.get(f"/api/webhooks/{hook['id']}", headers=admin).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "not a url"}, "url"),
        ({"url": "https://"}, "url"),
        ({"url": "example.com/hooks"}, "url"),
        ({"url": "ftp://example.com/hooks"}, "url"),
        ({"url": "http://93.184.215.14/hooks"}, "url"),  # http is off by default
        ({"url": "https://user:pw@93.184.215.14/"}, "url"),
        ({"url": "https://93.184.215.14:99999/"}, "url"),
        ({"url": "https://héllo.example/"}, "url"),
        ({"url": "https://" + "a" * 2100 + ".com/"}, "url"),
        ({"url": 42}, "url"),
        ({}, "url"),
        ({"url": PUBLIC_URL, "events": ["run.started"]}, "events"),
        ({"url": PUBLIC_URL, "events": []}, "events"),
        ({"url": PUBLIC_URL, "events": "run.completed"}, "events"),
        ({"url": PUBLIC_URL, "secret": "mine"}, "secret"),
    ],
)
def test_a_bad_registration_is_a_422_naming_the_field(client, admin, body, field):
    answer = client.post("/api/webhooks", headers=admin, json=body)
    assert answer.status_code == 422, answer.json
    assert answer.content_type == "application/problem+json"
    assert field in answer.json["errors"], answer.json
    assert client.get("/api/webhooks", headers=admin).json == []


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hooks",
        "https://localhost:8443/hooks",  # resolves to loopback
        "https://10.1.2.3/",
        "https://172.16.0.9/",
        "https://192.168.1.1/",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/",
        "https://[fe80::1]/",
        "https://[fd00::5]/",
        "https://[::ffff:127.0.0.1]/",
        "https://0.0.0.0/",
        "https://100.64.0.1/",
        "https://224.0.0.1/",
    ],
)
def test_private_loopback_and_link_local_addresses_are_refused(client, admin, url):
    answer = client.post("/api/webhooks", headers=admin, json={"url": url})
    assert answer.status_code == 422, answer.json
    [message] = answer.json["errors"]["url"]
    assert "private, loopback or link-local" in message


def test_a_host_that_does_not_resolve_is_refused(client, admin):
    answer = client.post("/api/webhooks", headers=admin, json={"url": "https://nowhere.invalid/"})
    assert answer.status_code == 422
    assert "does not resolve" in answer.json["errors"]["url"][0]


def test_the_address_policy():
    assert address_allowed("93.184.215.14") and address_allowed("2606:4700::1111")
    for address in (
        "127.0.0.1",
        "10.0.0.1",
        "169.254.1.1",
        "::1",
        "fe80::1%eth0",
        "::ffff:10.0.0.1",
    ):
        assert not address_allowed(address), address


def test_http_and_private_addresses_when_the_server_allows_them(open_app):
    client = open_app.test_client()
    with open_app.app_context():
        headers = admin_token()
    answer = client.post("/api/webhooks", headers=headers, json={"url": "http://localhost:9/x"})
    assert answer.status_code == 201, answer.json
    # Still a URL, though.
    answer = client.post("/api/webhooks", headers=headers, json={"url": "gopher://localhost/"})
    assert answer.status_code == 422


# The outbox --------------------------------------------------------------------------------


def test_the_schema_offers_the_events_the_outbox_sends():
    assert set(WEBHOOK_EVENTS) == set(EVENT_OF_STATUS.values())


def test_a_run_end_writes_one_row_per_webhook_wanting_its_event(client, admin, auth):
    # Nothing is sent: the default policy refuses these loopback URLs at delivery as well, and
    # the rows are read before the deliverer's first round.
    with database.connection_context():
        for name, events in [("all", list(WEBHOOK_EVENTS)), ("failures", ["run.failed"])]:
            Webhook.create(
                id=f"wh_{name}",
                org_id="acme",
                url=f"https://127.0.0.1:{closed_port()}/",
                events=events,
                secret="whsec_" + base64.b64encode(b"k" * 32).decode(),
            )
        Webhook.create(
            id="wh_other_org",
            org_id="globex",
            url="https://127.0.0.1:9/",
            events=["run.completed"],
            secret="whsec_a2s=",
        )
    run = client.post("/api/agents/assistant/runs", headers=auth, json={"message": "hi"}).json
    status = client.get(f"/api/agents/assistant/runs/{run['runId']}/status", headers=auth).json
    [row] = deliveries()
    assert row.webhook_id == "wh_all" and row.event == "run.completed"
    assert row.status == DeliveryStatus.PENDING
    assert json.loads(row.payload) == {
        "type": "run.completed",
        "timestamp": json.loads(row.payload)["timestamp"],
        "data": {
            "runId": run["runId"],
            "agentId": "assistant",
            "sessionId": run["sessionId"],
            "status": "COMPLETED",
            "usage": status["usage"],
            "completedAt": status["completedAt"],
        },
    }


def test_a_run_failed_by_the_sweep_is_announced(client, auth):
    run = client.post("/api/agents/assistant/runs", headers=auth, json={"message": "hi"}).json
    park_webhook(["run.failed"])
    with database.connection_context():
        # As if the run's worker had died mid-run: RUNNING, lease expired.
        Run.update(status=RunStatus.RUNNING, lease_expires_at=datetime.datetime(2020, 1, 1)).where(
            Run.id == run["runId"]
        ).execute()
        assert sweep_expired_runs() == [run["runId"]]
    [row] = deliveries()
    data = json.loads(row.payload)["data"]
    assert row.event == "run.failed"
    assert data["runId"] == run["runId"] and data["status"] == "FAILED"
    assert data["sessionId"] == run["sessionId"] and data["completedAt"].endswith("Z")


def test_a_paused_run_and_its_cancel_are_announced(client, auth, agents):
    @agent_runs.tool(requires_approval=True)
    def wire_money(amount: str) -> str:
        """Send money."""
        return f"sent {amount}"

    agent = agents("banker", tools=[wire_money])
    park_webhook(["run.paused", "run.cancelled"])
    run = client.post(f"/api/agents/{agent}/runs", headers=auth, json={"message": "5"}).json
    assert run["status"] == "PAUSED"
    assert (
        client.delete(f"/api/agents/{agent}/runs/{run['runId']}", headers=auth).status_code == 202
    )
    paused, cancelled = (json.loads(row.payload) for row in deliveries())
    assert paused["type"] == "run.paused" and paused["data"]["completedAt"] is None
    assert cancelled["type"] == "run.cancelled"
    assert cancelled["data"]["status"] == "CANCELLED" and cancelled["data"]["runId"] == run["runId"]


def test_signatures_verify_with_the_standard_webhooks_library():
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    body = b'{"type":"run.completed","data":{"runId":"run_1"}}'
    timestamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, "msg_1", timestamp, body),
    }
    assert Verifier(secret).verify(body, headers) == json.loads(body)
    headers["webhook-id"] = "msg_2"
    with pytest.raises(Exception, match="signature"):
        Verifier(secret).verify(body, headers)


def test_a_claimed_row_is_claimed_once_and_recorded_only_by_its_claimant(client, admin, auth):
    park_webhook(["run.completed"], id="wh_x")
    client.post("/api/agents/assistant/runs", headers=auth, json={"message": "hi"})
    settings = DeliverySettings(retry_delay=60)
    with database.connection_context():
        # The app's own deliverer may have taken it already: make it due again.
        WebhookDelivery.update(next_attempt_at=WebhookDelivery.created_at, claim=None).execute()
        [first] = claim_due(10, 4, settings.lease)
        assert claim_due(10, 4, settings.lease) == []
        stale = Attempt(**{**first.__dict__, "claim": "someone-else"})
        record(stale, Answer(200, None), settings)
        assert WebhookDelivery.get_by_id(first.id).status == DeliveryStatus.PENDING
        record(first, Answer(500, "answered 500"), settings)
        row = WebhookDelivery.get_by_id(first.id)
    assert row.status == DeliveryStatus.PENDING and row.attempts == first.attempts
    assert row.last_status == 500 and row.claim is None


def test_a_failure_past_the_retry_window_is_final(client, auth):
    park_webhook(["run.completed"], id="wh_y")
    client.post("/api/agents/assistant/runs", headers=auth, json={"message": "hi"})
    settings = DeliverySettings(retry_delay=10, retry_for=5)
    with database.connection_context():
        WebhookDelivery.update(next_attempt_at=WebhookDelivery.created_at, claim=None).execute()
        [attempt] = claim_due(10, 4, settings.lease)
        record(attempt, Answer(None, "no answer within 1 s"), settings)
        row = WebhookDelivery.get_by_id(attempt.id)
    assert row.status == DeliveryStatus.FAILED and row.last_error == "no answer within 1 s"


def test_retries_back_off_doubling_to_an_hour_for_a_day():
    """With the defaults, a message failing every time is tried some thirty times in its day."""
    settings = DeliverySettings()
    for attempts, expected in [(1, 5), (2, 10), (3, 20), (8, 640), (10, 2560), (11, 3600)]:
        for _ in range(20):
            assert 0.8 * expected <= retry_delay(attempts, settings) <= 1.2 * expected
    assert retry_delay(100, settings) <= 1.2 * 3600
    elapsed, attempts = 0.0, 1
    while elapsed < settings.retry_for:
        elapsed += retry_delay(attempts, settings)
        attempts += 1
    assert 25 <= attempts <= 45


def test_deleting_a_webhook_deletes_its_pending_deliveries(client, admin, auth):
    hook = client.post("/api/webhooks", headers=admin, json={"url": PUBLIC_URL}).json
    with database.connection_context():
        # Parked far ahead, so the app's deliverer leaves them alone.
        WebhookDelivery.insert(
            webhook=hook["id"],
            message_id="msg_z",
            event="run.completed",
            payload="{}",
            next_attempt_at=datetime.datetime(2999, 1, 1),
        ).execute()
    assert len(deliveries()) == 1
    client.delete(f"/api/webhooks/{hook['id']}", headers=admin)
    assert deliveries() == []


# Delivering, in-process ---------------------------------------------------------------------


def test_the_deliverer_sends_a_signed_message_the_library_verifies(open_app):
    client = open_app.test_client()
    with open_app.app_context():
        headers = admin_token()
        runner = make_runner_token()
    with Receiver() as receiver:
        hook = client.post("/api/webhooks", headers=headers, json={"url": receiver.url}).json
        run = client.post("/api/agents/assistant/runs", headers=runner, json={"message": "hi"}).json
        [message] = receiver.wait_for(1)
    body = Verifier(hook["secret"]).verify(message.body, message.headers)
    assert body["type"] == "run.completed" and body["data"]["runId"] == run["runId"]
    assert message.headers["content-type"] == "application/json"
    assert message.headers["user-agent"].startswith("agent-runs/")
    [row] = deliveries()
    assert row.status == DeliveryStatus.DELIVERED and row.attempts == 1 and row.last_status == 200


def test_an_attempt_is_bounded_by_the_timeout(database_url):
    with Receiver(lambda n: HANG) as receiver:
        app = create_app(
            {
                "AGENT_RUNS_DATABASE_URL": database_url,
                "AGENT_RUNS_WEBHOOK_ALLOW_HTTP": True,
                "AGENT_RUNS_WEBHOOK_ALLOW_PRIVATE": True,
            }
        )
        deliverer = WebhookDeliverer(
            DeliverySettings(policy=WebhookPolicy(True, True), timeout=0.3)
        )
        attempt = Attempt(1, "c", receiver.url, "whsec_a2s=", "msg_1", "{}", 1, None)
        answer = deliverer.send(attempt)
        assert answer == Answer(None, "no answer within 0.3 s")
        receiver.wait_for(1)
        deadline = time.monotonic() + 5
        while not receiver.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert receiver.closed, "the deliverer kept the hung connection"
    app.extensions["agent_runs"].executor.shutdown(timeout=1)


def test_a_refused_address_is_a_failed_attempt_not_a_connection():
    deliverer = WebhookDeliverer(DeliverySettings(policy=WebhookPolicy(True, False), timeout=2))
    with Receiver() as receiver:
        url = f"http://localhost:{receiver.port}/hooks"
        answer = deliverer.send(Attempt(1, "c", url, "whsec_a2s=", "msg_1", "{}", 1, None))
    assert answer.status is None and "private, loopback or link-local" in answer.error
    assert receiver.received == []


def make_runner_token():
    with database.connection_context():
        _, secret = create_token("acme")
    return {"Authorization": f"Bearer {secret}"}
