"""Worker step: one job end to end in-process (real SQLite queue, real ONNX package), failures classified."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.config import Destination, Settings, StorageSettings
from node.leases import owner_is_dead
from node.report import read_report
from node.worker import Worker
from storage.db import make_engine
from storage.files import instance_path, write_atomic
from storage.queue import ReceivedInstance, Store

CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from ai.ensemble import Ensemble
    from tests.model_fixtures import build_tiny_package

    return Ensemble.load(build_tiny_package(tmp_path_factory.mktemp("m") / "pkg", size=64), threads=1)


def chest(rows: int = 300, cols: int = 240, photometric: str = "MONOCHROME2", bits: int = 12) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Worker", "W1", "CR"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if photometric == "RGB" else (1, photometric)
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    rng = np.random.default_rng(0)
    shape = (rows, cols, 3) if photometric == "RGB" else (rows, cols)
    ds.PixelData = rng.integers(0, 2**bits, shape, dtype=np.uint16).tobytes()
    return ds


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def enqueue(store: Store, data_dir: Path, ds: Dataset, calling_ae: str = "MOD") -> int:
    """``ds`` received as the intake stores an image: the file in place, its instance and queued job recorded."""
    path = instance_path(data_dir, ds.StudyInstanceUID, ds.SOPInstanceUID)
    write_atomic(path, lambda f: ds.save_as(f, enforce_file_format=True))
    meta = ReceivedInstance(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID,
                            calling_ae, path, path.stat().st_size)
    return store.record_instance(meta, True, "accepted: test")


@pytest.fixture
def setup(tmp_path: Path, ensemble):  # type: ignore[no-untyped-def]
    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path / "var")),
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),))
    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"), max_attempts=2)
    return settings, store, Worker(store, ensemble, settings, owner="test:1:1")


def test_a_frontal_image_yields_sr_and_overlay_queued_for_every_destination(setup) -> None:  # type: ignore[no-untyped-def]
    settings, store, worker = setup
    enqueue(store, settings.data_path, chest())
    assert worker.run_once() is True
    assert worker.run_once() is False  # nothing else due
    status = store.status()
    assert nonzero(status["jobs"]) == {"done": 1}
    assert nonzero(status["outbox"]["pacs"]) == {"pending": 2}
    produced = sorted((settings.data_path / "results").rglob("*.dcm"))
    classes = sorted(pydicom.dcmread(p).SOPClassUID for p in produced)
    assert classes == ["1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"]


def test_rerun_after_a_crash_produces_the_same_result_uids(setup) -> None:  # type: ignore[no-untyped-def]
    settings, store, worker = setup
    ds = chest()
    job_id = enqueue(store, settings.data_path, ds)
    leased = store.lease_job("dead:1:1", 60)
    assert leased is not None and leased.job_id == job_id
    first = worker.process(leased)
    uids_first = {p.name for p in (settings.data_path / "results").rglob("*.dcm")}
    worker.process(leased)  # the same job again, as after a crash between writing and recording
    uids_second = {p.name for p in (settings.data_path / "results").rglob("*.dcm")}
    assert first == ["sr", "sc"] and uids_first == uids_second and len(uids_first) == 2
    assert nonzero(store.status()["outbox"]["pacs"]) == {"pending": 2}


def test_an_image_that_cannot_be_analysed_gets_a_failure_sr(setup) -> None:  # type: ignore[no-untyped-def]
    settings, store, worker = setup
    enqueue(store, settings.data_path, chest(photometric="RGB", bits=8))
    worker.run_once()
    produced = list((settings.data_path / "results").rglob("*.dcm"))
    assert len(produced) == 1
    sr = pydicom.dcmread(produced[0])
    assert sr.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.88")
    statement = read_report(sr).not_analysed
    assert statement is not None and "MONOCHROME" in statement.reason, statement
    assert nonzero(store.status()["jobs"]) == {"done": 1}


def test_a_missing_received_file_fails_the_job_for_good_with_the_reason(setup) -> None:  # type: ignore[no-untyped-def]
    settings, store, worker = setup
    ds = chest()
    enqueue(store, settings.data_path, ds)
    instance_path(settings.data_path, ds.StudyInstanceUID, ds.SOPInstanceUID).unlink()
    worker.run_once()
    status = store.status()
    assert nonzero(status["jobs"]) == {"failed": 1}
    assert "missing" in status["job_failures"][0]["error"]


def test_an_unexpected_error_is_retried_then_failed(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings, store, worker = setup
    worker.settings = replace(settings, worker=replace(settings.worker, retry_initial_s=0.0))
    enqueue(store, settings.data_path, chest())
    calls = []

    def boom(*_args: object) -> None:
        calls.append(1)
        raise RuntimeError("transient trouble")

    monkeypatch.setattr("node.worker.analyse_dataset", boom)
    worker.run_once()
    assert nonzero(store.status()["jobs"]) == {"queued": 1}  # retryable: back in the queue
    worker.run_once()
    assert nonzero(store.status()["jobs"]) == {"failed": 1} and len(calls) == 2  # max_attempts = 2


def test_owner_is_dead_only_for_gone_processes_of_this_host() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    assert owner_is_dead(f"{host}:{gone.stdout.strip()}:1")
    assert not owner_is_dead(f"{host}:{os.getppid()}:1")
    assert not owner_is_dead(f"{host}:{os.getpid()}:1")
    assert not owner_is_dead(f"other-host:{gone.stdout.strip()}:1")


def test_start_up_reaps_leases_of_dead_workers_before_they_expire(setup) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = setup
    enqueue(store, settings.data_path, chest())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert store.lease_job(f"{socket.gethostname()}:{gone.stdout.strip()}:1", 3600) is not None
    assert store.reap_expired_leases() == 0  # the lease has not expired
    assert store.reap_expired_leases(owner_is_dead) == 1
    assert nonzero(store.status()["jobs"]) == {"queued": 1}


def test_a_job_whose_runs_all_ended_without_a_result_ends_with_a_not_analysed_sr(setup) -> None:  # type: ignore[no-untyped-def]
    """Every run's lease expired (a worker died each time before recording anything): the reaper
    re-queues it even past max_attempts, and the next worker ends it with a not-analysed SR."""
    settings, store, worker = setup
    enqueue(store, settings.data_path, chest())
    for _ in range(store.max_attempts):
        assert store.lease_job("gone:1:1", lease_s=0.0) is not None
        time.sleep(0.01)
        assert store.reap_expired_leases() == 1
    assert worker.run_once() is True
    status = store.status()
    assert nonzero(status["jobs"]) == {"failed": 1}
    assert "attempts used up" in status["job_failures"][0]["error"]
    assert nonzero(status["outbox"]["pacs"]) == {"pending": 1}  # the not-analysed SR goes to the PACS
    (sr_path,) = (settings.data_path / "results").rglob("*.dcm")
    statement = read_report(pydicom.dcmread(sr_path)).not_analysed
    assert statement is not None and "did not finish in 2 attempts" in statement.reason, statement
