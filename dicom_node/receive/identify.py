"""Reading the few header fields that file a received instance, without decoding pixels."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.errors import DatasetError, DatasetMismatchError, InvalidUIDError
from dicom_node.uids import is_valid_uid

_PIXEL_DATA = 0x7FE00010
_FIELDS = [
    Tag(0x0008, 0x0016),  # SOPClassUID
    Tag(0x0008, 0x0018),  # SOPInstanceUID
    Tag(0x0008, 0x0060),  # Modality
    Tag(0x0008, 0x0070),  # Manufacturer
    Tag(0x0020, 0x000D),  # StudyInstanceUID
    Tag(0x0020, 0x000E),  # SeriesInstanceUID
]
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_SEQ_DELIM_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_SEQ_DELIM_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"


@dataclass(frozen=True, slots=True)
class Identity:
    """What the receiver needs to know of an instance to file it."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    manufacturer: str


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) >= _PIXEL_DATA


def identify(
    raw: bytes, transfer_syntax: str, *, command_sop_class: str, command_sop_instance: str
) -> Identity:
    """Parse a C-STORE data set's header and check it against its command.

    Parameters
    ----------
    raw
        The data set as received (no File Meta), in ``transfer_syntax``.
    command_sop_class, command_sop_instance
        Affected SOP Class / Instance UID of the C-STORE request.

    Raises
    ------
    DatasetError
        The data set cannot be parsed, or its pixel data is cut short.
    DatasetMismatchError
        The data set's SOP Class or SOP Instance UID differs from the command's.
    InvalidUIDError
        A Study, Series or SOP Instance UID is missing or not a valid UID.
    """
    ts = UID(transfer_syntax)
    data = raw
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(raw, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise DatasetError("deflated data set cannot be inflated") from exc
    fp = BytesIO(data)
    try:
        ds: Dataset = read_dataset(
            fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=_stop_at_pixels
        )
        _check_tail(data, fp.tell(), implicit=ts.is_implicit_VR, little=ts.is_little_endian)
        # read_dataset defers values; touch the fields we need while the buffer is at hand
        values = {int(t): ds.get(t) for t in _FIELDS}
    except DatasetError:
        raise
    except Exception as exc:  # pydicom raises many types for broken input
        raise DatasetError(f"data set cannot be parsed: {type(exc).__name__}") from exc

    def text(tag: int) -> str:
        elem = values.get(tag)
        value = "" if elem is None else elem.value
        return str(value).strip() if value is not None else ""

    sop_class = text(0x00080016)
    sop_instance = text(0x00080018)
    if sop_class != command_sop_class.strip():
        raise DatasetMismatchError("SOP Class UID of the data set differs from the command's")
    if sop_instance != command_sop_instance.strip():
        raise DatasetMismatchError("SOP Instance UID of the data set differs from the command's")
    ident = Identity(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_uid=text(0x0020000D),
        series_uid=text(0x0020000E),
        modality=text(0x00080060).upper(),
        manufacturer=text(0x00080070),
    )
    for name, uid in (
        ("SOP Instance", ident.sop_instance_uid),
        ("Study Instance", ident.study_uid),
        ("Series Instance", ident.series_uid),
    ):
        if not is_valid_uid(uid):
            raise InvalidUIDError(f"{name} UID is missing or not a valid UID")
    return ident


def _check_tail(data: bytes, offset: int, *, implicit: bool, little: bool) -> None:
    """Check that the element at ``offset`` (Pixel Data or later, if any) is not cut short."""
    rest = len(data) - offset
    if rest == 0:
        return
    if rest < 8:
        raise DatasetError("data set is truncated")
    fmt = "<" if little else ">"
    if implicit:
        length = struct.unpack(fmt + "L", data[offset + 4 : offset + 8])[0]
        header = 8
    else:
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if rest < 12:
                raise DatasetError("data set is truncated")
            length = struct.unpack(fmt + "L", data[offset + 8 : offset + 12])[0]
            header = 12
        else:
            length = struct.unpack(fmt + "H", data[offset + 6 : offset + 8])[0]
            header = 8
    if length == 0xFFFFFFFF:
        delim = _SEQ_DELIM_LE if little else _SEQ_DELIM_BE
        if data.rfind(delim, offset + header) < 0:
            raise DatasetError("encapsulated pixel data is truncated (no sequence delimiter)")
    elif header + length > rest:
        raise DatasetError(f"pixel data is truncated: {rest - header} of {length} bytes present")
