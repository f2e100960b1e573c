"""The received instances of the store: the first receive, re-receives and changed re-sends kept apart.

Re-receiving a SOP Instance UID (``record_instance``) never creates a second instance or job:
- the same content (the caller compares it with the stored file): the instance row takes the calling
  AE and receive time; a job that is ``running`` or ``done`` is left as it is (its results stand); a job
  that is ``queued``, ``failed`` or ``skipped`` is reset to the new filter decision (``queued`` or
  ``skipped``), with attempts 0, no error, due now. Re-sending an image is how a site retries a failed
  or skipped one.
- other content, while the node has not reported on the instance (job ``queued``, ``failed`` or
  ``skipped``, no results): the new file replaces the stored one (the caller's ``replace``, run while
  the rows are locked) and the job is reset as above: nothing about the old content has left the node.
- other content once the node has reported or is reporting on it (job ``running`` or ``done``, or any
  result recorded): nothing changes and ``ConflictingInstance`` is raised; the caller keeps the new
  file apart and records it with ``record_conflict`` (listed by ``conflicts``), so that the results
  already sent keep describing the instance that was analysed.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ai.errors import RetryableError
from storage.db import (
    JOB_DONE,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_SKIPPED,
    Instance,
    InstanceConflict,
    Job,
    Result,
    utcnow,
)
from storage.records import ConflictingInstance, ReceivedInstance
from storage.store_base import StoreBase

log = logging.getLogger("storage.queue")  # the queue's log lines keep their logger name


def _insert_unless_present(dialect: str) -> Any:
    """INSERT of an instance row that returns its id, or nothing when the SOP Instance UID has a row."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(Instance).on_conflict_do_nothing(
            index_elements=[Instance.sop_instance_uid]).returning(Instance.id)
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(Instance).on_conflict_do_nothing(
            index_elements=[Instance.sop_instance_uid]).returning(Instance.id)
    return insert(Instance)  # a duplicate raises IntegrityError


def _inserted_id(result: Any) -> int | None:
    """The new row's id from ``_insert_unless_present``'s result; None when nothing was inserted."""
    if result.returns_rows:
        row = result.first()
        return None if row is None else int(row[0])
    key = result.inserted_primary_key
    return None if key is None else int(key[0])


class InstanceStore(StoreBase):
    """``record_instance``, ``record_conflict`` and ``conflicts`` of ``storage.queue.Store``."""

    def __init__(
        self, engine: Engine, *, max_attempts: int = 5, clock: Callable[[], dt.datetime] = utcnow
    ) -> None:
        super().__init__(engine, max_attempts=max_attempts, clock=clock)
        # Built once so that SQLAlchemy compiles them once (the intake's first-receive path). SQLite and
        # PostgreSQL skip a UID that has a row (ON CONFLICT DO NOTHING, no error in the server's log).
        self._insert_instance = _insert_unless_present(engine.dialect.name)
        self._insert_job = insert(Job)

    def record_instance(
        self, meta: ReceivedInstance, accepted: bool, reason: str, replace: Callable[[], object] | None = None
    ) -> int:
        """Record a received instance and its job (``queued`` if accepted, else ``skipped``).

        Idempotent on SOPInstanceUID (see the ``storage.instances`` docstring for what a repeat changes).

        Args:
            meta: the instance; ``meta.path`` is where its file is (or will be, see ``replace``).
            accepted: the filter's decision; ``reason`` its reason.
            replace: given when the caller's new content differs from the file at ``meta.path``: puts the
                new file there. Called (idempotently: it may run again if the transaction is retried)
                while the instance and job rows are locked, before the commit, and only when the
                stored instance may be replaced. A known UID whose stored path differs from ``meta.path``
                also counts as other content (its study differs); that new file is already in place.

        Returns:
            The job id (the same id for every repeat of one SOP Instance UID).

        Raises:
            ConflictingInstance: other content for an instance the node has reported or is reporting on;
                nothing was changed and ``replace`` was not called.
        """
        job_id = None
        if replace is None:
            try:
                job_id = self._record_first(meta, accepted, reason)
            except IntegrityError:
                job_id = None  # the UID has a row (another dialect than SQLite/PostgreSQL)
        if job_id is not None:
            return job_id
        try:  # a repeat, or a concurrent first receive: the locked path
            with self._tx("record_instance") as s:
                return self._record(s, meta, accepted, reason, replace)
        except IntegrityError:
            # PostgreSQL: a concurrent first receive of the same UID won; take the repeat path.
            with self._tx("record_instance") as s:
                return self._record(s, meta, accepted, reason, replace)

    def _record_first(self, meta: ReceivedInstance, accepted: bool, reason: str) -> int | None:
        """The common case, a first receive: two plain INSERTs in one transaction (no ORM unit of work).

        The ORM path below costs ~3 ms of CPU (under the GIL) per C-STORE; this one a fraction of it.
        A UID that already has a row: None and nothing written (SQLite, PostgreSQL), or
        ``IntegrityError`` from the unique constraint (other databases).
        """
        now = self.clock()
        received_at = meta.received_at or now
        try:
            with self.engine.begin() as conn:
                inserted = conn.execute(self._insert_instance, {
                    "sop_instance_uid": meta.sop_instance_uid,
                    "study_instance_uid": meta.study_instance_uid,
                    "series_instance_uid": meta.series_instance_uid,
                    "sop_class_uid": meta.sop_class_uid,
                    "calling_ae": meta.calling_ae,
                    "path": str(meta.path),
                    "size": meta.size,
                    "received_at": received_at,
                    "accepted": accepted,
                    "reason": reason,
                })
                instance_id = _inserted_id(inserted)
                if instance_id is None:
                    return None  # the UID has a row; the empty transaction ends here
                job_key = conn.execute(self._insert_job, {
                    "instance_id": instance_id,
                    "state": JOB_QUEUED if accepted else JOB_SKIPPED,
                    "reason": "" if accepted else reason,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "last_error": None,
                    "created_at": now,
                    "updated_at": now,
                    "finished_at": None if accepted else now,
                }).inserted_primary_key
                assert job_key is not None
        except OperationalError as exc:
            raise RetryableError(f"database unavailable in record_instance: {exc.orig}") from exc
        return int(job_key[0])

    def _record(self, s: Session, meta: ReceivedInstance, accepted: bool, reason: str,
                replace: Callable[[], object] | None = None) -> int:
        now = self.clock()
        received_at = meta.received_at or now
        inst = s.scalars(
            select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid).with_for_update()
        ).one_or_none()
        if inst is None:
            if replace is not None:  # a file without a row (an earlier receive that failed): no one used it
                replace()
            inst = Instance(sop_instance_uid=meta.sop_instance_uid, accepted=accepted, reason=reason)
            self._set_file(inst, meta, received_at)
            s.add(inst)
            s.flush()
            job = Job(instance_id=inst.id, attempts=0, created_at=now)
            self._set_decision(job, accepted, reason, now)
            s.add(job)
            s.flush()
            return job.id
        job = s.scalars(select(Job).where(Job.instance_id == inst.id).with_for_update()).one()
        changed = replace is not None or inst.path != str(meta.path)
        if changed and self._reported(s, job):
            raise ConflictingInstance(meta.sop_instance_uid, job.id, job.state)
        if replace is not None:
            replace()
        self._set_file(inst, meta, received_at)
        if job.state in (JOB_RUNNING, JOB_DONE):
            log.info("re-received %s: job %d is %s, left as it is", meta.sop_instance_uid, job.id, job.state)
            return job.id
        inst.accepted, inst.reason = accepted, reason
        self._set_decision(job, accepted, reason, now)
        job.attempts, job.last_error = 0, None
        log.info("re-received %s%s: job %d reset to %s", meta.sop_instance_uid,
                 " with other content" if changed else "", job.id, job.state)
        return job.id

    @staticmethod
    def _reported(s: Session, job: Job) -> bool:
        """Has the node reported, or is it reporting, on this job's instance (running, done, results)?"""
        if job.state in (JOB_RUNNING, JOB_DONE):
            return True
        return s.scalars(select(Result.id).where(Result.job_id == job.id).limit(1)).first() is not None

    def record_conflict(self, meta: ReceivedInstance, digest: str, conflict: ConflictingInstance) -> int:
        """Record a conflicting re-send (``ConflictingInstance``) kept apart at ``meta.path``.

        The same content again (same SOP Instance UID and ``digest``) updates its row: ``times`` + 1, the
        latest sender and receive time, the path.

        Returns:
            The conflict's id.
        """
        now = meta.received_at or self.clock()
        key = (InstanceConflict.sop_instance_uid == meta.sop_instance_uid, InstanceConflict.digest == digest)
        for attempt in (1, 2):
            try:
                with self._tx("record_conflict") as s:
                    row = s.scalars(select(InstanceConflict).where(*key).with_for_update()).one_or_none()
                    if row is None:
                        row = InstanceConflict(
                            sop_instance_uid=meta.sop_instance_uid, study_instance_uid=meta.study_instance_uid,
                            series_instance_uid=meta.series_instance_uid, sop_class_uid=meta.sop_class_uid,
                            digest=digest, first_received_at=now, times=0)
                        s.add(row)
                    row.path, row.size, row.calling_ae = str(meta.path), meta.size, meta.calling_ae
                    row.job_id, row.job_state = conflict.job_id, conflict.job_state
                    row.last_received_at, row.times = now, row.times + 1
                    s.flush()
                    return row.id
            except IntegrityError:
                if attempt == 2:  # a concurrent first record of the same content won: count this one
                    raise
        raise AssertionError("unreachable")

    def conflicts(self, recent: int = 10) -> dict[str, Any]:
        """Conflicting re-sends kept apart, for the status command (UIDs only, no patient data).

        Returns:
            ``{"total": distinct conflicting contents, "received": how many times they were received,
            "recent": [...]}``: the ``recent`` latest, newest first, each ``{"id", "sop_instance_uid",
            "study_instance_uid", "job_id", "job_state", "times", "calling_ae", "path",
            "first_received_at", "last_received_at"}``.
        """
        with self._tx("conflicts", read_only=True) as s:
            total, received = s.execute(
                select(func.count(), func.coalesce(func.sum(InstanceConflict.times), 0))
            ).one()
            rows = s.scalars(
                select(InstanceConflict).order_by(InstanceConflict.last_received_at.desc(), InstanceConflict.id.desc())
                .limit(recent)
            ).all()
            latest = [
                {"id": r.id, "sop_instance_uid": r.sop_instance_uid, "study_instance_uid": r.study_instance_uid,
                 "job_id": r.job_id, "job_state": r.job_state, "times": r.times, "calling_ae": r.calling_ae,
                 "path": r.path, "first_received_at": r.first_received_at.isoformat(),
                 "last_received_at": r.last_received_at.isoformat()}
                for r in rows
            ]
        return {"total": int(total), "received": int(received), "recent": latest}

    @staticmethod
    def _set_file(inst: Instance, meta: ReceivedInstance, received_at: dt.datetime) -> None:
        inst.study_instance_uid = meta.study_instance_uid
        inst.series_instance_uid = meta.series_instance_uid
        inst.sop_class_uid = meta.sop_class_uid
        inst.calling_ae = meta.calling_ae
        inst.path = str(meta.path)
        inst.size = meta.size
        inst.received_at = received_at

    @staticmethod
    def _set_decision(job: Job, accepted: bool, reason: str, now: dt.datetime) -> None:
        job.state = JOB_QUEUED if accepted else JOB_SKIPPED
        job.reason = "" if accepted else reason
        job.next_attempt_at = now
        job.lease_owner = job.lease_expires_at = None
        job.finished_at = None if accepted else now
        job.updated_at = now
