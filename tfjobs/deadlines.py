"""Durations ("6h", "1h30m") and the deadline by which a partition's delivery is due.

A daily delivery is due some time after the day it holds has ended: the spec says
how long (``source: {kind: landing, ..., deadline: 6h}``), and a run may give an
absolute UTC time instead (``2026-11-26T06:00:00Z``). Both forms resolve to one
aware UTC datetime, so that a wait can say exactly when it gives up.
"""

from __future__ import annotations

import datetime as dt
import re

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: What :func:`parse_duration` accepts, for validation elsewhere (an Airflow Param's pattern).
DURATION_PATTERN = r"(\d+(\.\d+)?[smhd])+"
#: An absolute time as :func:`partition_deadline` accepts it: ISO 8601, UTC if no offset is given.
UTC_TIME_PATTERN = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?"


def parse_duration(text: str) -> dt.timedelta:
    """``"6h"`` -> 6 hours; units ``s``, ``m``, ``h``, ``d``, combined as in ``"1h30m"``."""
    cleaned = str(text).strip().replace(" ", "")
    if not cleaned or _DURATION.sub("", cleaned):
        raise ValueError(f"{text!r} is not a duration: write a number and a unit (s, m, h, d), e.g. 90s, 30m, 6h, 1h30m")
    return dt.timedelta(seconds=sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(cleaned)))


def partition_end(partition: str) -> dt.datetime:
    """The end of the partition's day in UTC: ``"2026-11-25"`` -> 2026-11-26T00:00:00Z."""
    try:
        day = dt.date.fromisoformat(partition)
    except ValueError:
        raise ValueError(
            f"Partition {partition!r} is not a date (YYYY-MM-DD), so a deadline relative to its end cannot be "
            "computed; give an absolute UTC time as the deadline instead, e.g. 2026-11-26T06:00:00Z"
        ) from None
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)


def partition_deadline(partition: str, deadline: str) -> dt.datetime:
    """When the partition's delivery is due at the latest, in UTC.

    ``deadline`` is a duration after the end of the partition's day (``"6h"``: 06:00
    UTC the next day) or an absolute time (``"2026-11-26T06:00:00Z"``; UTC if it has
    no offset).
    """
    text = str(deadline).strip()
    if re.fullmatch(UTC_TIME_PATTERN, text):
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError as err:
            raise ValueError(f"Deadline {deadline!r} is not a valid time: {err}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        return moment.astimezone(dt.timezone.utc)
    try:
        after_end = parse_duration(text)
    except ValueError:
        raise ValueError(
            f"Deadline {deadline!r} is neither a duration after the end of the partition's day (6h, 90m) "
            "nor a UTC time (2026-11-26T06:00:00Z)"
        ) from None
    return partition_end(partition) + after_end


def utc_text(moment: dt.datetime) -> str:
    """``2026-11-26T06:00:00Z``: how deadlines appear in messages."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
