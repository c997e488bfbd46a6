"""2.5-D input: each slice with the planes ``input.context_mm`` above and below it.

A vessel seen in one slice is a disc, as a small tumour is; one slice away it has moved along
its course while a tumour has not. With ``context_mm`` set in the card, the network reads three
channels: the plane ``context_mm`` towards the first slice, the slice itself, the plane
``context_mm`` towards the last. The planes are interpolated linearly between acquired slices,
so that the same distance in millimetres is seen whatever the slice spacing, and clamped to the
first and last slices at the volume's ends. The inference engine and training use these same
functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

#: Channels of the network's input with context (before, the slice, after).
CONTEXT_CHANNELS = 3


def input_channels(context_mm: float | None) -> int:
    """Channels of the network's input: 1, or :data:`CONTEXT_CHANNELS` with context."""
    return 1 if context_mm is None else CONTEXT_CHANNELS


def neighbour_planes(
    indices: npt.NDArray[np.int64], depth: int, spacing_z_mm: float, context_mm: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Where the planes ``context_mm`` before and after each slice of ``indices`` lie.

    Returns (2, n) arrays ``lower``, ``upper`` and ``weight``: plane = ``(1 - weight) *
    slice[lower] + weight * slice[upper]``; row 0 is the plane before, row 1 the plane after.
    """
    offset = context_mm / spacing_z_mm
    position = np.stack([indices - offset, indices + offset]).clip(0.0, depth - 1.0)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, depth - 1)
    weight = (position - lower).astype(np.float32)
    return lower, upper, weight


def with_context(
    volume: npt.NDArray[np.generic],
    indices: Sequence[int] | npt.NDArray[np.int64],
    spacing_z_mm: float,
    context_mm: float | None,
) -> npt.NDArray[np.float32]:
    """(n, C, y, x) float32 input planes of the slices ``indices`` of a (z, y, x) volume.

    ``C`` is 1 without context (the slices themselves) and 3 with it (before, slice, after).
    """
    index = np.asarray(indices, dtype=np.int64)
    centre = np.asarray(volume[index], dtype=np.float32)
    if context_mm is None:
        return centre[:, None]
    lower, upper, weight = neighbour_planes(index, volume.shape[0], spacing_z_mm, context_mm)
    out = np.empty((index.size, CONTEXT_CHANNELS, *volume.shape[1:]), dtype=np.float32)
    out[:, 1] = centre
    for side, channel in ((0, 0), (1, 2)):
        w = weight[side][:, None, None]
        below = np.asarray(volume[lower[side]], dtype=np.float32)
        above = np.asarray(volume[upper[side]], dtype=np.float32)
        out[:, channel] = below + w * (above - below)
    return out
