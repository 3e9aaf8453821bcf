"""MCP client tools: the tools of an agent's MCP servers, listed, cached and called.

A small client of the protocol's two transports, written for the gevent worker: streamable
HTTP (each JSON-RPC request a POST, answered as JSON or as a stream of server-sent events; the
session in the ``Mcp-Session-Id`` header; a GET stream for the server's own notifications), and
stdio (a child process speaking newline-delimited JSON-RPC). The official SDK's client runs
on anyio and asyncio: inside this worker it would need an OS thread with its own event loop
and a hand-off across threads for every call, where this client is one more greenlet
waiting on a socket. The tests run it against servers built with the official SDK.

An agent's servers are reached through one :class:`McpClients` per worker, which keeps a
session per server and set of credentials, and each server's tool list for a while (or until
the server says it changed). A run sees them through an :class:`McpToolbox`: its agent's
servers, with the run's own headers, if it brought any.

Secrets stay out of definitions: ``${NAME}`` in a server's url, headers, args or env is
expanded from the server's environment only when a request is made, and error messages name
the unexpanded URL. An organisation's server (``McpServer.guarded``: its agent was stored
through the API) names only the variables the operator allows, checked when its agent is built
(``runtime.agents.StoredAgentPolicy``), and is connected to only at addresses the policy
allows, checked at each connection (``runtime.addresses``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.subprocess

from ..providers.base import ToolSpec
from ..providers.sdk import BackendTransport, display_url, trio_hidden
from ..schemas import ENV_REFERENCE
from .addresses import AddressPolicy, GuardedBackend
from .agents import McpServer

with trio_hidden():
    import httpx2

logger = logging.getLogger(__name__)

# The protocol revision this client speaks: the initialize handshake, sessions in a header.
PROTOCOL_VERSION = "2025-11-25"
CLIENT_INFO = {"name": "agent-runs", "version": "1"}
# Names a model may be given: what OpenAI and Anthropic accept for a function.
_EXPOSED_NAME = re.compile(r"[^A-Za-z0-9_-]")
MAX_TOOL_NAME = 64
# Seconds between attempts to reopen a server's notification stream that broke.
NOTIFICATION_RETRY = 5.0


class McpError(Exception):
    """A request to an MCP server that failed; the message is fit for the model to read."""


@dataclass(frozen=True)
class McpSettings:
    # Seconds a server's tool list is kept before it is asked again.
    tools_ttl: float = 300.0
    # The largest answer read from a server, in bytes; a larger one fails the call.
    max_response_bytes: int = 8 * 1024 * 1024
    # Seconds listing a server's tools may take at the start of a run.
    list_timeout: float = 10.0
    # Sessions (servers times sets of credentials) a worker keeps open; the least recently
    # used is closed beyond that.
    max_sessions: int = 256
    # Where the servers of agents stored through the API may be (their McpServer.guarded).
    addresses: AddressPolicy = field(default_factory=AddressPolicy)


@dataclass(frozen=True)
class McpTool:
    """One tool of an MCP server, under the name the model knows it by."""

    name: str
    server: McpServer
    remote_name: str
    description: str
    parameters: Mapping[str, Any]

    @property
    def requires_approval(self) -> bool:
        return self.remote_name in self.server.requires_approval

    @property
    def timeout(self) -> float | None:
        return self.server.timeout

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, dict(self.parameters))


def expand(value: str, environ: Mapping[str, str]) -> str:
    """Replace each ``${NAME}`` in ``value`` with that variable of the server's environment."""

    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise McpError(f"The server's environment variable {name} is not set.")
        return environ[name]

    return ENV_REFERENCE.sub(variable, value)


def exposed_name(server: str, remote_name: str, taken: set[str]) -> str:
    """Return the name a model calls a server's tool by: ``crm__lookup_order``.

    Characters model APIs refuse become ``_``; a name too long, or already taken by another
    tool after that, ends with a short hash of the server's own name instead.
    """
    name = f"{server}__{_EXPOSED_NAME.sub('_', remote_name)}"
    if len(name) > MAX_TOOL_NAME or name in taken:
        digest = hashlib.sha256(remote_name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_TOOL_NAME - 9]}_{digest}"
    return name


def tool_result(result: Any) -> tuple[Any, str | None]:
    """Return (result, error) of a ``tools/call`` answer, as the agent loop reports them.

    Text content is the result (what the model reads); structured content stands in when a
    tool gave no text. Images, audio and embedded binaries are named, not passed on.
    """
    if not isinstance(result, dict):
        raise McpError("The server's answer to tools/call is not an object.")
    texts = []
    for item in result.get("content") or ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "text":
            texts.append(str(item.get("text", "")))
        elif kind == "resource" and isinstance(item.get("resource"), dict):
            resource = item["resource"]
            texts.append(str(resource.get("text") or f"[resource {resource.get('uri', '')}]"))
        elif kind == "resource_link":
            texts.append(f"[resource {item.get('uri', '')}]")
        else:
            texts.append(f"[{kind} content ({item.get('mimeType', 'unknown type')}) not shown]")
    text = "\n".join(texts)
    if result.get("isError"):
        return None, text or "The tool reported an error."
    structured = result.get("structuredContent")
    if not text and isinstance(structured, dict):
        return structured, None
    return text, None


# Connections ---------------------------------------------------------------------------


Notify = Callable[[str], None]


class Connection:
    """A session with one MCP server: JSON-RPC requests in, their results out."""

    def __init__(self, on_notification: Notify) -> None:
        self.on_notification = on_notification
        self._ids = itertools.count(1)

    def request(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the session; the next request opens another."""

    def _handle_message(self, message: Any) -> None:
        """Act on a message the server sent of its own accord (a notification, a request)."""
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if not isinstance(method, str):
            return
        if "id" not in message:
            self.on_notification(method)
            return
        # A request from the server: this client offers no sampling, roots or elicitation.
        if method == "ping":
            self._answer({"jsonrpc": "2.0", "id": message["id"], "result": {}})
        else:
            error = {"code": -32601, "message": f"The client does not support {method}."}
            self._answer({"jsonrpc": "2.0", "id": message["id"], "error": error})

    def _answer(self, message: dict[str, Any]) -> None:
        raise NotImplementedError


def _initialize_params() -> dict[str, Any]:
    return {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}


def _result_of(message: Any, request_id: int) -> Any:
    """Return a JSON-RPC response's result; raise its error, or a complaint about its shape."""
    if not isinstance(message, dict) or message.get("id") != request_id:
        raise McpError("The server's answer is not the JSON-RPC response asked for.")
    if "error" in message:
        error = message["error"] if isinstance(message["error"], dict) else {}
        raise McpError(f"The server answered with an error: {str(error.get('message'))[:500]}")
    if "result" not in message:
        raise McpError("The server's answer has neither a result nor an error.")
    return message["result"]


class HttpConnection(Connection):
    """A session with an MCP server over streamable HTTP."""

    def __init__(
        self,
        client: httpx2.Client,
        server: McpServer,
        headers: Mapping[str, str],
        settings: McpSettings,
        on_notification: Notify,
        environ: Mapping[str, str],
    ) -> None:
        super().__init__(on_notification)
        self.client = client
        self.server = server
        self.extra_headers = dict(headers)
        self.settings = settings
        self.environ = environ
        self.session_id: str | None = None
        self.protocol_version = PROTOCOL_VERSION
        self._opening = gevent.lock.Semaphore()
        self._listener: gevent.Greenlet | None = None
        self.listen = False
        self.closed = False

    # What each request carries ------------------------------------------------------------

    def _endpoint(self) -> tuple[str, dict[str, str], list[str]]:
        """Return the URL and headers, expanded, and the secrets they hold (kept out of errors)."""
        assert self.server.url is not None
        url = expand(self.server.url, self.environ)
        headers = {name: expand(v, self.environ) for name, v in self.server.headers.items()}
        # A run's own headers are the end user's, taken as they are: never expanded.
        headers.update(self.extra_headers)
        secrets = [v for v in headers.values() if len(v) >= 4]
        if url != self.server.url:
            secrets.append(url)
        return url, headers, secrets

    def _headers(self, headers: dict[str, str], accept: str) -> dict[str, str]:
        headers = {**headers, "Accept": accept, "Content-Type": "application/json"}
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = self.protocol_version
        return headers

    def _failure(self, detail: str, secrets: list[str]) -> McpError:
        for secret in secrets:
            detail = detail.replace(secret, "***")
        where = display_url(self.server.url or "")
        return McpError(f"MCP server {self.server.name!r} at {where}: {detail}"[:1000])

    # Requests ---------------------------------------------------------------------------

    def request(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        self._open(timeout)
        try:
            return self._call(method, params, timeout)
        except _SessionExpired:
            # The server forgot the session (it restarted, or let it idle out): open another.
            self.session_id = None
            self._open(timeout)
            return self._call(method, params, timeout)

    def _open(self, timeout: float) -> None:
        """Initialize a session, once, however many runs are waiting for it."""
        with self._opening:
            if self.session_id is not None:
                return
            result = self._call("initialize", _initialize_params(), timeout, opening=True)
            version = result.get("protocolVersion") if isinstance(result, dict) else None
            self.protocol_version = version if isinstance(version, str) else PROTOCOL_VERSION
            self._post({"jsonrpc": "2.0", "method": "notifications/initialized"}, timeout)
            if self.listen and self._listener is None:
                self._listener = gevent.spawn(self._listen)

    def _call(self, method: str, params: dict[str, Any], timeout: float, opening: bool = False):
        request_id = next(self._ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        url, headers, secrets = self._endpoint()
        try:
            with self.client.stream(
                "POST",
                url,
                json=message,
                headers=self._headers(headers, "application/json, text/event-stream"),
                timeout=httpx2.Timeout(timeout),
            ) as response:
                if opening and response.headers.get("mcp-session-id"):
                    self.session_id = response.headers["mcp-session-id"]
                if response.status_code == 404 and self.session_id is not None and not opening:
                    raise _SessionExpired()
                if response.status_code >= 400:
                    body = self._read(response, limit=2000, secrets=secrets)
                    detail = body.decode("utf-8", "replace").strip()[:300]
                    raise self._failure(f"HTTP {response.status_code}: {detail}", secrets)
                kind = response.headers.get("content-type", "").partition(";")[0].strip()
                if kind == "text/event-stream":
                    return self._result_from_events(response, request_id, secrets)
                body = self._read(response, self.settings.max_response_bytes, secrets)
                try:
                    answer = json.loads(body)
                except ValueError:
                    raise self._failure(
                        f"the answer is not JSON-RPC: {body[:100].decode('utf-8', 'replace')!r}",
                        secrets,
                    ) from None
                return _result_of(answer, request_id)
        except httpx2.TimeoutException:
            raise self._failure(f"no answer within {timeout:g} seconds", secrets) from None
        except httpx2.HTTPError as error:
            raise self._failure(f"{type(error).__name__}: {error}", secrets) from None

    def _read(self, response: httpx2.Response, limit: int, secrets: list[str]) -> bytes:
        """Read at most ``limit`` bytes of a body; more is a failure (or cut, for an error page)."""
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                if limit < self.settings.max_response_bytes:
                    break  # an error page: its start says enough
                raise self._failure(f"the answer is larger than {limit} bytes", secrets)
        return b"".join(chunks)[: max(limit, 0)]

    def _result_from_events(
        self, response: httpx2.Response, request_id: int, secrets: list[str]
    ) -> Any:
        """Read an SSE answer until the response to ``request_id``, handling what comes first."""
        limit = self.settings.max_response_bytes
        events = httpx2.EventSource(response, max_event_size=limit)
        size = 0
        try:
            for event in events:
                size += len(event.data)
                if size > limit:
                    raise self._failure(f"the answer is larger than {limit} bytes", secrets)
                if event.event != "message" or not event.data:
                    continue
                try:
                    message = json.loads(event.data)
                except ValueError:
                    raise self._failure("an event of the answer is not JSON", secrets) from None
                if (
                    isinstance(message, dict)
                    and message.get("id") == request_id
                    and ("result" in message or "error" in message)
                ):
                    return _result_of(message, request_id)
                self._handle_message(message)
        except httpx2.SSEError as error:
            if "exceeded" in str(error):  # one event over the limit
                raise self._failure(f"the answer is larger than {limit} bytes", secrets) from None
            raise self._failure(
                f"the answer's event stream is unreadable: {error}", secrets
            ) from None
        raise self._failure("the answer's event stream ended without a response", secrets)

    def _post(self, message: dict[str, Any], timeout: float) -> None:
        """Send a notification or an answer; the server acknowledges with 202."""
        url, headers, secrets = self._endpoint()
        try:
            response = self.client.post(
                url,
                json=message,
                headers=self._headers(headers, "application/json, text/event-stream"),
                timeout=httpx2.Timeout(timeout),
            )
            response.close()
        except httpx2.HTTPError as error:
            raise self._failure(f"{type(error).__name__}: {error}", secrets) from None

    def _answer(self, message: dict[str, Any]) -> None:
        gevent.spawn(self._post_quietly, message)

    def _post_quietly(self, message: dict[str, Any]) -> None:
        try:
            self._post(message, 10.0)
        except McpError as error:
            logger.info("%s", error)

    # The server's own notifications -----------------------------------------------------

    def _listen(self) -> None:
        """Follow the session's GET stream for the server's notifications (tools/list_changed).

        A server that offers no such stream (405) is left alone; a stream that breaks is
        opened again after a pause while the session lasts.
        """
        while not self.closed and self.session_id is not None:
            try:
                url, headers, _ = self._endpoint()
                with self.client.stream(
                    "GET",
                    url,
                    headers=self._headers(headers, "text/event-stream"),
                    timeout=httpx2.Timeout(10.0, read=None),
                ) as response:
                    if response.status_code == 405:
                        return
                    if response.status_code < 400:
                        events = httpx2.EventSource(
                            response, max_event_size=self.settings.max_response_bytes
                        )
                        for event in events:
                            if event.data:
                                self._handle_message(json.loads(event.data))
            except (httpx2.HTTPError, McpError, ValueError) as error:
                logger.debug("MCP server %r: notification stream: %s", self.server.name, error)
            gevent.sleep(NOTIFICATION_RETRY)

    def close(self) -> None:
        self.closed = True
        if self._listener is not None:
            self._listener.kill(block=False)
        session, self.session_id = self.session_id, None
        if session is None:
            return
        try:
            url, headers, _ = self._endpoint()
            headers = {**headers, "Mcp-Session-Id": session}
            self.client.request("DELETE", url, headers=headers, timeout=5.0).close()
        except (httpx2.HTTPError, McpError):
            pass  # the server forgets idle sessions on its own


class _SessionExpired(Exception):
    pass


class StdioConnection(Connection):
    """A session with an MCP server that is a child process, over its stdin and stdout."""

    def __init__(
        self,
        server: McpServer,
        settings: McpSettings,
        on_notification: Notify,
        environ: Mapping[str, str],
    ) -> None:
        super().__init__(on_notification)
        self.server = server
        self.settings = settings
        self.environ = environ
        self.process: gevent.subprocess.Popen | None = None
        self._pending: dict[int, gevent.event.AsyncResult] = {}
        self._writing = gevent.lock.Semaphore()
        self._opening = gevent.lock.Semaphore()
        self._ready = False

    def _failure(self, detail: str) -> McpError:
        return McpError(f"MCP server {self.server.name!r} ({self.server.command}): {detail}")

    def request(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        self._open(timeout)
        return self._call(method, params, timeout)

    def _open(self, timeout: float) -> None:
        with self._opening:
            if self._ready and self.process is not None and self.process.poll() is None:
                return
            self._start()
            self._call("initialize", _initialize_params(), timeout)
            self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
            self._ready = True

    def _start(self) -> None:
        assert self.server.command is not None
        command = [expand(self.server.command, self.environ)]
        command += [expand(arg, self.environ) for arg in self.server.args]
        env = {**self.environ, **{k: expand(v, self.environ) for k, v in self.server.env.items()}}
        try:
            process = gevent.subprocess.Popen(
                command,
                stdin=gevent.subprocess.PIPE,
                stdout=gevent.subprocess.PIPE,
                stderr=gevent.subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        except OSError as error:
            raise self._failure(f"cannot start: {error.strerror or error}") from None
        self.process = process
        self._ready = False
        gevent.spawn(self._read, process)

    def _read(self, process: gevent.subprocess.Popen) -> None:
        """Hand each line the server writes to the request it answers, until it exits."""
        assert process.stdout is not None
        limit = self.settings.max_response_bytes
        while True:
            line = process.stdout.readline(limit + 1)
            if not line:
                break
            if len(line) > limit and not line.endswith(b"\n"):
                self._fail_pending(f"a message is larger than {limit} bytes")
                while line and not line.endswith(b"\n"):  # skip the rest of it
                    line = process.stdout.readline(65536)
                continue
            try:
                message = json.loads(line)
            except ValueError:
                continue  # a server may log to stdout; what is not JSON is not for us
            request_id = message.get("id") if isinstance(message, dict) else None
            if isinstance(request_id, int) and ("result" in message or "error" in message):
                waiter = self._pending.pop(request_id, None)
                if waiter is not None:
                    waiter.set(message)
            else:
                self._handle_message(message)
        code = process.wait()
        if self.process is process:
            self._ready = False
        self._fail_pending(f"the server process exited (code {code})")

    def _fail_pending(self, detail: str) -> None:
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.set_exception(self._failure(detail))

    def _send(self, message: dict[str, Any]) -> None:
        process = self.process
        if process is None or process.stdin is None or process.poll() is not None:
            raise self._failure("the server process is not running")
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self._writing:
            try:
                process.stdin.write(data)
                process.stdin.flush()
            except OSError as error:
                raise self._failure(f"cannot write to the server: {error}") from None

    def _answer(self, message: dict[str, Any]) -> None:
        try:
            self._send(message)
        except McpError as error:
            logger.info("%s", error)

    def _call(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        request_id = next(self._ids)
        waiter: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self._pending[request_id] = waiter
        try:
            self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            message = waiter.get(timeout=timeout)
        except gevent.Timeout:
            raise self._failure(f"no answer within {timeout:g} seconds") from None
        finally:
            if self._pending.pop(request_id, None) is not None:
                self._cancel(request_id)
        return _result_of(message, request_id)

    def _cancel(self, request_id: int) -> None:
        """Tell the server a request is no longer wanted (it timed out, or the run stopped)."""
        params = {"requestId": request_id, "reason": "The client stopped waiting."}
        self._answer({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})

    def close(self) -> None:
        process, self.process = self.process, None
        self._ready = False
        if process is not None and process.poll() is None:
            process.terminate()
            gevent.spawn(_reap, process)


def _reap(process: gevent.subprocess.Popen) -> None:
    try:
        process.wait(timeout=5)
    except gevent.subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# Servers, their sessions and their tool lists -------------------------------------------


def server_key(server: McpServer) -> str:
    """What identifies a server's definition: where it is and how it is reached, unexpanded."""
    return json.dumps(
        [
            server.guarded,
            server.url,
            sorted(server.headers.items()),
            server.command,
            server.args,
            sorted(server.env.items()),
        ]
    )


@dataclass
class _ToolList:
    tools: list[dict[str, Any]]
    fetched: float
    stale: bool = False


@dataclass
class _ServerState:
    """A server's tool list and the lock that lets one run at a time ask for it."""

    tool_list: _ToolList | None = None
    listing: gevent.lock.Semaphore = field(default_factory=gevent.lock.Semaphore)


class McpClients:
    """This worker's sessions with MCP servers and their tool lists."""

    def __init__(self, settings: McpSettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        self._servers: dict[str, _ServerState] = {}
        self._connections: OrderedDict[tuple[str, str], Connection] = OrderedDict()
        # One client for the servers of the agents file and Python, one for organisations'.
        self._http: dict[bool, httpx2.Client] = {}

    def _client(self, guarded: bool) -> httpx2.Client:
        client = self._http.get(guarded)
        if client is None:
            limits = httpx2.Limits(max_connections=None, max_keepalive_connections=256)
            with trio_hidden():
                transport = (
                    BackendTransport(GuardedBackend(self.settings.addresses), limits)
                    if guarded
                    else None
                )
                client = httpx2.Client(
                    limits=limits, follow_redirects=False, trust_env=False, transport=transport
                )
            self._http[guarded] = client
        return client

    def connection(self, server: McpServer, headers: Mapping[str, str]) -> Connection:
        """Return the session for a server and a run's headers, opening one if needed."""
        fingerprint = hashlib.sha256(json.dumps(sorted(headers.items())).encode()).hexdigest()
        key = (server_key(server), fingerprint)
        known = self._connections.get(key)
        if known is not None:
            self._connections.move_to_end(key)
            return known
        state = self._state(server)

        def changed(method: str) -> None:
            if method == "notifications/tools/list_changed" and state.tool_list is not None:
                state.tool_list.stale = True

        if server.url is not None:
            http = HttpConnection(
                self._client(server.guarded), server, headers, self.settings, changed, self.environ
            )
            # One session per server follows its notifications: the one without a run's own
            # headers, or else the first.
            http.listen = not headers or not any(k[0] == key[0] for k in self._connections)
            connection: Connection = http
        else:
            connection = StdioConnection(server, self.settings, changed, self.environ)
        self._connections[key] = connection
        while len(self._connections) > self.settings.max_sessions:
            _, evicted = self._connections.popitem(last=False)
            gevent.spawn(evicted.close)
        return connection

    def _state(self, server: McpServer) -> _ServerState:
        return self._servers.setdefault(server_key(server), _ServerState())

    def list_tools(self, server: McpServer, headers: Mapping[str, str]) -> list[dict[str, Any]]:
        """Return a server's tools as it describes them, from the cache while it is fresh.

        One run asks while the others wait for its answer. A server that fails to answer
        leaves the previous list in use, if there is one.
        """
        state = self._state(server)
        with state.listing:
            cached = state.tool_list
            if (
                cached
                and not cached.stale
                and time.monotonic() - cached.fetched < self.settings.tools_ttl
            ):
                return cached.tools
            try:
                tools = self._fetch_tools(server, headers)
            except McpError:
                if cached is None:
                    raise
                logger.warning(
                    "MCP server %r: listing tools failed; using the last list", server.name
                )
                return cached.tools
            state.tool_list = _ToolList(tools, time.monotonic())
            return tools

    def _fetch_tools(self, server: McpServer, headers: Mapping[str, str]) -> list[dict[str, Any]]:
        connection = self.connection(server, headers)
        tools: list[dict[str, Any]] = []
        cursor = None
        for _ in range(100):  # a server that pages without end cannot hold the run
            params: dict[str, Any] = {"cursor": cursor} if cursor else {}
            with gevent.Timeout(
                self.settings.list_timeout,
                McpError(
                    f"MCP server {server.name!r} did not list its tools within "
                    f"{self.settings.list_timeout:g} seconds."
                ),
            ):
                result = connection.request("tools/list", params, self.settings.list_timeout)
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                raise McpError(f"MCP server {server.name!r}: tools/list answered no tool list.")
            tools.extend(
                t for t in result["tools"] if isinstance(t, dict) and isinstance(t.get("name"), str)
            )
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                break
        return tools

    def call(
        self,
        server: McpServer,
        headers: Mapping[str, str],
        name: str,
        arguments: dict[str, Any],
        timeout: float,
    ) -> tuple[Any, str | None]:
        """Call a tool; return (result, error) as the agent loop reports them."""
        connection = self.connection(server, headers)
        result = connection.request("tools/call", {"name": name, "arguments": arguments}, timeout)
        return tool_result(result)

    def close(self) -> None:
        """Close every session (the worker is stopping)."""
        connections = list(self._connections.values())
        self._connections.clear()
        for connection in connections:
            connection.close()


def _schema(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool.get("inputSchema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return {"type": "object", "properties": {}}
    return schema


class McpToolbox:
    """The MCP tools of one run: its agent's servers, called with the run's own headers."""

    def __init__(
        self,
        clients: McpClients,
        servers: tuple[McpServer, ...],
        run_headers: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.clients = clients
        self.servers = servers
        self.run_headers = run_headers or {}
        self.tools: dict[str, McpTool] = {}
        # Servers whose tools could not be listed, and why: a call to one says so.
        self.unavailable: dict[str, str] = {}

    def headers(self, server: McpServer) -> Mapping[str, str]:
        return self.run_headers.get(server.name) or {}

    def list(self, taken: set[str]) -> list[McpTool]:
        """List the servers' tools (those the agent allows), named apart from ``taken``."""
        taken = set(taken)
        found = []
        for server in self.servers:
            try:
                described = self.clients.list_tools(server, self.headers(server))
            except McpError as error:
                logger.warning("%s", error)
                self.unavailable[server.name] = str(error)
                continue
            by_name = {str(t["name"]): t for t in described}
            names = server.tools if server.tools is not None else list(by_name)
            for remote_name in names:
                description = by_name.get(remote_name)
                if description is None:
                    continue  # allowed, but the server has no such tool (now)
                name = exposed_name(server.name, remote_name, taken)
                taken.add(name)
                found.append(
                    McpTool(
                        name=name,
                        server=server,
                        remote_name=remote_name,
                        description=str(description.get("description") or "")[:4096],
                        parameters=_schema(description),
                    )
                )
        self.tools = {tool.name: tool for tool in found}
        return found

    def unavailable_reason(self, name: str) -> str | None:
        """Why a tool of a server that could not be listed is missing, if it is one."""
        server, separator, _ = name.partition("__")
        if separator and server in self.unavailable:
            return self.unavailable[server]
        return None

    def call(
        self, tool: McpTool, arguments: dict[str, Any], timeout: float
    ) -> tuple[Any, str | None]:
        try:
            return self.clients.call(
                tool.server, self.headers(tool.server), tool.remote_name, arguments, timeout
            )
        except McpError as error:
            return None, str(error)
