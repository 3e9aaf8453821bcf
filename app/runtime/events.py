"""Run events: their types, the SSE encoding, live fan-out and the batched event log.

Every event a run emits gets the next ``seq`` of that run and goes to the :class:`EventLog`,
which writes events to the RunEvent table in small batches; once a batch is written, its
events are published to their :class:`RunChannel`, which wakes the streams following the run
in this process. No client ever sees an event the log could lose: after a crash, what a
client saw is in the log, and the ids it holds are never given to other events. A stream that
starts late, or on another worker, replays the log and then tails the channel.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any

import gevent
import gevent.event
import peewee

from ..db import Statement, database
from ..models import RunEvent
from .turns import overdue as loop_overdue

logger = logging.getLogger(__name__)


class EventType:
    START = "START"
    REASONING_DELTA = "REASONING_DELTA"
    CONTENT_DELTA = "CONTENT_DELTA"
    TOOL_START = "TOOL_START"
    TOOL_END = "TOOL_END"
    STOP = "STOP"
    ERROR = "ERROR"

    ALL = (START, REASONING_DELTA, CONTENT_DELTA, TOOL_START, TOOL_END, STOP, ERROR)
    # After one of these the run's stream carries nothing more.
    FINAL = (STOP, ERROR)


PING_FRAME = b": ping\n\n"


def now_ms() -> int:
    """Return Unix epoch milliseconds, the unit of an event's timestamp."""
    return time.time_ns() // 1_000_000


# json.dumps with options builds a JSONEncoder on every call: built once.
_encode_data = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def encode_event(seq: int, type: str, data: str, timestamp: int) -> bytes:
    """Return one SSE frame in the seed's framing, preceded by the event's id.

    The payload is ``json.dumps({"event": type, "data": data, "timestamp": timestamp},
    separators=(",", ":"), ensure_ascii=False)``, put together from its parts, its strings
    escaped by the ``encode_basestring`` that call uses: a frame is made for every token, and
    ``json.dumps`` builds an encoder each call, seven times the cost. JSON escapes every
    newline inside ``data``, so the payload is always a single ``data:`` line, whatever text
    a model produced.
    """
    return (
        f'id: {seq}\ndata: {{"event":{encode_basestring(type)},"data":{encode_basestring(data)},'
        f'"timestamp":{timestamp:d}}}\n\n'
    ).encode()


@dataclass(slots=True)
class Event:
    """An event of one run, as it is streamed and stored."""

    run_id: str
    seq: int
    type: str
    data: str
    timestamp: int
    # The SSE frame, once encoded (see RunChannel.make_event).
    encoded: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def frame(self) -> bytes:
        if self.encoded is None:
            self.encoded = encode_event(self.seq, self.type, self.data, self.timestamp)
        return self.encoded

    @property
    def is_final(self) -> bool:
        return self.type in EventType.FINAL


def json_data(value: object) -> str:
    """Encode an event payload that is itself JSON (START, TOOL_START, TOOL_END, STOP)."""
    return _encode_data(value)


class RunChannel:
    """The live events of one run executing in this process, for the streams that follow it.

    ``frames`` holds the SSE frames of what this process published for the run (written to
    the log), from ``first_seq`` on; streams wait on the channel for more. Frames, not Event
    objects: bytes are invisible to the garbage collector, and a thousand open streams kept
    tens of thousands of events for it to scan again and again. The channel is dropped once
    the run has ended and its last follower has left: by then everything is in the log.
    """

    def __init__(self, run_id: str, first_seq: int = 1, written: Event | None = None) -> None:
        """``written``: the run's event ``first_seq``, already in the log (a new run's START)."""
        self.run_id = run_id
        self.first_seq = first_seq
        self.frames: list[bytes] = [written.frame] if written is not None else []
        self.closed = False
        self._next_seq = first_seq + len(self.frames)
        self._changed = gevent.event.Event()

    def make_event(self, type: str, data: str) -> Event:
        """Create the run's next event; it is published once the log has written it."""
        event = Event(self.run_id, self._next_seq, type, data, now_ms())
        # Encoded now, by the run's greenlet between two of its deltas: the event writer, which
        # publishes thousands of events at once without yielding, then only hands frames over.
        event.encoded = encode_event(event.seq, type, data, event.timestamp)
        self._next_seq += 1
        return event

    def publish(self, events: list[Event]) -> None:
        """Add written events (the run's next ones, in order) and wake the streams waiting."""
        self.frames.extend(event.frame for event in events)
        if events[-1].is_final:
            self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, gevent.event.Event()
        changed.set()

    def follow(self, after: int, ping_interval: float) -> Iterator[bytes]:
        """Yield the frames of events after seq ``after``, then live ones, until the run ends.

        Yields a ping frame whenever nothing happened for ``ping_interval`` seconds, so proxies
        keep the connection and a vanished client is noticed on the next write.
        """
        index = max(0, after + 1 - self.first_seq)
        while True:
            if index < len(self.frames):
                # Everything that arrived since the last wake-up goes out in one write.
                ready = self.frames[index:]
                index += len(ready)
                yield b"".join(ready)
                continue
            if self.closed:
                return
            if not self._changed.wait(ping_interval):
                yield PING_FRAME


@dataclass
class _Ending:
    """A run's last database writes, queued to commit with its last events."""

    record: Any
    done: Callable[[], None]


# An event waiting to be written: the channel to publish it to, and, for a run's last event,
# the run's final writes.
_Pending = tuple[Event, "RunChannel | None", "_Ending | None"]


# What one transaction of the event log writes at most. On SQLite the writer does not yield
# while it writes a chunk (see CHUNK_EVENTS), and a run's end costs ~70-150 µs (its status,
# messages and session): when 1,000 runs ended together, one transaction held the worker's
# event loop, every stream and request on it, for 150 ms. Bounded to 200 endings, a
# transaction holds it for ~15-30 ms of endings plus the events written with them (a few µs
# each), and other greenlets run between transactions. (At 50 endings, status polls waited
# less during 1,000 streams, but when 5,000 runs ended the backlog cost a fifth more CPU per
# event and half again the memory.)
# Every commit rewrites the pages it touched, so events are bounded loosely:
# at 500 per transaction the worker spent a fifth more CPU per streamed event than
# unbounded; 20,000 only keeps a backlog from becoming one transaction without end. (With a
# PostgreSQL driver made cooperative by gevent, the writer yields at each statement instead.)
MAX_EVENTS_PER_COMMIT = 20_000
MAX_ENDINGS_PER_COMMIT = 200
# A transaction is written in chunks of at most this many events, or endings (2-5 ms each).
# After each chunk, if I/O waits for the event loop (see turns.overdue: a request, say), the
# writer commits and publishes what it wrote, and yields, before it goes on: with 1,000
# streams, transactions of 2,500 events held the loop 10-26 ms, and batch status polls
# waited for them. The more frequent commits cost CPU only while I/O waits.
CHUNK_EVENTS = 500
CHUNK_ENDINGS = 50


class EventLog:
    """Writes run events, and the ends of runs, to the database in batches.

    A writer greenlet flushes whatever accumulated every ``flush_interval`` seconds, in
    transactions of bounded size: one prepared INSERT for many events of many runs, and the
    final writes of every run whose last event is among them (its status, its messages, its
    session released). Only once a transaction has committed are its events published to
    their channels, with one wake-up per stream, and its ended runs told they are done. So a
    client never sees an event the log could lose, and whoever sees a run's STOP or ERROR
    finds its final status in the database.
    """

    def __init__(
        self,
        flush_interval: float,
        record_endings: Callable[[list[Any]], None] = lambda endings: None,
        announce: Callable[[dict[str, int]], None] = lambda latest: None,
        count_events: Callable[[collections.Counter[str]], None] | None = None,
    ) -> None:
        self.flush_interval = flush_interval
        # Writes the final state of runs whose last events are in the transaction, given
        # what end_run() was given for each.
        self.record_endings = record_endings
        # Tells followers in other processes, in the transaction, the last seq written of
        # each run in it.
        self.announce = announce
        # Told how many events of each type every transaction committed (once per batch,
        # not per event: metrics count events this way).
        self.count_events = count_events
        self._pending: collections.deque[_Pending] = collections.deque()
        self._lock = threading.Lock()
        self._writer: gevent.Greenlet | None = None

    def append(self, event: Event, channel: RunChannel | None = None) -> None:
        """Queue an event for writing; ``channel`` gets it once it is written."""
        self._pending.append((event, channel, None))
        self._ensure_writer()

    def end_run(
        self, event: Event, channel: RunChannel, record: Any, done: Callable[[], None]
    ) -> None:
        """Queue a run's last event with its final writes (``record``, for record_endings);
        ``done`` runs after the commit."""
        self._pending.append((event, channel, _Ending(record, done)))
        self._ensure_writer()

    def _ensure_writer(self) -> None:
        if self._writer is None or self._writer.dead:
            # Started on first use, so it lives in the worker process, not in a parent that
            # forked it.
            self._writer = gevent.spawn(self._write_forever)

    def flush(self) -> None:
        """Write everything pending now, then publish it. Raises if the database fails."""
        while self._write_batch():
            gevent.sleep(0)  # let streams and requests run between transactions

    def _write_batch(self) -> bool:
        """Write and publish the oldest pending events; return whether more are pending."""
        with self._lock:
            if not self._pending:
                return False
            written: list[_Pending] = []
            endings: list[_Ending] = []
            try:
                with database.connection_context(), database.atomic():
                    # One prepared statement, many rows: building a multi-row INSERT in
                    # Python would cost more than the database's work.
                    while chunk := self._take_chunk(len(written), len(endings)):
                        written += chunk
                        ended = [ending for _, _, ending in chunk if ending is not None]
                        endings += ended
                        _insert_events([event_row(event) for event, _, _ in chunk])
                        self._record_endings(ended)
                        if loop_overdue():
                            break  # commit now: I/O waits for the loop
                    self.announce({event.run_id: event.seq for event, _, _ in written})
            except BaseException:
                # Keep everything for the next attempt rather than lose it.
                self._pending.extendleft(reversed(written))
                raise
            publish(written)
            for ending in endings:
                ending.done()
            if self.count_events is not None:
                self.count_events(collections.Counter(event.type for event, _, _ in written))
            return bool(self._pending)

    def _take_chunk(self, events: int, endings: int) -> list[_Pending]:
        """Take the oldest pending events, a chunk of the transaction that already holds
        ``events`` events and ``endings`` endings; none once it holds all it may."""
        chunk: list[_Pending] = []
        events_left = min(CHUNK_EVENTS, MAX_EVENTS_PER_COMMIT - events)
        endings_left = min(CHUNK_ENDINGS, MAX_ENDINGS_PER_COMMIT - endings)
        while self._pending and len(chunk) < events_left and endings_left:
            chunk.append(pending := self._pending.popleft())
            if pending[2] is not None:
                endings_left -= 1
        return chunk

    def _record_endings(self, endings: list[_Ending]) -> None:
        """Record the runs' final writes, all at once in a savepoint; should that fail, each in
        a savepoint of its own, so that one that fails cannot undo the others. A run whose
        end could not be written keeps status RUNNING without a lease being renewed, and the
        sweep fails it."""
        if not endings:
            return
        try:
            with database.atomic():
                self.record_endings([ending.record for ending in endings])
            return
        except Exception:
            if len(endings) == 1:
                logger.exception("recording the end of a run failed")
                return
        for ending in endings:
            try:
                with database.atomic():
                    self.record_endings([ending.record])
            except Exception:
                logger.exception("recording the end of a run failed")

    def _write_forever(self) -> None:
        # While the database is away, attempts back off to a second apart and the failure
        # is logged once, not forty times a second.
        failures = 0
        while True:
            gevent.sleep(min(self.flush_interval * 2**failures, max(self.flush_interval, 1.0)))
            try:
                self.flush()
            except Exception:
                if not failures:
                    logger.exception("writing run events failed; retrying")
                failures = min(failures + 1, 10)
                continue
            if failures:
                logger.warning("writing run events works again")
                failures = 0
            if not self._pending:
                # Nothing left to write: stop until the next append starts a writer again.
                gevent.sleep(self.flush_interval)
                if not self._pending:
                    self._writer = None
                    return


def _insert_events(rows: list[tuple[str, int, str, str, int]]) -> None:
    """Insert event rows (inside a transaction); rows the database refuses are dropped.

    A refused row (its run deleted meanwhile) must not hold back every later event, so
    after a refusal the batch goes in row by row, each in its own savepoint.
    """
    try:
        with database.atomic():
            INSERT_EVENT.execute_rows(rows)
        return
    except peewee.IntegrityError:
        pass
    for row in rows:
        try:
            with database.atomic():
                INSERT_EVENT.execute_rows([row])
        except peewee.IntegrityError:
            logger.warning("dropped event %s of run %s: the database refused it", row[1], row[0])


# One event, ignored if already stored. Its rows are (run, seq, type, data, timestamp) tuples,
# the order of RunEvent's fields and of the SQL's parameters.
INSERT_EVENT = Statement(
    lambda run, seq, type, data, timestamp: RunEvent.insert(
        run=run, seq=seq, type=type, data=data, timestamp=timestamp
    ).on_conflict_ignore()
)


def event_row(event: Event) -> tuple[str, int, str, str, int]:
    return (event.run_id, event.seq, event.type, event.data, event.timestamp)


def write_event(event: Event) -> None:
    """Insert one event now, in the caller's transaction (a run's START, written with it)."""
    INSERT_EVENT.execute_rows([event_row(event)])


def publish(written: list[_Pending]) -> None:
    """Hand written events to their channels, waking each channel's streams once."""
    by_channel: dict[RunChannel, list[Event]] = {}
    for event, channel, _ in written:
        if channel is not None:
            by_channel.setdefault(channel, []).append(event)
    for channel, events in by_channel.items():
        channel.publish(events)
