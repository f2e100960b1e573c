"""Input gate (ai/gate.py) in the node: what is not a frontal chest radiograph gets no score, but a reason.

The bundled gate package (ai/models/gate) runs in front of a real (tiny) model package in the worker, as
the node runs it. Each pattern the product must refuse has its own case; real frontal radiographs must
pass. Patterns are drawn here, independently of the generator the gate was trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ai.errors import ModelPackageError
from ai.gate import FRONTAL, GATE_LABELS, InputGate, content_problem
from ai.manifest import bundled_gate_dir, load_manifest
from ai.pixels import dicom_to_float, read_image_file
from node.config import Destination, ModelSettings, Settings, StorageSettings
from node.report import read_report
from node.worker import Worker
from storage.db import make_engine
from storage.files import instance_path, write_atomic
from storage.queue import ReceivedInstance, Store

CR = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
FRONTAL_DICOM = "rsna_cr_pa_jpeg_baseline.dcm"


@pytest.fixture(scope="module")
def gate() -> InputGate:
    return InputGate.load(threads=1)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from ai.ensemble import Ensemble
    from tests.model_fixtures import build_tiny_package

    return Ensemble.load(build_tiny_package(tmp_path_factory.mktemp("m") / "pkg", size=64), threads=1)


def cr_chest(pixels: np.ndarray) -> Dataset:
    """A CR dataset whose tags say PA chest, with ``pixels`` (float [0, 1]) stored as 12-bit MONOCHROME2."""
    rows, cols = pixels.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Gate", "G1", "CR"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.clip(np.rint(pixels * 4095), 0, 4095).astype(np.uint16).tobytes()
    return ds


def _checkerboard(rows: int, cols: int, cell: int) -> np.ndarray:
    yy, xx = np.indices((rows, cols))
    return ((yy // cell + xx // cell) % 2).astype(np.float32)


def _real_frontal(data_dir: Path) -> np.ndarray:
    return dicom_to_float(pydicom.dcmread(data_dir / "dicom" / FRONTAL_DICOM))


GARBAGE: dict[str, Callable[[], np.ndarray]] = {
    "uniform black": lambda: np.zeros((1024, 1024), np.float32),
    "uniform white": lambda: np.ones((1024, 1024), np.float32),
    "checkerboard": lambda: _checkerboard(1200, 1000, 40),
    "stripes": lambda: ((np.indices((900, 1100))[1] // 25) % 2).astype(np.float32) * 0.8 + 0.1,
    "gradient": lambda: np.tile(np.linspace(0.0, 1.0, 1000, dtype=np.float32), (1100, 1)),
    "8 x 8 pixels": lambda: np.random.default_rng(8).uniform(0, 1, (8, 8)).astype(np.float32),
    "uniform noise": lambda: np.random.default_rng(3).uniform(0, 1, (1000, 1000)).astype(np.float32),
}


@pytest.fixture
def node(tmp_path: Path, ensemble, gate):  # type: ignore[no-untyped-def]
    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),))
    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"), max_attempts=2)
    return settings, store, Worker(store, ensemble, settings, owner="test:1:1", gate=gate)


def run_one(node, ds: Dataset) -> list[pydicom.Dataset]:  # type: ignore[no-untyped-def]
    """Queue ``ds`` as received, run the worker once; the result objects it wrote."""
    settings, store, worker = node
    path = instance_path(settings.data_path, ds.StudyInstanceUID, ds.SOPInstanceUID)
    write_atomic(path, lambda f: ds.save_as(f, enforce_file_format=True))
    store.record_instance(ReceivedInstance(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                           ds.SOPClassUID, "MOD", path, path.stat().st_size), True, "accepted")
    assert worker.run_once() is True
    return [pydicom.dcmread(p) for p in sorted((settings.data_path / "results").rglob("*.dcm"))]


def assert_not_analysed(objects: list[pydicom.Dataset], reason_start: str) -> str:
    """One not-analysed SR without a probability, whose reason starts with ``reason_start``, and the NOT
    ANALYSED overlay beside it; returns the reason."""
    srs = [o for o in objects if o.Modality == "SR"]
    assert len(srs) == 1, [o.SOPClassUID for o in objects]
    report = read_report(srs[0])
    assert not report.analysed and report.findings == () and report.triage is None, "a refused image has no score"
    assert report.not_analysed is not None and report.not_analysed.reason.startswith(reason_start), report
    overlays = [o for o in objects if o.SOPClassUID == SECONDARY_CAPTURE]
    assert len(overlays) == 1 and "NOT ANALYSED" in overlays[0].DerivationDescription.upper()
    return report.not_analysed.reason


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_a_garbage_pattern_labelled_pa_chest_gets_no_score_but_a_reason(node, name: str) -> None:  # type: ignore[no-untyped-def]
    reason = assert_not_analysed(run_one(node, cr_chest(GARBAGE[name]())), "image ")
    assert "not a frontal chest radiograph" in reason or "no usable content" in reason


def test_an_upside_down_chest_gets_no_score(node, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    reason = assert_not_analysed(run_one(node, cr_chest(_real_frontal(data_dir)[::-1].copy())),
                                 "image is not a frontal chest radiograph (p = ")
    assert float(reason.split("p = ")[1].split(";")[0]) < 0.5


def test_a_chest_turned_on_its_side_gets_no_score(node, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    assert_not_analysed(run_one(node, cr_chest(np.rot90(_real_frontal(data_dir)).copy())),
                        "image is not a frontal chest radiograph")


def test_a_lateral_view_whose_tags_say_pa_gets_no_score(node, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    lateral = data_dir / "views" / "images" / "lateral_000.jpg"
    reason = assert_not_analysed(run_one(node, cr_chest(read_image_file(lateral))),
                                 "image is not a frontal chest radiograph")
    assert reason.endswith("most likely a lateral view)")


def test_a_real_frontal_chest_passes_the_gate_and_is_scored(node, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    objects = run_one(node, cr_chest(_real_frontal(data_dir)))
    [sr] = [o for o in objects if o.Modality == "SR"]
    report = read_report(sr)
    assert report.analysed and [f.label for f in report.findings] == ["Tuberculosis"]
    assert 0.0 <= report.finding("Tuberculosis").probability <= 1.0
    assert [o.SOPClassUID for o in objects if o.Modality != "SR"] == [SECONDARY_CAPTURE]


def test_a_left_right_mirrored_chest_is_still_a_frontal_chest(gate: InputGate, data_dir: Path) -> None:
    """Situs inversus exists and some sites display AP images mirrored: the gate must not refuse them."""
    verdict = gate.check(_real_frontal(data_dir)[:, ::-1].copy())
    assert verdict.analysable, verdict.reason


def test_the_content_check_names_what_is_missing() -> None:
    assert content_problem(np.zeros((8, 8), np.float32)).startswith("image has no usable content (too small: 8 x 8")
    assert content_problem(np.full((512, 512), 0.5, np.float32)) == "image has no usable content (a uniform field)"
    assert content_problem(_checkerboard(512, 512, 16)) == "image has no usable content (only 2 grey levels)"
    ramp = np.tile(np.linspace(0, 1, 512, dtype=np.float32), (512, 1))
    assert content_problem(ramp) == ""  # many levels: left to the view classifier


def test_gate_reasons_carry_no_value_from_the_image_header(node) -> None:  # type: ignore[no-untyped-def]
    ds = cr_chest(GARBAGE["uniform noise"]())
    reason = assert_not_analysed(run_one(node, ds), "image ")
    for value in (str(ds.PatientName), ds.PatientID, ds.SOPInstanceUID, ds.StudyInstanceUID):
        assert value not in reason


def test_the_bundled_gate_package_is_verified_and_has_the_gate_labels() -> None:
    manifest = load_manifest(bundled_gate_dir(), verify=True)
    assert set(GATE_LABELS) <= set(manifest.labels)
    assert 0.0 < manifest.thresholds[FRONTAL].value <= 0.5


def test_a_package_without_the_gate_labels_is_refused_as_a_gate(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package

    package = build_tiny_package(tmp_path / "pkg", size=64)
    with pytest.raises(ModelPackageError, match="a gate package has"):
        InputGate.load(package)


def test_a_corrupt_gate_member_stops_the_node_at_start(tmp_path: Path) -> None:
    import shutil

    from node.packages import check_model_package

    copy = tmp_path / "gate"
    shutil.copytree(bundled_gate_dir(), copy)
    member = sorted(copy.glob("*.onnx"))[0]
    member.write_bytes(member.read_bytes()[:-100])
    settings = Settings(model=ModelSettings(gate=str(copy)))
    with pytest.raises(ModelPackageError, match=member.name):
        check_model_package(settings)


def test_gate_off_scores_every_image(tmp_path: Path) -> None:
    from node.packages import load_gate

    assert load_gate(Settings(model=ModelSettings(gate="off"))) is None
    assert isinstance(load_gate(Settings()), InputGate)


def test_predict_reports_a_lateral_png_as_not_analysed(data_dir: Path, tmp_path: Path) -> None:
    from node.predict import predict_paths

    lateral = data_dir / "views" / "images" / "lateral_000.jpg"
    flat = tmp_path / "blank.png"
    cv2.imwrite(str(flat), np.zeros((600, 500), np.uint8))
    rows = {Path(r["path"]).name: r for r in predict_paths(Settings(), [lateral, flat])}
    assert rows["lateral_000.jpg"]["status"] == "not analysed"
    assert rows["lateral_000.jpg"]["reason"].startswith("image is not a frontal chest radiograph")
    assert rows["lateral_000.jpg"]["scores"] == {}
    assert rows["blank.png"]["status"] == "not analysed"
    assert rows["blank.png"]["reason"] == "image has no usable content (a uniform field)"


def test_status_reads_recent_results_back_through_the_report_code(node, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from node.cli import format_status, report_summary

    _, store, _ = node
    run_one(node, cr_chest(_real_frontal(data_dir)))
    ds = cr_chest(GARBAGE["gradient"]())
    run_one(node, ds)
    rows = [report_summary(r) for r in store.recent_reports(recent=5)]
    assert [r["result"].split(":")[0] for r in rows] == ["not analysed", "analysed"]  # newest first
    assert rows[0]["result"].startswith("not analysed: image ")
    assert set(rows[1]["findings"]) == {"Tuberculosis"}
    text = format_status({"jobs": {}, "recent_results": rows})
    assert "recent results:" in text and "Tuberculosis" in text
    assert str(ds.PatientName) not in text and ds.PatientID not in text
