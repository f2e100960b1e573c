"""The plain frozen records the store takes and returns: no ORM object leaves ``storage``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

#: Longest error text kept in a job or outbox row (``clip_error``).
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
    calling_ae: str = ""  # of the association that delivered the instance


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



@dataclass(frozen=True)
class ScoreRecord:
    """One label's score of an analysed image (``storage.db.Score``), recorded with the job's results."""

    site: str
    model_name: str
    model_version: str
    label: str
    score: float
    threshold: float
    threshold_method: str
    positive: bool


@dataclass(frozen=True)
class SiteScore:
    """One recorded score as the site history returns it."""

    at: dt.datetime
    score: float
    positive: bool
    threshold: float
    threshold_method: str


@dataclass(frozen=True)
class AcceptedThreshold:
    """A site threshold in force (``storage.db.SiteThreshold``)."""

    site: str
    label: str
    model_version: str
    version: int
    threshold: float
    method: str
    accepted_by: str
    accepted_at: dt.datetime


def clip_error(text: str) -> str:
    """``text`` cut to ``MAX_ERROR_CHARS`` (an ellipsis marks the cut)."""
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


@dataclass(frozen=True)
class ConfigChangeRecord:
    """One console change of a setting (``storage.db.ConfigChange``); values are decoded JSON (None: removed)."""

    id: int
    key: str
    old_value: object
    new_value: object
    changed_by: str
    changed_at: dt.datetime


@dataclass(frozen=True)
class UserRecord:
    """A console user without the password hash."""

    name: str
    role: str
    created_at: dt.datetime
    failed_logins: int
    locked_until: dt.datetime | None


@dataclass(frozen=True)
class AuditRecord:
    """One audit-trail event (``storage.db.AuditEvent``), ``detail`` decoded."""

    id: int
    at: dt.datetime
    event: str
    outcome: str
    actor: str
    address: str
    detail: dict[str, object]
