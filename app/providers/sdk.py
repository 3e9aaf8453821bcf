"""What the providers built on vendors' HTTP SDKs share: importing them under gevent, reading
their options, and saying where a failed call went.
"""

from __future__ import annotations

import email.utils
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import gevent.monkey


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
