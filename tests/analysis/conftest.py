"""Fixtures for the analysis tests: a small randomly initialised model folder on disk.

The model is the one in :mod:`tests.analysis.lungct_tiny`: a ResNet18 U-Net + MLP at
64 x 64 with random weights.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dicom_node.analysis.weights import save_model
from tests.analysis.lungct_tiny import make_card, make_network


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Two cores are shared by several test runs here: one torch thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder (card + fp32 weights) of the tiny network, shared and never modified."""
    path = tmp_path_factory.mktemp("models") / "lung-ct-test"
    save_model(make_network(), make_card(), path, dtype=torch.float32)
    return path


@pytest.fixture
def model_dir(saved_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model folder in ``tmp_path``, free to damage."""
    path = tmp_path / "lung-ct-test"
    shutil.copytree(saved_model_dir, path)
    return path
