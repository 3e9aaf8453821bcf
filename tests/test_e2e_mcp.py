"""Two hundred runs calling MCP tools at once in a real gunicorn, while other streams go on.

The server's agents file names an MCP server built with the official SDK (tests/mcp_server.py,
on a loopback port): each MCP run's one tool call waits half a second there, so all of them
wait together. Beside them, paced streams of a tool-less agent send an event every 50 ms. A
worker whose MCP calls held its event loop (a blocking client, or one queued behind a few
threads) would stall those streams for as long as the calls take; here they go on.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from .e2e_frames import assert_complete, content_of, parse_frames
from .mcp_servers import McpServerProcess
from .server import GunicornServer

MCP_RUNS = 200
PACED_STREAMS = 20
PACE = 0.05
PACED_DELTAS = 40
AGENTS_YAML = """\
agents:
  - id: crm_agent
    name: CRM assistant
    instructions: Use the CRM's tools.
    mcp_servers:
      - name: crm
        url: {url}
        headers: {{X-Tenant: "${{CRM_TENANT}}"}}
        tools: [slow]
  - id: paced_agent
    name: Paced assistant
    model_options:
      delay: {pace}
      content_deltas: {deltas}
"""


@pytest.fixture(scope="module")
def crm():
    with McpServerProcess() as server:
        yield server


@pytest.fixture(scope="module")
def mcp_server_app(tmp_path_factory, crm):
    folder = tmp_path_factory.mktemp("mcp_e2e")
    agents_file = folder / "agents.yaml"
    agents_file.write_text(
        AGENTS_YAML.format(url=crm.url, pace=PACE, deltas=PACED_DELTAS), encoding="utf-8"
    )
    env = {"AGENT_RUNS_AGENTS_FILE": str(agents_file), "CRM_TENANT": "acme"}
    with GunicornServer(folder, env=env) as running:
        yield running


class Stream(threading.Thread):
    """One client reading one run's stream to its end (a greenlet: the test process is patched)."""

    def __init__(self, server: GunicornServer, agent: str, message: str, go: threading.Event):
        super().__init__(daemon=True)
        self.server, self.agent, self.message, self.go = server, agent, message, go
        self.status: int | None = None
        self.body = ""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.go.wait(10)
            with requests.post(
                f"{self.server.url}/api/agents/{self.agent}/runs/stream",
                json={"message": self.message},
                headers={**self.server.headers, "Accept": "text/event-stream"},
                stream=True,
                timeout=(10, 60),
            ) as response:
                self.status = response.status_code
                self.body = b"".join(response.iter_content(chunk_size=None)).decode()
        except BaseException as error:  # reported by the test, not lost in the thread
            self.error = error


@pytest.fixture(scope="module")
def streams(mcp_server_app):
    go = threading.Event()
    mcp = [Stream(mcp_server_app, "crm_agent", f"0.5 (run {i})", go) for i in range(MCP_RUNS)]
    paced = [
        Stream(mcp_server_app, "paced_agent", f"paced stream {i:02d}, " + "a" * 60, go)
        for i in range(PACED_STREAMS)
    ]
    for stream in paced + mcp:
        stream.start()
    started = time.monotonic()
    go.set()
    for stream in paced + mcp:
        stream.join(timeout=max(0.1, 120 - (time.monotonic() - started)))
    assert not [s.message for s in paced + mcp if s.is_alive()], "streams still open after 120 s"
    failed = {s.message: repr(s.error) for s in paced + mcp if s.error}
    assert not failed, failed
    return mcp, paced


def test_every_mcp_run_gets_its_own_tool_result(streams):
    mcp, _ = streams
    for stream in mcp:
        assert stream.status == 200, stream.body[:500]
        frames = parse_frames(stream.body)
        assert_complete(frames)
        events = [frame.event for frame in frames]
        assert events.count("TOOL_START") == 1 and events.count("TOOL_END") == 1, events
        end = next(f for f in frames if f.event == "TOOL_END").json_data()
        assert end == {
            "id": "call_1",
            "name": "crm__slow",
            "result": f"slept {stream.message}",
        }, end
        assert content_of(frames) == f"crm__slow returned slept {stream.message}."


def test_the_mcp_calls_waited_together(streams):
    mcp, _ = streams
    spans = []
    for stream in mcp:
        frames = parse_frames(stream.body)
        start = next(f for f in frames if f.event == "TOOL_START").timestamp
        end = next(f for f in frames if f.event == "TOOL_END").timestamp
        spans.append((start, end))
        assert end - start >= 500  # each call really waited on the MCP server
    # Two hundred half-second calls one after another would take 100 s; side by side, all of
    # them were waiting at one instant.
    latest_start = max(start for start, _ in spans)
    earliest_end = min(end for _, end in spans)
    assert latest_start < earliest_end, (latest_start, earliest_end)


def test_the_other_streams_kept_their_pace(streams):
    mcp, paced = streams
    first_call = min(
        next(f for f in parse_frames(s.body) if f.event == "TOOL_START").timestamp for s in mcp
    )
    last_result = max(
        next(f for f in parse_frames(s.body) if f.event == "TOOL_END").timestamp for s in mcp
    )
    for stream in paced:
        assert stream.status == 200
        frames = parse_frames(stream.body)
        assert_complete(frames)
        deltas = [f.timestamp for f in frames if f.event == "CONTENT_DELTA"]
        assert len(deltas) == PACED_DELTAS
        assert content_of(frames) == f"You said: {stream.message}"
        # The stream was going while the MCP calls were: they did not wait for one another.
        assert deltas[0] < last_result and deltas[-1] > first_call
        # A loop held by the MCP calls would stall the stream for as long as they lasted
        # (their 200 half seconds, or a good part of them); no gap came near even half.
        gaps = [b - a for a, b in zip(deltas, deltas[1:], strict=False)]
        assert max(gaps) < (last_result - first_call) / 2, (gaps, last_result - first_call)
