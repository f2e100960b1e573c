"""Composition root: build the node's parts once from the settings and run them.

Roles (``cxr-node serve --role``):
- ``all``: the SCP and the scheduler (sending, lease reaping, retention) in the node's process, the
  worker in a supervised process of its own.
- ``scp``: receive only (store + queue); workers elsewhere share the database.
- ``worker``: process the shared queue (the worker process) and send results (scheduler), no SCP.

The worker always runs in its own process (``node.supervisor``): a decoder that crashes, allocates
gigabytes or holds the GIL for seconds cannot stop the SCP or the sender; the supervisor restarts it,
kills it on a stalled job or runaway memory, and the worker quarantines a job that killed it twice.
The node's process checks the model package (manifest, every member's sha256, threshold overrides)
before it starts anything, and does not start when the worker process cannot load it.

``scp.processes`` = N > 1 (roles ``all`` and ``scp``): the node's own process binds and listens on the
SCP port, then starts N-1 SCP-only child processes (multiprocessing, ``spawn``) that are handed that
listening socket and accept on it too; an idle process takes a new association before a busy one
(``node.scp_server.SharedSocketAssociationServer``). Each child builds its own engine,
``Store`` and ``Intake`` from the pickled settings (an engine is never shared across processes); SQLite
(WAL, ``BEGIN IMMEDIATE``, ``busy_timeout``) and PostgreSQL both take several writer processes.
``scp.max_associations`` applies per process. With ``[scp.tls] enabled`` the TLS listening socket is
handed to the children as well, and each child loads the certificate and key itself. The parent stops
its children on SIGTERM/SIGINT (SIGTERM, then SIGKILL after ``CHILD_STOP_S``); a child stops by itself
when its parent is gone. A child that
dies while the node runs is logged and **stops the whole node with a non-zero exit status** (no
restart here: the service manager, e.g. systemd ``Restart=on-failure``, restarts the node as a whole,
so a crash loop is visible instead of hidden).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait as wait_sentinels
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any, cast

from ai.manifest import ModelManifest
from node.audit import AuditTrail
from node.config import Settings
from node.filter import FilterRules
from node.intake import Intake
from node.leases import owner_is_dead
from node.live import LiveSettings, overlay
from node.packages import check_model_package
from node.receive import make_ae, start_scp
from node.scheduler import NodeScheduler
from node.send import Outbox
from node.supervisor import WorkerProcessError, WorkerSupervisor
from node.web.server import WebError
from storage.db import make_engine
from storage.queue import Store

log = logging.getLogger(__name__)

ROLES = ("all", "scp", "worker")
CHILD_START_S = 120.0  # an SCP child that is not listening after this fails the start
CHILD_STOP_S = 30.0  # SIGTERM, then SIGKILL after this


class ScpProcessError(RuntimeError):
    """A child process of the node (an additional SCP process, or the worker process at start-up) failed to
    start or died while the node was running: ``cxr-node serve`` exits non-zero."""


@dataclass
class Node:
    """A running node: whichever parts its role needs, started and stopped together."""

    settings: Settings
    role: str = "all"
    manifest: ModelManifest | None = None  # the checked model package (roles all and worker)
    store: Store = field(init=False)
    stop_event: threading.Event = field(default_factory=threading.Event)
    _server: Any = None
    _tls_server: Any = None
    _scheduler: NodeScheduler | None = None
    _supervisor: WorkerSupervisor | None = None
    scp_child: bool = False  # one of the N-1 additional SCP processes (started by the parent node)
    listen_socket: socket.socket | None = None  # a child's: the parent's listening socket
    tls_listen_socket: socket.socket | None = None  # a child's: the parent's TLS listening socket ([scp.tls])
    failed: str = ""  # why the node stopped on its own (a dead SCP child); serve exits non-zero
    _children: list[BaseProcess] = field(default_factory=list)
    _web: Any = None
    live: LiveSettings = field(init=False)
    audit: AuditTrail = field(init=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: expected one of {', '.join(ROLES)}, found {self.role!r}")
        self.settings.data_path.mkdir(parents=True, exist_ok=True)
        engine = make_engine(self.settings.database_url)
        self.store = Store(engine, max_attempts=self.settings.worker.max_attempts)
        # the console's changes (node.live): those that need a restart take effect now, at the start
        toml = self.settings
        self.settings = overlay(toml, self.store.config_overrides(), include_restart=True)
        self.live = LiveSettings(self.settings, self.store, toml=toml)
        self.live.refresh()
        self.audit = AuditTrail(self.store, self.settings.audit.syslog)
        if self.role in ("all", "worker") and self.manifest is None:
            self.manifest = check_model_package(self.settings)  # refuses to start on a bad package

    def start(self) -> None:
        """Start the role's parts; returns once they are running."""
        s = self.settings
        log.info("cxr-node starting, role %s, configuration %s", self.role, s.summary())
        if not self.scp_child:
            self.audit.record("node_started", "success", "node", role=self.role, pid=os.getpid(),
                              config_version=self.store.config_version())
        if self.role in ("all", "worker"):
            reaped = self.store.reap_expired_leases(owner_is_dead)
            if reaped:
                log.warning("start-up: %d job(s) of dead workers returned to the queue", reaped)
            released = self.store.release_claims(owner_is_dead)
            if released:
                log.warning("start-up: %d result(s) claimed by a dead sender are due again", released)
            outbox = Outbox(self.store, list(s.destinations), s.send, s.scp.ae_title, live=self.live,
                            audit=self.audit)
            self._scheduler = NodeScheduler(self.store, s, outbox.run_due, self.manifest)
            self._supervisor = WorkerSupervisor(s, self.store, self._scheduler.kick_send,
                                                logging.getLogger().getEffectiveLevel())
            self._supervisor.start()  # returns once the worker process has loaded the model
            self._scheduler.start()
        if self.role in ("all", "scp"):
            rules = FilterRules.for_settings(s)
            intake = Intake(s.data_path, self.store, s, rules)
            ae = make_ae(s)
            if not s.scp.tls.only:
                self._server = start_scp(s, intake, ae, listen_socket=self.listen_socket, live=self.live,
                                         audit=self.audit)
            if s.scp.tls.enabled:
                self._tls_server = start_scp(s, intake, ae, listen_socket=self.tls_listen_socket, live=self.live,
                                             audit=self.audit, tls=True)
            log.info("SCP %s listening on %s %s", s.scp.ae_title, s.scp.bind_address, self._ports())
            if s.scp.processes > 1 and not self.scp_child:
                self._start_children()
        if s.web.enabled and not self.scp_child:
            self._start_web()

    def _start_web(self) -> None:
        """The console (``[web]``): a first admin user when there is none (``node.users.first_admin``)."""
        from node.users import first_admin
        from node.web.api import build_app
        from node.web.console import Console
        from node.web.server import WebServer

        first_admin(self.store, self.settings.data_path, self.audit)
        supervisor, scheduler = self._supervisor, self._scheduler
        console = Console(
            self.live, self.store, self.audit, manifest=self.manifest,
            model_loaded=(lambda: supervisor.pid is not None) if supervisor is not None else (lambda: None),
            scp_listening=(lambda: self._server is not None or self._tls_server is not None)
            if self.role in ("all", "scp") else (lambda: None),
            scheduler_running=(lambda: scheduler.scheduler.running) if scheduler is not None else (lambda: None),
            kick_send=scheduler.kick_send if scheduler is not None else None)
        self._web = WebServer(build_app(console), self.settings)
        self._web.start()

    @property
    def web_url(self) -> str | None:
        """The console's address (useful with ``[web] port = 0``), or None when it does not run."""
        return self._web.url if self._web is not None else None

    def _start_children(self) -> None:
        """Start ``scp.processes`` - 1 SCP-only processes on the bound port; return once all listen."""
        s = self.settings
        # port 0: the one bound here
        settings = replace(s, scp=replace(s.scp, port=self.port, tls=replace(s.scp.tls, port=self.tls_port)))
        sockets = (self._server.socket if self._server is not None else None,
                   self._tls_server.socket if self._tls_server is not None else None)
        ctx = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        for _ in range(s.scp.processes - 1):
            ready = ctx.Event()
            child = ctx.Process(target=run_scp_child, args=(settings, level, ready, *sockets),
                                name="cxr-node-scp", daemon=True)
            child.start()
            self._children.append(child)
            wait_child_ready(child, ready, CHILD_START_S)
        pids = [os.getpid(), *(c.pid for c in self._children)]
        log.info("%d SCP processes listening on %s: pids %s", len(pids), self._ports(), ", ".join(map(str, pids)))
        t = threading.Thread(target=self._watch_children, name="scp-children", daemon=True)
        t.start()

    def _watch_children(self) -> None:
        """Stop the node (``failed``) when an SCP child exits while the node runs."""
        by_sentinel = {c.sentinel: c for c in self._children}
        while not self.stop_event.is_set():
            ended = wait_sentinels(list(by_sentinel), timeout=0.5)
            if ended and not self.stop_event.is_set():
                child = by_sentinel[cast(int, ended[0])]
                child.join(timeout=1)
                self.failed = f"SCP process {child.pid} exited with status {child.exitcode}"
                log.error("%s: stopping the node", self.failed)
                self.stop_event.set()

    @property
    def port(self) -> int:
        """The port the SCP listens on (useful with port 0)."""
        return int(self._server.server_address[1]) if self._server is not None else self.settings.scp.port

    @property
    def tls_port(self) -> int:
        """The port the SCP listens on with TLS (``[scp.tls]``; useful with port 0)."""
        server = self._tls_server
        return int(server.server_address[1]) if server is not None else self.settings.scp.tls.port

    def _ports(self) -> str:
        """The listening ports in words: "port 11112", "port 11112 and TLS port 2762", "TLS port 2762"."""
        ports = [f"port {self.port}"] if self._server is not None else []
        if self._tls_server is not None:
            ports.append(f"TLS port {self.tls_port}")
        return " and ".join(ports)

    def stop(self) -> None:
        """Stop receiving first, then the worker, then the scheduler."""
        self.stop_event.set()
        if self._web is not None:
            self._web.stop()
            self._web = None
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
        stop_children(self._children, CHILD_STOP_S)
        if self._supervisor is not None:
            self._supervisor.stop()
            self._supervisor = None
        if self._scheduler is not None:
            self._scheduler.shutdown()
        log.info("cxr-node stopped")

    def serve_forever(self) -> None:
        """Start, then block until SIGINT/SIGTERM (or a dead SCP child), then stop cleanly.

        Raises:
            ScpProcessError: an SCP child failed to start or died (``failed``): the caller exits non-zero.
        """
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_event.set())
        try:
            self.start()
            self.stop_event.wait()
        except (WorkerProcessError, WebError) as exc:
            self.failed = str(exc)
        finally:
            self.stop()
        if self.failed:
            raise ScpProcessError(self.failed)


def wait_child_ready(child: BaseProcess, ready: ProcessEvent, timeout_s: float) -> None:
    """Wait until an SCP child listens (``ready``).

    Raises:
        ScpProcessError: the child exited first or did not listen within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if not child.is_alive():
            raise ScpProcessError(f"SCP process {child.pid} exited with status {child.exitcode} while starting")
        if time.monotonic() > deadline:
            raise ScpProcessError(f"SCP process {child.pid}: expected to listen within {timeout_s:.0f} s, "
                                  "found it still starting")


def stop_children(children: list[BaseProcess], timeout_s: float) -> None:
    """SIGTERM every child, wait up to ``timeout_s`` for all, SIGKILL those still running."""
    for child in children:
        if child.is_alive():
            child.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            log.error("SCP process %d did not stop within %.0f s: killed", child.pid, timeout_s)
            child.kill()
            child.join(timeout=5)
    children.clear()


def stop_with_parent(parent: BaseProcess, stop_event: threading.Event) -> None:
    """Set ``stop_event`` once the parent process is gone, however it ended (even SIGKILL)."""
    wait_sentinels([parent.sentinel])
    stop_event.set()


def run_scp_child(
    settings: Settings, log_level: int, ready: ProcessEvent, listen_socket: socket.socket | None,
    tls_listen_socket: socket.socket | None = None,
) -> None:
    """Entry point of an additional SCP process (spawned): accept on the parent's ``listen_socket`` and
    ``tls_listen_socket`` (each None when the parent has no such listener) and receive until SIGTERM/SIGINT
    or the parent is gone. The child loads the TLS certificate and key itself (an SSL context cannot be
    handed to another process)."""
    from node.logs import setup_logging

    setup_logging(logging.getLevelName(log_level))
    node = Node(settings, role="scp", scp_child=True, listen_socket=listen_socket,
                tls_listen_socket=tls_listen_socket)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.stop_event.set())
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=stop_with_parent, args=(parent, node.stop_event), name="parent-watch",
                         daemon=True).start()
    try:
        node.start()
        ready.set()
        node.stop_event.wait()
    finally:
        node.stop()
