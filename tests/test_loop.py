"""Training loop on a tiny synthetic cohort: units, OOF predictions, externals, resume after interruption."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from training.config import CohortConfig, ConfigError, RunConfig, with_overrides
from training.loop import (
    UnitKey,
    balance_weights,
    epoch_metrics,
    fit,
    load_unit_model,
    prepare_run,
    read_log,
    unit_probabilities,
)

N_PATIENTS = 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cohort(folder: Path, name: str, n_patients: int, seed: int) -> Path:
    """Two 64x64 PNGs per patient; positives carry a bright disc in the left lung area."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,patient_id,site,label_tb,sex,age"]
    for p in range(n_patients):
        positive = p % 2
        for v in range(2):
            img = rng.normal(90, 25, (64, 64)).clip(0, 255).astype(np.uint8)
            img = cv2.GaussianBlur(img, (0, 0), 2)
            if positive:
                cv2.circle(img, (20, 28), 8, 230, -1)
            path = folder / f"{name}_{p:02d}_{v}.png"
            cv2.imwrite(str(path), img)
            lines.append(f"{path.name},{name}{p:02d},{name},{positive},{'MF'[p % 2]},{30 + p}")
    csv_path = folder / f"{name}.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cohorts")
    return make_cohort(root / "dev", "dev", N_PATIENTS, 0), make_cohort(root / "ext", "ext", 5, 1)


def tiny_config(cohorts: tuple[Path, Path], **changes: Any) -> RunConfig:
    train_csv, external_csv = cohorts
    config = RunConfig(
        train=(CohortConfig("dev", str(train_csv)),),
        external=(CohortConfig("ext", str(external_csv)),),
        name="tiny-test",
        architectures=("tiny",),
        init="random",
        folds=3,
        image_size=64,
        preprocess={"field_detection": False},
        epochs_head=2,
        epochs_finetune=2,
        lr_head=0.01,
        lr_finetune=0.005,
        batch_size=8,
        drop_rate=0.2,
        loss="dynamic_bce",
        patience=5,
        progress=False,
        threads=1,
    )
    return with_overrides(config, **changes) if changes else config


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_fit_writes_units_logs_and_predictions(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    config = tiny_config(cohorts)
    result = fit(config, tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "config.toml").is_file() and (run / "folds.csv").is_file()
    assert result.units == tuple(UnitKey("tiny", f) for f in range(3))
    log = read_log(run / "units" / "tiny" / "fold0" / "log.csv")
    assert [r["phase"] for r in log] == ["head", "head", "finetune", "finetune"]
    assert set(log[0]) == {
        "epoch", "phase", "lr", "train_loss", "val_loss", "auroc", "auprc",
        "sensitivity", "specificity", "f1", "seconds", "inner_loss",
    }
    assert all((run / "units" / "tiny" / f"fold{f}" / "done.json").is_file() for f in range(3))

    oof = read_csv(run / "predictions_oof.csv")
    assert sorted(r["image"] for r in oof) == sorted(f"dev_{p:02d}_{v}.png" for p in range(N_PATIENTS) for v in (0, 1))
    assert {"label_Tuberculosis", "score_Tuberculosis__tiny", "score_Tuberculosis__ensemble"} <= set(oof[0])
    folds = {r["image"]: int(r["fold"]) for r in read_csv(run / "folds.csv")}
    assert all(int(r["fold"]) == folds[r["image"]] for r in oof)
    external = read_csv(run / "predictions_ext.csv")
    assert len(external) == 10 and "fold" not in external[0]


@pytest.mark.slow
def test_the_seed_configuration_runs_from_its_file_to_the_node_at_toy_scale(
    cohorts: tuple[Path, Path], tmp_path: Path
) -> None:
    """The seed's 13 x 5 file with only its scale cut (one fold, one epoch a phase, 64 px, the tiny cohorts): every
    architecture trains with the file's own settings, exports with parity, and the node's ensemble scores an external
    image as the run did."""
    from ai.ensemble import Ensemble
    from ai.pixels import read_image_file
    from training.config import load_config
    from training.evaluate import evaluate_dir
    from training.export_run import export_run

    seed = load_config(Path(__file__).resolve().parents[1] / "training" / "configs" / "seed_13x5.toml")
    train_csv, external_csv = cohorts
    config = with_overrides(
        seed, train=(CohortConfig("dev", str(train_csv)),), external=(CohortConfig("ext", str(external_csv)),),
        run_folds=(0,), epochs_head=1, epochs_finetune=1, image_size=64, batch_size=8, num_workers=0, threads=1,
        preprocess={**seed.preprocess, "field_detection": False},  # synthetic squares have no X-ray field to find
    )
    assert (config.init, config.unfreeze, config.device, config.amp) == ("random", "all", "auto", True)
    run = tmp_path / "run"
    result = fit(config, run)
    assert [key.architecture for key in result.units] == list(seed.architectures) and len(result.units) == 13

    evaluate_dir(run, run / "report", n_boot=20)
    results = json.loads((run / "report" / "results.json").read_text())
    reported = results["cohorts"]["ext"]["labels"]["Tuberculosis"]["models"]
    assert set(reported) == {*seed.architectures, "ensemble"}

    package = export_run(run, tmp_path / "pkg", version="0.0.1", threshold="sensitivity")
    ensemble = Ensemble.load(package, threads=1)
    member = {m.architecture: i for i, m in enumerate(ensemble.manifest.members)}
    assert sorted(member) == sorted(seed.architectures)
    row = read_csv(run / "predictions_ext.csv")[0]
    inputs, _ = ensemble.inputs(read_image_file(external_csv.parent / row["image"]))
    prediction = ensemble.predict({size: x[None] for size, x in inputs.items()})
    for architecture, m in member.items():  # one fold: each member's score is its architecture's in the run
        assert prediction.member_probabilities[m, 0, 0] == pytest.approx(
            float(row[f"score_Tuberculosis__{architecture}"]), abs=1e-4), architecture
    assert prediction.probabilities[0, 0] == pytest.approx(float(row["score_Tuberculosis__ensemble"]), abs=1e-4)


def test_oof_scores_come_from_the_held_out_fold_model(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    config = tiny_config(cohorts, epochs_head=1, epochs_finetune=0, unfreeze="none")
    fit(config, tmp_path / "run")
    data = prepare_run(config, tmp_path / "run")
    oof = {r["image"]: r for r in read_csv(tmp_path / "run" / "predictions_oof.csv")}
    external_members = []
    for fold in range(3):
        held_out = np.flatnonzero(data.folds == fold)
        (tmp_path / "run" / "units" / "tiny" / f"fold{fold}" / "pred_oof.npy").unlink()  # force recomputation
        prob = unit_probabilities(data, UnitKey("tiny", fold), "oof", data.images, held_out)
        for row, p in zip(held_out, prob[:, 0], strict=True):
            assert float(oof[data.cohort.images[row]]["score_Tuberculosis__tiny"]) == pytest.approx(p, abs=1e-6)
        _, pixels = data.externals[0]
        external_members.append(unit_probabilities(data, UnitKey("tiny", fold), "check", pixels)[:, 0])
    ext = read_csv(tmp_path / "run" / "predictions_ext.csv")
    mean = np.mean(external_members, axis=0)
    assert [float(r["score_Tuberculosis__tiny"]) for r in ext] == pytest.approx(mean.tolist(), abs=1e-6)


class InterruptError(RuntimeError):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [1, 3])  # mid head phase; mid fine-tune phase
def test_resume_after_interruption_equals_uninterrupted(
    cohorts: tuple[Path, Path], tmp_path: Path, stop_after: int
) -> None:
    config = tiny_config(cohorts, architectures=("tiny",), run_folds=(0, 1), balance_sampling=True)
    fit(config, tmp_path / "straight")

    def interrupt(key: UnitKey, row: dict[str, Any]) -> None:
        if key == UnitKey("tiny", 1) and row["epoch"] == stop_after:
            raise InterruptError

    with pytest.raises(InterruptError):
        fit(config, tmp_path / "resumed", on_epoch_end=interrupt)
    assert not (tmp_path / "resumed" / "units" / "tiny" / "fold1" / "done.json").exists()
    epochs_after: list[tuple[UnitKey, int]] = []
    fit(None, tmp_path / "resumed", on_epoch_end=lambda key, row: epochs_after.append((key, row["epoch"])))
    assert epochs_after[0] == (UnitKey("tiny", 1), stop_after + 1)  # continued, not restarted

    for fold in (0, 1):
        unit = Path("units") / "tiny" / f"fold{fold}"
        a = torch.load(tmp_path / "straight" / unit / "model.pt")
        b = torch.load(tmp_path / "resumed" / unit / "model.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"fold {fold} weights differ"
        strip = [
            {k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / "straight" / unit / "log.csv")
        ]
        again = [
            {k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / "resumed" / unit / "log.csv")
        ]
        assert strip == again
    for name in ("predictions_oof.csv", "predictions_ext.csv"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_changed_config_on_existing_run_is_refused(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    config = tiny_config(cohorts, epochs_head=1, epochs_finetune=0, run_folds=(0,))
    fit(config, tmp_path / "run")
    with pytest.raises(ConfigError, match="lr_head: differs"):
        fit(with_overrides(config, lr_head=0.5), tmp_path / "run")
    fit(with_overrides(config, num_workers=0, threads=1), tmp_path / "run")  # runtime keys may change
    assert len(read_csv(tmp_path / "run" / "predictions_oof.csv")) < 2 * N_PATIENTS  # only fold 0


def test_cached_features_match_the_image_path_for_the_head(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    """Frozen backbone + no augmentation + no dropout: training the head on cached features is exact."""
    base = dict(epochs_head=2, epochs_finetune=0, unfreeze="none", run_folds=(0,), drop_rate=0.0)
    from training.augment import AugmentConfig

    plain = tiny_config(cohorts, **base, augment=AugmentConfig.none())
    fit(plain, tmp_path / "images")
    fit(with_overrides(plain, cache_features=True), tmp_path / "features")
    a = torch.load(tmp_path / "images" / "units" / "tiny" / "fold0" / "model.pt")
    b = torch.load(tmp_path / "features" / "units" / "tiny" / "fold0" / "model.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_last_two_stages_fine_tunes_one_stage_more(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    """The same run with ``unfreeze = "last_two_stages"``: the head phase is identical, then fine-tuning moves the
    second-to-last stage too (TinyNet: stage1), and the stem stays as the head phase left it."""
    base = tiny_config(cohorts, epochs_head=1, epochs_finetune=2, run_folds=(0,), monitor="training")
    fit(base, tmp_path / "one")
    fit(with_overrides(base, unfreeze="last_two_stages"), tmp_path / "two")
    one = torch.load(tmp_path / "one" / "units" / "tiny" / "fold0" / "checkpoint.pt", weights_only=False)["model"]
    two = torch.load(tmp_path / "two" / "units" / "tiny" / "fold0" / "checkpoint.pt", weights_only=False)["model"]
    for key in one:
        if ".stem." in key:
            torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)
    stage1 = [k for k in one if ".stage1." in k and k.endswith("weight")]
    assert stage1 and any(not torch.equal(one[k], two[k]) for k in stage1)


def test_balance_weights_equalise_classes() -> None:
    y = np.array([[1.0], [0.0], [0.0], [0.0], [np.nan]])
    w = np.array(balance_weights(y))
    assert w[0] == pytest.approx(3 * w[1]) and w[4] == 1.0
    assert w[0] == pytest.approx(w[1:4].sum())


def test_epoch_metrics_hand_case() -> None:
    y = np.array([[1.0], [1.0], [0.0], [0.0], [np.nan]])
    p = np.array([[0.9], [0.4], [0.6], [0.1], [0.99]])
    m = epoch_metrics(y, p)
    assert m["auroc"] == pytest.approx(0.75)
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5 and m["f1"] == pytest.approx(0.5)


@pytest.mark.parametrize(("monitor", "cache_features"), [("training", False), ("training", True),
                                                         ("inner", False), ("inner", True), ("validation", False)])
def test_monitors_but_validation_let_the_held_out_fold_decide_nothing(
    cohorts: tuple[Path, Path], tmp_path: Path, monitor: str, cache_features: bool
) -> None:
    """With monitor = "training" or "inner" the held-out images cannot change the kept weights (unbiased OOF
    scores); with "validation" (the control) they do, through early stopping, the LR schedule and the kept
    epoch."""
    train_csv, external_csv = cohorts
    copies = {}
    for name in ("as_is", "changed"):
        folder = tmp_path / name
        shutil.copytree(train_csv.parent, folder)
        copies[name] = folder / train_csv.name
    changes = dict(run_folds=(0,), patience=1, lr_patience=0, epochs_head=3, epochs_finetune=3, monitor=monitor,
                   cache_features=cache_features)
    config = with_overrides(tiny_config((copies["as_is"], external_csv)), **changes)
    fit(config, tmp_path / "run_as_is")
    held_out = [r["image"] for r in read_csv(tmp_path / "run_as_is" / "folds.csv") if r["fold"] == "0"]
    rng = np.random.default_rng(1)
    for image in held_out:  # fold 0's own images, replaced by noise: only its validation loss sees them
        cv2.imwrite(str(copies["changed"].parent / image), rng.integers(0, 256, (64, 64), dtype=np.uint8))
    fit(with_overrides(config, train=(CohortConfig("dev", str(copies["changed"])),)), tmp_path / "run_changed")
    unit = Path("units") / "tiny" / "fold0"
    a = torch.load(tmp_path / "run_as_is" / unit / "model.pt")
    b = torch.load(tmp_path / "run_changed" / unit / "model.pt")
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == (monitor != "validation")
    done = json.loads((tmp_path / "run_as_is" / unit / "done.json").read_text())
    assert done["monitor"] == monitor
    log = read_log(tmp_path / "run_as_is" / unit / "log.csv")
    if monitor == "training":
        assert done["best_epoch"] == int(min(log, key=lambda r: float(r["train_loss"]))["epoch"])
    if monitor == "inner":  # compared across phases, like the held-out loss
        assert done["best_epoch"] == int(min(log, key=lambda r: float(r["inner_loss"]))["epoch"])
        assert done["best_monitored_loss"] == pytest.approx(min(float(r["inner_loss"]) for r in log), rel=1e-5)
        for phase in ("head", "finetune"):  # each phase ran its 3 epochs or stopped after 1 without a better loss
            rows = [r for r in log if r["phase"] == phase]
            if len(rows) < 3:
                earlier = [float(r["inner_loss"]) for r in log if int(r["epoch"]) < int(rows[-1]["epoch"])]
                assert float(rows[-1]["inner_loss"]) >= min(earlier)
    else:
        assert all(r["inner_loss"] == "" for r in log)


def test_monitor_training_compares_losses_within_a_phase(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    """The fine-tune phase's augmented training loss never beats the head phase's here; the kept weights must
    still come from the fine-tune phase, not from phase 1 (its loss is not comparable)."""
    config = tiny_config(cohorts, run_folds=(0,), epochs_head=3, epochs_finetune=2, lr_head=0.05,
                         lr_finetune=1e-6, drop_rate=0.9, patience=5, monitor="training")
    fit(config, tmp_path / "run")
    unit = tmp_path / "run" / "units" / "tiny" / "fold0"
    log = read_log(unit / "log.csv")
    head = [float(r["train_loss"]) for r in log if r["phase"] == "head"]
    finetune = [float(r["train_loss"]) for r in log if r["phase"] == "finetune"]
    assert min(head) < min(finetune), "the setting no longer makes phase 1's loss the lower one"
    done = json.loads((unit / "done.json").read_text())
    assert done["best_epoch"] == 3 + 1 + int(np.argmin(finetune))
    assert done["best_monitored_loss"] == pytest.approx(min(finetune), rel=1e-5)


def test_trim_log_keeps_complete_rows_up_to_the_checkpoint(tmp_path: Path) -> None:
    from training.loop import LOG_COLUMNS, _append_log, _trim_log

    log = tmp_path / "log.csv"
    for epoch in (1, 2, 3):
        _append_log(log, {"epoch": epoch, "phase": "head", "lr": 0.001, "train_loss": 0.5})
    whole = log.read_bytes()
    _trim_log(log, 3)
    assert log.read_bytes() == whole  # nothing to drop: untouched
    _trim_log(log, 2)  # epoch 3 logged, but the checkpoint holds epoch 2
    assert [r["epoch"] for r in read_csv(log)] == ["1", "2"]

    with log.open("ab") as handle:  # a crash or a full disk cut the next append short
        handle.write(b"3,hea")
    _trim_log(log, 5)
    assert [r["epoch"] for r in read_csv(log)] == ["1", "2"]
    _append_log(log, {"epoch": 3, "phase": "head"})
    assert [r["epoch"] for r in read_csv(log)] == ["1", "2", "3"]
    assert list(read_csv(log)[0]) == list(LOG_COLUMNS)

    log.write_text("epoch,pha")  # even the header was cut: the log starts again
    _trim_log(log, 5)
    assert not log.exists()

    old = ",".join(LOG_COLUMNS[:-1])  # a unit begun before the inner_loss column: its rows are kept
    log.write_text(f"{old}\n1,head,0.001,0.5,0.6,0.7,0.6,0.5,0.5,0.5,12\n2,head,0.001,0.4,0.5,0.7,0.6,0.5,0.5,0.5,12\n")
    _trim_log(log, 5)
    rows = read_csv(log)
    assert list(rows[0]) == list(LOG_COLUMNS) and [r["train_loss"] for r in rows] == ["0.5", "0.4"]
    assert all(r["inner_loss"] == "" for r in rows)
    _append_log(log, {"epoch": 3, "phase": "finetune", "inner_loss": 0.3})
    assert [r["inner_loss"] for r in read_csv(log)] == ["", "", "0.3"]


def test_a_cohort_with_its_own_column_names_trains_grouped_by_them(
    cohorts: tuple[Path, Path], tmp_path: Path
) -> None:
    # The pediatric set's layout: group_hint groups a child's images, no site column, label_pneumonia.
    rows = read_csv(cohorts[0])
    ped = cohorts[0].parent / "ped.csv"
    lines = ["image,group_hint,label_pneumonia"] + [f"{r['image']},child:{r['patient_id']},{r['label_tb']}"
                                                   for r in rows]
    ped.write_text("\n".join(lines) + "\n")
    cohort = CohortConfig("ped", str(ped), patient_column="group_hint", site="guangzhou",
                          label_columns={"label_pneumonia": "Pediatric_Pneumonia"})
    config = tiny_config(cohorts, train=(cohort,), labels=("Pediatric_Pneumonia",), external=(),
                         epochs_head=1, epochs_finetune=0, unfreeze="none")
    fit(config, tmp_path / "run")
    folds = read_csv(tmp_path / "run" / "folds.csv")
    by_group: dict[str, set[str]] = {}
    for row in folds:
        by_group.setdefault(row["patient_id"], set()).add(row["fold"])
    assert len(by_group) == N_PATIENTS and all(len(f) == 1 for f in by_group.values())  # a child in one fold
    assert all(g.startswith("child:") for g in by_group)
    oof = read_csv(tmp_path / "run" / "predictions_oof.csv")
    assert len(oof) == len(rows) and "label_Pediatric_Pneumonia" in oof[0]
    assert "score_Pediatric_Pneumonia__tiny" in oof[0]
    summary = json.loads((tmp_path / "run" / "cohorts.json").read_text())
    assert summary["train"]["labels"]["Pediatric_Pneumonia"]["positive"] == len(rows) // 2


def test_a_cbam_head_run_trains_end_to_end_and_refuses_cached_features(
    cohorts: tuple[Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"cache_features: expected false with head = \"cbam\""):
        tiny_config(cohorts, head="cbam", cache_features=True)
    with pytest.raises(ConfigError, match="head: expected one of linear, cbam"):
        tiny_config(cohorts, head="mlp")
    config = tiny_config(cohorts, head="cbam", epochs_head=1, epochs_finetune=1, loss_smoothing=0.1)
    fit(config, tmp_path / "run")
    model = load_unit_model(tmp_path / "run", config, UnitKey("tiny", 0))
    assert type(model.head).__name__ == "CbamHead"
    oof = read_csv(tmp_path / "run" / "predictions_oof.csv")
    assert len(oof) == 2 * N_PATIENTS and all(0.0 <= float(r["score_Tuberculosis__ensemble"]) <= 1.0 for r in oof)


def _checkpoint_weights(run: Path, fold: int = 0) -> dict[str, torch.Tensor]:
    """The weights of unit ``tiny/fold<fold>``'s checkpoint: the model after its latest epoch."""
    path = run / "units" / "tiny" / f"fold{fold}" / "checkpoint.pt"
    return dict(torch.load(path, weights_only=False)["model"])


def test_average_last_keeps_the_mean_of_the_last_fine_tuning_epochs(
    cohorts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``average_last = 2`` of three fine-tuning epochs: the unit's model is the mean of the weights after epochs
    head+2 and head+3 (every floating tensor, BatchNorm statistics too), and fine-tuning runs all its epochs where
    ``patience = 1`` stops it: the monitored loss is held constant, so no epoch after the first is better."""
    monkeypatch.setattr("training.unit._UnitContext._monitored", lambda self, row: 1.0)
    config = tiny_config(cohorts, run_folds=(0,), epochs_head=2, epochs_finetune=3, average_last=2, patience=1,
                         lr_patience=0, loss="bce")
    fit(with_overrides(config, average_last=0), tmp_path / "kept_epoch")
    stopped = read_log(tmp_path / "kept_epoch" / "units" / "tiny" / "fold0" / "log.csv")
    assert [r["phase"] for r in stopped] == ["head", "head", "finetune"], "patience = 1 no longer stops this run"
    after: dict[int, dict[str, torch.Tensor]] = {}
    fit(config, tmp_path / "run", on_epoch_end=lambda key, row: after.update(
        {int(row["epoch"]): _checkpoint_weights(tmp_path / "run")}))
    unit = tmp_path / "run" / "units" / "tiny" / "fold0"
    log = read_log(unit / "log.csv")
    assert [r["phase"] for r in log] == ["head", "head", "finetune", "finetune", "finetune"]
    done = json.loads((unit / "done.json").read_text())
    assert done["averaged_epochs"] == [4, 5] and done["best_epoch"] == 5
    # no epoch was chosen, so no epoch's loss is reported as the kept weights': the mean's own held-out loss is,
    # here recomputed by hand from the run's OOF probabilities (written by the prediction step from model.pt)
    assert "best_monitored_loss" not in done and "best_val_loss" not in done
    held_out = [r for r in read_csv(tmp_path / "run" / "predictions_oof.csv") if r["fold"] == "0"]
    p = np.array([float(r["score_Tuberculosis__tiny"]) for r in held_out])
    y = np.array([float(r["label_Tuberculosis"]) for r in held_out])
    assert 0 < y.sum() < len(y)
    by_hand = float(np.mean(-(y * np.log(p) + (1 - y) * np.log1p(-p))))
    assert done["kept_val_loss"] == pytest.approx(by_hand, rel=1e-4)
    assert all(done["kept_val_loss"] != pytest.approx(float(r["val_loss"]), rel=1e-6) for r in log[3:]), (
        "the mean's loss equals an averaged epoch's: the test cannot tell them apart")
    kept = torch.load(unit / "model.pt")
    assert kept.keys() == after[5].keys()
    moved = 0
    for name, value in kept.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (after[4][name] + after[5][name]) / 2, rtol=1e-6, atol=1e-7)
            moved += not torch.equal(after[4][name], after[5][name])
        else:
            assert torch.equal(value, after[5][name])
    assert moved, "the two averaged epochs left the weights unchanged: the test shows nothing"


@pytest.mark.slow
def test_average_last_resumes_to_the_same_mean(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    """Interrupted after the first averaged epoch, the resumed unit ends with the uninterrupted unit's mean."""
    config = tiny_config(cohorts, run_folds=(0,), epochs_head=1, epochs_finetune=3, average_last=2)
    fit(config, tmp_path / "straight")

    def interrupt(key: UnitKey, row: dict[str, Any]) -> None:
        if row["epoch"] == 3:  # fine-tuning epoch 2: the first of the two averaged
            raise InterruptError

    with pytest.raises(InterruptError):
        fit(config, tmp_path / "resumed", on_epoch_end=interrupt)
    fit(None, tmp_path / "resumed")
    unit = Path("units") / "tiny" / "fold0"
    a = torch.load(tmp_path / "straight" / unit / "model.pt")
    b = torch.load(tmp_path / "resumed" / unit / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "predictions_oof.csv").read_bytes() == (
        tmp_path / "resumed" / "predictions_oof.csv").read_bytes()
    done = [json.loads((tmp_path / run / unit / "done.json").read_text()) for run in ("straight", "resumed")]
    for d in done:
        d.pop("seconds_last_session")
    assert done[0] == done[1] and "kept_val_loss" in done[0]


def test_average_last_refuses_a_checkpoint_without_its_mean(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    """A checkpoint that records averaged epochs but holds no mean (not written by this training) is refused on
    resume instead of restarting the mean, which would average fewer epochs than ``done.json`` would list."""
    config = tiny_config(cohorts, run_folds=(0,), epochs_head=1, epochs_finetune=3, average_last=2)

    def interrupt(key: UnitKey, row: dict[str, Any]) -> None:
        if row["epoch"] == 3:  # after the first averaged epoch
            raise InterruptError

    with pytest.raises(InterruptError):
        fit(config, tmp_path / "run", on_epoch_end=interrupt)
    path = tmp_path / "run" / "units" / "tiny" / "fold0" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["state"]["averaged"] == 1 and "average" in checkpoint
    del checkpoint["average"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="1 averaged epoch\\(s\\) recorded but no stored mean"):
        fit(None, tmp_path / "run")


def test_average_last_may_average_every_fine_tuning_epoch(cohorts: tuple[Path, Path]) -> None:
    assert tiny_config(cohorts, epochs_finetune=3, average_last=3).average_last == 3


@pytest.mark.parametrize(("changes", "most"), [
    ({"epochs_finetune": 2, "average_last": 3}, 2),
    ({"unfreeze": "none", "average_last": 1}, 0),
    ({"average_last": -1}, 2),
])
def test_average_last_outside_the_fine_tuning_epochs_is_refused(
    cohorts: tuple[Path, Path], changes: dict[str, Any], most: int
) -> None:
    expected = rf"average_last: expected an integer from 0 to the fine-tuning epochs \({most}\)"
    with pytest.raises(ConfigError, match=expected):
        tiny_config(cohorts, **changes)


def test_a_run_records_where_it_started_and_warns_when_resumed_elsewhere(
    cohorts: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``environment.json``: the libraries and machine a run started on; a resume in another environment keeps that
    record and says what differs (its units may not equal an uninterrupted run's)."""
    import cv2

    config = tiny_config(cohorts, run_folds=(0,), epochs_head=1, epochs_finetune=1)
    run = tmp_path / "run"
    fit(config, run)
    path = run / "environment.json"
    started = json.loads(path.read_text())
    assert started["torch"] == torch.__version__ and started["opencv"] == cv2.__version__
    assert started["torch_cpu_capability"] == str(torch.backends.cpu.get_cpu_capability())
    with caplog.at_level("WARNING", logger="training.fit"):
        fit(None, run)
    assert not [r for r in caplog.records if "another environment" in r.message]
    elsewhere = {**started, "opencv": "0.0.0", "torch_cpu_capability": "AVX512"}
    path.write_text(json.dumps(elsewhere))
    with caplog.at_level("WARNING", logger="training.fit"):
        fit(None, run)
    (warning,) = [r.message for r in caplog.records if "another environment" in r.message]
    assert f"opencv 0.0.0 -> {cv2.__version__}" in warning and "torch_cpu_capability AVX512 ->" in warning
    assert json.loads(path.read_text()) == elsewhere  # the first record stays
