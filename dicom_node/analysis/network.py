"""The network: a U-Net for lung-tumour segmentation and an MLP for a per-image cancer logit.

One encoder pass feeds both heads::

    slice (N, 1, H, W) ─▶ encoder (ResNet) ─┬─▶ U-Net decoder ─▶ seg head ─▶ (N, 1, H, W) logits
                                            └─▶ deepest map ─▶ pooling ─▶ MLP ─▶ (N,) logits

The pooling (``architecture.mlp_pooling``) is ``average`` (global average of the deepest map)
or ``lesion``: the global average, the global maximum and the average weighted by the
segmentation probability of the deepest map, with two figures of that probability map (its
maximum and the log of its sum). A small tumour covers a fraction of one cell of the deepest
map; the global average dilutes it, the maximum and the lesion-weighted average keep it.

The encoder, decoder and segmentation head are those of ``segmentation_models_pytorch.Unet``
and keep its parameter names (``encoder.*``, ``decoder.*``, ``segmentation_head.*``), so a plain
smp U-Net checkpoint loads into the segmentation part unchanged; the MLP lives under
``classifier.*``. ResNet50 (2048 channels at the deepest level) is the product encoder; smaller
ResNets are accepted for tests and experiments, and the model card names the one a model uses.

The network is always built with ``encoder_weights=None``: nothing here touches the network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F  # noqa: N812 - the name PyTorch's own documentation uses
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

logger = logging.getLogger(__name__)


class Architecture(BaseModel):
    """What to build: the ``architecture`` section of a model card.

    The values decide every tensor name and shape of the weights, so a card and its weights
    file must agree on them exactly (see :func:`dicom_node.analysis.weights.load_model`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Encoder of the U-Net; ``resnet50`` is the product, smaller ResNets serve tests.
    encoder: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    #: Number of encoder stages (downsampling by ``2**encoder_depth`` at the deepest level).
    encoder_depth: Annotated[int, Field(ge=3, le=5)] = 5
    #: The decoder family; only the U-Net is built.
    decoder: Literal["unet"] = "unet"
    #: Channels of each decoder block, deepest first; one per encoder stage.
    decoder_channels: tuple[Annotated[int, Field(ge=1, le=4096)], ...] = (256, 128, 64, 32, 16)
    #: CT is one channel (normalised HU); three with 2.5-D input (``input.context_mm``).
    in_channels: Literal[1, 3] = 1
    #: One segmentation class (lung tumour) scored by a sigmoid.
    classes: Literal[1] = 1
    #: Width of the MLP's hidden layer.
    mlp_hidden: Annotated[int, Field(ge=1, le=65536)] = 256
    mlp_activation: Literal["relu", "gelu"] = "relu"
    #: Dropout between the MLP's two layers (active in training only).
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    #: What the MLP reads: ``average`` (global average pool of the deepest encoder map) or
    #: ``lesion`` (average, maximum and segmentation-weighted average of that map, plus the
    #: maximum and log-sum of the segmentation probability).
    mlp_pooling: Literal["average", "lesion"] = "average"
    #: Neighbouring-slice context of the MLP, in mm (0: none). With a value, the MLP also reads
    #: the mean of the pooled vectors of the slices that lie this far before and after the
    #: slice (``round(mm / slice spacing)`` slices, at least one; clamped at the volume's
    #: ends): a tumour's first and last slices have a tumour beside them, a vessel's disc moves.
    mlp_context_mm: Annotated[float, Field(ge=0.0, le=50.0)] = 0.0

    @field_validator("decoder_channels")
    @classmethod
    def _not_empty(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("must list at least one channel count")
        return value

    @model_validator(mode="after")
    def _one_block_per_stage(self) -> Architecture:
        if len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels has {len(self.decoder_channels)} entries but encoder_depth "
                f"is {self.encoder_depth} (one decoder block per encoder stage)"
            )
        return self

    @property
    def output_stride(self) -> int:
        """How much the deepest feature map is smaller than the input: ``2**encoder_depth``."""
        return int(2**self.encoder_depth)


class MLPHead(nn.Module):
    """Pooling, then Linear → activation → Dropout → Linear to one logit.

    Parameters
    ----------
    in_features
        Channels of the feature map it reads (2048 for the deepest ResNet50 stage).
    hidden
        Width of the hidden layer.
    activation
        ``"relu"`` or ``"gelu"``.
    dropout
        Dropout probability between the layers.
    pooling
        ``"average"`` or ``"lesion"`` (see :class:`Architecture`).
    context_mm
        Neighbouring-slice context (see :class:`Architecture`); 0 for none.
    """

    def __init__(
        self,
        in_features: int,
        *,
        hidden: int,
        activation: Literal["relu", "gelu"],
        dropout: float,
        pooling: Literal["average", "lesion"] = "average",
        context_mm: float = 0.0,
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.channels = in_features
        self.context_mm = context_mm
        width = in_features if pooling == "average" else 3 * in_features + 2
        if context_mm > 0:
            width *= 2
        self.fc1 = nn.Linear(width, hidden)
        self.act: nn.Module = nn.ReLU() if activation == "relu" else nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 1)

    def pool(self, features: torch.Tensor, seg_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The vector the MLP reads.

        Parameters
        ----------
        features
            (N, C, h, w) deepest encoder features.
        seg_logits
            (N, 1, H, W) segmentation logits; needed by ``lesion`` pooling.

        Returns
        -------
        torch.Tensor
            (N, C) for ``average``, (N, 3C + 2) for ``lesion``; float32.
        """
        features = features.float()
        average = features.mean(dim=(2, 3))
        if self.pooling == "average":
            return average
        if seg_logits is None:
            raise ValueError("lesion pooling needs the segmentation logits")
        prob = torch.sigmoid(seg_logits.float())
        weight = F.adaptive_avg_pool2d(prob, (int(features.shape[-2]), int(features.shape[-1])))
        lesion = (features * weight).sum(dim=(2, 3)) / (weight.sum(dim=(2, 3)) + 1e-3)
        peak = prob.amax(dim=(1, 2, 3))
        area = torch.log1p(prob.sum(dim=(1, 2, 3)))
        return torch.cat(
            [average, features.amax(dim=(2, 3)), lesion, peak[:, None], area[:, None]], dim=1
        )

    def neighbour_offset(self, spacing_z_mm: float) -> int:
        """Slices between a slice and the neighbours its context reads (0 without context)."""
        if self.context_mm <= 0:
            return 0
        if not spacing_z_mm > 0:
            raise ValueError(f"slice spacing must be positive, not {spacing_z_mm}")
        return max(1, round(self.context_mm / spacing_z_mm))

    def with_context(self, pooled: torch.Tensor, spacing_z_mm: float) -> torch.Tensor:
        """What :meth:`score` reads, from the pooled vectors of one volume's slices.

        Parameters
        ----------
        pooled
            (z, D) pooled vectors (:meth:`pool`) of consecutive slices of one volume, in order.
        spacing_z_mm
            Distance between the slices.

        Returns
        -------
        torch.Tensor
            ``pooled`` itself without context; with it, (z, 2D): each vector followed by the
            mean of the vectors :meth:`neighbour_offset` slices before and after it, the
            indices clamped to the volume.
        """
        offset = self.neighbour_offset(spacing_z_mm)
        if offset == 0:
            return pooled
        index = torch.arange(pooled.shape[0], device=pooled.device)
        last = pooled.shape[0] - 1
        before = pooled[(index - offset).clamp(0, last)]
        after = pooled[(index + offset).clamp(0, last)]
        return torch.cat([pooled, 0.5 * (before + after)], dim=1)

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N,) logits from the vectors the MLP reads (N, D): pooled, with context if any."""
        out: torch.Tensor = self.fc2(self.drop(self.act(self.fc1(pooled))))
        return out.squeeze(1)

    def forward(
        self,
        features: torch.Tensor,
        seg_logits: torch.Tensor | None = None,
        spacing_z_mm: float | None = None,
    ) -> torch.Tensor:
        """Score a feature map.

        Parameters
        ----------
        features
            (N, C, h, w) deepest encoder features.
        seg_logits
            (N, 1, H, W) segmentation logits (``lesion`` pooling).
        spacing_z_mm
            With context: the N slices are consecutive slices of one volume this far apart.

        Returns
        -------
        torch.Tensor
            (N,) logits.

        Raises
        ------
        ValueError
            A head with context is given no slice spacing.
        """
        pooled = self.pool(features, seg_logits)
        if self.context_mm > 0:
            if spacing_z_mm is None:
                raise ValueError("an MLP with slice context needs the slice spacing")
            pooled = self.with_context(pooled, spacing_z_mm)
        return self.score(pooled.to(self.fc1.weight.dtype))


class LungCTNet(nn.Module):
    """U-Net (segmentation) and MLP (per-image cancer logit) on one shared encoder.

    Parameters
    ----------
    architecture
        What to build; the product default (ResNet50 U-Net, 256-wide MLP) when omitted.

    Notes
    -----
    The encoder runs once per forward; its deepest map feeds both the decoder and the MLP. Built
    with random weights (``encoder_weights=None``); load trained ones with
    :func:`dicom_node.analysis.weights.load_model`.
    """

    def __init__(self, architecture: Architecture | None = None) -> None:
        super().__init__()
        arch = architecture if architecture is not None else Architecture()
        self.architecture = arch
        unet = smp.Unet(
            encoder_name=arch.encoder,
            encoder_depth=arch.encoder_depth,
            encoder_weights=None,
            decoder_channels=arch.decoder_channels,
            in_channels=arch.in_channels,
            classes=arch.classes,
            activation=None,
        )
        # Take the parts, not the wrapper, so that parameter names are smp's own.
        self.encoder: nn.Module = unet.encoder
        self.decoder: nn.Module = unet.decoder
        self.segmentation_head: nn.Module = unet.segmentation_head
        deepest = int(unet.encoder.out_channels[-1])
        self.classifier = MLPHead(
            deepest,
            hidden=arch.mlp_hidden,
            activation=arch.mlp_activation,
            dropout=arch.dropout,
            pooling=arch.mlp_pooling,
            context_mm=arch.mlp_context_mm,
        )

    @property
    def feature_channels(self) -> int:
        """Channels of the deepest encoder map, which the MLP reads (2048 for ResNet50)."""
        return self.classifier.channels

    def forward(
        self, x: torch.Tensor, spacing_z_mm: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment and score a batch of slices.

        Parameters
        ----------
        x
            (N, 1, H, W) normalised slices; H and W multiples of ``architecture.output_stride``
            (32 for depth 5).
        spacing_z_mm
            Needed with ``architecture.mlp_context_mm``: the batch is then one volume's
            consecutive slices, this far apart.

        Returns
        -------
        seg_logits : torch.Tensor
            (N, 1, H, W) tumour logits per pixel.
        class_logits : torch.Tensor
            (N,) cancer logit per slice.
        """
        features = self.encoder(x)
        seg: torch.Tensor = self.segmentation_head(self.decoder(features))
        cls = self.classifier(features[-1], seg, spacing_z_mm)
        return seg, cls

    def trunk(
        self, x: torch.Tensor, scales: Sequence[float] = (1.0,)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits (N, 1, H, W) and the MLP's pooled vectors (N, D), float32.

        The part of :meth:`forward` that reads one slice at a time; a volume's pooled vectors
        then go through ``classifier.with_context`` and ``classifier.score``.

        ``scales`` other than 1 (the card's ``input.seg_scales``) run the segmentation network
        again on the slices magnified by that factor (bilinear, to the nearest multiple of the
        output stride) and bring its logits back to (H, W); the logits returned are then the
        mean over every scale. The MLP reads the pass at scale 1 only, as in training.
        """
        features = self.encoder(x)
        seg: torch.Tensor = self.segmentation_head(self.decoder(features))
        pooled = self.classifier.pool(features[-1], seg)
        others = [scale for scale in scales if scale != 1.0]
        if others:
            total = seg.float()
            for scale in others:
                total = total + self._seg_logits_at(x, scale)
            seg = total / (1 + len(others))
        return seg, pooled

    def _seg_logits_at(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """Segmentation logits of ``x`` magnified by ``scale``, on ``x``'s (H, W), float32."""
        stride = self.architecture.output_stride
        height, width = int(x.shape[-2]), int(x.shape[-1])
        size = (
            max(stride, round(height * scale / stride) * stride),
            max(stride, round(width * scale / stride) * stride),
        )
        # in float32: the CPU has no half-precision kernel for the antialiased (scale < 1) one
        zoomed = F.interpolate(
            x.float(), size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0
        ).to(x.dtype)
        logits: torch.Tensor = self.segmentation_head(self.decoder(self.encoder(zoomed)))
        return F.interpolate(
            logits.float(),
            size=(height, width),
            mode="bilinear",
            align_corners=False,
            antialias=scale > 1.0,
        )


def study_probability(image_probabilities: npt.ArrayLike, *, top_k: int) -> float:
    """Combine per-image probabilities into one study-level probability.

    The rule: the mean of the ``k`` largest image probabilities, with ``k = min(top_k, n)``.
    A few confidently positive slices make a positive study (a nodule spans a handful of slices
    in a scan of hundreds), while one outlier slice counts only ``1/k``.

    Parameters
    ----------
    image_probabilities
        (z,) probabilities in [0, 1], one per slice.
    top_k
        How many of the highest probabilities to average (at least 1).

    Returns
    -------
    float
        The study probability in [0, 1].

    Raises
    ------
    ValueError
        No probabilities, ``top_k < 1``, or a value outside [0, 1] (NaN included).
    """
    probs = np.asarray(image_probabilities, dtype=np.float64).reshape(-1)
    if probs.size == 0:
        raise ValueError("no image probabilities to combine")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    if not np.all((probs >= 0.0) & (probs <= 1.0)):
        raise ValueError("image probabilities must lie in [0, 1]")
    k = min(top_k, probs.size)
    top = np.partition(probs, probs.size - k)[probs.size - k :]
    return float(top.mean())


def image_calls(
    image_probabilities: npt.ArrayLike,
    *,
    threshold: float,
    study_probability: float,
    study_gate: float | None = None,
) -> npt.NDArray[np.bool_]:
    """Which slices the per-image classifier calls cancerous.

    A slice is called at or above ``threshold`` (the card's ``thresholds.image``), and, with a
    ``study_gate`` (``thresholds.image_study_gate``), only in a study whose study probability
    reaches the gate: a slice the MLP flags in a study it otherwise finds unlikely to hold
    cancer is an isolated response (a vessel, a granuloma), not a finding.

    Parameters
    ----------
    image_probabilities
        (z,) probabilities, one per slice.
    threshold
        The image threshold.
    study_probability
        The study's probability (:func:`study_probability` of the same slices).
    study_gate
        ``None``: no gate.

    Returns
    -------
    ndarray of bool, shape (z,)
    """
    probs = np.asarray(image_probabilities, dtype=np.float64).reshape(-1)
    if study_gate is not None and study_probability < study_gate:
        return np.zeros(probs.shape, dtype=bool)
    return probs >= threshold
