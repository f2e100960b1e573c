"""The pynetdicom internals the node's overrides rely on: fails loudly when the installed pynetdicom changes them.

``node/transport.py``, ``node/incoming.py`` and ``node/scp_server.py`` subclass pynetdicom's private
classes, re-class its live objects and replace a module-level name of its DIMSE layer; ``node/refusals.py``
extends its ``Status``. None of that is pynetdicom's public API, so an upgrade (even within the
``pynetdicom<4`` pin of pyproject.toml) may change it silently: the node would then still start, and
only lose a bound, a timeout or a clean-up. Each test here checks one internal (its presence, its
signature, or its behaviour, from the source where nothing else shows it), and its failure message
names the override in our code that depends on it and what to re-check there.
"""

from __future__ import annotations

import copy
import inspect
import queue
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pynetdicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, dimse_messages, evt, fsm
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.status import Status as PynetdicomStatus
from pynetdicom.transport import (
    AssociationServer,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from node import incoming, refusals, scp_server, transport
from tests.conftest import REPO

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def broken(internal: str, override: str, recheck: str) -> str:
    """The failure message: what changed, which override depends on it, what to re-check."""
    return (f"pynetdicom {pynetdicom.__version__}: {internal} is not as node relies on; {override} depends on it. "
            f"Re-check: {recheck}")


def params(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def source(obj: Any) -> str:
    return inspect.getsource(obj)


@pytest.fixture
def _chunked_receive() -> Iterator[None]:
    """Chunked receive on, and pynetdicom's NamedTemporaryFile restored afterwards."""
    saved = (_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile)
    _config.STORE_RECV_CHUNKED_DATASET = True
    yield
    _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = saved


# --- the pin ------------------------------------------------------------------------------------


def test_pynetdicom_is_the_major_version_the_overrides_were_written_for() -> None:
    assert int(pynetdicom.__version__.split(".")[0]) < 4, broken(
        "the major version", "every override in node/transport.py, node/incoming.py and node/scp_server.py",
        "each contract below against the new release's source, then raise the pin in pyproject.toml")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"pynetdicom>=[0-9.]+,\s*<4"', pyproject), "pyproject.toml must keep pynetdicom pinned below 4"


# --- DUL: node.transport.BulkDULServiceProvider --------------------------------------------------


def test_dul_reads_every_pdu_through_read_pdu_data() -> None:
    """Our ``_read_pdu_data`` bounds, times and decodes each PDU: pynetdicom must still read through it."""
    why = broken("DULServiceProvider._read_pdu_data", "node.transport.BulkDULServiceProvider._read_pdu_data "
                 "(PDU length limits, read deadlines, zero-copy P-DATA-TF)",
                 "that the reactor still reads each PDU by calling self._read_pdu_data() and nothing else")
    assert params(DULServiceProvider._read_pdu_data) == ["self"], why
    transport_event = source(DULServiceProvider._is_transport_event)
    assert transport_event.count("self._read_pdu_data()") == 2, why  # Sta13 and the other states
    assert "self.socket.recv(" not in transport_event, why
    assert "self._is_transport_event()" in source(DULServiceProvider.run_reactor), why


def test_read_pdu_data_outcomes_are_the_events_ours_queues() -> None:
    """Ours puts the same events as pynetdicom's for every outcome: Evt17 closed, Evt19 invalid, the PDU's."""
    why = broken("DULServiceProvider._read_pdu_data's events", "node.transport.BulkDULServiceProvider."
                 "_read_pdu_data and _decode_and_queue", "the events ours puts on event_queue and _recv_pdu")
    ours = source(DULServiceProvider._read_pdu_data)
    for line in ('self.event_queue.put("Evt17")', 'self.event_queue.put("Evt19")', "self.event_queue.put(event)",
                 "self._recv_pdu.put(pdu)", "self._decode_pdu(bytestream)", 'struct.unpack(">BBL"'):
        assert line in ours, f"{why} (missing: {line})"
    for event in ("Evt10", "Evt17", "Evt19"):
        assert event in fsm.EVENTS, why


def test_decode_pdu_returns_the_pdu_and_its_event() -> None:
    why = broken("DULServiceProvider._decode_pdu", "node.transport.BulkDULServiceProvider._decode_and_queue "
                 "(every PDU but P-DATA-TF)", "its signature (bytestream) and return value (pdu, event)")
    assert params(DULServiceProvider._decode_pdu) == ["self", "bytestream"], why
    dul = Association(AE(), "acceptor").dul
    release = A_RELEASE_RQ()
    pdu, event = dul._decode_pdu(bytearray(release.encode()))
    assert isinstance(pdu, A_RELEASE_RQ) and event == "Evt12", why
    decode = source(DULServiceProvider._decode_pdu)
    # ours skips _decode_pdu for P-DATA-TF only while no EVT_DATA_RECV handler wants the raw bytes
    assert "evt.EVT_DATA_RECV" in decode and 'evt.EVT_PDU_RECV, {"pdu": pdu}' in decode, why
    assert params(Association.get_handlers) == ["self", "event"], why
    assert params(evt.trigger) == ["assoc", "event", "attrs"], why


def test_p_data_tf_built_by_attributes_gives_pynetdicoms_primitive() -> None:
    """``decode_p_data_tf`` fills P_DATA_TF and PresentationDataValueItem by their attributes, as views."""
    why = broken("P_DATA_TF / PresentationDataValueItem attributes", "node.transport.decode_p_data_tf",
                 "presentation_data_value_items, presentation_context_id, presentation_data_value, to_primitive()")
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, b"\x03command"], [3, b"\x02" + bytes(range(256))]]
    reference = P_DATA_TF()
    reference.from_primitive(primitive)
    body = bytearray(reference.encode()[6:])
    ours = transport.decode_p_data_tf(body).to_primitive()
    assert [[cid, bytes(data)] for cid, data in ours.presentation_data_value_list] == \
        primitive.presentation_data_value_list, why
    # to_primitive passes the values on as they are (P_DATA's setter would refuse a memoryview)
    assert all(isinstance(data, memoryview) for _, data in ours.presentation_data_value_list), why


def test_dt_2_hands_the_p_data_to_dimse_in_the_dul_thread() -> None:
    """DT-2 takes our PDU from ``_recv_pdu`` and decodes the DIMSE message in the DUL thread."""
    why = broken("fsm.DT_2", "node.incoming.ReceiveFile (finds its association through threading.current_thread(), "
                 "the DUL) and node.transport.decode_p_data_tf", "that DT-2 still calls "
                 "dul.assoc.dimse.receive_primitive(pdu.to_primitive()) directly (not through another thread)")
    dt_2 = source(fsm.DT_2)
    assert "dul._recv_pdu.get(" in dt_2 and "dul.assoc.dimse.receive_primitive(" in dt_2, why
    assert "to_primitive()" in dt_2, why


def test_kill_dul_and_the_acceptor_waiting_for_the_association_request() -> None:
    """``kill_dul`` puts None on ``to_user_queue``: the acceptor must end on it, as on its timeout."""
    why = broken("kill_dul / Association.run_reactor", "node.transport.BulkDULServiceProvider.kill_dul (frees the "
                 "association slot of a connection that ends before its A-ASSOCIATE-RQ)",
                 "that the acceptor still waits with receive_pdu(wait=True, timeout=self.acse_timeout), ends on None, "
                 "and that the ends of a connection stop the DUL with kill_dul()")
    assert params(DULServiceProvider.kill_dul) == ["self"], why
    reactor = source(Association.run_reactor)
    assert "receive_pdu(wait=True, timeout=self.acse_timeout)" in reactor and "if primitive is None:" in reactor, why
    for action in (fsm.AA_2, fsm.AA_4, fsm.AA_5, fsm.AR_5):
        assert "dul.kill_dul()" in source(action), f"{why} ({action.__name__})"
    dul = Association(AE(), "acceptor").dul
    assert isinstance(dul.to_user_queue, queue.Queue), why
    dul.to_user_queue.put(None)  # type: ignore[arg-type]
    assert dul.receive_pdu(wait=True, timeout=1) is None, why


def test_dul_attributes_read_for_deadlines() -> None:
    """``_pdu_deadline`` reads the ARTIM timer, the state and the network timeout of the live DUL."""
    why = broken("DULServiceProvider attributes", "node.transport.BulkDULServiceProvider._pdu_deadline, "
                 "_abort_transport and _decode_and_queue", "artim_timer (.timeout, .remaining), "
                 "state_machine.current_state, network_timeout, event_queue, to_user_queue, _recv_pdu, socket")
    assoc = Association(AE(), "acceptor")
    for name in ("artim_timer", "state_machine", "event_queue", "to_user_queue", "_recv_pdu", "socket"):
        assert hasattr(assoc.dul, name), f"{why} ({name})"
    assert isinstance(inspect.getattr_static(DULServiceProvider, "network_timeout"), property), why
    assert isinstance(inspect.getattr_static(DULServiceProvider, "assoc"), property), why
    assert {"Sta1", "Sta2", "Sta13"} <= set(fsm.STATES), why
    assert isinstance(assoc.dul.artim_timer.remaining, float | int) and assoc.dul.artim_timer.timeout is not None, why
    assert assoc.dul.state_machine.current_state == "Sta1", why


def test_acse_timeout_is_the_artim_timer() -> None:
    why = broken("Association.acse_timeout", "node.receive.make_ae (scp.artim_timeout_s) and "
                 "node.transport.BulkDULServiceProvider._pdu_deadline", "that setting acse_timeout sets the DUL's "
                 "ARTIM timer")
    setter = inspect.getattr_static(Association, "acse_timeout").fset
    assert "artim_timer.timeout = value" in source(setter), why
    assoc = Association(AE(), "acceptor")
    assoc.acse_timeout = 7
    assert assoc.dul.artim_timer.timeout == 7, why


def test_abort_and_reject_pdus_encode_as_sent_by_the_node() -> None:
    why = broken("A_ABORT_RQ / A_ASSOCIATE_RJ", "node.transport.BulkDULServiceProvider._abort_transport and "
                 "node.scp_server.refuse_over_limit", "source, result and reason_diagnostic, encode()")
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = 0x02, 0x06
    assert bytes(abort.encode()) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06", why
    reject = A_ASSOCIATE_RJ()
    reject.result, reject.source, reject.reason_diagnostic = 0x02, 0x03, 0x02
    assert bytes(reject.encode()) == bytes([0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2]), why


# --- socket and association: node.transport.BulkRecvSocket, ReceivingAssociation ---------------


def test_association_socket_wraps_the_connection_as_bulk_reads_expect() -> None:
    why = broken("AssociationSocket", "node.transport.BulkRecvSocket (re-classed from AssociationSocket on the live "
                 "object) and BulkDULServiceProvider._abort_transport", "recv(nr_bytes), close() putting Evt17, "
                 "the wrapped socket in .socket, and that __class__ can be assigned (no __slots__)")
    assert params(AssociationSocket.recv) == ["self", "nr_bytes"], why
    assert params(AssociationSocket.close) == ["self"], why
    assert 'self.event_queue.put("Evt17")' in source(AssociationSocket.close), why
    assoc = Association(AE(), "acceptor")
    ours, peer = socket.socketpair()
    try:
        sock = AssociationSocket(assoc, client_socket=ours)
        assert sock.socket is ours, why
        sock.__class__ = transport.BulkRecvSocket  # as BulkRecvRequestHandler does
        peer.sendall(b"\x01\x02\x03\x04\x05\x06")
        assert sock.recv_until(6, time.monotonic() + 5) == bytearray(b"\x01\x02\x03\x04\x05\x06"), why
        sock.close()
        assert sock.socket is None, why
    finally:
        peer.close()
        ours.close()


def test_live_association_and_dul_can_be_re_classed() -> None:
    """BulkRecvRequestHandler gives the association and its DUL our classes after pynetdicom made them."""
    why = broken("Association / DULServiceProvider as threads", "node.transport.ReceivingAssociation.run and "
                 "BulkDULServiceProvider.run (each wraps Thread.run to report the end to AssociationEnd), "
                 "node.incoming.ReceiveFile (its DUL is threading.current_thread())",
                 "that both are Thread subclasses running their reactor as the Thread target, without __slots__")
    assert issubclass(DULServiceProvider, threading.Thread) and issubclass(Association, threading.Thread), why
    assert inspect.getattr_static(DULServiceProvider, "run") is threading.Thread.run, why
    assert inspect.getattr_static(Association, "run") is threading.Thread.run, why
    assoc = Association(AE(), "acceptor")
    assert assoc._started_dul is False and assoc.is_established is False, why
    assert isinstance(inspect.getattr_static(type(assoc.requestor), "address"), property), why
    assoc.__class__ = transport.ReceivingAssociation
    assoc.dul.__class__ = transport.BulkDULServiceProvider
    assert isinstance(assoc.dul, DULServiceProvider) and assoc.dul.assoc is assoc, why


# --- request handler: node.transport.BulkRecvRequestHandler -------------------------------------


def test_request_handler_creates_then_starts_the_association() -> None:
    why = broken("RequestHandler.handle / _create_association", "node.transport.BulkRecvRequestHandler "
                 "(re-classes the association, its DUL and socket between creation and start)",
                 "that handle() calls self._create_association(), which returns the association with its socket "
                 "set and not started, then assoc.start()")
    assert params(RequestHandler._create_association) == ["self"], why
    assert params(RequestHandler.handle) == ["self"], why
    handle = source(RequestHandler.handle)
    assert "self._create_association()" in handle and "assoc.start()" in handle, why
    create = source(RequestHandler._create_association)
    assert "assoc.set_socket(" in create and ".start()" not in create, why
    assert isinstance(inspect.getattr_static(RequestHandler, "ae"), property), why
    assert "self.dul.socket = socket" in source(Association.set_socket), why


# --- chunked receive: node.incoming.ReceiveFile --------------------------------------------------


class StrictFile:
    """Only what node.incoming.ReceiveFile offers pynetdicom: ``name``, ``write``, ``file.flush``, ``close``."""

    __slots__ = ("_inner", "file", "name")

    def __init__(self, inner: incoming.ReceiveFile) -> None:
        self._inner, self.name, self.file = inner, inner.name, self

    def write(self, data: bytes) -> int:
        return self._inner.write(data)

    def flush(self) -> None:
        self._inner.flush()

    def close(self) -> None:
        self._inner.close()


def _c_store_p_data(ds: Dataset, max_pdu: int = 4096) -> list[P_DATA]:
    """A C-STORE-RQ as pynetdicom's SCU sends it, as the node's DUL passes it on (PDVs: memoryviews)."""
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CR_IMAGE_STORAGE, ds.SOPInstanceUID
    req.DataSet = BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = []
    for p_data in msg.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out.append(transport.decode_p_data_tf(bytearray(pdu.encode()[6:])).to_primitive())  # the node's path
    return out


def _small_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE_STORAGE, generate_uid()
    ds.PatientID = "CONTRACT"
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00\x01" * 8000  # several P-DATA-TF PDUs at 4096 bytes
    return ds


@pytest.mark.usefixtures("_chunked_receive")
def test_chunked_receive_creates_its_file_by_the_module_level_name(tmp_path: Path) -> None:
    """pynetdicom's DIMSE layer makes each C-STORE's file with ``dimse_messages.NamedTemporaryFile(...)``."""
    why = broken("dimse_messages.NamedTemporaryFile / DIMSEMessage.decode_msg", "node.incoming.receive_into and "
                 "ReceiveFile (the received file is made in <data_dir>/incoming/ and moved into place by the intake)",
                 "that decode_msg still creates the file by calling the module-level NamedTemporaryFile(delete=False, "
                 "mode='wb', suffix='.dcm'), uses only .name, .write, .file.flush and close, and sets the request's "
                 "_dataset_path / _dataset_file")
    assert callable(dimse_messages.NamedTemporaryFile), why
    assert "NamedTemporaryFile(delete=False" in source(DIMSEMessage.decode_msg), why
    assert hasattr(_config, "STORE_RECV_CHUNKED_DATASET"), why
    calls: list[dict[str, Any]] = []

    def named_temporary_file(*args: Any, **kwargs: Any) -> StrictFile:
        calls.append(kwargs)
        assert not args, why
        return StrictFile(incoming.ReceiveFile(tmp_path))

    dimse_messages.NamedTemporaryFile = named_temporary_file  # type: ignore[assignment]
    ds = _small_dataset()
    decoder = DIMSEMessage()
    assoc = SimpleNamespace(_accepted_cx={1: SimpleNamespace(transfer_syntax=[ExplicitVRLittleEndian])})
    try:
        done = [decoder.decode_msg(p_data, assoc) for p_data in _c_store_p_data(ds)]  # type: ignore[arg-type]
    except AttributeError as exc:
        pytest.fail(f"{why} (it used {exc})")
    assert done[-1] is True and calls == [{"delete": False, "mode": "wb", "suffix": ".dcm"}], why
    request = decoder.message_to_primitive()
    assert isinstance(request._dataset_file, StrictFile), why
    assert request._dataset_path == Path(request._dataset_file.name), why
    request._dataset_file.close()
    received = pydicom.dcmread(request._dataset_path)
    assert received.SOPInstanceUID == ds.SOPInstanceUID and received.PixelData == ds.PixelData, why
    assert str(received.file_meta.TransferSyntaxUID) == ExplicitVRLittleEndian, why
    event = Event(assoc, evt.EVT_C_STORE, {"request": request})  # type: ignore[arg-type]
    assert event.dataset_path == request._dataset_path, broken(
        "Event.dataset_path", "node.intake._payload", "the path of the received file on the C-STORE event")


def test_storage_scp_closes_and_unlinks_the_file_after_the_handler() -> None:
    why = broken("StorageServiceClass.SCP", "node.incoming.ReceiveFile.close (forgets the file: the intake moved "
                 "it) and node.intake (moves the file away before pynetdicom's unlink)",
                 "that after EVT_C_STORE's handler pynetdicom closes req._dataset_file and unlinks its name, "
                 "ignoring OSError")
    scp = source(StorageServiceClass.SCP)
    handler, close, unlink = (scp.find("evt.EVT_C_STORE"), scp.find("req._dataset_file.close()"),
                              scp.find("os.unlink(req._dataset_file.name)"))
    assert -1 < handler < close < unlink, why
    assert "except OSError" in scp[unlink:], why


def test_c_store_event_without_chunked_receive_gives_the_encoded_dataset() -> None:
    why = broken("Event.dataset_path / Event.encoded_dataset", "node.intake._payload (chunked receive off)",
                 "that dataset_path is None or raises AttributeError, and encoded_dataset(include_meta=True) "
                 "returns the bytes with the file meta")
    assert params(Event.encoded_dataset) == ["self", "include_meta"], why
    ds = _small_dataset()
    decoder = DIMSEMessage()
    assoc = SimpleNamespace(_accepted_cx={1: SimpleNamespace(transfer_syntax=[ExplicitVRLittleEndian])})
    saved = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = False
    try:
        for p_data in _c_store_p_data(ds):
            decoder.decode_msg(p_data, assoc)  # type: ignore[arg-type]
    finally:
        _config.STORE_RECV_CHUNKED_DATASET = saved
    request = decoder.message_to_primitive()
    event = Event(assoc, evt.EVT_C_STORE, {"request": request})  # type: ignore[arg-type]
    try:
        path = event.dataset_path
    except AttributeError:
        path = None
    assert path is None, why
    assert event.encoded_dataset(include_meta=False) == encode(ds, False, True), why


# --- servers: node.scp_server, node.receive.start_scp -----------------------------------------


def test_server_is_built_by_make_server_with_our_class_and_handler() -> None:
    why = broken("AE.make_server / AssociationServer.__init__", "node.receive.start_scp and "
                 "node.scp_server.NoDelayAssociationServer (request_handler=BulkRecvRequestHandler, "
                 "self.contexts replaced after pynetdicom's __init__)",
                 "make_server(address, evt_handlers=..., server_class=...) and the server's __init__ keywords")
    make_server = params(AE.make_server)
    assert make_server[:2] == ["self", "address"] and {"evt_handlers", "server_class"} <= set(make_server), why
    assert params(AssociationServer.__init__) == ["self", "ae", "address", "ae_title", "contexts", "ssl_context",
                                                  "evt_handlers", "request_handler"], why
    assert "self.contexts = contexts" in source(AssociationServer.__init__), why


def test_shutdown_removes_the_server_from_ae_servers() -> None:
    why = broken("AE._servers / AssociationServer.shutdown", "node.receive.start_scp (appends its server to "
                 "ae._servers, as AE.start_server does)", "that shutdown() still removes the server from "
                 "ae._servers (a server missing there makes shutdown raise ValueError)")
    assert AE()._servers == [], why
    assert "self.ae._servers.remove(" in source(AssociationServer.shutdown), why


def test_server_methods_the_node_overrides() -> None:
    why = broken("ThreadedAssociationServer methods", "node.scp_server.NoDelayAssociationServer (get_request, "
                 "verify_request, process_request) and SharedSocketAssociationServer (server_bind, "
                 "server_activate, get_request, server_close)", "their signatures; that pynetdicom's server_close "
                 "still shutdown(2)s the socket (what the shared socket must avoid) and server_bind binds it")
    assert params(ThreadedAssociationServer.verify_request) == ["self", "request", "client_address"], why
    assert params(ThreadedAssociationServer.process_request) == ["self", "request", "client_address"], why
    assert params(AssociationServer.get_request) == ["self"], why
    assert params(AssociationServer.server_bind) == ["self"], why
    assert params(ThreadedAssociationServer.server_activate) == ["self"], why
    assert params(AssociationServer.server_close) == ["self"], why
    assert "self.socket.bind(self.server_address)" in source(AssociationServer.server_bind), why
    assert "shutdown(socket.SHUT_RDWR)" in source(AssociationServer.server_close), why
    assert isinstance(inspect.getattr_static(AssociationServer, "active_associations"), property), why
    # SharedSocketAssociationServer.server_close joins the handler threads as socketserver's does
    assert "self._threads" in source(socketserver.ThreadingMixIn.server_close), why
    assert issubclass(ThreadedAssociationServer, socketserver.ThreadingMixIn), why


def test_get_request_only_accepts_and_wraps_the_socket() -> None:
    """Ours replaces pynetdicom's ``get_request`` (the TLS handshake moves off the accepting thread)."""
    why = broken("AssociationServer.get_request", "node.scp_server.NoDelayAssociationServer.get_request (accepts "
                 "and wraps with ssl_context itself, without the handshake, which node.transport."
                 "BulkRecvRequestHandler makes)", "that pynetdicom's still does nothing else: copy anything new")
    body = source(AssociationServer.get_request).split('"""')[2]
    code = [line.strip() for line in body.splitlines() if line.strip()]
    assert code == ["self.socket = cast(socket.socket, self.socket)", "client_socket, address = self.socket.accept()",
                    "if self.ssl_context:", "client_socket = self.ssl_context.wrap_socket(",
                    "client_socket, server_side=True", ")", "return client_socket, address"], why


def test_the_handlers_socket_is_the_associations_and_ssl_data_is_seen_as_ready() -> None:
    """BulkRecvRequestHandler shakes hands on ``self.request``, the socket pynetdicom's association then uses;
    the DUL must count data OpenSSL has buffered as ready (select() does not see it)."""
    why = broken("RequestHandler._create_association / AssociationSocket.ready", "node.transport."
                 "BulkRecvRequestHandler._tls_handshake and BulkRecvSocket on the TLS listener",
                 "that the association's socket is the request's, and that ready checks SSLSocket.pending()")
    assert "AssociationSocket(assoc, client_socket=self.request)" in source(RequestHandler._create_association), why
    ready = source(inspect.getattr_static(AssociationSocket, "ready").fget)
    assert "self.socket.pending()" in ready, why


def test_request_handler_deep_copies_the_server_contexts() -> None:
    """SupportedContexts.__deepcopy__ copies each context and its lists: enough while they hold nothing else."""
    why = broken("RequestHandler._create_association / PresentationContext", "node.scp_server.SupportedContexts "
                 "(a quick deep copy: copy.copy of each context and copies of its lists)", "that the handler still "
                 "deep-copies self.server.contexts, and that a context's attributes are immutable values or lists")
    assert "deepcopy(self.server.contexts)" in source(RequestHandler._create_association), why
    cx = build_context(CR_IMAGE_STORAGE, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
    cx.context_id = 1
    for name, value in vars(cx).items():
        assert value is None or isinstance(value, str | int | bool | list), f"{why} ({name}: {type(value).__name__})"
        if isinstance(value, list):
            assert all(isinstance(v, str | int) for v in value), f"{why} ({name})"
    twin = copy.deepcopy(scp_server.SupportedContexts([cx]))[0]
    assert isinstance(twin, PresentationContext) and twin is not cx, why
    assert twin.transfer_syntax == cx.transfer_syntax and twin.transfer_syntax is not cx.transfer_syntax, why
    assert twin.abstract_syntax == cx.abstract_syntax and twin.context_id == 1, why


# --- statuses: node.refusals.Status ---------------------------------------------------------------


def test_status_add_extends_pynetdicoms_status() -> None:
    why = broken("pynetdicom.status.Status", "node.refusals (Status, NODE_STATUSES, status_name)", "that Status.add "
                 "still sets a class attribute, that Status.SUCCESS is 0, and that no member of pynetdicom's own "
                 "has one of our names with another code")
    assert params(PynetdicomStatus.add) == ["name", "code"], why
    assert "setattr(cls, name, code)" in source(PynetdicomStatus.add), why
    assert PynetdicomStatus.SUCCESS == 0x0000, why
    assert refusals.Status is PynetdicomStatus, why
    for name, code in refusals.NODE_STATUSES.items():
        assert getattr(PynetdicomStatus, name) == code, f"{why} ({name})"
        member = PynetdicomStatus.__members__.get(name)
        assert member is None or member == code, f"{why} ({name})"
