"""What runs tell those who watch them: the log, metrics and traces listen here.

The executor and the agent loop call these hooks when a run starts and ends, around each
model call and tool call, when a stream opens and closes, and once for each batch of events
the log wrote: never once per event or model delta, so watching costs a run nothing per
token. Every hook is given plain values; none sees a request. The base classes listen to
nothing; :class:`Observers` hands each hook to several observers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """The run a watch is for, as plain values."""

    run_id: str
    session_id: str
    org_id: str
    agent_id: str
    agent_name: str
    # The model as the run records it ("openai:gpt-4o-mini"), its back end ("openai") and
    # the name the back end is given ("gpt-4o-mini").
    model_id: str
    provider: str
    model: str
    # A run continued after a pause: it has no START event of its own.
    resumed: bool = False
    # The W3C trace context (traceparent, tracestate) of the request that started the run.
    trace_context: Mapping[str, str] | None = None


class CallWatch:
    """One model call or tool call of a run."""

    def ended(
        self,
        *,
        outcome: str = "ok",
        error: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        finish_reason: str | None = None,
    ) -> None:
        """The call is over: ``outcome`` is ok, error, timeout, rejected or cancelled."""


NO_CALL = CallWatch()


class RunWatch:
    """One run as it executes on this worker."""

    def first_event(self) -> None:
        """The run emitted its first event after START."""

    def model_call(
        self, purpose: str, temperature: float | None, max_tokens: int | None
    ) -> CallWatch:
        """A model call begins (``purpose`` is "answer" or "followups")."""
        return NO_CALL

    def tool_call(self, call_id: str, name: str, known: bool) -> CallWatch:
        """A tool call begins; ``known`` is False for a tool the agent does not have."""
        return NO_CALL

    def ended(
        self,
        status: str,
        usage: Mapping[str, int],
        error_type: str | None = None,
        error: str | None = None,
        exception: BaseException | None = None,
    ) -> None:
        """The run ended (or paused) with ``status``; ``exception`` is what broke it, if
        something did that the run did not expect."""


NO_RUN = RunWatch()


class RunObserver:
    """Watches every run of a worker's executor."""

    def run_started(self, run: RunInfo) -> RunWatch:
        """A run begins executing here, in its own greenlet; return what watches it."""
        return NO_RUN

    def run_closed(
        self, run_id: str, agent_id: str, status: str, last_event: str, reason: str
    ) -> None:
        """A run no executor holds was ended (cancelled while paused, lost with its worker,
        or never started before a shutdown): ``last_event`` is the type of the event that
        closed its log, ``reason`` says why in words."""

    def events_written(self, counts: Mapping[str, int]) -> None:
        """The event log committed events: how many of each type."""

    def stream_opened(self) -> None:
        """A client began following a run's events."""

    def stream_closed(self) -> None:
        """A client stopped following a run's events (it ended, or the client left)."""

    @property
    def counts_events(self) -> bool:
        """Whether :meth:`events_written` is wanted: counting costs a little per event."""
        return False


class Observers(RunObserver):
    """Several observers as one: each hook goes to each of them, in order."""

    def __init__(self, observers: Sequence[RunObserver]) -> None:
        self.observers = tuple(observers)
        self._counting = tuple(o for o in self.observers if o.counts_events)

    def run_started(self, run: RunInfo) -> RunWatch:
        watches = [observer.run_started(run) for observer in self.observers]
        watches = [watch for watch in watches if watch is not NO_RUN]
        if not watches:
            return NO_RUN
        return watches[0] if len(watches) == 1 else _RunWatches(watches)

    def run_closed(
        self, run_id: str, agent_id: str, status: str, last_event: str, reason: str
    ) -> None:
        for observer in self.observers:
            observer.run_closed(run_id, agent_id, status, last_event, reason)

    def events_written(self, counts: Mapping[str, int]) -> None:
        for observer in self._counting:
            observer.events_written(counts)

    def stream_opened(self) -> None:
        for observer in self.observers:
            observer.stream_opened()

    def stream_closed(self) -> None:
        for observer in self.observers:
            observer.stream_closed()

    @property
    def counts_events(self) -> bool:
        return bool(self._counting)


class _RunWatches(RunWatch):
    def __init__(self, watches: Sequence[RunWatch]) -> None:
        self.watches = watches

    def first_event(self) -> None:
        for watch in self.watches:
            watch.first_event()

    def model_call(
        self, purpose: str, temperature: float | None, max_tokens: int | None
    ) -> CallWatch:
        return _calls(
            [watch.model_call(purpose, temperature, max_tokens) for watch in self.watches]
        )

    def tool_call(self, call_id: str, name: str, known: bool) -> CallWatch:
        return _calls([watch.tool_call(call_id, name, known) for watch in self.watches])

    def ended(self, status: str, usage: Mapping[str, int], *args: Any, **kwargs: Any) -> None:
        for watch in self.watches:
            watch.ended(status, usage, *args, **kwargs)


class _CallWatches(CallWatch):
    def __init__(self, calls: Sequence[CallWatch]) -> None:
        self.calls = calls

    def ended(self, **kwargs: Any) -> None:
        for call in self.calls:
            call.ended(**kwargs)


def _calls(calls: list[CallWatch]) -> CallWatch:
    calls = [call for call in calls if call is not NO_CALL]
    if not calls:
        return NO_CALL
    return calls[0] if len(calls) == 1 else _CallWatches(calls)
