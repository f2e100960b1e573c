"""Prometheus metrics: counters and histograms where the work happens, gauges read when /metrics is scraped.

The node runs several processes (the SCP, optionally SCP children, the worker), so counters and histograms use
``prometheus_client``'s multiprocess mode: ``cxr-node serve`` (``node.cli._metrics_dir``, which may not import this
module first) points ``PROMETHEUS_MULTIPROC_DIR`` at
``<data_dir>/metrics`` (emptied at start) before any process imports this module, each process writes its own
files, and /metrics sums them (:func:`registry`). Without that variable (a node built inside another program, the
tests' in-process nodes) they count in the process's own registry.

What is in the database or on disk (jobs by state, the outbox per destination, free disk, the model in use) is read
at scrape time by :class:`NodeCollector`, so it is right across processes and restarts. No label holds a patient
value: calling AE titles, destination names, states.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

IMAGES_RECEIVED = Counter("cxr_images_received", "Images received by C-STORE, by calling AE title and outcome "
                          "(analyse: queued for analysis; stored: kept, not analysed by the filter; refused: "
                          "answered with a failure status)", ["calling_ae", "status"])
ASSOCIATIONS = Counter("cxr_associations", "Associations requested of the SCP, by outcome (accepted, rejected)",
                       ["outcome"])
JOBS_FINISHED = Counter("cxr_jobs_finished", "Analysis jobs run by the worker, by outcome (done, failed, retry)",
                        ["outcome"])
PROCESSING_SECONDS = Histogram("cxr_processing_seconds", "One job in the worker: read, analyse, build and record "
                               "the results", buckets=DURATION_BUCKETS)
INFERENCE_SECONDS = Histogram("cxr_inference_seconds", "One image's analysis: decode, preprocess, the ensemble "
                              "(and the heatmap)", buckets=DURATION_BUCKETS)
SEND_ATTEMPTS = Counter("cxr_send_attempts", "Results offered to destinations, by destination and outcome (sent, "
                        "retry, rejected)", ["destination", "outcome"])
SEND_FAILURES = Counter("cxr_send_failures", "Failed sends (to be retried or rejected), by destination",
                        ["destination"])


def registry(collectors: list[Collector]) -> CollectorRegistry:
    """The registry /metrics serves: every process's counters and histograms, and ``collectors``."""
    if os.environ.get(MULTIPROC_ENV):
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
    else:
        reg = REGISTRY
    for c in collectors:
        with contextlib.suppress(ValueError):  # registered already (the process-wide registry, a second console)
            reg.register(c)
    return reg


class NodeCollector(Collector):
    """Gauges read at scrape time from the store, the disk and the model in use.

    Args:
        status: returns ``Store.status(recent=0)`` (jobs by state, outbox per destination).
        data_dir: the folder whose file system's free space is reported.
        model: returns (name, version) of the model package in use, or None.
    """

    def __init__(self, status: Callable[[], dict[str, Any]], data_dir: Path,
                 model: Callable[[], tuple[str, str] | None]) -> None:
        self.status = status
        self.data_dir = data_dir
        self.model = model

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        jobs = GaugeMetricFamily("cxr_jobs", "Analysis jobs by state", labels=["state"])
        for state, n in sorted(status["jobs"].items()):
            jobs.add_metric([state], n)
        yield jobs
        depth = GaugeMetricFamily("cxr_outbox_depth", "Results waiting to be sent (pending or failed and due "
                                  "again), by destination", labels=["destination"])
        for dest, states in sorted(status["outbox"].items()):
            depth.add_metric([dest], states.get("pending", 0) + states.get("failed", 0))
        yield depth
        free = GaugeMetricFamily("cxr_disk_free_bytes", "Free space on the file system of the data folder")
        free.add_metric([], shutil.disk_usage(self.data_dir).free)
        yield free
        model = self.model()
        if model is not None:
            info = InfoMetricFamily("cxr_model", "The model package in use")
            info.add_metric([], {"name": model[0], "version": model[1]})
            yield info
