"""A PACS that refuses Comprehensive 3D SR (88.34) receives the same report as Comprehensive SR (88.33)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage  # type: ignore[attr-defined]

from ai.findings import Finding
from node.config import Destination, SendSettings
from node.results import COMPREHENSIVE_SR, AlgorithmInfo, as_comprehensive_sr, build_sr
from node.send import Outbox
from storage.db import make_engine
from storage.files import result_path, write_atomic
from storage.queue import ReceivedInstance, ResultRecord, Store
from tests.conftest import free_port, require_tool

pytestmark = pytest.mark.integration


def _source() -> pydicom.Dataset:
    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed (test extra)")
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_fallback_copy_is_a_valid_comprehensive_sr(tmp_path: Path) -> None:
    import subprocess

    sr = build_sr(_source(), [Finding("Tuberculosis", 0.7, 0.5, True, "Youden J on OOF")],
                  AlgorithmInfo("m", "1"), device_ae="CXR-AI")
    copy = as_comprehensive_sr(sr)
    assert copy.SOPClassUID == COMPREHENSIVE_SR and copy.SOPInstanceUID != sr.SOPInstanceUID
    assert as_comprehensive_sr(sr).SOPInstanceUID == copy.SOPInstanceUID  # deterministic
    assert copy.ContentSequence == sr.ContentSequence
    path = tmp_path / "copy.dcm"
    copy.save_as(path, enforce_file_format=True)
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    assert not [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_outbox_falls_back_when_the_peer_refuses_88_34(tmp_path: Path) -> None:
    received: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="OLDPACS")
    ae.add_supported_context(ComprehensiveSRStorage)  # 88.33 only
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        store = Store(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"))
        src = _source()
        job_id = store.record_instance(ReceivedInstance(src.SOPInstanceUID, src.StudyInstanceUID,
                                                        src.SeriesInstanceUID, src.SOPClassUID, "MOD",
                                                        tmp_path / "src.dcm", 1), True, "accepted")
        sr = build_sr(src, [Finding("Tuberculosis", 0.2, 0.5, False, "Youden J on OOF")],
                      AlgorithmInfo("m", "1"), device_ae="CXR-AI")
        path = result_path(tmp_path, sr.StudyInstanceUID, sr.SOPInstanceUID)
        write_atomic(path, lambda f: sr.save_as(f, enforce_file_format=True))
        leased = store.lease_job("t", 60)
        assert leased is not None and leased.job_id == job_id
        store.complete_job(job_id, [ResultRecord("sr", sr.SOPInstanceUID, path)], ["old"])
        dest = Destination("old", "OLDPACS", "127.0.0.1", port)
        outbox = Outbox(store, [dest], SendSettings(retry_initial_s=1, retry_max_s=2), "CXR-AI")
        assert outbox.run_due() == 1
        assert len(received) == 1
        assert received[0].SOPClassUID == COMPREHENSIVE_SR
        assert received[0].SOPInstanceUID == as_comprehensive_sr(sr).SOPInstanceUID
        assert store.status()["outbox"]["old"].get("sent") == 1
    finally:
        server.shutdown()
