"""A small randomly initialised model for the analysis tests (the card says so).

The product network is a ResNet50 U-Net; these tests use a ResNet18 encoder with narrow decoder
and MLP and 64 x 64 inputs, so that a forward pass takes milliseconds on the CPU. The weights are
random: the tests check the machinery (shapes, numerics, loading, errors), never what a trained
model would find.
"""

from __future__ import annotations

import torch

from dicom_node.analysis.network import Architecture, LungCTNet
from dicom_node.analysis.weights import Classes, ClassInfo, Code, ModelCard

TINY_ARCHITECTURE = Architecture(
    encoder="resnet18",
    decoder_channels=(64, 32, 16, 16, 8),
    mlp_hidden=32,
    dropout=0.1,
)


def make_card(**overrides: object) -> ModelCard:
    """A valid card for the tiny test network; keyword arguments replace top-level keys."""
    values: dict[str, object] = {
        "name": "lung-ct-test",
        "version": "0.0.1",
        "description": "Random weights, ResNet18 encoder: for tests only.",
        "architecture": TINY_ARCHITECTURE,
        "input": {"size": 64, "mode": "fit", "interpolation": "bilinear"},
        "normalisation": {"window_low_hu": -1000.0, "window_high_hu": 400.0, "method": "minmax"},
        "thresholds": {"segmentation": 0.5, "image": 0.5, "study": 0.5},
        "top_k": 3,
        "classes": Classes(
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
        "intended_use": "Tests of the dicom-node machinery; not for clinical use.",
        "training_data": "None: randomly initialised.",
        "metrics": {},
    }
    values.update(overrides)
    return ModelCard.model_validate(values)


def make_network(seed: int = 0) -> LungCTNet:
    """The tiny network with reproducible random weights, in eval mode."""
    torch.manual_seed(seed)
    return LungCTNet(TINY_ARCHITECTURE).eval()
