"""Property tests of the SSE encoder: whatever a model writes, clients read back exactly that.

``encode_event`` frames one run event. For any text (newlines, carriage returns, "data:" and
"id:" inside a delta, any Unicode but lone surrogates), any event type, id and timestamp, a
stream of such frames, cut into chunks anywhere (even inside a UTF-8 sequence), with pings in
between, must read back as the same events through three parsers: a strict implementation of
the WHATWG event-stream algorithm written here, sseclient-py, and tests/sse.py.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from sseclient import SSEClient

from agent_runs.runtime.events import PING_FRAME, EventType, encode_event

from .sse import parse_frames

# Any text a model could produce; lone surrogates are not text (they cannot be UTF-8 encoded).
TEXT = st.text(st.characters(exclude_categories=("Cs",)))
# Text that looks like SSE syntax, mixed with anything else.
TRICKY = st.lists(
    st.sampled_from(
        ["\n", "\r", "\r\n", "\n\n", "data:", "data: ", "id:", "id: 7", ":", " ", "\x00"]
    )
    | TEXT,
    max_size=8,
).map("".join)
EVENT_TYPES = st.sampled_from(EventType.ALL) | TEXT
EVENTS = st.tuples(
    st.integers(min_value=0, max_value=2**63 - 1),  # seq: the event id
    EVENT_TYPES,
    TRICKY | TEXT,
    st.integers(min_value=0, max_value=2**63 - 1),  # timestamp, epoch milliseconds
)


@dataclass(frozen=True)
class MessageEvent:
    """What an EventSource dispatches: its type, data and lastEventId."""

    type: str
    data: str
    last_event_id: str


LINE_END = re.compile(r"\r\n|\r|\n")


def whatwg_parse(chunks: Iterable[bytes]) -> Iterator[MessageEvent]:
    """Parse an event stream as the WHATWG HTML standard says (9.2.6, "Interpreting an event
    stream"): UTF-8 decoded as it arrives, lines ended by CRLF, LF or CR, an event dispatched
    on a blank line, an unfinished event at the end discarded."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer, first = "", True
    data: list[str] = []
    event_type, last_event_id = "", ""
    for chunk in [*chunks, None]:
        if chunk is None:
            buffer += decoder.decode(b"", final=True)
        else:
            buffer += decoder.decode(chunk)
        if first and buffer:
            buffer, first = buffer.removeprefix("\ufeff"), False
        while True:
            match = LINE_END.search(buffer)
            if match is None:
                break
            if match.group() == "\r" and match.end() == len(buffer) and chunk is not None:
                break  # the first half of a CRLF whose LF has yet to arrive
            line, buffer = buffer[: match.start()], buffer[match.end() :]
            if line == "":
                if data:
                    yield MessageEvent(event_type or "message", "\n".join(data), last_event_id)
                data, event_type = [], ""
                continue
            if line.startswith(":"):
                continue
            field, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if field == "event":
                event_type = value
            elif field == "data":
                data.append(value)
            elif field == "id" and "\x00" not in value:
                last_event_id = value
            # "retry" and unknown fields change no event.


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(stream)) for cut in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


def expected(events: list[tuple[int, str, str, int]]) -> list[dict]:
    return [{"event": type, "data": data, "timestamp": ts} for _, type, data, ts in events]


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_one_frame_is_one_data_line_with_its_id(event):
    seq, type, data, timestamp = event
    frame = encode_event(seq, type, data, timestamp).decode("utf-8")
    id_line, data_line, blank, end = LINE_END.split(frame)
    assert id_line == f"id: {seq}"
    assert data_line.startswith("data: ") and blank == end == ""
    assert json.loads(data_line[len("data: ") :]) == {
        "event": type,
        "data": data,
        "timestamp": timestamp,
    }


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_a_frame_is_byte_for_byte_what_json_dumps_writes(event):
    # The encoder writes the JSON by hand for speed; it must not drift from json.dumps.
    seq, type, data, timestamp = event
    payload = json.dumps(
        {"event": type, "data": data, "timestamp": timestamp},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert encode_event(seq, type, data, timestamp) == f"id: {seq}\ndata: {payload}\n\n".encode()


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(EVENTS, min_size=1, max_size=6),
    pings=st.lists(st.booleans(), min_size=6, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_a_stream_round_trips_through_a_whatwg_parser(events, pings, cuts):
    stream = b"".join(
        (PING_FRAME if ping else b"") + encode_event(*event)
        for event, ping in zip(events, pings, strict=False)
    )
    chunks = split_at(stream, cuts)
    parsed = list(whatwg_parse(chunks))
    assert [e.type for e in parsed] == ["message"] * len(events)
    assert [e.last_event_id for e in parsed] == [str(seq) for seq, *_ in events]
    assert [json.loads(e.data) for e in parsed] == expected(events)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(EVENTS, min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_a_stream_round_trips_through_sseclient(events, cuts):
    stream = PING_FRAME + b"".join(encode_event(*event) for event in events)
    parsed = list(SSEClient(split_at(stream, cuts)).events())
    assert [e.event for e in parsed] == ["message"] * len(events)
    assert [e.id for e in parsed] == [str(seq) for seq, *_ in events]
    assert [json.loads(e.data) for e in parsed] == expected(events)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(EVENTS, min_size=1, max_size=6))
def test_a_stream_round_trips_through_the_tests_parser(events):
    stream = b"".join(PING_FRAME + encode_event(*event) for event in events)
    parsed = parse_frames(stream.decode("utf-8"))
    assert [frame["id"] for frame in parsed] == [str(seq) for seq, *_ in events]
    assert [json.loads(frame["data"]) for frame in parsed] == expected(events)


def test_the_whatwg_parser_here_follows_the_standard():
    """The strict parser against the standard's own examples and its edge cases."""
    stream = (
        b"\xef\xbb\xbfdata: YHOO\ndata: +2\ndata: 10\n\n"  # BOM, multi-line data
        b": a comment\r\n"
        b"id: 1\rdata:first\r\rdata\n\n"  # CR line ends; "data" alone is an empty data line
        b"event: add\ndata: 73857293\nid\n\n"  # an event type; an empty id resets it
        b"data: dropped at the end"
    )
    for chunks in ([stream], [bytes([byte]) for byte in stream]):
        assert list(whatwg_parse(chunks)) == [
            MessageEvent("message", "YHOO\n+2\n10", ""),
            MessageEvent("message", "first", "1"),
            MessageEvent("message", "", "1"),
            MessageEvent("add", "73857293", ""),
        ]
