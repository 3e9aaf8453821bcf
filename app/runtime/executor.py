"""The executor: each run is a greenlet that drives an AgentLoop and records what it does.

The HTTP response that started a run is only one follower of it: the run goes on if that
client leaves, its events land in the log, and its final state is written in the same
transaction as its last events, so whoever sees STOP or ERROR also finds the run's final
status in the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.pool

from ..db import database
from ..models import Message, Run, RunStatus, Session, utcnow
from ..providers.base import Provider, ProviderError
from .agents import Agent
from .events import EventLog, EventType, RunChannel, json_data
from .loop import AgentLoop, RunCancelled

logger = logging.getLogger(__name__)


@dataclass
class RunJob:
    """Everything a run greenlet needs, as plain values: no request, no app context."""

    run_id: str
    session_pk: int
    session_uid: str
    agent: Agent
    provider: Provider
    model: str
    message: str
    media: list[dict[str, Any]] = field(default_factory=list)
    temperature: float | None = None
    max_tokens: int | None = None
    generate_followups: bool = False


class Executor:
    """Runs agent runs in greenlets of this worker and fans their events out."""

    def __init__(self, *, flush_interval: float, ping_interval: float, tool_timeout: float):
        self.log = EventLog(flush_interval)
        self.ping_interval = ping_interval
        self.tool_timeout = tool_timeout
        self.channels: dict[str, RunChannel] = {}
        self.greenlets = gevent.pool.Group()
        self._cancelled: set[str] = set()

    def start(self, job: RunJob) -> tuple[RunChannel, gevent.Greenlet]:
        """Emit the run's START event and begin executing it in a new greenlet."""
        channel = RunChannel(job.run_id)
        self.channels[job.run_id] = channel
        self._emit(
            channel,
            EventType.START,
            json_data({"runId": job.run_id, "sessionId": job.session_uid}),
        )
        return channel, self.greenlets.spawn(self._execute, job, channel)

    def follow(self, channel: RunChannel, after: int = 0) -> Iterator[bytes]:
        """Yield the SSE frames of a run executing here, from seq ``after`` on."""
        return channel.follow(after, self.ping_interval)

    def cancel(self, run_id: str) -> bool:
        """Ask a run executing here to stop at its next chunk or tool boundary."""
        if run_id not in self.channels:
            return False
        self._cancelled.add(run_id)
        return True

    def join(self, timeout: float | None = None) -> None:
        """Wait for every run of this executor to finish, then write what is pending."""
        self.greenlets.join(timeout=timeout)
        self.log.flush()

    def _emit(self, channel: RunChannel, type: str, data: str) -> None:
        event = channel.make_event(type, data)
        self.log.append(event)
        channel.publish(event)

    def _execute(self, job: RunJob, channel: RunChannel) -> None:
        with database.connection_context():
            loop = AgentLoop(
                agent=job.agent,
                provider=job.provider,
                model=job.model,
                emit=lambda type, data: self._emit(channel, type, data),
                is_cancelled=lambda: job.run_id in self._cancelled,
                temperature=job.temperature,
                max_tokens=job.max_tokens,
                tool_timeout=self.tool_timeout,
                generate_followups=job.generate_followups,
            )
            status, final_type, final_data = RunStatus.COMPLETED, EventType.STOP, ""
            error_type = error = None
            try:
                loop.run(self._history(job))
                if loop.followups:
                    final_data = json_data({"followups": loop.followups})
            except RunCancelled:
                status, final_data = RunStatus.CANCELLED, json_data({"reason": "cancelled"})
            except ProviderError as exc:
                status, final_type = RunStatus.FAILED, EventType.ERROR
                error_type, error = "model_error", str(exc)
            except Exception as exc:
                logger.exception("run %s failed", job.run_id)
                status, final_type = RunStatus.FAILED, EventType.ERROR
                error_type, error = "internal_error", f"The run failed: {type(exc).__name__}."
            self._finish(job, channel, loop, status, final_type, error or final_data, error_type)

    def _history(self, job: RunJob) -> list[dict[str, Any]]:
        """Return the session's conversation in the providers' neutral message form."""
        rows = Message.select().where(Message.session == job.session_pk).order_by(Message.id)
        history: list[dict[str, Any]] = []
        for row in rows:
            message: dict[str, Any] = {"role": row.role, "content": row.content}
            if row.tool_calls:
                message["tool_calls"] = row.tool_calls
            if row.role == "tool":
                message["tool_call_id"] = row.tool_call_id
                message["name"] = row.name
            history.append(message)
        if job.media and history and history[-1]["role"] == "user":
            history[-1]["media"] = job.media
        return history

    def _finish(
        self,
        job: RunJob,
        channel: RunChannel,
        loop: AgentLoop,
        status: str,
        final_type: str,
        final_data: str,
        error_type: str | None,
    ) -> None:
        """Record the run's outcome and its last event together, then end its stream."""
        event = channel.make_event(final_type, final_data)
        self.log.append(event)
        now = utcnow()
        if status == RunStatus.COMPLETED:
            messages = loop.new_messages
        elif status == RunStatus.CANCELLED and loop.answer:
            messages = [{"role": "assistant", "content": loop.answer}]
        else:
            messages = []
        try:
            with database.atomic():
                self.log.flush()
                (
                    Run.update(
                        status=status,
                        content=loop.answer,
                        reasoning_steps=loop.reasoning_steps,
                        tool_calls=loop.tool_calls,
                        followups=loop.followups,
                        usage=loop.usage.as_dict(),
                        error_type=error_type,
                        error=final_data if final_type == EventType.ERROR else None,
                        completed_at=now,
                        lease_expires_at=None,
                    )
                    .where(Run.id == job.run_id)
                    .execute()
                )
                if messages:
                    Message.insert_many(
                        [
                            {
                                "session": job.session_pk,
                                "run": job.run_id,
                                "role": message["role"],
                                "content": message.get("content") or "",
                                "tool_calls": message.get("tool_calls"),
                                "tool_call_id": message.get("tool_call_id"),
                                "name": message.get("name"),
                                "created_at": now,
                            }
                            for message in messages
                        ]
                    ).execute()
                (
                    Session.update(active_run_id=None, updated_at=now)
                    .where(Session.id == job.session_pk, Session.active_run_id == job.run_id)
                    .execute()
                )
        except Exception:
            logger.exception("recording the end of run %s failed", job.run_id)
        finally:
            channel.publish(event)
            self.channels.pop(job.run_id, None)
            self._cancelled.discard(job.run_id)
