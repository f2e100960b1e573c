"""Latency benchmark: from a modality's C-STORE to the SR stored at the PACS, with the default model.

Starts Orthanc (the PACS) and ``cxr-node serve`` (role all: SCP, worker, scheduler; SQLite; the
bundled model unless ``--model``), then sends one frontal chest image at a time with dcmtk ``dcmsend``
(each image a fresh SOP Instance UID; the real frontal files of ``../shared/data/dicom`` and
pydicom-data's RG1 in turn) and waits until Orthanc has the SR *and* the overlay for it (their UIDs are
deterministic, so the benchmark knows what to look for). Latency = from just before dcmsend starts
(so it includes the transfer of the image) to the moment Orthanc's REST API finds the SR, polled every
20 ms. Images are sent one after another, never overlapping: this is the latency a radiologist sees on
an idle node, not a throughput figure.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/latency.py                 # 30 images
    .venv/bin/python bench/latency.py --images 10 --model path/to/package
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai.manifest import bundled_package_dir, load_manifest  # noqa: E402
from node.results import result_uid  # noqa: E402
from tests.conftest import free_port, require_tool, shared_data_dir  # noqa: E402
from tests.peers import DCMTK_ENV, dcmsend, orthanc, pacs_and_model_toml, wait_for  # noqa: E402

FRONTAL = ["rsna_cr_pa_jpeg_baseline.dcm", "dx_pa_chest_j2k_lossless.dcm", "cr_pa_chest_jpegls_near_lossless.dcm",
           "rsna_cr_ap_jpeg_baseline.dcm"]


def corpus() -> list[Path]:
    files: list[Path] = []
    data = shared_data_dir()
    if data is not None:
        files += [data / "dicom" / name for name in FRONTAL]
    try:
        from pydicom.data import get_testdata_file

        rg1 = get_testdata_file("RG1_UNCR.dcm")
        if rg1:
            files.append(Path(rg1))
    except ImportError:
        pass
    if not files:
        sys.exit("no frontal chest DICOM found: need ../shared/data or pydicom-data")
    return files


def lookup(http_port: int, uid: str) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/tools/lookup", data=uid.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return bool(json.loads(r.read()))


def node_config(folder: Path, pacs_port: int, package: Path) -> tuple[Path, int]:
    port = free_port()
    cfg = folder / "node.toml"
    cfg.write_text(f"""
[scp]
port = {port}
[storage]
data_dir = "var"
[worker]
poll_s = 0.05
{pacs_and_model_toml(pacs_port, package)}""")
    return cfg, port


def run(n_images: int, package: Path) -> dict[str, Any]:
    manifest = load_manifest(package)
    files = corpus()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with orthanc(tmp / "pacs") as pacs:
            cfg, port = node_config(tmp, pacs.dicom_port, package)
            log = (tmp / "node.log").open("wb")
            node = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: subprocess.run([require_tool("echoscu"), "-aec", "CXR-AI", "127.0.0.1", str(port)],
                                                env=DCMTK_ENV, capture_output=True).returncode == 0,
                         timeout=60, what="the node")
                latencies = [one(tmp, files[i % len(files)], i, port, pacs.http_port, manifest)
                             for i in range(n_images)]
            finally:
                node.terminate()
                node.wait(timeout=60)
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {
        "images": n_images, "model": f"{manifest.name} {manifest.version}", "members": len(manifest.members),
        "input_sizes": list(manifest.input_sizes), "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(q[18], 3), "max_s": round(max(latencies), 3), "latencies_s": [round(x, 3) for x in latencies],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_avg_after": os.getloadavg(),
    }


def one(tmp: Path, src: Path, i: int, port: int, http_port: int, manifest: Any) -> float:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp / f"img{i}.dcm"
    ds.save_as(path)
    sr = result_uid(ds.SOPInstanceUID, manifest.version, "sr", algorithm_name=manifest.name)
    sc = result_uid(ds.SOPInstanceUID, manifest.version, "overlay", algorithm_name=manifest.name)
    t0 = time.perf_counter()
    out = dcmsend([path], port)
    if out.returncode != 0:
        raise RuntimeError(out.stdout + out.stderr)
    wait_for(lambda: lookup(http_port, sr), timeout=120, interval=0.02, what=f"SR of image {i}")
    latency = time.perf_counter() - t0
    wait_for(lambda: lookup(http_port, sc), timeout=120, interval=0.02, what=f"overlay of image {i}")
    print(f"{i:3d} {src.name:45s} {latency:6.3f} s", flush=True)
    return latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--model", type=Path, default=None, help="model package (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latency.json")
    args = parser.parse_args()
    result = run(args.images, (args.model or bundled_package_dir()).resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"receipt-to-SR-at-PACS over {result['images']} images: p50 {result['p50_s']} s, p95 {result['p95_s']} s "
          f"(max {result['max_s']} s); model {result['model']}, {result['members']} members, input sizes "
          f"{result['input_sizes']} px")


if __name__ == "__main__":
    main()
