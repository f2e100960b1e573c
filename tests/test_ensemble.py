"""Tests of ai.ensemble on real ONNX packages built by the project's export code (tiny networks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ai import ensemble as ensemble_module
from ai.ensemble import Ensemble, default_providers, sigmoid
from ai.errors import ModelPackageError
from ai.manifest import MANIFEST_NAME, sha256_file

pytest.importorskip("torch", reason="building test model packages needs the train extra (torch, timm)")

LABELS = ("Tuberculosis", "Nodule")
SIZE = 64


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model_fixtures import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("ensemble") / "tiny", labels=LABELS, members=2, size=SIZE)


@pytest.fixture(scope="module")
def ensemble(package: Path) -> Ensemble:
    return Ensemble.load(package, threads=1)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).random((3, 3, SIZE, SIZE), dtype=np.float32)


def member_outputs(package: Path, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logits, cam) of each member from its own, separately created CPU session."""
    manifest = json.loads((package / MANIFEST_NAME).read_text())
    out = []
    for member in manifest["members"]:
        session = ort.InferenceSession(str(package / member["file"]), providers=["CPUExecutionProvider"])
        logits, cam = session.run(["logits", "cam"], {"image": batch})
        out.append((logits, cam))
    return out


def copy_package(package: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(package, target)
    return target


def test_probabilities_are_the_mean_of_member_sigmoids(ensemble: Ensemble, package: Path,
                                                       batch: np.ndarray) -> None:
    outputs = member_outputs(package, batch)
    assert len(outputs) == 2
    expected_members = np.stack([1.0 / (1.0 + np.exp(-logits.astype(np.float64))) for logits, _ in outputs])
    prediction = ensemble.predict(batch)
    assert prediction.probabilities.shape == (3, len(LABELS)) and prediction.probabilities.dtype == np.float32
    np.testing.assert_allclose(prediction.member_probabilities, expected_members, atol=1e-6)
    np.testing.assert_allclose(prediction.probabilities, expected_members.mean(axis=0), atol=1e-6)
    assert not np.allclose(expected_members[0], expected_members[1])  # the members really differ


def test_cam_spatial_mean_equals_logits(ensemble: Ensemble, package: Path, batch: np.ndarray) -> None:
    outputs = member_outputs(package, batch)
    for logits, cam in outputs:
        assert cam.shape[:2] == (3, len(LABELS)) and cam.shape[2] < SIZE
        np.testing.assert_allclose(cam.mean(axis=(2, 3)), logits, atol=1e-5)
    prediction = ensemble.predict(batch)
    assert prediction.cams.shape == (3, len(LABELS), SIZE, SIZE) and prediction.cams.dtype == np.float32
    # bilinear upsampling by an integer factor keeps the spatial mean: it stays the mean logit
    mean_logits = np.mean([logits for logits, _ in outputs], axis=0)
    np.testing.assert_allclose(prediction.cams.mean(axis=(2, 3)), mean_logits, atol=1e-5)
    assert prediction.cams.std(axis=(2, 3)).min() > 0  # a map, not a constant


def test_findings_follow_the_labels_and_carry_heatmaps(ensemble: Ensemble, batch: np.ndarray) -> None:
    findings = ensemble.findings(batch[1])
    prediction = ensemble.predict(batch[1:2])
    assert [f.label for f in findings] == list(LABELS)
    for index, finding in enumerate(findings):
        assert finding.probability == pytest.approx(float(prediction.probabilities[0, index]), abs=1e-7)
        assert finding.threshold == 0.5 and finding.threshold_method == "fixed for tests"
        assert finding.positive == (finding.probability >= 0.5)
        assert finding.heatmap is not None
        assert finding.heatmap.shape == (SIZE, SIZE) and finding.heatmap.dtype == np.float32
        assert finding.heatmap.min() >= 0.0 and finding.heatmap.max() <= 1.0
        np.testing.assert_allclose(finding.heatmap, sigmoid(prediction.cams[0, index]), atol=1e-7)


def test_threshold_overrides_change_the_decision_and_the_method(package: Path, batch: np.ndarray) -> None:
    probabilities = Ensemble.load(package, threads=1).predict(batch[:1]).probabilities[0]
    overrides = {"Tuberculosis": float(probabilities[0]) - 0.01, "Nodule": float(probabilities[1]) + 0.01}
    overridden = Ensemble.load(package, threshold_overrides=overrides, threads=1)
    tb, nodule = overridden.findings(batch[0])
    assert tb.positive and tb.threshold == pytest.approx(overrides["Tuberculosis"])
    assert not nodule.positive and nodule.threshold == pytest.approx(overrides["Nodule"])
    assert tb.threshold_method == nodule.threshold_method == "site override"
    partial = Ensemble.load(package, threshold_overrides={"Nodule": 0.0}, threads=1)
    assert partial.thresholds["Tuberculosis"].method == "fixed for tests"
    assert partial.findings(batch[0])[1].positive
    with pytest.raises(ValueError, match="unknown label 'Pneumonia'"):
        Ensemble.load(package, threshold_overrides={"Pneumonia": 0.5})
    with pytest.raises(ValueError, match=r"'Nodule': expected a number in \[0, 1\], got 1.5"):
        Ensemble.load(package, threshold_overrides={"Nodule": 1.5})


def test_corrupt_onnx_file_raises_naming_the_file(package: Path, tmp_path: Path) -> None:
    copy = copy_package(package, tmp_path)
    bad = copy / json.loads((copy / MANIFEST_NAME).read_text())["members"][1]["file"]
    bad.write_bytes(b"\x08\x07 this is not a protobuf model" * 50)
    with pytest.raises(ModelPackageError, match=rf"{bad}: sha256 mismatch"):
        Ensemble.load(copy)  # caught by the checksum first
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["members"][1]["sha256"] = sha256_file(bad)  # a package exported corrupt: checksum matches
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match=rf"{bad}: onnxruntime cannot load this member"):
        Ensemble.load(copy)


def test_member_that_does_not_fit_the_manifest_is_refused(package: Path, tmp_path: Path) -> None:
    copy = copy_package(package, tmp_path)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["preprocess"]["size"] = 32
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match=r"\.onnx: input 'image' has shape .* expected \[N, 3, 32, 32\]"):
        Ensemble.load(copy)
    data["preprocess"]["size"] = SIZE
    data["outputs"]["cam"] = "heatmap"
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match=r"expected outputs \['heatmap', 'logits'\]"):
        Ensemble.load(copy)


def test_cpu_provider_is_used_here(ensemble: Ensemble, package: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine offers CUDA: the CPU-only expectation does not apply")
    assert ensemble.providers == ("CPUExecutionProvider",)
    assert Ensemble.load(package, providers=["CPUExecutionProvider"], threads=1).providers == (
        "CPUExecutionProvider",
    )
    with pytest.raises(ValueError, match="TensorrtExecutionProvider"):
        Ensemble.load(package, providers=["TensorrtExecutionProvider"])


def test_cuda_is_preferred_when_onnxruntime_offers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ensemble_module.ort, "get_available_providers", lambda: offered)
    assert default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ensemble_module.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_providers() == ["CPUExecutionProvider"]


def test_predict_rejects_inputs_of_the_wrong_shape(ensemble: Ensemble) -> None:
    with pytest.raises(ValueError, match=r"batch must have shape \[N, 3, 64, 64\], got \[1, 3, 32, 32\]"):
        ensemble.predict(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="channels, size, size"):
        ensemble.findings(np.zeros((3, SIZE), np.float32))


def test_sigmoid_is_stable() -> None:
    values = sigmoid(np.array([-1000.0, -5.0, 0.0, 5.0, 1000.0]))
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values, [0.0, 1 / (1 + np.exp(5.0)), 0.5, 1 / (1 + np.exp(-5.0)), 1.0], atol=1e-7)
