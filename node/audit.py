"""The audit trail: every security-relevant event, append-only in the database and optionally sent to syslog.

Events (:data:`EVENTS`): the node started (its role, the configuration version), associations accepted or refused
(calling AE, address, reason), results sent or rejected (destination, SOP Instance UID), configuration changes (key,
old -> new), users added or removed, logins and failed logins, failed work retried or discarded. The detail holds
AE titles, addresses, UIDs, setting names and reasons, never patient values (names, IDs, dates of birth): the
callers pass only those.

Syslog (``[audit] syslog``, ``udp://host:514`` or ``tcp://host:601``): one RFC 5424 message per event with the
event as MSGID and its detail as structured data, for the hospital's SIEM. A syslog that cannot be reached is
logged; the event is in the database all the same (the database is the trail of record).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

EVENTS = ("node_started", "association", "result_sent", "result_rejected", "config_change", "login", "user_added",
          "user_removed", "work_retried", "work_discarded")
APP_NAME = "cxr-node"
FACILITY_AUTHPRIV = 10  # RFC 5424 facility 10: security/authorization messages
SEVERITY = {"success": 6, "failure": 4}  # informational, warning
SD_ID = "cxr@32473"  # RFC 5424 SD-ID with the documentation enterprise number (RFC 5612)


class AuditTrail:
    """Writes events to the store (``storage.console.ConsoleStore.audit``) and, when configured, to syslog.

    Args:
        store: the store.
        syslog: ``udp://host:port`` or ``tcp://host:port``; empty: the database only.
    """

    def __init__(self, store: Any, syslog: str = "") -> None:
        self.store = store
        self.syslog = SyslogSender(syslog) if syslog else None

    def record(self, event: str, outcome: str, actor: str, address: str = "", **detail: Any) -> None:
        """Append one event; a database that cannot be written is logged and does not fail the caller's work."""
        if event not in EVENTS:
            raise ValueError(f"audit event: expected one of {', '.join(EVENTS)}, found {event!r}")
        try:
            self.store.audit(event, outcome, actor, address, **detail)
        except Exception as exc:
            log.error("audit event %s (%s, %s) not written to the database: %s", event, outcome, actor, exc)
        if self.syslog is not None:
            self.syslog.send(event, outcome, actor, address, detail)


def rfc5424(event: str, outcome: str, actor: str, address: str, detail: dict[str, Any],
            at: dt.datetime | None = None, hostname: str | None = None) -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOST cxr-node PID EVENT [cxr@32473 ...] text``."""
    at = at or dt.datetime.now(dt.UTC)
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY.get(outcome, 5)
    params = {"outcome": outcome, "actor": actor, "address": address,
              **{k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in detail.items()}}
    sd = "[" + SD_ID + "".join(f' {k}="{_sd_escape(str(v))}"' for k, v in params.items() if v != "") + "]"
    host = (hostname or socket.gethostname() or "-")[:255]
    msg = f"{event} {outcome} by {actor}" + (f" from {address}" if address else "")
    stamp = at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"<{pri}>1 {stamp} {host} {APP_NAME} {os.getpid()} {event} {sd} {msg}".encode()


def _sd_escape(text: str) -> str:
    """RFC 5424 PARAM-VALUE: escape ``"``, ``\\`` and ``]``."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


class SyslogSender:
    """Sends RFC 5424 messages over UDP (one datagram each) or TCP (octet counting, RFC 6587)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp") or not parts.hostname:
            raise ValueError(f"audit.syslog: expected udp://host:port or tcp://host:port, found {url!r}")
        self.scheme = parts.scheme
        self.address = (parts.hostname, parts.port or (514 if parts.scheme == "udp" else 601))
        self._lock = threading.Lock()
        self._tcp: socket.socket | None = None

    def send(self, event: str, outcome: str, actor: str, address: str, detail: dict[str, Any]) -> None:
        message = rfc5424(event, outcome, actor, address, detail)
        try:
            with self._lock:
                if self.scheme == "udp":
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.sendto(message, self.address)
                else:
                    if self._tcp is None:
                        self._tcp = socket.create_connection(self.address, timeout=5)
                    self._tcp.sendall(f"{len(message)} ".encode() + message)
        except OSError as exc:
            if self._tcp is not None:
                self._tcp.close()
                self._tcp = None
            log.warning("audit event %s not sent to syslog %s:%d: %s", event, *self.address, exc)
