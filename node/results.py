"""Results step: build the Comprehensive 3D SR (TID 1500) and the Secondary Capture overlay for one image.

Every object carries the source's Study Instance UID, a new series whose description starts with
``AI CXR TRIAGE - NOT FOR DIAGNOSTIC USE``, and deterministic UIDs derived from the source SOP Instance
UID, the model package (name and version) and the kind of object, so that results rebuilt after a crash
keep their UIDs. Patient and study attributes are copied through :mod:`node.dicom_hygiene`, which
repairs or drops values that are invalid in the source, so that the objects pass ``dciodvfy``. The
source's UIDs are referenced verbatim; only one that is missing or cannot be encoded as a UID at all is
replaced by one derived from it (:func:`usable_source_uid`). The SR content (groups, codes, reading
back) is :mod:`node.report`; :mod:`node.sr_build` wraps it in the SR document. The model package is
named in the Contributing Equipment Sequence (purpose (109102, DCM, "Processing Equipment"), Device UID
:func:`device_uid`) and as the device observer. The "not analysed" SR is made for any header pydicom can
read, so that every accepted image ends with a result at the PACS. The overlay is at most 1024 pixels on
its long side, stored as RLE Lossless.

This module names the results step's public API; the code is in

- :mod:`node.result_common`: the model package, deterministic UIDs, the source's evidence, reason texts;
- :mod:`node.sr_build`: the SR documents (``build_sr``, ``build_failure_sr``, ``as_comprehensive_sr``);
- :mod:`node.secondary_capture`: the Secondary Capture objects (``build_overlay``,
  ``build_not_analysed_overlay``) and the lossy-compression history they carry;
- :mod:`node.overlay`: the rendering of the overlay's pixels.
"""

from __future__ import annotations

from node.overlay import banner_lines, overlay_scale
from node.result_common import (
    MAX_REASON_CHARS,
    SERIES_DESCRIPTION_PREFIX,
    UID_NAMESPACE,
    AlgorithmInfo,
    ResultBuildError,
    device_uid,
    result_uid,
    scrub_reason,
    series_uid,
    usable_source_uid,
)
from node.secondary_capture import (
    LOSSLESS_SYNTAXES,
    OVERLAY_SERIES_DESCRIPTION,
    OVERLAY_SERIES_NUMBER,
    build_not_analysed_overlay,
    build_overlay,
    render_overlay,
)
from node.sr_build import (
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    PROCESSING_EQUIPMENT,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    SrClass,
    as_comprehensive_sr,
    build_failure_sr,
    build_sr,
)

__all__ = [
    "COMPREHENSIVE_3D_SR",
    "COMPREHENSIVE_SR",
    "LOSSLESS_SYNTAXES",
    "MAX_REASON_CHARS",
    "OVERLAY_SERIES_DESCRIPTION",
    "OVERLAY_SERIES_NUMBER",
    "PROCESSING_EQUIPMENT",
    "SERIES_DESCRIPTION_PREFIX",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "UID_NAMESPACE",
    "AlgorithmInfo",
    "ResultBuildError",
    "SrClass",
    "as_comprehensive_sr",
    "banner_lines",
    "build_failure_sr",
    "build_not_analysed_overlay",
    "build_overlay",
    "build_sr",
    "device_uid",
    "overlay_scale",
    "render_overlay",
    "result_uid",
    "scrub_reason",
    "series_uid",
    "usable_source_uid",
]
