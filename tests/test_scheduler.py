"""Scheduler step: retention purge, lease reaping, and the send job woken as soon as a result exists."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest

from node.config import Settings, StorageSettings
from node.scheduler import NodeScheduler
from storage.db import make_engine
from storage.queue import ReceivedInstance, ResultRecord, Store

OLD = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"))


def received(store: Store, tmp_path: Path, n: int, when: dt.datetime | None, outcome: str) -> list[Path]:
    """n instances received at `when`, each finished with one result whose delivery is `outcome`."""
    files = []
    for i in range(n):
        src = tmp_path / f"{outcome}{i}-{when is None}.dcm"
        res = tmp_path / f"{outcome}{i}-{when is None}-sr.dcm"
        src.write_bytes(b"x")
        res.write_bytes(b"y")
        uid = f"1.2.3.{abs(hash((outcome, i, when is None))) % 10**9}"
        store.record_instance(ReceivedInstance(uid, "1.2", "1.2.1", "1.2.840.10008.5.1.4.1.1.1", "MOD", src, 1,
                                               received_at=when), True, "accepted")
        job = store.lease_job("t:1:1", 60)
        assert job is not None
        store.complete_job(job.job_id, [ResultRecord("sr", uid + ".9", res)], ["pacs"])
        entry = next(e for e in store.due_outbox() if e.sop_instance_uid == uid + ".9")
        if outcome == "sent":
            store.mark_sent(entry.id)
        files += [src, res]
    return files


def test_retention_removes_old_delivered_work_only(store: Store, tmp_path: Path) -> None:
    settings = Settings(storage=StorageSettings(data_dir=str(tmp_path), retention_days=30))
    old_sent = received(store, tmp_path, 5, OLD, "sent")
    old_pending = received(store, tmp_path, 2, OLD, "pending")
    new_sent = received(store, tmp_path, 2, None, "sent")
    removed = NodeScheduler(store, settings, None).purge(batch=2)  # several batches
    assert removed == len(old_sent)
    assert not any(p.exists() for p in old_sent)
    assert all(p.exists() for p in old_pending + new_sent)  # undelivered or recent: kept
    assert sum(store.status()["jobs"].values()) == 4


def test_send_job_runs_at_once_when_kicked(store: Store, tmp_path: Path) -> None:
    calls: list[float] = []
    ran = threading.Event()

    def send_due() -> int:
        calls.append(1)
        if len(calls) >= 2:
            ran.set()
        return 0

    sched = NodeScheduler(store, Settings(storage=StorageSettings(data_dir=str(tmp_path))), send_due)
    sched.scheduler.reschedule_job("send", trigger="interval", seconds=3600)  # never by the interval
    sched.start()
    try:
        sched.kick_send()
        ran.wait(5)
        before = len(calls)
        sched.kick_send()
        deadline = dt.datetime.now() + dt.timedelta(seconds=5)
        while len(calls) == before and dt.datetime.now() < deadline:
            threading.Event().wait(0.05)
        assert len(calls) > before, "kick_send did not run the send job"
    finally:
        sched.shutdown()


def test_reap_returns_expired_leases(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "a.dcm"
    src.write_bytes(b"x")
    store.record_instance(ReceivedInstance("1.2.3.4", "1.2", "1.2.1", "1.2.840.10008.5.1.4.1.1.1", "MOD", src, 1),
                          True, "accepted")
    assert store.lease_job("gone:1:1", lease_s=-1) is not None  # already expired
    sched = NodeScheduler(store, Settings(storage=StorageSettings(data_dir=str(tmp_path))), None)
    assert sched.reap() == 1
    assert store.status()["jobs"]["queued"] == 1


def test_claims_of_a_dead_sender_fall_due_at_once(store: Store, tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from node.leases import owner_is_dead

    received(store, tmp_path, 1, None, "pending")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}:{gone.stdout.strip()}:outbox"
    alive = f"{socket.gethostname()}:{__import__('os').getpid()}:outbox"
    assert len(store.due_outbox(claim_s=300, owner=dead)) == 1  # claimed, then the sender was killed
    assert store.due_outbox() == []  # not due for 300 s
    assert store.release_claims(owner_is_dead) == 1
    assert len(store.due_outbox(claim_s=300, owner=alive)) == 1  # due again at once
    assert store.release_claims(owner_is_dead) == 0  # a live sender's claim is kept
