"""Diagnostic: dcmtk ``storescp`` alone, sending into memory the hypervisor took back vs freshly freed memory.

Backs the "memory state" explanation in bench/README.md. Each round starts ``storescp --single-process``
in an empty folder, sends the ingest corpus (``bench/ingest.py``'s cache) once with ``dcmsend`` over one
association, and reads the server's CPU (user, kernel) and minor faults from ``/proc/PID/stat``. Before
the send, ``cold`` waits ``--pause`` seconds (free memory gets reported to the hypervisor by the
virtio balloon's free page reporting), ``warm`` writes and deletes a file of 1.5x the corpus. The two
states alternate in blocks of ``--runs``.

    .venv/bin/python bench/ingest.py --images 100 --runs 1 --servers storescp --associations 1  # the corpus
    .venv/bin/python bench/storescp_memory.py --blocks 2 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ingest import DCMTK_ENV, dcmtk, default_cache_dir, free_page_reporting, running, settle_memory  # noqa: E402


def proc_stat(pid: int) -> tuple[int, float, float]:
    """Minor faults, user s, kernel s of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), int(fields[11]) / tick, int(fields[12]) / tick


def one_send(files: list[Path], state: str, pause_s: float, work: Path) -> dict[str, object]:
    os.sync()
    with running("storescp", argparse.Namespace(work_dir=work, max_pdu=131072)) as server:
        assert server.proc is not None
        if state == "cold":
            time.sleep(pause_s)
        else:
            settle_memory("warm", work, sum(p.stat().st_size for p in files))
        faults0, user0, sys0 = proc_stat(server.proc.pid)
        t0 = time.perf_counter()
        subprocess.run([dcmtk("dcmsend"), "-aet", "BENCH-MOD", "-aec", server.called_ae, "--decompress-never",
                        "127.0.0.1", str(server.port), *map(str, files)], env=DCMTK_ENV, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        faults1, user1, sys1 = proc_stat(server.proc.pid)
    return {"state": state, "images_per_s": round(len(files) / seconds, 1), "user_s": round(user1 - user0, 2),
            "kernel_s": round(sys1 - sys0, 2), "minor_faults": faults1 - faults0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2, help="cold/warm block pairs (default 2)")
    p.add_argument("--runs", type=int, default=3, help="sends per block (default 3)")
    p.add_argument("--pause", type=float, default=10.0, help="seconds to wait in the cold state (default 10)")
    p.add_argument("--corpus", type=Path, default=default_cache_dir() / "ingest-v1-100x2048")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "storescp_memory.json")
    args = p.parse_args()
    files = sorted(args.corpus.glob("*.dcm"))
    if not files:
        sys.exit(f"no corpus in {args.corpus}: run bench/ingest.py once to build it")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-memory-") as work:
        for _ in range(args.blocks):
            for state in ("cold", "warm"):
                for _ in range(args.runs):
                    rows.append(one_send(files, state, args.pause, Path(work)))
                    print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"benchmark": "storescp_memory", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "command": " ".join(["python", "bench/storescp_memory.py", *sys.argv[1:]]),
                                    "free_page_reporting": free_page_reporting(), "images": len(files),
                                    "pause_s": args.pause, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
