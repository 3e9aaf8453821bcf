"""Webhook delivery: every worker's deliverer sends the outbox's due rows, signed, and retries.

Rows are claimed with a conditional UPDATE, so of several deliverers (two workers, or two
hosts on one PostgreSQL) one wins each row. Claiming a row moves its due time past the end of
the attempt: if the deliverer dies mid-attempt, the row falls due again and another sends it.
A 2xx marks the row delivered, and it is never sent again; anything else (another status, a
refused connection, no answer within the timeout) schedules a retry, after a delay that
doubles each time, until the row is ``retry_for`` seconds old, when it is given up as FAILED.
The rare repeat (an answer lost with the worker that waited for it) carries the same
``webhook-id``, by which Standard Webhooks receivers drop duplicates.

Messages are signed as Standard Webhooks says: ``webhook-signature`` is ``v1,`` and the
base64 HMAC-SHA256, keyed by the secret's bytes, of ``{webhook-id}.{webhook-timestamp}.{body}``.

Each attempt is bounded as a whole by ``timeout`` (connect, send, answer), holds no database
connection meanwhile, and the deliverer runs at most ``concurrency`` of them at once, at most
``per_webhook`` to one webhook: a receiver that hangs costs a few greenlets for ``timeout``
seconds, and never a run, which only wrote its rows to the outbox.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.pool
import httpcore2

from ..db import database
from ..models import DeliveryStatus, Webhook, WebhookDelivery, utcnow
from .addresses import GuardedBackend
from .webhooks import WebhookPolicy

logger = logging.getLogger(__name__)

# Seconds between deletions of old delivered and failed rows.
PRUNE_EVERY = 3600.0
# The most of an answer's body read (and thrown away) so its connection can be reused.
MAX_ANSWER_BYTES = 64 * 1024


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` of a message: ``v1,`` and the base64 HMAC-SHA256."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class DeliverySettings:
    policy: WebhookPolicy = field(default_factory=WebhookPolicy)
    # Seconds an attempt may take, from connecting to the answer's status line.
    timeout: float = 10.0
    # The delay before the first retry, in seconds; it doubles with each further failure,
    # up to max_retry_delay.
    retry_delay: float = 5.0
    max_retry_delay: float = 3600.0
    # Seconds from a message's creation after which a failure is final.
    retry_for: float = 86_400.0
    # How often a deliverer looks for due rows.
    poll_interval: float = 1.0
    # Attempts in flight at once per worker, and to any one webhook.
    concurrency: int = 16
    per_webhook: int = 4
    # Days delivered and failed rows are kept.
    retention_days: float = 7.0

    @property
    def lease(self) -> datetime.timedelta:
        """How long a claim holds a row: past the attempt's end, with room for recording it."""
        return datetime.timedelta(seconds=2 * self.timeout + 10)


@dataclass
class Attempt:
    """A claimed row, and what its attempt needs: its webhook's URL and secret."""

    id: int
    claim: str
    url: str
    secret: str
    message_id: str
    payload: str
    attempts: int
    created_at: datetime.datetime


@dataclass
class Answer:
    """How an attempt went: the receiver's status, if it answered, and what went wrong."""

    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class AttemptTimeout(Exception):
    pass


class WebhookDeliverer:
    """Sends this worker's share of the outbox; :meth:`run` is the worker's loop for it."""

    def __init__(self, settings: DeliverySettings) -> None:
        self.settings = settings
        self._attempts = gevent.pool.Pool(settings.concurrency)
        self._client: httpcore2.ConnectionPool | None = None

    @property
    def client(self) -> httpcore2.ConnectionPool:
        # Made in the worker that delivers, not in a parent that forked it.
        if self._client is None:
            self._client = httpcore2.ConnectionPool(
                max_connections=self.settings.concurrency,
                keepalive_expiry=30.0,
                network_backend=GuardedBackend(self.settings.policy.addresses),
            )
        return self._client

    def run(self) -> None:
        """Deliver due rows every poll interval, until killed (with the attempts in flight)."""
        last_prune = 0.0
        try:
            while True:
                try:
                    with database.connection_context():
                        self.deliver_due()
                        now = gevent.get_hub().loop.now()
                        if now - last_prune >= PRUNE_EVERY:
                            prune_deliveries(self.settings.retention_days)
                            last_prune = now
                except Exception:
                    logger.exception("delivering webhooks failed; retrying")
                gevent.sleep(self.settings.poll_interval)
        finally:
            self._attempts.kill(block=True, timeout=5)

    def deliver_due(self) -> int:
        """Claim due rows, as many as there is room for, and start their attempts."""
        room = self._attempts.free_count()
        if room <= 0:
            return 0
        claimed = claim_due(room, self.settings.per_webhook, self.settings.lease)
        for attempt in claimed:
            self._attempts.spawn(self.attempt, attempt)
        return len(claimed)

    def attempt(self, attempt: Attempt) -> Answer:
        """Send a claimed row once and record how it went."""
        answer = self.send(attempt)
        with database.connection_context():
            record(attempt, answer, self.settings)
        return answer

    def send(self, attempt: Attempt) -> Answer:
        """POST the message, signed; holds no database connection."""
        body = attempt.payload.encode()
        timestamp = int(time.time())
        headers = [
            (b"Content-Type", b"application/json"),
            (b"User-Agent", user_agent()),
            (b"webhook-id", attempt.message_id.encode()),
            (b"webhook-timestamp", str(timestamp).encode()),
            (
                b"webhook-signature",
                sign(attempt.secret, attempt.message_id, timestamp, body).encode(),
            ),
        ]
        timeout = self.settings.timeout
        limits = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        try:
            with gevent.Timeout(timeout, AttemptTimeout):
                with self.client.stream(
                    "POST",
                    attempt.url,
                    headers=headers,
                    content=body,
                    extensions={"timeout": limits},
                ) as response:
                    read = 0
                    for chunk in response.iter_stream():
                        read += len(chunk)
                        if read > MAX_ANSWER_BYTES:
                            break
                    status = response.status
        except AttemptTimeout:
            return Answer(None, f"no answer within {timeout:g} s")
        except httpcore2.TimeoutException:
            return Answer(None, f"no answer within {timeout:g} s")
        except httpcore2.ConnectError as error:
            return Answer(None, f"could not connect: {error}")
        except (httpcore2.NetworkError, httpcore2.ProtocolError) as error:
            return Answer(None, f"{type(error).__name__}: {error}")
        except Exception as error:  # the attempt is recorded whatever went wrong
            logger.exception("sending webhook message %s failed", attempt.message_id)
            return Answer(None, f"{type(error).__name__}: {error}")
        if 200 <= status < 300:
            return Answer(status, None)
        return Answer(status, f"answered {status}")


def user_agent() -> bytes:
    from .. import __version__  # here: the package imports this module while it loads

    return f"agent-runs/{__version__}".encode()


# Claiming and recording ------------------------------------------------------------------


def claim_due(limit: int, per_webhook: int, lease: datetime.timedelta) -> list[Attempt]:
    """Claim up to ``limit`` due rows (at most ``per_webhook`` of one webhook) for this
    deliverer; return them with their webhooks' URLs and secrets.

    A row is claimed by a conditional UPDATE that only a row still due passes: of two
    deliverers racing for it, the database lets one through. The claim moves its due time
    ``lease`` ahead and counts the attempt.
    """
    now = utcnow()
    candidates = (
        WebhookDelivery.select(WebhookDelivery.id, WebhookDelivery.webhook)
        .where(
            (WebhookDelivery.status == DeliveryStatus.PENDING)
            & (WebhookDelivery.next_attempt_at <= now)
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit * per_webhook)
        .dicts()
    )
    chosen: list[int] = []
    per_hook: dict[str, int] = {}
    for candidate in candidates:
        delivery_id, webhook_id = candidate["id"], candidate["webhook"]  # type: ignore[index]
        if per_hook.get(webhook_id, 0) < per_webhook:
            per_hook[webhook_id] = per_hook.get(webhook_id, 0) + 1
            chosen.append(delivery_id)
            if len(chosen) == limit:
                break
    if not chosen:
        return []
    claim = secrets.token_hex(8)
    (
        WebhookDelivery.update(
            claim=claim,
            next_attempt_at=now + lease,
            attempts=WebhookDelivery.attempts + 1,
        )
        .where(
            WebhookDelivery.id.in_(chosen)
            & (WebhookDelivery.status == DeliveryStatus.PENDING)
            & (WebhookDelivery.next_attempt_at <= now)
        )
        .execute()
    )
    rows = (
        WebhookDelivery.select(
            WebhookDelivery.id,
            WebhookDelivery.message_id,
            WebhookDelivery.payload,
            WebhookDelivery.attempts,
            WebhookDelivery.created_at,
            Webhook.url,
            Webhook.secret,
        )
        .join(Webhook)
        .where(WebhookDelivery.id.in_(chosen) & (WebhookDelivery.claim == claim))
    )
    return [
        Attempt(
            id=row.id,
            claim=claim,
            url=row.webhook.url,
            secret=row.webhook.secret,
            message_id=row.message_id,
            payload=row.payload,
            attempts=row.attempts,
            created_at=row.created_at,
        )
        for row in rows
    ]


def retry_delay(attempts: int, settings: DeliverySettings) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: doubling, capped,
    spread by a fifth either way so that a receiver's backlog does not come back at once."""
    delay = min(settings.retry_delay * 2 ** max(attempts - 1, 0), settings.max_retry_delay)
    return delay * random.uniform(0.8, 1.2)


def record(attempt: Attempt, answer: Answer, settings: DeliverySettings) -> None:
    """Record an attempt's outcome on its row, if this deliverer's claim still holds it."""
    now = utcnow()
    changes: dict[Any, Any] = {
        WebhookDelivery.claim: None,
        WebhookDelivery.last_status: answer.status,
        WebhookDelivery.last_error: answer.error,
    }
    if answer.delivered:
        changes[WebhookDelivery.status] = DeliveryStatus.DELIVERED
        changes[WebhookDelivery.delivered_at] = now
        changes[WebhookDelivery.next_attempt_at] = now
    else:
        due = now + datetime.timedelta(seconds=retry_delay(attempt.attempts, settings))
        if due > attempt.created_at + datetime.timedelta(seconds=settings.retry_for):
            changes[WebhookDelivery.status] = DeliveryStatus.FAILED
            changes[WebhookDelivery.next_attempt_at] = now
            logger.warning(
                "webhook message %s to %s given up after %d attempts: %s",
                attempt.message_id,
                attempt.url,
                attempt.attempts,
                answer.error,
            )
        else:
            changes[WebhookDelivery.next_attempt_at] = due
            logger.info(
                "webhook message %s to %s failed (attempt %d), retrying: %s",
                attempt.message_id,
                attempt.url,
                attempt.attempts,
                answer.error,
            )
    updated = (
        WebhookDelivery.update(changes)
        .where((WebhookDelivery.id == attempt.id) & (WebhookDelivery.claim == attempt.claim))
        .execute()
    )
    if not updated:
        logger.warning(
            "webhook message %s: its claim lapsed before the attempt was recorded",
            attempt.message_id,
        )


def prune_deliveries(retention_days: float) -> int:
    """Delete delivered and failed rows older than ``retention_days``."""
    cutoff = utcnow() - datetime.timedelta(days=retention_days)
    return (
        WebhookDelivery.delete()
        .where(
            WebhookDelivery.status.in_([DeliveryStatus.DELIVERED, DeliveryStatus.FAILED])
            & (WebhookDelivery.next_attempt_at < cutoff)
        )
        .execute()
    )
