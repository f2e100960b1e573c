"""Who holds a lease, whether it is still alive, and what a worker process is doing.

A lease owner is named ``host:pid:role`` (one format for job leases and outbox claims), so any process of the
same host can tell whether the owner still exists (:func:`owner_is_dead`); another host's owner is left to
its lease expiry. :class:`JobHeartbeat` is the worker process's shared-memory heartbeat its supervisor reads.
Nothing here imports the model runtime: the SCP-only roles use it too.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

#: Incidents (the worker process died or was killed while running the job) before a job is quarantined.
QUARANTINE_AFTER = 2


def process_owner(pid: int, role: str = "worker") -> str:
    """The lease owner name ``host:pid:role`` of a process's one worker (its supervisor knows it too) or its
    outbox (``role="outbox"``)."""
    return f"{socket.gethostname()}:{pid}:{role}"


def default_owner() -> str:
    """A lease owner name for a worker running in this thread: ``host:pid:thread-<ident>`` (several in-process
    workers, as the tests run them, each get their own)."""
    return process_owner(os.getpid(), f"thread-{threading.get_ident()}")


@dataclass(frozen=True)
class HeartbeatState:
    """What a worker process last published: its job (None: idle) and times on ``time.monotonic()``."""

    job_id: int | None
    job_started: float  # when the current job started (0 when idle)
    beat_at: float  # the latest sign of life
    jobs_finished: int


class JobHeartbeat:
    """A worker process's current job and latest sign of life, in shared memory its supervisor reads.

    Four doubles in a ``multiprocessing.Array`` (job id, 0 for none; job start; last beat; jobs
    finished), written under the array's lock: a few hundred nanoseconds per job, no message passing.
    Times are ``time.monotonic()``, one clock for all processes of a Linux host.

    Args:
        ctx: the multiprocessing context the worker process is started with (default: spawn).
    """

    def __init__(self, ctx: Any = None) -> None:
        self._slots = (ctx or multiprocessing.get_context("spawn")).Array("d", 4)

    def beat(self) -> None:
        """Record a sign of life."""
        self._slots[2] = time.monotonic()

    def reset(self) -> None:
        """A new process: no job, none finished, a sign of life now (it is starting)."""
        with self._slots.get_lock():
            self._slots[:] = [0.0, 0.0, time.monotonic(), 0.0]

    def start_job(self, job_id: int) -> None:
        """Record that the process started running ``job_id`` now."""
        with self._slots.get_lock():
            now = time.monotonic()
            self._slots[0], self._slots[1], self._slots[2] = float(job_id), now, now

    def end_job(self) -> None:
        """Record that the current job ended (whatever its outcome)."""
        with self._slots.get_lock():
            self._slots[0], self._slots[1], self._slots[2] = 0.0, 0.0, time.monotonic()
            self._slots[3] += 1

    def read(self) -> HeartbeatState:
        """The latest state, consistent across its fields."""
        with self._slots.get_lock():
            job, started, beat, finished = self._slots[:]
        return HeartbeatState(job_id=int(job) or None, job_started=started, beat_at=beat,
                              jobs_finished=int(finished))


def owner_is_dead(owner: str) -> bool:
    """True when a lease owner (``host:pid:role``) is a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's worker: only its lease expiry can tell
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by another user
    return False
