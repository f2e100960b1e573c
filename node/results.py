"""Results step: build the Comprehensive 3D SR (TID 1500) and the Secondary Capture overlay for one image.

Every object carries the source's Study Instance UID, a new series whose description starts with
``AI CXR TRIAGE - NOT FOR DIAGNOSTIC USE``, and deterministic UIDs derived from the source SOP Instance
UID, the model package (name and version) and the kind of object, so that results rebuilt after a crash
keep their UIDs. Patient and study attributes are copied through :mod:`node.dicom_hygiene`, which
repairs or drops values that are invalid in the source, so that the objects pass ``dciodvfy``. The
source's UIDs are referenced verbatim; only one that is missing or cannot be encoded as a UID at all is
replaced by one derived from it (:func:`usable_source_uid`). The SR content (groups, codes, reading
back) is :mod:`node.report`; this module wraps it in the SR document. The model package is named in
the Contributing Equipment Sequence (purpose (109102, DCM, "Processing Equipment"), Device UID
:func:`device_uid`) and as the device observer. The "not analysed" SR is made for any header pydicom can
read, so that every accepted image ends with a result at the PACS. The overlay is at most 1024 pixels on
its long side, stored as RLE Lossless.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    CodedConcept,
    Comprehensive3DSR,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
)
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import validate_value

from ai.errors import PermanentError
from ai.findings import Finding
from node import overlay
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
from node.overlay import (  # noqa: F401 (banner_lines and overlay_scale are part of this module's API)
    CONTOUR_LEVEL,
    MAX_SIDE,
    MIN_SIDE,
    OverlayInputError,
    ascii_text,
    banner_lines,
    overlay_scale,
)
from node.report import (
    PRIVATE_SCHEME,
    Evaluation,
    FindingResult,
    GroupContext,
    NotAnalysedResult,
    TriageResult,
    measurement_report,
)

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION_PREFIX = "AI CXR TRIAGE - NOT FOR DIAGNOSTIC USE"
SR_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} - REPORT"
OVERLAY_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} - OVERLAY"
SR_SERIES_NUMBER = 9901
OVERLAY_SERIES_NUMBER = 9902

#: Namespace of the name-based (version 5) UUIDs behind our ``2.25.`` UIDs (ISO/IEC 9834-8).
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-node:results")

#: Contributing Equipment purpose of the model package (CID 7005): it processed the source image.
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # 109102

_T = TypeVar("_T")


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


def device_uid(algorithm: AlgorithmInfo) -> str:
    """Device UID of the model package (Contributing Equipment, device observer): one per name and version."""
    return _uuid_uid("device", algorithm.name, algorithm.version)


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


def _minimal_evidence(source_ds: Dataset) -> Dataset:
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
        return _uuid_uid("repaired-source-uid", keyword, held)
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


def _group_context(evidence: Dataset, algorithm: AlgorithmInfo) -> GroupContext:
    return GroupContext(
        source_sop_class_uid=evidence.SOPClassUID,
        source_sop_instance_uid=evidence.SOPInstanceUID,
        algorithm_name=algorithm.name,
        algorithm_version=algorithm.version,
    )


def _tracking_uid(evidence: Dataset, algorithm: AlgorithmInfo, identifier: str) -> str:
    return _uuid_uid("tracking", evidence.SOPInstanceUID, algorithm.name, algorithm.version, identifier)


def _observation_context(algorithm: AlgorithmInfo) -> ObservationContext:
    """Device observer = the model package."""
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=f"{algorithm.name} {algorithm.version}",
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def _contributing_equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    """The model package as Processing Equipment (CID 7005), with its Device UID (0018,1002)."""
    equipment = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contribution_description="AI triage of the source image (not for diagnostic use)",
    )
    equipment.DeviceUID = device_uid(algorithm)
    return equipment


SrClass = Literal["3d", "comprehensive"]


def _make_sr(
    evidence: Dataset,
    groups: Sequence[MeasurementsAndQualitativeEvaluations],
    evaluations: Sequence[Evaluation],
    algorithm: AlgorithmInfo,
    kind: str,
    device_ae: str | None,
    any_sop_class: bool = False,
) -> Dataset:
    """Wrap TID 1500 content in a Comprehensive 3D SR (88.34) document (88.33: :func:`as_comprehensive_sr`).

    ``evaluations``: the report-level qualitative evaluations (TID 1500 rows 13-14).
    ``any_sop_class``: a source whose SOP class highdicom does not know is referenced all the same
    (see :func:`_construct`); otherwise it is refused.
    """
    report = measurement_report(_observation_context(algorithm), groups, evaluations)
    sr = _construct(
        Comprehensive3DSR,
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
        contributing_equipment=[_contributing_equipment(algorithm)],
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
    """The TID 1500 report of one analysed image: one group per label, the overall triage flag at report level.

    Args:
        source_ds: the analysed image (pixel data not needed).
        findings: one per label, in the model package's label order; labels must be unique.
        algorithm: the model package.
        device_ae: this node's AE title (StationName).
        sr_class: ``3d`` (Comprehensive 3D SR, 88.34) or ``comprehensive`` (88.33) for PACS that refuse
            88.34: the one fallback, :func:`as_comprehensive_sr` of the 88.34 document (same content, its own
            deterministic UID, the one the outbox sends).

    Raises:
        ResultBuildError: no findings, duplicate labels, a probability or threshold outside [0, 1],
            ``positive`` inconsistent with them, or a source of a SOP class highdicom does not know.
    """
    _check_sr_class(sr_class)
    if not findings:
        raise ResultBuildError("build_sr needs at least one finding, got none")
    labels = [f.label for f in findings]
    if len(set(labels)) != len(labels):
        raise ResultBuildError(f"finding labels must be unique, got {labels}")
    for finding in findings:
        _check_finding(finding)
    evidence = _evidence(source_ds)  # never raises: a UID that cannot be copied is replaced (usable_source_uid)
    context = _group_context(evidence, algorithm)
    results = [FindingResult.from_finding(f) for f in findings]
    groups = [r.to_group(context, _tracking_uid(evidence, algorithm, r.label)) for r in results]
    evaluations = TriageResult.of(results).to_evaluations()
    sr = _make_sr(evidence, groups, evaluations, algorithm, "sr", device_ae)
    return as_comprehensive_sr(sr) if sr_class == "comprehensive" else sr


def _check_sr_class(sr_class: str) -> None:
    if sr_class not in ("3d", "comprehensive"):
        raise ResultBuildError(f"sr_class must be '3d' or 'comprehensive', got {sr_class!r}")


def build_failure_sr(
    source_ds: Dataset,
    reason: str,
    algorithm: AlgorithmInfo,
    *,
    device_ae: str | None = None,
    sr_class: SrClass = "3d",
    own_reason: bool = False,
) -> Dataset:
    """An SR stating that the image passed the chest filter but could not be analysed, and why.

    One TID 1501 group with finding type ``99CXR NOT_ANALYSED``, the algorithm and the source image,
    and at report level a TEXT item with the reason (passed through :func:`scrub_reason`: it names
    attributes and limits, never a value of the source); see :class:`node.report.NotAnalysedResult`. It
    has no triage flag: nothing was decided. ``own_reason``: the reason is the node's own fixed text with
    only numbers the node computed (the input gate's, ``ai.gate``), kept as is (ASCII, at most
    ``MAX_REASON_CHARS``) so that its probability survives.

    It is made for any header pydicom could read, since it is what tells the PACS that an accepted
    image got no analysis: source UIDs that cannot be copied are replaced by derived ones (:func:`usable_source_uid`),
    invalid patient/study values are dropped, a SOP class highdicom does not know is referenced as it
    is, and if the document still cannot be built, it is built again with empty patient/study modules.

    Raises:
        ResultBuildError: an empty reason, or a document that cannot be built even from the source's
            UIDs alone (a defect of this module, not of the source).
    """
    _check_sr_class(sr_class)
    text = _own_text(reason) if own_reason else scrub_reason(reason)
    if not text:
        raise ResultBuildError("build_failure_sr needs a reason, got an empty string")
    failure: Exception | None = None
    for step, make_evidence in (("sanitised", _evidence), ("minimal", _minimal_evidence)):
        try:
            sr = _failure_sr(make_evidence(source_ds), text, algorithm, device_ae)
            return as_comprehensive_sr(sr) if sr_class == "comprehensive" else sr
        except Exception as exc:  # a hostile header may break it anywhere: fall back
            failure = exc
            logger.warning("failure SR with %s patient/study attributes could not be built (%s); %s",
                           step, type(exc).__name__, "falling back" if step == "sanitised" else "giving up")
    raise ResultBuildError(
        f"failure SR cannot be built even with minimal patient/study modules ({type(failure).__name__})"
    ) from failure


def _failure_sr(evidence: Dataset, reason: str, algorithm: AlgorithmInfo, device_ae: str | None) -> Dataset:
    statement = NotAnalysedResult(reason)
    group = statement.to_group(_group_context(evidence, algorithm), _tracking_uid(evidence, algorithm, "Not analysed"))
    return _make_sr(evidence, [group], statement.to_evaluations(), algorithm, "failure-sr", device_ae,
                    any_sop_class=True)


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


def _own_text(reason: str) -> str:
    """The node's own reason text as an SR may carry it: ASCII, no control characters, bounded."""
    text = _CONTROL.sub(" ", reason.encode("ascii", errors="replace").decode("ascii"))
    return re.sub(r"\s+", " ", text).strip()[:MAX_REASON_CHARS].rstrip()


def _overlay_input(call: Callable[[], _T]) -> _T:
    """Run a rendering call, raising its input errors as ``ResultBuildError``."""
    try:
        return call()
    except OverlayInputError as exc:
        raise ResultBuildError(str(exc)) from exc


def render_overlay(
    image: np.ndarray,
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    heatmaps_on_source: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, int, float]:
    """The result overlay's RGB pixels (:func:`node.overlay.render_overlay`).

    Returns:
        (rgb uint8 array, banner height in rows, resampling factor applied to the source image).

    Raises:
        ResultBuildError: the image is not 2-D, or a drawn heatmap does not have its shape.
    """
    return _overlay_input(lambda: overlay.render_overlay(image, findings, algorithm, heatmaps_on_source))


def _patient_orientation(source_ds: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two valid biped direction strings, else None."""
    value = source_ds.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(v).strip().upper() for v in value)
    valid = all(re.fullmatch(r"[AFHLPR]{1,3}", v) for v in (row, column))
    return (row, column) if valid else None


def _derivation(sc: Dataset, evidence: Dataset, source_ds: Dataset, description: str) -> None:
    """General Image derivation attributes: source reference, description, burned-in text, lossy history."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = evidence.SOPClassUID
    reference.ReferencedSOPInstanceUID = evidence.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = f"{description} NOT FOR DIAGNOSTIC USE."
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    tsyntax = getattr(getattr(source_ds, "file_meta", None), "TransferSyntaxUID", None)
    lossy_syntax = tsyntax is not None and UID(tsyntax).is_compressed and not _is_lossless(UID(tsyntax))
    if source_ds.get("LossyImageCompression") == "01" or lossy_syntax:
        sc.LossyImageCompression = "01"


_DESCRIPTION_CHARS = 1024  # DerivationDescription is ST


def _resampled(scale: float) -> str:
    return f"; resampled by {scale:.4g} (long side {MIN_SIDE}-{MAX_SIDE})" if scale not in (0.0, 1.0) else ""


LOSSLESS_SYNTAXES = frozenset({
    JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, JPEG2000MCLossless, RLELossless,
    HTJ2KLossless, HTJ2KLosslessRPCL, DeflatedExplicitVRLittleEndian,
})
"""Transfer syntaxes that keep every pixel: a source in any other compressed syntax (JPEG baseline, JPEG-LS
near-lossless, JPEG 2000 and HTJ2K that allow loss, .91 and .203) makes the overlay ``LossyImageCompression 01``."""


def _is_lossless(tsyntax: UID) -> bool:
    return tsyntax in LOSSLESS_SYNTAXES


def _secondary_capture(
    source_ds: Dataset, rgb: np.ndarray, algorithm: AlgorithmInfo, kind: str, device_ae: str | None
) -> tuple[Dataset, Dataset]:
    """(SC image of ``rgb`` in the overlay series, the source's evidence); ``kind`` makes its UID.

    The pixels are stored as YBR_FULL in RLE Lossless: the rendering is gray except where outlines or
    the banner are drawn, so both colour-difference planes are nearly constant and compress to almost
    nothing. RGB -> YBR_FULL rounds coloured pixels by at most 1 per channel; gray pixels are kept exactly.
    """
    evidence = _evidence(source_ds)  # never raises: invalid source UIDs are repaired (usable_source_uid)
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
                evidence.SOPInstanceUID, algorithm.version, kind, algorithm_name=algorithm.name
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
    if device_ae:
        sc.StationName = check_short_string(device_ae, "device_ae")
    return sc, evidence


def build_overlay(
    source_ds: Dataset,
    image: np.ndarray,
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    heatmaps_on_source: Mapping[str, np.ndarray],
    *,
    device_ae: str | None = None,
) -> Dataset:
    """The Secondary Capture overlay: RGB 8-bit, evidence of positive findings outlined, banner on top.

    Args:
        source_ds: the analysed image.
        image: the source-shaped display image, float in [0, 1] (0 = black).
        findings: the findings of this image (the SR's).
        algorithm: the model package.
        heatmaps_on_source: label -> source-shaped map in [0, 1] (the finding's heatmap on the source);
            only positive findings are drawn, as the region where the CAM is at least
            ``node.overlay.CONTOUR_LEVEL`` of its range (see :mod:`node.overlay`).
        device_ae: this node's AE title (StationName), optional.

    The image is resampled so that its long side lies in 768-1024 pixels (the description says so).

    Raises:
        ResultBuildError: an invalid finding, an image that is not 2-D or a heatmap of another shape.
    """
    for finding in findings:
        _check_finding(finding)
    rgb, _, scale = render_overlay(image, findings, algorithm, heatmaps_on_source)
    sc, evidence = _secondary_capture(source_ds, rgb, algorithm, "overlay", device_ae)
    drawn = ", ".join(f.label for f in findings if f.positive and f.label in heatmaps_on_source) or "none"
    description = (
        f"Source image with the strongest AI evidence (CAM >= {CONTOUR_LEVEL:g} of its range) outlined for "
        f"positive findings only ({drawn}) and a burned-in result banner added on top{_resampled(scale)}."
    )
    _derivation(sc, evidence, source_ds, truncate_bytes(ascii_text(description), _DESCRIPTION_CHARS))
    # Results exist only for images the filter accepted as chest radiographs; an unpaired body part
    # also settles General Series Laterality (Type 2C), which is then absent.
    sc.BodyPartExamined = "CHEST"
    return sc


def build_not_analysed_overlay(
    source_ds: Dataset,
    image: np.ndarray | None,
    reason: str,
    algorithm: AlgorithmInfo,
    *,
    device_ae: str | None = None,
) -> Dataset:
    """The Secondary Capture for an image the model did not analyse: the image under a "NOT ANALYSED" banner.

    Args:
        source_ds: the received image (its header; the pixels are not read from it).
        image: the decoded source image, 2-D float in [0, 1] or uint8, or None when its pixels could not
            be decoded (a dark field saying "NO IMAGE PIXELS" is drawn instead).
        reason: why it was not analysed, a fixed text without patient values, e.g. ``image is not a
            frontal chest radiograph (p = 0.03)``; burned in and repeated in DerivationDescription.
        algorithm: the model package.
        device_ae: this node's AE title (StationName), optional.

    Nothing is drawn on the image; its UID differs from the result overlay's of the same source.

    Raises:
        ResultBuildError: ``image`` is neither None nor a 2-D image.
    """
    reason = _CONTROL.sub(" ", reason).strip()[:MAX_REASON_CHARS] or "no reason given"
    rgb, _, scale = _overlay_input(lambda: overlay.render_not_analysed(image, reason, algorithm))
    sc, evidence = _secondary_capture(source_ds, rgb, algorithm, "overlay-not-analysed", device_ae)
    shown = "Source image" if image is not None else "A blank field (the source pixels could not be decoded)"
    description = (
        f"{shown} under a burned-in banner: NOT ANALYSED by the AI model: {ascii_text(reason)}{_resampled(scale)}."
    )
    _derivation(sc, evidence, source_ds, truncate_bytes(ascii_text(description), _DESCRIPTION_CHARS))
    if str(source_ds.get("BodyPartExamined", "")).strip().upper() == "CHEST":
        sc.BodyPartExamined = "CHEST"
    else:  # the image may be anything: General Series Laterality (Type 2C) is then present and unknown
        sc.add_new("Laterality", "CS", None)
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
