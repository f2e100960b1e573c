"""Source images of the hostile suite: small synthetic chest-like radiographs and planted patient markers.

Every case starts from one of a few generated images (256 and 512 px, 8/12/16 bits, MONOCHROME1/2,
CR/DX, PA/AP; plus one real sample when ``shared/data/dicom`` exists) and carries its own markers in
every patient attribute, so that any value that reaches a log, a database column, ``status`` or the
free text of a result names the case it came from.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
REAL_SAMPLE = "rsna_cr_pa_jpeg_baseline.dcm"

# Attribute -> two-letter code inside its marker, so that a leak names the attribute.
MARKED = {
    "PatientName": "PN", "PatientID": "PI", "AccessionNumber": "AN", "OtherPatientIDs": "OP",
    "InstitutionName": "IN", "ReferringPhysicianName": "RP", "StudyDescription": "SD",
    "BodyPartExamined": "BP",
}
MARKER_RE = re.compile(r"ZQX([A-Z]{4})([A-Z]{2})MK", re.IGNORECASE)


def case_letters(case_id: int) -> str:
    """The case number written with four letters (base 26): markers stay letters-only."""
    out = ""
    for _ in range(4):
        case_id, digit = divmod(case_id, 26)
        out = chr(ord("A") + digit) + out
    return out


def case_of_letters(letters: str) -> int:
    """Inverse of :func:`case_letters`."""
    value = 0
    for ch in letters.upper():
        value = value * 26 + ord(ch) - ord("A")
    return value


def marker(case_id: int, code: str) -> str:
    """The letters-only marker of one attribute of one case, e.g. ``ZQXAAABPNMK``."""
    return f"ZQX{case_letters(case_id)}{code}MK"


def birth_date(case_id: int) -> str:
    """A birth date unique to the case (a digits-only marker, matched only as a whole value)."""
    day = np.datetime64("1900-01-01") + np.timedelta64(case_id, "D")
    return str(day).replace("-", "")


def markers_of(case_id: int) -> dict[str, str]:
    """Every planted value of a case: attribute keyword -> value."""
    values = {kw: marker(case_id, code) for kw, code in MARKED.items()}
    if case_id % 5 != 4:  # "LUNG <marker>" is still a chest (16 characters, the CS limit): analysed
        values["BodyPartExamined"] = f"LUNG {values['BodyPartExamined']}"
    values["StudyDescription"] = f"{values['StudyDescription']} CHEST"
    values["PatientBirthDate"] = birth_date(case_id)
    return values


def plant_markers(ds: Dataset, case_id: int) -> dict[str, str]:
    """Write the case's markers into ``ds`` (patient, study and equipment attributes); returns them."""
    values = markers_of(case_id)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return values


def uid(rng: random.Random) -> str:
    """A deterministic UID under the 2.25 root (UUID-derived form)."""
    return f"2.25.{rng.getrandbits(120)}"


@dataclass(frozen=True)
class BaseSpec:
    """One synthetic source image."""

    size: int
    bits: int
    photometric: str
    modality: str
    view: str

    @property
    def name(self) -> str:
        return f"{self.modality}-{self.view}-{self.size}px-{self.bits}bit-{self.photometric[-1]}"


BASE_SPECS = (
    BaseSpec(256, 8, "MONOCHROME2", "CR", "PA"),
    BaseSpec(512, 12, "MONOCHROME1", "DX", "AP"),
    BaseSpec(256, 16, "MONOCHROME2", "DX", "PA"),
    BaseSpec(512, 16, "MONOCHROME1", "CR", "PA"),
    BaseSpec(256, 12, "MONOCHROME2", "CR", "AP"),
    BaseSpec(512, 8, "MONOCHROME1", "DX", "PA"),
)


def chest_pixels(size: int, bits: int, monochrome1: bool, seed: int) -> np.ndarray:
    """A chest-like radiograph: body, two dark lung fields, a bright mediastinum, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.full((size, size), 0.05)
    img[((x - 0.5) / 0.44) ** 2 + ((y - 0.55) / 0.52) ** 2 < 1] = 0.6
    for cx in (0.32, 0.68):
        img[((x - cx) / 0.14) ** 2 + ((y - 0.45) / 0.28) ** 2 < 1] = 0.22
    img[(np.abs(x - 0.5) < 0.06) & (y > 0.15)] = 0.8
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    if monochrome1:
        img = 1 - img
    top = 2**bits - 1
    return np.round(img * top).astype(np.uint8 if bits == 8 else np.uint16)


def synthetic_image(spec: BaseSpec, rng: random.Random) -> Dataset:
    """A complete CR/DX dataset for ``spec`` with fresh UIDs (markers are planted per case)."""
    ds = Dataset()
    ds.SOPClassUID = CR_STORAGE if spec.modality == "CR" else DX_STORAGE
    ds.SOPInstanceUID = uid(rng)
    ds.StudyInstanceUID = uid(rng)
    ds.SeriesInstanceUID = uid(rng)
    ds.Modality = spec.modality
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101500", "1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "HOSTILE-SUITE"
    ds.ViewPosition = spec.view
    ds.PatientOrientation = ["L", "F"] if spec.view == "PA" else ["R", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if spec.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    pixels = chest_pixels(spec.size, spec.bits, spec.photometric == "MONOCHROME1", rng.getrandbits(32))
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.BitsAllocated = 8 if spec.bits == 8 else 16
    ds.BitsStored = spec.bits
    ds.HighBit = spec.bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if spec.bits == 8 else "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def real_sample(data_dir: Path | None, rng: random.Random) -> Dataset | None:
    """The real JPEG-baseline CR sample with fresh UIDs, or None when the shared data is absent."""
    if data_dir is None or not (data_dir / REAL_SAMPLE).is_file():
        return None
    ds = pydicom.dcmread(data_dir / REAL_SAMPLE)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, uid(rng))
    return ds


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """The dataset (without file meta) encoded as ``transfer_syntax`` says: what a C-STORE carries."""
    ts = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_little_endian = ts.is_little_endian
    fp.is_implicit_VR = ts.is_implicit_VR
    body = Dataset({tag: elem for tag, elem in ds.items() if tag.group != 2})
    body.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
    write_dataset(fp, body)
    return bytes(fp.getvalue())
