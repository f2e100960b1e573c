"""Receive step: the C-STORE/C-ECHO service class provider and the durable intake of each instance.

A modality's C-STORE is answered Success only after the instance is on disk (``write_atomic``:
tmp + fsync + rename + fsync of the folder) and its instance and job rows are committed
(``Store.record_instance``); any failure before that answers an error status and leaves no
half-written file. The dataset is never decoded: the bytes as sent are written with the file meta
information, and only the header (``stop_before_pixels``) is parsed for the UIDs and the filter.

What the node could not later analyse or report on is refused, not acknowledged (``read_header``;
the structural walk is ``node.intake_check``, reading element headers only, never the pixel data).
Statuses (PS3.4 B.2.3 for Storage, PS3.7 Annex C for the general ones); each refusal's message and log
line name the check and the tag or keyword, never a value, and its response carries a fixed Error
Comment per status (:data:`ERROR_COMMENTS`) for the modality's operator:

- 0xA700 ``OUT_OF_RESOURCES`` (Refused: Out of Resources): disk full, below ``storage.min_free_mb``.
- No status at all for deflated transfer syntaxes: they are not accepted at association
  (:data:`ACCEPTED_TRANSFER_SYNTAXES`), since a deflated data set is inflated whole before any check.
- 0xA900 ``DATASET_MISMATCH`` (Error: Data Set does not match SOP Class): the data set's SOPClassUID
  is not the request's Affected SOP Class UID; native pixel data whose length is not what Rows,
  Columns, SamplesPerPixel, NumberOfFrames and BitsAllocated declare (rounded up to even), or without
  those attributes.
- 0xC000 ``CANNOT_UNDERSTAND`` (Error: Cannot understand): the header cannot be parsed, a required
  UID is missing, the data set's SOPInstanceUID is not the request's, or the element structure is
  unsound (a VR that is no VR, elements out of order, stray items or delimiters, nesting too deep), or
  its header values are absurdly large (a text value over 1 MiB, another over 16 MiB, 64 MiB in all:
  the header is parsed in the receiving process).
- 0xC001 ``INVALID_UID`` (Cannot understand): SOPClassUID, SOPInstanceUID, StudyInstanceUID,
  SeriesInstanceUID or a file meta UID is not a UID (``dicom_hygiene.uid_problem``: at most 64 digits
  and dots, no empty component, no component with a leading zero, at most one trailing pad): results
  reference source UIDs verbatim, so an invalid one would make them invalid too.
- 0xC002 ``DATASET_TRUNCATED`` (Cannot understand): an element, item or fragment runs past the end,
  a delimiter is missing, or an image SOP class has no pixel data.
- 0xC003 ``ENCODING_MISMATCH`` (Cannot understand): the data are not encoded as the negotiated
  transfer syntax says (implicit/explicit VR, byte order, native vs encapsulated pixel data, the codec
  of the first fragment).
- 0x0110 ``PROCESSING_FAILURE``: the database or anything unexpected failed; nothing was acknowledged.
- 0x0111 ``DUPLICATE_SOP_INSTANCE`` (Failure: Duplicate SOP Instance, PS3.7 C.5): a known SOP Instance
  UID re-sent with other content once the node has reported or is reporting on the stored instance.

Re-sent SOP Instance UIDs: the common path (a new UID) costs a ``stat`` of the instance's path, then
the first-receive INSERT. Only when a file is already at the path is the new
data set (after the file meta) compared byte for byte with it. The same content: Success, idempotent
(``Store.record_instance``). Other content while the job is ``queued``, ``failed`` or ``skipped``
without results (nothing has left the node): it replaces the stored file and the job is reset,
Success. Other content once the job is ``running`` or ``done`` or has results: the stored instance and
its results are left untouched, the new file is kept in ``<data_dir>/conflicts/<study>/<sop>.<digest>.dcm``,
recorded (``Store.record_conflict``, listed by ``Store.conflicts``), logged with its UIDs, and answered
``DUPLICATE_SOP_INSTANCE``: a failure, so the modality shows that this image was not taken, and its
operator can give it a new UID; Success would claim the node holds that content under that UID, and
no Storage warning (B000 coercion, B006 elements discarded, B007 data set mismatch) says what happened.

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

import errno
import hashlib
import logging
import os
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Settings
from node.dicom_hygiene import uid_problem
from node.filter import Decision, FilterRules, decide
from node.intake_check import DatasetCheckError, Layout, Problem, check_layout, read_file_meta
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
    move_atomic,
    move_into_place,
    safe_uid,
    write_atomic,
)
from storage.queue import ConflictingInstance, ReceivedInstance, Store

log = logging.getLogger(__name__)

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
FILE_META_UIDS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
# What pydicom raises on a dataset it cannot parse (it is lenient: a missing UID is the usual sign).
_MALFORMED = (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
              NotImplementedError, OverflowError, struct.error)
INCOMING_DIR = "incoming"  # in data_dir: datasets being received (see ReceiveFile)
CONFLICTS_DIR = "conflicts"  # in data_dir: re-sent SOP Instance UIDs with other content, kept apart
_CHUNK = 1 << 20


class Status(IntEnum):
    """C-STORE response statuses (PS3.4 Annex B.2.3 and PS3.7 Annex C; see the module docstring)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # refused: disk full or below storage.min_free_mb
    DATASET_MISMATCH = 0xA900  # SOP class differs from the request's; pixel data length vs its geometry
    CANNOT_UNDERSTAND = 0xC000  # the dataset cannot be parsed, lacks its UIDs, or is structurally unsound
    INVALID_UID = 0xC001  # a required or file meta UID is not a UID
    DATASET_TRUNCATED = 0xC002  # an element, item or fragment runs past the end; an image without pixels
    ENCODING_MISMATCH = 0xC003  # the data are not encoded as the negotiated transfer syntax says
    PROCESSING_FAILURE = 0x0110  # database or other failure: nothing was acknowledged
    DUPLICATE_SOP_INSTANCE = 0x0111  # other content for a SOP Instance UID the node has reported on


# The Error Comment (0000,0902; LO, at most 64 characters) sent with each refusal: what the modality's
# operator sees. Fixed texts per status, so that no value of the data set can appear in it.
ERROR_COMMENTS = {
    Status.OUT_OF_RESOURCES: "node storage full: send again later",
    Status.DATASET_MISMATCH: "data set does not match its SOP class or pixel geometry",
    Status.CANNOT_UNDERSTAND: "data set cannot be parsed or is malformed",
    Status.INVALID_UID: "a required UID is not a valid DICOM UID (PS3.5 9.1)",
    Status.DATASET_TRUNCATED: "data set is truncated",
    Status.ENCODING_MISMATCH: "data set is not encoded in the negotiated transfer syntax",
    Status.PROCESSING_FAILURE: "node could not store the instance: send again later",
    Status.DUPLICATE_SOP_INSTANCE: "SOP Instance UID already reported with other content",
}

_PROBLEM_STATUS = {
    Problem.TRUNCATED: Status.DATASET_TRUNCATED,
    Problem.ENCODING: Status.ENCODING_MISMATCH,
    Problem.STRUCTURE: Status.CANNOT_UNDERSTAND,
}


class RefusalError(Exception):
    """An instance that is answered with an error ``status``; the message names the instance."""

    def __init__(self, status: Status, message: str) -> None:
        self.status = status
        super().__init__(message)


Payload = bytes | Path  # the encoded dataset with its file meta: in memory, or pynetdicom's temp file


def shown_uid(uid: str) -> str:
    """A sender's UID as it may appear in a log line or message: itself when valid, else a placeholder.

    A value that is not a UID may be any text a sender chose (up to 64 characters): never quote it.
    """
    return uid if uid_problem(uid) is None else "(not a UID)"


@contextmanager
def _opened(payload: Payload) -> Iterator[tuple[BinaryIO, int]]:
    """The payload as a seekable binary file and its size."""
    if isinstance(payload, bytes):
        yield BytesIO(payload), len(payload)
        return
    with payload.open("rb") as f:
        yield f, os.fstat(f.fileno()).st_size


def read_header(payload: Payload, sop_uid: str) -> Dataset:
    """Check the encoded data set and parse its header (no pixel data); refuse what the node cannot use.

    Checks, in this order: the structure, completeness and encoding against the negotiated transfer
    syntax (``node.intake_check.check_layout``, element headers only); the header parse; the required
    and file meta UIDs (present, syntactically UIDs, the SOP Instance UID and SOP Class UID those of
    the request); the pixel data (present for an image SOP class, a native length that fits its
    geometry). See the module docstring for the status of each refusal.

    Args:
        payload: the encoded dataset with file meta (bytes, or the path of a file holding them).
        sop_uid: the request's Affected SOP Instance UID (for messages and the consistency check).

    Raises:
        RefusalError: with the status of the first failed check; its message names the check and
            the tag or keyword, never a value.
    """
    shown = shown_uid(sop_uid)
    with _opened(payload) as (f, size):
        try:
            layout = check_layout(f, size)
        except DatasetCheckError as exc:
            raise RefusalError(_PROBLEM_STATUS[exc.problem], f"dataset of {shown}: {exc}") from exc
        f.seek(0)
        try:
            ds = dcmread(f, stop_before_pixels=True)
            _check_uid_syntax(ds, shown)  # on the encoded values, before pydicom converts them
            for _ in ds.iterall():  # pydicom converts values lazily: surface parse errors here
                pass
        except _MALFORMED as exc:  # pydicom's message may quote a value: name the error only
            raise RefusalError(Status.CANNOT_UNDERSTAND, f"dataset of {shown} cannot be parsed "
                               f"({type(exc).__name__})") from exc
    missing = [kw for kw in REQUIRED_UIDS if not str(ds.get(kw, "") or "").strip()]
    if missing:
        raise RefusalError(Status.CANNOT_UNDERSTAND, f"dataset of {shown}: expected "
                           f"{', '.join(REQUIRED_UIDS)}, missing {', '.join(missing)}")
    if str(ds.SOPInstanceUID).strip() != sop_uid:
        raise RefusalError(Status.CANNOT_UNDERSTAND, f"dataset of {shown}: its SOPInstanceUID (0008,0018) "
                           "differs from the request's Affected SOP Instance UID")
    requested_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    if requested_class and str(ds.SOPClassUID).strip() != requested_class:
        raise RefusalError(Status.DATASET_MISMATCH, f"dataset of {shown}: its SOPClassUID (0008,0016) "
                           f"differs from the request's Affected SOP Class UID {requested_class}")
    _check_pixels(ds, layout, shown)
    return ds


def _encoded_value(ds: Dataset, keyword: str) -> bytes | str | None:
    """An element's value as encoded (a raw element's bytes) or as converted; None when absent or empty."""
    element = ds.get_item(keyword)
    if element is None or element.value is None:
        return None
    value = element.value
    return value if isinstance(value, bytes | str) else str(value)


def _check_uid_syntax(ds: Dataset, shown: str) -> None:
    """Refuse (INVALID_UID) a required or file meta UID that is present but not a UID."""
    for owner, keywords in ((ds, REQUIRED_UIDS), (ds.file_meta, FILE_META_UIDS)):
        for keyword in keywords:
            value = _encoded_value(owner, keyword)
            if value is None or not value:
                continue  # missing: refused below, by name
            problem = uid_problem(value)
            if problem is not None:
                raise RefusalError(Status.INVALID_UID, f"dataset of {shown}: {keyword} is not a valid UID "
                                   f"(PS3.5 9.1): {problem}")


def _check_pixels(ds: Dataset, layout: Layout, shown: str) -> None:
    """Refuse an image SOP class without pixel data, and native pixel data whose length is not its geometry's."""
    if not layout.walked:
        return
    if not layout.has_pixels:
        sop_class = UID(str(ds.SOPClassUID).strip())
        if "Image Storage" in sop_class.name:
            raise RefusalError(Status.DATASET_TRUNCATED, f"dataset of {shown}: {sop_class.name} without "
                               "PixelData (7FE0,0010): the data set ends before its pixel data")
        return
    if layout.pixel_length is None:
        return
    try:
        expected = int(get_expected_length(ds, unit="bytes"))
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        raise RefusalError(Status.DATASET_MISMATCH, f"dataset of {shown}: native PixelData (7FE0,0010) without "
                           "usable Rows, Columns, SamplesPerPixel, BitsAllocated or NumberOfFrames "
                           f"({type(exc).__name__})") from exc
    if layout.pixel_length not in (expected, expected + expected % 2):  # odd: padded to even, or sent odd
        raise RefusalError(Status.DATASET_MISMATCH, f"dataset of {shown}: native PixelData (7FE0,0010) holds "
                           f"{layout.pixel_length} bytes, expected {expected + expected % 2} from Rows, Columns, "
                           "SamplesPerPixel, NumberOfFrames and BitsAllocated")


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


def _dataset_chunks(f: BinaryIO, size: int) -> tuple[str, Iterator[bytes]]:
    """The transfer syntax and the bytes of the data set after the file meta, in chunks."""
    syntax, offset = read_file_meta(f, size)
    f.seek(offset)
    return str(syntax), iter(lambda: f.read(_CHUNK), b"")


def same_dataset(payload: Payload, stored: Path) -> bool:
    """Whether the payload's data set (after the file meta) and transfer syntax are those of ``stored``.

    Run only for a SOP Instance UID whose file exists; reads both files in 1 MB chunks. A stored file
    that cannot be read or has no file meta counts as different.
    """
    try:
        with _opened(payload) as (new, new_size), _opened(stored) as (old, old_size):
            if abs(new_size - old_size) > 1024:  # the file metas differ by a few bytes
                return False
            new_ts, new_chunks = _dataset_chunks(new, new_size)
            old_ts, old_chunks = _dataset_chunks(old, old_size)
            if new_ts != old_ts:
                return False
            new_rest, old_rest = new_size - new.tell(), old_size - old.tell()
            return new_rest == old_rest and all(a == b for a, b in zip(new_chunks, old_chunks, strict=False))
    except (OSError, DatasetCheckError):
        return False


def dataset_digest(path: Path) -> str:
    """sha256 (hex) of a file's data set after its file meta: names a conflicting content."""
    digest = hashlib.sha256()
    with _opened(path) as (f, size):
        _, chunks = _dataset_chunks(f, size)
        for chunk in chunks:
            digest.update(chunk)
    return digest.hexdigest()


def conflict_path(data_dir: Path, study_uid: str, sop_uid: str, digest: str) -> Path:
    """Where other content for a reported SOP Instance UID is kept: ``conflicts/<study>/<sop>.<digest>.dcm``."""
    return data_dir / CONFLICTS_DIR / safe_uid(study_uid) / f"{safe_uid(sop_uid)}.{digest[:16]}.dcm"


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
            log.warning("C-STORE %s from %s refused (0x%04X %s): %s",
                        shown_uid(sop_uid), calling_ae, refusal.status, refusal.status.name, refusal)
            return refusal.status
        except Exception:  # the boundary: whatever failed, never answer Success
            log.exception("C-STORE %s from %s failed: processing failure (0x%04X)",
                          shown_uid(sop_uid), calling_ae, Status.PROCESSING_FAILURE)
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
            raise RefusalError(status, f"receiving {shown_uid(sop_uid)} into {self.data_dir / INCOMING_DIR} "
                               f"failed: {failed}")
        size = _size(payload)
        self._check_space(size, shown_uid(sop_uid))
        ds = read_header(payload, sop_uid)  # from here on, sop_uid is a valid UID
        decision = decide(ds, self.settings.filter, self.rules)
        path = instance_path(self.data_dir, str(ds.StudyInstanceUID), sop_uid)
        meta = ReceivedInstance(
            sop_instance_uid=sop_uid,
            study_instance_uid=str(ds.StudyInstanceUID).strip(),
            series_instance_uid=str(ds.SeriesInstanceUID).strip(),
            sop_class_uid=str(ds.SOPClassUID).strip(),
            calling_ae=calling_ae,
            path=path,
            size=size,
        )
        if path.exists():  # a re-send: compare before anything replaces the stored file
            self._accept_repeat(payload, meta, decision)
            return decision
        folders = self._place_first(payload, meta, decision)
        if folders is None:  # the same UID arrived on another association meanwhile: handled as a re-send
            return decision
        # The file is complete at ``path`` (a worker may read it once the row is committed); its folder's
        # fsync runs beside the commit, and both have finished before the status is returned.
        syncing = self._dir_syncs.submit(fsync_dirs, folders, path) if folders else None
        try:
            self.store.record_instance(meta, decision.accepted, decision.reason)
        except ConflictingInstance as conflict:  # the UID is known under another study: other content
            if syncing is not None:
                wait([syncing])
            raise self._keep_apart(path, meta, conflict) from None
        except BaseException:
            if syncing is not None:
                wait([syncing])
            path.unlink(missing_ok=True)  # a first receive leaves no orphan file
            raise
        if syncing is not None:
            try:
                syncing.result()  # failed: the row and the file stay, the caller's retry is idempotent
            except DiskFull as exc:
                raise RefusalError(Status.OUT_OF_RESOURCES, f"disk full writing {sop_uid}: {exc}") from exc
        return decision

    def _place_first(self, payload: Payload, meta: ReceivedInstance, decision: Decision) -> list[Path] | None:
        """Put a first receive at ``meta.path`` without ever replacing a file that got there meanwhile.

        The payload goes to a unique name beside the path first, then is hard-linked to the path, which
        fails if another association's receive of the same SOP Instance UID placed its file first (a
        rename would silently replace it): this one is then handled as a re-send of that file.

        Returns:
            The folders to fsync for the file to be durable, or None when it was handled as a re-send.
        """
        path = meta.path
        candidate = path.with_name(f".{path.name}.{uuid.uuid4().hex}.new")
        try:
            folders = _place(candidate, payload)
            try:
                os.link(candidate, path)
            except FileExistsError:
                self._accept_repeat(candidate, meta, decision)
                return None
            except OSError as exc:  # no hard links on this file system: an exclusive-create check, then rename
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV) or path.exists():
                    raise
                os.replace(candidate, path)
        except DiskFull as exc:
            raise RefusalError(Status.OUT_OF_RESOURCES, f"disk full writing {meta.sop_instance_uid}: {exc}") from exc
        finally:
            candidate.unlink(missing_ok=True)
        return [*folders, path.parent]  # the link is a new entry in the folder

    def _accept_repeat(self, payload: Payload, meta: ReceivedInstance, decision: Decision) -> None:
        """A SOP Instance UID whose file exists: idempotent when the same, replaced or kept apart when not.

        The new file is never put over the stored one before ``Store.record_instance`` has decided, with
        the rows locked, that the stored instance may be replaced (see the module docstring).
        """
        if same_dataset(payload, meta.path):  # the stored file stays; pynetdicom removes its own
            self.store.record_instance(meta, decision.accepted, decision.reason)
            return
        candidate = meta.path.with_name(f".{meta.path.name}.{uuid.uuid4().hex}.changed")
        try:
            try:
                fsync_dirs(_place(candidate, payload), candidate)
            except DiskFull as exc:
                raise RefusalError(Status.OUT_OF_RESOURCES, f"disk full writing {meta.sop_instance_uid}: "
                                   f"{exc}") from exc

            def replace_stored() -> None:
                if candidate.exists():  # idempotent: a retried transaction calls it again
                    os.replace(candidate, meta.path)
                    fsync_dirs([meta.path.parent], meta.path)

            try:
                self.store.record_instance(meta, decision.accepted, decision.reason, replace=replace_stored)
            except ConflictingInstance as conflict:
                raise self._keep_apart(candidate, meta, conflict) from None
        finally:
            candidate.unlink(missing_ok=True)  # gone already once it replaced the stored file or was kept apart

    def _keep_apart(self, current: Path, meta: ReceivedInstance, conflict: ConflictingInstance) -> RefusalError:
        """Move a conflicting file to ``conflicts/``, record it, log it; the refusal to answer."""
        digest = dataset_digest(current)
        kept = conflict_path(self.data_dir, meta.study_instance_uid, meta.sop_instance_uid, digest)
        try:
            move_atomic(current, kept)
        except DiskFull as exc:
            raise RefusalError(Status.OUT_OF_RESOURCES, f"disk full keeping {meta.sop_instance_uid} apart: "
                               f"{exc}") from exc
        self.store.record_conflict(replace(meta, path=kept), digest, conflict)
        return RefusalError(
            Status.DUPLICATE_SOP_INSTANCE,
            f"{meta.sop_instance_uid} (study {meta.study_instance_uid}) re-sent with other content than the "
            f"stored instance, whose job {conflict.job_id} is {conflict.job_state} or has results: the stored "
            f"instance and its results are kept, the new content is kept apart at {kept} and not analysed",
        )

    def close(self) -> None:
        """Let the folder-fsync threads go (they are idle between C-STOREs)."""
        self._dir_syncs.shutdown(wait=True)


def handle_store(event: Event, intake: Intake) -> Dataset:
    """``evt.EVT_C_STORE``: a durable write and its job row, then the status (with an Error Comment when
    refused, see :data:`ERROR_COMMENTS`)."""
    return response(intake.accept(event))


def response(status: int) -> Dataset:
    """The C-STORE response's status and, for a refusal, its value-free Error Comment."""
    rsp = Dataset()
    rsp.Status = status
    comment = ERROR_COMMENTS.get(Status(status)) if status in Status._value2member_map_ else None
    if comment:
        rsp.ErrorComment = comment
    return rsp


def handle_echo(event: Event) -> int:
    """``evt.EVT_C_ECHO``: always Success (logged with the caller's AE title)."""
    log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return Status.SUCCESS


def evt_handlers(intake: Intake) -> list[EventHandlerType]:
    """The handlers bound to the server, with their dependencies."""
    return [(evt.EVT_C_STORE, handle_store, [intake]), (evt.EVT_C_ECHO, handle_echo)]


# Every syntax pynetdicom knows except the deflated ones: a deflated data set is one zlib stream that
# pydicom inflates whole in memory before anything can be checked (about 1000:1, so a 10 MB upload
# becomes 10 GB in the receiving process). No radiography device needs them; a sender falls back to
# another proposed syntax, and one that proposes only these is refused at association.
DEFLATED_TRANSFER_SYNTAXES = frozenset({DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.4.95"})  # + JPIP
ACCEPTED_TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in DEFLATED_TRANSFER_SYNTAXES]


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
    ae.acse_timeout = scp.artim_timeout_s  # pynetdicom's ARTIM timer and its wait for the A-ASSOCIATE-RQ
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, cx.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES)
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
    server.max_associations_per_address = settings.scp.max_associations_per_address  # before it serves
    thread = threading.Thread(target=server.serve_forever, name=f"scp-{settings.scp.ae_title}", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it from this list
    log.info("SCP %s listening on %s:%d in process %d (callers: %s, max associations %d, max PDU %d)",
             settings.scp.ae_title, *server.server_address[:2], os.getpid(),
             ", ".join(settings.scp.allowed_callers) or "any", ae.maximum_associations,
             ae.maximum_pdu_size)
    return server
