"""Training the lung-CT network in two stages, as in the method the node implements.

Stage 1 (segmentation): the U-Net learns tumour masks from 2-D slices on the model's grid,
with positive oversampling (a share of each batch is centred on tumour) and augmentation
(:mod:`dicom_node.training.augment`); loss BCE + soft Dice; AdamW with linear warm-up and a
cosine schedule; early stopping on the validation Dice.

Stage 2 (classification): the encoder is frozen; its deepest map, average-pooled, is computed
once for every training slice (clean and augmented views) and the MLP head (dropout, weight
decay) learns "slice holds tumour" from it; early stopping on the validation loss.

Operating points (image and study thresholds) are chosen on the validation cases; the model
folder is written with :func:`dicom_node.analysis.weights.save_model` at the end only.

Slices go to the model's grid exactly as the inference engine puts them there (window, then
resample to the card's pixel spacing or size, then centre pad with air or crop). A run is
seeded; with ``--max-minutes`` the schedule follows whichever is further along, steps or time,
and each stage stops at its share of the budget (the card records the steps actually done).
Checkpoints in the work folder make a run resumable (``resume=True``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import cc3d
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the name PyTorch's own documentation uses
from tqdm import tqdm

from dicom_node.analysis.context import CONTEXT_CHANNELS, input_channels, with_context
from dicom_node.analysis.lesions import Components, LesionRule
from dicom_node.analysis.network import Architecture, LungCTNet, study_probability
from dicom_node.analysis.weights import (
    Classes,
    ClassInfo,
    Code,
    InputSpec,
    ModelCard,
    Normalisation,
    Thresholds,
    load_model,
    save_card,
    save_model,
)
from dicom_node.errors import DatasetError, ModelError, TrainingBudgetError
from dicom_node.training.augment import AugmentConfig, augment_batch
from dicom_node.training.datasets import CaseDataset, Split, map_cases
from dicom_node.training.evaluate import LARGE_LESION_MM, equivalent_diameter_mm
from dicom_node.training.metrics import BinaryScores, binary_scores, choose_threshold

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
#: Settings a checkpoint does not depend on: the run's budget and machine, and everything
#: that only stage 2 or the card uses (they may change when a run is resumed).
_NOT_IN_CHECKPOINT_KEY = frozenset(
    {
        "max_minutes",
        "threads",
        "workers",
        "progress",
        "device",
        "feature_views",
        "clean_first_view",
        "cls_epochs",
        "cls_lr",
        "cls_weight_decay",
        "cls_patience",
        "cls_max_slices",
        "precision",
        "stage2_share",
        "top_k",
        "name",
        "version",
    }
)
#: Stage 2 trains at least this many MLP epochs, whatever the budget says.
_MIN_CLS_EPOCHS = 20
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (besides the data).

    Attributes
    ----------
    architecture
        The network; the product is a ResNet50 U-Net.
    input_size, input_mode, pixel_spacing_mm
        The card's input section: square size, ``fit`` or ``spacing``, and the pixel spacing
        (mm) in ``spacing`` mode.
    context_mm
        2.5-D input: the planes this many mm before and after each slice as two more channels
        (``architecture.in_channels`` 3); ``None``: the slice alone.
    window
        (low, high) HU window, normalised to [0, 1].
    crop
        Side of the square crops stage 1 trains on (a multiple of the output stride; the full
        slice when not smaller than ``input_size``).
    batch_size
        Crops per stage-1 step.
    positive_fraction
        Share of each batch centred on a tumour pixel.
    lesion_fraction
        Share of those tumour-centred crops that draw a tumour first, every tumour (3-D
        component) of the training cases equally likely, then one of its voxels; the others
        draw a slice with tumour, then one of its tumour pixels. Drawing by slice shows a 40 mm
        tumour several times as often as a 6 mm one, which spans a few slices.
    crop_dice
        Weight of the per-crop Dice (the mean over crops holding tumour) in the Dice term of
        the loss; the rest is the Dice of the batch as a whole, where large tumours outweigh
        small ones by their area (see :func:`bce_dice_loss`).
    seg_steps, seg_lr, seg_weight_decay, warmup_steps
        Stage-1 length and AdamW settings.
    patience_after
        Validations count toward the patience only once the schedule (steps or time) is this
        far along: before that the learning rate is still high and the validation Dice swings
        by several points from one check to the next (a run stopped at step 2750 of a planned
        5500 on a best Dice from step 1500). The best weights are kept all along.
    val_every, patience
        Validate every ``val_every`` steps; stop after ``patience`` validations without a better
        Dice.
    val_slices
        At most this many validation slices (all with tumour first, then others) per check.
    cls_epochs, cls_lr, cls_weight_decay, cls_patience, feature_views, clean_first_view
        Stage-2 MLP training: epochs, AdamW settings, early stopping patience (epochs), the
        number of views per training slice, and whether the first is left clean (the others
        are augmented as in stage 1).
    cls_max_slices
        Stage 2 reads at most this many training slices: every slice with tumour, then
        tumour-free slices drawn at random.
    freeze_encoder
        Stage 2 trains the MLP only (the two-stage method); ``False`` is not offered yet.
    top_k
        Slices averaged into the study probability.
    seed
        Seeds numpy and torch.
    max_minutes
        Wall-clock budget of the whole run (``None``: unbounded); stage 1 gets
        ``1 - stage2_share`` of it.
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
    precision
        ``auto``: bf16 autocast on CUDA and on CPUs with bf16 instructions (AVX512-BF16 or AMX;
        about twice as fast as fp32 there), fp32 elsewhere; or ``fp32`` / ``bf16``.
    threads
        torch CPU threads (``None`` leaves torch's choice).
    workers
        Processes that load (or generate) and resample the cases before training; the slices
        are the same for any number.
    checkpoint_every
        Steps between stage-1 checkpoints.
    encoder_weights
        A local torchvision- or timm-format ResNet state dict loaded into the encoder.
    from_model
        A trained model folder whose segmentation network (encoder, decoder, head) is taken as
        it is: stage 1 is skipped, and the MLP and the operating points are fitted anew (to
        fit a classifier of another architecture, or to refit on other cases). Its input,
        normalisation and segmentation architecture must be this configuration's.
    keep_mlp
        With ``from_model``: take its MLP as well and fit nothing; only the operating points
        (image and study thresholds, lesion rule) are chosen anew on the validation cases (to
        calibrate a model on a site's own cases). The whole architecture must then match, and
        no training case is read.
    fine_tune
        With ``from_model``: stage 1 starts from its segmentation network instead of skipping
        (``seg_steps`` more steps at ``seg_lr``, with warm-up and the cosine schedule; the
        source's network is validated first, so the best weights are never worse on the
        validation slices than the source's); the MLP and the operating points are then
        fitted anew. To fine-tune a model on a site's own labelled cases.
    name, version
        Of the model card.
    """

    architecture: Architecture = field(
        default_factory=lambda: Architecture(mlp_pooling="lesion", mlp_context_mm=2.5)
    )
    input_size: int = 256
    input_mode: Literal["fit", "spacing"] = "spacing"
    pixel_spacing_mm: float | None = 1.5
    context_mm: float | None = None
    seg_scales: tuple[float, ...] = (1.0,)
    window: tuple[float, float] = (-1000.0, 400.0)
    crop: int = 128
    batch_size: int = 8
    positive_fraction: float = 0.5
    lesion_fraction: float = 0.0
    crop_dice: float = 0.0
    seg_steps: int = 3000
    seg_lr: float = 1e-3
    seg_weight_decay: float = 1e-4
    warmup_steps: int = 50
    val_every: int = 250
    patience: int = 5
    patience_after: float = 0.5
    val_slices: int = 160
    cls_epochs: int = 200
    cls_lr: float = 1e-3
    cls_weight_decay: float = 1e-2
    cls_patience: int = 25
    cls_max_slices: int = 6000
    feature_views: int = 1
    clean_first_view: bool = False
    freeze_encoder: bool = True
    top_k: int = 3
    seed: int = 0
    max_minutes: float | None = None
    stage2_share: float = 0.15
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int | None = None
    workers: int = 1
    checkpoint_every: int = 100
    encoder_weights: Path | None = None
    from_model: Path | None = None
    keep_mlp: bool = False
    fine_tune: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    name: str = "lung-ct-unet-resnet50"
    version: str = "0.2.4"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        stride = self.architecture.output_stride
        if self.input_size % stride or self.crop % stride:
            raise ValueError(f"input_size and crop must be multiples of {stride}")
        if self.input_mode == "spacing" and self.pixel_spacing_mm is None:
            raise ValueError("input_mode 'spacing' needs pixel_spacing_mm")
        if self.architecture.in_channels != input_channels(self.context_mm):
            raise ValueError("architecture.in_channels must be 3 with context_mm, 1 without")
        self.input_spec()  # seg_scales: 1.0 among them, each once, within [0.5, 2]
        for name in ("positive_fraction", "lesion_fraction", "crop_dice", "patience_after"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if not self.freeze_encoder:
            raise ValueError("stage 2 trains the MLP on a frozen encoder (freeze_encoder=True)")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.batch_size < 1 or self.seg_steps < 0 or self.cls_epochs < 0:
            raise ValueError("batch_size must be positive, step and epoch counts not negative")
        if (self.keep_mlp or self.fine_tune) and self.from_model is None:
            raise ValueError(
                "keep_mlp and fine_tune work on a trained model: name it (from_model, --from-model)"
            )
        if self.keep_mlp and self.fine_tune:
            raise ValueError("keep_mlp trains nothing and fine_tune trains the network: choose one")

    def input_spec(self) -> InputSpec:
        """The card's input section."""
        return InputSpec(
            size=self.input_size,
            mode=self.input_mode,
            pixel_spacing_mm=self.pixel_spacing_mm if self.input_mode == "spacing" else None,
            interpolation="bilinear",
            context_mm=self.context_mm,
            seg_scales=self.seg_scales,
        )

    def normalisation(self) -> Normalisation:
        """The card's normalisation section (min-max over the window)."""
        return Normalisation(
            window_low_hu=self.window[0], window_high_hu=self.window[1], method="minmax"
        )


@dataclass(frozen=True)
class TrainResult:
    """What a run produced.

    Attributes
    ----------
    card
        The card as written (``None`` if no output folder was written).
    seg_steps_done, cls_epochs_done
        Work done in each stage.
    seconds
        Wall time of this invocation plus earlier ones of a resumed run.
    validation
        Validation figures (also in the card's metrics).
    stopped_by
        Why stage 1 ended: ``steps``, ``early_stopping`` or ``time``.
    """

    card: ModelCard | None
    seg_steps_done: int
    cls_epochs_done: int
    seconds: float
    validation: dict[str, float]
    stopped_by: str


# ---------------------------------------------------------------------- model grid


def to_model_grid(
    hu: npt.NDArray[np.generic],
    spacing_yx_mm: tuple[float, float],
    *,
    spec: InputSpec,
    window: tuple[float, float],
    mask: npt.NDArray[np.generic] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Put slices on the model's grid the way the inference engine does.

    Parameters
    ----------
    hu
        (z, y, x) HU.
    spacing_yx_mm
        In-plane pixel spacing (dy, dx), mm.
    spec
        The card's input section.
    window
        (low, high) HU; values are clipped to it before resampling.
    mask
        (z, y, x) tumour mask (> 0 tumour), resampled bilinearly and thresholded at 0.5.

    Returns
    -------
    hu : torch.Tensor
        (z, 1, S, S) float32 clipped HU; padding is ``window[0]`` (air).
    mask : torch.Tensor or None
        (z, 1, S, S) float32 in {0, 1}.
    """
    from dicom_node.analysis.inference import _resize

    depth, height, width = hu.shape
    size = spec.size
    if spec.mode == "spacing":
        assert spec.pixel_spacing_mm is not None  # the card's validator requires it
        new_h = max(1, round(height * spacing_yx_mm[0] / spec.pixel_spacing_mm))
        new_w = max(1, round(width * spacing_yx_mm[1] / spec.pixel_spacing_mm))
    else:
        new_h = new_w = size
    left, top = (size - new_w) // 2, (size - new_h) // 2
    pad = (left, size - new_w - left, top, size - new_h - top)
    x = torch.from_numpy(np.asarray(hu, dtype=np.float32)).unsqueeze(1).clamp(*window)
    if (new_h, new_w) != (height, width):
        x = _resize(x, (new_h, new_w), spec.interpolation)
    x = F.pad(x, pad, value=window[0])
    m: torch.Tensor | None = None
    if mask is not None:
        m = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32)).unsqueeze(1)
        if (new_h, new_w) != (height, width):
            m = _resize(m, (new_h, new_w), "bilinear")
        m = (F.pad(m, pad, value=0.0) >= 0.5).float()
    del depth
    return x, m


def model_grid_spacing(
    shape_zyx: tuple[int, ...], spacing_mm: tuple[float, float, float], spec: InputSpec
) -> tuple[float, float, float]:
    """(z, y, x) voxel spacing of a case once :func:`to_model_grid` has resampled it."""
    if spec.mode == "spacing":
        assert spec.pixel_spacing_mm is not None
        return (spacing_mm[0], spec.pixel_spacing_mm, spec.pixel_spacing_mm)
    return (
        spacing_mm[0],
        spacing_mm[1] * shape_zyx[1] / spec.size,
        spacing_mm[2] * shape_zyx[2] / spec.size,
    )


@dataclass(frozen=True, eq=False)
class SliceBank:
    """Slices of many cases on the model grid, held in memory.

    Attributes
    ----------
    hu
        (n, S, S) int16 clipped HU.
    masks
        (n, S, S) uint8 tumour mask on the model grid.
    labels
        (n,) bool: the slice holds tumour on its original grid (the per-image ground truth).
    case_index
        (n,) index into ``case_ids`` of each slice's case.
    case_ids
        The cases, in bank order.
    spacing_zyx
        (cases, 3) voxel spacing of each case on the model grid, mm.
    """

    hu: npt.NDArray[np.int16]
    masks: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.bool_]
    case_index: npt.NDArray[np.int64]
    case_ids: tuple[str, ...]
    spacing_zyx: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.hu.shape[0])

    def case_rows(self, k: int) -> slice:
        """The rows of case ``k``: a case's slices are one run of rows, in slice order."""
        start = int(np.searchsorted(self.case_index, k, side="left"))
        return slice(start, int(np.searchsorted(self.case_index, k, side="right")))

    def inputs(
        self, indices: Sequence[int] | npt.NDArray[np.int64], context_mm: float | None
    ) -> npt.NDArray[np.float32]:
        """(n, C, S, S) float32 HU of the network's input for bank slices ``indices``: the slice
        alone (C = 1), or with the planes ``context_mm`` before and after it in its own case
        (C = 3), as :func:`dicom_node.analysis.context.with_context` makes them for the node."""
        index = np.asarray(indices, dtype=np.int64)
        if context_mm is None:
            return self.hu[index].astype(np.float32)[:, None]
        out = np.empty((index.size, CONTEXT_CHANNELS, *self.hu.shape[1:]), dtype=np.float32)
        cases = self.case_index[index]
        for k in np.unique(cases):
            case = self.case_rows(int(k))
            rows = np.flatnonzero(cases == k)
            out[rows] = with_context(
                self.hu[case], index[rows] - case.start, float(self.spacing_zyx[k, 0]), context_mm
            )
        return out


def build_bank(
    dataset: CaseDataset,
    case_ids: Sequence[str],
    *,
    spec: InputSpec,
    window: tuple[float, float],
    cache_dir: Path | None = None,
    progress: bool = False,
    workers: int = 1,
) -> SliceBank:
    """Load cases and put every slice on the model grid (cached in ``cache_dir`` when given).

    ``workers`` processes load (or generate) and resample the cases; the bank is the same for
    any number of them.
    """
    key = hashlib.sha256(
        json.dumps(
            [dataset.name, list(case_ids), spec.model_dump(mode="json"), list(window), 2]
        ).encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"bank-{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.exists():
        with np.load(cache) as data:
            logger.info("slice bank %s read from %s", key, cache)
            return SliceBank(
                hu=data["hu"],
                masks=data["masks"],
                labels=data["labels"],
                case_index=data["case_index"],
                case_ids=tuple(str(c) for c in data["case_ids"]),
                spacing_zyx=data["spacing_zyx"],
            )
    hus, masks, labels, index, spacings = [], [], [], [], []
    cases = map_cases(
        functools.partial(_bank_case, spec=spec, window=window),
        dataset,
        case_ids,
        workers=workers,
    )
    for k, (hu, mask, slice_labels, spacing) in enumerate(
        tqdm(cases, total=len(case_ids), desc="cases", disable=not progress, mininterval=10)
    ):
        hus.append(hu)
        masks.append(mask)
        labels.append(slice_labels)
        index.append(np.full(hu.shape[0], k, dtype=np.int64))
        spacings.append(spacing)
    bank = SliceBank(
        hu=np.concatenate(hus),
        masks=np.concatenate(masks),
        labels=np.concatenate(labels),
        case_index=np.concatenate(index),
        case_ids=tuple(case_ids),
        spacing_zyx=np.array(spacings, dtype=np.float64).reshape(-1, 3),
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            hu=bank.hu,
            masks=bank.masks,
            labels=bank.labels,
            case_index=bank.case_index,
            case_ids=np.array(bank.case_ids),
            spacing_zyx=bank.spacing_zyx,
        )
        tmp.replace(cache)
    return bank


def _bank_case(
    dataset: CaseDataset, case_id: str, *, spec: InputSpec, window: tuple[float, float]
) -> tuple[
    npt.NDArray[np.int16], npt.NDArray[np.uint8], npt.NDArray[np.bool_], tuple[float, float, float]
]:
    """One case on the model grid: int16 HU, uint8 mask, slice labels, grid spacing (z, y, x)."""
    case = dataset.load(case_id)
    x, m = to_model_grid(
        case.hu, case.spacing_mm[1:], spec=spec, window=window, mask=case.tumour_mask
    )
    assert m is not None
    return (
        x[:, 0].round().to(torch.int16).numpy(),
        m[:, 0].to(torch.uint8).numpy(),
        case.slice_labels,
        model_grid_spacing(case.hu.shape, case.spacing_mm, spec),
    )


# ---------------------------------------------------------------------- encoder weights


def load_encoder_weights(network: LungCTNet, path: Path) -> None:
    """Load a local torchvision- or timm-format ResNet state dict into the network's encoder.

    Accepted: a plain state dict, or one under ``state_dict`` / ``model``; key prefixes
    ``module.``, ``encoder.`` and ``backbone.`` are stripped; the classifier (``fc.*``) is
    dropped. A 3-channel ``conv1`` is summed over its RGB channels for the one CT channel
    (as smp does for ``in_channels=1``); with 2.5-D input each plane gets a third of that sum.

    Raises
    ------
    ModelError
        The file cannot be read, is not a state dict, or its tensors do not match the encoder.
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read encoder weights ({exc})") from exc
    if isinstance(raw, dict):
        for wrapper in ("state_dict", "model"):
            if wrapper in raw and isinstance(raw[wrapper], dict):
                raw = raw[wrapper]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        key = str(name)
        for prefix in ("module.", "encoder.", "backbone."):
            key = key.removeprefix(prefix)
        if key.startswith("fc."):
            continue
        state[key] = tensor
    conv1 = state.get("conv1.weight")
    wanted = network.encoder.state_dict()
    if conv1 is not None and "conv1.weight" in wanted:
        channels = wanted["conv1.weight"].shape[1]
        summed = conv1.sum(dim=1, keepdim=True)
        if channels == 1 and conv1.shape[1] != 1:
            state["conv1.weight"] = summed
        elif channels > 1:
            # RGB means nothing to CT planes (2.5-D input): each plane gets an equal share of
            # the summed kernel, so that three equal planes give the one-channel response
            state["conv1.weight"] = (summed / channels).expand(-1, channels, -1, -1).contiguous()
    try:
        network.encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(
            f"{path}: the weights do not fit the {network.architecture.encoder} encoder ({first})"
        ) from exc
    logger.info("encoder weights loaded from %s (%d tensors)", path, len(state))


# ---------------------------------------------------------------------- losses and steps


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0, crop_dice: float = 0.0
) -> torch.Tensor:
    """BCE with logits plus a soft Dice loss.

    The Dice term is ``(1 - crop_dice) * (1 - batch Dice) + crop_dice * mean(1 - crop Dice)``:
    the batch Dice pools every pixel of the batch, so each tumour counts by its area; the
    crop Dice is taken per crop holding tumour and averaged, so a crop of a 6 mm tumour counts
    as much as one of a 40 mm tumour. Crops without tumour enter the batch Dice and the BCE
    only; when no crop holds tumour the crop term is 0.

    Parameters
    ----------
    logits, target
        (N, 1, H, W); target in {0, 1}.
    smooth
        Added to numerator and denominator of each Dice (so a batch without tumour and without
        predicted tumour has Dice 1).
    crop_dice
        Weight of the per-crop Dice, in [0, 1].
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    prob = torch.sigmoid(logits.float())
    intersection = (prob * target).sum()
    soft_dice = (2 * intersection + smooth) / (prob.sum() + target.sum() + smooth)
    loss = bce + (1.0 - crop_dice) * (1.0 - soft_dice)
    if crop_dice > 0.0:
        dims = tuple(range(1, target.dim()))
        holds = target.sum(dim=dims) > 0
        if bool(holds.any()):
            p, t = prob[holds], target[holds]
            per_crop = (2 * (p * t).sum(dim=dims) + smooth) / (
                p.sum(dim=dims) + t.sum(dim=dims) + smooth
            )
            loss = loss + crop_dice * (1.0 - per_crop).mean()
    return loss


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16; Linux only)."""
    try:
        with Path("/proc/cpuinfo").open(encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
    return False


def _use_bf16(device: torch.device, precision: str) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    return device.type == "cuda" or cpu_has_bf16()


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    if _use_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _channels_last(network: torch.nn.Module) -> Iterator[None]:
    """The network's weights in NHWC while reading slices (no gradients), NCHW again after.

    Inference only: oneDNN and cuDNN convolutions are faster in NHWC (on two CPU cores the
    whole network read a batch of 16 slices of 256² in 0.26 s a slice against 0.34-0.39 s), while
    a training step of stage 1 was no faster in it.
    """
    network.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        network.to(memory_format=torch.contiguous_format)


def tumour_voxels(bank: SliceBank) -> list[npt.NDArray[np.int64]]:
    """The voxels of every tumour in the bank, one array per 3-D component (26-connected,
    within one case), as flat indices into ``bank.masks``."""
    tumours: list[npt.NDArray[np.int64]] = []
    plane = int(np.prod(bank.masks.shape[1:]))
    for k in range(len(bank.case_ids)):
        case = bank.case_rows(k)
        labels, count = cc3d.connected_components(
            bank.masks[case] > 0, connectivity=26, return_N=True, binary_image=True
        )
        if count == 0:
            continue
        flat = labels.reshape(-1)
        voxels = np.flatnonzero(flat)
        voxels = voxels[np.argsort(flat[voxels], kind="stable")]  # by component, then in order
        sizes = np.bincount(flat[voxels], minlength=count + 1)[1:]
        offset = case.start * plane
        tumours.extend(
            part.astype(np.int64) + offset for part in np.split(voxels, np.cumsum(sizes)[:-1])
        )
    return tumours


class _Sampler:
    """Draws stage-1 crops: a share centred near tumour pixels (by tumour or by slice, see
    :class:`TrainConfig`), the rest anywhere."""

    def __init__(
        self,
        bank: SliceBank,
        *,
        crop: int,
        positive_fraction: float,
        lesion_fraction: float = 0.0,
        context_mm: float | None = None,
    ) -> None:
        self.bank = bank
        self.context_mm = context_mm
        self.crop = min(crop, bank.hu.shape[-1])
        self.positive_fraction = positive_fraction
        self.lesion_fraction = lesion_fraction
        flat = bank.masks.reshape(len(bank), -1)
        self.positive = np.flatnonzero(flat.any(axis=1))
        self.tumours = tumour_voxels(bank) if lesion_fraction > 0 else []

    def _tumour_centre(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """A slice with tumour and a tumour pixel on it: by tumour or by slice."""
        if self.tumours and rng.uniform() < self.lesion_fraction:
            voxels = self.tumours[int(rng.integers(len(self.tumours)))]
            where = np.unravel_index(int(rng.choice(voxels)), self.bank.masks.shape)
            return int(where[0]), int(where[1]), int(where[2])
        row = int(rng.choice(self.positive))
        ys, xs = np.nonzero(self.bank.masks[row])
        j = int(rng.integers(ys.size))
        return row, int(ys[j]), int(xs[j])

    def draw(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.bank.hu.shape[-1]
        c = self.crop
        hus, masks = [], []
        for _ in range(n):
            if self.positive.size and rng.uniform() < self.positive_fraction:
                k, y, x = self._tumour_centre(rng)
                jitter = rng.integers(-c // 3, c // 3 + 1, size=2)
                cy, cx = int(y + jitter[0]), int(x + jitter[1])
            else:
                k = int(rng.integers(len(self.bank)))
                cy, cx = (int(v) for v in rng.integers(c // 2, size - c // 2 + 1, size=2))
            y0 = int(np.clip(cy - c // 2, 0, size - c))
            x0 = int(np.clip(cx - c // 2, 0, size - c))
            planes = self.bank.inputs([k], self.context_mm)[0]
            hus.append(planes[:, y0 : y0 + c, x0 : x0 + c])
            masks.append(self.bank.masks[k, y0 : y0 + c, x0 : x0 + c])
        hu = torch.from_numpy(np.stack(hus))
        mask = torch.from_numpy(np.stack(masks).astype(np.float32)).unsqueeze(1)
        return hu, mask


def _val_indices(bank: SliceBank, limit: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Validation slices: those with tumour first, then others, at most ``limit``."""
    positive = np.flatnonzero(bank.masks.reshape(len(bank), -1).any(axis=1))
    negative = np.setdiff1d(np.arange(len(bank)), positive)
    positive = rng.permutation(positive)[: limit // 2]
    negative = rng.permutation(negative)[: limit - positive.size]
    return np.sort(np.concatenate([positive, negative])).astype(np.int64)


def _normalise(hu: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    scale, shift = config.normalisation().scale_shift()
    return hu.clamp(*config.window) * scale + shift


def _batches(indices: npt.NDArray[np.int64], size: int) -> Iterator[npt.NDArray[np.int64]]:
    for start in range(0, indices.size, size):
        yield indices[start : start + size]


def _validate_seg(
    network: LungCTNet,
    bank: SliceBank,
    indices: npt.NDArray[np.int64],
    config: TrainConfig,
    device: torch.device,
    *,
    thresholds: Sequence[float] = (0.5,),
) -> dict[str, float]:
    """Mean loss and pooled Dice on the validation slices (full slices).

    Returns ``val_loss``, ``val_dice`` (at the first threshold) and ``val_dice@T`` for each
    threshold ``T`` (probabilities at or above ``T`` are tumour).
    """
    network.eval()
    losses: list[float] = []
    inter = np.zeros(len(thresholds))
    total_p = np.zeros(len(thresholds))
    total_t = 0.0
    logit_cuts = [math.log(t / (1.0 - t)) for t in thresholds]
    with torch.inference_mode():
        for chunk in _batches(indices, 8):
            x = _normalise(torch.from_numpy(bank.inputs(chunk, config.context_mm)), config)
            t = torch.from_numpy(bank.masks[chunk].astype(np.float32)).unsqueeze(1).to(device)
            with _autocast(device, config.precision):
                seg, _ = network.trunk(x.to(device))
            losses.append(float(bce_dice_loss(seg, t)))
            total_t += float(t.sum())
            for i, cut in enumerate(logit_cuts):
                pred = (seg.float() >= cut).float()
                inter[i] += float((pred * t).sum())
                total_p[i] += float(pred.sum())
    network.train()
    out = {"val_loss": float(np.mean(losses))}
    for i, threshold in enumerate(thresholds):
        denominator = total_p[i] + total_t
        out[f"val_dice@{threshold:g}"] = 1.0 if denominator == 0 else 2 * inter[i] / denominator
    out["val_dice"] = out[f"val_dice@{thresholds[0]:g}"]
    return out


#: Segmentation thresholds tried on the validation slices at the end of stage 1.
SEG_THRESHOLDS = (0.5, 0.2, 0.3, 0.4, 0.6, 0.7)


def _features(
    network: LungCTNet,
    bank: SliceBank,
    config: TrainConfig,
    device: torch.device,
    *,
    augmented: bool,
    generator: torch.Generator,
    progress: bool,
    indices: npt.NDArray[np.int64] | None = None,
    keep_probability: bool = False,
    scales: tuple[float, ...] = (1.0,),
) -> tuple[torch.Tensor, npt.NDArray[np.uint8] | None]:
    """The MLP's pooled input for bank slices (full slices), and optionally their seg maps.

    Returns (n, D) float32 pooled vectors (see :meth:`MLPHead.pool`) of ``indices`` (every
    slice when ``None``) and, with ``keep_probability``, their (n, S, S) tumour probabilities
    as ``round(p * 255)``, the segmentation taken at ``scales`` (:meth:`LungCTNet.trunk`).
    """
    network.eval()
    out: list[torch.Tensor] = []
    maps: list[npt.NDArray[np.uint8]] = []
    if indices is None:
        indices = np.arange(len(bank), dtype=np.int64)
    scale_shift = config.normalisation().scale_shift()
    needs_seg = keep_probability or network.classifier.pooling != "average"
    with _channels_last(network), torch.inference_mode():  # weights converted outside it
        for chunk in tqdm(
            list(_batches(indices, 16)),
            desc="features" + (" (augmented)" if augmented else ""),
            disable=not progress,
            mininterval=10,
        ):
            hu = torch.from_numpy(bank.inputs(chunk, config.context_mm)).to(device)
            if augmented:
                m = torch.from_numpy(bank.masks[chunk].astype(np.float32)).unsqueeze(1)
                x, _ = augment_batch(
                    hu,
                    m.to(device),
                    config=config.augment,
                    generator=generator,
                    window=config.window,
                    scale_shift=scale_shift,
                )
            else:
                x = _normalise(hu, config)
            x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, config.precision):
                if needs_seg:
                    seg, pooled = network.trunk(x, scales)
                else:  # global average pooling needs no decoder
                    seg, pooled = None, network.classifier.pool(network.encoder(x)[-1], None)
            out.append(pooled.cpu())
            if keep_probability and seg is not None:
                prob = torch.sigmoid(seg.float())[:, 0].mul(255.0).round().to(torch.uint8)
                maps.append(prob.cpu().numpy())
    probability = np.concatenate(maps) if keep_probability else None
    return torch.cat(out), probability


def _mlp_logits(network: LungCTNet, pooled: torch.Tensor) -> torch.Tensor:
    """MLP logits (n,) from the vectors it reads (n, D): pooled, with slice context if any."""
    return network.classifier.score(pooled)


def _with_context(
    network: LungCTNet, bank: SliceBank, pooled: torch.Tensor, rows: npt.NDArray[np.int64]
) -> torch.Tensor:
    """What the MLP reads for bank slices ``rows``, from ``pooled``: every bank slice's vector.

    Each case's slices get their slice context (``classifier.with_context``) within the case,
    at the case's slice spacing, as the node's engine gives it over a volume.
    """
    head = network.classifier
    parts = []
    for k in range(len(bank.case_ids)):
        case = bank.case_rows(k)
        parts.append(head.with_context(pooled[case], float(bank.spacing_zyx[k, 0])))
    return torch.cat(parts)[torch.from_numpy(rows)]


def _stage2_indices(bank: SliceBank, limit: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Stage-2 training slices: every one with tumour, then tumour-free ones, ``limit`` in all."""
    positive = np.flatnonzero(bank.labels)
    if len(bank) <= limit:
        return np.arange(len(bank), dtype=np.int64)
    negative = np.flatnonzero(~bank.labels)
    keep = max(0, limit - positive.size)
    chosen = np.concatenate([positive, rng.permutation(negative)[:keep]])
    return np.sort(chosen).astype(np.int64)


# ---------------------------------------------------------------------- checkpoints and logs


class _Log:
    """Appends JSON lines to the metrics log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0.02 over ``progress``."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return warm * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------------- the run


class _Run:
    """The state of one training run: network, optimiser, randomness, progress, budget."""

    def __init__(
        self, config: TrainConfig, *, work_dir: Path, started: float, device: torch.device
    ) -> None:
        self.config = config
        self.device = device
        self.started = started
        self.log = _Log(work_dir / METRICS_FILE)
        self.ckpt_path = work_dir / CHECKPOINT_FILE
        self.config_key = hashlib.sha256(
            json.dumps(
                {k: v for k, v in asdict(config).items() if k not in _NOT_IN_CHECKPOINT_KEY},
                default=str,
                sort_keys=True,
            ).encode()
        ).hexdigest()
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.network = LungCTNet(config.architecture)
        if config.encoder_weights is not None:
            load_encoder_weights(self.network, config.encoder_weights)
        self.network.to(device)
        self.optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=config.seg_lr, weight_decay=config.seg_weight_decay
        )
        self.step = 0
        self.best_dice = -1.0
        self.since_best = 0
        self.stage = "seg"
        self.stopped_by = "steps"
        #: The card of the model whose network was taken (``from_model``).
        self.source_card: ModelCard | None = None
        #: Stage-1 steps the network had before this run (``fine_tune``: the source's).
        self.steps_before = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.elapsed_before = 0.0
        budget = None if config.max_minutes is None else config.max_minutes * 60.0
        self.budget_s = budget
        self.seg_budget_s = None if budget is None else budget * (1.0 - config.stage2_share)

    def reserve_stage2(self, train_bank: SliceBank, val_bank: SliceBank) -> None:
        """Leave stage 2 the larger of its share of the budget and its measured need.

        The need is the whole network's time per slice, measured on a second batch of 16
        slices (stage 2's batch): the first batch of a shape pays for start-up (on CUDA, kernel
        selection makes it many times slower; on the CPU, oneDNN prepares its kernels for that
        shape). It is scaled to every view of every training and validation slice, plus the
        lesion rule search (:data:`LESION_SEARCH_S_PER_MVOXEL` per million validation voxels),
        with 30 % and a minute to spare.

        Raises
        ------
        TrainingBudgetError
            A run that has not started stage 1 would get no time for it.
        """
        if self.budget_s is None:
            return

        probe = SliceBank(
            hu=train_bank.hu[:16],
            masks=train_bank.masks[:16],
            labels=train_bank.labels[:16],
            case_index=train_bank.case_index[:16],
            case_ids=train_bank.case_ids,
            spacing_zyx=train_bank.spacing_zyx,
        )
        for _ in range(2):  # the second pass is the one timed
            began = time.monotonic()
            _features(
                self.network,
                probe,
                self.config,
                self.device,
                augmented=False,
                generator=torch.Generator().manual_seed(0),
                progress=False,
                keep_probability=True,
            )
        self.network.train()
        per_slice = (time.monotonic() - began) / len(probe)
        # Every view of the stage-2 training slices and each validation slice through the
        # whole network; the threshold search runs it again on val_slices.
        read = (
            len(train_bank)
            if self.config.architecture.mlp_context_mm > 0
            else min(len(train_bank), self.config.cls_max_slices)
        )
        # The validation slices' maps are taken at every segmentation scale, a pass costing
        # about scale² of the probe's (which ran at scale 1).
        val_cost = sum(scale * scale for scale in self.config.seg_scales)
        slices = (
            read * max(1, self.config.feature_views)
            + len(val_bank) * val_cost
            + self.config.val_slices
        )
        search = LESION_SEARCH_S_PER_MVOXEL * val_bank.masks.size / 1e6
        need = 1.3 * (per_slice * slices + search) + 60.0
        reserve = max(self.config.stage2_share * self.budget_s, need)
        self.seg_budget_s = max(0.0, self.budget_s - reserve)
        logger.info(
            "stage 2 reserve %.1f min (%.3f s per slice, %d slices; lesion rule search %.1f "
            "min); stage 1 ends by %.1f min",
            reserve / 60.0,
            per_slice,
            slices,
            search / 60.0,
            self.seg_budget_s / 60.0,
        )
        if self.step == 0 and self.seg_budget_s <= self.elapsed():
            raise TrainingBudgetError(
                f"a budget of {self.budget_s / 60.0:.1f} min leaves segmentation training no "
                f"time: {self.elapsed() / 60.0:.1f} min went to loading the cases and stage 2 "
                f"needs about {reserve / 60.0:.1f} min; raise --max-minutes"
            )

    def elapsed(self) -> float:
        """Seconds of this run so far, earlier invocations of a resumed run included."""
        return self.elapsed_before + time.monotonic() - self.started

    def save(self) -> None:
        """Write the checkpoint (atomically)."""
        _save_checkpoint(
            self.ckpt_path,
            {
                "config_key": self.config_key,
                "model": self.network.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "best_dice": self.best_dice,
                "since_best": self.since_best,
                "stage": self.stage,
                "stopped_by": self.stopped_by,
                "best_state": self.best_state,
                "elapsed_s": self.elapsed(),
                "numpy_rng": self.rng.bit_generator.state,
                "torch_rng": self.generator.get_state(),
                "torch_global_rng": torch.get_rng_state(),
            },
        )

    def restore(self) -> None:
        """Continue from the checkpoint, which must come from the same configuration."""
        ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["config_key"] != self.config_key:
            raise ModelError(
                f"{self.ckpt_path}: the checkpoint was made with another configuration"
            )
        self.network.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.best_dice = ckpt["step"], ckpt["best_dice"]
        self.since_best, self.stage = ckpt["since_best"], ckpt["stage"]
        self.stopped_by, self.best_state = ckpt["stopped_by"], ckpt["best_state"]
        self.elapsed_before = float(ckpt["elapsed_s"])
        self.rng.bit_generator.state = ckpt["numpy_rng"]
        self.generator.set_state(ckpt["torch_rng"])
        torch.set_rng_state(ckpt["torch_global_rng"])
        logger.info("resumed from %s at stage %s step %d", self.ckpt_path, self.stage, self.step)

    def start_from(self, path: Path) -> None:
        """Take a trained model's segmentation network (and with ``keep_mlp`` its MLP) and go
        straight to stage 2, or with ``fine_tune`` train it further in stage 1.

        Raises
        ------
        ModelError
            The model cannot be loaded, or its input, normalisation or segmentation
            architecture differs from this run's.
        """
        loaded = load_model(path)
        card, config = loaded.card, self.config
        mlp_fields = (
            set()
            if config.keep_mlp
            else {"mlp_hidden", "mlp_activation", "dropout", "mlp_pooling", "mlp_context_mm"}
        )
        # Fine-tuning teaches the network this run's grid (transfer learning: another pixel
        # size or input size); what a pixel holds (its planes, the window) must still match.
        # The segmentation scales are how the network is run, not what it learnt: any run
        # may choose its own (the operating points are chosen with them).
        grid_fields = (_GRID_FIELDS if config.fine_tune else set()) | {"seg_scales"}
        differs = [
            what
            for what, mine, theirs in (
                (
                    "input",
                    config.input_spec().model_dump(exclude=grid_fields),
                    card.input.model_dump(exclude=grid_fields),
                ),
                ("normalisation", config.normalisation(), card.normalisation),
                (
                    "architecture",
                    config.architecture.model_dump(exclude=mlp_fields),
                    card.architecture.model_dump(exclude=mlp_fields),
                ),
            )
            if mine != theirs
        ]
        if differs:
            raise ModelError(
                f"{path}: its {', '.join(differs)} differ from this run's; the "
                + ("network" if config.keep_mlp else "segmentation network")
                + (
                    " may be fine-tuned on another grid (size, pixel spacing), nothing else"
                    if config.fine_tune
                    else " can only be taken over unchanged (fine-tuning may change its grid)"
                )
            )
        state = {
            name: tensor.float()
            for name, tensor in loaded.network.state_dict().items()
            if config.keep_mlp or not name.startswith("classifier.")
        }
        missing, unexpected = self.network.load_state_dict(state, strict=False)
        assert not unexpected and all(name.startswith("classifier.") for name in missing)
        self.network.to(self.device)
        self.source_card = card
        source_steps = int(card.metrics.get("seg_steps", 0.0))
        if config.fine_tune:  # the optimiser has taken no step yet: it starts afresh as it is
            self.steps_before = source_steps
        else:
            self.step = source_steps
            self.stage = "cls"
            self.stopped_by = "from-model"
        logger.info(
            "%s taken from %s (%s %s, %d steps); %s",
            "network and MLP" if config.keep_mlp else "segmentation network",
            path,
            card.name,
            card.version,
            source_steps,
            f"fine-tuning it for {config.seg_steps} steps at lr {config.seg_lr:g}"
            if config.fine_tune
            else "stage 1 skipped, no training (operating points only)"
            if config.keep_mlp
            else "stage 1 skipped",
        )

    # ------------------------------------------------------------ stage 1

    def _progress(self) -> float:
        progress = self.step / max(1, self.config.seg_steps)
        if self.seg_budget_s is not None:
            spent = self.elapsed() / self.seg_budget_s if self.seg_budget_s > 0 else 1.0
            progress = max(progress, spent)
        return progress

    def _seg_step(self, sampler: _Sampler) -> float:
        """One optimiser step on a fresh augmented batch; returns the loss."""
        config = self.config
        lr = config.seg_lr * _lr_factor(self._progress(), self.step, config.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        hu, mask = sampler.draw(self.rng, config.batch_size)
        x, target = augment_batch(  # on the device: the draws stay on the CPU generator
            hu.to(self.device),
            mask.to(self.device),
            config=config.augment,
            generator=self.generator,
            window=config.window,
            scale_shift=config.normalisation().scale_shift(),
        )
        with _autocast(self.device, config.precision):
            seg, _ = self.network.trunk(x)
        loss = bce_dice_loss(seg, target, crop_dice=config.crop_dice)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def _validate(self, val_bank: SliceBank, val_idx: npt.NDArray[np.int64]) -> None:
        scores = _validate_seg(self.network, val_bank, val_idx, self.config, self.device)
        if scores["val_dice"] > self.best_dice:
            self.best_dice, self.since_best = scores["val_dice"], 0
            self.best_state = {
                k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()
            }
        elif self._progress() >= self.config.patience_after:
            self.since_best += 1
        self.log.write(
            stage="seg_val",
            step=self.step,
            elapsed_s=self.elapsed(),
            best_dice=self.best_dice,
            **scores,
        )
        logger.info(
            "step %d: val dice %.3f (best %.3f), val loss %.3f",
            self.step,
            scores["val_dice"],
            self.best_dice,
            scores["val_loss"],
        )
        if self.since_best >= self.config.patience:
            self.stopped_by, self.stage = "early_stopping", "cls"

    def segmentation(self, train_bank: SliceBank, val_bank: SliceBank) -> None:
        """Stage 1 until the steps, the patience or the stage's share of the budget run out."""
        config = self.config
        val_idx = _val_indices(val_bank, config.val_slices, np.random.default_rng(config.seed + 1))
        sampler = _Sampler(
            train_bank,
            crop=config.crop,
            positive_fraction=config.positive_fraction,
            lesion_fraction=config.lesion_fraction,
            context_mm=config.context_mm,
        )
        self.network.train()
        bar = tqdm(
            total=config.seg_steps,
            initial=self.step,
            desc="stage 1 (segmentation)",
            disable=not config.progress or self.stage != "seg",
            mininterval=15,
        )
        running: list[float] = []
        if self.stage == "seg" and self.step == 0 and self.steps_before and self.best_state is None:
            self._validate(val_bank, val_idx)  # fine-tuning: the source's weights are a candidate
        while self.stage == "seg":
            if self.step >= config.seg_steps or self._progress() >= 1.0:
                self.stopped_by = "steps" if self.step >= config.seg_steps else "time"
                self.stage = "cls"
                break
            running.append(self._seg_step(sampler))
            bar.update(1)
            if self.step % config.log_every == 0:
                self.log.write(
                    stage="seg",
                    step=self.step,
                    loss=float(np.mean(running)),
                    lr=self.optimizer.param_groups[0]["lr"],
                    elapsed_s=self.elapsed(),
                )
                bar.set_postfix(loss=f"{np.mean(running):.3f}")
                running = []
            if self.step % config.val_every == 0 or self.step == config.seg_steps:
                self._validate(val_bank, val_idx)
            if self.step % config.checkpoint_every == 0 or self.stage != "seg":
                self.save()
        bar.close()
        if self.best_state is None:  # no validation ran (very few steps): score what we have
            scores = _validate_seg(self.network, val_bank, val_idx, config, self.device)
            self.best_dice = scores["val_dice"]
        else:
            self.network.load_state_dict(self.best_state)
        self.save()
        logger.info(
            "stage 1 ended after %d steps (%s); val dice %.3f",
            self.step,
            self.stopped_by,
            self.best_dice,
        )

    def segmentation_threshold(self, val_bank: SliceBank) -> tuple[float, float]:
        """The threshold of :data:`SEG_THRESHOLDS` with the best pooled validation Dice.

        Ties go to the earlier entry (0.5 first). Returns (threshold, its Dice).
        """
        config = self.config
        val_idx = _val_indices(val_bank, config.val_slices, np.random.default_rng(config.seed + 1))
        scores = _validate_seg(
            self.network, val_bank, val_idx, config, self.device, thresholds=SEG_THRESHOLDS
        )
        best = max(
            SEG_THRESHOLDS, key=lambda t: (scores[f"val_dice@{t:g}"], -SEG_THRESHOLDS.index(t))
        )
        self.network.eval()
        self.log.write(stage="seg_threshold", threshold=best, elapsed_s=self.elapsed(), **scores)
        logger.info(
            "segmentation threshold %.2f: validation Dice %.3f (0.5: %.3f)",
            best,
            scores[f"val_dice@{best:g}"],
            scores["val_dice@0.5"],
        )
        return best, float(scores[f"val_dice@{best:g}"])

    # ------------------------------------------------------------ stage 2

    def _stage2_training_set(self, train_bank: SliceBank) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP's training inputs (every view of the chosen slices) and their labels."""
        config, network = self.config, self.network
        views: list[torch.Tensor] = []
        chosen = _stage2_indices(
            train_bank, config.cls_max_slices, np.random.default_rng(config.seed + 2)
        )
        # With slice context the neighbours of the chosen slices are read too: every slice.
        context = network.classifier.context_mm > 0
        read = np.arange(len(train_bank), dtype=np.int64) if context else chosen
        for v in range(max(1, config.feature_views)):
            began = time.monotonic()
            pooled = _features(
                network,
                train_bank,
                config,
                self.device,
                augmented=v > 0 or not config.clean_first_view,
                generator=self.generator,
                progress=config.progress,
                indices=read,
            )[0]
            views.append(_with_context(network, train_bank, pooled, chosen) if context else pooled)
            took = time.monotonic() - began
            left = None if self.budget_s is None else self.budget_s - self.elapsed()
            if left is not None and v + 1 < config.feature_views and left < 1.5 * took + 60.0:
                logger.warning("stage 2: %d feature view(s) only, for the time budget", v + 1)
                break
        labels = np.tile(train_bank.labels[chosen], len(views)).astype(np.float32)
        return torch.cat(views), torch.from_numpy(labels)

    def validation_features(
        self, val_bank: SliceBank
    ) -> tuple[torch.Tensor, npt.NDArray[np.uint8]]:
        """What the MLP reads for every validation slice (with its slice context) and the
        slices' tumour probabilities as uint8."""
        network = self.network
        val_x, val_prob = _features(
            network,
            val_bank,
            self.config,
            self.device,
            augmented=False,
            generator=self.generator,
            progress=False,
            keep_probability=True,
            scales=self.config.seg_scales,
        )
        assert val_prob is not None
        if network.classifier.context_mm > 0:
            every = np.arange(len(val_bank), dtype=np.int64)
            val_x = _with_context(network, val_bank, val_x, every)
        return val_x, val_prob

    def classification(
        self, train_bank: SliceBank, val_bank: SliceBank
    ) -> tuple[int, torch.Tensor, npt.NDArray[np.uint8]]:
        """Stage 2: the MLP on frozen pooled features.

        Returns (epochs, validation features, validation tumour probabilities as uint8).
        """
        config, network = self.config, self.network
        for p in network.parameters():
            p.requires_grad_(False)
        train_x, train_y = self._stage2_training_set(train_bank)
        val_x, val_prob = self.validation_features(val_bank)
        val_y = torch.from_numpy(val_bank.labels.astype(np.float32))
        head = network.classifier
        for p in head.parameters():
            p.requires_grad_(True)
        head.cpu()
        optimizer = torch.optim.AdamW(
            head.parameters(), lr=config.cls_lr, weight_decay=config.cls_weight_decay
        )
        best_loss, best_head, bad, epochs_done = math.inf, copy.deepcopy(head.state_dict()), 0, 0
        deadline = None if self.budget_s is None else self.budget_s - 30.0
        for epoch in range(config.cls_epochs):
            # Epochs take well under a second; the budget cuts them only after a minimum.
            if epoch >= _MIN_CLS_EPOCHS and deadline is not None and self.elapsed() > deadline:
                logger.warning("stage 2 stopped by the time budget after %d epochs", epoch)
                break
            for group in optimizer.param_groups:
                group["lr"] = config.cls_lr * _lr_factor(epoch / max(1, config.cls_epochs), 1, 0)
            head.train()
            order = torch.randperm(train_x.shape[0], generator=self.generator)
            for chunk in torch.split(order, 256):
                loss = F.binary_cross_entropy_with_logits(
                    _mlp_logits(network, train_x[chunk]), train_y[chunk]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            head.eval()
            with torch.no_grad():
                val_loss = float(
                    F.binary_cross_entropy_with_logits(_mlp_logits(network, val_x), val_y)
                )
            epochs_done = epoch + 1
            if val_loss < best_loss - 1e-5:
                best_loss, best_head, bad = val_loss, copy.deepcopy(head.state_dict()), 0
            else:
                bad += 1
            if epoch % 10 == 0:
                self.log.write(
                    stage="cls", epoch=epoch, val_loss=val_loss, elapsed_s=self.elapsed()
                )
            if bad >= config.cls_patience:
                break
        head.load_state_dict(best_head)
        network.eval()
        return epochs_done, val_x, val_prob


#: Lesion rules tried on the validation cases at the end of training: voxel thresholds, peak
#: probabilities (``None``: no peak rule) and minimum volumes (mm³; 65 mm³ is a 5 mm sphere).
LESION_THRESHOLDS = (0.5, 0.7, 0.85)
LESION_PEAKS: tuple[float | None, ...] = (None, 0.9, 0.95, 0.98)
LESION_MIN_VOLUMES_MM3 = (10.0, 30.0, 65.0)
#: Each rule is tried without and with the image gate (a lesion needs a slice that the MLP
#: flags at the chosen image threshold).
LESION_IMAGE_GATES = (False, True)
#: And without and with the study gate at each of these study probabilities (no lesion in a
#: study below it).
LESION_STUDY_GATES: tuple[float | None, ...] = (None, 0.5, 0.6, 0.7, 0.8, 0.9)
#: The chosen rule may leave at most this many false-positive lesions per tumour-free
#: validation case; among those that do, the best mean Dice of tumours >= 6 mm wins.
LESION_FP_LIMIT = 0.25
#: Seconds the lesion rule search takes per million validation voxels on the model grid, for
#: the stage-2 reserve: :func:`lesion_rule_scores` took 0.07 s (432 rules, 45 validation
#: phantoms, 94 M voxels, 6.3 s on two idle cores, 5.4 s for the 72 rules without the study
#: gate: labelling each threshold's components is most of it; scoring each rule through
#: ``find_lesions`` had taken about 270 s for 72), three times that for a shared machine and
#: other maps.
LESION_SEARCH_S_PER_MVOXEL = 0.2
#: Image study gates tried with the image threshold (``None``: no gate): a slice is called
#: cancerous only in a study whose study probability reaches the gate.
IMAGE_STUDY_GATES: tuple[float | None, ...] = (None, 0.5, 0.6, 0.7, 0.8, 0.9)


def lesion_rule_scores(
    cases: Sequence[
        tuple[
            npt.NDArray[np.uint8],
            tuple[float, ...],
            npt.NDArray[np.uint8] | npt.NDArray[np.floating],
            npt.NDArray[np.floating],
            float,
        ]
    ],
    rules: Sequence[LesionRule],
) -> list[tuple[float | None, float | None, float | None]]:
    """(mean Dice of tumours >= 6 mm, their detection sensitivity, false-positive lesions per
    tumour-free case) of each rule over ``cases``: (tumour mask, spacing, tumour probability,
    image probability, study probability) each.

    The figures :func:`~dicom_node.training.evaluate.score_case` gives for the lesions of
    :func:`find_lesions` (a tumour is a 26-connected component of the mask; it is detected by
    the lesions that share a voxel with it, and its Dice is taken against their union; a lesion
    touching no tumour is a false positive), without measuring any lesion: each case is
    labelled once per threshold, and each rule's volume, peak and gates only choose among those
    components. Rules keep every lesion (no ``max_lesions``). ``None`` where no case has a
    tumour of 6 mm (Dice, detection), or none is tumour-free (false positives), as
    ``dicom-node evaluate`` reports them.
    """
    dice: list[list[float]] = [[] for _ in rules]
    found: list[list[bool]] = [[] for _ in rules]
    false: list[list[int]] = [[] for _ in rules]
    by_threshold: dict[float, list[int]] = {}
    for i, rule in enumerate(rules):
        by_threshold.setdefault(rule.threshold, []).append(i)
    for mask, spacing, probability, image, study in cases:
        truth, tumours = cc3d.connected_components(
            mask > 0, connectivity=26, return_N=True, binary_image=True
        )
        voxel_mm3 = float(np.prod(spacing))
        truth_voxels = np.bincount(truth.ravel(), minlength=tumours + 1)
        large = [
            g
            for g in range(1, tumours + 1)
            if equivalent_diameter_mm(float(truth_voxels[g]) * voxel_mm3) >= LARGE_LESION_MM
        ]
        inside = truth > 0
        for threshold, members in by_threshold.items():
            found_here = Components(probability, threshold, 26)
            # (component, tumour) pairs that share voxels, and how many
            pairs, shared = np.unique(
                found_here.labels[inside].astype(np.int64) * (tumours + 1) + truth[inside],
                return_counts=True,
            )
            component, tumour = pairs // (tumours + 1), pairs % (tumours + 1)
            real = component > 0
            component, tumour, shared = component[real], tumour[real], shared[real]
            touches = np.zeros(found_here.count + 1, dtype=bool)
            touches[component] = True
            for i in members:
                rule = rules[i]
                keep = found_here.kept(
                    voxel_mm3=voxel_mm3,
                    min_volume_mm3=rule.min_volume_mm3,
                    min_peak=rule.min_peak,
                    flagged_slices=rule.flagged_slices(image, study),
                )
                if not tumours:
                    false[i].append(int(np.count_nonzero(keep & ~touches)))
                for g in large:
                    hit = (tumour == g) & keep[component]
                    size = int(found_here.voxel_counts[component[hit]].sum())
                    found[i].append(bool(hit.any()))
                    dice[i].append(2.0 * int(shared[hit].sum()) / (int(truth_voxels[g]) + size))
    return [
        (
            float(np.mean(d)) if d else None,
            float(np.mean(f)) if f else None,
            float(np.mean(n)) if n else None,
        )
        for d, f, n in zip(dice, found, false, strict=True)
    ]


def _lesion_operating_point(
    val_bank: SliceBank,
    val_probability: npt.NDArray[np.uint8],
    image_probability: npt.NDArray[np.float32],
    image_threshold: float,
    *,
    top_k: int,
) -> tuple[LesionRule, dict[str, float]]:
    """The lesion rule (threshold, peak, minimum volume, image and study gates) chosen on the
    validation cases.

    Every case's slices, on the model grid, are scored under each rule of
    :data:`LESION_THRESHOLDS` x :data:`LESION_PEAKS` x :data:`LESION_MIN_VOLUMES_MM3` x
    :data:`LESION_IMAGE_GATES` x :data:`LESION_STUDY_GATES` (the image gate at
    ``image_threshold`` on ``image_probability``, the MLP's per-slice probabilities; the study
    gate on the study probability they give with ``top_k``) as ``dicom-node evaluate`` scores
    the lesions of
    :func:`find_lesions` (:func:`lesion_rule_scores`). The rule with the best mean Dice of
    tumours of at least 6 mm among those within :data:`LESION_FP_LIMIT` false positives per
    tumour-free case is chosen (the fewest false positives when none is; ties: the better Dice,
    then the rule tried first, ungated first).
    """
    rules = [
        LesionRule(
            threshold=threshold,
            min_volume_mm3=volume,
            min_peak=peak,
            image_gate=image_threshold if gate else None,
            study_gate=study_gate,
        )
        for threshold, peak, volume, gate, study_gate in itertools.product(
            LESION_THRESHOLDS,
            LESION_PEAKS,
            LESION_MIN_VOLUMES_MM3,
            LESION_IMAGE_GATES,
            LESION_STUDY_GATES,
        )
        if peak is None or peak > threshold
    ]
    cases = [
        (
            val_bank.masks[rows],
            tuple(float(v) for v in val_bank.spacing_zyx[k]),
            val_probability[rows],
            image_probability[rows],
            study_probability(image_probability[rows], top_k=top_k),
        )
        for k in range(len(val_bank.case_ids))
        for rows in (val_bank.case_rows(k),)
    ]
    began = time.monotonic()
    tried = [
        (rule, dice, fp, found)
        for rule, (dice, found, fp) in zip(rules, lesion_rule_scores(cases, rules), strict=True)
    ]
    logger.info(
        "lesion rule search: %d rules on %d cases (%.0f M voxels) in %.1f s",
        len(rules),
        len(cases),
        val_probability.size / 1e6,
        time.monotonic() - began,
    )
    if tried and tried[0][2] is None:
        logger.warning(
            "no tumour-free validation case: the lesion rule is chosen without its false"
            " positives (give the split tumour-free validation cases)"
        )
    if tried and tried[0][1] is None:
        logger.warning(
            "no validation tumour of 6 mm or more: the lesion rule is chosen on its false"
            " positives alone"
        )

    def fp_of(t: tuple[LesionRule, float | None, float | None, float | None]) -> float:
        return 0.0 if t[2] is None else t[2]

    def dice_of(t: tuple[LesionRule, float | None, float | None, float | None]) -> float:
        return 0.0 if t[1] is None else t[1]

    within = [t for t in tried if fp_of(t) <= LESION_FP_LIMIT]
    if within:
        best = max(within, key=lambda t: (dice_of(t), -fp_of(t)))
    else:
        best = min(tried, key=lambda t: (fp_of(t), -dice_of(t)))
    rule, dice, fp, found = best
    logger.info(
        "lesion rule: threshold %.2f, peak %s, minimum %.0f mm3, image gate %s, study gate %s:"
        " validation Dice (>= 6 mm) %s, detection %s, %s false positives per tumour-free case",
        rule.threshold,
        "none" if rule.min_peak is None else f"{rule.min_peak:.2f}",
        rule.min_volume_mm3,
        "off" if rule.image_gate is None else f"at {rule.image_gate:.2f}",
        "off" if rule.study_gate is None else f"at {rule.study_gate:.2f}",
        "n/a" if dice is None else f"{dice:.3f}",
        "n/a" if found is None else f"{found:.3f}",
        "n/a" if fp is None else f"{fp:.2f}",
    )
    figures = {
        "val_lesion_dice_ge_6mm": dice,
        "val_detection_sensitivity_ge_6mm": found,
        "val_fp_lesions_per_tumour_free_study": fp,
    }
    return rule, {k: v for k, v in figures.items() if v is not None}


def _image_operating_point(
    val_bank: SliceBank, image_probability: npt.NDArray[np.float32], *, top_k: int
) -> tuple[float, float | None, BinaryScores]:
    """The image threshold and image study gate chosen on the validation slices, and the
    scores of the calls they give.

    For each gate of :data:`IMAGE_STUDY_GATES` the image threshold with the best MCC of the
    gated calls (as :func:`~dicom_node.analysis.network.image_calls` makes them) is found; the
    gate whose calls then have the best MCC wins (ties: the one tried first, no gate first).
    """
    labels = val_bank.labels
    cases = [
        (rows, study_probability(image_probability[rows], top_k=top_k))
        for k in range(len(val_bank.case_ids))
        for rows in (val_bank.case_rows(k),)
    ]

    tried: list[tuple[float | None, float, BinaryScores]] = []
    for gate in IMAGE_STUDY_GATES:
        # image_calls as probabilities: a gated study's slices are 0, under every threshold
        # choose_threshold tries (0.02 and up), so ``gated >= threshold`` are the calls.
        gated = image_probability.astype(np.float64)
        for rows, study in cases:
            if gate is not None and study < gate:
                gated[rows] = 0.0
        threshold = choose_threshold(labels, gated)
        tried.append(
            (gate, threshold, binary_scores(labels, gated >= threshold, scores=image_probability))
        )
    best = max(range(len(tried)), key=lambda i: (tried[i][2].mcc, -i))
    gate, threshold, scores = tried[best]
    logger.info(
        "image operating point: threshold %.2f, study gate %s: validation MCC %.3f (tried: %s)",
        threshold,
        "off" if gate is None else f"at {gate:.2f}",
        scores.mcc,
        ", ".join(
            f"{'off' if g is None else f'{g:.1f}'} {sc.mcc:.3f} at {t:.2f}" for g, t, sc in tried
        ),
    )
    return threshold, gate, scores


def _operating_points(
    network: LungCTNet, val_x: torch.Tensor, val_bank: SliceBank, *, top_k: int
) -> tuple[float, float | None, float, dict[str, float], npt.NDArray[np.float32]]:
    """Image threshold and image study gate (:func:`_image_operating_point`), study threshold
    (best MCC on validation), the validation figures there and the MLP's probability for each
    validation slice."""
    with torch.no_grad():
        val_probs = torch.sigmoid(_mlp_logits(network.cpu(), val_x)).float().numpy()
    image_threshold, image_study_gate, image_scores = _image_operating_point(
        val_bank, val_probs, top_k=top_k
    )
    s_prob = np.array(
        [
            study_probability(val_probs[val_bank.case_rows(k)], top_k=top_k)
            for k in range(len(val_bank.case_ids))
        ]
    )
    s_truth = np.array(
        [bool(val_bank.labels[val_bank.case_rows(k)].any()) for k in range(len(val_bank.case_ids))]
    )
    study_threshold = choose_threshold(s_truth, s_prob)
    study_scores = binary_scores(s_truth, s_prob >= study_threshold, scores=s_prob)
    figures: dict[str, float | None] = {
        "val_image_accuracy": image_scores.accuracy,
        "val_image_mcc": image_scores.mcc,
        "val_image_kappa": image_scores.kappa,
        "val_image_auc": image_scores.roc_auc,
        "val_study_accuracy": study_scores.accuracy,
    }
    return (
        image_threshold,
        image_study_gate,
        study_threshold,
        {k: float(v) for k, v in figures.items() if v is not None},
        val_probs.astype(np.float32),
    )


def train(
    dataset: CaseDataset,
    split: Split,
    *,
    config: TrainConfig,
    output: Path | None,
    work_dir: Path,
    resume: bool = False,
    training_data: str | None = None,
) -> TrainResult:
    """Train the network on ``split.train``, validate on ``split.val``, write a model folder.

    Parameters
    ----------
    dataset
        Where the cases come from.
    split
        Patient-level split; ``test`` is not touched.
    config
        Hyper-parameters, budget and device.
    output
        The model folder to write at the end (``None``: write nothing, e.g. in tests).
    work_dir
        Checkpoint, metrics log (JSON lines) and cached slices.
    resume
        Continue from ``work_dir``'s checkpoint (its config must match).
    training_data
        What the card says the model was trained on (a description of ``dataset`` otherwise).

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        The split has no training or no validation cases.
    ModelError
        Encoder weights cannot be loaded, the checkpoint is from another config, or the model
        folder cannot be written.
    """
    started = time.monotonic()
    if not split.val or not (split.train or config.keep_mlp):
        raise ValueError("the split needs training and validation cases")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(config, work_dir=work_dir, started=started, device=_resolve_device(config.device))
    spec, window = config.input_spec(), config.window
    banks = [
        build_bank(
            dataset,
            cases,
            spec=spec,
            window=window,
            cache_dir=work_dir,
            progress=config.progress,
            workers=config.workers,
        )
        for cases in ((split.val,) if config.keep_mlp else (split.val, split.train))
    ]
    if not banks[0].labels.any():
        # the weights kept, the thresholds and the lesion rule are all chosen on these cases:
        # without a tumour, Dice says nothing (the Dice of no tumour is 1, whatever is found)
        raise DatasetError(
            f"the validation part ({len(split.val)} cases) holds no slice with tumour: the"
            " weights and thresholds cannot be chosen on it; give it more cases"
            " (--val-fraction) or use another split"
        )
    if config.keep_mlp:
        assert config.from_model is not None  # TrainConfig checks it
        run.start_from(config.from_model)
        return _finish(
            run,
            dataset,
            split,
            val_bank=banks[0],
            train_bank=None,
            output=output,
            training_data=training_data,
        )
    val_bank, train_bank = banks
    logger.info(
        "training on %d slices of %d cases (%d with tumour), validating on %d cases",
        len(train_bank),
        len(split.train),
        int(train_bank.labels.sum()),
        len(split.val),
    )
    if config.from_model is not None:
        run.start_from(config.from_model)
    if resume and run.ckpt_path.exists():
        run.restore()  # after start_from: the source's card, the run's own weights and state
    if run.stage == "seg":
        run.reserve_stage2(train_bank, val_bank)
    run.segmentation(train_bank, val_bank)
    return _finish(
        run,
        dataset,
        split,
        val_bank=val_bank,
        train_bank=train_bank,
        output=output,
        training_data=training_data,
    )


#: Input fields a fine-tuned network may change (the grid); the others must be the source's.
_GRID_FIELDS = {"size", "mode", "pixel_spacing_mm", "interpolation"}


def _grid_text(spec: InputSpec) -> str:
    """An input grid as a card's description names it: ``256x256 slices (spacing, 1.5 mm
    pixels)``."""
    pixels = f", {spec.pixel_spacing_mm} mm pixels" if spec.mode == "spacing" else ""
    return f"{spec.size}x{spec.size} slices ({spec.mode}{pixels})"


#: How a ``keep_mlp`` card's ``training_data`` names the cases its operating points came from.
_CHOSEN_ON = "Operating points chosen on the validation cases of: "
#: How a ``from_model`` card's ``training_data`` names the cases its segmentation network was
#: trained on, when that network was taken from the source (and fine-tuned or not).
_SEGMENTATION_ON = "Segmentation network trained on: "


def _cases_of(dataset: CaseDataset, split: Split) -> str:
    """A card's ``training_data`` when the caller gives none."""
    return f"{dataset.name}; train {len(split.train)} cases, validation {len(split.val)} cases"


def _segmentation_data(card: ModelCard) -> str:
    """What the segmentation network of ``card`` was trained on, from its ``training_data``."""
    data = card.training_data
    if _SEGMENTATION_ON in data:
        data = data.split(_SEGMENTATION_ON, 1)[1]
    return data.split(_CHOSEN_ON)[0].rstrip()


def _source_text(source: ModelCard, config: TrainConfig) -> str:
    """The source model as a card's description names it, with its grid when fine-tuning
    moved the network to another one."""
    text = f"{source.name} {source.version}"
    if source.input.model_dump(include=_GRID_FIELDS) != config.input_spec().model_dump(
        include=_GRID_FIELDS
    ):
        text += f", which read {_grid_text(source.input)}"
    return text


def _finish(
    run: _Run,
    dataset: CaseDataset,
    split: Split,
    *,
    val_bank: SliceBank,
    train_bank: SliceBank | None,
    output: Path | None,
    training_data: str | None,
) -> TrainResult:
    """After stage 1: stage 2 (unless ``keep_mlp``), the operating points, the model folder."""
    config = run.config
    seg_threshold, seg_dice = run.segmentation_threshold(val_bank)
    if config.keep_mlp:
        assert run.source_card is not None
        epochs_done = int(run.source_card.metrics.get("cls_epochs", 0.0))
        val_x, val_probability = run.validation_features(val_bank)
        # Where the source's own operating points were chosen no longer holds: say where these were.
        trained_on = run.source_card.training_data.split(_CHOSEN_ON)[0].rstrip()
        training_data = f"{trained_on} {_CHOSEN_ON}{training_data or dataset.name}"
    else:
        assert train_bank is not None
        epochs_done, val_x, val_probability = run.classification(train_bank, val_bank)
        if run.source_card is not None:  # the segmentation network learnt on the source's cases
            these = training_data or _cases_of(dataset, split)
            source_data = _segmentation_data(run.source_card)
            # On the same cases once is enough (the description names the source); else both.
            training_data = these
            if source_data != these:
                training_data = f"{these} {_SEGMENTATION_ON}{source_data}" + (
                    f"; fine-tuned on: {these}" if config.fine_tune else ""
                )
    image_threshold, image_study_gate, study_threshold, figures, image_probability = (
        _operating_points(run.network, val_x, val_bank, top_k=config.top_k)
    )
    rule, lesion_figures = _lesion_operating_point(
        val_bank, val_probability, image_probability, image_threshold, top_k=config.top_k
    )
    validation = {
        **figures,
        **lesion_figures,
        "val_dice_slices": seg_dice,
        "val_seg_threshold": seg_threshold,
        "seg_steps": float(run.steps_before + run.step),
        "cls_epochs": float(epochs_done),
        "train_minutes": run.elapsed() / 60.0,
    }
    run.log.write(
        stage="done",
        elapsed_s=run.elapsed(),
        image_threshold=image_threshold,
        image_study_gate=image_study_gate,
        study_threshold=study_threshold,
        stopped_by=run.stopped_by,
        **validation,
    )
    card = make_card(
        config,
        thresholds=Thresholds(
            segmentation=rule.threshold,
            image=image_threshold,
            image_study_gate=image_study_gate,
            study=study_threshold,
            lesion_peak=rule.min_peak,
            lesion_min_volume_mm3=rule.min_volume_mm3,
            lesion_image_gate=rule.image_gate is not None,
            lesion_study_gate=rule.study_gate,
        ),
        metrics=validation,
        training_data=training_data or _cases_of(dataset, split),
        stopped_by=run.stopped_by,
        source=None if run.source_card is None else _source_text(run.source_card, config),
    )
    written: ModelCard | None = None
    if output is not None and config.keep_mlp:
        # Not one tensor changed: the source's weights file, byte for byte, beside the new card.
        assert run.source_card is not None and config.from_model is not None
        written = card.model_copy(update={"weights": run.source_card.weights})
        save_card(written, output, weights_from=config.from_model)
    elif output is not None:
        written = save_model(run.network.cpu(), card, output, dtype=torch.float16)
    logger.info("training done in %.1f min: %s", run.elapsed() / 60.0, validation)
    return TrainResult(
        card=written,
        seg_steps_done=run.steps_before + run.step,
        cls_epochs_done=epochs_done,
        seconds=run.elapsed(),
        validation=validation,
        stopped_by=run.stopped_by,
    )


def make_card(
    config: TrainConfig,
    *,
    thresholds: Thresholds,
    metrics: dict[str, float],
    training_data: str,
    stopped_by: str,
    source: str | None = None,
) -> ModelCard:
    """The model card of a trained network (metrics are the validation figures).

    ``source`` names the model whose segmentation network (and with ``keep_mlp`` MLP) was
    taken (``from_model``).
    """
    arch = config.architecture
    if source is None and config.from_model is not None:
        source = config.from_model.name
    return ModelCard(
        name=config.name,
        version=config.version,
        description=(
            f"{arch.encoder} U-Net (tumour segmentation) with an MLP on the pooled deepest "
            + (
                "encoder features (global average, global maximum and segmentation-weighted "
                "average, with the peak and log-sum of the segmentation probability) "
                if arch.mlp_pooling == "lesion"
                else "encoder features (global average) "
            )
            + f"(per-image cancer probability), trained in two stages on "
            f"{config.input_size}x{config.input_size} slices ({config.input_mode}"
            + (f", {config.pixel_spacing_mm} mm pixels" if config.input_mode == "spacing" else "")
            + (
                f", with the planes {config.context_mm:g} mm before and after each slice"
                if config.context_mm is not None
                else ""
            )
            + (
                f"; the MLP also reads the slices {arch.mlp_context_mm:g} mm before and after"
                if arch.mlp_context_mm > 0
                else ""
            )
            + (
                f"); segmentation network and MLP taken from {source}, operating points chosen anew"
                if source is not None and config.keep_mlp
                else f"); segmentation network fine-tuned from {source} (stage 1 ended by "
                f"{stopped_by}), MLP and operating points fitted anew"
                if source is not None and config.fine_tune
                else f"); segmentation network taken from {source}, MLP and operating points"
                " fitted anew"
                if source is not None
                else f"); stage 1 ended by {stopped_by}"
            )
            + (
                "; segmentation run at scales "
                + ", ".join(f"{scale:g}" for scale in config.seg_scales)
                + " (mean logits)"
                if len(config.seg_scales) > 1
                else ""
            )
            + ". Research prototype: NOT FOR CLINICAL USE."
        ),
        architecture=arch,
        input=config.input_spec(),
        normalisation=config.normalisation(),
        thresholds=thresholds,
        top_k=config.top_k,
        classes=Classes(
            finding=ClassInfo(
                name="lung tumour", code=Code(scheme="SCT", value="108369006", meaning="Neoplasm")
            ),
            positive=ClassInfo(
                name="cancerous", code=Code(scheme="SCT", value="21594007", meaning="Malignant")
            ),
            negative=ClassInfo(
                name="non-cancerous", code=Code(scheme="SCT", value="30807003", meaning="Benign")
            ),
        ),
        intended_use=(
            "Research and integration testing of the dicom-node pipeline on synthetic data. "
            "Not a medical device; not for clinical use or any diagnostic decision."
        ),
        training_data=training_data,
        metrics=metrics,
    )


def with_metrics(card: ModelCard, metrics: dict[str, float]) -> ModelCard:
    """The card with ``metrics`` merged into its metrics."""
    return card.model_copy(update={"metrics": {**card.metrics, **metrics}})


__all__ = [
    "AugmentConfig",
    "SliceBank",
    "TrainConfig",
    "TrainResult",
    "bce_dice_loss",
    "build_bank",
    "load_encoder_weights",
    "make_card",
    "to_model_grid",
    "train",
    "with_metrics",
]


def config_from_args(args: Any) -> TrainConfig:
    """The run's settings from the ``dicom-node train`` namespace (see ``dicom_node.cli``).

    Reads nothing and writes nothing, so that a command line whose settings do not fit
    together is refused before any case is made or file written.

    Raises
    ------
    ValueError
        The settings do not fit together (as :class:`TrainConfig` says).
    """
    from dicom_node.training.datasets import default_workers

    context_mm = args.context_mm or None
    arch = Architecture(
        encoder=args.encoder,
        mlp_pooling=args.mlp_pooling,
        mlp_context_mm=args.mlp_context_mm,
        in_channels=input_channels(context_mm),
    )
    return TrainConfig(
        architecture=arch,
        input_size=args.input_size,
        input_mode="spacing" if args.pixel_spacing else "fit",
        pixel_spacing_mm=args.pixel_spacing,
        context_mm=context_mm,
        seg_scales=tuple(args.seg_scales),
        crop=args.crop,
        lesion_fraction=args.lesion_fraction,
        crop_dice=args.crop_dice,
        batch_size=args.batch_size,
        seg_steps=args.seg_steps,
        seg_lr=args.seg_lr,
        cls_epochs=args.cls_epochs,
        seed=args.seed,
        max_minutes=args.max_minutes,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        workers=args.workers or default_workers(),
        encoder_weights=args.encoder_weights,
        from_model=args.from_model,
        keep_mlp=args.keep_mlp,
        fine_tune=args.fine_tune,
        name=args.name,
        version=args.model_version,
        progress=not args.no_progress,
    )


def run_from_args(args: Any, config: TrainConfig) -> int:
    """The ``dicom-node train`` command: build the dataset and split from ``args`` and train
    with ``config`` (:func:`config_from_args`).

    ``args`` is the argparse namespace of the ``train`` subcommand (see ``dicom_node.cli``).
    Returns the exit status (0).
    """
    from dicom_node.training.datasets import (
        open_dataset,
        phantom_spec_from_args,
        read_split,
        split_cases,
        write_split,
    )

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = phantom_spec_from_args(args)
    work_dir: Path = args.work_dir or args.output.with_name(args.output.name + "-work")
    split_path: Path = args.split or work_dir / "split.json"
    phantoms = args.dataset == "phantoms"
    split = read_split(split_path) if split_path.exists() else None
    if split is not None and phantoms:  # the split's ids stand for the phantoms it was made of
        spec = split.phantoms_for(spec, source=str(split_path))
    dataset = open_dataset(
        args.dataset, path=args.data, phantoms=spec, segment_labels=args.segment_labels
    )
    if split is not None:
        split.check_patients(dataset, source=str(split_path))
        used = ("val",) if config.keep_mlp else ("train", "val")
        split.check_cases(dataset, parts=used, source=str(split_path))
        if not split.val or not (split.train or config.keep_mlp):
            raise DatasetError(
                f"{split_path}: {len(split.train)} training and {len(split.val)} validation"
                " cases: a run needs both (write another split, or leave the file out to"
                " make one)"
            )
    else:  # refused before its file is written when a part would be empty
        split = split_cases(
            dataset,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
        )
        split = dataclasses.replace(split, phantoms=spec if phantoms else None)
        write_split(
            split,
            split_path,
            patients={c: dataset.patient_id(c) for c in dataset.case_ids()},
        )
    if args.encoder != "resnet50":
        logger.warning("encoder %s: the product model is resnet50", args.encoder)
    what = (
        f"synthetic chest-CT phantoms (dicom_node.training.phantom): {spec.describe()}"
        if args.dataset == "phantoms"
        else dataset.name
    )
    result = train(
        dataset,
        split,
        config=config,
        output=args.output,
        work_dir=work_dir,
        resume=args.resume,
        training_data=(
            f"{what}; patient-level split {split_path.name}: {len(split.train)} training and "
            f"{len(split.val)} validation cases." + (" No real patient data." if phantoms else "")
        ),
    )
    print(
        json.dumps(
            {
                "output": str(args.output),
                "seg_steps": result.seg_steps_done,
                "cls_epochs": result.cls_epochs_done,
                "minutes": round(result.seconds / 60.0, 1),
                "stopped_by": result.stopped_by,
                "validation": result.validation,
            },
            indent=2,
        )
    )
    return 0
