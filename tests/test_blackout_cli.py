"""`cxr-train audit-blackout`: lungs blacked out in the source image, scored like the run, merged into audits.json.

One tiny run whose positives carry a bright disc in the left lung. Audited with masks of both lungs the
disc is inside the mask: the AUROC falls towards 0.5. Audited with masks of the right lung only the disc
lies outside the mask: the AUROC does not fall. The source images are not square and the masks are
stored at half their size, so the blackout must happen in the source geometry (mask resized, nearest)
before the letterbox.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from training import audits
from training.audits import blackout_scores
from training.cli import main
from training.config import save_config
from training.predictions import load_prediction_dir
from training.prepare import prepare_run

from .test_loop import tiny_config

ROWS, COLS = 80, 64  # source geometry (letterboxed to 64 x 51 by the run's preprocessing)
LEFT_LUNG = (8, 52, 6, 28)  # y0, y1, x0, x1 in source pixels, end exclusive
RIGHT_LUNG = (8, 52, 36, 58)
DISC = ((17, 30), 7)  # centre (x, y) and radius: inside the left lung


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mask(lungs: tuple[tuple[int, int, int, int], ...]) -> np.ndarray:
    """A 0/255 lung mask at half the source size."""
    mask = np.zeros((ROWS // 2, COLS // 2), np.uint8)
    for y0, y1, x0, x1 in lungs:
        mask[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = 255
    return mask


def make_masked_cohort(folder: Path, name: str, n_patients: int, seed: int, unmasked: int = 0) -> Path:
    """Two 80x64 PNGs per patient (positives: a bright disc in the left lung), two mask sets.

    ``masks_both/`` outlines both lungs, ``masks_right/`` the right lung only. The manifest points at
    ``masks_both``; the last ``unmasked`` images have no mask.
    """
    rng = np.random.default_rng(seed)
    for kind, lungs in (("both", (LEFT_LUNG, RIGHT_LUNG)), ("right", (RIGHT_LUNG,))):
        (folder / f"masks_{kind}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"masks_{kind}" / "lungs.png"), _mask(lungs))
    lines = ["image,patient_id,site,label_tb,lung_mask"]
    n_images = 2 * n_patients
    for p in range(n_patients):
        positive = p % 2
        for v in range(2):
            img = cv2.GaussianBlur(rng.normal(90, 25, (ROWS, COLS)).clip(0, 255).astype(np.uint8), (0, 0), 2)
            if positive:
                cv2.circle(img, DISC[0], DISC[1], 230, -1)
            path = folder / f"{name}_{p:02d}_{v}.png"
            cv2.imwrite(str(path), img)
            mask = "" if 2 * p + v >= n_images - unmasked else "masks_both/lungs.png"
            lines.append(f"{path.name},{name}{p:02d},{name},{positive},{mask}")
    csv_path = folder / f"{name}.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def _use_masks(csv_path: Path, kind: str) -> None:
    csv_path.write_text(csv_path.read_text().replace("masks_both/", f"masks_{kind}/").replace(
        "masks_right/", f"masks_{kind}/"))


def _by_cohort(reports: list[dict]) -> dict[str, dict]:
    return {r["cohort"]: r for r in reports if r["kind"] == "lung_blackout"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A finished tiny run (3 folds, one architecture) with a thumbnail floor in audits.json."""
    root = tmp_path_factory.mktemp("blackout")
    dev = make_masked_cohort(root / "dev", "dev", 16, 0, unmasked=2)
    ext = make_masked_cohort(root / "ext", "ext", 8, 1)
    config = tiny_config((dev, ext), epochs_head=3, epochs_finetune=0, unfreeze="none", lr_head=0.03)
    save_config(config, root / "run.toml")
    run_dir = root / "run"
    assert main(["fit", "--config", str(root / "run.toml"), "--run-dir", str(run_dir)]) == 0
    assert main(["baseline", "--run-dir", str(run_dir), "--n-boot", "50"]) == 0
    return run_dir, dev, ext


def test_blackout_scores_follow_the_oof_and_external_assignment(
    run: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a blackout that changes nothing, the scores equal the ensemble column of the prediction CSVs."""
    run_dir, _, _ = run
    monkeypatch.setattr(audits, "lung_blackout", lambda image, mask, fill=0: image)
    from training.config import load_config

    data = prepare_run(load_config(run_dir / "config.toml"), run_dir)
    oof, externals = load_prediction_dir(run_dir)
    ext_cohort = data.externals[0][0]
    oof_rows = [data.cohort.images.index(str(i)) for i in oof.images]
    ext_rows = [ext_cohort.images.index(str(i)) for i in externals["ext"].images]
    keep = np.array([data.cohort.masks[i] is not None for i in oof_rows])
    assert keep.sum() == 30
    scores = blackout_scores(run_dir, data, {"dev": np.array(oof_rows)[keep], "ext": np.array(ext_rows)})
    np.testing.assert_allclose(scores["dev"][:, 0], oof.scores["Tuberculosis"]["ensemble"][keep], atol=1e-6)
    np.testing.assert_allclose(scores["ext"][:, 0], externals["ext"].scores["Tuberculosis"]["ensemble"], atol=1e-6)


def test_audit_blackout_inside_vs_outside_the_mask(run: tuple[Path, Path, Path]) -> None:
    run_dir, dev, ext = run
    audits_path = run_dir / "audits.json"
    floors = [a for a in json.loads(audits_path.read_text()) if a["kind"] == "thumbnail_floor"]
    assert {a["cohort"] for a in floors} == {"oof", "ext"}

    # the disc lies inside the masked lungs: the model loses its signal
    assert main(["audit-blackout", "--run-dir", str(run_dir), "--n-boot", "200"]) == 0
    written = json.loads(audits_path.read_text())
    assert [a for a in written if a["kind"] == "thumbnail_floor"] == floors  # the floor is kept
    inside = _by_cohort(written)
    assert set(inside) == {"oof", "ext"}
    assert inside["oof"]["n"] == 30 and inside["oof"]["n_without_mask"] == 2 and inside["ext"]["n"] == 16
    for report in inside.values():
        assert report["auroc_original"]["value"] > 0.9, report["verdict"]
        assert abs(report["auroc_blackout"]["value"] - 0.5) < 0.25, report["verdict"]
        assert report["fill"] == 0
    assert "falls to chance: the model reads the lungs" in inside["oof"]["verdict"]

    # masks of the right lung only: the disc in the left lung stays, so does the AUROC
    for csv_path in (dev, ext):
        _use_masks(csv_path, "right")
    assert main(["audit-blackout", "--run-dir", str(run_dir), "--fill", "background", "--n-boot", "200"]) == 0
    written = json.loads(audits_path.read_text())
    outside = _by_cohort(written)
    assert len([a for a in written if a["kind"] == "lung_blackout"]) == 2  # replaced, not appended
    assert [a for a in written if a["kind"] == "thumbnail_floor"] == floors
    for report in outside.values():
        assert report["auroc_blackout"]["value"] > 0.85, report["verdict"]
        assert report["fill"] == "background"
    assert "does not fall" in outside["oof"]["verdict"]

    # a later baseline keeps the blackout entries; evaluate reports both audits
    assert main(["baseline", "--run-dir", str(run_dir), "--n-boot", "50"]) == 0
    assert _by_cohort(json.loads(audits_path.read_text())) == outside
    assert main(["evaluate", "--run-dir", str(run_dir), "--n-boot", "50"]) == 0
    report = (run_dir / "report" / "report.md").read_text()
    section = report[report.index("## Shortcut audits"):]
    assert "- **thumbnail_floor** (oof, Tuberculosis): model AUROC" in section
    assert (f"- **lung_blackout** (oof, Tuberculosis): {outside['oof']['verdict']} [n=30, 14 pos; lungs set to "
            "the background grey; 2 image(s) without a lung mask left out]") in section
    assert f"- **lung_blackout** (ext, Tuberculosis): {outside['ext']['verdict']} [n=16, 8 pos;" in section


def test_audit_blackout_outside_a_run_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit-blackout", "--run-dir", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
