"""marshmallow schemas: what the API accepts and what it answers.

Field names on the wire are camelCase as in the seed (``sessionId``, ``maxTokens``); Python
attributes are snake_case. Unknown fields are rejected, so a typo is a 422 that names it.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
import urllib.parse
from typing import Any
from urllib.parse import urlsplit

import jsonschema
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    missing,
    post_dump,
    post_load,
    validate,
    validates,
    validates_schema,
)

from .models import RunStatus

# Identifiers clients may choose (session ids; also org and user ids): a UUID fits, as do the
# seed's "sess_xyz"-style ids. Nothing that needs escaping in a URL or a log line.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
ID_MESSAGE = (
    "Must be 1 to 128 characters: letters, digits and _ . : @ -, starting with a letter or digit."
)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
MIME_PATTERN = r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$"
# The largest event id a client may resume after: event ids are 64-bit integers in the log.
MAX_EVENT_ID = 2**63 - 1


class FullMatch(validate.Validator):
    """A pattern the whole value must match, as patterns mean in JSON Schema.

    marshmallow's ``Regexp`` searches with ``re.match``, where ``$`` also matches before a final
    newline: ``^a$`` accepts "a\n", which the OpenAPI document's pattern (ECMA-262) refuses.
    The OpenAPI document shows ``regex`` as the field's pattern.
    """

    def __init__(self, regex: str, *, error: str) -> None:
        self.regex = re.compile(regex)
        self.message = error

    def __call__(self, value: str) -> str:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self.message)
        return value


def text(value: str) -> None:
    """Refuse text no database can store: unpaired surrogates (JSON "\\ud800"), NUL."""
    if "\x00" in value:
        raise ValidationError("Must not contain NUL (\\u0000) characters.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(
            "Must be valid Unicode text: a surrogate (\\ud800-\\udfff) must be half of a pair."
        ) from None


def _identifier(**kwargs: Any) -> fields.String:
    return fields.String(validate=FullMatch(ID_PATTERN, error=ID_MESSAGE), **kwargs)


class UTCDateTime(fields.DateTime):
    """ISO 8601 in UTC with a ``Z``, as the seed shows: ``2026-05-06T10:00:00Z``."""

    def _serialize(self, value: datetime.datetime | None, attr: Any, obj: Any, **kwargs: Any):
        return utc_timestamp(value)


def utc_timestamp(value: datetime.datetime | str | None) -> str | None:
    """A stored (naive, UTC) time as the API writes it: ``2026-05-06T10:00:00Z``.

    Besides a datetime, takes the text SQLite stores one as (``2026-05-06 10:00:00.123456``),
    so batch status can skip parsing a hundred runs' times only to print them again.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value[10:11] == " " and (
            len(value) == 19 or (len(value) == 26 and value[19] == "." and value[20:].isdigit())
        ):
            return f"{value[:10]}T{value[11:19]}Z"
        try:
            # Any other ISO 8601 form (written by another tool, say); Python 3.10's parser
            # does not take a "Z" for UTC.
            parsed = datetime.datetime.fromisoformat(value.removesuffix("Z"))
        except ValueError:
            return value  # not a time at all: shown as stored rather than failing the request
        value = parsed
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value.isoformat(timespec="seconds") + "Z"


class _Derived:
    """Mixin: the field's value is ``compute(obj)``, not an attribute of the dumped object.

    Unlike ``fields.Function``, the field keeps its type (string, list, nested schema), so the
    OpenAPI document generated from the schema says what the value is.
    """

    def __init__(self, *args: Any, compute: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compute = compute

    def get_value(self, obj: Any, attr: str, accessor: Any = None, default: Any = missing) -> Any:
        return self.compute(obj)


class DerivedString(_Derived, fields.String):
    pass


class DerivedList(_Derived, fields.List):
    pass


class DerivedNested(_Derived, fields.Nested):
    pass


class DerivedBoolean(_Derived, fields.Boolean):
    pass


def _document(field: fields.Field, **properties: Any) -> None:
    """Add JSON Schema properties to what the OpenAPI document says of a schema's field."""
    field.metadata = {**field.metadata, **properties}


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class MediaSchema(StrictSchema):
    """An image for the model: base64 data, or an http(s) URL handed to the model as is."""

    type = fields.String(
        required=True,
        validate=[
            FullMatch(MIME_PATTERN, error="Must be a MIME type such as image/png."),
            validate.OneOf(
                IMAGE_TYPES, error="Only images can be sent: " + ", ".join(IMAGE_TYPES) + "."
            ),
        ],
    )
    data = fields.String(required=True, validate=[validate.Length(min=1), text])

    @validates("data")
    def _base64_or_url(self, value: str, **kwargs: Any) -> None:
        if value.startswith(("http://", "https://")):
            if len(value) > 4096 or not urlsplit(value).netloc:
                raise ValidationError("Must be base64 data or an http(s) URL.")
            return
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("Must be base64 data or an http(s) URL.") from None


# An MCP server's name prefixes its tools' names ("crm" -> "crm__lookup_order"): no "__" and
# no trailing "_" in it, so the first "__" of a tool's name always ends the server's name.
MCP_SERVER_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9]*(?:[-_][A-Za-z0-9]+)*$"
# A header's name is an HTTP token; its value a line of visible text.
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$"


def _header_value(value: str) -> None:
    if any(ord(char) < 0x20 and char != "\t" or ord(char) == 0x7F for char in value):
        raise ValidationError("Must be one line of text: no control characters.")


def header_map(**kwargs: Any) -> fields.Dict:
    """HTTP headers as a mapping of names to one-line values."""
    return fields.Dict(
        keys=fields.String(validate=FullMatch(HEADER_NAME_PATTERN, error="Not a header name.")),
        values=fields.String(validate=[validate.Length(max=8192), _header_value]),
        **kwargs,
    )


# The largest response schema a run or an agent may give, as JSON text.
MAX_RESPONSE_SCHEMA_BYTES = 64 * 1024


def _pointer_target(root: Any, reference: str) -> bool:
    """Whether a local ``$ref`` ("#" or "#/a/b") points at something in ``root``."""
    if reference == "#":
        return True
    if not reference.startswith("#/"):
        return False
    target = root
    for part in reference[2:].split("/"):
        part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return False
    return True


def _references(node: Any) -> list[str]:
    """Every ``$ref`` in a schema, nested ones included."""
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("$ref"), str):
                found.append(item["$ref"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def json_schema_problem(schema: Any) -> str | None:
    """Say why ``schema`` cannot be a response schema, or return None if it can.

    It must be a JSON Schema (draft 2020-12 unless its ``$schema`` names another) as an object,
    of bounded size, whose ``$ref``s all point inside it: nothing is ever fetched.
    """
    if not isinstance(schema, dict):
        return "Must be a JSON Schema object."
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError):
        return "Must be a JSON Schema object (JSON, not nested too deeply)."
    if size > MAX_RESPONSE_SCHEMA_BYTES:
        return f"Must be at most {MAX_RESPONSE_SCHEMA_BYTES} bytes as JSON (got {size})."
    try:
        validator = jsonschema.validators.validator_for(
            schema, default=jsonschema.Draft202012Validator
        )
        validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/".join(str(part) for part in error.absolute_path)
        return f"Not a valid JSON Schema: {error.message}" + (f" (at {where})" if where else "")
    except RecursionError:
        return "Not a valid JSON Schema: nested too deeply."
    for reference in _references(schema):
        if not _pointer_target(schema, reference):
            return (
                f"$ref {reference[:200]!r} does not point inside the schema: only local "
                "references (#/$defs/...) are followed."
            )
    return None


class ResponseFormatSchema(StrictSchema):
    """What the final answer must be: JSON valid against a JSON Schema, or plain text.

    ``{"type": "text"}`` turns an agent's default response format off for one run.
    """

    type = fields.String(required=True, validate=validate.OneOf(["json_schema", "text"]))
    schema = fields.Dict(metadata={"description": "A JSON Schema (2020-12 by default)."})

    @validates_schema
    def _schema_fits_type(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("type") == "json_schema":
            if "schema" not in data:
                raise ValidationError("Give the JSON Schema the answer must fit.", "schema")
            problem = json_schema_problem(data["schema"])
            if problem:
                raise ValidationError(problem, "schema")
        elif "schema" in data:
            raise ValidationError("Only for type json_schema.", "schema")


class RunOptionsSchema(StrictSchema):
    model = fields.String(validate=[validate.Length(min=1, max=200), text])
    temperature = fields.Float(validate=validate.Range(min=0, max=2))
    max_tokens = fields.Integer(
        data_key="maxTokens", strict=True, validate=validate.Range(min=1, max=1_000_000)
    )
    # What a dropped /runs/stream connection means: the run goes on (default) or is cancelled.
    on_disconnect = fields.String(
        data_key="onDisconnect", validate=validate.OneOf(["continue", "cancel"])
    )
    # Headers for the agent's MCP servers, by server name, sent with this run's calls only,
    # so that each end user calls the tools as themselves. Never stored.
    mcp_headers = fields.Dict(
        data_key="mcpHeaders",
        keys=fields.String(validate=FullMatch(MCP_SERVER_NAME_PATTERN, error="Not a server name.")),
        values=header_map(validate=validate.Length(max=64)),
        validate=validate.Length(max=32),
    )
    # The answer as JSON valid against a schema; overrides the agent's response_format.
    response_format = fields.Nested(ResponseFormatSchema, data_key="responseFormat")


class RunRequestSchema(StrictSchema):
    """The body of POST .../runs and .../runs/stream."""

    message = fields.String(required=True, validate=[validate.Length(min=1), text])
    session_id = _identifier(data_key="sessionId")
    user_id = _identifier(data_key="userId")
    org_id = _identifier(data_key="orgId")
    generate_followups = fields.Boolean(data_key="generateFollowups", load_default=False)
    media = fields.List(fields.Nested(MediaSchema), load_default=list)
    options = fields.Nested(RunOptionsSchema, load_default=dict)

    def __init__(
        self,
        *,
        max_message_length: int = 32_000,
        max_media: int = 8,
        max_media_bytes: int = 10 * 1024 * 1024,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.max_message_length = max_message_length
        self.max_media = max_media
        self.max_media_bytes = max_media_bytes
        # The validators below enforce these limits; the OpenAPI document, generated from this
        # instance's fields, shows them.
        _document(self.fields["message"], maxLength=max_message_length)
        _document(self.fields["media"], maxItems=max_media)

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
        for item in value:
            data = item.get("data") or ""
            # Base64 carries three bytes in four characters.
            if not data.startswith(("http://", "https://")) and len(data) * 3 // 4 > (
                self.max_media_bytes
            ):
                raise ValidationError(f"Each image may be at most {self.max_media_bytes} bytes.")


class ContinueRequestSchema(StrictSchema):
    """The body of POST .../runs/{runId}/continue for a PAUSED run."""

    action = fields.String(required=True, validate=validate.OneOf(["APPROVE", "REJECT"]))
    # The run's MCP headers again, which were never stored: for the calls still to come.
    options = fields.Nested(lambda: ContinueOptionsSchema(), load_default=dict)


class ContinueOptionsSchema(StrictSchema):
    mcp_headers = RunOptionsSchema().fields["mcp_headers"]


class EventsQuerySchema(StrictSchema):
    """The query of GET .../runs/{runId}/events: resume after the event with seq ``after``."""

    after = fields.Integer(validate=validate.Range(min=0, max=MAX_EVENT_ID))


class BatchStatusQuerySchema(StrictSchema):
    """The query of GET .../runs/status: ``runIds`` a comma-separated list."""

    run_ids = fields.String(required=True, data_key="runIds")

    def __init__(self, *, max_ids: int = 100, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_ids = max_ids
        _document(
            self.fields["run_ids"],
            description=f"Comma-separated run ids, at most {max_ids}; unknown ids are left out.",
        )

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


# Agent definitions -------------------------------------------------------------------------
#
# One schema for an agent definition wherever it comes from: the agents file (snake_case keys,
# as written there) and the API that stores an organisation's own agents.

AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# A ${NAME} reference to an environment variable of the server, expanded when a tool is called
# and never before, so a definition never holds the secret itself.
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]{0,127})\}")
# Header, variable and query names that carry credentials.
_SECRET_NAME = re.compile(
    r"auth|token|key|secret|passw|cookie|credential|session|signature", re.IGNORECASE
)
# What an authentication scheme looks like before its credentials ("Bearer ${TOKEN}").
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9._~+-]{0,31}$")
# Opaque credentials written out: well-known prefixes, JWTs, long unbroken runs of base64.
_SECRET_VALUE = re.compile(
    r"\b(?:sk|pk|rk|ghp|gho|ghs|github_pat|xox[abpr]|glpat)[-_][A-Za-z0-9_-]{8,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|[A-Za-z0-9+/_=-]{32,}"
)


def _written_secret(name: str, value: str) -> bool:
    """Whether ``value`` holds a credential as text rather than as a ${NAME} reference.

    A value under a credential's name (Authorization, X-Api-Key, GITHUB_TOKEN) may hold
    references and at most a scheme word ("Bearer"); any value may not hold what looks like
    a token.
    """
    literal = ENV_REFERENCE.sub(" ", value).strip()
    if _SECRET_VALUE.search(literal):
        return True
    if not _SECRET_NAME.search(name) or not literal:
        return False
    return not (ENV_REFERENCE.search(value) and _SCHEME.match(literal))


def _no_written_secrets(kind: str, example: str):
    def check(values: dict[str, str]) -> None:
        written = {
            name: [
                f"Holds a secret written out; write it as a ${{NAME}} reference to a variable "
                f"of the server's environment ({example}), never the {kind} itself."
            ]
            for name, value in values.items()
            if _written_secret(name, value)
        }
        if written:
            raise ValidationError(written)

    return check


def _url_without_secrets(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("Must be an http(s) URL.")
    if parts.password is not None:
        raise ValidationError(
            "Holds a password written out; pass credentials in headers, as ${NAME} references."
        )
    for pair in parts.query.split("&"):
        name, _, written = pair.partition("=")
        if written and _written_secret(name, written):
            raise ValidationError(
                f"Query parameter {name!r} holds a secret written out; write it as a ${{NAME}} "
                "reference to a variable of the server's environment."
            )


class McpServerSchema(StrictSchema):
    """An MCP server whose tools an agent may call: over streamable HTTP, or a local command."""

    name = fields.String(
        required=True,
        validate=[
            validate.Length(max=32),
            FullMatch(
                MCP_SERVER_NAME_PATTERN,
                error="Must be 1-32 letters and digits, single - or _ between them, "
                "starting with a letter (it prefixes the names of the server's tools).",
            ),
        ],
    )
    url = fields.String(validate=[validate.Length(max=2048), text, _url_without_secrets])
    headers = header_map(
        validate=_no_written_secrets("credential", "Authorization: 'Bearer ${CRM_TOKEN}'")
    )
    command = fields.String(validate=[validate.Length(min=1, max=4096), text])
    args = fields.List(fields.String(validate=[validate.Length(max=4096), text]))
    env = fields.Dict(
        keys=fields.String(
            validate=FullMatch(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", error="Not a variable name.")
        ),
        values=fields.String(validate=[validate.Length(max=8192), text]),
        validate=_no_written_secrets("credential", "GITHUB_TOKEN: '${GITHUB_TOKEN}'"),
    )
    # The server's tools the agent gets (all of them when absent), and those that pause the
    # run for a human's approval before each call, by the names the server gives them.
    tools = fields.List(fields.String(validate=validate.Length(min=1, max=128)))
    requires_approval = fields.List(fields.String(validate=validate.Length(min=1, max=128)))
    # Seconds one call may take; the server's AGENT_RUNS_TOOL_TIMEOUT when absent.
    timeout = fields.Float(validate=validate.Range(min=0, min_inclusive=False, max=3600))

    @validates_schema
    def _one_transport(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("url" in data) == ("command" in data):
            raise ValidationError(
                "Give either url (streamable HTTP) or command (a local process over stdio).",
                field_name="url" if "url" not in data else "command",
            )
        kind, keys = (
            ("run as a command", ("args", "env")) if "url" in data else ("at a url", ("headers",))
        )
        for key in keys:
            if key in data:
                raise ValidationError(f"Only for an MCP server {kind}.", field_name=key)
        offered = data.get("tools")
        for name in data.get("requires_approval") or ():
            if offered is not None and name not in offered:
                raise ValidationError(
                    f"{name!r} is not in this server's tools list, so it is never offered.",
                    field_name="requires_approval",
                )


def _unique_server_names(servers: list[dict[str, Any]]) -> None:
    names = [server["name"] for server in servers]
    for name in names:
        if names.count(name) > 1:
            raise ValidationError(f"Two MCP servers are named {name!r}.")


class ToolEntryField(fields.Field):
    """A Python tool of an agent: a registered name or ``module:function`` path, or a mapping
    of one (``use``) with settings: ``{use: "mod:fn", requires_approval: true, timeout: 5}``.
    """

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str) and 0 < len(value) <= 300:
            return value
        if isinstance(value, dict):
            return ToolSettingsSchema().load(value)
        raise ValidationError("A tool is a name, a 'module:function' path, or {use: ...}.")


class ToolSettingsSchema(StrictSchema):
    use = fields.String(required=True, validate=validate.Length(min=1, max=300))
    requires_approval = fields.Boolean()
    timeout = fields.Float(validate=validate.Range(min=0, min_inclusive=False, max=3600))


class AgentDefinitionSchema(StrictSchema):
    """An agent as its definition is written: in the agents file, or sent to the API."""

    id = fields.String(
        required=True,
        validate=FullMatch(
            AGENT_ID_PATTERN,
            error="Must be 1-128 letters, digits, _ . or -, starting with a letter or digit.",
        ),
    )
    name = fields.String(allow_none=True, validate=[validate.Length(max=200), text])
    description = fields.String(allow_none=True, validate=text)
    instructions = fields.String(allow_none=True, validate=text)
    model = fields.String(allow_none=True, validate=[validate.Length(min=1, max=200), text])
    allowed_models = fields.List(fields.String(validate=validate.Length(min=1, max=200)))
    tools = fields.List(ToolEntryField())
    max_steps = fields.Integer(strict=True, validate=validate.Range(min=1, max=1000))
    model_options = fields.Dict(keys=fields.String())
    explain_tool_calls = fields.Boolean()
    context_tokens = fields.Integer(strict=True, validate=validate.Range(min=256))
    mcp_servers = fields.List(fields.Nested(McpServerSchema), validate=_unique_server_names)
    # The answer runs give unless they ask otherwise (options.responseFormat).
    response_format = fields.Nested(ResponseFormatSchema)


def field_messages(errors: Any, prefix: str = "") -> list[tuple[str, str]]:
    """List (dotted field path, first message) for a marshmallow error dictionary."""
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        errors = errors[0]  # a field's validator that named the keys at fault
    if not isinstance(errors, dict):
        messages = errors if isinstance(errors, list) else [errors]
        first = messages[0] if messages else "invalid"
        return [(prefix or "body", str(first))]
    found = []
    for key, value in sorted(errors.items(), key=lambda item: str(item[0])):
        found.extend(field_messages(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


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
    # "server": the agents file's or Python's, read-only; "organisation": stored through the
    # API by the caller's organisation, at ``version``.
    source = fields.String(metadata={"enum": ["server", "organisation"]})
    version = fields.Integer(allow_none=True)


class AgentDetailSchema(AgentSchema):
    """One agent; an organisation's own comes with its stored definition."""

    definition = fields.Dict(allow_none=True)


class AgentVersionSchema(Schema):
    """One stored version of an organisation's agent; a deletion has no definition."""

    version = fields.Integer()
    definition = fields.Dict(allow_none=True)
    deleted = DerivedBoolean(compute=lambda row: row.definition is None)
    created_at = UTCDateTime(data_key="createdAt")
    created_by = DerivedString(
        compute=lambda row: row.created_by or None, data_key="createdBy", allow_none=True
    )


class UsageSchema(Schema):
    input_tokens = fields.Integer(data_key="inputTokens")
    output_tokens = fields.Integer(data_key="outputTokens")
    reasoning_tokens = fields.Integer(data_key="reasoningTokens")
    model_calls = fields.Integer(data_key="modelCalls")


class RunErrorSchema(Schema):
    type = fields.String()
    message = fields.String()


class RunMetadataSchema(Schema):
    model = fields.String()
    # Only for a run of an organisation's own agent: the version it ran.
    agent_version = fields.Integer(data_key="agentVersion")


def _run_metadata(run: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"model": run.model}
    if run.agent_version is not None:
        metadata["agent_version"] = run.agent_version
    return metadata


def _run_error(run: Any) -> dict | None:
    if run.error is None and run.error_type is None:
        return None
    return {"type": run.error_type or "error", "message": run.error or ""}


def _run_status(**kwargs: Any) -> fields.String:
    return fields.String(metadata={"enum": list(RunStatus.ALL)}, **kwargs)


class AgentRunSchema(Schema):
    """A run as /status reports it; dumps the rows of ``runtime.runs.status_rows``."""

    id = fields.String()
    agent_id = fields.String(data_key="agentId")
    session_id = fields.String(data_key="sessionId")
    user_id = fields.String(data_key="userId", allow_none=True)
    org_id = fields.String(data_key="orgId")
    status = _run_status()
    model = fields.String()
    # The version of an organisation's own agent the run ran; null for the file's agents.
    agent_version = fields.Integer(data_key="agentVersion", allow_none=True)
    content = fields.String()
    # The answer parsed, for a run asked for structured output; else null.
    output = fields.Raw(allow_none=True)
    usage = fields.Nested(UsageSchema, allow_none=True)
    error = fields.Nested(RunErrorSchema, allow_none=True)
    required_action = fields.Dict(data_key="requiredAction", allow_none=True)
    created_at = UTCDateTime(data_key="createdAt")
    started_at = UTCDateTime(data_key="startedAt", allow_none=True)
    completed_at = UTCDateTime(data_key="completedAt", allow_none=True)


_USAGE_KEYS = tuple(
    (field.attribute or name, field.data_key or name)
    for name, field in UsageSchema._declared_fields.items()
)


def run_status_views(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``AgentRunSchema(many=True).dump(rows)``, built directly.

    Batch status answers for up to 100 runs and clients poll it: marshmallow's dump, field by
    field, cost more than the rest of the request. AgentRunSchema stays the contract (the
    OpenAPI document comes from it); tests/test_schemas.py holds the two equal.
    """
    return [
        {
            "id": row["id"],
            "agentId": row["agent_id"],
            "sessionId": row["session_id"],
            "userId": row["user_id"],
            "orgId": row["org_id"],
            "status": row["status"],
            "model": row["model"],
            "agentVersion": row["agent_version"],
            "content": row["content"],
            "output": row["output"],
            "usage": None
            if (usage := row["usage"]) is None
            else {key: usage[attr] for attr, key in _USAGE_KEYS if attr in usage},
            "error": row["error"],  # a {type, message} dict, shaped by runtime.runs._status_row
            "requiredAction": row["required_action"],
            "createdAt": utc_timestamp(row["created_at"]),
            "startedAt": utc_timestamp(row["started_at"]),
            "completedAt": utc_timestamp(row["completed_at"]),
        }
        for row in rows
    ]


class ToolCallSchema(Schema):
    name = fields.String()
    arguments = fields.Raw()
    result = fields.Raw()
    duration_ms = fields.Integer(data_key="durationMs")
    is_error = fields.Boolean(data_key="isError")


class QueuedRunSchema(Schema):
    """The 202 answer of POST .../runs/background."""

    run_id = fields.String(attribute="id", data_key="runId")
    session_id = DerivedString(compute=lambda run: run.session.uid, data_key="sessionId")
    status = _run_status()


class StreamTokenSchema(Schema):
    """The answer of POST .../runs/{runId}/events/token: a read-only token for one run's
    events, and the URL to read them with it (a browser's EventSource)."""

    token = fields.String(
        metadata={"description": "Pass as access_token; valid for this run's events only."}
    )
    expires_at = UTCDateTime(data_key="expiresAt")
    url = fields.String(
        metadata={
            "description": "The run's /events with the token, as a path from the server's "
            "origin: what a page of the server opens with EventSource as is."
        }
    )


class RunResponseSchema(Schema):
    """The answer of the synchronous POST .../runs."""

    run_id = fields.String(attribute="id", data_key="runId")
    session_id = DerivedString(compute=lambda run: run.session.uid, data_key="sessionId")
    status = _run_status()
    content = fields.String()
    # The answer parsed, for a run asked for structured output (options.responseFormat).
    output = fields.Raw(allow_none=True)
    reasoning_steps = DerivedList(
        fields.String(), compute=lambda run: run.reasoning_steps or [], data_key="reasoningSteps"
    )
    tools = DerivedList(fields.Nested(ToolCallSchema), compute=lambda run: run.tool_calls or [])
    followups = DerivedList(fields.String(), compute=lambda run: run.followups or [])
    usage = fields.Nested(UsageSchema, allow_none=True)
    error = DerivedNested(RunErrorSchema, compute=_run_error, allow_none=True)
    metadata = DerivedNested(RunMetadataSchema, compute=_run_metadata)
    # What a PAUSED run waits for: the tool call to APPROVE or REJECT.
    required_action = fields.Dict(data_key="requiredAction", allow_none=True)


# Sessions ----------------------------------------------------------------------------------


class CursorField(fields.String):
    """An opaque page cursor: the sort key of the last item served, base64url-encoded JSON.

    It loads to ``(timestamp, key)``, the position the next page starts after; ``key`` is the
    item's id, of type ``key_type``. Only the server makes cursors, so anything else is a 422.
    """

    def __init__(self, *, key_type: type = int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_type = key_type

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> str | None:
        if value is None:
            return None
        timestamp, key = value
        raw = json.dumps([timestamp.isoformat(), key], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any):
        error = ValidationError("Not a cursor this server gave out; pass nextCursor as is.")
        if not isinstance(value, str) or not value or len(value) > 512:
            raise error
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            timestamp, key = json.loads(raw)
            position = datetime.datetime.fromisoformat(timestamp)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise error from None
        if type(key) is not self.key_type or position.tzinfo is not None:
            raise error
        # The key goes into a query: an integer the database holds, text it can store.
        if isinstance(key, int) and not -(2**63) <= key < 2**63:
            raise error
        if isinstance(key, str):
            try:
                text(key)
            except ValidationError:
                raise error from None
        return position, key


def _user_filter(**kwargs: Any) -> fields.String:
    # An identifier picks that user's sessions; an empty value picks the sessions not bound to
    # any user (userId null on the wire), which an identifier cannot name.
    return fields.String(
        validate=FullMatch(
            "^$|" + ID_PATTERN, error=ID_MESSAGE + " Or empty for sessions without a user."
        ),
        **kwargs,
    )


class SessionQuerySchema(StrictSchema):
    """The query of GET, DELETE /sessions/{sessionId}: ``userId`` picks among several users."""

    user_id = _user_filter(data_key="userId")


class SessionListQuerySchema(SessionQuerySchema):
    """The query of GET /sessions: filters and a page of at most ``limit`` sessions."""

    agent_id = fields.String(data_key="agentId", validate=validate.Length(min=1, max=128))
    limit = fields.Integer(validate=validate.Range(min=1, max=100), load_default=20)
    cursor = CursorField(key_type=int)


class SessionRunsQuerySchema(SessionQuerySchema):
    """The query of GET /sessions/{sessionId}/runs: a page of at most ``limit`` runs."""

    limit = fields.Integer(validate=validate.Range(min=1, max=100), load_default=20)
    cursor = CursorField(key_type=str)


class RunListQuerySchema(StrictSchema):
    """The query of GET /runs: filters, and a page of at most ``limit`` runs, newest first."""

    agent_id = fields.String(data_key="agentId", validate=validate.Length(min=1, max=128))
    # One status, or several separated by commas.
    status = fields.String(
        metadata={
            "description": "A run status, or several separated by commas: "
            + ", ".join(RunStatus.ALL)
            + "."
        }
    )
    session_id = _identifier(data_key="sessionId")
    since = fields.AwareDateTime(
        default_timezone=datetime.timezone.utc,
        metadata={
            "description": "Only runs created at or after this time (ISO 8601; UTC "
            "unless it has an offset)."
        },
    )
    limit = fields.Integer(validate=validate.Range(min=1, max=100), load_default=20)
    cursor = CursorField(key_type=str)

    @validates("status")
    def _known_statuses(self, value: str, **kwargs: Any) -> None:
        unknown = [part for part in value.split(",") if part.strip() not in RunStatus.ALL]
        if unknown:
            raise ValidationError(
                f"Unknown status {unknown[0].strip()!r}; one of {', '.join(RunStatus.ALL)}."
            )

    @post_load
    def _normalise(self, data: dict, **kwargs: Any) -> dict:
        if "status" in data:
            data["status"] = list(dict.fromkeys(p.strip() for p in data["status"].split(",")))
        if "since" in data:
            data["since"] = data["since"].astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return data


class RunPageSchema(Schema):
    """A page of runs, newest first; ``nextCursor`` is null on the last page."""

    items = fields.List(fields.Nested(AgentRunSchema))
    next_cursor = CursorField(key_type=str, data_key="nextCursor", allow_none=True)


class SessionSchema(Schema):
    """A session as /sessions lists it."""

    id = fields.String(attribute="uid")
    agent_id = fields.String(data_key="agentId")
    user_id = DerivedString(
        compute=lambda session: session.user_id or None, data_key="userId", allow_none=True
    )
    org_id = fields.String(data_key="orgId")
    created_at = UTCDateTime(data_key="createdAt")
    updated_at = UTCDateTime(data_key="updatedAt")
    active_run_id = fields.String(data_key="activeRunId", allow_none=True)


class MessageSchema(Schema):
    """One message of a session; the tool fields appear only on messages that have them."""

    OPTIONAL = ("toolCalls", "toolCallId", "name")

    role = fields.String()
    content = fields.String()
    tool_calls = fields.Raw(data_key="toolCalls")
    tool_call_id = fields.String(data_key="toolCallId")
    name = fields.String()
    run_id = fields.String(data_key="runId", allow_none=True)
    created_at = UTCDateTime(data_key="createdAt")

    @post_dump
    def _drop_absent(self, data: dict, **kwargs: Any) -> dict:
        return {k: v for k, v in data.items() if v is not None or k not in self.OPTIONAL}


class SessionDetailSchema(SessionSchema):
    """GET /sessions/{sessionId}: the session and its conversation, oldest message first."""

    messages = fields.List(fields.Nested(MessageSchema))


class SessionPageSchema(Schema):
    """A page of sessions; ``nextCursor`` is null on the last page."""

    items = fields.List(fields.Nested(SessionSchema))
    next_cursor = CursorField(data_key="nextCursor", allow_none=True)


class SessionRunsPageSchema(Schema):
    """A page of a session's runs, oldest first; ``nextCursor`` is null on the last page."""

    items = fields.List(fields.Nested(AgentRunSchema))
    next_cursor = CursorField(key_type=str, data_key="nextCursor", allow_none=True)


# Webhooks ----------------------------------------------------------------------------------

# The events of runtime.outbox.EVENT_OF_STATUS.
WEBHOOK_EVENTS = ("run.completed", "run.failed", "run.cancelled", "run.paused")


class WebhookRequestSchema(StrictSchema):
    """The body of POST /webhooks: where to send which events (all four if none are named)."""

    url = fields.String(required=True, validate=[validate.Length(min=1, max=2048), text])
    events = fields.List(
        fields.String(validate=validate.OneOf(WEBHOOK_EVENTS)),
        load_default=lambda: list(WEBHOOK_EVENTS),
        validate=validate.Length(min=1, max=len(WEBHOOK_EVENTS)),
    )


class WebhookSchema(Schema):
    """A registered webhook, as listed: never its secret."""

    id = fields.String()
    url = fields.String()
    events = fields.List(fields.String(validate=validate.OneOf(WEBHOOK_EVENTS)))
    created_at = UTCDateTime(data_key="createdAt")


class NewWebhookSchema(WebhookSchema):
    """The answer of POST /webhooks: the webhook with its signing secret, shown this once."""

    secret = fields.String(
        metadata={"description": "Standard Webhooks signing secret: whsec_ and base64."}
    )


# Documents ---------------------------------------------------------------------------------


class ProblemSchema(Schema):
    """An error: RFC 9457 problem details, as application/problem+json (see errors.py)."""

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    # 422 only: what is wrong with each field, by field name (nested for nested fields).
    errors = fields.Dict(keys=fields.String())


class AgentStreamEventSchema(Schema):
    """One event of a run's stream: the JSON object on its ``data:`` line."""

    # runtime.events.EventType.ALL
    event = fields.String(
        required=True,
        validate=validate.OneOf(
            ["START", "REASONING_DELTA", "CONTENT_DELTA", "TOOL_START", "TOOL_END", "STOP", "ERROR"]
        ),
    )
    # Text for the deltas; a JSON document for START, TOOL_START, TOOL_END and STOP (or "").
    data = fields.String(required=True)
    # Unix epoch milliseconds.
    timestamp = fields.Integer(required=True)
