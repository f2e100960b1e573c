"""The Secondary Capture objects: the result overlay and the "not analysed" image, and their compression.

The overlay is at most 1024 pixels on its long side, stored as RLE Lossless; the pixels are drawn by
:mod:`node.overlay`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from ai.findings import Finding
from node import overlay
from node.dicom_hygiene import check_short_string, truncate_bytes
from node.overlay import CONTOUR_LEVEL, MAX_SIDE, MIN_SIDE, OverlayInputError, ascii_text
from node.result_common import (
    CONTROL_CHARS,
    MAX_REASON_CHARS,
    SERIES_DESCRIPTION_PREFIX,
    AlgorithmInfo,
    ResultBuildError,
    check_finding,
    copy_patient_study,
    quiet_names,
    result_uid,
    series_uid,
    source_evidence,
)

OVERLAY_SERIES_DESCRIPTION = f"{SERIES_DESCRIPTION_PREFIX} - OVERLAY"
OVERLAY_SERIES_NUMBER = 9902

_T = TypeVar("_T")


def _overlay_input(call: Callable[[], _T]) -> _T:
    """Run a rendering call, raising its input errors as ``ResultBuildError``."""
    try:
        return call()
    except OverlayInputError as exc:
        raise ResultBuildError(str(exc)) from exc


def render_overlay(
    image: np.ndarray,
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    heatmaps_on_source: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, int, float]:
    """The result overlay's RGB pixels (:func:`node.overlay.render_overlay`).

    Returns:
        (rgb uint8 array, banner height in rows, resampling factor applied to the source image).

    Raises:
        ResultBuildError: the image is not 2-D, or a drawn heatmap does not have its shape.
    """
    return _overlay_input(lambda: overlay.render_overlay(image, findings, algorithm, heatmaps_on_source))


def _patient_orientation(source_ds: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two valid biped direction strings, else None."""
    value = source_ds.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(v).strip().upper() for v in value)
    valid = all(re.fullmatch(r"[AFHLPR]{1,3}", v) for v in (row, column))
    return (row, column) if valid else None


def _derivation(sc: Dataset, evidence: Dataset, source_ds: Dataset, description: str) -> None:
    """General Image derivation attributes: source reference, description, burned-in text, lossy history."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = evidence.SOPClassUID
    reference.ReferencedSOPInstanceUID = evidence.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = f"{description} NOT FOR DIAGNOSTIC USE."
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    tsyntax = getattr(getattr(source_ds, "file_meta", None), "TransferSyntaxUID", None)
    lossy_syntax = tsyntax is not None and UID(tsyntax).is_compressed and not _is_lossless(UID(tsyntax))
    if source_ds.get("LossyImageCompression") == "01" or lossy_syntax:
        sc.LossyImageCompression = "01"


_DESCRIPTION_CHARS = 1024  # DerivationDescription is ST


def _resampled(scale: float) -> str:
    return f"; resampled by {scale:.4g} (long side {MIN_SIDE}-{MAX_SIDE})" if scale not in (0.0, 1.0) else ""


LOSSLESS_SYNTAXES = frozenset({
    JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, JPEG2000MCLossless, RLELossless,
    HTJ2KLossless, HTJ2KLosslessRPCL, DeflatedExplicitVRLittleEndian,
})
"""Transfer syntaxes that keep every pixel: a source in any other compressed syntax (JPEG baseline, JPEG-LS
near-lossless, JPEG 2000 and HTJ2K that allow loss, .91 and .203) makes the overlay ``LossyImageCompression 01``."""


def _is_lossless(tsyntax: UID) -> bool:
    return tsyntax in LOSSLESS_SYNTAXES


def _secondary_capture(
    source_ds: Dataset, rgb: np.ndarray, algorithm: AlgorithmInfo, kind: str, device_ae: str | None
) -> tuple[Dataset, Dataset]:
    """(SC image of ``rgb`` in the overlay series, the source's evidence); ``kind`` makes its UID.

    The pixels are stored as YBR_FULL in RLE Lossless: the rendering is gray except where outlines or
    the banner are drawn, so both colour-difference planes are nearly constant and compress to almost
    nothing. RGB -> YBR_FULL rounds coloured pixels by at most 1 per channel; gray pixels are kept exactly.
    """
    evidence = source_evidence(source_ds)  # never raises: invalid source UIDs are repaired (usable_source_uid)
    orientation = _patient_orientation(source_ds)
    with quiet_names():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=evidence,
            pixel_array=convert_color_space(rgb, "RGB", "YBR_FULL"),
            photometric_interpretation="YBR_FULL",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid(
                evidence.StudyInstanceUID, algorithm.version, "overlay", algorithm_name=algorithm.name
            ),
            series_number=OVERLAY_SERIES_NUMBER,
            sop_instance_uid=result_uid(
                evidence.SOPInstanceUID, algorithm.version, kind, algorithm_name=algorithm.name
            ),
            instance_number=evidence.InstanceNumber,
            manufacturer=algorithm.manufacturer,
            patient_orientation=orientation or ("L", "F"),
            transfer_syntax_uid=RLELossless,
            series_description=OVERLAY_SERIES_DESCRIPTION,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
        )
    if orientation is None:
        sc.add_new("PatientOrientation", "CS", None)  # Type 2: unknown, not guessed
    copy_patient_study(sc, evidence)
    if device_ae:
        sc.StationName = check_short_string(device_ae, "device_ae")
    return sc, evidence


def build_overlay(
    source_ds: Dataset,
    image: np.ndarray,
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    heatmaps_on_source: Mapping[str, np.ndarray],
    *,
    device_ae: str | None = None,
) -> Dataset:
    """The Secondary Capture overlay: RGB 8-bit, evidence of flagged findings outlined, banner on top.

    Args:
        source_ds: the analysed image.
        image: the source-shaped display image, float in [0, 1] (0 = black).
        findings: the findings of this image (the SR's).
        algorithm: the model package.
        heatmaps_on_source: label -> source-shaped map in [0, 1] (the finding's heatmap on the source);
            only flagged findings (positive, not informational) are drawn, as the region where the CAM is at least
            ``node.overlay.CONTOUR_LEVEL`` of its range (see :mod:`node.overlay`).
        device_ae: this node's AE title (StationName), optional.

    The image is resampled so that its long side lies in 768-1024 pixels (the description says so).

    Raises:
        ResultBuildError: an invalid finding, an image that is not 2-D or a heatmap of another shape.
    """
    for finding in findings:
        check_finding(finding)
    rgb, _, scale = render_overlay(image, findings, algorithm, heatmaps_on_source)
    sc, evidence = _secondary_capture(source_ds, rgb, algorithm, "overlay", device_ae)
    drawn = ", ".join(f.label for f in findings if f.flags and f.label in heatmaps_on_source) or "none"
    description = (
        f"Source image with the strongest AI evidence (CAM >= {CONTOUR_LEVEL:g} of its range) outlined for "
        f"positive triage findings only ({drawn}) and a burned-in result banner added on top{_resampled(scale)}."
    )
    _derivation(sc, evidence, source_ds, truncate_bytes(ascii_text(description), _DESCRIPTION_CHARS))
    # Results exist only for images the filter accepted as chest radiographs; an unpaired body part
    # also settles General Series Laterality (Type 2C), which is then absent.
    sc.BodyPartExamined = "CHEST"
    return sc


def build_not_analysed_overlay(
    source_ds: Dataset,
    image: np.ndarray | None,
    reason: str,
    algorithm: AlgorithmInfo,
    *,
    device_ae: str | None = None,
) -> Dataset:
    """The Secondary Capture for an image the model did not analyse: the image under a "NOT ANALYSED" banner.

    Args:
        source_ds: the received image (its header; the pixels are not read from it).
        image: the decoded source image, 2-D float in [0, 1] or uint8, or None when its pixels could not
            be decoded (a dark field saying "NO IMAGE PIXELS" is drawn instead).
        reason: why it was not analysed, a fixed text without patient values, e.g. ``image is not a
            frontal chest radiograph (p = 0.03)``; burned in and repeated in DerivationDescription.
        algorithm: the model package.
        device_ae: this node's AE title (StationName), optional.

    Nothing is drawn on the image; its UID differs from the result overlay's of the same source.

    Raises:
        ResultBuildError: ``image`` is neither None nor a 2-D image.
    """
    reason = CONTROL_CHARS.sub(" ", reason).strip()[:MAX_REASON_CHARS] or "no reason given"
    rgb, _, scale = _overlay_input(lambda: overlay.render_not_analysed(image, reason, algorithm))
    sc, evidence = _secondary_capture(source_ds, rgb, algorithm, "overlay-not-analysed", device_ae)
    shown = "Source image" if image is not None else "A blank field (the source pixels could not be decoded)"
    description = (
        f"{shown} under a burned-in banner: NOT ANALYSED by the AI model: {ascii_text(reason)}{_resampled(scale)}."
    )
    _derivation(sc, evidence, source_ds, truncate_bytes(ascii_text(description), _DESCRIPTION_CHARS))
    if str(source_ds.get("BodyPartExamined", "")).strip().upper() == "CHEST":
        sc.BodyPartExamined = "CHEST"
    else:  # the image may be anything: General Series Laterality (Type 2C) is then present and unknown
        sc.add_new("Laterality", "CS", None)
    return sc
