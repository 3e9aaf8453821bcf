"""Two hosts, one PostgreSQL database: two gunicorn masters on two ports (issue 16).

- A run started on host A is streamed from host B (replayed, then live, from Last-Event-ID),
  cancelled from B (it stops within a second) and continued from B.
- A notification lost to a listener that reconnected is caught up by a read, not a stall.
- ``kill -9`` of host A, master and workers: B fails A's runs as worker_lost once their
  leases expire, and frees their sessions.
- Twenty simultaneous starts on one session over both hosts: one runs, nineteen get 409;
  twenty over both hosts against a cap of five active runs: five start, fifteen get 429.
- The database away for ten seconds under load: requests answer 503, and streams resume once
  it is back with no event lost or repeated.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from contextlib import ExitStack, contextmanager

import gevent
import gevent.event
import psycopg
import pytest

from .e2e_frames import assert_complete
from .pg import PostgresCluster
from .test_e2e_resilience import (
    RawConnection,
    api,
    events_of,
    serve,
    stream,
    tool_calls,
    wait_for_status,
    worker_pids,
)

LEASE_SECONDS = 3
CAP = 5


@contextmanager
def two_hosts(folder, url: str, **env: str):
    """Hosts A and B: two masters of two workers each, sharing the database at ``url``."""
    settings = {"AGENT_RUNS_DATABASE_URL": url, **env}
    with ExitStack() as stack:
        hosts = [
            stack.enter_context(serve(folder / name, workers=2, env=settings))
            for name in ("a", "b")
        ]
        yield hosts


@pytest.fixture(scope="module")
def hosts(postgres, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_hosts")
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    env = {"AGENT_RUNS_MAX_ACTIVE_RUNS_PER_ORG": str(CAP)}
    with two_hosts(folder, postgres.new_database(), **env) as running:
        yield running


def frames_until(connection: RawConnection, count: int, timeout: float = 15) -> None:
    connection.read_until(lambda conn: len(conn.frames()) >= count, timeout=timeout)


@pytest.mark.timeout(60)
def test_a_run_on_host_a_streams_from_host_b_replayed_then_live(hosts):
    a, b = hosts
    origin = stream(a, "slow", {"message": "stream me elsewhere"})
    frames_until(origin, 4)
    run_id = origin.frames()[0].json_data()["runId"]

    follower = RawConnection(b)
    follower.send("GET", f"/api/agents/slow/runs/{run_id}/events", headers={"Last-Event-ID": "2"})
    follower.read_to_end(20)
    origin.read_to_end(20)
    assert follower.status == 200, follower.raw
    whole = origin.frames()
    assert_complete(whole)
    # From after event 2, everything, once, in order; and it was live: B had events in hand
    # before A's stream ended.
    assert follower.frames() == whole[2:]
    first_on_b = min(follower.frame_times.values())
    assert first_on_b < origin.frame_times[whole[-1].id]
    # The log as B reads it afterwards is the same.
    assert events_of(b, "slow", run_id) == whole


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attempt", range(3))
def test_cancel_from_host_b_stops_the_run_on_host_a_within_a_second(hosts, attempt):
    a, b = hosts
    origin = stream(a, "chatty", {"message": f"talk on A ({attempt})"})
    origin.read_until(
        lambda conn: [f.event for f in conn.frames()].count("CONTENT_DELTA") >= 3, timeout=10
    )
    run_id = origin.frames()[0].json_data()["runId"]
    reader = gevent.spawn(origin.read_to_end, 5)
    cancelled_at = time.monotonic()
    assert api(b, "DELETE", f"/api/agents/chatty/runs/{run_id}").status_code == 202
    reader.join(timeout=6)
    assert reader.successful(), reader.exception
    frames = origin.frames()
    assert_complete(frames)
    assert json.loads(frames[-1].data) == {"reason": "cancelled"}
    stop_after = origin.frame_times[frames[-1].id] - cancelled_at
    print(f"\nDELETE on host B -> STOP on host A after {stop_after * 1000:.0f} ms")
    assert stop_after < 1.0, stop_after
    assert wait_for_status(b, "chatty", run_id, {"CANCELLED"})["status"] == "CANCELLED"


@pytest.mark.timeout(60)
def test_a_run_paused_on_host_a_is_continued_from_host_b(hosts):
    a, b = hosts
    message = f"pay {uuid.uuid4().hex[:12]}"
    paused = api(a, "POST", "/api/agents/banker/runs", json={"message": message}).json()
    assert paused["status"] == "PAUSED", paused
    run_id = paused["runId"]
    answer = api(
        b, "POST", f"/api/agents/banker/runs/{run_id}/continue", json={"action": "APPROVE"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "COMPLETED"
    # Host A reads what B's part of the run wrote, after the pause's STOP (event 4).
    events = [frame.event for frame in events_of(a, "banker", run_id, last_id=4)]
    assert events == ["TOOL_START", "TOOL_END", *["CONTENT_DELTA"] * 3, "STOP"], events
    # The tool ran once, on host B.
    assert tool_calls(a, "wire_money", message) == []
    assert [call["phase"] for call in tool_calls(b, "wire_money", message)] == ["done"]


def _terminate_listeners(url: str) -> int:
    """Cut every worker's listening connection, as a network blip or a proxy restart would."""
    with psycopg.connect(url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN %%' AND datname = current_database()"
        ).fetchall()
    return len(rows)


@pytest.mark.timeout(60)
def test_notifications_lost_while_a_listener_reconnects_are_caught_up(hosts):
    a, b = hosts
    origin = stream(a, "slow", {"message": "keep talking while B reconnects"})
    frames_until(origin, 3)
    run_id = origin.frames()[0].json_data()["runId"]
    follower = RawConnection(b)
    follower.send("GET", f"/api/agents/slow/runs/{run_id}/events")
    frames_until(follower, 3)
    # At least the listener of B's worker serving the follower (workers listen once they
    # have served a request).
    assert _terminate_listeners(a.env["AGENT_RUNS_DATABASE_URL"]) >= 1
    follower.read_to_end(20)
    origin.read_to_end(20)
    assert follower.frames() == origin.frames()
    assert_complete(follower.frames())


def _start_at_once(hosts, count: int, path: str, body) -> list[int]:
    """POST ``count`` requests split over the hosts, released together; return statuses."""
    go = gevent.event.Event()
    connections = [RawConnection(hosts[i % len(hosts)]) for i in range(count)]

    def send(index: int) -> int:
        go.wait()
        connection = connections[index]
        connection.send("POST", path, body(index))
        connection.read_until(lambda conn: conn.status is not None, timeout=15)
        status = connection.status
        connection.close()
        return status

    greenlets = [gevent.spawn(send, index) for index in range(count)]
    gevent.sleep(0.2)
    go.set()
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    return [greenlet.value for greenlet in greenlets]


@pytest.mark.timeout(60)
def test_twenty_starts_on_one_session_over_two_hosts_one_runs(hosts):
    session_id = f"contended-{uuid.uuid4()}"
    statuses = _start_at_once(
        hosts,
        20,
        "/api/agents/busy/runs/stream",
        lambda index: {"message": f"contender {index}", "sessionId": session_id},
    )
    assert sorted(statuses) == [200] + [409] * 19, statuses
    runs = api(hosts[1], "GET", f"/api/sessions/{session_id}/runs").json()["items"]
    assert len(runs) == 1


@pytest.mark.timeout(60)
def test_the_per_org_cap_holds_over_two_hosts(hosts):
    org = f"capped-{uuid.uuid4().hex[:8]}"
    token = hosts[0].cli("tokens", "create", "--org", org).stdout.strip().splitlines()[-1]
    saved = [host.token for host in hosts]
    for host in hosts:
        host.token = token
    try:
        statuses = _start_at_once(
            hosts, 20, "/api/agents/busy/runs/background", lambda index: {"message": "go"}
        )
    finally:
        for host, own in zip(hosts, saved, strict=True):
            host.token = own
    assert sorted(statuses) == [202] * CAP + [429] * (20 - CAP), statuses


# Host A killed ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_kill_9_of_host_a_fails_its_runs_on_host_b(postgres, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    env = {"AGENT_RUNS_LEASE_SECONDS": str(LEASE_SECONDS)}
    with two_hosts(tmp_path, postgres.new_database(), **env) as (a, b):
        session_id = str(uuid.uuid4())
        streamed = stream(a, "slow", {"message": "doomed", "sessionId": session_id})
        background = api(a, "POST", "/api/agents/slow/runs/background", json={"message": "too"})
        assert background.status_code == 202, background.text
        frames_until(streamed, 6)
        run_ids = [streamed.frames()[0].json_data()["runId"], background.json()["runId"]]

        # Host A dies at once, master and workers: nobody on it marks anything.
        for pid in [a.process.pid, *worker_pids(a)]:
            os.kill(pid, signal.SIGKILL)
        a.process.wait()
        killed_at = time.monotonic()

        for run_id in run_ids:
            status = wait_for_status(b, "slow", run_id, {"FAILED", "COMPLETED"}, timeout=30)
            assert status["status"] == "FAILED", status
            assert status["error"]["type"] == "worker_lost", status
            frames = events_of(b, "slow", run_id)
            assert [f.event for f in frames].count("ERROR") == 1
            assert frames[-1].event == "ERROR"
            assert [f.id for f in frames] == list(range(1, len(frames) + 1))
        print(f"\nhost A's runs failed on B {time.monotonic() - killed_at:.1f} s after kill -9")
        # Nothing is left RUNNING, and the session takes a new run on B.
        again = api(
            b, "POST", "/api/agents/slow/runs", json={"message": "hi", "sessionId": session_id}
        )
        assert again.status_code == 200 and again.json()["status"] == "COMPLETED", again.text


# The database away --------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_database_away_for_ten_seconds_answers_503_and_streams_resume(tmp_path):
    """On a cluster of its own, which the test stops and starts again on the same port."""
    with PostgresCluster() as cluster:
        if not cluster.can_restart:
            pytest.fail("this test needs a cluster of its own: unset AGENT_RUNS_TEST_POSTGRES_URL")
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with two_hosts(tmp_path, cluster.new_database()) as (a, b):
            streams = [
                stream(host, "outage", {"message": f"through the outage {index}"})
                for index, host in enumerate([a, b, a, b, a, b])
            ]
            for connection in streams:
                frames_until(connection, 3)
            followers = []
            for connection, host in zip(streams, [b, a, b, a, b, a], strict=True):
                run_id = connection.frames()[0].json_data()["runId"]
                follower = RawConnection(host)  # the other host: through the database
                follower.send("GET", f"/api/agents/outage/runs/{run_id}/events")
                followers.append(follower)

            cluster.stop()
            down_at = time.monotonic()
            answers = []
            while time.monotonic() - down_at < 10:
                for host in (a, b):
                    answer = api(host, "GET", "/api/agents/outage/runs/status?runIds=x")
                    answers.append((answer.status_code, answer.headers.get("Content-Type")))
                time.sleep(0.5)
            cluster.start()

            for connection in streams + followers:
                connection.read_to_end(60)
            assert set(answers) == {(503, "application/problem+json")}, set(answers)
            for connection, follower in zip(streams, followers, strict=True):
                frames = connection.frames()
                assert_complete(frames)  # gap-free ids 1..N, one START, STOP last
                assert frames[-1].event == "STOP"
                assert follower.frames() == frames
                run_id = frames[0].json_data()["runId"]
                assert events_of(a, "outage", run_id) == frames
                status = api(b, "GET", f"/api/agents/outage/runs/{run_id}/status").json()
                assert status["status"] == "COMPLETED", status
