"""The webhook outbox: a run's end, written as messages to its organisation's webhooks.

Whoever records a run's final (or paused) state calls :func:`enqueue_notices` in the same
transaction, so the messages exist exactly when the state does: a run whose end was rolled
back announces nothing, and one that ended is announced even if its worker dies the next
moment. The deliverers (:mod:`.delivery`) send the rows from there, on any worker.
"""

from __future__ import annotations

import datetime
import json
import secrets
from dataclasses import dataclass
from typing import Any

from ..db import Statement, insert_statement
from ..models import DeliveryStatus, RunStatus, Webhook, WebhookDelivery, utcnow
from ..schemas import UsageSchema, utc_timestamp

# The event a run's status announces; a run in another state announces nothing.
EVENT_OF_STATUS = {
    RunStatus.COMPLETED: "run.completed",
    RunStatus.FAILED: "run.failed",
    RunStatus.CANCELLED: "run.cancelled",
    RunStatus.PAUSED: "run.paused",
}

_encode_payload = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_usage_schema = UsageSchema()


@dataclass(frozen=True, slots=True)
class RunNotice:
    """What a webhook is told of a run that ended or paused."""

    run_id: str
    org_id: str
    agent_id: str
    session_id: str
    status: str
    # The run's usage as stored (input_tokens, output_tokens, ...), or None.
    usage: dict[str, Any] | None
    completed_at: datetime.datetime | None


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def payload(event: str, notice: RunNotice, now: datetime.datetime) -> str:
    """Return a message's body: Standard Webhooks' {type, timestamp, data} as JSON text."""
    return _encode_payload(
        {
            "type": event,
            "timestamp": utc_timestamp(now),
            "data": {
                "runId": notice.run_id,
                "agentId": notice.agent_id,
                "sessionId": notice.session_id,
                "status": notice.status,
                "usage": None if notice.usage is None else _usage_schema.dump(notice.usage),
                "completedAt": utc_timestamp(notice.completed_at),
            },
        }
    )


_ORG_WEBHOOKS = Statement(
    lambda org_id: Webhook.select(Webhook.id, Webhook.events).where(Webhook.org_id == org_id)
)
_INSERT_DELIVERY = insert_statement(
    WebhookDelivery,
    [
        WebhookDelivery.webhook,
        WebhookDelivery.message_id,
        WebhookDelivery.event,
        WebhookDelivery.payload,
        WebhookDelivery.status,
        WebhookDelivery.attempts,
        WebhookDelivery.next_attempt_at,
        WebhookDelivery.created_at,
    ],
)


def enqueue_notices(notices: list[RunNotice]) -> int:
    """Write one outbox row per webhook that wants each notice's event; return how many.

    Runs inside the caller's transaction. One indexed read per organisation among the
    notices: with no webhooks registered, that read is all a run's end costs.
    """
    now = utcnow()
    webhooks: dict[str, list[dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []
    for notice in notices:
        event = EVENT_OF_STATUS.get(notice.status)
        if event is None:
            continue
        if notice.org_id not in webhooks:
            webhooks[notice.org_id] = _ORG_WEBHOOKS.rows(org_id=notice.org_id)
        targets = [hook["id"] for hook in webhooks[notice.org_id] if event in hook["events"]]
        if not targets:
            continue
        # One message id for all of an event's deliveries: it names the event.
        message_id = new_message_id()
        body = payload(event, notice, now)
        rows.extend(
            {
                "webhook": webhook_id,
                "message_id": message_id,
                "event": event,
                "payload": body,
                "status": DeliveryStatus.PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for webhook_id in targets
        )
    if rows:
        _INSERT_DELIVERY.execute_many(rows)
    return len(rows)
