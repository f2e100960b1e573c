"""Input-gate training (training/gate.py, gate_data.py): the pool, the threshold rule, a whole tiny run."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch", reason="gate training needs the train extra")

from ai.gate import FRONTAL, GATE_LABELS, InputGate
from ai.manifest import load_manifest
from training.gate import GateConfig, GateSource, build_pool, choose_threshold, export_gate, load_gate_config
from training.gate_data import (
    OTHER,
    PATTERNS,
    TRANSFORMS,
    GateDataError,
    Sample,
    pattern,
    read_view_manifest,
)


def test_patterns_are_reproducible_from_their_seed_and_lie_in_0_1() -> None:
    for kind in PATTERNS:
        a, b = pattern(kind, 11), pattern(kind, 11)
        assert a.dtype == np.float32 and a.ndim == 2 and np.array_equal(a, b), kind
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0, kind
        assert not np.array_equal(a, pattern(kind, 12)) or kind == "uniform", kind


def test_no_transform_is_a_left_right_mirror() -> None:
    """A mirrored chest is still a frontal chest: it must never be taught as "Other"."""
    image = np.random.default_rng(0).uniform(0, 1, (40, 30)).astype(np.float32)
    for name, transform in TRANSFORMS.items():
        out = transform(image)
        assert not (out.shape == image.shape and np.array_equal(out, image[:, ::-1])), name
        assert not np.array_equal(out, image), name


def write_images(folder: Path, count: int, rng: np.random.Generator, stem: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        yy, xx = np.indices((160, 140))
        body = np.exp(-(((yy - 80) / 60.0) ** 2 + ((xx - 70) / 45.0) ** 2)) * 200
        image = np.clip(body + rng.normal(0, 12, body.shape), 0, 255).astype(np.uint8)
        name = f"{stem}_{i}.png"
        cv2.imwrite(str(folder / name), image)
        names.append(f"img/{name}")
    return names


def make_sources(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    frontal = write_images(tmp_path / "img", 12, rng, "f")
    lateral = write_images(tmp_path / "img", 6, rng, "l")
    more = write_images(tmp_path / "img", 12, rng, "m")
    lines = ["image,view,patient_id"] + [f"{n},PA,p{i}" for i, n in enumerate(frontal)]
    lines += [f"{n},L,q{i}" for i, n in enumerate(lateral)]
    (tmp_path / "views.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "frontal.csv").write_text("image,patient_id\n" + "\n".join(f"{n},r{i}" for i, n in enumerate(more)))
    config = tmp_path / "gate.toml"
    config.write_text("""
name = "gate-test"
version = "gate-test-0"
architecture = "tiny"
init = ""
image_size = 32
folds = 2
patterns = 8
transformed = 5
epochs = 1
batch_size = 8
[[sources]]
name = "views"
csv = "views.csv"
view_column = "view"
group_column = "patient_id"
[[sources]]
name = "more"
csv = "frontal.csv"
view = "frontal"
group_column = "patient_id"
sample = 4
""")
    return config


def test_the_pool_holds_out_what_it_does_not_sample_and_keeps_transforms_with_their_patient(tmp_path: Path) -> None:
    config = load_gate_config(make_sources(tmp_path))
    pool, held_out = build_pool(config)
    assert len(held_out) == 8 and not {s.key for s in held_out} & {s.key for s in pool}
    by_key = {s.key: s for s in pool}
    for sample in pool:
        if sample.transform:
            source = by_key[sample.key.rsplit("|", 1)[0]]
            assert sample.group == source.group and sample.label == OTHER


def test_a_manifest_with_an_unknown_view_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "v.csv").write_text("image,view\na.png,PA\na.png,OBLIQUE\n")
    with pytest.raises(GateDataError, match=r"line 3: view 'OBLIQUE'"):
        read_view_manifest(tmp_path / "v.csv", "v", view_column="view")


def test_the_threshold_rule_is_the_half_percentile_of_frontal_oof_capped_at_one_half() -> None:
    pool = [Sample(key=f"f{i}", label=FRONTAL, group=f"f{i}", source="s", path=f"f{i}") for i in range(1000)]
    pool.append(Sample(key="o", label=OTHER, group="o", source="pattern"))
    oof = np.zeros((1001, 3), np.float32)
    oof[:1000, 0] = np.linspace(0.9, 1.0, 1000)
    oof[:10, 0] = np.linspace(0.05, 0.3, 10)  # ten frontal images the fold models doubt
    t, method = choose_threshold(pool, oof)
    assert t == pytest.approx(float(np.quantile(oof[:1000, 0], 0.005))) and 0.05 < t < 0.3
    assert "0.5th percentile" in method
    oof[:1000, 0] = 0.9
    assert choose_threshold(pool, oof)[0] == 0.5


def test_a_tiny_gate_run_exports_a_package_the_node_loads(tmp_path: Path) -> None:
    config = load_gate_config(make_sources(tmp_path))
    package = export_gate(config, tmp_path / "run", tmp_path / "pkg")
    manifest = load_manifest(package)
    assert manifest.labels == GATE_LABELS and manifest.version == "gate-test-0"
    assert (tmp_path / "run" / "oof.csv").is_file() and len(list((tmp_path / "run").glob("fold*.pt"))) == 2
    gate = InputGate.load(package, threads=1)
    verdict = gate.check(np.random.default_rng(0).uniform(0, 1, (200, 180)).astype(np.float32))
    assert set(verdict.scores) == set(GATE_LABELS)
    again = export_gate(config, tmp_path / "run", tmp_path / "pkg2")  # resumes: the folds are not trained again
    assert load_manifest(again).thresholds[FRONTAL] == manifest.thresholds[FRONTAL]


def test_a_config_key_the_gate_does_not_know_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('epochz = 3\n[[sources]]\nname = "a"\ncsv = "a.csv"\nview = "frontal"\n')
    with pytest.raises(ValueError, match="unknown key"):
        load_gate_config(path)
    assert GateConfig(sources=(GateSource("a", "a.csv", view="frontal"),)).spec.size == 128
