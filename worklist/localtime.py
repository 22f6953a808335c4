"""Times as the people at the site read them: their zone, to the minute, no microseconds.

Everything is stored and exchanged in UTC (the API keeps ISO 8601 with offset); pages show the
site's wall clock (``web.time_zone``, else the server's zone) and carry the exact UTC value in
a tooltip for whoever needs to match it against a log.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo


def site_zone(name: str | None) -> tzinfo:
    """The configured zone, else the server's local one (UTC where the server has none)."""
    if name:
        return ZoneInfo(name)
    return datetime.now().astimezone().tzinfo or UTC


def _parse(value: datetime | str | None) -> datetime | None:
    if value is None or value == "":
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def local_time(value: datetime | str | None, zone: tzinfo, seconds: bool = False) -> str:
    """ "2026-12-06 14:03" (or with ":27" seconds) in `zone`; "" for no time."""
    moment = _parse(value)
    if moment is None:
        return ""
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def zone_label(zone: tzinfo) -> str:
    """What a page says its times are in: "Europe/Berlin (CET)", "UTC"."""
    key = getattr(zone, "key", None)
    abbrev = datetime.now(zone).tzname() or ""
    if key and abbrev and abbrev != key:
        return f"{key} ({abbrev})"
    return key or abbrev or "UTC"


def dicom_date(value: str | None) -> str:
    """DICOM DA "20240301" as "2024-03-01"; anything else as it came (never an error on a page)."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""
