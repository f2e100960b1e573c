"""Result hygiene: copy patient and study attributes from a received image, repairing or dropping bad values.

Real images carry values that violate their own value representation (a Patient's Age ``62`` without a
unit, dates such as ``2020-13-45``, 56-character accession numbers, single-component names). Objects we
produce must pass ``dciodvfy`` without errors, so every copied attribute is re-validated against its VR
(the data dictionary's VR, never the one found in the file) and is either repaired where the intent is
unambiguous, emptied (Type 2 attributes) or dropped (Type 3). Nothing here logs a value: only keywords.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
from collections.abc import Callable
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

logger = logging.getLogger(__name__)

UTF8_CHARSET = "ISO_IR 192"

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_AS_RE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")
_TM_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class SourceAttributeError(ValueError):
    """A source attribute that cannot be repaired and without which no valid result can be made."""


def _as_text(value: Any) -> str:
    """The first value of a possibly multi-valued element as text (bytes from a wrong VR decoded)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else ""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value)


def _clean(text: str) -> str:
    """Remove control characters (ESC included: values are re-encoded as UTF-8) and backslashes."""
    return _CONTROL_RE.sub("", text).replace("\\", "").strip()


def truncate_bytes(text: str, limit: int) -> str:
    """Longest prefix of ``text`` whose UTF-8 encoding is at most ``limit`` bytes."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore").rstrip()


def repair_date(text: str) -> str | None:
    """``YYYYMMDD`` for a valid calendar date (``YYYY-MM-DD`` / ``YYYY.MM.DD`` repaired), else None."""
    digits = re.sub(r"^(\d{4})[-./](\d{2})[-./](\d{2})$", r"\1\2\3", text.strip())
    if not re.fullmatch(r"\d{8}", digits):
        return None
    try:
        datetime.datetime.strptime(digits, "%Y%m%d")
    except ValueError:
        return None
    return digits


def repair_time(text: str) -> str | None:
    """``HH[MM[SS[.F{1,6}]]]`` with valid ranges (``HH:MM:SS`` repaired), else None."""
    compact = text.strip()
    if re.fullmatch(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?", compact):
        compact = compact.replace(":", "")
    match = _TM_RE.fullmatch(compact)
    if match is None:
        return None
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups()[:3])
    if match.group(3) and not match.group(2):
        return None
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    return compact


def repair_age(text: str) -> str | None:
    """``nnnD/W/M/Y``; a bare number (the RSNA exports' ``62``) is read as years, as those exports mean."""
    match = _AS_RE.fullmatch(text.strip().upper())
    if match is None:
        return None
    number, unit = match.groups()
    if not unit and int(number) > 150:
        return None
    return f"{int(number):03d}{unit or 'Y'}"


def repair_person_name(text: str) -> str:
    """At most 3 component groups of at most 64 bytes; a single-component name gets its trailing caret.

    ``Name`` and ``Name^`` are the same PN value (trailing carets may be omitted); the explicit caret keeps
    validators from reading it as the retired single-component form. ``dciodvfy`` also holds the whole
    value to 64 bytes: ideographic and phonetic groups that would exceed it are dropped.
    """
    groups = [g.strip() for g in text.split("=")[:3]]
    fixed = []
    for group in groups:
        components = group.split("^")[:5]
        value = truncate_bytes("^".join(components), 64).rstrip("^")
        fixed.append(value)
    if fixed and fixed[0] and "^" not in fixed[0]:
        fixed[0] = truncate_bytes(fixed[0], 63) + "^"
    while len(fixed) > 1 and len("=".join(fixed).rstrip("=").encode("utf-8")) > 64:
        fixed.pop()
    return "=".join(fixed).rstrip("=")


def repair_decimal(text: str) -> str | None:
    """A finite, non-negative decimal string of at most 16 characters, else None."""
    try:
        number = float(text.strip())
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0:
        return None
    formatted = f"{number:.6g}"
    return formatted if len(formatted) <= 16 else None


def is_valid_uid(text: str) -> bool:
    """Digits and dots, at most 64 characters, no empty component."""
    return len(text) <= 64 and _UID_RE.fullmatch(text) is not None


def uid_problem(raw: bytes | str) -> str | None:
    """What makes an encoded UI value unusable as a UID, or None when it is usable (PS3.5 9.1).

    Usable: at most 64 characters of digits and dots with no empty component and no component with a
    leading zero (``1.02.003``), followed by at most one padding character (NUL as PS3.5 6.2 requires,
    or the space some senders write; both are removed on reading). Leading zeros are refused like the
    rest of PS3.5 9.1: results reference the source UIDs verbatim (the SR's evidence, its Study
    Instance UID), so a result about such an image would itself be invalid (``dciodvfy`` errors), and
    a repaired UID would file the result in another study than the image's. The returned text never
    contains the value.
    """
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    if text[-1:] in ("\x00", " "):
        text = text[:-1]
    if not text:
        return "empty"
    if len(text) > 64:
        return f"{len(text)} characters, expected at most 64"
    if text.strip("0123456789."):
        return "characters other than digits and dots (or padding other than one trailing NUL)"
    if not is_valid_uid(text):
        return "an empty component (a leading, trailing or doubled dot)"
    if any(len(part) > 1 and part.startswith("0") for part in text.split(".")):
        return "a component with a leading zero"
    return None


def _identifier(limit: int) -> Callable[[str], str | None]:
    """Identifiers are never truncated (a cut accession number could match another study): drop them."""

    def check(text: str) -> str | None:
        return text if len(text.encode("utf-8")) <= limit else None

    return check


def _description(limit: int) -> Callable[[str], str | None]:
    """Descriptive text is truncated to the VR's length."""

    def check(text: str) -> str | None:
        return truncate_bytes(text, limit)

    return check


def _sex(text: str) -> str | None:
    value = text.strip().upper()
    return value if value in {"M", "F", "O"} else None


# keyword -> (repair function, Type 2: present even when empty)
_RULES: dict[str, tuple[Callable[[str], str | None], bool]] = {
    "PatientName": (repair_person_name, True),
    "PatientID": (_identifier(64), True),
    "IssuerOfPatientID": (_identifier(64), False),
    "PatientBirthDate": (repair_date, True),
    "PatientSex": (_sex, True),
    "PatientAge": (repair_age, False),
    "PatientSize": (repair_decimal, False),
    "PatientWeight": (repair_decimal, False),
    "StudyDate": (repair_date, True),
    "StudyTime": (repair_time, True),
    "ReferringPhysicianName": (repair_person_name, True),
    "StudyID": (_identifier(16), True),
    "AccessionNumber": (_identifier(16), True),
    "StudyDescription": (_description(64), False),
}

PATIENT_STUDY_KEYWORDS: tuple[str, ...] = ("StudyInstanceUID", *_RULES)


def _read(source_ds: Dataset, keyword: str) -> str:
    """The raw text of an attribute, or "" when absent or unreadable."""
    try:
        element = source_ds.data_element(keyword)
        if element is None:
            return ""
        return _clean(_as_text(element.value))
    except Exception:  # a hostile value may fail conversion in any way (struct.error ...)
        return ""


def attribute_text(source_ds: Dataset, keyword: str) -> str:
    """The cleaned text of a source attribute (first value), or "" when absent or unreadable."""
    return _read(source_ds, keyword)


def source_uid(source_ds: Dataset, keyword: str) -> str:
    """A UID of the source that results must reference verbatim; raises if it is absent or malformed."""
    value = _read(source_ds, keyword)
    if not is_valid_uid(value):
        raise SourceAttributeError(
            f"{keyword} of the source must be a UID (digits and dots, at most 64 characters), "
            f"got {len(value)} characters that are not"
        )
    return value


def sanitize_patient_study(source_ds: Dataset, study_uid: str | None = None) -> Dataset:
    """Copy the patient and study attributes of ``source_ds`` into a new dataset, repaired or dropped.

    The element VR always comes from the data dictionary. Type 2 attributes (name, ID, birth date, sex,
    study date/time, referring physician, study ID, accession number) are always present, empty when
    missing or invalid. ``SpecificCharacterSet`` is ``ISO_IR 192`` when a copied value is not ASCII.

    Args:
        source_ds: the received image.
        study_uid: the Study Instance UID to use instead of the source's (a repaired one); None: the
            source's, which must be valid.

    Raises:
        SourceAttributeError: ``study_uid`` is None and the source's StudyInstanceUID is missing or not a
            UID (a result cannot join the study).
    """
    out = Dataset()
    out.StudyInstanceUID = study_uid if study_uid is not None else source_uid(source_ds, "StudyInstanceUID")
    for keyword, (repair, type2) in _RULES.items():
        raw = _read(source_ds, keyword)
        value = repair(raw) if raw else None
        if raw and value != raw:
            logger.debug("source %s %s", keyword, "repaired" if value else "dropped (invalid)")
        if value or type2:
            out.add_new(keyword, dictionary_VR(keyword), value or None)
    if any(not str(element.value).isascii() for element in out if element.value is not None):
        out.SpecificCharacterSet = UTF8_CHARSET
    return out


def check_short_string(value: str, what: str, limit: int = 16) -> str:
    """``value`` if it is a valid SH/AE-like string of at most ``limit`` characters, else ValueError."""
    if not value or len(value) > limit or _CONTROL_RE.search(value) or "\\" in value or not value.isascii():
        raise ValueError(f"{what} must be 1-{limit} printable ASCII characters without '\\', got {value!r}")
    return value
