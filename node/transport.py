"""Transport: pynetdicom overrides for receiving (bulk PDU reads, chunked files) and the accept servers.

Everything here reaches into pynetdicom's internals (``DULServiceProvider._read_pdu_data``,
``dimse_messages.NamedTemporaryFile``, the class of a live association's socket and DUL, the server's
contexts), so it lives in one module, guarded by ``pynetdicom<4`` in pyproject.toml and by
``tests/test_transport.py``, which fails loudly when the installed pynetdicom changes what it relies on.

- :class:`ReceiveFile` / :func:`receive_into`: pynetdicom's chunked receive streams each dataset into
  a file in ``<data_dir>/incoming/`` (the intake then moves it into place instead of copying it).
- :class:`BulkRecvSocket`, :class:`BulkDULServiceProvider`: one ``recv_into`` per PDU and zero-copy
  P-DATA-TF decoding.
- :class:`NoDelayAssociationServer`: TCP_NODELAY, bulk reads and quick context copies per association;
  :class:`SharedSocketAssociationServer`: ``scp.processes`` > 1 processes accepting on one socket.
"""

from __future__ import annotations

import copy
import logging
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, cast

from pynetdicom import dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

STALE_INCOMING_S = 3600.0  # files left in incoming/ by aborted associations are removed at start after this


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
        if self._raw is not None:
            self._raw.close()


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
    the socket allows (one copy): ~4 ms (~15 %) less CPU per 2048x2048 16-bit image on this project's machine.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only when the peer closed the connection), as pynetdicom's ``recv``."""
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        got = 0
        with memoryview(buffer) as view:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:
                    break
                got += n
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
    """pynetdicom's DUL reactor, reading P-DATA-TF PDUs without copying their data (see decode_p_data_tf).

    ``_read_pdu_data`` is pynetdicom's (3.0) with the same events for every outcome; only a P-DATA-TF
    PDU takes the zero-copy decode, and only while no handler is bound to ``EVT_DATA_RECV`` (which is
    given the raw bytes). Other PDUs go through pynetdicom's own ``_decode_pdu``.
    """

    def _read_pdu_data(self) -> None:
        sock = cast(AssociationSocket, self.socket)
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError):
            log.warning("association from %s: connection closed before a whole PDU arrived",
                        self.assoc.requestor.address)
            self.event_queue.put("Evt17")
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")  # closed
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES_KNOWN:
            log.warning("association from %s: unknown PDU type 0x%02X", self.assoc.requestor.address, pdu_type)
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError):
            log.warning("association from %s: connection closed before a whole PDU arrived",
                        self.assoc.requestor.address)
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            log.warning("association from %s: PDU shorter than announced (%d of %d bytes)",
                        self.assoc.requestor.address, len(body), length)
            self.event_queue.put("Evt17")
            return
        try:
            if pdu_type == 0x04 and not self.assoc.get_handlers(evt.EVT_DATA_RECV):
                pdu: Any = decode_p_data_tf(body)
                evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
                event = "Evt10"
            else:
                pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception:
            log.exception("association from %s: undecodable PDU", self.assoc.requestor.address)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)


class BulkRecvRequestHandler(RequestHandler):
    """pynetdicom's request handler whose associations read with :class:`BulkRecvSocket` and
    :class:`BulkDULServiceProvider`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = BulkRecvSocket  # the same object (and state): only ``recv`` differs
        assoc.dul.__class__ = BulkDULServiceProvider  # likewise: only ``_read_pdu_data`` differs
        return assoc


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
    """pynetdicom's threaded server: TCP_NODELAY on each accepted socket, bulk reads (BulkRecvSocket),
    contexts copied quickly for each association (SupportedContexts)."""

    request_queue_size = socket.SOMAXCONN  # socketserver's 5 drops SYNs when many modalities connect at once

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", BulkRecvRequestHandler)
        super().__init__(*args, **kwargs)
        self.contexts = SupportedContexts(self.contexts)

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


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
    same process more often than not.)
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
        client, address = super().get_request()  # BlockingIOError: another process was first
        # Python leaves an accepted socket in its default mode (blocking, no timeout) only when the
        # listening socket has a timeout; this one is non-blocking, so say it: the same as one process.
        client.setblocking(True)
        return client, address

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
