"""The inference engine: a CT volume in, tumour probabilities and cancer probabilities out.

:class:`InferenceEngine` holds one network on one device and runs it slice by slice over a
volume (z, y, x) in HU::

    loader thread: HU slices ─▶ window + normalise ─▶ pinned batch ─▶ bounded queue
    caller thread: batch ─▶ device ─▶ resize to the model grid ─▶ network (autocast) ─▶ finite?
                   ─▶ resize logits back to the slice grid ─▶ sigmoid ─▶ host arrays

The loader prepares the next batches while the device works on this one. On CUDA the copies
are ``non_blocking`` from pinned memory and the network runs under bf16/fp16 autocast; on every
device it runs in ``channels_last`` (also on the CPU: oneDNN's convolutions are faster in NHWC),
and ``torch.compile`` is available as an option. A batch that runs out of device
memory is retried at half the batch size, down to 1; the rest of the run keeps the smaller size,
and so do the next :data:`KEEP_REDUCED_RUNS` runs (the memory taken from the device, by another
process say, is likely still taken), after which the full size is tried again.

The interface (volume and spacing in, :class:`InferenceResult` out, no DICOM, no network) is one
that a remote executor could serve.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the name PyTorch's own documentation uses
from torch import nn

from dicom_node.analysis.context import input_channels, with_context
from dicom_node.analysis.network import LungCTNet, study_probability
from dicom_node.analysis.weights import TORCH_DTYPES, LoadedModel, ModelCard, load_model
from dicom_node.config import InferenceSettings
from dicom_node.errors import ConfigError, DeviceOutOfMemoryError, ModelError, PipelineError
from dicom_node.study.volume import reverse_axes

if TYPE_CHECKING:
    from dicom_node.config import Config

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]

#: Runs that keep a batch size reduced for running out of memory before the full one is tried
#: again.
KEEP_REDUCED_RUNS = 10

#: Batch size ``auto`` on the CPU: large batches do not run faster there, only use more memory.
CPU_AUTO_BATCH_SIZE = 4
#: Logit given to pixels the model did not see (cropped away in ``spacing`` mode): p ~ 1e-13.
_OUTSIDE_LOGIT = -30.0
#: Slice size and spacing used to measure memory per slice for batch size ``auto`` on CUDA.
_PROBE_SLICE = 512
_PROBE_SPACING_MM = (1.0, 0.7, 0.7)

_DTYPE_PRECISION: dict[torch.dtype, Precision] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}
_PRECISION_DTYPE: dict[Precision, torch.dtype] = {v: k for k, v in _DTYPE_PRECISION.items()}


@dataclass(frozen=True)
class StageTimings:
    """Wall time of one run by stage, in seconds.

    Attributes
    ----------
    setup_s
        Checking the input and planning the batches.
    preprocess_s
        Loader thread: HU to normalised, pinned batches. It overlaps the device work, so it does
        not add to ``total_s`` unless the device waits (see ``input_wait_s``).
    input_wait_s
        Caller thread waiting for the loader.
    model_s
        Copy to the device, resize to the model grid, forward pass, finiteness check (ends with
        the outputs ready on the device).
    postprocess_s
        Resize back to the slice grid, sigmoid, copy to the host.
    total_s
        The whole run.
    """

    setup_s: float
    preprocess_s: float
    input_wait_s: float
    model_s: float
    postprocess_s: float
    total_s: float


@dataclass(frozen=True, eq=False)
class InferenceResult:
    """What the model says about one volume.

    Attributes
    ----------
    probability
        (z, y, x) tumour probability on the volume's grid. ``float32`` in [0, 1], or ``uint8``
        holding ``round(p * 255)`` when ``inference.probability_dtype`` is ``uint8`` (a quarter
        of the memory; resolution 1/255). :meth:`probability_float32` gives [0, 1] either way.
    image_probabilities
        (z,) float32 cancer probability per slice.
    study_probability
        Mean of the ``top_k`` highest image probabilities.
    study_positive
        ``study_probability`` is at or above the card's study threshold.
    top_k
        The ``k`` used (the card's ``top_k``, clipped to the number of slices).
    timings
        Wall time by stage.
    device
        Where the network ran (``"cpu"``, ``"cuda:0"``).
    precision
        Compute precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    batch_size
        Slices per forward pass at the end of the run (smaller than configured after an
        out-of-memory retry).
    model_name, model_version
        From the model card.
    """

    probability: npt.NDArray[np.float32] | npt.NDArray[np.uint8]
    image_probabilities: npt.NDArray[np.float32]
    study_probability: float
    study_positive: bool
    top_k: int
    timings: StageTimings
    device: str
    precision: Precision
    batch_size: int
    model_name: str
    model_version: str

    def flipped(self, axes: tuple[int, ...]) -> InferenceResult:
        """The same result with the volume's ``axes`` (0 z, 1 y, 2 x) reversed: the model's
        answer for a volume it was given flipped, brought back to the volume's own order."""
        if not axes:
            return self
        return replace(
            self,
            probability=reverse_axes(self.probability, axes),
            image_probabilities=reverse_axes(self.image_probabilities, [a for a in axes if a == 0]),
        )

    def transposed_in_plane(self) -> InferenceResult:
        """The same result with its slices' y and x swapped: the model's answer for a volume
        it was given transposed in plane (a decubitus series), in the volume's own order."""
        return replace(self, probability=self.probability.transpose(0, 2, 1).copy(order="C"))

    def probability_float32(self) -> npt.NDArray[np.float32]:
        """(z, y, x) float32 probabilities in [0, 1] (a copy when stored as uint8)."""
        if self.probability.dtype == np.uint8:
            return (self.probability.astype(np.float32) / np.float32(255.0)).astype(np.float32)
        return self.probability.astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Grid:
    """How one volume's slices map onto the model's input: resize to (nh, nw), then pad/crop."""

    height: int
    width: int
    resized_h: int
    resized_w: int
    #: F.pad amounts (left, right, top, bottom); negative crops.
    pad: tuple[int, int, int, int]


@dataclass
class _RunState:
    batch_size: int
    model_s: float = 0.0
    postprocess_s: float = 0.0


def resolve_device(name: str) -> torch.device:
    """Turn ``inference.device`` into a ``torch.device``.

    Parameters
    ----------
    name
        ``"auto"`` (the first CUDA device if any, else the CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.

    Raises
    ------
    ConfigError
        A CUDA device is asked for and this machine has none (or not that many).
    """
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if device.index is None else device.index
        if index >= count:
            raise ConfigError(
                f"inference.device: {name!r} is not available ({count} CUDA devices here)"
            )
        return torch.device("cuda", index)
    return device


def resolve_precision(
    setting: Literal["auto", "fp32", "bf16", "fp16"], device: torch.device, weights: torch.dtype
) -> Precision:
    """Choose the compute precision from ``inference.precision``, the device and weight dtype.

    ``auto`` is bf16 on CUDA devices that support it (fp16 on older ones) and fp32 on the CPU.
    Weights held in a half dtype (``model.dtype``) fix the precision to that dtype.

    Raises
    ------
    ConfigError
        fp16 on the CPU, bf16 on a CUDA device without it, or a setting that contradicts the
        weights' half dtype.
    """
    if weights != torch.float32:
        held = _DTYPE_PRECISION[weights]
        if held == "bf16" and device.type == "cuda" and not _cuda_bf16(device):
            raise ConfigError(f"model.dtype: bfloat16 is not supported by {device} (use float16)")
        if setting not in ("auto", held):
            raise ConfigError(
                f"inference.precision: {setting!r} contradicts model.dtype {weights} "
                f"(half-precision weights run in their own dtype; use 'auto' or {held!r})"
            )
        if device.type == "cpu" and held == "fp16":
            raise ConfigError("model.dtype: float16 is not supported on the CPU (use bfloat16)")
        return held
    if setting == "auto":
        if device.type == "cuda":
            return "bf16" if _cuda_bf16(device) else "fp16"
        return "fp32"
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError("inference.precision: 'fp16' is supported on CUDA only (use 'bf16')")
    if setting == "bf16" and device.type == "cuda" and not _cuda_bf16(device):
        raise ConfigError(f"inference.precision: 'bf16' is not supported by {device} (use fp16)")
    return setting


def _cuda_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (compute capability 8.0, Ampere, and
    later). ``torch.cuda.is_bf16_supported()`` also says yes for older GPUs, where bf16 is
    emulated slowly and cuDNN has no bf16 convolutions, and asks of the current device."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class InferenceEngine:
    """Runs a model over CT volumes on one device.

    Parameters
    ----------
    model
        A model folder (loaded here onto the configured device, weights in ``model_dtype``) or a
        :class:`~dicom_node.analysis.weights.LoadedModel`, whose network the engine then owns:
        it is moved to the configured device (and to channels_last, unless turned off).
    settings
        The ``inference`` section of the configuration; defaults when omitted.
    model_dtype
        Weight dtype when ``model`` is a folder (``model.dtype`` in the configuration).

    Raises
    ------
    ModelError
        The model folder cannot be loaded.
    ConfigError
        The device or precision is not available here.
    DeviceOutOfMemoryError
        On CUDA, not even one slice fits in the device's memory.

    Notes
    -----
    On CUDA the constructor also measures memory per slice (batch size ``auto``), compiles the
    network (``compile: true``) and warms it up, so that the first study does not pay for it.
    One engine runs one volume at a time; concurrent :meth:`run` calls wait for each other.
    """

    def __init__(
        self,
        model: LoadedModel | Path,
        settings: InferenceSettings | None = None,
        *,
        model_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.settings = settings if settings is not None else InferenceSettings()
        self.device = resolve_device(self.settings.device)
        if isinstance(model, Path):
            model = load_model(model, device=self.device, dtype=model_dtype)
        self.model = model
        network: LungCTNet = model.network
        network.to(self.device)
        network.eval()
        weights_dtype = next(network.parameters()).dtype
        self.precision: Precision = resolve_precision(
            self.settings.precision, self.device, weights_dtype
        )
        self._autocast_dtype: torch.dtype | None = (
            _PRECISION_DTYPE[self.precision]
            if weights_dtype == torch.float32 and self.precision != "fp32"
            else None
        )
        self._input_dtype = weights_dtype
        self._cuda = self.device.type == "cuda"
        self._channels_last = self.settings.channels_last
        if self._channels_last:
            network.to(memory_format=torch.channels_last)
        if self._cuda:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick kernels
        #: What runs per batch: segmentation logits and the MLP's pooled vectors. The MLP
        #: itself runs once per volume, after the last batch (its slice context needs them all).
        #: The segmentation's test-time scales: the configuration's, else the card's.
        self.seg_scales: tuple[float, ...] = (
            self.settings.seg_scales
            if self.settings.seg_scales is not None
            else model.card.input.seg_scales
        )
        self._network: nn.Module = _Trunk(network, self.seg_scales)
        self._lock = threading.Lock()
        scale, shift = self.card.normalisation.scale_shift()
        self._scale, self._shift = scale, shift
        self._air = self.card.normalisation.window_low_hu * scale + shift
        self._channels = input_channels(self.card.input.context_mm)
        #: With torch.compile, short batches are padded to the batch size (no recompiles).
        self._compiled = False

        if self.settings.batch_size == "auto":
            self.batch_size = self._auto_batch_size()
        else:
            self.batch_size = self.settings.batch_size
        #: A batch size reduced for running out of memory, and the runs since it was set.
        self._reduced: tuple[int, int] | None = None
        if self.settings.compile:
            self._network = torch.compile(self._network, dynamic=False)  # type: ignore[assignment]
            self._compiled = True
        if self._cuda:
            self._warm_up()
        logger.info(
            "inference engine ready: %s %s on %s, %s, batch %d%s%s%s",
            self.card.name,
            self.card.version,
            self.device,
            self.precision,
            self.batch_size,
            ", channels_last" if self._channels_last else "",
            ", compiled" if self.settings.compile else "",
            f", segmentation at scales {', '.join(f'{s:g}' for s in self.seg_scales)}"
            if len(self.seg_scales) > 1
            else "",
        )

    @classmethod
    def from_config(cls, config: Config) -> InferenceEngine:
        """Build the engine the configuration describes (``model`` and ``inference``).

        Raises
        ------
        ModelError, ConfigError
            As :class:`InferenceEngine`.
        """
        if config.model.path is None:
            raise ModelError("no model configured (model.path is null)")
        return cls(
            config.model.path, config.inference, model_dtype=TORCH_DTYPES[config.model.dtype]
        )

    @property
    def card(self) -> ModelCard:
        """The model card of the loaded model."""
        return self.model.card

    # ------------------------------------------------------------------ public

    def run(
        self,
        volume_hu: npt.NDArray[np.generic],
        spacing_mm: tuple[float, float, float],
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> InferenceResult:
        """Segment and score a CT volume.

        Parameters
        ----------
        volume_hu
            (z, y, x) Hounsfield units, any real dtype (int16 and float32 are the usual ones).
        spacing_mm
            (z, y, x) voxel spacing in mm; the in-plane pair matters with the card's
            ``input.mode: spacing``.

        Returns
        -------
        InferenceResult
            Probabilities on the volume's grid, per slice and per study, with timings.

        Raises
        ------
        PipelineError
            The volume is not 3-D, is empty, not numeric or not finite; the spacing is not three
            positive numbers; the volume or the model output contains NaN or Inf.
        DeviceOutOfMemoryError
            The device ran out of memory at batch size 1.

        ``progress(done, total)`` is called after each batch with slices done so far.
        """
        with self._lock:
            return self._run(volume_hu, spacing_mm, progress)

    # ------------------------------------------------------------------ the run

    def _run(
        self,
        volume: npt.NDArray[np.generic],
        spacing_mm: tuple[float, float, float],
        progress: Callable[[int, int], None] | None = None,
    ) -> InferenceResult:
        started = time.perf_counter()
        volume = _checked_volume(volume, spacing_mm)
        depth, height, width = volume.shape
        grid = self._grid(height, width, spacing_mm)
        quantise = self.settings.probability_dtype == "uint8"
        probability: npt.NDArray[np.float32] | npt.NDArray[np.uint8] = np.empty(
            volume.shape, dtype=np.uint8 if quantise else np.float32
        )
        pooled: list[torch.Tensor] = []
        state = _RunState(batch_size=self._reduced[0] if self._reduced else self.batch_size)
        started_at = state.batch_size
        setup_s = time.perf_counter() - started

        loader = _Loader(
            volume,
            batch_size=self.batch_size,
            scale=self._scale,
            shift=self._shift,
            low=self.card.normalisation.window_low_hu,
            high=self.card.normalisation.window_high_hu,
            pin=self._cuda,
            depth=self.settings.prefetch_batches,
            spacing_z_mm=spacing_mm[0],
            context_mm=self.card.input.context_mm,
        )
        with loader, torch.inference_mode():
            for first, batch in loader.batches():
                self._infer_batch(
                    batch,
                    first,
                    grid=grid,
                    state=state,
                    probability=probability,
                    pooled=pooled,
                )
                if progress is not None:
                    progress(min(first + batch.shape[0], depth), depth)
            image_probs = self._classify(torch.cat(pooled), spacing_mm[0], state)

        self._remember_batch_size(started_at, state.batch_size)
        top_k = min(self.card.top_k, depth)
        study = study_probability(image_probs, top_k=top_k)
        total_s = time.perf_counter() - started
        timings = StageTimings(
            setup_s=setup_s,
            preprocess_s=loader.preprocess_s,
            input_wait_s=loader.wait_s,
            model_s=state.model_s,
            postprocess_s=state.postprocess_s,
            total_s=total_s,
        )
        logger.info(
            "inference: %d slices of %dx%d in %.2f s (%.1f slices/s), study p=%.3f",
            depth,
            height,
            width,
            total_s,
            depth / total_s if total_s > 0 else 0.0,
            study,
        )
        return InferenceResult(
            probability=probability,
            image_probabilities=image_probs,
            study_probability=study,
            study_positive=study >= self.card.thresholds.study,
            top_k=top_k,
            timings=timings,
            device=str(self.device),
            precision=self.precision,
            batch_size=state.batch_size,
            model_name=self.card.name,
            model_version=self.card.version,
        )

    def _remember_batch_size(self, started_at: int, ended_at: int) -> None:
        """Keep a batch size reduced in this run for the next runs, and try the full one again
        after :data:`KEEP_REDUCED_RUNS` of them."""
        if ended_at < started_at:
            self._reduced = (ended_at, 0)
            logger.warning(
                "the next %d runs keep batch size %d (configured %d)",
                KEEP_REDUCED_RUNS,
                ended_at,
                self.batch_size,
            )
        elif self._reduced is not None:
            size, runs = self._reduced
            self._reduced = (size, runs + 1) if runs + 1 < KEEP_REDUCED_RUNS else None

    def _infer_batch(
        self,
        batch: torch.Tensor,
        first: int,
        *,
        grid: _Grid,
        state: _RunState,
        probability: npt.NDArray[np.float32] | npt.NDArray[np.uint8],
        pooled: list[torch.Tensor],
    ) -> None:
        """Run one loader batch, in chunks of ``state.batch_size``, halving it on OOM."""
        done = 0
        count = batch.shape[0]
        while done < count:
            size = min(state.batch_size, count - done)
            chunk = batch[done : done + size]
            oom_message = ""
            try:
                seg, vectors = self._device_step(chunk, grid, state, first + done)
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                oom_message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if oom_message:  # handled outside the except block, so the activations are freed
                if self._cuda:
                    torch.cuda.empty_cache()
                if size == 1:
                    raise DeviceOutOfMemoryError(
                        f"out of memory on {self.device} at batch size 1 ({oom_message})"
                    )
                state.batch_size = max(1, size // 2)
                logger.warning(
                    "out of memory on %s at batch size %d; retrying at %d",
                    self.device,
                    size,
                    state.batch_size,
                )
                continue
            started = time.perf_counter()
            stop = first + done + size
            probability[first + done : stop] = seg
            pooled.append(vectors)
            state.postprocess_s += time.perf_counter() - started
            done += size

    def _device_step(
        self, chunk: torch.Tensor, grid: _Grid, state: _RunState, first: int
    ) -> tuple[npt.NDArray[np.float32] | npt.NDArray[np.uint8], torch.Tensor]:
        """One forward pass: (b, 1, h, w) normalised slices to host probabilities.

        Returns (b, h, w) tumour probabilities (float32, or uint8 when quantising) and the
        (b, D) float32 pooled vectors the MLP reads, left on the device.
        """
        started = time.perf_counter()
        size = chunk.shape[0]
        x = chunk.to(self.device, non_blocking=True)
        x = self._to_model_grid(x, grid)
        if self._compiled and size < state.batch_size:
            # Keep one input shape for the compiled graph: pad the last batch with air.
            filler = x.new_full((state.batch_size - size, *x.shape[1:]), self._air)
            x = torch.cat([x, filler])
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            seg, vectors = self._network(x.to(self._input_dtype))
        seg = seg[:size].float()
        vectors = vectors[:size].float()
        if not bool(torch.isfinite(seg).all() & torch.isfinite(vectors).all()):
            raise self._non_finite(f"slices {first}-{first + size - 1}")
        mid = time.perf_counter()
        state.model_s += mid - started

        prob = torch.sigmoid(self._to_slice_grid(seg, grid))[:, 0]
        if self.settings.probability_dtype == "uint8":
            host: npt.NDArray[np.float32] | npt.NDArray[np.uint8] = (
                prob.mul_(255.0).round_().to(torch.uint8).cpu().numpy()
            )
        else:
            host = prob.cpu().numpy()
        state.postprocess_s += time.perf_counter() - mid
        return host, vectors

    def _classify(
        self, pooled: torch.Tensor, spacing_z_mm: float, state: _RunState
    ) -> npt.NDArray[np.float32]:
        """(z,) image probabilities from a volume's (z, D) pooled vectors, in slice order."""
        started = time.perf_counter()
        head = self.model.network.classifier
        with self._autocast():
            logits = head.score(head.with_context(pooled, spacing_z_mm).to(self._input_dtype))
        logits = logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise self._non_finite("the image logits")
        image: npt.NDArray[np.float32] = torch.sigmoid(logits).cpu().numpy()
        state.model_s += time.perf_counter() - started
        return image

    # ------------------------------------------------------------------ geometry

    def _grid(self, height: int, width: int, spacing_mm: tuple[float, float, float]) -> _Grid:
        spec = self.card.input
        size = spec.size
        if spec.mode == "spacing":
            assert spec.pixel_spacing_mm is not None  # the card's validator requires it
            resized_h = max(1, round(height * spacing_mm[1] / spec.pixel_spacing_mm))
            resized_w = max(1, round(width * spacing_mm[2] / spec.pixel_spacing_mm))
        else:
            resized_h = resized_w = size
        left = (size - resized_w) // 2
        top = (size - resized_h) // 2
        pad = (left, size - resized_w - left, top, size - resized_h - top)
        return _Grid(height, width, resized_h, resized_w, pad)

    def _to_model_grid(self, x: torch.Tensor, grid: _Grid) -> torch.Tensor:
        """(b, 1, h, w) slices to (b, 1, S, S) model input: resize, then pad with air / crop."""
        target = (grid.resized_h, grid.resized_w)
        if target != (grid.height, grid.width):
            x = _resize(x, target, self.card.input.interpolation)
        if any(grid.pad):
            x = F.pad(x, grid.pad, value=self._air)
        return x

    def _to_slice_grid(self, logits: torch.Tensor, grid: _Grid) -> torch.Tensor:
        """(b, 1, S, S) logits back to (b, 1, h, w): undo the pad/crop, then resize (bilinear)."""
        if any(grid.pad):
            undo = tuple(-p for p in grid.pad)
            logits = F.pad(logits, undo, value=_OUTSIDE_LOGIT)
        if (grid.resized_h, grid.resized_w) != (grid.height, grid.width):
            logits = _resize(logits, (grid.height, grid.width), "bilinear")
        return logits

    # ------------------------------------------------------------------ setup helpers

    def _non_finite(self, where: str) -> PipelineError:
        """The error for NaN or Inf in the network's output at ``where``."""
        return PipelineError(
            f"model output contains NaN/Inf ({where}, precision {self.precision}); with fp16"
            " this is usually overflow: try bf16 or fp32"
        )

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def _auto_batch_size(self) -> int:
        """Batch size ``auto``: fixed on the CPU; on CUDA from measured memory per slice."""
        if not self._cuda:
            return min(CPU_AUTO_BATCH_SIZE, self.settings.max_batch_size)
        grid = self._grid(_PROBE_SLICE, _PROBE_SLICE, _PROBE_SPACING_MM)
        sizes = (1, 3)
        peaks = []
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            for size in sizes:
                x = torch.full(
                    (size, self._channels, _PROBE_SLICE, _PROBE_SLICE),
                    self._air,
                    dtype=torch.float32,
                )
                # The first pass of a shape lets cuDNN try algorithms (extra workspace); measure
                # the second, which is what every later batch of that shape costs.
                self._device_step(x, grid, _RunState(batch_size=size), 0)
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                self._device_step(x, grid, _RunState(batch_size=size), 0)
                torch.cuda.synchronize(self.device)
                peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
        per_slice = max((peaks[1] - peaks[0]) // (sizes[1] - sizes[0]), 2**20)
        fixed = max(peaks[0] - per_slice, 0)
        free, _total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = (free + cached) * self.settings.auto_memory_fraction - fixed
        chosen = int(max(1, min(self.settings.max_batch_size, budget // per_slice)))
        logger.info(
            "batch size auto on %s: %.0f MiB per slice, %.0f MiB usable -> %d",
            self.device,
            per_slice / 2**20,
            budget / 2**20,
            chosen,
        )
        return chosen

    def _warm_up(self) -> None:
        """One full batch through the (compiled) network, so the first study runs at speed.

        A batch size that does not fit is halved here, once and for all, until it does.

        Raises
        ------
        DeviceOutOfMemoryError
            Not even one slice fits.
        """
        started = time.perf_counter()
        size = self.card.input.size
        grid = _Grid(size, size, size, size, (0, 0, 0, 0))
        while True:
            x = torch.full(
                (self.batch_size, self._channels, size, size), self._air, dtype=torch.float32
            )
            oom_message = ""
            with torch.inference_mode():
                try:
                    self._device_step(x, grid, _RunState(batch_size=self.batch_size), 0)
                except RuntimeError as exc:
                    if not is_out_of_memory(exc):
                        raise
                    oom_message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not oom_message:
                break
            torch.cuda.empty_cache()
            if self.batch_size == 1:
                raise DeviceOutOfMemoryError(
                    f"out of memory on {self.device} at batch size 1 ({oom_message})"
                )
            self.batch_size //= 2
            logger.warning("warm-up ran out of memory; batch size now %d", self.batch_size)
        torch.cuda.synchronize(self.device)
        logger.info("warm-up took %.2f s", time.perf_counter() - started)


# ---------------------------------------------------------------------- helpers


class _Trunk(nn.Module):
    """The network's per-slice part (:meth:`LungCTNet.trunk`) at the engine's segmentation
    scales, as a module, to compile it."""

    def __init__(self, network: LungCTNet, scales: tuple[float, ...]) -> None:
        super().__init__()
        self.network = network
        self.scales = scales

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network.trunk(x, self.scales)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (b, c, h, w) to ``size``; antialiased when shrinking with bilinear / bicubic.

    Every mode is centre-aligned, as the way back to the slice grid is: ``nearest`` is
    PyTorch's ``nearest-exact`` (its legacy ``nearest`` shifts the image by half an input
    pixel per output pixel: 3.5 source pixels from 512 to 64)."""
    smooth = mode in ("bilinear", "bicubic")
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    if smooth:
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=shrink)
    return F.interpolate(x, size=size, mode="nearest-exact" if mode == "nearest" else mode)


def _checked_volume(
    volume: npt.NDArray[np.generic], spacing_mm: tuple[float, float, float]
) -> npt.NDArray[np.generic]:
    """Check the volume's shape and dtype and the spacing; raise PipelineError if wrong."""
    volume = np.asarray(volume)
    if volume.ndim != 3 or 0 in volume.shape:
        raise PipelineError(f"volume must be a non-empty (z, y, x) array, not shape {volume.shape}")
    if volume.dtype == np.bool_ or not (
        np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)
    ):
        raise PipelineError(f"volume must hold real numbers (HU), not {volume.dtype}")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise PipelineError(f"spacing must be three positive numbers (z, y, x) in mm: {spacing_mm}")
    return volume


class _Loader:
    """Background thread: volume slices to normalised (b, C, h, w) float32 batches (C = 3 with
    2.5-D context, else 1).

    Raises PipelineError (in the caller) for slices holding NaN or Inf. Batches go through a
    bounded queue of ``depth`` items, so at most ``depth`` batches wait in
    (pinned, on CUDA) host memory. Errors in the thread are raised in the caller by
    :meth:`batches`. Leaving the ``with`` block stops the thread.
    """

    _DONE = object()

    def __init__(
        self,
        volume: npt.NDArray[np.generic],
        *,
        batch_size: int,
        scale: float,
        shift: float,
        low: float,
        high: float,
        pin: bool,
        depth: int,
        spacing_z_mm: float = 1.0,
        context_mm: float | None = None,
    ) -> None:
        self._volume = volume
        self._spacing_z = spacing_z_mm
        self._context = context_mm
        self._batch_size = batch_size
        self._scale, self._shift, self._low, self._high = scale, shift, low, high
        self._pin = pin
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="inference-loader", daemon=True)
        self.preprocess_s = 0.0
        self.wait_s = 0.0

    def __enter__(self) -> _Loader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():  # drain, so a blocked put() sees the stop flag
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first slice index, (b, 1, h, w) batch)`` in order."""
        while True:
            started = time.perf_counter()
            item = self._queue.get()
            self.wait_s += time.perf_counter() - started
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, tuple)
            yield item

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False

    def _work(self) -> None:
        try:
            depth = self._volume.shape[0]
            for first in range(0, depth, self._batch_size):
                started = time.perf_counter()
                batch = self._prepare(first, min(first + self._batch_size, depth))
                self.preprocess_s += time.perf_counter() - started
                if not self._put((first, batch)):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            self._put(exc)

    def _prepare(self, first: int, stop: int) -> torch.Tensor:
        if self._context is None:
            part = self._volume[first:stop]
            if part.dtype not in (np.int16, np.int32, np.uint8, np.float32, np.float64):
                part = part.astype(np.float32)
            if not part.flags.c_contiguous or min(part.strides) < 0:  # torch needs positive strides
                part = part.copy(order="C")
            with warnings.catch_warnings():  # a read-only volume: only read, copied just below
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                source = torch.from_numpy(part).unsqueeze(1)
        else:  # (b, 3, h, w): each slice with its neighbouring planes (2.5-D input)
            planes = with_context(
                self._volume, np.arange(first, stop), self._spacing_z, self._context
            )
            source = torch.from_numpy(planes)
        batch = torch.empty(source.shape, dtype=torch.float32, pin_memory=self._pin)
        batch.copy_(source)
        # (integers are always finite: the check, 80% of this step for an int16 volume, is
        # for floating-point ones)
        if source.dtype.is_floating_point and not bool(torch.isfinite(batch).all()):
            raise PipelineError(f"volume contains NaN or Inf (slices {first}-{stop - 1})")
        return batch.clamp_(self._low, self._high).mul_(self._scale).add_(self._shift)
