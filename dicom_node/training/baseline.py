"""A traditional machine-learning baseline: hand-crafted slice features and a random forest.

The comparison the method's study makes: a classical classifier on engineered features can score
well on the data it was trained on and poorly on data from elsewhere. Per slice (image), in the
lung region found by thresholds alone (no model):

* the region: lung area (mm²) and the share of it that is dense (> -400 HU);
* the HU histogram inside the (hole-filled) lung region: mean, standard deviation, skewness,
  kurtosis, 5th/25th/50th/75th/95th percentiles, and the mean and standard deviation of its dense
  voxels;
* texture: gradient magnitude (HU/mm) mean, standard deviation and 95th percentile, and grey-level
  co-occurrence (8 levels over -1000..200 HU, offsets (0, 1) and (1, 0)) contrast, homogeneity,
  energy and correlation;
* shape: the number of dense blobs in the lung and the area (mm²) of the largest.

:func:`compare_baseline` trains a scikit-learn random forest on the training cases' slices and
reports its scores on those slices and on the held-out ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped, unused-ignore]
from tqdm import tqdm

from dicom_node.training.datasets import Case, CaseDataset, map_cases
from dicom_node.training.metrics import binary_scores

logger = logging.getLogger(__name__)

FEATURE_NAMES: tuple[str, ...] = (
    "lung_area_mm2",
    "dense_fraction",
    "hu_mean",
    "hu_std",
    "hu_skew",
    "hu_kurtosis",
    "hu_p05",
    "hu_p25",
    "hu_p50",
    "hu_p75",
    "hu_p95",
    "dense_mean",
    "dense_std",
    "grad_mean",
    "grad_std",
    "grad_p95",
    "glcm_contrast",
    "glcm_homogeneity",
    "glcm_energy",
    "glcm_correlation",
    "dense_blobs",
    "largest_blob_mm2",
)
_LEVELS = 8


def lung_region(hu: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    """(y, x) hole-filled lung region of one slice from thresholds alone.

    Air below -400 HU that does not touch the image border (outside air) and lies inside the
    body, with holes (vessels, nodules) filled.
    """
    air = np.asarray(hu) < -400
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros(air.shape, dtype=bool)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inner = air & ~np.isin(labels, border)
    filled: npt.NDArray[np.bool_] = ndimage.binary_fill_holes(inner)
    return filled


def _glcm(levels: npt.NDArray[np.int64], region: npt.NDArray[np.bool_]) -> list[float]:
    """Contrast, homogeneity, energy, correlation of the co-occurrence matrix in ``region``."""
    matrix = np.zeros((_LEVELS, _LEVELS), dtype=np.float64)
    for dy, dx in ((0, 1), (1, 0)):
        a = levels[: levels.shape[0] - dy, : levels.shape[1] - dx]
        b = levels[dy:, dx:]
        inside = region[: region.shape[0] - dy, : region.shape[1] - dx] & region[dy:, dx:]
        np.add.at(matrix, (a[inside], b[inside]), 1.0)
    total = matrix.sum()
    if total == 0:
        return [0.0, 0.0, 0.0, 0.0]
    p = matrix / total
    i, j = np.indices(p.shape)
    contrast = float(np.sum(p * (i - j) ** 2))
    homogeneity = float(np.sum(p / (1.0 + np.abs(i - j))))
    energy = float(np.sum(p**2))
    mi, mj = float(np.sum(i * p)), float(np.sum(j * p))
    si = float(np.sqrt(np.sum(p * (i - mi) ** 2)))
    sj = float(np.sqrt(np.sum(p * (j - mj) ** 2)))
    corr = float(np.sum(p * (i - mi) * (j - mj)) / (si * sj)) if si > 0 and sj > 0 else 0.0
    return [contrast, homogeneity, energy, corr]


def slice_features(
    hu: npt.NDArray[np.generic], spacing_yx_mm: tuple[float, float]
) -> npt.NDArray[np.float64]:
    """The :data:`FEATURE_NAMES` features of one (y, x) slice in HU."""
    values = np.asarray(hu, dtype=np.float64)
    region = lung_region(values)
    pixel_mm2 = float(spacing_yx_mm[0] * spacing_yx_mm[1])
    n = int(region.sum())
    out = np.zeros(len(FEATURE_NAMES), dtype=np.float64)
    if n < 10:
        return out
    inside = values[region]
    dense = inside > -400
    mean, std = float(inside.mean()), float(inside.std())
    z = (inside - mean) / std if std > 0 else np.zeros_like(inside)
    gy, gx = np.gradient(values, spacing_yx_mm[0], spacing_yx_mm[1])
    grad = np.hypot(gy, gx)[region]
    levels = np.clip(((values + 1000.0) / 1200.0 * _LEVELS).astype(np.int64), 0, _LEVELS - 1)
    blobs, count = ndimage.label(region & (values > -400))
    largest = float(np.bincount(blobs.ravel())[1:].max()) * pixel_mm2 if count else 0.0
    out[:] = [
        n * pixel_mm2,
        float(dense.mean()),
        mean,
        std,
        float(np.mean(z**3)),
        float(np.mean(z**4)),
        *np.percentile(inside, [5, 25, 50, 75, 95]).tolist(),
        float(inside[dense].mean()) if dense.any() else -1000.0,
        float(inside[dense].std()) if dense.any() else 0.0,
        float(grad.mean()),
        float(grad.std()),
        float(np.percentile(grad, 95)),
        *_glcm(levels, region),
        float(count),
        largest,
    ]
    return out


def case_features(case: Case) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """(z, F) features and (z,) labels of every slice of a case."""
    spacing = (case.spacing_mm[1], case.spacing_mm[2])
    feats = np.stack([slice_features(case.hu[k], spacing) for k in range(case.hu.shape[0])])
    return feats, case.slice_labels


def _loaded_case_features(
    dataset: CaseDataset, case_id: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    return case_features(dataset.load(case_id))


def dataset_features(
    dataset: CaseDataset,
    case_ids: Sequence[str],
    *,
    progress: bool = False,
    workers: int = 1,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Stacked slice features and labels of the given cases (in ``workers`` processes)."""
    feats, labels = [], []
    for f, y in tqdm(
        map_cases(_loaded_case_features, dataset, case_ids, workers=workers),
        total=len(case_ids),
        disable=not progress,
        desc="features",
    ):
        feats.append(f)
        labels.append(y)
    return np.concatenate(feats), np.concatenate(labels)


@dataclass(frozen=True)
class BaselineModel:
    """A fitted classifier and the threshold it is scored at."""

    classifier: Any
    threshold: float = 0.5

    def predict_proba(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """(n,) probability that each slice holds tumour (0 for every slice of a classifier
        whose training slices held none, 1 for one whose slices all did)."""
        classes = [int(c) for c in self.classifier.classes_]
        columns = self.classifier.predict_proba(features)
        if 1 not in classes:
            return np.zeros(len(features), dtype=np.float64)
        proba: npt.NDArray[np.float64] = columns[:, classes.index(1)].astype(np.float64)
        return proba


def fit_baseline(
    features: npt.NDArray[np.float64], labels: npt.NDArray[np.bool_], *, seed: int = 0
) -> BaselineModel:
    """Fit a random forest (300 trees, balanced class weights) on slice features."""
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(
        n_estimators=300, class_weight="balanced", random_state=seed, n_jobs=1
    )
    forest.fit(features, labels.astype(int))
    return BaselineModel(classifier=forest)


def compare_baseline(
    train_dataset: CaseDataset,
    train_ids: Sequence[str],
    test_dataset: CaseDataset,
    test_ids: Sequence[str],
    *,
    seed: int = 0,
    progress: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Train the baseline on ``train_ids``' slices; score it there and on ``test_ids``.

    ``workers`` processes load the cases and compute their features.

    Returns
    -------
    dict
        ``{"model": ..., "features": [...], "train": scores, "held_out": scores,
        "roc_held_out": {"fpr": [...], "tpr": [...]}}`` (scores per image, threshold 0.5).
    """
    from dicom_node.training.metrics import roc_curve

    x_train, y_train = dataset_features(
        train_dataset, train_ids, progress=progress, workers=workers
    )
    x_test, y_test = dataset_features(test_dataset, test_ids, progress=progress, workers=workers)
    model = fit_baseline(x_train, y_train, seed=seed)
    p_train = model.predict_proba(x_train)
    p_test = model.predict_proba(x_test)
    result: dict[str, Any] = {
        "model": "RandomForestClassifier(300 trees, balanced) on hand-crafted slice features",
        "features": list(FEATURE_NAMES),
        "train_slices": int(y_train.size),
        "held_out_slices": int(y_test.size),
        "train": binary_scores(y_train, p_train >= model.threshold, scores=p_train).as_dict(),
        "held_out": binary_scores(y_test, p_test >= model.threshold, scores=p_test).as_dict(),
    }
    try:
        fpr, tpr, _ = roc_curve(y_test, p_test)
        result["roc_held_out"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    except ValueError:
        result["roc_held_out"] = None
    logger.info(
        "baseline: train accuracy %.3f, held-out accuracy %.3f",
        result["train"]["accuracy"],
        result["held_out"]["accuracy"],
    )
    return result
