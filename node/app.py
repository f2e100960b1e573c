"""Composition root: build the node's parts once from the settings and run them.

Roles (``cxr-node serve --role``):
- ``all``: the SCP, one worker and the scheduler (sending, lease reaping, retention) in one process.
- ``scp``: receive only (store + queue); workers elsewhere share the database.
- ``worker``: process the shared queue and send results (worker + scheduler), no SCP.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from ai.ensemble import Ensemble
from ai.manifest import bundled_package_dir
from node.config import Settings
from node.filter import FilterRules
from node.receive import Intake, start_scp
from node.scheduler import NodeScheduler
from node.send import Outbox
from node.worker import Worker, owner_is_dead
from storage.db import make_engine
from storage.queue import Store

log = logging.getLogger(__name__)

ROLES = ("all", "scp", "worker")


def load_ensemble(settings: Settings) -> Ensemble:
    """Load the configured model package (the bundled default when ``model.package`` is empty)."""
    package = settings.resolve(settings.model.package) if settings.model.package else bundled_package_dir()
    return Ensemble.load(package, providers=settings.model.providers, threshold_overrides=settings.thresholds)


def calling_ae(settings: Settings, destination_calling_ae: str = "") -> str:
    """Our AE title towards a destination."""
    return destination_calling_ae or settings.scp.ae_title


@dataclass
class Node:
    """A running node: whichever parts its role needs, started and stopped together."""

    settings: Settings
    role: str = "all"
    ensemble: Ensemble | None = None
    store: Store = field(init=False)
    stop_event: threading.Event = field(default_factory=threading.Event)
    _server: Any = None
    _scheduler: NodeScheduler | None = None
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: expected one of {', '.join(ROLES)}, found {self.role!r}")
        self.settings.data_path.mkdir(parents=True, exist_ok=True)
        engine = make_engine(self.settings.database_url)
        self.store = Store(engine, max_attempts=self.settings.worker.max_attempts)
        if self.role in ("all", "worker") and self.ensemble is None:
            self.ensemble = load_ensemble(self.settings)  # refuses to start on a bad package

    def start(self) -> None:
        """Start the role's parts; returns once they are running."""
        s = self.settings
        log.info("cxr-node starting, role %s, configuration %s", self.role, s.summary())
        if self.role in ("all", "worker"):
            assert self.ensemble is not None  # loaded in __post_init__
            reaped = self.store.reap_expired_leases(owner_is_dead)
            if reaped:
                log.warning("start-up: %d job(s) of dead workers returned to the queue", reaped)
            outbox = Outbox(self.store, list(s.destinations), s.send, s.scp.ae_title)
            self._scheduler = NodeScheduler(self.store, s, outbox.run_due)
            worker = Worker(self.store, self.ensemble, s, on_done=self._scheduler.kick_send)
            self._scheduler.start()
            t = threading.Thread(target=worker.run_forever, args=(self.stop_event,), name="worker", daemon=True)
            t.start()
            self._threads.append(t)
            log.info("model %s %s on %s", self.ensemble.manifest.name, self.ensemble.manifest.version,
                     ", ".join(self.ensemble.providers))
        if self.role in ("all", "scp"):
            rules = FilterRules.load(s.resolve(s.filter.rules_file) if s.filter.rules_file else None)
            intake = Intake(s.data_path, self.store, s, rules)
            self._server = start_scp(s, intake)
            log.info("SCP %s listening on %s:%d", s.scp.ae_title, s.scp.bind_address, self.port)

    @property
    def port(self) -> int:
        """The port the SCP listens on (useful with port 0)."""
        return int(self._server.server_address[1]) if self._server is not None else self.settings.scp.port

    def stop(self) -> None:
        """Stop receiving first, then the worker, then the scheduler."""
        self.stop_event.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for t in self._threads:
            t.join(timeout=30)
        if self._scheduler is not None:
            self._scheduler.shutdown()
        log.info("cxr-node stopped")

    def serve_forever(self) -> None:
        """Start, then block until SIGINT/SIGTERM, then stop cleanly."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_event.set())
        self.start()
        try:
            self.stop_event.wait()
        finally:
            self.stop()
