"""Applicability step: which labels apply to the patient of an image, from the patient's age.

A label limited to an age range (the package's ``ages``) is reported only for a patient whose age is inside it.
For a label learnt from one age group only (``Pediatric_Pneumonia``: children aged 1-5) the rule is strict: a
patient of unknown age does not get the label either, because a child-trained pneumonia score on an adult is the
harm the rule exists to prevent. A label learnt from most ages and limited only where it was never shown to work
(``Tuberculosis``: from 15 years, as WHO recommends computer-aided TB detection) says ``unknown_age = "applies"``:
an image without an age keeps it, since withholding the main finding from every such image is the greater harm.
A finding that does not apply keeps its score for the engineer (``cxr-node predict``) but is never positive, and
the SR states the reason instead of a probability and a decision.

The age comes from the DICOM header: Patient's Age (0010,1010, ``nnnD``/``W``/``M``/``Y``), else Patient's
Birth Date (0010,0030) against the first of Study, Series, Acquisition and Content Date. The reasons never
contain the age itself (no patient values in logs, lists or the console).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from datetime import date

import pydicom

from ai.findings import Finding
from ai.manifest import MAX_AGE_YEARS, AgeRange

_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
_EXAM_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def _da(value: object) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _birthday(born: date, year: int) -> date:
    """``born``'s birthday in ``year`` (29 February on 1 March in a common year)."""
    try:
        return born.replace(year=year)
    except ValueError:
        return date(year, 3, 1)


def _calendar_years(born: date, seen: date) -> float:
    """Completed years at ``seen``, plus the part of the current year of life: exactly N on the N-th birthday,
    whatever the leap days in between (days / 365.25 puts a 15th birthday at 14.998)."""
    years = seen.year - born.year - (1 if seen < _birthday(born, seen.year) else 0)
    last, following = _birthday(born, born.year + years), _birthday(born, born.year + years + 1)
    return years + (seen - last).days / (following - last).days


def patient_age_years(ds: pydicom.Dataset) -> float | None:
    """The patient's age in years at the examination, or None when the header does not say (or says nonsense: a
    date of birth after the examination, or an age of ``MAX_AGE_YEARS`` or more, such as a placeholder 999Y)."""
    match = _AGE_STRING.match(str(ds.get("PatientAge", "") or "").strip().upper())
    if match:
        years = int(match.group(1)) * _DAYS_PER[match.group(2)] / 365.25  # nnnY: exactly nnn
        return years if years < MAX_AGE_YEARS else None
    born = _da(ds.get("PatientBirthDate"))
    if born is None:
        return None
    for keyword in _EXAM_DATES:
        seen = _da(ds.get(keyword))
        if seen is not None:
            if seen < born:
                return None
            years = _calendar_years(born, seen)
            return years if years < MAX_AGE_YEARS else None
    return None


def _years(value: float) -> str:
    return f"{value:g}"


def _range(ages: AgeRange) -> str:
    if ages.below_years >= MAX_AGE_YEARS:
        return f"ages {_years(ages.from_years)} and over"
    return f"ages {_years(ages.from_years)} to under {_years(ages.below_years)} years"


def not_applicable_reason(ages: AgeRange, age_years: float | None) -> str:
    """Why a label limited to ``ages`` does not apply to a patient of ``age_years``, or "" when it applies."""
    learnt = f"learnt from {ages.population} ({_range(ages)})"
    if age_years is None:
        if ages.unknown_age == "applies":
            return ""
        return f"patient age unknown (no Patient's Age or Birth Date); {learnt}"
    if ages.contains(age_years):
        return ""
    return f"patient age outside the label's range; {learnt}"


def apply_ages(findings: Sequence[Finding], ages: Mapping[str, AgeRange], age_years: float | None) -> list[Finding]:
    """The findings, each label limited to an age range marked not applicable (never positive) when the
    patient is outside it, or of unknown age where the range says so; labels without a range are unchanged."""
    out = []
    for finding in findings:
        limit = ages.get(finding.label)
        reason = not_applicable_reason(limit, age_years) if limit is not None else ""
        out.append(dataclasses.replace(finding, positive=False, not_applicable=reason) if reason else finding)
    return out
