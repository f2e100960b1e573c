"""Tests of ai.pixels: synthetic DICOM for each display rule, then the real files."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from ai.errors import UnsupportedImage
from ai.pixels import dicom_to_float, read_image_file

ROWS, COLS = 64, 80


def ramp(rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """A float image in [0, 1] that reaches both ends: a diagonal ramp."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    return ((yy / (rows - 1) + xx / (cols - 1)) / 2.0).astype(np.float64)


def make_ds(stored: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
            **attrs: object) -> Dataset:
    """A minimal single-frame image dataset around ``stored`` values, attributes added from ``attrs``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.set_pixel_data(stored, photometric, bits_stored or stored.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def quantise(image: np.ndarray, bits: int) -> np.ndarray:
    dtype = np.uint8 if bits <= 8 else np.uint16
    return np.rint(image * (2**bits - 1)).astype(dtype)


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1], written out independently of the code."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


# --- display rules on synthetic images -------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 12, 15, 16])
def test_bit_depths_with_full_range_window_reproduce_the_image(bits: int) -> None:
    stored = quantise(ramp(), bits)
    top = 2**bits - 1
    ds = make_ds(stored, bits_stored=bits, WindowCenter=top / 2 + 0.5, WindowWidth=top + 1)
    out = dicom_to_float(ds)
    assert out.dtype == np.float32 and out.shape == (ROWS, COLS)
    np.testing.assert_allclose(out, stored / top, atol=2.0 / top)
    assert out.min() == 0.0 and out.max() == 1.0


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_monochrome1_and_monochrome2_of_the_same_image_agree(bits: int) -> None:
    top = 2**bits - 1
    mono2 = quantise(ramp(), bits)
    mono1 = (top - mono2.astype(np.int64)).astype(mono2.dtype)  # same picture, stored inverted
    window = {"WindowCenter": top / 2 + 0.5, "WindowWidth": top + 1}
    out2 = dicom_to_float(make_ds(mono2, "MONOCHROME2", bits, **window))
    out1 = dicom_to_float(make_ds(mono1, "MONOCHROME1", bits, **window))
    np.testing.assert_allclose(out1, out2, atol=2.0 / top)
    # and without any window (stored range for 8 bits, percentiles above)
    bare1 = dicom_to_float(make_ds(mono1, "MONOCHROME1", bits))
    bare2 = dicom_to_float(make_ds(mono2, "MONOCHROME2", bits))
    np.testing.assert_allclose(bare1, bare2, atol=1e-5)


def test_eight_bit_without_window_uses_the_stored_range() -> None:
    stored = np.full((ROWS, COLS), 100, np.uint8)
    stored[:, :10] = 50  # the image spans 50..100, not the full range
    out = dicom_to_float(make_ds(stored))
    np.testing.assert_allclose(out[0, 0], 50 / 255, atol=1e-6)
    np.testing.assert_allclose(out[0, -1], 100 / 255, atol=1e-6)


def test_sixteen_bit_without_window_uses_robust_percentiles() -> None:
    stored = quantise(ramp(), 12) + 1000
    stored[0, 0] = 60000  # one hot pixel must not compress the rest of the image
    out = dicom_to_float(make_ds(stored, bits_stored=16))
    assert out[0, 0] == 1.0
    assert out[-1, -2] > 0.95 and out[1, 0] < 0.05


def test_bits_above_high_bit_are_ignored() -> None:
    # Bits Allocated 16, Bits Stored 12: the top 4 bits are not pixel data (old overlays use them).
    stored = quantise(ramp(), 12)
    stored[0, :3] = [4095, 5000, 65535]
    ds = make_ds(stored, bits_stored=16, WindowCenter=2048, WindowWidth=4096)
    ds.BitsStored, ds.HighBit = 12, 11
    out = dicom_to_float(ds)
    np.testing.assert_allclose(out[0, :3], [1.0, (5000 & 0xFFF) / 4095, 1.0], atol=1e-3)
    np.testing.assert_allclose(out[1:], stored[1:] / 4095, atol=1e-3)


def test_signed_pixels() -> None:
    stored = (np.rint(ramp() * 4095) - 2048).astype(np.int16)
    ds = make_ds(stored, bits_stored=12, WindowCenter=0.5, WindowWidth=4096, RescaleSlope=1,
                 RescaleIntercept=0)
    assert ds.PixelRepresentation == 1
    np.testing.assert_allclose(dicom_to_float(ds), (stored + 2048) / 4095, atol=1e-3)
    no_window = dicom_to_float(make_ds(stored, bits_stored=12))
    order = np.argsort(stored, axis=None, kind="stable")
    assert np.all(np.diff(no_window.ravel()[order]) >= 0)  # monotone in the stored value
    assert no_window.min() == 0.0 and no_window.max() == 1.0


def test_rescale_slope_and_intercept_apply_before_the_window() -> None:
    stored = quantise(ramp(), 12)
    ds = make_ds(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000,
                 WindowWidth=2000)
    expected = linear_window(2.0 * stored - 1000, 3000, 2000)
    np.testing.assert_allclose(dicom_to_float(ds), expected, atol=1e-5)


def test_negative_rescale_slope_keeps_the_window_meaning() -> None:
    stored = quantise(ramp(), 12)
    ds = make_ds(stored, bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095, WindowCenter=2048,
                 WindowWidth=4096)
    np.testing.assert_allclose(dicom_to_float(ds), (4095 - stored) / 4095, atol=1e-3)


def test_first_of_several_windows_is_used() -> None:
    stored = quantise(ramp(), 12)
    ds = make_ds(stored, bits_stored=12, WindowCenter=[1000, 3000], WindowWidth=[500, 4000])
    np.testing.assert_allclose(dicom_to_float(ds), linear_window(stored, 1000, 500), atol=1e-5)


def test_sigmoid_window() -> None:
    stored = quantise(ramp(), 12)
    ds = make_ds(stored, bits_stored=12, WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID")
    expected = 1.0 / (1.0 + np.exp(-4.0 * (stored - 2000.0) / 1000.0))
    np.testing.assert_allclose(dicom_to_float(ds), expected, atol=1e-5)


def test_voi_lut_sequence_is_preferred_and_covers_all_entries() -> None:
    # An 8-bit LUT with 4096 entries: pydicom 3.0's own apply_voi wraps such indices at 256.
    stored = quantise(ramp(), 12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = [int(v) for v in np.arange(4096) // 16]
    ds = make_ds(stored, bits_stored=12, WindowCenter=100, WindowWidth=10)
    ds.VOILUTSequence = [item]
    np.testing.assert_allclose(dicom_to_float(ds), (stored // 16) / 255.0, atol=1e-6)


def test_presentation_lut_shape_inverse_is_applied_once() -> None:
    stored = quantise(ramp(), 12)
    window = {"WindowCenter": 2048, "WindowWidth": 4096}

    def show(photometric: str, **shape: str) -> np.ndarray:
        return dicom_to_float(make_ds(stored, photometric, 12, **window, **shape))

    mono2, mono1 = show("MONOCHROME2"), show("MONOCHROME1")
    mono1_inverse = show("MONOCHROME1", PresentationLUTShape="INVERSE")
    mono2_inverse = show("MONOCHROME2", PresentationLUTShape="INVERSE")
    mono2_identity = show("MONOCHROME2", PresentationLUTShape="IDENTITY")
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    np.testing.assert_array_equal(mono1_inverse, mono1)  # not inverted a second time
    np.testing.assert_allclose(mono2_inverse, 1.0 - mono2, atol=1e-6)
    np.testing.assert_array_equal(mono2_identity, mono2)


# --- what cannot be analysed -----------------------------------------------------------------------


def test_colour_raises_naming_the_instance() -> None:
    rgb = np.zeros((ROWS, COLS, 3), np.uint8)
    ds = make_ds(rgb, "RGB", 8)
    with pytest.raises(UnsupportedImage, match=ds.SOPInstanceUID) as info:
        dicom_to_float(ds)
    assert "RGB" in str(info.value)


def test_palette_colour_raises() -> None:
    ds = make_ds(np.zeros((ROWS, COLS), np.uint8))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(UnsupportedImage, match="PALETTE COLOR"):
        dicom_to_float(ds)


def test_multi_frame_raises_naming_the_instance() -> None:
    ds = make_ds(np.zeros((2, ROWS, COLS), np.uint8))
    with pytest.raises(UnsupportedImage, match=rf"NumberOfFrames 2 in {ds.SOPInstanceUID}"):
        dicom_to_float(ds)


def test_missing_pixel_data_raises_naming_the_instance() -> None:
    ds = make_ds(np.zeros((ROWS, COLS), np.uint8))
    del ds.PixelData
    with pytest.raises(UnsupportedImage, match=rf"no PixelData in {ds.SOPInstanceUID}"):
        dicom_to_float(ds)


def test_undecodable_jpeg_raises_naming_the_instance() -> None:
    ds = make_ds(np.zeros((ROWS, COLS), np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8 not a jpeg stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    with pytest.raises(UnsupportedImage, match=rf"cannot decode pixel data of {ds.SOPInstanceUID}"):
        dicom_to_float(ds)


# --- files -------------------------------------------------------------------------------------------


def test_read_image_file_dicom_png8_png16_agree(tmp_path: Path) -> None:
    stored = quantise(ramp(), 8)
    ds = make_ds(stored)
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    cv2.imwrite(str(tmp_path / "a8.png"), stored)
    cv2.imwrite(str(tmp_path / "a16.png"), stored.astype(np.uint16) * 257)
    from_dicom = read_image_file(tmp_path / "a.dcm")
    np.testing.assert_allclose(from_dicom, stored / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_image_file(tmp_path / "a8.png"), from_dicom, atol=1e-6)
    np.testing.assert_allclose(read_image_file(tmp_path / "a16.png"), from_dicom, atol=1e-6)
    assert read_image_file(tmp_path / "a16.png").dtype == np.float32


def test_read_image_file_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(UnsupportedImage, match=r"notes\.txt"):
        read_image_file(path)


def lungs_and_mediastinum(image: np.ndarray) -> tuple[float, float]:
    """Mean of both lung fields and of the mediastinum on a band at mid-height of a frontal chest."""
    rows, cols = image.shape
    band = image[int(0.35 * rows) : int(0.6 * rows)]
    mediastinum = band[:, int(0.45 * cols) : int(0.55 * cols)]
    left, right = band[:, int(0.2 * cols) : int(0.35 * cols)], band[:, int(0.65 * cols) : int(0.8 * cols)]
    lungs = np.hstack([left, right])
    return float(lungs.mean()), float(mediastinum.mean())


def dicom_rows(data_dir: Path) -> list[dict[str, str]]:
    with (data_dir / "dicom" / "files.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.shared_data
def test_real_dicom_files_decode(data_dir: Path) -> None:
    rows = dicom_rows(data_dir)
    syntaxes = {row["transfer_syntax"] for row in rows}
    assert {"JPEG Baseline (Process 1)", "JPEG 2000 Image Compression (Lossless Only)",
            "JPEG-LS Lossy (Near-Lossless) Image Compression"} <= syntaxes
    for row in rows:
        image = read_image_file(data_dir / "dicom" / row["file"])
        assert image.shape == (int(row["rows"]), int(row["cols"])), row["file"]
        assert image.dtype == np.float32
        assert 0.0 <= image.min() < 0.3 and 0.7 < image.max() <= 1.0, row["file"]
        human_chest = row["body_part"] != "THORAX" and "variant" not in row["file"]
        if human_chest:
            lungs, mediastinum = lungs_and_mediastinum(image)
            where = f"{row['file']}: lungs {lungs:.2f}, mediastinum {mediastinum:.2f}"
            assert lungs < mediastinum - 0.1, where


@pytest.mark.shared_data
def test_fake_monochrome1_variant_is_the_inverse_of_its_original(data_dir: Path) -> None:
    # The variant carries the original's pixels under MONOCHROME1: a correct reader inverts it.
    original = read_image_file(data_dir / "dicom" / "rsna_cr_pa_jpeg_baseline.dcm")
    variant = read_image_file(data_dir / "dicom" / "rsna_cr_pa_monochrome1_variant.dcm")
    np.testing.assert_allclose(variant, 1.0 - original, atol=1e-6)


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_pydicom_data_chest_decodes(name: str) -> None:
    path = pydicom.data.get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not found: install pydicom-data (in the test extra)")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    image = dicom_to_float(ds)
    assert image.shape == (ds.Rows, ds.Columns)
    lungs, mediastinum = lungs_and_mediastinum(image)
    assert lungs < mediastinum - 0.1



# --- geometry limits and decoder failures, before and during decoding --------------------------------------


def _rle(stored: np.ndarray) -> Dataset:
    from pydicom.uid import RLELossless

    ds = make_ds(stored)
    ds.compress(RLELossless)
    return ds


@pytest.mark.parametrize(("changes", "message"), [
    ({"Rows": 65535, "Columns": 65535}, "Rows must be 1-16384, found 65535"),
    ({"Columns": 20000}, "Columns must be 1-16384, found 20000"),
    ({"Rows": 16384, "Columns": 16384, "BitsAllocated": 32, "BitsStored": 32, "HighBit": 31},
     "Rows x Columns x BitsAllocated/8 must be at most 536870912 bytes, found 16384 x 16384 x 4"),
    ({"BitsAllocated": 12}, "BitsAllocated must be one of (8, 16, 32), found 12"),
    ({"BitsStored": 17}, "BitsStored must be 1-16 (BitsAllocated), found 17"),
    ({"BitsStored": 0}, "BitsStored must be 1-16 (BitsAllocated), found 0"),
    ({"HighBit": 15}, "HighBit must be 11 (BitsStored - 1), found 15"),
    ({"PixelRepresentation": 2}, "PixelRepresentation must be 0 or 1, found 2"),
])
def test_geometry_outside_the_limits_is_refused_before_decoding(changes: dict[str, int], message: str) -> None:
    ds = _rle(quantise(ramp(), 12))  # encapsulated: nothing but the header says how large the image is
    ds.BitsStored, ds.HighBit = 12, 11
    for key, value in changes.items():
        setattr(ds, key, value)
    with pytest.raises(UnsupportedImage, match=re.escape(message)) as info:
        dicom_to_float(ds)
    assert ds.SOPInstanceUID in str(info.value)


def test_native_pixel_data_length_must_match_the_geometry() -> None:
    ds = make_ds(quantise(ramp(), 12), bits_stored=12)
    ds.PixelData = ds.PixelData[:-2]
    with pytest.raises(UnsupportedImage, match=rf"PixelData length must be {ROWS * COLS * 2} bytes .*, "
                                               rf"found {ROWS * COLS * 2 - 2}"):
        dicom_to_float(ds)


def test_a_decompression_bomb_header_is_refused_without_allocating() -> None:
    """65535 x 65535 declared by a tiny RLE image: before, the decoders allocated for it (8.6 GB)."""
    import tracemalloc

    ds = _rle(quantise(ramp(), 12))
    ds.Rows = ds.Columns = 65535
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedImage, match="Rows must be 1-16384"):
            dicom_to_float(ds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20, f"{peak} bytes allocated"


def test_a_decoder_panic_becomes_unsupported_image() -> None:
    """pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on some corrupt segments; before, the
    panic escaped dicom_to_float and ended the worker thread."""
    for seed in range(200):
        ds = _rle(quantise(ramp(256, 256), 12))
        data = bytearray(ds.PixelData)
        start = 8 + int.from_bytes(data[4:8], "little") + 8 + 64  # segment data after the RLE header
        rng = np.random.default_rng(seed)
        for pos in rng.integers(start, len(data) - 8, 32):
            data[int(pos)] ^= 1 << int(rng.integers(0, 8))
        ds.PixelData = bytes(data)
        try:
            dicom_to_float(ds)
        except UnsupportedImage as exc:
            if "PanicException" in str(exc):
                assert "cannot decode pixel data" in str(exc) and "RLE Lossless" in str(exc)
                return
    pytest.fail("no bit-flipped RLE image made the decoder panic in 200 tries")


def test_messages_name_no_text_value_of_the_dataset() -> None:
    ds = make_ds(np.zeros((ROWS, COLS), np.uint8))
    ds.PhotometricInterpretation = "DOE^JANE"
    with pytest.raises(UnsupportedImage) as info:
        dicom_to_float(ds)
    assert "DOE" not in str(info.value) and "not a defined term" in str(info.value)


def test_one_rule_decides_which_files_are_dicom(tmp_path: Path) -> None:
    """A DICM preamble, or a .dcm suffix (a dataset written without preamble and file meta): both are read
    as DICOM by every reader (``read_image_file``, the node's ``predict``, site calibration)."""
    from ai.pixels import is_dicom_file

    stored = quantise(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48), 12)
    ds = make_ds(stored, bits_stored=12)
    with_preamble = tmp_path / "image.bin"
    ds.save_as(with_preamble, enforce_file_format=True)
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, implicit_vr=False, little_endian=True)  # no preamble, no file meta
    assert bare.read_bytes()[128:132] != b"DICM"
    png = tmp_path / "image.png"
    cv2.imwrite(str(png), (stored >> 4).astype(np.uint8))
    assert [is_dicom_file(p) for p in (with_preamble, bare, png)] == [True, True, False]
    np.testing.assert_array_equal(read_image_file(with_preamble), read_image_file(bare))
    assert read_image_file(png).shape == (64, 48)
