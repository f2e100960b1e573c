"""The job queue of the store: leases, completion, failures, disk-full waits, the lease reaper, incidents.

Attempts: ``Job.attempts`` counts *starts*: ``lease_job`` adds one. A worker that crashes or hangs
(its lease expires) therefore also uses up an attempt, so a job that kills its worker cannot loop
forever; ``fail_job(retryable=True)`` re-queues until ``attempts`` reaches ``max_attempts``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.db import (
    INCIDENT_KINDS,
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    OUTBOX_PENDING,
    RESULT_KINDS,
    UNSENT_KINDS,
    Instance,
    Job,
    JobIncident,
    OutboxItem,
    Result,
    Score,
)
from storage.records import Incident, LeasedJob, ResultRecord, ScoreRecord, clip_error
from storage.store_base import StoreBase

log = logging.getLogger("storage.queue")  # the queue's log lines keep their logger name

#: ``last_error`` of a job whose results wait for disk space (see ``Store.wait_for_disk``).
DISK_WAIT_ERROR = "waiting for disk space"


def _waited_for_disk(job: Job) -> bool:
    return job.last_error is not None and job.last_error.startswith(DISK_WAIT_ERROR)


def count_waiting_for_disk() -> Any:
    """SELECT count of the queued jobs whose results wait for disk space."""
    return select(func.count()).select_from(Job).where(
        Job.state == JOB_QUEUED, Job.last_error.startswith(DISK_WAIT_ERROR, autoescape=True))


class JobStore(StoreBase):
    """The job methods of ``storage.queue.Store``."""

    def lease_job(self, owner: str, lease_s: float) -> LeasedJob | None:
        """Claim the oldest due queued job for ``owner`` until now + ``lease_s``; None if none is due.

        Atomic: PostgreSQL locks the row with ``FOR UPDATE SKIP LOCKED`` (concurrent workers skip
        it); SQLite runs the transaction under ``BEGIN IMMEDIATE`` (one writer at a time).
        """
        now = self.clock()
        expires = now + dt.timedelta(seconds=lease_s)
        with self._tx("lease_job") as s:
            row = s.execute(
                select(Job, Instance)
                .join(Instance, Job.instance_id == Instance.id)
                .where(Job.state == JOB_QUEUED, Job.next_attempt_at <= now)
                .order_by(Job.next_attempt_at, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True, of=Job)
            ).first()
            if row is None:
                return None
            job, inst = row
            job.state, job.lease_owner, job.lease_expires_at = JOB_RUNNING, owner, expires
            job.attempts += 1
            job.updated_at = now
            return LeasedJob(
                job_id=job.id, instance_id=inst.id, sop_instance_uid=inst.sop_instance_uid,
                study_instance_uid=inst.study_instance_uid, series_instance_uid=inst.series_instance_uid,
                sop_class_uid=inst.sop_class_uid, path=Path(inst.path), attempts=job.attempts,
                lease_owner=owner, lease_expires_at=expires, calling_ae=inst.calling_ae,
            )

    def renew_lease(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend a running job's lease; False if ``owner`` no longer holds it."""
        now = self.clock()
        with self._tx("renew_lease") as s:
            result: Any = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JOB_RUNNING, Job.lease_owner == owner)
                .values(lease_expires_at=now + dt.timedelta(seconds=lease_s), updated_at=now)
            )
            return bool(result.rowcount)

    def complete_job(self, job_id: int, results: Sequence[ResultRecord], destinations: Sequence[str],
                     scores: Sequence[ScoreRecord] = ()) -> None:
        """Mark a job done and record its results with one pending outbox row per destination, and its
        scores per label (the site's score history).

        One transaction. Idempotent: calling it again with the same result UIDs adds no rows (a
        result's path is updated; outbox rows are added only for destinations that had none; a score of
        the same model version and label replaces the earlier one).

        Raises:
            ValueError: unknown job, unknown result kind, or a result UID owned by another job.
        """
        now = self.clock()
        with self._tx("complete_job") as s:
            job = self._job(s, job_id, "complete_job")
            if job.state != JOB_RUNNING:
                log.warning("complete_job: job %d was %s, not running; marking it done", job_id, job.state)
            self._record_results(s, job_id, results, destinations, now)
            self._record_scores(s, job_id, scores, now)
            waited = _waited_for_disk(job)
            job.state, job.finished_at, job.updated_at = JOB_DONE, now, now
            job.lease_owner = job.lease_expires_at = job.last_error = None
            if waited:
                self._log_disk_episode_end(s)

    def _record_results(
        self, s: Session, job_id: int, results: Sequence[ResultRecord], destinations: Sequence[str],
        now: dt.datetime,
    ) -> None:
        """Upsert the results of a job with one pending outbox row per destination that has none (none for a kind
        that is never sent: the shadow package's SR)."""
        for record in results:
            result_id = self._upsert_result(s, job_id, record, now)
            if record.kind in UNSENT_KINDS:
                continue
            have = set(s.scalars(select(OutboxItem.destination).where(OutboxItem.result_id == result_id)))
            for name in destinations:
                if name not in have:
                    s.add(OutboxItem(result_id=result_id, destination=name, state=OUTBOX_PENDING,
                                     attempts=0, next_attempt_at=now, created_at=now, updated_at=now))

    @staticmethod
    def _record_scores(s: Session, job_id: int, scores: Sequence[ScoreRecord], now: dt.datetime) -> None:
        for record in scores:
            row = s.scalars(select(Score).where(Score.job_id == job_id, Score.label == record.label,
                                                Score.model_version == record.model_version)).first()
            if row is None:
                row = Score(job_id=job_id, model_version=record.model_version, label=record.label)
                s.add(row)
            row.site, row.model_name, row.score = record.site, record.model_name, float(record.score)
            row.threshold, row.threshold_method = float(record.threshold), record.threshold_method
            row.positive, row.at = bool(record.positive), now

    @staticmethod
    def _log_disk_episode_end(s: Session) -> None:
        """Say once that the last result waiting for disk space is written (the alert's counterpart)."""
        s.flush()
        if s.scalar(count_waiting_for_disk()) == 0:
            log.warning("disk space available again: every result that waited for it is written")

    @staticmethod
    def _upsert_result(s: Session, job_id: int, record: ResultRecord, now: dt.datetime) -> int:
        if record.kind not in RESULT_KINDS:
            raise ValueError(f"result kind: expected one of {RESULT_KINDS}, found {record.kind!r}")
        uid = record.sop_instance_uid
        res = s.scalars(select(Result).where(Result.sop_instance_uid == uid)).one_or_none()
        if res is None:
            res = Result(job_id=job_id, kind=record.kind, sop_instance_uid=record.sop_instance_uid,
                         path=str(record.path), created_at=now)
            s.add(res)
            s.flush()
        elif res.job_id != job_id:
            raise ValueError(f"result {uid}: expected to belong to job {job_id}, found job {res.job_id}")
        else:
            res.kind, res.path = record.kind, str(record.path)
        return res.id

    def fail_job(
        self,
        job_id: int,
        error: str,
        retryable: bool,
        retry_at: dt.datetime | None = None,
        *,
        results: Sequence[ResultRecord] = (),
        destinations: Sequence[str] = (),
    ) -> str:
        """Record a failed run of a job.

        Retryable and fewer than ``max_attempts`` starts: back to ``queued``, due at ``retry_at``
        (None: now). Otherwise ``failed`` for good, and ``results`` (the SR saying the image was not
        analysed) are recorded with a pending outbox row per destination in the same transaction, so
        the PACS learns of the failure. A job that is not running (its lease expired and it was reaped,
        or it is already done) is left unchanged and ``results`` are not recorded.

        Returns:
            The job's state afterwards.
        """
        now = self.clock()
        with self._tx("fail_job") as s:
            job = self._job(s, job_id, "fail_job")
            if job.state != JOB_RUNNING:
                log.warning("fail_job: job %d is %s, not running; left unchanged", job_id, job.state)
                return job.state
            waited = _waited_for_disk(job)
            job.lease_owner = job.lease_expires_at = None
            job.updated_at = now
            if retryable and job.attempts < self.max_attempts:
                job.state, job.next_attempt_at = JOB_QUEUED, retry_at or now
                job.last_error = clip_error(error)
            else:
                job.state, job.finished_at = JOB_FAILED, now
                suffix = f" (gave up after {job.attempts} attempts)" if retryable else ""
                job.last_error = clip_error(error + suffix)
                self._record_results(s, job_id, results, destinations, now)
            if waited:
                self._log_disk_episode_end(s)
            return job.state

    def wait_for_disk(self, job_id: int, error: str, retry_at: dt.datetime) -> int:
        """Put a running job whose results met a full disk back in the queue, without using an attempt.

        A full disk is not a failure of the job: it is due again at ``retry_at``, its ``attempts`` are
        what they were before this start, and ``last_error`` says it waits for disk space (counted by
        :meth:`results_waiting_for_disk` and shown in :meth:`status`). A job that is not running is
        left unchanged.

        Returns:
            How many jobs were already waiting for disk space, this one included if it was (0: a new
            disk-full episode begins).
        """
        now = self.clock()
        with self._tx("wait_for_disk") as s:
            job = self._job(s, job_id, "wait_for_disk")
            others = int(s.scalar(count_waiting_for_disk().where(Job.id != job_id)) or 0)
            before = others + int(_waited_for_disk(job))
            if job.state != JOB_RUNNING:
                log.warning("wait_for_disk: job %d is %s, not running; left unchanged", job_id, job.state)
                return before
            job.state, job.next_attempt_at, job.updated_at = JOB_QUEUED, retry_at, now
            job.attempts = max(job.attempts - 1, 0)
            job.lease_owner = job.lease_expires_at = None
            job.last_error = clip_error(f"{DISK_WAIT_ERROR}: {error}")
            return before

    def results_waiting_for_disk(self) -> int:
        """How many jobs wait for disk space to write their results (see :meth:`wait_for_disk`)."""
        with self._tx("results_waiting_for_disk", read_only=True) as s:
            return int(s.scalar(count_waiting_for_disk()) or 0)

    def reap_expired_leases(self, owner_is_dead: Callable[[str], bool] | None = None) -> int:
        """Return running jobs whose lease has expired to the queue.

        Even past ``max_attempts`` a job goes back to the queue rather than to ``failed``: the worker
        that leases it next ends it with a "not analysed" SR (``node.worker``), so no accepted image
        ends without a result.

        Args:
            owner_is_dead: optional judge of lease owners; a running job whose owner it declares dead
                (e.g. a process of this host that no longer exists) is reaped before its lease expires.

        Returns:
            The number of jobs reaped.
        """
        now = self.clock()
        with self._tx("reap_expired_leases") as s:
            running = s.scalars(select(Job).where(Job.state == JOB_RUNNING).with_for_update(skip_locked=True)).all()
            jobs = [
                job for job in running
                if (job.lease_expires_at is not None and job.lease_expires_at < now)
                or (owner_is_dead is not None and job.lease_owner is not None and owner_is_dead(job.lease_owner))
            ]
            for job in jobs:
                expired = job.lease_expires_at.isoformat() if job.lease_expires_at else "?"
                why = "expired at" if job.lease_expires_at and job.lease_expires_at < now else "owner is gone, due"
                error = f"lease of {job.lease_owner} {why} {expired} (attempt {job.attempts})"
                if job.attempts >= self.max_attempts:  # never failed here: that would end it without a result
                    error += f"; {job.attempts} attempts used up: the next worker ends it with a not-analysed SR"
                job.state, job.next_attempt_at = JOB_QUEUED, now
                job.last_error, job.updated_at = error, now
                job.lease_owner = job.lease_expires_at = None
                log.warning("job %d: %s", job.id, error)
            return len(jobs)

    def record_incident(self, job_id: int, owner: str, kind: str, detail: str, give_up_after: int) -> int:
        """Record that the analysis process ``owner`` died or was killed while running a job.

        The job returns to the queue, due now (it is quarantined when leased again: see
        ``node.leases.QUARANTINE_AFTER``), unless it has more than ``give_up_after`` incidents: then even
        its quarantine killed the process, and it is failed for good. The incident is recorded whatever
        the job's state; the job itself is changed only while ``owner`` still holds it, or after the
        lease reaper returned it to the queue.

        Args:
            job_id: the job the process was running.
            owner: the process's lease owner name.
            kind: one of ``storage.db.INCIDENT_KINDS``.
            detail: what was found (exit status, signal, memory, time); no dataset values.
            give_up_after: incidents after which the job is failed instead of queued again.

        Returns:
            The job's number of incidents, this one included.
        """
        if kind not in INCIDENT_KINDS:
            raise ValueError(f"incident kind: expected one of {INCIDENT_KINDS}, found {kind!r}")
        now = self.clock()
        with self._tx("record_incident") as s:
            job = self._job(s, job_id, "record_incident")
            s.add(JobIncident(job_id=job_id, kind=kind, at=now, detail=clip_error(detail)))
            s.flush()
            count = int(s.scalar(select(func.count()).select_from(JobIncident)
                                 .where(JobIncident.job_id == job_id)) or 0)
            if (job.state == JOB_RUNNING and job.lease_owner == owner) or job.state == JOB_QUEUED:
                error = f"analysis process {kind} ({detail}), incident {count}"
                if count > give_up_after:
                    job.state, job.finished_at = JOB_FAILED, now
                    error += f"; given up: the process also died quarantining it ({count} incidents)"
                else:
                    job.state, job.next_attempt_at = JOB_QUEUED, now
                job.last_error, job.updated_at = clip_error(error), now
                job.lease_owner = job.lease_expires_at = None
            return count

    def incidents(self, job_id: int) -> list[Incident]:
        """A job's incidents, oldest first."""
        with self._tx("incidents", read_only=True) as s:
            rows = s.scalars(select(JobIncident).where(JobIncident.job_id == job_id).order_by(JobIncident.id))
            return [Incident(kind=r.kind, at=r.at, detail=r.detail) for r in rows]

    @staticmethod
    def _job(s: Session, job_id: int, what: str) -> Job:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise ValueError(f"{what}: job {job_id} not found")
        return job
