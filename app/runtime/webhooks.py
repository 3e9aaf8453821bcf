"""Webhooks an organisation registers, and which addresses a webhook may point at.

A webhook's URL is checked when it is registered, and its host's addresses again at every
delivery (:mod:`.delivery`), after resolving it: a name that resolved to a public address
yesterday may resolve to the cloud's metadata service today. Unless the server is told
otherwise, private, loopback and link-local addresses are refused, so that a token holder
cannot make the server call into its own network.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import gevent
from marshmallow import ValidationError

from ..models import Webhook, utcnow
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


class AddressRefused(Exception):
    """A webhook's host resolves to no address it may be sent to."""


def address_allowed(address: str) -> bool:
    """Whether an IP address is a public one: not private, loopback, link-local or reserved."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") aside
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """Return the addresses ``host`` resolves to, in the resolver's order. Raises OSError."""
    with gevent.Timeout(timeout, OSError(f"resolving {host} took over {timeout:g} s")):
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def allowed_addresses(host: str, port: int, policy: WebhookPolicy) -> list[str]:
    """Return the addresses of ``host`` a delivery may connect to; raise AddressRefused if
    there are none."""
    try:
        addresses = resolve(host, port, policy.resolve_timeout)
    except OSError as error:
        raise AddressRefused(f"{host} does not resolve ({error})") from None
    if policy.allow_private:
        return addresses
    allowed = [address for address in addresses if address_allowed(address)]
    if not allowed:
        raise AddressRefused(
            f"{host} resolves only to private, loopback or link-local addresses "
            f"({', '.join(addresses)})"
        )
    return allowed


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
    if policy.allow_private:
        return url
    default_port = 443 if parts.scheme.lower() == "https" else 80
    try:
        addresses = resolve(host, port or default_port, policy.resolve_timeout)
    except OSError:
        raise refuse(f"The host {host} does not resolve.") from None
    refused = [address for address in addresses if not address_allowed(address)]
    if refused:
        raise refuse(
            f"The host {host} points at a private, loopback or link-local address "
            f"({', '.join(refused)}); webhooks go to public addresses only."
        )
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
