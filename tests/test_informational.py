"""An informational finding is reported with its score and decision but does not set the triage flag: the
manifest's ``informational``, the SR (group parameter, report-level flag, read back), the banner and outlines,
``cxr-train export --informational``, ``cxr-node predict`` and the worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from ai.errors import ModelPackageError
from ai.findings import Finding
from ai.manifest import load_manifest, parse_manifest
from node.overlay import banner_text, finding_regions
from node.report import INFORMATIONAL_TEXT, AlgorithmRef, TriageResult, read_report
from node.result_common import AlgorithmInfo
from node.results import build_sr
from node.sr_build import as_comprehensive_sr

ALGORITHM = AlgorithmInfo(name="cxr-multi", version="2.0.0")


def finding(label: str, probability: float, threshold: float = 0.5, informational: bool = False) -> Finding:
    return Finding(label, probability, threshold, probability >= threshold, "fixed for tests",
                   informational=informational)


def rg1() -> Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed (test extra)")
    return pydicom.dcmread(path)


def test_the_manifest_carries_informational_labels_and_refuses_bad_ones(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package

    package = build_tiny_package(tmp_path / "pkg", labels=("Tuberculosis", "Effusion", "Fibrosis"), members=1,
                                 informational=("Fibrosis", "Effusion"))
    data = json.loads((package / "manifest.json").read_text())
    assert data["informational"] == ["Effusion", "Fibrosis"]  # in the package's label order
    assert load_manifest(package).informational == ("Effusion", "Fibrosis")
    without = {k: v for k, v in data.items() if k != "informational"}
    assert parse_manifest(without, package / "manifest.json").informational == ()
    for bad, message in [
        (["Hernia"], "unique labels of the package"),
        (["Effusion", "Effusion"], "unique labels of the package"),
        ("Effusion", "expected a JSON array"),
        ([1], "unique labels of the package"),
        (["Tuberculosis", "Effusion", "Fibrosis"], "at least one label left to set the triage flag"),
    ]:
        with pytest.raises(ModelPackageError, match=message):
            parse_manifest({**data, "informational": bad}, package / "manifest.json")


def test_an_informational_positive_does_not_set_the_triage_flag_in_the_sr() -> None:
    findings = [finding("Tuberculosis", 0.2), finding("Effusion", 0.7, informational=True),
                finding("Fibrosis", 0.1, informational=True)]
    sr_3d = build_sr(rg1(), findings, ALGORITHM, device_ae="CXRNODE")
    for sr in (sr_3d, as_comprehensive_sr(sr_3d)):
        report = read_report(sr)
        effusion = report.finding("Effusion")
        assert effusion.positive is True and effusion.informational is True
        assert effusion.probability == pytest.approx(0.7)
        assert report.finding("Fibrosis").informational is True and report.finding("Fibrosis").positive is False
        assert report.finding("Tuberculosis").informational is False
        assert report.triage is not None and report.triage.positive is False
        groups = next(g for g in sr.ContentSequence if g.ConceptNameCodeSequence[0].CodeValue == "126010")
        parameters = {}
        for group in groups.ContentSequence:
            label = next(str(c.TextValue) for c in group.ContentSequence
                         if c.ConceptNameCodeSequence[0].CodeValue == "112039")
            parameters[label] = AlgorithmRef.from_group(group).parameters
        assert f"informational={INFORMATIONAL_TEXT}" in parameters["Effusion"]
        assert not any(p.startswith("informational=") for p in parameters["Tuberculosis"])
    # the same image with the triage finding positive: the flag follows it
    flagged = build_sr(rg1(), [finding("Tuberculosis", 0.6), *findings[1:]], ALGORITHM, device_ae="CXRNODE")
    assert read_report(flagged).triage == TriageResult(True)


def test_the_banner_counts_triage_findings_and_lists_the_informational_ones() -> None:
    findings = [finding("Tuberculosis", 0.2), finding("Effusion", 0.7, informational=True),
                finding("Emphysema", 0.3, informational=True)]
    text = banner_text(findings, ALGORITHM)
    lines = [line for line, _ in text.lines]
    assert text.kind == "negative" and lines[0] == "AI: negative (1 finding)"
    assert "neg Tuberculosis 0.20 (thr 0.50)" in lines
    assert lines[3:5] == ["info (sets no flag) Effusion 0.700 >= 0.500", "info (sets no flag) Emphysema 0.300 < 0.500"]
    positive = banner_text([finding("Tuberculosis", 0.8), *findings[1:]], ALGORITHM)
    assert positive.kind == "positive" and positive.lines[0][0] == "AI: POSITIVE (1 of 1)"


def test_only_findings_that_set_the_flag_are_outlined() -> None:
    heat = np.zeros((64, 64), np.float32)
    heat[10:30, 10:30] = 1.0
    findings = [finding("Tuberculosis", 0.9), finding("Effusion", 0.9, informational=True)]
    drawn = finding_regions(findings, {"Tuberculosis": heat, "Effusion": heat}, (64, 64), 1.0)
    assert [f.label for f, _ in drawn] == ["Tuberculosis"]
    assert finding_regions(findings[1:], {"Effusion": heat}, (64, 64), 1.0) == []


@pytest.fixture(scope="module")
def informational_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package

    # threshold 0: every label is positive on every image, so the flag shows which labels set it
    return build_tiny_package(tmp_path_factory.mktemp("m") / "pkg", labels=("Tuberculosis", "Effusion"), size=64,
                              threshold=0.0, informational=("Effusion",))


def test_predict_marks_informational_labels_and_states_the_flag(tmp_path: Path, informational_package: Path) -> None:
    from tests.test_cli import cli, config

    path = tmp_path / "image.dcm"
    rg1().save_as(path)
    out = cli("predict", "--format", "jsonl", "--config", str(config(tmp_path, informational_package)), str(path))
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["positive"] == {"Tuberculosis": True, "Effusion": True}
    assert row["informational"] == ["Effusion"] and row["triage"] is True
    text = cli("predict", "--config", str(config(tmp_path, informational_package)), str(path)).stdout
    assert "Effusion" in text and "POSITIVE (informational)" in text and text.rstrip().endswith("triage flag POSITIVE")
    # Tuberculosis at a threshold nothing reaches: Effusion alone is positive, and it sets no flag
    strict = config(tmp_path, informational_package, "[thresholds]\nTuberculosis = 1.0\n")
    row = json.loads(cli("predict", "--format", "jsonl", "--config", str(strict), str(path)).stdout)
    assert row["positive"] == {"Tuberculosis": False, "Effusion": True} and row["triage"] is False


def test_the_worker_writes_the_informational_decision_and_status_lists_it(
        tmp_path: Path, informational_package: Path) -> None:
    """Through the worker with a site threshold on Tuberculosis that nothing reaches: the SR's flag is negative
    although the informational Effusion is Present, and `cxr-node status` says so."""
    from ai.ensemble import Ensemble
    from node.cli import report_summary
    from node.config import Destination, Settings, StorageSettings
    from node.worker import Worker
    from storage.db import make_engine
    from storage.queue import Store
    from tests.test_worker import chest, enqueue

    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),))
    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"), max_attempts=2)
    ensemble = Ensemble.load(informational_package, threads=1, threshold_overrides={"Tuberculosis": 1.0})
    worker = Worker(store, ensemble, settings, owner="test:1:1")
    enqueue(store, settings.data_path, chest())
    while worker.run_once():
        pass
    srs = [p for p in (settings.data_path / "results").rglob("*.dcm") if pydicom.dcmread(p).Modality == "SR"]
    assert len(srs) == 1
    report = read_report(pydicom.dcmread(srs[0]))
    assert report.finding("Effusion").positive is True and report.finding("Effusion").informational is True
    assert report.finding("Tuberculosis").positive is False
    assert report.triage is not None and report.triage.positive is False
    summary = report_summary({"job_id": 1, "at": "now", "path": str(srs[0])})
    assert summary["result"] == "analysed: negative; informational, at or above threshold: Effusion"
    assert summary["findings"]["Effusion"]["informational"] is True
    assert "informational" not in summary["findings"]["Tuberculosis"]
