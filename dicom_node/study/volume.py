"""The CT volume: one series' slices, checked for geometry, decoded once into HU.

Two steps, so that the headers are read once and the pixels once:

1. :func:`plan_volume` takes the header summaries (:mod:`dicom_node.study.headers`) of one
   series and decides, from headers alone, where every slice goes, or refuses the series with
   the reason (:class:`~dicom_node.errors.VolumeGeometryError`). Selection runs it on every
   candidate series, so a series that cannot form a volume is never chosen.
2. :func:`load_volume` allocates the whole (z, y, x) array once and decodes one file at a time
   into it, rescaling each frame into its slice. No dataset holding pixel data outlives its
   file, so the peak memory is the volume plus about one decoded frame.

Geometry rules
--------------
- Slices are sorted by their position along the slice normal, ``dot(IPP, row x col)``; index
  ``z`` increases along the normal (for axial images: towards the head).
- Every frame must have the same orientation (within
  ``geometry.max_orientation_difference_deg``), size (rows, columns) and pixel spacing.
- Steps between neighbouring slices must equal the median step within
  ``geometry.spacing_tolerance`` (a fraction of it). A step that is a whole multiple (2 or more)
  of it is one or more missing slices, a step of (nearly) zero a duplicate position, any other
  deviation uneven spacing: each refuses the series, saying where (at most three places are
  spelled out). Nothing is ever interpolated.
- Gantry tilt is measured from the geometry, not from Gantry/Detector Tilt: the angle between
  the slice normal and the line the slice positions run along (a tilted gantry shears the
  positions along the column direction). Beyond ``geometry.max_gantry_tilt_deg`` the series is
  refused: the voxels of a tilted series do not lie on a rectangular grid, and putting them on
  one needs resampling (interpolation along the sheared axis), which this node does not do yet.
  The model runs slice by slice and would cope, but lesion sizes, volumes and the SEG's
  geometry assume a rectangular grid. Below the tolerance, :attr:`CTVolume.affine` keeps the
  small drift, so that each slice's position stays exact.

Decoders
--------
Pixel data is decoded by pydicom 3's decoders with one plug-in chosen per transfer syntax
(never "whichever happens to be installed"), all permissively licensed:

=================================================  ==========================================
transfer syntax                                    decoded by
=================================================  ==========================================
Implicit VR LE, Explicit VR LE, Explicit VR BE     pydicom (native)
Deflated Explicit VR LE                            pydicom (native, after zlib inflation)
JPEG Lossless (Process 14, and its SV1)            ``gdcm`` (python-gdcm)
JPEG-LS Lossless, JPEG-LS Near-Lossless            ``pyjpegls``
JPEG 2000 Lossless, JPEG 2000                      ``pylibjpeg`` (pylibjpeg-openjpeg)
RLE Lossless                                       ``pylibjpeg`` (pylibjpeg-rle)
=================================================  ==========================================

Any other transfer syntax (JPEG baseline and extended: 8/12-bit lossy, unfit for CT numbers)
is refused with :class:`~dicom_node.errors.VolumeDecodeError`;
:data:`DECODABLE_TRANSFER_SYNTAXES` is the set the receiver may accept.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.config import VolumeGeometrySettings
from dicom_node.errors import VolumeDecodeError, VolumeGeometryError
from dicom_node.study.headers import FrameHeader, InstanceHeader, read_headers

__all__ = [
    "DECODABLE_TRANSFER_SYNTAXES",
    "DECODING_PLUGINS",
    "CTVolume",
    "SliceSource",
    "VolumePlan",
    "load_volume",
    "plan_volume",
    "read_volume",
]

logger = logging.getLogger(__name__)

#: The pydicom decoding plug-in used for each transfer syntax ("" for native encodings).
DECODING_PLUGINS: Final[Mapping[str, str]] = MappingProxyType(
    {
        ImplicitVRLittleEndian: "",
        ExplicitVRLittleEndian: "",
        ExplicitVRBigEndian: "",
        DeflatedExplicitVRLittleEndian: "",
        JPEGLossless: "gdcm",
        JPEGLosslessSV1: "gdcm",
        JPEGLSLossless: "pyjpegls",
        JPEGLSNearLossless: "pyjpegls",
        JPEG2000Lossless: "pylibjpeg",
        JPEG2000: "pylibjpeg",
        RLELossless: "pylibjpeg",
    }
)

#: Transfer syntaxes whose pixel data :func:`load_volume` decodes.
DECODABLE_TRANSFER_SYNTAXES: Final[frozenset[str]] = frozenset(DECODING_PLUGINS)

HUDtype = Literal["auto", "float32"]

_INT16_MIN: Final = -32768
#: What a padding pixel (outside the reconstructed field, PS3.3 C.7.5.1.1.2) becomes: air.
PADDING_HU: Final = -1024
_INT16_MAX: Final = 32767
# Orientation vectors must be unit length and orthogonal to this (cosines are often written
# with 6 decimals or fewer).
_UNIT_TOLERANCE: Final = 1e-3
# Pixel spacings of two images are "the same" within this fraction.
_PIXEL_SPACING_TOLERANCE: Final = 1e-3
# A slice may lie this far off the line of slice positions, as a fraction of a pixel.
_IN_PLANE_TOLERANCE_PIXELS: Final = 0.5
# Slices closer than this along the normal are at the same position, mm.
_SAME_POSITION_MM: Final = 1e-3
# At most this many problems are spelled out in a refusal; the rest are counted.
_SHOWN_PROBLEMS: Final = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class SliceSource:
    """Where one slice of the volume comes from.

    Attributes
    ----------
    path
        The file holding it.
    frame_index
        0-based index of the frame in that file (0 for a single-frame image).
    sop_instance_uid
        The image's SOP Instance UID.
    frame_number
        1-based frame number, as a SEG's Referenced Frame Number (1 for single-frame images).
    position_mm
        Image Position (Patient), LPS (x, y, z), mm.
    rescale_slope, rescale_intercept
        ``hu = stored * slope + intercept``.
    transfer_syntax_uid
        The file's transfer syntax.
    pixel_padding
        Stored values that are padding, not image (inclusive range), or ``None``: they become
        air (:data:`PADDING_HU`).
    """

    path: Path
    frame_index: int
    sop_instance_uid: str
    frame_number: int
    position_mm: tuple[float, float, float]
    rescale_slope: float
    rescale_intercept: float
    transfer_syntax_uid: str
    pixel_padding: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumePlan:
    """A series' slices in volume order with the volume's geometry, found from headers alone.

    Attributes
    ----------
    slices
        One per slice, sorted along the slice normal (index ``z`` of the volume).
    shape
        (z, y, x): slices, rows, columns.
    spacing_mm
        (z, y, x), mm: the mean distance between slices along the normal, then Pixel Spacing
        (between rows, between columns).
    origin_mm
        LPS (x, y, z) centre of voxel ``[0, 0, 0]`` (the first slice's Image Position), mm.
    row_direction, column_direction, normal
        Unit LPS vectors along which the x (column) index, the y (row) index and the z (slice)
        index increase.
    slice_step_mm
        LPS vector from one slice's position to the next (the mean); equal to
        ``spacing_mm[0] * normal`` unless there is a gantry tilt below the tolerance.
    gantry_tilt_deg
        Measured angle between ``normal`` and the line of slice positions, degrees.
    slice_thickness_mm
        The median Slice Thickness, ``None`` if no image has one.
    study_instance_uid, series_instance_uid, sop_class_uid, frame_of_reference_uid
        Of the series.
    """

    slices: tuple[SliceSource, ...]
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    normal: tuple[float, float, float]
    slice_step_mm: tuple[float, float, float]
    gantry_tilt_deg: float
    slice_thickness_mm: float | None
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    frame_of_reference_uid: str

    @property
    def exact_int16(self) -> bool:
        """Every slice's HU are whole numbers: slope 1 and an integral intercept."""
        return all(
            s.rescale_slope == 1.0 and float(s.rescale_intercept).is_integer() for s in self.slices
        )

    @property
    def nbytes_float32(self) -> int:
        """Bytes of the volume as float32 (the most :func:`load_volume` allocates)."""
        z, y, x = self.shape
        return z * y * x * 4


@dataclass(frozen=True, eq=False, kw_only=True)
class CTVolume:
    """One CT series as a volume of Hounsfield units, with what is needed to map it back.

    Attributes
    ----------
    hu : numpy.ndarray, shape (z, y, x)
        Hounsfield units, read-only. ``int16`` when every slice's rescale slope is 1 and its
        intercept a whole number (the HU are then exact integers; values beyond the int16
        range, more than 32767 HU, are clipped to it), ``float32`` otherwise or when
        ``hu_dtype="float32"`` was asked for.
    spacing_mm
        (z, y, x) voxel spacing, mm: between slices along the normal, between rows, between
        columns.
    origin_mm
        LPS (x, y, z) centre of voxel ``[0, 0, 0]``, the first slice's Image Position, mm.
    direction : numpy.ndarray, shape (3, 3)
        Columns are the unit LPS directions of the x (column), y (row) and z (slice) index
        axes: the row direction cosines, the column direction cosines and the slice normal.
        The same convention as SimpleITK's ``GetDirection()`` reshaped to (3, 3) and as
        :func:`dicom_node.analysis.lesions.find_lesions`.
    affine : numpy.ndarray, shape (4, 4)
        LPS mm of voxel ``(i, j, k)`` = ``affine @ (i, j, k, 1)`` with ``i`` the column (x),
        ``j`` the row (y) and ``k`` the slice (z) index. Its third column is the measured step
        between slices (see :attr:`VolumePlan.slice_step_mm`).
    slice_positions_mm : numpy.ndarray, shape (z, 3)
        Each slice's Image Position (Patient), LPS mm, as in its header.
    sop_instance_uids, frame_numbers, source_paths
        Per slice, in volume order: the source image, its 1-based frame number (1 for
        single-frame images) and its file; what a SEG references.
    sop_class_uid
        The source images' SOP class (CT or Enhanced CT Image Storage).
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        Of the source series.
    slice_thickness_mm
        Median Slice Thickness, ``None`` if absent.
    """

    hu: npt.NDArray[np.float32] | npt.NDArray[np.int16]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: npt.NDArray[np.float64]
    affine: npt.NDArray[np.float64]
    slice_positions_mm: npt.NDArray[np.float64]
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int, ...]
    source_paths: tuple[Path, ...] = field(repr=False)
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    slice_thickness_mm: float | None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) in voxels."""
        z, y, x = self.hu.shape
        return (z, y, x)

    @property
    def step_direction(self) -> npt.NDArray[np.float64]:
        """(3, 3) like :attr:`direction`, but its third column is the measured step between
        slices over the slice spacing: ``origin + step_direction @ (x * sx, y * sy, z * sz)``
        is :meth:`index_to_lps` exactly, also for a gantry tilt within tolerance (where the
        step is not along the normal). What :func:`~dicom_node.analysis.lesions.find_lesions`
        places lesions with."""
        sz, sy, sx = self.spacing_mm
        out: npt.NDArray[np.float64] = self.affine[:3, :3] / np.array([sx, sy, sz])
        return out

    @property
    def in_plane_swapped(self) -> bool:
        """The image's columns run along the patient's front-back axis and its rows across
        (a decubitus position, the patient on one side): the model, trained with x across and
        y front to back, reads the slices transposed (:meth:`to_model_order`)."""
        direction = self.direction
        return bool(abs(direction[1, 0]) > abs(direction[0, 0]))

    @property
    def axes_against_lps(self) -> tuple[int, ...]:
        """Index axes (0 z, 1 y, 2 x) of the volume in the model's order (transposed in plane
        when :attr:`in_plane_swapped`) that run against the LPS axis they follow: flipping them
        gives the orientation the model was trained on (x towards the patient's left, y towards
        the back, z towards the head), whatever the patient position (prone, feet first, on
        one side)."""
        direction = self.direction
        if self.in_plane_swapped:
            y_sign, x_sign = direction[1, 0], direction[0, 1]
        else:
            y_sign, x_sign = direction[1, 1], direction[0, 0]
        return tuple(
            axis for axis, sign in ((0, direction[2, 2]), (1, y_sign), (2, x_sign)) if sign < 0
        )

    @property
    def model_spacing_mm(self) -> tuple[float, float, float]:
        """:attr:`spacing_mm` in the model's order (y and x swapped with the slices)."""
        z, y, x = self.spacing_mm
        return (z, x, y) if self.in_plane_swapped else (z, y, x)

    def to_model_order(self, array: _Array) -> _Array:
        """A (z, y, x) array of this volume (its HU, a mask) in the orientation the model was
        trained on (a view where it can be: transposed in plane, then flipped)."""
        view = np.swapaxes(array, 1, 2) if self.in_plane_swapped else array
        flips = self.axes_against_lps
        return cast(_Array, np.flip(view, flips) if flips else view)

    def model_index_to_lps(self, index_zyx: tuple[float, float, float]) -> tuple[float, ...]:
        """LPS (x, y, z) of an index (z, y, x) into :meth:`to_model_order`'s array."""
        z, y, x = index_zyx
        depth, rows, columns = self.shape
        model_shape = (depth, columns, rows) if self.in_plane_swapped else (depth, rows, columns)
        flips = self.axes_against_lps
        z = model_shape[0] - 1 - z if 0 in flips else z
        y = model_shape[1] - 1 - y if 1 in flips else y
        x = model_shape[2] - 1 - x if 2 in flips else x
        own = (z, x, y) if self.in_plane_swapped else (z, y, x)  # the model's y is the x here
        return tuple(float(v) for v in self.index_to_lps(list(own)))

    def model_origin_lps(self) -> tuple[float, float, float]:
        """LPS of the first voxel of :meth:`to_model_order`'s array."""
        lx, ly, lz = self.model_index_to_lps((0.0, 0.0, 0.0))
        return (lx, ly, lz)

    def index_to_lps(self, index_zyx: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Patient coordinates of voxel indices.

        Parameters
        ----------
        index_zyx : array_like, shape (..., 3)
            Voxel indices (z, y, x), integer or fractional (0 is the centre of the first voxel).

        Returns
        -------
        numpy.ndarray, shape (..., 3)
            LPS (x, y, z), mm.

        Raises
        ------
        ValueError
            If the last axis is not of length 3.
        """
        idx = np.asarray(index_zyx, dtype=np.float64)
        if idx.shape[-1:] != (3,):
            raise ValueError(f"indices must have shape (..., 3) in (z, y, x), not {idx.shape}")
        ijk = idx[..., ::-1]
        out: npt.NDArray[np.float64] = ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
        return out

    def lps_to_index(self, points_lps: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Fractional voxel indices (z, y, x) of LPS points; the inverse of :meth:`index_to_lps`.

        Parameters
        ----------
        points_lps : array_like, shape (..., 3)
            LPS (x, y, z), mm.

        Returns
        -------
        numpy.ndarray, shape (..., 3)
            Voxel indices (z, y, x), not rounded and not bounded to the volume.

        Raises
        ------
        ValueError
            If the last axis is not of length 3.
        """
        pts = np.asarray(points_lps, dtype=np.float64)
        if pts.shape[-1:] != (3,):
            raise ValueError(f"points must have shape (..., 3) in (x, y, z), not {pts.shape}")
        inverse = np.linalg.inv(self.affine)
        ijk = (pts - self.affine[:3, 3]) @ inverse[:3, :3].T
        out: npt.NDArray[np.float64] = ijk[..., ::-1]
        return out


# --------------------------------------------------------------------------------------------
# The plan: geometry from headers alone


def plan_volume(
    instances: Sequence[InstanceHeader], *, settings: VolumeGeometrySettings
) -> VolumePlan:
    """Check one series' geometry from its headers and lay its slices out as a volume.

    Parameters
    ----------
    instances
        Header summaries of the series' images, in any order; single-frame images, Enhanced CT
        multi-frame images, or both.
    settings
        The ``selection.geometry`` section of the configuration.

    Returns
    -------
    VolumePlan
        Slices sorted along the normal and the volume's geometry.

    Raises
    ------
    VolumeGeometryError
        No image; images of several series, SOP classes or frames of reference; a frame
        without position,
        orientation or pixel spacing; mixed orientations, image sizes or pixel spacings; a
        duplicate position, a missing slice or uneven spacing; gantry tilt; slice positions
        off one line; a single slice without a Slice Thickness.
    VolumeDecodeError
        A transfer syntax without a decoder here, or images that are not one sample per pixel.
    """
    images = [i for i in instances if i.frames]
    if not images:
        raise VolumeGeometryError("no image to make a volume from")
    _check_same(images, "series_instance_uid", "series")
    _check_same(images, "sop_class_uid", "SOP classes")
    _check_same(images, "frame_of_reference_uid", "frames of reference")
    _check_decodable(images)
    rows, columns = images[0].rows, images[0].columns
    for inst in images:
        if (inst.rows, inst.columns) != (rows, columns):
            raise VolumeGeometryError(
                f"mixed image sizes: {rows}x{columns} and {inst.rows}x{inst.columns} pixels"
            )

    frames = [(inst, index, frame) for inst in images for index, frame in enumerate(inst.frames)]
    row_dir, col_dir, normal = _orientation_of(frames, settings=settings)
    pixel_spacing = _pixel_spacing_of(frames)

    positions = np.array([_position(inst, i, f) for inst, i, f in frames], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    frames = [frames[i] for i in order]
    thicknesses = [f.slice_thickness_mm for _, _, f in frames if f.slice_thickness_mm]
    thickness = float(np.median(thicknesses)) if thicknesses else None

    if len(frames) == 1:
        if thickness is None:
            raise VolumeGeometryError(
                "a single slice without Slice Thickness: its spacing along the normal is unknown"
            )
        spacing_z, step, tilt = thickness, thickness * normal, 0.0
    else:
        _check_acquisitions(frames, along)
        spacing_z = _check_spacing(along, settings=settings)
        step, tilt = _check_tilt(positions, along, normal, pixel_spacing, settings=settings)

    slices = tuple(
        SliceSource(
            path=inst.path,
            frame_index=index,
            sop_instance_uid=inst.sop_instance_uid,
            frame_number=index + 1,
            position_mm=_tuple3(positions[k]),
            rescale_slope=_rescale(inst, index, frame.rescale_slope, "Slope"),
            rescale_intercept=_rescale(inst, index, frame.rescale_intercept, "Intercept"),
            transfer_syntax_uid=inst.transfer_syntax_uid,
            pixel_padding=inst.pixel_padding,
        )
        for k, (inst, index, frame) in enumerate(frames)
    )
    first = images[0]
    return VolumePlan(
        slices=slices,
        shape=(len(slices), rows, columns),
        spacing_mm=(spacing_z, pixel_spacing[0], pixel_spacing[1]),
        origin_mm=_tuple3(positions[0]),
        row_direction=_tuple3(row_dir),
        column_direction=_tuple3(col_dir),
        normal=_tuple3(normal),
        slice_step_mm=_tuple3(step),
        gantry_tilt_deg=tilt,
        slice_thickness_mm=thickness,
        study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid,
        sop_class_uid=first.sop_class_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
    )


def _check_acquisitions(
    frames: Sequence[tuple[InstanceHeader, int, FrameHeader]], along: npt.NDArray[np.float64]
) -> None:
    """Refuse a series in which acquisitions (Acquisition Number) overlap along the normal:
    two scans, of two contrast phases or breath-holds, filed as one series and interleaved
    (their slices half a step apart pass every spacing check). Acquisitions one after the
    other along the patient (a long scan in parts) are one volume."""
    extent: dict[int, tuple[float, float, int]] = {}
    for (inst, _, _), z in zip(frames, along.tolist(), strict=True):
        if inst.acquisition_number is None:
            continue
        low, high, count = extent.get(inst.acquisition_number, (z, z, 0))
        extent[inst.acquisition_number] = (min(low, z), max(high, z), count + 1)
    ranges = sorted(extent.items(), key=lambda item: item[1][0])
    for (first, (_, first_high, first_n)), (second, (second_low, _, second_n)) in pairwise(ranges):
        if second_low < first_high:
            raise VolumeGeometryError(
                f"mixed acquisitions: acquisitions {first} and {second} ({first_n} and"
                f" {second_n} slices) overlap along the slice normal: two scans filed as one"
                " series"
            )


def _check_same(images: Sequence[InstanceHeader], attribute: str, what: str) -> None:
    values = sorted({str(getattr(i, attribute)) for i in images})
    if len(values) > 1:
        raise VolumeGeometryError(f"images of {len(values)} {what} in one volume")


def _check_decodable(images: Sequence[InstanceHeader]) -> None:
    for inst in images:
        if inst.transfer_syntax_uid not in DECODABLE_TRANSFER_SYNTAXES:
            raise VolumeDecodeError(
                f"transfer syntax {UID(inst.transfer_syntax_uid).name} cannot be decoded"
            )
        if inst.samples_per_pixel != 1:
            raise VolumeDecodeError(
                f"{inst.samples_per_pixel} samples per pixel: not a grayscale image"
            )


def _where(inst: InstanceHeader, index: int) -> str:
    """An image named without patient data: its instance number (and frame)."""
    number = f"image {inst.instance_number}" if inst.instance_number is not None else "an image"
    return f"{number} frame {index + 1}" if inst.number_of_frames > 1 else number


_Array = TypeVar("_Array", bound="np.ndarray[Any, Any]")


def reverse_axes(array: _Array, axes: Sequence[int]) -> _Array:
    """A C-ordered copy of ``array`` with ``axes`` reversed (``array`` itself when there are
    none): a volume (or its masks, or the model's map of it) brought to or from the order of
    :attr:`CTVolume.axes_against_lps`."""
    if not axes:
        return array
    back = tuple(slice(None, None, -1) if a in axes else slice(None) for a in range(array.ndim))
    return cast(_Array, array[back].copy(order="C"))


def _rescale(inst: InstanceHeader, index: int, value: float | None, which: str) -> float:
    """Rescale Slope or Intercept. Required (Type 1) in CT: without it the stored values are
    not Hounsfield units, and guessing 1 or 0 can shift a slice by 1024 HU. Images of other
    modalities without one (MR) keep their stored values."""
    if value is None and inst.modality != "CT":
        return 1.0 if which == "Slope" else 0.0
    if value is None or (which == "Slope" and value == 0.0):
        raise VolumeDecodeError(f"{_where(inst, index)} has no valid Rescale {which}")
    return value


def _position(inst: InstanceHeader, index: int, frame: FrameHeader) -> tuple[float, float, float]:
    if frame.position_mm is None:
        raise VolumeGeometryError(f"{_where(inst, index)} has no Image Position (Patient)")
    return frame.position_mm


def _unit_vectors(
    inst: InstanceHeader, index: int, frame: FrameHeader
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    if frame.orientation is None:
        raise VolumeGeometryError(f"{_where(inst, index)} has no Image Orientation (Patient)")
    row = np.asarray(frame.orientation[:3], dtype=np.float64)
    col = np.asarray(frame.orientation[3:], dtype=np.float64)
    if (
        abs(float(np.linalg.norm(row)) - 1.0) > _UNIT_TOLERANCE
        or abs(float(np.linalg.norm(col)) - 1.0) > _UNIT_TOLERANCE
        or abs(float(row @ col)) > _UNIT_TOLERANCE
    ):
        raise VolumeGeometryError(
            f"{_where(inst, index)} has an Image Orientation (Patient) that is not two "
            "orthogonal unit vectors"
        )
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _angle_deg(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    cosine = float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b))
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def _orientation_of(
    frames: Sequence[tuple[InstanceHeader, int, FrameHeader]], *, settings: VolumeGeometrySettings
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The series' row, column and normal unit vectors; refuse mixed orientations."""
    row, col = _unit_vectors(*frames[0])
    limit = settings.max_orientation_difference_deg
    differing = 0
    worst = 0.0
    for inst, index, frame in frames[1:]:
        r, c = _unit_vectors(inst, index, frame)
        angle = max(_angle_deg(r, row), _angle_deg(c, col))
        if angle > limit:
            differing += 1
            worst = max(worst, angle)
    if differing:
        raise VolumeGeometryError(
            f"mixed orientations: {differing} of {len(frames)} images differ from the first "
            f"by up to {_deg(worst)} (more than {_deg(limit)})"
        )
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _pixel_spacing_of(
    frames: Sequence[tuple[InstanceHeader, int, FrameHeader]],
) -> tuple[float, float]:
    inst0, index0, frame0 = frames[0]
    if frame0.pixel_spacing_mm is None:
        raise VolumeGeometryError(f"{_where(inst0, index0)} has no Pixel Spacing")
    ref = frame0.pixel_spacing_mm
    for inst, index, frame in frames[1:]:
        spacing = frame.pixel_spacing_mm
        if spacing is None:
            raise VolumeGeometryError(f"{_where(inst, index)} has no Pixel Spacing")
        if any(
            abs(a - b) > _PIXEL_SPACING_TOLERANCE * b for a, b in zip(spacing, ref, strict=True)
        ):
            raise VolumeGeometryError(
                f"mixed pixel spacings: {_mm(ref[0])} x {_mm(ref[1])} mm and "
                f"{_mm(spacing[0])} x {_mm(spacing[1])} mm"
            )
    return ref


def _check_spacing(along: npt.NDArray[np.float64], *, settings: VolumeGeometrySettings) -> float:
    """Refuse duplicates, gaps and uneven steps; return the mean step along the normal, mm."""
    steps = np.diff(along)
    nominal = float(np.median(steps))
    tolerance = settings.spacing_tolerance * nominal
    problems: list[str] = []
    if nominal <= _SAME_POSITION_MM:
        # most slices share a position: two stacks (phases, acquisitions) in one series
        raise VolumeGeometryError(
            f"duplicate slice positions: {int(np.sum(steps <= _SAME_POSITION_MM))} of "
            f"{len(steps) + 1} slices lie where another does"
        )
    for k, step in enumerate(steps.tolist()):
        if abs(step - nominal) <= tolerance:
            continue
        here = f"z={_mm(float(along[k]))} mm"
        multiple = round(step / nominal)
        if step < tolerance:
            problems.append(f"duplicate slice position at {here}")
        elif multiple >= 2 and abs(step - multiple * nominal) <= tolerance:
            missing = "missing slice" if multiple == 2 else f"{multiple - 1} missing slices"
            problems.append(
                f"{missing}: gap of {_mm(step)} mm at {here}, expected {_mm(nominal)} mm"
            )
        else:
            problems.append(
                f"uneven spacing: step of {_mm(step)} mm at {here}, expected {_mm(nominal)} mm"
            )
    if problems:
        shown = "; ".join(problems[:_SHOWN_PROBLEMS])
        more = len(problems) - _SHOWN_PROBLEMS
        raise VolumeGeometryError(shown + (f" (and {more} more)" if more > 0 else ""))
    mean = float(along[-1] - along[0]) / (len(along) - 1)
    # Steps each within the tolerance may still add up (0.95 mm, then 1.04 mm): the volume's
    # even grid must stay within half a slice of every slice's own position.
    drift = np.abs(along - (along[0] + mean * np.arange(len(along))))
    worst = int(np.argmax(drift))
    if drift[worst] > 0.5 * nominal:
        raise VolumeGeometryError(
            f"uneven spacing: slice positions drift up to {_mm(float(drift[worst]))} mm from an"
            f" even {_mm(mean)} mm grid (at z={_mm(float(along[worst]))} mm)"
        )
    return mean


def _check_tilt(
    positions: npt.NDArray[np.float64],
    along: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
    pixel_spacing: tuple[float, float],
    *,
    settings: VolumeGeometrySettings,
) -> tuple[npt.NDArray[np.float64], float]:
    """Measure gantry tilt and check the positions lie on one line; return (step, tilt °)."""
    span = positions[-1] - positions[0]
    extent = float(along[-1] - along[0])
    drift = span - extent * normal
    tilt = math.degrees(math.atan2(float(np.linalg.norm(drift)), extent))
    if tilt > settings.max_gantry_tilt_deg:
        raise VolumeGeometryError(
            f"gantry tilt: slice positions run {_deg(tilt)} off the slice normal (more than "
            f"{_deg(settings.max_gantry_tilt_deg)}); correcting it needs resampling, which is "
            "not done"
        )
    expected = positions[0] + np.outer((along - along[0]) / extent, span)
    off = np.linalg.norm(positions - expected, axis=1)
    limit = _IN_PLANE_TOLERANCE_PIXELS * min(pixel_spacing)
    worst = int(np.argmax(off))
    if off[worst] > limit:
        raise VolumeGeometryError(
            f"slice positions are not on one line: the slice at z={_mm(float(along[worst]))} mm "
            f"is {_mm(float(off[worst]))} mm off it (more than half a pixel)"
        )
    return span / (len(positions) - 1), tilt


def _tuple3(v: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _mm(value: float) -> str:
    """A length for a message: at most 3 decimals, at least one (5.0, 0.625, -120.5)."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _deg(value: float) -> str:
    return f"{value:.1f}°"


# --------------------------------------------------------------------------------------------
# Decoding


def load_volume(plan: VolumePlan, *, hu_dtype: HUDtype = "auto") -> CTVolume:
    """Decode a planned series into one (z, y, x) HU array.

    The array is allocated once; each file is opened once, its frames decoded one at a time
    and rescaled straight into their slices (``hu = stored * slope + intercept``, per slice).

    Parameters
    ----------
    plan
        From :func:`plan_volume`.
    hu_dtype
        ``"auto"``: ``int16`` when every slice's HU are exact integers (slope 1, integral
        intercept), else ``float32``; ``"float32"``: always ``float32``.

    Returns
    -------
    CTVolume
        The volume, read-only.

    Raises
    ------
    VolumeDecodeError
        A file cannot be read or decoded, or holds frames of another size or number than its
        header said.
    """
    started = time.perf_counter()
    as_int16 = hu_dtype == "auto" and plan.exact_int16
    hu: npt.NDArray[np.float32] | npt.NDArray[np.int16]
    hu = np.empty(plan.shape, dtype=np.int16) if as_int16 else np.empty(plan.shape, np.float32)
    for path, targets in _by_file(plan.slices).items():
        _decode_file(path, targets, hu, frame_shape=plan.shape[1:], as_int16=as_int16)
    hu.flags.writeable = False

    direction = np.column_stack([plan.row_direction, plan.column_direction, plan.normal])
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(plan.row_direction) * plan.spacing_mm[2]
    affine[:3, 1] = np.asarray(plan.column_direction) * plan.spacing_mm[1]
    affine[:3, 2] = plan.slice_step_mm
    affine[:3, 3] = plan.origin_mm
    volume = CTVolume(
        hu=hu,
        spacing_mm=plan.spacing_mm,
        origin_mm=plan.origin_mm,
        direction=direction,
        affine=affine,
        slice_positions_mm=np.array([s.position_mm for s in plan.slices], dtype=np.float64),
        sop_instance_uids=tuple(s.sop_instance_uid for s in plan.slices),
        frame_numbers=tuple(s.frame_number for s in plan.slices),
        source_paths=tuple(s.path for s in plan.slices),
        sop_class_uid=plan.sop_class_uid,
        study_instance_uid=plan.study_instance_uid,
        series_instance_uid=plan.series_instance_uid,
        frame_of_reference_uid=plan.frame_of_reference_uid,
        slice_thickness_mm=plan.slice_thickness_mm,
    )
    logger.info(
        "decoded a volume of %d x %d x %d (%s, %.1f MB) in %.2f s",
        *plan.shape,
        hu.dtype.name,
        hu.nbytes / 1e6,
        time.perf_counter() - started,
    )
    return volume


def read_volume(
    paths: Iterable[str | Path],
    *,
    settings: VolumeGeometrySettings,
    hu_dtype: HUDtype = "auto",
) -> CTVolume:
    """Read headers, plan and decode one series' files: :func:`plan_volume` + :func:`load_volume`.

    Raises
    ------
    DatasetError
        A header cannot be read.
    VolumeGeometryError, VolumeDecodeError
        As :func:`plan_volume` and :func:`load_volume`.
    """
    return load_volume(plan_volume(read_headers(paths), settings=settings), hu_dtype=hu_dtype)


def _by_file(slices: Sequence[SliceSource]) -> dict[Path, list[tuple[int, SliceSource]]]:
    """Slices grouped by file, files in the order of their first slice."""
    groups: dict[Path, list[tuple[int, SliceSource]]] = {}
    for k, source in enumerate(slices):
        groups.setdefault(source.path, []).append((k, source))
    return groups


def _decode_file(
    path: Path,
    targets: Sequence[tuple[int, SliceSource]],
    out: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    *,
    frame_shape: tuple[int, int],
    as_int16: bool,
) -> None:
    """Decode every frame of one file into its slice of ``out``."""
    syntax = targets[0][1].transfer_syntax_uid
    by_frame = {source.frame_index: (k, source) for k, source in targets}
    seen = 0
    try:
        for index, frame in enumerate(_frames(path, syntax)):
            if index not in by_frame:
                continue
            _check_shape(frame, frame_shape, path=path, index=index)
            k, source = by_frame[index]
            _rescale_into(frame, out[k], source, as_int16=as_int16)
            seen += 1
    except VolumeDecodeError:
        raise
    except Exception as exc:
        raise VolumeDecodeError(
            f"{path.name}: cannot decode its {UID(syntax).name} pixel data "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if seen != len(by_frame):
        raise VolumeDecodeError(
            f"{path.name}: holds {seen} of the {len(by_frame)} frames its header announced"
        )


def _check_shape(
    frame: npt.NDArray[np.generic], frame_shape: tuple[int, int], *, path: Path, index: int
) -> None:
    if frame.shape != frame_shape:
        raise VolumeDecodeError(
            f"{path.name}: frame {index + 1} is {frame.shape}, the header says {frame_shape}"
        )


def _frames(path: Path, syntax: str) -> Iterator[npt.NDArray[np.generic]]:
    """Decoded frames of one file, one at a time, in file order (stored values, not HU)."""
    plugin = DECODING_PLUGINS[syntax]
    if syntax == DeflatedExplicitVRLittleEndian:
        # Reading straight from the file cannot inflate; the whole dataset is read, decoded and
        # dropped here (deflate is rare for images: it compresses pixels poorly).
        ds = pydicom.dcmread(path)
        yield from iter_pixels(ds)
        del ds
        return
    yield from iter_pixels(path, decoding_plugin=plugin)


def _rescale_into(
    frame: npt.NDArray[np.generic],
    dest: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    source: SliceSource,
    *,
    as_int16: bool,
) -> None:
    """``dest = frame * slope + intercept`` with one frame-sized temporary at most (and a
    mask of the padding, for an image that has it)."""
    if frame.dtype.kind not in "iu":
        raise VolumeDecodeError(f"{source.path.name}: pixel data of type {frame.dtype} is not CT")
    padding = None
    if source.pixel_padding is not None:
        low_pad, high_pad = source.pixel_padding
        stored = cast("npt.NDArray[np.integer]", frame)
        padding = (stored >= low_pad) & (stored <= high_pad)
    _stored_to_hu(frame, dest, source, as_int16=as_int16)
    if padding is not None:
        dest[padding] = PADDING_HU


def _stored_to_hu(
    frame: npt.NDArray[np.generic],
    dest: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    source: SliceSource,
    *,
    as_int16: bool,
) -> None:
    if as_int16:
        intercept = round(source.rescale_intercept)
        low, high = int(frame.min()), int(frame.max())
        if low + intercept >= _INT16_MIN and high + intercept <= _INT16_MAX and high <= _INT16_MAX:
            # the usual case: every value fits, add straight into the slice
            np.add(frame, intercept, out=dest, dtype=np.int16, casting="unsafe")
        else:
            wide = np.add(frame, np.int32(intercept), dtype=np.int32)
            np.clip(wide, _INT16_MIN, _INT16_MAX, out=wide)
            dest[...] = wide
        return
    if source.rescale_slope == 1.0:
        dest[...] = frame
    else:
        np.multiply(frame, np.float32(source.rescale_slope), out=dest, dtype=np.float32)
    if source.rescale_intercept != 0.0:
        dest += np.float32(source.rescale_intercept)
