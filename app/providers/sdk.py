"""What the providers built on vendors' HTTP SDKs share: importing them under gevent, reading
their options, saying where a failed call went, and retrying a call until output starts.
"""

from __future__ import annotations

import email.utils
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import gevent
import gevent.monkey

from .base import Delta, ProviderError


@contextmanager
def trio_hidden() -> Iterator[None]:
    """Make ``import trio`` fail cleanly while an SDK's HTTP layer loads, under gevent.

    The HTTP layer (httpcore) tries ``import trio`` and expects ImportError when it is
    absent. gevent's monkey-patching removes ``select.epoll``, so an installed trio fails to
    import with AttributeError instead and no client can be made. A synchronous client never
    uses trio, so it is hidden (``None`` in ``sys.modules``) for that moment only.
    """
    hide = "trio" not in sys.modules and gevent.monkey.is_module_patched("select")
    if hide:
        sys.modules["trio"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if hide and sys.modules.get("trio", 0) is None:
            del sys.modules["trio"]


with trio_hidden():
    import httpcore2
    import httpx2


class BackendTransport(httpx2.HTTPTransport):
    """httpx2's transport, its connections made by an httpcore2 network backend of ours.

    httpx2's transport takes no backend, so its pool is made again with one, and otherwise
    as httpx2 makes it. (The address policy's guarded backend is what it is for.)
    """

    def __init__(
        self,
        network_backend: httpcore2.NetworkBackend,
        limits: httpx2.Limits | None = None,
    ) -> None:
        limits = limits or httpx2.Limits(max_connections=None, max_keepalive_connections=256)
        super().__init__(limits=limits, trust_env=False)
        self._pool = httpcore2.ConnectionPool(
            ssl_context=httpx2.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=network_backend,
        )


def display_url(url: str) -> str:
    """Return a URL fit for an error message: no credentials, no query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def option_number(options: Mapping[str, Any], key: str, default: float, kind: type = float) -> Any:
    """Read a non-negative number from a provider's options; ValueError names a bad one."""
    value = options.get(key)
    if value is None:
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_options.{key} must be a number, not {value!r}") from None
    if number < 0:
        raise ValueError(f"model_options.{key} must not be negative")
    return number


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Return the wait, in seconds, that a 429/503 response's headers ask for, if they do."""
    for header, scale in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / scale)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            continue
        return max(0.0, when.timestamp() - time.time())
    return None


def endpoint(
    options: Mapping[str, Any],
    *,
    default_base_url: str,
    key_variable: str,
    base_url_variable: str | None = None,
    default_api_key: str | None = None,
) -> tuple[str, str, str | None]:
    """Return (base URL, API key, why the key is missing or None) from a provider's options.

    ``api_key`` or ``api_key_env`` (the name of a variable holding it) come first. The
    vendor's own ``key_variable`` (e.g. OPENAI_API_KEY) is used only when the options name no
    ``base_url``: a key meant for the vendor is never sent to a server an agent file names.
    A missing key is reported when the model is called, so the run fails saying why.
    """
    if options.get("base_url"):
        base_url, fallback_key = str(options["base_url"]), None
    else:
        base_url = (base_url_variable and os.environ.get(base_url_variable)) or default_base_url
        fallback_key = default_api_key or os.environ.get(key_variable)
    if options.get("api_key"):
        return base_url, str(options["api_key"]), None
    if options.get("api_key_env"):
        api_key = os.environ.get(str(options["api_key_env"]), "")
        missing = (
            f"The API key variable {options['api_key_env']!r} named by the agent's "
            "model_options api_key_env is not set."
        )
        return base_url, api_key, None if api_key else missing
    api_key = fallback_key or ""
    if not api_key and base_url == default_base_url and not default_api_key:
        return (
            base_url,
            "",
            (
                f"No API key for {base_url}: set {key_variable}, or the agent's "
                "model_options api_key or api_key_env."
            ),
        )
    return base_url, api_key, None


DEFAULT_MAX_RETRIES = 2
DEFAULT_RETRY_DELAY = 0.5
# The longest wait between attempts, whatever a server asks for.
MAX_RETRY_DELAY = 20.0
# Statuses worth another attempt, besides every 5xx.
RETRY_STATUSES = frozenset({408, 409, 429})


class StreamTruncated(Exception):
    """The server ended the stream without saying the answer was finished."""


# One client per SDK, base URL, key and network backend, shared by every run of this process.
_clients: dict[tuple[type, str, str, Any], Any] = {}


def shared_client(
    sdk_client: type,
    base_url: str,
    api_key: str,
    network_backend: httpcore2.NetworkBackend | None = None,
    http_client: type | None = None,
) -> Any:
    """Return the process's client of ``sdk_client`` for this server and key; the SDK's own
    retries are off (stream_with_retries retries, and only before output). With a
    ``network_backend``, its connections are made by it, through the SDK's own
    ``http_client`` class (its DefaultHttpxClient)."""
    key = (sdk_client, base_url, api_key, network_backend)
    client = _clients.get(key)
    if client is None:
        settings: dict[str, Any] = {}
        with trio_hidden():
            if network_backend is not None:
                assert http_client is not None
                settings["http_client"] = http_client(transport=BackendTransport(network_backend))
            client = sdk_client(base_url=base_url, api_key=api_key, max_retries=0, **settings)
        client = _clients.setdefault(key, client)
    return client


def backoff(retry_delay: float, attempt: int, headers: Mapping[str, str] | None) -> float:
    """Seconds to wait before the next attempt: what the response's ``headers`` ask for, else
    exponential from ``retry_delay``, with jitter."""
    asked = retry_after(headers) if headers is not None else None
    if asked is not None:
        return min(asked, MAX_RETRY_DELAY)
    delay = min(retry_delay * 2**attempt, MAX_RETRY_DELAY)
    # Jitter, so runs that failed together do not all come back at once.
    return delay * random.uniform(0.75, 1.0)


def failure_message(
    model: str, base_url: str, api_key: str, detail: str, *, after_output: bool
) -> str:
    """The error of a failed model call: where it went and what happened, without the key."""
    if after_output:
        detail = f"the stream broke after output had started: {detail}"
    message = f"Model call to {model} at {display_url(base_url)} failed: {detail}"
    if len(api_key) >= 8:
        message = message.replace(api_key, "***")
    return message[:1000]


class Describe(Protocol):
    """Say what went wrong with a model call, and whether output had started."""

    def __call__(self, error: Exception, *, after_output: bool) -> str: ...


def stream_with_retries(
    open_stream: Callable[[], Any],
    read_stream: Callable[[Any], Iterator[Delta]],
    *,
    retry_on: tuple[type[Exception], ...],
    fail_on: tuple[type[Exception], ...],
    retryable: Callable[[Exception], bool],
    backoff: Callable[[int, Exception], float],
    describe: Describe,
    max_retries: int,
) -> Iterator[Delta]:
    """Open a response stream and yield its deltas, retrying failures that happen before output.

    ``retry_on`` errors that ``retryable`` accepts get up to ``max_retries`` further attempts,
    ``backoff(attempt, error)`` seconds apart, but only while nothing has been yielded: a retry
    after output would repeat what was said. Those and ``fail_on`` errors otherwise become a
    :class:`ProviderError` with ``describe``'s message.
    """
    attempt = 0
    while True:
        yielded = False
        try:
            response = open_stream()
            try:
                for delta in read_stream(response):
                    yielded = True
                    yield delta
            finally:
                # Also when the consumer stops early (a cancelled run): drop the
                # connection now rather than let the server generate for nobody.
                response.close()
            return
        except retry_on as error:
            if yielded or attempt >= max_retries or not retryable(error):
                raise ProviderError(describe(error, after_output=yielded)) from None
            gevent.sleep(backoff(attempt, error))
            attempt += 1
        except fail_on as error:
            raise ProviderError(describe(error, after_output=yielded)) from None
