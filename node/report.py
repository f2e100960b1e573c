"""Results step, SR content: the parts of our TID 1500 report, each written and read back by one class.

A report about one image holds, under the TID 1500 root:

* Procedure reported, once: (363679005, SCT, "Imaging procedure"), the one code of CID 100
  "Quantitative Diagnostic Imaging Procedures" that covers a chest radiograph (the group has no
  X-ray or chest entry; PixelMed's ``DicomSRValidator`` refuses codes outside it).
* Per label, a TID 1501 measurement group (:class:`FindingResult`): tracking identifier and UID, the
  finding type (SNOMED CT where a code exists, else the private scheme ``99CXR``), the algorithm
  (TID 4019: name, version, parameters ``threshold=`` and ``threshold_method=``), the source image,
  the probability as a NUM (DCM 122157 "Probability", UCUM ``1``) and the decision at the threshold as
  a qualitative evaluation (TID 1501 row 11): concept name = the finding type, value (52101004, SCT,
  "Present") or (272519000, SCT, "Absent") from CID 241 "Present-Absent Only". A label that does not apply
  to the patient (``ai.applicability``: a patient outside the label's age range, or of unknown age) has no
  probability; its decision is (385432009, SCT, "Not applicable") and the parameter ``not_applicable=``
  says why. A label the package marks informational (``ModelManifest.informational``) keeps its probability
  and decision, and the parameter ``informational=`` says that its decision does not set the triage flag.
* For an image that was not analysed, one TID 1501 group with the finding type ``99CXR NOT_ANALYSED``
  (:class:`NotAnalysedResult`), the algorithm and the source image.
* The report-level qualitative evaluations (TID 1500 rows 12-14, container (C0034375, UMLS,
  "Qualitative Evaluations")): the overall triage flag (:class:`TriageResult`, ``99CXR TRIAGE`` =
  (10828004, SCT, "Positive") / (260385009, SCT, "Negative"), CID 250: positive when a finding that is not
  informational is Present) for an analysed image, or the
  reason (TEXT ``99CXR NOT_ANALYSED_WHY``) for one that was not.

:func:`read_report` reads any of our SRs (Comprehensive 3D SR or the Comprehensive SR fallback) back
into a :class:`ReportContent` through the same classes; tests, tools and benchmarks read SRs with it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
    ValueTypeValues,
)
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ai.findings import Finding
from node.dicom_hygiene import truncate_bytes

PRIVATE_SCHEME = "99CXR"
#: CID 241 "Present-Absent Only" of the current DICOM standard: SCT 272519000 (2667000 was replaced).
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000
#: The decision of a label that does not apply to the patient (SNOMED CT qualifier value).
NOT_APPLICABLE = Code("385432009", "SCT", "Not applicable")
TRIAGE_FLAG = Code("TRIAGE", PRIVATE_SCHEME, "AI triage flag (any triage finding at or above its threshold)")
#: The ``informational=`` parameter's value: what it means for the reader of the SR.
INFORMATIONAL_TEXT = "reported only; its decision does not set the triage flag"
NOT_ANALYSED = Code("NOT_ANALYSED", PRIVATE_SCHEME, "Image not analysed by the AI model")
NOT_ANALYSED_REASON = Code("NOT_ANALYSED_WHY", PRIVATE_SCHEME, "Reason the image was not analysed")
#: TID 1500 row 4, from CID 100 (PixelMed's table, version 20190121, and the current standard).
PROCEDURE_REPORTED = codes.SCT.ImagingProcedure  # 363679005
#: TID 1500 row 12: the container of the report-level qualitative evaluations.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
NOT_ANALYSED_PREFIX = "Passed the chest filter but could not be analysed: "
MAX_TEXT_CHARS = 4096

# Canonical label (lower case, letters only) -> finding type. SNOMED CT / DCM where the code is in the
# DICOM standard's own code tables (pydicom's codedict) or independently confirmed; else private.
FINDING_CODES: dict[str, Code] = {
    "tuberculosis": Code("56717001", "SCT", "Tuberculosis"),
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    # A label of its own (learnt from children aged 1-5, training.labels): not NIH's adult "Pneumonia".
    "pediatricpneumonia": Code("PED_PNEUMONIA", PRIVATE_SCHEME, "Pneumonia (pediatric model)"),
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


#: A report-level qualitative evaluation (TID 1500 row 13 CODE or row 14 TEXT).
Evaluation = CodeContentItem | TextContentItem


class ReportReadError(ValueError):
    """An SR is not one of our reports, or a part of it does not read as written."""


def finding_code(label: str) -> Code:
    """The finding type of a label: a standard code where known, else one of the private scheme 99CXR."""
    key = re.sub(r"[^a-z]", "", label.lower())
    if key in FINDING_CODES:
        return FINDING_CODES[key]
    value = re.sub(r"[^A-Z0-9]+", "_", label.upper()).strip("_") or "LABEL"
    if len(value) > 16:
        value = f"{value[:11]}_{hashlib.sha1(label.encode()).hexdigest()[:4].upper()}"
    return Code(value, PRIVATE_SCHEME, truncate_bytes(label, 64) or value)


@dataclass(frozen=True)
class AlgorithmRef:
    """TID 4019 Algorithm Identification: name, version and parameters (``key=value`` texts).

    The manufacturer is no TID 4019 item: it is in the Contributing Equipment Sequence.
    """

    name: str
    version: str
    parameters: tuple[str, ...] = ()

    def to_template(self) -> AlgorithmIdentification:
        return AlgorithmIdentification(
            name=self.name, version=self.version, parameters=list(self.parameters) or None
        )

    @classmethod
    def from_group(cls, group: Dataset) -> AlgorithmRef:
        """The TID 4019 items directly under a measurement group."""
        name = _texts(group, codes.DCM.AlgorithmName)
        version = _texts(group, codes.DCM.AlgorithmVersion)
        if len(name) != 1 or len(version) != 1:
            raise ReportReadError(
                f"a measurement group must hold one Algorithm Name and one Algorithm Version, got "
                f"{len(name)} and {len(version)}"
            )
        return cls(name[0], version[0], tuple(_texts(group, codes.DCM.AlgorithmParameters)))

    def parameter(self, key: str) -> str | None:
        """The value of the parameter ``key=value``, or None when absent."""
        for text in self.parameters:
            name, sep, value = text.partition("=")
            if sep and name == key:
                return value
        return None


@dataclass(frozen=True)
class GroupContext:
    """What every measurement group of one report shares: the image it is about and the algorithm.

    Attributes:
        source_sop_class_uid: SOP Class UID of the analysed image, copied verbatim.
        source_sop_instance_uid: SOP Instance UID of the analysed image, copied verbatim.
        algorithm_name: the model package's name (TID 4019 Algorithm Name).
        algorithm_version: the model package's version (TID 4019 Algorithm Version).
    """

    source_sop_class_uid: str
    source_sop_instance_uid: str
    algorithm_name: str
    algorithm_version: str

    def group(
        self,
        identifier: str,
        tracking_uid: str,
        finding_type: Code,
        parameters: Sequence[str] = (),
        measurements: Sequence[Measurement] | None = None,
        evaluations: Sequence[QualitativeEvaluation] | None = None,
    ) -> MeasurementsAndQualitativeEvaluations:
        """One TID 1501 group about the source image."""
        algorithm = AlgorithmRef(self.algorithm_name, self.algorithm_version, tuple(parameters))
        return MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=identifier),
            finding_type=finding_type,
            algorithm_id=algorithm.to_template(),
            measurements=list(measurements) if measurements else None,
            qualitative_evaluations=list(evaluations) if evaluations else None,
            source_images=[
                SourceImageForMeasurementGroup(self.source_sop_class_uid, self.source_sop_instance_uid)
            ],
        )


@dataclass(frozen=True)
class FindingResult:
    """One label's result: probability, threshold (and how it was chosen) and the decision at it.

    Attributes:
        label: the canonical label, also the group's tracking identifier.
        probability: in [0, 1] (NUM, unit ``1``); None when the label does not apply (no score is stated).
        threshold: the threshold in force, as the SR states it (6 significant digits).
        threshold_method: how that threshold was chosen.
        positive: the decision, Present (True) or Absent (False); False when the label does not apply.
        not_applicable: why the label does not apply to the patient, or "" when it does.
        informational: the decision is reported but does not set the triage flag (parameter ``informational=``).
    """

    label: str
    probability: float | None
    threshold: float
    threshold_method: str
    positive: bool
    not_applicable: str = ""
    informational: bool = False

    @classmethod
    def from_finding(cls, finding: Finding) -> FindingResult:
        if finding.not_applicable:
            return cls(finding.label, None, float(finding.threshold), finding.threshold_method, False,
                       finding.not_applicable, finding.informational)
        return cls(finding.label, float(finding.probability), float(finding.threshold),
                   finding.threshold_method, bool(finding.positive), informational=finding.informational)

    @property
    def flags(self) -> bool:
        """Whether this result sets the triage flag: Present and not informational."""
        return self.positive and not self.informational

    @property
    def finding_type(self) -> Code:
        return finding_code(self.label)

    def parameters(self) -> tuple[str, ...]:
        """The TID 4019 Algorithm Parameters of this label's group."""
        stated: tuple[str, ...] = (f"threshold={self.threshold:.6g}", f"threshold_method={self.threshold_method}")
        if self.not_applicable:
            stated = (*stated, f"not_applicable={self.not_applicable}")
        return (*stated, f"informational={INFORMATIONAL_TEXT}") if self.informational else stated

    def to_group(self, context: GroupContext, tracking_uid: str) -> MeasurementsAndQualitativeEvaluations:
        """TID 1501: probability (NUM), decision (CODE finding type = Present/Absent), TID 4019; a label that does
        not apply: no probability, the decision Not applicable."""
        if self.not_applicable:
            decision = QualitativeEvaluation(name=self.finding_type, value=NOT_APPLICABLE)
            return context.group(self.label, tracking_uid, self.finding_type, self.parameters(),
                                 evaluations=[decision])
        if self.probability is None:
            raise ValueError(f"finding {self.label!r}: a label that applies must have a probability")
        probability = Measurement(name=codes.DCM.Probability, value=self.probability, unit=codes.UCUM.NoUnits)
        decision = QualitativeEvaluation(name=self.finding_type, value=PRESENT if self.positive else ABSENT)
        return context.group(self.label, tracking_uid, self.finding_type, self.parameters(),
                             measurements=[probability], evaluations=[decision])

    @classmethod
    def from_group(cls, group: MeasurementsAndQualitativeEvaluations) -> FindingResult:
        """Read a group written by :meth:`to_group`."""
        label = group.tracking_identifier
        finding_type = group.finding_type
        if label is None or finding_type is None:
            raise ReportReadError("a finding group must have a tracking identifier and a finding type")
        probabilities = group.get_measurements(name=codes.DCM.Probability)
        decisions = group.get_qualitative_evaluations(name=finding_type)
        if len(decisions) != 1:
            raise ReportReadError(f"finding group {label!r} must hold one decision, got {len(decisions)}")
        value = decisions[0].value
        expected = 0 if value == NOT_APPLICABLE else 1
        if len(probabilities) != expected:
            meaning = getattr(value, "meaning", value)
            raise ReportReadError(
                f"finding group {label!r} must hold {expected} Probability with decision {meaning!r}, "
                f"got {len(probabilities)}"
            )
        algorithm = AlgorithmRef.from_group(group[0])
        threshold = algorithm.parameter("threshold")
        method = algorithm.parameter("threshold_method")
        if threshold is None or method is None:
            raise ReportReadError(f"finding group {label!r} must state threshold= and threshold_method=")
        stated = algorithm.parameter("informational")
        if stated is not None and not stated:
            raise ReportReadError(f"finding group {label!r} states informational= without saying what it means")
        informational = stated is not None
        if value == NOT_APPLICABLE:
            why = algorithm.parameter("not_applicable")
            if not why:
                raise ReportReadError(f"finding group {label!r} is not applicable but does not state why")
            return cls(str(label), None, float(threshold), method, False, why, informational)
        if value not in (PRESENT, ABSENT):
            raise ReportReadError(
                f"finding group {label!r}: decision must be Present, Absent or Not applicable, got {value}"
            )
        return cls(str(label), float(probabilities[0].value), float(threshold), method, value == PRESENT,
                   informational=informational)


@dataclass(frozen=True)
class NotAnalysedResult:
    """An image that passed the chest filter but was not analysed, and why (TID 1501 group + report level).

    Attributes:
        reason: the stated reason, without the :data:`NOT_ANALYSED_PREFIX` (scrubbed by the caller).
    """

    reason: str

    @property
    def text(self) -> str:
        return f"{NOT_ANALYSED_PREFIX}{self.reason}"[:MAX_TEXT_CHARS]

    def to_group(self, context: GroupContext, tracking_uid: str) -> MeasurementsAndQualitativeEvaluations:
        """TID 1501: finding type NOT_ANALYSED, the algorithm and the source image; no evaluation."""
        return context.group("Not analysed", tracking_uid, NOT_ANALYSED)

    def to_evaluations(self) -> list[Evaluation]:
        """The report-level statement (TID 1500 row 14): TEXT NOT_ANALYSED_WHY."""
        return [TextContentItem(name=NOT_ANALYSED_REASON, value=self.text,
                                relationship_type=RelationshipTypeValues.CONTAINS)]

    @classmethod
    def from_report(cls, report: MeasurementReport) -> NotAnalysedResult | None:
        """The statement of a not-analysed report, or None when the report has no NOT_ANALYSED group."""
        if not report.get_image_measurement_groups(finding_type=NOT_ANALYSED):
            return None
        texts = [str(i.TextValue) for i in _report_evaluations(report, NOT_ANALYSED_REASON, ValueTypeValues.TEXT)]
        if len(texts) != 1:
            raise ReportReadError(f"a not-analysed report must state one reason, got {len(texts)}")
        text = texts[0]
        return cls(text[len(NOT_ANALYSED_PREFIX):] if text.startswith(NOT_ANALYSED_PREFIX) else text)


@dataclass(frozen=True)
class TriageResult:
    """The overall triage flag of an analysed image: positive when any finding that is not informational is at or
    above its threshold."""

    positive: bool

    @classmethod
    def of(cls, findings: Sequence[FindingResult]) -> TriageResult:
        return cls(any(f.flags for f in findings))

    def to_evaluations(self) -> list[Evaluation]:
        """The report-level evaluation (TID 1500 row 13): CODE TRIAGE = Positive/Negative."""
        flag = codes.SCT.Positive if self.positive else codes.SCT.Negative
        return [CodeContentItem(name=TRIAGE_FLAG, value=flag, relationship_type=RelationshipTypeValues.CONTAINS)]

    @classmethod
    def from_report(cls, report: MeasurementReport) -> TriageResult | None:
        """The flag of a report, or None when it has none (a not-analysed report)."""
        items = _report_evaluations(report, TRIAGE_FLAG, ValueTypeValues.CODE)
        if not items:
            return None
        if len(items) > 1:
            raise ReportReadError(f"a report must hold at most one triage flag, got {len(items)}")
        value = items[0].value
        if value not in (codes.SCT.Positive, codes.SCT.Negative):
            raise ReportReadError(f"the triage flag must be Positive or Negative, got {value}")
        return cls(value == codes.SCT.Positive)


def evaluations_container(items: Sequence[Evaluation]) -> ContainerContentItem:
    """TID 1500 row 12: the container of the report-level qualitative evaluations."""
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = ContentSequence(items)
    return container


def measurement_report(
    observation_context: ObservationContext,
    groups: Sequence[MeasurementsAndQualitativeEvaluations],
    evaluations: Sequence[Evaluation],
) -> MeasurementReport:
    """TID 1500: observer, the procedure reported (once), the groups, then the report-level evaluations."""
    report = MeasurementReport(
        observation_context=observation_context,
        procedure_reported=[PROCEDURE_REPORTED],
        imaging_measurements=list(groups),
    )
    if evaluations:
        report[0].ContentSequence.append(evaluations_container(evaluations))
    return report


@dataclass(frozen=True)
class ReportContent:
    """What one of our SRs says, read back (:func:`read_report`).

    Attributes:
        algorithm: name and version of the model package (from the first group's TID 4019).
        procedures: the Procedure reported codes.
        findings: one per label, in the report's order (empty when not analysed).
        triage: the overall flag, or None when not analysed.
        not_analysed: the statement of a not-analysed report, or None.
        source_sop_instance_uids: the images the groups reference, in order, without repeats.
    """

    algorithm: AlgorithmRef
    procedures: tuple[CodedConcept, ...]
    findings: tuple[FindingResult, ...]
    triage: TriageResult | None
    not_analysed: NotAnalysedResult | None
    source_sop_instance_uids: tuple[str, ...]

    @property
    def analysed(self) -> bool:
        return self.not_analysed is None

    def finding(self, label: str) -> FindingResult:
        """The result of ``label``; KeyError when the report has none."""
        for result in self.findings:
            if result.label == label:
                return result
        raise KeyError(f"the report has no finding {label!r}; it has {[f.label for f in self.findings]}")


def report_of(ds: Dataset) -> MeasurementReport:
    """The TID 1500 content tree of an SR document, as highdicom's template (a copy; ``ds`` is unchanged)."""
    templates = ds.get("ContentTemplateSequence") or []
    if not templates or str(templates[0].get("TemplateIdentifier", "")) != "1500":
        raise ReportReadError(f"SR {ds.get('SOPInstanceUID', '?')} is not a TID 1500 report")
    root = Dataset()
    for keyword in ("ValueType", "ConceptNameCodeSequence", "ContinuityOfContent", "ContentTemplateSequence",
                    "ContentSequence"):
        if keyword in ds:
            setattr(root, keyword, ds[keyword].value)
    return MeasurementReport.from_sequence([root], copy=True)


def read_report(ds: Dataset) -> ReportContent:
    """Read one of our SRs (88.34 or the 88.33 fallback) back through the classes that wrote it.

    Raises:
        ReportReadError: not a TID 1500 report, or a part of it that does not read as this module writes it.
    """
    report = report_of(ds)
    groups = report.get_image_measurement_groups()
    if not groups:
        raise ReportReadError("a report must hold at least one measurement group")
    procedures = tuple(
        item.value for item in find_content_items(report[0], name=codes.DCM.ProcedureReported)
    )
    not_analysed = NotAnalysedResult.from_report(report)
    findings = () if not_analysed else tuple(FindingResult.from_group(g) for g in groups)
    sources: list[str] = []
    for group in groups:
        for image in group.source_images:
            uid = str(image.referenced_sop_instance_uid)
            if uid not in sources:
                sources.append(uid)
    first = AlgorithmRef.from_group(groups[0][0])
    return ReportContent(
        algorithm=AlgorithmRef(first.name, first.version),
        procedures=procedures,
        findings=findings,
        triage=TriageResult.from_report(report),
        not_analysed=not_analysed,
        source_sop_instance_uids=tuple(sources),
    )


def _report_evaluations(report: MeasurementReport, name: Code, value_type: ValueTypeValues) -> list[Dataset]:
    """The items named ``name`` in the report-level Qualitative Evaluations container (TID 1500 row 12)."""
    containers = find_content_items(report[0], name=QUALITATIVE_EVALUATIONS, value_type=ValueTypeValues.CONTAINER)
    if len(containers) > 1:
        raise ReportReadError(f"a report must hold one Qualitative Evaluations container, got {len(containers)}")
    if not containers or "ContentSequence" not in containers[0]:
        return []
    return list(find_content_items(containers[0], name=name, value_type=value_type))


def _texts(item: Dataset, name: Code) -> list[str]:
    """TextValue of the TEXT items named ``name`` directly under ``item``."""
    if "ContentSequence" not in item:
        return []
    return [str(i.TextValue) for i in find_content_items(item, name=name, value_type=ValueTypeValues.TEXT)]
