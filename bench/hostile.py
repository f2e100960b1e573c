#!/usr/bin/env python
"""Hostile-input bench: every category at a chosen size against a running node; the outcome table.

Starts Orthanc and ``python -m node.cli serve`` from ``--node-repo`` (default: this checkout), sends
the generated cases of ``tests/hostile`` and writes one JSON report (the category table, each batch,
each case's outcome) and prints the table as Markdown.

    .venv/bin/python bench/hostile.py --size small                       # this checkout
    .venv/bin/python bench/hostile.py --node-repo /work/before --size small \\
        --out bench/results/hostile_before.json                         # another checkout's node
    .venv/bin/python bench/hostile.py --size full --out bench/results/hostile_after_full.json
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import shared_data_dir  # noqa: E402
from tests.hostile import cases  # noqa: E402
from tests.hostile.runner import Options, dump, markdown, run_suite, summary  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-repo", type=Path, default=REPO, help="checkout whose node is tested")
    parser.add_argument("--size", choices=cases.SIZES, default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: <work>/hostile.json)")
    parser.add_argument("--rss-kill-mb", type=int, default=3072)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the node and Orthanc on the way out
    warnings.simplefilter("ignore")  # pydicom's warnings about the invalid values the cases carry on purpose
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    work = args.work or Path(tempfile.mkdtemp(prefix="hostile-"))
    chosen = tuple(c for c in args.categories.split(",") if c) or tuple(cases.CATEGORIES)
    unknown = [c for c in chosen if c not in cases.CATEGORIES]
    if unknown:
        parser.error(f"--categories: unknown {unknown}; expected some of {list(cases.CATEGORIES)}")
    data = shared_data_dir()
    opts = Options(work=work, node_repo=args.node_repo.resolve(), size=args.size, seed=args.seed,
                   categories=chosen, data_dir=data / "dicom" if data else None, rss_kill_mb=args.rss_kill_mb)
    run = run_suite(opts)
    out = args.out or work / "hostile.json"
    dump(run, out)
    print(markdown(summary(run)))
    print(f"\nreport: {out}; node log: {work / 'node.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
