"""The File Meta Information written in front of each received data set (PS3.10 7.1).

Encoded directly: the group is eight fixed elements, and building it through pydicom's
dataset machinery cost 0.5 to 0.9 ms per instance, a sixth of the receiver's time per C-STORE.
The tests read every field back with pydicom.
"""

from __future__ import annotations

import struct
import uuid

from dicom_node import __version__

#: dicom-node's Implementation Class UID: a UUID-derived UID, the same for every release.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'dicom-node').int}"
#: Implementation Version Name (SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"DICOM_NODE_{__version__.replace('.', '')}"[:16]

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_meta_bytes(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str
) -> bytes:
    """Preamble, ``DICM`` and the File Meta group (explicit VR little endian), as bytes."""
    body = b"".join(
        (
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _element(0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0010, b"UI", _ui(transfer_syntax_uid)),
            _element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
            _element(0x0016, b"AE", _text(source_ae_title.strip() or "UNKNOWN")),
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return _PREAMBLE + group_length + body
