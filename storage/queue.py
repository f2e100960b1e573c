"""Queue step: the job queue with leases and the per-destination outbox, on SQLite or PostgreSQL.

Every public method is one transaction and returns plain frozen dataclasses (no ORM objects leave
this module). Database trouble that may pass (SQLite busy past ``busy_timeout``, a PostgreSQL
connection lost, a deadlock) is raised as ``RetryableError``.

Attempts: ``Job.attempts`` counts *starts*: ``lease_job`` adds one. A worker that crashes or hangs
(its lease expires) therefore also uses up an attempt, so a job that kills its worker cannot loop
forever; ``fail_job(retryable=True)`` re-queues until ``attempts`` reaches ``max_attempts``.

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

Clocks: due times and leases use this process's clock (UTC); machines sharing a PostgreSQL queue
must keep their clocks synchronised (NTP) to within a small fraction of the lease time.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ai.errors import RetryableError
from storage.db import (
    INCIDENT_KINDS,
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_SKIPPED,
    JOB_STATES,
    OUTBOX_FAILED,
    OUTBOX_PENDING,
    OUTBOX_REJECTED,
    OUTBOX_SENT,
    OUTBOX_STATES,
    RESULT_KINDS,
    Heartbeat,
    Instance,
    InstanceConflict,
    Job,
    JobIncident,
    OutboxItem,
    Result,
    utcnow,
)

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receive step knows about a durably written instance."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    calling_ae: str
    path: Path
    size: int
    received_at: dt.datetime | None = None  # None: now


class ConflictingInstance(Exception):  # noqa: N818 - a state the caller handles, not a fault
    """A re-sent SOP Instance UID with other content whose instance the node has reported or is reporting on."""

    def __init__(self, sop_instance_uid: str, job_id: int, job_state: str) -> None:
        self.sop_instance_uid, self.job_id, self.job_state = sop_instance_uid, job_id, job_state
        super().__init__(f"{sop_instance_uid}: other content than the stored instance, whose job {job_id} "
                         f"is {job_state} or has results; the stored instance is kept")


@dataclass(frozen=True)
class LeasedJob:
    """A job leased to one worker until ``lease_expires_at``."""

    job_id: int
    instance_id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: Path
    attempts: int  # including this one
    lease_owner: str
    lease_expires_at: dt.datetime


@dataclass(frozen=True)
class Incident:
    """The analysis process died or was killed while it ran a job (``storage.db.JobIncident``)."""

    kind: str  # crash, stall or memory
    at: dt.datetime
    detail: str


@dataclass(frozen=True)
class ResultRecord:
    """One produced DICOM object, already written durably at ``path``."""

    kind: str  # 'sr', 'sc' or 'failure_sr'
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class OutboxEntry:
    """One result due for delivery to one destination."""

    id: int
    destination: str
    result_id: int
    kind: str
    sop_instance_uid: str
    path: Path
    state: str
    attempts: int  # deliveries tried so far
    next_attempt_at: dt.datetime
    last_error: str | None


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


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


def _iso(value: dt.datetime | str | None) -> str | None:
    """A timestamp from an aggregate query as ISO 8601 UTC (SQLite returns naive text, PostgreSQL aware)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC).isoformat()


#: ``last_error`` of a job whose results wait for disk space (see ``Store.wait_for_disk``).
DISK_WAIT_ERROR = "waiting for disk space"


def _waited_for_disk(job: Job) -> bool:
    return job.last_error is not None and job.last_error.startswith(DISK_WAIT_ERROR)


def _count_waiting_for_disk() -> Any:
    """SELECT count of the queued jobs whose results wait for disk space."""
    return select(func.count()).select_from(Job).where(
        Job.state == JOB_QUEUED, Job.last_error.startswith(DISK_WAIT_ERROR, autoescape=True))


def _inserted_id(result: Any) -> int | None:
    """The new row's id from ``_insert_unless_present``'s result; None when nothing was inserted."""
    if result.returns_rows:
        row = result.first()
        return None if row is None else int(row[0])
    key = result.inserted_primary_key
    return None if key is None else int(key[0])


class Store:
    """The queue and outbox on one engine (built once in the composition root and shared).

    Args:
        engine: from ``storage.db.make_engine``.
        max_attempts: starts of a job before a retryable failure becomes final.
        clock: returns the current aware UTC time (tests pass a fake clock).
    """

    def __init__(
        self, engine: Engine, *, max_attempts: int = 5, clock: Callable[[], dt.datetime] = utcnow
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, found {max_attempts}")
        self.engine = engine
        self.max_attempts = max_attempts
        self.clock = clock
        self._write = sessionmaker(engine, expire_on_commit=False)
        self._read = sessionmaker(engine.execution_options(sqlite_begin="DEFERRED"), expire_on_commit=False)
        # Built once so that SQLAlchemy compiles them once (the intake's first-receive path). SQLite and
        # PostgreSQL skip a UID that has a row (ON CONFLICT DO NOTHING, no error in the server's log).
        self._insert_instance = _insert_unless_present(engine.dialect.name)
        self._insert_job = insert(Job)

    @contextmanager
    def _tx(self, what: str, read_only: bool = False) -> Iterator[Session]:
        """One transaction; transient database errors become ``RetryableError``."""
        maker = self._read if read_only else self._write
        try:
            with maker.begin() as session:
                yield session
        except OperationalError as exc:
            raise RetryableError(f"database unavailable in {what}: {exc.orig}") from exc

    # ------------------------------------------------------------------ jobs

    def record_instance(
        self, meta: ReceivedInstance, accepted: bool, reason: str, replace: Callable[[], object] | None = None
    ) -> int:
        """Record a received instance and its job (``queued`` if accepted, else ``skipped``).

        Idempotent on SOPInstanceUID (see the module docstring for what a repeat changes).

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
                lease_owner=owner, lease_expires_at=expires,
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

    def complete_job(self, job_id: int, results: Sequence[ResultRecord], destinations: Sequence[str]) -> None:
        """Mark a job done and record its results with one pending outbox row per destination.

        One transaction. Idempotent: calling it again with the same result UIDs adds no rows (a
        result's path is updated; outbox rows are added only for destinations that had none).

        Raises:
            ValueError: unknown job, unknown result kind, or a result UID owned by another job.
        """
        now = self.clock()
        with self._tx("complete_job") as s:
            job = self._job(s, job_id, "complete_job")
            if job.state != JOB_RUNNING:
                log.warning("complete_job: job %d was %s, not running; marking it done", job_id, job.state)
            self._record_results(s, job_id, results, destinations, now)
            waited = _waited_for_disk(job)
            job.state, job.finished_at, job.updated_at = JOB_DONE, now, now
            job.lease_owner = job.lease_expires_at = job.last_error = None
            if waited:
                self._log_disk_episode_end(s)

    def _record_results(
        self, s: Session, job_id: int, results: Sequence[ResultRecord], destinations: Sequence[str],
        now: dt.datetime,
    ) -> None:
        """Upsert the results of a job with one pending outbox row per destination that has none."""
        for record in results:
            result_id = self._upsert_result(s, job_id, record, now)
            have = set(s.scalars(select(OutboxItem.destination).where(OutboxItem.result_id == result_id)))
            for name in destinations:
                if name not in have:
                    s.add(OutboxItem(result_id=result_id, destination=name, state=OUTBOX_PENDING,
                                     attempts=0, next_attempt_at=now, created_at=now, updated_at=now))

    @staticmethod
    def _log_disk_episode_end(s: Session) -> None:
        """Say once that the last result waiting for disk space is written (the alert's counterpart)."""
        s.flush()
        if s.scalar(_count_waiting_for_disk()) == 0:
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
                job.last_error = _clip(error)
            else:
                job.state, job.finished_at = JOB_FAILED, now
                suffix = f" (gave up after {job.attempts} attempts)" if retryable else ""
                job.last_error = _clip(error + suffix)
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
            others = int(s.scalar(_count_waiting_for_disk().where(Job.id != job_id)) or 0)
            before = others + int(_waited_for_disk(job))
            if job.state != JOB_RUNNING:
                log.warning("wait_for_disk: job %d is %s, not running; left unchanged", job_id, job.state)
                return before
            job.state, job.next_attempt_at, job.updated_at = JOB_QUEUED, retry_at, now
            job.attempts = max(job.attempts - 1, 0)
            job.lease_owner = job.lease_expires_at = None
            job.last_error = _clip(f"{DISK_WAIT_ERROR}: {error}")
            return before

    def results_waiting_for_disk(self) -> int:
        """How many jobs wait for disk space to write their results (see :meth:`wait_for_disk`)."""
        with self._tx("results_waiting_for_disk", read_only=True) as s:
            return int(s.scalar(_count_waiting_for_disk()) or 0)

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
            s.add(JobIncident(job_id=job_id, kind=kind, at=now, detail=_clip(detail)))
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
                job.last_error, job.updated_at = _clip(error), now
                job.lease_owner = job.lease_expires_at = None
            return count

    def incidents(self, job_id: int) -> list[Incident]:
        """A job's incidents, oldest first."""
        with self._tx("incidents", read_only=True) as s:
            rows = s.scalars(select(JobIncident).where(JobIncident.job_id == job_id).order_by(JobIncident.id))
            return [Incident(kind=r.kind, at=r.at, detail=r.detail) for r in rows]

    # ---------------------------------------------------------------- outbox

    def due_outbox(
        self, now: dt.datetime | None = None, limit: int = 100, claim_s: float = 0.0, owner: str | None = None
    ) -> list[OutboxEntry]:
        """Outbox entries (pending or failed-retryable) whose ``next_attempt_at`` has come.

        Args:
            now: the time to compare with (None: the store's clock).
            limit: at most this many, oldest due first.
            claim_s: when > 0, push the returned entries' ``next_attempt_at`` to now + ``claim_s`` in
                the same transaction, so that other processes sharing the queue do not send them
                too; ``mark_*`` then sets the real outcome. A crashed sender's entries fall due again.
        """
        now = now or self.clock()
        with self._tx("due_outbox", read_only=claim_s <= 0) as s:
            rows = s.execute(
                select(OutboxItem, Result)
                .join(Result, OutboxItem.result_id == Result.id)
                .where(OutboxItem.state.in_((OUTBOX_PENDING, OUTBOX_FAILED)))
                .where(OutboxItem.next_attempt_at <= now)
                .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=OutboxItem)
            ).all()
            entries = [
                OutboxEntry(
                    id=item.id, destination=item.destination, result_id=res.id, kind=res.kind,
                    sop_instance_uid=res.sop_instance_uid, path=Path(res.path), state=item.state,
                    attempts=item.attempts, next_attempt_at=item.next_attempt_at, last_error=item.last_error,
                )
                for item, res in rows
            ]
            if claim_s > 0:
                for item, _res in rows:
                    item.next_attempt_at = now + dt.timedelta(seconds=claim_s)
                    item.claimed_by = owner
            return entries

    @staticmethod
    def _job(s: Session, job_id: int, what: str) -> Job:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise ValueError(f"{what}: job {job_id} not found")
        return job

    def _outbox_item(self, s: Session, outbox_id: int, what: str) -> OutboxItem:
        item = s.get(OutboxItem, outbox_id, with_for_update=True)
        if item is None:
            raise ValueError(f"{what}: outbox entry {outbox_id} not found")
        return item

    def mark_sent(self, outbox_id: int) -> None:
        """Record a successful delivery."""
        now = self.clock()
        with self._tx("mark_sent") as s:
            item = self._outbox_item(s, outbox_id, "mark_sent")
            item.state, item.sent_at, item.updated_at, item.claimed_by = OUTBOX_SENT, now, now, None
            item.attempts += 1
            item.last_error = None

    def mark_send_failed(self, outbox_id: int, error: str, retry_at: dt.datetime) -> int:
        """Record a retryable delivery failure; the entry falls due again at ``retry_at``.

        An entry already sent (by a concurrent sender) stays sent.

        Returns:
            The number of attempts so far.
        """
        with self._tx("mark_send_failed") as s:
            item = self._outbox_item(s, outbox_id, "mark_send_failed")
            if item.state == OUTBOX_SENT:
                return item.attempts
            item.state, item.next_attempt_at, item.claimed_by = OUTBOX_FAILED, retry_at, None
            item.attempts += 1
            item.last_error, item.updated_at = _clip(error), self.clock()
            return item.attempts

    def mark_rejected(self, outbox_id: int, error: str) -> None:
        """Record a permanent refusal by the destination; the entry is never retried."""
        with self._tx("mark_rejected") as s:
            item = self._outbox_item(s, outbox_id, "mark_rejected")
            if item.state == OUTBOX_SENT:
                return
            item.state, item.claimed_by = OUTBOX_REJECTED, None
            item.attempts += 1
            item.last_error, item.updated_at = _clip(error), self.clock()

    def release_claims(self, owner_is_dead: Callable[[str], bool]) -> int:
        """Make outbox entries claimed by senders that no longer exist due now (not after the claim runs out).

        Args:
            owner_is_dead: judge of claim owners (e.g. a process of this host that no longer exists).

        Returns:
            The number of entries released.
        """
        now = self.clock()
        with self._tx("release_claims") as s:
            items = s.scalars(
                select(OutboxItem)
                .where(OutboxItem.claimed_by.is_not(None), OutboxItem.state.in_((OUTBOX_PENDING, OUTBOX_FAILED)))
                .with_for_update(skip_locked=True)
            ).all()
            released = [item for item in items if owner_is_dead(str(item.claimed_by))]
            for item in released:
                log.warning("outbox %d: claim of %s released (sender gone)", item.id, item.claimed_by)
                item.next_attempt_at, item.claimed_by, item.updated_at = now, None, now
            return len(released)

    def resend(self, outbox_id: int) -> None:
        """Make a failed or rejected entry due now (an operator's manual retry)."""
        now = self.clock()
        with self._tx("resend") as s:
            item = self._outbox_item(s, outbox_id, "resend")
            if item.state in (OUTBOX_FAILED, OUTBOX_REJECTED):
                item.state, item.next_attempt_at, item.updated_at = OUTBOX_PENDING, now, now

    # ---------------------------------------------------------------- status

    def status(self, recent: int = 10) -> dict[str, Any]:
        """Counts and the latest failures, for the status command (UIDs only, no patient data).

        Returns:
            ``{"jobs": {state: n}, "outbox": {destination: {state: n}}, "waiting_for_disk": n,
            "job_failures": [...], "send_failures": [...], "failures": [...]}``: ``waiting_for_disk``
            counts the queued jobs whose results wait for disk space (:meth:`wait_for_disk`); then the
            ``recent`` latest job failures (retrying or final), send failures (retrying or rejected)
            and both merged, newest first. Each is
            ``{"what": "job"|"send", "id", "sop_instance_uid", "state", "attempts", "error", "at"}``,
            send failures with their ``"destination"`` and the result's SOP Instance UID.
        """
        with self._tx("status", read_only=True) as s:
            jobs = dict.fromkeys(JOB_STATES, 0)
            jobs.update(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            outbox: dict[str, dict[str, int]] = {}
            for dest, state, n in s.execute(
                select(OutboxItem.destination, OutboxItem.state, func.count())
                .group_by(OutboxItem.destination, OutboxItem.state)
            ):
                outbox.setdefault(dest, dict.fromkeys(OUTBOX_STATES, 0))[state] = n
            waiting_for_disk = int(s.scalar(_count_waiting_for_disk()) or 0)
            job_failures, send_failures = self._job_failures(s, recent), self._send_failures(s, recent)
        failures = sorted(job_failures + send_failures, key=lambda f: f["at"], reverse=True)[:recent]
        return {"jobs": jobs, "outbox": outbox, "waiting_for_disk": waiting_for_disk,
                "job_failures": job_failures, "send_failures": send_failures, "failures": failures}

    @staticmethod
    def _job_failures(s: Session, recent: int) -> list[dict[str, Any]]:
        rows = s.execute(
            select(Job.id, Instance.sop_instance_uid, Job.state, Job.attempts, Job.last_error, Job.updated_at)
            .join(Instance, Job.instance_id == Instance.id)
            .where(Job.last_error.is_not(None))
            .order_by(Job.updated_at.desc())
            .limit(recent)
        )
        return [
            {"what": "job", "id": i, "sop_instance_uid": uid, "state": st, "attempts": n, "error": err,
             "at": at.isoformat()}
            for i, uid, st, n, err, at in rows
        ]

    @staticmethod
    def _send_failures(s: Session, recent: int) -> list[dict[str, Any]]:
        rows = s.execute(
            select(OutboxItem.id, Result.sop_instance_uid, OutboxItem.state, OutboxItem.attempts,
                   OutboxItem.last_error, OutboxItem.updated_at, OutboxItem.destination)
            .join(Result, OutboxItem.result_id == Result.id)
            .where(OutboxItem.last_error.is_not(None), OutboxItem.state.in_((OUTBOX_FAILED, OUTBOX_REJECTED)))
            .order_by(OutboxItem.updated_at.desc())
            .limit(recent)
        )
        return [
            {"what": "send", "id": i, "sop_instance_uid": uid, "state": st, "attempts": n, "error": err,
             "at": at.isoformat(), "destination": dest}
            for i, uid, st, n, err, at, dest in rows
        ]

    def recent_reports(self, recent: int = 10) -> list[dict[str, Any]]:
        """The ``recent`` latest SRs the worker wrote (analysed or not): job, result id, time and file path."""
        with self._tx("recent reports", read_only=True) as s:
            rows = s.execute(
                select(Result.job_id, Result.id, Result.kind, Result.created_at, Result.path)
                .where(Result.kind.in_(("sr", "failure_sr")))
                .order_by(Result.created_at.desc(), Result.id.desc())
                .limit(recent)
            )
            return [{"job_id": j, "result_id": i, "kind": k, "at": at.isoformat(), "path": p}
                    for j, i, k, at, p in rows]

    # ------------------------------------------------------------- liveness

    def beat(self, owner: str, role: str, job_id: int | None = None) -> None:
        """Record that ``owner`` (a worker) is alive now, and the job it runs (None: idle)."""
        now = self.clock()
        with self._tx("beat") as s:
            row = s.get(Heartbeat, owner)
            if row is None:
                s.add(Heartbeat(owner=owner, role=role, beat_at=now, job_id=job_id))
            else:
                row.role, row.beat_at, row.job_id = role, now, job_id

    def forget_heartbeat(self, owner: str) -> None:
        """Remove ``owner``'s heartbeat (it stopped cleanly)."""
        with self._tx("forget_heartbeat") as s:
            s.execute(delete(Heartbeat).where(Heartbeat.owner == owner))

    def liveness(self) -> dict[str, Any]:
        """What ``cxr-node health`` judges: heartbeats, and whether the queue moves.

        Returns:
            ``{"heartbeats": [{"owner", "role", "beat_at", "job_id"}], "due_jobs": n (queued and due),
            "oldest_due_at": iso or None, "last_finished_at": iso or None (the latest job to end done,
            failed or skipped), "now": iso}``.
        """
        now = self.clock()
        with self._tx("liveness", read_only=True) as s:
            beats = [{"owner": h.owner, "role": h.role, "beat_at": h.beat_at.isoformat(), "job_id": h.job_id}
                     for h in s.scalars(select(Heartbeat).order_by(Heartbeat.beat_at.desc()))]
            due, oldest = s.execute(
                select(func.count(), func.min(Job.next_attempt_at))
                .where(Job.state == JOB_QUEUED, Job.next_attempt_at <= now)).one()
            last = s.scalar(select(func.max(Job.finished_at)).where(Job.finished_at.is_not(None)))
        return {"heartbeats": beats, "due_jobs": int(due),
                "oldest_due_at": _iso(oldest), "last_finished_at": _iso(last), "now": now.isoformat()}

    # -------------------------------------------------------------- retention

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
