"""`cxr-train combine`: a package plus another package's members for some labels, copied byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ai.ensemble import Ensemble
from ai.manifest import MANIFEST_NAME, QUANTILE_POINTS, AgeRange, ScoreReference, load_manifest
from tests.conftest import REPO

pytest.importorskip("torch", reason="building test model packages needs the train extra (torch, timm)")

OTHER_LABELS = ("Pediatric_Pneumonia", "Effusion")


def train_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training.cli", "--log-level", "ERROR", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A TB package at 64 px and a two-label package at 96 px with its own thresholds, reference, ages and an
    informational label."""
    from tests.model_fixtures import build_tiny_package

    root = tmp_path_factory.mktemp("combine")
    points = [i / (QUANTILE_POINTS - 1) for i in range(QUANTILE_POINTS)]
    reference = ScoreReference("OOF ensemble", "ped", 30, 0.6, tuple(points), tuple(points), tuple(points))
    base = build_tiny_package(root / "base", labels=("Tuberculosis",), members=2, size=64, threshold=0.4,
                              version="1.0")
    other = build_tiny_package(root / "other", labels=OTHER_LABELS, members=2, size=96, seed=7, threshold=0.3,
                               version="2.0", informational=["Effusion"], reference={"Effusion": reference},
                               ages={"Pediatric_Pneumonia": AgeRange(1, 6, "children aged 1-5")})
    return base, other


def test_combine_copies_the_members_and_their_figures_and_scores_each_label_as_its_source(
    packages: tuple[Path, Path], tmp_path: Path
) -> None:
    base, other = packages
    out = tmp_path / "combined"
    run = train_cli("combine", "--base-package", str(base), "--add-package", str(other), "--labels", *OTHER_LABELS,
                    "--name", "tb+ped", "--version", "3.0", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert f"package: {out}" in run.stdout
    manifest, base_m, other_m = load_manifest(out), load_manifest(base), load_manifest(other)
    assert manifest.name == "tb+ped" and manifest.version == "3.0"
    assert manifest.labels == ("Tuberculosis", *OTHER_LABELS)
    assert manifest.preprocess == base_m.preprocess and manifest.input_sizes == (64, 96)
    # both sources name their files tiny_fold<k>.onnx: the added ones take the other package's name as a prefix
    renamed = [f"{other_m.name}_{m.file}" for m in other_m.members]
    assert [(m.file, m.sha256, m.labels, m.size) for m in manifest.members] == [
        (m.file, m.sha256, ("Tuberculosis",), None) for m in base_m.members] + [
        (name, m.sha256, OTHER_LABELS, 96) for name, m in zip(renamed, other_m.members, strict=True)]
    for source, member, name in [(base, m, m.file) for m in base_m.members] + [
            (other, m, name) for name, m in zip(renamed, other_m.members, strict=True)]:
        assert (out / name).read_bytes() == (source / member.file).read_bytes()
    assert manifest.thresholds == {**base_m.thresholds, **other_m.thresholds}
    assert manifest.reference == other_m.reference and manifest.ages == other_m.ages
    assert manifest.informational == ("Effusion",)
    assert manifest.evaluation_summary["base_package"]["version"] == "1.0"
    assert manifest.evaluation_summary["added_package"] == {
        "name": other_m.name, "version": "2.0", "labels": list(OTHER_LABELS),
        "evaluation_summary": other_m.evaluation_summary}
    assert "onnx_export" not in manifest.evaluation_summary  # nothing was exported here

    rng = np.random.default_rng(0)
    x64, x96 = rng.random((2, 3, 64, 64), dtype=np.float32), rng.random((2, 3, 96, 96), dtype=np.float32)
    together = Ensemble.load(out, threads=1).predict({64: x64, 96: x96})
    alone_base, alone_other = Ensemble.load(base, threads=1).predict(x64), Ensemble.load(other, threads=1).predict(x96)
    assert np.array_equal(together.probabilities[:, 0], alone_base.probabilities[:, 0])
    assert np.array_equal(together.cams[:, 0], alone_base.cams[:, 0])
    assert np.array_equal(together.probabilities[:, 1:], alone_other.probabilities)


def test_combine_refuses_what_it_cannot_copy_whole(packages: tuple[Path, Path], tmp_path: Path) -> None:
    base, other = packages
    carried = train_cli("combine", "--base-package", str(base), "--add-package", str(base), "--labels",
                        "Tuberculosis", "--out", str(tmp_path / "a"))
    assert carried.returncode == 2 and "carried already ['Tuberculosis']" in carried.stderr
    lacking = train_cli("combine", "--base-package", str(base), "--add-package", str(other), "--labels", "Fibrosis",
                        "--out", str(tmp_path / "b"))
    assert lacking.returncode == 2 and "missing there ['Fibrosis']" in lacking.stderr
    part = train_cli("combine", "--base-package", str(base), "--add-package", str(other), "--labels", "Effusion",
                     "--out", str(tmp_path / "c"))
    assert part.returncode == 2 and "carries ['Pediatric_Pneumonia'] too" in part.stderr
    long_name = train_cli("combine", "--base-package", str(base), "--add-package", str(other), "--labels",
                          *OTHER_LABELS, "--name", "x" * 65, "--out", str(tmp_path / "e"))
    assert long_name.returncode == 2 and "1-64 printable characters" in long_name.stderr  # the node could not say it
    import shutil

    changed = tmp_path / "other-clahe"
    shutil.copytree(other, changed)
    data = json.loads((changed / MANIFEST_NAME).read_text())
    data["preprocess"]["clahe_clip"] = 3.0
    (changed / MANIFEST_NAME).write_text(json.dumps(data))
    differs = train_cli("combine", "--base-package", str(base), "--add-package", str(changed), "--labels",
                        *OTHER_LABELS, "--out", str(tmp_path / "d"))
    assert differs.returncode == 2 and "only their input size may differ" in differs.stderr
    assert not any((tmp_path / name).exists() for name in "abcde")  # nothing half-written


def test_default_versions_fit_a_dicom_lo_value() -> None:
    from datetime import UTC, datetime

    from training.export import default_version

    today = datetime.now(UTC).strftime("%Y%m%d")
    assert default_version("tb-320") == f"tb-320-{today}"
    assert default_version("x" * 55) == f"{'x' * 55}-{today}"  # 64 characters: fits
    assert default_version("x" * 56) == today  # three runs' names and the date would not


def test_reissue_gives_the_current_age_ranges_under_a_new_version_and_nothing_else(
    packages: tuple[Path, Path], tmp_path: Path
) -> None:
    """A package made before Tuberculosis had an age range gets it, and only it, with a version of its own: the same
    member bytes, thresholds and references, so every score is the same and only who may get the label changes."""
    from training.labels import LABEL_AGES

    base, other = packages
    combined = tmp_path / "combined"
    assert train_cli("combine", "--base-package", str(base), "--add-package", str(other), "--labels",
                     *OTHER_LABELS, "--version", "3.0", "--out", str(combined)).returncode == 0
    before = json.loads((combined / MANIFEST_NAME).read_text())  # as written before the table named Tuberculosis,
    before["ages"] = {"Pediatric_Pneumonia": LABEL_AGES["Pediatric_Pneumonia"].to_dict(),  # with a range for a
                      "Effusion": {"from_years": 18, "below_years": 90, "population": "adults"}}  # label it has none
    (combined / MANIFEST_NAME).write_text(json.dumps(before))
    out = tmp_path / "reissued"
    run = train_cli("reissue", "--package", str(combined), "--version", "3.1", "--out", str(out))
    assert run.returncode == 0, run.stderr
    old, new = load_manifest(combined), load_manifest(out, verify=True)
    assert new.version == "3.1" and new.name == old.name
    assert list(new.ages.items()) == [("Tuberculosis", LABEL_AGES["Tuberculosis"]),  # in the package's label order
                                      ("Pediatric_Pneumonia", old.ages["Pediatric_Pneumonia"])]
    assert (new.members, new.thresholds, new.reference, new.informational) == (
        old.members, old.thresholds, old.reference, old.informational)
    for member in old.members:
        assert (out / member.file).read_bytes() == (combined / member.file).read_bytes()
    after = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(k for k in {*before, *after} if before.get(k) != after.get(k)) == [
        "ages", "created", "evaluation_summary", "version"]
    assert after["evaluation_summary"] == {**before["evaluation_summary"], "reissues": [
        {"from_version": "3.0", "ages_changed": ["Effusion", "Tuberculosis"]}]}
    assert new.same_score_versions == ("3.0",) and old.same_score_versions == ()  # a site's thresholds carry over
    assert train_cli("reissue", "--package", str(combined), "--version", "3.1", "--out", str(out)).returncode != 0
    assert train_cli("reissue", "--package", str(combined), "--version", "3.1", "--out", str(out),
                     "--overwrite").returncode == 0

    again = train_cli("reissue", "--package", str(out), "--version", "3.2", "--out", str(tmp_path / "again"))
    assert again.returncode != 0 and "carries the current age ranges already" in again.stderr
    same = train_cli("reissue", "--package", str(combined), "--version", "3.0", "--out", str(tmp_path / "same"))
    assert same.returncode != 0 and "a version of its own" in same.stderr
    assert not (tmp_path / "again").exists() and not (tmp_path / "same").exists()
