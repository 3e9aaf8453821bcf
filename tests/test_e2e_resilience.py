"""Breaking things on purpose against a real gunicorn: the guarantees of issue 4, end to end.

- 200 clients killed mid-stream at random points: every run completes, and resuming with the
  last event a client fully received yields exactly the events it missed.
- ``kill -9`` of the worker executing runs: once the lease expires they are FAILED
  (worker_lost), their logs end with one ERROR, nothing stays RUNNING, sessions are free.
- Cancel during model streaming and during a slow tool, from the run's own worker and from
  the other one: the stream ends with STOP {"reason":"cancelled"} within a second.
- 20 simultaneous requests on one session: one runs, nineteen get 409.
- Human approval, approve and reject, synchronous and streaming.

Streams are read on raw sockets, so a test controls every byte it receives and can drop the
connection wherever it likes. Which worker serves a connection is read from /proc (the server's
end of the TCP connection belongs to one worker's file table), so cross-worker cases are
chosen, not left to chance.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import gevent
import gevent.event
import pytest
import requests

from .conftest import DATABASES, server_database
from .e2e_frames import Frame, assert_complete, content_of, parse_frames
from .e2e_tools import read_tool_log
from .server import GunicornServer

REPO_ROOT = str(Path(__file__).resolve().parent.parent)

AGENTS_YAML = """\
agents:
  - id: paced
    description: Looks something up, then answers in twelve paced deltas.
    instructions: Use lookup, then answer.
    tools:
      - tests.e2e_tools:lookup
    model_options: {delay: 0.02, content_deltas: 12}
  - id: chatty
    description: Talks for ten seconds unless cancelled.
    model_options: {delay: 0.05, content_deltas: 200}
  - id: slowtool
    description: Calls a tool that sleeps for the seconds its query names.
    tools:
      - tests.e2e_tools:slow_lookup
  - id: busy
    description: Holds its session for about two seconds.
    model_options: {delay: 0.05, content_deltas: 40}
  - id: banker
    description: Wires money, with a human's approval.
    tools:
      - {use: "tests.e2e_tools:wire_money", requires_approval: true}
    model_options: {content_deltas: 3}
  - id: slow
    description: Answers in sixty deltas, 50 ms apart.
    model_options: {delay: 0.05, content_deltas: 60}
  - id: outage
    description: Answers for twenty seconds, through a database outage.
    model_options: {delay: 0.1, content_deltas: 200}
"""

FINAL_STATUSES = {"COMPLETED", "FAILED", "CANCELLED"}


# Servers ---------------------------------------------------------------------------------


@contextmanager
def serve(
    folder: Path, *, workers: int, env: dict[str, str] | None = None, agents: str = AGENTS_YAML
):
    """A gunicorn serving ``agents`` (AGENTS_YAML), able to import tests.e2e_tools, logging
    tool calls."""
    agents_file = folder / "agents.yaml"
    agents_file.write_text(agents, encoding="utf-8")
    python_path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    with GunicornServer(
        folder,
        workers=workers,
        env={
            "AGENT_RUNS_AGENTS_FILE": str(agents_file),
            "PYTHONPATH": python_path,
            "E2E_TOOL_LOG": str(folder / "tool_calls.jsonl"),
            **(env or {}),
        },
    ) as server:
        yield server


@pytest.fixture(scope="module", params=DATABASES)
def server2(request, tmp_path_factory):
    """Two workers: cancels, continues and resumes may land on either."""
    folder = tmp_path_factory.mktemp("resilience")
    # A client here opens the connection it resumes on before it cuts its stream, and the
    # search for a connection on the wanted worker takes a while under load: connections
    # sit idle past gunicorn's 5 s keepalive, which would close them before their request.
    env = {"AGENT_RUNS_KEEPALIVE": "60", **server_database(request)}
    with serve(folder, workers=2, env=env) as server:
        for worker in wait_for_workers(server, 2):
            # Both workers accept connections before the tests begin.
            open_on(server, lambda pid, worker=worker: pid == worker, timeout=30)[0].close()
        yield server


def tool_calls(server: GunicornServer, tool: str, argument: str) -> list[dict]:
    return [
        call
        for call in read_tool_log(server.env["E2E_TOOL_LOG"])
        if call["tool"] == tool and call["argument"] == argument
    ]


def api(server: GunicornServer, method: str, path: str, **kwargs) -> requests.Response:
    """One request on a new connection (no pooling: each may land on either worker)."""
    headers = {**server.headers, "Connection": "close", **kwargs.pop("headers", {})}
    return requests.request(method, server.url + path, headers=headers, timeout=15, **kwargs)


# Workers and connections, seen through /proc ---------------------------------------------


def worker_pids(server: GunicornServer) -> list[int]:
    """The pids of the gunicorn master's children: its workers."""
    master = server.process.pid
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == master:
            pids.append(int(entry))
    return sorted(pids)


def wait_for_workers(
    server: GunicornServer, count: int, *, exclude: set[int] = frozenset(), timeout: float = 30
) -> list[int]:
    """Wait until the master has ``count`` workers none of which is in ``exclude``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(server)
        if len(pids) == count and not set(pids) & set(exclude):
            return pids
        time.sleep(0.05)
    raise AssertionError(f"workers: {worker_pids(server)}, wanted {count} new ones")


def _server_side_inode(server_port: int, client_port: int) -> int:
    """The socket inode of the server's end of the loopback connection from client_port."""
    with open("/proc/net/tcp", encoding="ascii") as handle:
        lines = handle.readlines()[1:]
    for line in lines:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        if (
            int(local.rsplit(":", 1)[1], 16) == server_port
            and int(remote.rsplit(":", 1)[1], 16) == client_port
            and state == "01"  # ESTABLISHED
            and inode
        ):
            return inode
    return 0  # not accepted yet (a socket in the accept queue has no inode)


def worker_serving(
    server: GunicornServer, client_port: int, timeout: float = 5, required: bool = True
) -> int | None:
    """Return the pid of the worker that accepted the connection from ``client_port``.

    None (unless ``required``) if none holds it within ``timeout``: e.g. it already closed.
    """
    server_port = urlsplit(server.url).port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inode = _server_side_inode(server_port, client_port)
        if inode:
            target = f"socket:[{inode}]"
            for pid in worker_pids(server):
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                            return pid
                    except OSError:
                        continue
        time.sleep(0.01)
    if required:
        raise AssertionError(f"no worker accepted the connection from port {client_port}")
    return None


# A raw HTTP/1.1 client -------------------------------------------------------------------


def decode_chunked(data: bytes) -> tuple[bytes, bool]:
    """Decode as much of a chunked body as has arrived; return (body, whether it ended)."""
    body = bytearray()
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return bytes(body), False
        size = int(data[position:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(body), True
        start = line_end + 2
        chunk = data[start : start + size]
        body += chunk  # a chunk cut short still delivered its first bytes
        if len(data) < start + size + 2:
            return bytes(body), False
        position = start + size + 2


class RawConnection:
    """One HTTP/1.1 exchange on a raw socket, read byte by byte as it arrives.

    Records when each SSE frame of the body became complete, so a test can time events as
    the client saw them.
    """

    def __init__(self, server: GunicornServer, timeout: float = 15) -> None:
        self.server = server
        parts = urlsplit(server.url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.local_port = self.sock.getsockname()[1]
        self.raw = bytearray()
        self.eof = False
        self.reset = False
        self.frame_times: dict[int, float] = {}
        self._frames: list[Frame] = []

    @property
    def worker(self) -> int:
        return worker_serving(self.server, self.local_port)

    def send(
        self, method: str, path: str, body: dict | None = None, headers: dict | None = None
    ) -> None:
        payload = json.dumps(body).encode() if body is not None else b""
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {urlsplit(self.server.url).netloc}",
            f"Authorization: Bearer {self.server.token}",
            "Connection: close",
            f"Content-Length: {len(payload)}",
        ]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    def receive(self, limit: int = 65536) -> bytes:
        """Read what has arrived (at most ``limit`` bytes); b"" once the server closed."""
        try:
            data = self.sock.recv(limit)
        except ConnectionResetError:
            data, self.reset = b"", True
        if not data:
            self.eof = True
            return b""
        self.raw += data
        now = time.monotonic()
        for frame in self.frames()[len(self.frame_times) :]:
            self.frame_times[frame.id] = now
        return data

    def read_until(self, done: Callable[[RawConnection], bool], timeout: float) -> None:
        """Read until ``done(self)`` or the end of the response, within ``timeout`` seconds."""
        with gevent.Timeout(timeout, AssertionError(f"no end within {timeout} s: {self.raw!r}")):
            while not done(self) and not self.eof:
                self.receive()

    def read_to_end(self, timeout: float = 20) -> None:
        self.read_until(lambda conn: conn.finished, timeout)

    def abort(self, reset: bool = True) -> None:
        """Drop the connection: with an RST (as a killed process's kernel may), or a FIN."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    # Parsing what arrived ---------------------------------------------------------------

    def _head(self) -> tuple[int, dict[str, str], bytes] | None:
        head, separator, rest = bytes(self.raw).partition(b"\r\n\r\n")
        if not separator:
            return None
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, rest

    @property
    def status(self) -> int | None:
        head = self._head()
        return head[0] if head else None

    @property
    def headers(self) -> dict[str, str]:
        head = self._head()
        return head[1] if head else {}

    def body(self) -> tuple[bytes, bool]:
        """The body received so far, and whether it is complete."""
        head = self._head()
        if head is None:
            return b"", False
        _, headers, rest = head
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return decode_chunked(rest)
        if "content-length" in headers:
            length = int(headers["content-length"])
            return rest[:length], len(rest) >= length
        return rest, self.eof

    @property
    def finished(self) -> bool:
        return self.body()[1]

    def json(self) -> dict:
        body, complete = self.body()
        assert complete, self.raw
        return json.loads(body)

    def frames(self) -> list[Frame]:
        """The SSE frames fully received so far (a frame cut short is not one)."""
        body, _ = self.body()
        end = body.rfind(b"\n\n")
        return parse_frames(body[: end + 2].decode("utf-8")) if end >= 0 else []


def open_on(server: GunicornServer, want: Callable[[int], bool], timeout: float = 15):
    """Open new connections until one is accepted by a worker ``want`` accepts; return it
    and that worker's pid."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connection = RawConnection(server)
        worker = connection.worker
        if want(worker):
            return connection, worker
        seen.append(worker)
        connection.close()
        if len(seen) % 20 == 0:
            time.sleep(0.1)  # a worker still starting up accepts nothing yet
    raise AssertionError(f"{len(seen)} connections, none on the wanted worker: {seen[-20:]}")


def stream(server: GunicornServer, agent: str, body: dict, worker: int | None = None):
    """Start a streaming run, on a given worker if asked; return the open connection."""
    if worker is None:
        connection = RawConnection(server)
    else:
        connection, _ = open_on(server, lambda pid: pid == worker)
    connection.send("POST", f"/api/agents/{agent}/runs/stream", body)
    return connection


def events_of(server: GunicornServer, agent: str, run_id: str, last_id: int | None = None):
    """Read /events of a run to its end: after ``last_id`` (Last-Event-ID), or all of it."""
    connection = RawConnection(server)
    headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
    connection.send("GET", f"/api/agents/{agent}/runs/{run_id}/events", headers=headers)
    connection.read_to_end()
    connection.close()
    assert connection.status == 200, connection.raw
    body, _ = connection.body()
    return parse_frames(body.decode("utf-8")) if body else []


def wait_for_status(server, agent, run_id, wanted, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = api(server, "GET", f"/api/agents/{agent}/runs/{run_id}/status").json()
        if current["status"] in wanted or time.monotonic() > deadline:
            return current
        time.sleep(0.1)


def batch_status(server: GunicornServer, agent: str, run_ids: list[str]) -> list[dict]:
    statuses = []
    for start in range(0, len(run_ids), 100):
        response = api(
            server,
            "GET",
            f"/api/agents/{agent}/runs/status",
            params={"runIds": ",".join(run_ids[start : start + 100])},
        )
        assert response.status_code == 200, response.text
        statuses += response.json()
    assert [status["id"] for status in statuses] == run_ids
    return statuses


def run_gevent(tasks: list[Callable[[], object]], timeout: float) -> list[object]:
    """Run callables concurrently (greenlets); return their results; raise the first error."""
    greenlets = [gevent.spawn(task) for task in tasks]
    gevent.joinall(greenlets, timeout=timeout)
    stuck = [index for index, greenlet in enumerate(greenlets) if not greenlet.ready()]
    gevent.killall(greenlets, block=False)
    assert not stuck, f"{len(stuck)} tasks still running after {timeout} s: {stuck[:10]}"
    for greenlet in greenlets:
        if greenlet.exception is not None:
            raise greenlet.exception
    return [greenlet.value for greenlet in greenlets]


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# 1. Clients killed mid-stream ------------------------------------------------------------

KILLS = 200
BATCH = 50
PACED_EVENTS = (
    ["START", "REASONING_DELTA", "REASONING_DELTA", "TOOL_START", "TOOL_END"]
    + ["CONTENT_DELTA"] * 12
    + ["STOP"]
)


def kill_and_resume(server: GunicornServer, index: int, cut_at: int, reset: bool) -> dict:
    """Stream a run, drop the connection after ``cut_at`` bytes, resume at once.

    Even-numbered clients resume on the worker executing their run (tailing it in memory),
    odd-numbered ones on the other worker (reading the log as it grows).
    """
    session_id = str(uuid.uuid4())
    connection = RawConnection(server)
    stream_worker = connection.worker
    # The connection to resume on is ready before the cut, so the resume races the run.
    same_worker = index % 2 == 0
    resume, _ = open_on(server, lambda pid: (pid == stream_worker) == same_worker)
    connection.send(
        "POST",
        "/api/agents/paced/runs/stream",
        {"message": f"kill number {index:03d}", "sessionId": session_id},
    )
    while len(connection.raw) < cut_at and not connection.eof:
        connection.receive(cut_at - len(connection.raw))
    connection.abort(reset)
    received = connection.frames()

    if received:
        run_id = received[0].json_data()["runId"]
    else:  # cut before START: the client knows its session, and finds the run through it
        runs = api(server, "GET", f"/api/sessions/{session_id}/runs").json()["items"]
        assert len(runs) == 1, runs
        run_id = runs[0]["id"]

    resumed_at_ms = time.time_ns() // 1_000_000
    resume.send(
        "GET",
        f"/api/agents/paced/runs/{run_id}/events",
        headers={"Last-Event-ID": str(received[-1].id)} if received else {},
    )
    resume.read_to_end()
    resume.close()
    assert resume.status == 200, resume.raw
    body, _ = resume.body()
    return {
        "index": index,
        "cut_at": cut_at,
        "run_id": run_id,
        "received": received,
        "resumed": parse_frames(body.decode("utf-8")) if body else [],
        "resumed_at_ms": resumed_at_ms,
    }


@pytest.mark.timeout(120)
def test_clients_killed_mid_stream_resume_with_exactly_the_missing_events(server2):
    started = time.monotonic()
    # The size of a whole response, headers to the last chunk: the cut points range over it.
    whole = stream(server2, "paced", {"message": "kill number 999"})
    whole.read_to_end()
    whole.close()
    assert [frame.event for frame in whole.frames()] == PACED_EVENTS
    total = len(whole.raw)

    rng = random.Random(4_2024)
    plan = [(index, rng.randint(1, total - 1), rng.random() < 0.5) for index in range(KILLS)]
    results = []
    for batch in chunks(plan, BATCH):
        results += run_gevent(
            [lambda item=item: kill_and_resume(server2, *item) for item in batch], timeout=45
        )

    # Every run went on without its client and completed.
    run_ids = [result["run_id"] for result in results]
    assert len(set(run_ids)) == KILLS
    statuses = batch_status(server2, "paced", run_ids)
    assert [status["status"] for status in statuses] == ["COMPLETED"] * KILLS

    full_logs = run_gevent(
        [lambda run_id=run_id: events_of(server2, "paced", run_id) for run_id in run_ids],
        timeout=60,
    )
    live = {True: 0, False: 0}
    cut_in_head = 0
    for result, full, status in zip(results, full_logs, statuses, strict=True):
        where = (result["index"], result["cut_at"], result["run_id"])
        assert_complete(full)
        assert [frame.event for frame in full] == PACED_EVENTS, where
        assert status["content"] == content_of(full), where
        received, resumed = result["received"], result["resumed"]
        # What the client got before the cut is the log's beginning, and the resumed stream
        # is exactly the rest: no gap, no duplicate, to the STOP.
        assert received == full[: len(received)], where
        assert resumed == full[len(received) :], where
        assert received + resumed == full, where
        live[result["index"] % 2 == 0] += result["resumed_at_ms"] < full[-1].timestamp
        cut_in_head += not received
    elapsed = time.monotonic() - started
    print(
        f"\n{KILLS} kills in {elapsed:.1f} s: {cut_in_head} cut before the first event,"
        f" resumed while the run was still going: {live[True]} on its worker,"
        f" {live[False]} on the other"
    )
    # The resumes really raced the runs, on both workers, not only replayed finished logs.
    assert 0 < cut_in_head < KILLS // 2
    assert live[True] >= KILLS // 10 and live[False] >= KILLS // 10


# 2. kill -9 of the worker mid-run --------------------------------------------------------

LEASE_SECONDS = 2.0


@pytest.fixture(scope="module", params=DATABASES)
def crash(request, tmp_path_factory):
    """One worker, 2 s leases; SIGKILL the worker while three runs of it are mid-way.

    A streamed run (its client reading), a background run and a synchronous one (its client
    waiting for the answer). Returns what the clients saw; the server stays up for the tests.
    """
    folder = tmp_path_factory.mktemp("crash")
    env = {"AGENT_RUNS_LEASE_SECONDS": str(LEASE_SECONDS), **server_database(request)}
    with serve(folder, workers=1, env=env) as server:
        (victim,) = wait_for_workers(server, 1)
        session_id = str(uuid.uuid4())
        streamed = stream(server, "slow", {"message": "crash me", "sessionId": session_id})
        background = api(
            server, "POST", "/api/agents/slow/runs/background", json={"message": "crash me too"}
        )
        assert background.status_code == 202, background.text
        sync_session = str(uuid.uuid4())
        synchronous = RawConnection(server)
        synchronous.send(
            "POST", "/api/agents/slow/runs", {"message": "and me", "sessionId": sync_session}
        )
        streamed.read_until(
            lambda conn: [f.event for f in conn.frames()].count("CONTENT_DELTA") >= 5, timeout=10
        )

        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # The kernel closes the dead worker's connections: both clients see the end at once.
        streamed.read_until(lambda conn: False, timeout=5)
        synchronous.read_until(lambda conn: False, timeout=5)
        assert not streamed.finished and not synchronous.finished
        (replacement,) = wait_for_workers(server, 1, exclude={victim})
        booted_after = time.monotonic() - killed_at

        received = streamed.frames()
        run_ids = [
            received[0].json_data()["runId"],
            background.json()["runId"],
            # The synchronous client never got an answer: it finds its run by its session.
            api(server, "GET", f"/api/sessions/{sync_session}/runs").json()["items"][0]["id"],
        ]
        statuses = {}
        for run_id in run_ids:
            statuses[run_id] = wait_for_status(server, "slow", run_id, FINAL_STATUSES, timeout=20)
        failed_after = time.monotonic() - killed_at
        yield {
            "server": server,
            "victim": victim,
            "replacement": replacement,
            "session_ids": [session_id, background.json()["sessionId"], sync_session],
            "received": received,
            "run_ids": run_ids,
            "statuses": statuses,
            "booted_after": booted_after,
            "failed_after": failed_after,
        }


@pytest.mark.timeout(90)
def test_runs_of_a_killed_worker_fail_as_worker_lost_and_free_their_sessions(crash):
    server, run_ids = crash["server"], crash["run_ids"]
    print(
        f"\nworker {crash['victim']} killed; {crash['replacement']} booted after"
        f" {crash['booted_after']:.2f} s; runs failed after {crash['failed_after']:.2f} s"
    )
    for status in crash["statuses"].values():
        assert status["status"] == "FAILED", status
        assert status["error"]["type"] == "worker_lost", status
        assert status["completedAt"], status
    # Lease expiry plus one sweep period, plus the new worker's start: not much more.
    assert crash["failed_after"] < LEASE_SECONDS + LEASE_SECONDS / 3 + crash["booted_after"] + 3

    logs = {run_id: events_of(server, "slow", run_id) for run_id in run_ids}
    for run_id, frames in logs.items():
        events = [frame.event for frame in frames]
        assert [frame.id for frame in frames] == list(range(1, len(frames) + 1)), events
        assert events[0] == "START", events
        # After ERROR nothing follows: it is the last event, and the only one.
        assert events[-1] == "ERROR" and events.count("ERROR") == 1, events
        assert "STOP" not in events, events
        assert frames[-1].data == crash["statuses"][run_id]["error"]["message"]

    # Later sweeps leave failed runs alone: their logs do not grow.
    time.sleep(LEASE_SECONDS / 3 * 2 + 0.2)
    for run_id, frames in logs.items():
        assert events_of(server, "slow", run_id) == frames

    # Nothing is left RUNNING (or QUEUED), as the batch status tells.
    statuses = batch_status(server, "slow", run_ids)
    assert {status["status"] for status in statuses} == {"FAILED"}, statuses

    # Each session is free again: a new run on it completes.
    answers = run_gevent(
        [
            lambda session_id=session_id: api(
                server,
                "POST",
                "/api/agents/slow/runs",
                json={"message": "after the crash", "sessionId": session_id},
            )
            for session_id in crash["session_ids"]
        ],
        timeout=30,
    )
    for answer, session_id in zip(answers, crash["session_ids"], strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "COMPLETED"
        assert answer.json()["sessionId"] == session_id


@pytest.mark.timeout(60)
def test_a_client_cut_off_by_the_crash_resumes_to_the_error(crash):
    """The client that was streaming reconnects with the last id it saw, as SSE clients do.

    The events it saw must be the log's (same ids, same events), and the resumed stream must
    bring it the run's end: the ERROR. An id the client saw must never name another event.
    """
    server, received = crash["server"], crash["received"]
    run_id = crash["run_ids"][0]
    log = events_of(server, "slow", run_id)
    assert log[-1].event == "ERROR"
    resumed = events_of(server, "slow", run_id, last_id=received[-1].id)
    assert [frame.event for frame in resumed][-1:] == ["ERROR"], (
        f"the client saw ids 1..{received[-1].id}"
        f" ({[f.event for f in received][-3:]} last), the log holds ids 1..{log[-1].id}"
        f" with the ERROR at {log[-1].id}: resuming after {received[-1].id} gives"
        f" {[(f.id, f.event) for f in resumed]}"
    )
    assert received == log[: len(received)]


# 3. Cancel during model streaming and during a slow tool ---------------------------------


def cancel_mid_run(server: GunicornServer, agent: str, message: str, ready, delete_on: str):
    """Stream a run; once ``ready(frames)``, DELETE it from a new connection on the run's
    worker (``delete_on="same"``) or the other one; return what the client saw, and when."""
    run_worker = worker_pids(server)[random.randrange(2)]
    connection = stream(server, agent, {"message": message}, worker=run_worker)
    connection.read_until(lambda conn: ready(conn.frames()), timeout=10)
    run_id = connection.frames()[0].json_data()["runId"]
    canceller, cancel_worker = open_on(
        server, lambda pid: (pid == run_worker) == (delete_on == "same")
    )

    reader = gevent.spawn(connection.read_to_end, 5)
    cancelled_at = time.monotonic()
    canceller.send("DELETE", f"/api/agents/{agent}/runs/{run_id}")
    canceller.read_to_end(5)
    canceller.close()
    reader.join(timeout=6)
    assert reader.successful(), reader.exception
    connection.close()
    frames = connection.frames()
    return {
        "run_id": run_id,
        "frames": frames,
        "delete_status": canceller.status,
        "stop_after": connection.frame_times[frames[-1].id] - cancelled_at,
        "run_worker": run_worker,
        "cancel_worker": cancel_worker,
    }


def check_cancelled(server: GunicornServer, agent: str, outcome: dict) -> None:
    frames = outcome["frames"]
    assert outcome["delete_status"] == 202
    assert_complete(frames)  # gap-free ids, one START, one STOP, the STOP last, no ERROR
    assert json.loads(frames[-1].data) == {"reason": "cancelled"}
    assert outcome["stop_after"] < 1.0, outcome["stop_after"]
    status = api(server, "GET", f"/api/agents/{agent}/runs/{outcome['run_id']}/status").json()
    assert status["status"] == "CANCELLED", status
    assert status["content"] == content_of(frames)
    # The log holds what the stream carried, and a second DELETE finds the run finished.
    assert events_of(server, agent, outcome["run_id"]) == frames
    again = api(server, "DELETE", f"/api/agents/{agent}/runs/{outcome['run_id']}")
    assert again.status_code == 204, again.text


REPEATS = 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delete_on", ["same", "other"])
def test_cancel_during_model_streaming(server2, delete_on):
    timings = []
    for attempt in range(REPEATS):
        outcome = cancel_mid_run(
            server2,
            "chatty",
            f"talk for a while ({delete_on} {attempt})",
            lambda frames: [f.event for f in frames].count("CONTENT_DELTA") >= 3,
            delete_on,
        )
        assert (outcome["cancel_worker"] == outcome["run_worker"]) == (delete_on == "same")
        check_cancelled(server2, "chatty", outcome)
        # The run stopped mid-answer: far fewer than its 200 deltas, and its partial answer
        # is kept.
        deltas = [f for f in outcome["frames"] if f.event == "CONTENT_DELTA"]
        assert 3 <= len(deltas) < 50
        timings.append(outcome["stop_after"])
    print(
        f"\nDELETE on the {delete_on} worker -> STOP after "
        + ", ".join(f"{t * 1000:.0f} ms" for t in timings)
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delete_on", ["same", "other"])
def test_cancel_during_a_slow_tool(server2, delete_on):
    timings = []
    for attempt in range(REPEATS):
        query = f"sleep=8 ({delete_on} {attempt} {uuid.uuid4().hex[:8]})"
        outcome = cancel_mid_run(
            server2,
            "slowtool",
            query,
            lambda frames: "TOOL_START" in [f.event for f in frames],
            delete_on,
        )
        check_cancelled(server2, "slowtool", outcome)
        events = [frame.event for frame in outcome["frames"]]
        assert events[-2:] == ["TOOL_START", "STOP"], events
        # The tool itself was interrupted where it slept, in the run's worker: it did not go
        # on sleeping (or finish) in the background.
        calls = tool_calls(server2, "slow_lookup", query)
        assert [call["phase"] for call in calls] == ["start", "interrupted"], calls
        assert {call["pid"] for call in calls} == {outcome["run_worker"]}
        timings.append(outcome["stop_after"])
    print(
        f"\nDELETE on the {delete_on} worker -> STOP after "
        + ", ".join(f"{t * 1000:.0f} ms" for t in timings)
    )


# 4. Twenty requests at once on one session -----------------------------------------------

CONTENDERS = 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("session", ["new", "existing"])
def test_twenty_simultaneous_runs_on_one_session_one_runs_the_rest_get_409(server2, session):
    session_id = f"contended-{uuid.uuid4()}"
    earlier_runs = 0
    if session == "existing":
        first = api(
            server2,
            "POST",
            "/api/agents/busy/runs",
            json={"message": "hi", "sessionId": session_id},
        )
        assert first.status_code == 200 and first.json()["status"] == "COMPLETED", first.text
        earlier_runs = 1

    # Twenty connections, half on each worker, accepted and idle; then every request at once.
    workers = worker_pids(server2)
    connections = [
        open_on(server2, lambda pid, index=index: pid == workers[index % 2])[0]
        for index in range(CONTENDERS)
    ]
    go = gevent.event.Event()

    def contend(index: int, connection: RawConnection) -> tuple[int, float]:
        go.wait(10)
        sent = time.monotonic()
        connection.send(
            "POST",
            "/api/agents/busy/runs",
            {"message": f"contender {index}", "sessionId": session_id},
        )
        connection.read_to_end(timeout=20)
        connection.close()
        return index, time.monotonic() - sent

    tasks = [
        lambda index=index, connection=connection: contend(index, connection)
        for index, connection in enumerate(connections)
    ]
    waiting = gevent.spawn(run_gevent, tasks, 30)
    gevent.sleep(0.05)  # every contender waits on the event
    go.set()
    results = waiting.get(timeout=35)

    answers = {index: connections[index] for index, _ in results}
    latency = dict(results)
    statuses = sorted(connection.status for connection in answers.values())
    assert statuses == [200] + [409] * (CONTENDERS - 1), statuses
    (winner,) = [index for index, connection in answers.items() if connection.status == 200]
    body = answers[winner].json()
    assert body["status"] == "COMPLETED" and body["sessionId"] == session_id, body
    for index, connection in answers.items():
        if index == winner:
            continue
        assert connection.headers["content-type"] == "application/problem+json", connection.raw
        problem = connection.json()
        assert problem["status"] == 409 and problem["title"] and problem["detail"], problem
        assert "session" in problem["detail"].lower(), problem
        # Refused at once, not after waiting for the winner's run (about two seconds).
        assert latency[index] < latency[winner], (latency[index], latency[winner])

    # Only the winner's run exists: the refused requests left no run and no message behind.
    runs = api(server2, "GET", f"/api/sessions/{session_id}/runs").json()["items"]
    assert [run["id"] for run in runs][earlier_runs:] == [body["runId"]], runs
    detail = api(server2, "GET", f"/api/sessions/{session_id}").json()
    users = [m["content"] for m in detail["messages"] if m["role"] == "user"]
    assert users[earlier_runs:] == [f"contender {winner}"], detail["messages"]
    assert detail["activeRunId"] is None, detail
    print(
        f"\nwinner answered after {latency[winner]:.2f} s; the 409s after at most"
        f" {max(t for i, t in latency.items() if i != winner) * 1000:.0f} ms"
    )


# 5. Human approval: approve and reject, synchronous and streaming ------------------------


def paused_sync_run(server: GunicornServer) -> tuple[str, dict, dict]:
    """Start a synchronous banker run; return its message, its answer and its /status."""
    message = f"pay {uuid.uuid4().hex[:12]}"
    answer = api(server, "POST", "/api/agents/banker/runs", json={"message": message})
    assert answer.status_code == 200, answer.text
    run = answer.json()
    assert run["status"] == "PAUSED", run
    assert run["tools"] == [] and run["content"] == ""
    status = api(server, "GET", f"/api/agents/banker/runs/{run['runId']}/status").json()
    assert status["status"] == "PAUSED", status
    action = status["requiredAction"]
    assert action["type"] == "TOOL_APPROVAL" and action["tool"] == "wire_money", action
    assert action["arguments"] == {"amount": message} and action["toolCallId"], action
    assert tool_calls(server, "wire_money", message) == []  # nothing ran before approval
    return message, run, status


def continue_run(server: GunicornServer, run_id: str, action: str) -> requests.Response:
    return api(
        server, "POST", f"/api/agents/banker/runs/{run_id}/continue", json={"action": action}
    )


def check_continued_log(frames: list[Frame], message: str, approved: bool) -> None:
    """The whole log of a run paused once, then approved or rejected, then completed."""
    assert [frame.id for frame in frames] == list(range(1, len(frames) + 1))
    events = [frame.event for frame in frames]
    assert events == (
        ["START", "REASONING_DELTA", "REASONING_DELTA", "STOP", "TOOL_START", "TOOL_END"]
        + ["CONTENT_DELTA"] * 3
        + ["STOP"]
    ), events
    paused = json.loads(frames[3].data)
    assert paused["reason"] == "paused" and paused["requiredAction"]["tool"] == "wire_money"
    assert frames[4].json_data()["arguments"] == {"amount": message}
    end = frames[5].json_data()
    if approved:
        assert end["result"] == f"sent {message}" and "error" not in end, end
    else:
        assert end["result"] is None and "rejected" in end["error"], end
    assert frames[-1].data == ""


@pytest.mark.timeout(60)
def test_sync_approve_runs_the_tool_once_and_completes(server2):
    message, run, status = paused_sync_run(server2)
    run_id = run["runId"]
    done = continue_run(server2, run_id, "APPROVE")
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["status"] == "COMPLETED" and body["runId"] == run_id, body
    assert body["sessionId"] == run["sessionId"]
    (call,) = body["tools"]
    assert call["name"] == "wire_money" and call["arguments"] == {"amount": message}
    assert call["result"] == f"sent {message}" and call["isError"] is False, call
    assert body["content"] == f"wire_money returned sent {message}."
    # The tool ran exactly once, as the server's own record of calls says.
    assert len(tool_calls(server2, "wire_money", message)) == 1
    check_continued_log(events_of(server2, "banker", run_id), message, approved=True)

    again = continue_run(server2, run_id, "APPROVE")
    assert again.status_code == 409, again.text
    assert again.headers["Content-Type"] == "application/problem+json"
    assert "COMPLETED" in again.json()["detail"], again.json()
    assert len(tool_calls(server2, "wire_money", message)) == 1


@pytest.mark.timeout(60)
def test_sync_reject_skips_the_tool_and_completes(server2):
    message, run, _ = paused_sync_run(server2)
    done = continue_run(server2, run["runId"], "REJECT")
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["status"] == "COMPLETED", body
    (call,) = body["tools"]
    assert call["name"] == "wire_money" and call["isError"] is True, call
    assert "rejected" in call["result"], call
    assert "rejected" in body["content"], body
    assert tool_calls(server2, "wire_money", message) == []
    check_continued_log(events_of(server2, "banker", run["runId"]), message, approved=False)
    again = continue_run(server2, run["runId"], "REJECT")
    assert again.status_code == 409 and "COMPLETED" in again.json()["detail"], again.text


@pytest.mark.timeout(30)
def test_a_paused_sync_answer_says_what_to_approve(server2):
    """The synchronous answer of a paused run carries its requiredAction, as /status does,
    so the client can ask its human without another request."""
    _, run, status = paused_sync_run(server2)
    assert run.get("requiredAction") == status["requiredAction"], run
    continue_run(server2, run["runId"], "REJECT")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["APPROVE", "REJECT"])
def test_streamed_run_pauses_then_continues_on_events(server2, action):
    message = f"pay {uuid.uuid4().hex[:12]}"
    connection = stream(server2, "banker", {"message": message})
    connection.read_to_end()  # the stream ends by itself at the pause
    connection.close()
    paused = connection.frames()
    assert [frame.event for frame in paused] == [
        "START",
        "REASONING_DELTA",
        "REASONING_DELTA",
        "STOP",
    ]
    stop = json.loads(paused[-1].data)
    assert stop["reason"] == "paused", stop
    run_id = paused[0].json_data()["runId"]
    status = api(server2, "GET", f"/api/agents/banker/runs/{run_id}/status").json()
    assert status["status"] == "PAUSED" and stop["requiredAction"] == status["requiredAction"]
    assert stop["requiredAction"]["arguments"] == {"amount": message}
    assert tool_calls(server2, "wire_money", message) == []

    done = continue_run(server2, run_id, action)
    assert done.status_code == 200 and done.json()["status"] == "COMPLETED", done.text
    # The client picks the stream up where it ended: the next ids, to the final STOP.
    rest = events_of(server2, "banker", run_id, last_id=paused[-1].id)
    assert rest[0].id == paused[-1].id + 1
    assert rest[-1].event == "STOP" and rest[-1].data == ""
    check_continued_log(paused + rest, message, approved=action == "APPROVE")
    assert paused + rest == events_of(server2, "banker", run_id)
    assert len(tool_calls(server2, "wire_money", message)) == (action == "APPROVE")

    again = continue_run(server2, run_id, action)
    assert again.status_code == 409 and "COMPLETED" in again.json()["detail"], again.text
    assert len(tool_calls(server2, "wire_money", message)) == (action == "APPROVE")


@pytest.mark.timeout(60)
def test_simultaneous_continues_one_wins_the_tool_runs_at_most_once(server2):
    message, run, _ = paused_sync_run(server2)
    run_id = run["runId"]
    workers = worker_pids(server2)
    actions = ["APPROVE", "REJECT"] * 3
    connections = [
        open_on(server2, lambda pid, index=index: pid == workers[index % 2])[0]
        for index in range(len(actions))
    ]
    go = gevent.event.Event()

    def send(index: int) -> RawConnection:
        go.wait(10)
        connections[index].send(
            "POST", f"/api/agents/banker/runs/{run_id}/continue", {"action": actions[index]}
        )
        connections[index].read_to_end()
        connections[index].close()
        return connections[index]

    waiting = gevent.spawn(
        run_gevent, [lambda index=index: send(index) for index in range(len(actions))], 30
    )
    gevent.sleep(0.05)
    go.set()
    answers = waiting.get(timeout=35)
    statuses = [answer.status for answer in answers]
    assert sorted(statuses) == [200] + [409] * (len(actions) - 1), statuses
    winner = statuses.index(200)
    assert answers[winner].json()["status"] == "COMPLETED"
    approved = actions[winner] == "APPROVE"
    assert len(tool_calls(server2, "wire_money", message)) == approved
    check_continued_log(events_of(server2, "banker", run_id), message, approved=approved)
