"""What every result object shares: the model package, deterministic UIDs, the source's evidence, reason texts.

Patient and study attributes are copied through :mod:`node.dicom_hygiene`, which repairs or drops values
that are invalid in the source, so that the objects pass ``dciodvfy``. The source's UIDs are referenced
verbatim; only one that is missing or cannot be encoded as a UID at all is replaced by one derived from it
(:func:`usable_source_uid`). The SR documents are built in :mod:`node.sr_build`, the Secondary Capture
objects in :mod:`node.secondary_capture`; :mod:`node.results` names them all.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from ai.errors import PermanentError
from ai.findings import Finding
from node.dicom_hygiene import (
    PATIENT_STUDY_KEYWORDS,
    SourceAttributeError,
    attribute_text,
    sanitize_patient_study,
    source_uid,
    uid_problem,
)

logger = logging.getLogger("node.results")  # the results step's log lines keep their logger name

SERIES_DESCRIPTION_PREFIX = "AI CXR TRIAGE - NOT FOR DIAGNOSTIC USE"

#: Namespace of the name-based (version 5) UUIDs behind our ``2.25.`` UIDs (ISO/IEC 9834-8).
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-node:results")


class ResultBuildError(PermanentError, ValueError):
    """The inputs cannot make a valid result object (bad finding, heatmap or source attribute)."""


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model package that produced the findings (TID 4019, the device observer, Contributing Equipment).

    Attributes:
        name: package name, e.g. ``cxr-tb``; at most 64 characters.
        version: package version, e.g. ``1.2.0``; at most 64 characters.
        manufacturer: who made the package (Manufacturer of the document and of the Contributing
            Equipment item; TID 4019 has no manufacturer); at most 64 characters.
    """

    name: str
    version: str
    manufacturer: str = "cxr-node"

    def __post_init__(self) -> None:
        for field in ("name", "version", "manufacturer"):
            value = getattr(self, field)
            if not value or len(value) > 64 or "\\" in value or not value.isprintable():
                raise ValueError(
                    f"AlgorithmInfo.{field} must be 1-64 printable characters without '\\', got {value!r}"
                )


def derived_uid(*parts: str) -> str:
    """``2.25.<int>`` from a name-based UUID over ``parts``: same inputs, same UID, at most 44 characters."""
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


def result_uid(source_sop_uid: str, algorithm_version: str, kind: str, *, algorithm_name: str = "") -> str:
    """Deterministic SOP Instance UID of a result object.

    Args:
        source_sop_uid: SOP Instance UID of the analysed image.
        algorithm_version: the model package's version.
        kind: which object, e.g. ``sr``, ``sr-comprehensive``, ``failure-sr``, ``overlay``.
        algorithm_name: the model package's name, so two packages with the same version never collide.
    """
    return derived_uid("instance", source_sop_uid, algorithm_name, algorithm_version, kind)


def series_uid(study_uid: str, algorithm_version: str, kind: str, *, algorithm_name: str = "") -> str:
    """Deterministic Series Instance UID: one result series per (study, model package, kind)."""
    return derived_uid("series", study_uid, algorithm_name, algorithm_version, kind)


def device_uid(algorithm: AlgorithmInfo) -> str:
    """Device UID of the model package (Contributing Equipment, device observer): one per name and version."""
    return derived_uid("device", algorithm.name, algorithm.version)


@contextmanager
def quiet_names() -> Iterator[None]:
    """highdicom warns with the person name in the message: keep patient names out of the logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely", category=UserWarning)
        yield


_SOURCE_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: Patient/study attributes of Type 2: present in every result, empty when the source's value is unusable.
_TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "ReferringPhysicianName", "StudyID", "AccessionNumber")


def source_evidence(source_ds: Dataset) -> Dataset:
    """Sanitised patient/study attributes plus the source's UIDs (verbatim): what a result inherits.

    Every copied value is checked against its VR once more; one that would still be invalid is dropped
    (Type 2: emptied), so a value a sender controls never makes a result invalid.
    """
    uids = {keyword: usable_source_uid(source_ds, keyword) for keyword in _SOURCE_UID_KEYWORDS}
    evidence = sanitize_patient_study(source_ds, study_uid=uids["StudyInstanceUID"])
    _drop_invalid(evidence)
    for keyword in _SOURCE_UID_KEYWORDS:  # after the VR check: a UID with a leading zero stays verbatim
        setattr(evidence, keyword, uids[keyword])
    evidence.InstanceNumber = _instance_number(source_ds)
    return evidence


def minimal_evidence(source_ds: Dataset) -> Dataset:
    """The source's UIDs (verbatim) with empty Type 2 patient/study attributes: the last resort."""
    evidence = Dataset()
    for keyword in _SOURCE_UID_KEYWORDS:
        setattr(evidence, keyword, usable_source_uid(source_ds, keyword))
    for keyword in _TYPE2_KEYWORDS:
        evidence.add_new(keyword, dictionary_VR(keyword), None)
    evidence.InstanceNumber = 1
    return evidence


def usable_source_uid(source_ds: Dataset, keyword: str) -> str:
    """The source's UID, verbatim, when it can be encoded as a UID; else a ``2.25.`` UID derived from it.

    A result must reference the received image and join its study, so a UID it copies is never
    rewritten: one that breaks only PS3.5 9.1's leading-zero rule (``1.02.003``, which the intake
    refuses at C-STORE but a file given to ``predict`` may hold) is copied as it is, and the result then
    carries that defect of the source (``dciodvfy`` reports it on the reference). Only a UID that is
    missing, empty, longer than 64 characters or not digits and dots cannot be copied at all: it is
    replaced by a deterministic one (the same header gives the same UID, so a re-run produces the same
    objects); being a name-based ``2.25.`` UUID, it collides with no UID a device issued.
    """
    try:
        uid = source_uid(source_ds, keyword)
    except SourceAttributeError:
        held = "\x1f".join(attribute_text(source_ds, k) for k in _SOURCE_UID_KEYWORDS)
        logger.warning("source %s is missing or not a UID: results use a UID derived from it", keyword)
        return derived_uid("repaired-source-uid", keyword, held)
    if uid_problem(uid) is not None:
        logger.warning("source %s breaks PS3.5 9.1 (%s): results reference it verbatim", keyword, uid_problem(uid))
    return uid


def _drop_invalid(evidence: Dataset) -> None:
    """Empty (Type 2) or remove (Type 3) every element whose value its VR's validator refuses."""
    for element in list(evidence):
        if element.value is None or element.value == "":
            continue
        try:
            validate_value(element.VR, element.value, pydicom_config.RAISE)
        except (ValueError, TypeError):
            logger.debug("source %s dropped (invalid for VR %s)", element.keyword, element.VR)
            if element.keyword in _TYPE2_KEYWORDS:
                element.value = None
            else:
                del evidence[element.tag]


def _instance_number(source_ds: Dataset) -> int:
    """The source's Instance Number when usable (result N belongs to image N), else 1."""
    try:
        number = int(attribute_text(source_ds, "InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if 1 <= number < 2**31 else 1


def copy_patient_study(target: Dataset, evidence: Dataset) -> None:
    """Overwrite the patient/study attributes of ``target`` with the sanitised ones, dropping others."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in evidence:
            target[keyword] = evidence[keyword]
        elif keyword in target:
            del target[keyword]
    if "SpecificCharacterSet" in evidence:
        target.SpecificCharacterSet = evidence.SpecificCharacterSet


def check_finding(finding: Finding) -> None:
    """Refuse a finding whose probability or threshold is outside [0, 1] or whose ``positive`` disagrees (a label
    that does not apply to the patient is never positive)."""
    for name in ("probability", "threshold"):
        value = getattr(finding, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ResultBuildError(f"Finding {finding.label!r}: {name} must be in [0, 1], got {value!r}")
    if finding.not_applicable:
        if finding.positive:
            raise ResultBuildError(f"Finding {finding.label!r}: a label that does not apply cannot be positive")
        return
    if bool(finding.positive) != (finding.probability >= finding.threshold):
        raise ResultBuildError(
            f"Finding {finding.label!r}: positive must equal probability >= threshold, got "
            f"positive={finding.positive} with {finding.probability} and {finding.threshold}"
        )


_QUOTED = re.compile(r"b?'[^']*'|b?\"[^\"]*\"|`[^`]*`")
_AFTER_GOT = re.compile(r"(,\s*(got|found)|\s+got)\b.*$", re.IGNORECASE | re.DOTALL)
_UID_LIKE = re.compile(r"(\s+(in|of|for))?\s*\b\d+(\.\d+){2,}\b")
_PATH_LIKE = re.compile(r"(?<!\w)/\S*")
_BRACKETED = re.compile(r"\[[^\]]*\]|\([^)]*\d[^)]*\)")
MAX_REASON_CHARS = 300
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def scrub_reason(reason: str) -> str:
    """A reason without the values it may quote: what a "not analysed" SR (and a log) may say.

    Error messages here say what was expected and what was found (``... must be MONOCHROME1/2, got
    'XYZ'``); what was found can be any value a sender controls. Kept: the text up to ``got`` or
    ``, found``, without quoted strings, bracketed values, UIDs (with the "in"/"of" before them) and
    paths; ASCII only, at most 300 characters. What is left names attributes and limits.
    """
    text = reason.encode("ascii", errors="replace").decode("ascii")
    text = CONTROL_CHARS.sub(" ", text)
    text = _QUOTED.sub("", text)
    text = _AFTER_GOT.sub("", text)
    for pattern in (_BRACKETED, _UID_LIKE, _PATH_LIKE):
        text = pattern.sub("", text)
    text = re.sub(r"\s+([:;,.])", r"\1", re.sub(r"\s+", " ", text)).strip(" :;,")
    return text[:MAX_REASON_CHARS].rstrip()


def own_text(reason: str) -> str:
    """The node's own reason text as an SR may carry it: ASCII, no control characters, bounded."""
    text = CONTROL_CHARS.sub(" ", reason.encode("ascii", errors="replace").decode("ascii"))
    return re.sub(r"\s+", " ", text).strip()[:MAX_REASON_CHARS].rstrip()

