"""The executor: each run is a greenlet that drives an AgentLoop and records what it does.

The HTTP response that started a run is only one follower of it: the run goes on if that
client leaves, its events land in the log, and its final state is written in the same
transaction as its last events, so whoever sees STOP or ERROR also finds the run's final
status in the database.

Each worker's executor also keeps its runs alive in the database: a keeper greenlet renews the
lease of every run executing here and sweeps runs whose lease expired because their worker
died. What the database holds of runs is read and written through :mod:`.store`; news of runs
executing elsewhere (their events, cancel requests that reached another worker) comes from a
:class:`~.watch.RunWatcher`.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.queue

from ..db import DATABASE_DOWN, WalCheckpointer, database, refresh_statistics, sqlite_path
from ..models import RunStatus, utcnow
from ..providers.base import Provider, ProviderError
from . import store
from .addresses import GuardedBackend
from .agents import Agent
from .events import PING_FRAME, Event, EventLog, EventType, RunChannel, json_data
from .idempotency import prune_keys
from .loop import AgentLoop, InvalidOutput, RunCancelled, RunPaused, Usage
from .mcp import McpClients, McpSettings, McpToolbox
from .observe import NO_RUN, RunInfo, RunObserver, RunWatch
from .outbox import RunNotice
from .store import (
    RunEnding,
    cancelled_tool_message,
    message_rows,
    prune_events,
    record_run_endings,
    sweep_expired_runs,
)
from .turns import step_aside
from .watch import PollingWatcher, RunWatcher, Watch

logger = logging.getLogger(__name__)


class WorkerStopping(RunCancelled):
    """Raised in runs still executing when the worker shuts down past its grace period."""


# Seconds between deletions of expired events.
PRUNE_EVERY = 3600.0

SHUTDOWN_MESSAGE = "The server shut down before the run finished."


@dataclass
class RunJob:
    """Everything a run greenlet needs, as plain values: no request, no app context."""

    run_id: str
    session_pk: int
    session_uid: str
    agent: Agent
    provider: Provider
    model: str
    # The organisation and agent the run belongs to, for the webhooks told of its end.
    org_id: str
    media: list[dict[str, Any]] = field(default_factory=list)
    temperature: float | None = None
    max_tokens: int | None = None
    generate_followups: bool = False
    # The JSON Schema the final answer must fit (structured output), or None for text.
    response_schema: dict[str, Any] | None = None
    # A run resumed after a pause: its next event's seq, the tool calls still to run (the
    # first approved or rejected by ``decision``), and what the run had produced so far.
    first_seq: int = 1
    # The conversation so far, when the caller already knows it; else it is read back.
    history: list[dict[str, Any]] | None = None
    pending_calls: list[dict[str, Any]] | None = None
    decision: str | None = None
    prior: dict[str, Any] | None = None
    # Headers for the agent's MCP servers that the run's caller sent, by server name: held
    # here only, never written to the run's record or its events.
    mcp_headers: dict[str, dict[str, str]] | None = None
    # What the run runs on and where it comes from, for those who watch runs (see
    # observe): the model as the run records it ("provider:model"), and the W3C trace
    # context of the request that started it.
    model_id: str = ""
    trace_context: dict[str, str] | None = None


@dataclass
class ActiveRun:
    """A run this worker is executing (or has queued) and the state it is in."""

    job: RunJob
    channel: RunChannel
    done: gevent.event.Event = field(default_factory=gevent.event.Event)
    greenlet: gevent.Greenlet | None = None
    cancelled: bool = False
    # True while the loop runs: only then may a cancel interrupt the greenlet where it waits.
    in_loop: bool = False
    watch: RunWatch = NO_RUN
    # Until the run emits its first event after START (the watch is told of it).
    awaiting_first_event: bool = True

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


@dataclass(frozen=True)
class ExecutorSettings:
    flush_interval: float = 0.025
    ping_interval: float = 15.0
    tool_timeout: float = 30.0
    # A run's lease lasts this long and is renewed a few times within it.
    lease_seconds: float = 30.0
    # How often the keeper looks for cancel requests made on other workers, and how often a
    # follower of a run executing elsewhere reads its new events.
    poll_interval: float = 0.25
    # Background runs executing at once in one worker; more wait their turn, QUEUED.
    max_background_runs: int = 32
    # On shutdown, how long runs may go on before they are failed.
    shutdown_timeout: float = 25.0
    # Days the events of a finished run are kept.
    retention_days: float = 7.0
    # Seconds an Idempotency-Key names the run it started.
    idempotency_ttl: float = 86_400.0
    # A tool result longer than this many characters is cut, with a note.
    max_tool_result_chars: int = 100_000
    mcp: McpSettings = field(default_factory=McpSettings)


class Executor:
    """Runs agent runs in greenlets of this worker and fans their events out."""

    #: The executors whose services run in this process, shut down when it exits.
    started: weakref.WeakSet[Executor] = weakref.WeakSet()

    def __init__(
        self,
        settings: ExecutorSettings,
        watcher: RunWatcher | None = None,
        services: Sequence[Callable[[], None]] = (),
        observer: RunObserver | None = None,
    ) -> None:
        """``services``: more of the worker's background loops, started and stopped with
        the executor's own (each runs in a greenlet until it is killed); ``observer``: who
        watches its runs (see observe)."""
        self.settings = settings
        # How runs executing elsewhere are followed and cancel requests heard.
        self.watcher = watcher or PollingWatcher(settings.poll_interval)
        self._extra_services = tuple(services)
        self.observer = observer or RunObserver()
        self.log = EventLog(
            settings.flush_interval,
            record_endings=record_run_endings,
            announce=store.announce_events,
            count_events=self.observer.events_written if self.observer.counts_events else None,
        )
        self.active: dict[str, ActiveRun] = {}
        self.greenlets = gevent.pool.Group()
        self._background = gevent.pool.Pool(settings.max_background_runs)
        self._queue: gevent.queue.Queue[ActiveRun] = gevent.queue.Queue()
        self._services: list[gevent.Greenlet] = []
        self._checkpointer: WalCheckpointer | None = None
        self._stopping = False
        self.mcp = McpClients(settings.mcp)
        # The connections of organisations' agents to their model servers: only where the
        # address policy allows (their MCP servers' go by McpClients, by the same policy).
        self.guarded_backend = GuardedBackend(settings.mcp.addresses)

    # Starting runs ----------------------------------------------------------------------

    def start(
        self, job: RunJob, *, start_event: Event | None = None, background: bool = False
    ) -> ActiveRun:
        """Begin executing a run here.

        ``start_event`` is a new run's START, already written with the run itself: its
        streams get it at once. A background run waits in this worker's queue until the pool
        has room for it.
        """
        self._ensure_services()
        active = ActiveRun(job, RunChannel(job.run_id, job.first_seq, written=start_event))
        self.active[job.run_id] = active
        if background:
            self._queue.put(active)
        else:
            active.greenlet = self.greenlets.spawn(self._execute, active)
        return active

    def _dispatch_background(self) -> None:
        while True:
            active = self._queue.get()
            self._background.wait_available()
            active.greenlet = self._background.spawn(self._execute, active, True)
            self.greenlets.add(active.greenlet)

    # Following runs ---------------------------------------------------------------------

    def follow(self, run_id: str, after: int = 0) -> Iterator[bytes]:
        """Yield a run's SSE frames after seq ``after``: replayed from the log, then live.

        A run executing in this worker is tailed from memory; one executing in another worker
        (or finished) is read from the log, read again whenever the watcher says it may have
        more. The stream ends once the run has ended or paused and every event is sent: a run
        that paused and went on replays through its pause's STOP to its end.
        """
        self.observer.stream_opened()
        try:
            with self.watcher.watch(run_id) as watch:
                yield from self._follow(run_id, after, watch)
        finally:
            self.observer.stream_closed()

    def _follow(self, run_id: str, after: int, watch: Watch) -> Iterator[bytes]:
        clock = gevent.get_hub().loop
        ping_interval = self.settings.ping_interval
        quiet_since = clock.now()
        while True:
            active = self.active.get(run_id)
            if active is not None and after + 1 >= active.channel.first_seq:
                yield from active.channel.follow(after, ping_interval)
                return
            try:
                with database.connection_context():
                    # Status first: if the run had settled by then, every event it will ever
                    # have is already in the log, and an empty read means the stream is done.
                    settled = store.is_settled(run_id)
                    rows = store.read_events(run_id, after)
            except DATABASE_DOWN:
                # The stream stays open (and pinged) while the database is away, and reads
                # on from the last event it sent once it is back: nothing lost or repeated.
                gevent.sleep(self.settings.poll_interval)
                if clock.now() - quiet_since >= ping_interval:
                    yield PING_FRAME
                    quiet_since = clock.now()
                continue
            for row in rows:
                yield row.frame
                after = row.seq
            if settled and not rows:
                return
            if rows:
                quiet_since = clock.now()
                continue
            # Read again once the watcher has news; a quiet stream gets its pings meanwhile.
            while True:
                news = watch.wait(after, max(0.0, quiet_since + ping_interval - clock.now()))
                if clock.now() - quiet_since >= ping_interval:
                    yield PING_FRAME
                    quiet_since = clock.now()
                if news:
                    break

    def wait(self, run_id: str) -> None:
        """Return once a run has ended or paused, wherever it executes.

        A run of this worker is waited for; one of another worker is polled in the database.
        Holds no database connection while it waits.
        """
        active = self.active.get(run_id)
        if active is not None:
            active.wait()
            return
        while True:
            with database.connection_context():
                if store.is_settled(run_id):
                    return
            gevent.sleep(self.settings.poll_interval)

    # Cancelling -------------------------------------------------------------------------

    def cancel(self, run_id: str, reason: type[RunCancelled] = RunCancelled) -> bool:
        """Stop a run executing here at once: where it waits, or at its next boundary."""
        active = self.active.get(run_id)
        if active is None:
            return False
        active.cancelled = True
        if active.in_loop and active.greenlet is not None:
            active.greenlet.kill(reason(), block=False)
        return True

    # Executing --------------------------------------------------------------------------

    def _emit(self, active: ActiveRun, type: str, data: str) -> None:
        if active.awaiting_first_event:
            active.awaiting_first_event = False
            active.watch.first_event()
        self.log.append(active.channel.make_event(type, data), active.channel)

    def _watch(self, active: ActiveRun) -> RunWatch:
        """Tell the observer that the run begins executing; return its watch."""
        job = active.job
        active.watch = self.observer.run_started(
            RunInfo(
                run_id=job.run_id,
                session_id=job.session_uid,
                org_id=job.org_id,
                agent_id=job.agent.id,
                agent_name=job.agent.name,
                model_id=job.model_id,
                provider=job.model_id.partition(":")[0],
                model=job.model,
                resumed=job.first_seq > 1,
                trace_context=job.trace_context,
            )
        )
        return active.watch

    def _execute(self, active: ActiveRun, queued: bool = False) -> None:
        # The run holds a database connection only while it reads or writes: thousands of
        # runs may be streaming at once, each mostly waiting on its model.
        job = active.job
        watch = self._watch(active)
        if queued and not active.cancelled:
            with database.connection_context():
                store.mark_started(job.run_id)
        loop = AgentLoop(
            agent=job.agent,
            provider=job.provider,
            model=job.model,
            emit=lambda type, data: self._emit(active, type, data),
            is_cancelled=lambda: active.cancelled,
            step_aside=step_aside,
            temperature=job.temperature,
            max_tokens=job.max_tokens,
            tool_timeout=self.settings.tool_timeout,
            generate_followups=job.generate_followups,
            mcp=McpToolbox(self.mcp, job.agent.mcp_servers, job.mcp_headers)
            if job.agent.mcp_servers
            else None,
            max_result_chars=self.settings.max_tool_result_chars,
            response_schema=job.response_schema,
            watch=watch,
        )
        _restore(loop, job.prior)
        try:
            outcome = self._run_loop(active, loop)
        finally:
            active.in_loop = False
        self._finish(active, loop, outcome)

    def _run_loop(self, active: ActiveRun, loop: AgentLoop) -> Outcome:
        """Run the agent loop; return how the run ended, whatever way it ended."""
        job = active.job
        try:
            if active.cancelled:
                raise RunCancelled()
            with database.connection_context():
                history = self._history(job)
            active.in_loop = True
            loop.run(history, job.pending_calls, job.decision)
            active.in_loop = False
        except RunPaused as paused:
            return Outcome(
                RunStatus.PAUSED,
                EventType.STOP,
                json_data({"reason": "paused", "requiredAction": paused.required_action}),
                required_action=paused.required_action,
                pending_calls=paused.calls,
            )
        except WorkerStopping:
            return Outcome(RunStatus.FAILED, EventType.ERROR, SHUTDOWN_MESSAGE, "worker_lost")
        except RunCancelled:
            return Outcome(RunStatus.CANCELLED, EventType.STOP, json_data({"reason": "cancelled"}))
        except ProviderError as exc:
            return Outcome(RunStatus.FAILED, EventType.ERROR, str(exc), exc.error_type)
        except InvalidOutput as exc:
            return Outcome(RunStatus.FAILED, EventType.ERROR, str(exc), "invalid_output")
        except Exception as exc:
            # The run's watch logs it, with its traceback, when the run ends.
            message = f"The run failed: {type(exc).__name__}."
            return Outcome(
                RunStatus.FAILED, EventType.ERROR, message, "internal_error", exception=exc
            )
        # STOP's data is "" as the seed shows; a run that asked for followups gets them there,
        # with the run's token usage beside them.
        data = ""
        if job.generate_followups:
            data = json_data({"followups": loop.followups, "usage": usage_view(loop.usage)})
        return Outcome(RunStatus.COMPLETED, EventType.STOP, data)

    def _history(self, job: RunJob) -> list[dict[str, Any]]:
        """Return the session's conversation in the providers' neutral message form."""
        if job.history is not None:
            history = [dict(message) for message in job.history]
        else:
            history = store.read_history(job.session_pk)
        if job.media and job.first_seq == 1 and history and history[-1]["role"] == "user":
            history[-1]["media"] = job.media
        return history

    def _finish(self, active: ActiveRun, loop: AgentLoop, outcome: Outcome) -> None:
        """Queue the run's outcome to be written with its last event; its stream ends then."""
        job = active.job
        if outcome.status in (RunStatus.COMPLETED, RunStatus.PAUSED):
            messages = loop.new_messages
        elif outcome.status == RunStatus.CANCELLED:
            messages = _closing_messages(loop.new_messages, loop.answer)
        else:
            messages = []
        now = utcnow()
        paused = outcome.status == RunStatus.PAUSED
        result: dict[str, Any] = dict(
            run_id=job.run_id,
            status=outcome.status,
            content=loop.answer,
            output=loop.output if outcome.status == RunStatus.COMPLETED else None,
            reasoning_steps=loop.reasoning_steps,
            tool_calls=loop.tool_calls,
            followups=loop.followups,
            usage=loop.usage.as_dict(),
            error_type=outcome.error_type,
            error=outcome.data if outcome.type == EventType.ERROR else None,
            cancel_requested=False,
            required_action=outcome.required_action,
            pending_calls=outcome.pending_calls,
            lease_expires_at=None,
            # A paused run has not completed (nor ever had: continuing clears no such time).
            completed_at=None if paused else now,
        )

        ending = RunEnding(
            outcome=result,
            messages=message_rows(job.session_pk, job.run_id, messages, now),
            release=None
            if paused
            else {"session_id": job.session_pk, "run_id": job.run_id, "now": now},
            notice=RunNotice(
                run_id=job.run_id,
                org_id=job.org_id,
                agent_id=job.agent.id,
                session_id=job.session_uid,
                status=outcome.status,
                usage=result["usage"],
                completed_at=result["completed_at"],
            ),
        )

        def done() -> None:
            self.active.pop(job.run_id, None)
            active.done.set()

        active.watch.ended(
            outcome.status,
            result["usage"],
            outcome.error_type,
            result["error"],
            outcome.exception,
        )
        event = active.channel.make_event(outcome.type, outcome.data)
        self.log.end_run(event, active.channel, ending, done)

    # Leases, remote cancels, the sweep --------------------------------------------------

    def ensure_started(self) -> None:
        """Start this worker's keeper and background dispatcher, once.

        Called on the worker's first request (and first run), so they live in the serving
        process, never in a parent that forked it or in a CLI command.
        """
        self._ensure_services()

    def _ensure_services(self) -> None:
        if self._services:
            return
        self._services = [
            gevent.spawn(self._keep),
            gevent.spawn(self._dispatch_background),
            *(gevent.spawn(service) for service in self._extra_services),
        ]
        self.watcher.start(self._cancel_requested, lambda: self.active)
        path = sqlite_path()
        if path is not None:
            self._checkpointer = WalCheckpointer(path, self.settings.poll_interval)
            self._checkpointer.start()
        Executor.started.add(self)

    def _keep(self) -> None:
        renew_every = self.settings.lease_seconds / 3
        last_renewal = last_prune = 0.0
        failing = False
        while True:
            gevent.sleep(self.settings.poll_interval)
            try:
                with database.connection_context():
                    now = gevent.get_hub().loop.now()
                    if now - last_renewal >= renew_every:
                        self._renew_leases()
                        sweep_expired_runs(self.observer)
                        last_renewal = now
                    if now - last_prune >= PRUNE_EVERY:
                        prune_events(self.settings.retention_days)
                        prune_keys(self.settings.idempotency_ttl)
                        refresh_statistics()
                        last_prune = now
                if self._checkpointer is not None and (error := self._checkpointer.take_error()):
                    logger.warning("checkpointing the database's log failed: %s", error)
                if failing:
                    logger.warning("keeping runs alive works again")
                    failing = False
            except Exception:
                # Told once while the database is away, not every poll interval.
                if not failing:
                    logger.exception("keeping runs alive failed; retrying")
                failing = True

    def _cancel_requested(self, run_id: str) -> None:
        """Cancel a run of this worker that a request to another worker asked to stop."""
        active = self.active.get(run_id)
        if active is not None and not active.cancelled:
            self.cancel(run_id)

    def _renew_leases(self) -> None:
        store.renew_leases(list(self.active), self.settings.lease_seconds)

    # Shutting down ----------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> None:
        """Let runs finish within ``timeout``; fail the rest; stop the keeper."""
        if self._stopping:
            return
        self._stopping = True
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        try:
            self.greenlets.join(timeout=timeout)
            for run_id in list(self.active):
                self.cancel(run_id, WorkerStopping)
            self.greenlets.join(timeout=5)
            for active in list(self.active.values()):
                if active.greenlet is None:  # still queued: it never started
                    self._finish(
                        active,
                        AgentLoop(active.job.agent, active.job.provider, "", lambda t, d: None),
                        Outcome(RunStatus.FAILED, EventType.ERROR, SHUTDOWN_MESSAGE, "worker_lost"),
                    )
                    self.observer.run_closed(
                        active.job.run_id,
                        active.job.agent.id,
                        RunStatus.FAILED,
                        EventType.ERROR,
                        "the server shut down before it started",
                    )
            self.log.flush()
        finally:
            # Waited for: a service killed but still running would go on using the database
            # after whoever shuts down has closed or rebound it.
            gevent.killall(self._services, block=True, timeout=5)
            self._services = []
            self.watcher.stop()
            if self._checkpointer is not None:
                self._checkpointer.stop()
                self._checkpointer = None
            self.mcp.close()
            Executor.started.discard(self)
            self._stopping = False


def shutdown_all(timeout: float | None = None) -> None:
    """Shut down every executor of this process that started its services."""
    for executor in list(Executor.started):
        executor.shutdown(timeout)


# One hook for the process, not one per executor: the hook would keep each alive forever.
atexit.register(shutdown_all)


@dataclass
class Outcome:
    """How a run ended (or paused): its status and its last event."""

    status: str
    type: str
    data: str
    error_type: str | None = None
    required_action: dict[str, Any] | None = None
    pending_calls: list[dict[str, Any]] | None = None
    # What broke a run that failed in a way nobody expected.
    exception: BaseException | None = None


def usage_view(usage: Usage) -> dict[str, int]:
    """Token usage as the API reports it (camelCase, like RunResponse.usage)."""
    return {
        "inputTokens": usage.input_tokens,
        "outputTokens": usage.output_tokens,
        "reasoningTokens": usage.reasoning_tokens,
        "modelCalls": usage.model_calls,
    }


def _restore(loop: AgentLoop, prior: dict[str, Any] | None) -> None:
    """Give a resumed run's loop what the run had produced before its pause."""
    if not prior:
        return
    loop.content = [prior["content"]] if prior.get("content") else []
    loop.reasoning_steps = list(prior.get("reasoning_steps") or [])
    loop.tool_calls = list(prior.get("tool_calls") or [])
    usage = prior.get("usage") or {}
    loop.usage = Usage(**{k: usage.get(k, 0) for k in Usage().as_dict()})


def _closing_messages(messages: list[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
    """Keep a cancelled run's history valid: every tool call answered, the partial answer kept."""
    kept = list(messages)
    answered = {m.get("tool_call_id") for m in kept if m["role"] == "tool"}
    for message in messages:
        for call in message.get("tool_calls") or ():
            if call["id"] not in answered:
                kept.append(cancelled_tool_message(call))
    if answer and not (kept and kept[-1]["role"] == "assistant" and "tool_calls" not in kept[-1]):
        kept.append({"role": "assistant", "content": answer})
    return kept
