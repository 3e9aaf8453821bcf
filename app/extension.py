"""The Flask extension: :class:`AgentRuns` mounts the API on an application, and
:func:`create_app` makes the standalone server.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask

from . import config as config_module
from . import logs
from .auth import JWTSettings, stream_token_key
from .db import check_database, database, migrate, open_database
from .limits import RateLimiter
from .logs import RunLog
from .runtime.addresses import AddressPolicy
from .runtime.agent_store import AgentCatalog
from .runtime.agents import AgentRegistry, StoredAgentPolicy, variable_allow_list
from .runtime.delivery import DeliverySettings, WebhookDeliverer
from .runtime.executor import Executor, ExecutorSettings
from .runtime.mcp import McpSettings
from .runtime.observe import Observers, RunObserver
from .runtime.store import sweep_expired_runs
from .runtime.watch import watcher_for
from .runtime.webhooks import WebhookPolicy
from .schemas import BatchStatusQuerySchema, RunRequestSchema

logger = logging.getLogger("agent_runs")

if TYPE_CHECKING:
    from .metrics import Metrics


@dataclass
class AgentRunsState:
    """What the extension keeps per application, in ``app.extensions["agent_runs"]``."""

    config: Mapping[str, Any]
    registry: AgentRegistry
    # The server's agents and each organisation's own (stored through the API).
    agents: AgentCatalog
    executor: Executor
    rate_limiter: RateLimiter
    webhook_policy: WebhookPolicy
    jwt: JWTSettings | None = None
    # Counts for GET {prefix}/metrics; None when AGENT_RUNS_METRICS is off.
    metrics: Metrics | None = None
    # Built on first request by api.openapi, then served as is.
    openapi_document: dict[str, Any] | None = None
    # flask-cors's options for the blueprint's answers (api.cors); None: no CORS headers.
    cors: dict[str, Any] | None = None
    # The key stream tokens are signed with, read from the database on first use.
    _stream_token_key: str | None = None

    def stream_token_key(self) -> str:
        """Return the key stream tokens are signed with (call within a connection)."""
        if self._stream_token_key is None:
            self._stream_token_key = stream_token_key()
        return self._stream_token_key

    @property
    def default_model(self) -> str:
        return self.config["AGENT_RUNS_DEFAULT_MODEL"]

    # The schemas that take this application's limits, built once: building a marshmallow
    # schema costs more than loading a request with it.
    @functools.cached_property
    def run_request_schema(self) -> RunRequestSchema:
        return RunRequestSchema(
            max_message_length=self.config["AGENT_RUNS_MAX_MESSAGE_LENGTH"],
            max_media=self.config["AGENT_RUNS_MAX_MEDIA"],
            max_media_bytes=self.config["AGENT_RUNS_MAX_MEDIA_BYTES"],
        )

    @functools.cached_property
    def batch_status_query_schema(self) -> BatchStatusQuerySchema:
        return BatchStatusQuerySchema(max_ids=self.config["AGENT_RUNS_MAX_BATCH_IDS"])


class AgentRuns:
    """The Flask extension that mounts the Agent Runs API on an application."""

    def __init__(self, app: Flask | None = None, **kwargs: Any) -> None:
        if app is not None:
            self.init_app(app, **kwargs)

    def init_app(self, app: Flask, url_prefix: str | None = None) -> None:
        """Configure the database, the agents and the executor, and register the API."""
        for key, value in config_module.from_environment().items():
            app.config.setdefault(key, value)
        settings = {key: app.config[key] for key in config_module.DEFAULTS}
        configured_model = settings["AGENT_RUNS_DEFAULT_MODEL"]
        settings["AGENT_RUNS_DEFAULT_MODEL"] = config_module.default_model(configured_model)
        if not configured_model and settings["AGENT_RUNS_DEFAULT_MODEL"] == "scripted":
            # `agent-runs serve` has said so, with how to install it, once for all workers.
            if not os.environ.get("AGENT_RUNS_SERVE_ANNOUNCED"):
                logger.info(config_module.NO_EMBEDDED_MODEL)

        url = settings["AGENT_RUNS_DATABASE_URL"]
        open_database(url, settings["AGENT_RUNS_DB_POOL_SIZE"])
        # A wrong URL or a database out of reach is said now, in one line, not at the first
        # request.
        check_database(url)
        # What agents stored through the API (any organisation's admin writes them) may read
        # of the server's environment and where they may make it connect.
        stored_agent_policy = StoredAgentPolicy(
            environment=variable_allow_list(settings["AGENT_RUNS_AGENT_ENV_ALLOW"]),
            addresses=AddressPolicy(allow_private=settings["AGENT_RUNS_AGENT_ALLOW_PRIVATE"]),
        )
        webhook_policy = WebhookPolicy(
            allow_http=settings["AGENT_RUNS_WEBHOOK_ALLOW_HTTP"],
            allow_private=settings["AGENT_RUNS_WEBHOOK_ALLOW_PRIVATE"],
        )
        deliverer = WebhookDeliverer(
            DeliverySettings(
                policy=webhook_policy,
                timeout=settings["AGENT_RUNS_WEBHOOK_TIMEOUT"],
                retry_delay=settings["AGENT_RUNS_WEBHOOK_RETRY_DELAY"],
                max_retry_delay=settings["AGENT_RUNS_WEBHOOK_MAX_RETRY_DELAY"],
                retry_for=settings["AGENT_RUNS_WEBHOOK_RETRY_FOR"],
                poll_interval=settings["AGENT_RUNS_WEBHOOK_POLL_INTERVAL"],
                concurrency=settings["AGENT_RUNS_WEBHOOK_CONCURRENCY"],
                retention_days=settings["AGENT_RUNS_EVENT_RETENTION_DAYS"],
            )
        )
        # The run log first: a run's greenlet names the run in its lines from the start.
        observers: list[RunObserver] = [RunLog()]
        metrics = None
        if settings["AGENT_RUNS_METRICS"]:
            from .metrics import Metrics

            metrics = Metrics()
            observers.append(metrics)
        tracing = _tracing()
        if tracing is not None:
            observers.append(tracing)
        observer = Observers(observers)
        executor = Executor(
            ExecutorSettings(
                flush_interval=settings["AGENT_RUNS_EVENT_FLUSH_INTERVAL"],
                ping_interval=settings["AGENT_RUNS_PING_INTERVAL"],
                tool_timeout=settings["AGENT_RUNS_TOOL_TIMEOUT"],
                lease_seconds=settings["AGENT_RUNS_LEASE_SECONDS"],
                poll_interval=settings["AGENT_RUNS_POLL_INTERVAL"],
                max_background_runs=settings["AGENT_RUNS_MAX_BACKGROUND_RUNS"],
                shutdown_timeout=settings["AGENT_RUNS_SHUTDOWN_TIMEOUT"],
                retention_days=settings["AGENT_RUNS_EVENT_RETENTION_DAYS"],
                idempotency_ttl=settings["AGENT_RUNS_IDEMPOTENCY_TTL"],
                max_tool_result_chars=settings["AGENT_RUNS_TOOL_RESULT_MAX_CHARS"],
                mcp=McpSettings(
                    tools_ttl=settings["AGENT_RUNS_MCP_TOOLS_TTL"],
                    max_response_bytes=settings["AGENT_RUNS_MCP_MAX_RESPONSE_BYTES"],
                    # Listing a server's tools, which a run waits for before its first model
                    # call, may take as long as a tool call, up to ten seconds.
                    list_timeout=min(10.0, settings["AGENT_RUNS_TOOL_TIMEOUT"]),
                    addresses=stored_agent_policy.addresses,
                ),
            ),
            # The outbox's deliverer lives and stops with the worker's other services.
            services=[deliverer.run],
            watcher=watcher_for(url, settings["AGENT_RUNS_POLL_INTERVAL"]),
            observer=observer,
        )
        if settings["AGENT_RUNS_MIGRATE_ON_START"]:
            migrate()
            # Runs left RUNNING by a worker that died are failed before anyone reads them.
            with database.connection_context():
                sweep_expired_runs(observer)

        from .api.cors import cors_options

        registry = AgentRegistry.from_file(settings["AGENT_RUNS_AGENTS_FILE"])
        if settings["AGENT_RUNS_LOAD_MODELS_ON_START"]:
            _start_embedded_models(registry, settings["AGENT_RUNS_DEFAULT_MODEL"])
        app.extensions["agent_runs"] = AgentRunsState(
            config=settings,
            registry=registry,
            agents=AgentCatalog(
                registry, stored_agent_policy, default_model=settings["AGENT_RUNS_DEFAULT_MODEL"]
            ),
            executor=executor,
            rate_limiter=RateLimiter(settings["AGENT_RUNS_RATE_LIMIT"]),
            webhook_policy=webhook_policy,
            jwt=JWTSettings.from_config(settings),
            metrics=metrics,
            cors=cors_options(config_module.cors_origins(settings["AGENT_RUNS_CORS_ORIGINS"])),
        )

        from .api import bp
        from .cli import tokens

        prefix = settings["AGENT_RUNS_URL_PREFIX"] if url_prefix is None else url_prefix
        app.register_blueprint(bp, url_prefix=prefix.rstrip("/") or None)
        if "tokens" not in app.cli.commands:
            app.cli.add_command(tokens)


def _start_embedded_models(registry: AgentRegistry, default_model: str) -> None:
    """Have the model host load the agents' embedded models now, not on their first run."""
    models = registry.local_models(default_model)
    if not models:
        return
    from .providers.local import start_embedded_models

    def start() -> None:
        for name, outcome in start_embedded_models(models):
            # `agent-runs serve` has named a model that cannot run, once for all workers.
            if isinstance(outcome, str) and not os.environ.get("AGENT_RUNS_SERVE_ANNOUNCED"):
                logger.error("the local model %s cannot run: %s", name or "(default)", outcome)

    # In the background: a worker serves its other agents while the model loads.
    threading.Thread(target=start, name="agent-runs-model-start", daemon=True).start()


def _tracing() -> RunObserver | None:
    """Return the observer that traces runs, if the OTEL_* variables (or the host
    application's own tracer provider) ask for traces."""
    requested = config_module.otel_traces_requested()
    try:
        from .tracing import Tracing, tracer

        found = tracer(requested)
    except ImportError:
        if requested:
            logger.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set, but runs are not traced: install the "
                "otel extra (pip install 'agent-runs[otel]')"
            )
        return None
    return Tracing(found) if found is not None else None


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Create the standalone Agent Runs server."""
    from .errors import register_app_error_handlers

    # The package's name, as when this lived in its __init__: it names the app's logger and
    # roots its paths.
    app = Flask("agent_runs")
    app.config.update(config or {})
    settings = {**config_module.from_environment(), **app.config}
    logs.configure(settings["AGENT_RUNS_LOG_FORMAT"], settings["AGENT_RUNS_LOG_LEVEL"])
    register_app_error_handlers(app)
    AgentRuns(app)
    return app
