"""A label learnt from children is reported for children only: the age read from the header, the package's
``ages``, the SR's "Not applicable" decision with its reason, the banner, ``cxr-node predict`` and the worker."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ai.applicability import apply_ages, not_applicable_reason, patient_age_years
from ai.errors import ModelPackageError
from ai.findings import Finding
from ai.manifest import AgeRange, load_manifest, parse_manifest
from node.overlay import banner_text
from node.report import NOT_APPLICABLE, read_report
from node.result_common import AlgorithmInfo, ResultBuildError
from node.results import build_sr
from node.sr_build import as_comprehensive_sr

CHILDREN = AgeRange(1.0, 6.0, "children aged 1-5 (test set)")
PED = "Pediatric_Pneumonia"
ALGORITHM = AlgorithmInfo(name="cxr-multi", version="2.0.0")


def header(**values: str) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(("values", "years"), [
    ({"PatientAge": "004Y"}, 4.0),
    ({"PatientAge": "018M"}, 1.5),
    ({"PatientAge": "052W"}, 52 * 7 / 365.25),
    ({"PatientAge": "010D"}, 10 / 365.25),
    ({"PatientAge": "034Y", "PatientBirthDate": "20200101", "StudyDate": "20230101"}, 34.0),  # Patient's Age first
    ({"PatientAge": "149Y"}, 149.0),
    ({"PatientBirthDate": "20200101", "StudyDate": "20230101"}, 3.0),  # calendar years: the birthday is exact
    ({"PatientBirthDate": "20200101", "ContentDate": "20210101"}, 1.0),  # the first exam date present
    ({"PatientAge": "4 years", "PatientBirthDate": "20200101", "SeriesDate": "20220101"}, 2.0),
    ({"PatientBirthDate": "20090302", "StudyDate": "20240302"}, 15.0),  # 15th birthday, 4 leap days between
    ({"PatientBirthDate": "20090302", "StudyDate": "20240301"}, 14 + 365 / 366),  # the day before it
    ({"PatientBirthDate": "20180406", "StudyDate": "20240406"}, 6.0),  # 6th birthday, 1 leap day between
    ({"PatientBirthDate": "20200229", "StudyDate": "20210301"}, 1.0),  # born on 29 February
    ({"PatientBirthDate": "20200229", "StudyDate": "20200229"}, 0.0),
])
def test_patient_age_from_the_header(values: dict[str, str], years: float) -> None:
    assert patient_age_years(header(**values)) == pytest.approx(years)


@pytest.mark.parametrize("values", [
    {}, {"PatientAge": ""}, {"PatientAge": "4 years"}, {"PatientBirthDate": "20200101"},
    {"PatientBirthDate": "20230101", "StudyDate": "20200101"},  # born after the exam
    {"PatientBirthDate": "20201301", "StudyDate": "20230101"},  # no such month
    {"PatientBirthDate": "2020", "StudyDate": "20230101"},
    {"PatientAge": "999Y"}, {"PatientAge": "150Y"},  # placeholders, not ages
])
def test_an_age_the_header_does_not_give_is_unknown(values: dict[str, str]) -> None:
    assert patient_age_years(header(**values)) is None


def finding(label: str, probability: float, threshold: float = 0.5) -> Finding:
    return Finding(label, probability, threshold, probability >= threshold, "fixed for tests")


def test_a_child_gets_the_label_an_adult_and_an_unknown_age_do_not() -> None:
    scored = [finding("Tuberculosis", 0.9), finding(PED, 0.8)]
    child = apply_ages(scored, {PED: CHILDREN}, 3.0)
    assert child == scored
    for age in (0.5, 6.0, 34.0, None):
        out = apply_ages(scored, {PED: CHILDREN}, age)
        assert out[0] == scored[0]  # a label without a range is untouched
        assert out[1].positive is False and out[1].probability == 0.8 and out[1].not_applicable
        assert "children aged 1-5 (test set)" in out[1].not_applicable
        assert ("unknown" in out[1].not_applicable) == (age is None)
    assert "34" not in not_applicable_reason(CHILDREN, 34.0)  # the age itself is never written out


FROM_15 = AgeRange(15.0, 150.0, "adults and adolescents (test set)", unknown_age="applies")


def test_a_label_from_15_keeps_an_unknown_age_and_withholds_only_the_young() -> None:
    scored = [finding("Tuberculosis", 0.9), finding(PED, 0.8)]
    ages = {"Tuberculosis": FROM_15, PED: CHILDREN}
    for age in (15.0, 34.0, 149.0, None):
        assert apply_ages(scored, ages, age)[0] == scored[0]
    for age in (0.5, 3.0, 14.9, 14 + 365 / 366):
        tb = apply_ages(scored, ages, age)[0]
        assert tb.positive is False and tb.probability == 0.9
        assert tb.not_applicable == "patient age outside the label's range; learnt from adults and adolescents " \
                                    "(test set) (ages 15 and over)"
    # the strict default still withholds the child-only label from an unknown age
    assert "unknown" in apply_ages(scored, ages, None)[1].not_applicable
    assert "to under 6 years" in not_applicable_reason(CHILDREN, 34.0)


def test_the_manifest_carries_ages_and_refuses_bad_ones(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package

    package = build_tiny_package(tmp_path / "pkg", labels=("Tuberculosis", PED), members=1,
                                 ages={PED: CHILDREN, "Tuberculosis": FROM_15})
    manifest = load_manifest(package)
    assert manifest.ages == {PED: CHILDREN, "Tuberculosis": FROM_15}
    data = json.loads((package / "manifest.json").read_text())
    assert data["ages"] == {  # the strict default is not written: manifests without the key read as before
        PED: {"from_years": 1.0, "below_years": 6.0, "population": "children aged 1-5 (test set)"},
        "Tuberculosis": {"from_years": 15.0, "below_years": 150.0, "population": "adults and adolescents (test set)",
                         "unknown_age": "applies"}}
    for bad, message in [
        ({"Hernia": CHILDREN.to_dict()}, "entries for the package's labels"),
        ({PED: {**CHILDREN.to_dict(), "unknown_age": "maybe"}}, "unknown_age"),
        ({PED: {**CHILDREN.to_dict(), "below_years": 1}}, "0 <= from_years < below_years <= 150"),
        ({PED: {**CHILDREN.to_dict(), "upper": 3}}, "upper"),
        ({PED: {**CHILDREN.to_dict(), "population": " "}}, "a non-empty string"),
    ]:
        with pytest.raises(ModelPackageError, match=message):
            parse_manifest({**data, "ages": bad}, package / "manifest.json")


def rg1() -> Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed (test extra)")
    return pydicom.dcmread(path)


def test_the_sr_says_not_applicable_and_why_without_a_probability() -> None:
    findings = apply_ages([finding("Tuberculosis", 0.2), finding(PED, 0.95)], {PED: CHILDREN}, 40.0)
    sr_3d = build_sr(rg1(), findings, ALGORITHM, device_ae="CXRNODE")
    for sr in (sr_3d, as_comprehensive_sr(sr_3d)):
        report = read_report(sr)
        tb, ped = report.finding("Tuberculosis"), report.finding(PED)
        assert tb.probability == pytest.approx(0.2) and tb.not_applicable == ""
        assert ped.probability is None and ped.positive is False
        assert ped.not_applicable == findings[1].not_applicable
        assert report.triage is not None and report.triage.positive is False  # 0.95 from a child model flags nothing
        groups = next(g for g in sr.ContentSequence if g.ConceptNameCodeSequence[0].CodeValue == "126010")
        ped_group = next(item for item in groups.ContentSequence
                         if any(str(getattr(c, "TextValue", "")) == PED for c in item.ContentSequence))
        kinds = [c.ConceptNameCodeSequence[0].CodeValue for c in ped_group.ContentSequence]
        tb_group = next(item for item in groups.ContentSequence
                        if any(str(getattr(c, "TextValue", "")) == "Tuberculosis" for c in item.ContentSequence))
        assert codes.DCM.Probability.value in [c.ConceptNameCodeSequence[0].CodeValue for c in tb_group.ContentSequence]
        assert codes.DCM.Probability.value not in kinds  # the label that does not apply states no probability
        values = [c.ConceptCodeSequence[0].CodeValue for c in ped_group.ContentSequence if "ConceptCodeSequence" in c]
        assert NOT_APPLICABLE.value in values


def test_a_not_applicable_label_is_never_positive_in_a_result() -> None:
    bad = Finding(PED, 0.9, 0.5, True, "fixed for tests", not_applicable="patient age unknown")
    with pytest.raises(ResultBuildError, match="cannot be positive"):
        build_sr(rg1(), [bad], ALGORITHM, device_ae="CXRNODE")


def test_the_banner_lists_what_did_not_apply() -> None:
    findings = apply_ages([finding("Tuberculosis", 0.9), finding(PED, 0.95)], {PED: CHILDREN}, None)
    text = [line for line, _ in banner_text(findings, ALGORITHM).lines]
    assert text[0] == "AI: POSITIVE (1 of 1)"
    assert "n/a (patient age): Pediatric_Pneumonia" in text
    only = banner_text(findings[1:], ALGORITHM)
    assert only.kind == "negative" and only.lines[0][0] == "AI: no finding applies to this patient"


@pytest.fixture(scope="module")
def two_label_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("m") / "pkg", labels=("Tuberculosis", PED), size=64,
                              threshold=0.0, ages={PED: CHILDREN, "Tuberculosis": FROM_15})  # as the bundled one


def test_predict_prints_every_label_and_what_did_not_apply(tmp_path: Path, two_label_package: Path) -> None:
    from tests.test_cli import cli, config

    files = {}
    for name, age in (("child", "003Y"), ("adult", "041Y"), ("unknown", "")):
        ds = rg1()
        ds.PatientAge, ds.PatientBirthDate = age, ""  # RG1's own birth date would give an age
        files[name] = tmp_path / f"{name}.dcm"
        ds.save_as(files[name])
    out = cli("predict", "--format", "jsonl", "--config", str(config(tmp_path, two_label_package)),
              *map(str, files.values()))
    assert out.returncode == 0, out.stderr
    child, adult, unknown = (json.loads(line) for line in out.stdout.splitlines())
    for row in (child, adult, unknown):
        assert set(row["scores"]) == {"Tuberculosis", PED}  # every label's score is printed (threshold 0)
    assert list(child["not_applicable"]) == ["Tuberculosis"] and child["positive"] == {"Tuberculosis": False, PED: True}
    assert "(ages 15 and over)" in child["not_applicable"]["Tuberculosis"]
    assert adult["positive"] == {"Tuberculosis": True, PED: False}
    assert "outside the label's range" in adult["not_applicable"][PED] and "Tuberculosis" not in adult["not_applicable"]
    assert unknown["positive"] == {"Tuberculosis": True, PED: False}  # an unknown age keeps Tuberculosis only
    assert "unknown" in unknown["not_applicable"][PED] and "Tuberculosis" not in unknown["not_applicable"]
    text = cli("predict", "--config", str(config(tmp_path, two_label_package)), str(files["adult"]))
    assert f"{PED} " in text.stdout and "(not applicable: patient age outside" in text.stdout


def test_the_worker_reports_the_child_label_for_children_only(tmp_path: Path, two_label_package: Path) -> None:
    from ai.ensemble import Ensemble
    from node.config import Destination, Settings, StorageSettings
    from node.worker import Worker
    from storage.db import make_engine
    from storage.queue import Store
    from tests.test_worker import chest, enqueue

    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),))
    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"), max_attempts=2)
    worker = Worker(store, Ensemble.load(two_label_package, threads=1), settings, owner="test:1:1")
    ages = {"4-year-old": ("", "20200301", "20240615"), "10-year-old": ("010Y", "", ""), "adult": ("063Y", "", ""),
            "unknown": ("", "", "")}
    uids = {}
    for name, (age, born, seen) in ages.items():
        ds = chest()
        ds.PatientAge, ds.PatientBirthDate, ds.StudyDate = age, born, seen
        uids[ds.SOPInstanceUID] = name
        enqueue(store, settings.data_path, ds)
    while worker.run_once():
        pass
    reports, paths = {}, {}
    for path in (settings.data_path / "results").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        if ds.Modality == "SR":
            report = read_report(ds)
            reports[uids[report.source_sop_instance_uids[0]]] = report
            paths[uids[report.source_sop_instance_uids[0]]] = path
    assert set(reports) == set(ages)
    assert reports["4-year-old"].finding(PED).positive is True
    for name in ("4-year-old", "10-year-old"):  # Tuberculosis from 15 years only
        tb = reports[name].finding("Tuberculosis")
        assert tb.probability is None and "ages 15 and over" in tb.not_applicable and tb.positive is False
    assert reports["10-year-old"].triage is not None and reports["10-year-old"].triage.positive is False
    for name in ("10-year-old", "adult", "unknown"):
        ped = reports[name].finding(PED)
        assert ped.probability is None and ped.not_applicable and ped.positive is False
    for name in ("adult", "unknown"):
        assert reports[name].finding("Tuberculosis").positive is True

    # what `cxr-node status` lists for the adult's result
    from node.cli import report_summary

    summary = report_summary({"job_id": 2, "at": "now", "path": str(paths["adult"])})
    assert summary["result"] == f"analysed: POSITIVE (Tuberculosis); not applicable (patient age): {PED}"
    assert summary["findings"][PED] == {"not_applicable": reports["adult"].finding(PED).not_applicable}
