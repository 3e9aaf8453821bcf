"""Idempotency-Key on run creation, as the IETF httpapi draft describes it.

A request that carries a key records it, with a fingerprint of the request, in the very
transaction that records its run. A retry with the same key finds the key and gets the same
run back, as long as the key is younger than its time to live; a request with the key but
something else in it (body, agent, operation or user) is refused. Keys are unique per
organisation by a unique index, not by a check in Python: of two requests racing with one
key, on any worker, the database lets one insert it and makes the other wait for that
transaction, after which it finds the key and the run, already recorded and followable.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..db import Statement
from ..models import IdempotencyKey, utcnow

MAX_KEY_LENGTH = 255

_canonical = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
).encode


class KeyInvalid(Exception):
    """The Idempotency-Key header is malformed."""


class KeyReused(Exception):
    """The key was used, within its time to live, for a different request."""


def parse_key(header: str) -> str:
    """Return the key of an Idempotency-Key header: a Structured Fields string ("..."), or,
    as many clients send it, the bare key. Raises KeyInvalid."""
    value = header.strip()
    if value.startswith('"'):
        key, index = [], 1
        while index < len(value) and value[index] != '"':
            char = value[index]
            if char == "\\":
                index += 1
                if index == len(value) or value[index] not in '\\"':
                    raise KeyInvalid('A quoted key escapes only \\ and ".')
                char = value[index]
            key.append(char)
            index += 1
        if index != len(value) - 1:
            raise KeyInvalid('A quoted key must end with its closing ".')
        value = "".join(key)
    if not value:
        raise KeyInvalid("The key must not be empty.")
    if len(value) > MAX_KEY_LENGTH:
        raise KeyInvalid(f"The key may be at most {MAX_KEY_LENGTH} characters.")
    if not all(" " <= char <= "~" for char in value):
        raise KeyInvalid("The key must be printable ASCII.")
    return value


@dataclass(frozen=True)
class IdempotentRequest:
    """A run request's key and what the request asked, for its fingerprint."""

    key: str
    # The operation asked for, such as "stream_run": a key names one request, not one body.
    operation: str
    body: dict[str, Any]

    def fingerprint(self, agent_id: str, user_id: str) -> str:
        """SHA-256 of who asked what: the user, the operation, the agent and the body."""
        request = [user_id, self.operation, agent_id, self.body]
        return hashlib.sha256(_canonical(request).encode()).hexdigest()


_DELETE_EXPIRED = Statement(
    lambda org_id, key, cutoff: IdempotencyKey.delete().where(
        (IdempotencyKey.org_id == org_id)
        & (IdempotencyKey.key == key)
        & (IdempotencyKey.created_at < cutoff)
    )
)
_INSERT_KEY = Statement(
    lambda org_id, key, fingerprint, now: (
        IdempotencyKey.insert(org_id=org_id, key=key, fingerprint=fingerprint, created_at=now)
        .on_conflict_ignore()
        .returning(IdempotencyKey.id)
    )
)
_FIND_KEY = Statement(
    lambda org_id, key: IdempotencyKey.select(IdempotencyKey.fingerprint, IdempotencyKey.run).where(
        (IdempotencyKey.org_id == org_id) & (IdempotencyKey.key == key)
    )
)
_BIND_KEY = Statement(
    lambda id, run_id: IdempotencyKey.update(run=run_id).where(IdempotencyKey.id == id)
)


def claim_key(org_id: str, key: str, fingerprint: str, ttl: float) -> tuple[int | None, str | None]:
    """Record the key for a new run, inside the transaction that will record the run.

    Returns (the key's row id, None) when it is new, for :func:`bind_key`; or (None, run id)
    when the key already names a run of this same request. Raises KeyReused when the key
    names another request. A key older than ``ttl`` seconds is replaced.
    """
    now = utcnow()
    _DELETE_EXPIRED.execute(org_id=org_id, key=key, cutoff=now - datetime.timedelta(seconds=ttl))
    inserted = _INSERT_KEY.rows(org_id=org_id, key=key, fingerprint=fingerprint, now=now)
    if inserted:
        return inserted[0]["id"], None
    existing = _FIND_KEY.rows(org_id=org_id, key=key)
    if not existing or existing[0]["fingerprint"] != fingerprint:
        raise KeyReused(
            "This Idempotency-Key was used for a different request; send a new key with a "
            "new request."
        )
    return None, existing[0]["run"]


def bind_key(key_id: int, run_id: str) -> None:
    """Make a key claimed by :func:`claim_key` name the run its transaction recorded."""
    _BIND_KEY.execute(id=key_id, run_id=run_id)


def prune_keys(ttl: float) -> int:
    """Delete the keys older than ``ttl`` seconds."""
    cutoff = utcnow() - datetime.timedelta(seconds=ttl)
    return IdempotencyKey.delete().where(IdempotencyKey.created_at < cutoff).execute()
