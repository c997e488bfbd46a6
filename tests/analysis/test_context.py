"""2.5-D input: the neighbouring planes, the card's rule, and the engine's use of both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dicom_node.analysis.context import input_channels, with_context
from dicom_node.analysis.inference import InferenceEngine
from dicom_node.analysis.network import LungCTNet
from dicom_node.analysis.weights import LoadedModel
from dicom_node.config import InferenceSettings
from tests.analysis.lungct_tiny import TINY_ARCHITECTURE, make_card


def _ramp(depth: int = 5) -> np.ndarray:
    """Slice k holds the value 100 * k everywhere."""
    return (np.arange(depth, dtype=np.int16)[:, None, None] * 100) * np.ones((1, 4, 4), np.int16)


def test_without_context_the_slice_alone() -> None:
    volume = _ramp()
    planes = with_context(volume, [1, 3], 2.0, None)
    assert planes.shape == (2, 1, 4, 4)
    assert planes.dtype == np.float32
    assert planes[:, 0, 0, 0].tolist() == [100.0, 300.0]
    assert input_channels(None) == 1
    assert input_channels(3.0) == 3


def test_neighbouring_planes_are_interpolated_in_millimetres_and_clamped() -> None:
    """2 mm slices, 3 mm of context: the planes lie 1.5 slices away (halfway between two);
    at the ends they are the first and last slices."""
    volume = _ramp()
    planes = with_context(volume, [0, 2, 4], 2.0, 3.0)
    assert planes.shape == (3, 3, 4, 4)
    assert planes[:, :, 0, 0].tolist() == [
        [0.0, 0.0, 150.0],  # before slice 0: clamped to slice 0
        [50.0, 200.0, 350.0],
        [250.0, 400.0, 400.0],  # after slice 4: clamped to slice 4
    ]
    # 1 mm slices: the same 3 mm is three slices away
    thin = with_context(_ramp(9), [4], 1.0, 3.0)
    assert thin[0, :, 0, 0].tolist() == [100.0, 400.0, 700.0]


def test_the_card_ties_input_channels_to_context() -> None:
    with pytest.raises(ValidationError, match="in_channels"):
        make_card(input={"size": 64, "mode": "fit", "context_mm": 2.0})
    arch = TINY_ARCHITECTURE.model_copy(update={"in_channels": 3})
    with pytest.raises(ValidationError, match="in_channels"):
        make_card(architecture=arch)
    card = make_card(architecture=arch, input={"size": 64, "mode": "fit", "context_mm": 2.0})
    assert card.input.context_mm == 2.0


def test_the_engine_feeds_the_network_the_planes_around_each_slice() -> None:
    """With a 3-channel model the engine's output is the network's on with_context planes,
    normalised as the card says; changing only a neighbour changes a slice's result."""
    torch.manual_seed(0)
    arch = TINY_ARCHITECTURE.model_copy(update={"in_channels": 3})
    network = LungCTNet(arch).eval()
    card = make_card(architecture=arch, input={"size": 64, "mode": "fit", "context_mm": 3.0})
    model = LoadedModel(
        network=network, card=card, path=None, device=torch.device("cpu"), dtype=torch.float32
    )
    engine = InferenceEngine(
        model,
        InferenceSettings.model_validate(
            {"device": "cpu", "precision": "fp32", "probability_dtype": "float32", "batch_size": 2}
        ),
    )
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 400, (5, 64, 64)).astype(np.int16)
    spacing = (2.0, 0.7, 0.7)
    result = engine.run(volume, spacing)

    planes = with_context(volume, np.arange(5), 2.0, 3.0)
    x = torch.from_numpy((np.clip(planes, -1000.0, 400.0) + 1000.0) / 1400.0)
    with torch.inference_mode():
        seg, cls = network(x)
    np.testing.assert_allclose(result.probability, torch.sigmoid(seg)[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(result.image_probabilities, torch.sigmoid(cls).numpy(), atol=1e-5)

    changed = volume.copy()
    changed[0] = 400  # slice 0 is only a neighbour of slices 1 and 2 (1.5 slices away)
    again = engine.run(changed, spacing)
    assert not np.allclose(again.probability[1], result.probability[1], atol=1e-4)
    np.testing.assert_allclose(again.probability[3:], result.probability[3:], atol=1e-6)
