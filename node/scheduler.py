"""Scheduler step: the node's periodic jobs on APScheduler.

- ``send``: deliver due outbox entries; failed sends come due again after their exponential backoff
  (``send.retry_initial_s`` doubling up to ``send.retry_max_s``, stored per entry in the outbox). The
  worker wakes this job as soon as a result is recorded, so delivery does not wait for the interval.
- ``reap``: return jobs whose worker died (expired lease) to the queue.
- ``retention``: purge received instances and results older than ``storage.retention_days``.
- ``drift``: every hour, each site's scores against the package's reference (``node.sites``): a WARNING
  "ALERT" line when a site and label start to drift, an INFO line when they stop.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from ai.manifest import ModelManifest
from node.config import Settings
from node.leases import owner_is_dead
from storage.queue import Store

log = logging.getLogger(__name__)

SEND_INTERVAL_S = 2.0
REAP_INTERVAL_S = 30.0
RETENTION_INTERVAL_H = 6.0
DRIFT_INTERVAL_MIN = 60.0


class NodeScheduler:
    """Owns the APScheduler instance and the node's periodic jobs.

    Args:
        store: the queue and outbox.
        settings: node settings (retention).
        send_due: sends every due outbox entry and returns how many it tried (``Outbox.run_due``).
        manifest: the live package's manifest (None: no drift job).
    """

    def __init__(self, store: Store, settings: Settings, send_due: Callable[[], int] | None,
                 manifest: ModelManifest | None = None) -> None:
        self.store = store
        self.settings = settings
        self.manifest = manifest
        self.drifting: set[str] = set()
        self.scheduler = BackgroundScheduler(
            timezone=dt.UTC, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        if send_due is not None:
            self.scheduler.add_job(send_due, "interval", seconds=SEND_INTERVAL_S, id="send",
                                   next_run_time=dt.datetime.now(dt.UTC))
        self.scheduler.add_job(self.reap, "interval", seconds=REAP_INTERVAL_S, id="reap")
        if settings.storage.retention_days > 0:
            self.scheduler.add_job(self.purge, "interval", hours=RETENTION_INTERVAL_H, id="retention",
                                   next_run_time=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
        if manifest is not None:
            self.scheduler.add_job(self.check_drift, "interval", minutes=DRIFT_INTERVAL_MIN, id="drift",
                                   next_run_time=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def kick_send(self) -> None:
        """Run the send job now (called when a result has been recorded)."""
        job = self.scheduler.get_job("send")
        if job is not None and self.scheduler.running:
            job.modify(next_run_time=dt.datetime.now(dt.UTC))

    def reap(self) -> int:
        """Return jobs with expired leases or dead local workers to the queue; release dead senders' claims."""
        n = self.store.reap_expired_leases(owner_is_dead)
        if n:
            log.warning("returned %d job(s) with expired leases to the queue", n)
        self.store.release_claims(owner_is_dead)
        return n

    def check_drift(self) -> list[str]:
        """Log each site and label whose scores start to drift (WARNING, once) or stop (INFO); returns the
        alert lines in force."""
        from node.sites import current_drift_alerts

        assert self.manifest is not None
        alerts = current_drift_alerts(self.store, self.manifest, self.settings.thresholds,
                                      self.settings.sites.drift_alert)
        now = {line.split(" scores drift")[0]: line for line in alerts}
        for key in sorted(set(now) - self.drifting):
            log.warning("ALERT: %s", now[key])
        for key in sorted(self.drifting - set(now)):
            log.info("drift alert over: %s scores are back near the package's reference", key)
        self.drifting = set(now)
        return alerts

    def purge(self, batch: int = 1000) -> int:
        """Delete instances and results older than the retention period, ``batch`` rows per transaction
        until none is left; returns the number of files removed."""
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=self.settings.storage.retention_days)
        removed = 0
        while paths := self.store.purge_before(cutoff, limit=batch):
            for path in paths:
                try:
                    Path(path).unlink(missing_ok=True)
                    removed += 1
                except OSError as exc:
                    log.error("retention: could not remove %s: %s", path, exc)
        if removed:
            log.info("retention: removed %d file(s) older than %s", removed, cutoff.date())
        return removed
