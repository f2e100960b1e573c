"""Every SR the node makes passes both validators: PixelMed's DicomSRValidator (templates) and dciodvfy (IOD).

The SRs: analysed (one positive finding, one negative, the 14 NIH labels, a child-only label that does not
apply to an adult), not analysed (several reasons,
on RG1, on the hostile headers of ``tests/test_results_delivery.py`` and on hostile-suite sources that end
not analysed), and the Comprehensive SR (88.33) fallback copy of each kind that ``node.send`` makes for a
PACS that refuses 88.34. Each SR is validated once (a module fixture; PixelMed validates all of them in
one JVM); the tests then assert per SR.

What the validators still say, by design (the tests allow these warnings and no other message):

* PixelMed: ``Content Item not in template`` for each finding's decision, the CODE qualitative evaluation
  of TID 1501 (row 11 of the current standard): PixelMed's template tables (2022) have no qualitative
  evaluation rows in TID 1501. Its TID 1500 report-level rows 12-14 (the triage flag, the reason not
  analysed) are checked and pass.
* dciodvfy: the private coding scheme ``99CXR`` is not a defined term; Device UID (0018,1002) in the
  Contributing Equipment Sequence is not in its (2022) tables of the SOP Common Module, which the current
  standard has (Type 3), so the SOP class reads as "Standard Extended"; a Type 2 study attribute the
  source lacks is empty, which a DICOMDIR would miss.
* dciodvfy on a source whose UIDs have leading zeros (``1.02.003``): the SR references them verbatim,
  and dciodvfy refuses exactly those values (Study Instance UID, the evidence's Series Instance UID and
  Referenced SOP Instance UIDs); PixelMed does not check UID syntax.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from ai.applicability import apply_ages
from ai.findings import Finding
from ai.manifest import AgeRange
from node.report import read_report
from node.results import AlgorithmInfo, as_comprehensive_sr, build_failure_sr, build_sr
from tests.conftest import require_tool
from tests.hostile.images import BASE_SPECS, plant_markers, synthetic_image, uid
from tests.peers import pixelmed_many, require_pixelmed
from tests.test_results import dciodvfy_lines, leading_zero_source
from training.labels import NIH_FINDINGS

pytestmark = pytest.mark.integration

ALGORITHM = AlgorithmInfo(name="cxr-nih14", version="1.2.0")
METHOD = "Youden J on OOF"

#: Warnings the validators give on our SRs, each for a documented reason (module docstring).
PIXELMED_ALLOWED = (re.compile(r"^Warning: [\d.]+: .*/CONTAINER \(125007,DCM,\"Measurement Group\"\)/CODE \(.*\): "
                               r"Content Item not in template$"),)
DCIODVFY_ALLOWED = (
    re.compile(r"^Warning - Unrecognized defined term <99CXR> for value 1 of attribute <Coding Scheme Designator>$"),
    re.compile(r"^Warning - Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID\s*$"),
    re.compile(r"^Warning - Dicom dataset contains attributes not present in standard DICOM IOD - "
               r"this is a Standard Extended SOP Class$"),
    # A Type 2 study attribute the source lacks (or holds invalid) is present and empty in the SR.
    re.compile(r"^Warning - Missing attribute or value that would be needed to build DICOMDIR - "
               r"(Study ID|Study Date|Study Time|Patient ID)$"),
)


def rg1() -> Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)


def finding(label: str, probability: float, threshold: float = 0.43) -> Finding:
    return Finding(label, probability, threshold, probability >= threshold, METHOD)


def hostile_suite_source(variant: str, seed: int) -> Dataset:
    """A source as the hostile suite makes it (tests/hostile/cases.py), for a case that ends not analysed."""
    rng = random.Random(f"sr-conformance:{variant}:{seed}")
    ds = synthetic_image(BASE_SPECS[seed % len(BASE_SPECS)], rng)
    plant_markers(ds, 300_000 + seed)  # a case id of the suite's range (its birth dates are before 3000)
    if variant == "photometric":
        ds.PhotometricInterpretation = "XYZ"
    elif variant == "zero-rows":
        ds.Rows = 0
    elif variant == "bits":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 7, 7, 6
    elif variant == "pixels-absent":
        del ds.PixelData
    elif variant == "pdf":  # a non-image class (non_image): stored, and told not analysed
        keep = Dataset()
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyDate", "StudyTime"):
            if keyword in ds:
                keep[keyword] = ds[keyword]
        ds = keep
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.104.1", uid(rng)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = uid(rng), uid(rng), "DOC"
    return ds


@dataclass(frozen=True)
class Kind:
    """One SR to validate: how to build it, and whether its source carries UIDs dciodvfy refuses."""

    build: Callable[[], Dataset]
    source_uid_errors: bool = False


def _failure(source: Callable[[], Dataset], reason: str) -> Callable[[], Dataset]:
    return lambda: build_failure_sr(source(), reason, ALGORITHM, device_ae="CXRNODE")


def _hostile_header(case: str) -> Callable[[], Dataset]:
    def make() -> Dataset:
        from tests.test_results_delivery import hostile  # the hostile headers, kept in one place

        return hostile(rg1(), case)

    return make


KINDS: dict[str, Kind] = {
    "analysed-positive": Kind(lambda: build_sr(rg1(), [finding("Tuberculosis", 0.9)], ALGORITHM,
                                               device_ae="CXRNODE")),
    "analysed-negative": Kind(lambda: build_sr(rg1(), [finding("Tuberculosis", 0.1)], ALGORITHM,
                                               device_ae="CXRNODE")),
    "analysed-nih14": Kind(lambda: build_sr(rg1(), [finding(label, 0.05 + 0.07 * i)
                                                    for i, label in enumerate(NIH_FINDINGS)], ALGORITHM,
                                            device_ae="CXRNODE")),
    "analysed-child-label-not-applicable": Kind(lambda: build_sr(
        rg1(), apply_ages([finding("Tuberculosis", 0.9), finding("Pediatric_Pneumonia", 0.8)],
                          {"Pediatric_Pneumonia": AgeRange(1.0, 6.0, "children aged 1-5")}, 40.0),
        ALGORITHM, device_ae="CXRNODE")),
    "analysed-informational-positive": Kind(lambda: build_sr(
        rg1(), [finding("Tuberculosis", 0.1), replace(finding("Effusion", 0.7), informational=True)],
        ALGORITHM, device_ae="CXRNODE")),
    "not-analysed-field": Kind(_failure(rg1, "field not found")),
    "not-analysed-decode": Kind(_failure(rg1, "cannot decode pixel data: invalid literal for int() with base 10")),
    "not-analysed-everything-hostile": Kind(_failure(_hostile_header("everything"), "decode failed")),
    "not-analysed-name-binary": Kind(_failure(_hostile_header("name-binary"), "decode failed")),
    "not-analysed-uids-missing": Kind(_failure(_hostile_header("uids-missing"), "decode failed")),
    "not-analysed-unknown-sop-class": Kind(_failure(_hostile_header("unknown-sop-class"), "decode failed")),
    "not-analysed-photometric": Kind(_failure(lambda: hostile_suite_source("photometric", 1),
                                              "PhotometricInterpretation must be MONOCHROME1/2, got 'XYZ'")),
    "not-analysed-zero-rows": Kind(_failure(lambda: hostile_suite_source("zero-rows", 2),
                                            "Rows must be 1-16384, got 0")),
    "not-analysed-bits": Kind(_failure(lambda: hostile_suite_source("bits", 3), "BitsAllocated must be 8 or 16")),
    "not-analysed-no-pixels": Kind(_failure(lambda: hostile_suite_source("pixels-absent", 4),
                                            "the instance has no Pixel Data")),
    "not-analysed-pdf": Kind(_failure(lambda: hostile_suite_source("pdf", 5), "not an image")),
    "analysed-leading-zero-uids": Kind(lambda: build_sr(leading_zero_source(), [finding("Mass", 0.7)], ALGORITHM,
                                                        device_ae="CXRNODE"), source_uid_errors=True),
    "not-analysed-leading-zero-uids": Kind(_failure(leading_zero_source, "decode failed"), source_uid_errors=True),
}
#: The 88.33 fallback copy (node.send) of these kinds.
FALLBACK_OF = ("analysed-nih14", "analysed-negative", "not-analysed-field", "analysed-child-label-not-applicable",
               "analysed-informational-positive")
NAMES = [*KINDS, *(f"{name}-88.33" for name in FALLBACK_OF)]


@dataclass(frozen=True)
class Validated:
    path: Path
    pixelmed: list[str]
    dciodvfy: list[str]


def _build(name: str) -> Dataset:
    if name.endswith("-88.33"):
        return as_comprehensive_sr(_build(name.removesuffix("-88.33")))
    return KINDS[name].build()


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Validated]:
    """Every SR kind built, written and run through both validators (two files at a time)."""
    require_tool("dciodvfy")
    require_pixelmed()
    folder = tmp_path_factory.mktemp("sr-conformance")
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about the invalid values the hostile sources carry
        for name in NAMES:
            paths[name] = folder / f"{name}.dcm"
            _build(name).save_as(paths[name], enforce_file_format=True)
    pixelmed = pixelmed_many(list(paths.values()), folder)
    return {name: Validated(paths[name], pixelmed[paths[name]], dciodvfy_lines(paths[name])) for name in NAMES}


def _unexpected(lines: list[str], allowed: tuple[re.Pattern[str], ...]) -> list[str]:
    return [line for line in lines if not any(p.match(line) for p in allowed)]


@pytest.mark.parametrize("name", NAMES)
def test_pixelmed_finds_no_error(name: str, validated: dict[str, Validated]) -> None:
    lines = validated[name].pixelmed
    assert [line for line in lines if line.startswith("Error")] == [], name
    assert _unexpected(lines, PIXELMED_ALLOWED) == [], name


@pytest.mark.parametrize("name", NAMES)
def test_dciodvfy_finds_no_error(name: str, validated: dict[str, Validated]) -> None:
    lines = validated[name].dciodvfy
    base = name.removesuffix("-88.33")
    if KINDS[base].source_uid_errors:
        # The source's UIDs are copied verbatim (a result never rewrites a UID it references): dciodvfy
        # refuses their leading zeros where the SR carries them, and nothing else.
        leading_zero = re.compile(r"^Error - Value invalid for this VR - \((0x0020,0x000d|0x0020,0x000e|"
                                  r"0x0008,0x1155)\) UI .* - Leading zeroes in embedded numeric component\(s\)$")
        lines = [line for line in lines if not leading_zero.match(line)
                 and line != "Error - Dicom dataset contains invalid data values for Value Representations"]
    assert [line for line in lines if line.startswith("Error")] == [], name
    assert _unexpected(lines, DCIODVFY_ALLOWED) == [], name


@pytest.mark.parametrize("name", NAMES)
def test_every_validated_sr_reads_back(name: str, validated: dict[str, Validated]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the leading-zero UIDs copied from their source
        report = read_report(pydicom.dcmread(validated[name].path))
    assert report.analysed == name.startswith("analysed")
    assert (report.triage is None) == (not report.analysed)
    assert report.algorithm.name == ALGORITHM.name and report.algorithm.version == ALGORITHM.version


def test_pixelmed_counts_the_decisions_it_cannot_place(validated: dict[str, Validated]) -> None:
    """One warning per finding (its decision), none for a not-analysed SR: what the docstring says."""
    assert len(validated["analysed-nih14"].pixelmed) == len(NIH_FINDINGS)
    assert len(validated["analysed-positive"].pixelmed) == 1
    assert len(validated["analysed-child-label-not-applicable"].pixelmed) == 2  # Present and Not applicable
    assert len(validated["analysed-informational-positive"].pixelmed) == 2
    assert validated["not-analysed-field"].pixelmed == []
