"""Does the volume show lungs at all? A cheap check before the model runs.

A head or abdomen CT sent by mistake must not produce a lung report. The body is the largest
connected region denser than air (with each slice's holes filled, which puts the lungs and
airways inside it); lung-density voxels (-950 to -500 HU) inside the body are counted. A chest CT
has tens of percent of its body volume in that range; a head or an abdomen below the lung bases
has next to none.

Where the field of view cuts through the chest (a tight lung reconstruction of a large patient),
a lung reaches the image's edge and is no hole: in a slice whose body reaches the edge, a region
that reaches it too counts as inside when most of it is lung density and the body flanks it on
both sides wherever it meets the edge (the chest wall in front of and behind a cut lung), so
that air around the patient, or a foam pad under the patient, is never taken for lung.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cc3d
import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: Voxels at or above this are "body" (soft tissue, fat, bone), below it air or lung.
_BODY_HU = -500.0
_LUNG_HU = (-950.0, -500.0)


@dataclass(frozen=True)
class LungCoverage:
    """How much of the body inside the field of view is lung-density tissue, and where the
    body lies across the image.

    ``body_columns``: the first and last image column (x index) the body reaches, ``None``
    without a body; ``body_cut``: the body reaches the first or the last column (the field of
    view is narrower than the patient, as in a targeted reconstruction).
    """

    body_voxels: int
    lung_voxels: int
    body_columns: tuple[int, int] | None = None
    body_cut: bool = False

    @property
    def lung_fraction(self) -> float:
        return self.lung_voxels / self.body_voxels if self.body_voxels else 0.0


def lung_coverage(hu: npt.NDArray[np.generic], *, step: int = 2) -> LungCoverage:
    """Measure lung-density voxels inside the body of a (z, y, x) HU volume.

    Every ``step``-th voxel along each axis is used: the answer is a fraction, and this keeps it
    to a few hundred milliseconds on a 600-slice 512² study (~0.1 s for 300 slices on the
    2-core machine).
    """
    sample: npt.NDArray[Any] = hu[::step, ::step, ::step]
    body_hu, lung_low, lung_high = _BODY_HU, *_LUNG_HU
    if sample.dtype.kind in "iu":
        # whole-number HU against whole-number bounds: compared as integers, exactly
        sample = np.ascontiguousarray(sample)
        body_hu, lung_low, lung_high = int(body_hu), int(lung_low), int(lung_high)
    else:
        sample = np.asarray(sample, dtype=np.float32)  # (contiguous)
    dense = sample >= body_hu
    # 6-connected, numbered in scan order like ndimage.label (the same labels; ~4x faster)
    labels, count = cc3d.connected_components(
        dense, connectivity=6, return_N=True, binary_image=True
    )
    if count == 0:
        return LungCoverage(0, 0)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = _fill_holes_per_slice(labels == int(np.argmax(sizes)), sample, lung_low, lung_high)
    lung = body & (sample >= lung_low) & (sample < lung_high)
    columns = np.flatnonzero(body.any(axis=(0, 1)))
    first, last = int(columns[0]) * step, int(columns[-1]) * step
    cut = first == 0 or last >= hu.shape[2] - step
    return LungCoverage(int(body.sum()), int(lung.sum()), (first, last), cut)


#: 4-connected within an axial slice, never across slices.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _fill_holes_per_slice(
    body: npt.NDArray[np.bool_],
    hu: npt.NDArray[Any],
    lung_low: float = _LUNG_HU[0],
    lung_high: float = _LUNG_HU[1],
) -> npt.NDArray[np.bool_]:
    """``ndimage.binary_fill_holes`` of each axial slice (lungs and airways join the body), for
    all slices in one labelling: a hole is a region outside the body, 4-connected in its slice
    (binary_fill_holes' default), that reaches no edge of its slice. The same result as the
    per-slice loop of iterated dilations, in half its time. In a slice whose body reaches an
    edge, a region reaching an edge is a lung the field of view cuts through, and is filled
    too, when most of its voxels (``hu``) are of lung density (``lung_low`` to ``lung_high``)
    and the body flanks it on both sides wherever it meets an edge."""
    outside, count = ndimage.label(~body, structure=_IN_PLANE)
    edge = np.zeros(count + 1, dtype=bool)
    edge[0] = True  # label 0: the body itself
    for face in (outside[:, 0, :], outside[:, -1, :], outside[:, :, 0], outside[:, :, -1]):
        edge[face] = True
    cut: npt.NDArray[np.bool_] = np.zeros(body.shape[0], dtype=bool)
    for face in (body[:, 0, :], body[:, -1, :], body[:, :, 0], body[:, :, -1]):
        cut |= face.any(axis=1)
    if cut.any():
        flat = outside.ravel()
        voxels = np.bincount(flat, minlength=count + 1)
        lung = (hu >= lung_low) & (hu < lung_high)
        lung_share = np.bincount(flat, weights=lung.ravel(), minlength=count + 1) / np.maximum(
            voxels, 1
        )
        # each region lies in one slice (4-connected in plane): its slice is its first voxel's
        labels, first = np.unique(flat, return_index=True)
        slice_of = np.zeros(count + 1, dtype=np.int64)
        slice_of[labels] = first // (outside.shape[1] * outside.shape[2])
        candidates = np.flatnonzero(edge & cut[slice_of] & (lung_share >= 0.5))
        for label in candidates[candidates > 0]:
            z = int(slice_of[label])
            if _flanked(outside[z], body[z], int(label)):
                edge[label] = False
    filled: npt.NDArray[np.bool_] = body | ~edge[outside]
    return filled


def _flanked(labels: npt.NDArray[Any], body: npt.NDArray[np.bool_], label: int) -> bool:
    """Whether, along every image edge region ``label`` of a slice meets, the body lies just
    before and just after each stretch of it: a lung the field of view cuts, between its
    chest wall's two sides, and not air or a pad beside or under the patient."""
    for line, wall in (
        (labels[0, :], body[0, :]),
        (labels[-1, :], body[-1, :]),
        (labels[:, 0], body[:, 0]),
        (labels[:, -1], body[:, -1]),
    ):
        on = np.flatnonzero(line == label)
        if on.size == 0:
            continue
        breaks = np.flatnonzero(np.diff(on) > 1)
        starts = np.concatenate(([on[0]], on[breaks + 1]))
        ends = np.concatenate((on[breaks], [on[-1]]))
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            if start == 0 or end == line.size - 1 or not (wall[start - 1] and wall[end + 1]):
                return False
    return True
