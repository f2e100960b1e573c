"""Raw DICOM upper-layer PDUs (PS3.8 section 9.3), encoded by hand so that the suite can send broken ones.

pynetdicom only sends valid PDUs; the cases need headers that announce 4 GiB, associations cut
mid-request, P-DATA before any association, datasets cut mid-transfer.
"""

from __future__ import annotations

import struct

from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as encode_dataset

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS = "1.2.826.0.1.3680043.9.7433.99"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = range(1, 8)


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def pdu(pdu_type: int, payload: bytes, length: int | None = None) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length (``length`` overrides the true one)."""
    return struct.pack(">BBI", pdu_type, 0, len(payload) if length is None else length) + payload


def associate_rq(called: str, calling: str, abstract_syntax: str, transfer_syntax: str,
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing one presentation context (id 1)."""
    context = struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, _uid(abstract_syntax)) + _item(0x40, _uid(transfer_syntax))
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, _uid(IMPLEMENTATION_CLASS))
    payload = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
               + _item(0x10, _uid(APPLICATION_CONTEXT)) + _item(0x20, context) + _item(0x50, user))
    return pdu(A_ASSOCIATE_RQ, payload)


def p_data(context_id: int, fragment: bytes, command: bool, last: bool) -> bytes:
    """A P-DATA-TF with one PDV: a command or dataset fragment."""
    header = (1 if command else 0) | (2 if last else 0)
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment
    return pdu(P_DATA_TF, pdv)


def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """The C-STORE-RQ command set, encoded implicit VR little endian (PS3.7 9.3.1.1)."""
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.command_set.CommandDataSetType = 0x0001  # a dataset follows
    encoded = encode_dataset(msg.command_set, True, True)
    if encoded is None:
        raise ValueError(f"cannot encode the C-STORE-RQ command set for {sop_instance}")
    return encoded


def abort() -> bytes:
    """A-ABORT from the service user."""
    return pdu(A_ABORT, bytes(4))


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, bytes(4))
