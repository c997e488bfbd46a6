"""Test doubles for :mod:`dicom_node.isolation`: pipelines that hang, crash, skip or fail.

They stand in for the analysis (a model run) so that the child-process machinery can be tested
in milliseconds; they live at module level because a spawned child imports them by name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dicom_node.errors import ModelError, PipelineError, StudySkipped
from dicom_node.pipeline import StudyInput, StudyResult


class Behaving:
    """Acts on the job id: 1 hangs, 2 exits the process, 3 skips, 4 raises, others succeed."""

    def __init__(self, hang_seconds: float = 3600.0) -> None:
        self.hang_seconds = hang_seconds
        self.calls = 0

    def __call__(self, study: StudyInput, /) -> StudyResult:
        self.calls += 1
        if study.job_id == 1:
            time.sleep(self.hang_seconds)
        if study.job_id == 2:
            os._exit(3)
        if study.job_id == 3:
            raise StudySkipped("no CT series")
        if study.job_id == 4:
            raise PipelineError("model output contains NaN")
        return StudyResult(
            summary={"pid": os.getpid(), "calls": self.calls, "series": []},
            outputs=(study.work_dir / "out.dcm",),
        )


def broken() -> Behaving:
    """A factory whose model does not load."""
    raise ModelError("weights.safetensors: checksum mismatch")


def loads_unless(flag: Path) -> Behaving:
    """A factory whose model does not load while ``flag`` exists (a file the test makes)."""
    if flag.exists():
        raise ModelError("model folder unreadable")
    return Behaving()


class Poisoned:
    """Behaves as a process whose CUDA context an illegal memory access has poisoned (a sticky
    error: every later CUDA call in that process fails; a new process works): job 5 raises
    that error and leaves the process failing every later job; other jobs succeed until then.
    """

    def __init__(self) -> None:
        self.broken = False

    def __call__(self, study: StudyInput, /) -> StudyResult:
        if study.job_id == 5 or self.broken:
            self.broken = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return StudyResult(summary={"pid": os.getpid(), "series": []})
