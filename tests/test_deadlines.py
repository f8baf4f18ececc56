import datetime as dt

import pytest

from conftest import tiny_spec
from tfjobs.deadlines import parse_duration, partition_deadline
from tfjobs.spec import SpecError

UTC = dt.timezone.utc


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("6h", 21600), ("1d", 86400),
                                               ("1h30m", 5400), ("0.5s", 0.5), ("0s", 0)])
def test_durations(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "6", "h", "-1h", "6 hours", "6h later"])
def test_what_is_not_a_duration_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="e.g. 90s, 30m, 6h"):
        parse_duration(text)


@pytest.mark.parametrize(("deadline", "expected"), [
    ("6h", dt.datetime(2026, 11, 26, 6, tzinfo=UTC)),  # after the end of the partition's day
    ("0s", dt.datetime(2026, 11, 26, tzinfo=UTC)),
    ("2026-11-27T12:30:00Z", dt.datetime(2026, 11, 27, 12, 30, tzinfo=UTC)),
    ("2026-11-27T13:30:00+01:00", dt.datetime(2026, 11, 27, 12, 30, tzinfo=UTC)),
    ("2026-11-27 12:30", dt.datetime(2026, 11, 27, 12, 30, tzinfo=UTC)),  # no offset: UTC
])
def test_a_deadline_is_an_offset_from_the_end_of_the_day_or_a_utc_time(deadline, expected):
    assert partition_deadline("2026-11-25", deadline) == expected


def test_deadline_errors_name_both_forms_and_the_partition():
    with pytest.raises(ValueError, match=r"'soon' is neither a duration .* nor a UTC time"):
        partition_deadline("2026-11-25", "soon")
    with pytest.raises(ValueError, match="not a valid time: month must be in 1..12"):
        partition_deadline("2026-11-25", "2026-13-01T00:00Z")
    with pytest.raises(ValueError, match="Partition 'latest' is not a date .* give an absolute UTC time"):
        partition_deadline("latest", "6h")
    assert partition_deadline("latest", "2026-11-26T06:00:00Z") == dt.datetime(2026, 11, 26, 6, tzinfo=UTC)


def test_the_spec_checks_its_deadline_and_poke_interval():
    landing = {"kind": "landing", "uri": "s3://landing/housing"}
    assert tiny_spec(source={**landing, "deadline": "2h", "poke_interval": "1m"}).source.deadline == "2h"
    with pytest.raises(SpecError, match=r"source\.deadline: 'tomorrow' is not a duration"):
        tiny_spec(source={**landing, "deadline": "tomorrow"})
    with pytest.raises(SpecError, match=r"source\.poke_interval: 5 is not a duration"):
        tiny_spec(source={**landing, "poke_interval": 5})
