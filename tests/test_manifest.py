"""Tests of ai.manifest: round trip, and every refusal names the file and the key."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ai
from ai.errors import ModelPackageError
from ai.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUANTILE_POINTS,
    REQUIRED_KEYS,
    Member,
    ModelManifest,
    ScoreReference,
    Threshold,
    bundled_package_dir,
    load_manifest,
    sha256_file,
    write_manifest,
)
from ai.preprocess import PreprocessSpec


def make_package(package_dir: Path, members: int = 2) -> ModelManifest:
    """A package whose member files are plain bytes (the manifest does not parse ONNX)."""
    package_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for fold in range(members):
        path = package_dir / f"tiny_fold{fold}.onnx"
        path.write_bytes(f"member {fold}".encode() * 100)
        entries.append(Member(path.name, sha256_file(path), "tiny", fold, "random"))
    manifest = ModelManifest(
        name="tiny-test",
        version="1.2.3",
        labels=("Tuberculosis", "Nodule"),
        preprocess=PreprocessSpec(size=64, clahe_clip=1.5),
        members=tuple(entries),
        thresholds={"Tuberculosis": Threshold(0.42, "Youden J on OOF"),
                    "Nodule": Threshold(0.3, "sensitivity 0.90 on OOF")},
        data_summary={"train": {"images": 10}},
        evaluation_summary={"auroc": 0.5},
        created="2025-06-01T12:00:00Z",
        reference={"Nodule": reference()},
    )
    write_manifest(package_dir, manifest)
    return manifest


def reference() -> ScoreReference:
    points = [i / (QUANTILE_POINTS - 1) for i in range(QUANTILE_POINTS)]
    return ScoreReference("OOF ensemble", "nih14", 500, 0.142, tuple(points), tuple(0.5 + p / 2 for p in points),
                          tuple(p / 2 for p in points))


def edit_manifest(package_dir: Path, change: Any) -> Path:
    """Apply ``change(data)`` to the manifest JSON in place; returns the manifest path."""
    path = package_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def test_round_trip(tmp_path: Path) -> None:
    manifest = make_package(tmp_path / "pkg")
    loaded = load_manifest(tmp_path / "pkg")
    assert loaded == manifest
    assert loaded.format_version == FORMAT_VERSION
    assert loaded.thresholds["Nodule"] == Threshold(0.3, "sensitivity 0.90 on OOF")
    assert loaded.members[1].fold == 1 and loaded.preprocess.clahe_clip == 1.5
    raw = json.loads((tmp_path / "pkg" / MANIFEST_NAME).read_text())
    assert raw["format_version"] == FORMAT_VERSION and raw["aggregation"] == "mean"
    assert raw["outputs"] == {"logits": "logits", "cam": "cam"} and raw["input_name"] == "image"
    assert loaded.reference["Nodule"] == reference() and "Tuberculosis" not in loaded.reference
    assert len(raw["reference"]["Nodule"]["quantiles"]) == QUANTILE_POINTS


def test_optional_keys_take_their_defaults(tmp_path: Path) -> None:
    make_package(tmp_path)
    for key in ("aggregation", "input_name", "outputs", "data_summary", "evaluation_summary", "created",
                "reference"):
        edit_manifest(tmp_path, lambda d, k=key: d.pop(k))
    loaded = load_manifest(tmp_path)
    assert loaded.aggregation == "mean" and loaded.outputs == {"logits": "logits", "cam": "cam"}
    assert loaded.data_summary == {} and loaded.created == "" and loaded.reference == {}


def test_missing_manifest_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match=re.escape(str(tmp_path / MANIFEST_NAME))):
        load_manifest(tmp_path)


def test_missing_member_file_names_the_file(tmp_path: Path) -> None:
    make_package(tmp_path)
    (tmp_path / "tiny_fold1.onnx").unlink()
    with pytest.raises(ModelPackageError, match=r"tiny_fold1\.onnx: member file .* not found"):
        load_manifest(tmp_path)
    assert load_manifest(tmp_path, verify=False).members[1].file == "tiny_fold1.onnx"


def test_sha256_mismatch_names_the_file_and_both_digests(tmp_path: Path) -> None:
    manifest = make_package(tmp_path)
    path = tmp_path / "tiny_fold0.onnx"
    path.write_bytes(b"changed")
    found = hashlib.sha256(b"changed").hexdigest()
    with pytest.raises(ModelPackageError) as info:
        load_manifest(tmp_path)
    message = str(info.value)
    assert str(path) in message and manifest.members[0].sha256 in message and found in message


def test_bad_json_names_the_file_and_the_place(tmp_path: Path) -> None:
    make_package(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"name": "x",\n "labels": [}')
    with pytest.raises(ModelPackageError, match=r"manifest\.json: invalid JSON at line 2"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_key_names_the_file_and_key(tmp_path: Path, key: str) -> None:
    make_package(tmp_path)
    edit_manifest(tmp_path, lambda d: d.pop(key))
    with pytest.raises(ModelPackageError, match=rf"manifest\.json: missing key '{key}'"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("change", "key", "found"),
    [
        (lambda d: d.update(format_version=2), "format_version", "2"),
        (lambda d: d.update(labels=[]), "labels", r"\[\]"),
        (lambda d: d.update(labels=["A", "A"]), "labels", "'A'"),
        (lambda d: d.update(name=7), "name", "7"),
        (lambda d: d.update(name="x" * 65), "name", "1-64 printable characters"),
        (lambda d: d.update(version="1\\0"), "version", "without a backslash"),
        (lambda d: d.update(aggregation="max"), "aggregation", "'max'"),
        (lambda d: d.update(colour="blue"), "colour", "'colour'"),
        (lambda d: d["members"][1].update(sha256="abc"), r"members\[1\]\.sha256", "'abc'"),
        (lambda d: d["members"][0].update(fold="0"), r"members\[0\]\.fold", "'0'"),
        (lambda d: d["members"][0].pop("architecture"), r"members\[0\]\.architecture", None),
        (lambda d: d["members"][0].update(file="../evil.onnx"), r"members\[0\]\.file", "evil"),
        (lambda d: d["thresholds"]["Nodule"].update(value=1.5), r"thresholds\.Nodule\.value", "1.5"),
        (lambda d: d["thresholds"]["Nodule"].update(value=True), r"thresholds\.Nodule\.value", "True"),
        (lambda d: d["thresholds"].pop("Nodule"), "thresholds", r"missing \['Nodule'\]"),
        (lambda d: d["preprocess"].update(size="big"), "preprocess", "big"),
        (lambda d: d["preprocess"].update(tile=8), "preprocess", "tile"),
        (lambda d: d.update(outputs={"logits": "logits"}), "outputs", "logits"),
        (lambda d: d["reference"].update(Mass=d["reference"]["Nodule"]), "reference", "Mass"),
        (lambda d: d["reference"]["Nodule"]["quantiles"].pop(), r"reference\.Nodule\.quantiles", None),
        (lambda d: d["reference"]["Nodule"]["quantiles_positive"].reverse(), r"reference\.Nodule\.quantiles_positive",
         None),
        (lambda d: d["reference"]["Nodule"].update(prevalence=1.5), r"reference\.Nodule\.n/prevalence", "1.5"),
        (lambda d: d["reference"]["Nodule"].update(mean=0.3), r"reference\.Nodule\.mean", None),
        (lambda d: d["members"][0].update(labels=["Mass"]), r"members\[0\]\.labels", "Mass"),
        (lambda d: d["members"][0].update(labels=["Nodule", "Nodule"]), r"members\[0\]\.labels", None),
        (lambda d: [m.update(labels=["Nodule"]) for m in d["members"]], "members", "none outputs .'Tuberculosis'."),
        (lambda d: d["members"][1].update(size="96"), r"members\[1\]\.size", "'96'"),
        (lambda d: d["members"][1].update(size=4), r"members\[1\]\.size", "an input side >= 8 pixels, found 4"),
        (lambda d: [m.update(size=96) for m in d["members"]], "members",
         r"at least one member at preprocess.size 64 .*found \[96\]"),
    ],
)
def test_invalid_values_name_the_file_key_and_value(tmp_path: Path, change: Any, key: str,
                                                    found: str | None) -> None:
    make_package(tmp_path)
    edit_manifest(tmp_path, change)
    with pytest.raises(ModelPackageError) as info:
        load_manifest(tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path / MANIFEST_NAME)), message
    assert re.search(key, message), message
    if found is not None:
        assert re.search(found, message), message


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ModelPackageError, match="expected a JSON object at the top level, found list"):
        load_manifest(tmp_path)


def test_write_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    make_package(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "tiny_fold0.onnx", "tiny_fold1.onnx"]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 10000  # larger than one read chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_bundled_package_dir_is_inside_the_ai_package() -> None:
    assert bundled_package_dir() == Path(ai.__file__).resolve().parent / "models" / "default"


def test_ai_package_imports_without_torch() -> None:
    # The node runs without the train extra: nothing in ai/ may pull in torch.
    code = ("import sys, ai.pixels, ai.preprocess, ai.manifest, ai.ensemble, ai.findings; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_members_may_output_a_subset_of_the_labels(tmp_path: Path) -> None:
    make_package(tmp_path)
    edit_manifest(tmp_path, lambda d: d["members"][0].update(labels=["Nodule"]))
    manifest = load_manifest(tmp_path)
    assert manifest.members[0].labels == ("Nodule",) and manifest.members[1].labels is None
    assert manifest.members[0].outputs(manifest.labels) == ("Nodule",)
    assert manifest.members[1].outputs(manifest.labels) == ("Tuberculosis", "Nodule")
    write_manifest(tmp_path, manifest)  # written back as read
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["members"][0]["labels"] == ["Nodule"]
    assert "labels" not in json.loads((tmp_path / MANIFEST_NAME).read_text())["members"][1]


def test_members_may_take_inputs_of_their_own_size(tmp_path: Path) -> None:
    """A member's ``size`` is written only where it is not the package's; the distinct sizes are listed with the
    package's first, and each member's preprocessing is the package's at its size."""
    make_package(tmp_path, members=3)
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert all("size" not in m for m in raw["members"])  # a one-size package reads and writes as before
    assert load_manifest(tmp_path).input_sizes == (64,)
    edit_manifest(tmp_path, lambda d: (d["members"][0].update(size=96), d["members"][2].update(size=80)))
    manifest = load_manifest(tmp_path)
    assert [m.size for m in manifest.members] == [96, None, 80]
    assert manifest.input_sizes == (64, 96, 80)
    assert manifest.member_spec(manifest.members[0]) == PreprocessSpec(size=96, clahe_clip=1.5)
    assert manifest.member_spec(manifest.members[1]) is manifest.preprocess
    write_manifest(tmp_path, manifest)
    written = json.loads((tmp_path / MANIFEST_NAME).read_text())["members"]
    assert [m.get("size") for m in written] == [96, None, 80] and "size" not in written[1]
    assert load_manifest(tmp_path) == manifest
