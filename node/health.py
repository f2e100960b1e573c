"""Health step: does the node work? Its SCP answers DICOM, a worker is alive, and the queue moves.

``cxr-node health`` (the Dockerfile's HEALTHCHECK) runs these checks against a running node from
outside it, through the same doors a modality and an administrator use: a C-ECHO to the node's own
SCP, and the database that every worker writes its heartbeat to (``Store.beat``). A TCP connect
alone would stay green while the worker is dead and every image waits in the queue.

- ``scp`` (roles all and scp): the SCP answers a C-ECHO association request within ``timeout_s`` (on
  the plain port; with ``scp.tls.only`` on the TLS port, presenting the node's own certificate).
  An association the node rejects (a calling-AE whitelist that does not list the checker) still
  proves that the SCP reads and answers requests.
- ``worker`` (roles all and worker): a heartbeat of a worker on this host is at most ``max_beat_age_s``
  old (machines sharing one database each check their own worker).
- ``queue`` (roles all and worker): when jobs are due, one has finished within ``stall_s``, or the
  oldest due job waits less than ``stall_s``.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Settings
from node.tls import TlsFileError, self_check_context
from storage.queue import Store

log = logging.getLogger(__name__)

HEALTH_AE = "CXR-HEALTH"  # the calling AE title of the C-ECHO check
MAX_BEAT_AGE_S = 30.0  # the supervisor writes a live worker's heartbeat every node.supervisor.BEAT_S (5 s)
STALL_S = 300.0
ECHO_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    """One health check: its name, whether it passed and what was found."""

    name: str
    ok: bool
    detail: str


def _echo_host(bind_address: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind_address, bind_address)


def check_scp(settings: Settings, timeout_s: float = ECHO_TIMEOUT_S) -> Check:
    """C-ECHO the node's own SCP: its plain port, or with ``scp.tls.only`` its TLS port, over TLS with the
    node's own certificate (node/tls.py ``self_check_context``)."""
    scp = settings.scp
    ae = AE(ae_title=HEALTH_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    host = _echo_host(scp.bind_address)
    port, tls_args = scp.port, None
    if scp.tls.enabled and scp.tls.only:
        try:
            port, tls_args = scp.tls.port, (self_check_context(scp.tls.cert_file, scp.tls.key_file), host)
        except TlsFileError as exc:
            return Check("scp", False, f"cannot check the TLS listener: {exc}")
    assoc = ae.associate(host, port, ae_title=scp.ae_title, tls_args=tls_args)
    where = f"{scp.ae_title}@{host}:{port}{' (TLS)' if tls_args else ''}"
    if assoc.is_rejected:
        return Check("scp", True, f"{where} answered (association rejected: {HEALTH_AE} is not an allowed caller)")
    if not assoc.is_established:
        return Check("scp", False, f"{where}: expected a C-ECHO association, found no answer within {timeout_s:.0f} s")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if status is not None and "Status" in status else None
    if code != 0:
        return Check("scp", False, f"{where}: expected C-ECHO status 0x0000, found {code}")
    return Check("scp", True, f"{where} answered C-ECHO")


def _age_s(now: dt.datetime, iso: str | None) -> float | None:
    return None if iso is None else (now - dt.datetime.fromisoformat(iso)).total_seconds()


def check_worker(liveness: dict[str, Any], max_beat_age_s: float = MAX_BEAT_AGE_S, host: str | None = None) -> Check:
    """A worker of this host (``host``, default this machine's name) has a recent heartbeat.

    Several machines may share one PostgreSQL queue: another machine's live worker says nothing about
    this node's own, so only heartbeats whose owner (``host:pid``) names this host count.
    """
    host = socket.gethostname() if host is None else host
    now = dt.datetime.fromisoformat(liveness["now"])
    ages = [_age_s(now, b["beat_at"]) for b in liveness["heartbeats"]
            if b["role"] == "worker" and b["owner"].partition(":")[0] == host]
    fresh = [a for a in ages if a is not None and a <= max_beat_age_s]
    if fresh:
        return Check("worker", True, f"{len(fresh)} worker(s) alive (last beat {min(fresh):.0f} s ago)")
    last = f"the latest {min(a for a in ages if a is not None):.0f} s ago" if ages else "none ever"
    return Check("worker", False, f"expected a heartbeat of a worker on {host} within {max_beat_age_s:.0f} s, "
                                  f"found {last}")


def check_queue(liveness: dict[str, Any], stall_s: float = STALL_S) -> Check:
    """Due jobs are being worked off."""
    due = int(liveness["due_jobs"])
    if not due:
        return Check("queue", True, "no job waiting")
    now = dt.datetime.fromisoformat(liveness["now"])
    waited = _age_s(now, liveness["oldest_due_at"]) or 0.0
    since = _age_s(now, liveness["last_finished_at"])
    if waited < stall_s or (since is not None and since < stall_s):
        return Check("queue", True, f"{due} job(s) due, oldest waiting {waited:.0f} s")
    finished = "never" if since is None else f"{since:.0f} s ago"
    return Check("queue", False, f"{due} job(s) due, the oldest for {waited:.0f} s; expected a job to finish "
                                 f"within {stall_s:.0f} s, found the last one finished {finished}")


def check_node(settings: Settings, store: Store | None, role: str = "all", max_beat_age_s: float = MAX_BEAT_AGE_S,
               stall_s: float = STALL_S, timeout_s: float = ECHO_TIMEOUT_S) -> list[Check]:
    """Every check that applies to ``role`` (all, scp or worker)."""
    checks = []
    if role in ("all", "scp"):
        checks.append(check_scp(settings, timeout_s))
    if role in ("all", "worker"):
        if store is None:
            raise ValueError(f"role {role!r}: expected the node's database to check its worker, found none")
        liveness = store.liveness()
        checks += [check_worker(liveness, max_beat_age_s), check_queue(liveness, stall_s)]
    return checks
