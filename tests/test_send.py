"""Sending results (node.send) to real dcmtk peers: storescp as the PACS, dcmqrscp for AE checks."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import node.send
from node.config import Destination, SendSettings
from node.send import Outbox, SendOutcome, Verdict, classify_status, echo, send_file, send_files
from storage.db import UTC, make_engine
from storage.queue import ReceivedInstance, ResultRecord, Store
from tests.conftest import free_port, require_tool
from tests.peers import DCMTK_ENV

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def make_file(folder: Path, n: int, sop_class: str = SecondaryCaptureImageStorage,
              transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """A small synthetic image (no patient data) written as a DICOM file."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "TEST", "OT", 1, n
    ds.ConversionType, ds.SeriesDescription = "WSD", f"synthetic {n}"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(256, dtype=np.uint16) * (n + 1) % 4096).reshape(16, 16).tobytes()
    path = folder / f"{n}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def listening(port: int) -> bool:
    """Whether a socket listens on ``port``, read from /proc (a probe connection would disturb the
    single-process dcmtk peers, which then reject it and log errors)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                return True
    return False


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited with {process.returncode} before listening on port {port}")
        if listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"peer did not listen on port {port} within {timeout} s")


@contextmanager
def storescp(folder: Path, port: int, *extra: str, aet: str = "PACS") -> Iterator[Path]:
    """dcmtk storescp accepting all transfer syntaxes; yields the folder it stores into."""
    out = folder / f"received-{port}"
    out.mkdir(exist_ok=True)
    cmd = [require_tool("storescp"), "-aet", aet, "-od", str(out), "+xa", "-ta", "5", *extra, str(port)]
    with open(folder / f"storescp-{port}.log", "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        wait_listening(port, process)
        yield out
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def dcmqrscp(folder: Path, port: int, aet: str = "PACS") -> Iterator[None]:
    """dcmtk dcmqrscp, which refuses associations addressed to an AE title it does not know."""
    db = folder / "qr"
    db.mkdir(exist_ok=True)
    cfg = folder / "dcmqrscp.cfg"
    cfg.write_text(f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
                   "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
                   f"AETable BEGIN\n{aet} {db} RW (10, 64mb) ANY\nAETable END\n")
    cmd = [require_tool("dcmqrscp"), "-c", str(cfg), "--single-process"]
    with open(folder / "dcmqrscp.log", "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        wait_listening(port, process)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


def pacs(port: int, ae_title: str = "PACS") -> Destination:
    return Destination(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port)


def received(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in folder.iterdir())}


@pytest.mark.integration
def test_sent_file_arrives_with_the_same_dataset_and_nodelay(
    tmp_path: Path, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodelay: list[int] = []
    original = node.send._set_nodelay

    def spy(event: Any) -> None:
        original(event)
        nodelay.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(node.send, "_set_nodelay", spy)
    path = make_file(tmp_path, 1)
    with storescp(tmp_path, port) as out:
        outcome = send_file(pacs(port), path, "CXR-AI", timeout_s=5)
    assert outcome.verdict is Verdict.SENT, outcome.error
    assert (outcome.status, outcome.error, outcome.associated) == (0, "", True)
    assert outcome.transfer_syntax == ExplicitVRLittleEndian
    sent = pydicom.dcmread(path)
    got = received(out)[str(sent.SOPInstanceUID)]
    assert got == sent, "dataset content changed in transit"
    assert got.PixelData == sent.PixelData
    assert nodelay and all(nodelay), "TCP_NODELAY was not set on the association socket"


@pytest.mark.integration
def test_one_association_for_several_files_and_an_unreadable_one(tmp_path: Path, port: int) -> None:
    paths = [make_file(tmp_path, n) for n in range(2)]
    paths.insert(1, tmp_path / "missing.dcm")
    paths.append(make_file(tmp_path, 3, transfer_syntax=ImplicitVRLittleEndian))
    with storescp(tmp_path, port) as out:
        outcomes = send_files(pacs(port), paths, "CXR-AI", timeout_s=5)
    assert [o.verdict for o in outcomes] == [Verdict.SENT, Verdict.REJECTED, Verdict.SENT, Verdict.SENT]
    assert "cannot read result file" in outcomes[1].error and "missing.dcm" in outcomes[1].error
    assert len(received(out)) == 3


@pytest.mark.integration
def test_compressed_file_goes_in_its_own_transfer_syntax(tmp_path: Path, port: int) -> None:
    path = make_file(tmp_path, 1)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    with storescp(tmp_path, port) as out:
        outcome = send_file(pacs(port), path, "CXR-AI", timeout_s=5)
    assert outcome.verdict is Verdict.SENT, outcome.error
    assert outcome.transfer_syntax == RLELossless
    got = received(out)[str(ds.SOPInstanceUID)]
    assert got.file_meta.TransferSyntaxUID == RLELossless
    assert got.PixelData == ds.PixelData


@pytest.mark.integration
def test_refused_sop_class_is_rejected_and_exposed(tmp_path: Path, port: int) -> None:
    path = make_file(tmp_path, 1, sop_class="1.2.826.0.1.3680043.8.498.77")  # unknown to storescp
    with storescp(tmp_path, port):
        outcome = send_file(pacs(port), path, "CXR-AI", timeout_s=5)
    assert outcome.verdict is Verdict.REJECTED
    assert outcome.context_refused
    assert outcome.sop_class_uid == "1.2.826.0.1.3680043.8.498.77"
    assert "refused every proposed presentation context" in outcome.error


@pytest.mark.integration
def test_refused_sop_class_beside_an_accepted_one(tmp_path: Path, port: int) -> None:
    paths = [make_file(tmp_path, 1, sop_class="1.2.826.0.1.3680043.8.498.77"), make_file(tmp_path, 2)]
    with storescp(tmp_path, port):
        refused, sent = send_files(pacs(port), paths, "CXR-AI", timeout_s=5)
    assert sent.verdict is Verdict.SENT
    assert refused.verdict is Verdict.REJECTED and refused.context_refused and refused.associated
    assert "refused SOP class" in refused.error


@pytest.mark.integration
def test_abort_before_the_response_is_retryable(tmp_path: Path, port: int) -> None:
    path = make_file(tmp_path, 1)
    with storescp(tmp_path, port, "--abort-after"):
        outcome = send_file(pacs(port), path, "CXR-AI", timeout_s=5)
    assert outcome.verdict is Verdict.RETRYABLE
    assert outcome.status is None and "no C-STORE response" in outcome.error


@pytest.mark.integration
def test_unknown_called_ae_is_rejected_for_good(tmp_path: Path, port: int) -> None:
    path = make_file(tmp_path, 1)
    with dcmqrscp(tmp_path, port, aet="PACS"):
        outcome = send_file(pacs(port, ae_title="NOT-PACS"), path, "CXR-AI", timeout_s=5)
        assert echo(pacs(port), "CXR-AI", timeout_s=5)
    assert outcome.verdict is Verdict.REJECTED, outcome.error
    assert not outcome.associated
    assert "Called AE" in outcome.error and "NOT-PACS" in outcome.error


@pytest.mark.integration
def test_echo(tmp_path: Path, port: int) -> None:
    assert not echo(pacs(port), "CXR-AI", timeout_s=2)
    with storescp(tmp_path, port):
        assert echo(pacs(port), "CXR-AI", timeout_s=5)


def make_outbox_store(tmp_path: Path, results: Sequence[Path], destinations: Sequence[str]) -> Store:
    """A SQLite store holding one done job whose results wait in the outbox."""
    store = Store(make_engine(f"sqlite:///{tmp_path / 'outbox.sqlite'}"), clock=lambda: T0)
    meta = ReceivedInstance("1.2.3.4", "1.2.3", "1.2.3.1", SecondaryCaptureImageStorage, "MOD",
                            tmp_path / "src.dcm", 1)
    job_id = store.record_instance(meta, True, "")
    store.lease_job("w", 60)
    records = [ResultRecord("sr", str(pydicom.dcmread(p).SOPInstanceUID), p) for p in results]
    store.complete_job(job_id, records, list(destinations))
    return store


@pytest.mark.integration
def test_pacs_down_reschedules_with_backoff_then_delivers(
    tmp_path: Path, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [make_file(tmp_path, n) for n in range(2)]
    store = make_outbox_store(tmp_path, paths, ["pacs"])
    settings = SendSettings(retry_initial_s=10, retry_max_s=15, alert_after=2, timeout_s=5)
    outbox = Outbox(store, [pacs(port)], settings, "CXR-AI")
    caplog.set_level(logging.WARNING, logger="node.send")

    assert outbox.run_due(T0) == 2  # nobody listens on the port
    assert store.due_outbox(T0 + dt.timedelta(seconds=9.9)) == []
    due = store.due_outbox(T0 + dt.timedelta(seconds=10))
    assert [(e.state, e.attempts) for e in due] == [("failed", 1)] * 2
    assert "connection refused" in (due[0].last_error or "")
    assert "ALERT" not in caplog.text

    assert outbox.run_due(T0 + dt.timedelta(seconds=10)) == 2  # second failure: 20 s, capped at 15
    assert store.due_outbox(T0 + dt.timedelta(seconds=24.9)) == []
    assert len(store.due_outbox(T0 + dt.timedelta(seconds=25))) == 2
    assert "ALERT: destination pacs" in caplog.text

    with storescp(tmp_path, port) as out:
        assert outbox.run_due(T0 + dt.timedelta(seconds=25)) == 2
    assert len(received(out)) == 2
    assert store.status()["outbox"]["pacs"]["sent"] == 2
    assert outbox.consecutive_failures["pacs"] == 0


@pytest.mark.integration
def test_rejection_through_the_outbox_is_never_retried(tmp_path: Path, port: int) -> None:
    store = make_outbox_store(tmp_path, [make_file(tmp_path, 1)], ["pacs"])
    outbox = Outbox(store, [pacs(port, ae_title="NOT-PACS")], SendSettings(timeout_s=5), "CXR-AI")
    with dcmqrscp(tmp_path, port, aet="PACS"):
        assert outbox.run_due(T0) == 1
    assert store.due_outbox(T0 + dt.timedelta(days=1)) == []
    (failure,) = store.status()["send_failures"]
    assert failure["state"] == "rejected" and "Called AE" in failure["error"]


def test_outbox_keeps_entries_of_an_unconfigured_destination(tmp_path: Path) -> None:
    store = make_outbox_store(tmp_path, [make_file(tmp_path, 1)], ["gone"])

    def never(*args: Any) -> list[SendOutcome]:
        raise AssertionError("nothing may be sent to an unconfigured destination")

    outbox = Outbox(store, [pacs(104)], SendSettings(retry_max_s=600), "CXR-AI", sender=never)
    assert outbox.run_due(T0) == 1
    (entry,) = store.due_outbox(T0 + dt.timedelta(seconds=600))
    assert entry.state == "failed" and "'gone' is not configured" in (entry.last_error or "")


def test_retry_delay_doubles_up_to_the_cap() -> None:
    outbox = Outbox.__new__(Outbox)
    outbox.settings = SendSettings(retry_initial_s=10, retry_max_s=600)
    assert [outbox.retry_delay(n) for n in range(1, 9)] == [10, 20, 40, 80, 160, 320, 600, 600]


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (0x0000, Verdict.SENT),
        (0xB000, Verdict.SENT),  # warning: coercion of data elements
        (0xA700, Verdict.RETRYABLE),  # out of resources
        (0xA7FF, Verdict.RETRYABLE),
        (0x0213, Verdict.RETRYABLE),  # resource limitation
        (0x0110, Verdict.RETRYABLE),  # processing failure
        (0xA900, Verdict.REJECTED),  # data set does not match SOP class
        (0xC000, Verdict.REJECTED),  # cannot understand
        (0x0122, Verdict.REJECTED),  # SOP class not supported
    ],
)
def test_classify_status(code: int, verdict: Verdict) -> None:
    assert classify_status(code) is verdict


def test_free_port_is_free_for_the_down_peer() -> None:
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", free_port())) != 0


@pytest.mark.integration
def test_a_compressed_overlay_is_sent_uncompressed_to_a_pacs_that_takes_only_uncompressed(
        tmp_path: Path, port: int) -> None:
    path = make_file(tmp_path, 1)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    with storescp(tmp_path, port, "+xe") as out:  # the last transfer syntax option wins: uncompressed only
        outcome = send_file(pacs(port), path, "CXR-AI", timeout_s=5)
    assert outcome.verdict is Verdict.SENT, outcome.error
    assert outcome.transfer_syntax == ExplicitVRLittleEndian
    got = received(out)[str(ds.SOPInstanceUID)]
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless  # the stored result is unchanged
