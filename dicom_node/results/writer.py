"""Write a job's results: the SEG (when there is a lesion) and the SR, as DICOM files.

:func:`write_results` is the one call the pipeline makes once the model and the lesion step
are done. It reads the analysed series' headers (no pixel data; given the slices' UIDs and
positions, only of the slices the objects describe, see :class:`SourceSlice`), derives the job's
UIDs, builds
the Segmentation and then the Structured Report (which references the SEG), and writes both with
``enforce_file_format=True`` (a 128-byte preamble, ``DICM`` and File Meta Information). Each
file is written to a temporary name, flushed to disk and renamed, so a file under its final
name is always whole. Writing twice for the same job gives files with the same UIDs and names.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from dicom_node.analysis.lesions import Lesion
from dicom_node.config import ResultsSettings
from dicom_node.pipeline import ReportReference
from dicom_node.results.identity import TYPE_2_KEYWORDS, Producer, ResultUIDs
from dicom_node.results.seg import SegmentationType, build_segmentation, plan_segments
from dicom_node.results.sr import build_report

__all__ = ["ResultFiles", "SourceSlice", "read_headers", "write_results"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultFiles:
    """What :func:`write_results` wrote.

    Attributes
    ----------
    seg
        The Segmentation file, or ``None`` when no lesion was found.
    sr
        The Structured Report file (always written: it also reports "no lesion").
    uids
        The UIDs the files carry.
    read_seconds, seg_seconds, sr_seconds
        Time spent reading the source headers, and building and writing each object.
    """

    seg: Path | None
    sr: Path
    uids: ResultUIDs
    read_seconds: float
    seg_seconds: float
    sr_seconds: float


@dataclass(frozen=True)
class SourceSlice:
    """What the caller already knows of one slice, so that its file need not be read again.

    Attributes
    ----------
    sop_instance_uid
        The slice's image.
    position_mm
        Its Image Position (Patient), LPS mm.
    """

    sop_instance_uid: str
    position_mm: tuple[float, float, float]


def read_headers(source_files: Sequence[Path]) -> list[Dataset]:
    """Read each file's header, stopping before the pixel data (in the order given).

    A file named more than once (the frames of one multi-frame image) is read once; its entries
    are the same dataset.

    Raises
    ------
    ValueError
        No files, or files of more than one series.
    pydicom.errors.InvalidDicomError, OSError
        A file cannot be read.
    """
    if not source_files:
        raise ValueError("no source files")
    read: dict[Path, Dataset] = {}
    headers: list[Dataset] = []
    for path in source_files:
        if path not in read:
            read[path] = pydicom.dcmread(path, stop_before_pixels=True)
        headers.append(read[path])
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    if len(series) != 1:
        raise ValueError(f"the source files belong to {len(series)} series, not one")
    return headers


def _described_slices(
    n_slices: int,
    lesions: Sequence[Lesion],
    *,
    uids: ResultUIDs,
    max_segments: int,
    image_probabilities: Sequence[float] | None,
) -> set[int]:
    """The slices the SEG and SR take more than a UID from: the first and last, each segment's
    slice range (its frames and the SR's references to them), each measurement slice and the
    slice of highest probability (the SR's image library)."""
    wanted = {0, n_slices - 1}
    for item in plan_segments(lesions, uids=uids, max_segments=max_segments):
        first = max(0, item.lesion.first_slice)
        last = min(n_slices - 1, item.lesion.last_slice)
        wanted.update(range(first, last + 1))
        wanted.add(min(max(0, item.lesion.axis_slice), n_slices - 1))
    if image_probabilities is not None and len(image_probabilities) == n_slices:
        wanted.add(int(np.argmax(np.asarray(image_probabilities, dtype=np.float64))))
    return wanted


def _slice_headers(
    source_files: Sequence[Path],
    slices: Sequence[SourceSlice],
    described: Collection[int],
    first: Dataset,
) -> list[Dataset]:
    """Per slice, its file's header where the slice is ``described`` (or shares a file with
    one that is), else a header made from ``slices``: its SOP Instance UID and Image Position
    (Patient), with the SOP class, study and series of the first slice's image (``first``, its
    header; the slices are of one series) and, from it too, the patient and study attributes
    and Slice Thickness (what :func:`~dicom_node.results.identity.source_header` and the
    slice thickness check look for). Of such a header only its UIDs are written (SR
    evidence)."""
    if len(slices) != len(source_files):
        raise ValueError(f"{len(slices)} slices for {len(source_files)} source files")
    order = {path: k for k, path in reversed(list(enumerate(source_files)))}
    wanted = sorted({source_files[k] for k in described} - {source_files[0]}, key=order.__getitem__)
    by_path = {source_files[0]: first}
    if wanted:
        # read with the first header again: read_headers refuses files of another series
        by_path.update(zip(wanted, read_headers([source_files[0], *wanted])[1:], strict=True))
    template = first
    shared = [
        template[keyword]
        for keyword in (
            "SpecificCharacterSet",
            "SOPClassUID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SliceThickness",
            *TYPE_2_KEYWORDS,
        )
        if keyword in template
    ]
    headers: list[Dataset] = []
    for path, item in zip(source_files, slices, strict=True):
        header = by_path.get(path)
        if header is None:
            header = Dataset()
            for element in shared:
                header.add(element)
            header.SOPInstanceUID = item.sop_instance_uid
            header.ImagePositionPatient = [float(v) for v in item.position_mm]
        headers.append(header)
    return headers


def _save(ds: Dataset, path: Path) -> None:
    """Write ``ds`` to ``path`` whole or not at all (temporary file, fsync, rename)."""
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as handle:
        pydicom.dcmwrite(handle, ds, enforce_file_format=True)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def _earlier_reports(
    reports: Sequence[ReportReference],
    source: Dataset,
    analysed_series: Collection[str] = (),
    present_series: Collection[str] = (),
) -> list[Dataset]:
    """The reports of ``source``'s study that the new report on ``source``'s series revises:
    those whose evidence holds its series; when there are none, those on a series this
    version holds (``present_series``) but does not analyse (``analysed_series``): a thinner
    series that arrived later and was chosen in place of the first one's revises its report.
    A report on a series this version does not hold at all (deleted by retention before the
    study was sent again without it) is revised by none. Each as the data set highdicom reads
    a predecessor from (its SOP class and instance, study and series)."""
    same: list[ReportReference] = []
    replaced: list[ReportReference] = []
    for report in reports:
        if report.sop_class_uid != Comprehensive3DSRStorage:
            continue
        if report.study_uid != str(source.StudyInstanceUID):
            continue
        if str(source.SeriesInstanceUID) in report.evidence_series:
            same.append(report)
        elif set(report.evidence_series) & set(present_series) and not set(
            report.evidence_series
        ) & set(analysed_series):
            replaced.append(report)
    revised = []
    for report in same or replaced:
        ds = Dataset()
        ds.SOPClassUID = report.sop_class_uid
        ds.SOPInstanceUID = report.sop_instance_uid
        ds.StudyInstanceUID = report.study_uid
        ds.SeriesInstanceUID = report.series_uid
        revised.append(ds)
    return revised


def write_results(
    *,
    source_files: Sequence[Path],
    labels: npt.NDArray[np.integer],
    probability: npt.NDArray[np.floating] | npt.NDArray[np.uint8] | None,
    lesions: Sequence[Lesion],
    study_probability: float,
    study_threshold: float,
    model_name: str,
    model_version: str,
    job_version: int,
    settings: ResultsSettings,
    uid_root: str,
    out_dir: Path,
    image_probabilities: Sequence[float] | None = None,
    midline_x_mm: float | None = None,
    frame_numbers: Sequence[int] | None = None,
    earlier_reports: Sequence[ReportReference] = (),
    analysed_series: Collection[str] = (),
    present_series: Collection[str] = (),
    slices: Sequence[SourceSlice] | None = None,
) -> ResultFiles:
    """Build and write the SEG and SR of one analysed series.

    Parameters
    ----------
    source_files
        The analysed series' files in slice order: ``source_files[k]`` is slice ``labels[k]``
        (the same file for every frame of a multi-frame image).
    frame_numbers
        Each slice's frame number (1-based) in its file; needed for multi-frame images
        (Enhanced CT), ignored for single-frame ones.
    labels
        (z, y, x) uint16 label map: 0 background, ``lesion.label`` each lesion's voxels.
    probability
        (z, y, x) model probability (float in [0, 1], or uint8 ``round(p * 255)``); needed
        when ``settings.segmentation_type`` is ``fractional``, else unused.
    lesions
        The measured lesions (largest first); the ``settings.max_segments`` largest become SEG
        segments and SR measurement groups, and the SR counts all of them.
    study_probability, study_threshold
        The study-level probability of cancer and the threshold that classifies it.
    model_name, model_version
        From the model card: the algorithm's name and version in both objects.
    job_version
        The job's version; with the study, series and model version it determines every UID.
    settings
        The ``results`` section of the configuration.
    uid_root
        The configuration's ``uid_root``.
    out_dir
        Folder for the files (created if missing); they are named
        ``SEG_<SOP Instance UID>.dcm`` and ``SR_<SOP Instance UID>.dcm``.
    image_probabilities
        Optional per-slice probability of cancer, (z,).
    midline_x_mm
        LPS x of the patient's midline for laterality; default: the field-of-view centre.
    earlier_reports
        The reports an earlier version of the study sent: one on the same series (of the
        same study) becomes the new SR's predecessor (Predecessor Documents Sequence), so
        that a viewer shows the new report as a revision of the old one; without one, those
        on series this version holds but does not analyse do. Their files need not exist any
        more (retention).
    analysed_series
        Series Instance UIDs this version of the study analyses (this one among them).
    present_series
        Series Instance UIDs of every instance this version of the study holds.
    slices
        Each slice's SOP Instance UID and position (what the volume plan read), in the order of
        ``source_files``. Given, only the files of the slices the SEG and SR describe are read
        (the first and last, the lesions' slices, the image of highest probability); of the
        others, the SR lists the UID as evidence. Without, every file's header is read.

    Returns
    -------
    ResultFiles

    Raises
    ------
    ValueError
        Inputs that do not fit together (see :func:`~dicom_node.results.seg.build_segmentation`
        and :func:`~dicom_node.results.sr.build_report`), or source files of several series.
    OSError
        A file cannot be read or written.
    """
    started = time.perf_counter()
    if slices is None:
        headers = read_headers(source_files)
        first = headers[0]
    else:
        first = read_headers(source_files[:1])[0]
    uids = ResultUIDs.derive(
        root=uid_root,
        study_instance_uid=str(first.StudyInstanceUID),
        source_series_uid=str(first.SeriesInstanceUID),
        job_version=job_version,
        model_version=model_version,
    )
    if slices is not None:
        described = _described_slices(
            len(source_files),
            lesions,
            uids=uids,
            max_segments=settings.max_segments,
            image_probabilities=image_probabilities,
        )
        headers = _slice_headers(source_files, slices, described, first)
    read_seconds = time.perf_counter() - started
    producer = Producer(
        model_name=model_name,
        model_version=model_version,
        device_serial_number=settings.device_serial_number,
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    seg = build_segmentation(
        headers,
        labels,
        lesions,
        uids=uids,
        producer=producer,
        series_number=settings.seg_series_number,
        series_description=settings.seg_series_description,
        segmentation_type=SegmentationType(settings.segmentation_type.upper()),
        probability=probability,
        max_segments=settings.max_segments,
        frame_numbers=frame_numbers,
    )
    seg_path: Path | None = None
    if seg is not None:
        seg_path = out_dir / f"SEG_{uids.seg_instance}.dcm"
        _save(seg, seg_path)
    seg_seconds = time.perf_counter() - started

    started = time.perf_counter()
    segments = plan_segments(lesions, uids=uids, max_segments=settings.max_segments)
    sr = build_report(
        headers,
        segments,
        segmentation=seg,
        lesion_count=len(lesions),
        study_probability=study_probability,
        study_threshold=study_threshold,
        uids=uids,
        producer=producer,
        series_number=settings.sr_series_number,
        series_description=settings.sr_series_description,
        image_probabilities=image_probabilities,
        midline_x_mm=midline_x_mm,
        frame_numbers=frame_numbers,
        previous_versions=_earlier_reports(earlier_reports, first, analysed_series, present_series),
    )
    sr_path = out_dir / f"SR_{uids.sr_instance}.dcm"
    _save(sr, sr_path)
    sr_seconds = time.perf_counter() - started

    logger.info(
        "results written: %d lesions, %d segments; headers %.2f s, SEG %.2f s, SR %.2f s",
        len(lesions),
        len(segments) if seg is not None else 0,
        read_seconds,
        seg_seconds,
        sr_seconds,
    )
    return ResultFiles(
        seg=seg_path,
        sr=sr_path,
        uids=uids,
        read_seconds=read_seconds,
        seg_seconds=seg_seconds,
        sr_seconds=sr_seconds,
    )
