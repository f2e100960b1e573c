"""Intake: the durable intake of each received instance, and the C-STORE/C-ECHO handlers.

A modality's C-STORE is answered Success only after the instance is on disk (``write_atomic``:
tmp + fsync + rename + fsync of the folder) and its instance and job rows are committed
(``Store.record_instance``); any failure before that answers an error status (``node.refusals``) and
leaves no half-written file. The dataset is never decoded: the bytes as sent are written with the file
meta information, and only the header (``stop_before_pixels``) is parsed for the UIDs and the filter
(``node.refusals.read_header``).

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
``node.receive.make_ae``, process-wide): each dataset is streamed into a file instead of memory, so
concurrent large images do not pile up in RAM. ``make_ae`` also has pynetdicom create that file in
``<data_dir>/incoming/`` (``node.incoming.ReceiveFile``, process-wide), on the file system of the instances, so
the intake moves the received file into place (fsync, rename, fsync of the folder) instead of writing
its bytes a second time (that copy was ~40 % of the node's CPU per image). The folder's fsync runs in a
helper thread beside the commit of the rows (each fsync is a device cache flush, ~4 ms here); both have
finished before the status is returned, and the row is committed only after the rename. A write
that fails there (disk full) is kept and answered by the handler (Out of Resources) rather than
raised in pynetdicom's reactor, which would abort the association. :class:`Intake` also works with a
received file on another file system (it is then copied) and with chunked receive off
(``event.encoded_dataset()``, written by ``write_atomic``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from node.config import Settings
from node.filter import Decision, FilterRules, decide
from node.incoming import INCOMING_DIR, receive_error
from node.intake_check import DatasetCheckError, read_file_meta
from node.metrics import IMAGES_RECEIVED
from node.refusals import (
    ERROR_COMMENTS,
    Payload,
    RefusalError,
    Status,
    opened,
    read_header,
    shown_uid,
    status_name,
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

log = logging.getLogger("node.receive")  # the receive step's log lines keep their logger name

CONFLICTS_DIR = "conflicts"  # in data_dir: re-sent SOP Instance UIDs with other content, kept apart
_CHUNK = 1 << 20


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
        with opened(payload) as (new, new_size), opened(stored) as (old, old_size):
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
    with opened(path) as (f, size):
        _, chunks = _dataset_chunks(f, size)
        for chunk in chunks:
            digest.update(chunk)
    return digest.hexdigest()


def conflict_path(data_dir: Path, study_uid: str, sop_uid: str, digest: str) -> Path:
    """Where other content for a reported SOP Instance UID is kept: ``conflicts/<study>/<sop>.<digest>.dcm``."""
    return data_dir / CONFLICTS_DIR / safe_uid(study_uid) / f"{safe_uid(sop_uid)}.{digest[:16]}.dcm"


class Intake:
    """The durable intake of one C-STORE: space check, header, filter, atomic write, rows.

    Built once at start-up and bound to ``evt.EVT_C_STORE`` (see ``node.receive.evt_handlers``).

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
                        shown_uid(sop_uid), calling_ae, refusal.status, status_name(refusal.status), refusal)
            IMAGES_RECEIVED.labels(calling_ae, "refused").inc()
            return refusal.status
        except Exception:  # the boundary: whatever failed, never answer Success
            log.exception("C-STORE %s from %s failed: processing failure (0x%04X)",
                          shown_uid(sop_uid), calling_ae, Status.PROCESSING_FAILURE)
            IMAGES_RECEIVED.labels(calling_ae, "refused").inc()
            return Status.PROCESSING_FAILURE
        log.info("stored %s from %s: %s", sop_uid, calling_ae, decision.reason)
        IMAGES_RECEIVED.labels(calling_ae, "analyse" if decision.accepted else "stored").inc()
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
    refused, see ``node.refusals.ERROR_COMMENTS``)."""
    return response(intake.accept(event))


def response(status: int) -> Dataset:
    """The C-STORE response's status and, for a refusal, its value-free Error Comment."""
    rsp = Dataset()
    rsp.Status = status
    comment = ERROR_COMMENTS.get(int(status))
    if comment:
        rsp.ErrorComment = comment
    return rsp


def handle_echo(event: Event) -> int:
    """``evt.EVT_C_ECHO``: always Success (logged with the caller's AE title)."""
    log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return Status.SUCCESS


