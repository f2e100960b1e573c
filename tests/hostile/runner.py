"""Runs hostile cases against a real node (``python -m node.cli serve``) with Orthanc as its PACS.

The node under test may come from another checkout (``node_repo``: the code as it was, for the
"before" table). A watchdog samples the resident memory of the node's process tree and kills it above
``rss_kill_mb`` (recorded, then the node is restarted), so a memory bomb cannot take the machine down.
Each category is one batch: its cases are sent one association at a time, the queue and the outbox
are let settle, then one good frontal image (a real chest radiograph, which the input gate passes) is
sent and must come back analysed (its analysed SR at Orthanc) within ``good_within_s``. Every case yields
one :class:`Outcome` row; planted markers are looked for in the node's log, every text column of its
database, ``cxr-node status --format json`` and the free text of the results it wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import REPO, free_port
from tests.hostile import cases as hc
from tests.hostile.images import (
    BASE_SPECS,
    MARKER_RE,
    birth_date,
    case_of_letters,
    plant_markers,
    synthetic_image,
    uid,
)
from tests.hostile.pdu import A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from tests.peers import Orthanc, dcmsend, orthanc, pacs_and_model_toml

SUCCESS = 0x0000
WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}
TERMINAL = {"done", "skipped", "failed"}
GOOD_CASE_BASE = 19 * hc.ID_STRIDE  # markers of the good images sent after each batch
SR_MODALITY = "SR"
log = logging.getLogger("hostile")


@dataclass
class Options:
    """How to run: which node code, where, what size, which limits."""

    work: Path
    node_repo: Path = REPO
    python: str = sys.executable
    size: str = "small"
    seed: int = 0
    categories: tuple[str, ...] = tuple(hc.CATEGORIES)
    data_dir: Path | None = None  # shared/data/dicom for the real sample
    rss_bound_mb: int = 2048  # the assertion: the node's tree stays under this
    rss_kill_mb: int = 3072  # the watchdog kills the node above this
    good_within_s: float = 20.0
    settle_s: float = 30.0  # a batch has settled when no job or send finished for this long
    max_restarts_per_batch: int = 3


@dataclass
class Outcome:
    """What happened to one case."""

    id: int
    category: str
    variant: str
    kind: str
    expect: str
    status: str = ""  # C-STORE status ("0x0000"...), or the connection outcome of a pdu/slot case
    seconds: float = 0.0
    # why the node went down while the case was sent ("" when it stayed up); the cause may be an earlier
    # case of the batch that the worker was analysing meanwhile
    node_died: str = ""
    rss_peak_mb: float = 0.0  # the node's memory (process tree) while the case was sent
    job: str = "none"  # the final job state in the node's database
    result_at_pacs: bool | None = None  # an SR for an accepted (done/failed) job reached Orthanc
    stored_whole: bool | None = None  # Success: the file on disk is the bytes sent, with the same UIDs
    part_files_left: int | None = None  # aborted transfers: .part files still in incoming/ afterwards
    leaks: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    body_sha: str = ""
    # a re-send: the first instance's job state when it was sent again ("skipped": the node had not
    # reported on it, so other content may replace it; done/failed: reported, so it must stand)
    first_job: str = ""


@dataclass
class BatchResult:
    """One category's batch: the good image after it, memory, restarts."""

    category: str
    cases: int
    seconds: float = 0.0
    good_image_s: float | None = None  # time until the good image's SR reached Orthanc; None: not in time
    rss_peak_mb: float = 0.0
    restarts: list[str] = field(default_factory=list)
    echo_max_s: float = 0.0
    echo_failures: int = 0


# --- the node under test ---------------------------------------------------------------------------


def node_toml(work: Path, port: int, pacs_port: int, package: Path) -> str:
    """The node's configuration: defaults except short retry delays (so that a batch settles quickly)."""
    return f"""
[scp]
ae_title = "{hc.CALLED_AE}"
port = {port}
[storage]
data_dir = "{work / 'var'}"
[worker]
poll_s = 0.1
max_attempts = 3
retry_initial_s = 0.5
[send]
retry_initial_s = 1
retry_max_s = 2
{pacs_and_model_toml(pacs_port, package)}[thresholds]
Tuberculosis = 0.0
"""


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB (0 when it is gone)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        with suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{p}/task").iterdir():
                with suppress(OSError):
                    stack += [int(c) for c in (task / "children").read_text().split()]
    return total / 1024


class NodeUnrecoverableError(Exception):
    """The node died at every start attempt."""

    def __init__(self, deaths: list[str]) -> None:
        self.deaths = deaths
        super().__init__("; ".join(deaths))


class Node:
    """The node process, its log, a memory watchdog and restarts."""

    def __init__(self, opts: Options, cfg: Path) -> None:
        self.opts = opts
        self.cfg = cfg
        self.port = int(re.search(r"port = (\d+)", cfg.read_text()).group(1))  # type: ignore[union-attr]
        self.log_path = opts.work / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_mb = 0.0  # since the batch began
        self.case_peak_mb = 0.0  # since the case began
        self.killed_for: str = ""
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, name="rss-watchdog", daemon=True)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.opts.node_repo)}

    def start(self, attempts: int = 4) -> list[str]:
        """Start the node and wait for C-ECHO; a node that dies while starting is tried again.

        Returns:
            Why each failed attempt died (a job that kills the worker kills it again at each start).

        Raises:
            NodeUnrecoverableError: every attempt died.
        """
        deaths: list[str] = []
        for _ in range(attempts):
            if self._start_once():
                return deaths
            deaths.append(f"at start: {self.death()}")
        raise NodeUnrecoverableError(deaths)

    def _start_once(self) -> bool:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.opts.python, "-m", "node.cli", "serve", "--config", str(self.cfg)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.opts.node_repo, env=self.env(),
                start_new_session=True)
        self.killed_for = ""
        if not self._watch.is_alive():
            self._watch.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if echo(self.port, timeout=5) is not None:
                return True
            time.sleep(0.3)
        raise RuntimeError(f"node did not answer C-ECHO within 90 s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def death(self) -> str:
        """Why the node is down ("" while it runs)."""
        if self.alive() or self.proc is None:
            return ""
        if self.killed_for:
            return self.killed_for
        rc = self.proc.returncode
        return f"exited {rc}" if rc >= 0 else f"killed by {signal.Signals(-rc).name}"

    def restart(self) -> None:
        self.kill()
        self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def _watchdog(self) -> None:
        while not self._stop.wait(0.05):
            proc = self.proc
            if proc is None or proc.poll() is not None:
                continue
            rss = tree_rss_mb(proc.pid)
            self.peak_mb = max(self.peak_mb, rss)
            self.case_peak_mb = max(self.case_peak_mb, rss)
            if rss > self.opts.rss_kill_mb:
                self.killed_for = f"killed by the watchdog: RSS {rss:.0f} MiB > {self.opts.rss_kill_mb} MiB"
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def status_json(self) -> str:
        out = subprocess.run([self.opts.python, "-m", "node.cli", "--log-level", "ERROR", "status", "--config",
                              str(self.cfg), "--format", "json", "--recent", "1000"],
                             capture_output=True, text=True, cwd=self.opts.node_repo, env=self.env(), timeout=120,
                             check=False)
        return out.stdout + out.stderr


# --- DICOM and socket peers --------------------------------------------------------------------------


def echo(port: int, timeout: float = 30, address: str = "127.0.0.1") -> float | None:
    """Seconds a C-ECHO took (association included); None when it failed."""
    ae = AE(ae_title="HOSTILE-ECHO")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    start = time.monotonic()
    assoc = ae.associate(address, port, ae_title=hc.CALLED_AE)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return time.monotonic() - start if status and status.Status == SUCCESS else None
    finally:
        assoc.release()


def status_label(code: int) -> str:
    return f"0x{code:04X}"


def send_store(port: int, case: hc.Case, timeout: float = 30) -> str:
    """Send the case's bytes as one C-STORE under its own presentation context; the status or why none."""
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.requested_contexts = [build_context(case.sop_class, [case.transfer_syntax])]
    assoc = ae.associate("127.0.0.1", port, ae_title=hc.CALLED_AE, max_pdu=16382)
    if not assoc.is_established:
        return "association rejected" if assoc.is_rejected else "association failed"
    try:
        if not assoc.accepted_contexts:
            return "context refused"
        return _send_raw(assoc, case)
    finally:
        if assoc.is_established:
            assoc.release()


def _send_raw(assoc: Any, case: hc.Case) -> str:
    """pynetdicom's ``send_c_store`` without its re-encoding: the case's bytes go out as they are."""
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = case.sop_class
    try:
        req.AffectedSOPInstanceUID = case.sop_uid
    except ValueError:  # longer than 64 characters: pynetdicom refuses to send it, a hostile peer does
        req._affected_sop_instance_uid = UID(case.sop_uid)
    req.DataSet = BytesIO(case.body)
    context = assoc.accepted_contexts[0]
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + 10
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, context.context_id)
        sent = time.monotonic()
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:  # the DIMSE timeout expired, or the node ended the association before answering
        waited = time.monotonic() - sent
        return "no response" if waited >= 0.9 * assoc.dimse_timeout else "association aborted"
    return status_label(int(rsp.Status))


def run_steps(port: int, case: hc.Case) -> str:
    """Play a raw socket conversation; returns what the node answered (the PDU types, or how it closed)."""
    seen: list[str] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((case.source_address, 0))
        sock.connect(("127.0.0.1", port))
        for action, arg in case.steps:
            if action == "send":
                with suppress(OSError):
                    sock.sendall(arg)  # type: ignore[arg-type]
            elif action == "recv":
                seen.append(_recv_pdu(sock, float(arg)))  # type: ignore[arg-type]
                if seen[-1] in ("closed", "reset"):
                    break
            elif action == "sleep":
                time.sleep(float(arg))  # type: ignore[arg-type]
            elif action == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        seen.append(f"error {type(exc).__name__}")
    finally:
        sock.close()
    return " ".join(seen) or "sent"


def _recv_pdu(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    try:
        head = sock.recv(6)
    except TimeoutError:
        return "silence"
    except ConnectionResetError:
        return "reset"
    if not head:
        return "closed"
    names = {A_ASSOCIATE_AC: "A-ASSOCIATE-AC", A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", A_ABORT: "A-ABORT"}
    if len(head) == 6:
        length = struct.unpack(">I", head[2:6])[0]
        with suppress(OSError):
            remaining = min(length, 65536)
            while remaining > 0:
                chunk = sock.recv(remaining)
                if not chunk:
                    break
                remaining -= len(chunk)
    return names.get(head[0], f"PDU type {head[0]}")


# --- the database and the PACS ----------------------------------------------------------------------


def db_path(opts: Options) -> Path:
    return opts.work / "var" / "cxr-node.sqlite"


@contextmanager
def database(opts: Options) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{db_path(opts)}?mode=ro", uri=True, timeout=30)
    try:
        yield conn
    finally:
        conn.close()


def jobs_of(opts: Options, sop_uids: Iterable[str]) -> dict[str, list[tuple[int, str, str]]]:
    """SOP Instance UID -> [(job id, state, stored path)] from the node's database."""
    wanted = sorted(set(sop_uids))
    out: dict[str, list[tuple[int, str, str]]] = {}
    if not wanted or not db_path(opts).exists():
        return out
    with database(opts) as conn:
        for k in range(0, len(wanted), 500):
            chunk = wanted[k: k + 500]
            rows = conn.execute("SELECT i.sop_instance_uid, j.id, j.state, i.path FROM instances i "
                                "JOIN jobs j ON j.instance_id = i.id WHERE i.sop_instance_uid IN "
                                f"({','.join('?' * len(chunk))})", chunk).fetchall()
            for sop, job_id, state, path in rows:
                out.setdefault(sop, []).append((job_id, state, path))
    return out


def outbox_counts(opts: Options) -> tuple[int, int]:
    """(sends waiting: pending or failed-to-retry, sends made) in the node's outbox."""
    if not db_path(opts).exists():
        return 0, 0
    with database(opts) as conn:
        rows = dict(conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
    return rows.get("pending", 0) + rows.get("failed", 0), rows.get("sent", 0)


def real_chest() -> Dataset | None:
    """pydicom-data's RG1 (CR PA chest, 1955 x 1841, uncompressed) without its file meta, or None."""
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file("RG1_UNCR.dcm")
    except ImportError:
        return None
    if not path:
        return None
    ds = pydicom.dcmread(path)
    del ds.file_meta
    return ds


def results_of(opts: Options, kinds: tuple[str, ...] = ()) -> dict[int, list[str]]:
    """Job id -> SOP Instance UIDs of its results (of ``kinds`` only, e.g. ``("sr",)`` for analysed SRs)."""
    out: dict[int, list[str]] = {}
    with database(opts) as conn:
        for job_id, sop, kind in conn.execute("SELECT job_id, sop_instance_uid, kind FROM results").fetchall():
            if not kinds or kind in kinds:
                out.setdefault(job_id, []).append(sop)
    return out


def pacs_sr_uids(pacs: Orthanc) -> set[str]:
    """SOP Instance UIDs of every SR stored at Orthanc."""
    sr_series = {s["ID"] for s in pacs.rest("/series?expand")
                 if s.get("MainDicomTags", {}).get("Modality") == SR_MODALITY}
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.rest("/instances?expand")
            if i.get("ParentSeries") in sr_series}


def body_sha(path: Path) -> str:
    """sha256 of a stored file's dataset bytes (after the file meta): compares with the bytes sent."""
    _, offset = split_dataset(path)
    with path.open("rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read()).hexdigest()


# --- the run ---------------------------------------------------------------------------------------------


class Run:
    """One run of the chosen categories: node + Orthanc up, batches, outcomes, leak scan."""

    def __init__(self, opts: Options, pacs: Orthanc, package: Path) -> None:
        self.opts = opts
        self.pacs = pacs
        cfg = opts.work / "node.toml"
        cfg.write_text(node_toml(opts.work, free_port(), pacs.dicom_port, package))
        self.node = Node(opts, cfg)
        self.outcomes: list[Outcome] = []
        self.batches: list[BatchResult] = []
        self.markers: dict[int, dict[str, str]] = {}
        self.leaks: dict[int, list[str]] = {}
        self.resets = 0
        self._good = 0
        self._good_real = False
        self._echo = _EchoProbe(self.node)

    def run(self) -> None:
        self.node.start()
        self._echo.start()
        try:
            for category in self.opts.categories:
                self.run_batch(category)
        finally:
            self._echo.stop()
            self.node.stop()
        self.scan_leaks()

    def ensure_up(self, batch: BatchResult, why: str) -> str:
        """Restart a dead node; returns why it died ("" when it was up).

        A node that dies at every start (a job that kills it is leased again each time) cannot recover by
        itself: its data folder is set aside (``var.reset-N``, still scanned for leaks) and it starts empty.
        """
        if self.node.killed_for and self.node.proc is not None:
            self.node.proc.wait(timeout=60)  # the watchdog's SIGKILL: let the process go before judging
        death = self.node.death()
        if not death:
            return ""
        batch.restarts.append(f"{why}: {death}")
        try:
            batch.restarts += self.node.start()
        except NodeUnrecoverableError as exc:
            batch.restarts += exc.deaths
            self.reset_node(batch, f"node could not start {len(exc.deaths)} times")
        return death

    def reset_node(self, batch: BatchResult, why: str) -> None:
        """Stop the node, set its data folder aside (``var.reset-N``, still scanned for leaks), start it empty.

        Used when a node cannot recover by itself (it dies at every start, or its worker stopped), so that
        the next category meets a working node and its outcomes are its own.
        """
        self.node.kill()
        self.resets += 1
        (self.opts.work / "var").rename(self.opts.work / f"var.reset-{self.resets}")
        batch.restarts.append(f"{why}: data folder reset by the runner")
        batch.restarts += self.node.start()

    def run_batch(self, category: str) -> None:
        ctx = hc.Context(self.opts.seed, self.opts.data_dir)
        start = time.monotonic()
        self.node.peak_mb = 0.0
        self._echo.reset()
        batch_cases: list[tuple[hc.Case, Outcome]] = []
        for case in hc.generate(category, self.opts.size, ctx):
            outcome = self.run_case(case, batch_cases)
            outcome.node_died = self.ensure_up(self._batch(category), f"case {case.id}")
            batch_cases.append((case, outcome))
            self.markers[case.id] = case.markers
        batch = self._batch(category)
        batch.cases = len(batch_cases)
        self.settle(batch, [c for c in batch_cases if c[1].status == status_label(SUCCESS)])
        batch.good_image_s = self.good_image(batch)
        self.collect(batch_cases)
        if batch.good_image_s is None:
            self.reset_node(batch, "good image not analysed")
        batch.seconds = round(time.monotonic() - start, 1)
        batch.rss_peak_mb = round(self.node.peak_mb, 1)
        batch.echo_max_s, batch.echo_failures = self._echo.summary()
        self.outcomes += [o for _, o in batch_cases]
        log.info("%s: %d cases in %.1f s, good image %s, restarts %s", category, batch.cases, batch.seconds,
                 batch.good_image_s, batch.restarts)

    def _batch(self, category: str) -> BatchResult:
        if not self.batches or self.batches[-1].category != category:
            self.batches.append(BatchResult(category, 0))
        return self.batches[-1]

    def run_case(self, case: hc.Case, earlier: list[tuple[hc.Case, Outcome]]) -> Outcome:
        outcome = Outcome(case.id, case.category, case.variant, case.kind, case.expect,
                          body_sha=hashlib.sha256(case.body).hexdigest() if case.body else "")
        start = time.monotonic()
        self.node.case_peak_mb = 0.0
        parts = self.part_files()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if case.kind == "store":
                if case.repeat_of is not None:
                    outcome.first_job = self.wait_finished(case.sop_uid, timeout=self.opts.good_within_s)
                outcome.status = send_store(self.node.port, case)
                if outcome.status == status_label(SUCCESS):
                    rows = jobs_of(self.opts, [case.sop_uid]).get(case.sop_uid, [])
                    outcome.stored_whole = _stored_whole(case, rows, outcome.body_sha)
            elif case.kind == "pdu":
                outcome.status = run_steps(self.node.port, case)
                if case.category == "aborted":
                    outcome.part_files_left = self.part_files_after(parts, 3.0)
            else:
                outcome.status = self.slot_attack(case)
        outcome.seconds = round(time.monotonic() - start, 2)
        proc = self.node.proc
        now = tree_rss_mb(proc.pid) if proc is not None and proc.poll() is None else 0.0
        outcome.rss_peak_mb = round(max(self.node.case_peak_mb, now), 1)
        return outcome

    def part_files(self) -> set[Path]:
        incoming = self.opts.work / "var" / "incoming"
        return set(incoming.glob("*.part")) if incoming.is_dir() else set()

    def part_files_after(self, before: set[Path], wait_s: float) -> int:
        """Partial files the case left in incoming/ (those present before it are not its own)."""
        time.sleep(1.0)  # the node writes what it had received before it sees the association end
        deadline = time.monotonic() + wait_s
        while True:
            left = len(self.part_files() - before)
            if left == 0 or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def wait_finished(self, sop_uid: str, timeout: float) -> str:
        """Wait until the job of ``sop_uid`` has ended; its state ("" when it did not end in time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = jobs_of(self.opts, [sop_uid]).get(sop_uid, [])
            if rows and all(state in TERMINAL for _, state, _ in rows):
                time.sleep(1.0)  # let its results go out to the PACS
                return rows[-1][1]
            time.sleep(0.2)
        return ""

    def slot_attack(self, case: hc.Case) -> str:
        """Hold connections from 127.0.0.2; a legitimate modality sends from 127.0.0.1 meanwhile."""
        holders = _open_slots(self.node.port, case)
        try:
            good = self.good_dataset()
            path = self.opts.work / "slot_good.dcm"
            _write_file(good, path)
            deadline = time.monotonic() + 30
            start = time.monotonic()
            while time.monotonic() < deadline:
                sent = dcmsend([path], self.node.port, called=hc.CALLED_AE, calling="MODALITY", timeout=60)
                if sent.returncode == 0:
                    return f"legitimate modality served after {time.monotonic() - start:.1f} s"
                time.sleep(1.0)
            return "legitimate modality refused for 30 s"
        finally:
            for s in holders:
                with suppress(OSError):
                    s.close()

    def settle(self, batch: BatchResult, accepted: list[tuple[hc.Case, Outcome]]) -> None:
        """Wait until every accepted case's job has finished and the outbox holds nothing pending (restarting
        a node that dies meanwhile). The wait lasts while the node makes progress: it ends ``settle_s`` after
        the last job or send finished, so a long batch is not cut short and a stuck one is not waited on."""
        uids = {c.sop_uid for c, _ in accepted}
        last_progress, finished_before = time.monotonic(), -1
        while time.monotonic() - last_progress < self.opts.settle_s:
            if self.ensure_up(batch, "settling") and len(batch.restarts) > self.opts.max_restarts_per_batch:
                return
            jobs = jobs_of(self.opts, uids)
            finished = sum(1 for u in uids if jobs.get(u) and all(s in TERMINAL for _, s, _ in jobs[u]))
            pending, sent = outbox_counts(self.opts)
            if finished == len(uids) and pending == 0:
                return
            if finished + sent > finished_before:
                last_progress, finished_before = time.monotonic(), finished + sent
            time.sleep(0.3)

    def good_dataset(self) -> Dataset:
        """A real frontal chest radiograph (pydicom-data's RG1, fresh UIDs, the case's markers planted): the
        node's input gate passes it and the model analyses it. A synthetic image where RG1 is not installed
        (the gate then refuses it and its liveness SR is a not-analysed one)."""
        self._good += 1
        rng = random.Random(f"good:{self.opts.seed}:{self._good}")
        ds = real_chest()
        self._good_real = ds is not None
        if ds is None:
            ds = synthetic_image(BASE_SPECS[0], rng)
        else:
            ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(rng), uid(rng), uid(rng)
        case_id = GOOD_CASE_BASE + self._good
        self.markers[case_id] = plant_markers(ds, case_id)
        ds.BodyPartExamined = "CHEST"
        return ds

    def good_image(self, batch: BatchResult) -> float | None:
        """Send one good frontal image with dcmsend; seconds until its SR is at Orthanc, None if not in time."""
        self.ensure_up(batch, "before the good image")
        ds = self.good_dataset()
        path = self.opts.work / "good.dcm"
        _write_file(ds, path)
        start = time.monotonic()
        sent = dcmsend([path], self.node.port, called=hc.CALLED_AE, calling="MODALITY", timeout=60)
        if sent.returncode != 0:
            return None
        sop = str(ds.SOPInstanceUID)
        kinds = ("sr",) if self._good_real else ()  # a real chest must come back analysed, not refused
        while time.monotonic() - start < self.opts.good_within_s:
            if self.ensure_up(batch, "waiting for the good image"):
                continue
            rows = jobs_of(self.opts, [sop]).get(sop, [])
            results = results_of(self.opts, kinds) if rows else {}
            mine = {u for job_id, _, _ in rows for u in results.get(job_id, [])}
            if mine and mine & pacs_sr_uids(self.pacs):
                return round(time.monotonic() - start, 2)
            time.sleep(0.3)
        return None

    def collect(self, batch_cases: list[tuple[hc.Case, Outcome]]) -> None:
        """Fill job state, result at the PACS, stored-whole and the verdict of each case."""
        uids = [c.sop_uid for c, _ in batch_cases if c.sop_uid]
        jobs = jobs_of(self.opts, uids)
        results = results_of(self.opts) if db_path(self.opts).exists() else {}
        srs = pacs_sr_uids(self.pacs)
        first_sha: dict[str, str] = {}
        for case, outcome in batch_cases:
            rows = jobs.get(case.sop_uid, [])
            if case.kind == "store" and rows:
                outcome.job = ",".join(sorted({s for _, s, _ in rows}))
                if any(s in ("done", "failed") for _, s, _ in rows):
                    outcome.result_at_pacs = any(u in srs for j, _, _ in rows for u in results.get(j, []))
            if case.repeat_of is None and outcome.body_sha:
                first_sha[case.sop_uid] = outcome.body_sha
            outcome.violations = verdict(case, outcome, rows, first_sha.get(case.sop_uid, ""),
                                         self.opts.rss_bound_mb)

    def scan_leaks(self) -> None:
        """Look for every planted marker in every output; attach each hit to its case."""
        texts = {"log": self.node.log_path.read_text(errors="replace"), "status": self.node.status_json()}
        folders = sorted(self.opts.work.glob("var*"))
        texts["database"] = "\n".join(database_text(f / db_path(self.opts).name) for f in folders)
        texts["results"] = "\n".join(results_text(f / "results") for f in folders)
        dates = {birth_date(cid): cid for cid in self.markers}
        by_case: dict[int, set[str]] = {}
        for source, text in texts.items():
            for m in MARKER_RE.finditer(text):
                by_case.setdefault(case_of_letters(m.group(1)), set()).add(f"{m.group(2).upper()} in {source}")
            for m in re.finditer(r"(?<![\w.])(\d{8})(?!\w|\.\d)", text):
                if m.group(1) in dates:
                    by_case.setdefault(dates[m.group(1)], set()).add(f"birth date in {source}")
        self.leaks = {cid: sorted(found) for cid, found in by_case.items()}
        for outcome in self.outcomes:
            outcome.leaks = self.leaks.get(outcome.id, [])
            if outcome.leaks:
                outcome.violations.append("patient value leaked")


class _EchoProbe:
    """C-ECHO once a second beside the batches: the longest answer time and the failures."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="echo-probe", daemon=True)
        self.reset()

    def reset(self) -> None:
        self.max_s, self.failures = 0.0, 0

    def summary(self) -> tuple[float, int]:
        return round(self.max_s, 2), self.failures

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            if not self.node.alive():
                continue
            start = time.monotonic()
            took = echo(self.node.port, timeout=30)
            if took is None:
                if self.node.alive():
                    self.failures += 1
                self.max_s = max(self.max_s, time.monotonic() - start)
            else:
                self.max_s = max(self.max_s, took)


def _open_slots(port: int, case: hc.Case) -> list[socket.socket]:
    """Open the attacker's connections: 3 silent bytes, garbage then close, or an association left idle."""
    held: list[socket.socket] = []
    rng = random.Random(case.id)
    for _ in range(case.slot_connections):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((case.source_address, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            if case.slot_mode == "silent":
                s.sendall(b"\x01\x00\x00")
            elif case.slot_mode == "garbage":
                s.sendall(rng.randbytes(100))
                s.close()
                continue
            else:
                from tests.hostile.pdu import associate_rq
                s.sendall(associate_rq(hc.CALLED_AE, "ATTACKER", hc.CR_STORAGE, ExplicitVRLittleEndian))
            held.append(s)
        except OSError:
            s.close()
    return held


def _write_file(ds: Dataset, path: Path) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def _stored_whole(case: hc.Case, rows: list[tuple[int, str, str]], sha: str) -> bool:
    """A Success: some row's file holds exactly the bytes sent and parses with the same UIDs."""
    for _, _, path in rows:
        p = Path(path)
        if not p.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            same = str(ds.SOPInstanceUID) == case.sop_uid and body_sha(p) == sha
        except Exception:  # any parse failure means "not stored whole"
            same = False
        if same:
            return True
    return False


def verdict(case: hc.Case, o: Outcome, rows: list[tuple[int, str, str]], first_sha: str, bound_mb: int) -> list[str]:
    """The rules a correct node keeps, as violations of this case (empty: nothing wrong)."""
    out: list[str] = []
    if o.node_died:
        out.append(f"node died ({o.node_died})")
    if o.rss_peak_mb > bound_mb:
        out.append(f"memory {o.rss_peak_mb:.0f} MiB above {bound_mb} MiB")
    if o.status in ("no response",):
        out.append("no response (hang)")
    if case.kind == "pdu" and o.part_files_left:
        out.append(f"{o.part_files_left} .part file(s) left")
    if case.kind == "slot" and "refused" in o.status:
        out.append("legitimate modality refused")
    if case.kind != "store":
        return out
    success = o.status == status_label(SUCCESS)
    if success and case.expect == hc.REFUSE:
        out.append("Success for what should be refused")
    if case.expect == hc.ACCEPT and not success and not _is_warning(o.status):
        out.append(f"valid input refused ({o.status})")
    if success and not o.stored_whole:
        out.append("Success but not stored whole")
    if success and (not rows or any(s not in TERMINAL for _, s, _ in rows)):
        out.append(f"job not finished ({o.job})")
    if o.result_at_pacs is False:
        out.append("no SR at the PACS")
    if case.repeat_of is not None and "changed" in case.variant and first_sha and o.first_job != "skipped":
        stored = {body_sha(Path(p)) for _, _, p in rows if Path(p).is_file()}
        if first_sha not in stored:
            out.append("changed re-send replaced the stored instance")
    return out


def _is_warning(status: str) -> bool:
    return status.startswith("0x") and int(status, 16) in WARNING_STATUSES


def database_text(path: Path) -> str:
    """Every text value of every table of a node database, one per line."""
    if not path.exists():
        return ""
    lines: list[str] = []
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                lines += [f"{table}: {v}" for v in row if isinstance(v, str)]
    return "\n".join(lines)


_AUTHORED_TEXT = ("SeriesDescription", "ContentDescription", "ImageComments", "DerivationDescription",
                  "ContentLabel", "ContentCreatorName")


def results_text(folder: Path) -> str:
    """The free text the node wrote into its results: every value in the SR content tree, and the
    descriptions it authors (the copied Patient and Study modules are meant to carry the patient)."""
    lines: list[str] = []
    for path in sorted(folder.rglob("*.dcm")) if folder.is_dir() else []:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # an unreadable result is reported by other checks
                continue
        lines += [f"{path.name}: {ds.get(k)}" for k in _AUTHORED_TEXT if k in ds]
        for item in ds.get("ContentSequence", []):
            lines += [f"{path.name}: {e.value!s}" for e in _walk(item) if isinstance(e.value, str)]
    return "\n".join(str(x) for x in lines)


def _walk(ds: Dataset) -> Iterator[Any]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)
        else:
            yield elem


# --- entry point ---------------------------------------------------------------------------------------


def build_package(work: Path) -> Path:
    """The tiny model package (built once per work folder with the project's export code)."""
    pkg = work / "model"
    if (pkg / "manifest.json").is_file():
        return pkg
    from tests.model_fixtures import build_tiny_package

    return build_tiny_package(pkg, size=128)


def run_suite(opts: Options) -> Run:
    """Start Orthanc and the node, run the chosen categories, return the run with its outcomes."""
    opts.work.mkdir(parents=True, exist_ok=True)
    package = build_package(opts.work)
    with orthanc(opts.work / "pacs") as pacs:
        run = Run(opts, pacs, package)
        run.run()
    return run


def summary(run: Run) -> list[dict[str, Any]]:
    """The table: one row per category, counting outcomes."""
    rows = []
    for batch in run.batches:
        mine = [o for o in run.outcomes if o.category == batch.category]
        stores = [o for o in mine if o.kind == "store"]
        row: dict[str, Any] = {
            "category": batch.category, "cases": len(mine),
            "success": sum(o.status == "0x0000" for o in stores),
            "refused": sum(o.status != "0x0000" for o in stores),
            "node_died": sum(bool(o.node_died) for o in mine),
            "done": sum(o.job == "done" for o in stores), "skipped": sum(o.job == "skipped" for o in stores),
            "failed": sum(o.job == "failed" for o in stores),
            "unfinished": sum(o.job not in ("done", "skipped", "failed", "none") for o in stores),
            "sr_at_pacs": f"{sum(o.result_at_pacs is True for o in stores)}/"
                          f"{sum(o.result_at_pacs is not None for o in stores)}",
            "leaks": sum(bool(o.leaks) for o in mine),
            "violations": sum(bool(o.violations) for o in mine),
            "good_image_s": batch.good_image_s, "restarts": len(batch.restarts),
            "rss_peak_mb": batch.rss_peak_mb, "echo_max_s": batch.echo_max_s, "seconds": batch.seconds,
        }
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("-" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def report(run: Run) -> dict[str, Any]:
    """Everything a run found, JSON-ready: options, the table, batches, every case's outcome."""
    opts = run.opts
    return {
        "node_repo": str(opts.node_repo), "size": opts.size, "seed": opts.seed,
        "rss_bound_mb": opts.rss_bound_mb, "rss_kill_mb": opts.rss_kill_mb, "good_within_s": opts.good_within_s,
        "table": summary(run), "batches": [asdict(b) for b in run.batches],
        "cases": [asdict(o) for o in run.outcomes],
        "unattributed_leaks": {str(k): v for k, v in run.leaks.items() if k not in {o.id for o in run.outcomes}},
    }


def dump(run: Run, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report(run), indent=1) + "\n")
