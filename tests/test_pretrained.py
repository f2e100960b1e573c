"""Chest weights made here: a unit's backbone with its provenance, loaded as another run's init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ai.manifest import load_manifest
from training.cli import main
from training.config import CohortConfig, ConfigError
from training.export_run import export_run
from training.fit import fit
from training.models import read_state_dict
from training.pretrained import provenance_path, read_provenance
from training.unit import build_unit_model

from .test_loop import make_cohort, tiny_config
from .test_multicohort import pediatric_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chest_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Pretraining on a pediatric-like cohort (one unit), its weights file; and a TB-like cohort apart."""
    root = tmp_path_factory.mktemp("pretrain")
    ped = pediatric_like(root / "ped", 12, 5)
    tb = make_cohort(root / "tb", "tb", 12, 6)
    ped_cohort = CohortConfig("ped", str(ped), patient_column="group_hint", site="guangzhou",
                              label_columns={"label_pneumonia": "Pediatric_Pneumonia"})
    config = tiny_config((tb, tb), train=(ped_cohort,), external=(), labels=("Pediatric_Pneumonia",),
                         run_folds=(0,), epochs_head=1, epochs_finetune=1)
    fit(config, root / "pretrain-run")
    out = root / "chest.pth"
    assert main(["weights", "--run-dir", str(root / "pretrain-run"), "--unit", "tiny/fold0", "--out", str(out)]) == 0
    return out, ped, tb


def test_weights_file_holds_the_backbone_and_its_provenance(chest_weights: tuple[Path, Path, Path]) -> None:
    weights, _, _ = chest_weights
    state = read_state_dict(weights)
    assert state and all(k.startswith("backbone.body.") for k in state)  # the head stays with its labels
    provenance = read_provenance(weights)
    assert provenance is not None and provenance["architecture"] == "tiny"
    assert provenance["made_from"]["unit"] == "tiny/fold0" and provenance["made_from"]["labels"] == [
        "Pediatric_Pneumonia"]
    assert "fold 0 of 3" in provenance["made_from"]["held_out"]
    assert "averaged_epochs" not in provenance["made_from"]  # one kept epoch, named by best_epoch
    (cohort,) = provenance["cohorts"]
    assert (cohort["name"], cohort["role"], cohort["images"]) == ("ped", "train", 24)
    assert provenance["recipe"]["train"]["label_columns"] == {"label_pneumonia": "Pediatric_Pneumonia"}


def test_weights_of_averaged_epochs_say_which(chest_weights: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A unit that kept the mean of its last fine-tuning epochs (``average_last``) kept no single epoch: the
    provenance lists the averaged epochs beside ``best_epoch`` (the last of them)."""
    _, ped, tb = chest_weights
    ped_cohort = CohortConfig("ped", str(ped), patient_column="group_hint", site="guangzhou",
                              label_columns={"label_pneumonia": "Pediatric_Pneumonia"})
    config = tiny_config((tb, tb), train=(ped_cohort,), external=(), labels=("Pediatric_Pneumonia",),
                         run_folds=(0,), epochs_head=1, epochs_finetune=2, average_last=2)
    fit(config, tmp_path / "run")
    out = tmp_path / "averaged.pth"
    assert main(["weights", "--run-dir", str(tmp_path / "run"), "--unit", "tiny/fold0", "--out", str(out)]) == 0
    provenance = read_provenance(out)
    assert provenance is not None
    assert provenance["made_from"]["averaged_epochs"] == [2, 3] and provenance["made_from"]["best_epoch"] == 3


def test_a_run_starts_from_them_and_the_package_says_so(chest_weights: tuple[Path, Path, Path],
                                                        tmp_path: Path) -> None:
    weights, _, tb = chest_weights
    config = tiny_config((tb, tb), train=(CohortConfig("tb", str(tb)),), external=(), init=str(weights),
                         run_folds=(0,), epochs_head=1, epochs_finetune=0, unfreeze="none")
    model = build_unit_model(config, "tiny")
    for key, value in read_state_dict(weights).items():  # the backbone starts from the chest weights
        assert torch.equal(model.state_dict()[key], value), key
    fit(config, tmp_path / "run")
    package = export_run(tmp_path / "run", tmp_path / "pkg", version="0.0.1")
    manifest = load_manifest(package)
    sha = json.loads(provenance_path(weights).read_text())["sha256"]
    assert manifest.members[0].weights == f"chest.pth (sha256 {sha[:16]})"
    init = manifest.data_summary["init_weights"]["tiny"]
    assert init["sha256"] == sha and init["made_from"]["run"] == "tiny-test"
    assert [c["name"] for c in init["cohorts"]] == ["ped"]


@pytest.mark.parametrize(("role", "message"), [("external", "its figures would no longer be external"),
                                               ("train", "its OOF figures would be biased")])
def test_a_cohort_that_trained_the_weights_is_refused(chest_weights: tuple[Path, Path, Path], tmp_path: Path,
                                                      role: str, message: str) -> None:
    weights, ped, tb = chest_weights
    ped_cohort = CohortConfig("ped2", str(ped), patient_column="group_hint", site="guangzhou",
                              label_columns={"label_pneumonia": "Pediatric_Pneumonia"})
    if role == "external":
        config = tiny_config((tb, tb), train=(CohortConfig("tb", str(tb)),), external=(ped_cohort,),
                             init=str(weights))
    else:
        config = tiny_config((tb, tb), train=(ped_cohort,), external=(), labels=("Pediatric_Pneumonia",),
                             init=str(weights))
    with pytest.raises(ConfigError) as info:
        fit(config, tmp_path / "run")
    assert message in str(info.value) and "cohort 'ped'" in str(info.value)


def test_changed_weights_no_longer_match_their_provenance(chest_weights: tuple[Path, Path, Path],
                                                          tmp_path: Path) -> None:
    weights, _, _ = chest_weights
    copy = tmp_path / "chest.pth"
    copy.write_bytes(weights.read_bytes() + b"x")
    provenance_path(copy).write_text(provenance_path(weights).read_text())
    with pytest.raises(ConfigError, match="the weights changed after their provenance was written"):
        read_provenance(copy)
