"""The single owners of training's contracts: run-directory paths, the prediction table, the threshold chooser,
the JSON converter and the sigmoid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from training import metrics
from training.data import load_cohort
from training.export_run import oof_thresholds
from training.fit import write_prediction_csv
from training.jsonio import jsonable
from training.predictions import ENSEMBLE, PredictionTable, load_prediction_dir, read_predictions, write_predictions
from training.probability import sigmoid
from training.rundir import RunDir, UnitKey, prediction_cohort
from training.thresholds import choose_thresholds, ensemble_of

from .test_loop import make_cohort

TB = "Tuberculosis"


def test_run_dir_owns_every_path_of_the_documented_layout(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.config == tmp_path / "config.toml" and run.folds == tmp_path / "folds.csv"
    assert run.cohorts == tmp_path / "cohorts.json" and run.audits == tmp_path / "audits.json"
    assert run.cache() == tmp_path / "cache" and run.cache("/elsewhere") == Path("/elsewhere")
    assert run.oof_predictions == tmp_path / "predictions_oof.csv"
    assert run.predictions("montgomery") == tmp_path / "predictions_montgomery.csv"
    assert prediction_cohort(run.predictions("montgomery")) == "montgomery" and prediction_cohort("x/a.csv") == "a"
    report = run.report
    assert (report.results, report.markdown, report.plots) == (
        tmp_path / "report" / "results.json", tmp_path / "report" / "report.md", tmp_path / "report" / "plots")
    unit = run.unit(UnitKey("resnet18", 2))
    assert unit.path == tmp_path / "units" / "resnet18" / "fold2"
    assert (unit.checkpoint.name, unit.model.name, unit.log.name, unit.done.name) == (
        "checkpoint.pt", "model.pt", "log.csv", "done.json")
    assert unit.scores("oof") == unit.path / "pred_oof.npy"


def test_finished_units_and_prediction_files_are_read_from_the_folder(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for key, done in ((UnitKey("tiny", 1), True), (UnitKey("tiny", 0), True), (UnitKey("tiny", 2), False)):
        unit = run.unit(key)
        unit.path.mkdir(parents=True)
        (unit.path / ".model.pt.1.tmp").write_bytes(b"")
        unit.scores("ext").write_bytes(b"")
        if done:
            unit.done.write_text(json.dumps({"architecture": key.architecture, "fold": key.fold}))
    assert [key for key, _ in run.finished_units()] == [UnitKey("tiny", 0), UnitKey("tiny", 1)]
    unit = run.unit(UnitKey("tiny", 2))
    assert unit.orphans() == [unit.path / ".model.pt.1.tmp"] and unit.cached_scores() == [unit.scores("ext")]
    for name in ("predictions_oof.csv", "predictions_b.csv", "predictions_a.csv", "other.csv"):
        (tmp_path / name).write_text("")
    assert [p.name for p in run.prediction_files()] == ["predictions_a.csv", "predictions_b.csv", "predictions_oof.csv"]


def _two_members(n: int = 60, seed: int = 0) -> PredictionTable:
    """Two members that disagree: member ``a`` separates the classes, member ``b`` only weakly."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(float)
    a = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.15, n), 0, 1)
    b = np.clip(0.5 + 0.1 * y + rng.normal(0, 0.25, n), 0, 1)
    ids = np.array([f"img{i:03d}" for i in range(n)])
    return PredictionTable(images=ids, patient_ids=ids, labels={TB: y}, scores={TB: {"a": a, "b": b}}, name="oof")


def test_the_exact_format_round_trips_every_digit_and_its_bytes(tmp_path: Path) -> None:
    table = _two_members()
    table.ages = np.where(np.arange(len(table)) % 4 == 0, np.nan, np.arange(len(table)) / 3)
    first = write_predictions(table, tmp_path / "predictions_oof.csv")
    back = read_predictions(first)
    assert back.name == "oof"
    np.testing.assert_array_equal(back.scores[TB]["a"], table.scores[TB]["a"])
    np.testing.assert_array_equal(back.scores[TB][ENSEMBLE], table.scores[TB][ENSEMBLE])
    np.testing.assert_array_equal(back.ages, table.ages)
    again = write_predictions(back, tmp_path / "again.csv")
    assert again.read_bytes() == first.read_bytes()


def test_the_run_format_writes_the_fits_columns_and_digits(tmp_path: Path) -> None:
    cohort = load_cohort(make_cohort(tmp_path / "c", "c", 5, seed=3))
    scores = {"tiny": np.linspace(0.1, 0.9, 10, dtype=np.float32)[:, None],
              "other": np.full((10, 1), 1 / 3, dtype=np.float32)}
    path = write_prediction_csv(tmp_path / "predictions_c.csv", cohort, scores, {"fold": np.arange(10) % 2})
    lines = path.read_text().splitlines()
    assert lines[0] == ("image,patient_id,site,sex,age,fold,label_Tuberculosis,score_Tuberculosis__tiny,"
                        "score_Tuberculosis__other,score_Tuberculosis__ensemble")
    cells = lines[2].split(",")
    assert cells[3:7] == ["M", "30", "1", "0"]  # row 1: patient 0's second image, age with :g, fold 1, negative
    assert cells[7:] == [f"{float(scores['tiny'][1, 0]):.8g}", f"{float(np.float32(1 / 3)):.8g}",
                         f"{float(np.mean([scores['tiny'], scores['other']], axis=0)[1, 0]):.8g}"]
    back = read_predictions(path)
    assert back.name == "c" and back.members(TB) == ["tiny", "other", ENSEMBLE]
    np.testing.assert_allclose(back.scores[TB]["tiny"], scores["tiny"][:, 0], rtol=1e-7)


def test_export_chooses_on_the_ensemble_of_its_members_with_the_evaluate_chooser(tmp_path: Path) -> None:
    table = _two_members()
    write_predictions(table, RunDir(tmp_path).oof_predictions)
    oof, externals = load_prediction_dir(tmp_path)
    assert externals == {}
    y = oof.labels[TB]

    everything, evaluation = oof_thresholds(oof, [TB], ["a", "b"], "youden", 0.9)
    mean = np.mean([oof.scores[TB]["a"], oof.scores[TB]["b"]], axis=0)
    youden = metrics.youden_threshold(y, mean)
    assert everything[TB] == (metrics.midway_below(y, mean, youden),
                              "Youden J on OOF ensemble, midway to the next lower score")
    assert (mean >= everything[TB][0]).tolist() == (mean >= youden).tolist()
    on_score, _ = oof_thresholds(oof, [TB], ["a", "b"], "youden", 0.9, placement="score")
    assert on_score[TB] == (youden, "Youden J on OOF ensemble")
    assert evaluation == {"ensemble_of": ["a", "b"], "oof": {TB: {"auroc": metrics.auroc(y, mean), "n": 60}}}

    subset, evaluation = oof_thresholds(oof, [TB], ["a"], "sensitivity", 0.8)
    chosen = choose_thresholds(oof, TB, 0.8, members=["a"])["sensitivity"]
    reached = metrics.threshold_for_sensitivity(y, oof.scores[TB]["a"], 0.8)
    assert subset[TB] == (chosen["value"], chosen["method"]) == (
        metrics.midway_below(y, oof.scores[TB]["a"], reached),
        "sensitivity >= 0.80 on OOF ensemble of a, midway to the next lower score")
    assert subset[TB][0] != choose_thresholds(oof, TB, 0.8)["sensitivity"]["value"]  # not the full ensemble's
    assert evaluation["oof"][TB]["auroc"] == metrics.auroc(y, ensemble_of(oof, TB, ["a"]))
    with pytest.raises(ValueError, match=r"no scores of \['c'\]"):
        oof_thresholds(oof, [TB], ["c"], "youden", 0.9)


def test_jsonable_converts_numpy_and_keeps_or_drops_nan_as_each_file_needs() -> None:
    value = {"a": np.float32(0.5), "b": (np.int64(3), np.array([1.0, math.nan])), 4: math.inf}
    assert json.dumps(jsonable(value)) == '{"a": 0.5, "b": [3, [1.0, null]], "4": null}'
    assert json.dumps(jsonable(value, nan="keep")) == '{"a": 0.5, "b": [3, [1.0, NaN]], "4": Infinity}'


def test_the_training_sigmoid_is_float64_and_does_not_overflow() -> None:
    p = sigmoid(np.array([-1000.0, 0.0, 2.0, 1000.0], dtype=np.float32))
    assert p.dtype == np.float64
    assert p[0] == pytest.approx(0.0, abs=1e-25) and p[1] == 0.5 and p[3] == 1.0
    assert p[2] == 1.0 / (1.0 + math.exp(-2.0))
