"""Webhooks an organisation registers, and which URLs a webhook may point at.

A webhook's URL is checked when it is registered, and its host's addresses again at every
delivery (:mod:`.delivery`), after resolving it, by the server's one address policy
(:mod:`.addresses`).
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from marshmallow import ValidationError

from ..models import Webhook, utcnow
from .addresses import AddressPolicy, host_refusal
from .runs import NotFound

MAX_URL_LENGTH = 2048


@dataclass(frozen=True)
class WebhookPolicy:
    """Where webhooks may point: https only unless ``allow_http``; public addresses only
    unless ``allow_private``."""

    allow_http: bool = False
    allow_private: bool = False
    # Seconds a name may take to resolve.
    resolve_timeout: float = 5.0

    @property
    def addresses(self) -> AddressPolicy:
        return AddressPolicy(self.allow_private, self.resolve_timeout)


def check_url(url: str, policy: WebhookPolicy) -> str:
    """Return ``url`` if a webhook may point there; else raise a ValidationError naming url."""

    def refuse(message: str) -> ValidationError:
        return ValidationError({"url": [message]})

    if len(url) > MAX_URL_LENGTH:
        raise refuse(f"Must be at most {MAX_URL_LENGTH} characters.")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise refuse("Must be a URL: ASCII, without spaces (percent-encode the rest).")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise refuse("Must be a URL such as https://example.com/hooks.") from None
    schemes = ("https", "http") if policy.allow_http else ("https",)
    if parts.scheme.lower() not in schemes:
        raise refuse(f"Must be an {' or '.join(schemes)} URL.")
    host = parts.hostname
    if not host:
        raise refuse("Must name a host, as in https://example.com/hooks.")
    if parts.username is not None or parts.password is not None:
        raise refuse("Must not carry a user name or password.")
    if parts.fragment:
        raise refuse("Must not have a #fragment.")
    default_port = 443 if parts.scheme.lower() == "https" else 80
    refusal = host_refusal(
        host, port or default_port, policy.addresses, "webhooks go to public addresses only"
    )
    if refusal:
        raise refuse(refusal)
    return url


def new_secret() -> str:
    """Return a signing secret in Standard Webhooks' form: ``whsec_`` and 32 bytes of base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def register_webhook(org_id: str, url: str, events: list[str], policy: WebhookPolicy) -> Webhook:
    """Register an endpoint for the organisation; the returned row carries its secret."""
    webhook = Webhook(
        id=f"wh_{secrets.token_hex(12)}",
        org_id=org_id,
        url=check_url(url, policy),
        events=list(dict.fromkeys(events)),
        secret=new_secret(),
        created_at=utcnow(),
    )
    webhook.save(force_insert=True)
    return webhook


def list_webhooks(org_id: str) -> list[Webhook]:
    return list(
        Webhook.select().where(Webhook.org_id == org_id).order_by(Webhook.created_at, Webhook.id)
    )


def get_webhook(org_id: str, webhook_id: str) -> Webhook:
    webhook = Webhook.get_or_none((Webhook.id == webhook_id) & (Webhook.org_id == org_id))
    if webhook is None:
        raise NotFound(f"No webhook {webhook_id!r}.")
    return webhook


def delete_webhook(org_id: str, webhook_id: str) -> None:
    """Delete the organisation's webhook and, with it, its deliveries still to be made."""
    deleted = (
        Webhook.delete().where((Webhook.id == webhook_id) & (Webhook.org_id == org_id)).execute()
    )
    if not deleted:
        raise NotFound(f"No webhook {webhook_id!r}.")
