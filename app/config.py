"""Configuration: the defaults, and the AGENT_RUNS_* environment variables that override them.

This is the one place that reads configuration. Every key shares the ``AGENT_RUNS_`` prefix,
both in the environment and in ``app.config``, so a host application can set them like any
other Flask setting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

DEFAULTS: dict[str, Any] = {
    # Where runs, events, sessions and tokens live. A SQLite file in WAL mode by default.
    "AGENT_RUNS_DATABASE_URL": "sqlite:///agent_runs.sqlite3",
    # Database connections each worker keeps open for reuse.
    "AGENT_RUNS_DB_POOL_SIZE": 32,
    # Apply pending migrations when the application starts.
    "AGENT_RUNS_MIGRATE_ON_START": True,
    # Agent definitions (YAML or JSON). None means the bundled demo agents.
    "AGENT_RUNS_AGENTS_FILE": None,
    # Model used by agents that do not name one. None: the embedded model ("local") when the
    # local extra is installed, else the deterministic "scripted" model.
    "AGENT_RUNS_DEFAULT_MODEL": None,
    # Have the embedded model's process load the agents' local models when the application
    # starts, rather than on their first run. The agent-runs command's own app turns it off:
    # a command is no server (`serve` loads them itself, before its workers start).
    "AGENT_RUNS_LOAD_MODELS_ON_START": True,
    # Where the API is mounted.
    "AGENT_RUNS_URL_PREFIX": "/api",
    # Seconds of silence after which a stream gets a ": ping" comment.
    "AGENT_RUNS_PING_INTERVAL": 15.0,
    # How often buffered events are written to the database, in seconds; streams get events
    # once written, so this is also the most an event waits before it is sent.
    "AGENT_RUNS_EVENT_FLUSH_INTERVAL": 0.025,
    # Input bounds for a RunRequest.
    "AGENT_RUNS_MAX_MESSAGE_LENGTH": 32_000,
    "AGENT_RUNS_MAX_MEDIA": 8,
    "AGENT_RUNS_MAX_MEDIA_BYTES": 10 * 1024 * 1024,
    "AGENT_RUNS_MAX_BATCH_IDS": 100,
    # Largest request body accepted, in bytes (media travel inline as base64).
    "AGENT_RUNS_MAX_CONTENT_LENGTH": 25 * 1024 * 1024,
    # Seconds a tool may run before it is stopped and reported as failed.
    "AGENT_RUNS_TOOL_TIMEOUT": 30.0,
    # A tool result longer than this many characters reaches the model cut, with a note.
    "AGENT_RUNS_TOOL_RESULT_MAX_CHARS": 100_000,
    # Seconds an MCP server's tool list is kept before it is asked again (sooner if the
    # server says it changed).
    "AGENT_RUNS_MCP_TOOLS_TTL": 300.0,
    # The largest answer read from an MCP server, in bytes; a larger one fails the call.
    "AGENT_RUNS_MCP_MAX_RESPONSE_BYTES": 8 * 1024 * 1024,
    # Agents stored through the API (any organisation's admin writes them): the variables of
    # the server's environment their ${NAME} references and model_options.api_key_env may
    # read, as names or prefixes ending in * ("CRM_TOKEN,ACME_*"; none by default, never the
    # server's own AGENT_RUNS_*), and whether their MCP servers and model servers may be at
    # private, loopback and link-local addresses.
    "AGENT_RUNS_AGENT_ENV_ALLOW": "",
    "AGENT_RUNS_AGENT_ALLOW_PRIVATE": False,
    # A running run's lease: renewed by its worker; once expired, the run is failed as lost.
    "AGENT_RUNS_LEASE_SECONDS": 30.0,
    # How often cancel requests from other workers are picked up, and how often a stream of a
    # run executing on another worker reads new events, in seconds.
    "AGENT_RUNS_POLL_INTERVAL": 0.25,
    # Background runs executing at once per worker; the rest wait QUEUED.
    "AGENT_RUNS_MAX_BACKGROUND_RUNS": 32,
    # On shutdown, seconds runs still executing get to finish before they are failed.
    "AGENT_RUNS_SHUTDOWN_TIMEOUT": 25.0,
    # Days the events of a finished run are kept.
    "AGENT_RUNS_EVENT_RETENTION_DAYS": 7.0,
    # Requests a minute per token (per worker); 0 turns the limit off.
    "AGENT_RUNS_RATE_LIMIT": 1200,
    # Runs RUNNING or QUEUED at once per organisation; more get 429. 0 turns the cap off.
    "AGENT_RUNS_MAX_ACTIVE_RUNS_PER_ORG": 1000,
    # Idempotency-Key on run creation: seconds a key keeps naming the run it started.
    "AGENT_RUNS_IDEMPOTENCY_TTL": 86_400.0,
    # Webhooks: http:// URLs are refused unless this is true (https only), and so are hosts
    # that resolve to private, loopback or link-local addresses unless the next is true.
    "AGENT_RUNS_WEBHOOK_ALLOW_HTTP": False,
    "AGENT_RUNS_WEBHOOK_ALLOW_PRIVATE": False,
    # Seconds one delivery attempt may take, connection to answer.
    "AGENT_RUNS_WEBHOOK_TIMEOUT": 10.0,
    # Seconds before the first retry of a failed delivery; each further retry waits twice as
    # long, up to the maximum, until the message is RETRY_FOR seconds old.
    "AGENT_RUNS_WEBHOOK_RETRY_DELAY": 5.0,
    "AGENT_RUNS_WEBHOOK_MAX_RETRY_DELAY": 3600.0,
    "AGENT_RUNS_WEBHOOK_RETRY_FOR": 86_400.0,
    # How often each worker looks for deliveries due, in seconds.
    "AGENT_RUNS_WEBHOOK_POLL_INTERVAL": 1.0,
    # Delivery attempts in flight at once per worker.
    "AGENT_RUNS_WEBHOOK_CONCURRENCY": 16,
    # JWT bearer tokens from an identity provider: an HS256 secret, or an RS256 public key
    # (PEM text or a file path). Without either, only the server's own tokens are accepted.
    "AGENT_RUNS_JWT_SECRET": None,
    "AGENT_RUNS_JWT_PUBLIC_KEY": None,
    "AGENT_RUNS_JWT_AUDIENCE": None,
    "AGENT_RUNS_JWT_ISSUER": None,
    # The claims that carry the organisation, the user and the scopes.
    "AGENT_RUNS_JWT_ORG_CLAIM": "org_id",
    "AGENT_RUNS_JWT_USER_CLAIM": "sub",
    "AGENT_RUNS_JWT_SCOPES_CLAIM": "scope",
    # The playground, a chat page for trying agents in a browser, at {prefix}/playground.
    "AGENT_RUNS_PLAYGROUND": True,
    # Seconds a stream token (POST .../events/token, for a browser's EventSource) stays valid.
    "AGENT_RUNS_STREAM_TOKEN_TTL": 300.0,
    # Origins of browser applications allowed to call the API (CORS), comma-separated, or
    # "*" for any; None sends no CORS headers.
    "AGENT_RUNS_CORS_ORIGINS": None,
    # Count runs, events, tokens, tool calls and requests for GET {prefix}/metrics.
    "AGENT_RUNS_METRICS": True,
    # The standalone server's log lines: "text", or "json" for one JSON object a line (read
    # by gunicorn.conf.py too, for gunicorn's own lines), from this level on.
    "AGENT_RUNS_LOG_FORMAT": "text",
    "AGENT_RUNS_LOG_LEVEL": "info",
}

_BOOLEAN_WORDS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _coerce(key: str, raw: str) -> Any:
    """Turn an environment string into the type of the key's default."""
    default = DEFAULTS[key]
    if default is None:
        return raw
    if isinstance(default, bool):
        try:
            return _BOOLEAN_WORDS[raw.strip().lower()]
        except KeyError:
            raise ValueError(f"{key} must be true or false, not {raw!r}") from None
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


NO_EMBEDDED_MODEL = (
    "The embedded model is not installed, so agents that name no model use the deterministic "
    "'scripted' model. For a real model that runs offline: pip install 'agent-runs[local]' "
    "(or -e '.[local]' in a checkout)."
)


def default_model(configured: str | None) -> str:
    """Return the model of agents that name none: the configured one, else the best at hand."""
    if configured:
        return configured
    from .providers.local import is_available

    return "local" if is_available() else "scripted"


def cors_origins(value: str | None) -> list[str]:
    """Return the origins of AGENT_RUNS_CORS_ORIGINS (comma-separated); [] for none.

    Each is ``*`` or a scheme, a host and maybe a port (``https://app.example.com:8443``), as
    a browser's Origin header carries it; anything else (a path, a trailing slash) would
    never match, so it is refused when the application starts.
    """
    origins = [part.strip() for part in (value or "").split(",") if part.strip()]
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ValueError(
                f"AGENT_RUNS_CORS_ORIGINS: {origin!r} is not an origin; write it as "
                "scheme://host[:port] (no path, no trailing slash), or * for any"
            )
    return origins


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[a-z0-9.-]+(:[0-9]{1,5})?", re.IGNORECASE)


def otel_traces_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OTEL_* variables ask for traces exported over OTLP.

    An OTLP endpoint must be named; OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn
    traces off all the same. The OpenTelemetry SDK reads every other OTEL_* variable itself.
    """
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return the defaults overridden by any AGENT_RUNS_* variables in the environment."""
    environ = os.environ if environ is None else environ
    config = dict(DEFAULTS)
    for key in DEFAULTS:
        if key in environ and environ[key] != "":
            config[key] = _coerce(key, environ[key])
    return config
