"""Does the volume show lungs at all? A cheap check before the model runs.

A head or abdomen CT sent by mistake must not produce a lung report. The body is the largest
connected region denser than air (with each slice's holes filled, which puts the lungs and
airways inside it); lung-density voxels (-950 to -500 HU) inside the body are counted. A chest CT
has tens of percent of its body volume in that range; a head or an abdomen below the lung bases
has next to none.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    to a few hundred milliseconds on a 600-slice 512² study.
    """
    sample = np.asarray(hu[::step, ::step, ::step], dtype=np.float32)
    dense = sample >= _BODY_HU
    labels, count = ndimage.label(dense)
    if count == 0:
        return LungCoverage(0, 0)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for z in range(body.shape[0]):  # holes per axial slice: lungs and airways join the body
        body[z] = ndimage.binary_fill_holes(body[z])
    lung = body & (sample >= _LUNG_HU[0]) & (sample < _LUNG_HU[1])
    columns = np.flatnonzero(body.any(axis=(0, 1)))
    first, last = int(columns[0]) * step, int(columns[-1]) * step
    cut = first == 0 or last >= hu.shape[2] - step
    return LungCoverage(int(body.sum()), int(lung.sum()), (first, last), cut)
