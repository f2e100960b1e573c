"""Receive step: the SCP against real dcmtk clients, and the intake's error paths.

Integration tests start the node's SCP in this process on a free loopback port and drive it with
dcmtk (dcmsend, echoscu); the database is a SQLite file in the test's folder.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    Verification,
)
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import node.intake as intake_module
from ai.errors import RetryableError
from node.config import ScpSettings, Settings, StorageSettings
from node.filter import FilterRules
from node.intake import Intake
from node.receive import make_ae, start_scp
from node.refusals import Status
from node.scp_server import NoDelayAssociationServer, SharedSocketAssociationServer
from node.transport import decode_p_data_tf
from storage.db import Instance, Job, make_engine
from storage.files import write_atomic
from storage.queue import Store
from tests.conftest import free_port, require_tool

AE_TITLE = "CXR-AI"
MODALITY = "MODALITY"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle on otherwise (~40 ms per C-STORE)
REAL_FILES = {  # file in data_dir/dicom -> analysed (no_view_policy "analyse")
    "rsna_cr_pa_jpeg_baseline.dcm": True,
    "rsna_cr_ap_jpeg_baseline.dcm": True,
    "dx_pa_chest_j2k_lossless.dcm": True,
    "cr_pa_chest_jpegls_near_lossless.dcm": True,
    "cr_chest_monochrome1_jpeg_no_view_tags.dcm": True,
    "dx_thorax_canine_not_human.dcm": False,
}


@pytest.fixture(autouse=True)
def _restore_pynetdicom_config() -> Iterator[None]:
    """make_ae switches chunked receive on process-wide; leave pynetdicom as we found it."""
    saved = (_config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET)
    yield
    _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET = saved


@pytest.fixture(scope="module")
def rules() -> FilterRules:
    return FilterRules.load(None)


def make_settings(data_dir: Path, min_free_mb: int = 0, **scp: Any) -> Settings:
    scp_settings = ScpSettings(ae_title=AE_TITLE, port=free_port(), bind_address="127.0.0.1", **scp)
    storage = StorageSettings(data_dir=str(data_dir), min_free_mb=min_free_mb)
    return Settings(scp=scp_settings, storage=storage)


@dataclass
class Node:
    """A running SCP with its store; ``rows()`` reads what was committed."""

    settings: Settings
    engine: Engine
    data_dir: Path
    server: NoDelayAssociationServer = field(repr=False)

    @property
    def port(self) -> int:
        return self.settings.scp.port

    def rows(self) -> dict[str, tuple[Instance, Job]]:
        with Session(self.engine) as s:
            pairs = s.execute(select(Instance, Job).join(Job, Job.instance_id == Instance.id)).all()
            return {inst.sop_instance_uid: (inst, job) for inst, job in pairs}

    def files(self) -> list[Path]:
        return sorted(p for p in self.data_dir.rglob("*") if p.is_file())


@pytest.fixture
def start_node(tmp_path: Path, rules: FilterRules) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(data_dir: Path | None = None, min_free_mb: int = 0, **scp: Any) -> Node:
        settings = make_settings(data_dir or tmp_path / "data", min_free_mb, **scp)
        engine = make_engine(f"sqlite:///{tmp_path / f'node{len(nodes)}.sqlite'}")
        server = start_scp(settings, Intake(settings.data_path, Store(engine), settings, rules))
        nodes.append(Node(settings, engine, settings.data_path, server))
        return nodes[-1]

    yield start
    for node in nodes:
        node.server.shutdown()
        node.engine.dispose()


def dcmsend(node: Node, files: list[Path], tmp_path: Path, calling: str = MODALITY) -> list[str]:
    """Send files as a modality does (each in its own transfer syntax); the DIMSE statuses, in order."""
    report = tmp_path / "dcmsend-report.txt"
    report.unlink(missing_ok=True)
    cmd = [require_tool("dcmsend"), "-aet", calling, "-aec", AE_TITLE, "--decompress-never",
           "--create-report-file", str(report), "127.0.0.1", str(node.port), *map(str, files)]
    done = subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.findall(r"DIMSE Status\s*:\s*(0x[0-9a-fA-F]{4})", report.read_text())


def echoscu(node: Node, calling: str = MODALITY, called: str = AE_TITLE) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(node.port)]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=60)


def associate_verification(node: Node) -> Association:
    """A pynetdicom association from the modality to the node offering only Verification."""
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)


def rewrite(src: Path, dst: Path, **attrs: Any) -> Path:
    """A copy of a real file with a new SOP Instance UID and changed attributes (pixel data as is)."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


# --- the real files through dcmsend -----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.shared_data
@pytest.mark.filterwarnings("ignore:The value length")  # a real file's SH value is too long
def test_dcmsend_real_files_stored_as_sent(
    data_dir: Path, tmp_path: Path, start_node: Callable[..., Node]
) -> None:
    node = start_node()
    files = [data_dir / "dicom" / name for name in REAL_FILES]
    expected = dict(zip(files, REAL_FILES.values(), strict=True))
    mono1 = rewrite(data_dir / "dicom" / "rsna_cr_pa_monochrome1_variant.dcm", tmp_path / "mono1.dcm")
    lateral = rewrite(data_dir / "dicom" / "rsna_cr_pa_jpeg_baseline.dcm", tmp_path / "lat.dcm",
                      ViewPosition="LL", SeriesDescription="view: LL")
    expected |= {mono1: True, lateral: False}

    assert dcmsend(node, list(expected), tmp_path) == ["0x0000"] * len(expected)

    rows = node.rows()
    assert len(rows) == len(expected)
    for path, accepted in expected.items():
        original = pydicom.dcmread(path)
        inst, job = rows[original.SOPInstanceUID]
        assert (inst.accepted, job.state) == (accepted, "queued" if accepted else "skipped"), inst.reason
        assert inst.reason.startswith("accepted: " if accepted else "skipped: ")
        assert inst.calling_ae == MODALITY and inst.study_instance_uid == original.StudyInstanceUID
        stored = pydicom.dcmread(inst.path)
        assert inst.size == Path(inst.path).stat().st_size
        if original.file_meta.TransferSyntaxUID.is_compressed:  # accepted as sent, never transcoded
            assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.PixelData == original.PixelData
    assert "lateral" in rows[pydicom.dcmread(lateral).SOPInstanceUID][0].reason
    assert not [p for p in node.files() if p.name.endswith(".tmp")]


@pytest.mark.integration
@pytest.mark.shared_data
def test_repeat_is_idempotent(data_dir: Path, tmp_path: Path, start_node: Callable[..., Node]) -> None:
    node = start_node()
    path = data_dir / "dicom" / "rsna_cr_ap_jpeg_baseline.dcm"
    assert dcmsend(node, [path], tmp_path) == ["0x0000"]
    (inst, job), = node.rows().values()
    assert dcmsend(node, [path, path], tmp_path) == ["0x0000", "0x0000"]
    (again, job_again), = node.rows().values()
    assert (again.id, job_again.id, job_again.state) == (inst.id, job.id, "queued")
    assert node.files() == [Path(inst.path)]


# --- associations -----------------------------------------------------------------------------


@pytest.mark.integration
def test_echo(start_node: Callable[..., Node]) -> None:
    node = start_node()
    done = echoscu(node)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_accepted_sockets_have_tcp_nodelay(start_node: Callable[..., Node]) -> None:
    node = start_node()
    assoc = associate_verification(node)
    try:
        assert assoc.is_established
        (scp_assoc,) = node.server.active_associations
        sock = scp_assoc.dul.socket.socket
        assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


@pytest.mark.integration
def test_unknown_caller_refused_at_association(start_node: Callable[..., Node]) -> None:
    node = start_node(allowed_callers=(MODALITY, "OTHER-MOD"))
    refused = echoscu(node, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert echoscu(node, calling=MODALITY).returncode == 0


@pytest.mark.integration
def test_wrong_called_ae_refused(start_node: Callable[..., Node]) -> None:
    node = start_node()
    refused = echoscu(node, called="SOMEONE-ELSE")
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr


# --- refusals: disk full, malformed -----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.shared_data
def test_disk_full_answers_out_of_resources(
    data_dir: Path, tmp_path: Path, tiny_fs: Path, start_node: Callable[..., Node],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = start_node(data_dir=tiny_fs / "data")
    big = data_dir / "dicom" / "dx_pa_chest_j2k_lossless.dcm"  # 4 MB into 1 MiB
    assert dcmsend(node, [big], tmp_path) == [f"0x{Status.OUT_OF_RESOURCES:04x}"]  # refused before writing
    monkeypatch.setattr(intake_module, "free_bytes", lambda path: 2**40)  # the space check passes: ENOSPC mid-write
    assert dcmsend(node, [big], tmp_path) == [f"0x{Status.OUT_OF_RESOURCES:04x}"]
    assert node.files() == [] and node.rows() == {}
    small = data_dir / "dicom" / "dx_thorax_canine_not_human.dcm"
    assert dcmsend(node, [small], tmp_path) == ["0x0000"]  # the node still works
    assert len(node.rows()) == 1 and len(node.files()) == 1


@pytest.mark.integration
@pytest.mark.shared_data
def test_below_min_free_refused(data_dir: Path, tmp_path: Path, start_node: Callable[..., Node]) -> None:
    node = start_node(min_free_mb=2**40)
    assert dcmsend(node, [data_dir / "dicom" / "rsna_cr_pa_jpeg_baseline.dcm"], tmp_path) == ["0xa700"]
    assert node.files() == [] and node.rows() == {}


def synthetic_cr(sop_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-4711"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(32)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.integration
def test_malformed_uploads_cannot_be_understood(tmp_path: Path, start_node: Callable[..., Node]) -> None:
    node = start_node()
    no_study = synthetic_cr()
    del no_study.StudyInstanceUID
    no_study.save_as(tmp_path / "no_study.dcm", enforce_file_format=True)
    (status,) = dcmsend(node, [tmp_path / "no_study.dcm"], tmp_path)
    assert 0xC000 <= int(status, 16) <= 0xCFFF

    valid = encoded(synthetic_cr())  # its file meta, then bytes that are no dataset (sent undecoded)
    (tmp_path / "garbage.dcm").write_bytes(valid[: _dataset_offset(valid)] + b"\xff\xfe\x00\xe0" * 64)
    assert _pynetdicom_send_raw(node, tmp_path / "garbage.dcm") == Status.CANNOT_UNDERSTAND
    assert node.files() == [] and node.rows() == {}


def _dataset_offset(encoded: bytes) -> int:
    """Where the dataset starts after the preamble, 'DICM' and the file meta group."""
    group_length = int.from_bytes(encoded[140:144], "little")  # (0002,0000) UL value
    return 144 + group_length


def _pynetdicom_send_raw(node: Node, path: Path) -> int:
    """C-STORE a file's bytes as they are (pynetdicom's chunked send does not decode them)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(rsp.Status)


# --- the intake's error paths, without a network ----------------------------------------------


def encoded(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def fake_event(payload: bytes, sop_uid: str, chunked_path: Path | None = None) -> Any:
    """What Intake.accept reads from a pynetdicom C-STORE event."""
    if chunked_path is not None:
        chunked_path.write_bytes(payload)
    return SimpleNamespace(
        request=SimpleNamespace(AffectedSOPInstanceUID=sop_uid),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title=MODALITY)),
        dataset_path=chunked_path,
        encoded_dataset=lambda include_meta=True: payload,
    )


class FailingStore:
    """A store whose database is down."""

    def record_instance(self, *args: Any) -> int:
        raise RetryableError("database unavailable in record_instance: disk I/O error")


def make_intake(tmp_path: Path, rules: FilterRules, store: Any = None, min_free_mb: int = 0) -> Intake:
    settings = make_settings(tmp_path / "data", min_free_mb)
    store = store or Store(make_engine(f"sqlite:///{tmp_path / 'intake.sqlite'}"))
    return Intake(settings.data_path, store, settings, rules)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "in-memory"])
def test_intake_success_both_receive_modes(tmp_path: Path, rules: FilterRules, chunked: bool) -> None:
    intake = make_intake(tmp_path, rules)
    ds = synthetic_cr()
    event = fake_event(encoded(ds), ds.SOPInstanceUID, tmp_path / "rx.dcm" if chunked else None)
    assert intake.accept(event) == Status.SUCCESS
    stored = list((tmp_path / "data").rglob("*.dcm"))
    assert len(stored) == 1 and pydicom.dcmread(stored[0]).SOPInstanceUID == ds.SOPInstanceUID


def test_database_failure_is_processing_failure_and_leaves_no_file(tmp_path: Path, rules: FilterRules,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    intake = make_intake(tmp_path, rules, store=FailingStore())
    ds = synthetic_cr()
    assert intake.accept(fake_event(encoded(ds), ds.SOPInstanceUID)) == Status.PROCESSING_FAILURE
    assert [p for p in (tmp_path / "data").rglob("*") if p.is_file()] == []
    # the whole ID: its digits alone turn up by chance inside random UIDs (about 1 run in 100)
    assert ds.SOPInstanceUID in caplog.text and "Doe" not in caplog.text and "PID-4711" not in caplog.text


def test_database_failure_on_a_repeat_keeps_the_stored_file(tmp_path: Path, rules: FilterRules) -> None:
    ds = synthetic_cr()
    good = make_intake(tmp_path, rules)
    assert good.accept(fake_event(encoded(ds), ds.SOPInstanceUID)) == Status.SUCCESS
    failing = Intake(good.data_dir, FailingStore(), good.settings, rules)  # type: ignore[arg-type]
    assert failing.accept(fake_event(encoded(ds), ds.SOPInstanceUID)) == Status.PROCESSING_FAILURE
    assert len([p for p in (tmp_path / "data").rglob("*") if p.is_file()]) == 1


def test_enospc_mid_write_is_out_of_resources(tmp_path: Path, rules: FilterRules,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_full(path: Path, data: bytes | Callable[[BinaryIO], object]) -> Path:
        def writer(f: BinaryIO) -> None:
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

        return write_atomic(path, writer)

    monkeypatch.setattr(intake_module, "write_atomic", half_then_full)
    intake = make_intake(tmp_path, rules)
    ds = synthetic_cr()
    assert intake.accept(fake_event(encoded(ds), ds.SOPInstanceUID)) == Status.OUT_OF_RESOURCES
    assert [p for p in (tmp_path / "data").rglob("*") if p.is_file()] == []


def test_uid_mismatch_and_missing_series_cannot_be_understood(tmp_path: Path, rules: FilterRules) -> None:
    intake = make_intake(tmp_path, rules)
    ds = synthetic_cr()
    assert intake.accept(fake_event(encoded(ds), generate_uid())) == Status.CANNOT_UNDERSTAND
    del ds.SeriesInstanceUID
    assert intake.accept(fake_event(encoded(ds), ds.SOPInstanceUID)) == Status.CANNOT_UNDERSTAND
    assert not (tmp_path / "data").exists()


def test_make_ae_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, allowed_callers=(MODALITY,), max_associations=7, max_pdu=65536)
    settings = replace(settings, scp=replace(settings.scp, network_timeout_s=12.0))
    ae = make_ae(settings)
    assert ae.maximum_associations == 7 and ae.maximum_pdu_size == 65536
    assert ae.require_calling_aet == [MODALITY] and ae.require_called_aet is True
    assert ae.network_timeout == 12.0 and _config.STORE_RECV_CHUNKED_DATASET is True
    syntaxes = {ts for cx in ae.supported_contexts for ts in cx.transfer_syntax}
    assert {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"} <= syntaxes
    assert "1.2.840.10008.1.2.1.99" not in syntaxes  # deflated: inflated whole before any check
    assert "1.2.840.10008.5.1.4.1.1.1" in {cx.abstract_syntax for cx in ae.supported_contexts}


def _p_data_tf_bytes(items: list[tuple[int, bytes]]) -> bytes:
    """A P-DATA-TF PDU encoded by pynetdicom itself."""
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    primitive = P_DATA()
    primitive.presentation_data_value_list = [list(item) for item in items]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_p_data_tf_decoded_in_place_as_pynetdicom_decodes_it() -> None:
    from pynetdicom.pdu import P_DATA_TF

    items = [(1, b"\x03" + b"command"), (3, b"\x00" + bytes(range(256)) * 512), (3, b"\x02\x01")]
    encoded = _p_data_tf_bytes(items)
    reference = P_DATA_TF()
    reference.decode(encoded)
    body = bytearray(encoded[6:])
    ours = decode_p_data_tf(body)
    assert [(pdv.presentation_context_id, bytes(pdv.presentation_data_value or b""))
            for pdv in ours.presentation_data_value_items] == items
    assert ours.to_primitive().presentation_data_value_list == reference.to_primitive().presentation_data_value_list
    first = ours.presentation_data_value_items[1].presentation_data_value
    assert isinstance(first, memoryview) and first.obj is body  # no copy: a view of the received buffer


@pytest.mark.parametrize("body", [
    b"\x00\x00\x00\x05\x01\x00\x00",          # item says 5 bytes, 3 follow
    b"\x00\x00\x00\x01\x01",                  # item of 1 byte: no message control header
    b"\x00\x00\x00\x02\x01\x03\x00\x00",      # a trailing fragment too short to be an item
])
def test_p_data_tf_with_bad_item_lengths_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="P-DATA-TF"):
        decode_p_data_tf(bytearray(body))


@pytest.mark.integration
def test_truncated_pdv_item_aborts_the_association(start_node: Callable[..., Node]) -> None:
    """A P-DATA-TF whose PDV item runs past the PDU: the node aborts that association and keeps serving."""
    node = start_node()
    assoc = associate_verification(node)
    assert assoc.is_established
    bad_item = b"\x00\x00\x10\x00\x01\x03" + b"x" * 16  # says 4096 bytes, 17 follow
    assoc.dul.socket.send(b"\x04\x00" + len(bad_item).to_bytes(4, "big") + bad_item)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert echoscu(node).returncode == 0


@pytest.mark.integration
def test_closing_one_shared_socket_server_leaves_the_others_serving(tmp_path: Path, rules: FilterRules) -> None:
    """scp.processes > 1: a process that stops closes only its copy of the shared listening socket."""
    settings = make_settings(tmp_path / "data", processes=2)
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite'}")
    intake = Intake(settings.data_path, Store(engine), settings, rules)
    first = start_scp(settings, intake)
    second = start_scp(settings, intake, listen_socket=first.socket.dup())  # as a child process holds it
    try:
        assert isinstance(second, SharedSocketAssociationServer)
        assert second.server_address == first.server_address
        second.shutdown()  # the child stops: pynetdicom's server_close would shutdown(2) the shared socket
        node = Node(settings, engine, settings.data_path, first)
        for _ in range(3):
            assert echoscu(node).returncode == 0
    finally:
        first.shutdown()
        engine.dispose()
