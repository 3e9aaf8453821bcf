"""The status views built by hand equal what AgentRunSchema, the documented contract, dumps."""

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_runs.models import RunStatus
from agent_runs.schemas import AgentRunSchema, run_status_views, utc_timestamp

text = st.text(max_size=20)
maybe_text = st.none() | text
times = st.datetimes(
    min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2200, 1, 1)
)
usage_keys = st.sampled_from(["input_tokens", "output_tokens", "reasoning_tokens", "model_calls"])
rows = st.fixed_dictionaries(
    {
        "id": text,
        "agent_id": text,
        "session_id": text,
        "user_id": maybe_text,
        "org_id": text,
        "status": st.sampled_from(RunStatus.ALL),
        "model": text,
        "agent_version": st.none() | st.integers(1, 2**31),
        "content": text,
        "output": st.none() | st.dictionaries(text, text | st.integers()) | st.lists(text),
        "usage": st.none() | st.dictionaries(usage_keys, st.integers(0, 2**40)),
        "error": st.none() | st.fixed_dictionaries({"type": text, "message": text}),
        "required_action": st.none()
        | st.dictionaries(text, st.none() | text | st.integers() | st.lists(text, max_size=3)),
        "created_at": times,
        "started_at": st.none() | times,
        "completed_at": st.none() | times,
    }
)


@settings(max_examples=300)
@given(st.lists(rows, max_size=5))
def test_run_status_views_equal_the_schemas_dump(runs):
    assert run_status_views(runs) == AgentRunSchema(many=True).dump(runs)


@given(times)
def test_times_read_as_stored_are_written_like_datetimes(time):
    # SQLite keeps a naive time as str(time); batch status prints that text without parsing it.
    assert utc_timestamp(str(time)) == utc_timestamp(time)
    assert utc_timestamp(time.isoformat()) == utc_timestamp(time)
    assert utc_timestamp(time.isoformat() + "+00:00") == utc_timestamp(time)
    assert utc_timestamp(time.isoformat() + "Z") == utc_timestamp(time)


@pytest.mark.parametrize(
    "stored, written",
    [
        ("2026-05-06 10:00:00", "2026-05-06T10:00:00Z"),
        ("2026-05-06 10:00:00.999999", "2026-05-06T10:00:00Z"),
        # Offsets, however short, are converted, not cut off.
        ("2026-05-06 10:00:00.1+0500", "2026-05-06T05:00:00Z"),
        ("2026-05-06 10:00:00.123+05", "2026-05-06T05:00:00Z"),
        ("2026-05-06 10:00:00+05:00", "2026-05-06T05:00:00Z"),
        ("2026-05-06T10:00:00Z", "2026-05-06T10:00:00Z"),
        ("not a time", "not a time"),
    ],
)
def test_stored_text_times(stored, written):
    assert utc_timestamp(stored) == written


def test_times_are_written_in_utc_to_the_second():
    naive = datetime.datetime(2026, 5, 6, 10, 0, 0, 999_999)
    assert utc_timestamp(naive) == "2026-05-06T10:00:00Z"
    paris = datetime.timezone(datetime.timedelta(hours=2))
    assert utc_timestamp(datetime.datetime(2026, 5, 6, 12, 0, tzinfo=paris)) == (
        "2026-05-06T10:00:00Z"
    )
    assert utc_timestamp(None) is None
