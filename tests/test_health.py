"""Health: the checks behind ``cxr-node health`` on a real SQLite queue and a real SCP."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.config import Settings, load_settings
from node.health import check_node, check_queue, check_scp, check_worker
from storage.db import make_engine
from storage.queue import ReceivedInstance, Store
from tests.conftest import REPO, free_port
from tests.peers import wait_for
from tests.test_worker_isolation import Node as IsolationNode
from tests.test_worker_isolation import package  # noqa: F401 - the tiny model package fixture

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def settings_for(tmp_path: Path, **scp: object) -> Settings:
    s = load_settings(None, environ={})
    return dataclasses.replace(s, storage=dataclasses.replace(s.storage, data_dir=str(tmp_path / "var")),
                               scp=dataclasses.replace(s.scp, **scp))


@pytest.fixture
def store(tmp_path: Path) -> tuple[Store, Clock]:
    clock = Clock()
    return Store(make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}"), clock=clock), clock


def enqueue(store: Store, n: int) -> None:
    for i in range(n):
        uid = f"1.2.3.{i + 1}"
        store.record_instance(ReceivedInstance(
            sop_instance_uid=uid, study_instance_uid="1.2.3", series_instance_uid="1.2.3.0",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_ae="MOD", path=Path(f"/nonexistent/{uid}"),
            size=1), accepted=True, reason="frontal chest")


def test_a_worker_is_alive_only_while_its_heartbeat_is_recent(store: tuple[Store, Clock]) -> None:
    s, clock = store
    here = f"{socket.gethostname()}:1"
    assert not check_worker(s.liveness()).ok  # no worker ever beat
    s.beat("another-machine:7", "worker")
    assert not check_worker(s.liveness()).ok  # a worker elsewhere does not make this node healthy
    s.beat(here, "worker")
    clock.advance(10)
    assert check_worker(s.liveness(), max_beat_age_s=30).ok
    clock.advance(25)
    found = check_worker(s.liveness(), max_beat_age_s=30)
    assert not found.ok and "found the latest 35 s ago" in found.detail
    s.beat(here, "worker", job_id=7)
    assert check_worker(s.liveness(), max_beat_age_s=30).ok
    s.forget_heartbeat(here)
    assert not check_worker(s.liveness()).ok


def test_the_queue_is_stuck_when_due_jobs_wait_and_none_finishes(store: tuple[Store, Clock]) -> None:
    s, clock = store
    assert check_queue(s.liveness()).ok  # nothing waiting
    enqueue(s, 3)
    clock.advance(60)
    assert check_queue(s.liveness(), stall_s=300).ok  # waiting, but not long
    clock.advance(300)
    stuck = check_queue(s.liveness(), stall_s=300)
    assert not stuck.ok and "3 job(s) due" in stuck.detail and "finished never" in stuck.detail
    job = s.lease_job("host:1", 60)
    assert job is not None
    s.complete_job(job.job_id, [], [])  # one finishes: the queue moves again
    assert check_queue(s.liveness(), stall_s=300).ok
    clock.advance(301)
    assert not check_queue(s.liveness(), stall_s=300).ok  # two still due, nothing finished since


def test_the_scp_check_needs_a_dicom_answer(tmp_path: Path) -> None:
    from node.app import Node

    dead = check_scp(settings_for(tmp_path, port=free_port(), bind_address="127.0.0.1"), timeout_s=2)
    assert not dead.ok and "found no answer" in dead.detail
    settings = settings_for(tmp_path, port=0, bind_address="127.0.0.1")
    node = Node(settings, role="scp")
    node.start()
    try:
        live = dataclasses.replace(settings, scp=dataclasses.replace(settings.scp, port=node.port))
        assert check_scp(live).ok
        whitelisted = dataclasses.replace(live, scp=dataclasses.replace(live.scp, allowed_callers=("MODALITY",)))
        assert check_scp(whitelisted).ok  # the node read and refused the request: it answers
        assert [c.name for c in check_node(live, node.store, role="scp")] == ["scp"]
    finally:
        node.stop()


def test_health_command_exit_status_says_unhealthy(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[scp]\nport = {free_port()}\nbind_address = "127.0.0.1"\n'
                   f'[storage]\ndata_dir = "{tmp_path / "var"}"\n')
    (tmp_path / "var").mkdir()
    Store(make_engine(f"sqlite:///{tmp_path / 'var' / 'cxr-node.sqlite'}"))
    out = subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "CRITICAL", "health", "--config",
                          str(cfg), "--timeout", "2"], capture_output=True, text=True, cwd=REPO, timeout=60,
                         check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL scp:" in out.stdout and "FAIL worker:" in out.stdout and "ok   queue:" in out.stdout


def run_health(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "CRITICAL", "health", "--config",
                           str(cfg), *extra], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


@pytest.mark.integration
def test_health_of_a_running_node_then_of_a_killed_one(tmp_path: Path, package: Path) -> None:  # noqa: F811
    """What the Dockerfile's HEALTHCHECK runs: green while the node works, red once it is gone."""
    node = IsolationNode(tmp_path, package)
    cfg = tmp_path / "node.toml"
    try:
        healthy = wait_for(lambda: (out := run_health(cfg)).returncode == 0 and out, timeout=30, interval=0.5,
                           what="cxr-node health to pass")
        assert [line.split(":")[0] for line in healthy.stdout.splitlines()] == ["ok   scp", "ok   worker", "ok   queue"]
        node.proc.kill()
        node.proc.wait()
        time.sleep(2.5)
        dead = run_health(cfg, "--max-beat-age", "2", "--timeout", "2")
        assert dead.returncode == 1, dead.stdout
        assert "FAIL scp:" in dead.stdout and "FAIL worker:" in dead.stdout
    finally:
        node.stop()
