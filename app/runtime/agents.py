"""Agent definitions and their tools, from a YAML/JSON file or registered from Python.

An agent is a model, instructions and tools. A tool is a plain Python function with a JSON
schema for its arguments; :func:`tool` derives the schema from the function's signature when
none is given.

    import agent_runs

    @agent_runs.tool
    def get_weather(city: str) -> str:
        "Return today's weather for a city."
        ...

    agent_runs.register_agent("weather", instructions="Answer weather questions.",
                              tools=[get_weather])
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from marshmallow import ValidationError

from ..providers.base import PROVIDERS, ToolSpec
from ..providers.local import model_path
from ..schemas import AGENT_ID_PATTERN as _AGENT_ID
from ..schemas import (
    ENV_REFERENCE,
    AgentDefinitionSchema,
    McpServerSchema,
    ResponseFormatSchema,
    field_messages,
)
from .addresses import AddressPolicy

AGENT_ID_PATTERN = re.compile(_AGENT_ID)
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_JSON_TYPES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
}


class AgentDefinitionError(ValueError):
    """An agent or tool definition that cannot be used.

    ``errors`` says what is wrong with each field, as marshmallow does: ``{"tools": {0:
    ["unknown tool 'x' ..."]}}``; empty when the error is about no field in particular.
    """

    def __init__(self, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or {}


@dataclass(frozen=True)
class Tool:
    """A function an agent may call, described to the model by a JSON schema."""

    name: str
    function: Callable[..., Any]
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    # Seconds the call may take; None uses the server's AGENT_RUNS_TOOL_TIMEOUT.
    timeout: float | None = None
    # Pause the run before each call until a human approves or rejects it.
    requires_approval: bool = False

    def __post_init__(self) -> None:
        if not TOOL_NAME_PATTERN.match(self.name):
            raise AgentDefinitionError(
                f"tool name {self.name!r} must be 1-64 letters, digits, _ or -"
            )
        if self.parameters.get("type") != "object":
            raise AgentDefinitionError(f"tool {self.name!r}: parameters must be an object schema")

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, dict(self.parameters))


def _parameters_from_signature(function: Callable[..., Any]) -> dict[str, Any]:
    """Derive a JSON schema for a function's keyword arguments from its annotations."""
    properties: dict[str, Any] = {}
    required = []
    hints = inspect.get_annotations(function, eval_str=True)
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        json_type = _JSON_TYPES.get(hints.get(name))  # type: ignore[arg-type]
        properties[name] = {"type": json_type} if json_type else {}
        if parameter.default is parameter.empty:
            required.append(name)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def tool(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    requires_approval: bool = False,
) -> Any:
    """Make a :class:`Tool` of a function; usable as ``@tool`` or ``@tool(name=...)``."""

    def make(fn: Callable[..., Any]) -> Tool:
        doc = inspect.getdoc(fn) or ""
        return Tool(
            name=name or fn.__name__,
            function=fn,
            description=description if description is not None else doc.split("\n\n")[0],
            parameters=parameters if parameters is not None else _parameters_from_signature(fn),
            timeout=timeout,
            requires_approval=requires_approval,
        )

    return make(function) if function is not None else make


@dataclass(frozen=True)
class McpServer:
    """An MCP server whose tools an agent may call, as its definition names it.

    Values may hold ``${NAME}`` references to the server's environment; they are expanded
    only when the server is called, so the definition never holds a secret itself.
    """

    name: str
    # Streamable HTTP: the endpoint and the headers sent with every request.
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # stdio: the command started for the server, its arguments and environment.
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # The server's tools the agent gets, by the server's names; None: all of them.
    tools: tuple[str, ...] | None = None
    # Tools that pause the run for a human's approval before each call.
    requires_approval: frozenset[str] = frozenset()
    # Seconds one call may take; None uses the server's AGENT_RUNS_TOOL_TIMEOUT.
    timeout: float | None = None
    # An organisation's server (its agent was stored through the API): connections to it go
    # only to the addresses the server's policy allows, checked as each is made.
    guarded: bool = False

    @property
    def prefix(self) -> str:
        """What the names of this server's tools start with, as the model sees them."""
        return f"{self.name}__"


def mcp_server(definition: Mapping[str, Any], where: str = "mcp_servers") -> McpServer:
    """Make an :class:`McpServer` of a definition, validated as the agents file's are."""
    try:
        data = McpServerSchema().load(dict(definition))
    except ValidationError as error:
        raise AgentDefinitionError(_reasons(where, error)) from None
    return _mcp_server(data)


def _mcp_server(data: Mapping[str, Any], guarded: bool = False) -> McpServer:
    tools = data.get("tools")
    return McpServer(
        name=data["name"],
        url=data.get("url"),
        headers=dict(data.get("headers") or {}),
        command=data.get("command"),
        args=tuple(data.get("args") or ()),
        env=dict(data.get("env") or {}),
        tools=None if tools is None else tuple(dict.fromkeys(tools)),
        requires_approval=frozenset(data.get("requires_approval") or ()),
        timeout=data.get("timeout"),
        guarded=guarded,
    )


def _reasons(where: str, error: ValidationError) -> str:
    messages = error.messages if isinstance(error.messages, dict) else {"_schema": error.messages}
    return f"{where}: " + "; ".join(f"{path}: {text}" for path, text in field_messages(messages))


@dataclass(frozen=True)
class Agent:
    """What a run executes: a model, its instructions and the tools it may call."""

    id: str
    name: str
    description: str = ""
    instructions: str = ""
    # A model string such as "scripted" or "openai:gpt-4o-mini"; None means the server default.
    model: str | None = None
    # Further model strings a run may choose through options.model; "*" allows any.
    allowed_models: tuple[str, ...] = ()
    tools: tuple[Tool, ...] = ()
    # Model calls one run may make before it must answer.
    max_steps: int = 8
    # Settings handed to the model back end as they are (e.g. the scripted model's pacing).
    model_options: Mapping[str, Any] = field(default_factory=dict)
    # Give every tool an optional "thought" argument and stream it as reasoning, so models
    # without native reasoning still explain each tool call.
    explain_tool_calls: bool = False
    # The conversation sent to the model is trimmed, oldest turns first, to about this many
    # tokens (estimated at four characters a token).
    context_tokens: int = 32_000
    # MCP servers whose tools the agent may call next to its Python tools.
    mcp_servers: tuple[McpServer, ...] = ()
    # The answer's form unless a run asks otherwise: {"type": "json_schema", "schema": {...}}
    # or {"type": "text"} (schemas.ResponseFormatSchema); None is text.
    response_format: Mapping[str, Any] | None = None
    # The version of an organisation's own agent (stored through the API); None for the
    # agents file's and Python's, which have none.
    version: int | None = None
    # An organisation's agent (stored through the API): its model server is reached only
    # where the address policy allows, as its MCP servers are (McpServer.guarded).
    guarded: bool = False

    def __post_init__(self) -> None:
        if not AGENT_ID_PATTERN.match(self.id):
            raise AgentDefinitionError(
                f"agent id {self.id!r} must be 1-128 letters, digits, _ . or -"
            )
        names = [t.name for t in self.tools]
        if len(names) != len(set(names)):
            raise AgentDefinitionError(f"agent {self.id!r} names a tool twice")
        if self.max_steps < 1:
            raise AgentDefinitionError(f"agent {self.id!r}: max_steps must be at least 1")
        if self.context_tokens < 256:
            raise AgentDefinitionError(f"agent {self.id!r}: context_tokens must be at least 256")
        servers = [server.name for server in self.mcp_servers]
        if len(servers) != len(set(servers)):
            raise AgentDefinitionError(f"agent {self.id!r} names an MCP server twice")
        for server in self.mcp_servers:
            clash = next((n for n in names if n.startswith(server.prefix)), None)
            if clash:
                raise AgentDefinitionError(
                    f"agent {self.id!r}: tool {clash!r} would clash with the tools of MCP "
                    f"server {server.name!r}, whose names start with {server.prefix!r}"
                )

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def model_for(
        self,
        requested: str | None,
        default_model: str,
        embedded_models: Callable[[], Collection[str]] | None = None,
    ) -> str | None:
        """Return the model a run uses, or None if the agent does not allow ``requested``.

        ``"*"`` allows any model but an embedded one the server does not offer
        (``embedded_models``: :func:`embedded_model` of each; by default only ``local``):
        whoever may start a run would otherwise have the model host open a file of their
        choosing. One the agent lists by name it may run.
        """
        own = self.model or default_model
        if requested is None or requested == own:
            return own
        if requested in self.allowed_models:
            return requested
        if "*" not in self.allowed_models:
            return None
        return requested if _offered(requested, offered_embedded_models(embedded_models)) else None


# Agents and tools registered from Python, shared by every application in the process.
_python_agents: dict[str, Agent] = {}
_python_tools: dict[str, Tool] = {}


def register_tool(function: Callable[..., Any] | Tool, **kwargs: Any) -> Tool:
    """Register a tool by name, so agent files can list it. Returns the Tool."""
    registered = function if isinstance(function, Tool) else tool(function, **kwargs)
    _python_tools[registered.name] = registered
    return registered


def register_agent(
    id: str,
    *,
    name: str | None = None,
    description: str = "",
    instructions: str = "",
    model: str | None = None,
    allowed_models: Iterable[str] = (),
    tools: Iterable[Callable[..., Any] | Tool] = (),
    max_steps: int = 8,
    model_options: Mapping[str, Any] | None = None,
    explain_tool_calls: bool = False,
    context_tokens: int = 32_000,
    mcp_servers: Iterable[Mapping[str, Any] | McpServer] = (),
    response_format: Mapping[str, Any] | None = None,
) -> Agent:
    """Define an agent from Python. It overrides a file agent with the same id."""
    if response_format is not None:
        try:
            response_format = ResponseFormatSchema().load(dict(response_format))
        except ValidationError as error:
            raise AgentDefinitionError(
                _reasons(f"agent {id!r}: response_format", error), error.messages_dict
            ) from None
    agent = Agent(
        id=id,
        name=name or id,
        description=description,
        instructions=instructions,
        model=model,
        allowed_models=tuple(allowed_models),
        tools=tuple(t if isinstance(t, Tool) else tool(t) for t in tools),
        max_steps=max_steps,
        model_options=dict(model_options or {}),
        explain_tool_calls=explain_tool_calls,
        context_tokens=context_tokens,
        mcp_servers=tuple(
            s if isinstance(s, McpServer) else mcp_server(s, f"agent {id!r}: mcp_servers[{i}]")
            for i, s in enumerate(mcp_servers)
        ),
        response_format=response_format,
    )
    _python_agents[agent.id] = agent
    return agent


def unregister_agent(id: str) -> None:
    """Forget an agent registered from Python."""
    _python_agents.pop(id, None)


def _import_tool(reference: str) -> Tool:
    """Import a ``module:function`` tool; raise ValueError saying why it cannot be."""
    module_name, _, attribute = reference.partition(":")
    if not attribute:
        raise ValueError(
            f"unknown tool {reference!r} (not registered, not a 'module:function' path)"
        )
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import tool {reference!r}: {error}") from None
    return target if isinstance(target, Tool) else tool(target)


def _resolve_tool(entry: str | dict[str, Any], known: Mapping[str, Tool], imports: bool) -> Tool:
    """Turn a loaded tool entry (a name, or ``{use, requires_approval?, timeout?}``) into a Tool.

    A name is looked up in ``known``; with ``imports`` (the agents file, which the operator
    writes) it may also be a ``module:function`` path. Raises ValueError saying what is wrong.
    """
    settings = {"use": entry} if isinstance(entry, str) else dict(entry)
    reference = settings.pop("use")
    if reference in known:
        resolved = known[reference]
    elif imports:
        resolved = _import_tool(reference)
    else:
        names = ", ".join(sorted(known)) or "none"
        raise ValueError(
            f"unknown tool {reference!r}: not a tool registered on this server "
            f"(registered: {names})"
        )
    return dataclasses.replace(resolved, **settings) if settings else resolved


def embedded_model(model: str) -> str | None:
    """Return the file a ``local[:path]`` model string runs, as compared with those the
    server offers: its absolute path, normalised as text and never looked up (a path an
    organisation wrote is compared, not opened); None for a model of another provider, ""
    when ``local`` has no file here."""
    provider, _, name = model.partition(":")
    if provider != "local":
        return None
    path = model_path(name)
    return os.path.abspath(path) if path else ""


def offered_embedded_models(
    embedded_models: Callable[[], Collection[str]] | None,
) -> Collection[str]:
    """The embedded models a server offers, or, not knowing them, its default alone."""
    if embedded_models is not None:
        return embedded_models()
    return {embedded_model("local") or ""}


EMBEDDED_MODEL_RULE = (
    "Of the embedded models, only those this server offers: 'local' (its default) or a "
    "'local:' model its own agents name, never another file."
)


# The embedded model's options that choose how the model host loads it: each value is one
# more copy of the weights in the host's memory, which it keeps for its life.
EMBEDDED_LOAD_OPTIONS = frozenset({"n_ctx", "n_threads"})

EMBEDDED_LOAD_RULE = (
    "Chooses how the server loads its embedded model, which only its own agents may do."
)


def _model_problem(model: str) -> str | None:
    """Say what is wrong with a model string whose provider this server lacks, else None."""
    provider = model.partition(":")[0]
    if provider in PROVIDERS:
        return None
    return f"unknown model provider {provider!r} (known: {', '.join(sorted(PROVIDERS))})"


# The server's own settings (its JWT secret, its database's URL): never an organisation's.
_SERVER_VARIABLES = "AGENT_RUNS_"


def variable_allow_list(setting: str | Iterable[str] | None) -> tuple[str, ...]:
    """Read AGENT_RUNS_AGENT_ENV_ALLOW: variable names, or prefixes ending in ``*``,
    comma-separated. Raises ValueError for an entry that is neither (a lone ``*`` among them:
    the whole environment is no list)."""
    entries = setting.split(",") if isinstance(setting, str) else list(setting or ())
    names = []
    for entry in (str(e).strip() for e in entries):
        if not entry:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\*?", entry):
            raise ValueError(
                f"AGENT_RUNS_AGENT_ENV_ALLOW: {entry!r} is neither a variable's name nor a "
                "prefix such as CRM_* (a lone * would hand out the whole environment)"
            )
        names.append(entry)
    return tuple(names)


@dataclass(frozen=True)
class StoredAgentPolicy:
    """What an agent stored through the API may make the server do, beyond the file's rules.

    Any organisation's admin writes those agents, so what their ``${NAME}`` references (and
    ``model_options.api_key_env``) may read is the operator's list, ``environment``: names,
    or prefixes ending in ``*``; none by default, and never the server's own ``AGENT_RUNS_*``
    settings. Where their MCP servers and model servers may be is ``addresses``.
    """

    environment: tuple[str, ...] = ()
    addresses: AddressPolicy = field(default_factory=AddressPolicy)

    def allows_variable(self, name: str) -> bool:
        if name.startswith(_SERVER_VARIABLES):
            return False
        return any(
            name.startswith(entry[:-1]) if entry.endswith("*") else name == entry
            for entry in self.environment
        )

    def variable_problem(self, names: Iterable[str]) -> str | None:
        """Say which of ``names`` a stored agent may not read, or None if it may read all."""
        refused = [name for name in dict.fromkeys(names) if not self.allows_variable(name)]
        if not refused:
            return None
        allowed = ", ".join(self.environment) or "none"
        return (
            f"Names the server's environment variable {', '.join(refused)}, which agents "
            "stored through the API may not read: only those the server's "
            f"AGENT_RUNS_AGENT_ENV_ALLOW lists (here: {allowed})."
        )


def _variable_errors(data: Mapping[str, Any], policy: StoredAgentPolicy) -> dict[str, Any]:
    """The fields of a loaded definition that name variables ``policy`` does not allow."""
    errors: dict[str, Any] = {}
    for index, server in enumerate(data.get("mcp_servers") or ()):
        problems: dict[str, Any] = {}
        url = server.get("url")
        if url and (problem := policy.variable_problem(ENV_REFERENCE.findall(url))):
            problems["url"] = [problem]
        for name, value in (server.get("headers") or {}).items():
            if problem := policy.variable_problem(ENV_REFERENCE.findall(value)):
                problems.setdefault("headers", {})[name] = [problem]
        if problems:
            errors.setdefault("mcp_servers", {})[index] = problems
    key_variable = (data.get("model_options") or {}).get("api_key_env")
    if key_variable is not None:
        problem = policy.variable_problem([str(key_variable)])
        if not isinstance(key_variable, str) or problem:
            errors["model_options"] = {
                "api_key_env": [problem or "Must be the name of a variable."]
            }
    return errors


def _definition_error(errors: dict[str, Any], where: str = "") -> AgentDefinitionError:
    reasons = "; ".join(f"{path}: {text}" for path, text in field_messages(errors))
    return AgentDefinitionError(f"{where}: {reasons}" if where else reasons, errors)


def build_agent(
    definition: Any,
    known_tools: Mapping[str, Tool],
    *,
    imports: bool = False,
    where: str = "",
    policy: StoredAgentPolicy | None = None,
    embedded_models: Collection[str] | None = None,
) -> Agent:
    """Validate an agent definition (:class:`AgentDefinitionSchema`) and build its agent.

    The one way a definition becomes an agent, from the agents file or from the API. Tools
    are names in ``known_tools`` or, with ``imports``, ``module:function`` paths; models must
    name a provider this server has. MCP servers that are local commands (stdio) are taken
    only with ``imports``, from the server's own agents file: a definition from the API
    would otherwise have the server run whatever command its caller wrote. Without
    ``imports`` the definition is an organisation's, held to ``policy`` (by default the
    strictest): its ``${NAME}`` references and ``api_key_env`` must name variables the
    policy allows, and its MCP servers are guarded: connections to them go only where
    ``policy.addresses`` allows, checked as each is made (and when the definition is stored,
    by :mod:`.agent_store`); and its ``local`` models (``model``, ``allowed_models``) must be
    among ``embedded_models`` (the server's, :meth:`AgentRegistry.embedded_models`; by
    default only ``local``), lest it have the model host open a file its caller chose.
    Raises :class:`AgentDefinitionError`, whose ``errors`` name each field that is wrong
    (and whose message starts with ``where``).
    """
    if not isinstance(definition, dict):
        raise _definition_error({"_schema": ["An agent definition is a mapping."]}, where)
    try:
        data = AgentDefinitionSchema().load(definition)
    except ValidationError as error:
        messages = error.messages
        raise _definition_error(
            messages if isinstance(messages, dict) else {"_schema": messages}, where
        ) from None
    errors: dict[str, Any] = {}
    tools = []
    for index, entry in enumerate(data.get("tools") or ()):
        try:
            tools.append(_resolve_tool(entry, known_tools, imports))
        except ValueError as error:
            errors.setdefault("tools", {})[index] = [str(error)]
    model = data.get("model")
    if model is not None and (problem := _model_problem(model)):
        errors["model"] = [problem]
    for index, allowed in enumerate(data.get("allowed_models") or ()):
        if allowed != "*" and (problem := _model_problem(allowed)):
            errors.setdefault("allowed_models", {})[index] = [problem]
    if not imports:
        errors.update(_variable_errors(data, policy or StoredAgentPolicy()))
        offered = offered_embedded_models(None) if embedded_models is None else embedded_models
        if model is not None and not _offered(model, offered):
            errors["model"] = [EMBEDDED_MODEL_RULE]
        for index, allowed in enumerate(data.get("allowed_models") or ()):
            if not _offered(allowed, offered):
                errors.setdefault("allowed_models", {})[index] = [EMBEDDED_MODEL_RULE]
        for name in EMBEDDED_LOAD_OPTIONS.intersection(data.get("model_options") or {}):
            errors.setdefault("model_options", {})[name] = [EMBEDDED_LOAD_RULE]
        for index, server in enumerate(data.get("mcp_servers") or ()):
            if server.get("command") is not None:
                errors.setdefault("mcp_servers", {}).setdefault(index, {})["command"] = [
                    "A local command is taken only from the server's agents file; "
                    "give the MCP server's url."
                ]
    if errors:
        raise _definition_error(errors, where)
    try:
        return Agent(
            id=data["id"],
            name=data.get("name") or data["id"],
            description=data.get("description") or "",
            instructions=data.get("instructions") or "",
            model=model,
            allowed_models=tuple(data.get("allowed_models") or ()),
            tools=tuple(tools),
            max_steps=data.get("max_steps", 8),
            model_options=dict(data.get("model_options") or {}),
            explain_tool_calls=data.get("explain_tool_calls", False),
            context_tokens=data.get("context_tokens", 32_000),
            mcp_servers=tuple(
                _mcp_server(server, guarded=not imports) for server in data.get("mcp_servers") or ()
            ),
            response_format=data.get("response_format"),
            guarded=not imports,
        )
    except AgentDefinitionError as error:  # what only the whole agent shows: names that clash
        raise _definition_error({"tools": [str(error)]}, where) from None


def _offered(model: str, embedded_models: Collection[str]) -> bool:
    """Whether ``model`` is no embedded model, or one of ``embedded_models``."""
    wanted = embedded_model(model)
    return wanted is None or wanted in embedded_models


def load_agents_file(path: str) -> dict[str, Agent]:
    """Read agent definitions from a YAML or JSON file: ``{"agents": [ {...}, ... ]}``."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        document = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise AgentDefinitionError(f"{path}: not valid YAML/JSON: {error}") from None
    entries = (document or {}).get("agents") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise AgentDefinitionError(f"{path}: expected a top-level 'agents' list")
    agents: dict[str, Agent] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: agents[{index}]"
        if not isinstance(entry, dict) or "id" not in entry:
            raise AgentDefinitionError(f"{where}: each agent is a mapping with an 'id'")
        agent = build_agent(entry, _python_tools, imports=True, where=f"{where} ({entry['id']})")
        if agent.id in agents:
            raise AgentDefinitionError(f"{path}: agent id {agent.id!r} appears twice")
        agents[agent.id] = agent
    return agents


BUNDLED_AGENTS_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "agents.yaml")


class AgentRegistry:
    """The agents one application serves: its file's, then those registered from Python."""

    def __init__(self, file_agents: Mapping[str, Agent]) -> None:
        self._file_agents = dict(file_agents)

    @classmethod
    def from_file(cls, path: str | None) -> AgentRegistry:
        return cls(load_agents_file(path or BUNDLED_AGENTS_FILE))

    def get(self, agent_id: str) -> Agent | None:
        return _python_agents.get(agent_id) or self._file_agents.get(agent_id)

    def all(self) -> list[Agent]:
        merged = {**self._file_agents, **_python_agents}
        return sorted(merged.values(), key=lambda agent: agent.id)

    def local_models(self, default_model: str) -> list[tuple[str, dict[str, Any]]]:
        """Return the embedded models the agents run: (model name, model options) each."""
        models = []
        for agent in self.all():
            provider, _, name = (agent.model or default_model).partition(":")
            if provider == "local":
                models.append((name, dict(agent.model_options)))
        return models

    def embedded_models(self, default_model: str) -> frozenset[str]:
        """The embedded models this server offers, as :func:`embedded_model` gives them:
        ``local`` (its default), the default model, and each ``local`` model its agents name
        (their model, or one they list in ``allowed_models``)."""
        named = ["local", default_model]
        for agent in self.all():
            named.append(agent.model or default_model)
            named.extend(agent.allowed_models)
        return frozenset(path for model in named if (path := embedded_model(model)) is not None)

    def tools(self) -> dict[str, Tool]:
        """The tools agents stored through the API may name: the file's agents' tools and
        those registered from Python (which win a clash of names)."""
        used = {tool.name: tool for agent in self.all() for tool in agent.tools}
        return {**used, **_python_tools}
