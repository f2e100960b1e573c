#!/usr/bin/env python
"""Throughput of good images while hostile peers attack the node beside them.

Starts Orthanc and ``cxr-node serve`` (role all, SQLite, the bundled model unless ``--model``), then
runs two phases on the same node:

1. ``alone``: one modality (a pynetdicom SCU, one association, retrying until Success) sends
   ``--images`` synthetic frontal chest images; the rate is images / (first send -> last SR at the PACS).
2. ``under attack``: the same, while an attacker thread cycles through the hostile suite's cases
   (``tests/hostile``: malformed C-STOREs, corrupt RLE, decompression bombs, raw PDU garbage, aborted
   transfers; each category at its "small" size, over and over) from 127.0.0.1, and a second attacker
   holds silent connections from 127.0.0.2 (slot attack) and renews them as the node closes them.

The goal (issue: "at least 80 % of their normal rate") compares the two rates. Everything shares
the machine's cores: the attackers' own CPU (building cases) counts against the node here.

    .venv/bin/python bench/hostile_throughput.py                      # 60 images per phase
    .venv/bin/python bench/hostile_throughput.py --images 20 --model path/to/package
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from durability import Modality, chest_image, node_config, results_at_pacs, start_node  # noqa: E402

from ai.manifest import bundled_package_dir, load_manifest  # noqa: E402
from node.results import result_uid  # noqa: E402
from tests.conftest import free_port, require_tool, shared_data_dir  # noqa: E402
from tests.hostile import cases as hc  # noqa: E402
from tests.hostile.runner import run_steps, send_store  # noqa: E402
from tests.peers import DCMTK_ENV, Orthanc, wait_for  # noqa: E402

ATTACK_CATEGORIES = [c for c in hc.CATEGORIES if c not in ("slots", "duplicates")]
SILENT_CONNECTIONS = 16


def attacker(port: int, stop: threading.Event, sent: Counter[str]) -> None:
    """Cycle through the hostile categories until ``stop``."""
    ctx = hc.Context(seed=7, data_dir=shared_data_dir())
    while not stop.is_set():
        for category in ATTACK_CATEGORIES:
            for case in hc.generate(category, "small", ctx):
                if stop.is_set():
                    return
                with suppress(Exception):
                    if case.kind == "store":
                        send_store(port, case, timeout=10)
                    elif case.kind == "pdu":
                        run_steps(port, case)
                sent[category] += 1


def slot_holder(port: int, stop: threading.Event, opened: Counter[str]) -> None:
    """Keep ``SILENT_CONNECTIONS`` connections from 127.0.0.2 open, each having sent 3 bytes."""
    held: list[socket.socket] = []
    while not stop.is_set():
        alive = []
        for s in held:
            try:
                s.setblocking(False)
                gone = s.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                s.close()
            else:
                alive.append(s)
        held = alive
        while len(held) < SILENT_CONNECTIONS and not stop.is_set():
            s = socket.socket()
            try:
                s.bind(("127.0.0.2", 0))
                s.settimeout(2)
                s.connect(("127.0.0.1", port))
                s.sendall(b"\x01\x00\x00")
                held.append(s)
                opened["silent connections"] += 1
            except OSError:
                s.close()
                break
        stop.wait(0.2)
    for s in held:
        s.close()


def phase(name: str, port: int, pacs: Orthanc, manifest: Any, n_images: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    images = [chest_image(rng, seed, i) for i in range(n_images)]
    expected = {result_uid(str(ds.SOPInstanceUID), manifest.version, "sr", algorithm_name=manifest.name)
                for ds in images}
    modality = Modality("GOODMOD", images, port, lambda: None)
    t0 = time.monotonic()
    modality.start()
    wait_for(lambda: expected <= set(results_at_pacs(pacs)), timeout=60 + 20 * n_images, interval=0.2,
             what=f"every SR of phase {name}")
    elapsed = time.monotonic() - t0
    modality.join(timeout=30)
    return {"phase": name, "images": n_images, "seconds": round(elapsed, 2),
            "images_per_s": round(n_images / elapsed, 3), "modality_retries": modality.retries}


def run(n_images: int, package: Path) -> dict[str, Any]:
    manifest = load_manifest(package)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "pacs").mkdir()
        pacs = Orthanc("PACS", free_port(), free_port(), tmp / "pacs")
        pacs.start()
        port = free_port()
        cfg = node_config(tmp, port, pacs.dicom_port, package)
        node = start_node(cfg, (tmp / "node.log").open("ab"))
        try:
            echoscu = require_tool("echoscu")
            wait_for(lambda: subprocess.run([echoscu, "-aec", "CXR-AI", "127.0.0.1", str(port)], env=DCMTK_ENV,
                                            capture_output=True, check=False).returncode == 0,
                     timeout=120, what="the node")
            phase("warm-up", port, pacs, manifest, 3, seed=99)
            alone = phase("alone", port, pacs, manifest, n_images, seed=1)
            stop = threading.Event()
            sent: Counter[str] = Counter()
            opened: Counter[str] = Counter()
            threads = [threading.Thread(target=attacker, args=(port, stop, sent), daemon=True),
                       threading.Thread(target=slot_holder, args=(port, stop, opened), daemon=True)]
            for t in threads:
                t.start()
            time.sleep(2.0)  # the attack is under way before the good images start
            try:
                attacked = phase("under attack", port, pacs, manifest, n_images, seed=2)
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=60)
            node_alive = node.poll() is None
        finally:
            node.terminate()
            node.wait(timeout=60)
            pacs.stop()
    return {
        "alone": alone, "under_attack": attacked,
        "ratio": round(attacked["images_per_s"] / alone["images_per_s"], 3),
        "hostile_cases_sent": dict(sent), "hostile_total": sum(sent.values()), **dict(opened),
        "node_alive_after": node_alive, "model": f"{manifest.name} {manifest.version}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=60, help="good images per phase")
    parser.add_argument("--model", type=Path, default=None, help="model package (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hostile_throughput.json")
    args = parser.parse_args()
    result = run(args.images, args.model or bundled_package_dir())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"good images: {result['alone']['images_per_s']} /s alone, {result['under_attack']['images_per_s']} /s "
          f"under attack ({result['hostile_total']} hostile cases beside them): ratio {result['ratio']}")


if __name__ == "__main__":
    main()
