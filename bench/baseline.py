"""The baseline: a bare Flask app that streams the benchmark's frames and does nothing else.

It answers ``POST /api/agents/<agent_id>/runs/stream`` with the events a run of the
benchmark's agent produces on our server (START, two REASONING_DELTA, TOOL_START, TOOL_END,
``deltas`` CONTENT_DELTA, STOP), framed byte for byte like ours (``id: N`` + one JSON
``data:`` line), at the same pacing as the scripted model (``delay`` seconds before each
reasoning delta, before the tool call and before each content delta). Query parameters
``deltas`` (default 50) and ``delay`` (default 0.02) choose the shape. No auth, no database,
no run greenlet: what Flask on the same stack costs.

``GET /api/agents/<agent_id>/runs/status?runIds=a,b`` answers AgentRun-shaped objects for the
ids asked, made up on the spot: the cost of parsing the query and serialising 100 objects.

``floor`` answers the same two requests as a plain WSGI callable, without Flask: what gunicorn
and gevent cost on their own (``bench/run.py --targets ours,baseline,floor``).

    gunicorn -k gevent -w 1 --worker-connections 12000 --chdir bench baseline:app
    gunicorn -k gevent -w 1 --worker-connections 12000 --chdir bench baseline:floor
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import parse_qs

import gevent
from flask import Flask, Response, jsonify, request

app = Flask(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TOOL = "echo"


def _frame(seq: int, type: str, data: str) -> bytes:
    payload = json.dumps(
        {"event": type, "data": data, "timestamp": time.time_ns() // 1_000_000},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return f"id: {seq}\ndata: {payload}\n\n".encode()


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _split(text: str, parts: int) -> list[str]:
    """Split text into exactly ``parts`` pieces, as the scripted model does."""
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def _events(message: str, deltas: int, delay: float) -> Iterator[tuple[str, str]]:
    """Yield (type, data) of one run, sleeping where the scripted model sleeps."""

    def pace() -> None:
        if delay:
            gevent.sleep(delay)

    run_id = "run_" + uuid.uuid4().hex
    yield "START", _json({"runId": run_id, "sessionId": str(uuid.uuid4())})
    for text in (f'The user asks: "{message[:200]}". ', f"I should call {TOOL}."):
        pace()
        yield "REASONING_DELTA", text
    pace()
    yield "TOOL_START", _json({"id": "call_1", "name": TOOL, "arguments": {"text": message}})
    yield "TOOL_END", _json({"id": "call_1", "name": TOOL, "result": message})
    for piece in _split(f"{TOOL} returned {message}.", deltas):
        pace()
        if piece:
            yield "CONTENT_DELTA", piece
    yield "STOP", ""


def _frames(message: str, deltas: int, delay: float) -> Iterator[bytes]:
    """The SSE frames of one run, ids from 1."""
    for seq, (type, data) in enumerate(_events(message, deltas, delay), start=1):
        yield _frame(seq, type, data)


@app.post("/api/agents/<agent_id>/runs/stream")
def stream_run(agent_id: str) -> Response:
    message = (request.get_json(silent=True) or {}).get("message", "")
    deltas = int(request.args.get("deltas", 50))
    delay = float(request.args.get("delay", 0.02))
    return Response(
        _frames(message, deltas, delay),
        mimetype="text/event-stream",
        headers=SSE_HEADERS,
        direct_passthrough=True,
    )


@app.get("/api/agents/<agent_id>/runs/status")
def batch_status(agent_id: str) -> Response:
    return jsonify(_statuses(agent_id, request.args.get("runIds", "")))


def _statuses(agent_id: str, run_ids: str) -> list[dict]:
    ids = [part for part in run_ids.split(",") if part][:100]
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return [
        {
            "id": run_id,
            "agentId": agent_id,
            "sessionId": run_id,
            "userId": None,
            "orgId": "bench",
            "status": "COMPLETED",
            "model": "scripted",
            "content": "",
            "usage": {"inputTokens": 0, "outputTokens": 0},
            "error": None,
            "requiredAction": None,
            "createdAt": now,
            "startedAt": now,
            "completedAt": now,
        }
        for run_id in ids
    ]


AGENTS = [{"id": "bench"}, {"id": "bench_fast"}]


@app.get("/api/agents")
def agents() -> Response:
    return jsonify(AGENTS)


def floor(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """The baseline's endpoints as a bare WSGI callable: the same frames at the same pacing,
    and the same status answer, with no framework in between."""
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    query = {name: values[0] for name, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
    # "", api, agents, <agent_id>, runs, stream | status
    parts = path.split("/")
    run_path = len(parts) == 6 and parts[:3] == ["", "api", "agents"] and parts[3] != ""
    if method == "POST" and run_path and parts[4:] == ["runs", "stream"]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        start_response(
            "200 OK", [("Content-Type", "text/event-stream; charset=utf-8"), *SSE_HEADERS.items()]
        )
        return _frames(message, int(query.get("deltas", 50)), float(query.get("delay", 0.02)))
    if method == "GET" and run_path and parts[4:] == ["runs", "status"]:
        answer = _as_jsonify(_statuses(parts[3], query.get("runIds", "")))
    elif method == "GET" and path == "/api/agents":
        answer = _as_jsonify(AGENTS)
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))]
    )
    return [answer]


def _as_jsonify(value: object) -> bytes:
    """JSON as Flask's jsonify writes it outside debug mode: compact, keys sorted, a newline."""
    return (json.dumps(value, separators=(",", ":"), sort_keys=True) + "\n").encode()
