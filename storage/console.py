"""The console's tables: configuration changes (versioned), users, and the audit trail (append-only).

``ConfigChange`` rows are never updated or deleted: the effective value of a key is node.toml's, replaced by the
latest row's ``new_value`` unless that is null (``node.live`` computes the effective settings). ``AuditEvent`` rows
are only inserted. A ``User`` row holds an argon2id hash (``node.users`` hashes and verifies; this module only
stores) and the failed-login counter behind the lockout.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from storage.db import (
    JOB_FAILED,
    JOB_QUEUED,
    JOB_SKIPPED,
    OUTBOX_FAILED,
    OUTBOX_PENDING,
    OUTBOX_REJECTED,
    OUTBOX_SENT,
    AuditEvent,
    ConfigChange,
    Heartbeat,
    Instance,
    Job,
    JobIncident,
    OutboxItem,
    Result,
    User,
)
from storage.records import AuditRecord, ConfigChangeRecord, UserRecord
from storage.store_base import StoreBase


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class DuplicateUser(ValueError):  # noqa: N818 - a state the caller answers (409)
    """A user of that name exists already."""


class ConsoleStore(StoreBase):
    """The console's methods of ``storage.queue.Store``."""

    _probe_engine: Any = None

    # configuration changes

    def record_config_change(self, key: str, old_value: Any, new_value: Any, changed_by: str) -> int:
        """Append a change of ``key`` (``new_value`` None: back to node.toml's value); returns its id."""
        with self._tx("record_config_change") as s:
            row = ConfigChange(key=key, old_value=_dump(old_value), new_value=_dump(new_value),
                               changed_by=changed_by, changed_at=self.clock())
            s.add(row)
            s.flush()
            return int(row.id)

    def config_version(self) -> int:
        """The id of the latest configuration change (0: none): cheap, read before the overrides themselves."""
        with self._tx("config_version", read_only=True) as s:
            return int(s.execute(select(func.max(ConfigChange.id))).scalar() or 0)

    def config_overrides(self) -> dict[str, ConfigChangeRecord]:
        """The latest change of every key ever changed (its ``new_value`` None: node.toml's value applies)."""
        latest = select(ConfigChange.key, func.max(ConfigChange.id).label("id")).group_by(ConfigChange.key).subquery()
        with self._tx("config_overrides", read_only=True) as s:
            rows = s.execute(select(ConfigChange).join(latest, ConfigChange.id == latest.c.id)).scalars().all()
            return {r.key: _change(r) for r in rows}

    def config_history(self, key_prefix: str = "", limit: int = 100) -> list[ConfigChangeRecord]:
        """The latest changes first (of keys starting with ``key_prefix``)."""
        query = select(ConfigChange).order_by(ConfigChange.id.desc()).limit(limit)
        if key_prefix:
            query = query.where(ConfigChange.key.startswith(key_prefix, autoescape=True))
        with self._tx("config_history", read_only=True) as s:
            return [_change(r) for r in s.execute(query).scalars().all()]

    # users

    def add_user(self, name: str, role: str, password_hash: str) -> None:
        """Create a user.

        Raises:
            DuplicateUser: the name is taken.
        """
        with self._tx("add_user") as s:
            if s.get(User, name) is not None:
                raise DuplicateUser(f"user {name!r} exists already")
            s.add(User(name=name, role=role, password_hash=password_hash, created_at=self.clock(), failed_logins=0))

    def set_password(self, name: str, password_hash: str) -> bool:
        """Replace a user's password hash (and unlock it); False when there is no such user."""
        with self._tx("set_password") as s:
            user = s.get(User, name)
            if user is None:
                return False
            user.password_hash, user.failed_logins, user.locked_until = password_hash, 0, None
            return True

    def remove_user(self, name: str) -> bool:
        """Delete a user; False when there was none."""
        with self._tx("remove_user") as s:
            return bool(s.execute(delete(User).where(User.name == name)).rowcount)  # type: ignore[attr-defined]

    def users(self) -> list[UserRecord]:
        with self._tx("users", read_only=True) as s:
            return [_user(u) for u in s.execute(select(User).order_by(User.name)).scalars().all()]

    def user_hash(self, name: str) -> tuple[UserRecord, str] | None:
        """A user and its password hash, or None."""
        with self._tx("user_hash", read_only=True) as s:
            user = s.get(User, name)
            return None if user is None else (_user(user), user.password_hash)

    def record_login(self, name: str, ok: bool, lock_after: int, lock_s: float) -> UserRecord | None:
        """Count a login of an existing user: a good one resets the count, the ``lock_after``-th failure in a row
        locks the name for ``lock_s`` seconds (and each failure after it again)."""
        with self._tx("record_login") as s:
            user = s.get(User, name)
            if user is None:
                return None
            if ok:
                user.failed_logins, user.locked_until = 0, None
            else:
                user.failed_logins = (user.failed_logins or 0) + 1
                if user.failed_logins >= lock_after:
                    user.locked_until = self.clock() + dt.timedelta(seconds=lock_s)
            return _user(user)

    def rehash(self, name: str, password_hash: str) -> None:
        """Store a new hash of the same password (argon2 parameters raised since it was made)."""
        with self._tx("rehash") as s:
            user = s.get(User, name)
            if user is not None:
                user.password_hash = password_hash

    # audit trail

    def audit(self, event: str, outcome: str, actor: str, address: str = "", **detail: Any) -> int:
        """Append one event; returns its id."""
        with self._tx("audit") as s:
            row = AuditEvent(at=self.clock(), event=event, outcome=outcome, actor=actor[:64], address=address[:64],
                             detail=json.dumps(detail, sort_keys=True, default=str))
            s.add(row)
            s.flush()
            return int(row.id)

    def audit_events(self, limit: int = 100, before_id: int | None = None, event: str | None = None,
                     since_id: int | None = None) -> list[AuditRecord]:
        """Events, the latest first (``before_id``: older than that one, for paging; ``since_id``: newer)."""
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if before_id is not None:
            query = query.where(AuditEvent.id < before_id)
        if since_id is not None:
            query = query.where(AuditEvent.id > since_id)
        if event:
            query = query.where(AuditEvent.event == event)
        with self._tx("audit_events", read_only=True) as s:
            return [AuditRecord(r.id, r.at, r.event, r.outcome, r.actor, r.address, json.loads(r.detail or "{}"))
                    for r in s.execute(query).scalars().all()]


    # failed work: retry or discard (the console's Failed work page)

    def failed_work(self, limit: int = 100) -> dict[str, list[dict[str, Any]]]:
        """Jobs failed for good and sends failed (retrying) or rejected, the latest first; UIDs only."""
        with self._tx("failed_work", read_only=True) as s:
            jobs = s.execute(
                select(Job.id, Instance.sop_instance_uid, Instance.calling_ae, Job.attempts, Job.last_error,
                       Job.updated_at)
                .join(Instance, Job.instance_id == Instance.id)
                .where(Job.state == JOB_FAILED).order_by(Job.updated_at.desc(), Job.id.desc()).limit(limit)).all()
            sends = s.execute(
                select(OutboxItem.id, OutboxItem.destination, OutboxItem.state, OutboxItem.attempts,
                       OutboxItem.last_error, OutboxItem.next_attempt_at, OutboxItem.updated_at, Result.kind,
                       Result.sop_instance_uid, Result.job_id)
                .join(Result, OutboxItem.result_id == Result.id)
                .where(OutboxItem.state.in_((OUTBOX_FAILED, OUTBOX_REJECTED)))
                .order_by(OutboxItem.updated_at.desc(), OutboxItem.id.desc()).limit(limit)).all()
        return {
            "jobs": [{"id": i, "sop_instance_uid": uid, "calling_ae": ae, "attempts": n, "error": err or "",
                      "at": at.isoformat()} for i, uid, ae, n, err, at in jobs],
            "sends": [{"id": i, "destination": d, "state": st, "attempts": n, "error": err or "",
                       "next_attempt_at": nxt.isoformat() if st == OUTBOX_FAILED else None, "at": at.isoformat(),
                       "kind": kind, "sop_instance_uid": uid, "job_id": job}
                      for i, d, st, n, err, nxt, at, kind, uid, job in sends],
        }

    def retry_job(self, job_id: int) -> str | None:
        """A job failed for good is queued again, due now, with its attempts and incidents cleared (an
        administrator's decision). Returns its SOP Instance UID, or None when no failed job has that id."""
        with self._tx("retry_job") as s:
            job = s.get(Job, job_id)
            if job is None or job.state != JOB_FAILED:
                return None
            now = self.clock()
            job.state, job.attempts, job.next_attempt_at, job.finished_at, job.updated_at = (
                JOB_QUEUED, 0, now, None, now)
            job.lease_owner = job.lease_expires_at = None
            s.execute(delete(JobIncident).where(JobIncident.job_id == job_id))
            return str(s.get(Instance, job.instance_id).sop_instance_uid)  # type: ignore[union-attr]

    def discard_job(self, job_id: int, by: str) -> str | None:
        """A job failed for good is set aside (``skipped``, saying who discarded it); None: no such failed job."""
        with self._tx("discard_job") as s:
            job = s.get(Job, job_id)
            if job is None or job.state != JOB_FAILED:
                return None
            job.state, job.reason, job.updated_at = JOB_SKIPPED, f"discarded by {by}", self.clock()
            return str(s.get(Instance, job.instance_id).sop_instance_uid)  # type: ignore[union-attr]

    def retry_send(self, item_id: int) -> tuple[str, str] | None:
        """A failed or rejected send is due now again (attempts kept); returns (destination, result SOP Instance
        UID), or None when no failed or rejected send has that id or a sender is sending it right now."""
        with self._tx("retry_send") as s:
            item = s.get(OutboxItem, item_id)
            now = self.clock()
            if item is None or item.state not in (OUTBOX_FAILED, OUTBOX_REJECTED) or _in_flight(item, now):
                return None
            item.state, item.next_attempt_at, item.claimed_by, item.updated_at = OUTBOX_PENDING, now, None, now
            return item.destination, str(s.get(Result, item.result_id).sop_instance_uid)  # type: ignore[union-attr]

    def discard_send(self, item_id: int, by: str) -> tuple[str, str] | None:
        """A failed send is given up (``rejected``, saying who discarded it); None: no such failed send."""
        with self._tx("discard_send") as s:
            item = s.get(OutboxItem, item_id)
            if item is None or item.state != OUTBOX_FAILED or _in_flight(item, self.clock()):
                return None
            item.state, item.updated_at = OUTBOX_REJECTED, self.clock()
            item.last_error = f"discarded by {by}; last error: {item.last_error or ''}"[:2000]
            return item.destination, str(s.get(Result, item.result_id).sop_instance_uid)  # type: ignore[union-attr]

    # the overview

    def activity(self, since: dt.datetime) -> list[dict[str, Any]]:
        """Per hour since ``since``: images received, analysed (jobs done), skipped and failed."""
        with self._tx("activity", read_only=True) as s:
            received = s.execute(select(Instance.received_at).where(Instance.received_at >= since)).scalars().all()
            ended = s.execute(select(Job.state, Job.updated_at).where(
                Job.updated_at >= since, Job.state.in_(("done", JOB_SKIPPED, JOB_FAILED)))).all()
        hours: dict[str, dict[str, Any]] = {}

        def bucket(at: dt.datetime) -> dict[str, Any]:
            key = at.replace(minute=0, second=0, microsecond=0).isoformat()
            return hours.setdefault(key, {"hour": key, "received": 0, "done": 0, "skipped": 0, "failed": 0})

        for at in received:
            bucket(at)["received"] += 1
        for state, at in ended:
            bucket(at)[state] += 1
        return [hours[k] for k in sorted(hours)]

    def destination_states(self) -> dict[str, dict[str, Any]]:
        """Per destination: the last successful send, the last failure and the entries waiting."""
        with self._tx("destination_states", read_only=True) as s:
            sent = dict(s.execute(select(OutboxItem.destination, func.max(OutboxItem.sent_at))
                                  .where(OutboxItem.state == OUTBOX_SENT).group_by(OutboxItem.destination)).all())
            failed = dict(s.execute(select(OutboxItem.destination, func.max(OutboxItem.updated_at))
                                    .where(OutboxItem.last_error.is_not(None),
                                           OutboxItem.state.in_((OUTBOX_FAILED, OUTBOX_REJECTED)))
                                    .group_by(OutboxItem.destination)).all())
            waiting = dict(s.execute(select(OutboxItem.destination, func.count())
                                     .where(OutboxItem.state.in_((OUTBOX_PENDING, OUTBOX_FAILED)))
                                     .group_by(OutboxItem.destination)).all())
        out: dict[str, dict[str, Any]] = {}
        for name in set(sent) | set(failed) | set(waiting):
            last_sent, last_failed = sent.get(name), failed.get(name)
            out[name] = {"last_sent": last_sent.isoformat() if last_sent else None,
                         "last_failure": last_failed.isoformat() if last_failed else None,
                         "waiting": int(waiting.get(name, 0)),
                         "up": None if last_sent is None and last_failed is None else
                         bool(last_sent and (last_failed is None or last_sent >= last_failed))}
        return out

    def probe_write(self, owner: str) -> None:
        """Write one row (the console's own heartbeat) on a connection opened for this probe alone: raises when a
        new connection cannot write (a read-only database file, a full or read-only file system, a database
        server refusing writes), which pooled connections opened earlier may not notice yet."""
        from sqlalchemy.pool import NullPool

        from storage.db import make_engine

        if self._probe_engine is None:
            self._probe_engine = make_engine(self.engine.url.render_as_string(hide_password=False), create=False,
                                             poolclass=NullPool)
        now = self.clock()
        with self._probe_engine.begin() as conn:
            conn.execute(delete(Heartbeat).where(Heartbeat.owner == owner))
            conn.execute(insert(Heartbeat).values(owner=owner, role="console", beat_at=now, job_id=None))

    def item_exists(self, what: str, item_id: int) -> bool:
        """Whether a job (``what`` "jobs") or an outbox entry ("sends") with that id exists."""
        with self._tx("item_exists", read_only=True) as s:
            return s.get(Job if what == "jobs" else OutboxItem, item_id) is not None

    def recent_results(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest SRs (analysed or not) with their source image's UIDs and calling AE, and per destination the
        state of each result of the same job. No patient values."""
        with self._tx("recent_results", read_only=True) as s:
            rows = s.execute(
                select(Result.job_id, Result.id, Result.kind, Result.created_at, Result.path, Result.sop_instance_uid,
                       Instance.sop_instance_uid, Instance.study_instance_uid, Instance.calling_ae)
                .join(Job, Result.job_id == Job.id).join(Instance, Job.instance_id == Instance.id)
                .where(Result.kind.in_(("sr", "failure_sr")))
                .order_by(Result.created_at.desc(), Result.id.desc()).limit(limit)).all()
            jobs = [r[0] for r in rows]
            sends = s.execute(
                select(Result.job_id, Result.kind, OutboxItem.destination, OutboxItem.state)
                .join(OutboxItem, OutboxItem.result_id == Result.id).where(Result.job_id.in_(jobs))).all()
        sent: dict[int, list[dict[str, str]]] = {}
        for job_id, kind, dest, state in sends:
            sent.setdefault(job_id, []).append({"kind": kind, "destination": dest, "state": state})
        return [{"job_id": j, "result_id": i, "kind": k, "at": at.isoformat(), "path": p, "sr_sop_instance_uid": sr,
                 "sop_instance_uid": uid, "study_instance_uid": study, "calling_ae": ae, "sent": sent.get(j, [])}
                for j, i, k, at, p, sr, uid, study, ae in rows]

    def unlock_user(self, name: str) -> bool:
        with self._tx("unlock_user") as s:
            result = s.execute(update(User).where(User.name == name).values(failed_logins=0, locked_until=None))
            return bool(result.rowcount)  # type: ignore[attr-defined]


def _in_flight(item: OutboxItem, now: dt.datetime) -> bool:
    """A sender holds the entry (its claim has not run out): it is being sent right now, and the sender's outcome
    would overwrite a retry or a discard made meanwhile."""
    return item.claimed_by is not None and item.next_attempt_at > now


def _change(r: ConfigChange) -> ConfigChangeRecord:
    return ConfigChangeRecord(int(r.id), r.key, _load(r.old_value), _load(r.new_value), r.changed_by, r.changed_at)


def _user(u: User) -> UserRecord:
    return UserRecord(u.name, u.role, u.created_at, int(u.failed_logins or 0), u.locked_until)
