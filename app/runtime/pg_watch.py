"""The PostgreSQL watcher: runs' news pushed by LISTEN/NOTIFY, one connection per worker.

The store sends a notification on one channel (:data:`.store.NOTIFY_CHANNEL`) in the
transaction of every write a follower elsewhere waits for: ``e run:seq run:seq ...`` when
events were written (each run with its last seq), ``c run ...`` when a cancel was asked.
PostgreSQL delivers them at commit, to every worker of every host using the database, so
events reach a follower on another host one commit after they were written, and a cancel
reaches the worker executing the run at once, however many hosts there are.

Each worker listens on a connection of its own, outside the pool; streams wait on a gevent
event, so a follower whose run is quiet costs no query at all. A notification sent while
the listener was away is lost to it: every time it (re)connects, the watches it serves are
told to read the log again and the cancel requests are read once, so nothing waits for a
notification that will never come. While it is away, followers poll as SQLite's do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import gevent
import gevent.event

from ..db import database
from . import store
from .watch import RunWatcher, Watch

logger = logging.getLogger(__name__)

# Seconds between attempts to listen again after the connection was lost, at most.
MAX_BACKOFF = 2.0


class _NotifyWatch(Watch):
    def __init__(self, watcher: NotifyWatcher, run_id: str) -> None:
        self.watcher = watcher
        self.run_id = run_id
        # The highest seq announced for the run since the watch began.
        self.latest = 0
        # Set when notifications may have been missed: the log is to be read again.
        self.stale = False
        self.wake = gevent.event.Event()

    def wait(self, after: int, timeout: float) -> bool:
        if not self.watcher.listening:
            gevent.sleep(min(self.watcher.fallback_interval, timeout))
            return True
        if self.latest <= after and not self.stale:
            # No greenlet switch between the check above and this clear: a notification
            # cannot slip in between.
            self.wake.clear()
            self.wake.wait(timeout)
        news = self.latest > after or self.stale
        self.stale = False
        return news

    def close(self) -> None:
        self.watcher._forget(self)


class NotifyWatcher(RunWatcher):
    """Listens for the store's notifications on a connection to ``url`` of its own.

    ``fallback_interval``: how often followers read the log while the listener is away.
    """

    def __init__(self, url: str, fallback_interval: float) -> None:
        # libpq takes the URL itself, under its own scheme (not peewee's postgres+pool).
        self.url = "postgresql://" + url.partition("://")[2]
        self.fallback_interval = fallback_interval
        self.listening = False
        self._watches: dict[str, set[_NotifyWatch]] = {}
        self._greenlet: gevent.Greenlet | None = None

    def start(
        self, on_cancel: Callable[[str], None], running: Callable[[], Collection[str]]
    ) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._listen_forever, on_cancel, running)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=5)
            self._greenlet = None
        self.listening = False

    def watch(self, run_id: str) -> Watch:
        watch = _NotifyWatch(self, run_id)
        self._watches.setdefault(run_id, set()).add(watch)
        return watch

    def _forget(self, watch: _NotifyWatch) -> None:
        watches = self._watches.get(watch.run_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.run_id]

    def _listen_forever(
        self, on_cancel: Callable[[str], None], running: Callable[[], Collection[str]]
    ) -> None:
        import psycopg

        backoff = 0.1
        while True:
            try:
                # TCP keepalives: a database host that vanished without closing the
                # connection is noticed in about half a minute, not hours.
                with psycopg.connect(
                    self.url,
                    autocommit=True,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                ) as connection:
                    connection.execute(f"LISTEN {store.NOTIFY_CHANNEL}")
                    self.listening = True
                    backoff = 0.1
                    self._catch_up(on_cancel, running)
                    for notify in connection.notifies():
                        self._dispatch(notify.payload, on_cancel, running)
            except Exception as error:
                if self.listening:
                    logger.warning("stopped hearing the database's notifications: %s", error)
            finally:
                if self.listening:
                    self.listening = False
                    self._wake_all()
            gevent.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _wake_all(self) -> None:
        for watches in self._watches.values():
            for watch in watches:
                watch.stale = True
                watch.wake.set()

    def _catch_up(
        self, on_cancel: Callable[[str], None], running: Callable[[], Collection[str]]
    ) -> None:
        """Make up for what was sent while nobody listened: watches read the log again, and
        the cancel requests already made are read once."""
        self._wake_all()
        if running():
            with database.connection_context():
                requested = store.cancel_requested_ids()
            _cancel(requested, on_cancel, running)

    def _dispatch(
        self,
        payload: str,
        on_cancel: Callable[[str], None],
        running: Callable[[], Collection[str]],
    ) -> None:
        kind, _, items = payload.partition(" ")
        if kind == "e":
            for item in items.split():
                run_id, _, seq = item.rpartition(":")
                watches = self._watches.get(run_id)
                if watches and seq.isdigit():
                    for watch in watches:
                        watch.latest = max(watch.latest, int(seq))
                        watch.wake.set()
        elif kind == "c":
            _cancel(items.split(), on_cancel, running)


def _cancel(
    run_ids: list[str], on_cancel: Callable[[str], None], running: Callable[[], Collection[str]]
) -> None:
    here = running()
    for run_id in run_ids:
        if run_id in here:
            on_cancel(run_id)
