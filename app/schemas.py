"""marshmallow schemas: what the API accepts and what it answers.

Field names on the wire are camelCase as in the seed (``sessionId``, ``maxTokens``); Python
attributes are snake_case. Unknown fields are rejected, so a typo is a 422 that names it.
"""

from __future__ import annotations

import datetime
from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates,
)

# Identifiers clients may choose (session ids; also org and user ids): a UUID fits, as do the
# seed's "sess_xyz"-style ids. Nothing that needs escaping in a URL or a log line.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
ID_MESSAGE = (
    "Must be 1 to 128 characters: letters, digits and _ . : @ -, starting with a letter or digit."
)
MIME_PATTERN = r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$"


def _identifier(**kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Regexp(ID_PATTERN, error=ID_MESSAGE), **kwargs)


class UTCDateTime(fields.DateTime):
    """ISO 8601 in UTC with a ``Z``, as the seed shows: ``2026-05-06T10:00:00Z``."""

    def _serialize(self, value: datetime.datetime | None, attr: Any, obj: Any, **kwargs: Any):
        if value is None:
            return None
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class MediaSchema(StrictSchema):
    type = fields.String(
        required=True,
        validate=validate.Regexp(MIME_PATTERN, error="Must be a MIME type such as image/png."),
    )
    data = fields.String(required=True, validate=validate.Length(min=1))


class RunOptionsSchema(StrictSchema):
    model = fields.String(validate=validate.Length(min=1, max=200))
    temperature = fields.Float(validate=validate.Range(min=0, max=2))
    max_tokens = fields.Integer(
        data_key="maxTokens", strict=True, validate=validate.Range(min=1, max=1_000_000)
    )


class RunRequestSchema(StrictSchema):
    """The body of POST .../runs and .../runs/stream."""

    message = fields.String(required=True, validate=validate.Length(min=1))
    session_id = _identifier(data_key="sessionId")
    user_id = _identifier(data_key="userId")
    org_id = _identifier(data_key="orgId")
    generate_followups = fields.Boolean(data_key="generateFollowups", load_default=False)
    media = fields.List(fields.Nested(MediaSchema), load_default=list)
    options = fields.Nested(RunOptionsSchema, load_default=dict)

    def __init__(self, *, max_message_length: int = 32_000, max_media: int = 8, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_message_length = max_message_length
        self.max_media = max_media

    @validates("message")
    def _message_length(self, value: str, **kwargs: Any) -> None:
        if len(value) > self.max_message_length:
            raise ValidationError(
                f"Must be at most {self.max_message_length} characters (got {len(value)})."
            )

    @validates("media")
    def _media_count(self, value: list, **kwargs: Any) -> None:
        if len(value) > self.max_media:
            raise ValidationError(f"At most {self.max_media} items (got {len(value)}).")


class BatchStatusQuerySchema(StrictSchema):
    """The query of GET .../runs/status: ``runIds`` a comma-separated list."""

    run_ids = fields.String(required=True, data_key="runIds")

    def __init__(self, *, max_ids: int = 100, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_ids = max_ids

    @post_load
    def _split(self, data: dict, **kwargs: Any) -> dict:
        # Duplicates count once; order is kept so the answer follows the question.
        ids = list(dict.fromkeys(part.strip() for part in data["run_ids"].split(",")))
        ids = [run_id for run_id in ids if run_id]
        if not ids:
            raise ValidationError("Give at least one run id.", field_name="runIds")
        if len(ids) > self.max_ids:
            raise ValidationError(
                f"At most {self.max_ids} run ids per request (got {len(ids)}).",
                field_name="runIds",
            )
        return {"run_ids": ids}


# Responses ---------------------------------------------------------------------------------


class ToolSchema(Schema):
    name = fields.String()
    description = fields.String()
    parameters = fields.Dict()


class AgentSchema(Schema):
    id = fields.String()
    name = fields.String()
    description = fields.String()
    model = fields.String()
    tools = fields.List(fields.Nested(ToolSchema))


class UsageSchema(Schema):
    input_tokens = fields.Integer(data_key="inputTokens")
    output_tokens = fields.Integer(data_key="outputTokens")
    reasoning_tokens = fields.Integer(data_key="reasoningTokens")
    model_calls = fields.Integer(data_key="modelCalls")


class RunErrorSchema(Schema):
    type = fields.String()
    message = fields.String()


def _run_error(run: Any) -> dict | None:
    if run.error is None and run.error_type is None:
        return None
    return {"type": run.error_type or "error", "message": run.error or ""}


class AgentRunSchema(Schema):
    """A run as /status reports it."""

    id = fields.String()
    agent_id = fields.String(data_key="agentId")
    session_id = fields.Function(lambda run: run.session.uid, data_key="sessionId")
    user_id = fields.Function(lambda run: run.user_id or None, data_key="userId")
    org_id = fields.String(data_key="orgId")
    status = fields.String()
    model = fields.String()
    content = fields.String()
    usage = fields.Nested(UsageSchema, allow_none=True)
    error = fields.Function(_run_error)
    required_action = fields.Dict(data_key="requiredAction", allow_none=True)
    created_at = UTCDateTime(data_key="createdAt")
    started_at = UTCDateTime(data_key="startedAt", allow_none=True)
    completed_at = UTCDateTime(data_key="completedAt", allow_none=True)


class ToolCallSchema(Schema):
    name = fields.String()
    arguments = fields.Raw()
    result = fields.Raw()
    duration_ms = fields.Integer(data_key="durationMs")
    is_error = fields.Boolean(data_key="isError")


class RunResponseSchema(Schema):
    """The answer of the synchronous POST .../runs."""

    run_id = fields.String(attribute="id", data_key="runId")
    session_id = fields.Function(lambda run: run.session.uid, data_key="sessionId")
    status = fields.String()
    content = fields.String()
    reasoning_steps = fields.Function(
        lambda run: run.reasoning_steps or [], data_key="reasoningSteps"
    )
    tools = fields.Function(lambda run: ToolCallSchema(many=True).dump(run.tool_calls or []))
    followups = fields.Function(lambda run: run.followups or [])
    usage = fields.Nested(UsageSchema, allow_none=True)
    error = fields.Function(_run_error)
    metadata = fields.Function(lambda run: {"model": run.model})
