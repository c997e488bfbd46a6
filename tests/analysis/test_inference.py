"""The inference engine on the CPU, end to end with a small randomly initialised model.

What a GPU adds (autocast fp16/bf16 on CUDA, cuDNN in channels_last, pinned memory,
torch.compile, batch size from free memory, a real out-of-memory error on the device) is
exercised by the ``gpu`` tests at the end, skipped where no CUDA device is present.
Out-of-memory handling is also tested on the CPU with a test double that simulates a GPU's
out-of-memory error.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
import torch.nn.functional as F

from dicom_node.analysis.inference import (
    CPU_AUTO_BATCH_SIZE,
    InferenceEngine,
    InferenceResult,
    resolve_device,
    resolve_precision,
)
from dicom_node.analysis.network import Architecture, LungCTNet
from dicom_node.analysis.weights import LoadedModel, ModelCard, load_model, save_model
from dicom_node.config import InferenceSettings, load_config
from dicom_node.errors import ConfigError, DeviceOutOfMemoryError, PipelineError
from tests.analysis.lungct_tiny import make_card, make_network

SPACING = (2.5, 0.7, 0.7)

#: bf16 autocast vs fp32 on the CPU: mean |p_bf16 - p_fp32| over all voxels, and max over images.
BF16_MEAN_ABS_TOLERANCE = 0.02
BF16_IMAGE_MAX_ABS_TOLERANCE = 0.02


def _volume(
    depth: int = 5, height: int = 80, width: int = 96, seed: int = 0
) -> npt.NDArray[np.int16]:
    """A (z, y, x) int16 HU volume: air outside a soft-tissue disc with a denser blob inside."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:depth, :height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (0.4 * min(height, width)) ** 2
    blob = (yy - height / 2) ** 2 + (xx - width / 3) ** 2 + ((zz - depth / 2) * 3) ** 2 < 64
    hu = (
        np.where(disc, 40.0, -1000.0)
        + np.where(blob, 60.0, 0.0)
        + rng.normal(0, 20, (depth, height, width))
    )
    return hu.astype(np.int16)


def _engine(model: LoadedModel | Path, **settings: object) -> InferenceEngine:
    return InferenceEngine(
        model,
        InferenceSettings.model_validate(
            {"device": "cpu", "probability_dtype": "float32", **settings}
        ),
    )


@pytest.fixture(scope="module")
def reference(saved_model_dir: Path) -> InferenceResult:
    """fp32 CPU result on the test volume, batch size 2."""
    return _engine(saved_model_dir, batch_size=2, precision="fp32").run(_volume(), SPACING)


class SimulatedOOMNet(LungCTNet):
    """Test double simulating a GPU that runs out of memory (no GPU is present here).

    A real :class:`LungCTNet` whose forward raises the out-of-memory error CUDA raises whenever
    the batch holds more than ``limit`` slices, and otherwise computes normally.
    """

    def __init__(
        self, architecture: Architecture, *, limit: int, error: Callable[[str], RuntimeError]
    ) -> None:
        super().__init__(architecture)
        self.limit = limit
        self.error = error
        self.batch_sizes: list[int] = []

    def trunk(
        self, x: torch.Tensor, scales: Sequence[float] = (1.0,)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raise the simulated out-of-memory error above ``limit`` slices, else run the net
        (the engine runs the per-slice part, :meth:`LungCTNet.trunk`, batch by batch)."""
        self.batch_sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return super().trunk(x, scales)


def _oom_model(
    card: ModelCard, *, limit: int, error: Callable[[str], RuntimeError]
) -> tuple[LoadedModel, SimulatedOOMNet]:
    net = SimulatedOOMNet(card.architecture, limit=limit, error=error)
    net.load_state_dict(make_network().state_dict())
    net.eval()
    model = LoadedModel(
        network=net, card=card, path=None, device=torch.device("cpu"), dtype=torch.float32
    )
    return model, net


def test_end_to_end_on_cpu(reference: InferenceResult) -> None:
    """A (z, y, x) int16 volume gives probabilities on its own grid, per slice and per study."""
    result = reference
    assert result.probability.shape == (5, 80, 96)
    assert result.probability.dtype == np.float32
    assert float(result.probability.min()) >= 0.0
    assert float(result.probability.max()) <= 1.0
    assert result.image_probabilities.shape == (5,)
    assert result.image_probabilities.dtype == np.float32
    assert result.top_k == 3
    top3 = np.sort(result.image_probabilities)[-3:]
    assert result.study_probability == pytest.approx(float(top3.mean()), abs=1e-6)
    assert result.study_positive == (result.study_probability >= 0.5)
    assert (result.device, result.precision, result.batch_size) == ("cpu", "fp32", 2)
    assert (result.model_name, result.model_version) == ("lung-ct-test", "0.0.1")
    t = result.timings
    assert min(t.setup_s, t.preprocess_s, t.input_wait_s, t.model_s, t.postprocess_s) >= 0.0
    assert t.total_s >= t.model_s


def test_results_do_not_depend_on_batch_size_or_input_dtype(
    saved_model_dir: Path, reference: InferenceResult
) -> None:
    """Batch size 5 (one batch) on float32 input equals batch size 2 on int16 input."""
    result = _engine(saved_model_dir, batch_size=5).run(_volume().astype(np.float32), SPACING)
    np.testing.assert_allclose(result.probability, reference.probability, atol=1e-5)
    np.testing.assert_allclose(result.image_probabilities, reference.image_probabilities, atol=1e-5)


def test_channels_last_on_the_cpu_matches_nchw(
    saved_model_dir: Path, reference: InferenceResult
) -> None:
    """The default NHWC layout (on the CPU too) gives what NCHW gives, within fp32 rounding."""
    nhwc = _engine(saved_model_dir, batch_size=2, precision="fp32")
    assert nhwc._channels_last
    # a 3 x 3 kernel over several channels (for one input channel both layouts are the same)
    weight = next(
        p for p in nhwc.model.network.parameters() if p.dim() == 4 and min(p.shape[1:]) > 1
    )
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    nchw = _engine(saved_model_dir, batch_size=2, precision="fp32", channels_last=False)
    result = nchw.run(_volume(), SPACING)
    np.testing.assert_allclose(result.probability, reference.probability, atol=1e-4)
    np.testing.assert_allclose(result.image_probabilities, reference.image_probabilities, atol=1e-4)


def test_slices_are_processed_in_order(saved_model_dir: Path, reference: InferenceResult) -> None:
    """Each slice's output belongs to that slice: reversing the volume reverses the outputs."""
    result = _engine(saved_model_dir, batch_size=2).run(_volume()[::-1], SPACING)
    np.testing.assert_allclose(result.probability, reference.probability[::-1], atol=1e-5)
    np.testing.assert_allclose(
        result.image_probabilities, reference.image_probabilities[::-1], atol=1e-5
    )


def test_cpu_bf16_autocast_matches_fp32(saved_model_dir: Path, reference: InferenceResult) -> None:
    """CPU bf16 autocast is within 0.02 of fp32 (mean abs over voxels, max over images)."""
    result = _engine(saved_model_dir, batch_size=2, precision="bf16").run(_volume(), SPACING)
    assert result.precision == "bf16"
    mean_abs = float(np.abs(result.probability - reference.probability).mean())
    image_abs = float(np.abs(result.image_probabilities - reference.image_probabilities).max())
    assert mean_abs < BF16_MEAN_ABS_TOLERANCE
    assert image_abs < BF16_IMAGE_MAX_ABS_TOLERANCE
    assert mean_abs > 0.0  # it did run in bf16


def test_bf16_weights_run_in_bf16(saved_model_dir: Path, reference: InferenceResult) -> None:
    """Weights loaded as bfloat16 run the whole network in bf16 (no autocast), close to fp32."""
    loaded = load_model(saved_model_dir, dtype=torch.bfloat16)
    result = _engine(loaded, batch_size=2).run(_volume(), SPACING)
    assert result.precision == "bf16"
    assert (
        float(np.abs(result.probability - reference.probability).mean()) < BF16_MEAN_ABS_TOLERANCE
    )


def test_uint8_probabilities_match_float_within_quantisation(
    saved_model_dir: Path, reference: InferenceResult
) -> None:
    """``probability_dtype: uint8`` stores round(p * 255): within half a step of the float map."""
    result = _engine(saved_model_dir, batch_size=2, probability_dtype="uint8").run(
        _volume(), SPACING
    )
    assert result.probability.dtype == np.uint8
    as_float = result.probability_float32()
    assert as_float.dtype == np.float32
    assert float(np.abs(as_float - reference.probability).max()) <= 0.5 / 255 + 1e-6


def test_auto_batch_size_on_cpu(saved_model_dir: Path) -> None:
    """``batch_size: auto`` on the CPU is the fixed small number, capped by max_batch_size."""
    assert _engine(saved_model_dir).batch_size == CPU_AUTO_BATCH_SIZE == 4
    assert _engine(saved_model_dir, max_batch_size=2).batch_size == 2
    result = _engine(saved_model_dir).run(_volume(depth=6), SPACING)
    assert result.batch_size == 4


def test_spacing_mode_runs_and_maps_back_to_the_slice_grid(saved_model_dir: Path) -> None:
    """``input.mode: spacing`` resamples to the card's pixel spacing, pads/crops, and maps back."""
    card = make_card(input={"size": 64, "mode": "spacing", "pixel_spacing_mm": 1.0})
    base = load_model(saved_model_dir)
    loaded = LoadedModel(
        network=base.network, card=card, path=None, device=base.device, dtype=base.dtype
    )
    engine = _engine(loaded, batch_size=2)
    # 80 x 96 at 0.7 mm is 56 x 67 at 1 mm: padded to 64 rows, cropped to 64 columns.
    grid = engine._grid(80, 96, SPACING)
    assert (grid.resized_h, grid.resized_w) == (56, 67)
    assert grid.pad == (-2, -1, 4, 4)
    yy, xx = torch.meshgrid(torch.arange(80.0), torch.arange(96.0), indexing="ij")
    ramp = (0.1 * yy + 0.05 * xx)[None, None]
    model_input = engine._to_model_grid(ramp, grid)
    assert model_input.shape == (1, 1, 64, 64)
    back = engine._to_slice_grid(model_input, grid)
    assert back.shape == (1, 1, 80, 96)
    torch.testing.assert_close(back[..., 6:-6, 6:-6], ramp[..., 6:-6, 6:-6], atol=0.05, rtol=0)
    assert float(back[..., 20:60, 0].max()) < -10  # cropped columns: outside the model's view
    result = engine.run(_volume(), SPACING)
    assert result.probability.shape == (5, 80, 96)
    assert float(result.probability[:, 20:60, 0].max()) < 1e-3


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_out_of_memory_halves_the_batch(
    reference: InferenceResult, error: type[RuntimeError]
) -> None:
    """An out-of-memory batch is retried at half the size until it fits; results are unchanged."""
    model, net = _oom_model(make_card(), limit=1, error=error)
    result = _engine(model, batch_size=4).run(_volume(), SPACING)
    assert result.batch_size == 1
    assert net.batch_sizes[:3] == [4, 2, 1]
    assert max(net.batch_sizes[3:]) == 1
    np.testing.assert_allclose(result.probability, reference.probability, atol=1e-5)
    np.testing.assert_allclose(result.image_probabilities, reference.image_probabilities, atol=1e-5)


def test_a_reduced_batch_size_is_kept_for_the_next_runs_then_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a run that ran out of memory, the next runs start at the size that fitted (no
    failed batch each study); after ``KEEP_REDUCED_RUNS`` of them the full size is tried again,
    and kept once it fits."""
    monkeypatch.setattr("dicom_node.analysis.inference.KEEP_REDUCED_RUNS", 2)
    model, net = _oom_model(make_card(), limit=1, error=torch.OutOfMemoryError)
    engine = _engine(model, batch_size=4)
    assert engine.run(_volume(), SPACING).batch_size == 1
    for _ in range(2):  # kept: no batch above 1 is tried
        net.batch_sizes.clear()
        assert engine.run(_volume(), SPACING).batch_size == 1
        assert max(net.batch_sizes) == 1
    net.limit = 4  # the memory is free again
    net.batch_sizes.clear()
    assert engine.run(_volume(), SPACING).batch_size == 4
    assert net.batch_sizes[0] == 4
    net.batch_sizes.clear()
    assert engine.run(_volume(), SPACING).batch_size == 4


def test_out_of_memory_at_batch_size_one_raises() -> None:
    """When even one slice does not fit, DeviceOutOfMemoryError (a PipelineError) is raised."""
    model, net = _oom_model(make_card(), limit=0, error=torch.OutOfMemoryError)
    with pytest.raises(DeviceOutOfMemoryError, match="at batch size 1"):
        _engine(model, batch_size=2).run(_volume(), SPACING)
    assert net.batch_sizes == [2, 1]


def test_other_runtime_errors_are_not_retried() -> None:
    """A RuntimeError that is not out-of-memory propagates at once."""
    model, net = _oom_model(
        make_card(), limit=0, error=lambda _: RuntimeError("CUDNN_STATUS_INTERNAL_ERROR")
    )
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_INTERNAL_ERROR"):
        _engine(model, batch_size=2).run(_volume(), SPACING)
    assert net.batch_sizes == [2]


@pytest.mark.parametrize("part", ["segmentation_head", "classifier"])
def test_nan_weights_raise_pipeline_error(saved_model_dir: Path, part: str) -> None:
    """A model whose weights are NaN makes NaN outputs: PipelineError names it."""
    loaded = load_model(saved_model_dir)
    module = getattr(loaded.network, part)
    assert isinstance(module, torch.nn.Module)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(PipelineError, match="model output contains NaN/Inf"):
        _engine(loaded, batch_size=2).run(_volume(), SPACING)


@pytest.mark.parametrize(
    ("volume", "spacing", "fragment"),
    [
        (np.zeros((64, 64), np.int16), SPACING, "non-empty"),
        (np.zeros((0, 64, 64), np.int16), SPACING, "non-empty"),
        (np.zeros((2, 64, 64), np.complex64), SPACING, "real numbers"),
        (np.zeros((2, 64, 64), np.float32), (1.0, 0.0, 0.7), "three positive numbers"),
        (np.zeros((2, 64, 64), np.float32), (1.0, 0.7), "three positive numbers"),
    ],
)
def test_bad_input_raises_pipeline_error(
    saved_model_dir: Path,
    volume: npt.NDArray[np.generic],
    spacing: tuple[float, float, float],
    fragment: str,
) -> None:
    """Wrong shape, dtype or spacing is refused before anything runs."""
    with pytest.raises(PipelineError, match=fragment):
        _engine(saved_model_dir, batch_size=2).run(volume, spacing)


def test_nan_in_volume_raises_and_stops_the_loader(saved_model_dir: Path) -> None:
    """NaN in a late slice raises PipelineError from the loader thread; the thread ends."""
    volume = _volume(depth=6).astype(np.float32)
    volume[5, 3, 3] = np.nan
    with pytest.raises(PipelineError, match=r"NaN or Inf \(slices 4-5\)"):
        _engine(saved_model_dir, batch_size=2).run(volume, SPACING)
    assert not [t for t in threading.enumerate() if t.name == "inference-loader"]


def test_engine_builds_from_config(saved_model_dir: Path) -> None:
    """``from_config`` loads ``model.path`` in ``model.dtype`` and applies ``inference``."""
    config = load_config(
        overrides={
            "model": {"path": str(saved_model_dir), "dtype": "bfloat16"},
            "inference": {"device": "cpu", "batch_size": 3},
        }
    )
    engine = InferenceEngine.from_config(config)
    assert (engine.batch_size, engine.precision, engine.device) == (3, "bf16", torch.device("cpu"))


def test_device_and_precision_resolution() -> None:
    """``auto`` picks CUDA only when present; CPU fp16 and half-weight conflicts are refused."""
    cpu = torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == cpu
    assert resolve_precision("auto", cpu, torch.float32) == "fp32"
    assert resolve_precision("bf16", cpu, torch.float32) == "bf16"
    assert resolve_precision("auto", cpu, torch.bfloat16) == "bf16"
    with pytest.raises(ConfigError, match="CUDA only"):
        resolve_precision("fp16", cpu, torch.float32)
    with pytest.raises(ConfigError, match=r"contradicts model\.dtype"):
        resolve_precision("fp32", cpu, torch.bfloat16)


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), "fp16"), ((8, 0), "bf16")])
def test_auto_precision_asks_the_device_for_native_bf16(
    capability: tuple[int, int], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU before Ampere (a T4 is 7.5) can hold bf16 tensors, and torch's
    ``is_bf16_supported()`` says yes for it, but has no bf16 convolutions: ``auto`` is fp16
    there, bf16 weights and ``precision: bf16`` are refused. The device's own capability is
    asked (a stand-in here: this test machine may have no GPU)."""
    asked: list[torch.device] = []

    def capability_of(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = torch.device("cuda", 1)
    assert resolve_precision("auto", gpu, torch.float32) == expected
    assert asked == [gpu]
    if expected == "fp16":
        with pytest.raises(ConfigError, match="'bf16' is not supported"):
            resolve_precision("bf16", gpu, torch.float32)
        with pytest.raises(ConfigError, match="bfloat16 is not supported"):
            resolve_precision("auto", gpu, torch.bfloat16)
    else:
        assert resolve_precision("auto", gpu, torch.bfloat16) == "bf16"


def test_bf16_weights_run_at_a_segmentation_scale_below_one() -> None:
    """bf16 weights on the CPU at a scale below 1 (an antialiased zoom, for which PyTorch's CPU
    has no bf16 kernel) give maps close to those of the same weights in float32."""
    card = make_card(input={"size": 128, "mode": "fit", "seg_scales": [0.75, 1.0]})
    network = make_network()
    maps = []
    for dtype in (torch.float32, torch.bfloat16):
        model = LoadedModel(
            network=copy.deepcopy(network).to(dtype),
            card=card,
            path=None,
            device=torch.device("cpu"),
            dtype=dtype,
        )
        settings = InferenceSettings(device="cpu", batch_size=2, probability_dtype="float32")
        result = InferenceEngine(model, settings).run(
            _volume(depth=3, height=128, width=128), SPACING
        )
        assert result.precision == ("bf16" if dtype == torch.bfloat16 else "fp32")
        maps.append(result.probability)
    assert float(np.abs(maps[0] - maps[1]).mean()) < BF16_MEAN_ABS_TOLERANCE


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_device_without_cuda_is_a_config_error() -> None:
    """Asking for ``cuda:1`` on a machine without CUDA fails with the key and the reason."""
    with pytest.raises(ConfigError, match=r"inference\.device: 'cuda:1' is not available \(0 CUDA"):
        resolve_device("cuda:1")


# ---------------------------------------------------------------------- on a GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    ("precision", "compile_"), [("fp32", False), ("bf16", False), ("fp16", False), ("bf16", True)]
)
def test_cuda_matches_cpu_fp32(
    saved_model_dir: Path, reference: InferenceResult, precision: str, compile_: bool
) -> None:
    """CUDA (pinned, channels_last, autocast, optionally compiled) matches CPU fp32 within 0.02."""
    engine = InferenceEngine(
        saved_model_dir,
        InferenceSettings.model_validate(
            {
                "device": "cuda",
                "precision": precision,
                "batch_size": 2,
                "compile": compile_,
                "probability_dtype": "float32",
            }
        ),
    )
    result = engine.run(_volume(), SPACING)
    assert result.device == "cuda:0"
    assert result.precision == precision
    assert (
        float(np.abs(result.probability - reference.probability).mean()) < BF16_MEAN_ABS_TOLERANCE
    )
    assert (
        float(np.abs(result.image_probabilities - reference.image_probabilities).max())
        < BF16_IMAGE_MAX_ABS_TOLERANCE
    )


@pytest.mark.gpu
@gpu
def test_cuda_auto_batch_size_fits_free_memory(saved_model_dir: Path) -> None:
    """Batch size ``auto`` on CUDA measures memory per slice and picks 1..max_batch_size."""
    engine = InferenceEngine(saved_model_dir, InferenceSettings(device="cuda", max_batch_size=32))
    assert 1 <= engine.batch_size <= 32
    result = engine.run(_volume(depth=40), SPACING)
    assert result.probability.shape == (40, 80, 96)


@pytest.mark.gpu
@gpu
def test_cuda_batches_come_from_pinned_memory(
    saved_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA every batch reaches the device step in pinned host memory (non-blocking copies)."""
    engine = InferenceEngine(saved_model_dir, InferenceSettings(device="cuda", batch_size=2))
    pinned: list[bool] = []
    step = engine._device_step

    def spy(chunk: torch.Tensor, *args: object, **kwargs: object) -> object:
        pinned.append(chunk.is_pinned())
        return step(chunk, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_device_step", spy)
    engine.run(_volume(depth=5), SPACING)
    assert pinned == [True, True, True]


@pytest.mark.gpu
@gpu
def test_cuda_out_of_memory_halves_the_batch_on_the_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real CUDA out-of-memory error halves the batch until it fits, with the same result.

    The tiny network at 1024 x 1024 needs hundreds of MiB per slice. The caching allocator is
    capped (``set_per_process_memory_fraction``) at what is held plus 45 % of what a batch of 16
    took uncapped: 16 and 8 slices cannot fit, 4 can unless the fixed part (weights aside) is over
    a quarter of the batch's need.
    """
    path = tmp_path / "big-input"
    card = make_card(input={"size": 1024, "mode": "fit", "interpolation": "bilinear"})
    save_model(make_network(), card, path, dtype=torch.float32)
    settings = {"device": "cuda", "precision": "fp32", "batch_size": 16}
    engine = InferenceEngine(
        path, InferenceSettings.model_validate({**settings, "probability_dtype": "float32"})
    )
    device = engine.device
    volume = _volume(depth=16)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    uncapped = engine.run(volume, SPACING)
    need = torch.cuda.max_memory_allocated(device) - held
    assert uncapped.batch_size == 16
    assert need > 16 * 2**20 * 16  # over 16 MiB a slice: the cap below is not lost in rounding
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_reserved(device) + 0.45 * need
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        with caplog.at_level("WARNING", logger="dicom_node.analysis.inference"):
            capped = engine.run(volume, SPACING)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    assert capped.batch_size in (1, 2, 4)
    assert "out of memory on cuda:0 at batch size 16; retrying at 8" in caplog.text
    assert "at batch size 8; retrying at 4" in caplog.text
    # TF32 convolutions and per-batch-size algorithms: close, not bit-identical.
    assert float(np.abs(capped.probability - uncapped.probability).mean()) < 1e-3
    assert float(np.abs(capped.image_probabilities - uncapped.image_probabilities).max()) < 1e-2


def test_slice_context_reads_neighbours_across_batches_in_slice_order() -> None:
    """With ``mlp_context_mm`` the MLP reads each slice's pooled vector and the mean of those
    ``round(mm / spacing)`` slices before and after it, across batch boundaries: the engine
    pools batch by batch and scores the whole volume once, after the last batch."""
    plain_card = make_card()
    arch = plain_card.architecture.model_copy(update={"mlp_context_mm": 5.0})
    context_card = make_card(architecture=arch)
    plain_net = make_network()
    context_net = LungCTNet(arch).eval()
    trunk = {k: v for k, v in plain_net.state_dict().items() if not k.startswith("classifier.")}
    context_net.load_state_dict(trunk, strict=False)
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "context": []}
    for name, net in (("plain", plain_net), ("context", context_net)):
        net.classifier.fc1.register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].clone())
        )
    depth = 7
    volume = _volume(depth=depth)
    for name, net, card in (
        ("plain", plain_net, plain_card),
        ("context", context_net, context_card),
    ):
        model = LoadedModel(
            network=net, card=card, path=None, device=torch.device("cpu"), dtype=torch.float32
        )
        result = _engine(model, batch_size=2, precision="fp32").run(volume, SPACING)
        assert len(seen[name]) == 1  # one MLP pass per volume
        assert seen[name][0].shape[0] == depth
    pooled = seen["plain"][0]
    read = seen["context"][0]
    width = pooled.shape[1]
    assert read.shape[1] == 2 * width
    torch.testing.assert_close(read[:, :width], pooled)
    offset = 2  # 5 mm at 2.5 mm slices
    index = torch.arange(depth)
    around = 0.5 * (
        pooled[(index - offset).clamp(0, depth - 1)] + pooled[(index + offset).clamp(0, depth - 1)]
    )
    torch.testing.assert_close(read[:, width:], around)
    with torch.inference_mode():
        expected = torch.sigmoid(context_net.classifier.score(read)).numpy()
    np.testing.assert_allclose(result.image_probabilities, expected, atol=1e-6)


def test_segmentation_scales_of_the_card_are_the_mean_of_the_logits_at_each_scale() -> None:
    """A card with ``input.seg_scales`` [1, 1.25]: the engine's tumour probability is the
    sigmoid of the mean of the network's logits on the model input and on it magnified by 1.25
    (brought back to the input grid), and the image probabilities are those of the scale-1
    pass alone (the MLP reads what it was trained on). ``inference.seg_scales: [1.0]`` runs
    such a card's network once per slice."""
    net = make_network()
    volume = _volume(depth=3, height=128, width=128)
    results = {}
    for scales, setting in (((1.0,), None), ((1.0, 1.25), None), ((1.0, 1.25), (1.0,))):
        card = make_card(input={"size": 128, "mode": "fit", "seg_scales": scales})
        model = LoadedModel(
            network=net, card=card, path=None, device=torch.device("cpu"), dtype=torch.float32
        )
        engine = _engine(model, batch_size=3, precision="fp32", seg_scales=setting)
        results[scales, setting] = engine.run(volume, SPACING)
    one, two = results[(1.0,), None], results[(1.0, 1.25), None]
    np.testing.assert_array_equal(results[(1.0, 1.25), (1.0,)].probability, one.probability)
    np.testing.assert_allclose(two.image_probabilities, one.image_probabilities, atol=1e-6)
    assert np.abs(two.probability - one.probability).max() > 1e-3  # the second scale counts
    scale, shift = make_card().normalisation.scale_shift()
    x = torch.from_numpy(np.clip(volume.astype(np.float32), -1000.0, 400.0) * scale + shift)
    x = x[:, None]  # 128 x 128 slices on a 128 x 128 input: no resize
    with torch.inference_mode():
        at_one = net.segmentation_head(net.decoder(net.encoder(x)))
        magnified = F.interpolate(x, size=(160, 160), mode="bilinear")
        at_scale = net.segmentation_head(net.decoder(net.encoder(magnified)))
        back = F.interpolate(at_scale, size=(128, 128), mode="bilinear", antialias=True)
        expected = torch.sigmoid((at_one + back) / 2)[:, 0].numpy()
    np.testing.assert_allclose(two.probability, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "area", "bicubic"])
def test_every_resize_mode_keeps_the_image_centred(mode: str) -> None:
    """512 -> 64 -> 512 (a card's input size and back, as the engine goes): a centred square
    stays centred in every mode the card may name; PyTorch's legacy ``nearest`` moved it by
    3.5 source pixels."""
    from dicom_node.analysis.inference import _resize

    x = torch.zeros(1, 1, 512, 512)
    x[..., 195:317, 195:317] = 1.0  # edges between the 8-pixel blocks of the 64 grid
    back = F.interpolate(
        _resize(x, (64, 64), mode), size=(512, 512), mode="bilinear", align_corners=False
    )
    weights = back[0, 0].clamp(min=0)
    rows = (weights.sum(dim=1) * torch.arange(512)).sum() / weights.sum()
    cols = (weights.sum(dim=0) * torch.arange(512)).sum() / weights.sum()
    assert abs(float(rows) - 255.5) < 0.25 and abs(float(cols) - 255.5) < 0.25
