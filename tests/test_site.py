"""Site calibration (`cxr-train site-threshold`): threshold rule, held-out estimate, node round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ai.ensemble import Ensemble
from ai.gate import GATE_LABELS, GateVerdict
from node.config import load_settings
from node.filter import FilterRules
from node.predict import predict_one
from training import metrics
from training.cli import main
from training.data import load_cohort
from training.evaluate import ENSEMBLE, PredictionTable, read_predictions
from training.site import calibrate_label, crossval_threshold, floor_threshold, score_cohort
from training.splits import grouped_stratified_kfold

from .model_fixtures import build_tiny_package
from .test_loop import make_cohort


def gate_off(folder: Path) -> Path:
    """A node.toml whose input gate is off: the synthetic test images are no chest radiographs."""
    path = folder / "node_gate_off.toml"
    path.write_text('[model]\ngate = "off"\n')
    return path


def _shifted_site(n_pos: int = 40, n_neg: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A site whose positives score low (0.15-0.45) but still above most negatives (0-0.25)."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    p = np.r_[rng.uniform(0.15, 0.45, n_pos), rng.uniform(0.0, 0.25, n_neg)]
    groups = np.array([f"P{i:03d}" for i in range(y.size)])
    return y, p, groups


def _table(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> PredictionTable:
    return PredictionTable(images=groups, patient_ids=groups, labels={"Tuberculosis": y},
                           scores={"Tuberculosis": {"m0": p}}, name="site")


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


def test_a_patients_images_share_one_fold_and_widen_the_ci() -> None:
    y, p, _ = _shifted_site()
    groups = np.array([f"P{i // 2:03d}" for i in range(y.size)])  # two images per patient
    y = np.repeat(y[::2], 2)
    result = crossval_threshold(y, p, groups, target=0.90, k=5, n_boot=300)
    folds = result["image_folds"]
    for patient in np.unique(groups):
        assert np.unique(folds[groups == patient]).size == 1, patient
    pooled = result["pooled"]
    assert pooled["ci"] == "patient bootstrap"
    alone = crossval_threshold(y, p, np.arange(y.size).astype(str), target=0.90, k=5)["pooled"]
    assert alone["ci"] == "wilson"
    sens = pooled["sensitivity"]
    assert sens["low"] <= sens["value"] <= sens["high"] and sens["k"] == pooled["tp"]


def test_per_fold_rates_match_the_pooled_counts() -> None:
    y, p, groups = _shifted_site(seed=2)
    result = crossval_threshold(y, p, groups, target=0.90, k=5)
    assert sum(f["true_negatives"] for f in result["folds"]) == result["pooled"]["tn"]
    for f in result["folds"]:
        assert f["sensitivity"] == pytest.approx(f["true_positives"] / f["positives"])
        assert f["specificity"] == pytest.approx(f["true_negatives"] / f["negatives"])


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


def test_written_threshold_is_rounded_down_so_every_positive_call_stays_positive() -> None:
    y, p, _ = _shifted_site(seed=4)
    chosen = metrics.threshold_for_sensitivity(y, p, 0.90)
    written = floor_threshold(chosen)
    p = np.r_[p, (written + chosen) / 2]  # a score between the written and the chosen value
    assert written < chosen and chosen - written < 1e-6
    assert np.all((p >= written)[p >= chosen])  # a superset of the images called positive
    assert (p >= written).sum() == (p >= chosen).sum() + 1


def test_too_small_a_sample_is_refused_with_the_counts() -> None:
    y, p, groups = _shifted_site(n_pos=6, n_neg=30)
    with pytest.raises(ValueError, match=r"site, Tuberculosis: .*at least 10 positive and 10 negative patients, "
                                         r"found 6 and 30"):
        calibrate_label(_table(y, p, groups), "Tuberculosis", package_threshold=0.5)


@pytest.mark.parametrize("member_sizes", [None, (64, 96)], ids=["one size", "members of two sizes"])
def test_cli_scores_as_the_node_does_and_writes_a_threshold_the_node_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], member_sizes: tuple[int, int] | None
) -> None:
    package = build_tiny_package(tmp_path / "pkg", members=2, size=64, threshold=0.5, member_sizes=member_sizes)
    cohort = make_cohort(tmp_path / "site", "site", 24, seed=5)
    out = tmp_path / "calib"
    code = main(["site-threshold", "--package", str(package), "--cohort", str(cohort), "--out", str(out),
                 "--folds", "3", "--n-boot", "100", "--threads", "1", "--node-config", str(gate_off(tmp_path))])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[thresholds]" in printed and "Tuberculosis = " in printed

    table = read_predictions(out / "scores_site.csv")
    assert len(table) == 48
    ensemble = Ensemble.load(package, threads=1)
    settings = load_settings(None, environ={})
    for i in (0, 17):  # the node's own offline scoring path gives the same ensemble score
        row = predict_one(tmp_path / "site" / table.images[i], ensemble, settings, FilterRules.load(None))
        assert table.scores["Tuberculosis"][ENSEMBLE][i] == pytest.approx(row["scores"]["Tuberculosis"], abs=1e-6)
        members = [table.scores["Tuberculosis"][f"member{m}"][i] for m in range(2)]
        assert np.mean(members) == pytest.approx(table.scores["Tuberculosis"][ENSEMBLE][i], abs=1e-6)

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


def _cli(tmp_path: Path, package: Path, cohort: Path, *extra: str) -> int:
    out = tmp_path / "o"
    return main(["site-threshold", "--package", str(package), "--cohort", str(cohort), "--out", str(out),
                 "--n-boot", "50", "--threads", "1", "--node-config", str(gate_off(tmp_path)), *extra])


def test_cli_refuses_a_too_small_sample_before_scoring_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = build_tiny_package(tmp_path / "pkg", members=1, size=64)
    cohort = make_cohort(tmp_path / "site", "site", 12, seed=8)  # 6 positive patients
    assert _cli(tmp_path, package, cohort) == 2
    assert "at least 10 positive and 10 negative patients, found 6 and 6" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("option", "value"), [("--target-sensitivity", "1.5"), ("--folds", "1")])
def test_cli_refuses_a_bad_target_or_k(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str,
                                       value: str) -> None:
    package = build_tiny_package(tmp_path / "pkg", members=1, size=64)
    cohort = make_cohort(tmp_path / "site", "site", 24, seed=9)
    assert _cli(tmp_path, package, cohort, option, value) == 2
    assert "--target-sensitivity must be in (0, 1] and --folds at least 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_names_the_manifest_line_of_an_unreadable_image_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = build_tiny_package(tmp_path / "pkg", members=1, size=64)
    cohort = make_cohort(tmp_path / "site", "site", 24, seed=10)
    lines = cohort.read_text().splitlines()
    (tmp_path / "site" / lines[4].split(",")[0]).write_bytes(b"not a png")  # lines[4] is the CSV's line 5
    assert _cli(tmp_path, package, cohort) == 2
    err = capsys.readouterr().err
    assert "site.csv line 5: cannot be analysed as the node would" in err
    assert not (tmp_path / "o").exists()


def test_dicom_images_pass_the_nodes_filter_first(tmp_path: Path) -> None:
    """A lateral DICOM in the sample is left out (and listed), as the node would never score it."""
    from .test_worker import chest

    package = build_tiny_package(tmp_path / "pkg", members=1, size=64)
    cohort = make_cohort(tmp_path / "site", "site", 24, seed=11)
    lines = cohort.read_text().splitlines()
    for line_no, view in ((2, "PA"), (3, "LL")):
        ds = chest()
        ds.ViewPosition = view
        name = f"dicom_{view}.dcm"
        ds.save_as(tmp_path / "site" / name, enforce_file_format=True)
        lines[line_no - 1] = name + "," + lines[line_no - 1].split(",", 1)[1]
    cohort.write_text("\n".join(lines) + "\n")
    assert _cli(tmp_path, package, cohort) == 0
    result = json.loads((tmp_path / "o" / "site_threshold.json").read_text())
    assert [e["line"] for e in result["excluded_by_filter"]] == [3]
    assert "lateral" in result["excluded_by_filter"][0]["reason"]
    table = read_predictions(tmp_path / "o" / "scores_site.csv")
    assert len(table) == 47 and "dicom_PA.dcm" in set(table.images) and "dicom_LL.dcm" not in set(table.images)
    assert "1 image(s) left out because the node's filter" in (tmp_path / "o" / "site_threshold.md").read_text()


def test_an_image_the_nodes_input_gate_refuses_does_not_count(tmp_path: Path) -> None:
    """The gate that node.toml names runs before the model, as in the node: a uniform plate is refused, left
    out of the scores and the calibration, and counted in the report."""
    import cv2

    package = build_tiny_package(tmp_path / "pkg", members=1, size=64)
    gate = build_tiny_package(tmp_path / "gate", labels=GATE_LABELS, members=1, size=64, threshold=0.0)
    cohort = make_cohort(tmp_path / "site", "site", 24, seed=12)
    blank = cohort.read_text().splitlines()[3].split(",")[0]  # the CSV's line 4
    cv2.imwrite(str(tmp_path / "site" / blank), np.full((64, 64), 128, np.uint8))
    node_toml = tmp_path / "node.toml"
    node_toml.write_text(f'[model]\ngate = "{gate}"\n')
    out = tmp_path / "o"
    assert main(["site-threshold", "--package", str(package), "--cohort", str(cohort), "--out", str(out),
                 "--n-boot", "50", "--threads", "1", "--node-config", str(node_toml)]) == 0
    result = json.loads((out / "site_threshold.json").read_text())
    assert result["refused_by_gate"] == [{"line": 4, "reason": "image has no usable content (a uniform field)"}]
    assert result["excluded_by_filter"] == [] and result["gate"] == "tiny-test 0.0.0-test"
    assert result["labels"][0]["n"] == 47
    table = read_predictions(out / "scores_site.csv")
    assert len(table) == 47 and blank not in set(table.images)
    assert "1 image(s) left out because the node's input gate refused them" in (out / "site_threshold.md").read_text()


class _RefuseEveryThird:
    """A stand-in for ``ai.gate.InputGate`` (same ``check(image) -> GateVerdict``): refuses the 3rd, 6th ...
    image it is shown, as its view classifier refuses a lateral view."""

    def __init__(self) -> None:
        self.calls = 0

    def check(self, image: np.ndarray) -> GateVerdict:
        self.calls += 1
        if self.calls % 3:
            return GateVerdict(analysable=True)
        return GateVerdict(analysable=False, reason="image is not a frontal chest radiograph (p = 0.01; most "
                                                    "likely a lateral view)")


def test_score_cohort_counts_only_what_the_gate_lets_through(tmp_path: Path) -> None:
    package = build_tiny_package(tmp_path / "pkg", members=1, size=64)
    cohort = load_cohort(make_cohort(tmp_path / "site", "site", 6, seed=13))
    gate = _RefuseEveryThird()
    scored = score_cohort(package, cohort, ["Tuberculosis"], threads=1, gate=gate)  # type: ignore[arg-type]
    assert gate.calls == 12
    assert [e["line"] for e in scored.refused_by_gate] == [4, 7, 10, 13]
    assert all("lateral view" in e["reason"] for e in scored.refused_by_gate) and scored.excluded == []
    refused = {cohort.images[e["line"] - 2] for e in scored.refused_by_gate}
    assert len(scored.table) == 8 and not refused & set(scored.table.images)


def test_unlabelled_site_images_get_the_suggestion_the_node_would_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ai.adapt import suggest
    from tests.test_sites import beta_reference
    from training.site_unlabelled import MIN_IMAGES

    cohort = make_cohort(tmp_path / "site", "site", 30, 4)  # 60 images; their labels are never read
    folder = cohort.parent
    bare = build_tiny_package(tmp_path / "bare", size=64, members=1)
    package = build_tiny_package(tmp_path / "pkg", size=64, members=1, reference={"Tuberculosis": beta_reference()})
    args = ["site-threshold", "--package", str(package), "--unlabelled", str(folder), "--threads", "1",
            "--node-config", str(gate_off(tmp_path))]
    assert main([*args, "--out", str(tmp_path / "stated"), "--prevalence", "Tuberculosis=0.2"]) == 0
    stated = json.loads((tmp_path / "stated" / "site_suggestion.json").read_text())
    assert stated["scored"] == stated["images"] == 60 and stated["skipped"] == []
    entry = stated["labels"][0]["suggestion"]
    assert entry["prevalence"] == 0.2 and entry["prevalence_source"] == "stated"
    scores = np.loadtxt(tmp_path / "stated" / "scores_unlabelled.csv", delimiter=",", skiprows=1, usecols=1)
    expected = suggest(scores, beta_reference(), 0.5, prevalence=0.2)
    assert entry["threshold"] == pytest.approx(expected.threshold, abs=1e-6)  # what cxr-node sites computes
    assert "suggested" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "guessed")]) == 0
    guessed = json.loads((tmp_path / "guessed" / "site_suggestion.json").read_text())
    assert guessed["labels"][0]["suggestion"]["prevalence_source"] == "estimated"
    assert "prediction alignment" in (tmp_path / "guessed" / "site_suggestion.md").read_text()

    for extra, message in [(["--prevalence", "Mass=0.1"], "expected labels of the package"),
                           (["--prevalence", "Tuberculosis=1.2"], "expected labels of the package")]:
        assert main([*args, "--out", str(tmp_path / "bad"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["site-threshold", "--package", str(bare), "--unlabelled", str(folder), "--out",
                 str(tmp_path / "bad"), "--node-config", str(gate_off(tmp_path))]) == 2
    assert "carries no reference score distribution" in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    for png in sorted(folder.rglob("*.png"))[: MIN_IMAGES - 1]:
        (few / png.name).write_bytes(png.read_bytes())
    assert main([*args[:4], str(few), *args[5:], "--out", str(tmp_path / "bad")]) == 2
    assert f"{MIN_IMAGES - 1} of {MIN_IMAGES - 1} images could be scored" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
