"""Refusals: the header checks of a received data set and the C-STORE statuses the node answers.

What the node could not later analyse or report on is refused, not acknowledged (:func:`read_header`;
the structural walk is ``node.intake_check``, reading element headers only, never the pixel data).
Statuses (PS3.4 B.2.3 for Storage, PS3.7 Annex C for the general ones); each refusal's message and log
line name the check and the tag or keyword, never a value, and its response carries a fixed Error
Comment per status (:data:`ERROR_COMMENTS`) for the modality's operator:

- 0xA700 ``OUT_OF_RESOURCES`` (Refused: Out of Resources): disk full, below ``storage.min_free_mb``.
- No status at all for deflated transfer syntaxes: they are not accepted at association
  (``node.receive.ACCEPTED_TRANSFER_SYNTAXES``), since a deflated data set is inflated whole before any check.
- 0xA900 ``DATASET_MISMATCH`` (Error: Data Set does not match SOP Class): the data set's SOPClassUID
  is not the request's Affected SOP Class UID; native pixel data whose length is not what Rows,
  Columns, SamplesPerPixel, NumberOfFrames and BitsAllocated declare (rounded up to even), or without
  those attributes.
- 0xC000 ``CANNOT_UNDERSTAND`` (Error: Cannot understand): the header cannot be parsed, a required
  UID is missing, the data set's SOPInstanceUID is not the request's, or the element structure is
  unsound (a VR that is no VR, elements out of order, stray items or delimiters, nesting too deep), or
  its header values are absurdly large (a text value over 1 MiB, another over 16 MiB, 64 MiB in all:
  the header is parsed in the receiving process).
- 0xC001 ``INVALID_UID`` (Cannot understand): SOPClassUID, SOPInstanceUID, StudyInstanceUID,
  SeriesInstanceUID or a file meta UID is not a UID (``dicom_hygiene.uid_problem``: at most 64 digits
  and dots, no empty component, no component with a leading zero, at most one trailing pad): results
  reference source UIDs verbatim, so an invalid one would make them invalid too.
- 0xC002 ``DATASET_TRUNCATED`` (Cannot understand): an element, item or fragment runs past the end,
  a delimiter is missing, or an image SOP class has no pixel data.
- 0xC003 ``ENCODING_MISMATCH`` (Cannot understand): the data are not encoded as the negotiated
  transfer syntax says (implicit/explicit VR, byte order, native vs encapsulated pixel data, the codec
  of the first fragment).
- 0x0110 ``PROCESSING_FAILURE``: the database or anything unexpected failed; nothing was acknowledged.
- 0x0111 ``DUPLICATE_SOP_INSTANCE`` (Failure: Duplicate SOP Instance, PS3.7 C.5): a known SOP Instance
  UID re-sent with other content once the node has reported or is reporting on the stored instance
  (``node.intake``).

The statuses are pynetdicom's ``Status`` (``pynetdicom.status``) with the codes it lacks added by
name (``Status.add``, :data:`NODE_STATUSES`): the added names are plain ``int`` class attributes, not
enum members, so logs name a code with :func:`status_name`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID
from pynetdicom import status as pynetdicom_status

from node.dicom_hygiene import uid_problem
from node.intake_check import DatasetCheckError, Layout, Problem, check_layout

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
FILE_META_UIDS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
# What pydicom raises on a dataset it cannot parse (it is lenient: a missing UID is the usual sign).
_MALFORMED = (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
              NotImplementedError, OverflowError, struct.error)

# The C-STORE response statuses the node answers that pynetdicom's Status lacks (PS3.4 Annex B.2.3 and
# PS3.7 Annex C; see the module docstring), added to it by name.
NODE_STATUSES: dict[str, int] = {
    "OUT_OF_RESOURCES": 0xA700,  # refused: disk full or below storage.min_free_mb
    "DATASET_MISMATCH": 0xA900,  # SOP class differs from the request's; pixel data length vs its geometry
    "CANNOT_UNDERSTAND": 0xC000,  # the dataset cannot be parsed, lacks its UIDs, or is structurally unsound
    "INVALID_UID": 0xC001,  # a required or file meta UID is not a UID
    "DATASET_TRUNCATED": 0xC002,  # an element, item or fragment runs past the end; an image without pixels
    "ENCODING_MISMATCH": 0xC003,  # the data are not encoded as the negotiated transfer syntax says
    "PROCESSING_FAILURE": 0x0110,  # database or other failure: nothing was acknowledged
    "DUPLICATE_SOP_INSTANCE": 0x0111,  # other content for a SOP Instance UID the node has reported on
}


class NodeStatus(Protocol):
    """pynetdicom's ``Status`` as the node uses it (``Status.add`` sets attributes no type checker sees)."""

    SUCCESS: int
    OUT_OF_RESOURCES: int
    DATASET_MISMATCH: int
    CANNOT_UNDERSTAND: int
    INVALID_UID: int
    DATASET_TRUNCATED: int
    ENCODING_MISMATCH: int
    PROCESSING_FAILURE: int
    DUPLICATE_SOP_INSTANCE: int


def _extended(status: type[pynetdicom_status.Status]) -> NodeStatus:
    """pynetdicom's ``Status`` with :data:`NODE_STATUSES` added (once per process; idempotent)."""
    for name, code in NODE_STATUSES.items():
        present = getattr(status, name, None)
        if present is None:
            status.add(name, code)
        elif int(present) != code:  # another module (or pynetdicom) gave the name another code
            raise RuntimeError(f"pynetdicom's Status.{name}: expected 0x{code:04X}, found 0x{int(present):04X}")
    return cast(NodeStatus, status)


Status = _extended(pynetdicom_status.Status)  # the same class object as pynetdicom.status.Status
_STATUS_NAMES = {**{int(m): m.name for m in pynetdicom_status.Status}, **{c: n for n, c in NODE_STATUSES.items()}}


def status_name(code: int) -> str:
    """The name of a status code for log lines (``OUT_OF_RESOURCES``); its hex value when it has none."""
    return _STATUS_NAMES.get(int(code), f"0x{int(code):04X}")


# The Error Comment (0000,0902; LO, at most 64 characters) sent with each refusal: what the modality's
# operator sees. Fixed texts per status, so that no value of the data set can appear in it.
ERROR_COMMENTS: dict[int, str] = {
    Status.OUT_OF_RESOURCES: "node storage full: send again later",
    Status.DATASET_MISMATCH: "data set does not match its SOP class or pixel geometry",
    Status.CANNOT_UNDERSTAND: "data set cannot be parsed or is malformed",
    Status.INVALID_UID: "a required UID is not a valid DICOM UID (PS3.5 9.1)",
    Status.DATASET_TRUNCATED: "data set is truncated",
    Status.ENCODING_MISMATCH: "data set is not encoded in the negotiated transfer syntax",
    Status.PROCESSING_FAILURE: "node could not store the instance: send again later",
    Status.DUPLICATE_SOP_INSTANCE: "SOP Instance UID already reported with other content",
}

_PROBLEM_STATUS = {
    Problem.TRUNCATED: Status.DATASET_TRUNCATED,
    Problem.ENCODING: Status.ENCODING_MISMATCH,
    Problem.STRUCTURE: Status.CANNOT_UNDERSTAND,
}


class RefusalError(Exception):
    """An instance that is answered with an error ``status``; the message names the instance."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


Payload = bytes | Path  # the encoded dataset with its file meta: in memory, or pynetdicom's temp file


def shown_uid(uid: str) -> str:
    """A sender's UID as it may appear in a log line or message: itself when valid, else a placeholder.

    A value that is not a UID may be any text a sender chose (up to 64 characters): never quote it.
    """
    return uid if uid_problem(uid) is None else "(not a UID)"


@contextmanager
def opened(payload: Payload) -> Iterator[tuple[BinaryIO, int]]:
    """The payload as a seekable binary file and its size."""
    if isinstance(payload, bytes):
        yield BytesIO(payload), len(payload)
        return
    with payload.open("rb") as f:
        yield f, os.fstat(f.fileno()).st_size


def read_header(payload: Payload, sop_uid: str) -> Dataset:
    """Check the encoded data set and parse its header (no pixel data); refuse what the node cannot use.

    Checks, in this order: the structure, completeness and encoding against the negotiated transfer
    syntax (``node.intake_check.check_layout``, element headers only); the header parse; the required
    and file meta UIDs (present, syntactically UIDs, the SOP Instance UID and SOP Class UID those of
    the request); the pixel data (present for an image SOP class, a native length that fits its
    geometry). See the module docstring for the status of each refusal.

    Args:
        payload: the encoded dataset with file meta (bytes, or the path of a file holding them).
        sop_uid: the request's Affected SOP Instance UID (for messages and the consistency check).

    Raises:
        RefusalError: with the status of the first failed check; its message names the check and
            the tag or keyword, never a value.
    """
    shown = shown_uid(sop_uid)
    with opened(payload) as (f, size):
        try:
            layout = check_layout(f, size)
        except DatasetCheckError as exc:
            raise RefusalError(_PROBLEM_STATUS[exc.problem], f"dataset of {shown}: {exc}") from exc
        f.seek(0)
        try:
            ds = dcmread(f, stop_before_pixels=True)
            _check_uid_syntax(ds, shown)  # on the encoded values, before pydicom converts them
            for _ in ds.iterall():  # pydicom converts values lazily: surface parse errors here
                pass
        except _MALFORMED as exc:  # pydicom's message may quote a value: name the error only
            raise RefusalError(Status.CANNOT_UNDERSTAND, f"dataset of {shown} cannot be parsed "
                               f"({type(exc).__name__})") from exc
    missing = [kw for kw in REQUIRED_UIDS if not str(ds.get(kw, "") or "").strip()]
    if missing:
        raise RefusalError(Status.CANNOT_UNDERSTAND, f"dataset of {shown}: expected "
                           f"{', '.join(REQUIRED_UIDS)}, missing {', '.join(missing)}")
    if str(ds.SOPInstanceUID).strip() != sop_uid:
        raise RefusalError(Status.CANNOT_UNDERSTAND, f"dataset of {shown}: its SOPInstanceUID (0008,0018) "
                           "differs from the request's Affected SOP Instance UID")
    requested_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    if requested_class and str(ds.SOPClassUID).strip() != requested_class:
        raise RefusalError(Status.DATASET_MISMATCH, f"dataset of {shown}: its SOPClassUID (0008,0016) "
                           f"differs from the request's Affected SOP Class UID {requested_class}")
    _check_pixels(ds, layout, shown)
    return ds


def _encoded_value(ds: Dataset, keyword: str) -> bytes | str | None:
    """An element's value as encoded (a raw element's bytes) or as converted; None when absent or empty."""
    element = ds.get_item(keyword)
    if element is None or element.value is None:
        return None
    value = element.value
    return value if isinstance(value, bytes | str) else str(value)


def _check_uid_syntax(ds: Dataset, shown: str) -> None:
    """Refuse (INVALID_UID) a required or file meta UID that is present but not a UID."""
    for owner, keywords in ((ds, REQUIRED_UIDS), (ds.file_meta, FILE_META_UIDS)):
        for keyword in keywords:
            value = _encoded_value(owner, keyword)
            if value is None or not value:
                continue  # missing: refused below, by name
            problem = uid_problem(value)
            if problem is not None:
                raise RefusalError(Status.INVALID_UID, f"dataset of {shown}: {keyword} is not a valid UID "
                                   f"(PS3.5 9.1): {problem}")


def _check_pixels(ds: Dataset, layout: Layout, shown: str) -> None:
    """Refuse an image SOP class without pixel data, and native pixel data whose length is not its geometry's."""
    if not layout.walked:
        return
    if not layout.has_pixels:
        sop_class = UID(str(ds.SOPClassUID).strip())
        if "Image Storage" in sop_class.name:
            raise RefusalError(Status.DATASET_TRUNCATED, f"dataset of {shown}: {sop_class.name} without "
                               "PixelData (7FE0,0010): the data set ends before its pixel data")
        return
    if layout.pixel_length is None:
        return
    try:
        expected = int(get_expected_length(ds, unit="bytes"))
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        raise RefusalError(Status.DATASET_MISMATCH, f"dataset of {shown}: native PixelData (7FE0,0010) without "
                           "usable Rows, Columns, SamplesPerPixel, BitsAllocated or NumberOfFrames "
                           f"({type(exc).__name__})") from exc
    if layout.pixel_length not in (expected, expected + expected % 2):  # odd: padded to even, or sent odd
        raise RefusalError(Status.DATASET_MISMATCH, f"dataset of {shown}: native PixelData (7FE0,0010) holds "
                           f"{layout.pixel_length} bytes, expected {expected + expected % 2} from Rows, Columns, "
                           "SamplesPerPixel, NumberOfFrames and BitsAllocated")
