"""Retention of the store: finished work received before a cutoff is deleted (``purge_before``)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from sqlalchemy import delete, select

from storage.db import (
    JOB_DONE,
    JOB_FAILED,
    JOB_SKIPPED,
    OUTBOX_FAILED,
    OUTBOX_PENDING,
    Instance,
    InstanceConflict,
    Job,
    OutboxItem,
    Result,
)
from storage.store_base import StoreBase

log = logging.getLogger("storage.queue")  # the queue's log lines keep their logger name


class RetentionStore(StoreBase):
    """``purge_before`` of ``storage.queue.Store``."""

    def purge_before(self, cutoff: dt.datetime, limit: int = 1000) -> list[Path]:
        """Delete instances received before ``cutoff`` with their job, results and outbox rows.

        Only finished work is purged: an instance whose job is queued or running, or one of whose
        results still waits for delivery (pending or failed), is kept, so retention never drops an
        undelivered result. Changed re-sends kept apart (``instance_conflicts``) go once their last
        receive is older than ``cutoff``. The caller deletes the returned files after this returns (the rows are
        gone first, so a crash in between leaves orphan files, never rows without files).

        Returns:
            The files to delete: the instances' and their results' paths.
        """
        with self._tx("purge_before") as s:
            undelivered = (
                select(Result.job_id)
                .join(OutboxItem, OutboxItem.result_id == Result.id)
                .where(OutboxItem.state.in_((OUTBOX_PENDING, OUTBOX_FAILED)))
            )
            kept_apart = s.execute(
                select(InstanceConflict.id, InstanceConflict.path)
                .where(InstanceConflict.last_received_at < cutoff).limit(limit)
            ).all()
            s.execute(delete(InstanceConflict).where(InstanceConflict.id.in_([r[0] for r in kept_apart])))
            rows = s.execute(
                select(Instance.id, Instance.path, Job.id)
                .join(Job, Job.instance_id == Instance.id)
                .where(
                    Instance.received_at < cutoff,
                    Job.state.in_((JOB_DONE, JOB_FAILED, JOB_SKIPPED)),
                    Job.id.not_in(undelivered),
                )
                .limit(limit)
            ).all()
            if not rows:
                return [Path(r[1]) for r in kept_apart]
            instance_ids = [r[0] for r in rows]
            job_ids = [r[2] for r in rows]
            result_rows = (
                s.execute(select(Result.id, Result.path).where(Result.job_id.in_(job_ids))).all()
            )
            result_ids = [r[0] for r in result_rows]
            s.execute(delete(OutboxItem).where(OutboxItem.result_id.in_(result_ids)))
            s.execute(delete(Result).where(Result.id.in_(result_ids)))
            s.execute(delete(Job).where(Job.id.in_(job_ids)))
            s.execute(delete(Instance).where(Instance.id.in_(instance_ids)))
        log.info("purged %d instances and %d results received before %s", len(rows), len(result_rows),
                 cutoff.isoformat())
        return [Path(r[1]) for r in rows] + [Path(r[1]) for r in result_rows] + [Path(r[1]) for r in kept_apart]
