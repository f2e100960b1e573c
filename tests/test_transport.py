"""Transport: hostile peers against the node's SCP (the pynetdicom internals relied on: test_pynetdicom_contract.py).

The SCP runs in this process (``node.receive.start_scp`` with a real Intake and SQLite Store) on a free
loopback port. Hostile peers are raw sockets, some bound to 127.0.0.2 (loopback, another source
address); the legitimate modality is dcmtk (echoscu, dcmsend) from 127.0.0.1, or pynetdicom where a
test must send part of a DIMSE message and then break the association.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.transport import AssociationSocket
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from node import incoming, scp_server
from node.config import ConfigError, ScpSettings, Settings, StorageSettings, load_settings
from node.filter import FilterRules
from node.incoming import INCOMING_DIR
from node.intake import Intake
from node.receive import start_scp
from node.refusals import Status
from node.scp_server import NoDelayAssociationServer
from storage.db import Instance, make_engine
from storage.queue import Store
from tests.conftest import free_port, require_tool
from tests.peers import DCMTK_ENV, dcmsend

AE_TITLE = "CXR-AI"
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
HOSTILE = "127.0.0.2"  # loopback too: a second source address on one machine
MB = 1024 * 1024
# A-ASSOCIATE-RJ: transient (2), DICOM UL service-provider presentation (3), local-limit-exceeded (2)
LOCAL_LIMIT_RJ = bytes([0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2])


@pytest.fixture(autouse=True)
def _restore_pynetdicom_config() -> Iterator[None]:
    """make_ae switches chunked receive on process-wide; leave pynetdicom as we found it."""
    saved = (_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile)
    yield
    _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = saved


@dataclass
class Node:
    """A running SCP with its store."""

    settings: Settings
    engine: Engine
    server: NoDelayAssociationServer = field(repr=False)

    @property
    def port(self) -> int:
        return self.settings.scp.port

    @property
    def incoming(self) -> Path:
        return self.settings.data_path / INCOMING_DIR

    def stored(self) -> int:
        with Session(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

    def parts(self) -> list[Path]:
        return sorted(self.incoming.glob("*.part")) if self.incoming.is_dir() else []


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start the node's SCP with ``scp`` keys changed; stopped in teardown."""
    nodes: list[Node] = []
    rules = FilterRules.load(None)

    def start(**scp: Any) -> Node:
        folder = tmp_path / f"node{len(nodes)}"
        folder.mkdir(exist_ok=True)
        settings = Settings(scp=ScpSettings(ae_title=AE_TITLE, port=free_port(), bind_address="127.0.0.1", **scp),
                            storage=StorageSettings(data_dir=str(folder / "data"), min_free_mb=0))
        engine = make_engine(f"sqlite:///{folder / 'node.sqlite'}")
        server = start_scp(settings, Intake(settings.data_path, Store(engine), settings, rules))
        nodes.append(Node(settings, engine, server))
        return nodes[-1]

    yield start
    for node in nodes:
        node.server.shutdown()
        node.engine.dispose()


def connect(node: Node, source: str = HOSTILE) -> socket.socket:
    """A raw TCP connection to the node from ``source``."""
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=5, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_node(sock: socket.socket, within_s: float) -> tuple[bool, bytes]:
    """Whether the node closed ``sock`` within ``within_s`` (EOF or reset), and what it sent first."""
    deadline = time.monotonic() + within_s
    received = b""
    while True:
        sock.settimeout(max(0.0, deadline - time.monotonic()))  # 0: look without waiting
        try:
            chunk = sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return False, received
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def wait_until(predicate: Callable[[], bool], within_s: float) -> float | None:
    """Seconds until ``predicate()`` held, or None when it did not within ``within_s``."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def memory_kb() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, in kB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def echoscu(node: Node) -> int:
    """echoscu from 127.0.0.1 (the legitimate modality); its exit status."""
    cmd = [require_tool("echoscu"), "-aet", "MODALITY", "-aec", AE_TITLE, "127.0.0.1", str(node.port)]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=30).returncode


def synthetic_cr(size: int = 64) -> Dataset:
    """A frontal CR of ``size`` x ``size`` 16-bit pixels with new UIDs (no patient values)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR_IMAGE_STORAGE, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(size * size, dtype=np.uint32) % 4096).astype(np.uint16).tobytes()
    return ds


def write_cr(folder: Path, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds = synthetic_cr(size)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# --- 1. PDU lengths bounded before any allocation -------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("pdu_type", [0x01, 0x04], ids=["A-ASSOCIATE-RQ", "P-DATA-TF"])
def test_4_gib_pdu_header_refused_without_allocating(
    start_node: Callable[..., Node], pdu_type: int, caplog: pytest.LogCaptureFixture
) -> None:
    """``01 00 FF FF FF FF``: the node closes the connection at once; its memory does not grow."""
    node = start_node()
    before = memory_kb()
    with connect(node) as sock:
        sock.sendall(bytes([pdu_type, 0]) + struct.pack(">L", 0xFFFFFFFF))
        closed, _ = closed_by_node(sock, within_s=2.0)
        after = memory_kb()  # the connection is still open on our side: a buffer would still be held
    assert after["VmHWM"] - before["VmHWM"] < 100 * 1024, f"peak memory grew: {before} -> {after}"
    assert after["VmRSS"] - before["VmRSS"] < 100 * 1024, f"memory grew: {before} -> {after}"
    assert closed, "the node kept a connection announcing a 4 GiB PDU open for 2 s"
    assert any(HOSTILE in r.getMessage() and str(0xFFFFFFFF) in r.getMessage() for r in caplog.records)
    assert wait_until(lambda: not node.server.active_associations, 2.0) is not None
    assert echoscu(node) == 0


def _p_data_header(length: int) -> bytes:
    return bytes([0x04, 0]) + struct.pack(">L", length)


def _socket(assoc: Association) -> AssociationSocket:
    sock = assoc.dul.socket
    assert sock is not None, "the association has no socket"
    return sock


def _associate(node: Node) -> Association:
    """A pynetdicom association offering CR Image Storage (explicit VR little endian)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    return assoc


@pytest.mark.integration
def test_p_data_tf_longer_than_the_announced_maximum_aborts_the_association(start_node: Callable[..., Node]) -> None:
    """PS3.8: a P-DATA-TF's variable field may not exceed the maximum length we announced."""
    node = start_node(max_pdu=16384)
    assoc = _associate(node)
    assert assoc.acceptor.maximum_length == 16384
    _socket(assoc).send(_p_data_header(16384 + 1))
    assert wait_until(lambda: assoc.is_aborted, 3.0) is not None
    assert wait_until(lambda: not node.server.active_associations, 2.0) is not None


@pytest.mark.integration
def test_a_large_image_over_a_normal_association_is_stored(start_node: Callable[..., Node], tmp_path: Path) -> None:
    """P-DATA-TF PDUs up to exactly the announced maximum are received: the bound refuses nothing legal."""
    node = start_node(max_pdu=16384)
    lengths: list[int] = []
    node.server.bind(evt.EVT_PDU_RECV, lambda event: lengths.append(event.pdu.pdu_length))
    path = write_cr(tmp_path / "send", size=1024)  # 2 MiB of pixel data: 128 PDUs of about the maximum length
    done = dcmsend([path], node.port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert max(lengths) == 16384 - 6  # dcmtk keeps the whole PDU, header included, within the maximum
    assoc = _associate(node)  # pynetdicom fills the variable field to exactly the maximum
    try:
        status = assoc.send_c_store(synthetic_cr(size=512))
    finally:
        assoc.release()
    assert status.Status == Status.SUCCESS and max(lengths) == 16384
    assert node.stored() == 2
    assert not node.parts()


# --- 2. ARTIM timer and read deadlines -----------------------------------------------------------


@pytest.mark.integration
def test_silent_connections_are_closed_by_artim_while_a_modality_is_served(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """16 connections from one address send 3 bytes and stay silent: 8 are refused at once (the address's
    limit), 8 are closed when ARTIM expires; echoscu and dcmsend from 127.0.0.1 succeed meanwhile."""
    artim = 1.0
    node = start_node(max_associations=16, max_associations_per_address=8, artim_timeout_s=artim)
    opened: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(16):
            sock = connect(node)
            sock.sendall(b"\x01\x00\x00")
            opened.append((sock, time.monotonic()))
        assert echoscu(node) == 0
        done = dcmsend([write_cr(tmp_path / "send")], node.port)
        assert done.returncode == 0, done.stdout + done.stderr
        refused = 0
        for sock, connected_at in opened:
            closed, received = closed_by_node(sock, within_s=max(0.0, connected_at + artim + 1.0 - time.monotonic()))
            assert closed, f"a silent connection was still open {time.monotonic() - connected_at:.1f} s after accept"
            refused += received == LOCAL_LIMIT_RJ
        assert refused == 8
    finally:
        for sock, _ in opened:
            sock.close()
    assert node.stored() == 1
    assert wait_until(lambda: not node.server.active_associations, 2.0) is not None
    assert node.server.peer_slots.held(HOSTILE) == 0


@pytest.mark.integration
def test_a_pdu_begun_must_arrive_within_the_network_timeout(start_node: Callable[..., Node]) -> None:
    """An established association whose peer sends half a P-DATA-TF and stays silent is aborted and freed."""
    node = start_node(network_timeout_s=1.0)
    assoc = _associate(node)
    _socket(assoc).send(_p_data_header(1000) + b"\x00" * 10)
    assert wait_until(lambda: not node.server.active_associations, 3.0) is not None
    assert wait_until(lambda: assoc.is_aborted, 1.0) is not None
    assert echoscu(node) == 0


@pytest.mark.integration
@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.0\r\n\r\n", b"\x01\x00\x00\x00\x01\x00" + b"\xff" * 40,
                                  b"\x01\x00"], ids=["nothing", "http", "truncated-rq", "3-bytes"])
def test_connections_closed_at_once_free_their_slots(start_node: Callable[..., Node], sent: bytes) -> None:
    """Garbage (or nothing) and then a close: every slot is free again within 2 s, not after ARTIM."""
    node = start_node(max_associations=16, max_associations_per_address=16, artim_timeout_s=30.0)
    opened: list[str] = []
    node.server.bind(evt.EVT_CONN_OPEN, lambda event: opened.append(event.address[0]))
    for _ in range(16):
        with connect(node) as sock:
            sock.sendall(sent)
    freed = wait_until(lambda: len(opened) == 16 and not node.server.active_associations, 2.0)
    assert freed is not None, f"{len(node.server.active_associations)} slots still held 2 s after the peers closed"
    assert node.server.peer_slots.held(HOSTILE) == 0
    assert echoscu(node) == 0


# --- 3. per-address limit ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("processes", [1, 2])  # 2: the shared-socket server; the limit holds per process
def test_connections_over_the_address_limit_are_refused_at_once(
    start_node: Callable[..., Node], caplog: pytest.LogCaptureFixture, processes: int
) -> None:
    node = start_node(max_associations=16, max_associations_per_address=2, artim_timeout_s=5.0, processes=processes)
    assert isinstance(node.server, scp_server.SharedSocketAssociationServer) == (processes > 1)
    held = [connect(node) for _ in range(2)]
    try:
        assert wait_until(lambda: node.server.peer_slots.held(HOSTILE) == 2, 2.0) is not None
        with connect(node) as third:
            closed, received = closed_by_node(third, within_s=1.0)
        assert closed and received == LOCAL_LIMIT_RJ
        assert any(HOSTILE in r.getMessage() and "max_associations_per_address" in r.getMessage()
                   for r in caplog.records)
        assert echoscu(node) == 0  # another address is not affected
    finally:
        for sock in held:
            sock.close()


# --- 4. partial files removed when their association ends ----------------------------------------


def _c_store_pdus(assoc: Association, ds: Dataset, priority: int = 2) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ for ``ds``, encoded by pynetdicom (``priority`` as given)."""
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 2
    primitive.DataSet = BytesIO(encode(ds, False, True) or b"")  # explicit VR little endian, as negotiated
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    message.command_set.Priority = priority  # pynetdicom refuses anything but 0-2 when it decodes the message
    context_id, max_pdu = assoc.accepted_contexts[0].context_id, assoc.acceptor.maximum_length
    assert context_id is not None and max_pdu is not None
    pdus = []
    for p_data in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(bytes(pdu.encode()))
    return pdus


def _reset(assoc: Association) -> None:
    raw = _socket(assoc).socket
    assert raw is not None
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST: the peer vanishes mid-dataset


@pytest.mark.integration
@pytest.mark.parametrize("end", ["a-abort", "reset", "refused-dimse"])
def test_an_association_ended_mid_dataset_leaves_no_part_file(start_node: Callable[..., Node], end: str) -> None:
    node = start_node(max_pdu=16384)
    assoc = _associate(node)
    try:
        ds = synthetic_cr(size=256)  # 128 KiB of pixel data: several PDUs
        pdus = _c_store_pdus(assoc, ds, priority=9 if end == "refused-dimse" else 2)
        assert len(pdus) > 3
        sent = pdus if end == "refused-dimse" else pdus[:-2]
        for pdu in sent:
            _socket(assoc).send(pdu)
        if end != "refused-dimse":
            assert wait_until(lambda: bool(node.parts()), 2.0) is not None, "the dataset was not being received"
            if end == "a-abort":
                assoc.abort()
            else:
                _reset(assoc)
        assert wait_until(lambda: not node.server.active_associations, 2.0) is not None
        assert wait_until(lambda: not node.parts(), 0.5) is not None, f"left behind: {node.parts()}"
        assert node.stored() == 0
    finally:
        assoc.kill()
    assert echoscu(node) == 0


@pytest.mark.integration
def test_start_up_sweep_of_incoming_is_kept(start_node: Callable[..., Node], tmp_path: Path) -> None:
    """What a killed process left in incoming/ (older than STALE_INCOMING_S) is removed at the next start."""
    folder = tmp_path / "node0" / "data" / INCOMING_DIR
    folder.mkdir(parents=True)
    old, recent = folder / "old.part", folder / "recent.part"
    old.write_bytes(b"x")
    recent.write_bytes(b"x")
    stale = time.time() - incoming.STALE_INCOMING_S - 60
    os.utime(old, (stale, stale))
    start_node()
    assert not old.exists() and recent.exists()


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "key"), [
    ("max_pdu = 0", "scp.max_pdu"),
    ("max_pdu = 1000000000", "scp.max_pdu"),
    ("max_pdu = 100", "scp.max_pdu"),
    ("artim_timeout_s = 0", "scp.artim_timeout_s"),
    ("network_timeout_s = 0", "scp.network_timeout_s"),
    ("max_associations_per_address = 0", "scp.max_associations_per_address"),
])
def test_transport_limits_are_validated(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f"[scp]\n{text}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})
    assert any(problem.startswith(key) for problem in raised.value.problems), raised.value.problems


def test_transport_defaults() -> None:
    scp = load_settings(None, environ={}).scp
    assert (scp.artim_timeout_s, scp.max_associations_per_address, scp.max_associations) == (10.0, 8, 16)
    assert 4096 <= scp.max_pdu <= 4 * MB
