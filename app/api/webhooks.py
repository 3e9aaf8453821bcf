"""Webhooks: an organisation's endpoints told of its runs' ends. Admin tokens only."""

from __future__ import annotations

from typing import Any

from flask import current_app, g

from ..auth import require_scope
from ..runtime.webhooks import delete_webhook, get_webhook, list_webhooks, register_webhook
from ..schemas import NewWebhookSchema, WebhookRequestSchema, WebhookSchema
from . import bp
from .runs import _json_body


@bp.post("/webhooks")
def create_webhook() -> Any:
    """Register an endpoint; the answer carries its signing secret, this once."""
    require_scope(g.principal, "admin")
    body = WebhookRequestSchema().load(_json_body())
    policy = current_app.extensions["agent_runs"].webhook_policy
    webhook = register_webhook(g.principal.org_id, body["url"], body["events"], policy)
    return NewWebhookSchema().dump(webhook), 201


@bp.get("/webhooks")
def webhooks() -> Any:
    """List the organisation's webhooks, oldest first."""
    require_scope(g.principal, "admin")
    return WebhookSchema(many=True).dump(list_webhooks(g.principal.org_id))


@bp.get("/webhooks/<webhook_id>")
def webhook_detail(webhook_id: str) -> Any:
    require_scope(g.principal, "admin")
    return WebhookSchema().dump(get_webhook(g.principal.org_id, webhook_id))


@bp.delete("/webhooks/<webhook_id>")
def remove_webhook(webhook_id: str) -> Any:
    """Delete a webhook, and the deliveries it still had to get."""
    require_scope(g.principal, "admin")
    delete_webhook(g.principal.org_id, webhook_id)
    return "", 204
