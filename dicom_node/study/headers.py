"""Header summaries of spooled instances, read once and without their pixel data.

Series selection and the volume plan need a dozen attributes of every instance of a study;
:func:`read_header` reads just those (``dcmread(stop_before_pixels=True, specific_tags=...)``)
into an :class:`InstanceHeader`, a small frozen value that holds no pydicom object. The pixel
data is read later, once, by :func:`dicom_node.study.volume.load_volume`, from the path kept in
the header.

Geometry is kept per frame (:class:`FrameHeader`): a single-frame image has one frame, taken
from its top-level attributes; an Enhanced CT image has one per frame, taken from its per-frame
functional groups, then its shared functional groups (Plane Position, Plane Orientation, Pixel
Measures, Pixel Value Transformation), then the top level.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import JPEG2000, JPEGLSNearLossless

from dicom_node.errors import DatasetError

__all__ = [
    "HEADER_KEYWORDS",
    "FrameHeader",
    "InstanceHeader",
    "read_header",
    "read_headers",
]

logger = logging.getLogger(__name__)

#: The top-level attributes :func:`read_header` reads; everything else is skipped.
HEADER_KEYWORDS: Final[tuple[str, ...]] = (
    "SpecificCharacterSet",
    "ImageType",
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "SliceThickness",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    "AcquisitionNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "FrameOfReferenceUID",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "PixelSpacing",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "LossyImageCompression",
    "RescaleIntercept",
    "RescaleSlope",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "ContrastBolusAgentSequence",
    "ContrastBolusUsageSequence",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)

_INT16_MAX: Final = 32767

_REQUIRED_UIDS: Final = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameHeader:
    """Geometry and rescale of one frame (the only frame of a single-frame image).

    Attributes
    ----------
    position_mm
        Image Position (Patient): the LPS centre of the frame's first pixel (x, y, z), mm;
        ``None`` if absent or malformed.
    orientation
        Image Orientation (Patient): row direction then column direction cosines (LPS), six
        values; ``None`` if absent or malformed.
    pixel_spacing_mm
        Pixel Spacing: (between rows, between columns) = (y, x), mm; ``None`` if absent.
    slice_thickness_mm
        Slice Thickness, mm; ``None`` if absent.
    rescale_slope, rescale_intercept
        Stored value to HU: ``hu = stored * slope + intercept``; ``None`` if absent or
        malformed (Type 1 in CT: a volume is not made of such a frame).
    """

    position_mm: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing_mm: tuple[float, float] | None
    slice_thickness_mm: float | None
    rescale_slope: float | None
    rescale_intercept: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceHeader:
    """What selection and the volume need to know about one spooled instance.

    Holds no patient data: no name, id, birth date or accession number is read.

    Attributes
    ----------
    path
        The spooled file (read again, once, for its pixels).
    study_instance_uid, series_instance_uid, sop_instance_uid, sop_class_uid
        The instance's UIDs.
    transfer_syntax_uid
        From the file meta information.
    modality
        Modality (0008,0060), e.g. ``"CT"``; ``""`` if absent.
    series_number
        Series Number, ``None`` if absent.
    series_description, body_part_examined
        ``""`` if absent.
    image_type
        Image Type values, upper case, e.g. ``("ORIGINAL", "PRIMARY", "AXIAL")``.
    frame_of_reference_uid
        ``""`` if absent.
    instance_number
        Instance Number, ``None`` if absent.
    acquisition_number
        Acquisition Number, ``None`` if absent.
    rows, columns
        Image size in pixels (0 for an instance without an image).
    samples_per_pixel, bits_allocated, bits_stored, pixel_representation
        Image Pixel module values (0 for an instance without an image).
    photometric_interpretation
        E.g. ``"MONOCHROME2"``.
    lossy_compressed
        Lossy Image Compression is ``"01"``, or the transfer syntax may be lossy (JPEG-LS
        near-lossless, JPEG 2000) and the attribute does not say ``"00"``.
    frames
        One :class:`FrameHeader` per frame, in the file's frame order; empty for an instance
        without an image.
    convolution_kernel
        Convolution Kernel (0018,1210), its values joined by ``\\``; of an Enhanced CT, from
        the CT Reconstruction functional group; ``""`` if absent.
    contrast
        A contrast agent was given: Contrast/Bolus Agent (0018,0010) or its code sequence
        names one, or (Enhanced CT) a Contrast/Bolus Usage item says it was administered.
    pixel_padding
        The stored values that are padding, not image (Pixel Padding Value, to Pixel Padding
        Range Limit when there is one; PS3.3 C.7.5.1.1.2), as an inclusive range in the
        image's own representation; ``None`` when the image has none.
    """

    path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    image_type: tuple[str, ...] = ()
    frame_of_reference_uid: str = ""
    instance_number: int | None = None
    acquisition_number: int | None = None
    rows: int = 0
    columns: int = 0
    samples_per_pixel: int = 0
    bits_allocated: int = 0
    bits_stored: int = 0
    pixel_representation: int = 0
    photometric_interpretation: str = ""
    lossy_compressed: bool = False
    frames: tuple[FrameHeader, ...] = ()
    convolution_kernel: str = ""
    contrast: bool = False
    pixel_padding: tuple[int, int] | None = None

    @property
    def number_of_frames(self) -> int:
        """Number of frames (1 for a single-frame image, 0 without an image)."""
        return len(self.frames)

    @property
    def is_original_primary(self) -> bool:
        """Image Type starts ORIGINAL\\PRIMARY."""
        return self.image_type[:2] == ("ORIGINAL", "PRIMARY")


def read_header(path: str | Path) -> InstanceHeader:
    """Read one file's header summary, stopping before its pixel data.

    Parameters
    ----------
    path
        A DICOM file (Part 10, with file meta information).

    Returns
    -------
    InstanceHeader
        The summary; geometry that is absent or malformed is ``None`` in its frames (selection
        and the volume plan then say so).

    Raises
    ------
    DatasetError
        The file cannot be read or parsed, or lacks a Study, Series or SOP Instance UID or a
        SOP Class UID.
    """
    file = Path(path)
    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        raise DatasetError(f"{file.name}: cannot read the DICOM header ({exc})") from exc
    missing = [k for k in _REQUIRED_UIDS if not str(ds.get(k, "") or "")]
    if missing:
        raise DatasetError(f"{file.name}: no {', '.join(missing)}")
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    if not syntax:
        raise DatasetError(f"{file.name}: no Transfer Syntax UID in the file meta information")

    rows = _int(ds, "Rows") or 0
    columns = _int(ds, "Columns") or 0
    frames: tuple[FrameHeader, ...] = ()
    if rows and columns:
        try:
            frames = _frames(ds)
        except DatasetError as exc:
            raise DatasetError(f"{file.name}: {exc}") from exc
    return InstanceHeader(
        path=file,
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=syntax,
        modality=_text(ds, "Modality").upper(),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        image_type=tuple(v.upper() for v in _texts(ds, "ImageType")),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        instance_number=_int(ds, "InstanceNumber"),
        acquisition_number=_int(ds, "AcquisitionNumber"),
        rows=rows,
        columns=columns,
        samples_per_pixel=_int(ds, "SamplesPerPixel") or 0,
        bits_allocated=_int(ds, "BitsAllocated") or 0,
        bits_stored=_int(ds, "BitsStored") or 0,
        pixel_representation=_int(ds, "PixelRepresentation") or 0,
        photometric_interpretation=_text(ds, "PhotometricInterpretation").upper(),
        lossy_compressed=_is_lossy(_text(ds, "LossyImageCompression"), syntax),
        frames=frames,
        convolution_kernel=_kernel(ds),
        contrast=_contrast(ds),
        pixel_padding=_padding(ds, signed=_int(ds, "PixelRepresentation") == 1),
    )


def _kernel(ds: Dataset) -> str:
    """Convolution Kernel, at the top level or in an Enhanced CT's CT Reconstruction group
    (shared, else the first frame's)."""
    kernel = _text(ds, "ConvolutionKernel")
    if kernel:
        return kernel
    for group in (
        _first_item(ds, "SharedFunctionalGroupsSequence"),
        _first_item(ds, "PerFrameFunctionalGroupsSequence"),
    ):
        if group is not None:
            kernel = _text(_first_item(group, "CTReconstructionSequence"), "ConvolutionKernel")
            if kernel:
                return kernel
    return ""


def _contrast(ds: Dataset) -> bool:
    """Whether the header says a contrast agent was given (see :class:`InstanceHeader`)."""
    if _text(ds, "ContrastBolusAgent") or _items(ds, "ContrastBolusAgentSequence"):
        return True
    return any(
        _text(item, "ContrastBolusAgentAdministered").upper() == "YES"
        for item in _items(ds, "ContrastBolusUsageSequence")
    )


def _stored_value(value: object, *, signed: bool) -> int | None:
    """A US or SS value (its VR follows Pixel Representation) as the image stores it: a
    signed image's padding written as US (63536) is -2000, and the other way round."""
    if isinstance(value, bytes):  # VR left unresolved: two little-endian bytes
        return int.from_bytes(value, "little", signed=signed) if len(value) == 2 else None
    number = _floats(value, 1)
    if number is None or not number[0].is_integer():
        return None
    n = int(number[0])
    if signed and n > _INT16_MAX:
        n -= 1 << 16
    elif not signed and n < 0:
        n += 1 << 16
    return n


def _padding(ds: Dataset, *, signed: bool) -> tuple[int, int] | None:
    """The inclusive range of stored values that are padding (see :class:`InstanceHeader`)."""
    value = _stored_value(_get(ds, "PixelPaddingValue"), signed=signed)
    if value is None:
        return None
    limit = _stored_value(_get(ds, "PixelPaddingRangeLimit"), signed=signed)
    return (value, value) if limit is None else (min(value, limit), max(value, limit))


#: Transfer syntaxes that may be lossy (JPEG-LS near-lossless, JPEG 2000 irreversible or not).
_MAY_BE_LOSSY: Final = frozenset({JPEGLSNearLossless, JPEG2000})


def _is_lossy(lossy_image_compression: str, syntax: str) -> bool:
    """Lossy Image Compression "01"; or a transfer syntax that may be lossy without "00" saying
    it is not (the attribute is Type 3: a sender may leave it out)."""
    if lossy_image_compression == "01":
        return True
    return syntax in _MAY_BE_LOSSY and lossy_image_compression != "00"


def read_headers(paths: Iterable[str | Path]) -> tuple[InstanceHeader, ...]:
    """Read the header summary of every file, in the order given.

    Raises
    ------
    DatasetError
        As :func:`read_header`, for the first file that fails.
    """
    return tuple(read_header(p) for p in paths)


# --------------------------------------------------------------------------------------------
# Frames


def _frames(ds: Dataset) -> tuple[FrameHeader, ...]:
    """One FrameHeader per frame: per-frame groups, then shared groups, then the top level."""
    count = _int(ds, "NumberOfFrames") or 1
    top = FrameHeader(
        position_mm=_vector3(_get(ds, "ImagePositionPatient")),
        orientation=_orientation(_get(ds, "ImageOrientationPatient")),
        pixel_spacing_mm=_pair(_get(ds, "PixelSpacing")),
        slice_thickness_mm=_positive(_get(ds, "SliceThickness")),
        rescale_slope=_number(_get(ds, "RescaleSlope")),
        rescale_intercept=_number(_get(ds, "RescaleIntercept")),
    )
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = _items(ds, "PerFrameFunctionalGroupsSequence")
    # the count comes from the file: a few bytes may claim billions of frames
    if count > 1 and len(per_frame) != count:
        raise DatasetError(
            f"Number of Frames is {count} but the Per-frame Functional Groups Sequence has "
            f"{len(per_frame)} items"
        )
    if shared is None and not per_frame:
        return (top,) * count
    frames = []
    for index in range(count):
        own = per_frame[index] if index < len(per_frame) else None
        frames.append(_frame_from_groups(own, shared, top))
    return tuple(frames)


def _frame_from_groups(
    own: Dataset | None, shared: Dataset | None, top: FrameHeader
) -> FrameHeader:
    position = _macro(own, shared, "PlanePositionSequence")
    orientation = _macro(own, shared, "PlaneOrientationSequence")
    measures = _macro(own, shared, "PixelMeasuresSequence")
    transform = _macro(own, shared, "PixelValueTransformationSequence")
    return FrameHeader(
        position_mm=(
            _vector3(_get(position, "ImagePositionPatient")) if position else top.position_mm
        ),
        orientation=(
            _orientation(_get(orientation, "ImageOrientationPatient"))
            if orientation
            else top.orientation
        ),
        pixel_spacing_mm=(
            _pair(_get(measures, "PixelSpacing")) if measures else top.pixel_spacing_mm
        ),
        slice_thickness_mm=(
            _positive(_get(measures, "SliceThickness")) if measures else top.slice_thickness_mm
        ),
        rescale_slope=(
            _number(_get(transform, "RescaleSlope")) if transform else top.rescale_slope
        ),
        rescale_intercept=(
            _number(_get(transform, "RescaleIntercept")) if transform else top.rescale_intercept
        ),
    )


def _macro(own: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The item of a functional group macro: the frame's own, else the shared one."""
    for group in (own, shared):
        if group is not None:
            item = _first_item(group, keyword)
            if item is not None:
                return item
    return None


# --------------------------------------------------------------------------------------------
# Values: absent or malformed values become None (or the default), never an exception


def _get(ds: Dataset | None, keyword: str) -> object:
    if ds is None:
        return None
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError):
        return None


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = _get(ds, keyword)
    if value is None:
        return []
    try:
        return [item for item in value if isinstance(item, Dataset)]  # type: ignore[attr-defined]
    except TypeError:
        return []


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    items = _items(ds, keyword)
    return items[0] if items else None


def _values(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(cast("Iterable[object]", value))
    except TypeError:
        return [value]


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    items = _values(value)
    if len(items) != count:
        return None
    try:
        out = tuple(float(v) for v in items)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _vector3(value: object) -> tuple[float, float, float] | None:
    v = _floats(value, 3)
    return (v[0], v[1], v[2]) if v is not None else None


def _orientation(value: object) -> tuple[float, float, float, float, float, float] | None:
    v = _floats(value, 6)
    return (v[0], v[1], v[2], v[3], v[4], v[5]) if v is not None else None


def _pair(value: object) -> tuple[float, float] | None:
    v = _floats(value, 2)
    if v is None or v[0] <= 0 or v[1] <= 0:
        return None
    return (v[0], v[1])


def _number(value: object) -> float | None:
    v = _floats(value, 1)
    return v[0] if v is not None and math.isfinite(v[0]) else None


def _positive(value: object) -> float | None:
    v = _floats(value, 1)
    return v[0] if v is not None and v[0] > 0 else None


def _int(ds: Dataset, keyword: str) -> int | None:
    v = _floats(_get(ds, keyword), 1)
    return int(v[0]) if v is not None and v[0].is_integer() else None


def _texts(ds: Dataset | None, keyword: str) -> tuple[str, ...]:
    return tuple(str(v).strip() for v in _values(_get(ds, keyword)))


def _text(ds: Dataset | None, keyword: str) -> str:
    return "\\".join(_texts(ds, keyword))
