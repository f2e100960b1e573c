"""Every accepted image ends with a result at the PACS; a full disk only delays results; overlays stay small.

- Hostile headers (invalid UIDs, dates, ages, names, wrong VRs, over-long values, missing Modality, unknown
  SOP classes) still give a "not analysed" SR that passes dciodvfy and that Orthanc stores; its reason
  never quotes a value of the source.
- A job that fails for good (a permanent error, or its attempts used up) still sends that SR.
- Results that meet a full disk (a real tmpfs) wait without using attempts, with one alert, and are all
  written and sent once space is freed.
- Overlays: long side at most 1024, stored as RLE Lossless (a fraction of the uncompressed RGB size).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import RLELossless

from ai.findings import Finding
from ai.pixels import dicom_to_float
from node.config import Destination, SendSettings, Settings, StorageSettings, WorkerSettings
from node.results import AlgorithmInfo, build_failure_sr, build_overlay, scrub_reason
from node.send import Outbox, send_files
from node.worker import Worker
from storage.db import make_engine
from storage.queue import Store
from tests.conftest import mounted_tmpfs
from tests.peers import Orthanc, orthanc
from tests.test_results import dciodvfy_lines
from tests.test_worker import chest, enqueue, nonzero

ALGORITHM = AlgorithmInfo(name="cxr-tb", version="1.2.0")
MARK = "ZQXMARK"  # planted in source values; a reason or a log line must never show it
VALID_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# name -> raw elements written as found in hostile files: (keyword, VR as encoded, value bytes or None = delete)
HOSTILE: dict[str, list[tuple[str, str, bytes | None]]] = {
    "study-uid-leading-zero": [("StudyInstanceUID", "UI", b"1.2.03.4")],
    "sop-uid-too-long": [("SOPInstanceUID", "UI", b"1." + b"2" * 80)],
    "series-uid-letters": [("SeriesInstanceUID", "UI", b"1.2." + MARK.encode())],
    "uids-missing": [("StudyInstanceUID", "UI", None), ("SeriesInstanceUID", "UI", None),
                     ("SOPInstanceUID", "UI", None)],
    "unknown-sop-class": [("SOPClassUID", "UI", b"1.2.3.4.5")],
    "invalid-sop-class": [("SOPClassUID", "UI", MARK.encode())],
    "no-modality": [("Modality", "CS", None)],
    "bad-dates-and-times": [("StudyDate", "DA", b"2020-99-99"), ("PatientBirthDate", "DA", MARK.encode()),
                            ("StudyTime", "TM", b"99:99")],
    "age-words": [("PatientAge", "AS", b"62 years")],
    "age-wrong-vr": [("PatientAge", "US", b"\x3e\x00")],
    "names-overlong": [("PatientName", "PN", b"A" * 300 + b"^B^C^D^E^F^G=" + MARK.encode() * 20),
                       ("ReferringPhysicianName", "PN", MARK.encode() + b"=x=y=z=w")],
    "name-binary": [("PatientName", "OB", b"\xff\xfe\x00" + MARK.encode())],
    "ids-overlong": [("PatientID", "LO", MARK.encode() * 30), ("AccessionNumber", "SH", b"9" * 100),
                     ("StudyID", "SH", b"S" * 40),
                     ("StudyDescription", "LO", b"Thorax\x01\x1b" + MARK.encode() * 80)],
    "instance-number-text": [("InstanceNumber", "IS", MARK.encode())],
    "unknown-charset": [("SpecificCharacterSet", "CS", b"ISO_IR 999"),
                        ("PatientName", "PN", b"M\xfcller^" + MARK.encode())],
    "multi-valued": [("PatientID", "LO", MARK.encode() + b"\\B"), ("StudyDate", "DA", b"20200101\\20200102"),
                     ("PatientSex", "CS", b"M\\F")],
    "sex-size-weight": [("PatientSex", "CS", b"male"), ("PatientSize", "DS", b"1.75 m"),
                        ("PatientWeight", "DS", b"-5")],
}
HOSTILE["everything"] = [edit for name, edits in HOSTILE.items() if name != "name-binary" for edit in edits]


def set_raw(ds: Dataset, keyword: str, vr: str, value: bytes | None) -> None:
    """Put a value into ``ds`` as a file would carry it: raw bytes under the VR given, unchecked."""
    tag = Tag(tag_for_keyword(keyword))
    if value is None:
        if tag in ds:
            del ds[tag]
        return
    if len(value) % 2:
        value += b" "
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def hostile(ds: Dataset, case: str) -> Dataset:
    """``ds`` with the raw elements of ``case``, written and read back (what the worker would read)."""
    for keyword, vr, value in HOSTILE[case]:
        set_raw(ds, keyword, vr, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def rg1_header() -> Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)


def reasons(sr: Dataset) -> list[str]:
    """The free text of an SR (TEXT content items)."""
    return [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]


#: A source UID that breaks only PS3.5 9.1's leading-zero rule is referenced verbatim (never rewritten).
VERBATIM = {"study-uid-leading-zero": "1.2.03.4"}


def check_uids(sr: Dataset, verbatim: str | None = None) -> None:
    for element in sr.iterall():
        if element.VR == "UI" and element.value:
            values = element.value if isinstance(element.value, list | pydicom.multival.MultiValue) else [
                element.value]
            for value in values:
                assert value == verbatim or (len(str(value)) <= 64 and VALID_UID.match(str(value))), (
                    element.keyword, value)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with orthanc(tmp_path_factory.mktemp("orthanc")) as peer:
        yield peer


def destination(pacs: Orthanc) -> Destination:
    return Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)


# --- hostile headers: a valid "not analysed" SR, whatever the source holds -------------------------


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_failure_sr_is_valid_for_every_hostile_header(case: str, tmp_path: Path) -> None:
    source = hostile(rg1_header(), case)
    reason = f"PhotometricInterpretation must be MONOCHROME1/2, got '{MARK}' in {source.get('SOPInstanceUID')}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = build_failure_sr(source, reason, ALGORITHM, device_ae="CXRNODE")
        again = build_failure_sr(source, reason, ALGORITHM, device_ae="CXRNODE")
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
    assert sr.SOPInstanceUID == again.SOPInstanceUID  # a re-run gives the same object
    check_uids(sr, VERBATIM.get(case))
    if case in VERBATIM:
        assert sr.StudyInstanceUID == VERBATIM[case]
    text = reasons(sr)
    assert any("could not be analysed: PhotometricInterpretation must be MONOCHROME1/2" in t for t in text), text
    assert not any(MARK in t for t in text), text
    errors = [line for line in dciodvfy_lines(path) if line.startswith("Error")]
    if case in VERBATIM:  # dciodvfy refuses the source's own UID where the SR carries it, and nothing else
        errors = [e for e in errors if f"<{VERBATIM[case]}>" not in e
                  and e != "Error - Dicom dataset contains invalid data values for Value Representations"]
    assert errors == [], f"{case}: {errors}"


@pytest.mark.integration
def test_orthanc_stores_the_result_of_every_hostile_header(pacs: Orthanc, tmp_path: Path) -> None:
    paths = []
    for case in sorted(HOSTILE):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sr = build_failure_sr(hostile(rg1_header(), case), "decode failed", ALGORITHM, device_ae="CXRNODE")
            path = tmp_path / f"{case}.dcm"
            sr.save_as(path, enforce_file_format=True)
        paths.append(path)
    outcomes = send_files(destination(pacs), paths, "CXR-AI")
    assert [o.verdict.name for o in outcomes] == ["SENT"] * len(paths), [o.error for o in outcomes if o.error]
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.instances()}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in paths} <= stored


def test_reasons_name_attributes_not_values() -> None:
    assert scrub_reason(f"NumberOfFrames must be an integer, got '{MARK}' in 1.2.3") == \
        "NumberOfFrames must be an integer"
    assert scrub_reason(f"cannot decode pixel data of 1.2.3 (transfer syntax 1.2.840.10008.1.2.5): "
                        f"invalid literal for int() with base 10: b'{MARK}'") == \
        "cannot decode pixel data: invalid literal for int() with base 10"
    assert scrub_reason("field not found") == "field not found"
    assert scrub_reason("received file of 1.2.3 is missing: /var/instances/1.2/1.2.3.dcm") == \
        "received file is missing"


# --- the worker: every job that ends failed still tells the PACS -----------------------------------


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from ai.ensemble import Ensemble
    from tests.model_fixtures import build_tiny_package

    return Ensemble.load(build_tiny_package(tmp_path_factory.mktemp("m") / "pkg", size=64), threads=1)


def node_setup(tmp_path: Path, data_dir: Path, ensemble, **worker: float):  # type: ignore[no-untyped-def]
    settings = Settings(storage=StorageSettings(data_dir=str(data_dir), min_free_mb=1),
                        worker=WorkerSettings(**worker),  # type: ignore[arg-type]
                        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),))
    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"), max_attempts=settings.worker.max_attempts)
    return settings, store, Worker(store, ensemble, settings, owner="test:1:1")


def failure_srs(data_dir: Path) -> list[Dataset]:
    srs = [pydicom.dcmread(p) for p in sorted((data_dir / "results").rglob("*.dcm"))]
    return [sr for sr in srs if any("could not be analysed" in t for t in reasons(sr))]


def test_attempts_used_up_still_send_a_not_analysed_sr(tmp_path: Path, ensemble, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings, store, worker = node_setup(tmp_path, tmp_path / "var", ensemble, max_attempts=2, retry_initial_s=0.0)

    def boom(*_args: object) -> None:
        raise RuntimeError(f"transient trouble with '{MARK}'")

    monkeypatch.setattr("node.worker.analyse_dataset", boom)
    enqueue(store, settings.data_path, chest())
    worker.run_once()
    assert failure_srs(settings.data_path) == []  # a retry is due: nothing said yet
    worker.run_once()
    status = store.status()
    assert nonzero(status["jobs"]) == {"failed": 1}
    assert nonzero(status["outbox"]["pacs"]) == {"pending": 1}
    (sr,) = failure_srs(settings.data_path)
    # a library's (here Python's own) message is withheld: only its type is said
    assert any("analysis failed 2 times, last with RuntimeError" in t for t in reasons(sr)), reasons(sr)
    assert MARK not in str(status)


def test_a_permanent_error_after_analysis_still_sends_a_not_analysed_sr(tmp_path: Path, ensemble) -> None:  # type: ignore[no-untyped-def]
    settings, store, worker = node_setup(tmp_path, tmp_path / "var", ensemble)
    ds = chest()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5"  # analysed, but build_sr refuses it
    enqueue(store, settings.data_path, ds)
    worker.run_once()
    status = store.status()
    assert nonzero(status["jobs"]) == {"failed": 1}
    assert nonzero(status["outbox"]["pacs"]) == {"pending": 1}
    (sr,) = failure_srs(settings.data_path)
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == ("1.2.3.4.5", ds.SOPInstanceUID)


def test_a_hostile_image_gets_a_not_analysed_sr_without_its_values(  # type: ignore[no-untyped-def]
    tmp_path: Path, ensemble, caplog: pytest.LogCaptureFixture
) -> None:
    settings, store, worker = node_setup(tmp_path, tmp_path / "var", ensemble)
    ds = chest()
    for keyword, vr, value in HOSTILE["everything"]:
        if not keyword.endswith("UID"):  # the intake validated these
            set_raw(ds, keyword, vr, value)
    set_raw(ds, "PhotometricInterpretation", "CS", MARK.encode())  # quoted by the decoder's error
    enqueue(store, settings.data_path, ds)
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worker.run_once()
    status = store.status()
    assert nonzero(status["jobs"]) == {"done": 1}
    (sr,) = failure_srs(settings.data_path)
    check_uids(sr)
    assert not any(MARK in t for t in reasons(sr)), reasons(sr)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith(("node", "storage"))]
    assert MARK not in str(status) and not [m for m in ours if MARK in m]


# --- a full disk while writing results --------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs to fill (see tests.conftest.mounted_tmpfs)."""
    with mounted_tmpfs(tmp_path / "small", 8) as mnt:
        yield mnt


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):  # down to the last free block
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


@pytest.mark.integration
def test_results_wait_for_disk_space_then_are_all_written_and_sent(  # type: ignore[no-untyped-def]
    tmp_path: Path, small_fs: Path, ensemble, pacs: Orthanc, caplog: pytest.LogCaptureFixture
) -> None:
    settings, store, worker = node_setup(tmp_path, small_fs / "var", ensemble, max_attempts=2, retry_initial_s=0.0)
    settings = replace(settings, destinations=(destination(pacs),))
    worker.settings = settings  # its destinations come from its settings (no live settings here)
    images = [chest(rows=256, cols=200) for _ in range(4)]
    for ds in images:
        enqueue(store, settings.data_path, ds)
    filler = fill(small_fs)
    with caplog.at_level(logging.INFO):
        for _ in range(3 * len(images)):  # more runs than attempts allow: none may fail
            worker.run_once()
    status = store.status()
    assert nonzero(status["jobs"]) == {"queued": 4}, status
    # The first job met the full disk and waits; while it does, the worker leases no other job (its
    # analysis would be thrown away), so the other three are still plainly queued.
    assert status["waiting_for_disk"] == 1 and status["outbox"] == {}
    assert caplog.text.count("ALERT: disk full while writing results") == 1

    filler.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        while worker.run_once():
            pass
    status = store.status()
    assert nonzero(status["jobs"]) == {"done": 4} and status["waiting_for_disk"] == 0
    assert caplog.text.count("disk space available again") == 1
    assert nonzero(status["outbox"]["pacs"]) == {"pending": 8}  # SR + overlay per image
    Outbox(store, settings.destinations, SendSettings(timeout_s=10), "CXR-AI").run_due()
    assert nonzero(store.status()["outbox"]["pacs"]) == {"sent": 8}
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.instances()}
    referenced = set()
    for path in (settings.data_path / "results").rglob("*.dcm"):
        result = pydicom.dcmread(path)
        assert result.SOPInstanceUID in stored
        if "SourceImageSequence" in result:
            referenced.add(result.SourceImageSequence[0].ReferencedSOPInstanceUID)
    assert referenced == {ds.SOPInstanceUID for ds in images}


# --- overlay size -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "limit_mb"), [((512, 512), 0.8), ((2048, 2048), 1.6), ((3000, 2500), 1.4)])
def test_overlays_are_capped_and_compressed(shape: tuple[int, int], limit_mb: float, tmp_path: Path) -> None:
    """A real chest image at typical sizes (uncompressed RGB overlays were 2.1, 14.7 and 12.0 MB)."""
    full = dicom_to_float(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")))
    image = cv2.resize(full, (shape[1], shape[0]), interpolation=cv2.INTER_AREA).astype(np.float32)
    heat = np.zeros(shape, np.float32)
    heat[shape[0] // 4 : shape[0] // 2, shape[1] // 4 : shape[1] // 2] = 1.0
    source = rg1_header()
    source.Rows, source.Columns = shape
    findings = [Finding("Tuberculosis", 0.9, 0.4, True, "x"), Finding("Pneumonia", 0.1, 0.4, False, "x")]
    sc = build_overlay(source, image, findings, ALGORITHM, {"Tuberculosis": heat}, device_ae="CXRNODE")
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    banner_rows = 200  # at most, above the image
    assert sc.Columns <= 1024 and sc.Rows <= 1024 + banner_rows and max(sc.Columns, sc.Rows) >= 768
    assert sc.file_meta.TransferSyntaxUID == RLELossless
    assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSTIC USE" in sc.DerivationDescription
    assert path.stat().st_size < limit_mb * 1e6, path.stat().st_size


def test_waiting_for_disk_uses_no_attempt_and_starts_one_episode(tmp_path: Path) -> None:
    store = Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"), max_attempts=1)
    enqueue(store, tmp_path / "var", chest(rows=8, cols=8))
    episode_starts = []
    for _ in range(3):  # with max_attempts 1, any counted start would fail the job
        job = store.lease_job("test:1:1", 60)
        assert job is not None and job.attempts == 1
        episode_starts.append(store.wait_for_disk(job.job_id, "DiskFull: no space", job.lease_expires_at) == 0)
        store.clock = lambda job=job: job.lease_expires_at  # due again
    assert episode_starts == [True, False, False]
    assert store.results_waiting_for_disk() == 1 and store.status()["waiting_for_disk"] == 1
    job = store.lease_job("test:1:1", 60)
    assert job is not None
    store.complete_job(job.job_id, [], ["pacs"])
    assert store.results_waiting_for_disk() == 0 and nonzero(store.status()["jobs"]) == {"done": 1}
