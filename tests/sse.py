"""A small SSE parser for the tests, following the WHATWG event-stream rules."""

from __future__ import annotations

import json


def parse_frames(text: str) -> list[dict]:
    """Split an event stream into events: {"id": str|None, "data": str}; comments dropped."""
    events, data, event_id = [], [], None
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "":
            if data:
                events.append({"id": event_id, "data": "\n".join(data)})
            data, event_id = [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
    return events


def parse_stream(text: str) -> list[dict]:
    """Return the run events of a stream: {"id": int, "event", "data", "timestamp"}."""
    return [{"id": int(frame["id"]), **json.loads(frame["data"])} for frame in parse_frames(text)]
