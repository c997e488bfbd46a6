"""A one-page PNG report of an evaluation: figures, ROC curves, confusion matrices, overlays.

Drawn with matplotlib's Agg backend (no display needed). Top row: the key figures (held-out,
and train vs held-out for the network and the baseline), ROC curves, and the per-image and
per-study confusion matrices. Bottom row: slices in a lung window with the ground truth
(green contour) and the model's lesions (red contour, probability at or above the threshold).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dicom_node.training.evaluate import Evaluation, Overlay
    from dicom_node.training.metrics import ConfusionMatrix

logger = logging.getLogger(__name__)


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _confusion(ax: Any, cm: ConfusionMatrix, title: str) -> None:
    grid = np.array([[cm.tn, cm.fp], [cm.fn, cm.tp]])
    ax.imshow(grid, cmap="Blues")
    for (i, j), v in np.ndenumerate(grid):
        colour = "white" if v > grid.max() / 2 else "black"
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14, color=colour)
    ax.set_xticks([0, 1], ["pred. neg.", "pred. pos."])
    ax.set_yticks([0, 1], ["true neg.", "true pos."])
    ax.set_title(title)


_SCORE_KEYS = ("accuracy", "sensitivity", "specificity", "f1", "mcc", "kappa", "roc_auc")


def _row(label: str, scores: dict[str, Any]) -> str:
    return f"{label:17s}" + "  ".join(_fmt(scores[k])[:5] for k in _SCORE_KEYS)


def _interval(value: list[float] | None) -> str:
    return "-" if value is None else f"{value[0]:.2f}-{value[1]:.2f}"


def _summary_lines(
    evaluation: Evaluation,
    train: Evaluation | None,
    baseline: dict[str, Any] | None,
    intervals: dict[str, Any] | None = None,
) -> list[str]:
    """The text panel: scores per image and study, Dice, detection, and the 95 % intervals
    of the headline figures when given."""
    summary = evaluation.summary()
    seg, det = summary["segmentation"], summary["detection"]
    thresholds = evaluation.card.thresholds
    gate = thresholds.image_study_gate
    lines = [
        f"held-out cases: {summary['cases']} ({summary['studies_with_tumour']} with tumour)",
        f"a slice is called at p >= {thresholds.image:.2f}"
        + ("" if gate is None else f", in a study at p >= {gate:.2f}"),
        "",
        f"{'per image':17s}acc    sens   spec   F1     MCC    kappa  AUC",
    ]
    if train is not None:
        lines.append(_row("  train", train.summary()["image"]))
    lines.append(_row("  held-out", summary["image"]))
    if baseline is not None:
        lines.append(_row("  baseline train", baseline["train"]))
        lines.append(_row("  baseline held", baseline["held_out"]))
    lines += ["per study", _row("  held-out", summary["study"])]
    lines += [
        "",
        f"Dice per volume (tumour studies): {_fmt(seg['volume_dice_mean_tumour_studies'])}",
        f"Dice per lesion >= 6 mm: mean {_fmt(seg['lesion_dice_mean_ge_6mm'])}, "
        f"median {_fmt(seg['lesion_dice_median_ge_6mm'])}",
        f"detection sensitivity: {_fmt(det['sensitivity'])} "
        f"(>= 6 mm: {_fmt(det['sensitivity_ge_6mm'])})",
        f"false-positive lesions per tumour-free study: "
        f"{_fmt(det['false_positives_per_tumour_free_study'])}",
    ]
    if intervals is not None:
        image = intervals["image"]
        lines += [
            f"{intervals['level']:.0%} intervals, cases resampled: image accuracy "
            f"{_interval(image['accuracy'])}, MCC {_interval(image['mcc'])},",
            f"  kappa {_interval(image['kappa'])}; Dice >= 6 mm "
            f"{_interval(intervals['lesion_dice_mean_ge_6mm'])}; FP per tumour-free study "
            f"{_interval(intervals['false_positives_per_tumour_free_study'])}",
        ]
    errors = summary["errors"]
    areas = ", ".join(
        f"{b['area_mm2'][0]:g}-{b['area_mm2'][1]:g}: {_fmt(b['sensitivity'])}"
        if b["area_mm2"][1] is not None
        else f">{b['area_mm2'][0]:g}: {_fmt(b['sensitivity'])}"
        for b in errors["image_sensitivity_by_tumour_area"]
    )
    fp = errors["false_positive_images"]
    missed = errors["missed_ge_6mm"]
    threshold = (  # the segmentation threshold the lesions were found at
        evaluation.card.thresholds.segmentation
        if evaluation.rule is None
        else evaluation.rule.threshold
    )
    silent = sum(m["peak_probability"] < threshold for m in missed)
    (near, n_near), *rest = ((k.replace("_", " "), n) for k, n in fp.items())
    lines += [
        "",
        "tumour slices found, by tumour area (mm2):",
        f"  {areas}",
        f"slices flagged without tumour: {n_near} {near},",
        "  " + ", ".join(f"{n} {where}" for where, n in rest),
        f"tumours >= 6 mm missed: {len(missed)}; {silent} of them with no voxel",
        "  above the segmentation threshold",
    ]
    return lines


def _roc(ax: Any, evaluation: Evaluation, baseline: dict[str, Any] | None) -> None:
    summary = evaluation.summary()
    for level, style in (("image", "-"), ("study", "--")):
        roc = evaluation.roc(level)
        if roc is not None:
            auc = summary[level]["roc_auc"]
            ax.plot(roc[0], roc[1], style, label=f"network, per {level} (AUC {_fmt(auc)})")
    if baseline is not None and baseline.get("roc_held_out"):
        r = baseline["roc_held_out"]
        auc = _fmt(baseline["held_out"]["roc_auc"])
        ax.plot(r["fpr"], r["tpr"], ":", label=f"baseline, per image (AUC {auc})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, held-out")
    ax.legend(loc="lower right", fontsize=8)


def _lesion_dice(ax: Any, evaluation: Evaluation) -> None:
    lesions = [les for c in evaluation.cases for les in c.lesions]
    if lesions:
        ax.scatter(
            [les.diameter_mm for les in lesions],
            [les.dice for les in lesions],
            c=["tab:blue" if les.detected else "tab:red" for les in lesions],
            s=14,
        )
    ax.axvline(6.0, color="grey", lw=0.5)
    ax.set_xlabel("lesion diameter (mm, equal-volume sphere)")
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("per-lesion Dice (red: missed)")


def _overlay(ax: Any, overlay: Overlay) -> None:
    """A slice zoomed on the truth (or the most probable pixel), truth and model contoured."""
    ax.axis("off")
    focus = (
        overlay.truth if overlay.truth.any() else overlay.probability >= overlay.probability.max()
    )
    cy, cx = (int(np.mean(v)) for v in np.nonzero(focus))
    h, w = overlay.hu.shape
    half = max(16, min(h, w) // 4)
    y0, x0 = max(0, min(h - 2 * half, cy - half)), max(0, min(w - 2 * half, cx - half))
    view = (slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))
    ax.imshow(overlay.hu[view], cmap="gray", vmin=-1350, vmax=150)
    if overlay.truth[view].any():
        ax.contour(overlay.truth[view].astype(float), levels=[0.5], colors="lime", linewidths=1.2)
    if overlay.predicted[view].any():  # what the node reports: the lesion rule applied
        ax.contour(
            overlay.predicted[view].astype(float), levels=[0.5], colors="red", linewidths=1.2
        )
    ax.set_title(
        f"{overlay.case_id} slice {overlay.slice_index}\n"
        f"p(image) {overlay.image_probability:.2f}; green truth, red model",
        fontsize=9,
    )


def write_report(
    path: Path,
    evaluation: Evaluation,
    *,
    train: Evaluation | None = None,
    baseline: dict[str, Any] | None = None,
    description: str = "",
    intervals: dict[str, Any] | None = None,
) -> Path:
    """Draw the report of ``evaluation`` to ``path`` (PNG) and return ``path``; ``intervals``:
    :meth:`Evaluation.intervals`, shown with the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(22, 11), dpi=100)
    grid = fig.add_gridspec(2, 5, height_ratios=(1.2, 1.1))
    fig.suptitle(
        f"{evaluation.card.name} {evaluation.card.version} - {description}\n"
        "A research model; not for clinical use.",
        fontsize=13,
    )
    ax = fig.add_subplot(grid[0, 0:2])
    ax.axis("off")
    text = "\n".join(_summary_lines(evaluation, train, baseline, intervals))
    ax.text(0.0, 1.0, text, va="top", family="monospace", fontsize=10)
    _roc(fig.add_subplot(grid[0, 2]), evaluation, baseline)
    _confusion(fig.add_subplot(grid[0, 3]), evaluation.image_scores().confusion, "per image")
    _confusion(fig.add_subplot(grid[0, 4]), evaluation.study_scores().confusion, "per study")
    _lesion_dice(fig.add_subplot(grid[1, 4]), evaluation)
    for i in range(4):
        ax = fig.add_subplot(grid[1, i])
        ax.axis("off")
        if i < len(evaluation.overlays):
            _overlay(ax, evaluation.overlays[i])
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
