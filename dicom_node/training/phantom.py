"""Synthetic chest-CT phantoms with ground truth, for training and evaluating the node's model.

No real CT can be downloaded where this project is built, so training and evaluation run on
phantoms made here. A phantom is an analytic chest (body outline with skin, subcutaneous fat and
muscle, ribs, spine, sternum, scapulae, mediastinum, heart, aorta, pulmonary trunk and arteries,
superior vena cava, trachea, oesophagus, diaphragm with liver, spleen and stomach below it, and two
lungs with bronchovascular and venous trees that branch and taper toward the periphery), sampled
on a CT grid, with:

* tumours (solid, lobulated, spiculated, part-solid, ground-glass; free-lying, juxta-pleural or
  juxta-vascular; 4-40 mm), each with its own label in :attr:`Phantom.tumour_mask`;
* look-alikes that are *not* tumours: vessels seen end-on, calcified granulomas (> 200 HU),
  fissures and atelectasis bands, each with its own label in :attr:`Phantom.lookalike_mask`;
* the site's scanner and protocol (:class:`SiteParameters`): field of view and pixel spacing, slice
  thickness and spacing (with partial-volume averaging over the slice), reconstruction kernel
  (blur, edge enhancement and the noise power spectrum it shapes), noise level, HU calibration,
  padding outside the reconstruction circle, and the site's patients (size, depth of breath).

Domain randomisation is the point: a model trained on phantoms from one
:class:`SiteDistribution` is checked on other seeds *and* on a shifted distribution
(:meth:`SiteDistribution.shifted`).

Coordinates: arrays are indexed (z, y, x); ``spacing_mm`` is (dz, dy, dx); positions are DICOM
patient coordinates (LPS, mm), ``origin_mm`` being the centre of voxel ``[0, 0, 0]`` as (x, y, z).
Slice ``k`` lies at ``z = origin_mm[2] + k * dz`` (slice 0 is the most inferior).

Speed: the large anatomy is painted slice by slice with vectorised numpy and blurred along z for
the slice thickness; small structures (vessels, airways, tumours, look-alikes) are drawn in their
own bounding boxes with sub-slice sampling, which gives them exact partial-volume averaging. A
64 x 512 x 512 phantom takes about 3-4 s on one core; 24 x 96 x 96 takes well under a second.
"""

from __future__ import annotations

import enum
import logging
import math
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydicom.uid import ExplicitVRLittleEndian
from scipy import fft as sfft  # type: ignore[import-untyped, unused-ignore]
from scipy import ndimage  # type: ignore[import-untyped, unused-ignore]

from dicom_node.training.ctseries import (
    SeriesSpec,
    StudyIdentity,
    derived_uid,
    write_ct_series,
)

__all__ = [
    "Lobe",
    "LookalikeKind",
    "LookalikeSpec",
    "PatientParameters",
    "Phantom",
    "SiteDistribution",
    "SiteParameters",
    "Tissue",
    "TumourAttachment",
    "TumourKind",
    "TumourSpec",
    "generate_phantom",
    "write_phantom_dicom",
    "write_phantom_nifti",
]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]
U8 = npt.NDArray[np.uint8]
Range = tuple[float, float]
Vec3 = tuple[float, float, float]

# Nominal tissue values, HU (before the site's calibration and kVp effect on bone).
_HU_AIR: Final = -1000.0
_HU_FAT: Final = -95.0
_HU_MUSCLE: Final = 50.0
_HU_SKIN: Final = 40.0
_HU_BLOOD: Final = 42.0
_HU_LIVER: Final = 58.0
_HU_SPLEEN: Final = 48.0
_HU_STOMACH: Final = 25.0
_HU_CSF: Final = 12.0
_HU_DISC: Final = 85.0
_HU_CARTILAGE: Final = 130.0
_HU_CORTEX: Final = 850.0
_HU_MARROW: Final = 230.0
_HU_WALL: Final = 35.0
_HU_TABLE: Final = 180.0
_HU_FOAM: Final = -850.0
_HU_PLEURA: Final = 30.0


class Tissue(enum.IntEnum):
    """Tissue classes of :attr:`Phantom.tissue` (the noise-free truth at each voxel centre)."""

    AIR = 0
    LUNG = 1
    FAT = 2
    SOFT_TISSUE = 3  # skin, muscle, oesophagus, mediastinal soft tissue
    BONE = 4  # cortical bone
    MARROW = 5  # cancellous bone
    CARTILAGE = 6
    BLOOD = 7  # heart, great vessels, pulmonary vessels
    ORGAN = 8  # liver, spleen, stomach wall, intervertebral discs, CSF
    AIRWAY_WALL = 9
    TUMOUR = 10
    CALCIFICATION = 11
    ATELECTASIS = 12
    TABLE = 13


class TumourKind(enum.StrEnum):
    """Morphology of a tumour."""

    SOLID = "solid"
    LOBULATED = "lobulated"
    SPICULATED = "spiculated"
    PART_SOLID = "part_solid"
    GROUND_GLASS = "ground_glass"


class TumourAttachment(enum.StrEnum):
    """Where a tumour sits relative to its neighbours."""

    FREE = "free"
    JUXTAPLEURAL = "juxtapleural"
    JUXTAVASCULAR = "juxtavascular"


class Lobe(enum.StrEnum):
    """Lung lobes (right upper/middle/lower, left upper/lower)."""

    RUL = "RUL"
    RML = "RML"
    RLL = "RLL"
    LUL = "LUL"
    LLL = "LLL"


class LookalikeKind(enum.StrEnum):
    """Structures that resemble a nodule but are not tumours."""

    VESSEL = "vessel"  # a vessel running through the slices, seen end-on as a round blob
    CALCIFIED_GRANULOMA = "calcified_granuloma"
    FISSURE = "fissure"
    ATELECTASIS = "atelectasis"


# ----------------------------------------------------------------------------------------------
# Site and patient parameters


def _kernel_name(sharpness: float) -> str:
    return f"B{round(20 + 55 * sharpness)}f"


@dataclass(frozen=True)
class SiteParameters:
    """One scanner and protocol at one site, and the site's patient population.

    Parameters
    ----------
    fov_mm
        Reconstruction field of view (square), mm; pixel spacing is ``fov_mm / matrix``.
    matrix
        Pixels per row and column.
    slice_thickness_mm
        Reconstructed slice thickness (width of the slice profile), mm.
    slice_spacing_mm
        Distance between slice centres, mm (smaller than the thickness for overlapping slices).
    kernel_sharpness
        0 (soft tissue kernel) .. 1 (sharp lung/bone kernel): sets the blur, edge enhancement
        and the peak of the noise power spectrum.
    noise_sd_hu
        Standard deviation of image noise in a standard-size patient, HU.
    hu_offset, hu_gain
        Calibration error: ``hu' = (hu + 1000) * (1 + gain) - 1000 + offset``.
    kvp
        Tube voltage, kV (bone is brighter at lower kV).
    outside_fov_hu
        Value written outside the reconstruction circle (e.g. -2048, -3024), or ``None`` to
        leave the air there.
    rescale_intercept
        Rescale Intercept the site's DICOM uses.
    patient_scale_mean
        Mean body size of the site's patients relative to a standard adult.
    breath_depth_mean
        Mean depth of breath-hold (1 = standard full inspiration; lower = shallower, smaller and
        denser lungs).
    """

    name: str = "site-A"
    fov_mm: float = 360.0
    matrix: int = 512
    slice_thickness_mm: float = 1.25
    slice_spacing_mm: float = 1.25
    kernel_sharpness: float = 0.3
    noise_sd_hu: float = 15.0
    hu_offset: float = 0.0
    hu_gain: float = 0.0
    kvp: float = 120.0
    outside_fov_hu: float | None = None
    rescale_intercept: float = -1024.0
    patient_scale_mean: float = 1.0
    breath_depth_mean: float = 1.0

    def __post_init__(self) -> None:
        if self.fov_mm <= 0 or self.matrix < 8:
            raise ValueError("fov_mm must be positive and matrix at least 8")
        if self.slice_thickness_mm <= 0 or self.slice_spacing_mm <= 0:
            raise ValueError("slice thickness and spacing must be positive (mm)")
        if not 0.0 <= self.kernel_sharpness <= 1.0:
            raise ValueError("kernel_sharpness must lie in [0, 1]")
        if self.noise_sd_hu < 0:
            raise ValueError("noise_sd_hu must not be negative")

    @property
    def pixel_spacing_mm(self) -> float:
        """In-plane pixel spacing, mm."""
        return self.fov_mm / self.matrix

    @property
    def convolution_kernel(self) -> str:
        """A scanner-style kernel name for the sharpness (B20f soft .. B75f sharp)."""
        return _kernel_name(self.kernel_sharpness)


@dataclass(frozen=True)
class SiteDistribution:
    """Where the parameters of sites are drawn from: a uniform range per parameter.

    :meth:`sample` draws one :class:`SiteParameters`; :meth:`shifted` moves every range toward
    conditions a model trained on this distribution has not seen (larger fields of view, thicker
    slices, sharper kernels, more noise, larger calibration errors, larger patients, shallower
    breath), so that robustness can be measured out of distribution.
    """

    fov_mm: Range = (320.0, 400.0)
    slice_thickness_mm: Range = (0.625, 2.5)
    overlap: Range = (0.7, 1.0)  # slice spacing / slice thickness
    kernel_sharpness: Range = (0.0, 0.6)
    noise_sd_hu: Range = (8.0, 25.0)
    hu_offset: Range = (-6.0, 6.0)
    hu_gain: Range = (-0.01, 0.01)
    kvp: Range = (100.0, 130.0)
    patient_scale_mean: Range = (0.92, 1.04)
    breath_depth_mean: Range = (0.95, 1.06)
    outside_fov_probability: float = 0.5
    matrix: int = 512

    def sample(self, rng: np.random.Generator | int, *, name: str | None = None) -> SiteParameters:
        """Draw one site from the distribution (a seed or a Generator)."""
        gen = np.random.default_rng(rng) if isinstance(rng, int) else rng

        def u(r: Range) -> float:
            return float(gen.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])

        thickness = max(0.5, round(u(self.slice_thickness_mm) / 0.125) * 0.125)
        spacing = max(0.25, round(thickness * u(self.overlap) / 0.125) * 0.125)
        outside: float | None = None
        if gen.uniform() < self.outside_fov_probability:
            outside = float(gen.choice([-1024.0, -2048.0, -3024.0]))
        intercept = -1024.0 if gen.uniform() < 0.8 else 0.0
        return SiteParameters(
            name=name or f"site-{int(gen.integers(0, 10**6)):06d}",
            fov_mm=round(u(self.fov_mm), 1),
            matrix=self.matrix,
            slice_thickness_mm=thickness,
            slice_spacing_mm=spacing,
            kernel_sharpness=min(1.0, max(0.0, u(self.kernel_sharpness))),
            noise_sd_hu=u(self.noise_sd_hu),
            hu_offset=u(self.hu_offset),
            hu_gain=u(self.hu_gain),
            kvp=float(round(u(self.kvp) / 10.0) * 10.0),
            outside_fov_hu=outside,
            rescale_intercept=intercept,
            patient_scale_mean=u(self.patient_scale_mean),
            breath_depth_mean=u(self.breath_depth_mean),
        )

    def widened(self, amount: float = 1.0) -> SiteDistribution:
        """This distribution with every range grown by ``amount`` range widths on each side.

        Domain randomisation for training: a model that has seen thinner and thicker slices,
        smoother and sharper kernels, less and more noise, larger calibration errors and a
        wider spread of patients than any one site shows should not depend on the generator's
        defaults. Calibration ranges (HU offset and gain) grow by ``1 + 2 * amount``; every range
        stays within physical limits. ``amount=0`` returns an equal distribution.
        """

        def grow(r: Range, lo: float, hi: float) -> Range:
            width = (r[1] - r[0]) * amount
            return (min(hi, max(lo, r[0] - width)), min(hi, max(lo, r[1] + width)))

        def scale(r: Range) -> Range:
            return (r[0] * (1.0 + 2.0 * amount), r[1] * (1.0 + 2.0 * amount))

        return replace(
            self,
            fov_mm=grow(self.fov_mm, 200.0, 500.0),
            slice_thickness_mm=grow(self.slice_thickness_mm, 0.5, 10.0),
            kernel_sharpness=grow(self.kernel_sharpness, 0.0, 1.0),
            noise_sd_hu=grow(self.noise_sd_hu, 2.0, 200.0),
            hu_offset=scale(self.hu_offset),
            hu_gain=scale(self.hu_gain),
            kvp=grow(self.kvp, 70.0, 140.0),
            patient_scale_mean=grow(self.patient_scale_mean, 0.7, 1.4),
            breath_depth_mean=grow(self.breath_depth_mean, 0.75, 1.15),
        )

    def shifted(self, amount: float = 1.0) -> SiteDistribution:
        """This distribution moved by ``amount`` range widths toward unseen conditions.

        Ranges that grow (field of view, thickness, sharpness, noise, patient size) move up,
        breath depth moves down, calibration ranges widen by ``1 + amount``. ``amount=0``
        returns an equal distribution.
        """

        def move(r: Range, direction: float, lo: float, hi: float) -> Range:
            width = (r[1] - r[0]) * amount * direction
            return (min(hi, max(lo, r[0] + width)), min(hi, max(lo, r[1] + width)))

        def widen(r: Range) -> Range:
            return (r[0] * (1.0 + amount), r[1] * (1.0 + amount))

        return replace(
            self,
            fov_mm=move(self.fov_mm, 1.0, 200.0, 500.0),
            slice_thickness_mm=move(self.slice_thickness_mm, 1.0, 0.5, 10.0),
            kernel_sharpness=move(self.kernel_sharpness, 1.0, 0.0, 1.0),
            noise_sd_hu=move(self.noise_sd_hu, 1.0, 0.0, 200.0),
            hu_offset=widen(self.hu_offset),
            hu_gain=widen(self.hu_gain),
            kvp=move(self.kvp, -1.0, 70.0, 140.0),
            patient_scale_mean=move(self.patient_scale_mean, 1.0, 0.7, 1.4),
            breath_depth_mean=move(self.breath_depth_mean, -1.0, 0.75, 1.15),
        )


@dataclass(frozen=True)
class PatientParameters:
    """The anatomy of one synthetic patient (sizes in mm, HU for the lung)."""

    scale: float
    body_half_width_mm: float
    body_half_depth_anterior_mm: float
    body_half_depth_posterior_mm: float
    fat_mm: float
    muscle_mm: float
    lung_height_mm: float
    breath_depth: float
    lung_hu: float
    heart_scale: float
    centre_offset_mm: tuple[float, float]
    table_z_mm: float
    rib_phase: float
    disc_phase: float

    @classmethod
    def sample(cls, rng: np.random.Generator, site: SiteParameters) -> PatientParameters:
        """Draw a patient from the site's population."""
        s = float(site.patient_scale_mean * math.exp(rng.normal(0.0, 0.07)))
        breath = float(np.clip(site.breath_depth_mean + rng.normal(0.0, 0.04), 0.75, 1.2))
        fat = float(np.clip(14.0 * s**3 * math.exp(rng.normal(0.0, 0.35)), 3.0, 55.0))
        lung_hu = float(np.clip(-860.0 - 300.0 * (breath - 1.0) + rng.normal(0, 12), -925, -760))
        return cls(
            scale=s,
            body_half_width_mm=160.0 * s * float(math.exp(rng.normal(0, 0.04))) + 0.4 * fat,
            body_half_depth_anterior_mm=(100.0 * s + 0.5 * fat)
            * float(math.exp(rng.normal(0, 0.05))),
            body_half_depth_posterior_mm=(95.0 * s + 0.3 * fat)
            * float(math.exp(rng.normal(0, 0.04))),
            fat_mm=fat,
            muscle_mm=float(np.clip(12.0 * s * math.exp(rng.normal(0.0, 0.2)), 6.0, 25.0)),
            lung_height_mm=255.0 * s * breath * float(math.exp(rng.normal(0.0, 0.05))),
            breath_depth=breath,
            lung_hu=lung_hu,
            heart_scale=float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.25)),
            centre_offset_mm=(float(rng.normal(0.0, 8.0)), float(rng.normal(12.0, 10.0))),
            table_z_mm=float(rng.uniform(-400.0, 100.0)),
            rib_phase=float(rng.uniform(0.0, 1.0)),
            disc_phase=float(rng.uniform(0.0, 1.0)),
        )


# ----------------------------------------------------------------------------------------------
# Ground truth records


@dataclass(frozen=True)
class TumourSpec:
    """One tumour of a phantom; its voxels carry ``label`` in :attr:`Phantom.tumour_mask`.

    ``diameter_mm`` is the longest diameter of the lesion body (for spiculated tumours, of the
    core without its spicules; for part-solid ones, of the whole lesion with ``solid_diameter_mm``
    for the solid core). ``centre_mm`` is (x, y, z) LPS.
    """

    label: int
    kind: TumourKind
    attachment: TumourAttachment
    centre_mm: Vec3
    diameter_mm: float
    side: str  # "R" or "L"
    lobe: Lobe
    hu: float  # nominal attenuation of the solid (or ground-glass) component
    solid_diameter_mm: float


@dataclass(frozen=True)
class LookalikeSpec:
    """One structure that resembles a nodule but is not a tumour.

    Its voxels carry ``label`` in :attr:`Phantom.lookalike_mask` (for fissures, only where they
    cross the lung). ``centre_mm`` is (x, y, z) LPS; ``size_mm`` the diameter (vessel,
    granuloma) or length (atelectasis band, fissure extent in the scan).
    """

    label: int
    kind: LookalikeKind
    centre_mm: Vec3
    size_mm: float
    side: str


@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic chest CT with ground truth. Arrays are read-only and indexed (z, y, x).

    Attributes
    ----------
    hu : ndarray of int16, shape (z, y, x)
        The CT image in HU, as the site's scanner would reconstruct it.
    tumour_mask : ndarray of uint8, shape (z, y, x)
        0 background, ``k`` for the voxels of ``tumours[k - 1]``.
    lung_mask : ndarray of uint8, shape (z, y, x)
        0 outside the lungs, 1 right lung, 2 left lung (vessels and tumours inside included).
    lookalike_mask : ndarray of uint8, shape (z, y, x)
        0 elsewhere, ``k`` for the voxels of ``lookalikes[k - 1]``.
    tissue : ndarray of uint8, shape (z, y, x)
        :class:`Tissue` at each voxel centre before blur and noise.
    spacing_mm
        (dz, dy, dx), mm.
    origin_mm
        (x, y, z) LPS of the centre of voxel ``[0, 0, 0]``, mm.
    """

    hu: npt.NDArray[np.int16]
    tumour_mask: U8
    lung_mask: U8
    lookalike_mask: U8
    tissue: U8
    spacing_mm: Vec3
    origin_mm: Vec3
    tumours: tuple[TumourSpec, ...]
    lookalikes: tuple[LookalikeSpec, ...]
    site: SiteParameters
    patient: PatientParameters
    seed: int

    @property
    def has_tumour(self) -> bool:
        """Whether the phantom holds at least one tumour."""
        return bool(self.tumours)


# ----------------------------------------------------------------------------------------------
# Grid and rasterisation of tubes and blobs


@dataclass(frozen=True)
class _Grid:
    """The CT grid in the body frame: X right-to-left, Y anterior-to-posterior, Z up, mm,
    relative to the body centre (X, Y) and the middle of the lungs (Z)."""

    shape: tuple[int, int, int]
    spacing: Vec3  # dz, dy, dx
    start: Vec3  # Z, Y, X of voxel [0, 0, 0]
    thickness: float
    substeps: int  # samples per slice thickness for partial-volume rendering

    def axis(self, i: int) -> F64:
        return self.start[i] + self.spacing[i] * np.arange(self.shape[i], dtype=np.float64)

    def index_range(self, i: int, lo: float, hi: float) -> tuple[int, int]:
        a = math.floor((lo - self.start[i]) / self.spacing[i])
        b = math.ceil((hi - self.start[i]) / self.spacing[i]) + 1
        return max(0, a), min(self.shape[i], b)

    def sub_offsets(self, substeps: int | None = None) -> F64:
        n = self.substeps if substeps is None else substeps
        return ((np.arange(n) + 0.5) / n - 0.5) * self.thickness

    @property
    def pixel(self) -> float:
        return min(self.spacing[1], self.spacing[2])

    def sub(self, box: tuple[slice, slice, slice]) -> _Grid:
        """The part of the grid inside an index box."""
        starts = tuple(self.start[i] + box[i].start * self.spacing[i] for i in range(3))
        return _Grid(
            shape=(
                box[0].stop - box[0].start,
                box[1].stop - box[1].start,
                box[2].stop - box[2].start,
            ),
            spacing=self.spacing,
            start=(starts[0], starts[1], starts[2]),
            thickness=self.thickness,
            substeps=self.substeps,
        )


def _bbox(grid: _Grid, lo: F64, hi: F64) -> tuple[slice, slice, slice] | None:
    """Index slices of the grid region covering [lo, hi] (Z, Y, X order), or None."""
    z0, z1 = grid.index_range(0, lo[0] - grid.thickness / 2, hi[0] + grid.thickness / 2)
    y0, y1 = grid.index_range(1, lo[1], hi[1])
    x0, x1 = grid.index_range(2, lo[2], hi[2])
    if z0 >= z1 or y0 >= y1 or x0 >= x1:
        return None
    return slice(z0, z1), slice(y0, y1), slice(x0, x1)


def _local_coords(
    grid: _Grid, box: tuple[slice, slice, slice], substeps: int | None = None
) -> tuple[F64, F64, F64]:
    """Sample coordinates of a box, broadcastable to (nz, S, ny, nx)."""
    zs = grid.axis(0)[box[0]][:, None] + grid.sub_offsets(substeps)[None, :]
    return (
        zs[:, :, None, None],
        grid.axis(1)[box[1]][None, None, :, None],
        grid.axis(2)[box[2]][None, None, None, :],
    )


def _soft(distance: F64, width: float) -> F64:
    """Occupancy from a signed distance (negative inside), anti-aliased over ``width`` mm."""
    return np.asarray(np.clip(0.5 - distance / width, 0.0, 1.0), dtype=np.float64)


def _segment_distance(  # noqa: PLR0917 - a capsule is naturally (point, p0, p1, r0, r1)
    z: F64, y: F64, x: F64, p0: F64, p1: F64, r0: float, r1: float
) -> F64:
    """Signed distance (mm, approx.) to a tapered capsule from p0 (radius r0) to p1 (r1)."""
    d = p1 - p0
    length2 = float(d @ d) or 1e-9
    pz, py, px = z - p0[0], y - p0[1], x - p0[2]
    t = np.clip((pz * d[0] + py * d[1] + px * d[2]) / length2, 0.0, 1.0)
    ez, ey, ex = pz - t * d[0], py - t * d[1], px - t * d[2]
    dist = np.sqrt(ez * ez + ey * ey + ex * ex) - (r0 + t * (r1 - r0))
    return np.asarray(dist, dtype=np.float64)


def _draw_segments(
    buffer: F32,
    grid: _Grid,
    segments: F64,
    *,
    grow_mm: float = 0.0,
    substeps: int | None = None,
) -> None:
    """Max-composite the occupancy of tapered capsules into ``buffer`` (z, y, x).

    ``segments`` is (n, 8): p0 (Z, Y, X), p1 (Z, Y, X), r0, r1 in mm; ``grow_mm`` is added to
    both radii (for walls and fat pads).
    """
    width = grid.pixel
    for seg in segments:
        p0, p1 = seg[0:3], seg[3:6]
        r = max(seg[6], seg[7]) + grow_mm + width
        box = _bbox(grid, np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
        if box is None:
            continue
        z, y, x = _local_coords(grid, box, substeps)
        dist = _segment_distance(z, y, x, p0, p1, seg[6] + grow_mm, seg[7] + grow_mm)
        occ = _soft(dist, width).mean(axis=1).astype(np.float32)
        np.maximum(buffer[box], occ, out=buffer[box])


def _composite(hu: F32, occupancy: F32, value: float) -> None:
    """hu <- hu * (1 - occ) + value * occ, in place."""
    hu += occupancy * (np.float32(value) - hu)


def _catmull_rom(points: list[Vec3], radii: list[float], per_span: int = 6) -> F64:
    """A smooth tube through control points, as (n, 8) capsule segments (Z, Y, X order)."""
    p = np.asarray(points, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    samples: list[F64] = []
    rad: list[float] = []
    for i in range(len(p) - 1):
        a, b, c, d = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        for t in np.linspace(0.0, 1.0, per_span, endpoint=False):
            t2, t3 = t * t, t * t * t
            samples.append(
                0.5
                * (
                    2 * b
                    + (-a + c) * t
                    + (2 * a - 5 * b + 4 * c - d) * t2
                    + (-a + 3 * b - 3 * c + d) * t3
                )
            )
            rad.append(float(r[i] + (r[i + 1] - r[i]) * t))
    samples.append(p[-1])
    rad.append(float(r[-1]))
    pts = np.asarray(samples)
    rr = np.asarray(rad)
    return np.column_stack([pts[:-1], pts[1:], rr[:-1], rr[1:]])


# ----------------------------------------------------------------------------------------------
# The anatomy


@dataclass(frozen=True)
class _Plane:
    """A fissure: Z = z0 + k * (Y - y0) + m * |X - x_mid| (lateral parts lie more anterior)."""

    z0: float
    y0: float
    k: float
    m: float

    x_mid: float = 0.0

    def height(self, x: F64 | float, y: F64 | float) -> Any:
        lateral = np.abs(np.asarray(x) - self.x_mid)
        return self.z0 + self.k * (np.asarray(y) - self.y0) + self.m * lateral


@dataclass(frozen=True)
class _PlaneCache:
    """Quantities of in-plane points (Y, X) that do not depend on Z."""

    y: F64
    x: F64
    hyp: F64
    r0: F64  # super-ellipse radius of the body outline, 1 on the skin (before widening in z)
    sin_t: F64  # polar angle from the posterior axis
    cos_t: F64
    theta: F64  # that angle / pi: 0 posterior .. 1 anterior
    fat_depth: F64  # depth of the fat/muscle boundary
    wall_base: F64
    sin2: F64
    band: F64  # distance from the mediastinal midline / half-width of the band
    spine: Bool
    right: Bool
    dome: F64  # Z of the diaphragm
    apex_d2: F64  # squared distance from the axis of the apical cap
    heart_uv: F64
    pericardium_uv: F64


class _Anatomy:
    """Analytic chest of one patient in the body frame (mm): answers 'what is at (Z, Y, X)'."""

    def __init__(self, patient: PatientParameters, kvp: float) -> None:
        p = patient
        s = p.scale
        self.p = p
        self.s = s
        self.a = p.body_half_width_mm
        self.b_ant = p.body_half_depth_anterior_mm
        self.b_post = p.body_half_depth_posterior_mm
        self.h = p.lung_height_mm
        self.z_apex = 0.5 * self.h
        self.z_base = -0.5 * self.h
        self.z_dome_r = self.z_base + 0.31 * self.h
        self.z_dome_l = self.z_base + 0.26 * self.h
        self.z_carina = self.z_apex - 0.38 * self.h
        self.rib_t = 9.0 * s
        self.skin = 2.0
        self.x_mid = 6.0 * s
        self.bone_gain = 1.0 + 0.006 * (120.0 - kvp)
        # Spine: vertebral body just inside the posterior cavity wall.
        wall_post = self._wall_parts(0.0, 1.0)[1]
        self.vb_r = (19.0 * s, 15.0 * s)
        self.y_vb = float(self.b_post - wall_post) - 0.35 * self.vb_r[1]
        self.y_canal = self.y_vb + self.vb_r[1] + 8.0 * s
        wall_ant = self._wall_parts(0.0, -1.0)[1]
        self.y_sternum = -float(self.b_ant - wall_ant) - 0.5 * self.rib_t
        # Heart: rotated ellipsoid resting on the left dome.
        hs = s * p.heart_scale
        self.heart_axes = (64.0 * hs, 48.0 * hs, 56.0 * hs)
        self.heart_c = (
            self.z_dome_l + 0.45 * self.heart_axes[2],
            -0.28 * self.b_ant,
            22.0 * s,
        )
        self.heart_rot = math.radians(-35.0)
        self.y_trachea = self.y_vb - self.vb_r[1] - 22.0 * s
        xm = self.x_mid
        self.fissures = {
            "R_oblique": _Plane(self.z_apex - 0.3 * self.h, 0.5 * self.b_post, 1.0, 0.45, xm),
            "L_oblique": _Plane(self.z_apex - 0.27 * self.h, 0.5 * self.b_post, 1.1, 0.5, xm),
            "R_horizontal": _Plane(self.z_carina - 28.0 * s, 0.0, 0.12, 0.03, xm),
        }
        self.tubes = self._great_tubes()

    # -- body wall and lungs ----------------------------------------------------------------

    def _wall_parts(self, sin_t: Any, cos_t: Any) -> tuple[Any, Any, Any]:
        """Skin + fat depth, and the wall thickness (skin, fat, muscle, ribs) without the
        shoulder girdle, and the weight of the shoulder girdle, at a polar direction."""
        p = self.p
        ant = np.maximum(-cos_t, 0.0)
        post = np.maximum(cos_t, 0.0)
        fat_depth = self.skin + p.fat_mm * (0.65 + 0.5 * np.abs(sin_t) + 0.25 * ant)
        muscle = p.muscle_mm * (1.0 + 1.6 * post**2 + 0.8 * ant * np.abs(sin_t))
        return fat_depth, fat_depth + muscle + self.rib_t, sin_t**2

    def _shoulder(self, z: Any) -> Any:
        """Extra lateral muscle thickness of the shoulder girdle (mm) at height z."""
        return 45.0 * self.s * np.clip((z - 0.12 * self.h) / (0.4 * self.h), 0.0, 1.0) ** 1.5

    def _widen(self, z: Any) -> Any:
        return 1.0 + 0.05 * np.clip(-z / self.h, -0.5, 1.0)

    def plane(self, y: Any, x: Any) -> _PlaneCache:
        """Everything about points (y, x) that does not depend on z (arrays broadcastable)."""
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        b = np.where(y > 0, self.b_post, self.b_ant)
        pw = np.where(y > 0, 3.0, 2.2)
        hyp = np.sqrt(x * x + y * y) + 1e-6
        r0 = np.maximum(((np.abs(x) / self.a) ** pw + (np.abs(y) / b) ** pw) ** (1.0 / pw), 1e-6)
        sin_t, cos_t = x / hyp, y / hyp
        fat_depth, wall_base, sin2 = self._wall_parts(sin_t, cos_t)
        # Mediastinal band, spine zone, diaphragm, apical caps, heart (in-plane parts).
        y_mc = 0.5 * (self.y_sternum + self.y_vb)
        span = 0.3 * (self.y_vb - self.y_sternum)
        band_w = self.s * (9.0 + 22.0 * np.exp(-(((y - y_mc) / span) ** 2)))
        rx, ry = self.vb_r
        spine = (((x / (rx + 5.0)) ** 2 + ((y - self.y_vb) / (ry + 5.0)) ** 2) < 1.0) | (
            (np.abs(x) < rx + 3.0) & (y > self.y_vb)
        )
        right = x < self.x_mid
        top = np.where(right, self.z_dome_r, self.z_dome_l)
        xd = np.where(right, -0.42 * self.a, 0.42 * self.a)
        rho2 = ((x - xd) / (0.6 * self.a)) ** 2 + (
            (y + 0.2 * self.b_ant) / (0.85 * self.b_post)
        ) ** 2
        dome = top - (top - self.z_base) * np.minimum(rho2, 1.4)
        apex_d2 = (x - xd) ** 2 + (0.9 * (y - 0.15 * self.b_post)) ** 2
        _, cy, cx = self.heart_c
        c, sn = math.cos(self.heart_rot), math.sin(self.heart_rot)
        u = (x - cx) * c + (y - cy) * sn
        v = -(x - cx) * sn + (y - cy) * c
        ax, ay, _ = self.heart_axes
        return _PlaneCache(
            y=y,
            x=x,
            hyp=hyp,
            r0=r0,
            sin_t=sin_t,
            cos_t=cos_t,
            theta=np.arctan2(np.abs(sin_t), cos_t) / math.pi,
            fat_depth=fat_depth,
            wall_base=wall_base,
            sin2=sin2,
            band=np.abs(x - self.x_mid) / band_w,
            spine=spine,
            right=right,
            dome=dome,
            apex_d2=apex_d2,
            heart_uv=(u / ax) ** 2 + (v / ay) ** 2,
            pericardium_uv=(u / (ax + 6.0)) ** 2 + (v / (ay + 6.0)) ** 2,
        )

    def depth_and_wall(self, pc: _PlaneCache, z: Any) -> tuple[Any, Any]:
        """Depth below the skin and thickness of the chest wall (mm) at height z."""
        depth = pc.hyp * (self._widen(z) / pc.r0 - 1.0)
        return depth, pc.wall_base + self._shoulder(z) * pc.sin2

    def heart_q(self, pc: _PlaneCache, z: Any, *, pericardium: bool = False) -> Any:
        """Squared normalised radius of the heart (or its pericardial fat) ellipsoid."""
        az = self.heart_axes[2] + (6.0 if pericardium else 0.0)
        uv = pc.pericardium_uv if pericardium else pc.heart_uv
        return uv + ((z - self.heart_c[0]) / az) ** 2

    def lung_in_plane(self, pc: _PlaneCache, z: Any) -> Any:
        """0 outside the lungs, 1 right, 2 left, ignoring the great vessels and airways."""
        depth, wall = self.depth_and_wall(pc, z)
        upper = 1.0 + 0.35 * np.clip((z - self.z_carina) / (0.25 * self.h), 0.0, 1.0)
        cap = 0.62 * self.a * np.sqrt(np.clip((self.z_apex - z) / (0.3 * self.h), 0.0, 1.0))
        lung = (
            (depth > wall)
            & (pc.band >= upper)
            & ~pc.spine
            & (self.heart_q(pc, z, pericardium=True) > 1.0)
            & (z > pc.dome)
            & (pc.apex_d2 < cap**2)
        )
        return np.where(lung, np.where(pc.right, 1, 2), 0).astype(np.uint8)

    def lung_side(self, y: Any, x: Any, z: Any, *, with_tubes: bool = True) -> Any:
        """0 outside the lungs, 1 right lung, 2 left lung, at arbitrary broadcastable points."""
        y, x, z = np.broadcast_arrays(
            np.asarray(y, dtype=np.float64),
            np.asarray(x, dtype=np.float64),
            np.asarray(z, dtype=np.float64),
        )
        side = self.lung_in_plane(self.plane(y, x), z)
        if with_tubes and side.any():
            pts = np.stack([z, y, x], axis=-1).reshape(-1, 3)
            blocked = np.zeros(pts.shape[0], dtype=bool)
            for segs, pad in self.tubes.values():
                blocked |= self._near_segments(pts, segs, pad)
            side = np.where(blocked.reshape(side.shape), 0, side).astype(np.uint8)
        return side

    @staticmethod
    def _near_segments(pts: F64, segs: F64, pad: float) -> Bool:
        out = np.zeros(pts.shape[0], dtype=bool)
        for seg in segs:
            r = max(seg[6], seg[7]) + pad
            lo = np.minimum(seg[0:3], seg[3:6]) - r
            hi = np.maximum(seg[0:3], seg[3:6]) + r
            cand = np.all((pts >= lo) & (pts <= hi), axis=1)
            if not cand.any():
                continue
            q = pts[cand]
            d = _segment_distance(q[:, 0], q[:, 1], q[:, 2], seg[0:3], seg[3:6], seg[6], seg[7])
            out[np.flatnonzero(cand)[d < pad]] = True
        return out

    def lobe(self, y: float, x: float, z: float) -> Lobe:
        """The lobe a point of the lungs belongs to, from the fissure planes."""
        if x < self.x_mid:
            if z < self.fissures["R_oblique"].height(x, y):
                return Lobe.RLL
            return Lobe.RUL if z > self.fissures["R_horizontal"].height(x, y) else Lobe.RML
        return Lobe.LLL if z < self.fissures["L_oblique"].height(x, y) else Lobe.LUL

    # -- great vessels and central airways ---------------------------------------------------

    def _great_tubes(self) -> dict[str, tuple[F64, float]]:
        """Capsule segments (Z, Y, X) and the fat pad around each of the mediastinal tubes."""
        s = self.s
        zc, zt = self.z_carina, self.z_apex + 120.0
        yt = self.y_trachea
        hz, hy, hx = self.heart_c
        yvb = self.y_vb - self.vb_r[1]

        def pts(*p: Vec3) -> list[Vec3]:
            return [(z, y, x) for (x, y, z) in p]  # written (X, Y, Z) below for readability

        tubes: dict[str, tuple[F64, float]] = {}
        tubes["aorta"] = (
            _catmull_rom(
                pts(
                    (hx - 12 * s, hy + 12 * s, hz + 20 * s),
                    (-8 * s, -0.3 * self.b_ant, zc - 5 * s),
                    (-2 * s, yt - 18 * s, zc + 28 * s),
                    (16 * s, yvb + 2 * s, zc + 20 * s),
                    (20 * s, yvb + 6 * s, zc - 20 * s),
                    (16 * s, yvb + 6 * s, self.z_base - 80.0),
                ),
                [14 * s, 15 * s, 13 * s, 12 * s, 11.5 * s, 11 * s],
            ),
            4.0 * s,
        )
        tubes["pulmonary_trunk"] = (
            _catmull_rom(
                pts(
                    (hx + 8 * s, hy - 30 * s, hz + 30 * s),
                    (20 * s, -0.35 * self.b_ant, zc - 18 * s),
                    (8 * s, yt - 14 * s, zc - 8 * s),
                ),
                [13 * s, 13 * s, 12 * s],
            ),
            3.0 * s,
        )
        tubes["right_pa"] = (
            _catmull_rom(
                pts(
                    (8 * s, yt - 14 * s, zc - 8 * s),
                    (-20 * s, yt - 6 * s, zc - 12 * s),
                    (-40 * s, yt, zc - 18 * s),
                ),
                [10 * s, 9.5 * s, 8 * s],
            ),
            2.0 * s,
        )
        tubes["left_pa"] = (
            _catmull_rom(
                pts(
                    (8 * s, yt - 14 * s, zc - 8 * s),
                    (26 * s, yt - 2 * s, zc + 2 * s),
                    (40 * s, yt + 8 * s, zc - 8 * s),
                ),
                [9.5 * s, 9 * s, 7.5 * s],
            ),
            2.0 * s,
        )
        tubes["svc"] = (
            _catmull_rom(
                pts(
                    (-24 * s, -0.15 * self.b_ant, zt),
                    (-22 * s, -0.12 * self.b_ant, zc),
                    (-18 * s, hy, hz + 30 * s),
                ),
                [9 * s, 10 * s, 10 * s],
            ),
            3.0 * s,
        )
        tubes["pulmonary_veins"] = (
            np.vstack(
                [
                    _catmull_rom(
                        pts(
                            (hx - 10 * s, hy + 38 * s, hz + 22 * s),
                            (side * 42 * s, hy + 48 * s, hz + 26 * s),
                        ),
                        [7 * s, 6 * s],
                    )
                    for side in (-1.0, 1.0)
                ]
            ),
            1.5 * s,
        )
        tubes["trachea"] = (
            _catmull_rom(pts((0.0, yt, zt), (0.0, yt + 4 * s, zc)), [9 * s, 9 * s]),
            2.5 * s,
        )
        tubes["bronchi"] = (
            np.vstack(
                [
                    _catmull_rom(
                        pts((0.0, yt + 4 * s, zc), (-28 * s, yt + 10 * s, zc - 18 * s)),
                        [6.5 * s, 6 * s],
                    ),
                    _catmull_rom(
                        pts((0.0, yt + 4 * s, zc), (40 * s, yt + 14 * s, zc - 28 * s)),
                        [5.5 * s, 5 * s],
                    ),
                ]
            ),
            2.0 * s,
        )
        # Branches of the aortic arch and the brachiocephalic veins, up to the thoracic inlet.
        arch_top = zc + 28 * s
        tubes["arch_branches"] = (
            np.vstack(
                [
                    _catmull_rom(
                        pts((x0, yt - 18 * s + dy, arch_top), (x1, yt - 8 * s + dy, zt)),
                        [r, 0.9 * r],
                    )
                    for x0, x1, dy, r in (
                        (-8 * s, -16 * s, -4 * s, 6.0 * s),
                        (2 * s, 6 * s, 0.0, 4.2 * s),
                        (12 * s, 24 * s, 6 * s, 4.8 * s),
                    )
                ]
            ),
            2.0 * s,
        )
        tubes["brachiocephalic_veins"] = (
            np.vstack(
                [
                    _catmull_rom(
                        pts(
                            (-24 * s, -0.15 * self.b_ant, zc + 55 * s),
                            (-30 * s, -0.1 * self.b_ant, zt),
                        ),
                        [8 * s, 7 * s],
                    ),
                    _catmull_rom(
                        pts(
                            (-22 * s, -0.18 * self.b_ant, zc + 55 * s),
                            (10 * s, -0.3 * self.b_ant, zc + 62 * s),
                            (34 * s, -0.12 * self.b_ant, zt),
                        ),
                        [6 * s, 6 * s, 6 * s],
                    ),
                ]
            ),
            2.0 * s,
        )
        tubes["oesophagus"] = (
            _catmull_rom(
                pts((4 * s, yvb - 7 * s, zt), (6 * s, yvb - 8 * s, self.z_base - 80.0)),
                [7 * s, 7 * s],
            ),
            2.0 * s,
        )
        return tubes

    # -- one axial slice -------------------------------------------------------------------

    def static_layers(self, pc: _PlaneCache) -> dict[str, Any]:
        """In-plane masks of structures whose cross-section does not change with z."""
        s, x, y = self.s, pc.x, pc.y
        y_table = self.b_post + 12.0 - 25.0 * (x / 300.0) ** 2
        dt = y - y_table
        on_table = np.abs(x) < 0.95 * self.a + 30.0
        rx, ry = self.vb_r
        canal_q = (x / (8.0 * s)) ** 2 + ((y - self.y_canal) / (8.0 * s)) ** 2
        spinous = (
            (np.abs(x) < 3.5 * s) & (y > self.y_canal + 9.0 * s) & (y < self.y_canal + 26.0 * s)
        )
        return {
            "foam": on_table & (dt >= 0) & (dt < 30.0),
            "shell": on_table & (((dt >= 0) & (dt < 2.0)) | ((dt >= 28.0) & (dt < 30.0))),
            "vb_q": (x / rx) ** 2 + ((y - self.y_vb) / ry) ** 2,
            "canal": canal_q < 1.0,
            "arch": ((canal_q < 2.2) & (canal_q >= 1.0) & (y > self.y_canal - 2.0 * s)) | spinous,
            "sternum_q": (x / (14.0 * s)) ** 2 + ((y - self.y_sternum) / (6.0 * s)) ** 2,
            "gravity": 55.0
            * np.clip((y + 0.6 * self.b_ant) / (self.b_ant + self.b_post), 0.0, 1.0) ** 2,
            "spleen_side": ~pc.right & (y > -0.1 * self.b_ant),
            "stomach_side": ~pc.right & (y <= -0.1 * self.b_ant),
            "fundus_x": x > 25.0 * s,
        }

    def paint_slice(
        self, z: float, pc: _PlaneCache, layers: dict[str, Any], *, lung_texture: F32
    ) -> tuple[F32, U8, U8]:
        """HU, tissue and lung side of the large anatomy on one axial plane (no tubes)."""
        s = self.s
        depth, wall = self.depth_and_wall(pc, z)
        hu = np.full(depth.shape, _HU_AIR, dtype=np.float32)
        tissue = np.zeros(depth.shape, dtype=np.uint8)

        def paint(region: Any, value: Any, cls: Tissue) -> None:
            hu[region] = value if np.ndim(value) == 0 else value[region]
            tissue[region] = cls

        # Table below the patient: two carbon skins around a foam core.
        paint(layers["foam"], _HU_FOAM, Tissue.TABLE)
        paint(layers["shell"], _HU_TABLE, Tissue.TABLE)
        body = depth > 0
        paint(body, _HU_SKIN, Tissue.SOFT_TISSUE)
        paint(body & (depth > self.skin) & (depth < pc.fat_depth), _HU_FAT, Tissue.FAT)
        paint(body & (depth >= pc.fat_depth), _HU_MUSCLE, Tissue.SOFT_TISSUE)
        # Thin intermuscular fat line between the muscle and the rib layer.
        inner = wall - self.rib_t
        paint(body & (depth > inner - 2.0 * s) & (depth < inner - 0.8 * s), _HU_FAT, Tissue.FAT)
        self._paint_ribs(z, depth, wall, pc.theta, paint)
        self._paint_scapulae(z, depth, wall, pc.theta, paint)

        cavity = depth >= wall
        above = z > pc.dome
        lung = self.lung_in_plane(pc, z)
        # Cavity default: mediastinal fat; abdomen below the diaphragm.
        paint(cavity & above, _HU_FAT, Tissue.FAT)
        below = cavity & ~above
        paint(below & pc.right, _HU_LIVER, Tissue.ORGAN)
        paint(below & layers["spleen_side"], _HU_SPLEEN, Tissue.ORGAN)
        stomach = below & layers["stomach_side"]
        paint(stomach, _HU_STOMACH, Tissue.ORGAN)
        paint(stomach & (pc.dome - z < 22.0 * s) & layers["fundus_x"], _HU_AIR, Tissue.AIR)
        # Diaphragm muscle sheet.
        paint(
            cavity & (np.abs(z - pc.dome) < 3.0 * s) & (lung == 0), _HU_MUSCLE, Tissue.SOFT_TISSUE
        )
        # Heart inside its pericardial fat.
        paint(cavity & (self.heart_q(pc, z) < 1.0), _HU_BLOOD, Tissue.BLOOD)
        # Lungs: denser toward the dependent (posterior) side, with a smooth texture.
        in_lung = lung > 0
        paint(
            in_lung,
            (self.p.lung_hu + layers["gravity"] + lung_texture).astype(np.float32),
            Tissue.LUNG,
        )
        # Spine and sternum.
        phase = z / (27.0 * s) + self.p.disc_phase
        vb_q = layers["vb_q"]
        if (phase - math.floor(phase)) < 0.2:
            paint(vb_q < 1.0, _HU_DISC, Tissue.ORGAN)
        else:
            paint(vb_q < 1.0, _HU_CORTEX * self.bone_gain, Tissue.BONE)
            paint(vb_q < 0.78, _HU_MARROW * self.bone_gain, Tissue.MARROW)
        paint(layers["arch"], _HU_CORTEX * 0.8 * self.bone_gain, Tissue.BONE)
        paint(layers["canal"], _HU_CSF, Tissue.ORGAN)
        if self.heart_c[0] - 0.2 * self.heart_axes[2] < z < self.z_apex + 10.0 * s:
            st_q = layers["sternum_q"]
            paint(st_q < 1.0, _HU_CORTEX * self.bone_gain, Tissue.BONE)
            paint(st_q < 0.5, _HU_MARROW * self.bone_gain, Tissue.MARROW)
        return hu, tissue, lung

    def _paint_ribs(self, z: float, depth: Any, wall: Any, theta: Any, paint: Any) -> None:
        """Ribs slope down from the spine to the costal cartilages: in an axial plane they are
        short elliptical segments, several per side."""
        s = self.s
        if z > self.z_apex + 30.0 * s:
            return
        period, height, drop = 24.0 * s, 10.0 * s, 110.0 * s
        phase = (z + drop * theta) / period + self.p.rib_phase
        v = (phase - np.floor(phase) - 0.5) * period / (0.5 * height)
        u = (depth - (wall - 0.5 * self.rib_t)) / (0.4 * self.rib_t)
        rr = u * u + v * v
        rib = (rr < 1.0) & (theta > 0.06) & (theta < 0.93)
        cartilage = rib & (theta > 0.8)
        bone = rib & ~cartilage
        paint(bone, _HU_CORTEX * self.bone_gain, Tissue.BONE)
        paint(bone & (rr < 0.45), _HU_MARROW * self.bone_gain, Tissue.MARROW)
        paint(cartilage, _HU_CARTILAGE, Tissue.CARTILAGE)

    def _paint_scapulae(self, z: float, depth: Any, wall: Any, theta: Any, paint: Any) -> None:
        if z < self.z_apex - 0.55 * self.h:
            return
        inner = wall - self.rib_t
        plate = (
            (theta > 0.18)
            & (theta < 0.38)
            & (depth > inner - 9.0 * self.s)
            & (depth < inner - 5.0 * self.s)
        )
        paint(plate, _HU_CORTEX * 0.7 * self.bone_gain, Tissue.BONE)


# ----------------------------------------------------------------------------------------------
# Branching trees


def _unit(v: F64) -> F64:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.asarray(v / np.maximum(n, 1e-9), dtype=np.float64)


def _attractors(anatomy: _Anatomy, rng: np.random.Generator, side: int, spacing: float) -> F64:
    """Random points filling one lung, about one per ``spacing``^3 mm^3, as (n, 3) Z, Y, X."""
    a = anatomy
    lo = np.array([a.z_base, -a.b_ant, -a.a if side == 1 else a.x_mid])
    hi = np.array([a.z_apex, a.b_post, a.x_mid if side == 1 else a.a])
    n = int(np.prod(hi - lo) / spacing**3)
    pts = lo + rng.uniform(size=(n, 3)) * (hi - lo)
    keep = a.lung_side(pts[:, 1], pts[:, 2], pts[:, 0], with_tubes=False) == side
    return np.asarray(pts[keep], dtype=np.float64)


def _enter_lung(anatomy: _Anatomy, point: Vec3, side: int) -> F64 | None:
    """The first point of the lung met walking laterally from ``point`` (Z, Y, X)."""
    p = np.array(point, dtype=np.float64)
    step = np.array([0.0, 0.0, -1.5 if side == 1 else 1.5])
    walk = p[None, :] + np.arange(60)[:, None] * step[None, :]
    sides = anatomy.lung_side(walk[:, 1], walk[:, 2], walk[:, 0], with_tubes=False)
    hit = np.flatnonzero(sides == side)
    return walk[hit[0]] if hit.size else None


def _colonise(
    anatomy: _Anatomy,
    rng: np.random.Generator,
    *,
    roots: list[F64],
    attractors: F64,
    side: int,
    step: float,
    r_leaf: float,
    max_iterations: int = 150,
) -> F64:
    """Grow a vessel tree by space colonisation and give it Murray's-law radii.

    Every iteration each attractor pulls the node nearest to it; each pulled node grows one
    ``step`` toward the mean direction of its attractors (if the new node stays in the lung),
    and attractors closer than two steps to a node are consumed. Radii then follow Murray's law
    from the leaves (``r_leaf``) up: r_parent^3 = sum of r_child^3, so the tree tapers toward
    the periphery. Chains of nodes without branches are merged into longer capsules.

    Returns
    -------
    ndarray, shape (n, 8)
        Capsules p0 (Z, Y, X), p1 (Z, Y, X), r0, r1 in mm.
    """
    from scipy.spatial import cKDTree  # type: ignore[import-untyped, unused-ignore]

    nodes = [np.asarray(r, dtype=np.float64) for r in roots]
    parent = [-1] * len(nodes)
    pos = np.vstack(nodes)
    alive = attractors
    kill = 2.0 * step
    for _ in range(max_iterations):
        if alive.shape[0] == 0:
            break
        dist, idx = cKDTree(pos).query(alive)
        consumed = dist < kill
        alive, idx = alive[~consumed], idx[~consumed]
        if alive.shape[0] == 0:
            break
        pull = _unit(alive - pos[idx])
        total = np.zeros_like(pos)
        np.add.at(total, idx, pull)
        growing = np.unique(idx)
        direction = _unit(total[growing] + rng.normal(0.0, 0.15, (growing.size, 3)))
        new = pos[growing] + step * direction
        ok = anatomy.lung_side(new[:, 1], new[:, 2], new[:, 0], with_tubes=False) == side
        if not ok.any():
            break
        parent.extend(int(g) for g in growing[ok])
        pos = np.vstack([pos, new[ok]])
    return _murray_capsules(pos, np.asarray(parent), r_leaf)


def _murray_capsules(pos: F64, par: npt.NDArray[np.int_], r_leaf: float) -> F64:
    """Capsules of a tree of nodes (``par[i]`` is the parent of node ``i``, -1 at roots, parents
    before children) with Murray's-law radii; single-child chains merged up to four steps."""
    n = pos.shape[0]
    r3 = np.zeros(n)
    children = np.zeros(n, dtype=np.int64)
    np.add.at(children, par[par >= 0], 1)
    for i in range(n - 1, -1, -1):
        if children[i] == 0:
            r3[i] = r_leaf**3
        if par[i] >= 0:
            r3[par[i]] += r3[i]
    radius = np.cbrt(r3)
    # Merge single-child chains (same radius) into capsules of up to four steps.
    segs: list[tuple[int, int]] = []
    start = {i: i for i in range(n)}
    run = np.zeros(n, dtype=np.int64)
    for i in range(n):
        p = par[i]
        if p < 0:
            continue
        s0 = start[p] if children[p] == 1 and par[p] >= 0 and run[p] < 4 else p
        run[i] = run[p] + 1 if s0 != p else 1
        start[i] = s0
        if children[i] != 1:
            segs.append((s0, i))
        elif run[i] >= 4:
            segs.append((s0, i))
            start[i] = i
            run[i] = 0
    if not segs:
        return np.zeros((0, 8))
    a_idx = np.array([s[0] for s in segs])
    b_idx = np.array([s[1] for s in segs])
    rb = radius[b_idx]
    return np.column_stack([pos[a_idx], pos[b_idx], rb, rb])


def _trees(anatomy: _Anatomy, rng: np.random.Generator, *, pixel_mm: float) -> tuple[F64, F64, F64]:
    """Pulmonary arteries, veins and airways of both lungs as capsules (n, 8).

    Arteries and veins grow from the hila toward separate sets of attractors, so that they
    interleave; each bronchus runs beside its artery (about 0.8 of its radius, offset sideways)
    down to about 1 mm radius.
    """
    a = anatomy
    s = a.s
    zc, yt = a.z_carina, a.y_trachea
    hz, hy, _ = a.heart_c
    step = max(3.0, 1.6 * pixel_mm)
    spacing = max(9.0, 3.0 * pixel_mm)
    r_leaf = max(0.45, 0.4 * pixel_mm)
    arteries: list[F64] = []
    veins: list[F64] = []
    airways: list[F64] = []
    for side, sx in ((1, -1.0), (2, 1.0)):
        for kind, origins in (
            ("artery", [(zc - 18.0 * s, yt + 2.0 * s, sx * 36.0 * s)]),
            (
                "vein",
                [
                    (hz + 30.0 * s, hy + 42.0 * s, sx * 38.0 * s),
                    (zc - 40.0 * s, hy + 20.0 * s, sx * 36.0 * s),
                ],
            ),
        ):
            roots = [r for r in (_enter_lung(a, o, side) for o in origins) if r is not None]
            if not roots:
                continue
            segs = _colonise(
                a,
                rng,
                roots=roots,
                attractors=_attractors(a, rng, side, spacing),
                side=side,
                step=step,
                r_leaf=r_leaf,
            )
            (arteries if kind == "artery" else veins).append(segs)
            if kind == "artery":
                axis = _unit(segs[:, 3:6] - segs[:, 0:3])
                off = _unit(np.cross(axis, np.array([1.0, 0.0, 0.0])) + 1e-6)
                offset = off * (1.8 * segs[:, 6:7] + 0.5)
                air = segs.copy()
                air[:, 0:3] += offset
                air[:, 3:6] += offset
                air[:, 6:8] *= 0.8
                airways.append(air[air[:, 6] >= max(1.0, 0.7 * pixel_mm)])

    def stack(parts: list[F64]) -> F64:
        return np.vstack(parts) if parts else np.zeros((0, 8))

    return stack(arteries), stack(veins), stack(airways)


# ----------------------------------------------------------------------------------------------
# Lesions and look-alikes


def _random_rotation(rng: np.random.Generator) -> F64:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return np.asarray(q * np.sign(np.diag(r)), dtype=np.float64)


@dataclass(frozen=True)
class _Blob:
    """A lesion-like shape in its own frame; ``distance`` is a signed distance in mm."""

    centre: F64  # Z, Y, X body frame
    kind: str
    radius: float
    axes: F64 = field(default_factory=lambda: np.ones(3))
    rotation: F64 = field(default_factory=lambda: np.eye(3))
    lobes: F64 = field(default_factory=lambda: np.zeros((0, 4)))  # (cz, cy, cx, r) offsets
    spicules: F64 = field(default_factory=lambda: np.zeros((0, 8)))  # capsules, offsets
    waves: F64 = field(default_factory=lambda: np.zeros((0, 5)))  # (kz, ky, kx, phase, amp)

    def extent(self) -> float:
        ext = self.radius * float(np.max(self.axes))
        if self.spicules.size:
            tips = np.linalg.norm(self.spicules[:, 3:6], axis=1) + self.spicules[:, 7]
            ext = max(ext, float(tips.max()))
        return ext

    def distance(self, z: F64, y: F64, x: F64) -> F64:
        pz, py, px = z - self.centre[0], y - self.centre[1], x - self.centre[2]
        if self.lobes.size:
            dist: F64 | None = None
            for lz, ly, lx, lr in self.lobes:
                d = np.sqrt((pz - lz) ** 2 + (py - ly) ** 2 + (px - lx) ** 2) - lr
                dist = d if dist is None else np.minimum(dist, d)
            assert dist is not None
        else:
            rot = self.rotation
            u = (rot[0, 0] * pz + rot[1, 0] * py + rot[2, 0] * px) / self.axes[0]
            v = (rot[0, 1] * pz + rot[1, 1] * py + rot[2, 1] * px) / self.axes[1]
            w = (rot[0, 2] * pz + rot[1, 2] * py + rot[2, 2] * px) / self.axes[2]
            q = np.sqrt(u * u + v * v + w * w) / self.radius
            if self.waves.size:
                mod = np.zeros_like(q)
                for kz, ky, kx, ph, amp in self.waves:
                    mod = mod + amp * np.cos((kz * pz + ky * py + kx * px) / self.radius + ph)
                q = q * (1.0 - mod)
            dist = (q - 1.0) * self.radius * float(np.min(self.axes))
        for sp in self.spicules:
            d = _segment_distance(pz, py, px, sp[0:3], sp[3:6], sp[6], sp[7])
            dist = np.minimum(dist, d)
        return dist


def _tumour_shapes(
    kind: TumourKind, centre: F64, diameter: float, rng: np.random.Generator
) -> tuple[_Blob, _Blob | None, float]:
    """The outer body of a tumour, its solid core for part-solid ones, and the core diameter."""
    radius = diameter / 2.0
    rot = _random_rotation(rng)
    axes = np.array([1.0, rng.uniform(0.82, 1.0), rng.uniform(0.8, 1.0)])
    waves = np.column_stack(
        [rng.normal(0.0, 2.5, (4, 3)), rng.uniform(0, 2 * math.pi, 4), rng.uniform(0.01, 0.04, 4)]
    )
    if kind is TumourKind.LOBULATED:
        n = int(rng.integers(3, 7))
        dirs = _unit(rng.normal(size=(n, 3)))
        dirs[1] = -dirs[0]
        radii = radius * rng.uniform(0.42, 0.62, n)
        offsets = dirs * (radius - radii)[:, None]
        offsets[2:] *= rng.uniform(0.3, 1.0, (n - 2, 1))
        lobes = np.column_stack([offsets, radii])
        return _Blob(centre, "lobulated", radius, lobes=lobes), None, diameter
    if kind is TumourKind.SPICULATED:
        n = int(rng.integers(6, 16))
        dirs = _unit(rng.normal(size=(n, 3)))
        start = dirs * (0.8 * radius)
        length = radius * rng.uniform(0.35, 0.8, n)
        tips = dirs * (0.8 * radius + length)[:, None] + rng.normal(0, 0.1 * radius, (n, 3))
        thick = np.clip(rng.uniform(0.5, 1.0, n) * radius * 0.12, 0.35, 1.2)
        spic = np.column_stack([start, tips, thick, 0.25 * thick])
        core = _Blob(centre, "spiculated", radius, axes, rot, waves=waves * 1.5, spicules=spic)
        return core, None, diameter
    if kind is TumourKind.PART_SOLID:
        outer = _Blob(centre, "ggo", radius, axes, rot, waves=waves)
        core_d = diameter * float(rng.uniform(0.3, 0.6))
        shift = _unit(rng.normal(size=3)) * radius * 0.15
        core = _Blob(centre + shift, "solid", core_d / 2.0, waves=waves)
        return outer, core, core_d
    name = "ggo" if kind is TumourKind.GROUND_GLASS else "solid"
    return (
        _Blob(centre, name, radius, axes, rot, waves=waves),
        None,
        (0.0 if kind is TumourKind.GROUND_GLASS else diameter),
    )


def _blob_occupancy(
    grid: _Grid, blob: _Blob, soft_mm: float | None = None
) -> tuple[tuple[slice, slice, slice], F32] | None:
    ext = blob.extent() + 2.0 * grid.pixel
    box = _bbox(grid, blob.centre - ext, blob.centre + ext)
    if box is None:
        return None
    z, y, x = _local_coords(grid, box)
    occ = _soft(blob.distance(z, y, x), soft_mm or grid.pixel).mean(axis=1)
    return box, occ.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The imaging chain


def _nps_filter(shape: tuple[int, int], spacing: tuple[float, float], sharpness: float) -> F32:
    """Amplitude filter (rfft layout) that turns unit white noise into CT-like noise of unit SD.

    The noise power spectrum of filtered back-projection rises with the ramp filter and falls
    with the kernel's apodisation: NPS(f) ~ f * exp(-2 (f / fc)^2), peaking at fc / 2 cycles/mm.
    Sharper kernels move fc up.
    """
    fy = np.fft.fftfreq(shape[0], d=spacing[0])[:, None]
    fx = np.fft.fftfreq(shape[1], d=spacing[1])[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    fc = 0.45 + 1.0 * sharpness
    amp = np.sqrt(f) * np.exp(-((f / fc) ** 2)) + 0.02
    amp /= math.sqrt(float(np.mean(amp * amp)))
    return np.asarray(amp[:, : shape[1] // 2 + 1], dtype=np.float32)


def _imaging_chain(
    hu: F32, grid: _Grid, site: SiteParameters, patient: PatientParameters, rng: np.random.Generator
) -> F32:
    """Blur by the kernel's PSF, edge enhancement, correlated noise, calibration, FOV padding."""
    dz, dy, dx = grid.spacing
    sharp = site.kernel_sharpness
    psf_mm = 0.75 - 0.45 * sharp
    ndimage.gaussian_filter(hu, (0.0, psf_mm / dy, psf_mm / dx), output=hu, truncate=3.0)
    if sharp > 0.5:
        gain = 1.6 * (sharp - 0.5)
        low = ndimage.gaussian_filter(hu, (0.0, 1.2 / dy, 1.2 / dx), truncate=3.0)
        hu += np.float32(gain) * (hu - low)
        del low
    sd = site.noise_sd_hu * patient.scale**2
    if sd > 0:
        noise = rng.standard_normal(hu.shape, dtype=np.float32)
        spectrum = sfft.rfft2(noise, axes=(1, 2), workers=1)
        spectrum *= _nps_filter(hu.shape[1:], (dy, dx), sharp)[None]
        noise = sfft.irfft2(spectrum, s=hu.shape[1:], axes=(1, 2), workers=1)
        del spectrum
        overlap = max(0.0, site.slice_thickness_mm - dz) / dz
        if overlap > 0.05 and hu.shape[0] > 1:
            ndimage.gaussian_filter1d(noise, 0.5 * overlap, axis=0, output=noise, truncate=2.5)
        sample = noise[:: max(1, hu.shape[0] // 8), ::4, ::4]
        noise *= np.float32(sd / max(float(sample.std()), 1e-6))
        hu += noise
        del noise
    hu += np.float32(1000.0)
    hu *= np.float32(1.0 + site.hu_gain)
    hu += np.float32(site.hu_offset - 1000.0)
    if site.outside_fov_hu is not None:
        ny, nx = hu.shape[1:]
        yy = (np.arange(ny) - (ny - 1) / 2.0)[:, None] * dy
        xx = (np.arange(nx) - (nx - 1) / 2.0)[None, :] * dx
        outside = yy * yy + xx * xx > (0.5 * min(ny * dy, nx * dx)) ** 2
        hu[:, outside] = np.float32(site.outside_fov_hu)
    return hu


# ----------------------------------------------------------------------------------------------
# The generator


@dataclass
class _Scene:
    """Mutable working state of one phantom while it is generated."""

    grid: _Grid
    anatomy: _Anatomy
    hu: F32
    tissue: U8
    lung: U8
    tumour_mask: U8
    lookalike_mask: U8
    to_lps: F64  # (X, Y, Z) offset from the body frame to LPS

    def lps(self, zyx: F64) -> Vec3:
        return (
            float(zyx[2] + self.to_lps[0]),
            float(zyx[1] + self.to_lps[1]),
            float(zyx[0] + self.to_lps[2]),
        )


def _lung_texture(
    rng: np.random.Generator, grid: _Grid, coarse: int = 40
) -> tuple[F32, tuple[float, float]]:
    """A smooth random field (HU, SD ~12) on a coarse in-plane grid, one plane per slice."""
    nz = grid.shape[0]
    field_ = rng.standard_normal((nz, coarse, coarse)).astype(np.float32)
    sigma_z = max(0.5, 6.0 / grid.spacing[0])
    ndimage.gaussian_filter(field_, (sigma_z, 2.0, 2.0), output=field_, mode="wrap")
    field_ *= np.float32(12.0 / max(float(field_.std()), 1e-6))
    return field_, (grid.shape[1] / coarse, grid.shape[2] / coarse)


def _paint_anatomy(scene: _Scene, rng: np.random.Generator) -> None:
    grid, a = scene.grid, scene.anatomy
    pc = a.plane(grid.axis(1)[:, None], grid.axis(2)[None, :])
    layers = a.static_layers(pc)
    texture, zoom = _lung_texture(rng, grid)
    for k, z in enumerate(grid.axis(0)):
        tex = ndimage.zoom(texture[k], zoom, order=1, mode="nearest", grid_mode=True)
        tex = tex[: grid.shape[1], : grid.shape[2]]
        hu, tissue, lung = a.paint_slice(float(z), pc, layers, lung_texture=tex)
        scene.hu[k], scene.tissue[k], scene.lung[k] = hu, tissue, lung
    # Great vessels and central airways with their fat pads (point-sampled; blurred below),
    # each drawn only in the box its segments cover.
    for name, (segs, pad) in a.tubes.items():
        reach = float(segs[:, 6:8].max()) + pad + grid.pixel
        lo = np.minimum(segs[:, 0:3], segs[:, 3:6]).min(axis=0) - reach
        hi = np.maximum(segs[:, 0:3], segs[:, 3:6]).max(axis=0) + reach
        box = _bbox(grid, lo, hi)
        if box is None:
            continue
        sub = grid.sub(box)
        hu, tissue, lung = scene.hu[box], scene.tissue[box], scene.lung[box]
        occ = np.zeros(sub.shape, dtype=np.float32)
        _draw_segments(occ, sub, segs, grow_mm=pad, substeps=1)
        padded = occ >= 0.5
        fat_here = padded & ((tissue == Tissue.LUNG) | (tissue == Tissue.FAT))
        hu[fat_here] = _HU_FAT
        tissue[fat_here] = Tissue.FAT
        lung[padded] = 0
        parts: list[tuple[float, float, Tissue]] = (
            [(1.0 + 0.2 * a.s, _HU_WALL, Tissue.AIRWAY_WALL), (0.0, _HU_AIR, Tissue.AIR)]
            if name in ("trachea", "bronchi")
            else [(0.0, _HU_MUSCLE, Tissue.SOFT_TISSUE)]
            if name == "oesophagus"
            else [(0.0, _HU_BLOOD, Tissue.BLOOD)]
        )
        for grow, value, cls in parts:
            occ[:] = 0.0
            _draw_segments(occ, sub, segs, grow_mm=grow, substeps=1)
            _composite(hu, occ, value)
            tissue[occ >= 0.5] = cls
    # Partial volume of the large anatomy over the slice profile (a box of the thickness).
    sigma = grid.thickness / math.sqrt(12.0) / grid.spacing[0]
    if sigma > 0.25 and grid.shape[0] > 1:
        ndimage.gaussian_filter1d(scene.hu, sigma, axis=0, output=scene.hu, truncate=2.5)


@dataclass(frozen=True)
class _FissureHit:
    name: str
    centre: F64  # Z, Y, X body frame
    extent_mm: float
    voxels: list[tuple[int, Bool]]  # slice index, in-plane voxels the sheet passes through


def _paint_fissures(scene: _Scene) -> list[_FissureHit]:
    """Thin pleural sheets in the lungs, with analytic partial volume over the slice."""
    grid, a = scene.grid, scene.anatomy
    y = grid.axis(1)[:, None]
    x = grid.axis(2)[None, :]
    zs = grid.axis(0)
    t = grid.thickness
    found: list[_FissureHit] = []
    sheet = 0.4
    for name, plane in a.fissures.items():
        side = 1 if name.startswith("R") else 2
        zf = plane.height(x, y)
        norm = math.sqrt(1.0 + plane.k**2 + plane.m**2)
        h = sheet * norm
        span = h + abs(plane.k) * grid.spacing[1] + abs(plane.m) * grid.spacing[2]
        oblique_r = a.fissures["R_oblique"].height(x, y)
        hits: list[tuple[int, Bool]] = []
        for k, z in enumerate(zs):
            lo = np.maximum(zf - span / 2, z - t / 2)
            hi = np.minimum(zf + span / 2, z + t / 2)
            occ = np.clip(hi - lo, 0.0, None) / t * (h / span)
            region = (scene.lung[k] == side) & (occ > 0)
            if name == "R_horizontal":
                region &= z > oblique_r
            if not region.any():
                continue
            o = occ[region].astype(np.float32)
            plane_hu = scene.hu[k][region]
            scene.hu[k][region] = plane_hu + o * (np.float32(_HU_PLEURA) - plane_hu)
            hits.append((k, region & (np.abs(zf - z) <= max(t, grid.spacing[1]) / 2)))
        if hits:
            pts = [np.column_stack([np.full(int(m.sum()), zs[k]), *np.nonzero(m)]) for k, m in hits]
            nonempty = [p for p in pts if p.size]
            allp = np.vstack(nonempty) if nonempty else np.empty((0, 3))
            if allp.size:
                mid = allp[len(allp) // 2]
                centre = np.array([mid[0], grid.axis(1)[int(mid[1])], grid.axis(2)[int(mid[2])]])
                extent = float(np.ptp(allp[:, 0])) + t
                found.append(_FissureHit(name, centre, extent, hits))
    return found


def _clearance(scene: _Scene) -> tuple[F64, tuple[int, int]]:
    """Distance (mm) from each lung voxel to the lung boundary, on a coarse in-plane grid."""
    grid = scene.grid
    step = max(1, round(2.5 / grid.pixel))
    coarse = scene.lung[:, ::step, ::step] > 0
    sampling = (grid.spacing[0], grid.spacing[1] * step, grid.spacing[2] * step)
    padded = np.pad(coarse, ((1, 1), (0, 0), (0, 0)), constant_values=False)
    dist = ndimage.distance_transform_edt(padded, sampling=sampling)[1:-1]
    return np.asarray(dist, dtype=np.float64), (step, step)


def _point_of(grid: _Grid, idx: tuple[int, int, int], step: tuple[int, int]) -> F64:
    return np.array(
        [grid.axis(0)[idx[0]], grid.axis(1)[idx[1] * step[0]], grid.axis(2)[idx[2] * step[1]]]
    )


def _pick(
    rng: np.random.Generator,
    grid: _Grid,
    clearance: F64,
    step: tuple[int, int],
    *,
    lo: float,
    hi: float,
    avoid: list[tuple[F64, float]],
    z_margin: float,
) -> F64 | None:
    """A random coarse lung voxel centre with clearance in [lo, hi) away from ``avoid``."""
    z = grid.axis(0)
    zr = (z >= z[0] + z_margin) & (z <= z[-1] - z_margin)
    if not zr.any():
        zr[:] = True
    cand = np.argwhere((clearance >= lo) & (clearance < hi) & zr[:, None, None])
    if cand.size == 0:
        return None
    for i in rng.permutation(len(cand))[:200]:
        iz, iy, ix = (int(v) for v in cand[i])
        p = _point_of(grid, (iz, iy, ix), step)
        if all(np.linalg.norm(p - c) > r for c, r in avoid):
            return p
    return None


def _place_tumours(
    scene: _Scene,
    rng: np.random.Generator,
    *,
    vessel_segments: F64,
    n: int,
    diameter_range: Range,
    avoid: list[tuple[F64, float]],
) -> list[TumourSpec]:
    grid = scene.grid
    clearance, step = _clearance(scene)
    coarse_mm = grid.spacing[1] * step[0]
    specs: list[TumourSpec] = []
    kinds = list(TumourKind)
    for _ in range(n):
        kind = kinds[int(rng.integers(0, len(kinds)))]
        diameter = float(
            math.exp(rng.uniform(math.log(diameter_range[0]), math.log(diameter_range[1])))
        )
        radius = diameter / 2.0
        attach = [
            TumourAttachment.FREE,
            TumourAttachment.JUXTAPLEURAL,
            TumourAttachment.JUXTAVASCULAR,
        ][int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
        reach = radius * (1.8 if kind is TumourKind.SPICULATED else 1.0)
        centre: F64 | None = None
        if attach is TumourAttachment.JUXTAVASCULAR and vessel_segments.size:
            centre = _beside_vessel(
                scene, rng, segments=vessel_segments, radius=radius, reach=reach, avoid=avoid
            )
        if attach is TumourAttachment.JUXTAPLEURAL:
            centre = _pick(
                rng,
                grid,
                clearance,
                step,
                lo=0.55 * radius,
                hi=0.55 * radius + coarse_mm + 1.0,
                avoid=avoid,
                z_margin=radius,
            )
        if centre is None:
            attach = TumourAttachment.FREE
            centre = _pick(
                rng, grid, clearance, step, lo=reach + 2.0, hi=1e9, avoid=avoid, z_margin=radius
            )
        if centre is None:
            # A smaller lung region (short scan): shrink to what fits, down to the minimum size.
            centre = _pick(
                rng,
                grid,
                clearance,
                step,
                lo=diameter_range[0] / 2 + 1.0,
                hi=1e9,
                avoid=avoid,
                z_margin=0.0,
            )
            if centre is None:
                logger.debug("no room left for a tumour; %d placed", len(specs))
                break
            ci = _nearest_index(grid, centre)
            room = float(clearance[ci[0], ci[1] // step[0], ci[2] // step[1]])
            diameter = max(diameter_range[0], min(diameter, 2.0 * (room - 1.0)))
            radius = diameter / 2.0
            if kind is TumourKind.SPICULATED:
                kind = TumourKind.SOLID
        label = len(specs) + 1
        spec = _render_tumour(
            scene,
            rng,
            label=label,
            kind=kind,
            attach=attach,
            centre=centre,
            diameter=diameter,
        )
        if spec is None:
            continue
        specs.append(spec)
        avoid.append((centre, reach + 4.0))
    return specs


def _nearest_index(grid: _Grid, p: F64) -> tuple[int, int, int]:
    idx = [
        int(np.clip(round((p[i] - grid.start[i]) / grid.spacing[i]), 0, grid.shape[i] - 1))
        for i in range(3)
    ]
    return idx[0], idx[1], idx[2]


def _beside_vessel(
    scene: _Scene,
    rng: np.random.Generator,
    *,
    segments: F64,
    radius: float,
    reach: float,
    avoid: list[tuple[F64, float]],
) -> F64 | None:
    grid, a = scene.grid, scene.anatomy
    z = grid.axis(0)
    mids = 0.5 * (segments[:, 0:3] + segments[:, 3:6])
    ok = (
        (segments[:, 6] >= 1.2)
        & (segments[:, 6] <= 4.5)
        & (mids[:, 0] > z[0] + radius)
        & (mids[:, 0] < z[-1] - radius)
    )
    cand = np.flatnonzero(ok)
    for i in rng.permutation(cand)[:60]:
        seg = segments[i]
        axis = _unit(seg[3:6] - seg[0:3])
        side_dir = _unit(np.cross(axis, rng.normal(size=3)))
        centre = mids[i] + side_dir * (radius + 0.4 * seg[6])
        probe = centre[None, :] + _unit(rng.normal(size=(12, 3))) * (reach + 1.0)
        pts = np.vstack([centre[None, :], probe])
        sides = a.lung_side(pts[:, 1], pts[:, 2], pts[:, 0])
        if (
            np.all(sides == sides[0])
            and sides[0] > 0
            and all(np.linalg.norm(centre - c) > r + reach for c, r in avoid)
        ):
            return np.asarray(centre, dtype=np.float64)
    return None


def _render_tumour(
    scene: _Scene,
    rng: np.random.Generator,
    *,
    label: int,
    kind: TumourKind,
    attach: TumourAttachment,
    centre: F64,
    diameter: float,
) -> TumourSpec | None:
    grid, a = scene.grid, scene.anatomy
    outer, core, core_d = _tumour_shapes(kind, centre, diameter, rng)
    solid_hu = float(rng.uniform(20.0, 55.0))
    ggo_hu = float(rng.uniform(-680.0, -420.0))
    got = _blob_occupancy(grid, outer, soft_mm=2.0 * grid.pixel if outer.kind == "ggo" else None)
    if got is None:
        return None
    box, occ = got
    lungish = scene.lung[box] > 0
    occ *= lungish
    hu = scene.hu[box]
    if outer.kind == "ggo":
        # Ground glass raises the lung's density; vessels inside keep theirs.
        delta = np.float32(ggo_hu - a.p.lung_hu)
        weight = np.clip((_HU_BLOOD - hu) / (_HU_BLOOD - a.p.lung_hu), 0.0, 1.0)
        hu += occ * delta * weight
        total = occ
    else:
        _composite(hu, occ, solid_hu)
        total = occ
    if core is not None:
        got_core = _blob_occupancy(grid, core)
        if got_core is not None:
            cbox, cocc = got_core
            cocc *= scene.lung[cbox] > 0
            _composite(scene.hu[cbox], cocc, solid_hu)
            full = np.zeros(grid.shape, dtype=np.float32)
            full[box] = total
            np.maximum(full[cbox], cocc, out=full[cbox])
            total = full[box]
    mask = (total >= 0.5) & lungish
    if not mask.any():
        peak = float(total.max())
        if peak <= 0.05:
            return None
        mask = (total >= 0.5 * peak) & lungish
    region = scene.tumour_mask[box]
    region[mask & (region == 0)] = label
    scene.tissue[box][mask] = Tissue.TUMOUR
    side = "R" if centre[2] < a.x_mid else "L"
    return TumourSpec(
        label=label,
        kind=kind,
        attachment=attach,
        centre_mm=scene.lps(centre),
        diameter_mm=round(diameter, 2),
        side=side,
        lobe=a.lobe(float(centre[1]), float(centre[2]), float(centre[0])),
        hu=ggo_hu if kind is TumourKind.GROUND_GLASS else solid_hu,
        solid_diameter_mm=round(core_d, 2),
    )


def _place_lookalikes(
    scene: _Scene,
    rng: np.random.Generator,
    *,
    vessel_segments: F64,
    n: int,
    avoid: list[tuple[F64, float]],
) -> list[LookalikeSpec]:
    grid = scene.grid
    clearance, step = _clearance(scene)
    specs: list[LookalikeSpec] = []
    for _ in range(n):
        kind = [LookalikeKind.VESSEL, LookalikeKind.CALCIFIED_GRANULOMA, LookalikeKind.ATELECTASIS][
            int(rng.integers(0, 3))
        ]
        label = len(specs) + 1
        spec: LookalikeSpec | None = None
        if kind is LookalikeKind.VESSEL:
            spec = _vessel_lookalike(scene, rng, segments=vessel_segments, label=label, avoid=avoid)
        elif kind is LookalikeKind.CALCIFIED_GRANULOMA:
            d = float(rng.uniform(2.5, 8.0))
            p = _pick(rng, grid, clearance, step, lo=d / 2 + 2.0, hi=1e9, avoid=avoid, z_margin=0.0)
            if p is not None:
                spec = _stamp_lookalike(
                    scene,
                    _Blob(p, "solid", d / 2.0),
                    label=label,
                    kind=kind,
                    value=float(rng.uniform(300, 900)),
                    tissue=Tissue.CALCIFICATION,
                    size=d,
                )
        else:
            length = float(rng.uniform(18.0, 50.0))
            p = _pick(
                rng,
                grid,
                clearance,
                step,
                lo=0.25 * length,
                hi=0.25 * length + 6.0,
                avoid=avoid,
                z_margin=0.0,
            )
            if p is not None:
                rot = _random_rotation(rng)
                rot[:, 0] = _unit(rot[:, 0] * np.array([0.35, 1.0, 1.0]))  # long axis ~ axial
                rot, _ = np.linalg.qr(rot)
                axes = np.array([1.0, rng.uniform(0.25, 0.45), rng.uniform(0.06, 0.12)])
                blob = _Blob(p, "solid", length / 2.0, axes, rot)
                spec = _stamp_lookalike(
                    scene,
                    blob,
                    label=label,
                    kind=kind,
                    value=float(rng.uniform(-150, 20)),
                    tissue=Tissue.ATELECTASIS,
                    size=length,
                )
        if spec is not None:
            specs.append(spec)
            avoid.append(
                (
                    np.array(
                        [
                            spec.centre_mm[2] - scene.to_lps[2],
                            spec.centre_mm[1] - scene.to_lps[1],
                            spec.centre_mm[0] - scene.to_lps[0],
                        ]
                    ),
                    spec.size_mm + 3.0,
                )
            )
    return specs


def _stamp_lookalike(
    scene: _Scene,
    blob: _Blob,
    *,
    label: int,
    kind: LookalikeKind,
    value: float,
    tissue: Tissue,
    size: float,
) -> LookalikeSpec | None:
    got = _blob_occupancy(scene.grid, blob)
    if got is None:
        return None
    box, occ = got
    occ *= scene.lung[box] > 0
    occ *= scene.tumour_mask[box] == 0
    if float(occ.max()) <= 0.05:
        return None
    _composite(scene.hu[box], occ, value)
    mask = occ >= min(0.5, 0.5 * float(occ.max()))
    scene.lookalike_mask[box][mask] = label
    scene.tissue[box][mask] = tissue
    side = "R" if blob.centre[2] < scene.anatomy.x_mid else "L"
    return LookalikeSpec(label, kind, scene.lps(blob.centre), round(size, 2), side)


def _vessel_lookalike(
    scene: _Scene,
    rng: np.random.Generator,
    *,
    segments: F64,
    label: int,
    avoid: list[tuple[F64, float]],
) -> LookalikeSpec | None:
    """A vessel running through the slices, which looks like a nodule on each axial image."""
    grid = scene.grid
    z = grid.axis(0)
    axis = _unit(segments[:, 3:6] - segments[:, 0:3])
    mids = 0.5 * (segments[:, 0:3] + segments[:, 3:6])
    ok = (
        (np.abs(axis[:, 0]) > 0.75)
        & (segments[:, 6] >= max(1.0, 0.7 * grid.pixel))
        & (segments[:, 6] <= 3.5)
        & (mids[:, 0] > z[0])
        & (mids[:, 0] < z[-1])
    )
    for i in rng.permutation(np.flatnonzero(ok))[:50]:
        seg = segments[i]
        if not all(np.linalg.norm(mids[i] - c) > r + 4.0 + seg[6] for c, r in avoid):
            continue
        occ = np.zeros(grid.shape, dtype=np.float32)
        _draw_segments(occ, grid, seg[None, :])
        mask = (occ >= 0.5) & (scene.tumour_mask == 0) & (scene.lookalike_mask == 0)
        if not mask.any():
            continue
        scene.lookalike_mask[mask] = label
        side = "R" if mids[i][2] < scene.anatomy.x_mid else "L"
        return LookalikeSpec(
            label, LookalikeKind.VESSEL, scene.lps(mids[i]), round(2.0 * float(seg[6]), 2), side
        )
    return None


def _paint_trees(scene: _Scene, rng: np.random.Generator) -> F64:
    """Draw the pulmonary arteries, veins and airways; return the vessel capsules in the scan."""
    grid = scene.grid
    arteries, veins, airways = _trees(scene.anatomy, rng, pixel_mm=grid.pixel)
    zlo, zhi = grid.axis(0)[0] - 20.0, grid.axis(0)[-1] + 20.0

    def in_scan(segs: F64) -> F64:
        top = np.maximum(segs[:, 0], segs[:, 3])
        bottom = np.minimum(segs[:, 0], segs[:, 3])
        return np.asarray(segs[(top > zlo) & (bottom < zhi)], dtype=np.float64)

    vessels = in_scan(np.vstack([arteries, veins]))
    airways = in_scan(airways)
    in_lung = scene.lung > 0
    occ = np.zeros(grid.shape, dtype=np.float32)
    _draw_segments(occ, grid, vessels)
    _composite(scene.hu, occ, _HU_BLOOD)
    scene.tissue[(occ >= 0.5) & in_lung] = Tissue.BLOOD
    walls = airways.copy()
    walls[:, 6:8] = walls[:, 6:8] * 1.22 + 0.35
    for segs, value, cls in ((walls, _HU_WALL, Tissue.AIRWAY_WALL), (airways, _HU_AIR, Tissue.AIR)):
        occ[:] = 0.0
        _draw_segments(occ, grid, segs)
        _composite(scene.hu, occ, value)
        scene.tissue[(occ >= 0.5) & in_lung] = cls
    return vessels


def _default_grid(
    site: SiteParameters,
    patient: PatientParameters,
    shape_zyx: tuple[int, int, int] | None,
    spacing_mm: Vec3 | None,
) -> tuple[tuple[int, int, int], Vec3]:
    if spacing_mm is not None:
        spacing = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
    elif shape_zyx is None:
        px = site.pixel_spacing_mm
        spacing = (site.slice_spacing_mm, px, px)
    else:
        spacing = (site.slice_spacing_mm, site.fov_mm / shape_zyx[1], site.fov_mm / shape_zyx[2])
    if shape_zyx is None:
        length = patient.lung_height_mm + 50.0
        nz = max(1, math.ceil(length / spacing[0]))
        shape = (nz, site.matrix, site.matrix)
    else:
        shape = (int(shape_zyx[0]), int(shape_zyx[1]), int(shape_zyx[2]))
    if min(shape) < 1 or min(spacing) <= 0:
        raise ValueError(f"shape {shape} and spacing {spacing} must be positive")
    return shape, spacing


def generate_phantom(
    *,
    seed: int,
    shape_zyx: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
    site: SiteParameters | None = None,
    site_distribution: SiteDistribution | None = None,
    tumour_probability: float = 0.5,
    n_tumours: tuple[int, int] = (1, 3),
    tumour_diameter_mm: tuple[float, float] = (4.0, 40.0),
    n_lookalikes: tuple[int, int] = (1, 4),
) -> Phantom:
    """Generate one synthetic chest CT with its ground truth.

    Parameters
    ----------
    seed
        Everything random follows from it: the same seed and arguments give the same phantom.
        The site (when drawn), the patient and the lesions use separate streams, so giving a
        ``site`` explicitly keeps the patient of that seed.
    shape_zyx
        (slices, rows, columns). ``None``: the site's matrix, and slices covering the lungs
        at the site's slice spacing (several hundred slices for a thin-slice site; peak
        working memory is about 7 MB per 512 x 512 slice).
    spacing_mm
        (dz, dy, dx) in mm, overriding the site's slice spacing and pixel spacing (for instance
        large voxels for fast tests). ``None``: from the site (pixel spacing ``fov / columns``).
    site
        Scanner and protocol; ``None`` draws one from ``site_distribution`` (default
        :class:`SiteDistribution`).
    tumour_probability
        Probability that the phantom holds tumours at all.
    n_tumours
        Inclusive range of the number of tumours when it does (fewer if the lungs in the scanned
        range have no room).
    tumour_diameter_mm
        Range of tumour diameters (log-uniform), mm.
    n_lookalikes
        Inclusive range of the number of blob-like look-alikes (end-on vessels, calcified
        granulomas, atelectasis bands); fissures come in addition, wherever the scan crosses
        them.

    Returns
    -------
    Phantom

    Raises
    ------
    ValueError
        If a shape, spacing, probability or range is invalid.
    """
    if not 0.0 <= tumour_probability <= 1.0:
        raise ValueError("tumour_probability must lie in [0, 1]")
    if not 0 <= n_tumours[0] <= n_tumours[1] or not 0 <= n_lookalikes[0] <= n_lookalikes[1]:
        raise ValueError("n_tumours and n_lookalikes must be (min, max) with 0 <= min <= max")
    if not 0 < tumour_diameter_mm[0] <= tumour_diameter_mm[1]:
        raise ValueError("tumour_diameter_mm must be (min, max) with 0 < min <= max")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)]
    r_site, r_patient, r_tree, r_tumour, r_look, r_texture, r_noise = streams
    if site is None:
        site = (site_distribution or SiteDistribution()).sample(r_site)
    patient = PatientParameters.sample(r_patient, site)
    shape, spacing = _default_grid(site, patient, shape_zyx, spacing_mm)
    thickness = max(site.slice_thickness_mm, spacing[0]) if spacing_mm is None else spacing[0]
    substeps = int(np.clip(math.ceil(thickness / max(0.6, 0.75 * min(spacing[1:]))), 1, 6))

    nz, ny, nx = shape
    x0 = -(nx - 1) / 2.0 * spacing[2]
    y0 = -(ny - 1) / 2.0 * spacing[1]
    cx, cy = patient.centre_offset_mm
    zc_offset = float(r_patient.normal(0.0, 10.0))
    grid = _Grid(
        shape=shape,
        spacing=spacing,
        start=(-(nz - 1) / 2.0 * spacing[0] + zc_offset, y0 - cy, x0 - cx),
        thickness=thickness,
        substeps=substeps,
    )
    to_lps = np.array([cx, cy, patient.table_z_mm])
    anatomy = _Anatomy(patient, site.kvp)
    scene = _Scene(
        grid=grid,
        anatomy=anatomy,
        hu=np.empty(shape, dtype=np.float32),
        tissue=np.empty(shape, dtype=np.uint8),
        lung=np.empty(shape, dtype=np.uint8),
        tumour_mask=np.zeros(shape, dtype=np.uint8),
        lookalike_mask=np.zeros(shape, dtype=np.uint8),
        to_lps=to_lps,
    )
    _paint_anatomy(scene, r_texture)

    vessels = _paint_trees(scene, r_tree)
    fissures = _paint_fissures(scene)

    tumours: list[TumourSpec] = []
    avoid: list[tuple[F64, float]] = []
    if r_tumour.uniform() < tumour_probability:
        count = int(r_tumour.integers(n_tumours[0], n_tumours[1] + 1))
        tumours = _place_tumours(
            scene,
            r_tumour,
            vessel_segments=vessels,
            n=count,
            diameter_range=tumour_diameter_mm,
            avoid=avoid,
        )
    count = int(r_look.integers(n_lookalikes[0], n_lookalikes[1] + 1))
    lookalikes = _place_lookalikes(scene, r_look, vessel_segments=vessels, n=count, avoid=avoid)
    for hit in fissures:
        label = len(lookalikes) + 1
        for k, region in hit.voxels:
            plane = scene.lookalike_mask[k]
            plane[region & (plane == 0) & (scene.tumour_mask[k] == 0)] = label
        lookalikes.append(
            LookalikeSpec(
                label,
                LookalikeKind.FISSURE,
                scene.lps(hit.centre),
                round(hit.extent_mm, 1),
                "R" if hit.name.startswith("R") else "L",
            )
        )

    hu = _imaging_chain(scene.hu, grid, site, patient, r_noise)
    np.clip(hu, -3024.0, 3071.0, out=hu)
    hu_i16 = np.rint(hu).astype(np.int16)
    origin = (x0, y0, float(grid.start[0] + patient.table_z_mm))
    arrays: list[npt.NDArray[Any]] = [
        hu_i16,
        scene.tumour_mask,
        scene.lung,
        scene.lookalike_mask,
        scene.tissue,
    ]
    for arr in arrays:
        arr.setflags(write=False)
    logger.debug(
        "phantom seed=%d shape=%s spacing=%s tumours=%d lookalikes=%d",
        seed,
        shape,
        spacing,
        len(tumours),
        len(lookalikes),
    )
    return Phantom(
        hu=hu_i16,
        tumour_mask=scene.tumour_mask,
        lung_mask=scene.lung,
        lookalike_mask=scene.lookalike_mask,
        tissue=scene.tissue,
        spacing_mm=spacing,
        origin_mm=origin,
        tumours=tuple(tumours),
        lookalikes=tuple(lookalikes),
        site=site,
        patient=patient,
        seed=seed,
    )


# ----------------------------------------------------------------------------------------------
# Writers


def write_phantom_dicom(
    phantom: Phantom,
    out_dir: str | Path,
    *,
    study: StudyIdentity | None = None,
    series: SeriesSpec | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    instance_uid_seed: int | None = None,
) -> list[Path]:
    """Write a phantom as a CT Image Storage series (one file per slice).

    By default the study identity and every UID follow from the phantom's seed and site name (so
    writing twice gives the same files, and the same seed at another site another study), the
    kernel, thickness and kVp from its site.

    Returns
    -------
    list of Path
        The files, in slice order (inferior to superior).
    """
    site = phantom.site
    # The same seed seen by another site is another study: identities depend on both.
    key = (phantom.seed, site.name)
    if study is None:
        study = StudyIdentity.random(
            np.random.default_rng([phantom.seed, zlib.crc32(site.name.encode())])
        )
    if series is None:
        series = SeriesSpec(
            series_instance_uid=str(derived_uid("phantom-series", *key)),
            frame_of_reference_uid=str(derived_uid("phantom-for", *key)),
            series_number=2,
            series_description=(f"CHEST {site.slice_thickness_mm:g}mm {site.convolution_kernel}")[
                :64
            ],
            convolution_kernel=site.convolution_kernel,
            kvp=site.kvp,
            slice_thickness=site.slice_thickness_mm,
            station_name=site.name[:16],
        )
    return write_ct_series(
        phantom.hu,
        out_dir,
        spacing_mm=phantom.spacing_mm,
        origin_mm=phantom.origin_mm,
        study=study,
        series=series,
        transfer_syntax=transfer_syntax,
        rescale_intercept=site.rescale_intercept,
        instance_uid_seed=phantom.seed if instance_uid_seed is None else instance_uid_seed,
    )


def write_phantom_nifti(
    phantom: Phantom,
    image_path: str | Path,
    label_path: str | Path,
    *,
    instance_labels: bool = False,
) -> None:
    """Write the image and its tumour labels as NIfTI (or any format SimpleITK infers).

    The image is int16 HU; the label is uint8, MSD-style (0 background, 1 tumour) unless
    ``instance_labels`` keeps one label per tumour. Spacing, origin and direction (identity:
    axial slices, z increasing) describe the LPS geometry; SimpleITK converts it to the RAS
    convention NIfTI stores.
    """
    import SimpleITK as sitk  # noqa: N813 - the name SimpleITK's own documentation uses

    labels = phantom.tumour_mask if instance_labels else (phantom.tumour_mask > 0)
    dz, dy, dx = phantom.spacing_mm
    for array, path in ((phantom.hu, image_path), (labels.astype(np.uint8), label_path)):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing((dx, dy, dz))  # type: ignore[no-untyped-call, unused-ignore]
        image.SetOrigin(phantom.origin_mm)  # type: ignore[no-untyped-call, unused-ignore]
        identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        image.SetDirection(identity)  # type: ignore[no-untyped-call, unused-ignore]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=True)
