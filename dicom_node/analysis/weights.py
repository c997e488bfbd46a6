"""Model folders: the model card (``model.yaml``) and the weights (``weights.safetensors``).

A model lives in ``models/<name>/``::

    models/lung-ct/
      model.yaml            the card: what the network is, what it expects, what it is for
      weights.safetensors   every tensor of the network, float16 or float32

:func:`load_model` validates the card, checks the weights' SHA-256 against it, checks that the
tensor names and shapes match the card's architecture exactly, and returns the network ready for
inference; it never touches the network (the encoder is built with ``encoder_weights=None``). It
builds the network on PyTorch's meta device and adopts the loaded tensors, so loading a ResNet50
model takes well under a second and can run at node start. :func:`save_model` writes both files
atomically and fills the card's checksum.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import safetensors
import safetensors.torch
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from dicom_node.analysis.context import input_channels
from dicom_node.analysis.network import Architecture, LungCTNet
from dicom_node.config import SegScales, describe_errors
from dicom_node.errors import ModelError

logger = logging.getLogger(__name__)

CARD_FILE = "model.yaml"
WEIGHTS_FILE = "weights.safetensors"

WeightsDType = Literal["float16", "bfloat16", "float32"]
#: A card's (and model.dtype's) dtype names.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
Probability = Annotated[float, Field(gt=0.0, lt=1.0)]


class _CardSection(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Code(_CardSection):
    """A coded concept, e.g. ``SCT 108369006 "Neoplasm"``."""

    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    value: Annotated[str, Field(min_length=1, max_length=64)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


class ClassInfo(_CardSection):
    """A class the model reports: a name for people and a code for DICOM."""

    name: Annotated[str, Field(min_length=1)]
    code: Code


class Classes(_CardSection):
    """What the outputs mean."""

    #: What the segmentation marks (one segment per lesion in the DICOM SEG).
    finding: ClassInfo
    #: The per-image / per-study label above the image / study threshold ("cancerous").
    positive: ClassInfo
    #: The label below the threshold ("non-cancerous").
    negative: ClassInfo


class InputSpec(_CardSection):
    """How a CT slice becomes the model's input.

    ``mode: fit`` resizes the whole (y, x) slice to ``size`` x ``size`` (the field of view is
    kept; a non-square slice is stretched). ``mode: spacing`` resamples the slice to
    ``pixel_spacing_mm`` and then centre-pads (with air) or centre-crops it to ``size`` x ``size``,
    so that a millimetre is the same number of pixels as in training. Probabilities go back to
    the slice grid by the inverse steps; pixels cropped away get probability 0.
    """

    #: In-plane size (pixels, square) the model runs at; a multiple of the output stride.
    size: Annotated[int, Field(ge=32, le=2048)] = 256
    mode: Literal["fit", "spacing"] = "fit"
    #: Pixel spacing (mm) of the model's input; required with ``mode: spacing``.
    pixel_spacing_mm: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    #: How slices are resized (``torch.nn.functional.interpolate`` mode; antialiased when
    #: shrinking with bilinear / bicubic).
    interpolation: Literal["bilinear", "bicubic", "area", "nearest"] = "bilinear"
    #: 2.5-D input: the planes this many mm before and after each slice (interpolated between
    #: slices) are two more input channels (:mod:`dicom_node.analysis.context`); ``None``: the
    #: slice alone. ``architecture.in_channels`` must be 3 with it, 1 without.
    context_mm: Annotated[float, Field(gt=0.0, le=50.0)] | None = None
    #: Test-time scales of the segmentation: the tumour logits are the mean of the network's
    #: on the input and on the input magnified by each other factor (1.25: as if its pixels
    #: were a quarter finer), brought back to the input grid
    #: (:meth:`~dicom_node.analysis.network.LungCTNet.trunk`). 1 must be one of them: the MLP
    #: reads that pass. The operating points of a card are chosen with its scales.
    seg_scales: SegScales = (1.0,)

    @model_validator(mode="after")
    def _spacing_given(self) -> InputSpec:
        if self.mode == "spacing" and self.pixel_spacing_mm is None:
            raise ValueError("mode 'spacing' needs pixel_spacing_mm")
        return self


class Normalisation(_CardSection):
    """HU window and intensity normalisation.

    HU values are clipped to [``window_low_hu``, ``window_high_hu``]; ``method: minmax`` then
    maps the window linearly onto [0, 1], ``method: zscore`` subtracts ``mean_hu`` and divides by
    ``std_hu`` (statistics of the clipped training data).
    """

    window_low_hu: float = -1000.0
    window_high_hu: float = 400.0
    method: Literal["minmax", "zscore"] = "minmax"
    mean_hu: float | None = None
    std_hu: Annotated[float, Field(gt=0.0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Normalisation:
        if self.window_high_hu <= self.window_low_hu:
            raise ValueError("window_high_hu must be above window_low_hu")
        if self.method == "zscore" and (self.mean_hu is None or self.std_hu is None):
            raise ValueError("method 'zscore' needs mean_hu and std_hu")
        return self

    def scale_shift(self) -> tuple[float, float]:
        """``(scale, shift)`` with ``normalised = clip(hu) * scale + shift``."""
        if self.method == "minmax":
            scale = 1.0 / (self.window_high_hu - self.window_low_hu)
            return scale, -self.window_low_hu * scale
        assert self.mean_hu is not None and self.std_hu is not None  # checked by the validator
        return 1.0 / self.std_hu, -self.mean_hu / self.std_hu


class Thresholds(_CardSection):
    """Operating points chosen on the validation data."""

    #: A voxel belongs to a lesion at or above this tumour probability.
    segmentation: Probability = 0.5
    #: A slice is "positive" at or above this probability.
    image: Probability = 0.5
    #: A slice is "positive" only in a study whose study probability reaches this (unset: every
    #: slice at or above ``image``; see :func:`~dicom_node.analysis.network.image_calls`).
    image_study_gate: Probability | None = None
    #: A study is "positive" at or above this probability.
    study: Probability = 0.5
    #: A lesion is kept only when its highest voxel probability reaches this (unset: every
    #: component above the segmentation threshold is a lesion).
    lesion_peak: Probability | None = None
    #: Lesions smaller than this (mm³) are dropped.
    lesion_min_volume_mm3: Annotated[float, Field(ge=0.0)] = 10.0
    #: A lesion is kept only when the per-image classifier calls at least one of its slices
    #: cancerous (probability at or above ``image``); false: the classifier is not asked.
    lesion_image_gate: bool = False
    #: No lesion is kept in a study whose study probability is below this (unset: no gate).
    #: Unlike ``study``, which says what the report calls the study, it only decides whether
    #: lesions are outlined; it may be lower.
    lesion_study_gate: Probability | None = None


class WeightsInfo(_CardSection):
    """The weights file: its dtype and checksum (both filled by :func:`save_model`)."""

    dtype: WeightsDType = "float16"
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None


class ModelCard(_CardSection):
    """The model card: ``model.yaml`` of a model folder.

    Everything the node needs to run a model and to describe its output, and what a reader needs
    to judge it (intended use, training data, metrics).
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    description: str = ""
    architecture: Architecture = Architecture()
    input: InputSpec = InputSpec()
    normalisation: Normalisation = Normalisation()
    thresholds: Thresholds = Thresholds()
    #: The study probability is the mean of the ``top_k`` highest image probabilities.
    top_k: Annotated[int, Field(ge=1, le=1000)] = 5
    classes: Classes
    intended_use: Annotated[str, Field(min_length=1)]
    training_data: Annotated[str, Field(min_length=1)]
    #: Validation metrics by name (e.g. ``study_auc: 0.91``, ``dice: 0.72``).
    metrics: dict[str, float] = Field(default_factory=dict)
    weights: WeightsInfo = WeightsInfo()

    @model_validator(mode="after")
    def _size_fits_stride(self) -> ModelCard:
        stride = self.architecture.output_stride
        if self.input.size % stride:
            raise ValueError(
                f"input.size {self.input.size} is not a multiple of the encoder's output "
                f"stride {stride}"
            )
        channels = input_channels(self.input.context_mm)
        if self.architecture.in_channels != channels:
            raise ValueError(
                f"architecture.in_channels {self.architecture.in_channels} does not match the "
                f"input: {channels} with input.context_mm {self.input.context_mm}"
            )
        return self


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A network with its card, ready for inference.

    Attributes
    ----------
    network
        The network in eval mode, on ``device`` in ``dtype``.
    card
        The validated card.
    path
        The model folder it came from (``None`` if built in memory).
    device, dtype
        Where and in what dtype the parameters are.
    load_seconds
        Wall time :func:`load_model` took.
    """

    network: LungCTNet
    card: ModelCard
    path: Path | None
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = field(default=0.0)


def read_card(path: Path) -> ModelCard:
    """Read and validate a model card.

    Parameters
    ----------
    path
        The ``model.yaml`` file.

    Raises
    ------
    ModelError
        The file is missing, unreadable, not YAML, or invalid; the message names each bad key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: model card missing") from exc
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model card ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: model card is not UTF-8 text ({exc.reason})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: model card is not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: model card must be a mapping of keys")
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(
            f"{path}: model card is invalid:\n  " + "\n  ".join(describe_errors(exc))
        ) from exc


def load_model(
    path: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a model folder: card, checksum, exact architecture match, weights.

    Parameters
    ----------
    path
        The model folder (holding ``model.yaml`` and ``weights.safetensors``).
    device
        Where the parameters go (``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a ``torch.device``).
    dtype
        The parameters' floating dtype on ``device`` (``float32`` is the usual choice; the
        engine's autocast then picks the compute precision). Integer buffers stay as they are.

    Returns
    -------
    LoadedModel
        The network in eval mode with its card.

    Raises
    ------
    ModelError
        The folder, card or weights file is missing; the card is invalid (the message names the
        key); the weights' SHA-256 differs from the card's; the file is not a valid safetensors
        file; its tensors' names, shapes or dtype do not match the card.
    """
    started = time.perf_counter()
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    card = read_card(path / CARD_FILE)
    weights_path = path / WEIGHTS_FILE
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelError(f"{weights_path}: weights file missing") from exc
    except OSError as exc:
        raise ModelError(f"{weights_path}: cannot read the weights ({exc.strerror})") from exc
    if card.weights.sha256 is None:
        raise ModelError(f"{path / CARD_FILE}: weights.sha256 is missing (save with save_model)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.weights.sha256:
        raise ModelError(
            f"{weights_path}: checksum mismatch (sha256 {digest}, the card says "
            f"{card.weights.sha256}); the file is damaged or belongs to another card"
        )
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{weights_path}: not a valid safetensors file ({exc})") from exc
    del data

    with torch.device("meta"):
        network = LungCTNet(card.architecture)
    _check_tensors(tensors, network, card, weights_path)
    network.load_state_dict(tensors, strict=True, assign=True)
    stray = [n for n, t in (*network.named_parameters(), *network.named_buffers()) if t.is_meta]
    if stray:  # a tensor that the state dict does not carry; it would fail at the first forward
        raise ModelError(
            f"{weights_path}: the network has tensors the weights cannot fill: {stray}"
        )
    torch_device = torch.device(device)
    network.to(device=torch_device, dtype=dtype)
    network.eval()
    unfit = [
        name
        for name, t in (*network.named_parameters(), *network.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if unfit:  # an infinite running variance silences its channel without any NaN to show it
        raise ModelError(
            f"{weights_path}: weights that are not finite in {dtype}: {_short_list(unfit)}"
        )
    seconds = time.perf_counter() - started
    logger.info(
        "loaded model %s %s from %s (%s, %s) in %.2f s",
        card.name,
        card.version,
        path,
        torch_device,
        dtype,
        seconds,
    )
    return LoadedModel(
        network=network,
        card=card,
        path=path,
        device=torch_device,
        dtype=dtype,
        load_seconds=seconds,
    )


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_tensors(
    tensors: dict[str, torch.Tensor], network: LungCTNet, card: ModelCard, where: Path
) -> None:
    """Raise ModelError unless ``tensors`` has exactly the network's names, shapes and dtype."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = sorted(
        f"{name} {tuple(tensors[name].shape)} (expected {tuple(expected[name].shape)})"
        for name in set(expected) & set(tensors)
        if tensors[name].shape != expected[name].shape
    )
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"missing {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {_short_list(unexpected)}")
        if reshaped:
            parts.append(f"wrong shape {_short_list(reshaped)}")
        raise ModelError(
            f"{where}: weights do not match the card's architecture "
            f"({card.architecture.encoder} U-Net): " + "; ".join(parts)
        )
    want = TORCH_DTYPES[card.weights.dtype]
    wrong = sorted(
        f"{name} {t.dtype}"
        for name, t in tensors.items()
        if t.dtype != (want if expected[name].is_floating_point() else expected[name].dtype)
    )
    if wrong:
        raise ModelError(
            f"{where}: the card says weights.dtype {card.weights.dtype} but the file holds "
            f"{_short_list(wrong)}"
        )


#: Largest running variance kept as it is when weights are stored in float16 (its maximum is
#: 65504); a larger one is rescaled with its convolution (see fit_batchnorm_to_float16).
_FLOAT16_VAR_LIMIT = 6.0e4


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(convolution, batch norm) module names where the norm directly follows a bias-free
    convolution: ``Sequential(conv, bn, ...)`` (smp's decoder, ResNet's downsample) and sibling
    ``convN`` / ``bnN`` attributes (ResNet's stem and bottlenecks)."""
    found: list[tuple[str, str]] = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            candidates = list(itertools.pairwise(names))
        else:
            candidates = [
                (f"conv{name[2:]}", name)
                for name in children
                if name.startswith("bn") and f"conv{name[2:]}" in children
            ]
        for a, b in candidates:
            conv, norm = children[a], children[b]
            if (
                isinstance(conv, nn.Conv2d)
                and conv.bias is None
                and isinstance(norm, nn.BatchNorm2d)
            ):
                found.append((f"{prefix}{a}", f"{prefix}{b}"))
    return found


def fit_batchnorm_to_float16(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every batch norm's running variance brought into float16's range.

    Training in bf16 can leave a running variance above 65504 (the largest float16), which would
    not survive the float16 weights file. For a norm that directly follows a bias-free
    convolution the fix is exact: output channel ``c`` of the convolution is divided by ``s``,
    the norm's running mean by ``s`` and its running variance by ``s²``, which leaves
    ``(conv(x) - mean) / sqrt(var + eps)`` unchanged but for the ``eps`` term (relative change
    below 1e-9 at these variances). The model itself is not changed.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for conv, bn in _conv_bn_pairs(model):
        var = state[f"{bn}.running_var"].to(torch.float64)
        if float(var.max()) <= _FLOAT16_VAR_LIMIT:
            continue
        scale = torch.where(
            var > _FLOAT16_VAR_LIMIT, torch.sqrt(var / (_FLOAT16_VAR_LIMIT / 4.0)), 1.0
        )
        weight = state[f"{conv}.weight"]
        shape = (-1,) + (1,) * (weight.ndim - 1)
        state[f"{conv}.weight"] = (weight.to(torch.float64) / scale.reshape(shape)).to(weight.dtype)
        mean = state[f"{bn}.running_mean"]
        state[f"{bn}.running_mean"] = (mean.to(torch.float64) / scale).to(mean.dtype)
        state[f"{bn}.running_var"] = (var / scale**2).to(state[f"{bn}.running_var"].dtype)
        logger.info("%s: running variance up to %.3g rescaled with %s", bn, float(var.max()), conv)
    return state


def save_model(
    model: LungCTNet,
    card: ModelCard,
    path: Path,
    *,
    dtype: torch.dtype = torch.float16,
) -> ModelCard:
    """Write a model folder: ``weights.safetensors`` then ``model.yaml``, each atomically.

    Parameters
    ----------
    model
        The network; its ``architecture`` must equal ``card.architecture``.
    card
        The card to write; its ``weights`` section is replaced (dtype and SHA-256 of the file).
    path
        The model folder; created if missing, files in it replaced.
    dtype
        Floating dtype of the stored tensors: ``torch.float16`` (half the size; the default),
        ``torch.bfloat16`` or ``torch.float32``. Integer buffers are stored as they are.

    Returns
    -------
    ModelCard
        The card as written, with ``weights.dtype`` and ``weights.sha256`` filled.

    Raises
    ------
    ModelError
        The architectures differ, ``dtype`` is not one of the three, a weight is not finite in
        ``dtype`` (NaN, or too large for float16), or the files cannot be written.
    """
    if model.architecture != card.architecture:
        raise ModelError(
            "the network's architecture differs from the card's: "
            f"{model.architecture.model_dump()} vs {card.architecture.model_dump()}"
        )
    names = {v: k for k, v in TORCH_DTYPES.items()}
    if dtype not in names:
        raise ModelError(f"weights dtype {dtype} is not one of {sorted(TORCH_DTYPES)}")
    tensors: dict[str, torch.Tensor] = {}
    state = fit_batchnorm_to_float16(model) if dtype == torch.float16 else model.state_dict()
    for name, tensor in state.items():
        stored = tensor.detach().to("cpu")
        if stored.is_floating_point():
            stored = stored.to(dtype)
            if not bool(torch.isfinite(stored).all()):
                raise ModelError(f"weight {name} is not finite in {dtype} (NaN, or out of range)")
        tensors[name] = stored.contiguous()
    metadata = {"name": card.name, "version": card.version, "format": "pt"}
    data = safetensors.torch.save(tensors, metadata=metadata)
    written = card.model_copy(
        update={"weights": WeightsInfo(dtype=names[dtype], sha256=hashlib.sha256(data).hexdigest())}
    )
    text = yaml.safe_dump(written.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _write_atomic(path / WEIGHTS_FILE, data)
        _write_atomic(path / CARD_FILE, text.encode("utf-8"))
    except OSError as exc:
        raise ModelError(f"{path}: cannot write the model ({exc.strerror})") from exc
    logger.info("saved model %s %s to %s (%s)", card.name, card.version, path, dtype)
    return written


def save_card(card: ModelCard, path: Path, *, weights_from: Path | None = None) -> None:
    """Write a model folder's card, keeping its weights file byte for byte.

    For new figures or a new description on a model whose tensors do not change: the weights
    file is not serialised again, so its bytes and the card's ``weights.sha256`` stay as they
    were (a model folder under version control keeps one copy of its weights).

    Parameters
    ----------
    card
        The card to write; its ``weights`` section must name the weights file's SHA-256.
    path
        The model folder.
    weights_from
        Another model folder whose weights file is copied into ``path`` first (as it is).

    Raises
    ------
    ModelError
        The weights file (copied or already there) does not match the card's checksum, or the
        files cannot be read or written.
    """
    source = (weights_from if weights_from is not None else path) / WEIGHTS_FILE
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ModelError(f"{source}: cannot read the weights ({exc.strerror})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.weights.sha256:
        raise ModelError(
            f"{source}: sha256 {digest} is not the card's ({card.weights.sha256}); "
            "a card is written only beside the weights it describes"
        )
    text = yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if weights_from is not None and source.resolve() != (path / WEIGHTS_FILE).resolve():
            _write_atomic(path / WEIGHTS_FILE, data)
        _write_atomic(path / CARD_FILE, text.encode("utf-8"))
    except OSError as exc:
        raise ModelError(f"{path}: cannot write the model card ({exc.strerror})") from exc
    logger.info("saved the card of %s %s to %s", card.name, card.version, path)


def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``target``, fsync it, rename it over ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
