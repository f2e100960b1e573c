"""Deterministic hostile cases: one generator per category, each cycling through its variants.

A case is what one peer does to the node: a C-STORE of bytes encoded as the case says (``kind``
"store"), a raw socket conversation (``kind`` "pdu": ``steps``), or a slot attack beside a legitimate
modality (``kind`` "slot"). ``expect`` says what a correct node does with a store: "refuse" (an error
status, never Success: truncated, wrongly encoded, invalid UIDs, lengths past the end), "accept"
(Success, then a finished job: valid datasets), or "either" (refusal or acceptance are both fine,
but an accepted one must end done/skipped/failed with a result at the PACS). Bodies are built when
the case is iterated (``build``), never kept for the whole run: the full size is ~7,000 stores.
"""

from __future__ import annotations

import copy
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from tests.hostile import pdu
from tests.hostile.images import (
    BASE_SPECS,
    CR_STORAGE,
    encode,
    marker,
    plant_markers,
    real_sample,
    synthetic_image,
    uid,
)

REFUSE, ACCEPT, EITHER = "refuse", "accept", "either"
CALLED_AE = "CXR-AI"


@dataclass
class Case:
    """One hostile input; ``body`` and ``steps`` are filled by the category's generator."""

    id: int
    category: str
    variant: str
    kind: str = "store"  # store | pdu | slot
    expect: str = EITHER
    markers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # the dataset bytes of a C-STORE (no file meta)
    sop_class: str = CR_STORAGE
    sop_uid: str = ""  # the request's Affected SOP Instance UID
    transfer_syntax: str = ExplicitVRLittleEndian  # the presentation context's transfer syntax
    repeat_of: int | None = None  # duplicates: send after this case's job has finished
    steps: list[tuple[str, object]] = field(default_factory=list)  # pdu: ("send", bytes) | ("recv", s) | ...
    source_address: str = "127.0.0.1"
    slot_connections: int = 0
    slot_mode: str = ""  # silent | garbage | associated


Generator = Callable[[int, "Context"], Iterator[Case]]


@dataclass
class Context:
    """What every generator needs: the seed, the optional real sample's folder, the node's AE title."""

    seed: int
    data_dir: Path | None
    called_ae: str = CALLED_AE

    def rng(self, category: str, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{category}:{index}")


# --- helpers -----------------------------------------------------------------------------------


def _source(ctx: Context, rng: random.Random, case_id: int, allow_real: bool = True,
            bits: tuple[int, ...] = (8, 12, 16)) -> tuple[Dataset, str]:
    """A marked source dataset (synthetic, or the real sample one time in five) and its name."""
    if allow_real and rng.random() < 0.2:
        ds = real_sample(ctx.data_dir, rng)
        if ds is not None:
            plant_markers(ds, case_id)
            return ds, "real"
    spec = rng.choice([s for s in BASE_SPECS if s.bits in bits])
    ds = synthetic_image(spec, rng)
    plant_markers(ds, case_id)
    return ds, spec.name


def _ts_of(ds: Dataset) -> str:
    return str(ds.file_meta.TransferSyntaxUID)


def _layout(ds: Dataset, ts: str) -> tuple[bytes, int, list[int]]:
    """The encoded body, the offset of its Pixel Data element and every element boundary before it."""
    body = encode(ds, ts)
    bounds, offset = [0], 0
    for elem in ds:
        if elem.tag.group == 2 or elem.tag == Tag("PixelData"):
            continue
        offset += len(encode(Dataset({elem.tag: elem}), ts))
        bounds.append(offset)
    return body, offset, bounds


def _store(case_id: int, category: str, variant: str, ds: Dataset, body: bytes, ts: str,
           expect: str, sop_uid: str | None = None) -> Case:
    return Case(case_id, category, variant, expect=expect, markers=_markers(ds), body=body,
                sop_class=str(ds.get("SOPClassUID", CR_STORAGE)), transfer_syntax=ts,
                sop_uid=str(ds.get("SOPInstanceUID", "")) if sop_uid is None else sop_uid)


def _markers(ds: Dataset) -> dict[str, str]:
    keys = ("PatientName", "PatientID", "AccessionNumber", "OtherPatientIDs", "InstitutionName",
            "ReferringPhysicianName", "StudyDescription", "BodyPartExamined", "PatientBirthDate")
    return {k: str(ds.get(k, "")) for k in keys if ds.get(k) is not None}


def _flip_bits(body: bytes, lo: int, hi: int, count: int, rng: random.Random) -> bytes:
    out = bytearray(body)
    for _ in range(count):
        pos = rng.randrange(lo, hi)
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def _flip_bytes(body: bytes, lo: int, hi: int, count: int, rng: random.Random) -> bytes:
    out = bytearray(body)
    for _ in range(count):
        out[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(out)


def _pixel_header(ts: str) -> int:
    return 8 if ts == ImplicitVRLittleEndian else 12


# --- store categories ----------------------------------------------------------------------------


def truncation(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Datasets cut inside the header or inside the pixel data (a cut on an element boundary: either)."""
    for i in range(n):
        rng = ctx.rng("truncation", i)
        ds, name = _source(ctx, rng, base + i)
        ts = _ts_of(ds)
        body, pix, bounds = _layout(ds, ts)
        if i % 2 == 0:
            cut = rng.randrange(1, pix)
            expect = EITHER if cut in bounds else REFUSE
            yield _store(base + i, "truncation", f"header@{cut} {name}", ds, body[:cut], ts, expect)
        else:
            cut = rng.randrange(pix + _pixel_header(ts), len(body) - 1)
            yield _store(base + i, "truncation", f"pixels@{cut} {name}", ds, body[:cut], ts, REFUSE)


def flips(n: int, ctx: Context, base: int, category: str) -> Iterator[Case]:
    """Random bit flips (``bitflip``) or byte overwrites (``byteflip``) in the header or the pixel data."""
    for i in range(n):
        rng = ctx.rng(category, i)
        ds, name = _source(ctx, rng, base + i)
        ts = _ts_of(ds)
        body, pix, _ = _layout(ds, ts)
        count = rng.randint(1, 8) if category == "bitflip" else rng.randint(1, 16)
        mutate = _flip_bits if category == "bitflip" else _flip_bytes
        if i % 2 == 0:
            out = mutate(body, 0, pix, count, rng)
            yield _store(base + i, category, f"header x{count} {name}", ds, out, ts, EITHER)
        else:
            out = mutate(body, pix + _pixel_header(ts) + 16, len(body) - 8, count, rng)
            expect = EITHER if name == "real" else ACCEPT  # native pixels stay valid pixels
            yield _store(base + i, category, f"pixels x{count} {name}", ds, out, ts, expect)


def _rle(ds: Dataset) -> Dataset:
    out = copy.deepcopy(ds)
    out.compress(RLELossless)
    return out


TS_VARIANTS: tuple[tuple[str, str, str, str], ...] = (
    # (name, encoding of the body, negotiated transfer syntax, expectation)
    ("explicit sent as implicit", ExplicitVRLittleEndian, ImplicitVRLittleEndian, REFUSE),
    ("implicit sent as explicit", ImplicitVRLittleEndian, ExplicitVRLittleEndian, REFUSE),
    ("little endian sent as big endian", ExplicitVRLittleEndian, ExplicitVRBigEndian, REFUSE),
    ("big endian sent as little endian", ExplicitVRBigEndian, ExplicitVRLittleEndian, REFUSE),
    ("implicit sent as big endian", ImplicitVRLittleEndian, ExplicitVRBigEndian, REFUSE),
    ("native pixels under JPEG baseline", ExplicitVRLittleEndian, JPEGBaseline8Bit, REFUSE),
    ("native pixels under RLE", ExplicitVRLittleEndian, RLELossless, REFUSE),
    ("not deflated under deflate", ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, REFUSE),
    ("RLE pixels under explicit little endian", "rle", ExplicitVRLittleEndian, REFUSE),
    ("RLE pixels under JPEG 2000", "rle", JPEG2000Lossless, EITHER),
)


def transfer_syntax(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """The body encoded in another transfer syntax than the one negotiated for it."""
    for i in range(n):
        rng = ctx.rng("transfer_syntax", i)
        name, encoding, negotiated, expect = TS_VARIANTS[i % len(TS_VARIANTS)]
        ds, src = _source(ctx, rng, base + i, allow_real=False, bits=(16,) if encoding == "rle" else (8, 12, 16))
        if encoding == "rle":
            ds = _rle(ds)
            body = encode(ds, ExplicitVRLittleEndian)
        else:
            body = encode(ds, encoding)
        yield _store(base + i, "transfer_syntax", f"{name} {src}", ds, body, negotiated, expect)


def _geometry_variants(ds: Dataset) -> list[tuple[str, Dataset]]:
    bomb = _rle(ds)
    bomb.Rows = bomb.Columns = 65535
    frames = _rle(ds)
    frames.Rows = frames.Columns = 16384
    frames.NumberOfFrames = 64
    native = copy.deepcopy(ds)
    native.Rows = native.Columns = 65535
    zero_rows = copy.deepcopy(ds)
    zero_rows.Rows = 0
    zero_cols = copy.deepcopy(ds)
    zero_cols.Columns = 0
    one = copy.deepcopy(ds)
    one.Rows = one.Columns = 1
    one.PixelData = bytes(2)
    many = copy.deepcopy(ds)
    many.NumberOfFrames = 1_000_000
    strip = copy.deepcopy(ds)
    strip.Rows, strip.Columns = 1, 65535
    return [("RLE bomb 65535x65535", bomb), ("RLE 64 frames of 16384x16384", frames),
            ("native header 65535x65535", native), ("0 rows", zero_rows), ("0 columns", zero_cols),
            ("1x1", one), ("1000000 frames", many), ("1x65535 strip", strip)]


def geometry(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Absurd geometry: decompression bombs (small RLE data declaring 65535 x 65535), 0 rows, 1 x 1."""
    for i in range(n):
        rng = ctx.rng("geometry", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False, bits=(16,))
        variants = _geometry_variants(ds)
        name, out = variants[i % len(variants)]
        yield _store(base + i, "geometry", f"{name} {src}", out, encode(out, _ts_of(out)), _ts_of(out), EITHER)


BITS_VARIANTS: tuple[tuple[str, dict[str, object]], ...] = (
    ("BitsStored > BitsAllocated", {"BitsStored": 17, "HighBit": 16}),
    ("HighBit wrong", {"HighBit": 3}),
    ("BitsAllocated 7", {"BitsAllocated": 7}),
    ("BitsAllocated 64", {"BitsAllocated": 64, "BitsStored": 64, "HighBit": 63}),
    ("BitsAllocated 1", {"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0}),
    ("PixelRepresentation 2", {"PixelRepresentation": 2}),
    ("SamplesPerPixel 3 monochrome", {"SamplesPerPixel": 3}),
    ("PALETTE COLOR without LUT", {"PhotometricInterpretation": "PALETTE COLOR"}),
    ("PhotometricInterpretation unknown", {"PhotometricInterpretation": "XYZ"}),
    ("BitsStored 0", {"BitsStored": 0, "HighBit": 0}),
)


def bits(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Bits nonsense: stored > allocated, wrong high bit, 7/64/1 bits allocated, unknown photometric."""
    for i in range(n):
        rng = ctx.rng("bits", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False, bits=(12, 16))
        name, changes = BITS_VARIANTS[i % len(BITS_VARIANTS)]
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        yield _store(base + i, "bits", f"{name} {src}", ds, encode(ds, ExplicitVRLittleEndian),
                     ExplicitVRLittleEndian, EITHER)


def pixel_length(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Pixel Data of the wrong length: short, long, odd, empty, absent."""
    names = ("short", "long", "odd", "empty", "absent")
    for i in range(n):
        rng = ctx.rng("pixel_length", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False)
        name = names[i % len(names)]
        data = bytes(ds.PixelData)
        if name == "short":
            ds.PixelData = data[: len(data) // 2]
        elif name == "long":
            ds.PixelData = data + bytes(1024)
        elif name == "odd":
            ds.PixelData = data + b"\x01"
            ds["PixelData"].VR = "OB"
        elif name == "empty":
            ds.PixelData = b""
        else:
            del ds.PixelData
        yield _store(base + i, "pixel_length", f"{name} {src}", ds, encode(ds, ExplicitVRLittleEndian),
                     ExplicitVRLittleEndian, EITHER)


BAD_UIDS = (("empty", ""), ("65+ characters", "1.2." + "3" * 70), ("letters", "1.2.ABC.4"),
            ("leading zero", "1.2.03.4"), ("traversal", "../../x"), ("trailing dot", "1.2.3."))


def bad_uids(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Invalid SOP Instance, Study or Series Instance UIDs (empty, too long, letters, traversal)."""
    keywords = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    for i in range(n):
        rng = ctx.rng("bad_uids", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False)
        name, value = BAD_UIDS[i % len(BAD_UIDS)]
        keyword = keywords[(i // len(BAD_UIDS)) % len(keywords)]
        setattr(ds, keyword, value)
        # The request names the same instance (an empty UID cannot be sent: a valid one then differs).
        sop = str(ds.SOPInstanceUID) or uid(rng)
        yield _store(base + i, "bad_uids", f"{keyword} {name} {src}", ds, encode(ds, ExplicitVRLittleEndian),
                     ExplicitVRLittleEndian, REFUSE, sop_uid=sop)


def duplicates(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Pairs: an instance, then the same SOP Instance UID again (identical, or with other content)."""
    for i in range(0, n - 1, 2):
        rng = ctx.rng("duplicates", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False)
        body = encode(ds, ExplicitVRLittleEndian)
        yield _store(base + i, "duplicates", f"original {src}", ds, body, ExplicitVRLittleEndian, ACCEPT)
        changed = (i // 2) % 2 == 1
        again = copy.deepcopy(ds)
        if changed:  # another patient's image under the same UID
            plant_markers(again, base + i + 1)
            again.PixelData = bytes(len(again.PixelData))
        case = _store(base + i + 1, "duplicates", f"{'changed' if changed else 'identical'} re-send {src}", again,
                      encode(again, ExplicitVRLittleEndian), ExplicitVRLittleEndian, EITHER if changed else ACCEPT)
        case.repeat_of = base + i
        yield case


NON_IMAGE = (("Basic Text SR", "1.2.840.10008.5.1.4.1.1.88.11", "SR"),
             ("Grayscale Softcopy Presentation State", "1.2.840.10008.5.1.4.1.1.11.1", "PR"),
             ("Raw Data", "1.2.840.10008.5.1.4.1.1.66", "OT"),
             ("Encapsulated PDF", "1.2.840.10008.5.1.4.1.1.104.1", "DOC"))


def non_image(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Valid instances of other classes (SR, presentation state, raw data, PDF): stored, not analysed."""
    for i in range(n):
        rng = ctx.rng("non_image", i)
        name, sop_class, modality = NON_IMAGE[i % len(NON_IMAGE)]
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid(rng)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(rng), uid(rng)
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 99, 1
        ds.StudyDate, ds.StudyTime = "20240102", "101500"
        plant_markers(ds, base + i)
        if modality == "SR":
            ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
            item = Dataset()
            item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "no finding"
            ds.ContentSequence = [item]
        elif modality == "OT":
            ds.add_new(0x00091010, "LO", "HOSTILE SUITE")
            ds.add_new(0x00091001, "OB", rng.randbytes(4096))
        elif modality == "DOC":
            ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
            ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
        yield _store(base + i, "non_image", name, ds, encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian,
                     ACCEPT)


def private_tags(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Huge private elements (2-8 MB) or many of them before the pixel data: valid, to be analysed."""
    for i in range(n):
        rng = ctx.rng("private_tags", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False, bits=(8,))
        ds.add_new(0x00090010, "LO", "HOSTILE SUITE")
        if i % 3 == 2:
            for k in range(0x1000, 0x1000 + 0x00FF):
                ds.add_new(0x00090000 | k, "OB", rng.randbytes(4096))
            name = "255 private elements of 4 KB"
        else:
            size = rng.choice((2, 4, 8)) * 1024 * 1024
            ds.add_new(0x00091001, "OB", rng.randbytes(size))
            name = f"private OB of {size // (1024 * 1024)} MB"
        yield _store(base + i, "private_tags", f"{name} {src}", ds, encode(ds, ExplicitVRLittleEndian),
                     ExplicitVRLittleEndian, ACCEPT)


def _deep_sequence(depth: int) -> bytes:
    """A private SQ (0009,1002) nested ``depth`` levels, undefined lengths, explicit VR little endian."""
    open_sq = struct.pack("<HH2sHI", 0x0009, 0x1002, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    leaf = struct.pack("<HH2sH", 0x0009, 0x1003, b"LO", 4) + b"LEAF"
    return (open_sq + item) * depth + leaf + close * depth


def deep_sequences(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """A private sequence nested 50 to 1,000 levels deep before the patient module."""
    depths = (50, 64, 100, 250, 1000)
    for i in range(n):
        rng = ctx.rng("deep_sequences", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False, bits=(8,))
        depth = depths[i % len(depths)]
        head = Dataset({t: e for t, e in ds.items() if t.group < 0x0009})
        tail = Dataset({t: e for t, e in ds.items() if t.group > 0x0009})
        creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 14) + b"HOSTILE SUITE "
        body = (encode(head, ExplicitVRLittleEndian) + creator + _deep_sequence(depth)
                + encode(tail, ExplicitVRLittleEndian))
        yield _store(base + i, "deep_sequences", f"depth {depth} {src}", ds, body, ExplicitVRLittleEndian, EITHER)


def _element_offset(body: bytes, group: int, elem: int) -> int:
    """Offset of an element's tag in an explicit VR little endian body (first occurrence)."""
    pos = body.find(struct.pack("<HH", group, elem))
    if pos < 0:
        raise ValueError(f"element ({group:04X},{elem:04X}) not found in the case body")
    return pos


def _vr_variant(kind: str, ds: Dataset, rng: random.Random, case_id: int) -> tuple[bytes, str, str]:
    """(body, negotiated transfer syntax, expectation) of one VR/length nonsense variant."""
    ts = ExplicitVRLittleEndian
    if kind == "invalid DS/CS values":
        ds.PatientWeight, ds.PatientSize = "123456789.01", "123456789.02"  # replaced in the bytes below
        ds.PatientSex = marker(case_id, "SX").lower()
        raw = encode(ds, ts).replace(b"123456789.01", marker(case_id, "PW").encode() + b" ")
        return raw.replace(b"123456789.02", marker(case_id, "PS").encode() + b" "), ts, EITHER
    if kind == "undefined length on a non-sequence":
        implicit = encode(ds, ImplicitVRLittleEndian)
        pos = _element_offset(implicit, 0x0010, 0x0010)
        return implicit[: pos + 4] + struct.pack("<I", 0xFFFFFFFF) + implicit[pos + 8:], ImplicitVRLittleEndian, EITHER
    body = bytearray(encode(ds, ts))
    if kind == "length past the end":
        ds.add_new(0x00090010, "LO", "HOSTILE SUITE")
        ds.add_new(0x00091001, "OB", b"\0" * 16)
        body = bytearray(encode(ds, ts))
        pos = _element_offset(bytes(body), 0x0009, 0x1001)
        body[pos + 8: pos + 12] = struct.pack("<I", 0x7FFFFFF0)
        return bytes(body), ts, REFUSE
    if kind == "pixel length past the end":
        pos = body.rfind(struct.pack("<HH", 0x7FE0, 0x0010))
        length = struct.unpack("<I", body[pos + 8: pos + 12])[0]
        body[pos + 8: pos + 12] = struct.pack("<I", length + 4096)
        return bytes(body), ts, REFUSE
    if kind == "wrong length byte early":
        pos = _element_offset(bytes(body), 0x0008, 0x0008)  # ImageType, before the patient module
        body[pos + 6] = (body[pos + 6] + rng.choice((2, 4, 8, 16, 40, 120))) % 256
        return bytes(body), ts, EITHER
    if kind == "unknown VR":
        pos = _element_offset(bytes(body), 0x0010, 0x0010)
        body[pos + 4: pos + 6] = b"ZZ"
        return bytes(body), ts, EITHER
    if kind == "odd length text":
        pos = _element_offset(bytes(body), 0x0010, 0x0020)
        length = struct.unpack("<H", body[pos + 6: pos + 8])[0]
        body[pos + 6: pos + 8] = struct.pack("<H", length - 1)
        return bytes(body[: pos + 8 + length - 1] + body[pos + 8 + length:]), ts, EITHER
    if kind == "elements out of order":
        a = _element_offset(bytes(body), 0x0010, 0x0010)
        b = _element_offset(bytes(body), 0x0010, 0x0020)
        c = _element_offset(bytes(body), 0x0010, 0x0030)
        return bytes(body[:a] + body[b:c] + body[a:b] + body[c:]), ts, EITHER
    if kind == "group length wrong":
        element = struct.pack("<HH2sHI", 0x0008, 0x0000, b"UL", 4, 0x7FFFFFFF)
        return element + bytes(body), ts, EITHER
    raise ValueError(f"unknown VR/length variant {kind!r}")


VR_VARIANTS = ("invalid DS/CS values", "undefined length on a non-sequence", "length past the end",
               "pixel length past the end", "wrong length byte early", "unknown VR", "odd length text",
               "elements out of order", "group length wrong")


def vr_length(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """VR and length nonsense: lengths past the end, undefined lengths, unknown VRs, invalid values."""
    for i in range(n):
        rng = ctx.rng("vr_length", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False)
        kind = VR_VARIANTS[i % len(VR_VARIANTS)]
        body, ts, expect = _vr_variant(kind, ds, rng, base + i)
        yield _store(base + i, "vr_length", f"{kind} {src}", ds, body, ts, expect)


def rle_corrupt(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """16-bit images re-encoded RLE Lossless with 32 bits flipped in the segment data (or its header)."""
    for i in range(n):
        rng = ctx.rng("rle_corrupt", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False, bits=(12, 16))
        ds = _rle(ds)
        body, pix, _ = _layout(ds, RLELossless)
        rle_start = pix + 12 + 8 + 8  # OB header, empty basic offset table, the fragment's item header
        if i % 4 == 3:
            count, where = 4, "RLE header"
            out = _flip_bits(body, rle_start, rle_start + 64, count, rng)
        else:
            count, where = 32, "segment data"
            out = _flip_bits(body, rle_start + 64, len(body) - 8, count, rng)
        yield _store(base + i, "rle_corrupt", f"{count} bits in {where} {src}", ds, out, RLELossless, EITHER)


# --- raw PDU and slot categories --------------------------------------------------------------------


def _assoc(ctx: Context) -> bytes:
    return pdu.associate_rq(ctx.called_ae, "HOSTILE", CR_STORAGE, ExplicitVRLittleEndian)


def _pdu_variant(kind: str, ctx: Context, rng: random.Random) -> list[tuple[str, object]]:
    """The socket steps of one raw PDU variant: ("send", bytes), ("recv", seconds), ("sleep", seconds)."""
    if kind == "random bytes":
        return [("send", rng.randbytes(rng.randint(1, 4096))), ("recv", 1.0)]
    if kind == "length 0xFFFFFFFF":
        return [("send", struct.pack(">BBI", rng.randint(1, 7), 0, 0xFFFFFFFF)), ("recv", 5.0)]
    if kind == "truncated A-ASSOCIATE-RQ":
        rq = _assoc(ctx)
        return [("send", rq[: rng.randrange(1, len(rq))]), ("recv", 1.0)]
    if kind == "P-DATA before association":
        cmd = pdu.c_store_command(CR_STORAGE, uid(rng))
        return [("send", pdu.p_data(1, cmd, command=True, last=True)), ("recv", 1.0)]
    if kind == "unknown PDU type":
        pdu_type = rng.choice((0, 8, 9, 0x7F, 0xFF))
        return [("send", pdu.pdu(pdu_type, rng.randbytes(rng.randint(0, 64)))), ("recv", 1.0)]
    if kind == "3 bytes then silence":
        return [("send", _assoc(ctx)[:3]), ("sleep", 2.0)]
    if kind == "A-ASSOCIATE-RQ then garbage":
        return [("send", _assoc(ctx)), ("recv", 1.0), ("send", rng.randbytes(rng.randint(1, 512))), ("recv", 1.0)]
    if kind == "item lengths past the PDU":
        rq = _assoc(ctx)  # the application context item's length (bytes 76-77) made 0xFFF0
        return [("send", rq[:76] + struct.pack(">H", 0xFFF0) + rq[78:]), ("recv", 1.0)]
    raise ValueError(f"unknown PDU variant {kind!r}")


PDU_VARIANTS = ("random bytes", "length 0xFFFFFFFF", "truncated A-ASSOCIATE-RQ", "P-DATA before association",
                "unknown PDU type", "3 bytes then silence", "A-ASSOCIATE-RQ then garbage",
                "item lengths past the PDU")


def raw_pdu(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Raw upper-layer PDUs: garbage, 4 GiB lengths, cut requests, P-DATA unasked, unknown types."""
    for i in range(n):
        rng = ctx.rng("raw_pdu", i)
        kind = PDU_VARIANTS[i % len(PDU_VARIANTS)]
        yield Case(base + i, "raw_pdu", kind, kind="pdu", steps=_pdu_variant(kind, ctx, rng))


def aborted(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """An association that ends mid-dataset (RST, A-ABORT, FIN, a second command): no .part file may stay."""
    ends = ("rst", "abort", "close", "second command")
    for i in range(n):
        rng = ctx.rng("aborted", i)
        ds, src = _source(ctx, rng, base + i, allow_real=False)
        body = encode(ds, ExplicitVRLittleEndian)
        cmd = pdu.c_store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        end = ends[i % len(ends)]
        half = body[: rng.randrange(len(body) // 4, len(body) * 3 // 4)]
        steps: list[tuple[str, object]] = [("send", _assoc(ctx)), ("recv", 5.0),
                                           ("send", pdu.p_data(1, cmd, command=True, last=True))]
        steps += [("send", pdu.p_data(1, half[k: k + 16000], command=False, last=False))
                  for k in range(0, len(half), 16000)]
        if end == "abort":
            steps.append(("send", pdu.abort()))
        elif end == "second command":
            steps += [("send", pdu.p_data(1, cmd, command=True, last=True)), ("recv", 2.0)]
        steps.append(("rst" if end == "rst" else "close", 0.0))
        case = Case(base + i, "aborted", f"{end} after {len(half)} of {len(body)} bytes {src}", kind="pdu",
                    steps=steps, markers=_markers(ds), sop_uid=str(ds.SOPInstanceUID))
        yield case


SLOT_VARIANTS = (("silent", 20), ("garbage", 60), ("associated", 20))


def slots(n: int, ctx: Context, base: int) -> Iterator[Case]:
    """Slot attacks from 127.0.0.2 while a legitimate modality sends from 127.0.0.1."""
    for i in range(n):
        mode, count = SLOT_VARIANTS[i % len(SLOT_VARIANTS)]
        yield Case(base + i, "slots", f"{count} {mode} connections from 127.0.0.2", kind="slot",
                   source_address="127.0.0.2", slot_connections=count, slot_mode=mode)


# --- the registry --------------------------------------------------------------------------------

# category -> (generator, cases at size "tiny", "small", "full"); the full size is the issue's ~7,000
# C-STOREs and ~650 raw PDU conversations.
CATEGORIES: dict[str, tuple[Callable[..., Iterator[Case]], tuple[int, int, int]]] = {
    "truncation": (truncation, (2, 8, 1000)),
    "bitflip": (lambda n, c, b: flips(n, c, b, "bitflip"), (2, 8, 1100)),
    "byteflip": (lambda n, c, b: flips(n, c, b, "byteflip"), (2, 6, 700)),
    "transfer_syntax": (transfer_syntax, (4, 10, 300)),
    "geometry": (geometry, (3, 8, 200)),
    "bits": (bits, (3, 10, 300)),
    "pixel_length": (pixel_length, (2, 5, 300)),
    "bad_uids": (bad_uids, (3, 9, 450)),
    "duplicates": (duplicates, (4, 4, 200)),
    "non_image": (non_image, (2, 4, 150)),
    "private_tags": (private_tags, (1, 3, 60)),
    "deep_sequences": (deep_sequences, (2, 5, 100)),
    "vr_length": (vr_length, (4, 9, 650)),
    "rle_corrupt": (rle_corrupt, (4, 8, 650)),
    "raw_pdu": (raw_pdu, (8, 16, 600)),
    "aborted": (aborted, (2, 4, 50)),
    "slots": (slots, (1, 3, 3)),
}
SIZES = ("tiny", "small", "full")
ID_STRIDE = 20_000  # case ids: category index x stride + index (letters of the markers: 4 base-26 digits)


def count(category: str, size: str) -> int:
    """How many cases ``category`` has at ``size``."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, found {size!r}")
    return CATEGORIES[category][1][SIZES.index(size)]


def generate(category: str, size: str, ctx: Context) -> Iterator[Case]:
    """The cases of one category at one size, built lazily, the same for the same seed."""
    generator, _ = CATEGORIES[category]
    base = list(CATEGORIES).index(category) * ID_STRIDE
    return generator(count(category, size), ctx, base)
