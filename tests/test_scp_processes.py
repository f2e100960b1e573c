"""``scp.processes`` = 2: `cxr-node serve --role scp` as a real process, two SCP processes on one port.

dcmsend sends small synthetic images over 4 parallel associations; every image must have exactly one
instance row, one job row and its file; the log must show associations handled by two processes; SIGTERM
must stop the parent and its child (no process left).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import REPO, free_port, require_tool
from tests.peers import dcmsend, wait_for

pytestmark = pytest.mark.integration

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
LISTENING = re.compile(r"(\d+) SCP processes listening on port \d+: pids ([\d, ]+)")
STORED = re.compile(r"\[(\d+)\]: stored (\S+) from ")


def write_cr(folder: Path, index: int, study_uid: str) -> tuple[Path, str]:
    """A small synthetic frontal CR (64x64, 16-bit) with new UIDs; its path and SOPInstanceUID."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientID, ds.PatientName = f"SYN{index:03d}", "Synthetic^Test"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.full((64, 64), index * 10, dtype=np.uint16).tobytes()
    path = folder / f"cr{index:03d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, sop_uid


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path, Path]]:
    """`cxr-node serve --role scp` with scp.processes = 2 (SQLite); the process, port, data dir and log."""
    port = free_port()
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[scp]\nport = {port}\nbind_address = "127.0.0.1"\nprocesses = 2\n\n'
                      f'[storage]\ndata_dir = "{data}"\nmin_free_mb = 1\n')
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config), "--role", "scp"],
                                cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: LISTENING.search(log_path.read_text()) or proc.poll() is not None, 60,
                 what="two SCP processes listening")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        yield proc, port, data, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_processes_share_the_port_and_stop_together(
        node: tuple[subprocess.Popen[str], int, Path, Path], tmp_path: Path) -> None:
    require_tool("dcmsend")
    proc, port, data, log_path = node
    listening = LISTENING.search(log_path.read_text())
    assert listening is not None and listening.group(1) == "2"
    pids = {int(p) for p in listening.group(2).split(",")}
    assert proc.pid in pids and len(pids) == 2
    files = [write_cr(tmp_path, i, generate_uid()) for i in range(12)]
    shares = [[path for path, _ in files[i::4]] for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:  # 4 dcmsend processes, one association each, at once
        done = list(pool.map(lambda share: dcmsend(share, port), shares))
    assert [d.returncode for d in done] == [0, 0, 0, 0], [d.stderr[-500:] for d in done]
    handled_by = {int(pid) for pid, _ in STORED.findall(log_path.read_text())}
    assert handled_by == pids

    with closing(sqlite3.connect(data / "cxr-node.sqlite")) as con:
        rows = con.execute("SELECT i.sop_instance_uid, i.path, COUNT(j.id) FROM instances i "
                           "LEFT JOIN jobs j ON j.instance_id = i.id GROUP BY i.id").fetchall()
    assert sorted(uid for uid, _, _ in rows) == sorted(uid for _, uid in files)
    assert all(jobs == 1 and Path(path).is_file() for _, path, jobs in rows)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=40) == 0, log_path.read_text()[-3000:]
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, interval=0.1, what="every SCP process gone")


def test_an_idle_process_takes_the_next_association(
        node: tuple[subprocess.Popen[str], int, Path, Path], tmp_path: Path) -> None:
    """Two associations held open at once are served by the two processes, one each, three times over."""
    from pynetdicom import AE

    _, port, _, log_path = node
    listening = LISTENING.search(log_path.read_text())
    assert listening is not None
    pids = {int(p) for p in listening.group(2).split(",")}
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    for round_ in range(3):
        held, sent = [], []
        for k in range(2):
            assoc = ae.associate("127.0.0.1", port, ae_title="CXR-AI")
            assert assoc.is_established
            held.append(assoc)
            path, uid = write_cr(tmp_path, 10 * round_ + k, generate_uid())
            assert assoc.send_c_store(path).Status == 0x0000
            sent.append(uid)
        by_uid = {uid: int(pid) for pid, uid in STORED.findall(log_path.read_text())}
        for assoc in held:
            assoc.release()
        assert {by_uid[uid] for uid in sent} == pids, f"round {round_}: {by_uid}"


def test_a_dead_child_stops_the_node_non_zero(node: tuple[subprocess.Popen[str], int, Path, Path]) -> None:
    proc, _, _, log_path = node
    listening = LISTENING.search(log_path.read_text())
    assert listening is not None
    child = next(int(p) for p in listening.group(2).split(",") if int(p) != proc.pid)
    os.kill(child, signal.SIGKILL)
    assert proc.wait(timeout=40) == 1
    assert f"SCP process {child} exited with status -9" in log_path.read_text()
