"""Worker step: lease a queued job, analyse the image, write the SR and overlay, queue them for sending.

One job = one received frontal chest image. The worker decodes the pixels (``ai.pixels``), lets the input
gate (``ai.gate``) refuse what is not a frontal chest radiograph whatever its tags say ("not analysed" SR
with the gate's reason), runs the one preprocessing shared with training (``ai.preprocess``) and the ONNX
ensemble (``ai.ensemble``),
builds the results (``node.results``), writes them durably and records them with their outbox rows
in one transaction (``storage.queue.Store.complete_job``). Result SOP Instance UIDs are derived from
the source instance and the model version, so a job re-run after a crash produces the same objects.

Failures are classified by exception type: ``UnsupportedImage`` still yields a result (an SR that says
why the image could not be analysed); other ``PermanentError``s fail the job for good; anything else
(``RetryableError``, ``OSError``, unexpected errors) is retried with exponential backoff (``node.backoff``) until the
attempt limit, then failed. A job failed for good also gets that "not analysed" SR (built from the
received file's header), so the PACS learns of every accepted image. A full disk while writing results
(``DiskFull``) is no failure: the job waits for space without using an attempt, with one alert per
disk-full episode. Every failure and wait is visible in ``cxr-node status``.

Nothing a job raises stops the run loop (``BaseException`` included, such as a Rust decoder's panic;
only the interrupts meant for the process pass). The node runs this loop in a process of its own
(``node.supervisor``), which publishes what it is doing in a ``JobHeartbeat`` (shared memory, no IPC per
image); a job on which that process died or was killed ``QUARANTINE_AFTER`` times is not analysed again:
it is failed with a "not analysed" SR made from its header alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ai.analyse import Analysis, analyse_dataset, analyse_image
from ai.applicability import patient_age_years
from ai.ensemble import Ensemble, Finding
from ai.errors import PROCESS_EXITS, ImageRefused, PermanentError, UnsupportedImage
from ai.gate import InputGate
from node.backoff import backoff_s
from node.config import Settings
from node.leases import QUARANTINE_AFTER, JobHeartbeat, default_owner
from node.live import LiveSettings
from node.metrics import INFERENCE_SECONDS, JOBS_FINISHED, PROCESSING_SECONDS
from node.privacy import describe, message_of
from node.results import (
    AlgorithmInfo,
    ResultBuildError,
    build_failure_sr,
    build_not_analysed_overlay,
    build_overlay,
    build_sr,
    scrub_reason,
)
from node.sites import apply_site_thresholds, auto_accept, score_records, site_of
from storage.db import INCIDENT_CRASH, INCIDENT_MEMORY, INCIDENT_STALL
from storage.files import DiskFull, free_bytes, result_path, write_atomic
from storage.queue import Incident, LeasedJob, ResultRecord, ScoreRecord, Store

log = logging.getLogger(__name__)

MB = 1024 * 1024
#: Longest wait before a job whose results met a full disk is tried again (``worker.retry_initial_s`` if shorter).
DISK_WAIT_MAX_S = 30.0


class Worker:
    """Processes jobs from the shared queue until stopped.

    Args:
        store: the queue.
        ensemble: the loaded model package.
        settings: the node settings (data_dir, worker, destinations, scp AE title).
        owner: the lease owner name (default: host:pid:thread).
        on_done: called after a job ends, done or failed, when it may have recorded results (wakes the sender).
        heartbeat: where the current job and signs of life are published for a supervisor (None: nowhere).
        gate: the input gate run before the model (None: every decodable image is scored).
        shadow: a candidate package run beside the live one on every analysed image (``[model] shadow_package``):
            its SR and scores are stored, never sent; a failure of it never touches the live result.
    """

    def __init__(
        self,
        store: Store,
        ensemble: Ensemble,
        settings: Settings,
        owner: str | None = None,
        on_done: Callable[[], None] | None = None,
        heartbeat: JobHeartbeat | None = None,
        gate: InputGate | None = None,
        shadow: Ensemble | None = None,
        live: LiveSettings | None = None,
    ) -> None:
        self.store = store
        self.shadow = shadow
        self.gate = gate
        self.on_done = on_done
        self.heartbeat = heartbeat
        self.ensemble = ensemble
        self.settings = settings
        self.owner = owner or default_owner()
        self.data_dir = settings.data_path
        manifest = ensemble.manifest
        self.algorithm = AlgorithmInfo(name=manifest.name, version=manifest.version)
        self.live = live
        self.shadow_sites = set(settings.sites.shadow)
        self.device_ae = settings.scp.ae_title

    @property
    def destinations(self) -> list[str]:
        """The destinations a job's results are queued for (shadow ones: kept, never sent), as in force now."""
        current = self.live.current if self.live is not None else self.settings
        return [d.name for d in current.destinations if not d.shadow]

    def console_thresholds(self, findings: Sequence[Finding]) -> list[Finding]:
        """The findings with the console's threshold overrides in force (``PUT /api/v1/thresholds``; they win over
        node.toml's and lose to a site's accepted threshold)."""
        if self.live is None:
            return list(findings)
        changes = self.live.changes
        out = []
        for f in findings:
            change = changes.get(f"thresholds.{f.label}")
            if change is None or change.new_value is None:
                out.append(f)
                continue
            value = float(change.new_value)  # type: ignore[arg-type]
            method = f"console override v{change.id} by {change.changed_by} ({change.changed_at:%Y-%m-%d})"
            out.append(dataclasses.replace(f, threshold=value, threshold_method=method,
                                           positive=(not f.not_applicable) and f.probability >= value))
        return out

    def run_once(self) -> bool:
        """Lease and run one job; False when no job was due (or results wait for disk space).

        Whatever the job raises is recorded as its failure (the type decides retry): a ``BaseException``
        that is no ``Exception`` (a native extension's panic) counts as a ``PermanentError``. Only
        ``PROCESS_EXITS`` pass through.
        """
        if not self.results_space_ok():  # results wait for disk space: analysing now would be wasted
            return False
        if self.live is not None:
            self.live.refresh()  # destinations and thresholds as the console has them now
        job = self.store.lease_job(self.owner, self.settings.worker.lease_s)
        if job is None:
            return False
        if self.heartbeat is not None:
            self.heartbeat.start_job(job.job_id)
        started = time.perf_counter()
        try:
            outcome, kinds = self._run_job(job)
        except PROCESS_EXITS:
            raise
        except BaseException as exc:  # nothing a job throws stops the worker loop
            self._fail(job, exc if isinstance(exc, Exception) else escaped_error(exc))
            JOBS_FINISHED.labels("failed").inc()
        else:
            JOBS_FINISHED.labels(outcome).inc()
            PROCESSING_SECONDS.observe(time.perf_counter() - started)
            log.info("job %d: %s %s in %.0f ms (%s)", job.job_id, job.sop_instance_uid, outcome,
                     1000 * (time.perf_counter() - started), ", ".join(kinds) or "no results")
        finally:
            if self.heartbeat is not None:
                self.heartbeat.end_job()
        if self.on_done is not None:
            self.on_done()
        return True

    def run_forever(self, stop: threading.Event | Any) -> None:
        """Run jobs until ``stop`` (a threading or multiprocessing Event) is set; poll every ``worker.poll_s``
        when idle. Only ``PROCESS_EXITS`` end the loop otherwise."""
        log.info("worker %s started", self.owner)
        while not stop.is_set():
            if self.heartbeat is not None:
                self.heartbeat.beat()
            try:
                busy = self.run_once()
            except PROCESS_EXITS:
                raise
            except BaseException:  # database down: log and keep polling, the queue is durable
                log.exception("worker %s: could not lease a job or record its outcome; retrying", self.owner)
                busy = False
            if not busy:
                stop.wait(self.settings.worker.poll_s)
        log.info("worker %s stopped", self.owner)

    def _run_job(self, job: LeasedJob) -> tuple[str, list[str]]:
        """Analyse a job, or quarantine it when the worker process died on it ``QUARANTINE_AFTER`` times.

        Returns:
            The outcome ("done" or "quarantined") and the kinds of the results recorded.
        """
        if job.attempts > self.store.max_attempts:  # its earlier runs ended without a result (leases expired)
            reason = (f"analysis did not finish in {self.store.max_attempts} attempts "
                      "(each run ended without a result)")
            return "given up", self.end_without_analysis(job, reason, "attempts used up")
        incidents = self.store.incidents(job.job_id)
        if len(incidents) >= QUARANTINE_AFTER:
            return "quarantined", self.quarantine(job, incidents)
        return "done", self.process(job)

    def quarantine(self, job: LeasedJob, incidents: Sequence[Incident]) -> list[str]:
        """Fail a job for good without touching its pixels, with a "not analysed" SR made from its header."""
        reason = quarantine_reason(incidents, self.settings)
        kinds = ", ".join(i.kind for i in incidents)
        return self.end_without_analysis(job, reason, f"quarantined after {len(incidents)} incidents ({kinds})")

    def end_without_analysis(self, job: LeasedJob, reason: str, why: str) -> list[str]:
        """Fail a job for good without touching its pixels; its "not analysed" SR (from the header) says
        ``reason``. Returns the kinds of the results recorded."""
        records = self.not_analysed_results(job, reason)
        self.store.fail_job(job.job_id, f"{why}: {reason}", retryable=False, results=records,
                            destinations=self.destinations)
        log.error("job %d: %s %s%s", job.job_id, job.sop_instance_uid, why,
                  ": not-analysed SR queued" if records else ": no header, no SR")
        return [r.kind for r in records]

    def process(self, job: LeasedJob) -> list[str]:
        """Run one job end to end and record its results; returns the result kinds produced."""
        ds = read_source(job)
        scores: list[ScoreRecord] = []  # the site's score history: analysed images only
        site = site_of(ds, job.calling_ae, self.settings.sites.key)
        # a site in its validation period ([sites] shadow): its results are kept, not delivered
        destinations = [] if site in self.shadow_sites else self.destinations
        try:
            with INFERENCE_SECONDS.time():
                analysis = analyse_dataset(ds, self.ensemble, self.gate)
        except ImageRefused as exc:
            log.warning("job %d: %s not analysed: %s", job.job_id, job.sop_instance_uid, exc.reason)
            objects = [("failure_sr", build_failure_sr(ds, exc.reason, self.algorithm, device_ae=self.device_ae,
                                                       own_reason=True))]
            if self.settings.model.heatmap:  # the refused image under a NOT ANALYSED banner, beside the SR
                objects.append(("failure_sc", build_not_analysed_overlay(
                    ds, exc.image if isinstance(exc.image, np.ndarray) else None, exc.reason, self.algorithm,
                    device_ae=self.device_ae)))
        except UnsupportedImage as exc:
            reason = scrub_reason(message_of(exc))
            log.warning("job %d: %s not analysable: %s", job.job_id, job.sop_instance_uid, reason)
            objects = [("failure_sr", build_failure_sr(ds, reason, self.algorithm, device_ae=self.device_ae))]
        else:
            manifest = self.ensemble.manifest
            analysis = dataclasses.replace(analysis, findings=self.console_thresholds(analysis.findings))
            accepted = self.store.site_thresholds(manifest.version, site, manifest.same_score_versions)
            if accepted:  # the site's own thresholds, accepted for this model version (or one that scores alike)
                analysis = dataclasses.replace(
                    analysis, findings=apply_site_thresholds(analysis.findings, site, accepted))
            objects = self._build_results(ds, analysis)
            scores = score_records(site, manifest, analysis.findings)
            shadow = self._shadow(job, ds, analysis, site)
            if shadow is not None:
                objects.append(("shadow_sr", shadow[0]))
                scores += shadow[1]
        records = [self._write(kind, obj) for kind, obj in objects]
        self.store.complete_job(job.job_id, records, destinations, scores)
        if scores and self.settings.sites.adapt == "auto":
            self._auto_adapt(site)
        return [kind for kind, _ in objects]

    def _auto_adapt(self, site: str) -> None:
        """``[sites] adapt = "auto"``: the site's suggestions put in force once it has enough images (audited);
        a failure here is logged and never touches the finished job."""
        sites = self.settings.sites
        try:
            auto_accept(self.store, self.ensemble.manifest, site, sites.min_images, self.settings.site_prevalence,
                        sites.drift_alert)
        except Exception as exc:
            log.warning("site %s: automatic site threshold not computed: %s", site, describe(exc))

    def _shadow(self, job: LeasedJob, ds: pydicom.Dataset, analysis: Analysis,
                site: str) -> tuple[pydicom.Dataset, list[ScoreRecord]] | None:
        """The shadow package's SR and scores for an image the live package analysed, or None (no shadow, or it
        failed: logged, and the live result goes on alone)."""
        if self.shadow is None:
            return None
        manifest = self.shadow.manifest
        try:
            findings = analyse_image(analysis.image, self.shadow, None, patient_age_years(ds)).findings
            algorithm = AlgorithmInfo(name=manifest.name, version=manifest.version)
            sr = build_sr(ds, findings, algorithm, device_ae=self.device_ae)
        except Exception as exc:  # the shadow is a candidate under observation: it never fails the live job
            log.warning("job %d: shadow package %s %s failed: %s", job.job_id, manifest.name, manifest.version,
                        describe(exc))
            return None
        return sr, score_records(site, manifest, findings)

    def _build_results(self, ds: pydicom.Dataset, analysis: Analysis) -> list[tuple[str, pydicom.Dataset]]:
        sr = build_sr(ds, analysis.findings, self.algorithm, device_ae=self.device_ae)
        objects: list[tuple[str, pydicom.Dataset]] = [("sr", sr)]
        if self.settings.model.heatmap:
            heatmaps = {
                f.label: analysis.letterbox.to_source(f.heatmap)  # the overlay scales it (node.overlay.evidence)
                for f in analysis.findings
                if f.flags and f.heatmap is not None  # only these are outlined (node.overlay)
            }
            sc = build_overlay(ds, analysis.image, analysis.findings, self.algorithm, heatmaps,
                               device_ae=self.device_ae)
            objects.append(("sc", sc))
        return objects

    def _write(self, kind: str, ds: pydicom.Dataset) -> ResultRecord:
        """Write one result durably.

        Raises:
            DiskFull: the disk is full, or results already wait for disk space and less than
                ``storage.min_free_mb`` is free (:meth:`results_space_ok`).
        """
        path = result_path(self.data_dir, ds.StudyInstanceUID, ds.SOPInstanceUID)
        if not self.results_space_ok():
            raise DiskFull(errno.ENOSPC, f"results wait for disk space: {self._space_text()}", str(path))
        write_atomic(path, lambda f: ds.save_as(f, enforce_file_format=True))
        return ResultRecord(kind=kind, sop_instance_uid=ds.SOPInstanceUID, path=path)

    def results_space_ok(self) -> bool:
        """False while results wait for disk space and less than ``storage.min_free_mb`` is free.

        Below ``min_free_mb`` the intake refuses new images; the space left is the results' reserve,
        used until a write meets a full disk. From then on no result is written (and the run loop may
        skip leasing) until ``min_free_mb`` is free again, so the waiting jobs do not fill it at once.
        """
        if free_bytes(self.data_dir) >= self.settings.storage.min_free_mb * MB:
            return True
        return self.store.results_waiting_for_disk() == 0

    def _space_text(self) -> str:
        return (f"{free_bytes(self.data_dir) // MB} MB free in {self.data_dir}, expected "
                f"storage.min_free_mb ({self.settings.storage.min_free_mb} MB)")

    def _fail(self, job: LeasedJob, exc: Exception) -> None:
        """Record a failed run: retry, or fail for good with a "not analysed" SR; a full disk only waits."""
        if isinstance(exc, DiskFull):
            self._wait_for_disk(job, exc)
            return
        retryable = not isinstance(exc, PermanentError)
        delay = backoff_s(job.attempts, self.settings.worker.retry_initial_s, self.settings.worker.retry_max_s)
        retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        error = f"{type(exc).__name__}: {scrub_reason(message_of(exc))}"
        final = not retryable or job.attempts >= self.store.max_attempts
        try:
            records = self.not_analysed_results(job, not_analysed_reason(exc, job.attempts)) if final else []
        except DiskFull as full:
            self._wait_for_disk(job, full)
            return
        state = self.store.fail_job(job.job_id, error, retryable=retryable, retry_at=retry_at,
                                    results=records, destinations=self.destinations)
        told = " (not-analysed SR queued)" if records else ""
        if isinstance(exc, PermanentError | OSError):
            log.error("job %d: %s failed (%s, now %s%s): %s", job.job_id, job.sop_instance_uid,
                      "retryable" if retryable else "permanent", state, told, error)
        else:
            log.exception("job %d: %s failed unexpectedly (now %s%s)", job.job_id, job.sop_instance_uid,
                          state, told)

    def not_analysed_results(self, job: LeasedJob, reason: str) -> list[ResultRecord]:
        """Write the SR telling the PACS that a job's image was not analysed, and why.

        For a job that fails for good (or is given up by whoever calls this): made from the received
        file's header alone, since the pixels may be what failed. Empty when not even the header can
        be read (nothing says which patient and study the SR would belong to).

        Raises:
            DiskFull: as :meth:`_write`.
        """
        header = read_source_header(job)
        if header is None:
            log.error("job %d: %s: received file has no readable header, no not-analysed SR",
                      job.job_id, job.sop_instance_uid)
            return []
        try:
            sr = build_failure_sr(header, reason, self.algorithm, device_ae=self.device_ae)
        except ResultBuildError as exc:
            log.error("job %d: %s: no not-analysed SR (%s)", job.job_id, job.sop_instance_uid, exc)
            return []
        return [self._write("failure_sr", sr)]

    def _wait_for_disk(self, job: LeasedJob, exc: DiskFull) -> None:
        """Queue the job again without using an attempt; alert once when a disk-full episode starts."""
        retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(
            seconds=min(self.settings.worker.retry_initial_s, DISK_WAIT_MAX_S))
        waiting = self.store.wait_for_disk(job.job_id, f"DiskFull: {scrub_reason(message_of(exc))}", retry_at)
        if waiting == 0:
            log.error("ALERT: disk full while writing results (%s): job %d (%s) and any after it wait for "
                      "space and are written when it returns; free space to resume", self._space_text(),
                      job.job_id, job.sop_instance_uid)
        else:
            log.info("job %d: %s waits for disk space (%d jobs waiting)", job.job_id,
                     job.sop_instance_uid, waiting)


def escaped_error(exc: BaseException) -> PermanentError:
    """A ``BaseException`` that is no ``Exception`` (pyo3's ``PanicException``) as the job's permanent failure:
    a native extension that panicked on this input panics again on a retry."""
    error = PermanentError(f"{type(exc).__name__} raised while analysing the image (a native extension failed)")
    error.__cause__ = exc
    return error


_INCIDENT_TEXT = {
    INCIDENT_CRASH: "analysing it crashed the analysis process",
    INCIDENT_STALL: "its analysis did not finish within worker.job_timeout_s ({timeout:.0f} s)",
    INCIDENT_MEMORY: "its analysis needed more memory than worker.max_memory_mb ({memory} MB)",
}


def quarantine_reason(incidents: Sequence[Incident], settings: Settings) -> str:
    """What the "not analysed" SR of a quarantined job says: what happened, never a dataset value."""
    texts: list[str] = []
    for incident in incidents:
        text = _INCIDENT_TEXT.get(incident.kind, "the analysis process ended").format(
            timeout=settings.worker.job_timeout_s, memory=settings.worker.max_memory_mb)
        if text not in texts:
            texts.append(text)
    return f"image could not be analysed: {'; '.join(texts)} ({len(incidents)} times)"


def not_analysed_reason(exc: BaseException, attempts: int) -> str:
    """What a "not analysed" SR says about a job that failed for good: the error, without its values."""
    detail = scrub_reason(message_of(exc))
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if isinstance(exc, PermanentError):
        return what
    return f"analysis failed {attempts} times, last with {what}"


def read_source_header(job: LeasedJob) -> pydicom.Dataset | None:
    """The received file's header (no pixel data), or None when it cannot be read at all."""
    try:
        return pydicom.dcmread(job.path, stop_before_pixels=True)
    except Exception:  # a hostile or truncated file fails in many ways; no header, no SR
        return None


def read_source(job: LeasedJob) -> pydicom.Dataset:
    """Read the received file of a job; an unreadable file is a permanent failure."""
    try:
        return pydicom.dcmread(job.path)
    except FileNotFoundError as exc:
        raise PermanentError(f"received file of {job.sop_instance_uid} is missing: {job.path}") from exc
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise PermanentError(f"received file of {job.sop_instance_uid} is not readable DICOM: "
                             f"{describe(exc)}") from exc


def analysable_paths(paths: Sequence[Path]) -> list[Path]:
    """Expand folders into the files they contain (sorted), for offline prediction."""
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return out
