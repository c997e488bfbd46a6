"""Tests of the metrics against hand-computed values, degenerate cases included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_node.training.metrics import (
    ConfusionMatrix,
    binary_scores,
    case_bootstrap_interval,
    choose_threshold,
    cohen_kappa,
    confusion_matrix,
    dice,
    mcc,
    roc_auc,
    roc_curve,
)

# tp=3, fp=1, tn=4, fn=2
TRUTH = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
PRED = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]


def test_scores_match_hand_computed_values() -> None:
    """Accuracy, sensitivity, specificity, precision, F1, MCC and kappa of a known matrix."""
    s = binary_scores(TRUTH, PRED)
    assert s.confusion == ConfusionMatrix(tp=3, fp=1, tn=4, fn=2)
    assert s.accuracy == pytest.approx(0.7)
    assert s.sensitivity == pytest.approx(0.6)
    assert s.specificity == pytest.approx(0.8)
    assert s.precision == pytest.approx(0.75)
    assert s.f1 == pytest.approx(6 / 9)
    assert s.mcc == pytest.approx(10 / math.sqrt(600))
    # p_o = 0.7, p_e = (4*5 + 6*5) / 100 = 0.5
    assert s.kappa == pytest.approx(0.4)
    assert s.roc_auc is None


def test_auc_matches_hand_computed_values_with_ties() -> None:
    """AUC is the share of (positive, negative) pairs ranked right, ties counting half."""
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1], [0.2, 0.2, 0.9]) == pytest.approx(1.0)
    fpr, tpr, _ = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_one_class_only_is_defined() -> None:
    """All-positive truth: AUC None, specificity None, MCC and kappa 0 by convention."""
    s = binary_scores([1, 1, 1], [1, 1, 0], scores=[0.9, 0.8, 0.1])
    assert s.roc_auc is None
    assert s.specificity is None
    assert s.mcc == 0.0
    assert s.kappa == 0.0
    assert s.accuracy == pytest.approx(2 / 3)
    perfect = binary_scores([0, 0], [0, 0])
    assert perfect.f1 == 1.0 and perfect.sensitivity is None and perfect.mcc == 0.0
    assert mcc(ConfusionMatrix(0, 0, 0, 0)) == 0.0
    assert cohen_kappa(ConfusionMatrix(0, 0, 0, 0)) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([1, 1], [0.2, 0.3])


def test_dice_of_known_and_empty_masks() -> None:
    """Dice 2|A∩B|/(|A|+|B|); both empty is 1, one empty is 0."""
    a = np.zeros((2, 4, 4), dtype=bool)
    b = np.zeros_like(a)
    assert dice(a, b) == 1.0
    a[0, :2, :2] = True  # 4 voxels
    assert dice(a, b) == 0.0
    b[0, :2, :1] = True  # 2 voxels, both inside a
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[0])


def test_choose_threshold_separates_separable_scores() -> None:
    """On separable scores the chosen threshold gives MCC 1; one class only gives 0.5."""
    truth = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    t = choose_threshold(truth, scores)
    assert mcc(confusion_matrix(truth, scores >= t)) == pytest.approx(1.0)
    assert choose_threshold([1, 1], [0.2, 0.3]) == 0.5


def test_a_bootstrap_interval_of_a_mean_matches_the_normal_approximation() -> None:
    """400 cases, half of them 1: the 95 % interval of the mean is the mean +- 1.96 standard
    errors (0.049) to within the resampling's noise, and the same for the same seed."""
    values = np.random.default_rng(1).uniform(size=400) < 0.5
    low, high = case_bootstrap_interval(400, lambda i: float(values[i].mean())) or (0, 0)
    mean = float(values.mean())
    half = 1.96 * math.sqrt(mean * (1 - mean) / 400)
    assert low < mean < high
    assert high - low == pytest.approx(2 * half, rel=0.12)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.01)
    assert case_bootstrap_interval(400, lambda i: float(values[i].mean())) == (low, high)
    assert case_bootstrap_interval(400, lambda i: float(values[i].mean()), seed=1) != (low, high)


def test_a_bootstrap_interval_leaves_out_resamples_without_the_figure() -> None:
    """A figure some resamples cannot give (None) is taken over the others; one that most of
    them cannot give has no interval, nor has a figure of fewer than two cases."""
    values = np.array([5.0, 0.0, 0.0, 0.0])
    # the figure exists where case 0 was drawn: in 1 - (3/4)^4 = 68 % of the resamples
    interval = case_bootstrap_interval(4, lambda i: float(values[i].max()) if 0 in i else None)
    assert interval == (5.0, 5.0)
    # case 0 drawn three times or more out of 40: about 8 % of the resamples
    assert case_bootstrap_interval(40, lambda i: 1.0 if (i == 0).sum() > 2 else None) is None
    assert case_bootstrap_interval(1, lambda i: 1.0) is None
