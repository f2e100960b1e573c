"""Send step: deliver results to DICOM destinations (C-STORE SCU) through the outbox, with backoff.

``send_files`` opens one association per destination and batch, proposing each file's SOP class with
the file's own transfer syntax and Explicit/Implicit VR Little Endian, and classifies every file's
outcome: SENT, RETRYABLE (peer down, association rejected transiently or aborted, timeout, Out of
Resources) or REJECTED (association rejected permanently, e.g. called AE title not recognised; the SOP
class refused; a failure status such as "Data Set does not match SOP Class" or "Cannot understand").
``Outbox`` drives the store's outbox: due entries are sent, retryable failures come due again after
``min(retry_initial_s * 2**(attempts-1), retry_max_s)``, rejections are recorded and never retried.
A ``tls = true`` destination is sent to over DICOM TLS (node/tls.py); a failed handshake (its certificate
not trusted, ours refused) is RETRYABLE and says which. Logs carry UIDs and AE titles only.
"""

from __future__ import annotations

import copy
import datetime as dt
import enum
import logging
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import (
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    Status,
    code_to_category,
)

from node.audit import AuditTrail
from node.backoff import backoff_s
from node.config import Destination, SendSettings
from node.leases import process_owner
from node.live import LiveSettings
from node.metrics import SEND_ATTEMPTS, SEND_FAILURES
from node.privacy import safe_text
from node.tls import ClientContext, TlsFileError, client_context, describe_error
from storage.db import utcnow
from storage.files import write_atomic
from storage.queue import OutboxEntry, Store

log = logging.getLogger(__name__)

SR_KINDS = ("sr", "failure_sr")  # outbox kinds that hold an SR (Comprehensive SR fallback applies)

# A-ASSOCIATE-RJ Result (PS3.8 9.3.4): 1 rejected-permanent, 2 rejected-transient
ASSOCIATION_REJECTED_TRANSIENT = 0x02
# C-STORE failure statuses that may pass (PS3.4 B.2.3, PS3.7 C): retried, never rejected
OUT_OF_RESOURCES = range(0xA700, 0xA800)
PROCESSING_FAILURE = 0x0110  # general failure, often a transient problem of the peer
RESOURCE_LIMITATION = 0x0213
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class Verdict(enum.Enum):
    """What became of one file sent to one destination."""

    SENT = "sent"
    RETRYABLE = "retryable"  # try again later
    REJECTED = "rejected"  # permanent: never retried


@dataclass(frozen=True)
class SendOutcome:
    """The outcome of sending one file.

    ``context_refused`` is True when the peer refused every presentation context for the file's SOP
    class (e.g. a PACS without Comprehensive 3D SR, 1.2.840.10008.5.1.4.1.1.88.34): the caller may
    rebuild the object with another SOP class. ``transfer_syntax`` is the one the peer accepted.
    """

    verdict: Verdict
    error: str = ""  # what went wrong, where, expected and found; "" when sent without warning
    status: int | None = None  # the C-STORE response status, None when no response
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    transfer_syntax: str = ""
    context_refused: bool = False
    associated: bool = False  # an association was established (False: the destination as a whole failed)

    @property
    def sent(self) -> bool:
        return self.verdict is Verdict.SENT


def _where(dest: Destination) -> str:
    return f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"


def _set_nodelay(event: Event) -> None:
    """``evt.EVT_CONN_OPEN``: turn Nagle off, or each C-STORE response stalls ~40 ms."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _contexts(syntaxes: Sequence[tuple[str, str]]) -> list[PresentationContext]:
    """Presentation contexts for (SOP class, transfer syntax) pairs: the file's own syntax and both
    uncompressed Little Endian syntaxes; a compressed syntax gets a context of its own so that the
    peer can accept it without refusing the uncompressed fallback."""
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for sop_class, ts in syntaxes:
        uid = UID(ts)
        wanted: list[list[str | UID]]
        if uid in UNCOMPRESSED or not uid.is_compressed:
            wanted = [list(dict.fromkeys([uid, *UNCOMPRESSED]))]
        else:
            wanted = [[uid], list(UNCOMPRESSED)]
        for tss in wanted:
            key = (sop_class, tuple(tss))
            if key not in seen:
                seen.add(key)
                contexts.append(build_context(sop_class, tss))
    return contexts


def _associate(
    dest: Destination, calling_ae: str, contexts: list[PresentationContext], timeout_s: float
) -> tuple[Association, list[A_ASSOCIATE_RJ], ClientContext | None]:
    """Request an association; also returns any A-ASSOCIATE-RJ PDU received, and the TLS context used.

    pynetdicom 3.0.4 can report a rejection as a failed connection when the peer closes the socket
    right after its A-ASSOCIATE-RJ (the ACSE sees the closed socket first; ~10 % of rejections by
    dcmtk on loopback), so the RJ PDU is captured from ``EVT_PDU_RECV`` as it arrives. A ``tls``
    destination is connected to with a TLS context built for this association (the certificate files
    are read again, so renewed ones take effect); it keeps the error of a failed handshake, which
    pynetdicom reports only as a failed connection.

    Raises:
        node.tls.TlsFileError: a certificate, key or CA file of the destination cannot be loaded.
    """
    rejections: list[A_ASSOCIATE_RJ] = []

    def keep_rejection(event: Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = contexts
    ae.connection_timeout = timeout_s
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    handlers: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, _set_nodelay), (evt.EVT_PDU_RECV, keep_rejection)]
    tls = (client_context(dest.ca_file, dest.cert_file, dest.key_file, dest.check_hostname,
                          where=f"destinations.{dest.name}") if dest.tls else None)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=handlers,
                         tls_args=(tls, dest.host) if tls is not None else None)
    return assoc, rejections, tls


def _tls_failure(dest: Destination, exc: OSError) -> SendOutcome:
    """A TLS handshake that failed: retryable (a certificate gets fixed), saying whose certificate was refused."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        names = f" and names {dest.host}" if dest.check_hostname else ""
        hint = f"expected a certificate of {dest.ae_title} that {dest.ca_file} trusts{names}"
    elif "alert" in describe_error(exc):
        hint = (f"{dest.ae_title} refused the handshake (our certificate: {dest.cert_file or 'none presented'}, "
                "or no common TLS version or cipher suite)")
    else:
        hint = "expected a TLS server there"
    return SendOutcome(Verdict.RETRYABLE, f"TLS handshake with {_where(dest)} failed: {describe_error(exc)}; {hint}")


def association_failure(
    assoc: Association, dest: Destination, rejections: Sequence[A_ASSOCIATE_RJ] = (), tls: ClientContext | None = None
) -> SendOutcome:
    """Classify an association that was not established: rejected permanently, or transiently/down (a TLS
    handshake that failed included)."""
    if tls is not None and tls.tls_error is not None:
        return _tls_failure(dest, tls.tls_error)
    rsp: A_ASSOCIATE | A_ASSOCIATE_RJ | None = rejections[0] if rejections else None
    if rsp is None and assoc.is_rejected:
        rsp = assoc.acceptor.primitive
    if rsp is not None:
        transient = rsp.result == ASSOCIATION_REJECTED_TRANSIENT
        error = (f"association to {_where(dest)} rejected ({rsp.result_str}, {rsp.source_str}): "
                 f"{rsp.reason_str}; expected acceptance of called AE {dest.ae_title!r}")
        return SendOutcome(Verdict.RETRYABLE if transient else Verdict.REJECTED, error)
    if assoc.rejected_contexts and not assoc.accepted_contexts:  # accepted, but no context: pynetdicom aborts
        refused = ", ".join(sorted({f"{UID(str(cx.abstract_syntax)).name} ({cx.abstract_syntax})"
                                    for cx in assoc.rejected_contexts}))
        error = (f"{dest.ae_title} refused every proposed presentation context at {_where(dest)}: {refused}; "
                 "expected at least one accepted")
        return SendOutcome(Verdict.REJECTED, error, context_refused=True)
    error = (f"association to {_where(dest)} failed: connection refused, aborted or timed out "
             f"(expected an A-ASSOCIATE-AC)")
    return SendOutcome(Verdict.RETRYABLE, error)


def classify_status(code: int) -> Verdict:
    """The verdict for a C-STORE response status: success and warnings are SENT."""
    if code == Status.SUCCESS or code_to_category(code) == STATUS_WARNING:
        return Verdict.SENT
    if code in OUT_OF_RESOURCES or code in (PROCESSING_FAILURE, RESOURCE_LIMITATION):
        return Verdict.RETRYABLE
    return Verdict.REJECTED


def _status_text(code: int) -> str:
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
    return f"0x{code:04X} {meaning}"


def _in_accepted_syntax(ds: pydicom.Dataset, accepted: Sequence[PresentationContext]) -> pydicom.Dataset:
    """``ds``, decompressed when the peer accepted its SOP class only in an uncompressed syntax.

    Our overlays are stored RLE Lossless; a PACS that takes Secondary Capture only uncompressed still
    gets them (pydicom decodes RLE itself, colour as RGB).
    """
    ts = ds.file_meta.TransferSyntaxUID
    if not ts.is_compressed or any(cx.transfer_syntax[0] == ts for cx in accepted):
        return ds
    if not any(not UID(cx.transfer_syntax[0]).is_compressed for cx in accepted):
        return ds
    plain = copy.deepcopy(ds)
    try:
        plain.decompress(generate_instance_uid=False)  # the same object, only its encoding differs
    except Exception:  # no decoder for it here: sent as it is, and refused by the peer with a reason
        return ds
    return plain


def _store_one(assoc: Association, dest: Destination, ds: pydicom.Dataset, path: Path) -> SendOutcome:
    """C-STORE one dataset on an established association."""
    sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    base = SendOutcome(Verdict.REJECTED, sop_class_uid=sop_class, sop_instance_uid=sop_uid, associated=True)
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
    if not accepted:
        error = (f"{dest.ae_title} refused SOP class {UID(sop_class).name} ({sop_class}) of {sop_uid} "
                 f"with every proposed transfer syntax; expected acceptance at {_where(dest)}")
        return replace(base, error=error, context_refused=True)
    ds = _in_accepted_syntax(ds, accepted)
    try:
        rsp = assoc.send_c_store(ds)
    except ValueError as exc:  # no usable context (a compressed file, only uncompressed accepted); bad encoding
        ts = ds.file_meta.TransferSyntaxUID
        found = ", ".join(str(cx.transfer_syntax[0]) for cx in accepted)
        error = f"cannot send {sop_uid} ({path.name}) in {ts} to {_where(dest)}: accepted {found} ({exc})"
        return replace(base, error=error, context_refused="presentation context" in str(exc))
    used = next((cx for cx in accepted if cx.transfer_syntax[0] == ds.file_meta.TransferSyntaxUID), accepted[0])
    base = replace(base, transfer_syntax=str(used.transfer_syntax[0]))
    if "Status" not in rsp:
        error = f"no C-STORE response for {sop_uid} from {_where(dest)} (timeout or abort)"
        return replace(base, verdict=Verdict.RETRYABLE, error=error)
    code = int(rsp.Status)
    error = ""
    if code != Status.SUCCESS:
        # the PACS's Error Comment is free text that may quote the object's patient values: never copied
        comment = f" (Error Comment: {safe_text(str(rsp.ErrorComment))})" if "ErrorComment" in rsp else ""
        error = f"{dest.ae_title} answered {_status_text(code)}{comment} for {sop_uid} at {_where(dest)}"
    return replace(base, verdict=classify_status(code), error=error, status=code)


def _read(path: Path) -> pydicom.Dataset | SendOutcome:
    """The result file, or the outcome: REJECTED when missing or not DICOM, RETRYABLE on an I/O error."""
    try:
        return pydicom.dcmread(path)
    except (FileNotFoundError, InvalidDicomError) as exc:
        return SendOutcome(Verdict.REJECTED, f"cannot read result file {path}: expected a DICOM file ({exc})")
    except OSError as exc:
        return SendOutcome(Verdict.RETRYABLE, f"cannot read result file {path}: I/O error ({exc})")


def send_files(
    dest: Destination, paths: Sequence[Path], calling_ae: str, timeout_s: float = 30.0
) -> list[SendOutcome]:
    """C-STORE files to one destination on one association; one outcome per path, in order.

    An unreadable file is REJECTED on its own; a failed association gives every readable file the
    same outcome; an abort midway makes the files not yet sent RETRYABLE.
    """
    read = [_read(Path(p)) for p in paths]
    datasets = [d for d in read if isinstance(d, pydicom.Dataset)]
    if not datasets:
        return [d for d in read if isinstance(d, SendOutcome)]
    contexts = _contexts([(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets])
    try:
        assoc, rejections, tls = _associate(dest, calling_ae, contexts, timeout_s)
    except TlsFileError as exc:  # a file removed or made unreadable since start-up: retried once fixed
        failed = SendOutcome(Verdict.RETRYABLE, f"TLS towards {_where(dest)}: {exc}")
        return [d if isinstance(d, SendOutcome) else _for(failed, d) for d in read]
    if not assoc.is_established:
        failed = association_failure(assoc, dest, rejections, tls)
        return [d if isinstance(d, SendOutcome) else _for(failed, d) for d in read]
    outcomes: list[SendOutcome] = []
    try:
        for path, item in zip(paths, read, strict=True):
            if isinstance(item, SendOutcome):
                outcomes.append(item)
            elif not assoc.is_established:
                error = f"association to {_where(dest)} ended before {item.SOPInstanceUID} was sent"
                outcomes.append(_for(SendOutcome(Verdict.RETRYABLE, error), item))
            else:
                outcomes.append(_store_one(assoc, dest, item, Path(path)))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _for(outcome: SendOutcome, ds: pydicom.Dataset) -> SendOutcome:
    """The same outcome, naming the dataset's UIDs."""
    return replace(outcome, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID))


def send_file(dest: Destination, path: Path, calling_ae: str, timeout_s: float = 30.0) -> SendOutcome:
    """C-STORE one file to ``dest``; see ``send_files``."""
    return send_files(dest, [path], calling_ae, timeout_s)[0]


def echo(dest: Destination, calling_ae: str, timeout_s: float = 10.0) -> bool:
    """C-ECHO ``dest``; True when it answers Success."""
    return echo_result(dest, calling_ae, timeout_s)[0]


def echo_result(dest: Destination, calling_ae: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """C-ECHO ``dest``: whether it answered Success, and what happened (the reason when it did not)."""
    try:
        assoc, rejections, tls = _associate(dest, calling_ae, [build_context(Verification)], timeout_s)
    except TlsFileError as exc:
        error = f"TLS towards {_where(dest)}: {exc}"
        log.warning("echo: %s", error)
        return False, error
    if not assoc.is_established:
        error = association_failure(assoc, dest, rejections, tls).error
        log.warning("echo: %s", error)
        return False, error
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    ok = "Status" in rsp and rsp.Status == Status.SUCCESS
    log.info("echo %s from %s: %s", _where(dest), calling_ae, "success" if ok else "failed")
    if ok:
        return True, f"{_where(dest)} answered C-ECHO with Success"
    status = f"0x{int(rsp.Status):04X}" if "Status" in rsp else "no response (timed out or aborted)"
    return False, f"{_where(dest)} answered C-ECHO with status {status}; expected Success (0x0000)"


Sender = Callable[[Destination, Sequence[Path], str, float], list[SendOutcome]]


class Outbox:
    """Sends due outbox entries to their destinations and records each outcome in the store.

    Args:
        store: the queue and outbox.
        destinations: the configured destinations (entries name them by ``Destination.name``).
        settings: retry delays, the alert threshold and the network timeout.
        calling_ae: our AE title, unless a destination names its own ``calling_ae``.
        sender: ``send_files`` (tests may pass a fake).
        batch: entries per association.
        live: the live settings: destinations and the send keys follow the console's changes (read before each
            round); None: ``destinations`` and ``settings`` as given.
        audit: the audit trail of results sent and rejected; None: none kept.
    """

    def __init__(
        self,
        store: Store,
        destinations: Sequence[Destination],
        settings: SendSettings,
        calling_ae: str,
        *,
        sender: Sender = send_files,
        batch: int = 8,
        live: LiveSettings | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        self.live = live
        self.audit = audit
        self.store = store
        self.destinations = {d.name: d for d in destinations}
        self.settings = settings
        self.calling_ae = calling_ae
        self.sender = sender
        self.batch = batch
        # a claim outlasts the slowest batch, so other processes sharing the queue skip these entries
        self.claim_s = max(60.0, settings.timeout_s * (batch + 2))
        # who holds a claim: a restarted node releases the claims of its dead predecessor at once
        self.owner = process_owner(os.getpid(), "outbox")
        self.consecutive_failures: dict[str, int] = {}

    def retry_delay(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed tries (1 = the first failure)."""
        return backoff_s(attempts, self.settings.retry_initial_s, self.settings.retry_max_s)

    def run_due(self, now: dt.datetime | None = None) -> int:
        """Send every entry due at ``now`` (None: the current time).

        Returns:
            The number of entries tried (sent, rescheduled or rejected).
        """
        now = now or utcnow()
        if self.live is not None:
            current = self.live.refresh()
            self.destinations = {d.name: d for d in current.destinations}
            self.settings = current.send
        tried = 0
        while entries := self.store.due_outbox(now, limit=self.batch * 4, claim_s=self.claim_s, owner=self.owner):
            by_dest: dict[str, list[OutboxEntry]] = {}
            for entry in entries:
                by_dest.setdefault(entry.destination, []).append(entry)
            for name, group in by_dest.items():
                for start in range(0, len(group), self.batch):
                    self._send_batch(name, group[start:start + self.batch], now)
            tried += len(entries)
        return tried

    def _send_batch(self, name: str, entries: list[OutboxEntry], now: dt.datetime) -> None:
        dest = self.destinations.get(name)
        if dest is None:  # removed from the configuration: keep the entries, retry rarely
            for e in entries:
                error = f"destination {name!r} is not configured (expected one of {sorted(self.destinations)})"
                self.store.mark_send_failed(e.id, error, now + dt.timedelta(seconds=self.settings.retry_max_s))
            return
        calling_ae = dest.our_ae_title(self.calling_ae)
        try:
            outcomes = self.sender(dest, [e.path for e in entries], calling_ae, self.settings.timeout_s)
        except Exception as exc:  # an unexpected error of the sender must not lose the batch: retry it
            log.exception("sending %d entries to %s failed unexpectedly", len(entries), _where(dest))
            outcomes = [SendOutcome(Verdict.RETRYABLE, f"{type(exc).__name__}: {exc}")] * len(entries)
        association_counted = False
        for entry, outcome in zip(entries, outcomes, strict=True):
            if outcome.context_refused and entry.kind in SR_KINDS:
                outcome = self._send_comprehensive_fallback(dest, entry, calling_ae, outcome)
            self._record(dest, entry, outcome, now)
            if outcome.sent:
                self.consecutive_failures[name] = 0
            elif outcome.associated or not association_counted:  # a failed association counts once
                association_counted = association_counted or not outcome.associated
                self._count_failure(dest, outcome)

    def _send_comprehensive_fallback(
        self, dest: Destination, entry: OutboxEntry, calling_ae: str, refused: SendOutcome
    ) -> SendOutcome:
        """The peer refused Comprehensive 3D SR: send the same report as Comprehensive SR (88.33)."""
        from node.results import COMPREHENSIVE_3D_SR, as_comprehensive_sr

        try:
            ds = pydicom.dcmread(entry.path)
            if ds.SOPClassUID != COMPREHENSIVE_3D_SR:
                return refused
            fallback = as_comprehensive_sr(ds)
            path = entry.path.with_name(f"{fallback.SOPInstanceUID}.dcm")
            write_atomic(path, lambda f: fallback.save_as(f, enforce_file_format=True))
        except (OSError, ValueError, InvalidDicomError) as exc:
            return replace(refused, error=f"{refused.error}; Comprehensive SR fallback failed: {exc}")
        log.warning("%s (%s) refused Comprehensive 3D SR; sending %s as Comprehensive SR %s",
                    dest.name, dest.ae_title, entry.sop_instance_uid, fallback.SOPInstanceUID)
        outcome = self.sender(dest, [path], calling_ae, self.settings.timeout_s)[0]
        return replace(outcome, error=f"sent as Comprehensive SR {fallback.SOPInstanceUID}"
                       if outcome.sent else outcome.error)

    def _record(self, dest: Destination, entry: OutboxEntry, outcome: SendOutcome, now: dt.datetime) -> None:
        what = f"{entry.kind} {entry.sop_instance_uid} to {dest.name} ({dest.ae_title})"
        SEND_ATTEMPTS.labels(dest.name, {Verdict.SENT: "sent", Verdict.REJECTED: "rejected"}.get(
            outcome.verdict, "retry")).inc()
        if outcome.verdict is not Verdict.SENT:
            SEND_FAILURES.labels(dest.name).inc()
        if outcome.verdict is Verdict.SENT:
            self.store.mark_sent(entry.id)
            log.info("sent %s%s", what, f" with warning: {outcome.error}" if outcome.error else "")
            if self.audit is not None:
                self.audit.record("result_sent", "success", dest.name, f"{dest.host}:{dest.port}", kind=entry.kind,
                                  sop_instance_uid=entry.sop_instance_uid, called=dest.ae_title)
        elif outcome.verdict is Verdict.REJECTED:
            self.store.mark_rejected(entry.id, outcome.error)
            log.error("rejected for good: %s: %s", what, outcome.error)
            if self.audit is not None:
                self.audit.record("result_rejected", "failure", dest.name, f"{dest.host}:{dest.port}",
                                  kind=entry.kind, sop_instance_uid=entry.sop_instance_uid, called=dest.ae_title,
                                  reason=outcome.error)
        else:
            attempts = entry.attempts + 1
            delay = self.retry_delay(attempts)
            self.store.mark_send_failed(entry.id, outcome.error, now + dt.timedelta(seconds=delay))
            log.warning("send failed (attempt %d, next in %.0f s): %s: %s", attempts, delay, what, outcome.error)

    def _count_failure(self, dest: Destination, outcome: SendOutcome) -> None:
        n = self.consecutive_failures.get(dest.name, 0) + 1
        self.consecutive_failures[dest.name] = n
        if self.settings.alert_after > 0 and n % self.settings.alert_after == 0:
            log.error("ALERT: destination %s failed %d consecutive sends; last error: %s",
                      _where(dest), n, outcome.error)
