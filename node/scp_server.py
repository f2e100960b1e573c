"""SCP server: the node's accept servers, built on pynetdicom's ``ThreadedAssociationServer``.

- :class:`NoDelayAssociationServer`: TCP_NODELAY, read timeouts, the TLS handshake off the accepting
  thread (with an ``ssl_context``: the ``[scp.tls]`` listener), bulk and bounded reads
  (``node.transport.BulkRecvRequestHandler``), quick context copies (:class:`SupportedContexts`) and
  the per-address limit (``scp.max_associations_per_address``, :class:`PeerSlots`, over it
  :func:`refuse_over_limit`) per association;
- :class:`SharedSocketAssociationServer` (:func:`shared_socket_server`): ``scp.processes`` > 1
  processes accepting on one listening socket (started by ``node.app``).

Built by ``node.receive.start_scp`` with ``AE.make_server``. The pynetdicom internals these rely on
(the server's ``contexts`` deep-copied for each association, ``get_request``, ``server_bind``,
``server_close``, ``active_associations``, ``ae._servers``) are checked by
``tests/test_pynetdicom_contract.py``.
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any, cast

from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from node.transport import BulkRecvRequestHandler

log = logging.getLogger("node.transport")  # the transport's log lines keep their logger name


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ result, source and reason (PS3.8 Table 9-21)."""

    TRANSIENT = 0x02
    SOURCE_PRESENTATION = 0x03  # DICOM UL service-provider (presentation related function)
    LOCAL_LIMIT_EXCEEDED = 0x02  # reason with SOURCE_PRESENTATION


class PeerSlots:
    """Connections held per peer IP address, from the TCP accept until the association has ended.

    Taken in the accepting thread (:meth:`NoDelayAssociationServer.verify_request`) before any byte
    is read, so connections still in the handshake count; released by ``node.transport.AssociationEnd``.
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
    without waiting (10 bytes fit in any send buffer); the server then closes the connection. A TLS
    connection is only closed: nothing can be sent on it before a handshake, which is not made for it.
    """
    if isinstance(client, ssl.SSLSocket):
        return
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
    # called with (address, reason) for a connection refused before any association request could be read (over the
    # per-address limit, a failed TLS handshake); start_scp puts the audit trail here
    on_refused: Callable[[str, str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", BulkRecvRequestHandler)
        self.peer_slots = PeerSlots()
        super().__init__(*args, **kwargs)
        self.contexts = SupportedContexts(self.contexts)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; TCP_NODELAY, and ``network_timeout`` on the socket so that no send blocks for ever.

        (Python leaves an accepted socket blocking without a timeout whatever the listening socket's.)
        With ``ssl_context`` (the TLS listener) the socket is wrapped without its handshake, which runs
        in the association's thread (``node.transport.BulkRecvRequestHandler``): pynetdicom's own
        ``get_request`` shakes hands here, in the one accepting thread, before any timeout is set and
        before the peer's address is counted, so one silent client would stop every other from connecting.
        """
        client, address = cast(socket.socket, self.socket).accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a slot for the peer's address, or refuse the connection at once (socketserver closes it)."""
        address = str(client_address[0])
        if self.peer_slots.take(address, self.max_associations_per_address):
            return True
        log.warning("connection from %s refused: it holds %d connections already "
                    "(scp.max_associations_per_address)", address, self.max_associations_per_address)
        if self.on_refused is not None:
            self.on_refused(address, f"over scp.max_associations_per_address ({self.max_associations_per_address})")
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
