"""agent_runs.client against a real gunicorn, directly and through a proxy that cuts streams."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest

import agent_runs
from agent_runs.client import (
    AgentRunsClient,
    AgentRunsError,
    ApiError,
    ConnectionLost,
    ContentDelta,
    ErrorEvent,
    Event,
    ReasoningDelta,
    Start,
    Stop,
    ToolEnd,
    ToolStart,
)

from .client_server import serve_agents


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_agents(tmp_path_factory.mktemp("client")) as running:
        yield running


@pytest.fixture
def client(server):
    with AgentRunsClient(server.url, server.token) as client:
        yield client


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that cuts the n-th connection after ``budgets[n]`` bytes.

    Requests go through whole; the server's answer on connection n is forwarded up to
    ``budgets[n]`` bytes, then both sides are closed (``reset``: with a TCP RST rather than a
    FIN). Connections beyond the budgets are forwarded untouched.
    """

    def __init__(self, target_port: int, budgets: list[int], *, reset: bool = False) -> None:
        self.target_port = target_port
        self.budgets = budgets
        self.reset = reset
        self.connections = 0
        self.cuts = 0
        # What the server answered on each connection, as far as it was forwarded.
        self.answers: list[bytearray] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            index, self.connections = self.connections, self.connections + 1
            budget = self.budgets[index] if index < len(self.budgets) else None
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.answers.append(bytearray())
            threading.Thread(target=self._pump, args=(downstream, upstream, None, None)).start()
            threading.Thread(
                target=self._pump, args=(upstream, downstream, budget, self.answers[-1])
            ).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        budget: int | None,
        record: bytearray | None,
    ) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if budget is not None and sent + len(data) >= budget:
                    data = data[: budget - sent]
                    sink.sendall(data)
                    if record is not None:
                        record += data
                    self.cuts += 1
                    if self.reset:
                        sink.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    break
                sink.sendall(data)
                sent += len(data)
                if record is not None:
                    record += data
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.close()
                except OSError:
                    pass


# Long enough for each of the paced agent's eighty deltas to carry text.
LONG_MESSAGE = "every event exactly once " * 10


def content(events: list[Event]) -> str:
    return "".join(event.text for event in events if isinstance(event, ContentDelta))


def as_tuples(events: list[Event]) -> list[tuple[int, str, object]]:
    return [(event.id, event.event, event.data) for event in events]


# Runs ---------------------------------------------------------------------------------------


def test_stream_yields_typed_events_in_order(client):
    stream = client.stream("finance_agent", "What is NVDA trading at?")
    events = list(stream)
    assert [event.id for event in events] == list(range(1, len(events) + 1))
    start, *_, stop = events
    assert isinstance(start, Start) and start.run_id.startswith("run_")
    assert stream.run_id == start.run_id and stream.session_id == start.session_id
    assert isinstance(stop, Stop) and stop.reason is None and not stop.paused
    kinds = {type(event) for event in events}
    assert {ReasoningDelta, ToolStart, ToolEnd, ContentDelta} <= kinds
    tool_start = next(event for event in events if isinstance(event, ToolStart))
    tool_end = next(event for event in events if isinstance(event, ToolEnd))
    assert tool_start.name == tool_end.name == "get_stock_price"
    assert tool_start.arguments["ticker"] == "NVDA"
    assert tool_end.error is None and tool_end.result
    assert all(event.timestamp > 0 for event in events)
    status = client.status("finance_agent", start.run_id)
    assert status["status"] == "COMPLETED" and status["content"] == content(events)


def test_run_waits_for_the_answer(client):
    answer = client.run("assistant", "hello there", generate_followups=True)
    assert answer["status"] == "COMPLETED"
    assert answer["content"] == "You said: hello there"
    assert len(answer["followups"]) == 3
    again = client.run("assistant", "and again", session_id=answer["sessionId"])
    assert again["content"] == "(turn 2) You said: and again"


def test_background_then_events_from_the_start_and_after_an_id(client):
    queued = client.background("paced", "in the background")
    assert queued["status"] == "QUEUED" and queued["runId"].startswith("run_")
    everything = list(client.events("paced", queued["runId"]))
    assert isinstance(everything[-1], Stop)
    assert content(everything) == "You said: in the background"
    rest = list(client.events("paced", queued["runId"], after=5))
    assert as_tuples(rest) == as_tuples(everything[5:])


def test_status_many_leaves_unknown_runs_out(client):
    first = client.run("assistant", "one")
    second = client.run("assistant", "two")
    runs = client.status_many("assistant", [first["runId"], "run_unknown", second["runId"]])
    assert [run["id"] for run in runs] == [first["runId"], second["runId"]]
    assert {run["status"] for run in runs} == {"COMPLETED"}


def test_cancel_stops_a_run_and_its_stream_ends_cancelled(client):
    stream = client.stream("chatty", "talk to me")
    for event in stream:
        if isinstance(event, ContentDelta):
            break
    assert client.cancel("chatty", stream.run_id) is True
    rest = list(stream)
    assert isinstance(rest[-1], Stop) and rest[-1].reason == "cancelled"
    assert client.status("chatty", stream.run_id)["status"] == "CANCELLED"
    assert client.cancel("chatty", stream.run_id) is False


def test_a_paused_run_is_approved_and_its_events_go_on(client):
    events = list(client.stream("banker", "wire 100"))
    pause = events[-1]
    assert isinstance(pause, Stop) and pause.paused
    assert pause.required_action["tool"] == "wire_money"
    run_id = events[0].run_id
    assert client.status("banker", run_id)["status"] == "PAUSED"
    answer = client.continue_run("banker", run_id, "APPROVE")
    assert answer["status"] == "COMPLETED" and "sent" in answer["content"]
    after = list(client.events("banker", run_id, after=pause.id))
    assert after[0].id == pause.id + 1 and isinstance(after[-1], Stop)
    assert any(isinstance(event, ToolEnd) and event.name == "wire_money" for event in after)


def test_sessions_list_read_and_delete(client):
    answer = client.run("assistant", "remember me")
    session_id = answer["sessionId"]
    assert session_id in [session["id"] for session in client.sessions(agent_id="assistant")]
    # A page of one session at a time still yields them all.
    assert len(list(client.sessions(page_size=1))) == len(list(client.sessions()))
    detail = client.session(session_id)
    assert [message["role"] for message in detail["messages"]] == ["user", "assistant"]
    assert [run["id"] for run in client.session_runs(session_id)] == [answer["runId"]]
    client.delete_session(session_id)
    with pytest.raises(ApiError) as missing:
        client.session(session_id)
    assert missing.value.status == 404


# Errors -------------------------------------------------------------------------------------


def test_errors_carry_the_problem_document(client, server):
    with pytest.raises(ApiError) as unknown:
        client.stream("no_such_agent", "hi")
    assert unknown.value.status == 404 and unknown.value.title == "Not Found"
    assert "no_such_agent" in unknown.value.detail
    with pytest.raises(ApiError) as invalid:
        client.run("assistant", "")
    assert invalid.value.status == 422 and "message" in invalid.value.errors
    with AgentRunsClient(server.url, "ar_wrong") as stranger:
        with pytest.raises(ApiError) as refused:
            stranger.agents()
    assert refused.value.status == 401 and refused.value.detail
    with pytest.raises(TypeError, match="sesion_id"):
        client.run("assistant", "hi", sesion_id="typo")


def test_an_unreachable_server_raises_connection_lost():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    # Nothing listens there now.
    with AgentRunsClient(f"http://127.0.0.1:{port}", "ar_x") as client:
        with pytest.raises(ConnectionLost, match="Cannot reach"):
            client.agents()
        with pytest.raises(ConnectionLost):
            client.stream("assistant", "hi")


def test_a_server_that_is_not_agent_runs_is_named(server):
    with AgentRunsClient(server.url, server.token, prefix="/nowhere") as client:
        with pytest.raises(AgentRunsError):
            client.stream("assistant", "hi")


# Resuming -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budgets", "reset"),
    [
        ([900], False),  # one cut, mid-stream
        ([700, 450, 1300], False),  # three cuts in a row, the later ones on /events
        ([1000, 333], True),  # connections reset rather than closed
    ],
)
def test_stream_resumes_through_a_cut_and_sees_every_event_once(server, budgets, reset):
    proxy = CuttingProxy(server_port(server), budgets, reset=reset)
    try:
        with AgentRunsClient(proxy.url, server.token) as client:
            stream = client.stream("paced", LONG_MESSAGE)
            events = list(stream)
    finally:
        proxy.close()
    assert proxy.cuts == stream.reconnects == len(budgets)
    assert len(events) > 80
    assert [event.id for event in events] == list(range(1, len(events) + 1))
    assert isinstance(events[0], Start) and isinstance(events[-1], Stop)
    # Exactly what the run's log holds, event for event.
    with AgentRunsClient(server.url, server.token) as direct:
        logged = list(direct.events("paced", stream.run_id))
        assert as_tuples(events) == as_tuples(logged)
        assert content(events) == "You said: " + LONG_MESSAGE
        assert direct.status("paced", stream.run_id)["status"] == "COMPLETED"


def test_a_silent_stream_past_the_read_timeout_is_resumed(server):
    # The tool sleeps 1.5 s: with a 0.4 s read timeout the stream goes quiet past it, more than
    # once; each time the client reconnects after the last event.
    with AgentRunsClient(server.url, server.token, timeout=httpx.Timeout(0.4, connect=5)) as client:
        stream = client.stream("slowtool", "sleep=1.5 please")
        events = list(stream)
    assert stream.reconnects >= 1
    assert [event.id for event in events] == list(range(1, len(events) + 1))
    assert isinstance(events[-1], Stop)
    assert any(isinstance(event, ToolEnd) and event.result == "slowly found" for event in events)


def server_port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def headers_length(server) -> int:
    """The length of a streamed run's answer up to its body (the same for every run)."""
    proxy = CuttingProxy(server_port(server), [])
    try:
        with AgentRunsClient(proxy.url, server.token) as client:
            list(client.stream("assistant", "measure"))
    finally:
        proxy.close()
    return proxy.answers[0].index(b"\r\n\r\n") + 4


@pytest.mark.parametrize("where", ["in the headers", "in the START frame"])
def test_a_stream_cut_before_start_finds_its_run_through_its_new_session(server, where):
    budget = 60 if where == "in the headers" else headers_length(server) + 40
    proxy = CuttingProxy(server_port(server), [budget])
    try:
        with AgentRunsClient(proxy.url, server.token) as client:
            stream = client.stream("paced", LONG_MESSAGE)
            events = list(stream)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert [event.id for event in events] == list(range(1, len(events) + 1))
    assert isinstance(events[0], Start) and isinstance(events[-1], Stop)
    assert content(events) == "You said: " + LONG_MESSAGE
    assert stream.session_id == events[0].session_id


def test_a_stream_cut_before_start_in_a_callers_session_raises(server, client):
    session_id = client.run("assistant", "first")["sessionId"]
    proxy = CuttingProxy(server_port(server), [60])
    try:
        with AgentRunsClient(proxy.url, server.token) as cut:
            with pytest.raises(ConnectionLost):
                list(cut.stream("assistant", "second", session_id=session_id))
    finally:
        proxy.close()


def test_a_failed_run_ends_with_an_error_event(client):
    events = list(client.stream("broken", "hi"))
    error = events[-1]
    assert isinstance(error, ErrorEvent) and error.message
    assert client.status("broken", events[0].run_id)["status"] == "FAILED"


# Packaging ------------------------------------------------------------------------------------


def test_the_client_imports_without_the_server():
    code = textwrap.dedent(
        """
        import sys
        import agent_runs.client
        loaded = [m for m in ("flask", "gevent", "peewee", "marshmallow", "agent_runs.extension")
                  if m in sys.modules]
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_package_is_typed_and_the_client_checks(tmp_path, repo_root):
    assert (Path(agent_runs.__file__).parent / "py.typed").is_file()
    # mypy cannot follow the editable install's import hook: the package is put on its path as
    # an installed wheel would be, by its import name.
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "agent_runs").symlink_to(Path(repo_root) / "app")
    program = tmp_path / "program.py"
    program.write_text(
        textwrap.dedent(
            """
            from agent_runs.client import AgentRunsClient, ContentDelta

            client = AgentRunsClient("http://127.0.0.1:8080", "token")
            for event in client.stream("assistant", "hi"):
                if isinstance(event, ContentDelta):
                    text: str = event.text
            answer = client.run("assistant", "hi")
            status: str = answer["status"]
            wrong: int = client.cancel("assistant", "run_1") + answer["content"]
            """
        )
    )
    mypy = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent"]
    result = subprocess.run(
        [*mypy, str(program)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(tmp_path / "path")},
    )
    # Only the deliberate mistake on the last line: a bool plus a str.
    assert result.stdout.count("error:") == 1, result.stdout
    assert 'program.py:10: error: Unsupported operand types for + ("bool" and "str")' in (
        result.stdout
    )
    # The client itself passes --strict.
    own = subprocess.run(
        [*mypy, "app/client.py", "app/chat.py"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo_root,
    )
    assert own.returncode == 0, own.stdout
