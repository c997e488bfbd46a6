"""The model that ships in models/: it loads by default and runs on a generated chest CT."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.analysis.weights import load_model
from dicom_node.config import Config, resolve_model_path
from dicom_node.training.phantom import generate_phantom, write_phantom_dicom
from tests.peers import node_cli


def test_default_config_finds_and_loads_the_shipped_model() -> None:
    """The default model.path resolves to the shipped folder, whose card and checksum agree."""
    path = resolve_model_path(Config().model.path or Path())
    assert path.is_dir()
    loaded = load_model(path)
    assert loaded.card.architecture.encoder == "resnet50"
    assert "not for clinical use" in loaded.card.intended_use.lower()


def test_analyze_with_the_shipped_model(tmp_path: Path) -> None:
    """`dicom-node analyze` on defaults (the shipped model) reads a generated chest CT with a
    tumour and writes findings, an SR and (when it finds lesions) a SEG."""
    phantom = generate_phantom(
        seed=7, shape_zyx=(24, 160, 160), spacing_mm=(2.0, 2.2, 2.2), tumour_probability=1.0
    )
    files = write_phantom_dicom(phantom, tmp_path / "study")
    out = tmp_path / "out"
    done = node_cli("analyze", str(files[0].parent), "--out", str(out), "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    [series] = json.loads(done.stdout)["series"]
    assert series["slices"] == 24
    assert len(series["outputs"]) == (2 if series["lesions"] else 1)
    assert (out / "findings.json").exists()
