"""Storage step: the database engine and the ORM models of the queue (SQLite WAL or PostgreSQL).

The same models and queries run on both back ends. SQLite is the embedded default for one machine;
PostgreSQL lets several worker processes on several machines share one queue.

SQLite transactions: the driver's implicit transaction handling is switched off and every
transaction starts with ``BEGIN IMMEDIATE`` (the write lock is taken at the start, so two writers
never deadlock on a lock upgrade and ``busy_timeout`` applies). Read-only work can use
``engine.execution_options(sqlite_begin="DEFERRED")`` to start a plain ``BEGIN`` instead.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

UTC = dt.UTC
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Job states (see docs/contracts.md)
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_SKIPPED = "skipped"
JOB_STATES = (JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED, JOB_SKIPPED)

# Outbox states per destination
OUTBOX_PENDING = "pending"
OUTBOX_SENT = "sent"
OUTBOX_FAILED = "failed"  # retryable, waiting for next_attempt_at
OUTBOX_REJECTED = "rejected"  # permanent, never retried
OUTBOX_STATES = (OUTBOX_PENDING, OUTBOX_SENT, OUTBOX_FAILED, OUTBOX_REJECTED)

# Result kinds
RESULT_KINDS = ("sr", "sc", "failure_sr", "failure_sc", "shadow_sr")  # failure_sc: the NOT ANALYSED overlay of a
# refused image; shadow_sr: the SR of the shadow package ([model] shadow_package), stored and never sent
UNSENT_KINDS = ("shadow_sr",)


def utcnow() -> dt.datetime:
    """The current time as a timezone-aware UTC datetime."""
    return dt.datetime.now(UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every back end.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so the value is stored as naive UTC
    text (which sorts and compares correctly) and made aware again when read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"datetime must be timezone-aware (UTC), got naive {value.isoformat()}")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of the storage models."""


class Instance(Base):
    """One received DICOM instance (the file on disk and the filter decision)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    accepted: Mapped[bool] = mapped_column(Boolean)  # filter decision: analyse or not
    reason: Mapped[str] = mapped_column(Text, default="")  # the filter's human-readable reason


class Job(Base):
    """The analysis job of one instance (exactly one per instance)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")  # why skipped
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times leased (started)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Result(Base):
    """One DICOM object produced for a job (SR, SC overlay, or the SR that says why not analysed)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # one of RESULT_KINDS
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class OutboxItem(Base):
    """One result to deliver to one destination."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("result_id", "destination", name="uq_outbox_result_destination"),
        Index("ix_outbox_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)  # sender holding a claim
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class InstanceConflict(Base):
    """A re-sent SOP Instance UID with other content than the stored instance, kept apart (not analysed).

    One row per (SOP Instance UID, content digest): the same conflicting content sent again counts up
    ``times``. A table of its own (``create_all`` adds it to an existing database; it never adds columns).
    """

    __tablename__ = "instance_conflicts"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "digest", name="uq_conflict_uid_digest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))  # of the conflicting data set
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of the data set after the file meta
    path: Mapped[str] = mapped_column(Text)  # where the conflicting file is kept (conflicts/)
    size: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))  # of the latest sender
    job_id: Mapped[int] = mapped_column(Integer)  # the stored instance's job, left as it was
    job_state: Mapped[str] = mapped_column(String(16))  # that job's state when the conflict was received
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    times: Mapped[int] = mapped_column(Integer, default=1)


class Heartbeat(Base):
    """The latest sign of life of one node process part (a worker): what ``cxr-node health`` reads."""

    __tablename__ = "heartbeats"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid (the lease owner format)
    role: Mapped[str] = mapped_column(String(16))  # "worker"
    beat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the job it is running, if any


class Score(Base):
    """One label's score of one analysed image, with the site it came from and the model that gave it: the
    per-site score history that drift monitoring and label-free site thresholds read. No patient values.

    A table of its own (``create_all`` adds it to an existing database; it never adds columns).
    """

    __tablename__ = "scores"
    __table_args__ = (
        UniqueConstraint("job_id", "model_version", "label", name="uq_score_job_model_label"),
        Index("ix_scores_site_model_label_at", "site", "model_version", "label", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # the job, until retention purges it: the score outlives it (it holds no patient value)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    site: Mapped[str] = mapped_column(String(128))  # per [sites] key: calling AE, station, institution, device
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)  # in force when the image was scored
    threshold_method: Mapped[str] = mapped_column(Text)
    positive: Mapped[bool] = mapped_column(Boolean)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class SiteThreshold(Base):
    """A site's own threshold for one label of one model version, as accepted (append-only: the row with the
    highest ``version`` for a site, label and model version is in force; a new model version starts over).

    A table of its own (``create_all`` adds it to an existing database; it never adds columns).
    """

    __tablename__ = "site_thresholds"
    __table_args__ = (
        UniqueConstraint("site", "label", "model_version", "version", name="uq_site_threshold_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per site, label and model version
    threshold: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(Text)  # how it was chosen (the suggestion's method)
    accepted_by: Mapped[str] = mapped_column(String(64))  # "administrator" (cxr-node sites accept) or "auto"
    accepted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ConfigChange(Base):
    """One change of a setting made in the console or its API (append-only: the row with the highest ``id`` for a
    key is in force; ``new_value`` null removes the console's value, so node.toml's applies again).

    Keys: ``scp.<key>``, ``send.<key>``, ``destinations.<name>`` (the destination as a JSON object) and
    ``thresholds.<label>``. Values are JSON. No patient values.
    """

    __tablename__ = "config_changes"
    __table_args__ = (Index("ix_config_changes_key_id", "key", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128))
    old_value: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: the effective value before
    new_value: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON; null: back to node.toml's
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class User(Base):
    """A console user: a name, a role and a password hash (argon2id); failed logins lock the name for a while."""

    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # "admin" or "viewer"
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)  # consecutive, reset by a good login
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AuditEvent(Base):
    """One security-relevant event (append-only): associations accepted or refused, results sent or rejected,
    configuration changes, logins and failed logins. ``detail`` holds AE titles, addresses, UIDs and reasons,
    never patient values."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    event: Mapped[str] = mapped_column(String(32), index=True)  # one of node.audit.EVENTS
    outcome: Mapped[str] = mapped_column(String(16))  # "success" or "failure"
    actor: Mapped[str] = mapped_column(String(64))  # a user, a calling AE title or "node"
    address: Mapped[str] = mapped_column(String(64), default="")  # the peer's IP address, if any
    detail: Mapped[str] = mapped_column(Text, default="")  # JSON object


# Kinds of job incidents: how the analysis process ended while running a job
INCIDENT_CRASH = "crash"  # the process died (a signal, a native crash, the kernel's OOM killer)
INCIDENT_STALL = "stall"  # killed by its supervisor: the job ran longer than worker.job_timeout_s
INCIDENT_MEMORY = "memory"  # killed by its supervisor: its memory passed worker.max_memory_mb
INCIDENT_KINDS = (INCIDENT_CRASH, INCIDENT_STALL, INCIDENT_MEMORY)


class JobIncident(Base):
    """The analysis process died or was killed while running a job; a job with 2 is quarantined.

    A table of its own (``create_all`` adds it to an existing database; it never adds columns).
    """

    __tablename__ = "job_incidents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # one of INCIDENT_KINDS
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    detail: Mapped[str] = mapped_column(Text, default="")  # exit status, signal, memory or time found


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings.

    ``synchronous=FULL``: in WAL mode NORMAL may lose the last commits on power loss, and a
    C-STORE is acknowledged only after its job row is committed, so the commit must be durable.
    """
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_on_begin)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
    conn.exec_driver_sql("BEGIN" if mode == "DEFERRED" else "BEGIN IMMEDIATE")


def make_engine(url: str, *, create: bool = True, **kwargs: Any) -> Engine:
    """Build the one engine of the process and create the tables.

    Args:
        url: a SQLAlchemy URL: ``sqlite:///path/to/db.sqlite`` or ``postgresql+psycopg2://...``.
        create: create missing tables (idempotent).
        **kwargs: passed to ``sqlalchemy.create_engine``.

    Raises:
        ValueError: for an in-memory SQLite URL (every pooled connection would be a separate database).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError(f"database URL: expected a SQLite file path, found in-memory {url!r}")
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        engine = create_engine(url, **kwargs)
    if create:
        Base.metadata.create_all(engine)
    return engine
