"""Fair turns: a run that kept the event loop busy lets waiting I/O in.

Each scenario runs on an event loop of its own (a thread of gevent's pool has its own hub),
so what other tests left registered on the main loop cannot make I/O look waiting.
"""

import socket
import time
from contextlib import closing

import gevent

from agent_runs.runtime import turns


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
