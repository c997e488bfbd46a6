"""Tests of the traditional-ML baseline: features and the train vs held-out comparison."""

from __future__ import annotations

import numpy as np

from dicom_node.training.baseline import (
    FEATURE_NAMES,
    compare_baseline,
    lung_region,
    slice_features,
)
from dicom_node.training.datasets import PhantomDataset, PhantomSpec


def test_lung_region_is_inner_air_with_holes_filled() -> None:
    """Outside air is not lung; air enclosed by the body is, and a nodule inside it too."""
    hu = np.full((40, 40), -1000.0)
    hu[5:35, 5:35] = 40.0  # body
    hu[10:30, 10:30] = -850.0  # lung
    hu[18:21, 18:21] = 30.0  # nodule
    region = lung_region(hu)
    assert not region[0, 0]
    assert region[12, 12] and region[19, 19]
    assert int(region.sum()) == 400
    feats = slice_features(hu, (1.0, 1.0))
    assert feats.shape == (len(FEATURE_NAMES),)
    assert feats[FEATURE_NAMES.index("lung_area_mm2")] == 400.0
    assert feats[FEATURE_NAMES.index("largest_blob_mm2")] == 9.0


def test_baseline_reports_train_and_held_out_scores() -> None:
    """The forest trains on one set of phantoms and is scored there and on others."""
    train = PhantomDataset(
        PhantomSpec(first_seed=0, count=3, shape_zyx=(16, 64, 64), tumour_probability=1.0)
    )
    test = PhantomDataset(PhantomSpec(first_seed=50, count=2, shape_zyx=(16, 64, 64), shift=1.0))
    result = compare_baseline(train, train.case_ids(), test, test.case_ids(), seed=0)
    assert result["train_slices"] == 48 and result["held_out_slices"] == 32
    assert result["train"]["accuracy"] > 0.9  # a forest fits its own training slices
    assert 0.0 <= result["held_out"]["accuracy"] <= 1.0
    assert result["train"]["confusion"]["tp"] + result["train"]["confusion"]["fn"] > 0


def test_a_baseline_fitted_on_one_class_scores_without_failing() -> None:
    """Training slices without any tumour (a tumour-free training split): the forest knows one
    class; every slice gets probability 0 instead of an error."""
    from dicom_node.training.baseline import fit_baseline

    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, len(FEATURE_NAMES)))
    model = fit_baseline(features, np.zeros(20, dtype=bool))
    assert model.predict_proba(features).tolist() == [0.0] * 20
    both = fit_baseline(features, np.arange(20) % 2 == 0)
    assert both.predict_proba(features).shape == (20,)
