"""Watching runs that execute elsewhere: their new events, and requests to cancel them.

A stream following a run that executes in another worker (or on another host) waits here for
the run's next events, and the executor learns here that a request made to another worker
asked one of its runs to stop. One small interface (rq's shape: the worker executes, the
store owns the state, a channel pushes commands), one implementation per database: SQLite's
polls the store; PostgreSQL's listens for the notifications the store sends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import gevent

from ..db import database
from . import store

logger = logging.getLogger(__name__)


class Watch:
    """One follower's interest in one run, from before its first read of the log."""

    def wait(self, after: int, timeout: float) -> bool:
        """Wait until the run may have events after seq ``after``, or has settled.

        Returns False if ``timeout`` seconds passed with nothing to read: then the follower
        need not read the log again, only wait on.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Stop watching the run."""

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RunWatcher:
    """Tells this worker about runs executing elsewhere: new events, and cancel requests."""

    def start(
        self, on_cancel: Callable[[str], None], running: Callable[[], Collection[str]]
    ) -> None:
        """Begin calling ``on_cancel`` with each run among ``running()`` asked to stop."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop watching (on shutdown)."""
        raise NotImplementedError

    def watch(self, run_id: str) -> Watch:
        """Begin watching a run's events, before the follower's first read of its log."""
        raise NotImplementedError


class _PollingWatch(Watch):
    def __init__(self, interval: float) -> None:
        self.interval = interval

    def wait(self, after: int, timeout: float) -> bool:
        # Nothing tells a poller what changed: after each interval, the log is read again.
        gevent.sleep(self.interval)
        return True


class PollingWatcher(RunWatcher):
    """Reads the store every ``interval`` seconds: the watcher for SQLite, which has no push.

    A follower reads the log again after each interval; cancel requests are read once an
    interval for all the runs executing here, and not at all while none is.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._greenlet: gevent.Greenlet | None = None

    def start(
        self, on_cancel: Callable[[str], None], running: Callable[[], Collection[str]]
    ) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._poll_cancels, on_cancel, running)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=5)
            self._greenlet = None

    def watch(self, run_id: str) -> Watch:
        return _PollingWatch(self.interval)

    def _poll_cancels(
        self, on_cancel: Callable[[str], None], running: Callable[[], Collection[str]]
    ) -> None:
        while True:
            gevent.sleep(self.interval)
            try:
                if not running():
                    continue
                with database.connection_context():
                    requested = store.cancel_requested_ids()
                here = running()
                for run_id in requested:
                    if run_id in here:
                        on_cancel(run_id)
            except Exception:
                logger.exception("reading cancel requests failed; retrying")


def watcher_for(database_url: str, interval: float) -> RunWatcher:
    """The watcher for the package's database: PostgreSQL's listens, SQLite's polls.

    ``interval``: how often the poller reads (and PostgreSQL's followers, while its listener
    is away).
    """
    from ..db import is_postgres

    if is_postgres():
        from .pg_watch import NotifyWatcher

        return NotifyWatcher(database_url, interval)
    return PollingWatcher(interval)
