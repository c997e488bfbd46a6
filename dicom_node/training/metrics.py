"""Classification and segmentation metrics, with the degenerate cases defined.

Conventions (each chosen so that a figure is always a number and never misleads upward):

* A ratio whose denominator is zero is ``None`` for sensitivity, specificity, precision (the
  quantity does not exist: no positives, no negatives, no positive calls); F1 is 0 when there
  are no true positives, except that F1 is 1 when there are neither positives nor positive calls.
* MCC is 0 when any marginal of the confusion matrix is zero (the usual convention; it is
  undefined there), Cohen's kappa is 0 when the chance agreement is 1 (both raters constant).
* ROC AUC is ``None`` when only one class is present (no curve can be drawn).
* Dice of two empty masks is 1 (perfect agreement that there is nothing); one empty and one not
  gives 0.

Intervals (:func:`case_bootstrap_interval`) resample whole cases, never slices or lesions: the
slices of one patient are not independent draws, and what a held-out set of a few dozen studies
leaves uncertain is the choice of patients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts of a binary decision against the truth."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        """All decisions."""
        return self.tp + self.fp + self.tn + self.fn


@dataclass(frozen=True)
class BinaryScores:
    """Scores of a binary classifier (see the module docstring for the degenerate cases)."""

    n: int
    positives: int
    accuracy: float
    sensitivity: float | None
    specificity: float | None
    precision: float | None
    f1: float
    mcc: float
    kappa: float
    roc_auc: float | None
    confusion: ConfusionMatrix

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict (the confusion matrix as ``{"tp": ..., ...}``)."""
        return asdict(self)


def confusion_matrix(truth: npt.ArrayLike, predicted: npt.ArrayLike) -> ConfusionMatrix:
    """Count TP, FP, TN, FN of boolean predictions against boolean truth (same length)."""
    t = np.asarray(truth, dtype=bool).reshape(-1)
    p = np.asarray(predicted, dtype=bool).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"truth {t.shape} and predictions {p.shape} differ in length")
    return ConfusionMatrix(
        tp=int(np.sum(t & p)),
        fp=int(np.sum(~t & p)),
        tn=int(np.sum(~t & ~p)),
        fn=int(np.sum(t & ~p)),
    )


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def mcc(cm: ConfusionMatrix) -> float:
    """Matthews correlation coefficient; 0 when a marginal is zero."""
    tp, fp, tn, fn = (float(v) for v in (cm.tp, cm.fp, cm.tn, cm.fn))
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if den == 0 else (tp * tn - fp * fn) / math.sqrt(den)


def cohen_kappa(cm: ConfusionMatrix) -> float:
    """Cohen's kappa of prediction vs truth; 0 when chance agreement is 1 (or no samples)."""
    n = cm.total
    if n == 0:
        return 0.0
    observed = (cm.tp + cm.tn) / n
    expected = ((cm.tp + cm.fp) * (cm.tp + cm.fn) + (cm.tn + cm.fn) * (cm.tn + cm.fp)) / n**2
    return 0.0 if expected >= 1.0 else (observed - expected) / (1.0 - expected)


def roc_curve(
    truth: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """ROC curve: (false positive rates, true positive rates, thresholds), from (0, 0) to (1, 1).

    Tied scores form one point. Raises ``ValueError`` when only one class is present.
    """
    t = np.asarray(truth, dtype=bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos, neg = int(t.sum()), int((~t).sum())
    if pos == 0 or neg == 0:
        raise ValueError("a ROC curve needs both classes")
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    distinct = np.flatnonzero(np.diff(s)) if s.size > 1 else np.array([], dtype=np.int64)
    ends = np.concatenate([distinct, [s.size - 1]])
    tps = np.cumsum(t)[ends]
    fps = (ends + 1) - tps
    tpr = np.concatenate([[0.0], tps / pos])
    fpr = np.concatenate([[0.0], fps / neg])
    thresholds = np.concatenate([[np.inf], s[ends]])
    return fpr, tpr, thresholds


def roc_auc(truth: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """Area under the ROC curve (trapezoids; ties count half); ``None`` with one class only."""
    try:
        fpr, tpr, _ = roc_curve(truth, scores)
    except ValueError:
        return None
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def binary_scores(
    truth: npt.ArrayLike, predicted: npt.ArrayLike, *, scores: npt.ArrayLike | None = None
) -> BinaryScores:
    """All scores of boolean ``predicted`` against boolean ``truth``; AUC from ``scores``."""
    return confusion_scores(
        confusion_matrix(truth, predicted),
        auc=None if scores is None else roc_auc(truth, scores),
    )


def confusion_scores(cm: ConfusionMatrix, *, auc: float | None = None) -> BinaryScores:
    """The scores of a confusion matrix (``auc``, which it cannot give, as given)."""
    sens = _ratio(cm.tp, cm.tp + cm.fn)
    prec = _ratio(cm.tp, cm.tp + cm.fp)
    errors_and_hits = 2 * cm.tp + cm.fp + cm.fn
    f1 = 1.0 if errors_and_hits == 0 else 2 * cm.tp / errors_and_hits
    return BinaryScores(
        n=cm.total,
        positives=cm.tp + cm.fn,
        accuracy=0.0 if cm.total == 0 else (cm.tp + cm.tn) / cm.total,
        sensitivity=sens,
        specificity=_ratio(cm.tn, cm.tn + cm.fp),
        precision=prec,
        f1=f1,
        mcc=mcc(cm),
        kappa=cohen_kappa(cm),
        roc_auc=auc,
        confusion=cm,
    )


def choose_threshold(
    truth: npt.ArrayLike, scores: npt.ArrayLike, *, candidates: npt.ArrayLike | None = None
) -> float:
    """The threshold in (0, 1) that maximises MCC on (truth, scores); ties: the one nearest 0.5.

    Candidates default to 0.02, 0.03, ..., 0.98. With one class only, 0.5 is returned.
    """
    t = np.asarray(truth, dtype=bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if t.all() or not t.any():
        return 0.5
    grid = np.arange(0.02, 0.985, 0.01) if candidates is None else np.asarray(candidates)
    best, best_score = 0.5, -2.0
    for c in sorted(grid, key=lambda v: abs(v - 0.5)):
        score = mcc(confusion_matrix(t, s >= c))
        if score > best_score + 1e-12:
            best, best_score = float(c), score
    return round(best, 4)


def dice(truth: npt.ArrayLike, predicted: npt.ArrayLike) -> float:
    """Dice coefficient of two boolean masks of one shape; 1 when both are empty."""
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if t.shape != p.shape:
        raise ValueError(f"masks differ in shape: {t.shape} vs {p.shape}")
    total = int(t.sum()) + int(p.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.sum(t & p)) / total


#: Resamples and confidence level of the intervals ``dicom-node evaluate`` reports.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95


def case_bootstrap_interval(
    cases: int,
    statistic: Callable[[npt.NDArray[np.int64]], float | None],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a figure over cases (patients), not over slices.

    ``statistic`` gets the indices of a resample of the ``cases`` (drawn with replacement, so an
    index may repeat) and returns the figure on those cases, or ``None`` where the resample
    cannot give it (no tumour of 6 mm in it, no tumour-free case); such resamples are left
    out. ``None`` with fewer than two cases, or when fewer than half of the resamples give the
    figure. Seeded: the same cases give the same interval.
    """
    if cases < 2:
        return None
    # Drawn here rather than with scipy.stats.bootstrap, whose intervals take every resample and
    # warn on the undefined ones that are left out here.
    draws = np.random.default_rng(seed).integers(0, cases, size=(resamples, cases))
    values = np.array([math.nan if (v := statistic(d)) is None else float(v) for d in draws])
    values = values[np.isfinite(values)]
    if values.size < resamples / 2:
        return None
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
