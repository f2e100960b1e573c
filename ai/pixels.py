"""Decode step: DICOM (or PNG/JPEG) pixel data -> float image in [0, 1], 0 = black (air), 1 = white (bone).

The display pipeline of PS3.4 N.2 for grayscale images, in order:

1. decode the stored values (pydicom 3 ``ds.pixel_array``; pylibjpeg, pyjpegls and gdcm plug-ins
   cover JPEG, JPEG 2000, JPEG-LS and RLE);
2. Modality LUT or Rescale Slope/Intercept (``pydicom.pixels.apply_modality_lut``);
3. the first VOI LUT Sequence item (applied here: pydicom 3.0's ``apply_voi`` wraps the indices of
   8-bit LUTs with more than 256 entries), else the *first* window (``pydicom.pixels.apply_voi_lut``),
   normalised to [0, 1] by the output range of that very transform (a window is probed far below
   and far above its centre, so LINEAR, LINEAR_EXACT, SIGMOID and negative rescale slopes are
   handled alike; a VOI LUT by the range of its entries, whatever their bit depth). Without either,
   the modality-transformed range of the stored bits is used for images of at most 8 bits (they
   are display-ready, like 8-bit PNG), robust percentiles (0.5 %, 99.5 %) of the image otherwise;
4. inversion, *once*, after VOI: MONOCHROME1 means "minimum is white"; a Presentation LUT Shape of
   INVERSE states the same inversion (DX requires INVERSE with MONOCHROME1), so the image is inverted
   when either says so, never twice.

Pixel data is untrusted input. Before anything is decoded, the header's geometry is checked against
limits that a radiograph never reaches (``MAX_DIMENSION`` per side, ``MAX_PIXEL_BYTES`` for the decoded
frame), the bit layout against PS3.3 C.7.6.3 and a native PixelData length against the geometry, so a
small file that declares an enormous image is refused before a decoder allocates for it. Whatever a
decoder plug-in raises, including a panic of a Rust extension (``pyo3_runtime.PanicException``, a
``BaseException``), becomes ``UnsupportedImage``. Messages name attributes, limits and numbers, never a
text value of the dataset (it is chosen by the sender and may hold anything).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from ai.errors import PROCESS_EXITS, UnsupportedImage

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Photometric interpretations of PS3.3 C.7.6.3.1.2 (and retired ones): safe to name in a message.
KNOWN_PHOTOMETRIC = (*MONOCHROME, "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422",
                     "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB")
# The largest radiographs (stitched long-leg or full-spine DR, film digitised at 50 um) are about
# 10 000 pixels a side; 16 384 leaves room and still refuses the 65 535 x 65 535 of a decompression bomb.
MAX_DIMENSION = 16384
# The decoded frame in bytes: 16 384 x 16 384 at 16 bits. The decode and the float image that follows
# need about 3 times as much memory again, which the worker's memory limit must allow.
MAX_PIXEL_BYTES = 512 * 2**20
BITS_ALLOCATED = (8, 16, 32)
ROBUST_PERCENTILES = (0.5, 99.5)
LUT_BLOCK_ROWS = 64


def dicom_to_float(ds: Dataset) -> np.ndarray:
    """Convert one single-frame grayscale DICOM image to display values.

    Integer images of up to 16 stored bits go through a lookup table built by running the whole
    chain (modality, VOI, normalisation, inversion) once over every storable value: identical
    results, a fraction of the time of running float64 maths over millions of pixels. pydicom
    masks the bits above High Bit; values a decoder still returns beyond the range that Bits
    Stored allows are clipped to it.

    Args:
        ds: a dataset with pixel data (any transfer syntax pydicom can decode here).

    Returns:
        2-D float32 array in [0, 1]; 0 = black (air), 1 = white (bone).

    Raises:
        UnsupportedImage: colour, multi-frame, missing or undecodable pixel data, naming the
            SOPInstanceUID.
    """
    sop_uid = str(ds.get("SOPInstanceUID", "<no SOPInstanceUID>"))
    _check_supported(ds, sop_uid)
    stored = _decode(ds, sop_uid)
    sample = stored[::4, ::4] if min(stored.shape) >= 64 else stored
    if np.issubdtype(stored.dtype, np.integer) and int(ds.BitsStored) <= 16:
        domain = _stored_range(ds)
        lut = _display_transform(domain, ds, sample, sop_uid).astype(np.float32)
        return _apply_lut(lut, stored, int(domain[0]))
    image = _display_transform(stored, ds, sample, sop_uid)
    return np.ascontiguousarray(image, dtype=np.float32)


def _apply_lut(lut: np.ndarray, stored: np.ndarray, first: int) -> np.ndarray:
    """``lut[stored - first]``, out-of-range values clipped to the ends; in row blocks that stay in cache."""
    out = np.empty(stored.shape, dtype=np.float32)
    for row in range(0, stored.shape[0], LUT_BLOCK_ROWS):
        block = stored[row : row + LUT_BLOCK_ROWS]
        if first:
            block = block.astype(np.int32) - np.int32(first)
        np.take(lut, block, out=out[row : row + LUT_BLOCK_ROWS], mode="clip")
    return out


def _display_transform(stored: np.ndarray, ds: Dataset, sample: np.ndarray, sop_uid: str) -> np.ndarray:
    """Stored values -> [0, 1] display values: modality, VOI (normalised), inversion, clip."""
    values = apply_modality_lut(stored, ds)
    image = _apply_voi_normalised(values, ds, sample, sop_uid)
    if _is_inverted(ds):
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0)


def _check_supported(ds: Dataset, sop_uid: str) -> None:
    """Raise UnsupportedImage for anything but one frame of grayscale pixel data of sane geometry."""
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise UnsupportedImage(f"no PixelData in {sop_uid}: expected an image, found none")
    if "PixelData" not in ds:
        raise UnsupportedImage(f"float pixel data is not supported in {sop_uid}: expected PixelData")
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = _integer(ds, "SamplesPerPixel", sop_uid, default=1)
    if pi not in MONOCHROME or samples != 1:
        named = pi if pi in KNOWN_PHOTOMETRIC else "a value that is not a defined term" if pi else "none"
        raise UnsupportedImage(
            f"PhotometricInterpretation must be MONOCHROME1/2 with 1 sample per pixel, "
            f"got {named} with SamplesPerPixel {samples} in {sop_uid}"
        )
    frames = _number_of_frames(ds, sop_uid)
    if frames != 1:
        raise UnsupportedImage(f"expected a single frame, got NumberOfFrames {frames} in {sop_uid}")
    _check_geometry(ds, sop_uid)


def _integer(ds: Dataset, keyword: str, sop_uid: str, default: int | None = None) -> int:
    """An integer attribute; missing or empty gives ``default`` (None: required)."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise UnsupportedImage(f"{keyword} missing in {sop_uid}: expected an integer")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise UnsupportedImage(f"{keyword} must be an integer, found a non-numeric value in {sop_uid}") from exc


def _check_geometry(ds: Dataset, sop_uid: str) -> None:
    """Geometry and bit layout within the limits of a radiograph, checked before any decoding.

    Raises:
        UnsupportedImage: naming the attribute, the limit and the number found.
    """
    rows, cols = _integer(ds, "Rows", sop_uid), _integer(ds, "Columns", sop_uid)
    for keyword, value in (("Rows", rows), ("Columns", cols)):
        if not 1 <= value <= MAX_DIMENSION:
            raise UnsupportedImage(f"{keyword} must be 1-{MAX_DIMENSION}, found {value} in {sop_uid}")
    allocated, stored = _integer(ds, "BitsAllocated", sop_uid), _integer(ds, "BitsStored", sop_uid)
    if allocated not in BITS_ALLOCATED:
        raise UnsupportedImage(f"BitsAllocated must be one of {BITS_ALLOCATED}, found {allocated} in {sop_uid}")
    if not 1 <= stored <= allocated:
        raise UnsupportedImage(f"BitsStored must be 1-{allocated} (BitsAllocated), found {stored} in {sop_uid}")
    high = _integer(ds, "HighBit", sop_uid, default=stored - 1)
    if high != stored - 1:
        raise UnsupportedImage(f"HighBit must be {stored - 1} (BitsStored - 1), found {high} in {sop_uid}")
    representation = _integer(ds, "PixelRepresentation", sop_uid, default=0)
    if representation not in (0, 1):
        raise UnsupportedImage(f"PixelRepresentation must be 0 or 1, found {representation} in {sop_uid}")
    frame_bytes = rows * cols * (allocated // 8)
    if frame_bytes > MAX_PIXEL_BYTES:
        raise UnsupportedImage(
            f"Rows x Columns x BitsAllocated/8 must be at most {MAX_PIXEL_BYTES} bytes, found "
            f"{rows} x {cols} x {allocated // 8} = {frame_bytes} in {sop_uid}"
        )
    _check_native_length(ds, frame_bytes, sop_uid)


def _check_native_length(ds: Dataset, frame_bytes: int, sop_uid: str) -> None:
    """Native (not encapsulated) PixelData holds exactly one frame (plus the pad byte of an odd length,
    which some writers omit)."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or not UID(str(tsyntax)).is_transfer_syntax or UID(str(tsyntax)).is_encapsulated:
        return  # encapsulated (or unknown: the decoder decides): the frame size was bounded above
    found = len(ds.PixelData)
    if found not in (frame_bytes, frame_bytes + frame_bytes % 2):
        raise UnsupportedImage(
            f"PixelData length must be {frame_bytes} bytes for the Rows, Columns and BitsAllocated given, "
            f"found {found} in {sop_uid}"
        )


def _number_of_frames(ds: Dataset, sop_uid: str) -> int:
    return _integer(ds, "NumberOfFrames", sop_uid, default=1)


def _decode(ds: Dataset, sop_uid: str) -> np.ndarray:
    """Stored values as a 2-D array; any decoder failure, a plug-in's panic included, is UnsupportedImage."""
    try:
        arr = ds.pixel_array
    except PROCESS_EXITS:
        raise
    except BaseException as exc:  # the plug-ins raise many types, pyo3 panics included
        raise UnsupportedImage(
            f"cannot decode pixel data of {sop_uid} ({_transfer_syntax_name(ds)}): {type(exc).__name__}"
        ) from exc
    if arr.ndim != 2:
        raise UnsupportedImage(f"expected a 2-D grayscale frame, got array shape {arr.shape} in {sop_uid}")
    return arr


def _transfer_syntax_name(ds: Dataset) -> str:
    """The transfer syntax by its registered name; a UID this pydicom does not know is not quoted."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        return "no transfer syntax"
    uid = UID(str(tsyntax))
    return f"transfer syntax {uid.name}" if uid.is_transfer_syntax else "an unknown transfer syntax"


def _stored_range(ds: Dataset) -> np.ndarray:
    """Every value the stored bits can hold (signed or unsigned), ascending."""
    bits = min(int(ds.BitsStored), 16)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=np.int64)
    return np.arange(0, 2**bits, dtype=np.int64)


def _valid_voi_lut_item(ds: Dataset) -> Dataset | None:
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return seq[0]
    return None


def _apply_voi_normalised(values: np.ndarray, ds: Dataset, sample: np.ndarray, sop_uid: str) -> np.ndarray:
    """VOI LUT Sequence, else the first window, else a fallback range, mapped onto [0, 1]."""
    try:
        item = _valid_voi_lut_item(ds)
        if item is not None:
            return _apply_voi_lut_item(values, item, ds)
        if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
            return _normalise_without_voi(values, ds, sample)
        out = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=False), dtype=np.float64)
        probe = np.asarray(apply_voi_lut(_window_probe(ds), ds, index=0, prefer_lut=False), dtype=np.float64)
    except (ValueError, NotImplementedError, IndexError, AttributeError, TypeError) as exc:
        # the exception text can quote a sender's value (e.g. a non-numeric WindowCenter): not repeated
        raise UnsupportedImage(f"invalid VOI LUT or window in {sop_uid} ({type(exc).__name__})") from exc
    # Far below the window is black, far above is white. pydicom 3.0 bases its output range on the
    # rescaled range, which flips the window under a negative Rescale Slope: the probe undoes that.
    lo, hi = float(probe[0]), float(probe[-1])
    if hi == lo:
        raise UnsupportedImage(f"window of {sop_uid} has an empty output range [{lo}, {hi}]")
    return (out - lo) / (hi - lo)


def _apply_voi_lut_item(values: np.ndarray, item: Dataset, ds: Dataset) -> np.ndarray:
    """First VOI LUT Sequence item, normalised by the LUT's own output range.

    Done here rather than by ``pydicom.pixels.apply_voi``: pydicom 3.0 indexes through an array of
    the LUT's *output* type, so an 8-bit LUT with more than 256 entries wraps its indices.
    """
    entries, first, _bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16
    if int(ds.get("PixelRepresentation", 0)) == 1 and first >= 2**15:
        first -= 2**16  # the descriptor's first value is signed (SS) for signed pixels
    data = item.LUTData
    if isinstance(data, bytes):
        little = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        order = ">" if little is not None and little == "1.2.840.10008.1.2.2" else "<"
        table = np.frombuffer(data, dtype=f"{order}u2")[:entries].astype(np.float64)
    else:
        table = np.asarray(data, dtype=np.float64).ravel()  # a list, MultiValue or single value
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        raise ValueError(f"VOI LUT has an empty output range [{lo}, {hi}]")
    index = np.clip(np.rint(values) - first, 0, table.size - 1).astype(np.int64)
    return (table[index] - lo) / (hi - lo)


def _window_probe(ds: Dataset) -> np.ndarray:
    """Two inputs far outside the first window: they reach both ends of its output range."""
    center, width = ds.WindowCenter, ds.WindowWidth
    if ds["WindowCenter"].VM > 1:
        center = center[0]
    if ds["WindowWidth"].VM > 1:
        width = width[0]
    span = max(abs(float(width)), 1.0) * 100.0
    return np.array([float(center) - span, float(center) + span], dtype=np.float64)


def _normalise_without_voi(values: np.ndarray, ds: Dataset, sample: np.ndarray) -> np.ndarray:
    """No VOI: the stored range for <= 8-bit images, robust image percentiles otherwise."""
    values = np.asarray(values, dtype=np.float64)
    if int(ds.BitsStored) <= 8:
        mapped = np.asarray(apply_modality_lut(_stored_range(ds), ds), dtype=np.float64)
    else:
        mapped = np.asarray(apply_modality_lut(sample, ds), dtype=np.float64)
        mapped = np.percentile(mapped, ROBUST_PERCENTILES)
    lo, hi = float(mapped.min()), float(mapped.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - lo) / (hi - lo)


def _is_inverted(ds: Dataset) -> bool:
    """MONOCHROME1 and Presentation LUT Shape INVERSE state one inversion; apply it once."""
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return pi == "MONOCHROME1" or shape == "INVERSE"


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
"""The suffixes of the plain image files the node scores besides DICOM (``read_image_file``)."""


def is_dicom_file(path: str | Path) -> bool:
    """The one rule for "is this file DICOM": a ``DICM`` preamble, or a ``.dcm`` suffix (a dataset written
    without the preamble and file meta, which pydicom reads with ``force``)."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM" or path.suffix.lower() == ".dcm"


def read_dicom_file(path: str | Path, stop_before_pixels: bool = False) -> Dataset:
    """Read a file :func:`is_dicom_file` accepts (without a preamble: with ``force``)."""
    return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)


def read_image_file(path: str | Path) -> np.ndarray:
    """Read a DICOM (:func:`is_dicom_file`), PNG or JPEG file as a float image.

    Args:
        path: the file.

    Returns:
        2-D float32 array in [0, 1], 0 = black. PNG/JPEG are scaled by their type's maximum
        (255 or 65535); colour PNG/JPEG are converted to gray.

    Raises:
        UnsupportedImage: the file cannot be read as an image.
    """
    path = Path(path)
    try:
        dicom = is_dicom_file(path)
    except OSError as exc:
        raise UnsupportedImage(f"cannot read image file {path}: {exc.strerror}") from exc
    if dicom:
        try:
            ds = read_dicom_file(path)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise UnsupportedImage(f"cannot parse DICOM file {path}: {type(exc).__name__}") from exc
        return dicom_to_float(ds)
    return _read_raster(path)


def _read_raster(path: Path) -> np.ndarray:
    buf = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise UnsupportedImage(f"{path} is neither DICOM (no DICM preamble) nor a readable PNG/JPEG")
    if img.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        img = cv2.cvtColor(img, code)
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    else:
        raise UnsupportedImage(f"{path}: expected 8- or 16-bit pixels, got {img.dtype}")
    return (img.astype(np.float32) / np.float32(scale)).astype(np.float32)
