"""`cxr-train`: the help shows the workflow; init-config -> fit -> baseline -> evaluate -> export end to end."""

from __future__ import annotations

import csv
import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

from training.cli import main
from training.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    default_value,
    example_config_text,
    load_config,
    save_config,
)

from .test_loop import make_cohort, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_help_shows_the_whole_workflow(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for step in ("manifest", "init-config", "fit --config", "evaluate --run-dir", "export --run-dir",
                 "baseline", "audit-blackout", "compare", "package", "site-threshold --package"):
        assert step in text, step
    assert text.index("fit --config") < text.index("evaluate --run-dir") < text.index("export --run-dir")


def test_init_config_writes_a_loadable_commented_example(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run.toml"
    assert main(["init-config", str(path)]) == 0
    assert "#" in path.read_text()
    config = load_config(path)
    assert config.train[0].csv == str((tmp_path / "../shared/data/tb/shenzhen.csv").resolve())
    assert [e.name for e in config.external] == ["montgomery"]
    for key in ("architectures", "folds", "epochs_head", "epochs_finetune", "loss", "augment", "seed", "init"):
        assert getattr(config, key) == default_value(key), key
    assert main(["init-config", str(path)]) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err


def test_config_roundtrip_and_validation(tmp_path: Path) -> None:
    data = tomllib.loads(example_config_text())
    config = config_from_dict(data, tmp_path)
    save_config(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config
    bad = {**data, "folds": 1, "loss": "hinge", "colour": "red", "labels": ["TB", "Covid"]}
    with pytest.raises(ConfigError) as info:
        config_from_dict(bad, tmp_path)
    assert "colour: unknown key" in str(info.value)
    bad.pop("colour")
    with pytest.raises(ConfigError) as info:
        config_from_dict(bad, tmp_path)
    text = str(info.value)
    assert "folds: expected an integer >= 2, found 1" in text and "loss: expected one of" in text
    assert "'Covid' is not in the canonical vocabulary" in text
    with pytest.raises(ConfigError, match="epochs_head: expected an integer"):
        config_from_dict({**data, "epochs_head": "3"}, tmp_path)


def test_cohort_column_options_roundtrip(tmp_path: Path) -> None:
    data = tomllib.loads(example_config_text())
    data["labels"] = ["Pediatric_Pneumonia"]
    data["train"] = {"name": "pediatric", "csv": "ped.csv", "patient_column": "group_hint", "site": "guangzhou",
                     "patient_pattern": r"person\d+", "label_columns": {"label_pneumonia": "pediatric pneumonia"}}
    config = config_from_dict(data, tmp_path)
    assert config.train[0].label_columns == {"label_pneumonia": "Pediatric_Pneumonia"}  # canonical spelling
    save_config(config, tmp_path / "config.toml")
    assert 'label_columns = { label_pneumonia = "Pediatric_Pneumonia" }' in (tmp_path / "config.toml").read_text()
    assert load_config(tmp_path / "config.toml") == config
    # A cohort without the options is written as before: name, csv, root.
    plain = config_from_dict(tomllib.loads(example_config_text()), tmp_path)
    assert set(plain.to_dict()["train"]) == {"name", "csv", "root"}
    for bad, message in [({"label_columns": {"x": "Covid"}}, "train.label_columns: label 'Covid'"),
                         ({"label_columns": ["label_pneumonia"]}, "train.label_columns: expected a table"),
                         ({"patient_column": ""}, "train.patient_column: expected a non-empty string"),
                         ({"patient_pattern": "person(\\d+"}, "train.patient_pattern: not a regular expression"),
                         ({"sites": "x"}, "unknown key(s) ['sites']")]:
        with pytest.raises(ConfigError) as info:
            config_from_dict({**data, "train": {**data["train"], **bad}}, tmp_path)
        assert message in str(info.value), (bad, str(info.value))


def test_an_unregistered_architecture_or_a_misfit_size_fails_at_load(tmp_path: Path) -> None:
    data = tomllib.loads(example_config_text())
    with pytest.raises(ConfigError, match=r"architectures: expected registered names .*efficientnet_lite0"):
        config_from_dict({**data, "architectures": ["efficientnet_lite9"]}, tmp_path)
    with pytest.raises(ConfigError, match=r"image_size: expected a multiple of \[16\] for \['vit_b16'\]"):
        config_from_dict({**data, "architectures": ["vit_b16"], "image_size": 200}, tmp_path)


def test_architectures_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["architectures", "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["efficientnet_lite0"]["imagenet_offline"] is True and rows["resnet18"]["imagenet_offline"] is False
    assert rows["vit_b16"]["size_multiple"] == 16
    assert main(["architectures"]) == 0
    assert "tiny" in capsys.readouterr().out


def test_python_m_training_cli_runs_every_subcommand() -> None:
    """The ``__main__`` guard comes after every handler (it once stood before ``_architectures``: NameError)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "training.cli", "architectures", "--format", "json"], cwd=repo,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "efficientnet_lite0" in {row["name"] for row in json.loads(done.stdout)}


def test_fit_with_invalid_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('folds = 1\n[train]\nname = "x"\ncsv = "x.csv"\n')
    assert main(["fit", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "folds: expected an integer >= 2" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_baseline_evaluate_compare_export_end_to_end(tmp_path: Path) -> None:
    from ai.manifest import load_manifest

    cohorts = (make_cohort(tmp_path / "dev", "dev", 20, 0), make_cohort(tmp_path / "ext", "ext", 6, 1))
    config: RunConfig = tiny_config(cohorts, epochs_head=1, epochs_finetune=1)
    config_path = tmp_path / "run.toml"
    save_config(config, config_path)
    run = tmp_path / "run"

    assert main(["fit", "--config", str(config_path), "--run-dir", str(run)]) == 0
    assert main(["fit", "--run-dir", str(run)]) == 0  # a rerun finds every unit done
    assert main(["baseline", "--run-dir", str(run), "--n-boot", "50"]) == 0
    assert (run / "audits.json").is_file()
    assert main(["audit-blackout", "--run-dir", str(run), "--n-boot", "50"]) == 2  # no lung_mask column
    assert main(["evaluate", "--run-dir", str(run), "--n-boot", "50"]) == 0
    assert (run / "report" / "report.md").is_file()

    perturbed = tmp_path / "other" / "predictions_oof.csv"
    perturbed.parent.mkdir()
    with (run / "predictions_oof.csv").open(newline="") as src:
        rows = list(csv.DictReader(src))
    for i, row in enumerate(rows):
        for key in ("score_Tuberculosis__tiny", "score_Tuberculosis__ensemble"):
            row[key] = f"{(float(row[key]) + (i % 7) / 10) / 1.6:.6f}"
    with perturbed.open("w", newline="") as dst:
        writer = csv.DictWriter(dst, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["compare", str(run / "predictions_oof.csv"), str(perturbed), "--label", "Tuberculosis"]) == 0

    package = tmp_path / "package"
    assert main(["export", "--run-dir", str(run), "--out", str(package), "--version", "1.0-test"]) == 0
    manifest = load_manifest(package, verify=True)
    assert manifest.labels == ("Tuberculosis",) and manifest.version == "1.0-test"
    assert sorted(m.fold for m in manifest.members) == [0, 1, 2]
    assert manifest.preprocess.size == 64 and manifest.preprocess.field_detection is False
    midway = manifest.thresholds["Tuberculosis"]
    assert midway.method == "Youden J on OOF ensemble, midway to the next lower score"
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "on-score"), "--threshold-at", "score"]) == 0
    on_score = load_manifest(tmp_path / "on-score", verify=True)
    assert on_score.thresholds["Tuberculosis"].method == "Youden J on OOF ensemble"
    with (run / "predictions_oof.csv").open(newline="") as src:
        oof = np.array([float(row["score_Tuberculosis__ensemble"]) for row in csv.DictReader(src)])
    score = on_score.thresholds["Tuberculosis"].value
    assert score in oof.tolist()  # on one image's OOF score ...
    below = oof[oof < score].max()
    assert below < midway.value < score  # ... and midway lies strictly between it and the next lower one
    assert midway.value == pytest.approx((below + score) / 2, abs=1e-6)  # the CSV keeps 6 decimals
    assert main(["export", "--run-dir", str(run), "--out", str(package), "--members", "resnet18"]) == 2
    with pytest.raises(SystemExit, match="2"):  # argparse: invalid choice
        main(["export", "--run-dir", str(run), "--out", str(tmp_path / "p2"), "--threshold-at", "x"])


def test_fit_on_a_full_disk_says_so_loses_nothing_and_resumes_to_the_same_result(
    tmp_path: Path, tiny_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cohorts = (make_cohort(tmp_path / "dev", "dev", 20, 0), make_cohort(tmp_path / "ext", "ext", 6, 1))
    config_path = tmp_path / "run.toml"
    # The preprocessing cache lives elsewhere, so the full disk strikes the units' checkpoints.
    config = tiny_config(cohorts, epochs_head=1, epochs_finetune=1, cache_dir=str(tmp_path / "cache"))
    save_config(config, config_path)
    reference = tmp_path / "reference"
    assert main(["fit", "--config", str(config_path), "--run-dir", str(reference)]) == 0

    # Leave room for about two of the three units (each ~110 kB: model.pt, checkpoint.pt, scores).
    ballast = tiny_fs / "ballast"
    stat = os.statvfs(tiny_fs)
    ballast.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 200_000))
    run = tiny_fs / "run"
    capsys.readouterr()
    assert main(["fit", "--config", str(config_path), "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "cxr-train fit: disk full" in err and "run the same command again" in err
    assert "Traceback" not in err
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")], "a temporary file was left behind"
    assert not (run / "predictions_oof.csv").exists()
    assert (run / "units" / "tiny" / "fold0" / "done.json").is_file(), "the first unit should have finished"

    ballast.unlink()
    assert main(["fit", "--run-dir", str(run)]) == 0
    for name in ("folds.csv", "predictions_oof.csv", "predictions_ext.csv"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name

    # The report (JSON, Markdown, PNG plots of ~20-40 kB each) on the same full disk, then with room.
    report = tiny_fs / "report"
    ballast.write_bytes(b"\0" * (os.statvfs(tiny_fs).f_bavail * stat.f_frsize - 40_000))
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(run), "--n-boot", "20", "--out", str(report)]) == 1
    err = capsys.readouterr().err
    assert "cxr-train evaluate: disk full while writing" in err and "None" not in err
    assert not [p for p in report.rglob("*") if p.name.endswith(".tmp")]
    ballast.unlink()
    assert main(["evaluate", "--run-dir", str(run), "--n-boot", "20", "--out", str(report)]) == 0
    assert (report / "report.md").is_file()

    # init-config leaves no empty file that would make the rerun refuse ("exists; pass --force").
    ballast.write_bytes(b"\0" * (os.statvfs(tiny_fs).f_bavail * stat.f_frsize))
    example = tiny_fs / "example.toml"
    assert main(["init-config", str(example)]) == 1
    assert not example.exists()
    ballast.unlink()
    assert main(["init-config", str(example)]) == 0
    load_config(example)
