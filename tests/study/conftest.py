"""Fixtures for the study tests: small synthetic CT series written by the project's own writer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series

WriteSeries = Callable[..., list[Path]]


def hu_volume(
    n_slices: int, rows: int = 16, columns: int = 16, *, seed: int = 0
) -> npt.NDArray[np.int16]:
    """Whole-number HU from air to dense bone, different in every voxel (so order matters)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 3000, size=(n_slices, rows, columns), dtype=np.int16)


@pytest.fixture
def study() -> StudyIdentity:
    """One invented study identity (patient data that must never reach a message)."""
    return StudyIdentity.random(7)


@pytest.fixture
def write_series(tmp_path: Path, study: StudyIdentity) -> WriteSeries:
    """Write a CT series into ``tmp_path/<name>`` and return its files, in slice order.

    ``make(name, series, volume=None, n_slices=24, spacing_mm=(1.0, 0.7, 0.7), **write_kwargs)``;
    ``volume`` defaults to :func:`hu_volume`; the keyword arguments go to ``write_ct_series``.
    """

    def make(
        name: str,
        series: SeriesSpec,
        *,
        volume: npt.NDArray[np.int16] | None = None,
        n_slices: int = 24,
        spacing_mm: tuple[float, float, float] = (1.0, 0.7, 0.7),
        **write_kwargs: Any,
    ) -> list[Path]:
        hu = hu_volume(n_slices) if volume is None else volume
        return write_ct_series(
            hu,
            tmp_path / name,
            spacing_mm=spacing_mm,
            study=study,
            series=series,
            **{"origin_mm": (-5.6, -5.6, -100.0), **write_kwargs},
        )

    return make
