"""Fifty streams at once against a real gunicorn: each gets its whole run, and so does the log.

The server serves its own agents file: the demo finance agent with a paced scripted model, so
every run lasts long enough for all fifty to be in flight together.
"""

from __future__ import annotations

import datetime
import re
import sqlite3
import threading
import time

import pytest
import requests

from .conftest import DATABASES, server_database
from .e2e_frames import Frame, assert_complete, content_of, parse_frames
from .server import GunicornServer

STREAMS = 50
DELAY = 0.08
AGENTS_YAML = f"""\
agents:
  - id: finance_agent
    name: Paced finance assistant
    description: The demo finance agent on a paced scripted model, so that streams overlap.
    instructions: Use get_stock_price, then answer with the price.
    tools:
      - agent_runs.runtime.demo_tools:get_stock_price
    model_options:
      delay: {DELAY}
      content_deltas: 6
"""
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture(scope="module", params=DATABASES)
def paced_server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("paced")
    agents_file = folder / "agents.yaml"
    agents_file.write_text(AGENTS_YAML, encoding="utf-8")
    env = {"AGENT_RUNS_AGENTS_FILE": str(agents_file), **server_database(request)}
    with GunicornServer(folder, env=env) as running:
        yield running


def ticker(index: int) -> str:
    return "Z" + chr(ord("A") + index // 26) + chr(ord("A") + index % 26)


def message(index: int) -> str:
    return f"What is the current {ticker(index)} stock price? (stream {index})"


class StreamClient(threading.Thread):
    """One client reading one stream to its end (a greenlet: the test process is patched)."""

    def __init__(self, server: GunicornServer, index: int, go: threading.Event) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.index = index
        self.go = go
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.go.wait(10)
            with requests.post(
                f"{self.server.url}/api/agents/finance_agent/runs/stream",
                json={"message": message(self.index)},
                headers={**self.server.headers, "Accept": "text/event-stream"},
                stream=True,
                timeout=(5, 30),
            ) as response:
                self.status = response.status_code
                self.headers = dict(response.headers)
                chunks = []
                for chunk in response.iter_content(chunk_size=None):
                    chunks.append(chunk)
                self.body = b"".join(chunks)
        except BaseException as error:  # reported by the test, not lost in the thread
            self.error = error


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    """Return the largest number of intervals open at one instant."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = most = 0
    for _, step in points:
        open_now += step
        most = max(most, open_now)
    return most


@pytest.fixture(scope="module")
def streams(paced_server):
    """Run the fifty streams once; the tests below read what each of them received."""
    go = threading.Event()
    clients = [StreamClient(paced_server, index, go) for index in range(STREAMS)]
    for client in clients:
        client.start()
    started = time.monotonic()
    go.set()
    for client in clients:
        client.join(timeout=max(0.1, 60 - (time.monotonic() - started)))
    stuck = [client.index for client in clients if client.is_alive()]
    assert not stuck, f"streams still open after 60 s: {stuck}"
    failed = {client.index: repr(client.error) for client in clients if client.error}
    assert not failed, failed
    return clients


@pytest.fixture(scope="module")
def runs(streams):
    """Each stream's frames and the run id and session id its START announced."""
    result = []
    for client in streams:
        assert client.status == 200, client.body[:500]
        frames = parse_frames(client.body.decode("utf-8"))
        start = frames[0].json_data()
        result.append((client.index, start["runId"], start["sessionId"], frames))
    return result


def test_every_stream_gets_a_complete_gap_free_run(streams, runs):
    for client in streams:
        assert client.headers["Content-Type"].startswith("text/event-stream")
        assert client.headers["Cache-Control"] == "no-cache"
    run_ids = [run_id for _, run_id, _, _ in runs]
    assert len(set(run_ids)) == STREAMS
    assert len({session_id for _, _, session_id, _ in runs}) == STREAMS

    for index, _, _, frames in runs:
        assert_complete(frames)
        events = [frame.event for frame in frames]
        assert events == (
            ["START", "REASONING_DELTA", "REASONING_DELTA", "TOOL_START", "TOOL_END"]
            + ["CONTENT_DELTA"] * 6
            + ["STOP"]
        ), (index, events)
        # Each stream carries its own run: its own message, its own tool call and answer.
        reasoning = "".join(f.data for f in frames if f.event == "REASONING_DELTA")
        assert f'"{message(index)}"' in reasoning
        tool_start = next(f for f in frames if f.event == "TOOL_START").json_data()
        assert tool_start["arguments"] == {"ticker": ticker(index)}
        tool_end = next(f for f in frames if f.event == "TOOL_END").json_data()
        assert content_of(frames) == f"get_stock_price returned {tool_end['result']}."


def test_the_streams_really_ran_together(runs):
    # Server-side: from each run's START to its STOP, by the events' own timestamps.
    intervals = [(frames[0].timestamp, frames[-1].timestamp) for _, _, _, frames in runs]
    for start, end in intervals:
        # Nine paced model steps: no run could finish faster, so none was skipped over.
        assert end - start >= 9 * DELAY * 1000 * 0.9
    assert max_overlap(intervals) >= STREAMS * 0.8, intervals


def test_batch_status_reports_all_fifty_completed(paced_server, runs):
    run_ids = [run_id for _, run_id, _, _ in runs]
    response = requests.get(
        f"{paced_server.url}/api/agents/finance_agent/runs/status",
        params={"runIds": ",".join(run_ids)},
        headers=paced_server.headers,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    statuses = response.json()
    assert [status["id"] for status in statuses] == run_ids
    for status, (_, _, session_id, frames) in zip(statuses, runs, strict=True):
        assert status["agentId"] == "finance_agent"
        assert status["sessionId"] == session_id
        assert status["status"] == "COMPLETED"
        assert status["content"] == content_of(frames)
        assert ISO_UTC.match(status["createdAt"]), status
        assert ISO_UTC.match(status["completedAt"]), status
        created = datetime.datetime.strptime(status["createdAt"], "%Y-%m-%dT%H:%M:%SZ")
        completed = datetime.datetime.strptime(status["completedAt"], "%Y-%m-%dT%H:%M:%SZ")
        assert created <= completed
        # The seconds shown match the events' epoch milliseconds (UTC, not local time).
        started_at = datetime.datetime.fromtimestamp(
            frames[0].timestamp / 1000, datetime.timezone.utc
        ).replace(tzinfo=None)
        assert abs((created - started_at).total_seconds()) < 2

    # The single-run endpoint agrees for a few of them.
    for _, run_id, session_id, frames in runs[:3] + runs[-2:]:
        single = requests.get(
            f"{paced_server.url}/api/agents/finance_agent/runs/{run_id}/status",
            headers=paced_server.headers,
            timeout=10,
        )
        assert single.status_code == 200, single.text
        body = single.json()
        assert body["id"] == run_id and body["sessionId"] == session_id
        assert body["status"] == "COMPLETED" and body["content"] == content_of(frames)
        assert ISO_UTC.match(body["createdAt"]) and ISO_UTC.match(body["completedAt"])


def stored_events(server: GunicornServer, run_ids: list[str]) -> dict[str, list[Frame]]:
    """Read the run_event rows of the server's database, beside the server (read-only)."""
    url = server.env["AGENT_RUNS_DATABASE_URL"]
    query = (
        "SELECT run_id, seq, type, data, timestamp FROM run_event"
        " WHERE run_id IN ({}) ORDER BY run_id, seq"
    )
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url) as connection:
            rows = connection.execute(
                query.format(",".join(["%s"] * len(run_ids))), run_ids
            ).fetchall()
    else:
        assert url.startswith("sqlite:///"), url
        path = url[len("sqlite:///") :]
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            placeholders = ",".join("?" * len(run_ids))
            rows = connection.execute(query.format(placeholders), run_ids).fetchall()
        finally:
            connection.close()
    stored: dict[str, list[Frame]] = {run_id: [] for run_id in run_ids}
    for run_id, seq, type_, data, timestamp in rows:
        stored[run_id].append(Frame(seq, type_, data, timestamp))
    return stored


def test_each_run_event_log_holds_exactly_what_its_stream_carried(paced_server, runs):
    stored = stored_events(paced_server, [run_id for _, run_id, _, _ in runs])
    for _, run_id, _, frames in runs:
        assert len(stored[run_id]) == len(frames), run_id
        assert stored[run_id] == frames, run_id
