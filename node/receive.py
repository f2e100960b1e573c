"""Receive step: the C-STORE/C-ECHO service class provider (the AE, its server and its handlers).

Modules, after pynetdicom's own map:

- this module (pynetdicom's ``ae``): :func:`make_ae` (titles, callers, limits, timeouts, contexts),
  :func:`start_scp` (the server in a background thread) and :func:`evt_handlers` (the handlers bound);
- ``node.intake`` (the service class's handlers): :class:`~node.intake.Intake`, the durable intake of
  each instance (``handle_store``, ``handle_echo``);
- ``node.refusals`` (``status``): the header checks and the statuses of what the node refuses;
- ``node.transport`` (``transport``, ``dul``, ``association``): the overrides for bulk, bounded and timed
  reads and for what an association leaves behind; ``node.incoming`` (``dimse_messages``): the files
  pynetdicom's chunked receive streams each dataset into; ``node.scp_server``: the accept servers.

Associations: every storage SOP class with every transfer syntax pynetdicom knows (JPEG baseline,
lossless, JPEG-LS, JPEG 2000, RLE ...) except the deflated ones (:data:`ACCEPTED_TRANSFER_SYNTAXES`),
Verification; the called AE title is checked when ``scp.require_called_ae``; a non-empty
``scp.allowed_callers`` refuses other callers at association ("calling AE not recognised");
TCP_NODELAY on every accepted socket (else each response waits for the peer's delayed ACK, ~40 ms).
With ``scp.processes`` > 1 the node's process binds and listens, and its SCP children accept on that
same listening socket (``node.scp_server.SharedSocketAssociationServer``; started by ``node.app``): an
idle process takes the next association before a busy one does, where ``SO_REUSEPORT`` would hash
connections onto processes regardless of their load. ``scp.max_associations`` applies to each process.
With ``[scp.tls] enabled`` a second server (:func:`start_scp` with ``tls``) listens with TLS on
``scp.tls.port``, beside the plain one or alone (``scp.tls.only``), with the same AE, handlers and limits
(``max_associations`` and ``max_associations_per_address`` count both); with ``scp.processes`` > 1
every process accepts on both sockets.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import cast

from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.audit import AuditTrail
from node.config import Settings
from node.incoming import INCOMING_DIR, STALE_INCOMING_S, receive_into, remove_stale_incoming
from node.intake import Intake, handle_echo, handle_store
from node.live import LiveSettings
from node.metrics import ASSOCIATIONS
from node.scp_server import NoDelayAssociationServer, shared_socket_server
from node.tls import server_context

log = logging.getLogger(__name__)


def evt_handlers(intake: Intake, live: LiveSettings | None = None,
                 audit: AuditTrail | None = None) -> list[EventHandlerType]:
    """The handlers bound to the server, with their dependencies: C-STORE and C-ECHO; with ``live``, the console's
    changes read as each connection opens; with ``audit``, every association accepted or refused in the trail."""
    handlers: list[EventHandlerType] = [(evt.EVT_C_STORE, handle_store, [intake]), (evt.EVT_C_ECHO, handle_echo)]
    if live is not None:
        handlers.append((evt.EVT_CONN_OPEN, _refresh_live, [live]))
    handlers += [(evt.EVT_ACCEPTED, _association_accepted, [audit]),
                 (evt.EVT_REJECTED, _association_rejected, [audit])]
    return handlers


def _refresh_live(event: Event, live: LiveSettings) -> None:
    """A connection opened: read the console's changes before its A-ASSOCIATE-RQ is judged (one cheap query)."""
    live.refresh()


def apply_receiving(ae: AE, settings: Settings) -> None:
    """Put the receiving keys that change without a restart into the running AE (read at each association)."""
    ae.require_calling_aet = list(settings.scp.allowed_callers)  # empty: any caller
    ae.require_called_aet = settings.scp.require_called_ae
    ae.maximum_associations = settings.scp.max_associations


def _peer(event: Event) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address or "")


def _association_accepted(event: Event, audit: AuditTrail | None) -> None:
    calling, address = _peer(event)
    ASSOCIATIONS.labels("accepted").inc()
    if audit is not None:
        audit.record("association", "success", calling, address, called=str(event.assoc.acceptor.ae_title).strip())


def _connection_refused(audit: AuditTrail, address: str, reason: str) -> None:
    ASSOCIATIONS.labels("rejected").inc()
    audit.record("association", "failure", "(before the request)", address, reason=reason)


def _association_rejected(event: Event, audit: AuditTrail | None) -> None:
    calling, address = _peer(event)
    ae = event.assoc.ae
    called = str(event.assoc.acceptor.ae_title).strip()
    allowed = [a.strip() for a in ae.require_calling_aet]
    if allowed and calling not in allowed:
        reason = "calling AE title not recognised (not in scp.allowed_callers)"
    elif ae.require_called_aet and called != str(ae.ae_title).strip():
        reason = f"called AE title {called!r} is not this node's ({str(ae.ae_title).strip()!r})"
    else:
        reason = f"no free association (scp.max_associations = {ae.maximum_associations}) or no acceptable context"
    ASSOCIATIONS.labels("rejected").inc()
    log.warning("association from %s (%s) refused: %s", calling, address, reason)
    if audit is not None:
        audit.record("association", "failure", calling, address, called=called, reason=reason)


# Every syntax pynetdicom knows except the deflated ones: a deflated data set is one zlib stream that
# pydicom inflates whole in memory before anything can be checked (about 1000:1, so a 10 MB upload
# becomes 10 GB in the receiving process). No radiography device needs them; a sender falls back to
# another proposed syntax, and one that proposes only these is refused at association.
# JPIP Referenced Deflate (.95) and JPIP HTJ2K Referenced Deflate (.205) carry a deflated data set too.
DEFLATED_TRANSFER_SYNTAXES = frozenset({DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.4.95",
                                        "1.2.840.10008.1.2.4.205"})
ACCEPTED_TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in DEFLATED_TRANSFER_SYNTAXES]


def make_ae(settings: Settings) -> AE:
    """The node's AE: titles, callers, limits, timeouts and every storage context with every syntax.

    Also switches pynetdicom's receive to chunked files in ``<data_dir>/incoming`` (process-wide; see
    ``node.incoming`` and ``node.intake``).
    """
    scp = settings.scp
    _config.STORE_RECV_CHUNKED_DATASET = True
    receive_into(settings.data_path / INCOMING_DIR)
    ae = AE(ae_title=scp.ae_title)
    apply_receiving(ae, settings)
    ae.maximum_pdu_size = scp.max_pdu
    ae.network_timeout = scp.network_timeout_s
    ae.dimse_timeout = scp.network_timeout_s
    ae.acse_timeout = scp.artim_timeout_s  # pynetdicom's ARTIM timer and its wait for the A-ASSOCIATE-RQ
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, cx.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def start_scp(
    settings: Settings, intake: Intake, ae: AE | None = None, listen_socket: socket.socket | None = None,
    live: LiveSettings | None = None, audit: AuditTrail | None = None, *, tls: bool = False,
) -> NoDelayAssociationServer:
    """Start the SCP in a background thread; stop it with ``server.shutdown()``.

    Args:
        settings: the node settings (``scp``: address, port, AE title, callers, limits).
        intake: the intake bound to C-STORE.
        ae: an AE from :func:`make_ae` (built here when None); the plain and the TLS listener share one.
        listen_socket: a listening socket bound already: the node's first SCP process's (with
            ``scp.processes`` > 1), or the one bound before dropping root (``node.privileges``);
            None: bind here.
        live: the live settings: allowed callers, the called-AE check and the association limit follow the
            console's changes (read as each connection opens); None: ``settings`` as they are.
        audit: the audit trail of associations accepted and refused; None: none kept.
        tls: the TLS listener (``scp.tls``: its port, certificate, key and client policy; node/tls.py)
            instead of the plain one.

    Returns:
        The running server; ``server.server_address`` holds the bound port (useful with port 0).

    Raises:
        node.tls.TlsFileError: with ``tls``, a certificate, key or CA file cannot be loaded.
    """
    ae = ae or make_ae(settings)
    if live is not None:
        apply_receiving(ae, live.current)
        live.on_change(lambda current: apply_receiving(ae, current))
    scp = settings.scp
    ssl_context = (server_context(scp.tls.cert_file, scp.tls.key_file, scp.tls.ca_file, scp.tls.require_client_cert)
                   if tls else None)
    stale = remove_stale_incoming(settings.data_path / INCOMING_DIR)
    if stale:
        log.warning("start-up: removed %d partly received file(s) older than %.0f s from %s",
                    stale, STALE_INCOMING_S, settings.data_path / INCOMING_DIR)
    address = (scp.bind_address, scp.tls.port if tls else scp.port)
    server_class = (shared_socket_server(listen_socket)
                    if scp.processes > 1 or listen_socket is not None else NoDelayAssociationServer)
    server = cast(NoDelayAssociationServer, ae.make_server(
        address, ssl_context=ssl_context, evt_handlers=evt_handlers(intake, live, audit), server_class=server_class))
    server.max_associations_per_address = scp.max_associations_per_address  # before it serves
    if audit is not None:  # refused before an association request: no calling AE title is known
        server.on_refused = lambda address, reason: _connection_refused(audit, address, reason)
    for other in ae._servers:  # the plain and the TLS listener count a peer's connections together
        if isinstance(other, NoDelayAssociationServer):
            server.peer_slots = other.peer_slots
            break
    thread = threading.Thread(target=server.serve_forever, name=f"scp-{scp.ae_title}{'-tls' if tls else ''}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it from this list
    log.info("SCP %s listening%s on %s:%d in process %d (callers: %s, max associations %d, max PDU %d)",
             scp.ae_title, _tls_description(settings) if tls else "", *server.server_address[:2], os.getpid(),
             ", ".join(scp.allowed_callers) or "any", ae.maximum_associations, ae.maximum_pdu_size)
    return server


def _tls_description(settings: Settings) -> str:
    """How the TLS listener treats client certificates, for its start-up line."""
    tls = settings.scp.tls
    if not tls.ca_file:
        return " with TLS (no client certificates asked)"
    return f" with TLS (client certificates {'required' if tls.require_client_cert else 'verified if presented'})"
