"""The one interface between the job worker and whatever processes a study.

A pipeline takes a study's instances and returns a result, or raises: :class:`StudySkipped` when
the study holds nothing to analyse, any other exception when it failed. The worker
(:mod:`dicom_node.worker`) is the one place where those outcomes become job states. A remote
executor can take over by implementing the same call.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.errors import PipelineError
from dicom_node.store.jobs import InstanceRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyInput:
    """A complete study as a job sees it."""

    job_id: int
    study_uid: str
    version: int
    instances: tuple[InstanceRecord, ...]
    #: A folder of the job's own, for outputs; created by the worker.
    work_dir: Path
    #: The outputs of the newest earlier version of the study whose results went out (or are
    #: going out): what this version's results revise.
    earlier_outputs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class StudyResult:
    """What a pipeline produced: a JSON-able summary and the DICOM files to send, if any."""

    summary: dict[str, Any]
    outputs: tuple[Path, ...] = field(default=())


class StudyPipeline(Protocol):
    """Processes one complete study."""

    def __call__(self, study: StudyInput, /) -> StudyResult: ...


class InventoryPipeline:
    """Reads every instance's header from the spool and summarises the study's series.

    The first stage of analysis on its own: it proves every acknowledged instance is readable
    from the spool. It raises :class:`PipelineError` when a spooled file is missing or unreadable.
    """

    def __call__(self, study: StudyInput, /) -> StudyResult:
        series: dict[str, list[InstanceRecord]] = defaultdict(list)
        for inst in study.instances:
            series[inst.series_uid].append(inst)
        out = []
        for uid, members in series.items():
            numbers: set[str] = set()
            for inst in members:
                try:
                    ds = dcmread(inst.path, stop_before_pixels=True, specific_tags=["SeriesNumber"])
                except (OSError, InvalidDicomError) as exc:
                    raise PipelineError(f"spooled instance unreadable: {exc}") from exc
                if ds.get("SOPInstanceUID") not in (None, inst.sop_instance_uid):
                    raise PipelineError("spooled file does not hold the instance recorded for it")
                numbers.add(str(ds.get("SeriesNumber", "")))
            out.append(
                {
                    "series_uid": uid,
                    "series_number": ",".join(sorted(numbers)),
                    "instances": len(members),
                    "modality": members[0].modality,
                    "sop_class_uid": members[0].sop_class_uid,
                }
            )
        return StudyResult(summary={"series": out, "instances": len(study.instances)})
