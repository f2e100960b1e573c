"""Queue step: the job queue with leases and the per-destination outbox, on SQLite or PostgreSQL.

Every public method is one transaction and returns plain frozen dataclasses (no ORM objects leave
this module). Database trouble that may pass (SQLite busy past ``busy_timeout``, a PostgreSQL
connection lost, a deadlock) is raised as ``RetryableError``.

``Store`` is made of one part per concern, each in its own module:

- ``storage.instances``: received instances (``record_instance``, re-receives, changed re-sends kept
  apart: ``record_conflict``, ``conflicts``);
- ``storage.jobs``: the job queue (``lease_job``, ``renew_lease``, ``complete_job``, ``fail_job``,
  ``wait_for_disk``, ``reap_expired_leases``, ``record_incident``, ``incidents``) and what an attempt counts;
- ``storage.outbox``: delivery (``due_outbox``, ``mark_sent``, ``mark_send_failed``, ``mark_rejected``,
  ``release_claims``);
- ``storage.status``: ``status``, ``recent_reports``, heartbeats and ``liveness``;
- ``storage.retention``: ``purge_before``;
- ``storage.scores``: the per-site score history (``score_sites``, ``site_scores``; written by ``complete_job``)
  and the site thresholds in force (``accept_site_threshold``, ``site_thresholds``);
- ``storage.console``: the console's configuration changes (``record_config_change``, ``config_overrides``),
  users and the audit trail (``audit``, ``audit_events``);

on ``storage.store_base.StoreBase`` (engine, clock, transactions), with the records of ``storage.records``.

Clocks: due times and leases use this process's clock (UTC); machines sharing a PostgreSQL queue
must keep their clocks synchronised (NTP) to within a small fraction of the lease time.
"""

from __future__ import annotations

from storage.console import ConsoleStore, DuplicateUser
from storage.instances import InstanceStore
from storage.jobs import DISK_WAIT_ERROR, JobStore
from storage.outbox import OutboxStore
from storage.records import (
    MAX_ERROR_CHARS,
    AcceptedThreshold,
    ConflictingInstance,
    Incident,
    LeasedJob,
    OutboxEntry,
    ReceivedInstance,
    ResultRecord,
    ScoreRecord,
    SiteScore,
)
from storage.retention import RetentionStore
from storage.scores import ScoreStore
from storage.status import StatusStore

__all__ = [
    "DISK_WAIT_ERROR",
    "MAX_ERROR_CHARS",
    "AcceptedThreshold",
    "ConflictingInstance",
    "DuplicateUser",
    "Incident",
    "LeasedJob",
    "OutboxEntry",
    "ReceivedInstance",
    "ResultRecord",
    "ScoreRecord",
    "SiteScore",
    "Store",
]


class Store(InstanceStore, JobStore, OutboxStore, StatusStore, RetentionStore, ScoreStore, ConsoleStore):
    """The queue and outbox on one engine (built once in the composition root and shared).

    Args:
        engine: from ``storage.db.make_engine``.
        max_attempts: starts of a job before a retryable failure becomes final.
        clock: returns the current aware UTC time (tests pass a fake clock).
    """
