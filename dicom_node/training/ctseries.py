"""Write a HU volume as a DICOM CT series: the project's own synthetic-CT writer.

Three objects are made here, all from a volume of Hounsfield units indexed (z, y, x):

* :func:`write_ct_series`: one CT Image Storage file per slice, in any of the four uncompressed
  transfer syntaxes pydicom can encode (explicit and implicit VR little endian, explicit VR big
  endian, deflated explicit VR little endian). Positions may be given per slice, to make gaps,
  duplicates and uneven spacing on purpose, and a gantry tilt shears the slice positions the way a
  tilted gantry does.
* :func:`write_localizer`: a one-image coronal scout (ImageType ORIGINAL\\PRIMARY\\LOCALIZER), so
  that a study can hold a localizer beside thick and thin axial series.
* :func:`write_enhanced_ct`: one Enhanced CT Image Storage multi-frame file.

Geometry follows DICOM: positions and orientations are in the patient coordinate system (LPS, mm).
``origin_mm`` is the centre of the first voxel ``volume_hu[0, 0, 0]``, as (x, y, z); slice ``k``
lies at ``origin_mm + position_k * normal`` where ``normal`` is the cross product of the row and
column directions of ``image_orientation`` (for the default axial orientation, ``+z``).

The series writer builds the header of a series once and copies it for every slice, so that 200
slices of 512 x 512 are written in well under a second plus the time the disk takes.

Every file made here passes ``dciodvfy`` with no errors; the warnings that remain are listed in
``tests/training/test_ctseries.py``.
"""

from __future__ import annotations

import datetime
import enum
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "AXIAL_ORIENTATION",
    "CORONAL_ORIENTATION",
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "PatientSex",
    "SeriesSpec",
    "StudyIdentity",
    "ct_slice_dataset",
    "derived_uid",
    "slice_positions_mm",
    "write_ct_series",
    "write_enhanced_ct",
    "write_localizer",
]

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.2.1")

#: Transfer syntaxes the writers can encode themselves (compressed ones are made with dcmtk/gdcm).
SUPPORTED_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)

#: Row direction +x (patient left), column direction +y (posterior): axial, seen from the feet.
AXIAL_ORIENTATION: Final[tuple[float, float, float, float, float, float]] = (
    1.0,
    0.0,
    0.0,
    0.0,
    1.0,
    0.0,
)
#: Row direction +x, column direction -z (head to feet): a coronal image seen from the front.
CORONAL_ORIENTATION: Final[tuple[float, float, float, float, float, float]] = (
    1.0,
    0.0,
    0.0,
    0.0,
    0.0,
    -1.0,
)

# Salt for UIDs derived from a seed, so that they cannot collide with UIDs derived elsewhere.
_UID_SALT: Final = "dicom-node.training.ctseries"
_DA: Final = "%Y%m%d"
_TM: Final = "%H%M%S"
_UI_PATTERN: Final = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_CHEST_CODE: Final = ("51185008", "SCT", "Chest")

_FIRST_NAMES: Final = (
    "ANNA",
    "BERND",
    "CHIARA",
    "DMITRI",
    "EMMA",
    "FATIMA",
    "GEORG",
    "HANNA",
    "IVAN",
    "JULIA",
    "KENJI",
    "LEA",
    "MARTA",
    "NIKO",
    "OLGA",
    "PAUL",
)
_LAST_NAMES: Final = (
    "PHANTOM",
    "MUSTER",
    "ROSSI",
    "DUPONT",
    "NOWAK",
    "SILVA",
    "JANSEN",
    "BERG",
    "KOVAC",
    "MORENO",
    "TANAKA",
    "WALKER",
)


class PatientSex(enum.StrEnum):
    """Patient's Sex (0010,0040): the enumerated values of PS3.3 C.7.1.1."""

    MALE = "M"
    FEMALE = "F"
    OTHER = "O"


def _check_uid(value: str, what: str) -> None:
    if len(value) > 64 or not _UI_PATTERN.match(value):
        raise ValueError(f"{what} is not a valid DICOM UID: {value!r}")


def _check_length(value: str, limit: int, what: str) -> None:
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters: {len(value)}")


def derived_uid(*parts: object) -> UID:
    """A UID that depends only on ``parts``: the same parts always give the same UID.

    Hashed under pydicom's UID root, never the node's own root, so that synthetic inputs are
    never mistaken for the node's output.
    """
    return generate_uid(entropy_srcs=[_UID_SALT, *(str(p) for p in parts)])


def _ds(value: float) -> str:
    """A float formatted as a valid DS string (at most 16 characters)."""
    text = format_number_as_ds(float(value))
    assert text is not None
    return text


@dataclass(frozen=True)
class StudyIdentity:
    """Who and which study a synthetic series belongs to: Patient and General Study modules.

    Dates and times are Python values; they are written as DA and TM. Names are DICOM person
    names (``FAMILY^GIVEN``), encoded with ``specific_character_set`` (for instance
    ``"ISO_IR 192"`` for UTF-8, so that any Unicode name is stored byte-exact).

    Raises
    ------
    ValueError
        If a UID is malformed, a value is too long for its VR, the character set is unknown or a
        name cannot be encoded in it.
    """

    patient_name: str = "PHANTOM^SYNTHETIC"
    patient_id: str = "PHANTOM0001"
    patient_birth_date: datetime.date | None = None
    patient_sex: PatientSex | None = PatientSex.OTHER
    study_instance_uid: str = field(default_factory=lambda: str(generate_uid()))
    study_date: datetime.date = datetime.date(2024, 1, 1)
    study_time: datetime.time = datetime.time(12, 0, 0)
    accession_number: str = ""
    study_id: str = "1"
    study_description: str = "CT CHEST"
    referring_physician_name: str = ""
    specific_character_set: str = "ISO_IR 100"

    def __post_init__(self) -> None:
        _check_uid(self.study_instance_uid, "study_instance_uid")
        encoding = python_encoding.get(self.specific_character_set)
        if encoding is None:
            raise ValueError(
                f"specific_character_set {self.specific_character_set!r} is not a single-byte "
                "or UTF-8 character set pydicom knows (e.g. 'ISO_IR 100', 'ISO_IR 192')"
            )
        for what, value, limit in (
            ("patient_name", self.patient_name, 64 * 3 + 2),
            ("referring_physician_name", self.referring_physician_name, 64 * 3 + 2),
            ("patient_id", self.patient_id, 64),
            ("study_description", self.study_description, 64),
            ("accession_number", self.accession_number, 16),
            ("study_id", self.study_id, 16),
        ):
            _check_length(value, limit, what)
            try:
                value.encode(encoding)
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"{what} cannot be encoded with {self.specific_character_set!r}; "
                    "use 'ISO_IR 192' (UTF-8) for names outside that repertoire"
                ) from exc

    @classmethod
    def random(cls, rng: np.random.Generator | int, **overrides: Any) -> StudyIdentity:
        """A plausible, entirely invented identity, drawn from ``rng`` (a Generator or a seed).

        The same seed gives the same identity, UIDs included. ``overrides`` replace fields by
        name (for instance ``specific_character_set="ISO_IR 192"``).
        """
        gen = np.random.default_rng(rng) if isinstance(rng, int) else rng
        token = int(gen.integers(0, 2**62))
        birth = datetime.date(1930, 1, 1) + datetime.timedelta(days=int(gen.integers(0, 365 * 70)))
        study_day = datetime.date(2015, 1, 1) + datetime.timedelta(
            days=int(gen.integers(0, 365 * 10))
        )
        identity = cls(
            patient_name=f"{gen.choice(_LAST_NAMES)}^{gen.choice(_FIRST_NAMES)}",
            patient_id=f"PH{int(gen.integers(0, 10**8)):08d}",
            patient_birth_date=birth,
            patient_sex=[PatientSex.MALE, PatientSex.FEMALE][int(gen.integers(0, 2))],
            study_instance_uid=str(derived_uid("study", token)),
            study_date=study_day,
            study_time=datetime.time(
                int(gen.integers(7, 19)), int(gen.integers(0, 60)), int(gen.integers(0, 60))
            ),
            accession_number=f"A{int(gen.integers(0, 10**9)):09d}",
            study_id=str(int(gen.integers(1, 10**6))),
            study_description="CT CHEST",
            referring_physician_name=f"{gen.choice(_LAST_NAMES)}^{gen.choice(_FIRST_NAMES)}",
        )
        return replace(identity, **overrides) if overrides else identity


@dataclass(frozen=True)
class SeriesSpec:
    """What one synthetic series says about itself: General Series, Frame of Reference,
    General Equipment and the acquisition attributes of the CT Image module.

    Parameters
    ----------
    series_instance_uid, frame_of_reference_uid
        Fresh random UIDs by default; give series of one study the same frame of reference.
    image_type
        Image Type (0008,0008), e.g. ``("ORIGINAL", "PRIMARY", "AXIAL")``.
    convolution_kernel
        Convolution Kernel (0018,1210), the scanner's name for the reconstruction kernel.
    kvp
        Peak kilovoltage, kV.
    slice_thickness
        Nominal reconstructed slice thickness in mm; ``None`` means the slice spacing.
    image_orientation
        Image Orientation (Patient): row then column direction cosines, LPS.
    window
        Default VOI window (centre, width) in HU.

    Raises
    ------
    ValueError
        If a UID is malformed or the orientation is not two orthogonal unit vectors.
    """

    series_instance_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_number: int = 1
    series_description: str = "CHEST"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    frame_of_reference_uid: str = field(default_factory=lambda: str(generate_uid()))
    body_part_examined: str = "CHEST"
    convolution_kernel: str = "B30f"
    kvp: float = 120.0
    slice_thickness: float | None = None
    image_orientation: tuple[float, float, float, float, float, float] = AXIAL_ORIENTATION
    patient_position: str = "HFS"
    manufacturer: str = "SYNTHETIC"
    manufacturer_model_name: str = "Phantom CT"
    device_serial_number: str = "0001"
    software_versions: str = "phantom-1"
    institution_name: str = "Synthetic Imaging Site"
    station_name: str = "PHANTOM01"
    acquisition_number: int = 1
    x_ray_tube_current_ma: int = 200
    exposure_time_ms: int = 500
    window: tuple[float, float] = (-600.0, 1500.0)

    def __post_init__(self) -> None:
        _check_uid(self.series_instance_uid, "series_instance_uid")
        _check_uid(self.frame_of_reference_uid, "frame_of_reference_uid")
        if len(self.image_orientation) != 6:
            raise ValueError("image_orientation needs six direction cosines")
        row = np.asarray(self.image_orientation[:3], dtype=np.float64)
        col = np.asarray(self.image_orientation[3:], dtype=np.float64)
        if (
            abs(np.linalg.norm(row) - 1.0) > 1e-4
            or abs(np.linalg.norm(col) - 1.0) > 1e-4
            or abs(float(row @ col)) > 1e-4
        ):
            raise ValueError(
                f"image_orientation {self.image_orientation} is not two orthogonal unit vectors"
            )
        if not self.image_type or any(not v or len(v) > 16 for v in self.image_type):
            raise ValueError(f"image_type {self.image_type} needs 1..16-character values")
        if self.slice_thickness is not None and self.slice_thickness <= 0:
            raise ValueError("slice_thickness must be positive (mm)")
        if self.window[1] <= 0:
            raise ValueError("window width must be positive (HU)")

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        """Unit slice normal (row x column direction), LPS."""
        row = np.asarray(self.image_orientation[:3], dtype=np.float64)
        col = np.asarray(self.image_orientation[3:], dtype=np.float64)
        n = np.cross(row, col)
        return n / np.linalg.norm(n)


# --------------------------------------------------------------------------------------------
# Pixel values


@dataclass(frozen=True)
class _StoredPixels:
    values: npt.NDArray[np.int16] | npt.NDArray[np.uint16]
    pixel_representation: int
    bits_stored: int


def _to_stored(
    volume_hu: npt.ArrayLike, *, rescale_intercept: float, rescale_slope: float
) -> _StoredPixels:
    """Stored values for a HU array: ``round((hu - intercept) / slope)``, as uint16 when none is
    negative (BitsStored 12 where they fit), otherwise int16.

    Raises
    ------
    ValueError
        If the slope is not positive, a value is not finite, or the values fit neither uint16
        nor int16.
    """
    if not rescale_slope > 0:
        raise ValueError("rescale_slope must be positive")
    arr = np.asarray(volume_hu)
    if arr.size == 0:
        raise ValueError("the volume is empty")
    if np.issubdtype(arr.dtype, np.integer) and rescale_slope == 1.0 and rescale_intercept % 1 == 0:
        stored = arr.astype(np.int32) - int(rescale_intercept)
    else:
        values = (arr.astype(np.float64) - rescale_intercept) / rescale_slope
        if not np.all(np.isfinite(values)):
            raise ValueError("the volume holds values that are not finite")
        stored = np.rint(values).astype(np.int64)
    lo, hi = int(stored.min()), int(stored.max())
    if lo >= 0 and hi <= 0xFFFF:
        bits = 12 if hi < 4096 else 16
        return _StoredPixels(stored.astype(np.uint16), 0, bits)
    if lo >= -(2**15) and hi < 2**15:
        return _StoredPixels(stored.astype(np.int16), 1, 16)
    raise ValueError(
        f"stored values {lo}..{hi} fit neither uint16 nor int16 with intercept "
        f"{rescale_intercept} and slope {rescale_slope}"
    )


def _pixel_bytes(values: np.ndarray, *, little_endian: bool) -> bytes:
    """Raw bytes of one frame in the byte order of the transfer syntax (pydicom does not swap)."""
    dtype = values.dtype.newbyteorder("<" if little_endian else ">")
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def _set_image_pixel(ds: Dataset, *, rows: int, columns: int, stored: _StoredPixels) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = stored.bits_stored
    ds.HighBit = stored.bits_stored - 1
    ds.PixelRepresentation = stored.pixel_representation


# --------------------------------------------------------------------------------------------
# Geometry


def slice_positions_mm(
    *,
    n_slices: int,
    spacing_z_mm: float,
    origin_mm: Sequence[float],
    image_orientation: Sequence[float] = AXIAL_ORIENTATION,
    positions_mm: Sequence[float] | None = None,
    gantry_tilt_deg: float = 0.0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Image Position (Patient) and Slice Location of each slice.

    Parameters
    ----------
    n_slices
        Number of slices.
    spacing_z_mm
        Distance between neighbouring slices along the normal, mm (used when ``positions_mm``
        is ``None``; may be negative to run against the normal).
    origin_mm
        (x, y, z) LPS position of the first voxel of the first slice, mm.
    image_orientation
        Six direction cosines (row, column).
    positions_mm
        Explicit slice positions along the normal, mm, one per slice (measured like
        ``origin_mm @ normal``); repeat or skip values to make duplicates, gaps and uneven
        spacing on purpose.
    gantry_tilt_deg
        Gantry tilt in degrees: each slice is shifted along the column direction by
        ``(s_k - s_0) * tan(tilt)``, where ``s_k`` is its position along the normal.

    Returns
    -------
    positions : ndarray, shape (n_slices, 3)
        Image Position (Patient) of each slice, (x, y, z) LPS, mm.
    locations : ndarray, shape (n_slices,)
        Slice Location of each slice, mm (its position along the normal).

    Raises
    ------
    ValueError
        If ``positions_mm`` has the wrong length or the tilt is not within (-90, 90) degrees.
    """
    orient = np.asarray(image_orientation, dtype=np.float64)
    row, col = orient[:3], orient[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    origin = np.asarray(origin_mm, dtype=np.float64)
    if origin.shape != (3,):
        raise ValueError("origin_mm must be (x, y, z)")
    s0 = float(origin @ normal)
    if positions_mm is None:
        locations = s0 + spacing_z_mm * np.arange(n_slices, dtype=np.float64)
    else:
        locations = np.asarray(positions_mm, dtype=np.float64)
        if locations.shape != (n_slices,):
            raise ValueError(f"positions_mm has {locations.size} values for {n_slices} slices")
    if not -90.0 < gantry_tilt_deg < 90.0:
        raise ValueError("gantry_tilt_deg must lie within (-90, 90)")
    in_plane = origin - s0 * normal
    shear = (locations - locations[0]) * math.tan(math.radians(gantry_tilt_deg))
    positions = (
        in_plane[None, :] + locations[:, None] * normal[None, :] + shear[:, None] * col[None, :]
    )
    return positions, locations


# --------------------------------------------------------------------------------------------
# Headers


def _set_common(ds: Dataset, *, study: StudyIdentity, series: SeriesSpec, modality: str) -> None:
    """Patient, General Study, General Series, Frame of Reference and General Equipment."""
    ds.SpecificCharacterSet = study.specific_character_set
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date.strftime(_DA) if study.patient_birth_date else ""
    ds.PatientSex = study.patient_sex.value if study.patient_sex else ""
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date.strftime(_DA)
    ds.StudyTime = study.study_time.strftime(_TM)
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.study_description

    ds.Modality = modality
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDescription = series.series_description
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.BodyPartExamined = series.body_part_examined
    ds.PatientPosition = series.patient_position

    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""

    ds.Manufacturer = series.manufacturer
    ds.InstitutionName = series.institution_name
    ds.StationName = series.station_name
    ds.ManufacturerModelName = series.manufacturer_model_name
    ds.DeviceSerialNumber = series.device_serial_number
    ds.SoftwareVersions = series.software_versions


def _series_template(
    *,
    study: StudyIdentity,
    series: SeriesSpec,
    rows: int,
    columns: int,
    pixel_spacing_mm: tuple[float, float],
    slice_thickness_mm: float,
    stored: _StoredPixels,
    rescale_intercept: float,
    rescale_slope: float,
    gantry_tilt_deg: float,
) -> Dataset:
    """Every element that all slices of one CT Image Storage series share."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    _set_common(ds, study=study, series=series, modality="CT")
    # General Image, General Acquisition
    ds.ImageType = list(series.image_type)
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.AcquisitionNumber = series.acquisition_number
    ds.BurnedInAnnotation = "NO"
    # Image Plane
    ds.PixelSpacing = [_ds(pixel_spacing_mm[0]), _ds(pixel_spacing_mm[1])]
    ds.ImageOrientationPatient = [_ds(v) for v in series.image_orientation]
    ds.SliceThickness = _ds(slice_thickness_mm)
    # Image Pixel
    _set_image_pixel(ds, rows=rows, columns=columns, stored=stored)
    # CT Image
    ds.RescaleIntercept = _ds(rescale_intercept)
    ds.RescaleSlope = _ds(rescale_slope)
    if "LOCALIZER" not in series.image_type:
        # A scout's values are not calibrated HU (dciodvfy warns on HU for a localizer).
        ds.RescaleType = "HU"
    ds.KVP = _ds(series.kvp)
    ds.DataCollectionDiameter = _ds(500.0)
    ds.ReconstructionDiameter = _ds(max(rows * pixel_spacing_mm[0], columns * pixel_spacing_mm[1]))
    ds.GantryDetectorTilt = _ds(gantry_tilt_deg)
    ds.TableHeight = _ds(150.0)
    ds.RotationDirection = "CW"
    ds.ExposureTime = series.exposure_time_ms
    ds.XRayTubeCurrent = series.x_ray_tube_current_ma
    ds.Exposure = round(series.exposure_time_ms * series.x_ray_tube_current_ma / 1000)
    ds.ConvolutionKernel = series.convolution_kernel
    # VOI LUT
    ds.WindowCenter = _ds(series.window[0])
    ds.WindowWidth = _ds(series.window[1])
    return ds


def _file_meta(sop_class: UID, sop_instance: UID, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _check_syntax(transfer_syntax: str) -> UID:
    uid = UID(transfer_syntax)
    if uid not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer syntax {uid} ({uid.name}) cannot be written here; write explicit VR "
            "little endian and convert with dcmtk or gdcm"
        )
    return uid


def _instance_uid(seed: int | None, series_uid: str, index: int) -> UID:
    if seed is None:
        return generate_uid()
    return derived_uid("instance", seed, series_uid, index)


def _slice_dataset(
    template: Dataset,
    *,
    sop_instance_uid: UID,
    instance_number: int,
    position_mm: npt.NDArray[np.float64],
    slice_location_mm: float,
    pixel_data: bytes,
    transfer_syntax: UID,
) -> Dataset:
    # A new dict of the template's elements: per-slice elements are added, never overwritten,
    # so the template's shared DataElement objects are not mutated.
    ds = Dataset(dict(template.items()))
    ds.file_meta = _file_meta(template.SOPClassUID, sop_instance_uid, transfer_syntax)
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(v) for v in position_mm]
    ds.SliceLocation = _ds(slice_location_mm)
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OW"
    return ds


def _volume_3d(volume_hu: npt.ArrayLike) -> np.ndarray:
    arr = np.asarray(volume_hu)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"volume_hu must be a non-empty (z, y, x) array, not shape {arr.shape}")
    return arr


def ct_slice_dataset(
    slice_hu: npt.ArrayLike,
    *,
    study: StudyIdentity,
    series: SeriesSpec,
    pixel_spacing_mm: tuple[float, float],
    position_mm: Sequence[float],
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    slice_thickness_mm: float = 1.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    gantry_tilt_deg: float = 0.0,
) -> Dataset:
    """One CT Image Storage dataset (with file meta) for one slice.

    Parameters
    ----------
    slice_hu : array_like, shape (y, x)
        The slice in HU (integer or float; stored rounded to the rescale's step).
    pixel_spacing_mm
        (row spacing, column spacing) = (dy, dx), mm.
    position_mm
        Image Position (Patient): (x, y, z) LPS of the first voxel, mm. Slice Location is its
        component along the slice normal.

    Returns
    -------
    pydicom.Dataset
        Ready for ``dcmwrite(path, ds, enforce_file_format=True)``.

    Raises
    ------
    ValueError
        If the slice is not 2-D, its values cannot be stored with the rescale given, or the
        transfer syntax is not one listed in :data:`SUPPORTED_TRANSFER_SYNTAXES`.
    """
    arr = np.asarray(slice_hu)
    if arr.ndim != 2:
        raise ValueError(f"slice_hu must be (y, x), not shape {arr.shape}")
    syntax = _check_syntax(transfer_syntax)
    stored = _to_stored(arr, rescale_intercept=rescale_intercept, rescale_slope=rescale_slope)
    template = _series_template(
        study=study,
        series=series,
        rows=arr.shape[0],
        columns=arr.shape[1],
        pixel_spacing_mm=pixel_spacing_mm,
        slice_thickness_mm=slice_thickness_mm,
        stored=stored,
        rescale_intercept=rescale_intercept,
        rescale_slope=rescale_slope,
        gantry_tilt_deg=gantry_tilt_deg,
    )
    position = np.asarray(position_mm, dtype=np.float64)
    return _slice_dataset(
        template,
        sop_instance_uid=UID(sop_instance_uid) if sop_instance_uid else generate_uid(),
        instance_number=instance_number,
        position_mm=position,
        slice_location_mm=float(position @ series.normal),
        pixel_data=_pixel_bytes(stored.values, little_endian=syntax != ExplicitVRBigEndian),
        transfer_syntax=syntax,
    )


def write_ct_series(
    volume_hu: npt.ArrayLike,
    out_dir: str | Path,
    *,
    spacing_mm: tuple[float, float, float],
    study: StudyIdentity,
    series: SeriesSpec,
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    instance_uid_seed: int | None = None,
    positions_mm: Sequence[float] | None = None,
    gantry_tilt_deg: float = 0.0,
    file_names: str = "IM{index:05d}.dcm",
) -> list[Path]:
    """Write a HU volume as a CT Image Storage series, one file per slice.

    Parameters
    ----------
    volume_hu : array_like, shape (z, y, x)
        Hounsfield units, integer or float. Stored as ``round((hu - intercept) / slope)``: uint16
        (Pixel Representation 0, Bits Stored 12 where the values fit) when no stored value is
        negative, int16 (Pixel Representation 1) otherwise.
    out_dir
        Folder for the files; created if missing.
    spacing_mm
        (dz, dy, dx) in mm: distance between slices along the normal and the pixel spacing.
    study, series
        Identity of the study and description of the series.
    origin_mm
        (x, y, z) LPS centre of voxel ``[0, 0, 0]``, mm.
    transfer_syntax
        One of :data:`SUPPORTED_TRANSFER_SYNTAXES`.
    rescale_intercept, rescale_slope
        Rescale from stored values to HU.
    instance_uid_seed
        When given, SOP Instance UIDs are derived from (seed, series UID, slice index), so that
        writing twice gives the same UIDs; otherwise they are random.
    positions_mm
        Explicit positions along the slice normal (mm), one per slice, e.g. to make gaps,
        duplicates or uneven spacing; overrides ``spacing_mm[0]`` for the positions (which
        stays the nominal spacing, and the default Slice Thickness).
    gantry_tilt_deg
        Gantry tilt: written as Gantry/Detector Tilt, and each slice's position is sheared along
        the column direction (``y`` for axial slices) by ``(s_k - s_0) * tan(tilt)``.
    file_names
        Format string for file names; ``{index}`` is the 0-based slice index and ``{instance}``
        the Instance Number.

    Returns
    -------
    list of Path
        The files written, in slice order.

    Raises
    ------
    ValueError
        If the volume is not 3-D, its values cannot be stored, a spacing is not positive, the
        positions do not match the slices, or the transfer syntax is not supported.
    """
    volume = _volume_3d(volume_hu)
    syntax = _check_syntax(transfer_syntax)
    dz, dy, dx = (float(v) for v in spacing_mm)
    if dy <= 0 or dx <= 0 or dz == 0:
        raise ValueError(f"spacing_mm {spacing_mm} must be non-zero (dz) and positive (dy, dx)")
    n_slices, rows, columns = volume.shape
    positions, locations = slice_positions_mm(
        n_slices=n_slices,
        spacing_z_mm=dz,
        origin_mm=origin_mm,
        image_orientation=series.image_orientation,
        positions_mm=positions_mm,
        gantry_tilt_deg=gantry_tilt_deg,
    )
    thickness = series.slice_thickness if series.slice_thickness is not None else abs(dz)
    stored = _to_stored(volume, rescale_intercept=rescale_intercept, rescale_slope=rescale_slope)
    template = _series_template(
        study=study,
        series=series,
        rows=rows,
        columns=columns,
        pixel_spacing_mm=(dy, dx),
        slice_thickness_mm=thickness,
        stored=stored,
        rescale_intercept=rescale_intercept,
        rescale_slope=rescale_slope,
        gantry_tilt_deg=gantry_tilt_deg,
    )
    little = syntax != ExplicitVRBigEndian
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for k in range(n_slices):
        ds = _slice_dataset(
            template,
            sop_instance_uid=_instance_uid(instance_uid_seed, series.series_instance_uid, k),
            instance_number=k + 1,
            position_mm=positions[k],
            slice_location_mm=float(locations[k]),
            pixel_data=_pixel_bytes(stored.values[k], little_endian=little),
            transfer_syntax=syntax,
        )
        path = folder / file_names.format(index=k, instance=k + 1)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        written.append(path)
    logger.debug(
        "wrote CT series %s: %d slices of %dx%d in %s",
        series.series_number,
        n_slices,
        rows,
        columns,
        syntax.name,
    )
    return written


def write_localizer(
    volume_hu: npt.ArrayLike,
    path: str | Path,
    *,
    spacing_mm: tuple[float, float, float],
    study: StudyIdentity,
    series: SeriesSpec,
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_instance_uid: str | None = None,
) -> Path:
    """Write a coronal scout (localizer) projected from an axial volume, as one CT image.

    The image is the mean HU along y (anterior-posterior) of ``volume_hu``, laid out with rows
    running from head to feet (column direction -z) and columns along +x, at the y of the
    volume's centre. Image Type is forced to ORIGINAL\\PRIMARY\\LOCALIZER and the orientation
    to :data:`CORONAL_ORIENTATION`; the rest of ``series`` is used as given.

    Parameters
    ----------
    volume_hu : array_like, shape (z, y, x)
        Axial volume in HU, slice ``k`` at ``z = origin_z + k * dz`` (``dz > 0``).
    path
        File to write; a folder is created if missing. If ``path`` is an existing folder the
        file is written into it as ``LOCALIZER.dcm``.
    spacing_mm
        (dz, dy, dx) of the volume, mm.
    origin_mm
        (x, y, z) LPS centre of voxel ``[0, 0, 0]`` of the volume, mm.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    ValueError
        As :func:`write_ct_series`, or if ``dz`` is not positive.
    """
    volume = _volume_3d(volume_hu)
    dz, dy, dx = (float(v) for v in spacing_mm)
    if dz <= 0 or dy <= 0 or dx <= 0:
        raise ValueError("spacing_mm must be positive for a localizer")
    projection = volume.astype(np.float32).mean(axis=1)[::-1, :]  # (z from head, x)
    projection = np.rint(projection)
    n_slices, n_rows, _ = volume.shape
    top = (
        origin_mm[0],
        origin_mm[1] + dy * (n_rows - 1) / 2.0,
        origin_mm[2] + dz * (n_slices - 1),
    )
    scout = replace(
        series,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        image_orientation=CORONAL_ORIENTATION,
    )
    ds = ct_slice_dataset(
        projection,
        study=study,
        series=scout,
        pixel_spacing_mm=(dz, dx),
        position_mm=top,
        sop_instance_uid=sop_instance_uid,
        slice_thickness_mm=dy * n_rows,
        transfer_syntax=transfer_syntax,
    )
    target = Path(path)
    if target.is_dir():
        target = target / "LOCALIZER.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(target, ds, enforce_file_format=True)
    return target


# --------------------------------------------------------------------------------------------
# Enhanced CT


def _item(**elements: object) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


@dataclass(frozen=True)
class _FrameGeometry:
    pixel_spacing_mm: tuple[float, float]
    thickness_mm: float
    positions_mm: npt.NDArray[np.float64]
    locations_mm: npt.NDArray[np.float64]
    rows: int
    columns: int


def _enhanced_shared_group(
    *,
    series: SeriesSpec,
    geometry: _FrameGeometry,
    frame_type: list[str],
    original: bool,
    rescale: tuple[float, float],
    sop_uid: UID,
) -> Dataset:
    """The shared functional group of an Enhanced CT image: everything but position/content."""
    dy, dx = geometry.pixel_spacing_mm
    rows, columns = geometry.rows, geometry.columns
    rescale_intercept, rescale_slope = rescale
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence(
        [_item(PixelSpacing=[_ds(dy), _ds(dx)], SliceThickness=_ds(geometry.thickness_mm))]
    )
    shared.PlaneOrientationSequence = DicomSequence(
        [_item(ImageOrientationPatient=[_ds(v) for v in series.image_orientation])]
    )
    shared.PixelValueTransformationSequence = DicomSequence(
        [
            _item(
                RescaleIntercept=_ds(rescale_intercept),
                RescaleSlope=_ds(rescale_slope),
                RescaleType="HU",
            )
        ]
    )
    shared.FrameVOILUTSequence = DicomSequence(
        [_item(WindowCenter=_ds(series.window[0]), WindowWidth=_ds(series.window[1]))]
    )
    shared.FrameAnatomySequence = DicomSequence(
        [
            _item(
                AnatomicRegionSequence=DicomSequence([_code(*_CHEST_CODE)]),
                FrameLaterality="U",
            )
        ]
    )
    shared.IrradiationEventIdentificationSequence = DicomSequence(
        [_item(IrradiationEventUID=derived_uid("irradiation", sop_uid))]
    )
    shared.CTImageFrameTypeSequence = DicomSequence(
        [
            _item(
                FrameType=frame_type,
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ]
    )
    if original:
        fov = max(rows * dy, columns * dx)
        shared.CTAcquisitionTypeSequence = DicomSequence(
            [_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")]
        )
        shared.CTAcquisitionDetailsSequence = DicomSequence(
            [
                _item(
                    DataCollectionDiameter=500.0,
                    GantryDetectorTilt=0.0,
                    TableHeight=150.0,
                    RotationDirection="CW",
                    RevolutionTime=0.5,
                    SingleCollimationWidth=0.625,
                    TotalCollimationWidth=40.0,
                )
            ]
        )
        shared.CTTableDynamicsSequence = DicomSequence(
            [_item(TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0)]
        )
        shared.CTGeometrySequence = DicomSequence(
            [_item(DistanceSourceToDetector=1085.6, DistanceSourceToDataCollectionCenter=595.0)]
        )
        shared.CTReconstructionSequence = DicomSequence(
            [
                _item(
                    ReconstructionAlgorithm="FILTER_BACK_PROJ",
                    ConvolutionKernel=series.convolution_kernel,
                    ConvolutionKernelGroup="SOFT_TISSUE",
                    ReconstructionDiameter=fov,
                    ReconstructionPixelSpacing=[dy, dx],
                    ReconstructionAngle=360.0,
                    ImageFilter="NONE",
                )
            ]
        )
        shared.CTExposureSequence = DicomSequence(
            [
                _item(
                    ExposureTimeInms=float(series.exposure_time_ms),
                    XRayTubeCurrentInmA=float(series.x_ray_tube_current_ma),
                    ExposureInmAs=series.exposure_time_ms * series.x_ray_tube_current_ma / 1000.0,
                    ExposureModulationType="NONE",
                    CTDIvol=10.0,
                    CTDIPhantomTypeCodeSequence=DicomSequence(
                        [_code("113691", "DCM", "IEC Body Dosimetry Phantom")]
                    ),
                )
            ]
        )
        shared.CTXRayDetailsSequence = DicomSequence(
            [
                _item(
                    KVP=_ds(series.kvp),
                    FocalSpots=[_ds(1.2)],
                    FilterType="FLAT",
                    FilterMaterial=["ALUMINUM"],
                )
            ]
        )
    return shared


def _enhanced_per_frame_groups(
    *, series: SeriesSpec, geometry: _FrameGeometry, original: bool, frame_datetime: str
) -> list[Dataset]:
    """One functional group per frame: plane position, frame content, CT position."""
    positions, locations = geometry.positions_mm, geometry.locations_mm
    dt_text = frame_datetime
    per_frame: list[Dataset] = []
    for k in range(len(positions)):
        frame = Dataset()
        frame.PlanePositionSequence = DicomSequence(
            [_item(ImagePositionPatient=[_ds(v) for v in positions[k]])]
        )
        content = _item(
            FrameAcquisitionNumber=series.acquisition_number,
            DimensionIndexValues=[k + 1],
            InStackPositionNumber=k + 1,
            StackID="1",
        )
        if original:
            content.FrameReferenceDateTime = dt_text
            content.FrameAcquisitionDateTime = dt_text
            content.FrameAcquisitionDuration = float(series.exposure_time_ms)
        frame.FrameContentSequence = DicomSequence([content])
        if original:
            frame.CTPositionSequence = DicomSequence(
                [
                    _item(
                        TablePosition=float(locations[k]),
                        ReconstructionTargetCenterPatient=[0.0, 0.0, float(positions[k][2])],
                        DataCollectionCenterPatient=[0.0, 0.0, float(positions[k][2])],
                    )
                ]
            )
        per_frame.append(frame)
    return per_frame


def write_enhanced_ct(
    volume_hu: npt.ArrayLike,
    path: str | Path,
    *,
    spacing_mm: tuple[float, float, float],
    study: StudyIdentity,
    series: SeriesSpec,
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    sop_instance_uid: str | None = None,
    positions_mm: Sequence[float] | None = None,
) -> Path:
    """Write a HU volume as one Enhanced CT Image Storage multi-frame file.

    Shared functional groups hold pixel measures, plane orientation, pixel value
    transformation, frame VOI LUT, frame anatomy, CT image frame type and the CT acquisition
    macros; each frame's group holds its plane position and frame content (with a dimension
    index on Image Position (Patient)). Frames are in slice order.

    Parameters
    ----------
    volume_hu : array_like, shape (z, y, x)
        Hounsfield units; stored as in :func:`write_ct_series`.
    path
        File to write (its folder is created if missing).
    spacing_mm
        (dz, dy, dx), mm.
    origin_mm
        (x, y, z) LPS centre of voxel ``[0, 0, 0]``, mm.
    positions_mm
        Explicit frame positions along the normal, mm (see :func:`slice_positions_mm`).

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    ValueError
        As :func:`write_ct_series`.
    """
    volume = _volume_3d(volume_hu)
    syntax = _check_syntax(transfer_syntax)
    dz, dy, dx = (float(v) for v in spacing_mm)
    if dy <= 0 or dx <= 0 or dz == 0:
        raise ValueError(f"spacing_mm {spacing_mm} must be non-zero (dz) and positive (dy, dx)")
    n_frames, rows, columns = volume.shape
    positions, locations = slice_positions_mm(
        n_slices=n_frames,
        spacing_z_mm=dz,
        origin_mm=origin_mm,
        image_orientation=series.image_orientation,
        positions_mm=positions_mm,
    )
    thickness = series.slice_thickness if series.slice_thickness is not None else abs(dz)
    stored = _to_stored(volume, rescale_intercept=rescale_intercept, rescale_slope=rescale_slope)
    sop_uid = UID(sop_instance_uid) if sop_instance_uid else generate_uid()
    original = series.image_type[0] in ("ORIGINAL", "MIXED")
    # Image Type of an enhanced image has four values: pixel data characteristics, patient
    # examination characteristics, image flavour and derived pixel contrast.
    frame_type = [*series.image_type[:2], *("ORIGINAL", "PRIMARY")[len(series.image_type) :]]
    frame_type += ["VOLUME", "NONE"]

    ds = Dataset()
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    _set_common(ds, study=study, series=series, modality="CT")
    acquisition_dt = datetime.datetime.combine(study.study_date, study.study_time)
    dt_text = acquisition_dt.strftime("%Y%m%d%H%M%S")

    # Enhanced CT Image
    ds.ImageType = frame_type
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionNumber = series.acquisition_number
    ds.AcquisitionDateTime = dt_text
    ds.AcquisitionDuration = float(series.exposure_time_ms) / 1000.0 * n_frames
    _set_image_pixel(ds, rows=rows, columns=columns, stored=stored)
    # Multi-frame Functional Groups
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.NumberOfFrames = n_frames
    # Acquisition Context
    ds.AcquisitionContextSequence = DicomSequence()
    # Multi-frame Dimension: one dimension, the frame position
    dim_uid = derived_uid("dimension", sop_uid)
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=pydicom.tag.Tag("ImagePositionPatient"),
                FunctionalGroupPointer=pydicom.tag.Tag("PlanePositionSequence"),
                DimensionDescriptionLabel="Image Position",
            )
        ]
    )

    geometry = _FrameGeometry(
        pixel_spacing_mm=(dy, dx),
        thickness_mm=thickness,
        positions_mm=positions,
        locations_mm=locations,
        rows=rows,
        columns=columns,
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence(
        [
            _enhanced_shared_group(
                series=series,
                geometry=geometry,
                frame_type=frame_type,
                original=original,
                rescale=(rescale_intercept, rescale_slope),
                sop_uid=sop_uid,
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        _enhanced_per_frame_groups(
            series=series, geometry=geometry, original=original, frame_datetime=dt_text
        )
    )

    ds.PixelData = _pixel_bytes(stored.values, little_endian=syntax != ExplicitVRBigEndian)
    ds["PixelData"].VR = "OW"
    ds.file_meta = _file_meta(ENHANCED_CT_IMAGE_STORAGE, sop_uid, syntax)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(target, ds, enforce_file_format=True)
    return target
