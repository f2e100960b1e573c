"""Supervisor step: run the worker in a process of its own, restart it when it dies, kill it when it stalls.

Decoding untrusted pixel data can crash the process (a Rust decoder panics, a native library segfaults),
allocate gigabytes, or hold the GIL for seconds. In its own process it can do none of this to the SCP
or the sender, and the supervisor (a thread of the node's main process) sees it happen:

- the worker process (``multiprocessing`` spawn) builds its own engine, ``Store`` and ``Ensemble``
  and runs ``Worker.run_forever``; it publishes its current job in a ``JobHeartbeat`` (shared memory:
  no message per image) and sets a shared event when a job ended, which wakes the node's sender;
- it dies with the node: ``PR_SET_PDEATHSIG`` (SIGKILL) on Linux, and a thread that watches the parent;
- the supervisor restarts it when it dies, after ``RESTART_INITIAL_S`` doubling to ``RESTART_MAX_S``
  while it keeps dying (a crash loop stays visible in the log, and bounded);
- it kills it (SIGKILL) when a job runs longer than ``worker.job_timeout_s`` or its resident memory
  (``VmRSS``) passes ``worker.max_memory_mb``;
- every death or kill during a job is recorded durably (``Store.record_incident``, kinds crash, stall,
  memory) and the job returns to the queue; the worker quarantines a job with ``QUARANTINE_AFTER``
  incidents (a "not analysed" SR, the job failed), so no image can kill the worker forever;
- while a job runs, the supervisor renews its lease every ``worker.lease_s`` / 3: a slow job is never
  reaped and run twice, and a node that is gone is still found out after ``worker.lease_s``;
- every ``BEAT_S`` it writes the worker's heartbeat to the database (``Store.beat``) while the process
  is alive and answering, for ``cxr-node health``.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_sentinels
from multiprocessing.process import BaseProcess
from typing import Any

from ai.errors import ModelPackageError
from node.backoff import backoff_s
from node.config import Settings
from node.leases import QUARANTINE_AFTER, HeartbeatState, JobHeartbeat, owner_is_dead, process_owner
from node.live import LiveSettings
from storage.db import INCIDENT_CRASH, INCIDENT_MEMORY, INCIDENT_STALL
from storage.queue import Store

log = logging.getLogger(__name__)

RESTART_INITIAL_S = 0.5  # first restart delay after the worker process died
RESTART_MAX_S = 30.0  # the delay doubles per death in a row up to this
STABLE_S = 60.0  # a process that lived this long, or finished a job, was healthy: the delay starts over
CHECK_S = 0.2  # how often the supervisor looks at the process (exit, job time, memory)
WORKER_START_S = 120.0  # a worker process that is not ready after this failed to start
WORKER_STOP_S = 30.0  # SIGTERM, then SIGKILL after this
IDLE_SILENCE_S = 60.0  # an idle worker that gave no sign of life for this long (nor job_timeout_s) is wedged
BEAT_S = 5.0  # the database heartbeat period (node.health reads it)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_MODEL = 2  # the worker process's exit status when the model package cannot be loaded


class WorkerProcessError(RuntimeError):
    """The worker process could not be started (it exited or did not get ready)."""


@dataclass(frozen=True)
class WorkerReady:
    """What a worker process reports once it can take jobs."""

    pid: int
    model: str  # name, version and providers of the loaded package


def resident_mb(pid: int) -> float | None:
    """Resident memory of a process (``VmRSS`` of ``/proc/<pid>/status``) in MiB; None if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def describe_exit(exitcode: int | None) -> str:
    """An exit status as words: ``exit status 1`` or ``signal SIGKILL``."""
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), however the parent ends.

    ``PR_SET_PDEATHSIG`` fires when the thread that started this process ends, which is the supervisor
    thread: it outlives its worker. A parent that died before the call is caught by the pid check.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("worker process: prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
    if os.getppid() != parent_pid:
        os._exit(1)


def _watch_parent(parent: BaseProcess, stop: threading.Event) -> None:
    wait_sentinels([parent.sentinel])
    stop.set()


def run_worker_child(
    settings: Settings, log_level: int, heartbeat: JobHeartbeat, results: Any, conn: Connection
) -> None:
    """Entry point of the worker process (spawned): load the model, report ready on ``conn``, run jobs
    until SIGTERM/SIGINT or the parent is gone. ``results`` (a multiprocessing Event) is set after each job."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        die_with_parent(parent.pid)
    from node.logs import setup_logging
    from node.packages import load_ensemble, load_gate, load_shadow
    from node.worker import Worker
    from storage.db import make_engine

    setup_logging(logging.getLevelName(log_level))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if parent is not None:
        threading.Thread(target=_watch_parent, args=(parent, stop), name="parent-watch", daemon=True).start()
    try:
        ensemble = load_ensemble(settings)
        gate = load_gate(settings)
        shadow = load_shadow(settings)
    except ModelPackageError as exc:
        conn.send(("model", str(exc)))
        sys.exit(EXIT_MODEL)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    store = Store(make_engine(settings.database_url), max_attempts=settings.worker.max_attempts)
    live = LiveSettings(settings, store)  # destinations and thresholds as the console changes them
    live.refresh()
    worker = Worker(store, ensemble, settings, owner=process_owner(os.getpid()), on_done=results.set,
                    heartbeat=heartbeat, gate=gate, shadow=shadow, live=live)
    manifest = ensemble.manifest
    heartbeat.beat()
    conn.send(("ready", f"{manifest.name} {manifest.version} on {', '.join(ensemble.providers)}"))
    conn.close()
    worker.run_forever(stop)


class WorkerSupervisor:
    """Starts the worker process and keeps one running until ``stop``.

    Args:
        settings: the node settings (the worker process rebuilds everything from them).
        store: the node's own queue (incidents, lease renewal, heartbeat rows).
        on_results: called in the node's process after the worker ended a job (``kick_send``).
        log_level: the worker process's log level.
    """

    def __init__(self, settings: Settings, store: Store, on_results: Callable[[], None] | None,
                 log_level: int = logging.INFO) -> None:
        self.settings = settings
        self.store = store
        self.on_results = on_results
        self.log_level = log_level
        self._ctx = multiprocessing.get_context("spawn")
        self.heartbeat = JobHeartbeat(self._ctx)
        self._results = self._ctx.Event()
        self._stop = threading.Event()
        self._first = threading.Event()
        self._first_error: BaseException | None = None
        self._proc: BaseProcess | None = None
        self._started_at = 0.0
        self._restart_at = 0.0  # when no process runs: when the next start is due
        self._deaths_in_row = 0
        self._renewed: tuple[int, float] = (0, 0.0)  # (job id, when its lease was last renewed)
        self._beat_at = 0.0
        self._threads: list[threading.Thread] = []
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The current worker process's pid (None while none runs)."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout_s: float = WORKER_START_S) -> None:
        """Start the worker process and return once it is ready to take jobs.

        Raises:
            ModelPackageError: the worker process could not load the model package.
            WorkerProcessError: it exited or was not ready within ``timeout_s``.
        """
        t = threading.Thread(target=self._supervise, args=(timeout_s,), name="worker-supervisor", daemon=True)
        t.start()
        self._threads.append(t)
        self._first.wait()
        if self._first_error is not None:
            raise self._first_error
        w = threading.Thread(target=self._wake_sender, name="worker-results", daemon=True)
        w.start()
        self._threads.append(w)

    def stop(self) -> None:
        """Stop the worker process (SIGTERM: it finishes its job; SIGKILL after ``WORKER_STOP_S``)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=WORKER_STOP_S + 10)
        self._threads.clear()

    # ----------------------------------------------------------------- the supervisor thread

    def _supervise(self, timeout_s: float) -> None:
        """The supervisor thread: it starts every worker process (``PR_SET_PDEATHSIG`` follows this thread)."""
        try:
            self._spawn(timeout_s)
        except BaseException as exc:  # handed to start(), which raises it in the caller
            self._first_error = exc
            self._first.set()
            return
        self._first.set()
        try:
            while not self._stop.is_set():
                try:
                    self._check()
                except Exception:  # the database may be down: keep supervising, the queue is durable
                    log.exception("worker supervisor: check failed; continuing")
                    self._stop.wait(CHECK_S)
        finally:
            self._terminate()

    def _spawn(self, timeout_s: float) -> WorkerReady:
        """Start a worker process and wait until it reports ready.

        Raises:
            ModelPackageError, WorkerProcessError: as ``start``.
        """
        self.heartbeat.reset()
        receiver, sender = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=run_worker_child, name="cxr-node-worker", daemon=True,
            args=(self.settings, self.log_level, self.heartbeat, self._results, sender))
        proc.start()
        sender.close()
        try:
            message = self._await_ready(proc, receiver, timeout_s)
        finally:
            receiver.close()
        self._proc, self._started_at = proc, time.monotonic()
        ready = WorkerReady(pid=int(proc.pid or 0), model=message)
        log.info("worker process %d ready: model %s", ready.pid, ready.model)
        return ready

    def _await_ready(self, proc: BaseProcess, receiver: Connection, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if receiver.poll(0.1):
                try:
                    kind, text = receiver.recv()
                except EOFError:  # it exited without a word
                    break
                if kind == "ready":
                    return str(text)
                proc.join(timeout=10)
                if kind == "model":
                    raise ModelPackageError(text)
                raise WorkerProcessError(f"worker process {proc.pid} failed to start: {text}")
            if not proc.is_alive():
                break
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)
        if self._stop.is_set():
            raise WorkerProcessError(f"worker process {proc.pid}: stopped while starting")
        raise WorkerProcessError(f"worker process {proc.pid}: expected to be ready within {timeout_s:.0f} s, "
                                 f"found it ended with {describe_exit(proc.exitcode)}")

    def _check(self) -> None:
        """One look at the worker process: its exit, its job's time, its memory; renew and beat."""
        proc = self._proc
        if proc is None:
            self._restart_when_due()
            return
        if wait_sentinels([proc.sentinel], timeout=CHECK_S):
            self._after_death(proc, INCIDENT_CRASH, "", self.heartbeat.read())
            return
        state = self.heartbeat.read()
        now = time.monotonic()
        timeout = self.settings.worker.job_timeout_s
        limit = self.settings.worker.max_memory_mb
        rss = resident_mb(int(proc.pid or 0))
        if state.job_id is not None and now - state.job_started > timeout:
            self._kill(proc, INCIDENT_STALL, state, f"job ran {now - state.job_started:.0f} s, longer than "
                                                    f"worker.job_timeout_s ({timeout:.0f} s)")
        elif rss is not None and rss > limit:
            self._kill(proc, INCIDENT_MEMORY, state, f"resident memory {rss:.0f} MB, above "
                                                     f"worker.max_memory_mb ({limit} MB)")
        elif state.job_id is None and now - state.beat_at > max(timeout, IDLE_SILENCE_S):
            self._kill(proc, INCIDENT_STALL, state, f"idle and silent for {now - state.beat_at:.0f} s")
        else:
            self._renew_lease(proc, state, now)
            self._beat(proc, state, now)

    def _kill(self, proc: BaseProcess, kind: str, state: HeartbeatState, detail: str) -> None:
        log.error("worker process %d: %s: killing it", proc.pid, detail)
        proc.kill()
        proc.join(timeout=10)
        self._after_death(proc, kind, detail, state)

    def _after_death(self, proc: BaseProcess, kind: str, detail: str, state: HeartbeatState) -> None:
        """Record the incident of the job it was running, return its jobs to the queue, plan the restart."""
        proc.join(timeout=10)
        owner = process_owner(int(proc.pid or 0))
        ended = describe_exit(proc.exitcode)
        detail = f"{detail}; {ended}" if detail else ended
        lived = time.monotonic() - self._started_at
        healthy = lived >= STABLE_S or state.jobs_finished > 0
        self._deaths_in_row = 1 if healthy else self._deaths_in_row + 1
        delay = self._plan_restart()
        self._proc = None
        self._record(owner, kind, detail, state)
        log.error("worker process %d ended (%s) after %.0f s; restarting in %.1f s (%d in a row)",
                  proc.pid, detail, lived, delay, self._deaths_in_row)

    def _plan_restart(self) -> float:
        """Set when the next start is due: ``RESTART_INITIAL_S`` doubling per death in a row; the delay."""
        delay = backoff_s(self._deaths_in_row, RESTART_INITIAL_S, RESTART_MAX_S)
        self._restart_at = time.monotonic() + delay
        return delay

    def _restart_when_due(self) -> None:
        """Start a new worker process once its restart is due; a failed start backs off further."""
        wait = self._restart_at - time.monotonic()
        if wait > 0:
            self._stop.wait(min(wait, CHECK_S))
            return
        self.restarts += 1
        try:
            self._spawn(WORKER_START_S)
        except (ModelPackageError, WorkerProcessError) as exc:
            self._deaths_in_row += 1
            delay = self._plan_restart()
            log.error("worker restart failed: %s; next try in %.1f s (%d in a row)", exc, delay,
                      self._deaths_in_row)

    def _record(self, owner: str, kind: str, detail: str, state: HeartbeatState) -> None:
        """The incident of the job it ran (if any), then every job of a dead local owner back to the queue."""
        try:
            self.store.forget_heartbeat(owner)
            if state.job_id is not None:
                count = self.store.record_incident(state.job_id, owner, kind, detail,
                                                   give_up_after=QUARANTINE_AFTER)
                log.error("job %d: worker process %s (%s): incident %d; quarantined when %d", state.job_id,
                          "killed" if kind != INCIDENT_CRASH else "died", kind, count, QUARANTINE_AFTER)
            self.store.reap_expired_leases(owner_is_dead)
        except Exception:  # the lease reaper returns the job later; the incident is lost, the job is not
            log.exception("worker supervisor: could not record the incident of %s", owner)

    def _renew_lease(self, proc: BaseProcess, state: HeartbeatState, now: float) -> None:
        """Renew a running job's lease every ``worker.lease_s`` / 3."""
        if state.job_id is None:
            return
        lease_s = self.settings.worker.lease_s
        job_id, last = self._renewed
        since = last if job_id == state.job_id else state.job_started
        if now - since < lease_s / 3:
            return
        self._renewed = (state.job_id, now)
        if not self.store.renew_lease(state.job_id, process_owner(int(proc.pid or 0)), lease_s):
            log.warning("job %d: lease no longer held by worker process %d", state.job_id, proc.pid)

    def _beat(self, proc: BaseProcess, state: HeartbeatState, now: float) -> None:
        if now - self._beat_at >= BEAT_S:
            self._beat_at = now
            self.store.beat(process_owner(int(proc.pid or 0)), "worker", state.job_id)

    def _terminate(self) -> None:
        """Stop the current worker process: SIGTERM, SIGKILL after ``WORKER_STOP_S``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=WORKER_STOP_S)
            if proc.is_alive():
                log.error("worker process %d did not stop within %.0f s: killed", proc.pid, WORKER_STOP_S)
                proc.kill()
                proc.join(timeout=10)
        try:
            self.store.forget_heartbeat(process_owner(int(proc.pid or 0)))
        except Exception:
            log.warning("worker supervisor: could not remove the heartbeat of worker process %d", proc.pid)

    # ------------------------------------------------------------------- the sender's wake-up

    def _wake_sender(self) -> None:
        """Call ``on_results`` as soon as the worker process ended a job (it sets the shared event)."""
        while not self._stop.is_set():
            if self._results.wait(0.5):
                self._results.clear()
                if self.on_results is not None:
                    try:
                        self.on_results()
                    except Exception:
                        log.exception("worker supervisor: waking the sender failed")
