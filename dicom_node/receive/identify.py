"""Reading the few header fields that file a received instance, without decoding pixels."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.errors import DatasetError, DatasetMismatchError, InvalidUIDError
from dicom_node.uids import is_valid_uid

_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
#: Of a deflated data set, the inflated bytes kept to read its header (the rest is counted).
_HEAD_BYTES = 64 * 1024 * 1024
_INFLATE_CHUNK = 4 * 1024 * 1024
_FIELDS = [
    Tag(0x0008, 0x0016),  # SOPClassUID
    Tag(0x0008, 0x0018),  # SOPInstanceUID
    Tag(0x0008, 0x0060),  # Modality
    Tag(0x0008, 0x0070),  # Manufacturer
    Tag(0x0020, 0x000D),  # StudyInstanceUID
    Tag(0x0020, 0x000E),  # SeriesInstanceUID
    Tag(0x0028, 0x0002),  # SamplesPerPixel
    Tag(0x0028, 0x0008),  # NumberOfFrames
    Tag(0x0028, 0x0010),  # Rows
    Tag(0x0028, 0x0011),  # Columns
    Tag(0x0028, 0x0100),  # BitsAllocated
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
    raw: bytes,
    transfer_syntax: str,
    *,
    command_sop_class: str,
    command_sop_instance: str,
    needs_pixel_data: bool = False,
    max_dataset_bytes: int = 2**31,
) -> Identity:
    """Parse a C-STORE data set's header and check it against its command.

    Parameters
    ----------
    raw
        The data set as received (no File Meta), in ``transfer_syntax``.
    command_sop_class, command_sop_instance
        Affected SOP Class / Instance UID of the C-STORE request.
    needs_pixel_data
        The SOP class is one the node analyses: a data set without a whole Pixel Data element
        header is refused (cut short before it, it would otherwise pass for a whole one), and
        so is native pixel data shorter than its frames need.
    max_dataset_bytes
        Largest data set accepted once inflated (Deflated Explicit VR Little Endian).

    Raises
    ------
    DatasetError
        The data set cannot be parsed; it, or its pixel data, is cut short; its pixel data is
        encoded otherwise than its transfer syntax says, or holds fewer bytes than its frames
        need; deflated, it inflates past ``max_dataset_bytes``.
    DatasetMismatchError
        The data set's SOP Class or SOP Instance UID differs from the command's.
    InvalidUIDError
        A Study, Series or SOP Instance UID is missing or not a valid UID.
    """
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        data, total = _inflate_head(raw, max_dataset_bytes)
    else:
        data, total = raw, len(raw)
    fp = BytesIO(data)
    try:
        ds: Dataset = read_dataset(
            fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=_stop_at_pixels
        )
        pixel_length = _check_rest(ds, data, fp.tell(), total, ts)
        # read_dataset defers values; touch the fields we need while the buffer is at hand
        values = {int(t): ds.get(t) for t in _FIELDS}
    except DatasetError:
        raise
    except Exception as exc:  # pydicom raises many types for broken input
        raise DatasetError(f"data set cannot be parsed: {type(exc).__name__}") from exc
    if needs_pixel_data and pixel_length is None:
        raise DatasetError("data set has no Pixel Data (or is cut short before it)")
    if needs_pixel_data and pixel_length is not None and pixel_length != _UNDEFINED:
        _check_frames_fit(values, pixel_length)  # (CT is monochrome: no subsampled colour)

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


def _inflate_head(raw: bytes, limit: int) -> tuple[bytes, int]:
    """The first :data:`_HEAD_BYTES` of a deflated data set, inflated, and its whole inflated
    length, without holding more: a few MiB of deflated zeros would otherwise inflate to
    gigabytes in the receiver's memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = bytearray()
    total = 0
    pending = raw
    try:
        while True:
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
            total += len(chunk)
            if total > limit:
                raise DatasetError(f"deflated data set inflates past {limit} bytes")
            if len(head) < _HEAD_BYTES:
                head += chunk[: _HEAD_BYTES - len(head)]
            if not chunk and not pending:
                break
        head_total = total
        tail = inflater.flush()
        total = head_total + len(tail)
        if len(head) < _HEAD_BYTES:
            head += tail[: _HEAD_BYTES - len(head)]
    except zlib.error as exc:
        raise DatasetError("deflated data set cannot be inflated") from exc
    if not inflater.eof:
        raise DatasetError("deflated data set is truncated")
    if total > limit:
        raise DatasetError(f"deflated data set inflates past {limit} bytes")
    return bytes(head), total


def _check_rest(ds: Dataset, data: bytes, offset: int, total: int, ts: UID) -> int | None:
    """Check what follows the header read into ``ds`` (which stopped at ``offset``) and return
    the Pixel Data element's length (:data:`_UNDEFINED` when encapsulated), ``None`` when the
    data set has no Pixel Data."""
    if offset < len(data):
        return _check_tail(data, offset, total, ts)
    if total > len(data):
        raise DatasetError(f"data set header longer than {_HEAD_BYTES >> 20} MiB")
    _check_last_element(ds, offset)
    return None


def _check_last_element(ds: Dataset, end: int) -> None:
    """A data set read to its end must end with a whole element. ``read_dataset`` takes a
    value cut short at the end of the data for a whole one, and stops without a word in an
    element header cut short."""
    tags = list(ds.keys())
    if not tags:
        raise DatasetError("data set is empty")
    items: list[DataElement | RawDataElement] = [ds.get_item(t) for t in tags]
    raw: list[RawDataElement] = [e for e in items if isinstance(e, RawDataElement)]
    if not raw:
        return
    last = max(raw, key=lambda e: e.value_tell)  # the last in the data (whatever its tag)
    if last.length != _UNDEFINED and last.value_tell + last.length != end:
        raise DatasetError("data set is truncated")


def _check_frames_fit(
    values: Mapping[int, DataElement | RawDataElement | None], length: int
) -> None:
    """Native pixel data must hold every frame the header announces: a few bytes claiming two
    billion frames would otherwise reach the analysis."""

    def number(tag: int, default: int | None = None) -> int | None:
        element = values.get(tag)
        if element is None or element.value in (None, b"", ""):
            return default
        try:
            return int(element.value)
        except (TypeError, ValueError):
            return None

    rows, columns = number(0x00280010), number(0x00280011)
    bits, samples = number(0x00280100), number(0x00280002, 1)
    frames = number(0x00280008, 1)
    if not (rows and columns and bits and samples and frames):
        return  # not an image, or one the analysis refuses with its reason
    need = (rows * columns * samples * frames * bits + 7) // 8
    if length < need:
        raise DatasetError(
            f"pixel data holds {length} bytes; {frames} frames of {rows}x{columns} need {need}"
        )


def _check_tail(data: bytes, offset: int, total: int, ts: UID) -> int | None:
    """Check the element at ``offset`` (Pixel Data or later): whole, and encapsulated exactly
    when the transfer syntax is. ``data`` may be only the head of a data set of ``total``
    bytes. Returns Pixel Data's length (:data:`_UNDEFINED` when encapsulated), ``None`` when
    the element is another (the data set has no Pixel Data)."""
    little = ts.is_little_endian
    rest = total - offset
    if rest < 8 or len(data) - offset < 8:
        raise DatasetError("data set is truncated")
    fmt = "<" if little else ">"
    group, element = struct.unpack(fmt + "HH", data[offset : offset + 4])
    if ts.is_implicit_VR:
        length = struct.unpack(fmt + "L", data[offset + 4 : offset + 8])[0]
        header = 8
    else:
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if rest < 12 or len(data) - offset < 12:
                raise DatasetError("data set is truncated")
            length = struct.unpack(fmt + "L", data[offset + 8 : offset + 12])[0]
            header = 12
        else:
            length = struct.unpack(fmt + "H", data[offset + 6 : offset + 8])[0]
            header = 8
    is_pixels = (group << 16 | element) == _PIXEL_DATA
    if is_pixels and (length == _UNDEFINED) != ts.is_encapsulated:
        raise DatasetError(
            "pixel data is "
            + ("encapsulated" if length == _UNDEFINED else "native")
            + f" but the transfer syntax ({ts.name}) is not"
        )
    if length == _UNDEFINED:
        delim = _SEQ_DELIM_LE if little else _SEQ_DELIM_BE
        if data.rfind(delim, offset + header) < 0:
            raise DatasetError("encapsulated pixel data is truncated (no sequence delimiter)")
    elif header + length > rest:
        raise DatasetError(f"pixel data is truncated: {rest - header} of {length} bytes present")
    return length if is_pixels else None
