"""How much memory the analysis of a series needs, and how much the machine can give it.

A study's size is known from its headers before any pixel is decoded: a 0.6 mm reconstruction
of 1500 slices of 512² is 393 million voxels, and its analysis holds about 11 bytes a voxel at
its peak (4.3 GB; measured on 1000 slices of 512²): the volume in HU (2 bytes, 4 when the
rescale is not whole), the tumour probability (1 byte, 4 as float32), the lesion labels (2
bytes), and, passing through, the lung coverage (about 2 bytes) or the labelling of the
lesions' region (up to 6 bytes). A series that would not fit is set aside before it is
decoded, with the figures, rather than failing part-way or being killed by the kernel, and
retried, three times over.
"""

from __future__ import annotations

import math
from pathlib import Path

from dicom_node.errors import StudySkipped
from dicom_node.study.volume import VolumePlan

#: Bytes a voxel besides the HU volume and the probability map: the lesion labels kept (2),
#: and the largest transient (the lesions' region labelled and measured, up to 6).
_OTHER_BYTES_PER_VOXEL = 8

_MIB = 1024 * 1024


def analysis_bytes(plan: VolumePlan, *, probability_dtype: str) -> int:
    """Peak bytes the analysis of ``plan``'s volume needs (the model itself aside)."""
    voxels = math.prod(plan.shape)
    hu = 2 if plan.exact_int16 else 4
    probability = 1 if probability_dtype == "uint8" else 4
    return voxels * (hu + probability + _OTHER_BYTES_PER_VOXEL)


def available_bytes(
    proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Memory this process can still take: MemAvailable, or less where its cgroup (v2, the
    service's ``MemoryMax=``) has less room; ``None`` where neither can be read."""
    found: list[int] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        entry = (proc / "self" / "cgroup").read_text().splitlines()
        path = next(line[3:] for line in entry if line.startswith("0::"))
        group = cgroup_root / path.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            used = int((group / "memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError, StopIteration):
        pass
    return min(found) if found else None


def check_fits(
    plan: VolumePlan,
    *,
    label: str,
    probability_dtype: str,
    limit_mb: int | None,
    available: int | None = None,
) -> None:
    """Refuse a series whose analysis would need more memory than ``limit_mb`` or, without a
    limit, than is available now.

    Raises
    ------
    StudySkipped
        Naming the series, its size, what it needs and what it may have.
    """
    needed = analysis_bytes(plan, probability_dtype=probability_dtype)
    room: int | None
    if limit_mb is not None:
        room, source = limit_mb * _MIB, "jobs.max_analysis_memory_mb"
    else:
        room = available_bytes() if available is None else available
        source = "available now"
    if room is None:
        return
    if needed <= room:
        return
    z, y, x = plan.shape
    raise StudySkipped(
        f"{label}: too large to analyse here ({z} slices of {y}x{x}: about"
        f" {needed / _MIB:,.0f} MB needed, {room / _MIB:,.0f} MB {source})"
    )
