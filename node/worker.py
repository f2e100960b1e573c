"""Worker step: lease a queued job, analyse the image, write the SR and overlay, queue them for sending.

One job = one received frontal chest image. The worker decodes the pixels (``ai.pixels``), runs the
one preprocessing shared with training (``ai.preprocess``) and the ONNX ensemble (``ai.ensemble``),
builds the results (``node.results``), writes them durably and records them with their outbox rows
in one transaction (``storage.queue.Store.complete_job``). Result SOP Instance UIDs are derived from
the source instance and the model version, so a job re-run after a crash produces the same objects.

Failures are classified by exception type: ``UnsupportedImage`` still yields a result (an SR that says
why the image could not be analysed); other ``PermanentError``s fail the job for good; anything else
(``RetryableError``, ``OSError``, unexpected errors) is retried with exponential backoff until the
attempt limit, then failed. Every failure is visible in ``cxr-node status``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ai.ensemble import Ensemble
from ai.errors import PermanentError, UnsupportedImage
from ai.findings import Finding
from ai.pixels import dicom_to_float
from ai.preprocess import Letterbox, preprocess_gray, to_model_input
from node.config import Settings
from node.results import AlgorithmInfo, build_failure_sr, build_overlay, build_sr
from storage.files import result_path, write_atomic
from storage.queue import LeasedJob, ResultRecord, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """What the model said about one image, with what is needed to draw it on the source."""

    image: np.ndarray  # the decoded source image, float32 [0, 1], source shape
    findings: list[Finding]
    letterbox: Letterbox


def analyse_dataset(ds: pydicom.Dataset, ensemble: Ensemble) -> Analysis:
    """Decode, preprocess and score one dataset (raises ``UnsupportedImage`` if it cannot be analysed)."""
    image = dicom_to_float(ds)
    gray, box = preprocess_gray(image, ensemble.manifest.preprocess)
    findings = ensemble.findings(to_model_input(gray, ensemble.manifest.preprocess))
    return Analysis(image=image, findings=findings, letterbox=box)


def relative_heatmap(heatmap: np.ndarray, floor_percentile: float = 50.0) -> np.ndarray:
    """Where the evidence for a flagged finding is strongest: the map rescaled from its median to its maximum.

    The model's map (sigmoid of the class activation map) is high almost everywhere on a strongly positive
    image; shown as is, it would colour the whole chest. For the overlay, the half of the map below the
    median is cleared and the rest spans [0, 1], so the colour points at the regions that drive the score.
    """
    lo = float(np.percentile(heatmap, floor_percentile))
    hi = float(heatmap.max())
    if hi - lo < 1e-6:
        return np.zeros_like(heatmap, dtype=np.float32)
    return np.clip((heatmap - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def default_owner() -> str:
    """A lease owner name unique to this process: host, pid and thread."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class Worker:
    """Processes jobs from the shared queue until stopped.

    Args:
        store: the queue.
        ensemble: the loaded model package.
        settings: the node settings (data_dir, worker, destinations, scp AE title).
        owner: the lease owner name (default: host:pid:thread).
        on_done: called after a job's results are recorded (wakes the sender).
    """

    def __init__(
        self,
        store: Store,
        ensemble: Ensemble,
        settings: Settings,
        owner: str | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.on_done = on_done
        self.ensemble = ensemble
        self.settings = settings
        self.owner = owner or default_owner()
        self.data_dir = settings.data_path
        manifest = ensemble.manifest
        self.algorithm = AlgorithmInfo(name=manifest.name, version=manifest.version)
        self.destinations = [d.name for d in settings.destinations]
        self.device_ae = settings.scp.ae_title

    def run_once(self) -> bool:
        """Lease and process one job; False when no job was due."""
        job = self.store.lease_job(self.owner, self.settings.worker.lease_s)
        if job is None:
            return False
        started = time.perf_counter()
        try:
            kinds = self.process(job)
        except Exception as exc:  # the type decides retry; nothing escapes the worker loop
            self._fail(job, exc)
        else:
            log.info("job %d: %s done in %.0f ms (%s)", job.job_id, job.sop_instance_uid,
                     1000 * (time.perf_counter() - started), ", ".join(kinds))
            if self.on_done is not None:
                self.on_done()
        return True

    def run_forever(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; poll every ``worker.poll_s`` when idle."""
        log.info("worker %s started", self.owner)
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # database down: log and keep polling, the queue is durable
                log.exception("worker %s: could not lease a job; retrying", self.owner)
                busy = False
            if not busy:
                stop.wait(self.settings.worker.poll_s)
        log.info("worker %s stopped", self.owner)

    def process(self, job: LeasedJob) -> list[str]:
        """Run one job end to end and record its results; returns the result kinds produced."""
        ds = read_source(job)
        try:
            analysis = analyse_dataset(ds, self.ensemble)
        except UnsupportedImage as exc:
            log.warning("job %d: %s not analysable: %s", job.job_id, job.sop_instance_uid, exc)
            objects = [("failure_sr", build_failure_sr(ds, str(exc), self.algorithm, device_ae=self.device_ae))]
        else:
            objects = self._build_results(ds, analysis)
        records = [self._write(kind, obj) for kind, obj in objects]
        self.store.complete_job(job.job_id, records, self.destinations)
        return [kind for kind, _ in objects]

    def _build_results(self, ds: pydicom.Dataset, analysis: Analysis) -> list[tuple[str, pydicom.Dataset]]:
        sr = build_sr(ds, analysis.findings, self.algorithm, device_ae=self.device_ae)
        objects: list[tuple[str, pydicom.Dataset]] = [("sr", sr)]
        if self.settings.model.heatmap:
            heatmaps = {
                f.label: analysis.letterbox.to_source(relative_heatmap(f.heatmap))
                for f in analysis.findings
                if f.positive and f.heatmap is not None
            }
            sc = build_overlay(ds, analysis.image, analysis.findings, self.algorithm, heatmaps,
                               device_ae=self.device_ae)
            objects.append(("sc", sc))
        return objects

    def _write(self, kind: str, ds: pydicom.Dataset) -> ResultRecord:
        path = result_path(self.data_dir, ds.StudyInstanceUID, ds.SOPInstanceUID)
        write_atomic(path, lambda f: ds.save_as(f, enforce_file_format=True))
        return ResultRecord(kind=kind, sop_instance_uid=ds.SOPInstanceUID, path=path)

    def _fail(self, job: LeasedJob, exc: Exception) -> None:
        retryable = not isinstance(exc, PermanentError)
        delay = self.settings.worker.retry_initial_s * 2 ** max(job.attempts - 1, 0)
        retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        error = f"{type(exc).__name__}: {exc}"
        state = self.store.fail_job(job.job_id, error, retryable=retryable, retry_at=retry_at)
        if isinstance(exc, PermanentError | OSError):
            log.error("job %d: %s failed (%s, now %s): %s", job.job_id, job.sop_instance_uid,
                      "retryable" if retryable else "permanent", state, exc)
        else:
            log.exception("job %d: %s failed unexpectedly (now %s)", job.job_id, job.sop_instance_uid, state)


def read_source(job: LeasedJob) -> pydicom.Dataset:
    """Read the received file of a job; an unreadable file is a permanent failure."""
    try:
        return pydicom.dcmread(job.path)
    except FileNotFoundError as exc:
        raise PermanentError(f"received file of {job.sop_instance_uid} is missing: {job.path}") from exc
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise PermanentError(f"received file of {job.sop_instance_uid} is not readable DICOM: {exc}") from exc


def owner_is_dead(owner: str) -> bool:
    """True when a lease owner (``host:pid:thread``) is a process of this host that no longer exists."""
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


def analysable_paths(paths: Sequence[Path]) -> list[Path]:
    """Expand folders into the files they contain (sorted), for offline prediction."""
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return out
