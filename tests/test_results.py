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
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, RLELossless

from ai.findings import Finding
from node.dicom_hygiene import (
    repair_age,
    repair_date,
    repair_person_name,
    repair_time,
    sanitize_patient_study,
)
from node.results import (
    ABSENT,
    NOT_ANALYSED,
    NOT_ANALYSED_REASON,
    PRESENT,
    SERIES_DESCRIPTION_PREFIX,
    TRIAGE_FLAG,
    AlgorithmInfo,
    ResultBuildError,
    build_failure_sr,
    build_overlay,
    build_sr,
    finding_code,
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


def square_heatmap(shape: tuple[int, int]) -> np.ndarray:
    """1 inside the square [h/4, h/2) x [w/4, w/2), 0 elsewhere."""
    heat = np.zeros(shape, dtype=np.float32)
    heat[shape[0] // 4 : shape[0] // 2, shape[1] // 4 : shape[1] // 2] = 1.0
    return heat


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
    heatmaps = {f.label: square_heatmap(shape) for f in findings}
    return {
        "sr-1-positive": build_sr(ds, [finding("Tuberculosis", 0.9)], ALGORITHM, device_ae="CXRNODE"),
        "sr-1-negative": build_sr(ds, [finding("Tuberculosis", 0.1)], ALGORITHM, device_ae="CXRNODE"),
        "sr-14": build_sr(ds, findings, ALGORITHM, device_ae="CXRNODE"),
        "sr-14-comprehensive": build_sr(
            ds, findings, ALGORITHM, device_ae="CXRNODE", sr_class="comprehensive"
        ),
        "failure-sr": build_failure_sr(ds, "field not found", ALGORITHM, device_ae="CXRNODE"),
        "overlay": build_overlay(ds, image, findings, ALGORITHM, heatmaps, device_ae="CXRNODE"),
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


def read_back(ds: Dataset, tmp_path: Path, name: str = "sr.dcm") -> hd.sr.Comprehensive3DSR:
    return hd.sr.srread(write(ds, tmp_path / name))


@pytest.mark.shared_data
def test_sr_round_trip_states_every_finding(source: Dataset, tmp_path: Path) -> None:
    findings = nih_findings()
    sr = read_back(build_sr(source, findings, ALGORITHM, device_ae="CXRNODE"), tmp_path)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesDescription.startswith(SERIES_DESCRIPTION_PREFIX)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert (sr.Manufacturer, sr.SoftwareVersions, sr.StationName) == ("cxr-node", "1.2.0", "CXRNODE")
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    assert list(groups) == [*NIH14, "Overall triage"]
    for f in findings:
        check_finding_group(groups[f.label], f, source)
    check_summary(sr, positive=True)
    device = sr.content.get_observer_contexts()[0].observer_identifying_attributes
    assert (device.name, device.model_name, device.manufacturer_name) == (
        "cxr-nih14",
        "cxr-nih14 1.2.0",
        "cxr-node",
    )


def only_group(sr: hd.sr.Comprehensive3DSR, label: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    (group,) = sr.content.get_image_measurement_groups(finding_type=finding_code(label))
    return group


def check_finding_group(
    group: hd.sr.MeasurementsAndQualitativeEvaluations, f: Finding, source: Dataset
) -> None:
    code = finding_code(f.label)
    assert (group.tracking_identifier, group.finding_type) == (f.label, code)
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(f.probability, abs=1e-9)
    assert probability.unit == codes.UCUM.NoUnits
    (decision,) = group.get_qualitative_evaluations(name=code)
    assert decision.value == (PRESENT if f.probability >= f.threshold else ABSENT)
    params = texts(group[0], codes.DCM.AlgorithmParameters)
    assert params == [f"threshold={f.threshold:g}", f"threshold_method={METHOD}"]
    assert texts(group[0], codes.DCM.AlgorithmVersion) == ["1.2.0"]
    assert texts(group[0], codes.DCM.AlgorithmName) == ["cxr-nih14"]
    (image,) = group.source_images
    assert image.referenced_sop_instance_uid == source.SOPInstanceUID
    assert image.referenced_sop_class_uid == source.SOPClassUID


def check_summary(sr: hd.sr.Comprehensive3DSR, positive: bool) -> None:
    (summary,) = sr.content.get_image_measurement_groups(finding_type=TRIAGE_FLAG)
    (flag,) = summary.get_qualitative_evaluations(name=TRIAGE_FLAG)
    assert flag.value == (codes.SCT.Positive if positive else codes.SCT.Negative)


@pytest.mark.parametrize("probability", [0.43, 0.4299999])
def test_decision_at_the_threshold(probability: float, tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    f = finding("Tuberculosis", probability)
    sr = read_back(build_sr(source, [f], ALGORITHM, device_ae="CXRNODE"), tmp_path)
    check_finding_group(only_group(sr, f.label), f, source)
    check_summary(sr, positive=probability >= 0.43)
    assert "threshold=0.43" in texts(sr.content[0], codes.DCM.AlgorithmParameters)


def test_comprehensive_fallback_has_its_own_class_and_uid(tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    sr3d = build_sr(source, [finding("Pneumonia", 0.7)], ALGORITHM, device_ae="CXRNODE")
    sr = build_sr(
        source, [finding("Pneumonia", 0.7)], ALGORITHM, device_ae="CXRNODE", sr_class="comprehensive"
    )
    back = read_back(sr, tmp_path)
    assert back.SOPClassUID == ComprehensiveSRStorage
    assert back.SOPInstanceUID != sr3d.SOPInstanceUID
    assert back.SeriesInstanceUID == sr3d.SeriesInstanceUID
    check_finding_group(only_group(back, "Pneumonia"), finding("Pneumonia", 0.7), source)


def test_failure_sr_says_why(tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    sr = read_back(build_failure_sr(source, "field not found", ALGORITHM), tmp_path)
    assert sr.SeriesDescription.startswith(SERIES_DESCRIPTION_PREFIX)
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type == NOT_ANALYSED
    (reason,) = texts(group[0], NOT_ANALYSED_REASON)
    assert "passed the chest filter" in reason.lower() and "field not found" in reason
    assert texts(group[0], codes.DCM.AlgorithmVersion) == ["1.2.0"]
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    assert sr.content.get_image_measurement_groups(finding_type=TRIAGE_FLAG) == []


# --- UIDs -----------------------------------------------------------------------------------------


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


def test_positive_heat_only_inside_its_map_and_banner_on_top() -> None:
    shape = (1000, 800)
    image = gradient(shape)
    fs = [finding("Pneumothorax", 0.8), finding("Mass", 0.2)]
    heat = {"Pneumothorax": square_heatmap(shape), "Mass": np.ones(shape, np.float32)}
    rgb, top, _ = render_overlay(image, fs, ALGORITHM, heat)
    below = rgb[top:]
    inside = square_heatmap(shape) > 0
    assert coloured(below)[inside].all()
    assert not coloured(below)[~inside].any()
    banner = rgb[:top]
    assert top > 0 and (banner.max(axis=2) > 200).sum() > 500  # text was drawn
    assert np.median(banner) < 40  # on a dark strip


def test_large_source_is_downscaled_to_1024() -> None:
    shape = (3000, 2400)
    rgb, top, scale = render_overlay(np.zeros(shape, np.float32), [finding("Mass", 0.9)], ALGORITHM, {})
    assert scale == pytest.approx(1024 / 3000)
    assert max(rgb.shape[0] - top, rgb.shape[1]) == 1024


def test_overlay_dataset(tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    shape = shape_of(source)
    fs = [finding("Pneumonia", 0.9), finding("Tuberculosis", 0.1)]
    heat = {"Pneumonia": square_heatmap(shape)}
    image = gradient(shape)
    sc = pydicom.dcmread(write(build_overlay(source, image, fs, ALGORITHM, heat), tmp_path / "sc.dcm"))
    expected, _, _ = render_overlay(image, fs, ALGORITHM, heat)
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
    uid = result_uid(source.SOPInstanceUID, "1.2.0", "overlay", algorithm_name="cxr-nih14")
    assert sc.SOPInstanceUID == uid


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
