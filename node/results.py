"""Results step: build the Comprehensive 3D SR (TID 1500) and the Secondary Capture overlay for one image.

Every object carries the source's Study Instance UID, a new series whose description starts with
``AI CXR TRIAGE - NOT FOR DIAGNOSTIC USE``, and deterministic UIDs derived from the source SOP Instance
UID, the model package (name and version) and the kind of object, so that results rebuilt after a crash
keep their UIDs. Patient and study attributes are copied through :mod:`node.dicom_hygiene`, which
repairs or drops values that are invalid in the source, so that the objects pass ``dciodvfy``; a source
UID that is missing or invalid is replaced by one derived from it (:func:`usable_source_uid`). The
"not analysed" SR is made for any header pydicom can read, so that every accepted image ends with a
result at the PACS. The overlay is at most 1024 pixels on its long side, stored as RLE Lossless.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import re
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, RLELossless, SecondaryCaptureImageStorage
from pydicom.valuerep import validate_value

from ai.errors import PermanentError
from ai.findings import Finding
from node.dicom_hygiene import (
    PATIENT_STUDY_KEYWORDS,
    SourceAttributeError,
    attribute_text,
    check_short_string,
    sanitize_patient_study,
    source_uid,
    truncate_bytes,
    uid_problem,
)

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION_PREFIX = "AI CXR TRIAGE - NOT FOR DIAGNOSTIC USE"
SR_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} - REPORT"
OVERLAY_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} - OVERLAY"
SR_SERIES_NUMBER = 9901
OVERLAY_SERIES_NUMBER = 9902

#: Namespace of the name-based (version 5) UUIDs behind our ``2.25.`` UIDs (ISO/IEC 9834-8).
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-node:results")

PRIVATE_SCHEME = "99CXR"
PRESENT = codes.SCT.Present  # 52101004
#: CID 241 "Present-Absent Only" of the current DICOM standard: SCT 272519000 (2667000 was replaced).
ABSENT = codes.SCT.Absent
TRIAGE_FLAG = Code("TRIAGE", PRIVATE_SCHEME, "AI triage flag (any finding at or above its threshold)")
NOT_ANALYSED = Code("NOT_ANALYSED", PRIVATE_SCHEME, "Image not analysed by the AI model")
NOT_ANALYSED_REASON = Code("NOT_ANALYSED_WHY", PRIVATE_SCHEME, "Reason the image was not analysed")
PROCEDURES = (codes.LN.XRUnspecifiedBodyRegion, codes.SCT.ChestImaging)

# Canonical label (lower case, letters only) -> finding type. SNOMED CT / DCM where the code is in the
# DICOM standard's own code tables (pydicom's codedict) or independently confirmed; else private.
FINDING_CODES: dict[str, Code] = {
    "tuberculosis": Code("56717001", "SCT", "Tuberculosis"),
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "cardiomegaly": codes.SCT.Cardiomegaly,  # 287272002
    "effusion": codes.SCT.PleuralEffusion,  # 60046008
    "pleuraleffusion": codes.SCT.PleuralEffusion,
    "infiltration": codes.DCM.Infiltrate,  # 112121
    "mass": codes.SCT.Mass,  # 4147007
    "nodule": codes.SCT.Nodule,  # 27925004
    "pneumothorax": codes.SCT.Pneumothorax,  # 36118008
    "consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "edema": codes.SCT.PulmonaryEdema,  # 19242006
    "pulmonaryedema": codes.SCT.PulmonaryEdema,
    "emphysema": Code("87433001", "SCT", "Pulmonary emphysema"),
    "fibrosis": codes.SCT.Fibrosis,  # 112674009
    "pleuralthickening": Code("PLEURAL_THICK", PRIVATE_SCHEME, "Pleural thickening"),
    "hernia": Code("HERNIA", PRIVATE_SCHEME, "Hernia (ChestX-ray14 label, mostly hiatal)"),
}

#: Long side of the overlay: 1024 is what a PACS viewer shows of a review annotation (a 2048 px overlay
#: is 4x the data for no visible gain); 768 at least so that the burned-in banner stays legible.
_MAX_SIDE = 1024
_MIN_SIDE = 768
_HEAT_ALPHA = 0.45
_HEAT_FLOOR = 0.15
_BANNER_GRAY = 24


class ResultBuildError(PermanentError, ValueError):
    """The inputs cannot make a valid result object (bad finding, heatmap or source attribute)."""


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model package that produced the findings (TID 4019 and the device observer).

    Attributes:
        name: package name, e.g. ``cxr-tb``; at most 64 characters.
        version: package version, e.g. ``1.2.0``; at most 64 characters.
        manufacturer: who made the package; at most 64 characters.
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


def _uuid_uid(*parts: str) -> str:
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
    return _uuid_uid("instance", source_sop_uid, algorithm_name, algorithm_version, kind)


def series_uid(study_uid: str, algorithm_version: str, kind: str, *, algorithm_name: str = "") -> str:
    """Deterministic Series Instance UID: one result series per (study, model package, kind)."""
    return _uuid_uid("series", study_uid, algorithm_name, algorithm_version, kind)


def finding_code(label: str) -> Code:
    """The finding type of a label: a standard code where known, else one of the private scheme 99CXR."""
    key = re.sub(r"[^a-z]", "", label.lower())
    if key in FINDING_CODES:
        return FINDING_CODES[key]
    value = re.sub(r"[^A-Z0-9]+", "_", label.upper()).strip("_") or "LABEL"
    if len(value) > 16:
        value = f"{value[:11]}_{hashlib.sha1(label.encode()).hexdigest()[:4].upper()}"
    return Code(value, PRIVATE_SCHEME, truncate_bytes(label, 64) or value)


@contextmanager
def _quiet_names() -> Iterator[None]:
    """highdicom warns with the person name in the message: keep patient names out of the logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely", category=UserWarning)
        yield


_SOURCE_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: Patient/study attributes of Type 2: present in every result, empty when the source's value is unusable.
_TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _evidence(source_ds: Dataset) -> Dataset:
    """Sanitised patient/study attributes plus the source's UIDs (repaired if invalid): what a result inherits.

    Every copied value is checked against its VR once more; one that would still be invalid is dropped
    (Type 2: emptied), so a value a sender controls never makes a result invalid.
    """
    uids = {keyword: usable_source_uid(source_ds, keyword) for keyword in _SOURCE_UID_KEYWORDS}
    evidence = sanitize_patient_study(source_ds, study_uid=uids["StudyInstanceUID"])
    _drop_invalid(evidence)
    for keyword in _SOURCE_UID_KEYWORDS[1:]:
        setattr(evidence, keyword, uids[keyword])
    evidence.InstanceNumber = _instance_number(source_ds)
    return evidence


def _minimal_evidence(source_ds: Dataset) -> Dataset:
    """The source's UIDs (repaired if invalid) with empty Type 2 patient/study attributes: the last resort."""
    evidence = Dataset()
    for keyword in _SOURCE_UID_KEYWORDS:
        setattr(evidence, keyword, usable_source_uid(source_ds, keyword))
    for keyword in _TYPE2_KEYWORDS:
        evidence.add_new(keyword, dictionary_VR(keyword), None)
    evidence.InstanceNumber = 1
    return evidence


def usable_source_uid(source_ds: Dataset, keyword: str) -> str:
    """The source's UID when it is valid, else a ``2.25.`` UID derived from what the source holds.

    A result must reference the received image and join its study; a missing or malformed source UID
    would make the result invalid (and a PACS refuse it). The derived UID is deterministic (the same
    header gives the same UID, so a re-run produces the same objects); being a name-based ``2.25.`` UUID,
    it collides with no UID a device issued.
    """
    try:
        uid = source_uid(source_ds, keyword)
        if uid_problem(uid) is None:  # the intake's rule: PS3.5 9.1, leading zeros refused
            return uid
    except SourceAttributeError:
        pass
    held = "\x1f".join(attribute_text(source_ds, k) for k in _SOURCE_UID_KEYWORDS)
    logger.warning("source %s is missing or not a valid UID: results use a UID derived from it", keyword)
    return _uuid_uid("repaired-source-uid", keyword, held)


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


def _copy_patient_study(target: Dataset, evidence: Dataset) -> None:
    """Overwrite the patient/study attributes of ``target`` with the sanitised ones, dropping others."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in evidence:
            target[keyword] = evidence[keyword]
        elif keyword in target:
            del target[keyword]
    if "SpecificCharacterSet" in evidence:
        target.SpecificCharacterSet = evidence.SpecificCharacterSet


def _check_finding(finding: Finding) -> None:
    for name in ("probability", "threshold"):
        value = getattr(finding, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ResultBuildError(f"Finding {finding.label!r}: {name} must be in [0, 1], got {value!r}")
    if bool(finding.positive) != (finding.probability >= finding.threshold):
        raise ResultBuildError(
            f"Finding {finding.label!r}: positive must equal probability >= threshold, got "
            f"positive={finding.positive} with {finding.probability} and {finding.threshold}"
        )


def _algorithm_id(algorithm: AlgorithmInfo, parameters: Sequence[str] = ()) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        manufacturer=algorithm.manufacturer,
        parameters=list(parameters) or None,
    )


def _tracking(evidence: Dataset, algorithm: AlgorithmInfo, identifier: str) -> TrackingIdentifier:
    uid = _uuid_uid("tracking", evidence.SOPInstanceUID, algorithm.name, algorithm.version, identifier)
    return TrackingIdentifier(uid=UID(uid), identifier=identifier)


def _source_image(evidence: Dataset) -> SourceImageForMeasurementGroup:
    return SourceImageForMeasurementGroup(evidence.SOPClassUID, evidence.SOPInstanceUID)


def _finding_group(
    evidence: Dataset, finding: Finding, algorithm: AlgorithmInfo
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one label: probability (unit 1), Present/Absent at the threshold, TID 4019."""
    _check_finding(finding)
    code = finding_code(finding.label)
    parameters = [f"threshold={finding.threshold:.6g}", f"threshold_method={finding.threshold_method}"]
    probability = Measurement(
        name=codes.DCM.Probability, value=float(finding.probability), unit=codes.UCUM.NoUnits
    )
    decision = QualitativeEvaluation(name=code, value=PRESENT if finding.positive else ABSENT)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(evidence, algorithm, finding.label),
        finding_type=code,
        algorithm_id=_algorithm_id(algorithm, parameters),
        measurements=[probability],
        qualitative_evaluations=[decision],
        source_images=[_source_image(evidence)],
    )


def _summary_group(
    evidence: Dataset, findings: Sequence[Finding], algorithm: AlgorithmInfo
) -> MeasurementsAndQualitativeEvaluations:
    """The overall triage flag in its own group (TID 1500 has no report-level evaluation)."""
    positive = [f.label for f in findings if f.positive]
    flag = codes.SCT.Positive if positive else codes.SCT.Negative
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(evidence, algorithm, "Overall triage"),
        finding_type=TRIAGE_FLAG,
        algorithm_id=_algorithm_id(algorithm, [f"positive_labels={','.join(positive) or 'none'}"]),
        qualitative_evaluations=[QualitativeEvaluation(name=TRIAGE_FLAG, value=flag)],
        source_images=[_source_image(evidence)],
    )


def _observation_context(algorithm: AlgorithmInfo) -> ObservationContext:
    """Device observer = the model package."""
    device = DeviceObserverIdentifyingAttributes(
        uid=_uuid_uid("device", algorithm.name, algorithm.version),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=f"{algorithm.name} {algorithm.version}",
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


SrClass = Literal["3d", "comprehensive"]


def _make_sr(
    evidence: Dataset,
    groups: Sequence[MeasurementsAndQualitativeEvaluations],
    algorithm: AlgorithmInfo,
    kind: str,
    device_ae: str | None,
    sr_class: SrClass,
    any_sop_class: bool = False,
) -> Dataset:
    """Wrap TID 1500 content in a Comprehensive 3D SR (88.34) or Comprehensive SR (88.33) document.

    ``any_sop_class``: a source whose SOP class highdicom does not know is referenced all the same
    (see :func:`_construct`); otherwise it is refused.
    """
    if sr_class not in ("3d", "comprehensive"):
        raise ResultBuildError(f"sr_class must be '3d' or 'comprehensive', got {sr_class!r}")
    report = MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=list(PROCEDURES),
        imaging_measurements=list(groups),
    )
    cls = Comprehensive3DSR if sr_class == "3d" else ComprehensiveSR
    kind = kind if sr_class == "3d" else f"{kind}-comprehensive"
    sr = _construct(
        cls,
        evidence,
        any_sop_class,
        content=report,
        series_instance_uid=series_uid(
            evidence.StudyInstanceUID, algorithm.version, "sr", algorithm_name=algorithm.name
        ),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(
            evidence.SOPInstanceUID, algorithm.version, kind, algorithm_name=algorithm.name
        ),
        instance_number=evidence.InstanceNumber,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        coding_schemes=[_private_scheme(algorithm)],
    )
    _copy_patient_study(sr, evidence)
    if device_ae:
        sr.StationName = check_short_string(device_ae, "device_ae")
    logger.debug("built %s %s for %s", kind, sr.SOPInstanceUID, evidence.SOPInstanceUID)
    return sr


def _construct(
    cls: type[Comprehensive3DSR] | type[ComprehensiveSR], evidence: Dataset, any_sop_class: bool, **kwargs: Any
) -> Dataset:
    """Build the SR document; with ``any_sop_class``, a source of a class unknown to highdicom is accepted.

    highdicom looks the source's IOD up by SOP Class UID only to copy its patient/study modules, which
    :func:`_copy_patient_study` replaces anyway: the document is built with a Secondary Capture stand-in
    and the evidence reference then names the source's real SOP class again.
    """
    try:
        with _quiet_names(), _unknown_sop_class(evidence):
            return cls(evidence=[evidence], **kwargs)
    except ResultBuildError:
        if not any_sop_class:
            raise
    stand_in = copy.deepcopy(evidence)
    stand_in.SOPClassUID = SecondaryCaptureImageStorage
    with _quiet_names():
        sr = cls(evidence=[stand_in], **kwargs)
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for item in sr.get(keyword, []):
            for element in item.iterall():
                if element.keyword == "ReferencedSOPClassUID" and element.value == SecondaryCaptureImageStorage:
                    element.value = evidence.SOPClassUID
    return sr


@contextmanager
def _unknown_sop_class(evidence: Dataset) -> Iterator[None]:
    """highdicom looks the source's IOD up by SOP Class UID to copy patient/study modules."""
    try:
        yield
    except KeyError as exc:
        raise ResultBuildError(
            f"source SOP Class UID must be a standard storage class known to highdicom, got "
            f"{evidence.SOPClassUID} in {evidence.SOPInstanceUID} ({exc})"
        ) from exc


def _private_scheme(algorithm: AlgorithmInfo) -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="cxr-node private codes",
        responsible_organization=algorithm.manufacturer,
    )


def build_sr(
    source_ds: Dataset,
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    *,
    device_ae: str,
    sr_class: SrClass = "3d",
) -> Dataset:
    """The TID 1500 report of one analysed image: one group per label plus the overall triage flag.

    Args:
        source_ds: the analysed image (pixel data not needed).
        findings: one per label, in the model package's label order; labels must be unique.
        algorithm: the model package.
        device_ae: this node's AE title (StationName).
        sr_class: ``3d`` (Comprehensive 3D SR, 88.34) or ``comprehensive`` (88.33) for PACS that refuse
            88.34; the two get different SOP Instance UIDs.

    Raises:
        ResultBuildError: no findings, duplicate labels, a probability or threshold outside [0, 1],
            ``positive`` inconsistent with them, or a source UID that is missing or malformed.
    """
    if not findings:
        raise ResultBuildError("build_sr needs at least one finding, got none")
    labels = [f.label for f in findings]
    if len(set(labels)) != len(labels):
        raise ResultBuildError(f"finding labels must be unique, got {labels}")
    evidence = _evidence(source_ds)  # never raises: invalid source UIDs are repaired (usable_source_uid)
    groups = [_finding_group(evidence, f, algorithm) for f in findings]
    groups.append(_summary_group(evidence, findings, algorithm))
    return _make_sr(evidence, groups, algorithm, "sr", device_ae, sr_class)


def build_failure_sr(
    source_ds: Dataset,
    reason: str,
    algorithm: AlgorithmInfo,
    *,
    device_ae: str | None = None,
    sr_class: SrClass = "3d",
) -> Dataset:
    """An SR stating that the image passed the chest filter but could not be analysed, and why.

    One TID 1501 group with finding type ``99CXR NOT_ANALYSED``, the algorithm, the source image and
    a TEXT item with the reason (passed through :func:`scrub_reason`: it names attributes and limits,
    never a value of the source). It has no triage flag: nothing was decided.

    It is made for any header pydicom could read, since it is what tells the PACS that an accepted
    image got no analysis: invalid source UIDs are replaced by derived ones (:func:`usable_source_uid`),
    invalid patient/study values are dropped, a SOP class highdicom does not know is referenced as it
    is, and if the document still cannot be built, it is built again with empty patient/study modules.

    Raises:
        ResultBuildError: an empty reason, or a document that cannot be built even from the source's
            UIDs alone (a defect of this module, not of the source).
    """
    text = scrub_reason(reason)
    if not text:
        raise ResultBuildError("build_failure_sr needs a reason, got an empty string")
    failure: Exception | None = None
    for step, make_evidence in (("sanitised", _evidence), ("minimal", _minimal_evidence)):
        try:
            return _failure_sr(make_evidence(source_ds), text, algorithm, device_ae, sr_class)
        except Exception as exc:  # a hostile header may break it anywhere: fall back
            failure = exc
            logger.warning("failure SR with %s patient/study attributes could not be built (%s); %s",
                           step, type(exc).__name__, "falling back" if step == "sanitised" else "giving up")
    raise ResultBuildError(
        f"failure SR cannot be built even with minimal patient/study modules ({type(failure).__name__})"
    ) from failure


def _failure_sr(
    evidence: Dataset, reason: str, algorithm: AlgorithmInfo, device_ae: str | None, sr_class: SrClass
) -> Dataset:
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(evidence, algorithm, "Not analysed"),
        finding_type=NOT_ANALYSED,
        algorithm_id=_algorithm_id(algorithm),
        source_images=[_source_image(evidence)],
    )
    text = f"Passed the chest filter but could not be analysed: {reason}"
    group[0].ContentSequence.append(
        TextContentItem(
            name=NOT_ANALYSED_REASON,
            value=text[:4096],
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    return _make_sr(evidence, [group], algorithm, "failure-sr", device_ae, sr_class, any_sop_class=True)


_QUOTED = re.compile(r"b?'[^']*'|b?\"[^\"]*\"|`[^`]*`")
_AFTER_GOT = re.compile(r"(,\s*(got|found)|\s+got)\b.*$", re.IGNORECASE | re.DOTALL)
_UID_LIKE = re.compile(r"(\s+(in|of|for))?\s*\b\d+(\.\d+){2,}\b")
_PATH_LIKE = re.compile(r"(?<!\w)/\S*")
_BRACKETED = re.compile(r"\[[^\]]*\]|\([^)]*\d[^)]*\)")
MAX_REASON_CHARS = 300


def scrub_reason(reason: str) -> str:
    """A reason without the values it may quote: what a "not analysed" SR (and a log) may say.

    Error messages here say what was expected and what was found (``... must be MONOCHROME1/2, got
    'XYZ'``); what was found can be any value a sender controls. Kept: the text up to ``got`` or
    ``, found``, without quoted strings, bracketed values, UIDs (with the "in"/"of" before them) and
    paths; ASCII only, at most 300 characters. What is left names attributes and limits.
    """
    text = reason.encode("ascii", errors="replace").decode("ascii")
    text = _CONTROL.sub(" ", text)
    text = _QUOTED.sub("", text)
    text = _AFTER_GOT.sub("", text)
    for pattern in (_BRACKETED, _UID_LIKE, _PATH_LIKE):
        text = pattern.sub("", text)
    text = re.sub(r"\s+([:;,.])", r"\1", re.sub(r"\s+", " ", text)).strip(" :;,")
    return text[:MAX_REASON_CHARS].rstrip()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _resample(array: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return array
    height, width = array.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(array, size, interpolation=interpolation))


def overlay_scale(shape: tuple[int, ...]) -> float:
    """Resampling factor of the overlay: long side at most 1024 and at least 768 (banner legibility)."""
    long_side = max(shape[:2])
    if long_side > _MAX_SIDE:
        return _MAX_SIDE / long_side
    if long_side < _MIN_SIDE:
        return _MIN_SIDE / long_side
    return 1.0


def _flagged_heat(
    findings: Sequence[Finding], heatmaps: Mapping[str, np.ndarray], shape: tuple[int, int]
) -> np.ndarray | None:
    """Pixel-wise maximum of the heatmaps of positive findings, or None when no positive one has a map."""
    heat: np.ndarray | None = None
    for finding in findings:
        if not finding.positive or finding.label not in heatmaps:
            continue
        hmap = np.asarray(heatmaps[finding.label], dtype=np.float32)
        if hmap.shape != shape:
            raise ResultBuildError(
                f"heatmap of {finding.label!r} must have the source image's shape {shape}, got {hmap.shape}"
            )
        hmap = np.clip(np.nan_to_num(hmap, nan=0.0), 0.0, 1.0)
        heat = hmap if heat is None else np.maximum(heat, hmap)
    return heat


def _blend(gray_u8: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """RGB image: gray everywhere, a jet colour map alpha-blended where the flagged heat is >= floor."""
    rgb = np.repeat(gray_u8[:, :, None], 3, axis=2)
    if heat is None:
        return rgb
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    alpha = np.where(heat >= _HEAT_FLOOR, _HEAT_ALPHA * heat, 0.0)[:, :, None]
    blended = rgb * (1.0 - alpha) + colour * alpha
    return np.asarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))


def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only."""
    return text.encode("ascii", errors="replace").decode("ascii")


def banner_lines(findings: Sequence[Finding], algorithm: AlgorithmInfo) -> list[tuple[str, bool]]:
    """The banner's text lines, each with whether it reports a positive (highlighted) result."""
    positive = [f for f in findings if f.positive]
    triage = f"TRIAGE POSITIVE ({len(positive)} flagged)" if positive else "TRIAGE NEGATIVE"
    lines = [
        (SERIES_DESCRIPTION_PREFIX, False),
        (_ascii(f"{algorithm.name} {algorithm.version} - {triage}"), bool(positive)),
    ]
    for f in findings:
        verdict = "POS" if f.positive else "NEG"
        text = f"{verdict} {f.label}: p={f.probability:.2f} thr={f.threshold:.2f}"
        lines.append((_ascii(text), bool(f.positive)))
    return lines


def _banner_layout(lines: Sequence[tuple[str, bool]], width: int) -> tuple[int, float, int]:
    """(columns, font scale, line height) so that the longest finding line fits its column."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    columns = 1 if len(lines) <= 6 else 2
    margin = max(4, width // 100)
    widest = max(cv2.getTextSize(text, font, 1.0, 2)[0][0] for text, _ in lines[2:] or lines)
    header = max(cv2.getTextSize(text, font, 1.0, 2)[0][0] for text, _ in lines[:2])
    fit = min((width / columns - 2 * margin) / widest, (width - 2 * margin) / header)
    scale = max(0.3, min(width / 1400, fit))
    line_height = int(cv2.getTextSize("Ag", font, scale, 1)[0][1] * 1.9) + 2
    return columns, scale, line_height


def render_banner(findings: Sequence[Finding], algorithm: AlgorithmInfo, width: int) -> np.ndarray:
    """A dark RGB strip with the burned-in result text: header, model, triage, one line per finding."""
    lines = banner_lines(findings, algorithm)
    columns, scale, line_height = _banner_layout(lines, width)
    body = lines[2:]
    rows = 2 + math.ceil(len(body) / columns)
    strip = np.full((rows * line_height + line_height // 2, width, 3), _BANNER_GRAY, dtype=np.uint8)
    margin = max(4, width // 100)
    thickness = max(1, round(scale * 1.5))
    placed = [(text, pos, margin, (i + 1) * line_height) for i, (text, pos) in enumerate(lines[:2])]
    per_column = math.ceil(len(body) / columns) if body else 0
    for i, (text, pos) in enumerate(body):
        column, row = divmod(i, per_column)
        placed.append((text, pos, margin + column * width // columns, (row + 3) * line_height))
    for text, pos, x, y in placed:
        colour = (255, 96, 32) if pos else (230, 230, 230)
        cv2.putText(strip, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return strip


def render_overlay(
    image: np.ndarray,
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    heatmaps_on_source: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, int, float]:
    """The overlay's RGB pixels: banner strip on top of the (resampled) image with flagged heat blended.

    Returns:
        (rgb uint8 array, banner height in rows, resampling factor applied to the source image).
    """
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ResultBuildError(f"image must be a 2-D float array in [0, 1], got shape {pixels.shape}")
    shape = (int(pixels.shape[0]), int(pixels.shape[1]))
    heat = _flagged_heat(findings, heatmaps_on_source, shape)
    scale = overlay_scale(shape)
    pixels = _resample(np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0), scale)
    gray = np.round(pixels * 255).astype(np.uint8)
    if heat is not None:
        heat = np.clip(_resample(heat, scale), 0.0, 1.0)
    banner = render_banner(findings, algorithm, gray.shape[1])
    return np.concatenate([banner, _blend(gray, heat)], axis=0), banner.shape[0], scale


def _patient_orientation(source_ds: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two valid biped direction strings, else None."""
    value = source_ds.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(v).strip().upper() for v in value)
    valid = all(re.fullmatch(r"[AFHLPR]{1,3}", v) for v in (row, column))
    return (row, column) if valid else None


def _derivation(sc: Dataset, evidence: Dataset, source_ds: Dataset, scale: float) -> None:
    """General Image derivation attributes: source reference, description, burned-in text, lossy history."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = evidence.SOPClassUID
    reference.ReferencedSOPInstanceUID = evidence.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [reference]
    resampled = f"; resampled by {scale:.4g} (long side {_MIN_SIDE}-{_MAX_SIDE})" if scale != 1.0 else ""
    sc.DerivationDescription = (
        "Source image with the AI heatmap blended over flagged findings only and a burned-in "
        f"result banner added on top{resampled}. NOT FOR DIAGNOSTIC USE."
    )
    sc.BurnedInAnnotation = "YES"
    # Results exist only for images the filter accepted as chest radiographs; an unpaired body part
    # also settles General Series Laterality (Type 2C), which is then absent.
    sc.BodyPartExamined = "CHEST"
    sc.ConversionType = "WSD"
    tsyntax = getattr(getattr(source_ds, "file_meta", None), "TransferSyntaxUID", None)
    lossy_syntax = tsyntax is not None and UID(tsyntax).is_compressed and not _is_lossless(UID(tsyntax))
    if source_ds.get("LossyImageCompression") == "01" or lossy_syntax:
        sc.LossyImageCompression = "01"


def _is_lossless(tsyntax: UID) -> bool:
    lossless = {
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.203",
        "1.2.840.10008.1.2.1.99",
    }
    return str(tsyntax) in lossless


def build_overlay(
    source_ds: Dataset,
    image: np.ndarray,
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    heatmaps_on_source: Mapping[str, np.ndarray],
    *,
    device_ae: str | None = None,
) -> Dataset:
    """The Secondary Capture overlay: RGB 8-bit, heat over flagged findings, burned-in banner on top.

    Args:
        source_ds: the analysed image.
        image: the source-shaped display image, float in [0, 1] (0 = black).
        findings: the findings of this image (the SR's).
        algorithm: the model package.
        heatmaps_on_source: label -> source-shaped map in [0, 1]; only positive findings are drawn.
        device_ae: this node's AE title (StationName), optional.

    The image is resampled so that its long side lies in 768-1024 pixels (the description says so).
    The pixels are stored as YBR_FULL in RLE Lossless: the rendering is gray except where heat or
    highlighted text is drawn, so both colour-difference planes are nearly constant and compress to
    almost nothing (about 3x smaller than RGB stored uncompressed). RGB -> YBR_FULL rounds coloured
    pixels by at most 1 per channel; gray pixels are kept exactly.
    """
    for finding in findings:
        _check_finding(finding)
    evidence = _evidence(source_ds)  # never raises: invalid source UIDs are repaired (usable_source_uid)
    rgb, _, scale = render_overlay(image, findings, algorithm, heatmaps_on_source)
    orientation = _patient_orientation(source_ds)
    with _quiet_names():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=evidence,
            pixel_array=convert_color_space(rgb, "RGB", "YBR_FULL"),
            photometric_interpretation="YBR_FULL",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid(
                evidence.StudyInstanceUID, algorithm.version, "overlay", algorithm_name=algorithm.name
            ),
            series_number=OVERLAY_SERIES_NUMBER,
            sop_instance_uid=result_uid(
                evidence.SOPInstanceUID, algorithm.version, "overlay", algorithm_name=algorithm.name
            ),
            instance_number=evidence.InstanceNumber,
            manufacturer=algorithm.manufacturer,
            patient_orientation=orientation or ("L", "F"),
            transfer_syntax_uid=RLELossless,
            series_description=OVERLAY_SERIES_DESCRIPTION,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
        )
    if orientation is None:
        sc.add_new("PatientOrientation", "CS", None)  # Type 2: unknown, not guessed
    _copy_patient_study(sc, evidence)
    _derivation(sc, evidence, source_ds, scale)
    if device_ae:
        sc.StationName = check_short_string(device_ae, "device_ae")
    return sc


COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def as_comprehensive_sr(ds: Dataset) -> Dataset:
    """The same report as Comprehensive SR (88.33), for a PACS that refuses Comprehensive 3D SR (88.34).

    Our TID 1500 content has no SCOORD3D items, so the content tree is valid in both IODs; the copy
    gets its own deterministic SOP Instance UID (one UID never names two SOP classes).

    Raises:
        ResultBuildError: the dataset is not a Comprehensive 3D SR or holds 3D coordinates.
    """
    if ds.SOPClassUID != COMPREHENSIVE_3D_SR:
        raise ResultBuildError(f"SOPClassUID must be {COMPREHENSIVE_3D_SR} to fall back, got {ds.SOPClassUID}")
    if _has_scoord3d(ds.get("ContentSequence", [])):
        raise ResultBuildError(f"SR {ds.SOPInstanceUID} holds SCOORD3D items: no Comprehensive SR fallback")
    out = copy.deepcopy(ds)  # pydicom elements are mutable and shared by a shallow copy
    out.SOPClassUID = COMPREHENSIVE_SR
    out.SOPInstanceUID = result_uid(str(ds.SOPInstanceUID), "", "sr-comprehensive-fallback")
    if getattr(out, "file_meta", None) is not None:
        out.file_meta.MediaStorageSOPClassUID = out.SOPClassUID
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def _has_scoord3d(items: Sequence[Dataset]) -> bool:
    return any(
        item.get("ValueType") == "SCOORD3D" or _has_scoord3d(item.get("ContentSequence", [])) for item in items
    )
