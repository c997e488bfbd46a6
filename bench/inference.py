"""Inference throughput: slices per second for 512 x 512 CT slices, and the fraction of peak.

Runs :class:`dicom_node.analysis.inference.InferenceEngine` (the product path: loader thread,
windowing, resize, forward, resize back) over a random int16 volume of 512 x 512 slices:

- on the CPU in fp32 (NCHW and channels_last) and in bf16 autocast (few slices: ~0.6 s per
  slice on two cores);
- on CUDA, when present, in fp32, fp16 and bf16 with channels_last, and with ``--compile`` also
  bf16 + channels_last + torch.compile.

The network is the model folder given with ``--model``, or else the product architecture
(ResNet50 U-Net + MLP) with random weights running at ``--size`` (default 512). FLOPs per slice
are counted with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2 FLOPs). The
fraction of peak uses ``--peak-tflops`` or, for known GPUs, the dense tensor-core peak from
the table below (the fp32 row uses the plain fp32 peak). "model" columns count only the time
from the batch's copy to the device until its outputs are ready; "end to end" is the whole run.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/inference.py --cpu-slices 4 --cuda-slices 256
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dicom_node.analysis.inference import InferenceEngine, InferenceResult
from dicom_node.analysis.network import LungCTNet
from dicom_node.analysis.weights import (
    Classes,
    ClassInfo,
    Code,
    InputSpec,
    LoadedModel,
    ModelCard,
    load_model,
)
from dicom_node.config import InferenceSettings, load_config

#: Dense peak TFLOP/s by device-name fragment (fp32 without tensor cores; tf32, bf16, fp16 on
#: them). Vendor specs for the SXM / full-power parts, without sparsity; PCIe variants are lower,
#: so pass --peak-tflops for those. PyTorch runs fp32 convolutions as TF32 on the tensor cores
#: unless ``torch.backends.cudnn.allow_tf32`` is off: the fp32 row is then held against "tf32".
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.0, "fp16": 989.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "bf16": 362.0, "fp16": 362.0},
    "L4": {"fp32": 30.3, "bf16": 121.0, "fp16": 121.0},
    "A10": {"fp32": 31.2, "bf16": 125.0, "fp16": 125.0},
    "4090": {"fp32": 82.6, "bf16": 165.2, "fp16": 165.2},
    "V100": {"fp32": 15.7, "bf16": 0.0, "fp16": 125.0},
    "T4": {"fp32": 8.1, "bf16": 0.0, "fp16": 65.0},
}

SLICE = 512


def _product_model(size: int) -> LoadedModel:
    """The product architecture with random weights, running at ``size`` x ``size``."""
    torch.manual_seed(0)
    network = LungCTNet().eval()
    code = Code(scheme="SCT", value="108369006", meaning="Neoplasm")
    card = ModelCard(
        name="bench-random",
        version="0",
        input=InputSpec(size=size),
        classes=Classes(
            finding=ClassInfo(name="lung tumour", code=code),
            positive=ClassInfo(name="cancerous", code=code),
            negative=ClassInfo(name="non-cancerous", code=code),
        ),
        intended_use="benchmark only",
        training_data="none (random weights)",
    )
    return LoadedModel(
        network=network, card=card, path=None, device=torch.device("cpu"), dtype=torch.float32
    )


def flops_per_slice(model: LoadedModel, scales: tuple[float, ...] = (1.0,)) -> float:
    """FLOPs of the network's per-slice part on one slice at the card's input size and the
    segmentation scales the engine runs (counted on 'meta'; the MLP, once per volume, is
    negligible beside it)."""
    size = model.card.input.size
    with torch.device("meta"):
        network = LungCTNet(model.card.architecture).eval()
        x = torch.zeros(1, 1, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        network.trunk(x, scales)
    return float(counter.get_total_flops())


def _peak(device: torch.device, precision: str, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if precision == "fp32" and torch.backends.cudnn.allow_tf32:
        precision = "tf32"  # no entry: "n/a" rather than a share of the wrong peak
    for fragment, peaks in GPU_PEAK_TFLOPS.items():
        if fragment in name:
            return peaks.get(precision) or None
    return None


def _run(
    model: LoadedModel,
    settings: InferenceSettings,
    volume: np.ndarray,
) -> tuple[InferenceEngine, InferenceResult]:
    fresh = LoadedModel(
        network=copy.deepcopy(model.network),
        card=model.card,
        path=model.path,
        device=model.device,
        dtype=model.dtype,
    )
    engine = InferenceEngine(fresh, settings)
    engine.run(volume[: engine.batch_size], (1.0, 0.7, 0.7))  # warm-up: one batch
    result = engine.run(volume, (1.0, 0.7, 0.7))
    return engine, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: random product net)")
    parser.add_argument("--config", type=Path, help="config.yaml whose inference section to use")
    parser.add_argument("--size", type=int, default=512, help="model input size without --model")
    parser.add_argument("--batch-size", help="override inference.batch_size (a number or auto)")
    parser.add_argument("--cpu-slices", type=int, default=4, help="slices per CPU run (0: skip)")
    parser.add_argument("--cuda-slices", type=int, default=256, help="slices per CUDA run")
    parser.add_argument("--compile", action="store_true", help="also bf16 + torch.compile on CUDA")
    parser.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s (overrides table)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    base = load_config(args.config).inference
    if args.batch_size is not None:
        batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
        base = base.model_copy(update={"batch_size": batch})
    model = load_model(args.model) if args.model else _product_model(args.size)
    scales = base.seg_scales if base.seg_scales is not None else model.card.input.seg_scales
    flops = flops_per_slice(model, scales)
    size = model.card.input.size
    print(
        f"model {model.card.name} ({model.card.architecture.encoder} U-Net + MLP) at "
        f"{size}x{size}, segmentation scales {', '.join(f'{s:g}' for s in scales)}: "
        f"{flops / 1e9:.1f} GFLOP per slice; input slices {SLICE}x{SLICE}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )

    runs: list[tuple[str, dict[str, object], int]] = []
    if args.cpu_slices > 0:
        cpu, n = {"device": "cpu"}, args.cpu_slices
        runs += [
            ("cpu fp32 NCHW", {**cpu, "precision": "fp32", "channels_last": False}, n),
            ("cpu fp32 channels_last", {**cpu, "precision": "fp32", "channels_last": True}, n),
            ("cpu bf16 channels_last", {**cpu, "precision": "bf16", "channels_last": True}, n),
        ]
    if torch.cuda.is_available() and args.cuda_slices > 0:
        print(f"CUDA device: {torch.cuda.get_device_name(0)}")
        cuda = {"device": "cuda"}
        runs += [
            ("cuda fp32 NCHW", {**cuda, "precision": "fp32", "channels_last": False}, 0),
            ("cuda fp16 channels_last", {**cuda, "precision": "fp16", "channels_last": True}, 0),
            ("cuda bf16 channels_last", {**cuda, "precision": "bf16", "channels_last": True}, 0),
        ]
        if args.compile:
            runs.append(
                ("cuda bf16 cl + compile", {**cuda, "precision": "bf16", "compile": True}, 0)
            )

    rng = np.random.default_rng(0)
    header = (
        f"{'run':26} {'batch':>5} {'slices':>6} {'end-to-end/s':>12} {'model/s':>9} "
        f"{'TFLOP/s':>8} {'of peak':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, overrides, slices in runs:
        count = slices or args.cuda_slices
        volume = rng.integers(-1024, 1500, size=(count, SLICE, SLICE), dtype=np.int16)
        settings = InferenceSettings.model_validate({**base.model_dump(), **overrides})
        engine, result = _run(model, settings, volume)
        t = result.timings
        e2e = count / t.total_s
        model_rate = count / t.model_s
        achieved = model_rate * flops / 1e12
        peak = _peak(engine.device, result.precision, args.peak_tflops)
        share = f"{100 * achieved / peak:7.1f}%" if peak else "     n/a"
        print(
            f"{name:26} {result.batch_size:5d} {count:6d} {e2e:12.2f} {model_rate:9.2f} "
            f"{achieved:8.3f} {share:>8}"
        )
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.peak_tflops is None and args.cpu_slices > 0:
        print("(CPU 'of peak' needs --peak-tflops: no CPU peak table is kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
