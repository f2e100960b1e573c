"""Analyse step: one image scored exactly as the node scores it, for every caller.

The worker (a received DICOM dataset), ``cxr-node predict`` (DICOM, PNG or JPEG files) and the benches all
go through :func:`analyse_dataset` / :func:`analyse_image`: decode (``ai.pixels``), the input gate
(``ai.gate``, when given), the one preprocessing shared with training (``ai.preprocess``), the ensemble
(``ai.ensemble``) and the labels' applicability to the patient's age (``ai.applicability``). Which files
are DICOM is decided by one rule, ``ai.pixels.is_dicom_file``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

from ai.applicability import apply_ages, patient_age_years
from ai.ensemble import Ensemble
from ai.errors import ImageRefused
from ai.findings import Finding
from ai.gate import InputGate
from ai.pixels import dicom_to_float
from ai.preprocess import Letterbox


@dataclass(frozen=True)
class Analysis:
    """What the model said about one image, with what is needed to draw it on the source."""

    image: np.ndarray  # the decoded source image, float32 [0, 1], source shape
    findings: list[Finding]
    letterbox: Letterbox


def model_input(image: np.ndarray, ensemble: Ensemble,
                gate: InputGate | None = None) -> tuple[dict[int, np.ndarray], Letterbox]:
    """The gate's decision, then the one preprocessing: the ensemble's inputs for a decoded image, one per input
    size of its members ({size: float32 (channels, size, size)}, ``Ensemble.inputs``; the field detected
    once), with the letterbox of the package's grid (``preprocess.size``) that maps its heat maps back. Site
    calibration scores images through this step too (``training.site``).

    Raises:
        ImageRefused: the gate found no usable content, or not a frontal chest radiograph.
        UnsupportedImage: the image cannot be preprocessed.
    """
    if gate is not None:
        verdict = gate.check(image)
        if not verdict.analysable:
            raise ImageRefused(verdict.reason, image=image)
    return ensemble.inputs(image)


def analyse_image(image: np.ndarray, ensemble: Ensemble, gate: InputGate | None = None,
                  age_years: float | None = None) -> Analysis:
    """Check a decoded image with the input gate, preprocess and score it (:func:`model_input`); a label the
    package limits to an age range is marked not applicable unless ``age_years`` (the patient's) is in it.

    Raises:
        ImageRefused: the gate found no usable content, or not a frontal chest radiograph.
        UnsupportedImage: the image cannot be preprocessed.
    """
    x, box = model_input(image, ensemble, gate)
    findings = apply_ages(ensemble.findings(x), ensemble.manifest.ages, age_years)
    return Analysis(image=image, findings=findings, letterbox=box)


def analyse_dataset(ds: pydicom.Dataset, ensemble: Ensemble, gate: InputGate | None = None) -> Analysis:
    """Decode one dataset's pixels, then :func:`analyse_image` with the patient's age from the header.

    Raises:
        UnsupportedImage: the pixels cannot be decoded or analysed.
        ImageRefused: the gate refused the image.
    """
    return analyse_image(dicom_to_float(ds), ensemble, gate, patient_age_years(ds))
