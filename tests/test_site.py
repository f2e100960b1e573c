"""Site calibration (`cxr-train site-threshold`): threshold rule, held-out estimate, node round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ai.ensemble import Ensemble
from ai.pixels import read_image_file
from ai.preprocess import preprocess
from node.config import load_settings
from training import metrics
from training.cli import main
from training.evaluate import ENSEMBLE, PredictionTable, read_predictions
from training.site import calibrate_label, crossval_threshold, floor_threshold
from training.splits import grouped_stratified_kfold

from .model_fixtures import build_tiny_package
from .test_loop import make_cohort


def _shifted_site(n_pos: int = 40, n_neg: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A site whose positives score low (0.15-0.45) but still above most negatives (0-0.25)."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    p = np.r_[rng.uniform(0.15, 0.45, n_pos), rng.uniform(0.0, 0.25, n_neg)]
    groups = np.array([f"P{i:03d}" for i in range(y.size)])
    return y, p, groups


def _table(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> PredictionTable:
    return PredictionTable(images=groups, patient_ids=groups, labels={"Tuberculosis": y},
                           scores={"Tuberculosis": {"m0": p}}, name="site")  # fmt: skip


def test_each_fold_threshold_is_chosen_without_its_own_images() -> None:
    y, p, groups = _shifted_site()
    result = crossval_threshold(y, p, groups, target=0.90, k=5, seed=3)
    folds = grouped_stratified_kfold(list(groups), y, k=5, seed=3, tolerance=1.0)
    for entry in result["folds"]:
        test = folds == entry["fold"]
        assert entry["threshold"] == metrics.threshold_for_sensitivity(y[~test], p[~test], 0.90)
        moved = p.copy()
        moved[test] = 1.0 - moved[test]  # the held-out fold's own scores must not move its threshold
        again = crossval_threshold(y, moved, groups, target=0.90, k=5, seed=3)
        assert again["folds"][entry["fold"]]["threshold"] == entry["threshold"]


def test_pooled_held_out_counts_add_up_over_folds() -> None:
    y, p, groups = _shifted_site()
    result = crossval_threshold(y, p, groups, target=0.90, k=4)
    pooled = result["pooled"]
    assert pooled["tp"] == sum(f["true_positives"] for f in result["folds"])
    assert pooled["tp"] + pooled["fn"] == sum(f["positives"] for f in result["folds"]) == 40
    assert pooled["n"] == sum(f["n"] for f in result["folds"]) == 100
    assert pooled["sensitivity"]["low"] <= pooled["sensitivity"]["value"] <= pooled["sensitivity"]["high"]


def test_a_patients_images_share_one_fold() -> None:
    y, p, _ = _shifted_site()
    groups = np.array([f"P{i // 2:03d}" for i in range(y.size)])  # two images per patient
    y = np.repeat(y[::2], 2)
    folds = grouped_stratified_kfold(list(groups), y, k=5, seed=0, tolerance=1.0)
    for patient in np.unique(groups):
        assert np.unique(folds[groups == patient]).size == 1
    result = crossval_threshold(y, p, groups, target=0.90, k=5)
    assert sum(f["n"] for f in result["folds"]) == y.size


def test_site_threshold_recovers_sensitivity_the_package_threshold_loses() -> None:
    y, p, groups = _shifted_site()
    result = calibrate_label(_table(y, p, groups), "Tuberculosis", package_threshold=0.5, n_boot=200)
    assert result["package_threshold"]["sensitivity"]["value"] == 0.0  # every positive scores < 0.5
    site = result["site_threshold"]
    assert site["value"] < 0.5
    assert site["in_sample"]["sensitivity"]["value"] >= 0.90
    held = result["held_out"]["pooled"]["sensitivity"]
    assert held["n"] == 40 and 0.75 <= held["value"] <= 1.0
    assert result["auroc"]["low"] <= result["auroc"]["value"] <= result["auroc"]["high"]


def test_written_threshold_is_rounded_down_so_the_same_images_stay_positive() -> None:
    y, p, _ = _shifted_site(seed=4)
    chosen = metrics.threshold_for_sensitivity(y, p, 0.90)
    written = floor_threshold(chosen)
    assert written <= chosen and chosen - written < 1e-6
    assert np.array_equal(p >= written, p >= chosen)


def test_too_small_a_sample_is_refused_with_the_counts() -> None:
    y, p, groups = _shifted_site(n_pos=6, n_neg=30)
    with pytest.raises(ValueError, match="at least 10 positive and 10 negative patients, found 6 and 30"):
        calibrate_label(_table(y, p, groups), "Tuberculosis", package_threshold=0.5)


def test_cli_scores_as_the_node_does_and_writes_a_threshold_the_node_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = build_tiny_package(tmp_path / "pkg", members=2, size=64, threshold=0.5)
    cohort = make_cohort(tmp_path / "site", "site", 24, seed=5)
    out = tmp_path / "calib"
    code = main(["site-threshold", "--package", str(package), "--cohort", str(cohort), "--out", str(out),
                 "--folds", "3", "--n-boot", "100", "--threads", "1"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "[thresholds]" in printed and "Tuberculosis = " in printed

    table = read_predictions(out / "scores_site.csv")
    assert len(table) == 48
    ensemble = Ensemble.load(package, threads=1)
    first = ensemble.predict(preprocess(read_image_file(tmp_path / "site" / table.images[0]),
                                        ensemble.manifest.preprocess)[0][None])  # fmt: skip
    assert table.scores["Tuberculosis"][ENSEMBLE][0] == pytest.approx(float(first.probabilities[0, 0]), abs=1e-6)
    assert table.scores["Tuberculosis"]["member1"][0] == pytest.approx(
        float(first.member_probabilities[1, 0, 0]), abs=1e-6)

    result = json.loads((out / "site_threshold.json").read_text())
    value = result["labels"][0]["site_threshold"]["value"]
    assert result["labels"][0]["held_out"]["k"] == 3
    node_toml = tmp_path / "node.toml"
    node_toml.write_text(result["snippet"])
    settings = load_settings(node_toml, environ={})
    assert settings.thresholds == {"Tuberculosis": pytest.approx(value)}
    served = Ensemble.load(package, threshold_overrides=settings.thresholds, threads=1)
    assert served.thresholds["Tuberculosis"].value == pytest.approx(value)
    assert "site_threshold.md" in {p.name for p in out.iterdir()}


def test_cli_refuses_a_cohort_without_the_packages_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = build_tiny_package(tmp_path / "pkg", labels=("Pneumonia",), members=1, size=64)
    cohort = make_cohort(tmp_path / "site", "site", 12, seed=6)
    code = main(["site-threshold", "--package", str(package), "--cohort", str(cohort), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "none of the package's labels ['Pneumonia']" in capsys.readouterr().err


def test_cli_refuses_an_altered_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = build_tiny_package(tmp_path / "pkg", members=1, size=64)
    member = next(package.glob("*.onnx"))
    member.write_bytes(member.read_bytes()[:-10])
    cohort = make_cohort(tmp_path / "site", "site", 12, seed=7)
    code = main(["site-threshold", "--package", str(package), "--cohort", str(cohort), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
