"""Intake check: is a received data set whole, and encoded as its negotiated transfer syntax?

The intake answers Success only for what the node can later process and report on. pydicom's parse
of the header does not tell: it switches silently between implicit and explicit VR when the data
does not match the transfer syntax, and ``stop_before_pixels`` never looks at the pixel data. This
module walks the encoded data set element by element (tags, VRs, lengths, sequence items and their
delimiters, the items of encapsulated pixel data) and reads only element headers: every value is
skipped by seeking, so the 8-30 MB of pixel data are never read into memory. It checks:

- the file meta information (written by pynetdicom) names a transfer syntax; the data set follows it;
- the encoding is the negotiated one: the first element's group is at most 0008 in the declared byte
  order (SOPClassUID (0008,0016) is required and elements ascend), explicit-VR data carries VRs and
  implicit-VR data does not, native pixel data has a defined length and encapsulated pixel data an
  undefined one, and the first fragment starts as the syntax's codec writes it (JPEG SOI, JPEG 2000
  SOC or JP2 box, RLE header);
- the data set is complete: every element, item and fragment ends within its item and within the
  data, sequences and items of undefined length end with their delimiters, encapsulated pixel data
  has its Basic Offset Table item, at least one fragment and its sequence delimiter (fewer than 8
  NUL bytes after the last element are a sender's padding of an odd length: dcmtk sends one);
- the structure is sound: VRs are VRs, elements ascend (PS3.5 7.1.1; a header parse that stops at
  PixelData would miss what follows an out-of-order one), sequences nest at most ``MAX_DEPTH`` deep.

Deflated transfer syntaxes are not walked (the data set is a zlib stream): pydicom's parse checks them.
Messages name the check, the tag and the byte offset, never a value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.uid import (
    HTJ2K,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000TransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

MAX_DEPTH = 64  # nested sequences; real images use fewer than 10
# Bounds on what is not pixel data: the intake parses and converts every header value in the receiving
# process, so a sender must not make that take seconds or gigabytes. Real radiographs' headers are a few
# kB to a few MB (vendor private blocks); a text value of a megabyte is already absurd.
MAX_TEXT_VALUE = 1024 * 1024  # one value of a text VR (backslash-separated values convert one by one)
MAX_OTHER_VALUE = 16 * 1024 * 1024  # one binary or unknown (private) value outside the pixel data
MAX_HEADER = 64 * 1024 * 1024  # every value outside the pixel data together
_TEXT_VRS = frozenset(b"AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA})  # float, double float, pixel data
PREAMBLE = 128

_VRS = frozenset(v.value.encode() for v in VR if len(v.value) == 2)
_LONG_VRS = frozenset(str(v).encode() for v in EXPLICIT_VR_LENGTH_32)
_JPEG = frozenset({*JPEGTransferSyntaxes, "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})  # JPEG, JPEG-LS
_J2K = frozenset({*JPEG2000TransferSyntaxes, HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL})
_JP2_BOX = b"\x00\x00\x00\x0cjP  "


class Problem(Enum):
    """What a failed check found (the intake maps each to a DIMSE status)."""

    TRUNCATED = "truncated"  # an element, item, fragment or the data set runs past the end
    ENCODING = "encoding"  # the data are not encoded as the negotiated transfer syntax says
    STRUCTURE = "structure"  # not a well-formed data set (VR, order, items, delimiters, nesting)


class DatasetCheckError(ValueError):
    """A received data set that failed a check; ``problem`` says which kind."""

    def __init__(self, problem: Problem, message: str) -> None:
        self.problem = problem
        super().__init__(message)


@dataclass(frozen=True)
class Layout:
    """Where things are in a checked encoded data set.

    Attributes:
        transfer_syntax: the negotiated transfer syntax (from the file meta information).
        dataset_offset: where the data set starts (after preamble, ``DICM`` and group 0002).
        pixel_length: the PixelData value length (native), None when encapsulated or absent.
        has_pixels: a PixelData, FloatPixelData or DoubleFloatPixelData element is present.
        walked: False for deflated syntaxes (not walked: the parse checks them).
    """

    transfer_syntax: UID
    dataset_offset: int
    pixel_length: int | None
    has_pixels: bool
    walked: bool = True


def tag_text(tag: int) -> str:
    """``(gggg,eeee)``."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def read_file_meta(f: BinaryIO, size: int) -> tuple[UID, int]:
    """The transfer syntax in group 0002 (explicit VR little endian) and where the data set starts."""
    f.seek(PREAMBLE)
    if size < PREAMBLE + 4 or f.read(4) != b"DICM":
        raise DatasetCheckError(Problem.STRUCTURE, "file meta information: expected 'DICM' after the "
                                "128-byte preamble, found none")
    pos, syntax = PREAMBLE + 4, b""
    while pos + 8 <= size:
        f.seek(pos)
        head = f.read(8)
        group, element = struct.unpack_from("<HH", head)
        if group != 0x0002:
            break
        vr = head[4:6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack("<L", f.read(4))
            value_pos = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, 6)
            value_pos = pos + 8
        if length == UNDEFINED or value_pos + length > size:
            raise DatasetCheckError(Problem.TRUNCATED, f"file meta element {tag_text(group << 16 | element)} "
                                    f"at offset {pos}: its length runs past the end of the data")
        if element == 0x0010:
            f.seek(value_pos)
            syntax = f.read(length)
        pos = value_pos + length
    ts = UID(syntax.decode("ascii", "replace").rstrip("\x00 "))
    if not ts.is_transfer_syntax:
        raise DatasetCheckError(Problem.STRUCTURE, "file meta information: expected a known "
                                "TransferSyntaxUID (0002,0010), found none")
    return ts, pos


class _Walker:
    """Reads element headers of one encoded data set and skips values by seeking."""

    def __init__(self, f: BinaryIO, size: int, little_endian: bool) -> None:
        self.f, self.size = f, size
        order = "<" if little_endian else ">"
        self.tag = struct.Struct(order + "HH")
        self.u16, self.u32 = struct.Struct(order + "H"), struct.Struct(order + "L")
        self.pixel_length: int | None = None
        self.header_bytes = 0  # the values outside the pixel data so far (MAX_HEADER)
        self.has_pixels = False
        self.first_fragment: tuple[int, int] | None = None  # (offset, length) of the top-level PixelData's

    def read(self, pos: int, n: int, limit: int, what: str) -> bytes:
        if pos + n > limit:
            where = "the data" if limit == self.size else "its item"
            raise DatasetCheckError(Problem.TRUNCATED, f"{what} at offset {pos}: expected {n} bytes before "
                                    f"the end of {where}, found {max(0, limit - pos)}")
        self.f.seek(pos)
        data = self.f.read(n)
        if len(data) < n:
            raise DatasetCheckError(Problem.TRUNCATED, f"{what} at offset {pos}: the data end early")
        return data

    def header(self, pos: int, limit: int, implicit: bool) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", value length, value offset) of the element or item at ``pos``."""
        head = self.read(pos, 8, limit, "element header")
        group, element = self.tag.unpack_from(head)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:  # items and delimiters never carry a VR
            return tag, b"", self.u32.unpack_from(head, 4)[0], pos + 8
        vr = head[4:6]
        if vr not in _VRS:
            raise DatasetCheckError(Problem.STRUCTURE, f"element {tag_text(tag)} at offset {pos}: expected a "
                                    "VR (explicit VR transfer syntax), found bytes that are not one")
        if vr in _LONG_VRS:
            return tag, vr, self.u32.unpack(self.read(pos + 8, 4, limit, "element header"))[0], pos + 12
        return tag, vr, self.u16.unpack_from(head, 6)[0], pos + 8

    def dataset(self, pos: int, end: int | None, implicit: bool, depth: int, top: bool = False) -> int:
        """Walk a data set (top level or an item) to ``end``, or to its item delimiter when None."""
        limit = self.size if end is None else end
        if not top and not implicit and pos + 6 <= limit:  # an implicit item in explicit data (pydicom reads it)
            head = self.read(pos, 6, limit, "element header")
            implicit = head[4:6] not in _VRS and self.tag.unpack_from(head)[0] != 0xFFFE
        previous = -1
        while pos < limit:
            if top and limit - pos < 8 and previous >= 0 and not self.read(pos, limit - pos, limit, "end").strip(b"\0"):
                return limit  # a sender's pad after an odd-length last element (dcmtk writes one NUL)
            tag, vr, length, value_pos = self.header(pos, limit, implicit)
            if tag == ITEM_DELIMITER and end is None and not top:
                return self._delimiter(tag, length, value_pos)
            if tag >> 16 == 0xFFFE:
                raise DatasetCheckError(Problem.STRUCTURE, f"{tag_text(tag)} at offset {pos}: expected a data "
                                        "element, found an item or delimiter tag")
            if tag <= previous:
                raise DatasetCheckError(Problem.STRUCTURE, f"element order: {tag_text(tag)} at offset {pos} "
                                        f"follows {tag_text(previous)} (elements must ascend)")
            previous = tag
            pos = self.element(tag, vr, length, value_pos, limit, implicit, depth, top)
        if end is None and not top:
            raise DatasetCheckError(Problem.TRUNCATED, "an item of undefined length has no item delimiter "
                                    "(FFFE,E00D) before the end of the data")
        return pos

    def element(self, tag: int, vr: bytes, length: int, value_pos: int, limit: int, implicit: bool,
                depth: int, top: bool) -> int:
        """Check one element's value extent (walking sequences); the offset after it."""
        if tag == PIXEL_DATA and length == UNDEFINED:  # encapsulated (also an icon's, nested)
            end, first = self.fragments(value_pos)
            if top:
                self.has_pixels, self.first_fragment = True, first
            return end
        if top and tag in PIXEL_TAGS:
            self.has_pixels = True
            if tag == PIXEL_DATA:
                self.pixel_length = length
        if length == UNDEFINED:
            if vr not in (b"", b"SQ", b"UN"):
                raise DatasetCheckError(Problem.STRUCTURE, f"element {tag_text(tag)}: undefined length with "
                                        f"VR {vr.decode('ascii', 'replace')} (only SQ, UN and PixelData)")
            return self.sequence(tag, value_pos, None, implicit or vr == b"UN", depth + 1)
        if value_pos + length > limit:
            where = "the data" if limit == self.size else "its item"
            raise DatasetCheckError(Problem.TRUNCATED, f"element {tag_text(tag)}: its length {length} runs "
                                    f"past the end of {where} ({limit - value_pos} bytes left)")
        if tag not in PIXEL_TAGS:
            self._count_header_value(tag, vr or _dictionary_vr(tag).encode("ascii", "replace"), length)
        if vr == b"SQ" or (implicit and _dictionary_vr(tag) == "SQ"):
            self.sequence(tag, value_pos, value_pos + length, implicit, depth + 1)
        return value_pos + length

    def _count_header_value(self, tag: int, vr: bytes, length: int) -> None:
        """Refuse one header value, or all of them together, past the bounds (MAX_TEXT_VALUE ...)."""
        if vr == b"SQ":
            return  # its items' values are counted one by one
        bound = MAX_TEXT_VALUE if vr in _TEXT_VRS else MAX_OTHER_VALUE
        if length > bound:
            raise DatasetCheckError(Problem.STRUCTURE, f"element {tag_text(tag)}: a {vr.decode('ascii', 'replace')} "
                                    f"value of {length} bytes, expected at most {bound}")
        self.header_bytes += length
        if self.header_bytes > MAX_HEADER:
            raise DatasetCheckError(Problem.STRUCTURE, f"the values outside the pixel data exceed {MAX_HEADER} "
                                    f"bytes (at element {tag_text(tag)})")

    def sequence(self, seq_tag: int, pos: int, end: int | None, implicit: bool, depth: int) -> int:
        """Walk the items of a sequence to ``end``, or to its sequence delimiter when None."""
        if depth > MAX_DEPTH:
            raise DatasetCheckError(Problem.STRUCTURE, f"sequence {tag_text(seq_tag)}: sequences nest deeper "
                                    f"than {MAX_DEPTH} levels")
        limit = self.size if end is None else end
        while pos < limit:
            tag, _, length, value_pos = self.header(pos, limit, True)
            if tag == SEQUENCE_DELIMITER and end is None:
                return self._delimiter(tag, length, value_pos)
            if tag != ITEM:
                raise DatasetCheckError(Problem.STRUCTURE, f"sequence {tag_text(seq_tag)}: expected an item "
                                        f"(FFFE,E000) at offset {pos}, found {tag_text(tag)}")
            if length == UNDEFINED:
                pos = self.dataset(value_pos, None, implicit, depth)
                continue
            if value_pos + length > limit:
                raise DatasetCheckError(Problem.TRUNCATED, f"sequence {tag_text(seq_tag)}: an item's length "
                                        f"{length} runs past the end ({limit - value_pos} bytes left)")
            pos = self.dataset(value_pos, value_pos + length, implicit, depth)
        if end is None:
            raise DatasetCheckError(Problem.TRUNCATED, f"sequence {tag_text(seq_tag)} of undefined length has "
                                    "no sequence delimiter (FFFE,E0DD) before the end of the data")
        return pos

    @staticmethod
    def _delimiter(tag: int, length: int, value_pos: int) -> int:
        if length != 0:
            raise DatasetCheckError(Problem.STRUCTURE, f"delimiter {tag_text(tag)}: expected length 0, "
                                    f"found {length}")
        return value_pos

    def fragments(self, pos: int) -> tuple[int, tuple[int, int]]:
        """Walk encapsulated pixel data: Basic Offset Table item, fragments, sequence delimiter.

        Returns:
            The offset after the delimiter, and (offset, length) of the first fragment.
        """
        items, first = 0, None
        while True:
            if pos + 8 > self.size:
                raise DatasetCheckError(Problem.TRUNCATED, "encapsulated PixelData (7FE0,0010) has no sequence "
                                        "delimiter (FFFE,E0DD) before the end of the data")
            tag, _, length, value_pos = self.header(pos, self.size, True)
            if tag == SEQUENCE_DELIMITER:
                self._delimiter(tag, length, value_pos)
                break
            if tag != ITEM or length == UNDEFINED:
                raise DatasetCheckError(Problem.STRUCTURE, f"encapsulated PixelData (7FE0,0010): expected an "
                                        f"item of defined length at offset {pos}, found {tag_text(tag)}")
            if value_pos + length > self.size:
                raise DatasetCheckError(Problem.TRUNCATED, f"encapsulated PixelData (7FE0,0010): a fragment's "
                                        f"length {length} runs past the end ({self.size - value_pos} bytes left)")
            if items == 0 and length % 4:
                raise DatasetCheckError(Problem.STRUCTURE, "encapsulated PixelData (7FE0,0010): the Basic Offset "
                                        f"Table item's length {length} is not a multiple of 4")
            if items == 1:
                first = (value_pos, length)
            items += 1
            pos = value_pos + length
        if first is None:
            raise DatasetCheckError(Problem.STRUCTURE, "encapsulated PixelData (7FE0,0010): expected a Basic "
                                    f"Offset Table item and at least one fragment, found {items} item(s)")
        return value_pos, first


def _check_codec(walker: _Walker, ts: UID) -> None:
    """The first fragment starts as the transfer syntax's codec writes it (when the syntax is one we know)."""
    assert walker.first_fragment is not None
    pos, length = walker.first_fragment
    head = walker.read(pos, min(length, 8), walker.size, "first fragment")
    if ts in _JPEG:
        ok, expected = head[:2] == b"\xff\xd8", "a JPEG start-of-image marker (FFD8)"
    elif ts in _J2K:
        ok, expected = head[:2] == b"\xff\x4f" or head == _JP2_BOX, "a JPEG 2000 codestream (FF4F) or JP2 box"
    elif ts == RLELossless:
        segments = struct.unpack_from("<L", head)[0] if len(head) >= 4 else 0
        offset = struct.unpack_from("<L", head, 4)[0] if len(head) >= 8 else 0
        ok, expected = 1 <= segments <= 15 and offset == 64 and length >= 64, "an RLE header (1-15 segments)"
    else:
        return
    if not ok:
        raise DatasetCheckError(Problem.ENCODING, f"encapsulated PixelData (7FE0,0010): the negotiated transfer "
                                f"syntax {ts} expects {expected} at the first fragment, found other bytes")


def _check_first_element(walker: _Walker, pos: int, ts: UID) -> None:
    """Byte order and implicit/explicit VR, judged on the first element of the data set."""
    head = walker.read(pos, 8, walker.size, "first element header")
    group, element = walker.tag.unpack_from(head)
    if group > 0x0008:
        swapped = ((group & 0xFF) << 8) | (group >> 8)
        if swapped <= 0x0008:
            raise DatasetCheckError(Problem.ENCODING, f"byte order: the first element reads as "
                                    f"{tag_text(group << 16 | element)} under the negotiated transfer syntax {ts}; "
                                    "the data are in the other byte order")
        raise DatasetCheckError(Problem.STRUCTURE, f"the data set starts with {tag_text(group << 16 | element)}: "
                                "expected group 0008 or lower first (SOPClassUID (0008,0016) is required)")
    vr = head[4:6]
    tag = group << 16 | element
    if ts.is_implicit_VR and vr in _VRS and vr.decode() in _dictionary_vr(tag).split(" or "):
        raise DatasetCheckError(Problem.ENCODING, f"element {tag_text(tag)} carries a VR: explicit VR data "
                                f"under the negotiated implicit VR transfer syntax {ts}")
    if not ts.is_implicit_VR and vr not in _VRS:
        raise DatasetCheckError(Problem.ENCODING, f"element {tag_text(tag)} carries no VR: implicit VR data "
                                f"under the negotiated explicit VR transfer syntax {ts}")


def check_layout(f: BinaryIO, size: int) -> Layout:
    """Check an encoded data set with its file meta information (see the module docstring).

    Args:
        f: the encoded file, seekable, positioned anywhere.
        size: its size in bytes.

    Returns:
        Where the data set and its pixel data are.

    Raises:
        DatasetCheckError: the first failed check, with its ``Problem``.
    """
    ts, offset = read_file_meta(f, size)
    if ts.is_deflated:
        return Layout(ts, offset, None, False, walked=False)
    if offset >= size:
        raise DatasetCheckError(Problem.TRUNCATED, "no data set after the file meta information")
    walker = _Walker(f, size, ts.is_little_endian)
    _check_first_element(walker, offset, ts)
    walker.dataset(offset, None, ts.is_implicit_VR, 0, top=True)
    first_fragment = walker.first_fragment
    if ts.is_encapsulated and walker.pixel_length is not None:
        raise DatasetCheckError(Problem.ENCODING, f"PixelData (7FE0,0010) is native (defined length) under the "
                                f"negotiated encapsulated transfer syntax {ts}")
    if not ts.is_encapsulated and first_fragment is not None:
        raise DatasetCheckError(Problem.ENCODING, f"PixelData (7FE0,0010) is encapsulated (undefined length) "
                                f"under the negotiated native transfer syntax {ts}")
    if first_fragment is not None:
        _check_codec(walker, ts)
    return Layout(ts, offset, walker.pixel_length, walker.has_pixels)
