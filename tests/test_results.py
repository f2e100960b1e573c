"""Results step: SR (TID 1500), failure SR and SC overlay, by round trip and by dciodvfy on real sources."""

from __future__ import annotations

import copy
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, RLELossless

from ai.findings import Finding
from node.dicom_hygiene import (
    repair_age,
    repair_date,
    repair_person_name,
    repair_time,
    sanitize_patient_study,
)
from node.report import (
    NOT_ANALYSED,
    NOT_ANALYSED_REASON,
    PRESENT,
    PROCEDURE_REPORTED,
    TRIAGE_FLAG,
    AlgorithmRef,
    FindingResult,
    GroupContext,
    NotAnalysedResult,
    ReportReadError,
    TriageResult,
    finding_code,
    read_report,
)
from node.results import (
    SERIES_DESCRIPTION_PREFIX,
    AlgorithmInfo,
    ResultBuildError,
    as_comprehensive_sr,
    build_failure_sr,
    build_not_analysed_overlay,
    build_overlay,
    build_sr,
    device_uid,
    render_overlay,
    result_uid,
)
from tests.conftest import require_tool
from training.labels import NIH_FINDINGS

# The files listed in shared/data/dicom/files.csv; test_every_shared_file_is_covered keeps this honest.
SHARED_FILES = (
    "rsna_cr_pa_jpeg_baseline.dcm",
    "rsna_cr_pa_monochrome1_variant.dcm",
    "dx_pa_chest_j2k_lossless.dcm",
    "cr_pa_chest_jpegls_near_lossless.dcm",
    "cr_chest_monochrome1_jpeg_no_view_tags.dcm",
    "dx_thorax_canine_not_human.dcm",
    "rsna_cr_ap_jpeg_baseline.dcm",
)
SOURCES = (*SHARED_FILES, "RG1_UNCR.dcm")
NIH14 = NIH_FINDINGS
ALGORITHM = AlgorithmInfo(name="cxr-nih14", version="1.2.0")
METHOD = "Youden J on OOF"


def load_source(name: str, data_dir: Path | None = None) -> Dataset:
    """A real source without its pixel data (results never need it); RG1 comes from pydicom-data."""
    if name == "RG1_UNCR.dcm":
        path = Path(get_testdata_file(name))
    else:
        assert data_dir is not None
        path = data_dir / "dicom" / name
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> Dataset:
    if request.param == "RG1_UNCR.dcm":
        return load_source(request.param)
    return load_source(request.param, request.getfixturevalue("data_dir"))


def finding(label: str, probability: float, threshold: float = 0.43) -> Finding:
    return Finding(label, probability, threshold, probability >= threshold, METHOD)


def nih_findings() -> list[Finding]:
    """14 labels, probabilities 0.05 ... 0.95: the first six negative, the rest positive at 0.43."""
    return [finding(label, float(p)) for label, p in zip(NIH14, np.linspace(0.05, 0.95, 14), strict=True)]


def shape_of(ds: Dataset) -> tuple[int, int]:
    return int(ds.Rows), int(ds.Columns)


def blob_heatmap(shape: tuple[int, int], centre: tuple[float, float] = (0.35, 0.3)) -> np.ndarray:
    """A smooth map like a sigmoid CAM: one peak at ``centre`` (fractions of rows, columns), low elsewhere."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    d2 = ((rows / shape[0] - centre[0]) ** 2 + (cols / shape[1] - centre[1]) ** 2) / 0.1**2
    return (1.0 / (1.0 + np.exp(-(8.0 * np.exp(-d2) - 2.0)))).astype(np.float32)


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_lines(path: Path) -> list[str]:
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warn"))]


def all_objects(ds: Dataset) -> dict[str, Dataset]:
    shape = shape_of(ds)
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    findings = nih_findings()
    heatmaps = {f.label: blob_heatmap(shape, (0.2 + 0.04 * i, 0.3)) for i, f in enumerate(findings)}
    return {
        "sr-1-positive": build_sr(ds, [finding("Tuberculosis", 0.9)], ALGORITHM, device_ae="CXRNODE"),
        "sr-1-negative": build_sr(ds, [finding("Tuberculosis", 0.1)], ALGORITHM, device_ae="CXRNODE"),
        "sr-14": build_sr(ds, findings, ALGORITHM, device_ae="CXRNODE"),
        "sr-14-comprehensive": build_sr(
            ds, findings, ALGORITHM, device_ae="CXRNODE", sr_class="comprehensive"
        ),
        "failure-sr": build_failure_sr(ds, "field not found", ALGORITHM, device_ae="CXRNODE"),
        "overlay": build_overlay(ds, image, findings, ALGORITHM, heatmaps, device_ae="CXRNODE"),
        "overlay-1-positive": build_overlay(
            ds, image, [finding("Tuberculosis", 0.9)], ALGORITHM, {"Tuberculosis": heatmaps["Hernia"]}
        ),
        "overlay-not-analysed": build_not_analysed_overlay(
            ds, image, "image is not a frontal chest radiograph (p = 0.03)", ALGORITHM, device_ae="CXRNODE"
        ),
        "overlay-not-analysed-no-pixels": build_not_analysed_overlay(ds, None, "pixel data could not be decoded",
                                                                     ALGORITHM),
    }


def texts(item: Dataset, code: pydicom.sr.coding.Code) -> list[str]:
    found = hd.sr.utils.find_content_items(item, name=code, value_type="TEXT", recursive=True)
    return [str(i.TextValue) for i in found]


# --- the shared data is covered -----------------------------------------------------------------


@pytest.mark.shared_data
def test_every_shared_file_is_covered(data_dir: Path) -> None:
    assert sorted(p.name for p in (data_dir / "dicom").glob("*.dcm")) == sorted(SHARED_FILES)


# --- dciodvfy -------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.shared_data
def test_every_object_passes_dciodvfy(source: Dataset, tmp_path: Path) -> None:
    require_tool("dciodvfy")
    for kind, ds in all_objects(source).items():
        lines = dciodvfy_lines(write(ds, tmp_path / f"{kind}.dcm"))
        errors = [line for line in lines if line.startswith("Error")]
        assert errors == [], f"{kind}: {errors}"


def broken_source() -> Dataset:
    """RG1 with the invalid values real files carry, some under a wrong VR."""
    ds = load_source("RG1_UNCR.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientAge = "62"
        ds.PatientName = "A" * 120 + "^" + "B" * 79
        ds.StudyDate = "2020-13-45"
        ds.StudyTime = "25:99"
        ds.PatientBirthDate = "d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f"
        ds.AccessionNumber = "d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f"
        ds.PatientSex = "male"
        ds.StudyDescription = "Thorax ü " + "x" * 100
        ds.ReferringPhysicianName = "ward"
        ds[0x00101020] = DataElement(0x00101020, "LO", "1.75 m")  # PatientSize, wrong VR and unit
        ds[0x00200010] = DataElement(0x00200010, "LO", "STUDY\x01ID")  # StudyID with a control char
    return ds


def test_broken_source_is_repaired_or_dropped() -> None:
    clean = sanitize_patient_study(broken_source())
    assert clean.PatientAge == "062Y"
    assert clean.StudyDate in (None, "")
    assert clean.StudyTime in (None, "")
    assert clean.PatientBirthDate in (None, "")
    assert clean.AccessionNumber in (None, "")
    assert clean.PatientSex in (None, "")
    assert len(clean.StudyDescription.encode()) <= 64 and clean.SpecificCharacterSet == "ISO_IR 192"
    assert str(clean.ReferringPhysicianName) == "ward^"
    assert str(clean.StudyID) == "STUDYID"
    assert "PatientSize" not in clean
    groups = str(clean.PatientName).split("=")
    assert all(len(g.encode()) <= 64 for g in groups) and groups[0].startswith("A" * 60)


@pytest.mark.integration
def test_broken_source_still_gives_dciodvfy_clean_objects(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    for kind, ds in all_objects(broken_source()).items():
        assert ds.PatientAge == "062Y"
        errors = [x for x in dciodvfy_lines(write(ds, tmp_path / f"{kind}.dcm")) if x.startswith("Error")]
        assert errors == [], f"{kind}: {errors}"


# --- SR content by round trip ---------------------------------------------------------------------


def read_back(ds: Dataset, tmp_path: Path, name: str = "sr.dcm") -> Dataset:
    return pydicom.dcmread(write(ds, tmp_path / name))


def expected(f: Finding) -> FindingResult:
    """What the SR states of ``f``: the threshold with 6 significant digits."""
    return FindingResult(f.label, f.probability, float(f"{f.threshold:.6g}"), f.threshold_method, f.positive)


def check_document(sr: Dataset, source: Dataset) -> None:
    """The document attributes every SR of ours has, whatever it reports."""
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesDescription.startswith(SERIES_DESCRIPTION_PREFIX)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    (evidence,) = hd.sr.Comprehensive3DSR.from_dataset(sr).get_evidence()
    assert evidence == (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID, source.SOPClassUID)
    equipment = sr.ContributingEquipmentSequence[0]
    assert (equipment.Manufacturer, equipment.ManufacturerModelName, equipment.SoftwareVersions) == (
        "cxr-node", "cxr-nih14", "1.2.0")
    assert equipment.DeviceUID == device_uid(ALGORITHM)
    (purpose,) = equipment.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")  # Processing Equipment
    report = read_report(sr)
    assert report.algorithm == AlgorithmRef("cxr-nih14", "1.2.0")
    assert report.procedures == (PROCEDURE_REPORTED,)  # once, from CID 100
    assert report.source_sop_instance_uids == (source.SOPInstanceUID,)
    manufacturer = hd.sr.utils.find_content_items(sr, name=codes.DCM.AlgorithmManufacturer, recursive=True)
    assert manufacturer == []  # not a TID 4019 item: the manufacturer is in the Contributing Equipment


@pytest.mark.shared_data
def test_sr_round_trip_states_every_finding(source: Dataset, tmp_path: Path) -> None:
    findings = nih_findings()
    sr = read_back(build_sr(source, findings, ALGORITHM, device_ae="CXRNODE"), tmp_path)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert (sr.Manufacturer, sr.SoftwareVersions, sr.StationName) == ("cxr-node", "1.2.0", "CXRNODE")
    check_document(sr, source)
    report = read_report(sr)
    assert report.analysed and report.not_analysed is None
    assert report.findings == tuple(expected(f) for f in findings)
    assert report.triage == TriageResult(positive=True)
    device = hd.sr.srread(tmp_path / "sr.dcm").content.get_observer_contexts()[0].observer_identifying_attributes
    assert (device.uid, device.name, device.model_name, device.manufacturer_name) == (
        device_uid(ALGORITHM), "cxr-nih14", "cxr-nih14 1.2.0", "cxr-node")


def test_each_finding_group_holds_probability_decision_and_algorithm(tmp_path: Path) -> None:
    """The TID 1501 group as a PACS viewer sees it, item by item (what FindingResult reads back)."""
    source = load_source("RG1_UNCR.dcm")
    f = finding("Tuberculosis", 0.7)
    sr = hd.sr.srread(write(build_sr(source, [f], ALGORITHM, device_ae="CXRNODE"), tmp_path / "sr.dcm"))
    (group,) = sr.content.get_image_measurement_groups(finding_type=finding_code(f.label))
    assert (group.tracking_identifier, group.finding_type) == (f.label, Code("56717001", "SCT", "Tuberculosis"))
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    assert (probability.value, probability.unit) == (pytest.approx(0.7), codes.UCUM.NoUnits)
    (decision,) = group.get_qualitative_evaluations()
    assert (decision.name, decision.value) == (finding_code(f.label), PRESENT)
    assert texts(group[0], codes.DCM.AlgorithmParameters) == ["threshold=0.43", f"threshold_method={METHOD}"]
    assert texts(group[0], codes.DCM.AlgorithmName) == ["cxr-nih14"]
    assert texts(group[0], codes.DCM.AlgorithmVersion) == ["1.2.0"]
    (image,) = group.source_images
    assert (image.referenced_sop_class_uid, image.referenced_sop_instance_uid) == (
        source.SOPClassUID, source.SOPInstanceUID)
    (flag,) = hd.sr.utils.find_content_items(sr.content[0], name=TRIAGE_FLAG, recursive=True)
    assert flag.value == codes.SCT.Positive  # at report level (TID 1500 row 13), not in a group
    assert [g.tracking_identifier for g in sr.content.get_image_measurement_groups()] == [f.label]


@pytest.mark.parametrize("probability", [0.43, 0.4299999])
def test_decision_at_the_threshold(probability: float, tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    f = finding("Tuberculosis", probability)
    report = read_report(read_back(build_sr(source, [f], ALGORITHM, device_ae="CXRNODE"), tmp_path))
    assert report.finding("Tuberculosis") == expected(f)
    assert report.finding("Tuberculosis").positive is (probability >= 0.43)
    assert report.triage == TriageResult(positive=probability >= 0.43)


@pytest.mark.parametrize("probability", [0.0, 1.0, 0.123456789, 1e-12])
def test_finding_result_reads_back_what_it_wrote(probability: float) -> None:
    context = GroupContext("1.2.840.10008.5.1.4.1.1.1", "1.2.3.4", "cxr-nih14", "1.2.0")
    for label in (*NIH14, "Tuberculosis", "Support devices and other long label"):
        written = FindingResult(label, probability, 0.123456, "sensitivity 0.90 on OOF", probability >= 0.123456)
        group = written.to_group(context, "2.25.1")
        assert FindingResult.from_group(hd.sr.MeasurementsAndQualitativeEvaluations.from_sequence(group)) == written


def test_one_comprehensive_fallback_with_its_own_class_and_uid(tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    sr3d = build_sr(source, [finding("Pneumonia", 0.7)], ALGORITHM, device_ae="CXRNODE")
    sr = build_sr(
        source, [finding("Pneumonia", 0.7)], ALGORITHM, device_ae="CXRNODE", sr_class="comprehensive"
    )
    back = read_back(sr, tmp_path)
    assert back.SOPClassUID == ComprehensiveSRStorage
    assert back.SOPInstanceUID != sr3d.SOPInstanceUID
    assert back.SeriesInstanceUID == sr3d.SeriesInstanceUID
    assert read_report(back).findings == (expected(finding("Pneumonia", 0.7)),)
    fallback = read_back(as_comprehensive_sr(sr3d), tmp_path, "fallback.dcm")
    assert fallback.SOPClassUID == ComprehensiveSRStorage
    assert read_report(fallback) == read_report(sr3d)
    assert fallback.SOPInstanceUID == back.SOPInstanceUID  # one fallback: the object the outbox sends


def test_failure_sr_says_why(tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    sr = read_back(build_failure_sr(source, "field not found", ALGORITHM), tmp_path)
    check_document(sr, source)
    report = read_report(sr)
    assert not report.analysed and report.not_analysed == NotAnalysedResult("field not found")
    assert report.findings == () and report.triage is None
    (group,) = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()
    assert group.finding_type == NOT_ANALYSED
    (text,) = hd.sr.utils.find_content_items(sr, name=NOT_ANALYSED_REASON, recursive=True)
    assert text.TextValue == "Passed the chest filter but could not be analysed: field not found"
    assert read_report(read_back(as_comprehensive_sr(sr), tmp_path, "fallback.dcm")) == report


def test_read_report_refuses_an_sr_that_is_not_ours() -> None:
    other = Dataset()
    other.SOPInstanceUID, other.ValueType, other.ContinuityOfContent = "1.2.3", "CONTAINER", "SEPARATE"
    other.ContentSequence = []
    with pytest.raises(ReportReadError, match="not a TID 1500 report"):
        read_report(other)


# --- UIDs -----------------------------------------------------------------------------------------


def test_device_uid_changes_with_the_model_version() -> None:
    uid = device_uid(ALGORITHM)
    assert uid == device_uid(AlgorithmInfo("cxr-nih14", "1.2.0", manufacturer="other"))
    assert uid != device_uid(AlgorithmInfo("cxr-nih14", "1.3.0")) and uid != device_uid(AlgorithmInfo("cxr", "1.2.0"))
    assert uid.startswith("2.25.") and len(uid) <= 64


def leading_zero_source() -> Dataset:
    """RG1 with UIDs that break only PS3.5 9.1's leading-zero rule (the intake refuses them at C-STORE)."""
    source = load_source("RG1_UNCR.dcm")
    source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID = "1.2.040.5", "1.2.3.06", "1.02.003.4"
    return source


@pytest.mark.parametrize("kind", ["sr", "failure-sr"])
def test_leading_zero_source_uids_are_referenced_verbatim(kind: str, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI values it is asked to write
        source = leading_zero_source()
        built = (build_sr(source, [finding("Mass", 0.7)], ALGORITHM, device_ae="CXRNODE") if kind == "sr"
                 else build_failure_sr(source, "decode failed", ALGORITHM))
        sr = read_back(built, tmp_path)
        check_document(sr, source)  # study, evidence (study, series, instance) and the group's image: verbatim


def test_uids_are_deterministic_per_source_version_and_kind() -> None:
    source = load_source("RG1_UNCR.dcm")
    fs = [finding("Tuberculosis", 0.2)]
    first = build_sr(source, fs, ALGORITHM, device_ae="CXRNODE")
    again = build_sr(copy.deepcopy(source), fs, ALGORITHM, device_ae="CXRNODE")
    other = build_sr(source, fs, AlgorithmInfo("cxr-nih14", "1.3.0"), device_ae="CXRNODE")
    failure = build_failure_sr(source, "decode failed", ALGORITHM)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert failure.SOPInstanceUID != first.SOPInstanceUID
    assert failure.SeriesInstanceUID == first.SeriesInstanceUID
    uid = result_uid(source.SOPInstanceUID, "1.2.0", "sr", algorithm_name="cxr-nih14")
    assert first.SOPInstanceUID == uid and len(uid) <= 64 and uid.startswith("2.25.")
    assert result_uid("1.2.3", "1.2.0", "sr") != result_uid("1.2.3", "1.2.0", "overlay")


# --- overlay --------------------------------------------------------------------------------------


def gradient(shape: tuple[int, int]) -> np.ndarray:
    rows = np.linspace(0.0, 1.0, shape[0], dtype=np.float32)[:, None]
    return np.broadcast_to(rows, shape).copy()


def coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not gray (R, G, B not all equal)."""
    return (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])


def test_negative_result_draws_no_heat() -> None:
    shape = (1024, 900)
    image = gradient(shape)
    fs = [finding(label, 0.1) for label in NIH14]
    heat = {f.label: np.ones(shape, np.float32) for f in fs}
    rgb, top, scale = render_overlay(image, fs, ALGORITHM, heat)
    assert scale == 1.0 and rgb.shape == (top + shape[0], shape[1], 3)
    below = rgb[top:]
    assert not coloured(below).any()
    np.testing.assert_array_equal(below[..., 0], np.round(image * 255).astype(np.uint8))


def test_large_source_is_downscaled_to_1024() -> None:
    shape = (3000, 2400)
    rgb, top, scale = render_overlay(np.zeros(shape, np.float32), [finding("Mass", 0.9)], ALGORITHM, {})
    assert scale == pytest.approx(1024 / 3000)
    assert max(rgb.shape[0] - top, rgb.shape[1]) == 1024


def test_overlay_dataset(tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    shape = shape_of(source)
    fs = [finding("Pneumonia", 0.9), finding("Tuberculosis", 0.1)]
    heat = {"Pneumonia": blob_heatmap(shape)}
    image = gradient(shape)
    sc = pydicom.dcmread(write(build_overlay(source, image, fs, ALGORITHM, heat), tmp_path / "sc.dcm"))
    expected, top, _ = render_overlay(image, fs, ALGORITHM, heat)
    assert coloured(expected[top:]).any()  # the outline is there to be compared
    shown = sc.pixel_array  # YBR_FULL converted back to RGB: coloured pixels within 1, gray ones exact
    np.testing.assert_allclose(shown.astype(int), expected.astype(int), atol=1, rtol=0)
    gray = ~coloured(expected)
    np.testing.assert_array_equal(shown[gray], expected[gray])
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("YBR_FULL", 3, 8)
    assert sc.file_meta.TransferSyntaxUID == RLELossless
    assert sc.BurnedInAnnotation == "YES"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesDescription.startswith(SERIES_DESCRIPTION_PREFIX)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in sc.DerivationDescription
    assert "Pneumonia" in sc.DerivationDescription and "Tuberculosis" not in sc.DerivationDescription
    uid = result_uid(source.SOPInstanceUID, "1.2.0", "overlay", algorithm_name="cxr-nih14")
    assert sc.SOPInstanceUID == uid


@pytest.mark.parametrize("with_pixels", [True, False])
def test_not_analysed_overlay_dataset(with_pixels: bool, tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    image = gradient(shape_of(source)) if with_pixels else None
    reason = "image is not a frontal chest radiograph (p = 0.03)"
    built = build_not_analysed_overlay(source, image, reason, ALGORITHM, device_ae="CXRNODE")
    sc = pydicom.dcmread(write(built, tmp_path / "na.dcm"))
    overlay = build_overlay(source, gradient(shape_of(source)), [finding("Mass", 0.1)], ALGORITHM, {})
    assert sc.SOPInstanceUID != overlay.SOPInstanceUID and sc.SeriesInstanceUID == overlay.SeriesInstanceUID
    assert sc.SOPInstanceUID == result_uid(
        source.SOPInstanceUID, "1.2.0", "overlay-not-analysed", algorithm_name="cxr-nih14"
    )
    assert sc.SeriesDescription.startswith(SERIES_DESCRIPTION_PREFIX) and sc.StationName == "CXRNODE"
    assert f"NOT ANALYSED by the AI model: {reason}" in sc.DerivationDescription
    assert "NOT FOR DIAGNOSTIC USE" in sc.DerivationDescription
    assert ("Source image" in sc.DerivationDescription) is with_pixels
    assert sc.file_meta.TransferSyntaxUID == RLELossless and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert max(sc.Rows, sc.Columns) >= 768 and sc.Columns <= 1024


def test_not_analysed_overlay_refuses_an_image_that_is_not_2d() -> None:
    with pytest.raises(ResultBuildError, match="image must be a 2-D"):
        build_not_analysed_overlay(load_source("RG1_UNCR.dcm"), np.zeros((4, 64, 64)), "x", ALGORITHM)


def test_overlay_rejects_a_heatmap_of_the_wrong_shape() -> None:
    with pytest.raises(ResultBuildError, match=r"heatmap of 'Mass' must have the source image's shape"):
        render_overlay(np.zeros((64, 64)), [finding("Mass", 0.9)], ALGORITHM, {"Mass": np.zeros((32, 32))})


# --- inputs that cannot make a result -------------------------------------------------------------


@pytest.mark.parametrize(
    ("findings", "message"),
    [
        ([], "at least one finding"),
        ([finding("Mass", 0.5), finding("Mass", 0.6)], "unique"),
        ([Finding("Mass", 1.5, 0.4, True, METHOD)], r"probability must be in \[0, 1\]"),
        ([Finding("Mass", 0.5, 0.4, False, METHOD)], "positive must equal probability >= threshold"),
    ],
)
def test_bad_findings_are_refused(findings: list[Finding], message: str) -> None:
    with pytest.raises(ResultBuildError, match=message):
        build_sr(load_source("RG1_UNCR.dcm"), findings, ALGORITHM, device_ae="CXRNODE")


def test_missing_study_uid_gets_a_derived_one() -> None:
    source = load_source("RG1_UNCR.dcm")
    del source.StudyInstanceUID
    sr = build_failure_sr(source, "decode failed", ALGORITHM)
    again = build_failure_sr(copy.deepcopy(source), "decode failed", ALGORITHM)
    assert sr.StudyInstanceUID.startswith("2.25.") and sr.StudyInstanceUID == again.StudyInstanceUID


def test_algorithm_info_is_validated() -> None:
    with pytest.raises(ValueError, match=r"AlgorithmInfo\.version must be 1-64 printable"):
        AlgorithmInfo("cxr", "")


# --- codes and repairs ----------------------------------------------------------------------------


def test_finding_codes() -> None:
    standard = {f: finding_code(f) for f in (*NIH14, "Tuberculosis")}
    assert standard["Tuberculosis"].value == "56717001"
    assert standard["Pneumonia"].value == "233604007"
    assert standard["Effusion"].value == "60046008"
    private = {label for label, code in standard.items() if code.scheme_designator == "99CXR"}
    assert private == {"Pleural_Thickening", "Hernia"}
    pediatric = finding_code("Pediatric_Pneumonia")  # never the same code as NIH's adult Pneumonia
    assert (pediatric.value, pediatric.scheme_designator) == ("PED_PNEUMONIA", "99CXR")
    unknown = finding_code("Support devices and other long label")
    assert unknown.scheme_designator == "99CXR" and len(unknown.value) <= 16


@pytest.mark.parametrize(
    ("raw", "age"), [("62", "062Y"), ("062Y", "062Y"), ("5 M", "005M"), ("62 years", None), ("999", None)]
)
def test_repair_age(raw: str, age: str | None) -> None:
    assert repair_age(raw) == age


@pytest.mark.parametrize(
    ("raw", "date"), [("20200102", "20200102"), ("2020-01-02", "20200102"), ("2020-13-45", None), ("", None)]
)
def test_repair_date(raw: str, date: str | None) -> None:
    assert repair_date(raw) == date


@pytest.mark.parametrize(
    ("raw", "time"), [("000000.00", "000000.00"), ("12:30:05", "123005"), ("25:99", None)]
)
def test_repair_time(raw: str, time: str | None) -> None:
    assert repair_time(raw) == time


def test_repair_person_name() -> None:
    assert repair_person_name("Doe^John") == "Doe^John"
    assert repair_person_name("anonymous") == "anonymous^"
    assert len(repair_person_name("Ä" * 100).encode()) <= 64


def test_non_ascii_names_are_sent_as_utf8() -> None:
    source = load_source("RG1_UNCR.dcm")
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "Müller^Jürgen"
    clean = sanitize_patient_study(source)
    assert clean.SpecificCharacterSet == "ISO_IR 192" and str(clean.PatientName) == "Müller^Jürgen"


def test_unknown_source_sop_class_is_refused() -> None:
    source = load_source("RG1_UNCR.dcm")
    source.SOPClassUID = "1.2.3.4.5"
    with pytest.raises(ResultBuildError, match="standard storage class known to highdicom"):
        build_sr(source, [finding("Mass", 0.1)], ALGORITHM, device_ae="CXRNODE")


@pytest.mark.parametrize(("syntax", "lossy"), [
    ("1.2.840.10008.1.2.1", False),  # explicit VR little endian: uncompressed
    ("1.2.840.10008.1.2.4.50", True),  # JPEG baseline
    ("1.2.840.10008.1.2.4.70", False),  # JPEG lossless SV1
    ("1.2.840.10008.1.2.4.81", True),  # JPEG-LS near-lossless
    ("1.2.840.10008.1.2.4.90", False),  # JPEG 2000 lossless only
    ("1.2.840.10008.1.2.4.91", True),  # JPEG 2000 (may be lossy)
    ("1.2.840.10008.1.2.4.201", False),  # HTJ2K lossless
    ("1.2.840.10008.1.2.4.202", False),  # HTJ2K lossless RPCL
    ("1.2.840.10008.1.2.4.203", True),  # HTJ2K (may be lossy)
    ("1.2.840.10008.1.2.5", False),  # RLE lossless
])
def test_the_overlay_of_a_lossy_source_says_so(syntax: str, lossy: bool) -> None:
    source = load_source("RG1_UNCR.dcm")
    source.file_meta.TransferSyntaxUID = syntax
    source.pop("LossyImageCompression", None)
    sc = build_overlay(source, gradient(shape_of(source)), [finding("Tuberculosis", 0.1)], ALGORITHM, {})
    assert (sc.get("LossyImageCompression") == "01") is lossy
