"""Fair turns: a run (or the event writer) that kept the event loop busy lets waiting I/O in.

Each scenario runs on an event loop of its own (a thread of gevent's pool has its own hub),
so what other tests left registered on the main loop cannot make I/O look waiting.
"""

import socket
import time
from contextlib import closing

import gevent
import pytest

from agent_runs.db import database
from agent_runs.models import Run, RunEvent, Session
from agent_runs.runtime import events, turns


def on_a_fresh_loop(scenario):
    return gevent.get_hub().threadpool.apply(scenario)


def keep_busy(seconds):
    """Run without yielding, as a run handling a delta does."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def after_a_poll():
    """Resume right after the loop polled, as a run woken by its model does."""
    turns.overdue()  # start watching this loop
    gevent.sleep(0.005)


def others_ran_during_step_aside(*, busy, io_waits):
    left, right = socket.socketpair()
    with closing(left), closing(right):
        # A connection the loop watches, as it watches a client's.
        reader = gevent.spawn(left.recv, 16)
        after_a_poll()
        if io_waits:
            right.sendall(b"GET /status")
        if busy:
            keep_busy(2 * turns.BUSY_SECONDS)
        other = gevent.spawn(lambda: None)  # ready to run, queued behind this greenlet
        turns.step_aside()
        ran = other.dead
        right.sendall(b".")
        assert reader.get(timeout=5)
        return ran


def test_a_run_that_kept_the_loop_busy_steps_aside_when_io_waits():
    assert on_a_fresh_loop(lambda: others_ran_during_step_aside(busy=True, io_waits=True))


def test_a_run_goes_on_when_no_io_waits():
    assert not on_a_fresh_loop(lambda: others_ran_during_step_aside(busy=True, io_waits=False))


def test_a_run_goes_on_when_the_loop_polled_a_moment_ago(monkeypatch):
    monkeypatch.setattr(turns, "BUSY_SECONDS", 60.0)
    assert not on_a_fresh_loop(lambda: others_ran_during_step_aside(busy=False, io_waits=True))


@pytest.fixture
def runs(app):
    from agent_runs.runtime.runs import new_run_id

    ids = [new_run_id() for _ in range(4)]
    with database.connection_context():
        session = Session.create(uid="turns", org_id="acme", user_id="", agent_id="assistant")
        Run.insert_many(
            [{"id": r, "org_id": "acme", "agent_id": "assistant", "session": session} for r in ids]
        ).execute()
    return ids


def test_the_event_writer_commits_early_while_io_waits(runs, monkeypatch):
    """With a backlog to write and a request waiting, streams get the first chunk of events
    (committed) before the rest is written; the backlog still lands whole and in order."""
    monkeypatch.setattr(turns, "BUSY_SECONDS", 0.0)  # the loop counts as busy at once
    log = events.EventLog(flush_interval=60)
    channels = {run_id: events.RunChannel(run_id, first_seq=1) for run_id in runs}
    total = 3 * events.CHUNK_EVENTS
    for n in range(total // len(runs)):
        for run_id in runs:
            log.append(channels[run_id].make_event("CONTENT_DELTA", f"{n}"), channels[run_id])
    seen = []
    watched = channels[runs[0]]

    def follow():
        for _ in watched.follow(0, 60):
            seen.append(len(watched.frames))

    follower = gevent.spawn(follow)
    gevent.sleep(0)

    left, right = socket.socketpair()
    with closing(left), closing(right):
        reader = gevent.spawn(left.recv, 16)
        gevent.sleep(0.005)
        right.sendall(b"GET /status")  # waits for the loop while the writer writes
        log.flush()
        assert reader.get(timeout=5) == b"GET /status"
    follower.kill()

    per_run = total // len(runs)
    # The first transaction held one chunk: the follower saw its share before the rest.
    assert seen[0] == events.CHUNK_EVENTS // len(runs)
    assert seen[-1] == per_run
    with database.connection_context():
        for run_id in runs:
            stored = [e.seq for e in RunEvent.select(RunEvent.seq).where(RunEvent.run == run_id)]
            assert sorted(stored) == list(range(1, per_run + 1))
