"""Lesions: from a tumour probability map to labelled, measured lesions. Pure functions.

The steps: threshold the probability map, find 3-D connected components (``cc3d``, 26-connected
by default), drop components under a minimum volume, measure each, order them by volume
(largest first) and relabel them 1..N.

Measurements, per lesion:

- **volume**: voxel count x voxel volume (mm³).
- **long axis**: the longest in-plane diameter over the lesion's slices, measured on the slice
  where it is longest as the maximum Feret diameter of the lesion's footprint on that slice (the
  union of its pixel squares; computed on the convex hull of the boundary pixels' corners).
- **short axis**: on the same slice, the longest chord of the footprint perpendicular to the long
  axis (RECIST's "longest perpendicular diameter"; a chord runs through lesion pixels only).
- **HU**: mean and maximum over the lesion's voxels.
- **centroid**: mean voxel position in patient coordinates (LPS, mm).
- **slice range**: first and last z index; **probability**: mean and maximum model probability.

Geometry: arrays are (z, y, x). The in-plane (y, x) plane is the acquisition plane (axial for an
axial series); distances in it use the pixel spacing. Patient coordinates follow ITK/SimpleITK:
``position = origin + direction @ (x * sx, y * sy, z * sz)`` with index (x, y, z) and
``direction`` a (3, 3) matrix whose columns are the LPS directions of the x, y and z index axes
(``np.reshape(image.GetDirection(), (3, 3))``; for DICOM: row direction, column direction,
slice normal).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import cc3d
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from dicom_node.analysis.weights import Thresholds
    from dicom_node.config import LesionSettings

logger = logging.getLogger(__name__)

Point = tuple[float, float, float]

#: Chords are sampled every this fraction of the smaller pixel spacing along the long axis.
_CHORD_STEP = 0.5
#: Intervals closer than this (mm) count as touching when chords are merged.
_TOUCH_MM = 1e-6


@dataclass(frozen=True)
class Lesion:
    """One lesion: a connected component of the thresholded probability map.

    Attributes
    ----------
    label
        Its value in the label map (1 is the largest lesion).
    voxel_count
        Number of voxels.
    volume_mm3
        ``voxel_count`` x voxel volume, mm³.
    long_axis_mm
        Longest in-plane diameter (maximum Feret diameter on the slice where it is longest), mm.
    short_axis_mm
        Longest chord perpendicular to the long axis on that slice, mm.
    axis_slice
        z index of the slice the axes were measured on.
    long_axis_lps, short_axis_lps
        End points of the two axes in patient coordinates (LPS, mm).
    mean_hu, max_hu
        Hounsfield units over the lesion's voxels.
    centroid_lps
        Mean voxel position in patient coordinates (LPS, mm).
    first_slice, last_slice
        z indices of the lesion's first and last slice (inclusive).
    mean_probability, max_probability
        Model probability over the lesion's voxels, in [0, 1].
    """

    label: int
    voxel_count: int
    volume_mm3: float
    long_axis_mm: float
    short_axis_mm: float
    axis_slice: int
    long_axis_lps: tuple[Point, Point]
    short_axis_lps: tuple[Point, Point]
    mean_hu: float
    max_hu: float
    centroid_lps: Point
    first_slice: int
    last_slice: int
    mean_probability: float
    max_probability: float


@dataclass(frozen=True, eq=False)
class LesionMap:
    """The lesions of one volume and their label map.

    Attributes
    ----------
    labels
        (z, y, x) uint16: 0 background, ``k`` the voxels of ``lesions[k - 1]``.
    lesions
        Largest first; ``lesions[k - 1].label == k``.
    threshold
        The probability threshold used.
    dropped
        Components left out: under the minimum volume or peak, on no slice the gates allow,
        or beyond ``max_lesions``.
    """

    labels: npt.NDArray[np.uint16]
    lesions: tuple[Lesion, ...]
    threshold: float
    dropped: int


@dataclass(frozen=True)
class LesionRule:
    """How a probability map becomes lesions: the model card's operating point, where the
    configuration's ``lesions`` section does not set its own.

    Attributes
    ----------
    threshold
        Voxel probability at or above which a voxel is lesion.
    min_volume_mm3
        Smaller components are dropped.
    min_peak
        Components whose highest probability is below this are dropped (``None``: none).
    image_gate
        Components on none of the slices whose image probability reaches this are dropped
        (the card's image threshold when its ``lesion_image_gate`` is on; ``None``: no gate).
    study_gate
        No lesion is kept in a study whose study probability is below this (the card's
        ``lesion_study_gate``; ``None``: no gate): the SEG and SR of a study the classifier
        finds unlikely to hold cancer outline nothing.
    connectivity, max_lesions
        As :func:`find_lesions` takes them.
    """

    threshold: float = 0.5
    min_volume_mm3: float = 10.0
    min_peak: float | None = None
    image_gate: float | None = None
    study_gate: float | None = None
    connectivity: Literal[6, 18, 26] = 26
    max_lesions: int | None = None

    def flagged_slices(
        self, image_probability: npt.NDArray[np.floating], study_probability: float
    ) -> npt.NDArray[np.bool_] | None:
        """The slices a lesion may lie on under the study and image gates (``None``: every
        slice; none at all in a study below the study gate)."""
        image = np.asarray(image_probability)
        if self.study_gate is not None and study_probability < self.study_gate:
            return np.zeros(image.shape, dtype=bool)
        if self.image_gate is None:
            return None
        return image >= self.image_gate

    def summary(self) -> dict[str, float | None]:
        """JSON-able form: what decides which components are lesions."""
        return {
            "threshold": self.threshold,
            "min_volume_mm3": self.min_volume_mm3,
            "min_peak": self.min_peak,
            "image_gate": self.image_gate,
            "study_gate": self.study_gate,
        }

    @classmethod
    def resolve(cls, settings: LesionSettings, thresholds: Thresholds) -> LesionRule:
        """The configuration's values where set, else the card's."""
        return cls(
            threshold=settings.threshold or thresholds.segmentation,
            min_volume_mm3=(
                settings.min_volume_mm3
                if settings.min_volume_mm3 is not None
                else thresholds.lesion_min_volume_mm3
            ),
            min_peak=settings.min_peak if settings.min_peak is not None else thresholds.lesion_peak,
            image_gate=(
                thresholds.image
                if (
                    settings.image_gate
                    if settings.image_gate is not None
                    else thresholds.lesion_image_gate
                )
                else None
            ),
            study_gate=(
                (
                    settings.study_gate
                    if settings.study_gate is not None
                    else thresholds.lesion_study_gate
                )
                or None  # 0: off
            ),
            connectivity=settings.connectivity,
            max_lesions=settings.max_lesions,
        )


class Components:
    """The 3-D connected components of a thresholded probability map, before a rule drops any.

    What :func:`find_lesions` filters and measures, and what the lesion rule search of training
    filters many times over (one labelling per threshold, every other part of a rule a filter).

    Parameters
    ----------
    probability
        (z, y, x) floats in [0, 1], or uint8 holding ``round(p * 255)``.
    threshold
        Voxels at or above it are in a component; in (0, 1].
    connectivity
        6, 18 or 26.

    Attributes
    ----------
    labels
        (z, y, x) unsigned integers: 0 background, ``1..count`` the components in scan order.
    count
        Number of components.
    voxel_counts
        (count + 1,) voxels per label (index 0: background).
    boxes
        Bounding box (z, y, x slices) per label; a component's z slice is exactly the slices it
        lies on (26-, 18- and 6-connectivity all step one slice at a time).
    region
        The box (z, y, x slices) that holds every voxel at or above the threshold: ``labels``
        is 0 outside it.

    Notes
    -----
    Speed and memory: the voxels at or above the threshold of a study fill a small box (a few
    lesions and false positives in 300 x 512 x 512 voxels); labelling and statistics run on that
    box alone, and ``labels`` (the whole volume) is only made when asked for. The labels are
    those of a labelling of the whole volume: translating a box keeps the scan order of its
    voxels, and every voxel outside it is background. Labelling the whole volume (cc3d's uint32
    output, 315 MB for 300 slices of 512²) and its statistics took ~0.4 s on the 2-core
    machine; the box takes milliseconds.
    """

    def __init__(
        self,
        probability: npt.NDArray[np.floating] | npt.NDArray[np.uint8],
        threshold: float,
        connectivity: Literal[6, 18, 26] = 26,
    ) -> None:
        self.threshold = threshold
        self._probability = probability
        #: What probability 1 is in the map's units (255 for uint8 maps).
        self.scale = 255.0 if probability.dtype == np.uint8 else 1.0
        if probability.dtype == np.uint8:
            # For whole numbers p >= t is p >= ceil(t): compared as integers (against a float,
            # numpy converts every voxel to float64 on the way, ~15x slower)
            mask = probability >= math.ceil(threshold * self.scale)
        else:
            mask = probability >= threshold * self.scale
        whole = (slice(0, mask.shape[0]), slice(0, mask.shape[1]), slice(0, mask.shape[2]))
        box = _bounding_box(mask)
        #: The box holding every voxel at or above the threshold.
        self.region: tuple[slice, slice, slice] = whole if box is None else box
        partial = self.region != whole
        inside = np.ascontiguousarray(mask[self.region])
        del mask  # (z, y, x) bools: 150 MB on a 600-slice 512² study
        labels, self.count = cc3d.connected_components(
            inside, connectivity=connectivity, return_N=True, binary_image=True
        )
        #: The labels in ``region``.
        self._region_labels = labels
        self._shape = probability.shape
        self._labels = None if partial else labels
        self.voxel_counts = np.zeros(1, dtype=np.int64)
        self.boxes: list[tuple[slice, slice, slice]] = [(slice(0), slice(0), slice(0))]
        if self.count:
            stats = cc3d.statistics(labels)
            self.voxel_counts = np.asarray(stats["voxel_counts"], dtype=np.int64)
            self.boxes = list(stats["bounding_boxes"])
            if partial:
                self.voxel_counts[0] += probability.size - labels.size
                start = [r.start for r in self.region]
                self.boxes = [_background_box(probability.shape, self.region, inside)] + [
                    (
                        slice(b[0].start + start[0], b[0].stop + start[0]),
                        slice(b[1].start + start[1], b[1].stop + start[1]),
                        slice(b[2].start + start[2], b[2].stop + start[2]),
                    )
                    for b in self.boxes[1:]
                ]
        self._peaks: npt.NDArray[Any] | None = None

    @property
    def labels(self) -> npt.NDArray[np.unsignedinteger[Any]]:
        """(z, y, x) unsigned integers: 0 background, ``1..count`` the components in scan order
        (made on first use)."""
        if self._labels is None:
            self._labels = np.zeros(self._shape, dtype=self._region_labels.dtype)
            self._labels[self.region] = self._region_labels
        return self._labels

    def mask(self, label: int) -> npt.NDArray[np.bool_]:
        """Component ``label``'s voxels in its bounding box (``boxes[label]``); 1 <= label <=
        count."""
        local = tuple(
            slice(b.start - r.start, b.stop - r.start)
            for b, r in zip(self.boxes[label], self.region, strict=True)
        )
        found: npt.NDArray[np.bool_] = self._region_labels[local] == label
        return found

    def _peaks_in_map_units(self) -> npt.NDArray[Any]:
        """(count + 1,) each component's highest value in the map's units (computed once)."""
        if self._peaks is None:
            # From the components' own voxels: a labelled maximum over the whole volume
            # (scipy.ndimage.maximum) sorts every voxel, seconds on a large study.
            labels = self._region_labels  # (0 outside the region)
            inside = labels > 0
            self._peaks = np.zeros(self.count + 1, dtype=self._probability.dtype)
            np.maximum.at(self._peaks, labels[inside], self._probability[self.region][inside])
        return self._peaks

    def kept(
        self,
        *,
        voxel_mm3: float,
        min_volume_mm3: float = 0.0,
        min_peak: float | None = None,
        flagged_slices: npt.NDArray[np.bool_] | None = None,
    ) -> npt.NDArray[np.bool_]:
        """(count + 1,) which components the rule keeps (index 0, the background: false):
        at least ``min_volume_mm3``, a peak of at least ``min_peak`` (``None``: any), and a voxel
        on a ``flagged_slices`` slice (``None``: any slice)."""
        keep = self.voxel_counts * voxel_mm3 >= min_volume_mm3
        keep[0] = False
        # (a peak at or under the threshold holds for every component: each has a voxel above)
        if min_peak is not None and min_peak > self.threshold and keep.any():
            keep &= self._peaks_in_map_units() >= min_peak * self.scale
        if flagged_slices is not None:
            flags = np.asarray(flagged_slices, dtype=bool)
            for c in np.flatnonzero(keep):
                keep[c] = bool(flags[self.boxes[c][0]].any())
        return keep


def find_lesions(
    probability: npt.NDArray[np.floating] | npt.NDArray[np.uint8],
    hu: npt.NDArray[np.generic],
    *,
    spacing_mm: Sequence[float],
    origin_lps: Sequence[float] = (0.0, 0.0, 0.0),
    direction: npt.ArrayLike | None = None,
    threshold: float = 0.5,
    min_volume_mm3: float = 0.0,
    min_peak: float | None = None,
    flagged_slices: npt.NDArray[np.bool_] | None = None,
    connectivity: Literal[6, 18, 26] = 26,
    max_lesions: int | None = None,
) -> LesionMap:
    """Threshold, label, filter, measure and order the lesions of a probability map.

    Parameters
    ----------
    probability
        (z, y, x) tumour probability: floats in [0, 1], or uint8 holding ``round(p * 255)``.
    hu
        (z, y, x) Hounsfield units on the same grid.
    spacing_mm
        (z, y, x) voxel spacing, mm.
    origin_lps
        Patient position (LPS, mm) of the centre of voxel (0, 0, 0).
    direction
        (3, 3) or 9 values, row-major: columns are the LPS directions of the x, y, z index
        axes (ITK convention); identity when omitted.
    threshold
        Voxels with probability at or above it are lesion; in (0, 1].
    min_volume_mm3
        Components smaller than this are dropped.
    min_peak
        Components whose highest probability is below this are dropped (hysteresis: the
        threshold draws the outline, the peak decides whether it is a lesion); ``None``: none.
    flagged_slices
        (z,) bools: components with no voxel on a true slice are dropped (the image gate,
        :meth:`LesionRule.flagged_slices`); ``None``: none are.
    connectivity
        6, 18 or 26 (faces; + edges; + corners).
    max_lesions
        Keep at most this many (the largest); ``None`` keeps all.

    Returns
    -------
    LesionMap
        The relabelled map and the measured lesions, largest first.

    Raises
    ------
    ValueError
        Arrays that are not 3-D or differ in shape, a spacing that is not three positive
        numbers, a direction that is not 3 x 3, a threshold outside (0, 1], a connectivity other
        than 6/18/26, ``max_lesions < 1``, or ``flagged_slices`` not one flag per slice.
    """
    spacing, origin, matrix = _checked_geometry(spacing_mm, origin_lps, direction)
    if probability.ndim != 3 or probability.shape != hu.shape:
        raise ValueError(
            f"probability {probability.shape} and HU {hu.shape} must be (z, y, x) of one shape"
        )
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], not {threshold}")
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity}")
    if max_lesions is not None and max_lesions < 1:
        raise ValueError(f"max_lesions must be at least 1, not {max_lesions}")
    if flagged_slices is not None and np.shape(flagged_slices) != probability.shape[:1]:
        raise ValueError(
            f"flagged_slices {np.shape(flagged_slices)} must hold one flag per slice"
            f" ({probability.shape[0]})"
        )

    found = Components(probability, threshold, connectivity)
    count, voxel_counts = found.count, found.voxel_counts
    if count == 0:
        empty = np.zeros(probability.shape, dtype=np.uint16)
        return LesionMap(labels=empty, lesions=(), threshold=threshold, dropped=0)
    keep = found.kept(
        voxel_mm3=float(np.prod(spacing)),
        min_volume_mm3=min_volume_mm3,
        min_peak=min_peak,
        flagged_slices=flagged_slices,
    )
    candidates = [int(c) for c in np.flatnonzero(keep)]
    candidates.sort(key=lambda c: (-voxel_counts[c], c))  # largest first; ties in scan order
    kept = candidates if max_lesions is None else candidates[:max_lesions]
    dropped = count - len(kept)

    # Zero-filled by the allocator: only the pages of the kept lesions' boxes are written (a
    # whole-volume relabelling wrote 150 MB for 300 slices of 512²)
    labels = np.zeros(probability.shape, dtype=np.uint16)
    lesions = []
    for new_label, old in enumerate(kept, start=1):
        box = found.boxes[old]
        mask = found.mask(old)
        labels[box][mask] = new_label
        lesions.append(
            _measure(
                mask,
                offset=(box[0].start, box[1].start, box[2].start),
                hu=hu[box],
                probability=probability[box],
                probability_scale=found.scale,
                label=new_label,
                spacing=spacing,
                origin=origin,
                direction=matrix,
            )
        )
    if dropped:
        logger.debug("lesions: kept %d of %d components", len(kept), count)
    return LesionMap(labels=labels, lesions=tuple(lesions), threshold=threshold, dropped=dropped)


def _bounding_box(mask: npt.NDArray[np.bool_]) -> tuple[slice, slice, slice] | None:
    """The smallest box (z, y, x slices) holding every true voxel of ``mask``; ``None`` if none
    is. Reductions only: no index arrays, whatever the number of true voxels."""
    planes = np.flatnonzero(np.any(mask.reshape(mask.shape[0], -1), axis=1))
    if not planes.size:
        return None
    z0, z1 = int(planes[0]), int(planes[-1]) + 1
    footprint = np.any(mask[z0:z1], axis=0)
    rows = np.flatnonzero(np.any(footprint, axis=1))
    columns = np.flatnonzero(np.any(footprint, axis=0))
    return (
        slice(z0, z1),
        slice(int(rows[0]), int(rows[-1]) + 1),
        slice(int(columns[0]), int(columns[-1]) + 1),
    )


def _background_box(
    shape: tuple[int, ...], region: tuple[slice, ...], inside: npt.NDArray[np.bool_]
) -> tuple[slice, slice, slice]:
    """The bounding box of the voxels below the threshold (cc3d's box of label 0) of a volume
    of ``shape`` whose voxels at or above it all lie in ``region`` (``inside``: its mask there),
    a box smaller than the volume."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        below = np.ones(shape[axis], dtype=bool)  # the planes across ``axis`` holding a voxel below
        if all(region[a] == slice(0, shape[a]) for a in others):
            below[region[axis]] = ~inside.all(axis=others)
        # (else every plane has a voxel outside the region across the other axes)
        found = np.flatnonzero(below)
        box.append(slice(int(found[0]), int(found[-1]) + 1))
    return (box[0], box[1], box[2])


# ---------------------------------------------------------------------- measuring one lesion


def _measure(
    mask: npt.NDArray[np.bool_],
    *,
    offset: tuple[int, int, int],
    hu: npt.NDArray[np.generic],
    probability: npt.NDArray[np.generic],
    probability_scale: float,
    label: int,
    spacing: npt.NDArray[np.float64],
    origin: npt.NDArray[np.float64],
    direction: npt.NDArray[np.float64],
) -> Lesion:
    """Measure one lesion given its mask cropped to its bounding box (offset = box start)."""
    sz, sy, sx = (float(v) for v in spacing)
    index = np.nonzero(mask)
    voxel_count = int(index[0].size)
    values_hu = hu[mask].astype(np.float64)
    values_p = probability[mask].astype(np.float64) / probability_scale
    centroid_zyx = np.array([i.mean() for i in index]) + np.asarray(offset, dtype=np.float64)

    def to_lps(z: float, y_mm: float, x_mm: float) -> Point:
        """Patient position of in-plane mm (y, x) on slice z (an index in the full volume)."""
        local = np.array([x_mm, y_mm, z * sz])
        pos = origin + direction @ local
        return (float(pos[0]), float(pos[1]), float(pos[2]))

    best: tuple[float, int, npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
    for z in range(mask.shape[0]):
        plane = mask[z]
        if not plane.any():
            continue
        length, p, q = _feret(plane, sy, sx)
        if best is None or length > best[0] + 1e-9:
            best = (length, z, p, q)
    assert best is not None  # a component has at least one voxel
    long_mm, z_best, p, q = best
    plane = mask[z_best]
    short_mm, s_p, s_q = _perpendicular_chord(plane, sy, sx, p, q)
    z_abs = z_best + offset[0]
    shift = np.array([offset[1] * sy, offset[2] * sx])  # in-plane (y, x) mm of the crop's origin

    def ends(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> tuple[Point, Point]:
        ya, xa = a + shift
        yb, xb = b + shift
        return to_lps(z_abs, ya, xa), to_lps(z_abs, yb, xb)

    return Lesion(
        label=label,
        voxel_count=voxel_count,
        volume_mm3=voxel_count * sz * sy * sx,
        long_axis_mm=long_mm,
        short_axis_mm=short_mm,
        axis_slice=z_abs,
        long_axis_lps=ends(p, q),
        short_axis_lps=ends(s_p, s_q),
        mean_hu=float(values_hu.mean()),
        max_hu=float(values_hu.max()),
        centroid_lps=to_lps(
            float(centroid_zyx[0]), float(centroid_zyx[1]) * sy, float(centroid_zyx[2]) * sx
        ),
        first_slice=int(index[0].min()) + offset[0],
        last_slice=int(index[0].max()) + offset[0],
        mean_probability=float(values_p.mean()),
        max_probability=float(values_p.max()),
    )


# ---------------------------------------------------------------------- in-plane geometry


def _feret(
    plane: npt.NDArray[np.bool_], sy: float, sx: float
) -> tuple[float, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Maximum Feret diameter (mm) of a 2-D mask's footprint and its two end points.

    The footprint is the union of the pixel squares; its farthest points are corners on its
    convex hull, which is the hull of the outer corners of each row's first and last pixel.
    Points are (y, x) in mm, pixel (0, 0) centred at (0, 0).
    """
    rows = np.flatnonzero(plane.any(axis=1))
    first = np.argmax(plane[rows], axis=1)
    last = plane.shape[1] - 1 - np.argmax(plane[rows, ::-1], axis=1)
    corners = np.concatenate(
        [
            np.stack([(rows + dy) * sy, (col + dx) * sx], axis=1)
            for dy in (-0.5, 0.5)
            for col, dx in ((first, -0.5), (last, 0.5))
        ]
    ).astype(np.float64)
    hull = convex_hull(corners)
    diff = hull[:, None, :] - hull[None, :, :]
    dist2 = np.einsum("ijk,ijk->ij", diff, diff)
    i, j = np.unravel_index(int(np.argmax(dist2)), dist2.shape)
    return float(np.sqrt(dist2[i, j])), hull[i], hull[j]


def _perpendicular_chord(
    plane: npt.NDArray[np.bool_],
    sy: float,
    sx: float,
    p: npt.NDArray[np.float64],
    q: npt.NDArray[np.float64],
) -> tuple[float, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Longest chord of the footprint perpendicular to the segment p-q, and its end points.

    Lines perpendicular to p-q are sampled every ``_CHORD_STEP`` of the smaller pixel spacing;
    on each, the footprint's pixel squares cut intervals whose touching runs are chords.
    Points are (y, x) in mm as in :func:`_feret`.
    """
    ys, xs = np.nonzero(plane)
    centres = np.stack([ys * sy, xs * sx], axis=1)
    axis = q - p
    length = float(np.hypot(*axis))
    if length == 0.0:
        return 0.0, p, p
    u = axis / length
    n = np.array([-u[1], u[0]])
    half = np.array([sy / 2, sx / 2])
    reach = float(half @ np.abs(u))  # half-extent of a pixel square along u
    along = centres @ u
    order = np.argsort(along)
    along, centres = along[order], centres[order]
    step = _CHORD_STEP * min(sy, sx)
    best = (0.0, p, p)
    for t in np.arange(along[0] - reach, along[-1] + reach + step, step):
        lo_i = int(np.searchsorted(along, t - reach, side="left"))
        hi_i = int(np.searchsorted(along, t + reach, side="right"))
        if hi_i <= lo_i:
            continue
        found = _longest_run(centres[lo_i:hi_i], half, t * u, n)
        if found is not None and found[0] > best[0] + 1e-9:
            best = (found[0], t * u + found[1] * n, t * u + found[2] * n)
    return best


def _longest_run(
    centres: npt.NDArray[np.float64],
    half: npt.NDArray[np.float64],
    base: npt.NDArray[np.float64],
    n: npt.NDArray[np.float64],
) -> tuple[float, float, float] | None:
    """Longest run of touching intervals that squares cut on the line ``base + s * n``.

    Returns ``(length, s_start, s_end)`` or ``None`` when the line misses every square.
    """
    lo = np.full(len(centres), -np.inf)
    hi = np.full(len(centres), np.inf)
    for k in range(2):  # the y and then the x slab of each square
        if abs(n[k]) < 1e-12:
            inside = np.abs(base[k] - centres[:, k]) <= half[k] + _TOUCH_MM
            lo = np.where(inside, lo, np.inf)
            hi = np.where(inside, hi, -np.inf)
            continue
        a = (centres[:, k] - half[k] - base[k]) / n[k]
        b = (centres[:, k] + half[k] - base[k]) / n[k]
        lo = np.maximum(lo, np.minimum(a, b))
        hi = np.minimum(hi, np.maximum(a, b))
    hit = lo <= hi + _TOUCH_MM
    if not hit.any():
        return None
    lo, hi = lo[hit], hi[hit]
    order = np.argsort(lo)
    lo, hi = lo[order], hi[order]
    reach = np.maximum.accumulate(hi)
    starts = np.ones(len(lo), dtype=bool)
    starts[1:] = lo[1:] > reach[:-1] + _TOUCH_MM
    first = np.flatnonzero(starts)
    ends = np.maximum.reduceat(hi, first)
    lengths = ends - lo[first]
    k = int(np.argmax(lengths))
    return float(lengths[k]), float(lo[first[k]]), float(ends[k])


def convex_hull(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Convex hull of 2-D points (Andrew's monotone chain), counter-clockwise, no repeats.

    Parameters
    ----------
    points
        (n, 2) coordinates, n >= 1.

    Returns
    -------
    numpy.ndarray
        (h, 2) hull vertices; collinear points on edges are left out. For fewer than three
        distinct points, those points.
    """
    pts = np.unique(points, axis=0)  # sorted by the first, then the second coordinate
    if len(pts) < 3:
        return pts

    def half_hull(seq: npt.NDArray[np.float64]) -> list[npt.NDArray[np.float64]]:
        out: list[npt.NDArray[np.float64]] = []
        for pt in seq:
            while len(out) >= 2:
                o, a = out[-2], out[-1]
                cross = (a[0] - o[0]) * (pt[1] - o[1]) - (a[1] - o[1]) * (pt[0] - o[0])
                if cross > 0:
                    break
                out.pop()
            out.append(pt)
        return out

    lower = half_hull(pts)
    upper = half_hull(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _checked_geometry(
    spacing_mm: Sequence[float], origin_lps: Sequence[float], direction: npt.ArrayLike | None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm: {spacing_mm}")
    origin = np.asarray(origin_lps, dtype=np.float64).reshape(-1)
    if origin.size != 3 or not np.all(np.isfinite(origin)):
        raise ValueError(f"origin must be three numbers (LPS, mm): {origin_lps}")
    matrix = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    if matrix.size != 9 or not np.all(np.isfinite(matrix)):
        raise ValueError("direction must be 3 x 3 (or 9 values, row-major)")
    return spacing, origin, matrix.reshape(3, 3)
