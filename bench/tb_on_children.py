"""The Tuberculosis label on young children from another hospital: what the triage flag and the drift check do.

Shenzhen, the Tuberculosis label's training cohort, has patients of most ages (16 aged 1-5). This scores a random
sample of the Guangzhou pediatric set (children aged 1-5, normal and pneumonia, none labelled for TB; ``--per-class``
images each, seed 0) exactly as the node scores an image of a 3-year-old (``ai.analyse.analyse_image``; a package
that limits Tuberculosis to ages 15 and over, chest-default-1.6.1 on, computes the probability and reports it as not
applicable: here the probability is read), and reports per class how many score at or above the package threshold,
the score quartiles, and the node's prevalence-adjusted drift statistic (``ai.drift.drift``, the one ``cxr-node
sites`` and ``status`` use) for the normals alone and for both classes together, at the configured alert level.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/tb_on_children.py --out bench/results/tb_on_children_1.6.0.json

Results: bench/README.md, "tb_on_children.py".
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from ai.analyse import analyse_image
from ai.drift import drift
from ai.ensemble import Ensemble
from ai.manifest import bundled_package_dir
from ai.pixels import read_image_file
from node.config import Settings

LABEL = "Tuberculosis"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, default=bundled_package_dir())
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scores", type=Path, help="also write every image's Tuberculosis score as CSV")
    args = parser.parse_args()

    with (args.data_dir / "pediatric_pneumonia" / "train.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(0)
    sample = {name: rng.sample([r for r in rows if r["label_pneumonia"] == value], args.per_class)
              for name, value in (("normal", "0"), ("pneumonia", "1"))}
    ensemble = Ensemble.load(args.package, providers=["CPUExecutionProvider"], threads=args.threads)
    threshold = ensemble.thresholds[LABEL].value
    reference = ensemble.manifest.reference[LABEL]
    level = Settings().sites.drift_alert
    scores: dict[str, np.ndarray] = {}
    started = time.monotonic()
    for name, chosen in sample.items():
        scores[name] = np.array([
            next(f.probability for f in analyse_image(read_image_file(args.data_dir / r["image"]), ensemble,
                                                      age_years=3.0).findings if f.label == LABEL)
            for r in chosen])
    seconds = time.monotonic() - started

    def summary(values: np.ndarray) -> dict[str, Any]:
        return {"n": int(values.size), "flagged": int(np.sum(values >= threshold)),
                "flagged_fraction": round(float(np.mean(values >= threshold)), 3),
                "quartiles": [round(float(q), 4) for q in np.quantile(values, [0.25, 0.5, 0.75])]}

    both = np.concatenate([scores["normal"], scores["pneumonia"]])
    result: dict[str, Any] = {
        "package": f"{ensemble.manifest.name} {ensemble.manifest.version}",
        "label": LABEL,
        "threshold": threshold,
        "reference": {"cohort": reference.cohort, "n": reference.n,
                      "negatives_quartiles": [reference.quantiles_negative[i] for i in (25, 50, 75)]},
        "seconds": round(seconds, 1),
        "normal": summary(scores["normal"]),
        "pneumonia": summary(scores["pneumonia"]),
        "drift_alert_level": level,
        "drift_normal": drift(scores["normal"], reference, level).to_dict(),
        "drift_both": drift(both, reference, level).to_dict(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.scores:
        with args.scores.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label_pneumonia", f"score_{LABEL}"])
            for name, value in (("normal", 0), ("pneumonia", 1)):
                writer.writerows([r["image"], value, f"{s:.6f}"] for r, s in zip(sample[name], scores[name],
                                                                                  strict=True))
    for name in ("normal", "pneumonia"):
        s = result[name]
        print(f"{name}: {s['flagged']}/{s['n']} Tuberculosis-positive at {threshold:.4f}, quartiles {s['quartiles']}")
    print(f"drift (alert level {level}): normals {result['drift_normal']}, both {result['drift_both']}")


if __name__ == "__main__":
    main()
