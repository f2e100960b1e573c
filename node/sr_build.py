"""The SR documents: the Comprehensive 3D SR (TID 1500) of an analysed image, the "not analysed" SR, and
the Comprehensive SR (88.33) copy for a PACS that refuses 88.34.

The SR content (groups, codes, reading back) is :mod:`node.report`; this module wraps it in the SR
document. The model package is named in the Contributing Equipment Sequence (purpose (109102, DCM,
"Processing Equipment"), Device UID :func:`node.result_common.device_uid`) and as the device observer.
The "not analysed" SR is made for any header pydicom can read, so that every accepted image ends with a
result at the PACS.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    Comprehensive3DSR,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage

from ai.findings import Finding
from node.dicom_hygiene import check_short_string
from node.report import (
    PRIVATE_SCHEME,
    Evaluation,
    FindingResult,
    GroupContext,
    NotAnalysedResult,
    TriageResult,
    measurement_report,
)
from node.result_common import (
    SERIES_DESCRIPTION_PREFIX,
    AlgorithmInfo,
    ResultBuildError,
    check_finding,
    copy_patient_study,
    derived_uid,
    device_uid,
    minimal_evidence,
    own_text,
    quiet_names,
    result_uid,
    scrub_reason,
    series_uid,
    source_evidence,
)

logger = logging.getLogger("node.results")  # the results step's log lines keep their logger name

SR_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} - REPORT"
SR_SERIES_NUMBER = 9901

#: Contributing Equipment purpose of the model package (CID 7005): it processed the source image.
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # 109102


def _group_context(evidence: Dataset, algorithm: AlgorithmInfo) -> GroupContext:
    return GroupContext(
        source_sop_class_uid=evidence.SOPClassUID,
        source_sop_instance_uid=evidence.SOPInstanceUID,
        algorithm_name=algorithm.name,
        algorithm_version=algorithm.version,
    )


def _tracking_uid(evidence: Dataset, algorithm: AlgorithmInfo, identifier: str) -> str:
    return derived_uid("tracking", evidence.SOPInstanceUID, algorithm.name, algorithm.version, identifier)


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
    copy_patient_study(sr, evidence)
    if device_ae:
        sr.StationName = check_short_string(device_ae, "device_ae")
    logger.debug("built %s %s for %s", kind, sr.SOPInstanceUID, evidence.SOPInstanceUID)
    return sr


def _construct(
    cls: type[Comprehensive3DSR] | type[ComprehensiveSR], evidence: Dataset, any_sop_class: bool, **kwargs: Any
) -> Dataset:
    """Build the SR document; with ``any_sop_class``, a source of a class unknown to highdicom is accepted.

    highdicom looks the source's IOD up by SOP Class UID only to copy its patient/study modules, which
    :func:`copy_patient_study` replaces anyway: the document is built with a Secondary Capture stand-in
    and the evidence reference then names the source's real SOP class again.
    """
    try:
        with quiet_names(), _unknown_sop_class(evidence):
            return cls(evidence=[evidence], **kwargs)
    except ResultBuildError:
        if not any_sop_class:
            raise
    stand_in = copy.deepcopy(evidence)
    stand_in.SOPClassUID = SecondaryCaptureImageStorage
    with quiet_names():
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
        check_finding(finding)
    evidence = source_evidence(source_ds)  # never raises: a UID that cannot be copied is replaced (usable_source_uid)
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
    text = own_text(reason) if own_reason else scrub_reason(reason)
    if not text:
        raise ResultBuildError("build_failure_sr needs a reason, got an empty string")
    failure: Exception | None = None
    for step, make_evidence in (("sanitised", source_evidence), ("minimal", minimal_evidence)):
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
