"""Transport: pynetdicom overrides for receiving (bulk PDU reads, chunked files) and the accept servers.

Everything here reaches into pynetdicom's internals (``DULServiceProvider._read_pdu_data`` and
``kill_dul``, ``dimse_messages.NamedTemporaryFile``, the class of a live association, its socket and
DUL, the server's contexts and request handler), so it lives in one module, guarded by ``pynetdicom<4``
in pyproject.toml and by ``tests/test_transport.py``, which fails loudly when the installed pynetdicom
changes what it relies on.

- :class:`ReceiveFile` / :func:`receive_into`: pynetdicom's chunked receive streams each dataset into
  a file in ``<data_dir>/incoming/`` (the intake then moves it into place instead of copying it); the
  files an association leaves behind (it ended mid-dataset, or before its handler ran) are removed
  when it ends (:class:`AssociationEnd`).
- :class:`BulkRecvSocket`, :class:`BulkDULServiceProvider`: one ``recv_into`` per PDU and zero-copy
  P-DATA-TF decoding; every PDU's length is checked before anything is allocated for it (P-DATA-TF:
  the maximum PDU length we announced; others: :data:`NON_DATA_PDU_MAX`), and every read has a
  deadline (``scp.network_timeout_s`` from the PDU's first byte; before the A-ASSOCIATE-RQ and after
  an abort, the ARTIM timer, ``scp.artim_timeout_s``). A peer that breaks either is aborted at once.
- :class:`NoDelayAssociationServer`: TCP_NODELAY, read timeouts, bulk reads, quick context copies and
  the per-address limit (``scp.max_associations_per_address``, :class:`PeerSlots`) per association;
  :class:`SharedSocketAssociationServer`: ``scp.processes`` > 1 processes accepting on one socket.

Slots. pynetdicom counts an association against ``scp.max_associations`` while its thread lives.
Its acceptor waits ``acse_timeout`` for the A-ASSOCIATE-RQ and is not told when the connection ends
before one arrived (the DUL stops, the association thread keeps waiting), so garbage or a connection
closed at once would hold a slot for ``acse_timeout``: :meth:`BulkDULServiceProvider.kill_dul` wakes
it. pynetdicom checks the ARTIM timer only between reads, and an accepted socket has no timeout of its
own, so a peer that sent part of a PDU and stayed silent would block the DUL thread in ``recv`` for
ever: every read has a deadline.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO, cast

from pynetdicom import dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.config import MAX_PDU_RANGE

log = logging.getLogger(__name__)

STALE_INCOMING_S = 3600.0  # files left in incoming/ (e.g. by a killed process) are removed at start after this

NON_DATA_PDU_MAX = 1024 * 1024
"""The longest variable field accepted for a PDU other than P-DATA-TF, in bytes (PS3.8 section 9.3).

The longest such PDU is an A-ASSOCIATE-RQ: 68 fixed bytes, the application context item (<= 68), at
most 128 presentation context items (their IDs are the odd numbers 1-255), each 8 bytes + an abstract
syntax and its transfer syntaxes as items of 4 bytes + a UID of at most 64, and one user information
item, whose 2-byte length bounds it to 65,539 bytes with user identity, role selection and extended
negotiation included. 128 contexts x (8 + 68 + 100 x 68) + 65,539 + 136 = 945,843 bytes: 1 MiB
allows 100 maximum-length transfer syntaxes per context (real ones are 20-30 characters). A-ASSOCIATE-AC
is smaller; A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT are 4 bytes.
"""
UNLIMITED_P_DATA_MAX = MAX_PDU_RANGE[1]  # the bound when the AE announces 0 (unlimited), which config refuses


class PduType(IntEnum):
    """PDU types (PS3.8 Table 9-11 ff.)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class AbortSource(IntEnum):
    """A-ABORT source (PS3.8 Table 9-26)."""

    SERVICE_PROVIDER = 0x02


class AbortReason(IntEnum):
    """A-ABORT reason/diagnostic when the source is the service provider (PS3.8 Table 9-26)."""

    NOT_SPECIFIED = 0x00
    INVALID_PDU_PARAMETER_VALUE = 0x06


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ result, source and reason (PS3.8 Table 9-21)."""

    TRANSIENT = 0x02
    SOURCE_PRESENTATION = 0x03  # DICOM UL service-provider (presentation related function)
    LOCAL_LIMIT_EXCEEDED = 0x02  # reason with SOURCE_PRESENTATION


_receive_errors: dict[str, OSError] = {}  # ReceiveFile.name -> the write error, taken by the handler


class ReceiveFile:
    """The file pynetdicom's chunked receive streams a dataset into, in ``folder``.

    Stands in for the ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`` that pynetdicom
    makes (it uses ``name``, ``write``, ``file.flush`` and ``close``). The first failing write (e.g.
    ENOSPC) is recorded for the C-STORE handler (:func:`receive_error`) and later writes are dropped:
    raised in pynetdicom's DUL thread it would abort the association instead of being answered.
    pynetdicom unlinks ``name`` after the handler has run (the intake will have moved it by then).
    """

    def __init__(self, folder: Path) -> None:
        self.name = str(folder / f"{uuid.uuid4().hex}.part")
        self.file = self  # pynetdicom flushes through ``.file``
        self.error: OSError | None = None
        self._raw: BinaryIO | None = None
        owner = threading.current_thread()  # pynetdicom's DUL thread of the association receiving it
        self._end = owner.association_end if isinstance(owner, BulkDULServiceProvider) else None
        if self._end is not None:
            self._end.track(self)  # removed when the association ends, unless handled (closed) before
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._raw = open(self.name, "xb", buffering=0)  # noqa: SIM115 - closed by pynetdicom via close()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        _receive_errors[self.name] = exc

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view and self._raw is not None and self.error is None:
            try:
                view = view[self._raw.write(view):]
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        """Nothing to do: writes are unbuffered."""

    def close(self) -> None:
        """Close the file: pynetdicom does so after the C-STORE handler ran, then unlinks ``name``."""
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._end is not None:
            self._end.forget(self)

    def discard(self) -> bool:
        """Close and remove the file unless it was moved into place; whether there was one to remove."""
        self.close()
        _receive_errors.pop(self.name, None)
        try:
            Path(self.name).unlink()
        except FileNotFoundError:
            return False
        return True


def receive_into(folder: Path) -> None:
    """Have pynetdicom's chunked receive (process-wide) create its files in ``folder`` (see ReceiveFile)."""
    def named_temporary_file(*args: Any, **kwargs: Any) -> ReceiveFile:
        return ReceiveFile(folder)

    dimse_messages.NamedTemporaryFile = named_temporary_file  # type: ignore[assignment]


def receive_error(payload: bytes | Path) -> OSError | None:
    """The error a :class:`ReceiveFile` met while the dataset was being received, if any."""
    return None if isinstance(payload, bytes) else _receive_errors.pop(str(payload), None)


def remove_stale_incoming(folder: Path, older_than_s: float = STALE_INCOMING_S) -> int:
    """Remove what aborted associations left in ``folder`` (older than ``older_than_s``); how many."""
    removed = 0
    cutoff = time.time() - older_than_s
    for path in folder.glob("*.part") if folder.is_dir() else ():
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed



class BulkRecvSocket(AssociationSocket):
    """pynetdicom's association socket, reading each PDU with ``recv_into`` instead of 4 KiB ``recv`` calls.

    pynetdicom reads a PDU 4096 bytes at a time, each chunk a new ``bytes`` appended to a bytearray:
    ~2,000 calls and two copies per 8 MB image. Here the PDU is read into one buffer in as few calls as
    the socket allows (one copy), which saves CPU on every large image (measured: bench/README.md,
    "What was changed to get here", item 3).
    Reads take a deadline (:meth:`recv_until`); the caller bounds ``nr_bytes`` before calling.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only when the peer closed the connection), as pynetdicom's ``recv``.

        Bounded only by the socket's own timeout; the DUL reads with :meth:`recv_until`.
        """
        return self.recv_until(nr_bytes, math.inf)

    def recv_until(self, nr_bytes: int, deadline: float) -> bytearray:
        """Read ``nr_bytes`` by ``deadline`` (``time.monotonic()``; fewer only when the peer closed).

        The socket's timeout is set for each ``recv_into`` to what is left, and restored afterwards
        (sends keep the timeout the server set on the accepted socket).

        Raises:
            TimeoutError: the deadline passed before ``nr_bytes`` arrived.
            OSError: the connection failed (reset).
        """
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        got = 0
        own_timeout = sock.gettimeout()
        try:
            with memoryview(buffer) as view:
                while got < nr_bytes:
                    if deadline != math.inf:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError(f"{got} of {nr_bytes} bytes arrived before the deadline")
                        sock.settimeout(left)
                    n = sock.recv_into(view[got:], nr_bytes - got)
                    if not n:
                        break
                    got += n
        finally:
            if deadline != math.inf:
                with contextlib.suppress(OSError):  # closed meanwhile: nothing to restore
                    sock.settimeout(own_timeout)
        if got < nr_bytes:
            del buffer[got:]
        return buffer


_PDU_TYPES_KNOWN = frozenset(range(0x01, 0x08))


def decode_p_data_tf(body: bytearray) -> P_DATA_TF:
    """A P-DATA-TF PDU from its body (the bytes after the 6-byte header), its PDVs views of ``body``.

    pynetdicom copies each PDU's data four times on its way to the DIMSE layer (``bytestream +=``,
    ``bytes()``, the slice of the items, the slice of each PDV): ~3 ms of CPU per 8 MB image, under
    the GIL. Here each presentation data value is a ``memoryview`` into the one received buffer;
    the DIMSE layer only indexes, slices and writes them.

    Raises:
        ValueError: an item's length runs past the PDU or is 0 (no message control header).
    """
    view = memoryview(body)
    items = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            raise ValueError(f"P-DATA-TF: a PDV item at offset {offset} needs 6 bytes, {end - offset} left")
        (length,) = struct.unpack_from(">L", body, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError(f"P-DATA-TF: PDV item length {length} at offset {offset} does not fit in {end}")
        item = PresentationDataValueItem()
        item.presentation_context_id = body[offset + 4]
        item.presentation_data_value = cast(bytes, view[offset + 5 : offset + 4 + length])
        items.append(item)
        offset += 4 + length
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = items
    return pdu


class BulkDULServiceProvider(DULServiceProvider):
    """pynetdicom's DUL reactor with bounded PDU reads and zero-copy P-DATA-TF (see decode_p_data_tf).

    ``_read_pdu_data`` is pynetdicom's (3.0) with the same events for every outcome, and three
    differences. Before the body of a PDU is read (or allocated), its length is checked: a P-DATA-TF
    may not exceed the maximum length we announced (PS3.8 9.3.5 and D.1), another PDU
    :data:`NON_DATA_PDU_MAX`. The whole PDU must arrive by a deadline (:meth:`_pdu_deadline`). A peer
    that breaks either is aborted (:meth:`_abort_transport`). A P-DATA-TF PDU takes the zero-copy decode
    while no handler is bound to ``EVT_DATA_RECV`` (which is given the raw bytes); other PDUs go
    through pynetdicom's own ``_decode_pdu``.

    ``kill_dul`` also wakes the association thread when the DUL stops before the association was
    established (see the module docstring), and the thread, when it ends, reports to its
    :class:`AssociationEnd`.
    """

    association_end: AssociationEnd | None = None  # set by BulkRecvRequestHandler
    accepted_at: float = math.inf  # time.monotonic() of the TCP accept; set by BulkRecvRequestHandler
    max_p_data_length: int = UNLIMITED_P_DATA_MAX  # the maximum PDU length we announced

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.association_end is not None:
                self.association_end.thread_ended()

    def kill_dul(self) -> None:
        """Stop the reactor; if no association was established, release the acceptor waiting for one.

        pynetdicom's acceptor waits up to ``acse_timeout`` for the A-ASSOCIATE-RQ primitive, and a
        connection that closes, sends garbage or runs out its ARTIM timer before sending one puts nothing
        on that queue. ``None`` is what ``receive_pdu`` returns on a timeout, so the acceptor ends at once,
        as it would then. Once established, the association thread ends on its own (A-P-ABORT, release).
        """
        super().kill_dul()
        if not self.assoc.is_established:
            self.to_user_queue.put(None)

    def _pdu_deadline(self) -> float:
        """When the PDU whose first bytes are waiting must have arrived whole (``time.monotonic()``).

        ``network_timeout`` from now; while the A-ASSOCIATE-RQ is awaited (Sta1/Sta2) no later than
        the ARTIM timeout after the accept, and while awaiting the close after an abort or rejection
        (Sta13), no later than the ARTIM timer's end: a read never outlasts the timer that the reactor
        only checks between reads.
        """
        now = time.monotonic()
        deadline = now + self.network_timeout if self.network_timeout is not None else math.inf
        artim = self.artim_timer.timeout
        if artim is None:
            return deadline
        state = self.state_machine.current_state
        if state in ("Sta1", "Sta2"):
            deadline = min(deadline, self.accepted_at + artim)
        elif state == "Sta13":
            deadline = min(deadline, now + max(0.0, self.artim_timer.remaining))
        return deadline

    def _pdu_limit(self, pdu_type: int) -> int:
        return self.max_p_data_length if pdu_type == PduType.P_DATA_TF else NON_DATA_PDU_MAX

    def _abort_transport(self, reason: AbortReason) -> None:
        """Send an A-ABORT (service provider, ``reason``) without waiting, then close the connection.

        ``close()`` puts Evt17 on the event queue: the state machine then ends the association as for
        any closed connection (AA-5 before it was established, AA-4 with an A-P-ABORT indication
        after, AR-5 while waiting for the close). Nothing more of the PDU is read.
        """
        sock = cast(AssociationSocket, self.socket)
        raw = sock.socket
        if raw is not None:
            pdu = A_ABORT_RQ()
            pdu.source = AbortSource.SERVICE_PROVIDER
            pdu.reason_diagnostic = reason
            try:
                raw.setblocking(False)
                raw.send(pdu.encode())
            except OSError:
                pass  # the peer does not read or has gone: closing is what matters
        sock.close()

    def _read_pdu_data(self) -> None:
        sock = cast(BulkRecvSocket, self.socket)
        address = self.assoc.requestor.address
        started = time.monotonic()
        deadline = self._pdu_deadline()
        try:
            header = sock.recv_until(6, deadline)
            if len(header) != 6:
                self.event_queue.put("Evt17")  # closed
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES_KNOWN:
                log.warning("association from %s: unknown PDU type 0x%02X", address, pdu_type)
                self.event_queue.put("Evt19")
                return
            limit = self._pdu_limit(pdu_type)
            if length > limit:
                log.warning("association from %s: %s PDU of %d bytes refused (at most %d): aborted",
                            address, PduType(pdu_type).name, length, limit)
                self._abort_transport(AbortReason.INVALID_PDU_PARAMETER_VALUE)
                return
            body = sock.recv_until(length, deadline)
        except TimeoutError:
            log.warning("association from %s: a PDU begun %.1f s ago has not arrived whole (scp.network_timeout_s;"
                        " scp.artim_timeout_s from the accept to the association request): aborted",
                        address, time.monotonic() - started)
            self._abort_transport(AbortReason.NOT_SPECIFIED)
            return
        except OSError:
            log.warning("association from %s: connection closed before a whole PDU arrived", address)
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            log.warning("association from %s: PDU shorter than announced (%d of %d bytes)", address, len(body), length)
            self.event_queue.put("Evt17")
            return
        self._decode_and_queue(pdu_type, header, body)

    def _decode_and_queue(self, pdu_type: int, header: bytearray, body: bytearray) -> None:
        try:
            if pdu_type == PduType.P_DATA_TF and not self.assoc.get_handlers(evt.EVT_DATA_RECV):
                pdu: Any = decode_p_data_tf(body)
                evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
                event = "Evt10"
            else:
                pdu, event = self._decode_pdu(header + body)
        except Exception:
            log.exception("association from %s: undecodable %s PDU", self.assoc.requestor.address,
                          PduType(pdu_type).name)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)


class AssociationEnd:
    """What is undone when an accepted association has ended: its partly received files, its peer's slot.

    Two threads serve an association: pynetdicom's association reactor (it runs the C-STORE handler,
    then closes and unlinks the dataset's file) and its DUL reactor (it creates the
    :class:`ReceiveFile` objects). Once both have ended nothing can write, hand over or move a file
    any more, so the files not closed by then are what the association left behind however it ended
    (release, A-ABORT, reset, a PDU or DIMSE message that pynetdicom refused, a timeout, a handler
    that raised): they are removed, and the peer address's slot is released.

    Args:
        address: the peer's IP address (for the log).
        release_slot: called once, at the end (:meth:`PeerSlots.release` for this connection).
    """

    def __init__(self, address: str, release_slot: Callable[[], None]) -> None:
        self.address = address
        self._files: set[ReceiveFile] = set()
        self._release_slot = release_slot
        self._running = 2  # the association thread and its DUL thread
        self._lock = threading.Lock()

    def track(self, part: ReceiveFile) -> None:
        """A dataset is being received into ``part``."""
        with self._lock:
            self._files.add(part)

    def forget(self, part: ReceiveFile) -> None:
        """``part`` was handled (the intake moved it, or pynetdicom removes it next)."""
        with self._lock:
            self._files.discard(part)

    def thread_ended(self) -> None:
        """One of the two threads has ended; the last one cleans up."""
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.clean_up()

    def clean_up(self) -> None:
        """Remove the files left behind and release the slot (once; later calls find nothing to do)."""
        with self._lock:
            files, self._files = self._files, set()
            release, self._release_slot = self._release_slot, _nothing
        removed = 0
        for part in files:
            try:
                removed += part.discard()
            except OSError as exc:
                log.warning("association from %s: cannot remove partly received %s: %s",
                            self.address, part.name, exc.strerror)
        if removed:
            log.warning("association from %s ended with %d dataset(s) partly received: removed from incoming/",
                        self.address, removed)
        release()


def _nothing() -> None:
    """The release of a slot already released (or never taken)."""


class ReceivingAssociation(Association):
    """pynetdicom's acceptor association that reports to its :class:`AssociationEnd` when its thread ends."""

    association_end: AssociationEnd | None = None  # set by BulkRecvRequestHandler

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._ended()

    def _ended(self) -> None:
        end = self.association_end
        if end is None:
            return
        if not self._started_dul:  # no DUL thread will report: count it here
            end.thread_ended()
        elif self.dul.is_alive() and self.dul.socket is not None:
            # pynetdicom's own paths wait for the DUL to stop; after an error in this thread, close
            # the connection so that the DUL stops as well (Evt17) and the cleanup runs.
            self.dul.socket.close()
        end.thread_ended()


class BulkRecvRequestHandler(RequestHandler):
    """pynetdicom's request handler whose associations read with :class:`BulkRecvSocket` and
    :class:`BulkDULServiceProvider` and clean up after themselves (:class:`AssociationEnd`)."""

    association_end: AssociationEnd | None = None

    def handle(self) -> None:
        """Create and start the association (pynetdicom's); if that fails, clean up here."""
        end = self.association_end = AssociationEnd(str(self.client_address[0]), self._slot_release())
        try:
            super().handle()
        except BaseException:
            end.clean_up()  # no association thread runs to do it
            raise

    def _slot_release(self) -> Callable[[], None]:
        slots = getattr(self.server, "peer_slots", None)
        if not isinstance(slots, PeerSlots):
            return _nothing
        address = str(self.client_address[0])
        return lambda: slots.release(address)

    def _create_association(self) -> Association:
        accepted_at = time.monotonic()
        assoc = super()._create_association()
        assoc.__class__ = ReceivingAssociation  # the same object (and state): only ``run`` differs
        assoc.dul.socket.__class__ = BulkRecvSocket  # likewise: ``recv`` and ``recv_until``
        assoc.dul.__class__ = BulkDULServiceProvider  # likewise: ``_read_pdu_data``, ``kill_dul``, ``run``
        dul = cast(BulkDULServiceProvider, assoc.dul)
        dul.accepted_at = accepted_at
        dul.max_p_data_length = self.ae.maximum_pdu_size or UNLIMITED_P_DATA_MAX
        dul.association_end = cast(ReceivingAssociation, assoc).association_end = self.association_end
        return assoc


class PeerSlots:
    """Connections held per peer IP address, from the TCP accept until the association has ended.

    Taken in the accepting thread (:meth:`NoDelayAssociationServer.verify_request`) before any byte
    is read, so connections still in the handshake count; released by :class:`AssociationEnd`.
    """

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, address: str, limit: int | None) -> bool:
        """Count one more connection from ``address``; False (nothing counted) when it holds ``limit``."""
        with self._lock:
            held = self._held.get(address, 0)
            if limit is not None and held >= limit:
                return False
            self._held[address] = held + 1
            return True

    def release(self, address: str) -> None:
        """One connection from ``address`` has ended."""
        with self._lock:
            held = self._held.get(address, 0) - 1
            if held > 0:
                self._held[address] = held
            else:
                self._held.pop(address, None)

    def held(self, address: str) -> int:
        """How many connections ``address`` holds now."""
        with self._lock:
            return self._held.get(address, 0)


def refuse_over_limit(client: socket.socket) -> None:
    """Answer a connection over its address's limit with an A-ASSOCIATE-RJ, reading nothing from it.

    Transient, DICOM UL service-provider (presentation), local-limit-exceeded: what pynetdicom
    answers over ``max_associations``, so a modality logs the same reason and retries later. Sent
    without waiting (10 bytes fit in any send buffer); the server then closes the connection.
    """
    pdu = A_ASSOCIATE_RJ()
    pdu.result = RejectResult.TRANSIENT
    pdu.source = RejectResult.SOURCE_PRESENTATION
    pdu.reason_diagnostic = RejectResult.LOCAL_LIMIT_EXCEEDED
    try:
        client.setblocking(False)
        client.send(pdu.encode())
    except OSError:
        pass  # gone already: closing is what matters


class SupportedContexts(list[PresentationContext]):
    """The server's supported contexts, quick to deep-copy.

    pynetdicom deep-copies them for every association: for 171 storage classes x 45 transfer syntaxes
    that took ~40 ms (a C-ECHO association ~100 ms against storescp's ~20 ms). Their UIDs are immutable
    strings, so a copy of each context with copies of its lists is a deep copy in all that matters.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for cx in self:
            twin = copy.copy(cx)
            twin.__dict__.update({k: list(v) for k, v in vars(cx).items() if isinstance(v, list)})
            copies.append(twin)
        return copies


class NoDelayAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server: TCP_NODELAY and a timeout on each accepted socket, bulk and bounded
    reads (BulkRecvRequestHandler), contexts copied quickly for each association (SupportedContexts),
    at most ``max_associations_per_address`` connections per peer IP address (PeerSlots)."""

    request_queue_size = socket.SOMAXCONN  # socketserver's 5 drops SYNs when many modalities connect at once
    max_associations_per_address: int | None = None  # None: no limit; start_scp sets the scp key's value

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", BulkRecvRequestHandler)
        self.peer_slots = PeerSlots()
        super().__init__(*args, **kwargs)
        self.contexts = SupportedContexts(self.contexts)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; TCP_NODELAY, and ``network_timeout`` on the socket so that no send blocks for ever.

        (Python leaves an accepted socket blocking without a timeout whatever the listening socket's.)
        """
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.ae.network_timeout)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a slot for the peer's address, or refuse the connection at once (socketserver closes it)."""
        address = str(client_address[0])
        if self.peer_slots.take(address, self.max_associations_per_address):
            return True
        log.warning("connection from %s refused: it holds %d connections already "
                    "(scp.max_associations_per_address)", address, self.max_associations_per_address)
        refuse_over_limit(request)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the association's handler thread (socketserver's); if it cannot start, release the slot."""
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.peer_slots.release(str(client_address[0]))
            raise


class SharedSocketAssociationServer(NoDelayAssociationServer):
    """The server of one of ``scp.processes`` > 1 processes, all accepting on one listening socket.

    The first process binds and listens (``listen_socket`` None); the others are given that socket
    (``listen_socket``, passed to them by ``node.app``) instead of binding. The socket is non-blocking
    in every process, so a process that loses the race for a new connection goes back to waiting
    (``accept`` raises ``BlockingIOError``, which socketserver ignores) instead of blocking in
    ``accept``. A process already serving associations waits ``ACCEPT_BACKOFF_S`` per association
    (at most ``ACCEPT_BACKOFF_MAX_S``) before it tries to accept, so that an idle process wins: with
    four modalities sending at once, each of four processes takes one. (``SO_REUSEPORT`` instead
    hashes each connection onto a process whatever its load: two of four connections land on the
    same process more often than not.) ``max_associations`` and ``max_associations_per_address``
    apply to each process.
    """

    listen_socket: socket.socket | None = None  # set on a subclass by shared_socket_server()
    ACCEPT_BACKOFF_S = 0.005
    ACCEPT_BACKOFF_MAX_S = 0.05
    ACCEPT_BACKOFF_FULL_S = 0.25  # at max_associations: leave the connection to a process with room

    def server_bind(self) -> None:
        """Bind as pynetdicom does, or take the given listening socket; non-blocking either way."""
        if self.listen_socket is None:
            super().server_bind()
        else:
            cast(socket.socket, self.socket).close()  # the unbound socket socketserver made
            self.socket = self.listen_socket
            self.server_address = self.socket.getsockname()
        cast(socket.socket, self.socket).setblocking(False)

    def server_activate(self) -> None:
        if self.listen_socket is None:  # the given socket listens already
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        busy = len(self.active_associations)
        if busy >= self.ae.maximum_associations:
            time.sleep(self.ACCEPT_BACKOFF_FULL_S)
        elif busy:
            time.sleep(min(self.ACCEPT_BACKOFF_S * busy, self.ACCEPT_BACKOFF_MAX_S))
        return super().get_request()  # BlockingIOError: another process was first

    def server_close(self) -> None:
        """Close this process's copy of the listening socket, then wait for its association threads.

        Never ``shutdown(2)`` as pynetdicom's ``server_close`` does: that acts on the socket every SCP
        process shares, and the others would refuse connections (``accept`` fails with EINVAL).
        (Non-blocking mode is shared as well; every process sets the same, before any child exists.)
        """
        cast(socket.socket, self.socket).close()
        threads = getattr(self, "_threads", None)  # socketserver.ThreadingMixIn's, as its server_close
        if threads is not None:
            threads.join()


def shared_socket_server(listen_socket: socket.socket | None) -> type[SharedSocketAssociationServer]:
    """The server class of an SCP process that accepts on ``listen_socket`` (None: bind it here)."""
    if listen_socket is None:
        return SharedSocketAssociationServer
    return type("InheritedSocketAssociationServer", (SharedSocketAssociationServer,),
                {"listen_socket": listen_socket})
