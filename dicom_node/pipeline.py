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
class ReportReference:
    """A structured report this node sent, as a later version of its study needs it: the
    identity a Predecessor Documents Sequence names, and the series the report is about (its
    Current Requested Procedure Evidence).

    The job's result keeps it (``reports``), so a later version names its predecessor even
    when retention has deleted the report's file: a PACS that sends a study again after
    ``storage.keep_hours`` gets a revision, not a second, unrelated report.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    evidence_series: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        """The form kept in a job's result."""
        return {
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "evidence_series": list(self.evidence_series),
        }

    @classmethod
    def from_json(cls, data: object) -> ReportReference | None:
        """The reference kept by :meth:`as_json`; ``None`` for anything else."""
        if not isinstance(data, dict):
            return None
        keys = ("sop_class_uid", "sop_instance_uid", "study_uid", "series_uid")
        values = [data.get(k) for k in keys]
        evidence = data.get("evidence_series")
        if not all(isinstance(v, str) and v for v in values) or not isinstance(evidence, list):
            return None
        if not all(isinstance(s, str) for s in evidence):
            return None
        sop_class, sop_instance, study, series = (str(v) for v in values)
        return cls(sop_class, sop_instance, study, series, tuple(evidence))

    @classmethod
    def read(cls, path: Path) -> ReportReference | None:
        """The reference of the structured report in the file at ``path``; ``None`` when the
        file holds no SR or does not give a whole reference (gone, cut short, not DICOM)."""
        try:
            ds = dcmread(path, stop_before_pixels=True)
            if ds.get("Modality") != "SR":
                return None
            evidence = tuple(
                str(s.SeriesInstanceUID)
                for item in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                for s in item.get("ReferencedSeriesSequence", [])
            )
            identity = [
                str(ds.get(k, "") or "")
                for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
            ]
        except Exception:  # noqa: BLE001 - whatever a damaged file raises, it gives no reference
            return None
        if not all(identity) or not evidence:  # every report of the node names its series
            return None
        sop_class, sop_instance, study, series = identity
        return cls(sop_class, sop_instance, study, series, evidence)


def earlier_reports(result: dict[str, Any] | None) -> tuple[ReportReference, ...]:
    """The reports of a job's result: those it keeps (``reports``), or, in a result kept
    before it had them, those among its output files that are still there."""
    if not result:
        return ()
    kept = result.get("reports")
    if isinstance(kept, list):
        return tuple(r for r in map(ReportReference.from_json, kept) if r is not None)
    outputs = result.get("outputs", [])
    if not isinstance(outputs, list):
        return ()
    found = (ReportReference.read(Path(str(p))) for p in outputs)
    return tuple(r for r in found if r is not None)


@dataclass(frozen=True)
class StudyInput:
    """A complete study as a job sees it."""

    job_id: int
    study_uid: str
    version: int
    instances: tuple[InstanceRecord, ...]
    #: A folder of the job's own, for outputs; created by the worker.
    work_dir: Path
    #: The reports of the newest earlier version of the study whose results went out (or are
    #: going out): what this version's report revises.
    earlier_reports: tuple[ReportReference, ...] = ()


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
