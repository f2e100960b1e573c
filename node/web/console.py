"""What the console reads and changes in a running node, and the checks of ``/healthz``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ai.manifest import ModelManifest
from node.audit import AuditTrail
from node.live import LiveSettings
from storage.queue import Store

PROBE_OWNER = f"{socket.gethostname()}:console"


def sqlite_read_only(url: Any) -> str:
    """Why a SQLite database file or its folder cannot be written by this process (``os.access``: file modes, a
    read-only file system, the immutable attribute even for root), or "" (also for other databases). SQLite itself
    keeps writing through descriptors it opened before, so a write probe alone would notice only much later."""
    if url.get_backend_name() != "sqlite" or not url.database:
        return ""
    path = Path(url.database)
    for what in (path, path.parent):
        if what.exists() and not os.access(what, os.W_OK):
            return f"{what} is read-only for this process"
    return ""


@dataclass(frozen=True)
class HealthCheck:
    name: str
    ok: bool
    detail: str


@dataclass
class Console:
    """The console's view of a node.

    Args:
        live: the effective settings (node.toml + console changes).
        store: the store.
        audit: the audit trail.
        manifest: the model package in use (None: role scp, no model here).
        model_loaded: whether the worker process has loaded the model (None: this node runs no worker).
        scp_listening: whether the SCP accepts associations (None: this node runs no SCP).
        scheduler_running: whether the scheduler runs (None: this node runs none).
        kick_send: wakes the sender after a retry (None: the next round).
    """

    live: LiveSettings
    store: Store
    audit: AuditTrail
    manifest: ModelManifest | None = None
    model_loaded: Callable[[], bool | None] = lambda: None
    scp_listening: Callable[[], bool | None] = lambda: None
    scheduler_running: Callable[[], bool | None] = lambda: None
    kick_send: Callable[[], None] | None = None
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def model(self) -> tuple[str, str] | None:
        """(name, version) of the model package in use, or None."""
        return None if self.manifest is None else (self.manifest.name, self.manifest.version)

    def site_reports(self) -> list[dict[str, Any]]:
        """Per site: analysed images, drift against the package's reference, thresholds in force and suggestions
        (what ``cxr-node sites --format json`` prints)."""
        from ai.manifest import effective_thresholds
        from node.sites import site_reports

        if self.manifest is None:
            return []
        settings = self.live.current
        thresholds = effective_thresholds(self.manifest, settings.thresholds)
        return site_reports(self.store, self.manifest, thresholds, settings.sites.drift_alert,
                            min_images=None if settings.sites.adapt == "off" else settings.sites.min_images,
                            prevalence=settings.site_prevalence)

    def health(self) -> list[HealthCheck]:
        """The checks of ``/healthz``: database writable, disk above ``min_free_mb``, model loaded, SCP listening,
        scheduler running (the last three only where this node runs that part)."""
        settings = self.live.current
        checks: list[HealthCheck] = []
        try:
            read_only = sqlite_read_only(self.store.engine.url)
            if read_only:
                checks.append(HealthCheck("database", False, f"not writable: {read_only}"))
            else:
                self.store.probe_write(PROBE_OWNER)
                checks.append(HealthCheck("database", True, "writable"))
        except Exception as exc:
            checks.append(HealthCheck("database", False, f"not writable: {str(exc).splitlines()[0][:300]}"))
        try:
            free_mb = shutil.disk_usage(settings.data_path).free / 2**20
            floor = settings.storage.min_free_mb
            checks.append(HealthCheck("disk", free_mb >= floor,
                                      f"{free_mb:.0f} MB free at {settings.data_path}, expected at least {floor} MB"))
        except OSError as exc:
            checks.append(HealthCheck("disk", False, f"free space not read: {exc}"))
        for name, probe, up, down in (
            ("model", self.model_loaded, "loaded by the worker", "not loaded (the worker process is not running)"),
            ("scp", self.scp_listening, "listening", "not listening"),
            ("scheduler", self.scheduler_running, "running", "stopped"),
        ):
            state = probe()
            if state is not None:
                checks.append(HealthCheck(name, bool(state), up if state else down))
        return checks

    def overview(self) -> dict[str, Any]:
        """The overview page: activity per hour (24 h), queue and outbox, disk, model, SCP and destinations."""
        settings = self.live.current
        status = self.store.status(recent=0)
        usage = shutil.disk_usage(settings.data_path)
        states = self.store.destination_states()
        model = self.model()
        return {
            "activity": self.store.activity(dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)),
            "jobs": status["jobs"],
            "waiting_for_disk": status["waiting_for_disk"],
            "outbox": status["outbox"],
            "disk": {"free_mb": round(usage.free / 2**20), "total_mb": round(usage.total / 2**20),
                     "min_free_mb": settings.storage.min_free_mb},
            "model": {"name": model[0], "version": model[1]} if model else None,
            "scp": {"ae_title": settings.scp.ae_title, "port": settings.scp.port,
                    "listening": self.scp_listening()},
            "destinations": [{"name": d.name, "ae_title": d.ae_title, "host": d.host, "port": d.port,
                              "shadow": d.shadow, **states.get(d.name, {"up": None, "waiting": 0,
                                                                         "last_sent": None, "last_failure": None})}
                             for d in settings.destinations],
            "health": [dataclasses.asdict(c) for c in self.health()],
            "started_at": self.started_at.isoformat(),
        }

    def change(self, key: str, old: Any, new: Any, by: str, address: str) -> int:
        """Record a setting change (versioned) and audit it; the live settings of this process are refreshed at
        once, the other processes' at their next check. Returns the change's version."""
        version = self.store.record_config_change(key, old, new, by)
        self.audit.record("config_change", "success", by, address, key=key, old=json.dumps(old, default=str),
                          new=json.dumps(new, default=str), version=version)
        self.live.refresh()
        return version
