"""A small OpenAI-compatible server for tests: it replays scripted streaming replies over HTTP.

It speaks the chat completions wire protocol (``POST /v1/chat/completions`` answered by
``data: {chunk}`` Server-Sent Events and ``data: [DONE]``, or by an error status with an
``{"error": {...}}`` body), so the provider under test runs its real HTTP client against it.
Each request takes the next scripted reply; a reply may also be a function of the request body.

    with FakeOpenAI() as fake:
        fake.script(stream([chunk(content="Hi"), chunk(finish_reason="stop")]))
        ... base_url = fake.url + "/v1" ...
        fake.requests[0]["messages"]
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Stream:
    """A 200 text/event-stream reply: these chunks, then ``[DONE]``.

    ``cut_after`` drops the connection after that many chunks, mid-body; ``delay`` paces them.
    """

    chunks: list[dict[str, Any]]
    cut_after: int | None = None
    delay: float = 0.0


@dataclass
class Error:
    """An error reply in the OpenAI shape: ``{"error": {"message", "type", "code"}}``."""

    status: int
    message: str = "error"
    headers: dict[str, str] = field(default_factory=dict)


Reply = Stream | Error | Callable[[dict[str, Any]], "Stream | Error"]


def stream(chunks: list[dict[str, Any]], **kwargs: Any) -> Stream:
    return Stream(chunks, **kwargs)


def chunk(
    content: str | None = None,
    *,
    finish_reason: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    role: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a single choice; ``extra`` joins its delta."""
    delta: dict[str, Any] = dict(extra)
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1746518400,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def tool_call(
    index: int, *, id: str | None = None, name: str | None = None, arguments: str | None = None
) -> dict[str, Any]:
    """A tool-call fragment as it appears in a chunk's ``delta.tool_calls``."""
    fragment: dict[str, Any] = {"index": index}
    function: dict[str, Any] = {}
    if id is not None:
        fragment.update(id=id, type="function")
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    if function:
        fragment["function"] = function
    return fragment


def usage_chunk(prompt: int, completion: int, reasoning: int | None = None) -> dict[str, Any]:
    """The last chunk ``stream_options.include_usage`` asks for: no choices, the usage."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1746518400,
        "model": "test-model",
        "choices": [],
        "usage": usage,
    }


def answer(text: str, *, pieces: int = 1) -> Stream:
    """A plain streamed answer: the role, the text in ``pieces``, stop, usage."""
    size = max(1, -(-len(text) // pieces))
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    return Stream(
        [chunk(role="assistant", content="")]
        + [chunk(part) for part in parts]
        + [chunk(finish_reason="stop"), usage_chunk(10, len(parts))]
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/chat/completions":
            self._error(Error(404, f"no route {self.path}"))
            return
        request = json.loads(body)
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = fake._record(request, headers)
        if callable(reply):
            reply = reply(request)
        if isinstance(reply, Error):
            self._error(reply)
        else:
            self._stream(reply)

    def _error(self, error: Error) -> None:
        body = json.dumps(
            {"error": {"message": error.message, "type": "fake_error", "code": error.status}}
        ).encode()
        self.send_response(error.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in error.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, reply: Stream) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        outcome = "done"
        try:
            for number, event in enumerate(reply.chunks):
                if reply.cut_after is not None and number == reply.cut_after:
                    outcome = "cut"
                    break
                if reply.delay:
                    time.sleep(reply.delay)
                self._write_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            else:
                self._write_chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            outcome = "client closed"
        if outcome != "done":
            # End the connection without the last chunk of the body: an interrupted stream.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server.fake._finished(outcome)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1, on a port the kernel picks.

    ``requests`` holds the JSON bodies received, ``headers`` their headers (lower-case names),
    ``outcomes`` how each stream ended: ``"done"``, ``"cut"`` (scripted) or ``"client closed"``.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.outcomes: list[str] = []
        self._replies: list[Reply] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, *replies: Reply) -> None:
        """Queue replies, served one per request in order."""
        with self._lock:
            self._replies.extend(replies)

    def wait_for_outcomes(self, count: int, timeout: float = 5.0) -> list[str]:
        """Wait until ``count`` streams have ended; return how they ended."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.outcomes)

    def _record(self, request: dict[str, Any], headers: dict[str, str]) -> Reply:
        with self._lock:
            self.requests.append(request)
            self.headers.append(headers)
            if not self._replies:
                return Error(500, "the fake server has no reply scripted for this request")
            return self._replies.pop(0)

    def _finished(self, outcome: str) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def start(self) -> FakeOpenAI:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
