"""A small Anthropic Messages API server for tests: it replays scripted streaming replies.

It speaks the Messages streaming wire protocol (``POST /v1/messages`` with ``"stream": true``
answered by Server-Sent Events, each an ``event: <type>`` line and a ``data: <json>`` line, or
by an error status with a ``{"type": "error", "error": {...}}`` body), so the provider under
test runs the real SDK and its HTTP client against it. Each request takes the next scripted
reply; a reply may also be a function of the request body.

    with FakeAnthropic() as fake:
        fake.script(answer("Hi"))
        ... base_url = fake.url ...
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

MODEL = "claude-test"


@dataclass
class Stream:
    """A 200 text/event-stream reply made of these events.

    ``cut_after`` drops the connection after that many events, mid-body; ``delay`` paces them.
    """

    events: list[dict[str, Any]]
    cut_after: int | None = None
    delay: float = 0.0


@dataclass
class Error:
    """An error reply as Anthropic sends it: ``{"type": "error", "error": {type, message}}``."""

    status: int
    message: str = "error"
    type: str = "api_error"
    headers: dict[str, str] = field(default_factory=dict)


Reply = Stream | Error | Callable[[dict[str, Any]], "Stream | Error"]


# Events ------------------------------------------------------------------------------------


def message_start(input_tokens: int = 10, **usage: int) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1, **usage},
        },
    }


def text_block(index: int) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "text", "text": ""},
    }


def thinking_block(index: int) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    }


def redacted_thinking_block(index: int, data: str) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "redacted_thinking", "data": data},
    }


def tool_use_block(index: int, id: str, name: str) -> dict[str, Any]:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}},
    }


def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def text_delta(index: int, text: str) -> dict[str, Any]:
    return _delta(index, {"type": "text_delta", "text": text})


def thinking_delta(index: int, thinking: str) -> dict[str, Any]:
    return _delta(index, {"type": "thinking_delta", "thinking": thinking})


def signature_delta(index: int, signature: str) -> dict[str, Any]:
    return _delta(index, {"type": "signature_delta", "signature": signature})


def input_json(index: int, partial_json: str) -> dict[str, Any]:
    return _delta(index, {"type": "input_json_delta", "partial_json": partial_json})


def block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str, output_tokens: int = 5) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }


def message_stop() -> dict[str, Any]:
    return {"type": "message_stop"}


def ping() -> dict[str, Any]:
    return {"type": "ping"}


def error_event(type: str = "overloaded_error", message: str = "Overloaded") -> dict[str, Any]:
    return {"type": "error", "error": {"type": type, "message": message}}


def api_key(headers: dict[str, str]) -> str | None:
    """The key a request carried: ``x-api-key``, or a bearer token (SDK releases from 2.0)."""
    if "x-api-key" in headers:
        return headers["x-api-key"]
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else None


def stream(events: list[dict[str, Any]], **kwargs: Any) -> Stream:
    return Stream(events, **kwargs)


def answer(text: str, *, pieces: int = 1, input_tokens: int = 10, **kwargs: Any) -> Stream:
    """A plain streamed answer: one text block with the text in ``pieces``, end_turn."""
    size = max(1, -(-len(text) // pieces))
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    return Stream(
        [message_start(input_tokens), text_block(0), ping()]
        + [text_delta(0, part) for part in parts]
        + [block_stop(0), message_delta("end_turn", len(parts)), message_stop()],
        **kwargs,
    )


# The server --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/messages":
            self._error(Error(404, f"no route {self.path}", "not_found_error"))
            return
        request = json.loads(body)
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = fake._record(request, headers)
        if callable(reply):
            reply = reply(request)
        if not request.get("stream"):
            reply = Error(400, "this fake server only streams", "invalid_request_error")
        if isinstance(reply, Error):
            self._error(reply)
        else:
            self._stream(reply)

    def _error(self, error: Error) -> None:
        body = json.dumps(
            {"type": "error", "error": {"type": error.type, "message": error.message}}
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
            for number, event in enumerate(reply.events):
                if reply.cut_after is not None and number == reply.cut_after:
                    outcome = "cut"
                    break
                if reply.delay:
                    time.sleep(reply.delay)
                data = json.dumps(event).encode()
                self._write_chunk(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), data))
            else:
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
    fake: FakeAnthropic


class FakeAnthropic:
    """An Anthropic Messages API server on 127.0.0.1, on a port the kernel picks.

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

    def start(self) -> FakeAnthropic:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
