"""Read a Server-Sent Events body the way the seed frames it, checking every byte of the framing.

Each frame is exactly ``id: N`` then ``data: {"event":...,"data":...,"timestamp":...}``, then a
blank line; the JSON has those three keys in that order with compact separators. Anything else
in the body (a stray line, a comment, a gap in the ids) fails the test that parses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

EVENT_TYPES = {
    "START",
    "REASONING_DELTA",
    "CONTENT_DELTA",
    "TOOL_START",
    "TOOL_END",
    "STOP",
    "ERROR",
}


@dataclass(frozen=True)
class Frame:
    id: int
    event: str
    data: str
    timestamp: int

    def json_data(self) -> dict:
        """Decode a payload that is itself JSON (START, TOOL_START, TOOL_END)."""
        value = json.loads(self.data)
        assert isinstance(value, dict), f"{self.event} data is not a JSON object: {self.data!r}"
        return value


def parse_frames(body: str) -> list[Frame]:
    """Split a complete SSE body into frames, asserting the exact seed framing."""
    assert body.endswith("\n\n"), f"the stream does not end with a blank line: {body[-80:]!r}"
    chunks = body[:-2].split("\n\n")
    frames = []
    for chunk in chunks:
        lines = chunk.split("\n")
        assert len(lines) == 2, f"a frame is not exactly 'id:' + 'data:': {chunk!r}"
        id_line, data_line = lines
        assert id_line.startswith("id: "), f"frame without an id line: {chunk!r}"
        assert id_line[4:].isdigit(), f"the id is not an integer: {id_line!r}"
        assert data_line.startswith("data: "), f"frame without a data line: {chunk!r}"
        raw = data_line[len("data: ") :]
        payload = json.loads(raw)
        assert isinstance(payload, dict), raw
        assert list(payload) == ["event", "data", "timestamp"], f"keys out of order: {raw}"
        # Compact separators, no ASCII escaping: re-encoding gives back the very same bytes.
        assert json.dumps(payload, separators=(",", ":"), ensure_ascii=False) == raw, raw
        assert payload["event"] in EVENT_TYPES, raw
        assert isinstance(payload["data"], str), raw
        assert isinstance(payload["timestamp"], int), raw
        frames.append(
            Frame(int(id_line[4:]), payload["event"], payload["data"], payload["timestamp"])
        )
    return frames


def assert_complete(frames: list[Frame]) -> None:
    """Assert ids 1..N without gaps, START first, STOP last and only last, no ERROR."""
    assert [frame.id for frame in frames] == list(range(1, len(frames) + 1))
    events = [frame.event for frame in frames]
    assert events[0] == "START", events
    assert events[-1] == "STOP", events
    assert "ERROR" not in events, [frame.data for frame in frames if frame.event == "ERROR"]
    assert events.count("START") == 1 and events.count("STOP") == 1, events
    timestamps = [frame.timestamp for frame in frames]
    assert timestamps == sorted(timestamps), "timestamps go backwards"


def content_of(frames: list[Frame]) -> str:
    """Concatenate the CONTENT_DELTAs, as the seed tells clients to."""
    return "".join(frame.data for frame in frames if frame.event == "CONTENT_DELTA")
