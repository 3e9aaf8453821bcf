"""A model server for the benchmark that speaks OpenAI's and Anthropic's streaming protocols.

    python bench/fake_model.py        # prints the port it listens on (127.0.0.1), then serves

With ``--model openai`` or ``--model anthropic``, run.py points the benchmark agents at this
server instead of the in-process ``scripted`` model, so a run's tokens arrive over HTTP through
the provider's SDK, as they do from a real model. It answers as the scripted model does, with
the same events: a request with tools and no tool result gets two reasoning deltas and a call
of the first tool with ``{"text": <the user's message>}``; a request with a tool result gets
"<tool> returned <result>." in as many content deltas as the model name asks. The model name
is ``bench-<deltas>-<delay>``: that many deltas, ``delay`` seconds apart (every delta paced,
as the scripted model paces them).

``POST /v1/chat/completions`` answers with chat completion chunks and ``data: [DONE]``;
``POST /v1/messages`` with Messages API events (thinking for the reasoning, tool_use for the
call). A gevent server: one process holds thousands of streams.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

REASONING = ("The user asks to echo a message. ", "I should call echo.")


def shape(model: str) -> tuple[int, float]:
    """Return (deltas, delay) from a model name ``bench-<deltas>-<delay>``."""
    try:
        _, deltas, delay = model.split("-", 2)
        return max(1, int(deltas)), max(0.0, float(delay))
    except ValueError:
        return 50, 0.0


def split(text: str, parts: int) -> list[str]:
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end] or " ")
        start = end
    return pieces


def pace(delay: float) -> None:
    if delay:
        gevent.sleep(delay)


# OpenAI chat completions -------------------------------------------------------------------


def openai_chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def openai_usage(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "choices": []}
    return b"data: " + json.dumps({**chunk, "usage": usage}).encode() + b"\n\n"


def openai_stream(body: dict[str, Any]) -> Iterator[bytes]:
    deltas, delay = shape(str(body.get("model", "")))
    messages = body.get("messages") or []
    results = [m for m in messages if m.get("role") == "tool"]
    yield openai_chunk({"role": "assistant", "content": ""})
    if body.get("tools") and not results:
        for text in REASONING:
            pace(delay)
            yield openai_chunk({"reasoning_content": text})
        name = body["tools"][0]["function"]["name"]
        asked = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        arguments = json.dumps({"text": asked})
        pace(delay)
        call = {"index": 0, "id": "call_1", "type": "function"}
        yield openai_chunk({"tool_calls": [{**call, "function": {"name": name, "arguments": ""}}]})
        for half in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
            yield openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": half}}]})
        yield openai_chunk(finish="tool_calls")
        yield openai_usage(10, 10)
    else:
        answer = " ".join(f"echo returned {m.get('content', '')}." for m in results) or "Hello."
        for piece in split(answer, deltas):
            pace(delay)
            yield openai_chunk({"content": piece})
        yield openai_chunk(finish="stop")
        yield openai_usage(10, deltas)
    yield b"data: [DONE]\n\n"


# Anthropic messages ------------------------------------------------------------------------


def event(data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (data["type"].encode(), json.dumps(data).encode())


def block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return event({"type": "content_block_delta", "index": index, "delta": delta})


def anthropic_stream(body: dict[str, Any]) -> Iterator[bytes]:
    deltas, delay = shape(str(body.get("model", "")))
    messages = body.get("messages") or []
    results = [
        block
        for message in messages
        if isinstance(message.get("content"), list)
        for block in message["content"]
        if block.get("type") == "tool_result"
    ]
    usage = {"input_tokens": 10, "output_tokens": 1}
    message = {"id": "msg_bench", "type": "message", "role": "assistant", "content": []}
    yield event({"type": "message_start", "message": {**message, "usage": usage}})
    if body.get("tools") and not results:
        thinking = {"type": "thinking", "thinking": "", "signature": ""}
        yield event({"type": "content_block_start", "index": 0, "content_block": thinking})
        for text in REASONING:
            pace(delay)
            yield block_delta(0, {"type": "thinking_delta", "thinking": text})
        yield event({"type": "content_block_stop", "index": 0})
        name = body["tools"][0]["name"]
        asked = ""
        for entry in reversed(messages):
            if entry.get("role") == "user":
                content = entry.get("content")
                asked = content if isinstance(content, str) else content[-1].get("text", "")
                break
        arguments = json.dumps({"text": asked})
        pace(delay)
        tool = {"type": "tool_use", "id": "toolu_1", "name": name, "input": {}}
        yield event({"type": "content_block_start", "index": 1, "content_block": tool})
        for half in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
            yield block_delta(1, {"type": "input_json_delta", "partial_json": half})
        yield event({"type": "content_block_stop", "index": 1})
        stop, output = "tool_use", 10
    else:
        texts = [r["content"] if isinstance(r.get("content"), str) else "" for r in results]
        answer = " ".join(f"echo returned {text}." for text in texts) or "Hello."
        yield event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        )
        for piece in split(answer, deltas):
            pace(delay)
            yield block_delta(0, {"type": "text_delta", "text": piece})
        yield event({"type": "content_block_stop", "index": 0})
        stop, output = "end_turn", deltas
    yield event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": output},
        }
    )
    yield event({"type": "message_stop"})


def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    path = environ.get("PATH_INFO", "")
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        body = json.loads(environ["wsgi.input"].read(length) or b"{}")
    except ValueError:
        body = None
    if environ["REQUEST_METHOD"] != "POST" or not isinstance(body, dict):
        start_response("400 Bad Request", [("Content-Type", "application/json")])
        return iter([b'{"error": {"message": "POST a JSON object"}}'])
    if path.endswith("/chat/completions"):
        stream = openai_stream(body)
    elif path.endswith("/messages"):
        stream = anthropic_stream(body)
    else:
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return iter([b'{"error": {"message": "no such route"}}'])
    start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
    return stream


def main() -> int:
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=sys.stderr)
    server.start()
    print(server.server_port, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
