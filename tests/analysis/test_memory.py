"""The memory a series' analysis needs, and what the machine (and its cgroup) can give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_node.analysis.memory import analysis_bytes, available_bytes, check_fits
from dicom_node.config import VolumeGeometrySettings
from dicom_node.errors import StudySkipped
from dicom_node.study.headers import read_headers
from dicom_node.study.volume import VolumePlan, plan_volume
from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series


def _plan(tmp_path: Path, *, slope: float = 1.0) -> VolumePlan:
    files = write_ct_series(
        np.zeros((4, 8, 16), np.int16),
        tmp_path,
        spacing_mm=(1.0, 0.5, 0.5),
        study=StudyIdentity.random(0),
        series=SeriesSpec(),
    )
    if slope != 1.0:
        import pydicom

        for f in files:
            ds = pydicom.dcmread(f)
            ds.RescaleSlope = slope
            ds.save_as(f)
    return plan_volume(read_headers(files), settings=VolumeGeometrySettings())


def test_the_need_counts_every_voxel_held_at_the_peak(tmp_path: Path) -> None:
    """11 bytes a voxel for whole HU and a uint8 probability; 17 for float HU and float32."""
    plan = _plan(tmp_path / "a")
    assert analysis_bytes(plan, probability_dtype="uint8") == 4 * 8 * 16 * 11
    floats = _plan(tmp_path / "b", slope=0.5)
    assert analysis_bytes(floats, probability_dtype="float32") == 4 * 8 * 16 * 16


def _fake_proc(root: Path, available_kb: int, cgroup: str = "0::/system.slice/node") -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   {available_kb} kB\n"
    )
    (proc / "self" / "cgroup").write_text(cgroup + "\n")
    return proc


def test_available_memory_is_the_lesser_of_the_machine_and_the_cgroup(tmp_path: Path) -> None:
    """MemAvailable, or the room left under the cgroup's memory.max where that is less;
    "max" is no limit; nothing readable is None."""
    proc = _fake_proc(tmp_path, available_kb=8 * 1024 * 1024)
    group = tmp_path / "cg" / "system.slice" / "node"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("max\n")
    (group / "memory.current").write_text("1000\n")
    assert available_bytes(proc, tmp_path / "cg") == 8 * 1024**3
    (group / "memory.max").write_text(f"{2 * 1024**3}\n")
    (group / "memory.current").write_text(f"{1024**3}\n")
    assert available_bytes(proc, tmp_path / "cg") == 1024**3
    assert available_bytes(tmp_path / "nowhere", tmp_path / "none") is None


def test_a_series_over_the_limit_or_what_is_available_is_refused(tmp_path: Path) -> None:
    """The configured limit wins over what is available; without it, what is available
    counts; with neither known, nothing is refused."""
    plan = _plan(tmp_path)
    need = analysis_bytes(plan, probability_dtype="uint8")
    check_fits(plan, label="series 1", probability_dtype="uint8", limit_mb=1, available=0)
    with pytest.raises(StudySkipped, match=r"^series 1: too large to analyse here \(4 slices of"):
        check_fits(
            plan, label="series 1", probability_dtype="uint8", limit_mb=None, available=need - 1
        )
    check_fits(plan, label="series 1", probability_dtype="uint8", limit_mb=None, available=need)
