"""Evaluating a model folder the way the node runs it: engine, lesions, metrics, report.

Every case goes through :class:`~dicom_node.analysis.inference.InferenceEngine` and
:func:`~dicom_node.analysis.lesions.find_lesions` with the node's lesion settings, so the figures
describe exactly what the node would report. Per case:

* per image (slice): truth = the slice holds tumour voxels; prediction = the MLP's probability at
  or above the card's image threshold;
* per study: truth = the volume holds tumour; prediction = the top-k mean at or above the card's
  study threshold;
* segmentation: Dice of the thresholded probability map (lesions after the node's filters) with
  the ground truth, per volume and per ground-truth lesion;
* detection: ground-truth lesions are the 26-connected components of the mask. A ground-truth
  lesion is *detected* when at least one predicted lesion shares a voxel with it; a predicted
  lesion that shares no voxel with any ground-truth lesion is a *false positive*. The Dice of a
  ground-truth lesion is computed against the union of the predicted lesions touching it (0 when
  missed). Its size is the diameter of the sphere of equal volume.

Dice, detection and false positives use lesions of at least the configured minimum volume on
the prediction side only; small ground-truth lesions are counted (and reported by size).

The summary's ``errors`` section says where the mistakes are: per-image sensitivity by the
tumour's area on the slice, where the falsely flagged slices lie (next to a tumour, elsewhere
in a study with tumour, in a tumour-free study), detection by tumour size, and each missed
tumour of 6 mm or more with its mean HU and the highest probability the network gave any of
its voxels (low: the network did not respond; high: the lesion rule dropped it).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from dicom_node.analysis.inference import InferenceEngine
from dicom_node.analysis.lesions import LesionMap, LesionRule, find_lesions
from dicom_node.analysis.network import image_calls
from dicom_node.analysis.weights import LoadedModel, ModelCard, load_model, save_card
from dicom_node.config import InferenceSettings, LesionSettings, load_config
from dicom_node.errors import DatasetError
from dicom_node.training.datasets import Case, CaseDataset, iter_cases
from dicom_node.training.metrics import (
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    BinaryScores,
    ConfusionMatrix,
    binary_scores,
    case_bootstrap_interval,
    confusion_scores,
    dice,
    roc_auc,
    roc_curve,
)

logger = logging.getLogger(__name__)

#: Lesions at least this large (equivalent-sphere diameter, mm) make the "large" Dice figure.
LARGE_LESION_MM = 6.0
#: Bins of the tumour's area on a slice (mm²) for the per-image sensitivity breakdown.
AREA_BINS_MM2 = (0.0, 15.0, 60.0, 150.0, math.inf)
#: Bins of tumour diameter (mm) for the detection breakdown.
SIZE_BINS_MM = (0.0, 6.0, 10.0, 20.0, math.inf)
#: A falsely flagged slice this close (slices) to one with tumour counts as "near a tumour".
NEAR_SLICES = 2


def _mean(values: Sequence[float] | npt.NDArray[np.float64]) -> float | None:
    """The mean, or ``None`` of nothing."""
    return float(np.mean(values)) if len(values) else None


@dataclass(frozen=True)
class LesionOutcome:
    """One ground-truth lesion: size, whether it was found, and its Dice."""

    diameter_mm: float
    volume_mm3: float
    detected: bool
    dice: float
    mean_hu: float = 0.0
    peak_probability: float = 0.0


@dataclass(frozen=True)
class Overlay:
    """One slice to show in the report, (y, x) each: HU, truth, the predicted probability and
    the lesions the node reports there (the lesion rule applied, gates included)."""

    case_id: str
    slice_index: int
    hu: npt.NDArray[np.float32]
    truth: npt.NDArray[np.bool_]
    probability: npt.NDArray[np.float32]
    predicted: npt.NDArray[np.bool_]
    image_probability: float


@dataclass(frozen=True, eq=False)
class CaseOutcome:
    """What the model said about one case, against its truth."""

    case_id: str
    image_truth: npt.NDArray[np.bool_]
    image_probability: npt.NDArray[np.float32]
    image_tumour_area_mm2: npt.NDArray[np.float32]
    study_truth: bool
    study_probability: float
    volume_dice: float
    lesions: tuple[LesionOutcome, ...]
    false_positive_lesions: int
    predicted_lesions: int
    seconds: float


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Outcomes of many cases, the card they were scored with, the lesion rule and the
    segmentation scales (the card's, or a configuration's where it sets its own)."""

    card: ModelCard
    cases: tuple[CaseOutcome, ...]
    overlays: tuple[Overlay, ...] = field(default=())
    rule: LesionRule | None = None
    seg_scales: tuple[float, ...] = (1.0,)

    def image_calls(self, case: CaseOutcome) -> npt.NDArray[np.bool_]:
        """The slices of ``case`` the node calls cancerous: the card's image threshold and
        image study gate (:func:`~dicom_node.analysis.network.image_calls`)."""
        return image_calls(
            case.image_probability,
            threshold=self.card.thresholds.image,
            study_probability=case.study_probability,
            study_gate=self.card.thresholds.image_study_gate,
        )

    def image_scores(self) -> BinaryScores:
        """Per-image scores of the node's calls (:meth:`image_calls`); the ROC AUC of the
        image probabilities."""
        truth = np.concatenate([c.image_truth for c in self.cases])
        prob = np.concatenate([c.image_probability for c in self.cases])
        called = np.concatenate([self.image_calls(c) for c in self.cases])
        return binary_scores(truth, called, scores=prob)

    def study_scores(self) -> BinaryScores:
        """Per-study scores at the card's study threshold."""
        truth = np.array([c.study_truth for c in self.cases])
        prob = np.array([c.study_probability for c in self.cases])
        return binary_scores(truth, prob >= self.card.thresholds.study, scores=prob)

    def summary(self) -> dict[str, Any]:
        """Every figure, JSON-ready."""
        lesions = [les for c in self.cases for les in c.lesions]
        large = [les for les in lesions if les.diameter_mm >= LARGE_LESION_MM]
        tumour_free = [c for c in self.cases if not c.study_truth]
        with_tumour = [c for c in self.cases if c.study_truth]

        return {
            "cases": len(self.cases),
            "studies_with_tumour": len(with_tumour),
            "image": self.image_scores().as_dict(),
            "study": self.study_scores().as_dict(),
            "segmentation": {
                "volume_dice_mean_tumour_studies": _mean([c.volume_dice for c in with_tumour]),
                "lesion_dice_mean": _mean([les.dice for les in lesions]),
                f"lesion_dice_mean_ge_{LARGE_LESION_MM:g}mm": _mean([les.dice for les in large]),
                f"lesion_dice_median_ge_{LARGE_LESION_MM:g}mm": (
                    float(np.median([les.dice for les in large])) if large else None
                ),
                "tumour_free_studies_without_false_lesions": (
                    sum(c.predicted_lesions == 0 for c in tumour_free) / len(tumour_free)
                    if tumour_free
                    else None
                ),
            },
            "detection": {
                "lesions": len(lesions),
                f"lesions_ge_{LARGE_LESION_MM:g}mm": len(large),
                "sensitivity": _mean([float(les.detected) for les in lesions]),
                f"sensitivity_ge_{LARGE_LESION_MM:g}mm": _mean(
                    [float(les.detected) for les in large]
                ),
                "false_positives_per_study": _mean(
                    [float(c.false_positive_lesions) for c in self.cases]
                ),
                "false_positives_per_tumour_free_study": _mean(
                    [float(c.false_positive_lesions) for c in tumour_free]
                ),
            },
            "errors": self.errors(),
            "thresholds": self.card.thresholds.model_dump(),
            "lesion_rule": None if self.rule is None else self.rule.summary(),
            "seg_scales": list(self.seg_scales),
            "top_k": self.card.top_k,
            "seconds_per_case": _mean([c.seconds for c in self.cases]),
        }

    def intervals(self, *, seed: int = 0) -> dict[str, Any]:
        """Bootstrap intervals of the headline figures, resampling cases (patients), JSON-ready.

        Per image: accuracy, sensitivity, specificity, MCC, kappa of the node's calls
        (:meth:`image_calls`) and ROC AUC; per study: accuracy, MCC, AUC; the mean Dice and the
        detection of tumours of 6 mm and more; false-positive lesions per tumour-free study.
        Each is ``[low, high]``, or ``None`` where the cases cannot give it (see
        :func:`~dicom_node.training.metrics.case_bootstrap_interval`).
        """
        counts = np.array(
            [
                [
                    np.sum(c.image_truth & flagged),
                    np.sum(~c.image_truth & flagged),
                    np.sum(~c.image_truth & ~flagged),
                    np.sum(c.image_truth & ~flagged),
                ]
                for c in self.cases
                for flagged in [self.image_calls(c)]
            ],
            dtype=np.int64,
        ).reshape(-1, 4)
        study_truth = np.array([c.study_truth for c in self.cases])
        study_probability = np.array([c.study_probability for c in self.cases])
        large = [
            [les for les in c.lesions if les.diameter_mm >= LARGE_LESION_MM] for c in self.cases
        ]
        false_positives = np.array([c.false_positive_lesions for c in self.cases], dtype=float)

        def image(idx: npt.NDArray[np.int64]) -> BinaryScores:
            tp, fp, tn, fn = (int(v) for v in counts[idx].sum(axis=0))
            return confusion_scores(ConfusionMatrix(tp=tp, fp=fp, tn=tn, fn=fn))

        def image_auc(idx: npt.NDArray[np.int64]) -> float | None:
            return roc_auc(
                np.concatenate([self.cases[i].image_truth for i in idx]),
                np.concatenate([self.cases[i].image_probability for i in idx]),
            )

        def study(idx: npt.NDArray[np.int64]) -> BinaryScores:
            prob = study_probability[idx]
            return binary_scores(study_truth[idx], prob >= self.card.thresholds.study)

        def lesions(idx: npt.NDArray[np.int64]) -> list[LesionOutcome]:
            return [les for i in idx for les in large[i]]

        def per_free(idx: npt.NDArray[np.int64]) -> float | None:
            return _mean(false_positives[idx][~study_truth[idx]])

        figures: dict[str, Any] = {
            "image": {
                "accuracy": lambda i: image(i).accuracy,
                "sensitivity": lambda i: image(i).sensitivity,
                "specificity": lambda i: image(i).specificity,
                "mcc": lambda i: image(i).mcc,
                "kappa": lambda i: image(i).kappa,
                "roc_auc": image_auc,
            },
            "study": {
                "accuracy": lambda i: study(i).accuracy,
                "mcc": lambda i: study(i).mcc,
                "roc_auc": lambda i: roc_auc(study_truth[i], study_probability[i]),
            },
            f"lesion_dice_mean_ge_{LARGE_LESION_MM:g}mm": lambda i: _mean(
                [les.dice for les in lesions(i)]
            ),
            f"detection_sensitivity_ge_{LARGE_LESION_MM:g}mm": lambda i: _mean(
                [float(les.detected) for les in lesions(i)]
            ),
            "false_positives_per_tumour_free_study": per_free,
        }

        def interval(statistic: Any) -> list[float] | None:
            found = case_bootstrap_interval(len(self.cases), statistic, seed=seed)
            return None if found is None else [found[0], found[1]]

        out: dict[str, Any] = {
            "method": "percentile bootstrap over cases (patients)",
            "resamples": BOOTSTRAP_RESAMPLES,
            "level": BOOTSTRAP_LEVEL,
            "seed": seed,
        }
        for key, value in figures.items():
            if isinstance(value, dict):
                out[key] = {name: interval(f) for name, f in value.items()}
            else:
                out[key] = interval(value)
        return out

    def errors(self) -> dict[str, Any]:
        """Where the mistakes are (see the module docstring), JSON-ready."""
        by_area = []
        area = np.concatenate([c.image_tumour_area_mm2 for c in self.cases])
        calls = [self.image_calls(c) for c in self.cases]
        flagged = np.concatenate(calls)
        for low, high in itertools.pairwise(AREA_BINS_MM2):
            rows = (area > low) & (area <= high)
            by_area.append(
                {
                    "area_mm2": [low, None if math.isinf(high) else high],
                    "images": int(rows.sum()),
                    "sensitivity": float(flagged[rows].mean()) if rows.any() else None,
                }
            )
        near = elsewhere = tumour_free = 0
        for c, called in zip(self.cases, calls, strict=True):
            tumour_slices = np.flatnonzero(c.image_truth)
            for k in np.flatnonzero(called & ~c.image_truth):
                if tumour_slices.size == 0:
                    tumour_free += 1
                elif np.abs(tumour_slices - k).min() <= NEAR_SLICES:
                    near += 1
                else:
                    elsewhere += 1
        lesions = [les for c in self.cases for les in c.lesions]
        by_size = []
        for low, high in itertools.pairwise(SIZE_BINS_MM):
            group = [les for les in lesions if low <= les.diameter_mm < high]
            by_size.append(
                {
                    "diameter_mm": [low, None if math.isinf(high) else high],
                    "lesions": len(group),
                    "sensitivity": _mean([float(les.detected) for les in group]),
                }
            )
        missed = [
            {
                "diameter_mm": les.diameter_mm,
                "mean_hu": les.mean_hu,
                "peak_probability": les.peak_probability,
            }
            for les in sorted(lesions, key=lambda les: les.diameter_mm)
            if les.diameter_mm >= LARGE_LESION_MM and not les.detected
        ]
        return {
            "image_sensitivity_by_tumour_area": by_area,
            "false_positive_images": {
                f"within_{NEAR_SLICES}_slices_of_tumour": near,
                "elsewhere_in_tumour_studies": elsewhere,
                "in_tumour_free_studies": tumour_free,
            },
            "detection_by_size": by_size,
            f"missed_ge_{LARGE_LESION_MM:g}mm": missed,
        }

    def roc(self, level: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
        """(fpr, tpr) of ``image`` or ``study`` probabilities; ``None`` with one class only."""
        if level == "image":
            truth = np.concatenate([c.image_truth for c in self.cases])
            prob = np.concatenate([c.image_probability for c in self.cases])
        else:
            truth = np.array([c.study_truth for c in self.cases])
            prob = np.array([c.study_probability for c in self.cases])
        try:
            fpr, tpr, _ = roc_curve(truth, prob)
        except ValueError:
            return None
        return fpr, tpr


def equivalent_diameter_mm(volume_mm3: float) -> float:
    """The diameter of the sphere of ``volume_mm3`` (how a tumour's size is given here)."""
    return float((6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0))


def case_lesions(
    case: Case,
    probability: npt.NDArray[np.float32],
    image_probability: npt.NDArray[np.float32],
    study_probability: float,
    rule: LesionRule,
) -> LesionMap:
    """The lesions the node reports for one case's model outputs, under ``rule``."""
    return find_lesions(
        probability,
        case.hu,
        spacing_mm=case.spacing_mm,
        threshold=rule.threshold,
        min_volume_mm3=rule.min_volume_mm3,
        min_peak=rule.min_peak,
        flagged_slices=rule.flagged_slices(image_probability, study_probability),
        connectivity=rule.connectivity,
        max_lesions=rule.max_lesions,
    )


def score_case(
    case: Case,
    probability: npt.NDArray[np.float32],
    image_probability: npt.NDArray[np.float32],
    study_probability: float,
    *,
    rule: LesionRule,
    seconds: float = 0.0,
    lesion_map: LesionMap | None = None,
) -> CaseOutcome:
    """Compare one case's model outputs with its truth (see the module docstring).

    Parameters
    ----------
    case
        The volume and its tumour mask (z, y, x).
    probability
        (z, y, x) tumour probability in [0, 1].
    image_probability
        (z,) per-slice cancer probability.
    study_probability
        The study's probability.
    rule
        Threshold, minimum volume, peak, image gate (on ``image_probability``), study gate (on
        ``study_probability``), connectivity and maximum count, as the node uses them
        (:meth:`LesionRule.resolve`).
    lesion_map
        The lesions :func:`case_lesions` found with ``rule`` (found here when not given).
    """
    if lesion_map is None:
        lesion_map = case_lesions(case, probability, image_probability, study_probability, rule)
    predicted = lesion_map.labels
    truth_components, count = cc3d.connected_components(
        case.tumour_mask > 0, connectivity=26, return_N=True, binary_image=True
    )
    voxel_mm3 = float(np.prod(case.spacing_mm))
    outcomes = []
    touched: set[int] = set()
    for label in range(1, count + 1):
        gt = truth_components == label
        hits = np.unique(predicted[gt])
        hits = hits[hits > 0]
        touched.update(int(h) for h in hits)
        found = np.isin(predicted, hits) if hits.size else np.zeros_like(gt)
        volume = float(gt.sum()) * voxel_mm3
        outcomes.append(
            LesionOutcome(
                diameter_mm=equivalent_diameter_mm(volume),
                volume_mm3=volume,
                detected=bool(hits.size),
                dice=dice(gt, found),
                mean_hu=float(case.hu[gt].mean()),
                peak_probability=float(probability[gt].max()),
            )
        )
    n_pred = len(lesion_map.lesions)
    return CaseOutcome(
        case_id=case.case_id,
        image_truth=case.slice_labels,
        image_probability=np.asarray(image_probability, dtype=np.float32),
        image_tumour_area_mm2=(
            (case.tumour_mask > 0).sum(axis=(1, 2)) * case.spacing_mm[1] * case.spacing_mm[2]
        ).astype(np.float32),
        study_truth=case.has_tumour,
        study_probability=float(study_probability),
        volume_dice=dice(case.tumour_mask > 0, predicted > 0),
        lesions=tuple(outcomes),
        false_positive_lesions=n_pred - len(touched),
        predicted_lesions=n_pred,
        seconds=seconds,
    )


def evaluate(
    model: LoadedModel | Path,
    dataset: CaseDataset,
    case_ids: Sequence[str],
    *,
    inference: InferenceSettings | None = None,
    lesion_settings: LesionSettings | None = None,
    overlays: int = 4,
    progress: bool = False,
    workers: int = 1,
) -> Evaluation:
    """Run the node's engine and lesion finder over cases and score them.

    Parameters
    ----------
    model
        A model folder or a loaded model.
    dataset, case_ids
        The cases to score.
    inference, lesion_settings
        As in the node's configuration (defaults when omitted).
    overlays
        How many slices to keep for the report (tumour slices first, then the most suspicious
        slices of tumour-free cases).
    progress
        Show a progress bar.
    workers
        Processes that load (or generate) the cases ahead of the engine.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    engine = InferenceEngine(loaded, inference or InferenceSettings(device="cpu"))
    rule = LesionRule.resolve(lesion_settings or LesionSettings(), engine.card.thresholds)
    outcomes: list[CaseOutcome] = []
    shown: list[Overlay] = []
    for case in tqdm(
        iter_cases(dataset, case_ids, workers=workers),
        total=len(case_ids),
        disable=not progress,
        desc="evaluate",
    ):
        started = time.perf_counter()
        result = engine.run(case.hu, case.spacing_mm)
        prob = result.probability_float32()
        lesion_map = case_lesions(
            case, prob, result.image_probabilities, result.study_probability, rule
        )
        outcome = score_case(
            case,
            prob,
            result.image_probabilities,
            result.study_probability,
            rule=rule,
            seconds=time.perf_counter() - started,
            lesion_map=lesion_map,
        )
        outcomes.append(outcome)
        # Up to overlays - 1 slices with tumour and one of a tumour-free case.
        slots = overlays - 1 if case.has_tumour else min(1, overlays)
        if sum(o.truth.any() == case.has_tumour for o in shown) < slots:
            if case.has_tumour:
                k = int(np.argmax((case.tumour_mask > 0).sum(axis=(1, 2))))
            else:
                k = int(np.argmax(result.image_probabilities))
            shown.append(
                Overlay(
                    case_id=case.case_id,
                    slice_index=k,
                    hu=np.asarray(case.hu[k], dtype=np.float32),
                    truth=np.asarray(case.tumour_mask[k] > 0),
                    probability=prob[k].copy(),
                    predicted=np.asarray(lesion_map.labels[k] > 0),
                    image_probability=float(result.image_probabilities[k]),
                )
            )
    return Evaluation(
        card=engine.card,
        cases=tuple(outcomes),
        overlays=tuple(shown),
        rule=rule,
        seg_scales=engine.seg_scales,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_evaluation(
    out_dir: Path,
    held_out: Evaluation,
    *,
    description: str,
    train: Evaluation | None = None,
    baseline: dict[str, Any] | None = None,
    intervals: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``evaluation.json`` and ``report.png`` into ``out_dir``; return both paths.
    ``intervals``: ``held_out.intervals()`` where the caller has them already."""
    from dicom_node.training.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    if intervals is None:
        intervals = held_out.intervals()
    payload: dict[str, Any] = {
        "model": {"name": held_out.card.name, "version": held_out.card.version},
        "dataset": description,
        "definitions": {
            "image_truth": "slice holds tumour voxels",
            "study_truth": "volume holds tumour voxels",
            "lesion_match": "a predicted lesion and a ground-truth component share a voxel",
            "lesion_size": "diameter of the sphere of equal volume (mm)",
            "dice_empty": "1 when truth and prediction are both empty",
            "mcc_degenerate": "0 when a marginal of the confusion matrix is 0",
        },
        "held_out": held_out.summary(),
        "held_out_intervals": intervals,
        "per_case": [
            {
                "case_id": c.case_id,
                "study_truth": c.study_truth,
                "study_probability": c.study_probability,
                "volume_dice": c.volume_dice,
                "false_positive_lesions": c.false_positive_lesions,
                "predicted_lesions": c.predicted_lesions,
                "lesions": [asdict(les) for les in c.lesions],
            }
            for c in held_out.cases
        ],
    }
    if train is not None:
        payload["train"] = train.summary()
    if baseline is not None:
        payload["baseline"] = baseline
    json_path = out_dir / "evaluation.json"
    json_path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n", encoding="utf-8")
    png_path = write_report(
        out_dir / "report.png",
        held_out,
        train=train,
        baseline=baseline,
        description=description,
        intervals=intervals,
    )
    return json_path, png_path


def card_figures(
    held_out: Evaluation,
    *,
    train: Evaluation | None = None,
    baseline: dict[str, Any] | None = None,
    intervals: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The figures a model card carries: held-out (``heldout_*``, with the 95 % intervals of the
    five target figures as ``heldout_*_ci95_low`` / ``_high``), train and baseline scores.
    ``intervals``: ``held_out.intervals()`` where the caller has them already."""
    s = held_out.summary()
    seg, det = s["segmentation"], s["detection"]
    figures: dict[str, Any] = {
        "heldout_cases": s["cases"],
        "heldout_image_accuracy": s["image"]["accuracy"],
        "heldout_image_sensitivity": s["image"]["sensitivity"],
        "heldout_image_specificity": s["image"]["specificity"],
        "heldout_image_f1": s["image"]["f1"],
        "heldout_image_mcc": s["image"]["mcc"],
        "heldout_image_kappa": s["image"]["kappa"],
        "heldout_image_auc": s["image"]["roc_auc"],
        "heldout_study_accuracy": s["study"]["accuracy"],
        "heldout_study_mcc": s["study"]["mcc"],
        "heldout_study_kappa": s["study"]["kappa"],
        "heldout_study_auc": s["study"]["roc_auc"],
        "heldout_volume_dice": seg["volume_dice_mean_tumour_studies"],
        "heldout_lesion_dice_ge_6mm": seg[f"lesion_dice_mean_ge_{LARGE_LESION_MM:g}mm"],
        "heldout_detection_sensitivity": det["sensitivity"],
        "heldout_detection_sensitivity_ge_6mm": det[f"sensitivity_ge_{LARGE_LESION_MM:g}mm"],
        "heldout_fp_lesions_per_tumour_free_study": det["false_positives_per_tumour_free_study"],
    }
    if intervals is None:
        intervals = held_out.intervals()
    for name, interval in (
        ("image_accuracy", intervals["image"]["accuracy"]),
        ("image_mcc", intervals["image"]["mcc"]),
        ("image_kappa", intervals["image"]["kappa"]),
        ("lesion_dice_ge_6mm", intervals[f"lesion_dice_mean_ge_{LARGE_LESION_MM:g}mm"]),
        ("fp_lesions_per_tumour_free_study", intervals["false_positives_per_tumour_free_study"]),
    ):
        if interval is not None:  # the 95 % interval, cases resampled (Evaluation.intervals)
            figures[f"heldout_{name}_ci95_low"], figures[f"heldout_{name}_ci95_high"] = interval
    if train is not None:
        t = train.summary()
        figures["train_image_accuracy"] = t["image"]["accuracy"]
        figures["train_image_mcc"] = t["image"]["mcc"]
    if baseline is not None:
        figures["baseline_train_image_accuracy"] = baseline["train"]["accuracy"]
        figures["baseline_train_image_mcc"] = baseline["train"]["mcc"]
        figures["baseline_heldout_image_accuracy"] = baseline["held_out"]["accuracy"]
        figures["baseline_heldout_image_mcc"] = baseline["held_out"]["mcc"]
    return {k: float(v) for k, v in figures.items() if v is not None}


#: The held-out note :func:`card_with_figures` adds, up to its closing full stop.
_HELD_OUT_NOTE = re.compile(r" Held-out evaluation \(metrics heldout_\*\): .*?\.(?=\s|$)")


def card_with_figures(
    card: ModelCard,
    held_out: Evaluation,
    *,
    description: str,
    train: Evaluation | None = None,
    baseline: dict[str, Any] | None = None,
    intervals: dict[str, Any] | None = None,
) -> ModelCard:
    """The card with the evaluation's figures merged in and the held-out set named.

    Every ``heldout_*`` figure is this evaluation's: those of an earlier one go, so a figure
    this evaluation cannot give (an interval without tumours of 6 mm, say) is absent rather
    than stale; so does an earlier held-out note in the description. The baseline's figures
    compare it with the network on a held-out set: they go unless given again. Train figures
    (the network on its training cases) are replaced only when given.
    """
    earlier = re.sub(_HELD_OUT_NOTE, "", card.description)
    text = f"{earlier} Held-out evaluation (metrics heldout_*): {description}."
    kept = {
        k: v
        for k, v in card.metrics.items()
        if not k.startswith("heldout_") and (baseline is not None or not k.startswith("baseline_"))
    }
    return card.model_copy(
        update={
            "description": text,
            "metrics": {
                **kept,
                **card_figures(held_out, train=train, baseline=baseline, intervals=intervals),
            },
        }
    )


def _cases_from_args(args: Any) -> tuple[CaseDataset, list[str], CaseDataset, list[str]]:
    """The held-out dataset and case ids, and the training ones, from ``evaluate``'s arguments.

    With a split of phantoms, its cases are made as the split records (its ids name seeds, not
    how the phantoms were made); an empty held-out set is refused before anything runs.
    """
    from dicom_node.training.datasets import (
        SPLIT_NAMES,
        open_dataset,
        phantom_spec_from_args,
        read_split,
    )

    spec = phantom_spec_from_args(args)
    split = None if args.split is None else read_split(args.split)
    if split is not None and args.dataset == "phantoms":
        spec = split.phantoms_for(spec, source=str(args.split))  # what its ids stand for
    dataset = open_dataset(
        args.dataset,
        path=args.data,
        phantoms=spec,
        cache_dir=args.cache_dir,
        segment_labels=args.segment_labels,
    )
    train_dataset: CaseDataset
    if split is not None:
        split.check_patients(dataset, source=str(args.split))
        # every case the run will read, before the first is scored
        used = {args.split_name} | (
            {"train"} if args.train_eval_cases > 0 or args.baseline else set()
        )
        split.check_cases(
            dataset, parts=[n for n in SPLIT_NAMES if n in used], source=str(args.split)
        )
        held_out_ids = list(split.get(args.split_name))
        if not held_out_ids:
            raise DatasetError(
                f"the {args.split_name!r} part of {args.split} holds no case (train writes"
                " none unless --test-fraction is given): name another with --split-name"
            )
        train_ids = list(split.train)
        train_dataset = dataset
    else:
        held_out_ids = dataset.case_ids()
        if not held_out_ids:
            raise DatasetError(f"{dataset.name} holds no case: nothing to evaluate")
        train_spec = phantom_spec_from_args(args, prefix="train_")
        train_split = None if args.train_split is None else read_split(args.train_split)
        if train_split is not None and args.dataset == "phantoms":
            train_spec = train_split.phantoms_for(
                train_spec, source=str(args.train_split), listing=False
            )
        train_dataset = open_dataset(
            args.dataset,
            path=args.data,
            phantoms=train_spec,
            cache_dir=args.cache_dir,
            segment_labels=args.segment_labels,
        )
        train_ids = train_dataset.case_ids() if args.dataset == "phantoms" else []
        if train_split is not None:  # only the cases the network was trained on
            trained = set(train_split.train)
            train_ids = [c for c in train_ids if c in trained]
    return dataset, held_out_ids, train_dataset, train_ids


def run_from_args(args: Any) -> int:
    """The ``dicom-node evaluate`` command (``args`` from its argparse subcommand)."""
    import torch

    from dicom_node.training.datasets import default_workers

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # the configuration first: a file that does not load is refused before any case is read
    node_config = None if args.config is None else load_config(args.config)
    lesion_settings = None if node_config is None else node_config.lesions
    seg_scales = None if node_config is None else node_config.inference.seg_scales
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dataset, held_out_ids, train_dataset, train_ids = _cases_from_args(args)
    progress = not args.no_progress
    workers = args.workers or default_workers()
    loaded = load_model(args.model)
    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device
    inference = InferenceSettings(device=device, seg_scales=seg_scales)
    held_out = evaluate(
        loaded,
        dataset,
        held_out_ids,
        inference=inference,
        lesion_settings=lesion_settings,
        progress=progress,
        workers=workers,
    )
    train_eval = None
    if train_ids and args.train_eval_cases > 0:
        train_eval = evaluate(
            loaded,
            train_dataset,
            train_ids[: args.train_eval_cases],
            inference=inference,
            lesion_settings=lesion_settings,
            overlays=0,
            progress=progress,
            workers=workers,
        )
    baseline = None
    if args.baseline:
        from dicom_node.training.baseline import compare_baseline

        baseline = compare_baseline(
            train_dataset,
            train_ids,
            dataset,
            held_out_ids,
            seed=args.seed,
            progress=progress,
            workers=workers,
        )
    description = f"{dataset.name}: {len(held_out_ids)} cases"
    intervals = held_out.intervals()  # for the JSON, the report and the card
    json_path, png_path = write_evaluation(
        args.out,
        held_out,
        description=description,
        train=train_eval,
        baseline=baseline,
        intervals=intervals,
    )
    if args.write_card is not None:
        card = card_with_figures(
            loaded.card,
            held_out,
            description=description,
            train=train_eval,
            baseline=baseline,
            intervals=intervals,
        )
        # The weights file is the evaluated one, byte for byte (copied when another folder).
        save_card(card, args.write_card, weights_from=args.model)
        logger.info(
            "model with held-out figures written to %s (sha256 %s)",
            args.write_card,
            card.weights.sha256,
        )
    summary = held_out.summary()
    print(
        json.dumps(
            _jsonable({"json": str(json_path), "report": str(png_path), **summary}), indent=2
        )
    )
    return 0
