"""Fair turns: a run (or the event writer) that kept the event loop busy lets waiting I/O in.

The step-aside scenarios each run in a thread of their own, so on an event loop of their own:
what other tests left registered on the main loop cannot make I/O look waiting.
"""

import socket
import sys
import time
from contextlib import closing

import gevent
import gevent.threadpool
import pytest

from agent_runs.db import database
from agent_runs.models import Run, RunEvent, Session
from agent_runs.runtime import events, turns
from agent_runs.runtime.runs import new_run_id


def on_a_fresh_loop(scenario):
    """Run ``scenario`` in a new thread, with an event loop of its own."""
    pool = gevent.threadpool.ThreadPool(1)
    try:
        return pool.apply(scenario)
    finally:
        pool.kill()


def keep_busy(seconds):
    """Run without yielding, as a run handling a delta does."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def step_aside_with(*, busy_before_poll=0.0, busy_after_poll=0.0, io_waits, runs=1):
    """Return whether a waiting request was read, and whether other greenlets ran, while
    ``runs`` busy runs stepped aside one after another in one round of the loop."""
    left, right = socket.socketpair()
    with closing(left), closing(right):
        reader = gevent.spawn(left.recv, 16)  # a connection the loop watches
        turns.overdue()  # the loop is watched from here on
        gevent.sleep(0.005)
        keep_busy(busy_before_poll)
        gevent.sleep(0.005)  # the loop polls; this greenlet wakes right after
        if io_waits:
            right.sendall(b"GET /status")
        keep_busy(busy_after_poll)
        other = gevent.spawn(lambda: None)  # ready to run, queued behind this greenlet
        stepped = [gevent.spawn(turns.step_aside) for _ in range(runs - 1)]
        turns.step_aside()
        read, ran = reader.dead, other.dead
        gevent.joinall(stepped)
        right.sendall(b".")
        reader.join(5)
        return read, ran


def test_runs_that_kept_the_loop_busy_let_a_waiting_request_in():
    # gevent polls again once it has run the queue of ready greenlets for the switch interval
    # (checking every 50 of them): a round of busy runs stepping aside ends there.
    busy = 2 * max(turns.BUSY_SECONDS, sys.getswitchinterval())
    read, ran = on_a_fresh_loop(
        lambda: step_aside_with(busy_after_poll=busy, io_waits=True, runs=100)
    )
    assert read and ran


def test_a_busy_run_goes_on_when_no_io_waits():
    read, ran = on_a_fresh_loop(
        lambda: step_aside_with(busy_after_poll=2 * turns.BUSY_SECONDS, io_waits=False)
    )
    assert not ran


def test_a_busy_run_steps_aside_when_io_waits():
    read, ran = on_a_fresh_loop(
        lambda: step_aside_with(busy_after_poll=2 * turns.BUSY_SECONDS, io_waits=True)
    )
    assert ran


def test_a_run_goes_on_when_the_loop_polled_a_moment_ago(monkeypatch):
    # Busy long before the last poll, and only a moment since (far less than BUSY_SECONDS):
    # the loop's polls are what count.
    monkeypatch.setattr(turns, "BUSY_SECONDS", 0.2)
    read, ran = on_a_fresh_loop(lambda: step_aside_with(busy_before_poll=0.4, io_waits=True))
    assert not read and not ran


@pytest.fixture
def runs(app):
    ids = [new_run_id() for _ in range(4)]
    with database.connection_context():
        session = Session.create(uid="turns", org_id="acme", user_id="", agent_id="assistant")
        Run.insert_many(
            [{"id": r, "org_id": "acme", "agent_id": "assistant", "session": session} for r in ids]
        ).execute()
    return ids


def test_the_event_writer_commits_early_while_io_waits(runs, monkeypatch):
    """With a backlog to write and a request waiting, the writer commits a first chunk, and
    streams get it before the rest is written; the backlog lands whole and in order, and
    every run's end with its last event."""
    monkeypatch.setattr(turns, "BUSY_SECONDS", 0.0)  # the loop counts as busy at once
    recorded, done = [], []
    log = events.EventLog(flush_interval=60, record_endings=recorded.extend)
    channels = {run_id: events.RunChannel(run_id, first_seq=1) for run_id in runs}
    per_run = 3 * events.CHUNK_EVENTS // len(runs)
    for n in range(per_run):
        for run_id in runs:
            log.append(channels[run_id].make_event("CONTENT_DELTA", f"{n}"), channels[run_id])
    for run_id in runs:
        channel = channels[run_id]
        log.end_run(
            channel.make_event("STOP", "{}"), channel, run_id, lambda r=run_id: done.append(r)
        )
    watched, seen = channels[runs[0]], []

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
        try:
            log.flush()
        finally:
            if log._writer is not None:
                log._writer.kill()
        assert reader.get(timeout=5) == b"GET /status"
    follower.join(5)

    # The first transaction held one chunk: the stream had that much before the rest.
    assert seen[0] == events.CHUNK_EVENTS // len(runs)
    assert seen[-1] == per_run + 1
    assert recorded == runs and done == runs
    for run_id, channel in channels.items():
        seqs = [int(frame.split(b"\n")[0].removeprefix(b"id: ")) for frame in channel.frames]
        assert seqs == list(range(1, per_run + 2))
        with database.connection_context():
            stored = RunEvent.select(RunEvent.seq).where(RunEvent.run == run_id)
            assert sorted(e.seq for e in stored) == seqs
