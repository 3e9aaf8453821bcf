"""Which addresses the server may connect to for an organisation, checked as it connects.

What an organisation's admin writes (a webhook's URL; the MCP servers and model server of an
agent stored through the API) makes the server connect somewhere. Unless the server is told
otherwise, private, loopback and link-local addresses are refused, so that a token holder
cannot make the server call into its own network (a database, an admin port, the cloud's
metadata service at 169.254.169.254).

A URL is checked when it is registered, and its host's addresses again at every connection,
after resolving it: a name that resolved to a public address yesterday may resolve to the
metadata service today. :class:`GuardedBackend`, the network backend of an httpcore2 pool (or
of an httpx2 client, through ``providers.sdk.BackendTransport``), resolves once and connects
only to the addresses it checked, so a name cannot pass the check with one address and then
connect to another.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import gevent
import httpcore2


@dataclass(frozen=True)
class AddressPolicy:
    """Where the server may connect for an organisation: public addresses only, unless
    ``allow_private``."""

    allow_private: bool = False
    # Seconds a name may take to resolve.
    resolve_timeout: float = 5.0


class AddressRefused(Exception):
    """A host resolves to no address the server may connect to."""


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


def allowed_addresses(host: str, port: int, policy: AddressPolicy) -> list[str]:
    """Return the addresses of ``host`` a connection may go to; raise AddressRefused if
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


def host_refusal(host: str, port: int, policy: AddressPolicy, rule: str) -> str | None:
    """Say why a URL naming ``host`` may not be registered, or None if it may; ``rule``
    ends the message ("webhooks go to public addresses only").

    Stricter than a connection: every address the name resolves to must be allowed, not one.
    """
    if policy.allow_private:
        return None
    try:
        addresses = resolve(host, port, policy.resolve_timeout)
    except OSError:
        return f"The host {host} does not resolve."
    refused = [address for address in addresses if not address_allowed(address)]
    if refused:
        return (
            f"The host {host} points at a private, loopback or link-local address "
            f"({', '.join(refused)}); {rule}."
        )
    return None


class GuardedBackend(httpcore2.SyncBackend):
    """Connects only to the addresses the policy allows, resolved as it connects.

    The check and the connection use the same resolution, so a name cannot pass the check
    with one address and then connect to another. TLS still verifies the URL's host name.
    """

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore2.NetworkStream:
        try:
            addresses = allowed_addresses(host, port, self.policy)
        except AddressRefused as refused:
            raise httpcore2.ConnectError(str(refused)) from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as error:
                failure = error
        assert failure is not None
        raise failure
