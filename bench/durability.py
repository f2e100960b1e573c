"""Durability benchmark: many modalities, the PACS down for the first half, the node killed twice.

Eight modalities (threads of this script, each a pynetdicom SCU on its own association) send 100
frontal chest images each to ``cxr-node serve`` (role all, SQLite, the bundled model unless
``--model``). A modality behaves like a real one: an image counts as sent only when the node
answers Success; a refused association, a dropped connection or an error status is retried after
a pause, on a new association. Meanwhile:

- the PACS (Orthanc) is down until half of the images have been acknowledged, then started;
- the node is killed with SIGKILL twice and restarted at once, as a service manager would: during
  intake (25 % of the images acknowledged) and during analysis (half of the jobs done).

At the end every acknowledged image must have exactly one SR and one overlay at the PACS:
``lost`` counts acknowledged images without their SR, ``duplicates`` counts result objects at the
PACS that are not the one deterministic SR/overlay of an acknowledged image (a second, different
result for the same image). Both must be 0. The outbox retries are capped at ``send.retry_max_s``
= 30 s here (default 600 s) so that the run does not wait minutes after the PACS comes back.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/durability.py                       # 8 x 100 images, bundled model
    .venv/bin/python bench/durability.py --modalities 2 --images 20 --model path/to/package
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai.manifest import bundled_package_dir, load_manifest  # noqa: E402
from node.results import result_uid  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.peers import Orthanc, pacs_and_model_toml, wait_for  # noqa: E402

RETRY_PAUSE_S = 1.0


def chest_image(rng: np.random.Generator, modality: int, index: int) -> Dataset:
    """A synthetic 512 x 512 12-bit frontal chest radiograph (two dark lung fields in a bright body)."""
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32)
    body = ((xx - 256) / 230) ** 2 + ((yy - 270) / 250) ** 2 < 1
    lungs = [((xx - cx) / 80) ** 2 + ((yy - 250) / 150) ** 2 < 1 for cx in (170, 342)]
    lungs = lungs[0] | lungs[1]
    img = 300 + 2500 * body - 1600 * lungs + rng.normal(0, 60, (512, 512))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = f"BENCH{modality:02d}{index:03d}", "Bench^Durability"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
    return ds


class Modality(threading.Thread):
    """One modality: sends its images in order, each until the node answers Success."""

    def __init__(self, name: str, images: list[Dataset], port: int, progress: Any) -> None:
        super().__init__(name=name, daemon=True)
        self.images, self.port, self.progress = images, port, progress
        self.acknowledged: list[str] = []
        self.retries = 0
        self.finished_at = 0.0  # time.monotonic() when its last image was acknowledged

    def run(self) -> None:
        ae = AE(ae_title=self.name)
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        pending = list(self.images)
        while pending:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="CXR-AI")
            if not assoc.is_established:
                self.retries += 1
                time.sleep(RETRY_PAUSE_S)
                continue
            while pending and assoc.is_established:
                status = assoc.send_c_store(pending[0])
                if status is not None and getattr(status, "Status", None) == 0x0000:
                    self.acknowledged.append(str(pending.pop(0).SOPInstanceUID))
                    self.progress()
                else:
                    self.retries += 1
                    break
            if assoc.is_established:
                assoc.release()
            if pending:
                time.sleep(RETRY_PAUSE_S)
        self.finished_at = time.monotonic()


def node_config(folder: Path, port: int, pacs_port: int, package: Path) -> Path:
    cfg = folder / "node.toml"
    cfg.write_text(f"""
[scp]
port = {port}
max_associations = 16
[storage]
data_dir = "var"
[worker]
poll_s = 0.05
[send]
retry_initial_s = 2.0
retry_max_s = 30.0
{pacs_and_model_toml(pacs_port, package)}""")
    return cfg


def kill_and_restart(node: subprocess.Popen[bytes], cfg: Path, log: Any, events: list[tuple[float, str]], t0: float,
                     when: str) -> subprocess.Popen[bytes]:
    """SIGKILL the node (its worker process dies with it) and start it again at once."""
    node.send_signal(signal.SIGKILL)
    node.wait()
    events.append((time.monotonic() - t0, f"node killed (SIGKILL) {when}"))
    return start_node(cfg, log)


def jobs_done(folder: Path) -> int:
    """How many jobs the node's SQLite database says are done (0 while it does not exist yet)."""
    try:
        with sqlite3.connect(f"file:{folder / 'var' / 'cxr-node.sqlite'}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0])
    except sqlite3.Error:
        return 0


def start_node(cfg: Path, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def results_at_pacs(pacs: Orthanc) -> list[str]:
    """The SOP Instance UIDs of every object Orthanc holds (only the node sends to it: all are results)."""
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.instances()]


def run(n_modalities: int, n_images: int, package: Path, settle_timeout_s: float) -> dict[str, Any]:
    manifest = load_manifest(package)
    rng = np.random.default_rng(0)
    total = n_modalities * n_images
    acked = {"n": 0}
    lock = threading.Lock()
    events: list[tuple[float, str]] = []

    def progress() -> None:
        with lock:
            acked["n"] += 1

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pacs = Orthanc("PACS", free_port(), free_port(), tmp / "pacs")
        (tmp / "pacs").mkdir()
        port = free_port()
        cfg = node_config(tmp, port, pacs.dicom_port, package)
        log = (tmp / "node.log").open("ab")
        node = start_node(cfg, log)
        modalities = [Modality(f"MOD{m:02d}", [chest_image(rng, m, i) for i in range(n_images)], port, progress)
                      for m in range(n_modalities)]
        t0 = time.monotonic()
        for m in modalities:
            m.start()
        intake_kill_pending = analysis_kill_pending = True
        deadline = time.monotonic() + settle_timeout_s
        try:
            while (any(m.is_alive() for m in modalities) or analysis_kill_pending) and time.monotonic() < deadline:
                done = acked["n"] / total
                if intake_kill_pending and done >= 0.25:
                    node = kill_and_restart(node, cfg, log, events, t0, f"during intake, {acked['n']} acknowledged")
                    intake_kill_pending = False
                if pacs.process is None and done >= 0.5:
                    pacs.start()
                    events.append((time.monotonic() - t0, f"PACS started at {acked['n']} acknowledged"))
                if analysis_kill_pending and (analysed := jobs_done(tmp)) >= total // 2:
                    node = kill_and_restart(node, cfg, log, events, t0, f"during analysis, {analysed} jobs done")
                    analysis_kill_pending = False
                time.sleep(0.05)
            for m in modalities:
                m.join(timeout=5)
            sent_s = max(m.finished_at or time.monotonic() for m in modalities) - t0
            acknowledged = [uid for m in modalities for uid in m.acknowledged]
            expected = {result_uid(uid, manifest.version, kind, algorithm_name=manifest.name)
                        for uid in acknowledged for kind in ("sr", "overlay")}
            sr_expected = {result_uid(uid, manifest.version, "sr", algorithm_name=manifest.name): uid
                           for uid in acknowledged}
            try:
                wait_for(lambda: expected <= set(results_at_pacs(pacs)), timeout=settle_timeout_s, interval=2.0,
                         what="every result at the PACS")
            except TimeoutError as exc:
                events.append((time.monotonic() - t0, str(exc)))
            at_pacs = results_at_pacs(pacs)
            delivered_s = time.monotonic() - t0
        finally:
            node.terminate()
            node.wait(timeout=60)
            pacs.stop()
    lost = [uid for sr, uid in sr_expected.items() if sr not in set(at_pacs)]
    return {
        "modalities": n_modalities, "images_per_modality": n_images, "acknowledged": len(acknowledged),
        "distinct_acknowledged": len(set(acknowledged)), "modality_retries": sum(m.retries for m in modalities),
        "lost": len(lost), "duplicates": len([u for u in at_pacs if u not in expected]),
        "results_at_pacs": len(at_pacs), "expected_results": len(expected),
        "all_acknowledged_s": round(sent_s, 1), "all_delivered_s": round(delivered_s, 1),
        "events": [f"{t:7.1f} s  {what}" for t, what in events],
        "model": f"{manifest.name} {manifest.version}", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modalities", type=int, default=8)
    parser.add_argument("--images", type=int, default=100, help="images per modality")
    parser.add_argument("--model", type=Path, default=None, help="model package (default: the bundled one)")
    parser.add_argument("--settle-timeout", type=float, default=900.0,
                        help="seconds to wait, after the last acknowledgement, for every result at the PACS")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "durability.json")
    args = parser.parse_args()
    result = run(args.modalities, args.images, args.model or bundled_package_dir(), args.settle_timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for line in result["events"]:
        print(line)
    print(f"{result['acknowledged']} images acknowledged from {result['modalities']} modalities "
          f"({result['modality_retries']} retries); lost {result['lost']}, duplicates {result['duplicates']}; "
          f"all acknowledged after {result['all_acknowledged_s']} s, all delivered after {result['all_delivered_s']} s")


if __name__ == "__main__":
    main()
