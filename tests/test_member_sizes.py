"""Packages whose members take inputs of different sizes: each member scores the image preprocessed at its own size,
the node averages them, and the tools that build packages keep every member's size (``ai.manifest.Member.size``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pydicom
import pytest

from ai.analyse import analyse_dataset, analyse_image, model_input
from ai.ensemble import Ensemble, sigmoid
from ai.errors import ModelPackageError
from ai.manifest import MANIFEST_NAME, load_manifest
from ai.pixels import dicom_to_float
from ai.preprocess import PreprocessSpec, preprocess_gray, to_model_input
from tests.conftest import REPO

pytest.importorskip("torch", reason="building test model packages needs the train extra (torch, timm)")

LABELS = ("Tuberculosis", "Nodule")
GRID, OTHER = 64, 96
SIZES = (GRID, OTHER, GRID)  # members 0 and 2 at the package's size, member 1 at its own


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model_fixtures import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("sizes") / "two-sizes", labels=LABELS, members=3, size=GRID,
                              member_sizes=SIZES)


@pytest.fixture(scope="module")
def ensemble(package: Path) -> Ensemble:
    return Ensemble.load(package, threads=1)


@pytest.fixture(scope="module")
def batches() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {size: rng.random((2, 3, size, size), dtype=np.float32) for size in (GRID, OTHER)}


def chest_image() -> np.ndarray:
    """A decoded chest radiograph (pydicom's test CR), float in [0, 1]."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed (test extra)")
    return dicom_to_float(pydicom.dcmread(path))


def member_outputs(package: Path, batches: dict[int, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logits, cam) of each member from its own session, on the batch of its own size."""
    out = []
    for member, size in zip(json.loads((package / MANIFEST_NAME).read_text())["members"], SIZES, strict=True):
        session = ort.InferenceSession(str(package / member["file"]), providers=["CPUExecutionProvider"])
        out.append(tuple(session.run(["logits", "cam"], {"image": batches[size]})))
    return out


def test_the_export_writes_each_members_size_and_the_manifest_lists_the_sizes(package: Path) -> None:
    raw = json.loads((package / MANIFEST_NAME).read_text())
    assert raw["preprocess"]["size"] == GRID
    assert [m.get("size") for m in raw["members"]] == [None, OTHER, None]
    manifest = load_manifest(package)
    assert manifest.input_sizes == (GRID, OTHER)
    session = ort.InferenceSession(str(package / raw["members"][1]["file"]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, OTHER, OTHER]  # the graph was exported at the member's size


def test_a_two_size_package_scores_as_its_members_at_their_own_sizes_averaged(
    ensemble: Ensemble, package: Path, batches: dict[int, np.ndarray]
) -> None:
    outputs = member_outputs(package, batches)
    prediction = ensemble.predict(batches)
    expected = np.stack([1.0 / (1.0 + np.exp(-logits.astype(np.float64))) for logits, _ in outputs])
    np.testing.assert_allclose(prediction.member_probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(prediction.probabilities, expected.mean(axis=0), atol=1e-6)
    # the maps: each member's CAM resized (bilinear, the whole square) onto the package's grid, then averaged
    assert outputs[1][1].shape[2] != outputs[0][1].shape[2]  # the 96 px member's CAM has its own grid
    resized = [np.stack([[cv2.resize(m, (GRID, GRID), interpolation=cv2.INTER_LINEAR) for m in image]
                         for image in cam]) for _, cam in outputs]
    assert prediction.cams.shape == (2, len(LABELS), GRID, GRID)
    np.testing.assert_allclose(prediction.cams, np.mean(resized, axis=0), atol=1e-5)


def test_a_two_size_package_refuses_inputs_that_do_not_give_every_size(
    ensemble: Ensemble, batches: dict[int, np.ndarray]
) -> None:
    with pytest.raises(ValueError, match=r"take inputs of sizes \[64, 96\]: give one batch per size"):
        ensemble.predict(batches[GRID])
    with pytest.raises(ValueError, match=r"expected one batch per input size \[64, 96\], got sizes \[64\]"):
        ensemble.predict({GRID: batches[GRID]})
    with pytest.raises(ValueError, match=r"batch must have shape \[N, 3, 96, 96\], got \[2, 3, 64, 64\]"):
        ensemble.predict({GRID: batches[GRID], OTHER: batches[GRID]})
    with pytest.raises(ValueError, match=r"the same images, got counts \{64: 2, 96: 1\}"):
        ensemble.predict({GRID: batches[GRID], OTHER: batches[OTHER][:1]})


def test_a_member_size_that_contradicts_its_graph_is_refused_at_load(package: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(package, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["members"][1]["size"] = 80
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match=r"fold1\.onnx: input 'image' has shape .* expected \[N, 3, 80, 80\]"):
        Ensemble.load(copy)


def test_the_node_preprocesses_an_image_once_per_size_and_draws_on_the_package_grid(ensemble: Ensemble) -> None:
    image = chest_image()
    inputs, box = model_input(image, ensemble)
    assert list(inputs) == [GRID, OTHER]
    for size, x in inputs.items():  # exactly the one preprocessing, at each member's size
        spec = PreprocessSpec(size=size)
        np.testing.assert_array_equal(x, to_model_input(preprocess_gray(image, spec)[0], spec))
    assert box == preprocess_gray(image, PreprocessSpec(size=GRID))[1]
    analysis = analyse_image(image, ensemble)
    prediction = ensemble.predict({size: x[np.newaxis] for size, x in inputs.items()})
    for k, finding in enumerate(analysis.findings):
        assert finding.probability == pytest.approx(float(prediction.probabilities[0, k]), abs=1e-7)
        assert finding.heatmap is not None and finding.heatmap.shape == (GRID, GRID)
        np.testing.assert_allclose(finding.heatmap, sigmoid(prediction.cams[0, k]), atol=1e-7)
        assert analysis.letterbox.to_source(finding.heatmap).shape == image.shape


def test_the_worker_reports_a_two_size_package_in_its_sr(ensemble: Ensemble, tmp_path: Path) -> None:
    from node.config import Destination, Settings, StorageSettings
    from node.report import read_report
    from node.worker import Worker
    from storage.db import make_engine
    from storage.queue import Store
    from tests.test_worker import chest, enqueue

    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),))
    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"), max_attempts=2)
    ds = chest()
    enqueue(store, settings.data_path, ds)
    assert Worker(store, ensemble, settings, owner="test:1:1").run_once() is True
    produced = sorted((settings.data_path / "results").rglob("*.dcm"))
    by_class = {pydicom.dcmread(p).SOPClassUID: p for p in produced}
    assert set(by_class) == {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"}  # SC overlay and SR
    report = read_report(pydicom.dcmread(by_class["1.2.840.10008.5.1.4.1.1.88.34"]))
    expected = {f.label: f.probability for f in analyse_dataset(ds, ensemble).findings}
    assert {f.label: f.probability for f in report.findings} == pytest.approx(expected, abs=1e-6)


def test_cxr_node_predict_prints_every_label_of_a_two_size_package(package: Path, tmp_path: Path) -> None:
    png = tmp_path / "chest.png"
    image = chest_image()
    cv2.imwrite(str(png), np.rint(image * 255).astype(np.uint8))
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "var"\n[model]\npackage = "{package}"\ngate = "off"\n')
    out = subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "ERROR", "predict", "--format", "jsonl",
                          "--config", str(config), str(png)], capture_output=True, text=True, timeout=120, cwd=REPO,
                         check=False)
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["status"] == "analysed" and set(row["scores"]) == set(LABELS)
    ens = Ensemble.load(package, threads=1)
    from ai.pixels import read_image_file

    expected = analyse_image(read_image_file(png), ens).findings
    assert row["scores"] == pytest.approx({f.label: f.probability for f in expected}, abs=1e-6)
