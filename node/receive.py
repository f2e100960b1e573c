"""Receive step: the C-STORE/C-ECHO service class provider and the durable intake of each instance.

A modality's C-STORE is answered Success only after the instance is on disk (``write_atomic``:
tmp + fsync + rename + fsync of the folder) and its instance and job rows are committed
(``Store.record_instance``); any failure before that answers an error status and leaves no
half-written file. The dataset is never decoded: the bytes as sent are written with the file meta
information, and only the header (``stop_before_pixels``) is parsed for the UIDs and the filter.

pynetdicom's receive is chunked (``pynetdicom._config.STORE_RECV_CHUNKED_DATASET``, set by
:func:`make_ae`, process-wide): each dataset is streamed into a file instead of memory, so concurrent
large images do not pile up in RAM. :func:`make_ae` also has pynetdicom create that file in
``<data_dir>/incoming/`` (``node.transport.ReceiveFile``, process-wide), on the file system of the instances, so
the intake moves the received file into place (fsync, rename, fsync of the folder) instead of writing
its bytes a second time (that copy was ~40 % of the node's CPU per image). The folder's fsync runs in a
helper thread beside the commit of the rows (each fsync is a device cache flush, ~4 ms here); both have
finished before the status is returned, and the row is committed only after the rename. A write
that fails there (disk full) is kept and answered by the handler (Out of Resources) rather than
raised in pynetdicom's reactor, which would abort the association. :class:`Intake` also works with a
received file on another file system (it is then copied) and with chunked receive off
(``event.encoded_dataset()``, written by ``write_atomic``).

Associations: every storage SOP class with every transfer syntax pynetdicom knows (JPEG baseline,
lossless, JPEG-LS, JPEG 2000, RLE, deflate ...), Verification; the called AE title is checked when
``scp.require_called_ae``; a non-empty ``scp.allowed_callers`` refuses other callers at association
("calling AE not recognised"); TCP_NODELAY on every accepted socket (else each response waits for
the peer's delayed ACK, ~40 ms). With ``scp.processes`` > 1 the node's process binds and listens, and
its SCP children accept on that same listening socket (``node.transport.SharedSocketAssociationServer``;
started by ``node.app``): an idle process takes the next association before a busy one does, where
``SO_REUSEPORT`` would hash connections onto processes regardless of their load.
``scp.max_associations`` applies to each process.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Settings
from node.filter import Decision, FilterRules, decide
from node.transport import (  # noqa: F401 - re-exported for code that imports them from node.receive
    STALE_INCOMING_S,
    BulkDULServiceProvider,
    BulkRecvRequestHandler,
    BulkRecvSocket,
    NoDelayAssociationServer,
    ReceiveFile,
    SharedSocketAssociationServer,
    SupportedContexts,
    decode_p_data_tf,
    receive_error,
    receive_into,
    remove_stale_incoming,
    shared_socket_server,
)
from storage.files import (
    DISK_FULL_ERRNOS,
    DiskFull,
    free_bytes,
    fsync_dirs,
    instance_path,
    move_into_place,
    write_atomic,
)
from storage.queue import ReceivedInstance, Store

log = logging.getLogger(__name__)

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# What pydicom raises on a dataset it cannot parse (it is lenient: a missing UID is the usual sign).
_MALFORMED = (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
              NotImplementedError, OverflowError, struct.error)
INCOMING_DIR = "incoming"  # in data_dir: datasets being received (see ReceiveFile)


class Status(IntEnum):
    """C-STORE response statuses (PS3.4 Annex B.2.3 and PS3.7 Annex C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # refused: disk full or below storage.min_free_mb
    CANNOT_UNDERSTAND = 0xC000  # the dataset cannot be parsed or lacks its UIDs
    PROCESSING_FAILURE = 0x0110  # database or other failure: nothing was acknowledged


class RefusalError(Exception):
    """An instance that is answered with an error ``status``; the message names the instance."""

    def __init__(self, status: Status, message: str) -> None:
        self.status = status
        super().__init__(message)


Payload = bytes | Path  # the encoded dataset with its file meta: in memory, or pynetdicom's temp file


def _clip(text: object, limit: int = 160) -> str:
    s = str(text)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def read_header(payload: Payload, sop_uid: str) -> Dataset:
    """Parse the header (no pixel data) and check the UIDs the node needs.

    Args:
        payload: the encoded dataset with file meta (bytes, or the path of a file holding them).
        sop_uid: the request's Affected SOP Instance UID (for messages and the consistency check).

    Raises:
        RefusalError: CANNOT_UNDERSTAND when the dataset cannot be parsed, lacks a required UID, or its
            SOPInstanceUID differs from the request's.
    """
    source: BinaryIO | Path = BytesIO(payload) if isinstance(payload, bytes) else payload
    try:
        ds = dcmread(source, stop_before_pixels=True)
        for _ in ds.iterall():  # pydicom converts values lazily: surface parse errors here
            pass
    except _MALFORMED as exc:
        raise RefusalError(Status.CANNOT_UNDERSTAND, f"dataset of {sop_uid} cannot be parsed "
                           f"({type(exc).__name__}: {_clip(exc)})") from exc
    missing = [kw for kw in REQUIRED_UIDS if not str(ds.get(kw, "") or "").strip()]
    if missing:
        raise RefusalError(Status.CANNOT_UNDERSTAND, f"dataset of {sop_uid}: expected "
                           f"{', '.join(REQUIRED_UIDS)}, missing {', '.join(missing)}")
    if str(ds.SOPInstanceUID).strip() != sop_uid:
        raise RefusalError(Status.CANNOT_UNDERSTAND, f"dataset SOPInstanceUID "
                           f"{_clip(ds.SOPInstanceUID, 64)} differs from the request's {sop_uid}")
    return ds


def _payload(event: Event) -> Payload:
    """The encoded dataset: pynetdicom's temp file in chunked mode, else the bytes (with file meta)."""
    try:
        path = event.dataset_path
    except AttributeError:
        path = None
    if path is not None:
        return Path(path)
    return event.encoded_dataset(include_meta=True)


def _size(payload: Payload) -> int:
    return len(payload) if isinstance(payload, bytes) else payload.stat().st_size


def _place(path: Path, payload: Payload) -> list[Path]:
    """Put the payload at ``path``: bytes by ``write_atomic`` (durable), pynetdicom's file by ``move_into_place``.

    Returns:
        The folders still to fsync for the file to be durable (``storage.files.fsync_dirs``).
    """
    if isinstance(payload, bytes):
        write_atomic(path, payload)
        return []
    return move_into_place(payload, path)  # pynetdicom's later unlink of its name finds nothing (and ignores that)


class Intake:
    """The durable intake of one C-STORE: space check, header, filter, atomic write, rows.

    Built once at start-up and bound to ``evt.EVT_C_STORE`` (see :func:`evt_handlers`).

    Args:
        data_dir: where instances are written (``storage.files.instance_path``).
        store: the queue (``record_instance``).
        settings: the node settings (``storage.min_free_mb``, ``filter``).
        rules: the loaded filter rules.
    """

    def __init__(self, data_dir: Path, store: Store, settings: Settings, rules: FilterRules) -> None:
        self.data_dir = Path(data_dir)
        self.store = store
        self.settings = settings
        self.rules = rules
        self.min_free_bytes = settings.storage.min_free_mb * 1024 * 1024
        self._dir_syncs = ThreadPoolExecutor(max_workers=max(1, settings.scp.max_associations),
                                             thread_name_prefix="intake-fsync")

    def accept(self, event: Event) -> int:
        """Handle one C-STORE request: Success only once the file and its rows are committed."""
        sop_uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "").strip()
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            decision = self._accept(event, sop_uid, calling_ae)
        except RefusalError as refusal:
            log.warning("C-STORE %s from %s refused (0x%04X): %s",
                        sop_uid, calling_ae, refusal.status, refusal)
            return refusal.status
        except Exception:  # the boundary: whatever failed, never answer Success
            log.exception("C-STORE %s from %s failed: processing failure (0x%04X)",
                          sop_uid, calling_ae, Status.PROCESSING_FAILURE)
            return Status.PROCESSING_FAILURE
        log.info("stored %s from %s: %s", sop_uid, calling_ae, decision.reason)
        return Status.SUCCESS

    def _check_space(self, size: int, sop_uid: str) -> None:
        free = free_bytes(self.data_dir)
        if free - size < self.min_free_bytes:
            raise RefusalError(
                Status.OUT_OF_RESOURCES,
                f"no space for {sop_uid} in {self.data_dir}: expected {size} bytes + storage.min_free_mb "
                f"({self.settings.storage.min_free_mb} MB) free, found {free} bytes",
            )

    def _accept(self, event: Event, sop_uid: str, calling_ae: str) -> Decision:
        payload = _payload(event)
        failed = receive_error(payload)
        if failed is not None:
            status = Status.OUT_OF_RESOURCES if failed.errno in DISK_FULL_ERRNOS else Status.PROCESSING_FAILURE
            raise RefusalError(status, f"receiving {sop_uid} into {self.data_dir / INCOMING_DIR} failed: {failed}")
        size = _size(payload)
        self._check_space(size, sop_uid)
        ds = read_header(payload, sop_uid)
        decision = decide(ds, self.settings.filter, self.rules)
        path = instance_path(self.data_dir, str(ds.StudyInstanceUID), sop_uid)
        existed = path.exists()
        try:
            folders = _place(path, payload)
        except DiskFull as exc:
            raise RefusalError(Status.OUT_OF_RESOURCES, f"disk full writing {sop_uid}: {exc}") from exc
        # The file is complete at ``path`` (a worker may read it once the row is committed); its folder's
        # fsync runs beside the commit, and both have finished before the status is returned.
        syncing = self._dir_syncs.submit(fsync_dirs, folders, path) if folders else None
        meta = ReceivedInstance(
            sop_instance_uid=sop_uid,
            study_instance_uid=str(ds.StudyInstanceUID).strip(),
            series_instance_uid=str(ds.SeriesInstanceUID).strip(),
            sop_class_uid=str(ds.SOPClassUID).strip(),
            calling_ae=calling_ae,
            path=path,
            size=size,
        )
        try:
            self.store.record_instance(meta, decision.accepted, decision.reason)
        except BaseException:
            if syncing is not None:
                wait([syncing])
            if not existed:  # a first receive leaves no orphan file; a repeat keeps the earlier row's file
                path.unlink(missing_ok=True)
            raise
        if syncing is not None:
            try:
                syncing.result()  # failed: the row and the file stay, the caller's retry is idempotent
            except DiskFull as exc:
                raise RefusalError(Status.OUT_OF_RESOURCES, f"disk full writing {sop_uid}: {exc}") from exc
        return decision

    def close(self) -> None:
        """Let the folder-fsync threads go (they are idle between C-STOREs)."""
        self._dir_syncs.shutdown(wait=True)


def handle_store(event: Event, intake: Intake) -> int:
    """``evt.EVT_C_STORE``: a durable write and its job row, then the status."""
    return intake.accept(event)


def handle_echo(event: Event) -> int:
    """``evt.EVT_C_ECHO``: always Success (logged with the caller's AE title)."""
    log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return Status.SUCCESS


def evt_handlers(intake: Intake) -> list[EventHandlerType]:
    """The handlers bound to the server, with their dependencies."""
    return [(evt.EVT_C_STORE, handle_store, [intake]), (evt.EVT_C_ECHO, handle_echo)]


def make_ae(settings: Settings) -> AE:
    """The node's AE: titles, callers, limits, timeouts and every storage context with every syntax.

    Also switches pynetdicom's receive to chunked files in ``<data_dir>/incoming`` (process-wide; see
    the module docstring).
    """
    scp = settings.scp
    _config.STORE_RECV_CHUNKED_DATASET = True
    receive_into(settings.data_path / INCOMING_DIR)
    ae = AE(ae_title=scp.ae_title)
    ae.require_called_aet = scp.require_called_ae
    ae.require_calling_aet = list(scp.allowed_callers)  # empty: any caller
    ae.maximum_associations = scp.max_associations
    ae.maximum_pdu_size = scp.max_pdu
    ae.network_timeout = scp.network_timeout_s
    ae.dimse_timeout = scp.network_timeout_s
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    return ae


def start_scp(
    settings: Settings, intake: Intake, ae: AE | None = None, listen_socket: socket.socket | None = None
) -> NoDelayAssociationServer:
    """Start the SCP in a background thread; stop it with ``server.shutdown()``.

    Args:
        settings: the node settings (``scp``: address, port, AE title, callers, limits).
        intake: the intake bound to C-STORE.
        ae: an AE from :func:`make_ae` (built here when None).
        listen_socket: a listening socket bound already: the node's first SCP process's (with
            ``scp.processes`` > 1), or the one bound before dropping root (``node.privileges``);
            None: bind here.

    Returns:
        The running server; ``server.server_address`` holds the bound port (useful with port 0).
    """
    ae = ae or make_ae(settings)
    stale = remove_stale_incoming(settings.data_path / INCOMING_DIR)
    if stale:
        log.warning("start-up: removed %d partly received file(s) older than %.0f s from %s",
                    stale, STALE_INCOMING_S, settings.data_path / INCOMING_DIR)
    address = (settings.scp.bind_address, settings.scp.port)
    server_class = (shared_socket_server(listen_socket)
                    if settings.scp.processes > 1 or listen_socket is not None else NoDelayAssociationServer)
    server = cast(NoDelayAssociationServer, ae.make_server(
        address, evt_handlers=evt_handlers(intake), server_class=server_class))
    thread = threading.Thread(target=server.serve_forever, name=f"scp-{settings.scp.ae_title}", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it from this list
    log.info("SCP %s listening on %s:%d in process %d (callers: %s, max associations %d, max PDU %d)",
             settings.scp.ae_title, *server.server_address[:2], os.getpid(),
             ", ".join(settings.scp.allowed_callers) or "any", ae.maximum_associations,
             ae.maximum_pdu_size)
    return server
