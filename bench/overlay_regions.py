"""How much of the image the overlay outlines, and how much of that lies inside the lungs.

For the first 100 TB-positive Shenzhen images with a lung mask (``../shared/data/tb/shenzhen.csv``), the
bundled model scores each as the worker does (``ai.analyse``); for those it flags, the overlay's evidence
region (``node.overlay.finding_regions``, at overlay size) is measured: its share of the image and the
share of it inside the lung mask (area-weighted over the images), with the finding's map as the worker
passes it (mapped onto the source, as is).

Run on demand (not part of the test suite)::

    .venv/bin/python bench/overlay_regions.py      # -> bench/results/overlay_regions.json
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai.analyse import analyse_image  # noqa: E402
from ai.ensemble import Ensemble  # noqa: E402
from ai.manifest import bundled_package_dir  # noqa: E402
from ai.pixels import read_image_file  # noqa: E402
from node.overlay import finding_regions, overlay_scale  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def main() -> None:
    ensemble = Ensemble.load(bundled_package_dir(), providers=["CPUExecutionProvider"])
    with (DATA / "tb" / "shenzhen.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label_tb"] == "1" and r["lung_mask"]][:100]
    values: list[tuple[float, float]] = []
    for row in rows:
        image = read_image_file(DATA / row["image"])
        analysis = analyse_image(image, ensemble)
        finding = analysis.findings[0]
        if not finding.positive or finding.heatmap is None:
            continue
        scale = overlay_scale(image.shape)
        mask = cv2.imread(str(DATA / row["lung_mask"]), cv2.IMREAD_GRAYSCALE) > 0
        heatmaps = {finding.label: analysis.letterbox.to_source(finding.heatmap)}
        [(_, region)] = finding_regions([finding], heatmaps, image.shape, scale)
        lungs = cv2.resize(mask.astype(np.uint8), region.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        values.append((float(region.mean()), float((region & lungs).sum() / max(region.sum(), 1))))
    areas = sorted(a for a, _ in values)
    result = {"images": len(rows), "flagged": len(values), "median_area": statistics.median(areas),
              "p90_area": areas[int(0.9 * (len(areas) - 1))], "max_area": areas[-1],
              "inside_lungs": sum(a * i for a, i in values) / max(sum(a for a, _ in values), 1e-9)}
    print(json.dumps(result, indent=2))
    (REPO / "bench" / "results" / "overlay_regions.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
