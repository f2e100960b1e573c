"""Benchmark: what running the worker in its own process costs per image, and what it buys the SCP.

Runs `cxr-node serve` (role all) from a given source tree (this one, or an older checkout for a
before/after comparison) with a model package, a dcmtk storescp as the PACS and SQLite, then:

- ``throughput``: sends ``--images`` frontal chest images (native, 16-bit) in one association with
  dcmsend and times from the first byte sent until every job is done and every result is at the PACS;
  reports seconds per image end to end, and the median of the worker's own "done in" times;
- ``echo``: sends one big RLE image (``--big`` pixels a side) and, while its job runs, C-ECHOes the
  node (dcmtk echoscu) in a loop: reports the slowest and median round trips;
- ``rss``: the worker process's peak resident memory (``VmHWM``) after the big image (new tree only:
  the old one has no worker process).

Usage: ``python bench/worker_isolation.py --tree . --package <pkg> --images 40 --repeats 3 --big 6000``
Prints one JSON object. Uses only the command line of the node, dcmtk and the SQLite file, so that it
runs against trees from before the worker process existed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless, generate_uid

CR = UID("1.2.840.10008.5.1.4.1.1.1")
ENV = {**os.environ, "TCP_NODELAY": "1", "PYTHONUNBUFFERED": "1"}


def chest(rows: int, cols: int, seed: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CR, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CR, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "B^M", "B1", "CR", "CHEST", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:rows, 0:cols]
    image = (np.sin(x / 97.0) + np.cos(y / 53.0) + 2.0) * 900.0
    image += np.random.default_rng(seed).integers(0, 4, (rows, cols))
    ds.PixelData = image.astype(np.uint16).tobytes()
    return ds


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Run:
    """One node from ``tree`` with its PACS, in a temporary folder."""

    def __init__(self, tree: Path, package: Path, work: Path) -> None:
        self.work, self.port, pacs_port = work, free_port(), free_port()
        (work / "pacs").mkdir()
        self.pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(work / "pacs"), str(pacs_port)],
                                     env=ENV, cwd=work)
        (work / "node.toml").write_text(
            f'[scp]\nport = {self.port}\n[storage]\ndata_dir = "var"\n[worker]\npoll_s = 0.05\n'
            f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
            f'[model]\npackage = "{package}"\n')
        self.log = work / "node.log"
        with self.log.open("wb") as fh:
            self.node = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config",
                                          str(work / "node.toml")], cwd=tree, env=ENV, stdout=fh,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while self.echo() is None:
            if time.monotonic() > deadline or self.node.poll() is not None:
                raise RuntimeError(f"node did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def echo(self) -> float | None:
        started = time.perf_counter()
        done = subprocess.run(["echoscu", "-aec", "CXR-AI", "127.0.0.1", str(self.port)], env=ENV,
                              capture_output=True, check=False)
        return time.perf_counter() - started if done.returncode == 0 else None

    def jobs(self, state: str) -> int:
        db = sqlite3.connect(self.work / "var" / "cxr-node.sqlite", timeout=30)
        try:
            return int(db.execute("SELECT count(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0])
        finally:
            db.close()

    def send(self, files: list[Path]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["dcmsend", "-aet", "BENCH", "-aec", "CXR-AI", "--decompress-never", "-nuc",
                                 "127.0.0.1", str(self.port), *map(str, files)], env=ENV)

    def stop(self) -> None:
        for proc in (self.node, self.pacs):
            proc.terminate()
            proc.wait(timeout=60)


def throughput(run: Run, files: list[Path]) -> dict[str, float]:
    jobs = run.jobs("done") + len(files)
    results = len(list((run.work / "pacs").iterdir())) + 2 * len(files)
    logged = len(re.findall(r" done in (\d+) ms", run.log.read_text()))
    started = time.perf_counter()
    run.send(files).wait()
    while run.jobs("done") < jobs or len(list((run.work / "pacs").iterdir())) < results:
        time.sleep(0.02)
    total = time.perf_counter() - started
    done_ms = [float(m) for m in re.findall(r" done in (\d+) ms", run.log.read_text())[logged:]]
    return {"s_per_image": total / len(files), "worker_ms_median": statistics.median(done_ms)}


def echo_while_busy(run: Run, big: Path) -> dict[str, float]:
    before = run.jobs("done")
    sender = run.send([big])
    latencies: list[float] = []
    while run.jobs("running") == 0 and run.jobs("done") <= before:
        time.sleep(0.005)
    while run.jobs("done") <= before:
        latency = run.echo()
        latencies.append(latency if latency is not None else float("inf"))
    sender.wait()
    time.sleep(0.5)  # the worker logs "done in" just after it records the job done
    done_ms = float(re.findall(r" done in (\d+) ms", run.log.read_text())[-1])
    return {"echo_max_s": max(latencies), "echo_median_s": statistics.median(latencies), "echoes": len(latencies),
            "big_job_ms": done_ms}


def worker_peak_mb(run: Run) -> float | None:
    pids = re.findall(r"worker process (\d+) ready", run.log.read_text())
    if not pids:
        return None
    status = Path(f"/proc/{pids[-1]}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path("."), help="source tree to run the node from")
    parser.add_argument("--package", type=Path, required=True, help="model package folder")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big", type=int, default=6000, help="pixels a side of the big RLE image (0: skip)")
    args = parser.parse_args()
    out: dict[str, Any] = {"tree": str(args.tree.resolve()), "images": args.images, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(args.images * args.repeats):
            path = Path(tmp) / f"img{i}.dcm"
            chest(args.size, args.size, i).save_as(path, enforce_file_format=True)
            files.append(path)
        big = Path(tmp) / "big.dcm"
        if args.big:
            ds = chest(args.big, args.big, 0)
            ds.compress(RLELossless)
            ds.save_as(big, enforce_file_format=True)
        work = Path(tmp) / "run"
        work.mkdir()
        run = Run(args.tree.resolve(), args.package.resolve(), work)
        try:
            out["throughput"] = [throughput(run, files[i * args.images:(i + 1) * args.images])
                                 for i in range(args.repeats)]
            if args.big:
                out["echo"] = echo_while_busy(run, big)
                out["worker_peak_mb"] = worker_peak_mb(run)
        finally:
            run.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
