"""The study pipeline: a complete study's files in, findings and DICOM results out.

Headers → series selection (rules in ``selection:``) → CT volume in HU → the model (ResNet50
U-Net + MLP, :class:`~dicom_node.analysis.inference.InferenceEngine`) → lesions → a DICOM SEG
and a TID 1500 SR per analysed series. The same code serves ``dicom-node serve`` (through the
worker, as a :class:`~dicom_node.pipeline.StudyPipeline`) and ``dicom-node analyze``.

The model is loaded when the pipeline is built, at node start: a missing, corrupt or mismatched
model folder stops the node there, not at the first study.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.analysis.inference import InferenceEngine
from dicom_node.analysis.lesions import Lesion, LesionRule, find_lesions
from dicom_node.analysis.memory import check_fits
from dicom_node.analysis.network import image_calls
from dicom_node.config import Config, resolve_model_path
from dicom_node.errors import (
    DatasetError,
    ModelError,
    PipelineError,
    StudySkipped,
    VolumeDecodeError,
)
from dicom_node.metrics import record_metrics
from dicom_node.pipeline import ReportReference, StudyInput, StudyResult
from dicom_node.results.writer import SourceSlice, write_results
from dicom_node.study.coverage import LungCoverage, lung_coverage
from dicom_node.study.headers import InstanceHeader, read_header
from dicom_node.study.selection import SeriesCandidate, select_series, series_label
from dicom_node.study.volume import CTVolume, load_volume

logger = logging.getLogger(__name__)


def midline_x_mm(volume: CTVolume, coverage: LungCoverage) -> float:
    """LPS x (mm) of the patient's midline, which the SR's laterality is decided against.

    The middle of the body across the patient (at the volume's middle slice), where the whole
    width of the body is in the field of view; where it is not (a targeted reconstruction of
    one side), the scanner's isocentre, x = 0, on which the patient lies centred. ``coverage``
    is of the volume in the model's order (:meth:`CTVolume.to_model_order`), whose columns
    run across the patient whatever the position (a decubitus series' rows do).
    """
    if coverage.body_columns is None or coverage.body_cut:
        return 0.0
    depth, rows, _ = volume.to_model_order(volume.hu).shape
    middle = (coverage.body_columns[0] + coverage.body_columns[1]) / 2.0
    return volume.model_index_to_lps(((depth - 1) / 2.0, (rows - 1) / 2.0, middle))[0]


def _readable_headers(
    paths: Sequence[Path], series_of: Mapping[Path, str] | None
) -> tuple[list[InstanceHeader], list[str]]:
    """The headers of the files at ``paths``, and why any were left out: a file whose header
    cannot be parsed sets its series aside (the file alone when its series is not known). A
    file that cannot be read from disk stops the study: the spool itself is at fault, and a
    later attempt may read it."""
    headers: list[InstanceHeader] = []
    bad: dict[str, str] = {}
    notes: list[str] = []
    for path in paths:
        try:
            headers.append(read_header(path))
        except DatasetError as exc:
            if isinstance(exc.__cause__, OSError):
                raise PipelineError(f"unreadable instance: {exc}") from exc
            series = None if series_of is None else series_of.get(path)
            if series is None:
                notes.append(f"unreadable instance left out: {exc}")
            else:
                bad.setdefault(series, str(exc))
    for series, reason in bad.items():
        label = next(
            (
                series_label(h.series_number, h.series_description)
                for h in headers
                if h.series_instance_uid == series
            ),
            "a series",
        )
        notes.append(f"{label}: unreadable instance ({reason})")
    for note in notes:
        logger.warning("set aside: %s", note)
    return [h for h in headers if h.series_instance_uid not in bad], notes


@dataclass(frozen=True)
class StudyFindings:
    """What the analysis of one study found: per analysed series, and the series it set
    aside on the way, with the reason."""

    series: tuple[SeriesFindings, ...]
    not_analysed: tuple[str, ...] = ()

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Every file written, series by series."""
        return tuple(p for f in self.series for p in f.outputs)

    def summary(self) -> dict[str, Any]:
        """JSON-able form (no patient data)."""
        return {
            "series": [f.summary() for f in self.series],
            "not_analysed": list(self.not_analysed),
        }


@dataclass(frozen=True)
class SeriesFindings:
    """What the model found in one analysed series."""

    series_instance_uid: str
    label: str
    slices: int
    lesions: tuple[Lesion, ...]
    study_probability: float
    study_positive: bool
    threshold: float
    outputs: tuple[Path, ...]
    seconds: dict[str, float]
    #: The rule that made the lesions (card and configuration resolved).
    rule: LesionRule
    #: Components above the rule's threshold that it did not report (volume, peak, gates, or
    #: beyond ``max_lesions``): how much the rule withheld.
    dropped_components: int = 0
    #: The MLP's cancer probability of each slice, in the volume's order (the order of the
    #: lesions' ``first_slice``/``last_slice``), and the card's image threshold and image study
    #: gate.
    image_probabilities: tuple[float, ...] = ()
    image_threshold: float = 0.5
    image_study_gate: float | None = None

    def flagged_images(self) -> list[dict[str, Any]]:
        """The slices the classifier calls cancerous (:func:`image_calls`: probability at or
        above the image threshold, in a study that reaches the image study gate):
        ``{"slice": index, "probability": p}``, in slice order."""
        called = image_calls(
            self.image_probabilities,
            threshold=self.image_threshold,
            study_probability=self.study_probability,
            study_gate=self.image_study_gate,
        )
        return [
            {"slice": int(k), "probability": round(self.image_probabilities[k], 4)}
            for k in np.flatnonzero(called)
        ]

    def summary(self) -> dict[str, Any]:
        """JSON-able form (no patient data)."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "series": self.label,
            "slices": self.slices,
            "study_probability": round(self.study_probability, 4),
            "classification": "cancerous" if self.study_positive else "non-cancerous",
            "threshold": self.threshold,
            "lesion_rule": self.rule.summary(),
            "dropped_components": self.dropped_components,
            "images": {
                "threshold": self.image_threshold,
                "study_gate": self.image_study_gate,
                "highest_probability": (
                    round(max(self.image_probabilities), 4) if self.image_probabilities else None
                ),
                "flagged": self.flagged_images(),
            },
            "lesions": [
                {
                    "label": les.label,
                    "volume_mm3": round(les.volume_mm3, 1),
                    "long_axis_mm": round(les.long_axis_mm, 1),
                    "short_axis_mm": round(les.short_axis_mm, 1),
                    "mean_hu": round(les.mean_hu, 1),
                    "max_hu": round(les.max_hu, 1),
                    "centroid_lps_mm": [round(v, 1) for v in les.centroid_lps],
                    "slices": [les.first_slice, les.last_slice],
                    "mean_probability": round(les.mean_probability, 3),
                }
                for les in self.lesions
            ],
            "outputs": [str(p) for p in self.outputs],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


class AnalysisPipeline:
    """Runs the model on a study; one instance holds the model for the node's lifetime.

    Parameters
    ----------
    config
        The node's configuration (``selection``, ``model``, ``inference``, ``lesions``,
        ``results``, ``uid_root``).
    engine
        A ready engine; built from ``config`` (loading the model) when not given.

    Raises
    ------
    ModelError
        The model folder is missing, corrupt or does not match its card.
    """

    def __init__(self, config: Config, *, engine: InferenceEngine | None = None) -> None:
        self.config = config
        if engine is None:
            if config.model.path is None:
                raise ModelError("no model configured (model.path is null)")
            model = config.model.model_copy(update={"path": resolve_model_path(config.model.path)})
            engine = InferenceEngine.from_config(config.model_copy(update={"model": model}))
        self.engine = engine
        self.ready = True

    def __call__(self, study: StudyInput, /) -> StudyResult:
        findings = self.analyse(
            [i.path for i in study.instances],
            out_dir=study.work_dir,
            job_version=study.version,
            earlier_reports=study.earlier_reports,
            series_of={i.path: i.series_uid for i in study.instances},
        )
        result = StudyResult(summary=findings.summary(), outputs=findings.outputs)
        record_metrics(result)
        return result

    def analyse(
        self,
        paths: Sequence[Path],
        *,
        out_dir: Path,
        job_version: int = 1,
        progress: Callable[[str, int, int], None] | None = None,
        earlier_reports: Sequence[ReportReference] = (),
        series_of: Mapping[Path, str] | None = None,
    ) -> StudyFindings:
        """Analyse the instances at ``paths`` (one study) and write the results to ``out_dir``.

        ``progress(series_label, slices_done, slices_total)`` follows the model's progress.
        ``earlier_reports``: the reports an earlier version of the study sent; one on the
        same series is named as the new SR's predecessor. ``series_of``: each path's series
        (as recorded when it was received), so that a file whose header cannot be read sets
        its whole series aside; without it, the file alone is left out.

        A series set aside on the way (an unreadable instance, no lung in its field of view,
        pixel data that cannot be decoded) is named in :attr:`StudyFindings.not_analysed`,
        and the study goes on with the others; with policy ``best``, the next series that
        qualified is analysed in place of the chosen one.

        Raises
        ------
        StudySkipped
            No series qualifies or could be analysed (the message says why, for each).
        PipelineError
            Anything that stops the analysis: a spooled file that cannot be read from disk,
            pixel data that cannot be decoded in every series tried, model output with
            NaN/Inf, ...
        """
        started = time.perf_counter()
        headers, not_analysed = _readable_headers(paths, series_of)
        try:
            selection = select_series(headers, settings=self.config.selection)
        except StudySkipped as exc:
            if not not_analysed:
                raise
            raise StudySkipped(f"{exc}; {'; '.join(not_analysed)}") from exc
        read_s = time.perf_counter() - started
        out: list[SeriesFindings] = []
        present = frozenset(h.series_instance_uid for h in headers)
        queue = list(selection.chosen)
        # policy best: the next best, in order, of those that cover the chest as the chosen
        # one does (never a targeted reconstruction in place of a whole chest)
        spare = [c for c in selection.passed_over if c.series_instance_uid in selection.covering]
        undecodable: list[VolumeDecodeError] = []
        while queue:
            candidate = queue.pop(0)
            analysed = (
                tuple(c.series_instance_uid for c in selection.chosen)
                if self.config.selection.policy == "all"
                else (candidate.series_instance_uid,)
            )
            try:
                findings = self._analyse_series(
                    candidate,
                    out_dir=out_dir,
                    job_version=job_version,
                    progress=progress,
                    earlier_reports=earlier_reports,
                    analysed_series=analysed,
                    present_series=present,
                )
            except (StudySkipped, VolumeDecodeError) as exc:
                reason = str(exc) if isinstance(exc, StudySkipped) else f"{candidate.label}: {exc}"
                not_analysed.append(reason)
                if isinstance(exc, VolumeDecodeError):
                    undecodable.append(exc)
                logger.warning("series set aside: %s", reason)
                if not out and not queue and spare:
                    queue.append(spare.pop(0))
                    logger.info("trying %s instead", queue[0].label)
                continue
            findings.seconds["headers_and_selection"] = read_s
            out.append(findings)
        if not out:
            if undecodable:
                raise undecodable[0]
            raise StudySkipped("; ".join(not_analysed))
        return StudyFindings(series=tuple(out), not_analysed=tuple(not_analysed))

    def _analyse_series(
        self,
        candidate: SeriesCandidate,
        *,
        out_dir: Path,
        job_version: int,
        progress: Callable[[str, int, int], None] | None = None,
        earlier_reports: Sequence[ReportReference] = (),
        analysed_series: Sequence[str] = (),
        present_series: Collection[str] = (),
    ) -> SeriesFindings:
        seconds: dict[str, float] = {}
        check_fits(
            candidate.plan,
            label=candidate.label,
            probability_dtype=self.config.inference.probability_dtype,
            limit_mb=self.config.jobs.max_analysis_memory_mb,
        )
        t = time.perf_counter()
        volume = load_volume(candidate.plan)
        seconds["volume"] = time.perf_counter() - t
        minimum = self.config.selection.min_lung_fraction
        coverage = lung_coverage(volume.to_model_order(volume.hu))
        if minimum > 0 and coverage.lung_fraction < minimum:
            raise StudySkipped(
                f"{candidate.label}: no lung in the field of view (lung-density tissue"
                f" {100 * coverage.lung_fraction:.1f}% of the body, expected at least"
                f" {100 * minimum:.0f}%)"
            )
        t = time.perf_counter()
        label = candidate.label
        # The model reads the volume as it was trained (x left, y back, z up: a prone or
        # feet-first series flipped to it, a decubitus one transposed); its answer comes back
        # to the volume's own order.
        result = self.engine.run(
            volume.to_model_order(volume.hu),
            volume.model_spacing_mm,
            progress=None if progress is None else lambda d, n: progress(label, d, n),
        ).flipped(volume.axes_against_lps)
        if volume.in_plane_swapped:
            result = result.transposed_in_plane()
        seconds["model"] = time.perf_counter() - t
        image_probabilities = tuple(float(p) for p in result.image_probabilities)
        card = self.engine.card
        rule = LesionRule.resolve(self.config.lesions, card.thresholds)
        t = time.perf_counter()
        lesion_map = find_lesions(
            result.probability,
            volume.hu,
            spacing_mm=volume.spacing_mm,
            origin_lps=volume.origin_mm,
            direction=volume.step_direction,
            threshold=rule.threshold,
            min_volume_mm3=rule.min_volume_mm3,
            min_peak=rule.min_peak,
            flagged_slices=rule.flagged_slices(
                result.image_probabilities, result.study_probability
            ),
            connectivity=rule.connectivity,
            max_lesions=rule.max_lesions,
        )
        seconds["lesions"] = time.perf_counter() - t
        t = time.perf_counter()
        files = write_results(
            source_files=list(volume.source_paths),
            slices=[
                SourceSlice(sop_instance_uid=uid, position_mm=(float(x), float(y), float(z)))
                for uid, (x, y, z) in zip(
                    volume.sop_instance_uids, volume.slice_positions_mm, strict=True
                )
            ],
            labels=lesion_map.labels,
            probability=result.probability,
            lesions=lesion_map.lesions,
            study_probability=result.study_probability,
            study_threshold=card.thresholds.study,
            model_name=result.model_name,
            model_version=result.model_version,
            job_version=job_version,
            settings=self.config.results,
            uid_root=self.config.uid_root,
            out_dir=out_dir,
            image_probabilities=image_probabilities,
            frame_numbers=volume.frame_numbers,
            midline_x_mm=midline_x_mm(volume, coverage),
            earlier_reports=earlier_reports,
            analysed_series=analysed_series,
            present_series=present_series,
        )
        seconds["seg"] = files.seg_seconds
        seconds["sr"] = files.sr_seconds + files.read_seconds
        seconds["results_total"] = time.perf_counter() - t
        outputs = tuple(p for p in (files.seg, files.sr) if p is not None)
        findings = SeriesFindings(
            series_instance_uid=volume.series_instance_uid,
            label=candidate.label,
            slices=volume.hu.shape[0],
            lesions=lesion_map.lesions,
            study_probability=result.study_probability,
            study_positive=result.study_positive,
            threshold=card.thresholds.study,
            outputs=outputs,
            seconds=seconds,
            rule=rule,
            dropped_components=lesion_map.dropped,
            image_probabilities=image_probabilities,
            image_threshold=card.thresholds.image,
            image_study_gate=card.thresholds.image_study_gate,
        )
        logger.info(
            "series analysed",
            extra={
                "fields": {
                    "slices": findings.slices,
                    "lesions": len(findings.lesions),
                    "seconds": {k: round(v, 2) for k, v in seconds.items()},
                }
            },
        )
        # The arrays go with their last reference. No gc.collect() here: it freed nothing
        # (a few hundred small objects, RSS unchanged) and walked every object of torch,
        # highdicom and the model (~500k), ~0.27 s a series on the 2-core machine; the
        # analysis process freezes those (isolation, cli), so automatic collections skip them.
        del volume, result, lesion_map
        return findings
