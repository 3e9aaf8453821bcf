"""An organisation's own agents, kept in the database as versions, beside the server's agents.

The server's agents (the agents file's and those registered from Python) are read-only and
the same for everyone. An organisation adds its own through the API: each change stores a
new version of the definition, in the agents file's form, validated as the file is
(:func:`runtime.agents.build_agent`, tools by registered name only). A deletion stores a
version without a definition. Old versions stay: a run records the version it ran, and a
paused run resumes with it.

Every worker reads the current version from the database when a run starts (one indexed
row), so a change made through one worker is what the next run on any worker gets; only the
building of a version into an :class:`Agent` is cached, and a version never changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import peewee

from ..db import database
from ..models import AgentDefinition, utcnow
from ..schemas import ENV_REFERENCE, field_messages
from .addresses import AddressPolicy, host_refusal
from .agents import (
    Agent,
    AgentDefinitionError,
    AgentRegistry,
    StoredAgentPolicy,
    Tool,
    build_agent,
)
from .runs import NotFound

# The largest definition an organisation may store, as JSON text.
MAX_DEFINITION_BYTES = 256 * 1024
# Versions built into agents that each worker keeps.
CACHE_SIZE = 512


class AgentConflict(Exception):
    """A change the agent's state does not allow: 409, or 412 for a stale If-Match."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply a JSON Merge Patch (RFC 7386): objects merge, null removes, the rest replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


class AgentCatalog:
    """The agents an organisation may run: the server's first, then its own."""

    def __init__(
        self,
        registry: AgentRegistry,
        policy: StoredAgentPolicy | None = None,
        cache_size: int = CACHE_SIZE,
        default_model: str = "scripted",
    ) -> None:
        self.registry = registry
        self.policy = policy or StoredAgentPolicy()
        # The model of agents that name none (AGENT_RUNS_DEFAULT_MODEL).
        self.default_model = default_model
        self._built: OrderedDict[tuple[str, str, int], Agent] = OrderedDict()
        self._cache_size = cache_size

    # Reading --------------------------------------------------------------------------

    def tools(self) -> dict[str, Tool]:
        """The tools an organisation's agents may name: those the server's agents use, and
        those registered from Python."""
        return self.registry.tools()

    def embedded_models(self) -> frozenset[str]:
        """The embedded models an organisation's agents may name, and a run may choose when
        its agent allows any model: ``local`` and those the server's settings and agents name
        (:meth:`AgentRegistry.embedded_models`)."""
        return self.registry.embedded_models(self.default_model)

    def get(self, org_id: str, agent_id: str, version: int | None = None) -> Agent | None:
        """Return the agent a run of ``agent_id`` would run now (or as of ``version``)."""
        found = self.find(org_id, agent_id, version)
        return None if found is None else found[0]

    def find(
        self, org_id: str, agent_id: str, version: int | None = None
    ) -> tuple[Agent, AgentDefinition | None] | None:
        """Return the agent and its stored version (None for the server's agents), or None
        if the organisation has no such agent (or had it, and deleted it)."""
        agent = self.registry.get(agent_id)
        if agent is not None:
            return agent, None
        query = _versions(org_id, agent_id)
        if version is not None:
            query = query.where(AgentDefinition.version == version)
        row = query.first()
        if row is None or row.definition is None:
            return None
        return self._build(org_id, row), row

    def is_known(self, org_id: str, agent_id: str) -> bool:
        """Whether the agent is the server's, or the organisation's now or at any version
        (the runs of a deleted agent can still be read)."""
        if self.registry.get(agent_id) is not None:
            return True
        return _versions(org_id, agent_id).exists()

    def _refuse_server_agent(self, agent_id: str) -> None:
        if self.registry.get(agent_id) is not None:
            raise AgentConflict(
                f"Agent {agent_id!r} is one of this server's agents (its agents file or "
                "Python): read-only through the API."
            )

    def stored(self, org_id: str, agent_id: str) -> AgentDefinition:
        """Return the current version of an organisation's own agent, or raise NotFound."""
        self._refuse_server_agent(agent_id)
        row = _versions(org_id, agent_id).first()
        if row is None or row.definition is None:
            raise NotFound(f"No agent with id {agent_id!r}.")
        return row

    def all(self, org_id: str) -> list[tuple[Agent, AgentDefinition | None]]:
        """The server's agents and the organisation's current ones, by id, each with its
        stored version (None for the server's)."""
        server = {agent.id: (agent, None) for agent in self.registry.all()}
        latest = (
            AgentDefinition.select(
                AgentDefinition.agent_id, peewee.fn.MAX(AgentDefinition.version).alias("top")
            )
            .where(AgentDefinition.org_id == org_id)
            .group_by(AgentDefinition.agent_id)
        )
        rows = (
            AgentDefinition.select()
            .join(
                latest,
                on=(
                    (AgentDefinition.agent_id == latest.c.agent_id)
                    & (AgentDefinition.version == latest.c.top)
                ),
            )
            .where(AgentDefinition.org_id == org_id)
        )
        own: dict[str, tuple[Agent, AgentDefinition | None]] = {}
        for row in rows:
            if row.definition is None or row.agent_id in server:
                continue
            try:
                own[row.agent_id] = (self._build(org_id, row), row)
            except AgentConflict:
                continue  # a version this server can no longer build is not offered
        merged = {**own, **server}
        return [merged[key] for key in sorted(merged)]

    def versions(self, org_id: str, agent_id: str, limit: int = 100) -> list[AgentDefinition]:
        """The organisation's versions of an agent, newest first (deletions included)."""
        self._refuse_server_agent(agent_id)
        rows = list(_versions(org_id, agent_id).limit(limit))
        if not rows:
            raise NotFound(f"No agent with id {agent_id!r}.")
        return rows

    def _build(self, org_id: str, row: AgentDefinition) -> Agent:
        key = (org_id, row.agent_id, row.version)
        agent = self._built.get(key)
        if agent is not None:
            self._built.move_to_end(key)
            return agent
        try:
            agent = build_agent(
                row.definition,
                self.tools(),
                policy=self.policy,
                embedded_models=self.embedded_models(),
            )
        except AgentDefinitionError as error:
            # Stored when it was valid; the server changed since (a tool no longer
            # registered, a variable no longer allowed, a local model no longer offered).
            raise AgentConflict(
                f"Agent {row.agent_id!r} version {row.version} no longer fits this server: "
                f"{error}. Store a new version."
            ) from None
        agent = dataclasses.replace(agent, version=row.version)
        self._built[key] = agent
        if len(self._built) > self._cache_size:
            self._built.popitem(last=False)
        return agent

    # Changing -------------------------------------------------------------------------

    def create(self, org_id: str, created_by: str, definition: Any) -> AgentDefinition:
        """Store a new agent of the organisation as its version 1 (or the next, if an agent
        of that id was deleted)."""
        agent_id = definition.get("id") if isinstance(definition, dict) else None
        if isinstance(agent_id, str):
            self._refuse_server_agent(agent_id)
        self._check(definition)
        agent_id = definition["id"]
        current = _versions(org_id, agent_id).first()
        if current is not None and current.definition is not None:
            raise AgentConflict(
                f"Your organisation already has an agent {agent_id!r}; change it with PUT or PATCH."
            )
        return self._store(org_id, agent_id, current, definition, created_by)

    def replace(
        self,
        org_id: str,
        agent_id: str,
        created_by: str,
        definition: Any,
        *,
        expected: int | None = None,
        patch: bool = False,
    ) -> AgentDefinition:
        """Store a new version of an organisation's agent: ``definition`` whole, or with
        ``patch`` a JSON Merge Patch of the current one. ``expected``: the version the
        change was made against (If-Match)."""
        current = self.stored(org_id, agent_id)
        _check_expected(current, expected)
        if patch:
            definition = merge_patch(current.definition, definition)
        if isinstance(definition, dict):
            definition = {"id": agent_id, **definition}
            if definition["id"] != agent_id:
                raise AgentDefinitionError(
                    "id: Must be the agent's id in the path; an agent cannot be renamed.",
                    {"id": ["Must be the agent's id in the path; it cannot be renamed."]},
                )
        self._check(definition)
        return self._store(org_id, agent_id, current, definition, created_by)

    def delete(
        self, org_id: str, agent_id: str, created_by: str, *, expected: int | None = None
    ) -> None:
        """Delete an organisation's agent: a version without a definition. Its runs stay."""
        current = self.stored(org_id, agent_id)
        _check_expected(current, expected)
        self._store(org_id, agent_id, current, None, created_by)

    def _check(self, definition: Any) -> None:
        """Validate a definition as the agents file's are, registered tools only."""
        try:
            size = len(json.dumps(definition))
        except (TypeError, ValueError, RecursionError):
            size = 0
        if size > MAX_DEFINITION_BYTES:
            raise AgentDefinitionError(
                f"An agent definition may be at most {MAX_DEFINITION_BYTES} bytes as JSON.",
                {"_schema": [f"At most {MAX_DEFINITION_BYTES} bytes as JSON (got {size})."]},
            )
        agent = build_agent(
            definition, self.tools(), policy=self.policy, embedded_models=self.embedded_models()
        )
        errors = _address_errors(agent, self.policy.addresses)
        if errors:
            reasons = "; ".join(f"{path}: {text}" for path, text in field_messages(errors))
            raise AgentDefinitionError(reasons, errors)

    def _store(
        self,
        org_id: str,
        agent_id: str,
        current: AgentDefinition | None,
        definition: Mapping[str, Any] | None,
        created_by: str,
    ) -> AgentDefinition:
        # Read, then written in a statement of its own: the unique key (org, agent, version)
        # refuses the second of two changes made against the same version. (A transaction
        # that read first would, on SQLite, fail to take the write lock from a writer that
        # went first, rather than wait for it.)
        version = 1 if current is None else current.version + 1
        try:
            with database.atomic():
                return AgentDefinition.create(
                    org_id=org_id,
                    agent_id=agent_id,
                    version=version,
                    definition=None if definition is None else dict(definition),
                    created_at=utcnow(),
                    created_by=created_by,
                )
        except peewee.IntegrityError:
            # Another request stored this version first: this change was made against an
            # older one.
            raise AgentConflict(
                f"Agent {agent_id!r} changed while this change was made (it is past version "
                f"{version - 1}); read it again and retry."
            ) from None


# How a refusal of an organisation's URL ends.
ADDRESS_RULE = "an organisation's agents reach public addresses only"


def url_refusal(url: str, policy: AddressPolicy, environ: Mapping[str, str]) -> str | None:
    """Say why an organisation's agent may not reach ``url``, or None if it may.

    Its ``${NAME}`` references (already checked against the allowed variables) are expanded
    first: the host they make is the one connected to.
    """
    missing = [name for name in ENV_REFERENCE.findall(url) if name not in environ]
    if missing:
        return f"Names the variable {', '.join(missing)}, which is not set on this server."
    parts = urlsplit(ENV_REFERENCE.sub(lambda match: environ[match.group(1)], url))
    try:
        port = parts.port
    except ValueError:
        return "Must be an http(s) URL with a valid port."
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "Must be an http(s) URL."
    default_port = 443 if parts.scheme == "https" else 80
    return host_refusal(parts.hostname, port or default_port, policy, ADDRESS_RULE)


def _address_errors(agent: Agent, policy: AddressPolicy) -> dict[str, Any]:
    """The fields of an organisation's agent that point where the server may not connect:
    its MCP servers' URLs and its model server's ``base_url``, resolved now (and the MCP
    servers' again at every connection)."""
    errors: dict[str, Any] = {}
    if policy.allow_private:
        return errors
    for index, server in enumerate(agent.mcp_servers):
        if server.url is not None and (problem := url_refusal(server.url, policy, os.environ)):
            errors.setdefault("mcp_servers", {})[index] = {"url": [problem]}
    base_url = agent.model_options.get("base_url")
    if base_url is not None:
        problem = (
            url_refusal(base_url, policy, os.environ)
            if isinstance(base_url, str)
            else "Must be an http(s) URL."
        )
        if problem:
            errors["model_options"] = {"base_url": [problem]}
    return errors


def _versions(org_id: str, agent_id: str) -> peewee.ModelSelect[AgentDefinition]:
    return (
        AgentDefinition.select()
        .where((AgentDefinition.org_id == org_id) & (AgentDefinition.agent_id == agent_id))
        .order_by(AgentDefinition.version.desc())
    )


def _check_expected(current: AgentDefinition, expected: int | None) -> None:
    if expected is not None and expected != current.version:
        raise AgentConflict(
            f"Agent {current.agent_id!r} is at version {current.version}, not {expected}.",
            status=412,
        )
