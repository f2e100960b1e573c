"""The job queue and outbox (storage.queue), on a SQLite file and on a real PostgreSQL server."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select

from storage.db import UTC, Base, Instance, Job, OutboxItem, Result, Score, make_engine
from storage.queue import ReceivedInstance, ResultRecord, ScoreRecord, Store
from tests.pg_fixture import postgres_url  # noqa: F401 - the session fixture used via getfixturevalue

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    """A settable clock for the store."""

    def __init__(self, now: dt.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.sqlite'}"
    url: str = request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    Base.metadata.drop_all(engine)  # a clean schema for every test
    engine.dispose()
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(engine: Engine, clock: Clock) -> Store:
    return Store(engine, max_attempts=3, clock=clock)


def meta(n: int, study: str = "1.2.826.0.1.3680043.8.498.1") -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.2.{n}", study_instance_uid=study,
        series_instance_uid=f"{study}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        calling_ae="MODALITY", path=Path(f"/data/instances/{n}.dcm"), size=1000 + n,
    )


def results_for(n: int) -> list[ResultRecord]:
    return [
        ResultRecord("sr", f"2.25.{n}1", Path(f"/data/results/{n}-sr.dcm")),
        ResultRecord("sc", f"2.25.{n}2", Path(f"/data/results/{n}-sc.dcm")),
    ]


def count(engine: Engine, model: type) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def test_record_then_lease_gives_the_instance_once(store: Store, clock: Clock) -> None:
    job_id = store.record_instance(meta(1), accepted=True, reason="frontal chest")
    leased = store.lease_job("worker-a", lease_s=60)
    assert leased is not None
    assert leased.job_id == job_id
    assert leased.sop_instance_uid == meta(1).sop_instance_uid
    assert leased.path == meta(1).path
    assert leased.attempts == 1
    assert leased.lease_expires_at == clock.now + dt.timedelta(seconds=60)
    assert leased.lease_expires_at.tzinfo is not None
    assert store.lease_job("worker-b", lease_s=60) is None
    assert store.status()["jobs"]["running"] == 1


def test_not_accepted_instance_is_skipped_with_its_reason(store: Store, engine: Engine) -> None:
    store.record_instance(meta(1), accepted=False, reason="lateral view (ViewPosition LL)")
    assert store.lease_job("w", 60) is None
    with engine.connect() as conn:
        state, reason = conn.execute(select(Job.state, Job.reason)).one()
    assert (state, reason) == ("skipped", "lateral view (ViewPosition LL)")


def _lease_all(url: str, owner: str, got: list[int], errors: list[BaseException]) -> None:
    engine = make_engine(url, create=False)
    try:
        store = Store(engine)
        while (job := store.lease_job(owner, lease_s=60)) is not None:
            got.append(job.job_id)
    except BaseException as exc:  # reported to the test thread
        errors.append(exc)
    finally:
        engine.dispose()


def test_racing_workers_never_lease_a_job_twice(db_url: str, engine: Engine) -> None:
    store = Store(engine)
    job_ids = {store.record_instance(meta(n), True, "") for n in range(40)}
    got: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_lease_all, args=(db_url, f"w{i}", got[i], errors)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    leased = [j for g in got for j in g]
    assert len(leased) == len(set(leased)), "a job was leased twice"
    assert set(leased) == job_ids


def test_retryable_failure_waits_for_next_attempt_then_fails_after_max(store: Store, clock: Clock) -> None:
    store.record_instance(meta(1), True, "")
    for attempt in (1, 2):
        job = store.lease_job("w", 60)
        assert job is not None and job.attempts == attempt
        state = store.fail_job(job.job_id, "database locked", retryable=True,
                               retry_at=clock.now + dt.timedelta(seconds=30))
        assert state == "queued"
        assert store.lease_job("w", 60) is None, "leased before next_attempt_at"
        clock.advance(30)
    job = store.lease_job("w", 60)
    assert job is not None and job.attempts == 3
    assert store.fail_job(job.job_id, "database locked", retryable=True) == "failed"
    status = store.status()
    assert status["jobs"]["failed"] == 1
    failure = status["failures"][0]
    assert failure["sop_instance_uid"] == meta(1).sop_instance_uid
    assert "gave up after 3 attempts" in failure["error"]


def test_permanent_failure_is_final_at_once(store: Store) -> None:
    store.record_instance(meta(1), True, "")
    job = store.lease_job("w", 60)
    assert job is not None
    assert store.fail_job(job.job_id, "UnsupportedImage: colour", retryable=False) == "failed"
    assert store.lease_job("w", 60) is None
    assert store.fail_job(job.job_id, "late report", retryable=True) == "failed", "a final state must stay"


def test_expired_lease_returns_to_the_queue_even_past_max_attempts(store: Store, clock: Clock) -> None:
    """The reaper never fails a job (that would end it without a result): past max_attempts the next
    lease shows it (attempts > max_attempts), and the worker ends it with a not-analysed SR."""
    store.record_instance(meta(1), True, "")
    assert store.lease_job("w1", lease_s=10) is not None
    clock.advance(5)
    assert store.reap_expired_leases() == 0
    clock.advance(6)
    assert store.reap_expired_leases() == 1
    for attempt in (2, 3):
        job = store.lease_job("w2", lease_s=10)
        assert job is not None and job.attempts == attempt
        clock.advance(11)
        assert store.reap_expired_leases() == 1
    status = store.status()
    assert status["jobs"]["queued"] == 1 and status["jobs"]["failed"] == 0
    assert "lease of w2 expired" in status["failures"][0]["error"]
    assert "3 attempts used up" in status["failures"][0]["error"]
    job = store.lease_job("w3", 10)
    assert job is not None and job.attempts == 4 > store.max_attempts


def test_renew_lease_only_for_the_holder(store: Store, clock: Clock) -> None:
    store.record_instance(meta(1), True, "")
    job = store.lease_job("w1", lease_s=10)
    assert job is not None
    assert store.renew_lease(job.job_id, "w1", lease_s=60)
    assert not store.renew_lease(job.job_id, "w2", lease_s=60)
    clock.advance(30)
    assert store.reap_expired_leases() == 0


def test_re_receive_is_idempotent(store: Store, engine: Engine, clock: Clock) -> None:
    first = store.record_instance(meta(1), True, "")
    clock.advance(1)
    assert store.record_instance(meta(1), True, "") == first
    assert (count(engine, Instance), count(engine, Job)) == (1, 1)
    # running: left alone
    job = store.lease_job("w", 60)
    assert job is not None
    assert store.record_instance(meta(1), True, "") == first
    assert store.status()["jobs"]["running"] == 1
    # done: not re-queued, results stand
    store.complete_job(first, results_for(1), ["pacs"])
    assert store.record_instance(meta(1), True, "") == first
    assert store.lease_job("w", 60) is None
    assert store.status()["jobs"] == {"queued": 0, "running": 0, "done": 1, "failed": 0, "skipped": 0}


def test_first_receive_path_skips_a_known_uid_without_an_error(store: Store, engine: Engine) -> None:
    """The fast first-receive INSERT leaves a known UID to the locked path: no row, no IntegrityError."""
    first = store.record_instance(meta(1), True, "")
    assert store._record_first(meta(1), False, "lateral") is None
    assert (count(engine, Instance), count(engine, Job)) == (1, 1)
    assert store.record_instance(meta(2), True, "") != first  # and a new UID still takes the fast path


def test_re_receive_requeues_a_failed_or_skipped_job(store: Store) -> None:
    first = store.record_instance(meta(1), False, "no view")
    assert store.record_instance(meta(1), True, "") == first  # rules changed, resent: analysed now
    job = store.lease_job("w", 60)
    assert job is not None
    store.fail_job(job.job_id, "decode", retryable=False)
    assert store.record_instance(meta(1), True, "") == first
    again = store.lease_job("w", 60)
    assert again is not None and again.job_id == first and again.attempts == 1


def test_complete_job_twice_adds_no_rows(store: Store, engine: Engine) -> None:
    job_id = store.record_instance(meta(1), True, "")
    assert store.lease_job("w", 60) is not None
    store.complete_job(job_id, results_for(1), ["pacs", "archive"])
    store.complete_job(job_id, results_for(1), ["pacs", "archive"])
    assert (count(engine, Result), count(engine, OutboxItem)) == (2, 4)
    store.complete_job(job_id, results_for(1), ["pacs", "archive", "viewer"])  # a destination added
    assert count(engine, OutboxItem) == 6
    other = store.record_instance(meta(2), True, "")
    with pytest.raises(ValueError, match="expected to belong to job"):
        store.complete_job(other, results_for(1), ["pacs"])
    with pytest.raises(ValueError, match="result kind"):
        store.complete_job(other, [ResultRecord("pdf", "2.25.9", Path("x"))], ["pacs"])
    assert store.status()["jobs"]["queued"] == 1, "a refused completion must roll back"


def test_outbox_transitions(store: Store, clock: Clock) -> None:
    job_id = store.record_instance(meta(1), True, "")
    store.lease_job("w", 60)
    store.complete_job(job_id, results_for(1), ["pacs", "archive"])
    due = store.due_outbox(clock.now)
    assert len(due) == 4
    assert {(e.destination, e.kind, e.state) for e in due} == {
        (d, k, "pending") for d in ("pacs", "archive") for k in ("sr", "sc")
    }
    sr_pacs, sc_pacs = sorted((e for e in due if e.destination == "pacs"), key=lambda e: e.kind, reverse=True)
    archive = [e for e in due if e.destination == "archive"]
    store.mark_sent(sr_pacs.id)
    retry_at = clock.now + dt.timedelta(seconds=20)
    assert store.mark_send_failed(sc_pacs.id, "association aborted", retry_at) == 1
    store.mark_rejected(archive[0].id, "0xA900 dataset does not match SOP class")
    store.mark_rejected(archive[1].id, "called AE not recognised")
    assert store.due_outbox(clock.now) == []
    clock.advance(20)
    (retry,) = store.due_outbox(clock.now)
    assert (retry.id, retry.state, retry.attempts, retry.last_error) == (
        sc_pacs.id, "failed", 1, "association aborted")
    store.mark_sent(retry.id)
    store.mark_send_failed(retry.id, "late failure report", clock.now)  # a sent entry stays sent
    status = store.status()
    assert status["outbox"] == {
        "pacs": {"pending": 0, "sent": 2, "failed": 0, "rejected": 0},
        "archive": {"pending": 0, "sent": 0, "failed": 0, "rejected": 2},
    }
    assert [f["destination"] for f in status["failures"]] == ["archive", "archive"]
    assert status["send_failures"] == status["failures"] and status["job_failures"] == []
    clock.advance(3600)
    assert store.due_outbox(clock.now) == [], "rejected entries are never retried"


def test_due_outbox_claim_hides_entries_from_other_senders(store: Store, clock: Clock) -> None:
    job_id = store.record_instance(meta(1), True, "")
    store.lease_job("w", 60)
    store.complete_job(job_id, results_for(1), ["pacs"])
    assert len(store.due_outbox(clock.now, claim_s=60)) == 2
    assert store.due_outbox(clock.now) == []
    clock.advance(61)
    assert len(store.due_outbox(clock.now)) == 2, "a crashed sender's entries fall due again"


def test_purge_keeps_unfinished_and_undelivered_work(store: Store, engine: Engine, clock: Clock) -> None:
    sent = store.record_instance(meta(1), True, "")
    undelivered = store.record_instance(meta(2), True, "")
    store.record_instance(meta(3), True, "")  # stays queued
    store.record_instance(meta(4), False, "lateral")  # skipped
    for _ in range(2):
        job = store.lease_job("w", 60)
        assert job is not None
        store.complete_job(job.job_id, results_for(job.job_id), ["pacs"])
    for entry in store.due_outbox(clock.now):
        if entry.sop_instance_uid.startswith(f"2.25.{sent}"):
            store.mark_sent(entry.id)
    clock.advance(86400)
    assert store.purge_before(T0) == []
    paths = store.purge_before(clock.now)
    assert sorted(map(str, paths)) == sorted(
        [str(meta(1).path), str(meta(4).path), f"/data/results/{sent}-sr.dcm", f"/data/results/{sent}-sc.dcm"]
    )
    assert count(engine, Job) == 2 and count(engine, Result) == 2 and count(engine, OutboxItem) == 2
    with engine.connect() as conn:
        assert undelivered in set(conn.scalars(select(Job.id)))


def test_naive_datetimes_are_refused(store: Store) -> None:
    job_id = store.record_instance(meta(1), True, "")
    store.lease_job("w", 60)
    with pytest.raises(Exception, match="timezone-aware"):
        store.fail_job(job_id, "x", retryable=True, retry_at=dt.datetime(2025, 1, 1))


def score(label: str, value: float, site: str = "MODALITY", version: str = "1.0") -> ScoreRecord:
    return ScoreRecord(site, "tb", version, label, value, 0.4, "sensitivity 0.90 on OOF", value >= 0.4)


def test_scores_are_the_sites_history_and_outlive_the_purge(store: Store, engine: Engine, clock: Clock) -> None:
    store.record_instance(meta(1), True, "")
    store.record_instance(meta(2), True, "")
    first = store.lease_job("w", 60)
    assert first is not None and first.calling_ae == "MODALITY"  # the site a worker records it under
    store.complete_job(first.job_id, results_for(1), [], [score("Tuberculosis", 0.7), score("Nodule", 0.1)])
    store.complete_job(first.job_id, results_for(1), [], [score("Tuberculosis", 0.8)])  # a re-run replaces
    clock.advance(3600)
    second = store.lease_job("w", 60)
    assert second is not None
    store.complete_job(second.job_id, results_for(2), [], [score("Tuberculosis", 0.2, site="DX2"),
                                                           score("Tuberculosis", 0.3, site="DX2", version="2.0")])
    assert count(engine, Score) == 4
    assert store.score_sites("1.0") == {"DX2": 1, "MODALITY": 1} and store.score_sites("2.0") == {"DX2": 1}
    history = store.site_scores("MODALITY", "1.0", "Tuberculosis")
    assert [(h.score, h.positive, h.threshold) for h in history] == [(0.8, True, 0.4)]
    assert store.site_scores("DX2", "1.0", "Tuberculosis", since=T0 + dt.timedelta(hours=2)) == []
    clock.advance(86400)
    assert store.purge_before(clock.now)  # both jobs delivered nowhere: purged with their instances
    assert count(engine, Job) == 0 and count(engine, Score) == 4
    assert store.score_sites("1.0") == {"DX2": 1, "MODALITY": 1}  # the history stays (it holds no patient value)
