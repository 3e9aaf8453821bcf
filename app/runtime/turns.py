"""Fair turns on a worker's event loop: a run that has had a long turn lets waiting I/O in first.

The gevent loop polls for I/O, then runs, one after another, every greenlet that became ready:
each run whose model sent a delta, each stream with events to write. Only then does it poll
again. With a thousand runs streaming, such a round lasted ~18 ms, and a request that arrived
meanwhile (a status poll, a new run, a cancel) waited for the rest of it before its handler
even read it: batch status answered in 7-9 ms at the median and 30-40 ms at the 99th
percentile.

A run calls :func:`step_aside` before it handles each delta of its model. When the loop has
been busy for more than ``BUSY_SECONDS`` since it last polled, and one of the descriptors it
watches is ready (a request, a model's next chunk, a client that can take more), the run goes
to the back of gevent's queue of ready greenlets. gevent runs that queue for at most the
interpreter's switch interval (gunicorn.conf.py sets 1 ms; it checks every 50 greenlets)
before it polls again, so once a round's runs step aside, the loop polls within about a
millisecond and serves what waits. (A run that steps aside alone resumes before the poll:
with few runs ready, there is little to wait behind.) Waiting for the next poll instead,
behind a timer, made every deferred run wake in the next round, unbounded again: median
status went from 3-4 ms to 20 ms. When no descriptor is ready, the run goes on: a thousand runs all
yielding at every delta cost a quarter more CPU per event, as the loop went round many more
times for the same work.

Only gevent's default loop (libev) with an epoll or kqueue backend is watched: its check
watchers honour priorities, so "when the loop last polled" is known before the greenlets the
poll woke run, and its descriptor tells whether any watched descriptor is ready. Elsewhere
:func:`overdue` is always false and runs never step aside.
"""

from __future__ import annotations

import select
import time
import weakref

import gevent
import gevent.hub
import gevent.monkey

# How long the loop may run greenlets before a run gives way to waiting I/O.
BUSY_SECONDS = 0.001
# How often, at most, a busy loop asks the kernel whether I/O waits (a system call).
ASK_SECONDS = 0.0002

# The select module as it was before gevent patched it: its poll() asks the kernel and returns
# at once, where gevent's would switch to the loop.
_poll = gevent.monkey.get_original("select", "poll")


class _Turns:
    """When one hub's loop last polled, and whether a descriptor it watches has been ready
    since."""

    def __init__(self, hub: gevent.hub.Hub) -> None:
        loop = hub.loop
        self.polled = time.perf_counter()
        self.asked = 0.0
        self.io_waits = False
        # A check watcher runs right after each poll; at the highest priority, before the
        # greenlets the poll made ready.
        self._check = loop.check(ref=False, priority=loop.MAXPRI)
        self._check.start(self._on_poll)
        # The loop's own descriptor is readable while any descriptor it watches is ready.
        self._kernel = _poll()
        self._kernel.register(loop.fileno(), select.POLLIN)

    def _on_poll(self) -> None:
        self.polled = time.perf_counter()
        self.io_waits = False

    def overdue(self) -> bool:
        now = time.perf_counter()
        if now - self.polled <= BUSY_SECONDS:
            return False
        # What was ready stays ready until the next poll.
        if not self.io_waits and now - self.asked > ASK_SECONDS:
            self.asked = now
            self.io_waits = any(events & select.POLLIN for _, events in self._kernel.poll(0))
        return self.io_waits


def _watchable(hub: gevent.hub.Hub) -> bool:
    loop = hub.loop
    return (
        type(loop).__module__.startswith("gevent.libev")
        and loop.backend in ("epoll", "kqueue")
        and isinstance(loop.fileno(), int)
    )


_turns: weakref.WeakKeyDictionary[gevent.hub.Hub, _Turns | None] = weakref.WeakKeyDictionary()


def overdue() -> bool:
    """Whether this thread's event loop has run greenlets for long while I/O waits for it."""
    hub = gevent.get_hub()
    try:
        turns = _turns[hub]
    except KeyError:
        turns = _turns[hub] = _Turns(hub) if _watchable(hub) else None
    return turns is not None and turns.overdue()


def step_aside() -> None:
    """Go to the back of the loop's queue if it has run greenlets for long while I/O waits."""
    if overdue():
        gevent.sleep(0)
