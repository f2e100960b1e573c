"""Overlay screenshots for docs/overlay: a positive, a negative and a not-analysed overlay from real images.

Each image goes the node's way: a DICOM dataset made from the PNG/JPEG (CR, 8-bit MONOCHROME2), decoded
and scored with the bundled model (``node.worker.analyse_dataset``, ``ai/models/default``), the overlay
built by ``node.results`` (the finding's heatmap mapped onto the source, as the worker passes it), written
as DICOM, read back and saved as PNG: the pixels a PACS shows. The lateral view gets the not-analysed
overlay with the reason the bundled input gate (``ai.gate``) gives for it, as the worker gets it. Also
written: ``thumbnails.png``, the three overlays at 192 px wide side by side (a PACS thumbnail strip).

Run on demand (not part of the test suite)::

    .venv/bin/python bench/overlay_screenshots.py --out docs/overlay
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from ai.analyse import analyse_dataset
from ai.ensemble import Ensemble
from ai.gate import InputGate
from ai.manifest import bundled_package_dir
from ai.pixels import dicom_to_float
from node.results import AlgorithmInfo, build_not_analysed_overlay, build_overlay

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CR = UID("1.2.840.10008.5.1.4.1.1.1")
THUMB_WIDTH = 192
MAX_PNG_BYTES = 300_000


def as_dataset(path: Path, view: str) -> Dataset:
    """An 8-bit MONOCHROME2 CR dataset holding the image file's pixels (UIDs derived from its name)."""
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[path.name, "sop"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[path.name, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[path.name, "series"])
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Anonymous", path.stem, "CR"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    return ds


def shown_pixels(sc: Dataset) -> np.ndarray:
    """What a viewer shows of the overlay: written as DICOM, read back, RGB."""
    buffer = io.BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return np.asarray(pydicom.dcmread(buffer).pixel_array)


def save_png(rgb: np.ndarray, path: Path) -> tuple[int, int]:
    """Save as full-colour PNG under 300 KB (10 % smaller steps while over; noisy radiographs compress poorly)."""
    image = Image.fromarray(rgb)
    image.save(path, optimize=True)
    while path.stat().st_size > MAX_PNG_BYTES:
        image = Image.fromarray(rgb).resize((round(image.width * 0.9), round(image.height * 0.9)),
                                            Image.Resampling.LANCZOS)
        image.save(path, optimize=True)
    return image.width, path.stat().st_size


def thumbnail(rgb: np.ndarray, width: int = THUMB_WIDTH) -> np.ndarray:
    height = round(rgb.shape[0] * width / rgb.shape[1])
    return np.asarray(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))


def side_by_side(images: list[np.ndarray], gap: int = 8) -> np.ndarray:
    height = max(i.shape[0] for i in images)
    strip = np.full((height, sum(i.shape[1] for i in images) + gap * (len(images) - 1), 3), 255, np.uint8)
    x = 0
    for image in images:
        strip[: image.shape[0], x : x + image.shape[1]] = image
        x += image.shape[1] + gap
    return strip


def gate_reason(image: np.ndarray) -> str:
    """The bundled input gate's reason for refusing ``image`` (exits when the gate would analyse it)."""
    verdict = InputGate.load(threads=2).check(image)
    if verdict.analysable:
        sys.exit(f"the input gate analyses this image (p = {verdict.scores}): choose another --lateral")
    return verdict.reason


def result_overlay(ds: Dataset, ensemble: Ensemble, algorithm: AlgorithmInfo) -> tuple[np.ndarray, str]:
    """The worker's result overlay for ``ds`` and a one-line summary of the finding."""
    analysis = analyse_dataset(ds, ensemble)
    heatmaps = {
        f.label: analysis.letterbox.to_source(f.heatmap)
        for f in analysis.findings
        if f.positive and f.heatmap is not None
    }
    sc = build_overlay(ds, analysis.image, analysis.findings, algorithm, heatmaps, device_ae="CXRNODE")
    summary = ", ".join(f"{f.label} p={f.probability:.3f} positive={f.positive}" for f in analysis.findings)
    return shown_pixels(sc), summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/overlay"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--positive", default="CHNCXR_0367_1", help="Shenzhen patient_id with label_tb 1")
    parser.add_argument("--negative", default="CHNCXR_0057_0", help="Shenzhen patient_id with label_tb 0")
    parser.add_argument("--lateral", default="views/images/lateral_024.jpg", help="views.csv image with view L")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.data / "tb" / "shenzhen.csv").open(newline="") as f:
        shenzhen = {row["patient_id"]: row for row in csv.DictReader(f)}
    with (args.data / "views" / "views.csv").open(newline="") as f:
        views = {row["image"]: row for row in csv.DictReader(f)}
    if shenzhen[args.positive]["label_tb"] != "1" or shenzhen[args.negative]["label_tb"] != "0":
        parser.error("--positive must have label_tb 1 and --negative label_tb 0 in shenzhen.csv")
    if views[args.lateral]["view"] != "L":
        parser.error(f"--lateral must be a lateral view in views.csv, got {views[args.lateral]['view']!r}")

    ensemble = Ensemble.load(bundled_package_dir(), providers=["CPUExecutionProvider"], threads=2)
    algorithm = AlgorithmInfo(name=ensemble.manifest.name, version=ensemble.manifest.version)
    shots: dict[str, np.ndarray] = {}
    for name, patient in (("positive", args.positive), ("negative", args.negative)):
        shots[name], summary = result_overlay(as_dataset(args.data / shenzhen[patient]["image"], "PA"), ensemble,
                                              algorithm)
        print(f"{name}: {patient} (label_tb {shenzhen[patient]['label_tb']}): {summary}")
    lateral = as_dataset(args.data / args.lateral, "LL")
    image = dicom_to_float(lateral)
    reason = gate_reason(image)
    sc = build_not_analysed_overlay(lateral, image, reason, algorithm, device_ae="CXRNODE")
    shots["not_analysed"] = shown_pixels(sc)
    print(f"not_analysed: {args.lateral} ({views[args.lateral]['license']}): {reason}")
    for name, rgb in shots.items():
        width, size = save_png(rgb, args.out / f"{name}.png")
        print(f"{args.out / name}.png: overlay {rgb.shape[1]} x {rgb.shape[0]}, saved {width} wide, {size // 1000} KB")
    strip = side_by_side([thumbnail(shots[n]) for n in ("positive", "negative", "not_analysed")])
    print(f"{args.out / 'thumbnails.png'}: {save_png(strip, args.out / 'thumbnails.png')[1] // 1000} KB")


if __name__ == "__main__":
    main()
