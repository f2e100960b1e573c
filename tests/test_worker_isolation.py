"""The worker in its own supervised process, against `cxr-node serve` (SQLite file, a tiny real ONNX package).

What a job throws (a Rust decoder's panic), a decompression bomb header, a worker process killed or
stalled on a job (restart, incidents, quarantine after two), the worker dying with the node, and the
SCP answering C-ECHO while the worker decodes a big image. A job that must hang or be killed "while it
runs" reads its image from a FIFO (what a hung network file system does): the worker blocks in open()
until the test swaps a regular file in, which no kill or stall timer could race with. The images are
synthetic patterns standing in for chests, so the node runs with ``[model] gate = "off"`` (the input gate
would refuse them; tests/test_gate.py tests it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid
from sqlalchemy import text

from storage.db import make_engine
from storage.queue import ReceivedInstance, Store
from tests.conftest import REPO, free_port, require_tool
from tests.peers import DCMTK_ENV, dcmsend, pacs_and_model_toml, wait_for

pytestmark = pytest.mark.integration

CR = UID("1.2.840.10008.5.1.4.1.1.1")
JOB_TIMEOUT_S = 8.0
MEMORY_LIMIT_MB = 400  # the idle worker process with the tiny model holds about 200 MB


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("model") / "pkg", members=1, size=64)


# --- images -------------------------------------------------------------------------------------------


def chest(rows: int = 512, cols: int = 512, seed: int = 0) -> Dataset:
    """A frontal chest CR (16 bits allocated, 12 stored) that the filter accepts; smooth with some noise."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CR, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Isolation", "ISO-1", "CR"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:rows, 0:cols]
    image = (np.sin(x / 37.0) + np.cos(y / 23.0) + 2.0) * 900.0
    noise = np.random.default_rng(seed).integers(0, 64, (rows, cols))
    ds.PixelData = (image + noise).astype(np.uint16).tobytes()
    return ds


def rle(ds: Dataset) -> Dataset:
    ds.compress(RLELossless)
    return ds


def panicking_rle() -> Dataset:
    """An RLE image whose segments have 32 flipped bits such that pylibjpeg-rle panics (PanicException)."""
    for seed in range(200):
        ds = rle(chest(256, 256))
        data = bytearray(ds.PixelData)
        rng = np.random.default_rng(seed)
        bot_length = int.from_bytes(data[4:8], "little")  # the Basic Offset Table item's value length
        start = 8 + bot_length + 8 + 64  # after the BOT item, the fragment's item header and the RLE header
        for pos in rng.integers(start, len(data) - 8, 32):  # the sequence delimiter stays whole
            data[int(pos)] ^= 1 << int(rng.integers(0, 8))
        ds.PixelData = bytes(data)
        try:
            ds.pixel_array  # noqa: B018 - decoding is the point
        except Exception:
            continue
        except BaseException as exc:  # pyo3_runtime.PanicException
            if type(exc).__name__ == "PanicException":
                return ds
            raise
    raise AssertionError("no bit-flipped RLE image made pylibjpeg-rle panic in 200 tries")


def big_j2k(side: int = 4000) -> Dataset:
    """A JPEG 2000 lossless image whose decode holds the GIL for about a second (openjpeg on this CPU)."""
    ds = chest(side, side)
    ds.compress(JPEG2000Lossless)
    return ds


def bomb() -> Dataset:
    """A small RLE image whose header declares 65535 x 65535 (8.6 GB once decoded)."""
    ds = rle(chest(64, 64))
    ds.Rows = ds.Columns = 65535
    return ds


def send_as_is(files: list[Path], port: int) -> None:
    """Send like a modality that never decompresses (``dcmsend`` would otherwise decode RLE itself)."""
    cmd = [require_tool("dcmsend"), "-aet", "MODALITY", "-aec", "CXR-AI", "--decompress-never", "--no-halt",
           "-nuc", "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=DCMTK_ENV, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def save(ds: Dataset, folder: Path, name: str) -> Path:
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# --- the node --------------------------------------------------------------------------------------------


class Node:
    """`cxr-node serve` (role all) with a dcmtk storescp as its PACS, and the node's own database."""

    def __init__(self, tmp: Path, package: Path, job_timeout_s: float = JOB_TIMEOUT_S,
                 max_memory_mb: int = 3072) -> None:
        self.tmp, self.port, pacs_port = tmp, free_port(), free_port()
        self.pacs_dir = tmp / "pacs"
        self.pacs_dir.mkdir()
        self.pacs = subprocess.Popen([require_tool("storescp"), "-aet", "PACS", "-od", str(self.pacs_dir),
                                      str(pacs_port)], env=DCMTK_ENV, cwd=tmp)
        cfg = tmp / "node.toml"
        cfg.write_text(f"""
[scp]
port = {self.port}
[storage]
data_dir = "var"
[worker]
poll_s = 0.05
lease_s = 30
retry_initial_s = 1
job_timeout_s = {job_timeout_s}
max_memory_mb = {max_memory_mb}
[send]
retry_initial_s = 1
retry_max_s = 2
{pacs_and_model_toml(pacs_port, package, gate="off")}""")
        self.log_path = tmp / "node.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        echoscu = require_tool("echoscu")
        wait_for(lambda: self.alive() and subprocess.run([echoscu, "-aec", "CXR-AI", "127.0.0.1", str(self.port)],
                                                         capture_output=True, check=False).returncode == 0,
                 timeout=90, what="the node to answer C-ECHO")
        self.store = Store(make_engine(f"sqlite:///{tmp / 'var' / 'cxr-node.sqlite'}"))

    def echo_s(self) -> float:
        """One C-ECHO round trip (dcmtk echoscu, a new association) in seconds."""
        started = time.perf_counter()
        done = subprocess.run([require_tool("echoscu"), "-aec", "CXR-AI", "127.0.0.1", str(self.port)],
                              capture_output=True, env=DCMTK_ENV, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return time.perf_counter() - started

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log()[-3000:]}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pid(self) -> int:
        """The pid of the latest worker process that reported ready."""
        return int(re.findall(r"worker process (\d+) ready", self.log())[-1])

    def job(self, sop_instance_uid: str) -> dict[str, Any] | None:
        with self.store.engine.connect() as conn:
            row = conn.execute(text(
                "SELECT jobs.id, jobs.state, jobs.lease_owner, jobs.last_error FROM jobs JOIN instances "
                "ON jobs.instance_id = instances.id WHERE instances.sop_instance_uid = :uid"),
                {"uid": sop_instance_uid}).first()
        return None if row is None else dict(row._mapping)

    def results(self, job_id: int) -> list[tuple[str, str]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(text("SELECT kind, path FROM results WHERE job_id = :id ORDER BY id"), {"id": job_id})
            return [(str(kind), str(path)) for kind, path in rows]

    def finished(self, ds: Dataset, timeout: float = 60) -> dict[str, Any]:
        """Wait until the job of ``ds`` is done or failed; return its row."""
        return dict(wait_for(lambda: (j := self.job(ds.SOPInstanceUID)) and j["state"] in ("done", "failed") and j,
                             timeout=timeout, interval=0.1, what=f"the job of {ds.SOPInstanceUID} to finish"))

    def at_pacs(self, n: int, timeout: float = 30) -> None:
        wait_for(lambda: len(list(self.pacs_dir.iterdir())) >= n, timeout=timeout, interval=0.1,
                 what=f"{n} results at the PACS")

    def enqueue_fifo(self, name: str) -> tuple[Dataset, Path, Path]:
        """Queue a job whose received file is a FIFO (the worker blocks opening it); also write the
        real file beside it. Returns the dataset, the FIFO's path and the real file's path."""
        ds = chest(seed=len(name))
        fifo = self.tmp / f"{name}.fifo"
        os.mkfifo(fifo)
        real = save(ds, self.tmp, name)
        meta = ReceivedInstance(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, CR, "MOD", fifo,
                                real.stat().st_size)
        self.store.record_instance(meta, True, "accepted: test")
        return ds, fifo, real

    def running_pid(self, ds: Dataset, other_than: int = 0) -> int:
        """Wait until a worker process (not ``other_than``) runs the job of ``ds``; its pid."""
        def pid() -> int:
            job = self.job(ds.SOPInstanceUID)
            owner = (job or {}).get("lease_owner") or ""
            found = int(owner.split(":")[1]) if job and job["state"] == "running" and owner else 0
            return found if found != other_than else 0
        return int(wait_for(pid, timeout=30, interval=0.05, what=f"a worker process to run {ds.SOPInstanceUID}"))

    def stop(self) -> None:
        for proc in (self.proc, self.pacs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, package: Path) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("node"), package)
    try:
        yield n
    finally:
        n.stop()


def sr_text(path: str) -> str:
    """The reason a not-analysed SR states (read back by node.report), or "" for an analysed one."""
    from node.report import read_report

    statement = read_report(pydicom.dcmread(path)).not_analysed
    return statement.reason if statement else ""


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie does no work


# --- what a job throws -------------------------------------------------------------------------------------


def test_a_panicking_rle_image_gets_a_not_analysed_sr_and_the_next_image_is_analysed(
        node: Node, tmp_path: Path) -> None:
    bad, good = panicking_rle(), chest(seed=1)
    before = len(list(node.pacs_dir.iterdir()))
    send_as_is([save(bad, tmp_path, "bad"), save(good, tmp_path, "good")], node.port)
    bad_job, good_job = node.finished(bad, timeout=30), node.finished(good, timeout=30)
    assert bad_job["state"] == "done" and [k for k, _ in node.results(bad_job["id"])] == ["failure_sr"]
    assert "cannot decode pixel data" in sr_text(node.results(bad_job["id"])[0][1])
    assert good_job["state"] == "done" and [k for k, _ in node.results(good_job["id"])] == ["sr", "sc"]
    node.at_pacs(before + 3)
    assert "PanicException" in node.log() and "Test^Isolation" not in node.log()


def test_a_decompression_bomb_header_is_refused_before_decoding(node: Node, tmp_path: Path) -> None:
    ds = bomb()
    send_as_is([save(ds, tmp_path, "bomb")], node.port)
    job = node.finished(ds, timeout=30)
    assert [k for k, _ in node.results(job["id"])] == ["failure_sr"]
    assert "Rows must be 1-16384" in sr_text(node.results(job["id"])[0][1])
    status = Path(f"/proc/{node.worker_pid()}/status").read_text()
    peak_mb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]
    assert peak_mb < 1024, f"the worker process peaked at {peak_mb:.0f} MB"


# --- a worker process that dies or stalls on a job -------------------------------------------------------


def test_a_worker_killed_on_a_job_is_restarted_and_the_job_completes(node: Node) -> None:
    ds, fifo, real = node.enqueue_fifo("killed-once")
    pid = node.running_pid(ds)
    os.replace(real, fifo)  # the next reader gets the image; the blocked one stays blocked on the FIFO
    os.kill(pid, signal.SIGKILL)
    job = node.finished(ds, timeout=45)
    assert job["state"] == "done" and [k for k, _ in node.results(job["id"])] == ["sr", "sc"]
    assert [i.kind for i in node.store.incidents(job["id"])] == ["crash"]
    assert node.worker_pid() != pid and "signal SIGKILL" in node.log()


def test_a_job_that_kills_the_worker_twice_is_quarantined_and_later_jobs_run(node: Node, tmp_path: Path) -> None:
    ds, fifo, real = node.enqueue_fifo("killed-twice")
    first = node.running_pid(ds)
    os.kill(first, signal.SIGKILL)
    second = node.running_pid(ds, other_than=first)
    os.replace(real, fifo)  # the quarantine reads the header from the real file
    os.kill(second, signal.SIGKILL)
    job = node.finished(ds, timeout=45)
    assert job["state"] == "failed" and job["last_error"].startswith("quarantined")
    assert [i.kind for i in node.store.incidents(job["id"])] == ["crash", "crash"]
    [(kind, path)] = node.results(job["id"])
    assert kind == "failure_sr" and "crashed the analysis process" in sr_text(path)
    later = chest(seed=7)
    assert dcmsend([save(later, tmp_path, "later")], node.port).returncode == 0
    assert node.finished(later, timeout=30)["state"] == "done"


def test_a_stalled_job_is_killed_after_job_timeout_s(node: Node) -> None:
    ds, fifo, real = node.enqueue_fifo("stalled")
    pid = node.running_pid(ds)
    started = time.monotonic()
    wait_for(lambda: node.store.incidents(node.job(ds.SOPInstanceUID)["id"]),  # type: ignore[index]
             timeout=JOB_TIMEOUT_S + 10, interval=0.1, what="the stall to be recorded")
    took = time.monotonic() - started
    assert JOB_TIMEOUT_S - 1 <= took <= JOB_TIMEOUT_S + 5, took
    os.replace(real, fifo)
    assert process_gone(pid)
    job = node.finished(ds, timeout=45)
    assert job["state"] == "done" and [i.kind for i in node.store.incidents(job["id"])] == ["stall"]


def test_c_echo_answers_quickly_while_the_worker_decodes_a_big_image(node: Node, tmp_path: Path) -> None:
    """Before, the decode held the GIL of the one process that also ran the SCP (about 0.9 s here)."""
    ds = big_j2k()
    send_as_is([save(ds, tmp_path, "big")], node.port)
    wait_for(lambda: (node.job(ds.SOPInstanceUID) or {}).get("state") == "running", timeout=30, interval=0.01,
             what="the big image's job to run")
    latencies = []
    while (node.job(ds.SOPInstanceUID) or {}).get("state") == "running":
        latencies.append(node.echo_s())
    assert node.finished(ds)["state"] == "done"
    assert len(latencies) >= 3, f"the job ended after {len(latencies)} echoes: no measurement"
    assert max(latencies) < 0.4, f"C-ECHO round trips while the worker decoded: {latencies}"


def test_config_names_the_worker_limits() -> None:
    from node.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as info:
        load_settings(environ={"CXR_WORKER_JOB_TIMEOUT_S": "0", "CXR_WORKER_MAX_MEMORY_MB": "10"})
    assert "worker.job_timeout_s: expected 1-86400 seconds, found 0.0" in str(info.value)
    assert "worker.max_memory_mb: expected >= 256" in str(info.value)


# --- a node with a small memory limit, then killed with SIGKILL ----------------------------------------------


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory, package: Path) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("small"), package, max_memory_mb=MEMORY_LIMIT_MB)
    try:
        yield n
    finally:
        n.stop()


def test_a_job_that_passes_max_memory_mb_twice_is_quarantined(small_node: Node, tmp_path: Path) -> None:
    ds = chest(6000, 6000)  # 72 MB stored; the float image and the overlay need several times that
    send_as_is([save(ds, tmp_path, "large")], small_node.port)
    job = small_node.finished(ds, timeout=60)
    assert job["state"] == "failed" and job["last_error"].startswith("quarantined")
    assert [i.kind for i in small_node.store.incidents(job["id"])] == ["memory", "memory"]
    [(kind, path)] = small_node.results(job["id"])
    assert kind == "failure_sr" and "more memory than worker.max_memory_mb" in sr_text(path)
    small = chest(seed=3)
    send_as_is([save(small, tmp_path, "small")], small_node.port)
    assert small_node.finished(small, timeout=30)["state"] == "done"


def test_the_worker_process_dies_with_the_node(small_node: Node) -> None:
    ds, _fifo, _real = small_node.enqueue_fifo("orphan")
    pid = small_node.running_pid(ds)
    small_node.proc.kill()
    small_node.proc.wait()
    wait_for(lambda: process_gone(pid), timeout=5, interval=0.05, what=f"worker process {pid} to end with the node")
