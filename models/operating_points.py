"""Which operating point an image is judged at: the adult one or the paediatric one.

A model card may carry thresholds per population (``ModelCard.thresholds_by_population``)
because one threshold chosen on a mixed validation set does not give the same sensitivity on
children and on adults.  This module is the ONE place that decides an image's population from
its DICOM header, so the worker and ``xray-triage predict`` can never disagree about it.

The header is read, never guessed: Patient's Age (0010,1010) first, else Patient's Birth Date
(0010,0030) with the Study Date (0008,0020), falling back to the Series, Acquisition or
Content Date.  Values are parsed strictly; anything malformed or absent means "unknown",
and unknown means adult, because the hospital worklist is mostly adults and the adult point
is what the model was primarily validated for.  Nothing here raises on a hostile header.

It takes a pydicom ``Dataset`` or any mapping-like object with ``.get(keyword)`` and imports
no DICOM code, so models/ stays free of dicom_io.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

ADULT = "adult"
PAEDIATRIC = "paediatric"
POPULATIONS: tuple[str, ...] = (ADULT, PAEDIATRIC)
# Under this age at the study, a patient is judged at the paediatric operating point.
ADULT_AGE_YEARS = 18

# DICOM AS: exactly three digits and a unit (D days, W weeks, M months, Y years), e.g. "006Y".
_AGE_STRING = re.compile(r"(\d{3})([DWMY])")
# DICOM DA: YYYYMMDD.  The pre-3.0 "YYYY.MM.DD" form is refused: strict parsing, unknown is safe.
_DATE_STRING = re.compile(r"(\d{4})(\d{2})(\d{2})")
_DAYS_PER_YEAR = 365.2425
# Dates that stand in for the Study Date when it is absent, in the order they are tried.
_STUDY_DATE_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("StudyDate", "Study Date"),
    ("SeriesDate", "Series Date"),
    ("AcquisitionDate", "Acquisition Date"),
    ("ContentDate", "Content Date"),
)


@dataclass(frozen=True)
class PopulationDecision:
    """The population an image is judged as, and why, in words a reader can check."""

    population: str  # ADULT | PAEDIATRIC
    reason: str

    @property
    def note(self) -> str:
        """The line ``predict`` adds to its notes, e.g. ``operating point: paediatric (Patient's Age 006Y)``."""
        return f"operating point: {self.population} ({self.reason})"


def parse_age_string(value: Any) -> float | None:
    """Age in years from a DICOM AS value ("006Y", "018M", "003W", "010D"); None when malformed.

    Only the exact four-character form is accepted (DICOM pads to even length with a space,
    which is stripped): "12", "6Y" or "abc" are not ages, and a guessed age could put an adult
    on the paediatric operating point.
    """
    text = _text(value)
    if text is None:
        return None
    m = _AGE_STRING.fullmatch(text)
    if m is None:
        return None
    n, unit = int(m.group(1)), m.group(2)
    if unit == "Y":
        return float(n)
    if unit == "M":
        return n / 12.0
    if unit == "W":
        return n * 7 / _DAYS_PER_YEAR
    return n / _DAYS_PER_YEAR


def parse_date(value: Any) -> dt.date | None:
    """A DICOM DA value (``YYYYMMDD`` or a ``date`` when pydicom converts dates); None when malformed."""
    if isinstance(value, dt.date):
        return value.date() if isinstance(value, dt.datetime) else value
    text = _text(value)
    if text is None:
        return None
    m = _DATE_STRING.fullmatch(text)
    if m is None:
        return None
    try:
        return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:  # 20230231, month 13, ...
        return None


def completed_years(birth: dt.date, on: dt.date) -> int:
    """Whole years of age on a date (a birthday counts on the day itself)."""
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def decide_population(ds: Any) -> PopulationDecision:
    """The population of an image from its header (None for PNG/JPEG, which have none).

    Patient's Age wins over the dates because it is what the modality recorded for this
    study; the birth date is used only when the age is absent or malformed.  The reason never
    quotes the birth date, so it can be printed and logged.
    """
    if ds is None:
        return PopulationDecision(ADULT, "no DICOM header: adult operating point")
    raw_age = _get(ds, "PatientAge")
    age = parse_age_string(raw_age)
    if age is not None:
        text = _text(raw_age)
        return PopulationDecision(_population(age), f"Patient's Age {text}")
    age_problem = "" if _absent(raw_age) else "malformed Patient's Age; "

    raw_birth = _get(ds, "PatientBirthDate")
    if _absent(raw_birth):
        words = f"{age_problem}no birth date" if age_problem else "no age in header"
        return PopulationDecision(ADULT, f"{words}: adult operating point")
    birth = parse_date(raw_birth)
    if birth is None:
        return PopulationDecision(ADULT, f"{age_problem}malformed Patient's Birth Date: adult operating point")
    for keyword, words in _STUDY_DATE_KEYWORDS:
        raw = _get(ds, keyword)
        if _absent(raw):
            continue
        on = parse_date(raw)
        if on is None:
            return PopulationDecision(ADULT, f"{age_problem}malformed {words}: adult operating point")
        if on < birth:
            return PopulationDecision(ADULT, f"{age_problem}{words} before birth date: adult operating point")
        years = completed_years(birth, on)
        reason = f"{age_problem}age {years} years from Patient's Birth Date and {words}"
        return PopulationDecision(_population(years), reason)
    return PopulationDecision(ADULT, f"{age_problem}birth date but no study date: adult operating point")


def population_from_header(ds: Any) -> str:
    """ADULT or PAEDIATRIC for a header (see ``decide_population`` for the rule and its reason)."""
    return decide_population(ds).population


def _population(age_years: float) -> str:
    return PAEDIATRIC if age_years < ADULT_AGE_YEARS else ADULT


# Marks a value that was present but could not be read: malformed, not absent.
_UNREADABLE = object()


def _get(ds: Any, keyword: str) -> Any:
    """The element's value, None when absent, ``_UNREADABLE`` when pydicom cannot convert it (never raised)."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - a hostile header must not stop scoring
        return _UNREADABLE


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, str | bytes) and not value.strip())


def _text(value: Any) -> str | None:
    """A single string value with DICOM padding stripped; None for anything else (lists, numbers, junk bytes)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    return value.strip(" \x00")
