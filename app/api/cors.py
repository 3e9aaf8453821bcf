"""CORS for browser applications on other origins (AGENT_RUNS_CORS_ORIGINS), by flask-cors.

flask-cors's ``CORS(bp)`` would register its hook on the blueprint, which every application
embedding it shares, and its options would be the first application's. Its header logic is
used instead from a hook of the blueprint's own that takes each application's options, so
the headers go on the API's answers (errors and streams included: they are set before the
first byte) and never on the host application's other routes.
"""

from __future__ import annotations

from typing import Any, cast

from flask import Response, current_app
from flask_cors.core import DEFAULT_OPTIONS, serialize_options, set_cors_headers

from . import bp

# What the API's requests use: its methods, and the headers a browser must ask leave to send.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "Last-Event-ID",
    "Idempotency-Key",
    "If-Match",
    "traceparent",
    "tracestate",
)
# What a page's script may read of an answer, beyond the CORS-safelisted headers.
EXPOSE_HEADERS = (
    "ETag",
    "Location",
    "Retry-After",
    "WWW-Authenticate",
    "Idempotent-Replayed",
)
# Seconds a browser may keep a preflight's answer.
MAX_AGE = 600


def cors_options(origins: list[str]) -> dict[str, Any] | None:
    """Return flask-cors's options for these origins; None (no CORS headers) for none."""
    if not origins:
        return None
    return cast(
        dict[str, Any],
        serialize_options(
            {
                **DEFAULT_OPTIONS,
                "origins": origins,
                "methods": list(METHODS),
                "allow_headers": list(ALLOW_HEADERS),
                "expose_headers": list(EXPOSE_HEADERS),
                "max_age": MAX_AGE,
                # Bearer tokens, not cookies: no credentials mode.
                "supports_credentials": False,
                # Only to a request from an allowed origin (flask-cors would tell any).
                "always_send": False,
            }
        ),
    )


@bp.after_request
def _cors_headers(response: Response) -> Response:
    options = current_app.extensions["agent_runs"].cors
    if options is not None:
        set_cors_headers(response, options)
    return response
