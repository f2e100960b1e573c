"""Transport: pynetdicom overrides for receiving (bulk PDU reads, bounded and timed, and association ends).

Everything here reaches into pynetdicom's internals (``DULServiceProvider._read_pdu_data`` and
``kill_dul``, the class of a live association, its socket and DUL, the request handler's
``_create_association``), guarded by ``pynetdicom<4`` in pyproject.toml and by
``tests/test_pynetdicom_contract.py``, which fails loudly when the installed pynetdicom changes what it
relies on. The accept servers that use these are ``node.scp_server``; the chunked receive's files,
``node.incoming``.

- :class:`BulkRecvSocket`, :class:`BulkDULServiceProvider`: one ``recv_into`` per PDU and zero-copy
  P-DATA-TF decoding; every PDU's length is checked before anything is allocated for it (P-DATA-TF:
  the maximum PDU length we announced; others: :data:`NON_DATA_PDU_MAX`), and every read has a
  deadline (``scp.network_timeout_s`` from the PDU's first byte; before the A-ASSOCIATE-RQ and after
  an abort, the ARTIM timer, ``scp.artim_timeout_s``). A peer that breaks either is aborted at once.
- :class:`ReceivingAssociation`, :class:`BulkRecvRequestHandler`: the files an association leaves
  behind in ``<data_dir>/incoming/`` (``node.incoming.ReceiveFile``; it ended mid-dataset, or before its
  handler ran) are removed, and its peer's slot (``node.scp_server.PeerSlots``) released, when it
  ends (:class:`AssociationEnd`).

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
import logging
import math
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.config import MAX_PDU_RANGE
from node.incoming import ReceiveFile
from node.tls import describe_error

log = logging.getLogger(__name__)

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
            self.to_user_queue.put(cast(Any, None))  # not a primitive: what a timeout returns

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
    ``node.incoming.ReceiveFile`` objects). Once both have ended nothing can write, hand over or move a file
    any more, so the files not closed by then are what the association left behind however it ended
    (release, A-ABORT, reset, a PDU or DIMSE message that pynetdicom refused, a timeout, a handler
    that raised): they are removed, and the peer address's slot is released.

    Args:
        address: the peer's IP address (for the log).
        release_slot: called once, at the end (``node.scp_server.PeerSlots.release`` for this connection).
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
    :class:`BulkDULServiceProvider` and clean up after themselves (:class:`AssociationEnd`).

    On the TLS listener the handshake runs here first, in the connection's own thread, within the
    ARTIM timeout from the accept (which the association request shares): a failed or late handshake
    closes the connection before pynetdicom sees it (logged with the peer's address and the reason).
    """

    association_end: AssociationEnd | None = None
    accepted_at: float = math.inf  # time.monotonic() when the handler started (just after the TCP accept)

    def handle(self) -> None:
        """Create and start the association (pynetdicom's); if that fails, clean up here."""
        self.accepted_at = time.monotonic()
        end = self.association_end = AssociationEnd(str(self.client_address[0]), self._slot_release())
        try:
            if not self._tls_handshake():
                end.clean_up()
                return
            super().handle()
        except BaseException:
            end.clean_up()  # no association thread runs to do it
            raise

    def _tls_handshake(self) -> bool:
        """Shake hands on a TLS connection by the ARTIM deadline; False (connection closed) when that fails."""
        sock = self.request
        if not isinstance(sock, ssl.SSLSocket):
            return True
        own_timeout = sock.gettimeout()
        artim = self.ae.acse_timeout
        try:
            if artim is not None:
                sock.settimeout(max(0.001, self.accepted_at + artim - time.monotonic()))
            sock.do_handshake()
            sock.settimeout(own_timeout)
        except (ssl.SSLError, OSError) as exc:  # refused certificate, not TLS, timeout, reset
            log.warning("TLS handshake with %s failed: %s: connection closed", self.client_address[0],
                        describe_error(exc))
            refused = getattr(self.server, "on_refused", None)
            if refused is not None:
                refused(str(self.client_address[0]), f"TLS handshake failed: {describe_error(exc)}")
            with contextlib.suppress(OSError):
                sock.close()
            return False
        return True

    def _slot_release(self) -> Callable[[], None]:
        slots = getattr(self.server, "peer_slots", None)  # node.scp_server.PeerSlots; pynetdicom's servers: none
        if slots is None:
            return _nothing
        address = str(self.client_address[0])
        return lambda: slots.release(address)

    def _create_association(self) -> Association:
        accepted_at = min(self.accepted_at, time.monotonic())
        assoc = super()._create_association()
        assoc.__class__ = ReceivingAssociation  # the same object (and state): only ``run`` differs
        assoc.dul.socket.__class__ = BulkRecvSocket  # likewise: ``recv`` and ``recv_until``
        assoc.dul.__class__ = BulkDULServiceProvider  # likewise: ``_read_pdu_data``, ``kill_dul``, ``run``
        dul = cast(BulkDULServiceProvider, assoc.dul)
        dul.accepted_at = accepted_at
        dul.max_p_data_length = self.ae.maximum_pdu_size or UNLIMITED_P_DATA_MAX
        dul.association_end = cast(ReceivingAssociation, assoc).association_end = self.association_end
        return assoc


