"""Receive step: the intake refuses what the node could not process or report on, and keeps changed re-sends apart.

A real SCP (``node.receive.start_scp`` with an ``Intake`` on a SQLite ``Store``) is driven by a
pynetdicom SCU. Data sets are encoded here byte by byte (file meta claiming one transfer syntax, data
set bytes in another, cut or patched), and sent as they are: pynetdicom's chunked send proposes the
transfer syntax of the file meta and sends the bytes after it undecoded.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)
from sqlalchemy import Engine, inspect, select
from sqlalchemy.orm import Session

from node.dicom_hygiene import uid_problem
from node.filter import FilterRules
from node.intake import Intake
from node.intake_check import Problem, check_layout
from node.receive import start_scp
from node.refusals import Status, status_name
from node.scp_server import NoDelayAssociationServer
from storage.db import Base, Instance, InstanceConflict, Job, Result, make_engine
from storage.queue import ConflictingInstance, ResultRecord, Store
from tests.pg_fixture import postgres_url  # noqa: F401 - the session fixture behind db_url
from tests.test_queue import T0, clock, db_url, engine, meta, store  # noqa: F401 - Store fixtures, both databases
from tests.test_receive import make_settings

AE_TITLE, MODALITY = "CXR-AI", "MODALITY"
CR = ComputedRadiographyImageStorage
PATIENT_NAME, PATIENT_ID = "Intake^Marker", "PID-INTAKE-93"


@pytest.fixture(autouse=True, scope="module")
def _restore_pynetdicom_config() -> Iterator[None]:
    saved = (_config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET)
    yield
    _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET = saved


@dataclass
class Node:
    """A running SCP on a SQLite store."""

    data_dir: Path
    engine: Engine
    store: Store
    port: int
    server: NoDelayAssociationServer = field(repr=False)

    def rows(self) -> dict[str, tuple[Instance, Job]]:
        with Session(self.engine) as s:
            pairs = s.execute(select(Instance, Job).join(Job, Job.instance_id == Instance.id)).all()
            return {inst.sop_instance_uid: (inst, job) for inst, job in pairs}

    def files(self, under: str = "") -> list[Path]:
        root = self.data_dir / under
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def send(self, encoded: bytes, tmp_path: Path, sop_class: str = CR) -> int:
        """C-STORE ``encoded`` (preamble + file meta + data set) as it is; the response status."""
        return int(self.send_rsp(encoded, tmp_path, sop_class).Status)

    def send_rsp(self, encoded: bytes, tmp_path: Path, sop_class: str = CR) -> Dataset:
        """C-STORE ``encoded`` (preamble + file meta + data set) as it is; the whole response."""
        path = tmp_path / f"send-{hashlib.sha256(encoded).hexdigest()[:12]}.dcm"
        path.write_bytes(encoded)
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title=MODALITY)
        ae.add_requested_context(sop_class, claimed_syntax(encoded))
        assoc = ae.associate("127.0.0.1", self.port, ae_title=AE_TITLE)
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(path)
        finally:
            assoc.release()
        return rsp


def _running_node(folder: Path) -> Iterator[Node]:
    settings = make_settings(folder / "data")
    db = make_engine(f"sqlite:///{folder / 'node.sqlite'}")
    queue = Store(db)
    server = start_scp(settings, Intake(settings.data_path, queue, settings, FilterRules.load(None)))
    yield Node(settings.data_path, db, queue, settings.scp.port, server)
    server.shutdown()
    db.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node of its own (for the tests that follow one instance through several sends)."""
    yield from _running_node(tmp_path)


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the one-send cases (stopping a server takes ~0.5 s)."""
    yield from _running_node(tmp_path_factory.mktemp("shared"))


# --- encoding data sets by hand ------------------------------------------------------------------


def image(rows: int = 64, columns: int = 64, bits: int = 16, **attrs: Any) -> Dataset:
    """A CR PA chest data set with native pixel data (a gradient) and marked patient attributes."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    dtype = np.uint16 if bits == 16 else np.uint8
    pixels = (np.add.outer(np.arange(rows), np.arange(columns)) * 3 % (1 << min(bits, 12))).astype(dtype)
    ds.PixelData = pixels.tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def meta_bytes(ds: Dataset, syntax: str, sop_class: str | None = None) -> bytes:
    """Preamble, 'DICM' and a file meta group claiming ``syntax`` (and ``sop_class``: the data set's)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class or ds.SOPClassUID)
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = UID(ds.SOPInstanceUID), UID(syntax)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue()


def dataset_bytes(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def encode(ds: Dataset, claimed: str = ExplicitVRLittleEndian, implicit: bool = False, little: bool = True) -> bytes:
    """File meta claiming ``claimed``; the data set encoded with ``implicit`` / ``little`` (maybe not that)."""
    return meta_bytes(ds, claimed) + dataset_bytes(ds, implicit, little)


def claimed_syntax(encoded: bytes) -> str:
    ts_at = encoded.index(b"\x02\x00\x10\x00UI")
    length = int.from_bytes(encoded[ts_at + 6:ts_at + 8], "little")
    return encoded[ts_at + 8:ts_at + 8 + length].rstrip(b"\0").decode()


def rle(ds: Dataset) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless, encoding_plugin="pydicom")
    return ds


def jpeg(rows: int = 64, columns: int = 64) -> Dataset:
    """An 8-bit JPEG baseline image made with Pillow (encapsulated, one fragment)."""
    ds = image(rows, columns, bits=8)
    buffer = io.BytesIO()
    Image.frombytes("L", (columns, rows), ds.PixelData).save(buffer, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return ds


def value_offset(encoded: bytes, tag: bytes) -> int:
    """Where the value of the (explicit VR LE, short-length) element with this tag starts."""
    return encoded.rindex(tag) + 8


def cut_before(encoded: bytes, tag: bytes) -> bytes:
    return encoded[: encoded.rindex(tag)]


PIXEL_TAG = b"\xe0\x7f\x10\x00"
MODALITY_TAG = b"\x08\x00\x60\x00"
STUDY_UID_TAG = b"\x20\x00\x0d\x00"


def with_uid(keyword: str, raw: bytes) -> bytes:
    """An explicit VR LE image whose ``keyword`` is exactly ``raw`` as encoded (even length: padding included)."""
    ds = image()
    placeholder = "9" * len(raw)
    setattr(ds, keyword, placeholder)
    if keyword == "SOPInstanceUID":
        placeholder_meta = meta_bytes(ds, ExplicitVRLittleEndian).replace(placeholder.encode(), raw)
        return placeholder_meta + dataset_bytes(ds).replace(placeholder.encode(), raw)
    return encode(ds).replace(placeholder.encode(), raw)


def huge_value(vr: str, value: bytes) -> bytes:
    """A data set with one private value of absurd size (a UT of a million values, a vendor block)."""
    ds = image()
    ds.add_new(0x00091010, vr, value.decode("ascii") if vr == "UT" else value)
    return encode(ds)


def encode_as_cr(ds: Dataset) -> bytes:
    """File meta (the request) saying CR Image Storage whatever the data set's SOPClassUID says."""
    return meta_bytes(ds, ExplicitVRLittleEndian, sop_class=CR) + dataset_bytes(ds)


def short_length(encoded: bytes, tag: bytes, length: int) -> bytes:
    """Set the 2-byte length of an explicit VR LE element."""
    at = encoded.rindex(tag) + 6
    return encoded[:at] + length.to_bytes(2, "little") + encoded[at + 2:]


def nested(depth: int) -> Dataset:
    ds = image()
    item = Dataset()
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([item])
        item = outer
    ds.ReferencedImageSequence = item.ReferencedImageSequence
    return ds


# --- refused: nothing stored, an error status -----------------------------------------------------

REFUSED: dict[str, tuple[Callable[[], bytes], Status]] = {
    "truncated inside the header": (
        lambda: (lambda e: e[: value_offset(e, MODALITY_TAG) + 1])(encode(image())), Status.DATASET_TRUNCATED),
    "truncated at an element boundary before the pixel data": (
        lambda: cut_before(encode(image()), PIXEL_TAG), Status.DATASET_TRUNCATED),
    "truncated inside the native pixel data": (lambda: encode(image())[:-100], Status.DATASET_TRUNCATED),
    "element length past the end": (
        lambda: short_length(encode(image(rows=8, columns=8)), MODALITY_TAG, 0x7FF0), Status.DATASET_TRUNCATED),
    "encapsulated pixel data without its sequence delimiter": (
        lambda: encode(rle(image()), RLELossless)[:-8], Status.DATASET_TRUNCATED),
    "native pixel data shorter than its geometry": (
        lambda: encode(image(PixelData=bytes(64 * 64 * 2 - 32))), Status.DATASET_MISMATCH),
    "native pixel data longer than its geometry": (
        lambda: encode(image(PixelData=bytes(64 * 64 * 2 + 32))), Status.DATASET_MISMATCH),
    "implicit VR data under explicit VR little endian": (
        lambda: encode(image(), ExplicitVRLittleEndian, implicit=True), Status.ENCODING_MISMATCH),
    "explicit VR data under implicit VR little endian": (
        lambda: encode(image(), ImplicitVRLittleEndian), Status.ENCODING_MISMATCH),
    "big endian data under explicit VR little endian": (
        lambda: encode(image(), ExplicitVRLittleEndian, little=False), Status.ENCODING_MISMATCH),
    "little endian data under explicit VR big endian": (
        lambda: encode(image(), ExplicitVRBigEndian), Status.ENCODING_MISMATCH),
    "native pixel data under RLE lossless": (
        lambda: encode(image(), RLELossless), Status.ENCODING_MISMATCH),
    "RLE pixel data under explicit VR little endian": (
        lambda: encode(rle(image()), ExplicitVRLittleEndian), Status.ENCODING_MISMATCH),
    "JPEG pixel data under RLE lossless": (lambda: encode(jpeg(), RLELossless), Status.ENCODING_MISMATCH),
    "RLE pixel data under JPEG baseline": (lambda: encode(rle(image()), JPEGBaseline8Bit), Status.ENCODING_MISMATCH),
    "StudyInstanceUID with letters": (lambda: with_uid("StudyInstanceUID", b"1.2.840.abc\0"), Status.INVALID_UID),
    "SeriesInstanceUID with an empty component": (
        lambda: with_uid("SeriesInstanceUID", b"1.2..3\0"), Status.INVALID_UID),
    "StudyInstanceUID with a trailing dot": (lambda: with_uid("StudyInstanceUID", b"1.2.3."), Status.INVALID_UID),
    "a text value over 1 MiB": (lambda: huge_value("UT", b"A\\" * (512 * 1024 + 1)), Status.CANNOT_UNDERSTAND),
    "a private value over 16 MiB": (lambda: huge_value("OB", bytes(17 * 1024 * 1024)), Status.CANNOT_UNDERSTAND),
    "StudyInstanceUID with a leading zero in a component": (
        lambda: with_uid("StudyInstanceUID", b"1.2.826.0.1.3680043.02.3\0"), Status.INVALID_UID),
    "StudyInstanceUID longer than 64": (lambda: with_uid("StudyInstanceUID", b"1." * 35 + b"12"), Status.INVALID_UID),
    "StudyInstanceUID padded with garbage": (
        lambda: with_uid("StudyInstanceUID", b"1.2.3\0\0\0x\0\0"), Status.INVALID_UID),
    "SOPInstanceUID with letters": (lambda: with_uid("SOPInstanceUID", b"1.2.826.x.5\0"), Status.INVALID_UID),
    "SOPClassUID not the request's": (
        lambda: encode_as_cr(image(SOPClassUID=DigitalXRayImageStorageForPresentation)), Status.DATASET_MISMATCH),
    "sequences nested 100 deep": (lambda: encode(nested(100)), Status.CANNOT_UNDERSTAND),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_an_error_status_and_nothing_stored(
    case: str, shared_node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build, expected = REFUSED[case]
    encoded = build()
    files, rows = shared_node.files(), shared_node.rows()
    with caplog.at_level(logging.INFO):
        status = shared_node.send(encoded, tmp_path)
    assert status == expected, f"{case}: expected 0x{expected:04X} {status_name(expected)}, found 0x{status:04X}"
    assert shared_node.files() == files and shared_node.rows().keys() == rows.keys()
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("node."))
    assert f"0x{expected:04X} {status_name(expected)}" in ours
    assert PATIENT_NAME not in ours and PATIENT_ID not in ours
    assert "abc" not in ours and ".x." not in ours  # the invalid UIDs are not quoted


ACCEPTED: dict[str, Callable[[], bytes]] = {
    "explicit VR little endian": lambda: encode(image()),
    "implicit VR little endian": lambda: encode(image(), ImplicitVRLittleEndian, implicit=True),
    "explicit VR big endian": lambda: encode(image(), ExplicitVRBigEndian, little=False),
    "8-bit, odd pixel count, padded": lambda: encode(image(rows=5, columns=5, bits=8)),
    "RLE lossless": lambda: encode(rle(image()), RLELossless),
    "JPEG baseline": lambda: encode(jpeg(), JPEGBaseline8Bit),
    "UIDs with a component that is a single zero": lambda: encode(image(
        StudyInstanceUID="1.2.826.0.1.3680043.0.3", SeriesInstanceUID="1.2.826.0.1.3680043.0.4")),
    "UID padded with a space": lambda: with_uid("StudyInstanceUID", b"1.2.826.0.1.3680043.7 "),
    "sequences nested 8 deep": lambda: encode(nested(8)),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(ACCEPTED))
def test_valid_images_are_accepted(case: str, shared_node: Node, tmp_path: Path) -> None:
    encoded = ACCEPTED[case]()
    before = shared_node.rows()
    assert shared_node.send(encoded, tmp_path) == Status.SUCCESS
    (inst, job), = [pair for uid, pair in shared_node.rows().items() if uid not in before]
    assert job.state == "queued" and Path(inst.path).is_file()


@pytest.mark.integration
@pytest.mark.shared_data
def test_real_files_pass_the_checks(data_dir: Path) -> None:
    """Every real sample (JPEG, JPEG-LS, JPEG 2000, native) passes the structural checks."""
    for path in sorted((data_dir / "dicom").glob("*.dcm")):
        with path.open("rb") as f:
            check_layout(f, path.stat().st_size)


@pytest.mark.parametrize(("raw", "usable"), [
    (b"1.2.3\0", True), (b"1.2.3 ", True), (b"1.02.003", False), (b"1.0.30", True), (b"0.0", True),
    (b"", False), (b"1.2.3\0\0", False), (b"1..2", False), (b".1.2", False), (b"1.2\\1.3", False),
    (b"1" * 65, False), (b"1.2.3 x", False),
])
def test_uid_syntax(raw: bytes, usable: bool) -> None:
    assert (uid_problem(raw) is None) is usable


def test_encoding_problems_are_classified(tmp_path: Path) -> None:
    """check_layout names what it found; the intake maps each kind to a status."""
    from node.intake_check import DatasetCheckError

    for encoded, problem in [
        (encode(image(), ExplicitVRLittleEndian, implicit=True), Problem.ENCODING),
        (encode(image())[:-3], Problem.TRUNCATED),
        (encode(nested(100)), Problem.STRUCTURE),
    ]:
        with pytest.raises(DatasetCheckError) as info:
            check_layout(io.BytesIO(encoded), len(encoded))
        assert info.value.problem is problem


# --- re-sent SOP Instance UIDs ---------------------------------------------------------------------


def finish(queue: Store, job_id: int) -> None:
    """Run the job to done with one SR, as the worker does."""
    leased = queue.lease_job("worker", 60)
    assert leased is not None and leased.job_id == job_id
    queue.complete_job(job_id, [ResultRecord("sr", generate_uid(), Path("/results/sr.dcm"))], ["pacs"])


def changed(ds: Dataset, **attrs: Any) -> Dataset:
    """The same SOP Instance UID with other content (other pixels, other attributes)."""
    other = image(SOPInstanceUID=ds.SOPInstanceUID, StudyInstanceUID=ds.StudyInstanceUID,
                  SeriesInstanceUID=ds.SeriesInstanceUID, PatientName="Other^Patient")
    other.PixelData = bytes(reversed(ds.PixelData))
    for keyword, value in attrs.items():
        setattr(other, keyword, value)
    return other


@pytest.mark.integration
def test_identical_resend_is_idempotent_after_results(node: Node, tmp_path: Path) -> None:
    ds = image()
    assert node.send(encode(ds), tmp_path) == Status.SUCCESS
    (inst, job), = node.rows().values()
    stored = Path(inst.path).read_bytes()
    finish(node.store, job.id)
    assert node.send(encode(ds), tmp_path) == Status.SUCCESS
    (again, job_again), = node.rows().values()
    assert (again.id, job_again.id, job_again.state, again.path) == (inst.id, job.id, "done", inst.path)
    assert Path(inst.path).read_bytes() == stored
    assert node.files("conflicts") == [] and node.store.conflicts()["total"] == 0
    assert [p.name for p in node.files()] == [Path(inst.path).name]


@pytest.mark.integration
@pytest.mark.parametrize("new_study", [False, True], ids=["same-study", "other-study"])
def test_changed_resend_after_results_is_kept_apart(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture, new_study: bool
) -> None:
    ds = image()
    assert node.send(encode(ds), tmp_path) == Status.SUCCESS
    (inst, job), = node.rows().values()
    stored = Path(inst.path).read_bytes()
    finish(node.store, job.id)
    other = changed(ds, **({"StudyInstanceUID": generate_uid()} if new_study else {}))
    with caplog.at_level(logging.INFO):
        assert node.send(encode(other), tmp_path) == Status.DUPLICATE_SOP_INSTANCE
        assert node.send(encode(other), tmp_path) == Status.DUPLICATE_SOP_INSTANCE  # the modality retries
    (after, job_after), = node.rows().values()
    assert (after.path, after.study_instance_uid, job_after.state) == (inst.path, inst.study_instance_uid, "done")
    assert Path(inst.path).read_bytes() == stored, "the analysed instance was replaced"
    assert [p for p in node.files("instances") if p != Path(inst.path)] == []
    report = node.store.conflicts()
    assert (report["total"], report["received"]) == (1, 2)
    (conflict,) = report["recent"]
    assert (conflict["sop_instance_uid"], conflict["job_id"], conflict["job_state"]) == (ds.SOPInstanceUID, job.id,
                                                                                        "done")
    (kept,) = node.files("conflicts")
    assert Path(conflict["path"]) == kept and kept.read_bytes().endswith(dataset_bytes(other))
    assert ds.SOPInstanceUID in caplog.text and "DUPLICATE_SOP_INSTANCE" in caplog.text
    assert "Other^Patient" not in caplog.text and PATIENT_ID not in caplog.text


@pytest.mark.integration
def test_changed_resend_while_queued_replaces_the_instance(node: Node, tmp_path: Path) -> None:
    """Nothing has left the node yet: the new content is what will be analysed."""
    ds = image()
    assert node.send(encode(ds), tmp_path) == Status.SUCCESS
    other = changed(ds)
    assert node.send(encode(other), tmp_path) == Status.SUCCESS
    (inst, job), = node.rows().values()
    assert job.state == "queued" and Path(inst.path).read_bytes().endswith(dataset_bytes(other))
    assert node.files("conflicts") == [] and [p.name for p in node.files()] == [Path(inst.path).name]


def test_store_conflicts_on_sqlite_and_postgresql(store: Store, engine: Engine) -> None:  # noqa: F811
    """Replace only what was never reported (no running/done job, no results); count conflicts per content."""
    replaced: list[int] = []
    first = store.record_instance(meta(1), True, "")
    assert store.record_instance(meta(1), True, "", replace=lambda: replaced.append(1)) == first
    assert replaced == [1]  # queued: replaced, the same job
    second = store.record_instance(meta(2), True, "")
    for _ in (first, second):  # both end failed; job 2 has a result (a 'not analysed' SR, as a worker may record)
        leased = store.lease_job("w", 60)
        assert leased is not None
        store.fail_job(leased.job_id, "decode", retryable=False)
    with Session(engine) as s, s.begin():
        s.add(Result(job_id=second, kind="failure_sr", sop_instance_uid="2.25.7", path="/r.dcm", created_at=T0))
    assert store.record_instance(meta(1), True, "", replace=lambda: replaced.append(2)) == first
    assert replaced == [1, 2]  # failed without results: replaced
    calls: list[int] = []
    with pytest.raises(ConflictingInstance) as info:
        store.record_instance(meta(2), True, "", replace=lambda: calls.append(1))
    assert calls == [], "replace must not run for a reported instance"
    assert info.value.job_state == "failed"
    for digest in ("ab" * 32, "ab" * 32, "cd" * 32):
        store.record_conflict(meta(2), digest, info.value)
    report = store.conflicts(recent=1)
    assert (report["total"], report["received"], len(report["recent"])) == (2, 3, 1)
    assert report["recent"][0]["sop_instance_uid"] == meta(2).sop_instance_uid


def test_conflict_table_added_to_an_existing_database(tmp_path: Path) -> None:
    """An older database (no instance_conflicts table) gets it at start-up; its rows are kept."""
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old = make_engine(url, create=False)
    Base.metadata.create_all(old, tables=[t for name, t in Base.metadata.tables.items()
                                          if name != InstanceConflict.__tablename__])
    Store(old).record_instance(meta(1), True, "")
    old.dispose()
    upgraded = make_engine(url)
    assert InstanceConflict.__tablename__ in inspect(upgraded).get_table_names()
    assert Store(upgraded).conflicts() == {"total": 0, "received": 0, "recent": []}
    assert Store(upgraded).status()["jobs"]["queued"] == 1
    upgraded.dispose()


@pytest.mark.integration
def test_deflated_transfer_syntaxes_are_not_accepted(shared_node: Node) -> None:
    """A deflated data set is inflated whole before it can be checked: the node does not take one."""
    ae = AE(ae_title=MODALITY)
    deflated = {DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}  # + the JPIP ones
    for syntax in sorted(deflated):
        ae.add_requested_context(CR, syntax)
    ae.add_requested_context(CR, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", shared_node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        refused = {str(cx.transfer_syntax[0]) for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == {ExplicitVRLittleEndian} and refused == deflated


def test_a_first_receive_never_replaces_a_file_another_association_placed_meanwhile(tmp_path: Path) -> None:
    """Two associations send one SOP Instance UID at once: both saw no file, the first placed and
    reported it; the second's placement must not replace it, and is handled as a changed re-send."""
    from node.filter import Decision
    from storage.files import instance_path
    from storage.queue import ReceivedInstance

    settings = make_settings(tmp_path / "data")
    queue = Store(make_engine(f"sqlite:///{tmp_path / 'node.sqlite'}"))
    intake = Intake(settings.data_path, queue, settings, FilterRules.load(None))
    first, second = image(), image()
    second.SOPInstanceUID, second.StudyInstanceUID = first.SOPInstanceUID, first.StudyInstanceUID
    path = instance_path(settings.data_path, first.StudyInstanceUID, first.SOPInstanceUID)
    path.parent.mkdir(parents=True)
    path.write_bytes(encode(first))  # the other association's file, its job reported on
    meta = ReceivedInstance(first.SOPInstanceUID, first.StudyInstanceUID, first.SeriesInstanceUID, CR, MODALITY,
                            path, path.stat().st_size)
    job_id = queue.record_instance(meta, True, "frontal chest")
    assert queue.lease_job("worker", 60) is not None
    queue.complete_job(job_id, [], [])
    try:
        with pytest.raises(Exception) as refused:
            intake._place_first(encode(second), meta, Decision(True, "frontal chest"))
        assert getattr(refused.value, "status", None) == Status.DUPLICATE_SOP_INSTANCE
        assert path.read_bytes() == encode(first)  # the reported instance stands
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it
    finally:
        intake.close()


def test_retention_removes_changed_resends_kept_apart(tmp_path: Path) -> None:
    """A kept-apart re-send is patient data like any image: retention removes it with its row."""
    import datetime as dt

    from storage.queue import ReceivedInstance

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    queue = Store(make_engine(f"sqlite:///{tmp_path / 'node.sqlite'}"), clock=lambda: t0)
    stored = ReceivedInstance("1.2.3.4", "1.2.3", "1.2.3.5", CR, MODALITY, tmp_path / "a.dcm", 10)
    job_id = queue.record_instance(stored, True, "frontal chest")
    kept = ReceivedInstance("1.2.3.4", "1.2.3", "1.2.3.5", CR, MODALITY, tmp_path / "conflicts" / "b.dcm", 10,
                            received_at=t0)
    queue.record_conflict(kept, "ab" * 32, ConflictingInstance("1.2.3.4", job_id, "done"))
    assert queue.purge_before(t0) == [] and queue.conflicts()["total"] == 1  # not older than the cutoff
    purged = queue.purge_before(t0 + dt.timedelta(days=1))
    assert kept.path in purged and queue.conflicts()["total"] == 0


@pytest.mark.integration
def test_a_refusal_tells_the_modality_why_without_any_value(shared_node: Node, tmp_path: Path) -> None:
    rsp = shared_node.send_rsp(with_uid("StudyInstanceUID", b"1.2.840.abc\0"), tmp_path)
    assert int(rsp.Status) == Status.INVALID_UID
    assert rsp.ErrorComment == "a required UID is not a valid DICOM UID (PS3.5 9.1)"
    ok = shared_node.send_rsp(encode(image()), tmp_path)
    assert int(ok.Status) == Status.SUCCESS and "ErrorComment" not in ok
