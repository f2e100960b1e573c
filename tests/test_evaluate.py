"""Evaluation and report: synthetic OOF + two external cohorts, two members, figures recomputed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from training import metrics
from training.audits import floor_report
from training.compare import compare
from training.delong import delong_test
from training.evaluate import (
    ENSEMBLE,
    PredictionTable,
    age_bands,
    evaluate_cohorts,
    load_prediction_dir,
    read_predictions,
    write_predictions,
    write_report,
)

TB, EFF = "Tuberculosis", "Effusion"
N_BOOT = 40


def make_table(name: str, n: int, seed: int, shift: float = 0.0, effusion: bool = True) -> PredictionTable:
    """Two images per patient, two members, TB with some unknown labels, optional Effusion."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n // 2), 2)[:n]
    y_tb = (rng.random(n // 2) < 0.4)[patients].astype(float)  # a patient's images share the label
    y_tb[::13] = np.nan
    y_eff = (rng.random(n) < 0.3).astype(float)
    sites = rng.choice(["north", "south"], n)
    sites[:6] = "tiny"  # 3 patients, all negative below: a one-class subgroup
    y_tb[:6] = 0.0

    def member(y: np.ndarray, strength: float) -> np.ndarray:
        return np.clip(rng.normal(0.35 + strength * np.nan_to_num(y) + shift, 0.18), 0, 1)

    labels = {TB: y_tb} | ({EFF: y_eff} if effusion else {})
    scores = {TB: {"densenet": member(y_tb, 0.3), "resnet": member(y_tb, 0.25)}}
    if effusion:
        scores[EFF] = {"densenet": member(y_eff, 0.2), "resnet": member(y_eff, 0.2)}
    return PredictionTable(
        images=[f"{name}/{i:04d}.png" for i in range(n)], patient_ids=[f"P{p}" for p in patients],
        labels=labels, scores=scores, sites=sites, sexes=rng.choice(["F", "M", ""], n),
        ages=rng.uniform(5, 85, n), name=name,
    )


@pytest.fixture(scope="module")
def cohorts() -> tuple[PredictionTable, dict[str, PredictionTable]]:
    oof = make_table("oof", 240, 0)
    externals = {"site_a": make_table("site_a", 120, 1, shift=0.1), "site_b": make_table("site_b", 100, 2,
                                                                                          effusion=False)}
    return oof, externals


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, cohorts: Any) -> tuple[dict[str, Any], Path]:
    oof, externals = cohorts
    audit = floor_report(oof.labels[TB], oof.scores[TB][ENSEMBLE], oof.scores[TB]["resnet"], oof.patient_ids,
                         cohort="oof", label=TB, n_boot=N_BOOT)  # a member standing in for the floor
    results = evaluate_cohorts(oof, externals, n_boot=N_BOOT, seed=3, audits=[audit])
    out = tmp_path_factory.mktemp("report")
    write_report(results, out)
    return results, out


def test_report_files_exist(report: Any) -> None:
    _, out = report
    assert (out / "report.md").is_file()
    assert "placed midway between the score that reaches it and the next lower OOF score" in (
        out / "report.md").read_text()
    assert (out / "results.json").is_file()
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    for cohort in ("oof", "site_a", "site_b"):
        for kind in ("roc", "pr", "calibration", "histogram"):
            assert f"{kind}_{cohort}_{TB}.png" in pngs
    assert f"roc_site_b_{EFF}.png" not in pngs  # site_b has no Effusion labels
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_is_strict_and_equals_returned_results(report: Any) -> None:
    results, out = report

    def no_nan(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    loaded = json.loads((out / "results.json").read_text(), parse_constant=no_nan)
    assert loaded == results


def test_json_figures_equal_recomputed_values(report: Any, cohorts: Any) -> None:
    _, out = report
    loaded = json.loads((out / "results.json").read_text())
    oof, externals = cohorts
    for name, table in {"oof": oof, **externals}.items():
        entry = loaded["cohorts"][name]["labels"][TB]
        assert set(entry["models"]) == {"densenet", "resnet", ENSEMBLE}
        y = table.labels[TB]
        for member, m in entry["models"].items():
            p = table.scores[TB][member]
            keep = ~np.isnan(y)
            assert m["n"] == keep.sum() and m["n_pos"] == np.nansum(y)
            assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y[keep], p[keep]), abs=1e-12)
            assert m["auprc"]["value"] == pytest.approx(average_precision_score(y[keep], p[keep]), abs=1e-12)
            assert m["calibration"]["brier"] == pytest.approx(brier_score_loss(y[keep], p[keep]))
            ci = metrics.bootstrap_ci(metrics.auroc, y, p, table.patient_ids, n=N_BOOT, seed=3)
            assert (m["auroc"]["low"], m["auroc"]["high"]) == pytest.approx((ci.low, ci.high))
            thr = loaded["thresholds"][TB]["youden"]["value"]
            sens = np.mean(p[keep][y[keep] == 1] >= thr)
            assert m["operating_points"]["youden"]["sensitivity"]["value"] == pytest.approx(sens)
            ba = metrics.balanced_accuracy(y, p, thr)
            assert m["balanced_accuracy"]["youden"]["value"] == pytest.approx(ba)


def test_ensemble_is_mean_of_members_when_absent(cohorts: Any) -> None:
    oof, _ = cohorts
    members = oof.scores[TB]
    np.testing.assert_allclose(members[ENSEMBLE], (members["densenet"] + members["resnet"]) / 2)
    assert TB in oof.ensemble_computed
    assert oof.members(TB) == ["densenet", "resnet", ENSEMBLE]


def test_thresholds_chosen_on_oof_ensemble_and_reused_on_externals(report: Any, cohorts: Any) -> None:
    results, _ = report
    oof, externals = cohorts
    y, p = oof.labels[TB], oof.scores[TB][ENSEMBLE]
    youden = metrics.midway_below(y, p, metrics.youden_threshold(y, p))
    sens = metrics.midway_below(y, p, metrics.threshold_for_sensitivity(y, p, 0.90))
    assert results["settings"]["threshold_at"] == "midway"
    on_score = evaluate_cohorts(oof, externals, n_boot=N_BOOT, seed=3, threshold_at="score")
    assert on_score["thresholds"][TB]["youden"]["value"] == metrics.youden_threshold(y, p)
    assert on_score["thresholds"][TB]["sensitivity"]["value"] == metrics.threshold_for_sensitivity(y, p, 0.90)
    assert results["thresholds"][TB]["youden"]["value"] == youden
    assert results["thresholds"][TB]["sensitivity"]["value"] == sens
    for c in results["cohorts"].values():
        for m in c["labels"][TB]["models"].values():
            assert m["operating_points"]["youden"]["threshold"] == youden
            assert m["operating_points"]["sensitivity"]["threshold"] == sens
    # site_a's own Youden threshold differs (its scores are shifted): the OOF one was not re-chosen.
    ext = externals["site_a"]
    assert metrics.youden_threshold(ext.labels[TB], ext.scores[TB][ENSEMBLE]) != youden


def test_subgroups_and_skipped_labels(report: Any) -> None:
    results, _ = report
    oof_tb = results["cohorts"]["oof"]["labels"][TB]
    assert set(oof_tb["subgroups"]) == {"site", "sex", "age_band"}
    assert "one class" in oof_tb["subgroups"]["site"]["tiny"]["skipped"]
    assert "auroc" in oof_tb["subgroups"]["site"]["north"]
    assert set(oof_tb["subgroups"]["sex"]) == {"F", "M"}
    assert list(oof_tb["subgroups"]["age_band"]) == ["<18", "18-40", "40-60", ">=60"]
    assert "no label column" in results["cohorts"]["site_b"]["labels"][EFF]["skipped"]


def test_markdown_has_tables_and_audit_verdicts(report: Any) -> None:
    _, out = report
    text = (out / "report.md").read_text()
    assert f"## {TB}" in text and f"## {EFF}" in text
    assert "| oof | **ensemble** |" in text and "| site_a | densenet |" in text
    assert "- **thumbnail_floor** (oof, Tuberculosis): model AUROC 0.9" in text
    assert "above the floor" in text
    assert f"![roc_site_a_{TB}](plots/roc_site_a_{TB}.png)" in text


def test_age_bands() -> None:
    bands = age_bands(np.array([5, 17.9, 18, 39.9, 40, 59.9, 60, 90, np.nan]))
    assert bands.tolist() == ["<18", "<18", "18-40", "18-40", "40-60", "40-60", ">=60", ">=60", ""]


def test_csv_round_trip_and_directory(tmp_path: Path, cohorts: Any) -> None:
    oof, externals = cohorts
    write_predictions(oof, tmp_path / "predictions_oof.csv")
    write_predictions(externals["site_b"], tmp_path / "predictions_site_b.csv")
    header = (tmp_path / "predictions_oof.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["image", "patient_id", "site", "sex", "age"]
    assert f"label_{TB}" in header and f"score_{TB}__densenet" in header and f"score_{TB}__ensemble" in header
    back, ext = load_prediction_dir(tmp_path)
    assert list(ext) == ["site_b"] and back.name == "oof"
    np.testing.assert_array_equal(back.images, oof.images)
    np.testing.assert_array_equal(back.labels[TB], oof.labels[TB])  # NaN == NaN here
    np.testing.assert_array_equal(back.scores[TB]["resnet"], oof.scores[TB]["resnet"])
    np.testing.assert_array_equal(back.sexes, oof.sexes)
    assert TB not in back.ensemble_computed  # read from the file this time


def test_csv_errors_name_the_cell(tmp_path: Path) -> None:
    bad = tmp_path / "predictions_x.csv"
    bad.write_text("image,label_Tuberculosis,score_Tuberculosis__m\na,1,0.5\nb,2,0.4\n")
    with pytest.raises(ValueError, match=r"line 3 column 'label_Tuberculosis'.*'2'"):
        read_predictions(bad)
    bad.write_text("image,label_Tuberculosis,score_Tuberculosis\na,1,0.5\n")
    with pytest.raises(ValueError, match="score_<Label>__<member>"):
        read_predictions(bad)
    ok = tmp_path / "p.csv"
    ok.write_text("image,label_Tuberculosis,score_Tuberculosis__m\na,1,0.5\nb,,\n")
    table = read_predictions(ok)
    assert table.patient_ids.tolist() == ["a", "b"]  # no patient_id column: one patient per image
    assert np.isnan(table.labels[TB][1]) and np.isnan(table.scores[TB][ENSEMBLE][1])


def test_compare_matches_on_image_id(tmp_path: Path, cohorts: Any) -> None:
    oof, _ = cohorts
    path_a = write_predictions(oof, tmp_path / "a.csv")
    order = np.random.default_rng(0).permutation(len(oof))[:200]  # shuffled, 40 images only in A
    sub = PredictionTable(images=oof.images[order], patient_ids=oof.patient_ids[order],
                          labels={TB: oof.labels[TB][order]},
                          scores={TB: {"other": oof.scores[TB]["resnet"][order]}})
    path_b = write_predictions(sub, tmp_path / "b.csv")
    result = compare(path_a, path_b, TB, "densenet", "other")
    assert (result["n_matched"], result["n_only_a"], result["n_only_b"]) == (200, 40, 0)
    idx = np.sort(order)
    scores = oof.scores[TB]
    expected = delong_test(oof.labels[TB][idx], scores["densenet"][idx], scores["resnet"][idx])
    assert result["p_value"] == pytest.approx(expected.p_value)
    assert result["auc1"] == pytest.approx(expected.auc1) and "DeLong p" in result["verdict"]
    same_file = compare(path_a, path_a, TB, "densenet", f"score_{TB}__resnet")
    assert same_file["z"] == pytest.approx(expected.z, rel=0.5)  # 240 vs 200 images: same sign, similar
    flipped = PredictionTable(images=sub.images, patient_ids=sub.patient_ids,
                              labels={TB: 1 - sub.labels[TB]}, scores=sub.scores)
    with pytest.raises(ValueError, match="not the same cohort"):
        compare(path_a, write_predictions(flipped, tmp_path / "c.csv"), TB, "densenet", "other")


def test_each_folds_own_threshold_is_reported_for_the_oof_cohort_only(tmp_path: Path, cohorts: Any) -> None:
    """The fold column of a run's OOF file gives each fold's own threshold at the target sensitivity: by hand,
    the highest score that keeps 90 % of that fold's positives at or above it."""
    oof, externals = cohorts
    folds = np.array([str(i % 3) for i in range(len(oof))])
    write_predictions(oof, tmp_path / "predictions_oof.csv", extra={"fold": folds.tolist()})
    back = read_predictions(tmp_path / "predictions_oof.csv")
    assert back.folds is not None and back.folds.tolist() == folds.tolist()
    results = evaluate_cohorts(back, externals, labels=[TB], n_boot=N_BOOT)
    entry = results["cohorts"]["oof"]["labels"][TB]["fold_thresholds"]
    y, p = back.labels[TB], back.scores[TB][ENSEMBLE]
    expected = {}
    for fold in "012":
        positives = np.sort(p[(folds == fold) & (y == 1)])[::-1]
        expected[fold] = float(positives[int(np.ceil(0.9 * positives.size)) - 1])
        assert entry["folds"][fold]["threshold"] == pytest.approx(expected[fold])
        assert entry["folds"][fold]["n_pos"] == int(np.sum((folds == fold) & (y == 1)))
    assert entry["spread"] == pytest.approx(max(expected.values()) - min(expected.values()))
    site = externals["site_a"]
    with_folds = PredictionTable(images=site.images, patient_ids=site.patient_ids, labels=site.labels,
                                 scores=site.scores, name="site_a", folds=np.array(["0"] * len(site)))
    on_external = evaluate_cohorts(back, {"site_a": with_folds}, labels=[TB], n_boot=N_BOOT)
    assert "fold_thresholds" not in on_external["cohorts"]["site_a"]["labels"][TB]  # an external cohort: none
    assert on_external["cohorts"]["oof"]["labels"][TB]["fold_thresholds"] == entry
    named = evaluate_cohorts(read_predictions(tmp_path / "predictions_oof.csv", name="dev"), {}, labels=[TB],
                             n_boot=N_BOOT)  # the OOF table is the first argument, whatever its name
    assert named["cohorts"]["oof"]["labels"][TB]["fold_thresholds"] == entry
    without = evaluate_cohorts(oof, {}, labels=[TB], n_boot=N_BOOT)  # a table without the fold column
    assert "fold_thresholds" not in without["cohorts"]["oof"]["labels"][TB]
    markdown = write_report(results, tmp_path / "report").read_text()
    assert f"fold 0 {expected['0']:.4f}, fold 1 {expected['1']:.4f}, fold 2 {expected['2']:.4f}" in markdown
