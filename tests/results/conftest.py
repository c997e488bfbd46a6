"""Fixtures for the results tests: a small synthetic CT study with two lesions, and checkers.

The study is written with the project's own CT writer (12 slices of 64 x 64, 2 mm x 0.8 mm x
0.8 mm) under a UTF-8 (``ISO_IR 192``) patient name; two spheres of tumour probability become
two lesions through :func:`dicom_node.analysis.lesions.find_lesions`: lesion 1 on the patient's
right (LPS x < 0), lesion 2 on the left.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.analysis.lesions import LesionMap, find_lesions
from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series

SPACING = (2.0, 0.8, 0.8)  # (z, y, x) mm
ORIGIN = (-25.2, -25.2, 0.0)  # LPS centre of voxel (0, 0, 0); the FOV centre is x = 0
PATIENT_NAME = "Müller-Łukasiewicz^Zoë=山田^太郎"


@dataclass(frozen=True)
class CTCase:
    """A written CT series, its headers, and the model output on it."""

    files: list[Path]
    headers: list[Dataset]
    study: StudyIdentity
    hu: npt.NDArray[np.int16]
    probability: npt.NDArray[np.float32]
    lesion_map: LesionMap


def sphere_probability(
    shape: tuple[int, int, int], spheres: list[tuple[float, float, float, float]]
) -> npt.NDArray[np.float32]:
    """A (z, y, x) probability map: 1 at each sphere's centre falling to 0 at 1.5 radii.

    ``spheres`` are (z, y, x, radius) in voxels of the in-plane size (z is scaled by the
    slice/pixel spacing ratio, so the spheres are round in mm).
    """
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    ratio = SPACING[0] / SPACING[1]
    out = np.zeros(shape, dtype=np.float32)
    for cz, cy, cx, r in spheres:
        d = np.sqrt(((zz - cz) * ratio) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2)
        out = np.maximum(out, np.clip(1.0 - d / (1.5 * r), 0.0, 1.0))
    return out


def make_case(
    out_dir: Path,
    spheres: list[tuple[float, float, float, float]],
    *,
    seed: int = 7,
    slices: int = 12,
    size: int = 64,
) -> CTCase:
    """Write a CT series and find the lesions of ``spheres`` on it (threshold 0.5)."""
    shape = (slices, size, size)
    probability = sphere_probability(shape, spheres)
    rng = np.random.default_rng(seed)
    hu = rng.integers(-900, -700, size=shape).astype(np.int16)  # aerated lung
    hu[probability >= 0.5] = 35 + (np.arange(int((probability >= 0.5).sum())) % 20)
    study = StudyIdentity.random(
        seed,
        patient_name=PATIENT_NAME,
        referring_physician_name="Østergård^Åse",
        patient_birth_date=datetime.date(1961, 2, 28),
        specific_character_set="ISO_IR 192",
    )
    files = write_ct_series(
        hu,
        out_dir,
        spacing_mm=(SPACING[0], SPACING[1], SPACING[2]),
        study=study,
        series=SeriesSpec(series_number=3, series_description="Lung 1.0"),
        origin_mm=ORIGIN,
        instance_uid_seed=seed,
    )
    lesion_map = find_lesions(probability, hu, spacing_mm=SPACING, origin_lps=ORIGIN, threshold=0.5)
    headers: list[Dataset] = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return CTCase(files, headers, study, hu, probability, lesion_map)


#: Two lesions: a larger one on the patient's right (x < 0), a smaller one on the left.
TWO_SPHERES = [(5.0, 24.0, 18.0, 5.0), (7.0, 40.0, 46.0, 3.5)]


@pytest.fixture(scope="module")
def two_lesions(tmp_path_factory: pytest.TempPathFactory) -> CTCase:
    """The 12-slice study with two lesions (written once per test module)."""
    case = make_case(tmp_path_factory.mktemp("ct"), TWO_SPHERES)
    assert len(case.lesion_map.lesions) == 2
    return case


def encode(ds: Dataset) -> bytes:
    """The dataset as a DICOM file (preamble, File Meta), in memory."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def report_content(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    """The document's content tree, as highdicom's TID 1500 reader gives it."""
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


Dciodvfy = Callable[[Path], tuple[list[str], list[str]]]
