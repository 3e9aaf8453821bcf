"""A Python client for the Agent Runs API: ``AgentRunsClient(base_url, token)``.

::

    from agent_runs.client import AgentRunsClient, ContentDelta

    with AgentRunsClient("http://127.0.0.1:8080", token) as client:
        for event in client.stream("finance_agent", "What is NVDA trading at?"):
            if isinstance(event, ContentDelta):
                print(event.text, end="", flush=True)

Every method maps to one endpoint; run methods take the agent's id first, as the API's paths
do. A streamed run survives a dropped connection: :meth:`AgentRunsClient.stream` reconnects
to the run's ``/events`` after the last event id it saw, so the caller gets every event once,
in order. An error answer raises :class:`ApiError` with the problem document's fields.

Built on httpx, synchronous, with httpx-sse to read the event stream. httpx rather than
requests: the server's OpenAI provider already brings it (no new transitive dependency), it
has separate connect and read timeouts (a stream's read timeout must outlast the server's
15 s pings, a connect should fail fast), and its synchronous client uses plain sockets, so
it works under gevent's monkey-patching as well as in an ordinary program. httpx-sse is a
small pure-Python parser of the WHATWG event-stream format, with no dependency but httpx.

This module imports neither Flask nor the server: a program that only calls the API loads
httpx and nothing else of the package.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypedDict, TypeVar, cast

import httpx
from httpx_sse import EventSource

__all__ = [
    "AgentRunsClient",
    "AgentRunsError",
    "ApiError",
    "ConnectionLost",
    "ContentDelta",
    "Delta",
    "ErrorEvent",
    "Event",
    "ReasoningDelta",
    "RunStream",
    "Start",
    "Stop",
    "ToolEnd",
    "ToolEvent",
    "ToolStart",
]

Action = Literal["APPROVE", "REJECT"]
_Self = TypeVar("_Self", bound="_Closing")

# Longer than the server's ping interval (15 s): a stream silent for this long is dead, and
# the client reconnects to it.
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0


# Errors ------------------------------------------------------------------------------------


class AgentRunsError(Exception):
    """Anything that kept a call to the API from succeeding."""


class ApiError(AgentRunsError):
    """The server answered with an error: the fields of its problem+json document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type: str = "about:blank",
        errors: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        # Per field, for a 422: {"message": ["Missing data for required field."]}.
        self.errors = errors
        # Seconds to wait before trying again, for a 429 or a 503.
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Read the problem document of an error response (or whatever body it has)."""
        status = response.status_code
        try:
            problem = response.json()
        except ValueError:
            problem = None
        if not isinstance(problem, dict):
            # Not the API's problem document: a proxy's page, or another server altogether.
            text = response.text.strip()
            return cls(status, response.reason_phrase or "Error", text[:500])
        retry_after = response.headers.get("Retry-After")
        errors = problem.get("errors")
        return cls(
            status,
            str(problem.get("title") or response.reason_phrase or "Error"),
            str(problem.get("detail") or ""),
            type=str(problem.get("type") or "about:blank"),
            errors=errors if isinstance(errors, dict) else None,
            retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
        )


class ConnectionLost(AgentRunsError):
    """The server could not be reached, or a stream could not be resumed."""


# Events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a run's stream.

    ``event`` is its name (START, CONTENT_DELTA...), ``data`` its payload parsed: the text of a
    delta or an ERROR, the JSON object of START, TOOL_START, TOOL_END and STOP. ``id`` numbers
    the run's events 1, 2, 3...; ``timestamp`` is Unix epoch milliseconds. Each name has its
    subclass with typed accessors; a name this client does not know arrives as an ``Event``.
    """

    event: str
    data: Any
    id: int
    timestamp: int


class Start(Event):
    """START: the run and its session."""

    __slots__ = ()

    @property
    def run_id(self) -> str:
        return str(self.data["runId"])

    @property
    def session_id(self) -> str:
        return str(self.data["sessionId"])


class Delta(Event):
    """A piece of text: REASONING_DELTA or CONTENT_DELTA."""

    __slots__ = ()

    @property
    def text(self) -> str:
        return str(self.data)


class ReasoningDelta(Delta):
    """REASONING_DELTA: a piece of the model's reasoning."""

    __slots__ = ()


class ContentDelta(Delta):
    """CONTENT_DELTA: a piece of the answer."""

    __slots__ = ()


class ToolEvent(Event):
    """TOOL_START or TOOL_END, of the tool ``name``."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))


class ToolStart(ToolEvent):
    """TOOL_START: a tool call begins."""

    __slots__ = ()

    @property
    def arguments(self) -> Any:
        return self.data.get("arguments")


class ToolEnd(ToolEvent):
    """TOOL_END: a tool call's result, or its error (``error`` is None when it succeeded)."""

    __slots__ = ()

    @property
    def result(self) -> Any:
        return self.data.get("result")

    @property
    def error(self) -> str | None:
        error = self.data.get("error")
        return None if error is None else str(error)


class Stop(Event):
    """STOP: the run's last event. A paused or cancelled run says why in ``reason``."""

    __slots__ = ()

    @property
    def reason(self) -> str | None:
        """``"paused"`` (see ``required_action``), ``"cancelled"``, or None for a finished run."""
        reason = self.data.get("reason")
        return None if reason is None else str(reason)

    @property
    def paused(self) -> bool:
        return self.reason == "paused"

    @property
    def required_action(self) -> dict[str, Any] | None:
        return cast("dict[str, Any] | None", self.data.get("requiredAction"))

    @property
    def followups(self) -> list[str]:
        return list(self.data.get("followups") or ())

    @property
    def usage(self) -> dict[str, Any] | None:
        return cast("dict[str, Any] | None", self.data.get("usage"))


class ErrorEvent(Event):
    """ERROR: the run failed; nothing follows."""

    __slots__ = ()

    @property
    def message(self) -> str:
        return str(self.data)


EVENT_CLASSES: dict[str, type[Event]] = {
    "START": Start,
    "REASONING_DELTA": ReasoningDelta,
    "CONTENT_DELTA": ContentDelta,
    "TOOL_START": ToolStart,
    "TOOL_END": ToolEnd,
    "STOP": Stop,
    "ERROR": ErrorEvent,
}
# Their data is a JSON document in a string (STOP's may be empty); the others' is text.
JSON_DATA = frozenset(("START", "TOOL_START", "TOOL_END", "STOP"))
FINAL_EVENTS = frozenset(("STOP", "ERROR"))


def parse_event(frame_id: str, frame_data: str) -> Event:
    """Make the typed event of one SSE frame: its ``id:`` and its ``data:`` line."""
    payload = json.loads(frame_data)
    name = payload["event"]
    data = payload.get("data", "")
    if name in JSON_DATA:
        data = json.loads(data) if data else {}
    return EVENT_CLASSES.get(name, Event)(name, data, int(frame_id), payload.get("timestamp", 0))


# Answers -----------------------------------------------------------------------------------
# The JSON the API answers, as it arrives (camelCase keys), typed for editors and mypy.


class Agent(TypedDict, total=False):
    id: str
    name: str
    description: str
    model: str
    tools: list[dict[str, Any]]


class RunResponse(TypedDict, total=False):
    runId: str
    sessionId: str
    status: str
    content: str
    reasoningSteps: list[str]
    tools: list[dict[str, Any]]
    followups: list[str]
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    metadata: dict[str, Any]
    requiredAction: dict[str, Any] | None


class QueuedRun(TypedDict):
    runId: str
    sessionId: str
    status: str


class AgentRun(TypedDict, total=False):
    id: str
    agentId: str
    sessionId: str
    userId: str | None
    orgId: str
    status: str
    model: str
    content: str
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    requiredAction: dict[str, Any] | None
    createdAt: str
    startedAt: str | None
    completedAt: str | None


class Session(TypedDict, total=False):
    id: str
    agentId: str
    userId: str | None
    orgId: str
    createdAt: str
    updatedAt: str
    activeRunId: str | None


class SessionDetail(Session, total=False):
    messages: list[dict[str, Any]]


# Streams -----------------------------------------------------------------------------------


class _Closing:
    """Closed at the end of a ``with`` block."""

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class RunStream(_Closing):
    """The events of one run, as an iterator; reconnects to ``/events`` when the connection drops.

    ``run_id`` and ``session_id`` are known once START has arrived (at once for a stream
    opened with :meth:`AgentRunsClient.events`); ``last_id`` is the id of the last event
    handed out, the place to resume from. Iteration ends after STOP or ERROR. Close the
    stream (or use it in a ``with`` block) to drop the connection before the end.
    """

    def __init__(
        self,
        client: AgentRunsClient,
        agent_id: str,
        response: httpx.Response,
        *,
        run_id: str | None = None,
        after: int = 0,
        max_reconnects: int = 5,
        new_session: str | None = None,
    ) -> None:
        self._client = client
        self.agent_id = agent_id
        self.run_id = run_id
        self.session_id: str | None = new_session
        # The session the client chose for this run's new conversation: the run is its only
        # one, so a stream that breaks before START finds its run through it.
        self._new_session = new_session
        self.last_id = after
        # Reconnects in a row that brought no new event before giving up.
        self.max_reconnects = max_reconnects
        self.reconnects = 0
        self._response: httpx.Response | None = response
        self._events = self._follow()

    def __iter__(self) -> RunStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Drop the connection; iteration ends."""
        self._events.close()
        if self._response is not None:
            self._response.close()
            self._response = None

    def _follow(self) -> Generator[Event, None, None]:
        response = self._response
        failures = 0
        while True:
            assert response is not None
            cause: Exception | None = None
            try:
                for frame in EventSource(response).iter_sse():
                    if not frame.data:
                        continue
                    try:
                        event = parse_event(frame.id, frame.data)
                    except (ValueError, KeyError, TypeError) as error:
                        raise AgentRunsError(
                            f"Not an Agent Runs event: {frame.data[:200]!r}"
                        ) from error
                    if event.id <= self.last_id:
                        continue  # handed out already, before a reconnect
                    self.last_id = event.id
                    failures = 0
                    if type(event) is Start:
                        self.run_id = event.run_id
                        self.session_id = event.session_id
                    yield event
                    if event.event in FINAL_EVENTS:
                        return
            except httpx.TransportError as error:
                # Cut mid-body, reset, or silent past the read timeout.
                cause = error
            finally:
                response.close()
                self._response = None
            if self.run_id is None and self._new_session is not None:
                self.run_id = self._client._run_of_new_session(self.agent_id, self._new_session)
            if self.run_id is None:
                raise ConnectionLost(
                    "The stream broke before the run's START event; the run's id is unknown, "
                    "so it cannot be resumed."
                ) from cause
            # The stream broke (or ended before the run's last event): resume after last_id.
            while True:
                failures += 1
                if failures > self.max_reconnects:
                    raise ConnectionLost(
                        f"Run {self.run_id}'s stream broke {failures - 1} times in a row after "
                        f"event {self.last_id}; giving up."
                    ) from cause
                if failures > 1:
                    # Back off while the server stays away: 0.25, 0.5, 1, 2, 2... s.
                    time.sleep(min(2.0, 0.125 * 2 ** (failures - 1)))
                self.reconnects += 1
                try:
                    response = self._client._open_stream(
                        "GET",
                        self._client._run_path(self.agent_id, self.run_id, "events"),
                        headers={"Last-Event-ID": str(self.last_id)},
                    )
                except ConnectionLost as error:
                    cause = error
                    continue
                self._response = response
                break


# The client ----------------------------------------------------------------------------------


class AgentRunsClient(_Closing):
    """A synchronous client for one Agent Runs server.

    ``base_url`` is the server's address (``http://127.0.0.1:8080``); ``prefix`` is where the
    API is mounted on it (``/api`` for ``agent-runs serve``). ``token`` is a bearer token from
    ``agent-runs tokens create``. ``timeout`` bounds connecting and each read (seconds, or an
    ``httpx.Timeout``); synchronous runs (:meth:`run`, :meth:`continue_run`) wait for the
    run however long it takes. Pass ``http_client`` to reuse an ``httpx.Client`` of your own
    (its base URL and headers are left alone). Close the client, or use it in a ``with``
    block, to release its connections.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        prefix: str = "/api",
        timeout: float | httpx.Timeout | None = None,
        max_reconnects: int = 5,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.max_reconnects = max_reconnects
        if timeout is None:
            timeout = httpx.Timeout(DEFAULT_READ_TIMEOUT, connect=DEFAULT_CONNECT_TIMEOUT)
        elif not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout)
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"}
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)

    def close(self) -> None:
        """Close the connections this client opened."""
        if self._owns_http:
            self._http.close()

    # Agents --------------------------------------------------------------------------------

    def agents(self) -> list[Agent]:
        """List the agents the server offers."""
        return cast("list[Agent]", self._request("GET", "/agents"))

    def agent(self, agent_id: str) -> Agent:
        """Return one agent (ApiError 404 if there is none of that id)."""
        return cast("Agent", self._request("GET", f"/agents/{_segment(agent_id)}"))

    # Runs ------------------------------------------------------------------------------------

    def run(self, agent_id: str, message: str, **request: Any) -> RunResponse:
        """Run the agent and return its answer once the run has finished (or paused).

        Keyword arguments are the rest of the run request: ``session_id``, ``user_id``,
        ``org_id``, ``generate_followups``, ``media`` (a list of ``{"type", "data"}``) and
        ``options`` (``{"model", "temperature", "maxTokens", "onDisconnect"}``).
        """
        return cast(
            "RunResponse",
            self._request(
                "POST",
                f"/agents/{_segment(agent_id)}/runs",
                json=_run_request(message, request),
                timeout=self._waiting_timeout(),
            ),
        )

    def stream(self, agent_id: str, message: str, **request: Any) -> RunStream:
        """Start a run and return its events as they happen (same arguments as :meth:`run`).

        The request is sent at once, so a refused run raises here; the events come as the
        returned stream is iterated, and a dropped connection is resumed through ``/events``.
        Without a ``session_id`` the client names the new session itself (a UUID, as the
        server would), so that even a connection lost before START is resumed: the run is
        the session's only one. In a session of the caller's, such a loss raises
        :class:`ConnectionLost`.
        """
        body = _run_request(message, request)
        new_session = None
        if "sessionId" not in body:
            new_session = body["sessionId"] = str(uuid.uuid4())
        path = f"/agents/{_segment(agent_id)}/runs/stream"
        try:
            response = self._open_stream("POST", path, json=body)
        except ConnectionLost:
            # Lost before the answer's headers: the run may have started all the same.
            run_id = new_session and self._run_of_new_session(agent_id, new_session)
            if not run_id:
                raise
            stream = self.events(agent_id, run_id)
            stream.session_id = new_session
            return stream
        return RunStream(
            self, agent_id, response, max_reconnects=self.max_reconnects, new_session=new_session
        )

    def background(self, agent_id: str, message: str, **request: Any) -> QueuedRun:
        """Queue a run and return its ids at once; follow it with :meth:`events`, :meth:`status`."""
        return cast(
            "QueuedRun",
            self._request(
                "POST",
                f"/agents/{_segment(agent_id)}/runs/background",
                json=_run_request(message, request),
            ),
        )

    def events(self, agent_id: str, run_id: str, after: int | None = None) -> RunStream:
        """Stream a run's events after event ``after`` (all of them by default), then live ones."""
        after = after or 0
        response = self._open_stream(
            "GET",
            self._run_path(agent_id, run_id, "events"),
            headers={"Last-Event-ID": str(after)},
        )
        return RunStream(
            self, agent_id, response, run_id=run_id, after=after, max_reconnects=self.max_reconnects
        )

    def status(self, agent_id: str, run_id: str) -> AgentRun:
        """Return one run's status."""
        return cast("AgentRun", self._request("GET", self._run_path(agent_id, run_id, "status")))

    def status_many(self, agent_id: str, run_ids: Iterable[str]) -> list[AgentRun]:
        """Return the status of several runs in one call (at most the server's limit, 100).

        Runs the server does not know, or that belong to someone else, are left out.
        """
        ids = ",".join(run_ids)
        return cast(
            "list[AgentRun]",
            self._request(
                "GET", f"/agents/{_segment(agent_id)}/runs/status", params={"runIds": ids}
            ),
        )

    def cancel(self, agent_id: str, run_id: str) -> bool:
        """Cancel a run: True while it stops, False if it had already finished."""
        response = self._send("DELETE", self._run_path(agent_id, run_id))
        return response.status_code == 202

    def continue_run(self, agent_id: str, run_id: str, action: Action) -> RunResponse:
        """Approve or reject a PAUSED run's tool call; return the run once it next stops."""
        return cast(
            "RunResponse",
            self._request(
                "POST",
                self._run_path(agent_id, run_id, "continue"),
                json={"action": action},
                timeout=self._waiting_timeout(),
            ),
        )

    # Sessions --------------------------------------------------------------------------------

    def sessions(
        self, *, agent_id: str | None = None, user_id: str | None = None, page_size: int = 100
    ) -> Iterator[Session]:
        """Yield the caller's sessions, most recently active first, fetching page by page."""
        params = {"agentId": agent_id, "userId": user_id, "limit": page_size}
        return self._pages("/sessions", params)

    def session(self, session_id: str, *, user_id: str | None = None) -> SessionDetail:
        """Return a session with its messages, oldest first."""
        params = {"userId": user_id} if user_id is not None else None
        return cast(
            "SessionDetail",
            self._request("GET", f"/sessions/{_segment(session_id)}", params=params),
        )

    def session_runs(
        self, session_id: str, *, user_id: str | None = None, page_size: int = 100
    ) -> Iterator[AgentRun]:
        """Yield a session's runs, oldest first, fetching page by page."""
        params = {"userId": user_id, "limit": page_size}
        return self._pages(f"/sessions/{_segment(session_id)}/runs", params)

    def delete_session(self, session_id: str, *, user_id: str | None = None) -> None:
        """Delete a session with its messages, runs and events."""
        params = {"userId": user_id} if user_id is not None else None
        self._send("DELETE", f"/sessions/{_segment(session_id)}", params=params)

    # Plumbing ----------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.base_url}{self.prefix}{path}"

    def _run_path(self, agent_id: str, run_id: str, action: str = "") -> str:
        path = f"/agents/{_segment(agent_id)}/runs/{_segment(run_id)}"
        return f"{path}/{action}" if action else path

    def _waiting_timeout(self) -> httpx.Timeout:
        # The answer comes when the run stops, however long that takes.
        return httpx.Timeout(None, connect=self.timeout.connect)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; raise ApiError for an error answer, ConnectionLost for no answer."""
        url = self._url(path)
        try:
            response = self._http.request(method, url, headers=self._headers, **kwargs)
        except httpx.TransportError as error:
            raise _unreachable(url, error) from error
        if response.is_error:
            raise ApiError.from_response(response)
        return response

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _pages(self, path: str, params: Mapping[str, Any]) -> Iterator[Any]:
        query = {key: value for key, value in params.items() if value is not None}
        while True:
            page = self._request("GET", path, params=query)
            yield from page["items"]
            if not page.get("nextCursor"):
                return
            query["cursor"] = page["nextCursor"]

    def _run_of_new_session(self, agent_id: str, session_id: str) -> str | None:
        """Return the id of the one run of a session the client created, if the server has it."""
        try:
            runs = list(self.session_runs(session_id, page_size=2))
        except (ApiError, ConnectionLost):
            return None
        if len(runs) != 1 or runs[0].get("agentId") != agent_id:
            return None
        return runs[0]["id"]

    def _open_stream(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request whose answer is an event stream; return the open response."""
        url = self._url(path)
        headers = {**self._headers, "Accept": "text/event-stream", **kwargs.pop("headers", {})}
        request = self._http.build_request(method, url, headers=headers, **kwargs)
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as error:
            raise _unreachable(url, error) from error
        if response.is_error:
            try:
                response.read()
            except httpx.TransportError as error:
                raise _unreachable(url, error) from error
            finally:
                response.close()
            raise ApiError.from_response(response)
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            response.close()
            raise AgentRunsError(
                f"{url} answered {content_type or 'no content type'}, not an event stream: "
                "is this an Agent Runs server (and its prefix)?"
            )
        return response


def _segment(value: str) -> str:
    """Quote an id for a URL path, so that no id can reach another endpoint."""
    from urllib.parse import quote

    return quote(value, safe="")


def _run_request(message: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """Return the JSON body of a run request from the keyword arguments of a run method."""
    names = {
        "session_id": "sessionId",
        "user_id": "userId",
        "org_id": "orgId",
        "generate_followups": "generateFollowups",
        "media": "media",
        "options": "options",
    }
    unknown = sorted(set(request) - set(names))
    if unknown:
        raise TypeError(f"unexpected run request arguments: {', '.join(unknown)}")
    body: dict[str, Any] = {"message": message}
    for name, value in request.items():
        if value is not None:
            body[names[name]] = value
    return body


def _unreachable(url: str, error: httpx.TransportError) -> ConnectionLost:
    reason = str(error) or type(error).__name__
    return ConnectionLost(f"Cannot reach {url}: {reason}")
