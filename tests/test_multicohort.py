"""Runs over several training cohorts: folds per cohort, masked labels, per-cohort OOF figures, no pooling."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ai.ensemble import Ensemble, sigmoid
from ai.manifest import load_manifest
from ai.pixels import read_image_file
from ai.preprocess import preprocess
from training import metrics
from training.audits import baseline_run
from training.cli import main
from training.config import CohortConfig, ConfigError
from training.evaluate import evaluate_dir
from training.export_run import export_run
from training.fit import fit
from training.prepare import inner_split, prepare_run
from training.rundir import UnitKey
from training.splits import SplitError
from training.unit import _UnitContext, build_unit_model, derive_seed, unit_inner_split

from .test_loop import make_cohort, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _midway_at_90(scores: Any, y: Any) -> float:
    """The sensitivity-0.90 threshold as export places it, by hand: the highest score that 90 % of the positives reach,
    midway to the next lower score of any image (docs/model/threshold-rule.md)."""
    scores, y = np.asarray(scores, dtype=float), np.asarray(y, dtype=float)
    positives = np.sort(scores[y == 1])[::-1]
    reached = positives[int(np.ceil(0.9 * positives.size)) - 1]
    return float((reached + scores[scores < reached].max()) / 2)


def pediatric_like(folder: Path, n_patients: int, seed: int) -> Path:
    """A cohort in the pediatric set's layout (group_hint, no site, label_pneumonia), mostly positive."""
    source = read_csv(make_cohort(folder, "ped", n_patients, seed))
    lines = ["image,group_hint,label_pneumonia"]
    for i, row in enumerate(source):
        positive = "1" if (row["label_tb"] == "1" or i % 4 == 0) else "0"  # prevalence ~ 0.6
        lines.append(f"{row['image']},child:{row['patient_id']},{positive}")
    path = folder / "ped_manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("multi")
    return (make_cohort(root / "tb", "tb", 12, 0), pediatric_like(root / "ped", 15, 3),
            make_cohort(root / "ext", "ext", 5, 1))


def two_cohort_config(cohorts: tuple[Path, Path, Path], **changes: object):  # type: ignore[no-untyped-def]
    tb, ped, ext = cohorts
    train = (CohortConfig("tb", str(tb)),
             CohortConfig("ped", str(ped), patient_column="group_hint", site="guangzhou",
                          label_columns={"label_pneumonia": "Pediatric_Pneumonia"}))
    return tiny_config((tb, ext), train=train, labels=("Tuberculosis", "Pediatric_Pneumonia"),
                       epochs_head=1, epochs_finetune=1, **changes)


def test_two_cohorts_train_one_model_and_are_reported_apart(cohorts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(two_cohort_config(cohorts), run)
    folds = read_csv(run / "folds.csv")
    assert len(folds) == 24 + 30
    patients: dict[str, set[str]] = {}
    for row in folds:
        patients.setdefault(row["patient_id"], set()).add(row["fold"])
    assert all(len(f) == 1 for f in patients.values())  # no patient in two folds
    assert {p.split(":")[0] for p in patients} == {"tb", "ped"}  # patient keys carry their cohort
    for name in ("tb", "ped"):  # every cohort is split over every fold on its own
        assert {row["fold"] for row in folds if row["patient_id"].startswith(name + ":")} == {"0", "1", "2"}
    summary = json.loads((run / "cohorts.json").read_text())
    assert [c["name"] for c in summary["train"]] == ["tb", "ped"]
    assert set(summary["folds"]) == {"tb", "ped"}
    assert summary["folds"]["ped"][0]["Pediatric_Pneumonia"] > 0.3  # the cohort's own prevalence per fold

    oof = read_csv(run / "predictions_oof.csv")
    assert {row["cohort"] for row in oof} == {"tb", "ped"}
    for row in oof:  # each label known only in its own cohort; the model scores both on every image
        if row["cohort"] == "tb":
            assert row["label_Tuberculosis"] in ("0", "1") and row["label_Pediatric_Pneumonia"] == ""
        else:
            assert row["label_Pediatric_Pneumonia"] in ("0", "1") and row["label_Tuberculosis"] == ""
        assert row["score_Tuberculosis__ensemble"] and row["score_Pediatric_Pneumonia__ensemble"]

    evaluate_dir(run, run / "report", n_boot=50)
    results = json.loads((run / "report" / "results.json").read_text())
    assert set(results["cohorts"]) == {"oof:tb", "oof:ped", "ext"}
    tb = results["cohorts"]["oof:tb"]
    ped = results["cohorts"]["oof:ped"]
    assert tb["n_images"] == 24 and ped["n_images"] == 30
    assert tb["labels"]["Tuberculosis"]["n"] == 24 and ped["labels"]["Pediatric_Pneumonia"]["n"] == 30
    assert ped["labels"]["Pediatric_Pneumonia"]["prevalence"] == pytest.approx(
        np.mean([row["label_pneumonia"] == "1" for row in read_csv(cohorts[1])]))
    assert "is not a label of training cohort 'tb'" in tb["labels"]["Pediatric_Pneumonia"]["skipped"]
    report = (run / "report" / "report.md").read_text()
    assert "oof:tb" in report and "oof:ped" in report
    assert "| oof:ped | tiny | 0 (0)" not in report  # no empty rows for a label the cohort does not carry

    # The thumbnail floor per label where the label is known: the external TB cohort has no pediatric label.
    floors = baseline_run(run, n_boot=50)
    assert sorted((r["cohort"], r["label"]) for r in floors) == [
        ("ext", "Tuberculosis"), ("oof", "Pediatric_Pneumonia"), ("oof", "Tuberculosis")]
    ped_floor = next(r for r in floors if r["label"] == "Pediatric_Pneumonia")
    assert ped_floor["n"] == 30  # the floor is judged on the carrying cohort's images only

    package = export_run(run, tmp_path / "pkg", version="0.0.1")
    manifest = load_manifest(package)
    assert manifest.labels == ("Tuberculosis", "Pediatric_Pneumonia")
    assert set(manifest.thresholds) == {"Tuberculosis", "Pediatric_Pneumonia"}
    # The reference distribution of each label: its own cohort's OOF scores, the ones its threshold came from.
    tb_ref, ped_ref = manifest.reference["Tuberculosis"], manifest.reference["Pediatric_Pneumonia"]
    assert (tb_ref.cohort, tb_ref.n, tb_ref.prevalence) == ("tb", 24, 0.5)
    assert (ped_ref.cohort, ped_ref.n) == ("ped", 30)
    assert ped_ref.prevalence == pytest.approx(ped["labels"]["Pediatric_Pneumonia"]["prevalence"], abs=1e-6)
    ped_scores = [float(r["score_Pediatric_Pneumonia__ensemble"]) for r in oof if r["cohort"] == "ped"]
    assert ped_ref.quantiles[0] == pytest.approx(min(ped_scores), abs=1e-6)
    assert ped_ref.quantiles[-1] == pytest.approx(max(ped_scores), abs=1e-6)
    assert ped_ref.quantiles[50] == pytest.approx(float(np.median(ped_scores)), abs=1e-6)
    positives = [s for s, r in zip(ped_scores, [r for r in oof if r["cohort"] == "ped"], strict=True)
                 if r["label_Pediatric_Pneumonia"] == "1"]
    assert ped_ref.quantiles_positive[0] == pytest.approx(min(positives), abs=1e-6)
    assert ped_ref.source == "OOF ensemble"

    # A package may carry a subset of the run's labels: the others are cut from every member's output layer.
    subset = export_run(run, tmp_path / "pkg-ped", version="0.0.2", labels=["Pediatric_Pneumonia"])
    cut = load_manifest(subset)
    assert cut.labels == ("Pediatric_Pneumonia",) and set(cut.reference) == {"Pediatric_Pneumonia"}
    assert cut.evaluation_summary["left_out"] == ["Tuberculosis"]
    assert cut.thresholds["Pediatric_Pneumonia"] == manifest.thresholds["Pediatric_Pneumonia"]
    batch = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    full_prediction, cut_prediction = Ensemble.load(package).predict(batch), Ensemble.load(subset).predict(batch)
    np.testing.assert_allclose(cut_prediction.probabilities[:, 0], full_prediction.probabilities[:, 1], atol=1e-6)
    np.testing.assert_allclose(cut_prediction.cams[:, 0], full_prediction.cams[:, 1], atol=1e-5)
    with pytest.raises(ValueError, match="not among the run's labels"):
        export_run(run, tmp_path / "pkg-bad", labels=["Hernia"])


def test_the_inner_split_holds_whole_patients_of_every_cohort_out_of_training(
    cohorts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """monitor = "inner": per cohort, a patient-grouped part of the training folds is monitored and not trained
    on; the held-out fold is in neither part, and the split depends on the fold and the seed only."""
    config = two_cohort_config(cohorts, monitor="inner", inner_folds=3, run_folds=(1,))
    fit(config, tmp_path / "run")
    data = prepare_run(config, tmp_path / "run")
    patients = np.array(data.cohort.patient_ids)
    fit_rows, inner_rows = inner_split(data, 1, seed=7)
    assert sorted([*fit_rows, *inner_rows]) == np.flatnonzero(data.folds != 1).tolist()
    assert not set(patients[fit_rows]) & set(patients[inner_rows])  # whole patients
    assert not set(patients[inner_rows]) & set(patients[data.folds == 1])
    for name in ("tb", "ped"):  # each cohort gives about a third of its training patients
        ours = data.sources[inner_rows] == name
        train = np.count_nonzero(data.sources[data.folds != 1] == name)
        assert 0.2 * train <= np.count_nonzero(ours) <= 0.45 * train
        y = data.cohort.y[inner_rows[ours]]
        assert 0 < np.nanmean(y[:, ~np.isnan(y).all(axis=0)]) < 1  # stratified: both classes monitored
    again, _ = inner_split(data, 1, seed=7)
    assert again.tolist() == fit_rows.tolist()
    assert inner_split(data, 1, seed=8)[1].tolist() != inner_rows.tolist()
    done = json.loads((tmp_path / "run" / "units" / "tiny" / "fold1" / "done.json").read_text())
    trained, monitored = unit_inner_split(data, 1)
    assert done["monitor"] == "inner" and done["inner_images"] == len(monitored)
    assert monitored.tolist() == inner_split(data, 1, derive_seed(config.seed, "inner", 1))[1].tolist()
    # The unit trains on the other rows only, in both phases (cached features, then images).
    key = UnitKey("tiny", 1)
    ctx = _UnitContext(data, key, data.paths.unit(key), build_unit_model(config, "tiny"), None)
    assert ctx.train_idx.tolist() == trained.tolist() and ctx.inner_idx is not None
    images, _ = ctx._train_loader(1, None)
    assert images.dataset.index.tolist() == trained.tolist()
    features = (torch.zeros(len(data.cohort), 4), torch.zeros(len(data.cohort), 2))
    assert len(ctx._train_loader(1, features)[0].dataset) == len(trained)


def test_an_inner_split_that_cannot_be_made_fails_before_any_unit_trains(
    cohorts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    config = two_cohort_config(cohorts, monitor="inner", inner_folds=12)  # tb: 12 patients, 8 or so per fold
    with pytest.raises(SplitError, match=r"cohort 'tb', the training rows of fold 0, cannot be split into "
                                         r"inner_folds = 12 parts: k must be between 2 and the number of patients"):
        fit(config, tmp_path / "run")
    assert not (tmp_path / "run" / "units").exists()


def test_a_label_known_in_two_training_cohorts_is_refused(cohorts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tb, _, ext = cohorts
    config = tiny_config((tb, ext), train=(CohortConfig("a", str(tb)), CohortConfig("b", str(ext))))
    with pytest.raises(ConfigError) as info:
        fit(config, tmp_path / "run")
    text = str(info.value)
    assert "Tuberculosis: known in training cohorts a (prevalence 0.50), b (prevalence" in text
    assert "own label" in text



def test_a_package_combines_the_members_of_two_runs(cohorts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A TB-only run and a TB + pediatric run in one package: each member outputs its own run's labels, a label's
    score is the mean over the members that output it, and its threshold comes from the same mean of the runs'
    OOF ensembles."""
    tb, _, ext = cohorts
    tb_only = tiny_config((tb, ext), name="tb-only", epochs_head=1, epochs_finetune=0, unfreeze="none")
    both = two_cohort_config(cohorts, name="tb-ped")
    fit(tb_only, tmp_path / "a")
    fit(both, tmp_path / "b")
    package = export_run([tmp_path / "a", tmp_path / "b"], tmp_path / "pkg", version="0.1", threshold="sensitivity",
                         informational=["Pediatric_Pneumonia"])
    manifest = load_manifest(package)
    assert manifest.informational == ("Pediatric_Pneumonia",)
    assert manifest.name == "tb-only+tb-ped" and manifest.labels == ("Tuberculosis", "Pediatric_Pneumonia")
    assert [m.labels for m in manifest.members] == [("Tuberculosis",)] * 3 + [
        ("Tuberculosis", "Pediatric_Pneumonia")] * 3
    assert manifest.members[0].file == "tb-only_tiny_fold0.onnx"
    alone_a = export_run(tmp_path / "a", tmp_path / "pkg-a", version="0.1")
    alone_b = export_run(tmp_path / "b", tmp_path / "pkg-b", version="0.1", informational=["Tuberculosis"])
    assert load_manifest(alone_b).informational == ("Tuberculosis",)  # the single-run path passes it on too
    batch = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    together = Ensemble.load(package).predict(batch)
    a, b = Ensemble.load(alone_a).predict(batch), Ensemble.load(alone_b).predict(batch)
    np.testing.assert_allclose(together.probabilities[:, 0], (a.probabilities[:, 0] + b.probabilities[:, 0]) / 2,
                               atol=1e-6)
    np.testing.assert_allclose(together.probabilities[:, 1], b.probabilities[:, 1], atol=1e-6)
    np.testing.assert_allclose(together.cams[:, 1], b.cams[:, 1], atol=1e-5)
    assert np.isnan(together.member_probabilities[0, :, 1]).all()  # a TB-only member says nothing of the other

    oof_a, oof_b = read_csv(tmp_path / "a" / "predictions_oof.csv"), read_csv(tmp_path / "b" / "predictions_oof.csv")
    score_b = {r["image"]: float(r["score_Tuberculosis__ensemble"]) for r in oof_b if r["label_Tuberculosis"]}
    mean = {r["image"]: (float(r["score_Tuberculosis__ensemble"]) + score_b[r["image"]]) / 2 for r in oof_a}
    y = {r["image"]: int(r["label_Tuberculosis"]) for r in oof_a}
    expected = _midway_at_90([mean[i] for i in mean], [y[i] for i in mean])
    assert manifest.thresholds["Tuberculosis"].value == pytest.approx(expected, abs=1e-6)
    assert manifest.reference["Tuberculosis"].n == len(mean)
    assert manifest.evaluation_summary["oof"]["Tuberculosis"]["runs"] == ["tb-only", "tb-ped"]

    with pytest.raises(ValueError, match="distinct names"):
        export_run([tmp_path / "a", tmp_path / "a"], tmp_path / "pkg-d")


def test_runs_of_two_input_sizes_make_one_package_whose_members_keep_their_size(
    cohorts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A 64 px and a 96 px run of the same folds: the second run's members say their size, the package scores an
    image as the mean of each run's members on the image preprocessed at their own size, and the threshold comes
    from the mean of the two runs' OOF ensembles. A run that preprocesses otherwise than by its size is refused."""
    tb, _, ext = cohorts
    fit(tiny_config((tb, ext), name="tb-64", epochs_head=1, epochs_finetune=0, unfreeze="none"), tmp_path / "a")
    fit(tiny_config((tb, ext), name="tb-96", image_size=96, epochs_head=1, epochs_finetune=0, unfreeze="none"),
        tmp_path / "c")
    package = export_run([tmp_path / "a", tmp_path / "c"], tmp_path / "pkg", version="0.1", threshold="sensitivity",
                         name="tb-two-sizes")
    manifest = load_manifest(package)
    assert manifest.name == "tb-two-sizes"
    assert manifest.preprocess.size == 64 and manifest.input_sizes == (64, 96)
    assert [(m.file, m.size) for m in manifest.members] == [(f"tb-64_tiny_fold{k}.onnx", None) for k in range(3)] + [
        (f"tb-96_tiny_fold{k}.onnx", 96) for k in range(3)]
    alone_a = Ensemble.load(export_run(tmp_path / "a", tmp_path / "pkg-a", version="0.1"))
    alone_c = Ensemble.load(export_run(tmp_path / "c", tmp_path / "pkg-c", version="0.1"))
    images = [read_image_file(tb.parent / row["image"]) for row in read_csv(tb)[:3]]
    x64 = np.stack([preprocess(image, alone_a.manifest.preprocess)[0] for image in images])
    x96 = np.stack([preprocess(image, alone_c.manifest.preprocess)[0] for image in images])
    together = Ensemble.load(package).predict({64: x64, 96: x96})
    expected = (alone_a.predict(x64).probabilities + alone_c.predict(x96).probabilities) / 2
    np.testing.assert_allclose(together.probabilities, expected, atol=1e-6)

    oof_a, oof_c = read_csv(tmp_path / "a" / "predictions_oof.csv"), read_csv(tmp_path / "c" / "predictions_oof.csv")
    score_c = {r["image"]: float(r["score_Tuberculosis__ensemble"]) for r in oof_c}
    mean = {r["image"]: (float(r["score_Tuberculosis__ensemble"]) + score_c[r["image"]]) / 2 for r in oof_a}
    expected_threshold = _midway_at_90([mean[r["image"]] for r in oof_a],
                                       [r["label_Tuberculosis"] == "1" for r in oof_a])
    assert manifest.thresholds["Tuberculosis"].value == pytest.approx(expected_threshold, abs=1e-6)

    other = tmp_path / "d"  # run a's units under another name, its CLAHE changed: not one preprocessing
    shutil.copytree(tmp_path / "a", other)
    config = (other / "config.toml").read_text()
    assert 'name = "tb-64"' in config and "[preprocess]" in config
    (other / "config.toml").write_text(config.replace('name = "tb-64"', 'name = "tb-clahe"', 1).replace(
        "[preprocess]", "[preprocess]\nclahe_clip = 3.0", 1))
    with pytest.raises(ValueError, match=r"preprocesses differently .* only their input size may differ"):
        export_run([tmp_path / "a", other], tmp_path / "pkg-d")


def test_a_run_adds_its_labels_to_a_base_package_whose_members_stay_unchanged(
    cohorts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The bundled TB members kept byte for byte and a multi-label run's members for the other labels: the base's
    label scores exactly as before, the added label as the run's own members score it, from the chosen folds."""
    tb, _, ext = cohorts
    fit(tiny_config((tb, ext), name="tb-only", epochs_head=1, epochs_finetune=0, unfreeze="none"), tmp_path / "a")
    fit(two_cohort_config(cohorts, name="tb-ped"), tmp_path / "b")
    base = export_run(tmp_path / "a", tmp_path / "base", version="1.0", threshold="sensitivity",
                      weights_dtype="float16")
    package = export_run(tmp_path / "b", tmp_path / "pkg", version="2.0", threshold="sensitivity",
                         weights_dtype="float16", base_package=base, folds=[0, 2])
    base_manifest, manifest = load_manifest(base), load_manifest(package)
    assert manifest.name == "tb-only+tb-ped" and manifest.labels == ("Tuberculosis", "Pediatric_Pneumonia")
    assert [(m.file, m.labels) for m in manifest.members] == [(m.file, ("Tuberculosis",)) for m in
                                                             base_manifest.members] + [
        ("tb-ped_tiny_fold0.onnx", ("Pediatric_Pneumonia",)), ("tb-ped_tiny_fold2.onnx", ("Pediatric_Pneumonia",))]
    for member in base_manifest.members:  # byte for byte
        assert (package / member.file).read_bytes() == (base / member.file).read_bytes()
    assert manifest.thresholds["Tuberculosis"] == base_manifest.thresholds["Tuberculosis"]
    assert manifest.reference["Tuberculosis"] == base_manifest.reference["Tuberculosis"]
    assert set(manifest.ages) == {"Pediatric_Pneumonia", "Tuberculosis"}
    tb_ages = manifest.ages["Tuberculosis"]  # the base's range (from the label table at its export), carried
    assert (tb_ages.from_years, tb_ages.unknown_age) == (15.0, "applies")
    assert tb_ages == base_manifest.ages["Tuberculosis"]
    assert manifest.evaluation_summary["base_package"]["version"] == "1.0"
    assert manifest.evaluation_summary["added"]["folds"] == [0, 2]

    # The added label's threshold and reference come from every fold's OOF, as in a package of the run alone.
    alone = export_run(tmp_path / "b", tmp_path / "alone", version="0.1", threshold="sensitivity",
                       labels=["Pediatric_Pneumonia"])
    alone_manifest = load_manifest(alone)
    assert manifest.thresholds["Pediatric_Pneumonia"] == alone_manifest.thresholds["Pediatric_Pneumonia"]
    assert manifest.reference["Pediatric_Pneumonia"] == alone_manifest.reference["Pediatric_Pneumonia"]

    batch = np.random.default_rng(2).random((3, 3, 64, 64), dtype=np.float32)
    together, before = Ensemble.load(package).predict(batch), Ensemble.load(base).predict(batch)
    assert np.array_equal(together.probabilities[:, 0], before.probabilities[:, 0])
    assert np.array_equal(together.cams[:, 0], before.cams[:, 0])
    # The added label: the mean of the chosen folds' members (float16 storage, so not bit-equal to float32).
    members = Ensemble.load(alone).predict(batch).member_probabilities[[0, 2], :, 0]  # [member, image, label]
    np.testing.assert_allclose(together.probabilities[:, 1], members.mean(axis=0), atol=5e-3)

    # The same package with the added label informational (reported, sets no triage flag), from the command line.
    assert main(["export", "--run-dir", str(tmp_path / "b"), "--out", str(tmp_path / "info"), "--version", "2.0",
                 "--threshold", "sensitivity", "--weights-dtype", "float16", "--base-package", str(base),
                 "--folds", "0", "2", "--informational", "Pediatric_Pneumonia"]) == 0
    informational = load_manifest(tmp_path / "info")
    assert informational.informational == ("Pediatric_Pneumonia",) and manifest.informational == ()
    assert informational.thresholds == manifest.thresholds
    finding = Ensemble.load(tmp_path / "info").findings(batch[0])
    assert [f.informational for f in finding] == [False, True]

    with pytest.raises(ValueError, match="informational labels"):
        export_run(tmp_path / "b", tmp_path / "bad0", base_package=base, informational=["Hernia"])
    with pytest.raises(ValueError, match="carries them already"):
        export_run(tmp_path / "b", tmp_path / "bad1", base_package=base, labels=["Tuberculosis"])
    with pytest.raises(ValueError, match="not among the run's folds"):
        export_run(tmp_path / "b", tmp_path / "bad2", base_package=base, folds=[7])
    with pytest.raises(ValueError, match="adds no label"):
        export_run(tmp_path / "a", tmp_path / "bad3", base_package=base)
    with pytest.raises(ValueError, match="one --run-dir"):
        export_run([tmp_path / "a", tmp_path / "b"], tmp_path / "bad4", base_package=base)
    assert not any((tmp_path / name).exists() for name in ("bad0", "bad1", "bad2", "bad3", "bad4"))


def test_an_int8_package_chooses_its_thresholds_on_the_scores_of_its_stored_members(
    cohorts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """int8-last-stage storage moves scores; the export scores every fold's stored graph on its held-out images
    (onnxruntime, from the raw files as the node reads them) and chooses the threshold and reference on those;
    the shipped members are those very graphs."""
    fit(two_cohort_config(cohorts, name="tb-ped"), tmp_path / "b")
    run_oof = read_csv(tmp_path / "b" / "predictions_oof.csv")
    folds = {row["image"]: int(row["fold"]) for row in run_oof}
    assert main(["export", "--run-dir", str(tmp_path / "b"), "--out", str(tmp_path / "pkg"), "--version", "1",
                 "--threshold", "sensitivity", "--weights-dtype", "int8-last-stage", "--labels", "Pediatric_Pneumonia",
                 "--folds", "0", "2", "--oof-out", str(tmp_path / "oof")]) == 0
    manifest = load_manifest(tmp_path / "pkg")
    stored = {row["image"]: row for row in read_csv(tmp_path / "oof" / "predictions_oof.csv")}
    assert set(stored) == set(folds) and "score_Tuberculosis__ensemble" not in next(iter(stored.values()))

    # Each shipped member scores its held-out images exactly as the written OOF scores say, from the raw files.
    spec = manifest.preprocess
    roots = {"tb": cohorts[0].parent, "ped": cohorts[1].parent}
    for member in manifest.members:
        session = ort.InferenceSession(str(tmp_path / "pkg" / member.file), providers=["CPUExecutionProvider"])
        held = [image for image in folds if folds[image] == member.fold]
        paths = [roots["ped" if stored[image]["cohort"] == "ped" else "tb"] / image for image in held]
        batch = np.stack([preprocess(read_image_file(path), spec)[0] for path in paths])
        (logits,) = session.run(["logits"], {"image": batch})
        np.testing.assert_allclose(sigmoid(logits)[:, 0], [float(stored[i]["score_Pediatric_Pneumonia__tiny"])
                                                            for i in held], atol=1e-6)
    record = manifest.evaluation_summary["oof_scores"]
    assert record["source"].startswith("each unit stored as int8-last-stage")
    assert sorted(record["sha256"]) == [f"tb-ped/tiny/fold{k}" for k in range(3)]
    assert [record["sha256"][f"tb-ped/tiny/fold{m.fold}"] for m in manifest.members] == [m.sha256 for m in
                                                                                        manifest.members]

    # The stored scores differ from the run's torch scores, and the threshold and reference are the stored ones'.
    known = [image for image in folds if stored[image]["label_Pediatric_Pneumonia"]]
    run_scores = {row["image"]: float(row["score_Pediatric_Pneumonia__ensemble"]) for row in run_oof}
    stored_scores = np.array([float(stored[i]["score_Pediatric_Pneumonia__ensemble"]) for i in known])
    y = np.array([int(stored[i]["label_Pediatric_Pneumonia"]) for i in known])
    assert 0 < np.max(np.abs(stored_scores - [run_scores[i] for i in known])) <= 0.25
    threshold = manifest.thresholds["Pediatric_Pneumonia"]
    assert threshold.value == pytest.approx(_midway_at_90(stored_scores, y), abs=1e-7)
    assert manifest.reference["Pediatric_Pneumonia"].n == len(known)
    assert manifest.evaluation_summary["oof"]["Pediatric_Pneumonia"]["auroc"] == pytest.approx(
        metrics.auroc(y, stored_scores))

    # --oof-scores run: the run's own scores, as for float storage.
    assert main(["export", "--run-dir", str(tmp_path / "b"), "--out", str(tmp_path / "run-scores"), "--threshold",
                 "sensitivity", "--weights-dtype", "int8-last-stage", "--labels", "Pediatric_Pneumonia",
                 "--oof-scores", "run"]) == 0
    from_run = load_manifest(tmp_path / "run-scores")
    assert from_run.thresholds["Pediatric_Pneumonia"].value == pytest.approx(
        _midway_at_90([run_scores[i] for i in known], y), abs=1e-7)
    assert from_run.evaluation_summary["oof_scores"] == {"source": "the run's predictions_oof.csv (torch, float32)"}
    assert from_run.thresholds["Pediatric_Pneumonia"].value != threshold.value
    with pytest.raises(ValueError, match="oof_scores must be one of"):
        export_run(tmp_path / "b", tmp_path / "bad", oof_scores="torch")

    # Several runs: each run's units scored stored; the written OOF table holds both labels, each on its images.
    tb, _, ext = cohorts
    fit(tiny_config((tb, ext), name="tb-only", epochs_head=1, epochs_finetune=0, unfreeze="none"), tmp_path / "a")
    # Per-run folds: all three of tb-only, two of tb-ped; a run's OOF score weighs as many members as it ships.
    both = export_run([tmp_path / "a", tmp_path / "b"], tmp_path / "both", threshold="sensitivity",
                      weights_dtype="int8-last-stage", oof_out=tmp_path / "oof-both", folds=[[0, 1, 2], [0, 1]])
    record = load_manifest(both).evaluation_summary["oof_scores"]
    assert sorted(record["sha256"]) == [f"{run}/tiny/fold{k}" for run in ("tb-only", "tb-ped") for k in range(3)]
    shipped = [f"tb-only/tiny/fold{k}" for k in range(3)] + ["tb-ped/tiny/fold0", "tb-ped/tiny/fold1"]
    assert [m.sha256 for m in load_manifest(both).members] == [record["sha256"][unit] for unit in shipped]
    rows = read_csv(tmp_path / "oof-both" / "predictions_oof.csv")
    tb_rows = [r for r in rows if r["score_Tuberculosis__ensemble"]]
    def column(name: str) -> np.ndarray:
        return np.array([float(r[f"score_Tuberculosis__{name}"]) for r in tb_rows])
    np.testing.assert_allclose(column("ensemble"), (3 * column("tb-only") + 2 * column("tb-ped")) / 5, atol=1e-9)
    # ... with each image's demographics (subgroup figures of the package's own scores) and, as both runs split the
    # TB cohort alike, its fold (each fold's own threshold in `cxr-train evaluate`).
    fold_of = {r["image"]: r["fold"] for run in ("b", "a") for r in read_csv(tmp_path / run / "folds.csv")}
    assert {"sex", "age", "fold"} <= set(rows[0]) and all(r["fold"] == fold_of[r["image"]] for r in rows)
    assert any(r["sex"] for r in tb_rows) and any(r["age"] for r in tb_rows)
    fit(tiny_config((tb, ext), name="tb-seed1", seed=1, epochs_head=1, epochs_finetune=0, unfreeze="none"),
        tmp_path / "c")  # other folds of the same images: a row's fold would name no one model, so none is written
    assert [r["fold"] for r in read_csv(tmp_path / "c" / "folds.csv")] != [r["fold"] for r in read_csv(tmp_path / "a" /
                                                                                                   "folds.csv")]
    export_run([tmp_path / "a", tmp_path / "c"], tmp_path / "ac", threshold="sensitivity", oof_scores="run",
               oof_out=tmp_path / "oof-ac")
    assert "fold" not in read_csv(tmp_path / "oof-ac" / "predictions_oof.csv")[0]
    with pytest.raises(ValueError, match="one per --run-dir"):
        export_run([tmp_path / "a", tmp_path / "b"], tmp_path / "bad", folds=[[0], [1], [2]])

    # Onto a base package: the added members are the graphs that scored, and the scores are written out.
    base = export_run(tmp_path / "a", tmp_path / "base", weights_dtype="float16")
    onto = export_run(tmp_path / "b", tmp_path / "onto", base_package=base, folds=[1], threshold="sensitivity",
                      weights_dtype="int8-last-stage", oof_out=tmp_path / "oof-onto")
    added = load_manifest(onto).evaluation_summary["added"]
    assert sorted(added["oof_scores"]["sha256"]) == [f"tb-ped/tiny/fold{k}" for k in range(3)]
    assert load_manifest(onto).members[-1].sha256 == added["oof_scores"]["sha256"]["tb-ped/tiny/fold1"]
    assert load_manifest(onto).thresholds["Pediatric_Pneumonia"] == manifest.thresholds["Pediatric_Pneumonia"]
    assert (tmp_path / "oof-onto" / "predictions_oof.csv").read_bytes() == (
        tmp_path / "oof" / "predictions_oof.csv").read_bytes()  # the same stored graphs, the same scores

    # --oof-out never replaces a run's own predictions, nor other scores unless told to.
    with pytest.raises(ValueError, match="is a run directory"):
        export_run(tmp_path / "b", tmp_path / "bad", oof_out=tmp_path / "b")
    with pytest.raises(FileExistsError, match=r"predictions_oof\.csv exists"):
        export_run(tmp_path / "b", tmp_path / "bad", oof_out=tmp_path / "oof")
    assert not (tmp_path / "bad").exists()
    export_run(tmp_path / "b", tmp_path / "run-labels", labels=["Pediatric_Pneumonia"], oof_out=tmp_path / "oof-run")
    written = read_csv(tmp_path / "oof-run" / "predictions_oof.csv")
    assert [c for c in written[0] if c.startswith("score_")] == ["score_Pediatric_Pneumonia__tiny",
                                                                  "score_Pediatric_Pneumonia__ensemble"]
    assert [r["score_Pediatric_Pneumonia__ensemble"] for r in written] == [
        repr(float(r["score_Pediatric_Pneumonia__ensemble"])) for r in run_oof]
    assert {r["cohort"] for r in rows} == {"dev", "ped"}  # TB's rows named as its first run (tb-only) names them
    for row in rows:  # a label is scored where it is known, empty elsewhere
        assert bool(row["score_Tuberculosis__ensemble"]) == (row["cohort"] == "dev")
        assert bool(row["score_Pediatric_Pneumonia__ensemble"]) == (row["cohort"] == "ped")
