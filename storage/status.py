"""What the store tells the operator: counts and latest failures, recent reports, heartbeats and liveness."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from storage.db import (
    JOB_QUEUED,
    JOB_STATES,
    OUTBOX_FAILED,
    OUTBOX_REJECTED,
    OUTBOX_STATES,
    Heartbeat,
    Instance,
    Job,
    OutboxItem,
    Result,
)
from storage.jobs import count_waiting_for_disk
from storage.store_base import StoreBase


def _iso(value: dt.datetime | str | None) -> str | None:
    """A timestamp from an aggregate query as ISO 8601 UTC (SQLite returns naive text, PostgreSQL aware)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC).isoformat()


class StatusStore(StoreBase):
    """The status, heartbeat and liveness methods of ``storage.queue.Store``."""

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
            waiting_for_disk = int(s.scalar(count_waiting_for_disk()) or 0)
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
