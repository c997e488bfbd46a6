"""The lung check: chest CT passes, a head or an abdomen is skipped before the model runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_node.study.coverage import lung_coverage
from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series
from dicom_node.training.phantom import generate_phantom
from tests.peers import node_cli


def _head(slices: int = 24, size: int = 96) -> np.ndarray:
    _, y, x = np.mgrid[0:slices, 0:size, 0:size]
    r = np.sqrt(((y - size / 2) / (0.4 * size)) ** 2 + ((x - size / 2) / (0.33 * size)) ** 2)
    head = np.full((slices, size, size), -1000, np.int16)
    head[r < 1.0] = 40
    head[(r > 0.9) & (r < 1.0)] = 900  # skull
    head[(np.abs(y - size / 2) < 3) & (np.abs(x - size / 2) < 3)] = -800  # a sinus
    return head


def test_chest_phantoms_have_lung_and_a_head_has_none() -> None:
    """Phantom chests hold well over 5% lung-density tissue; a head model well under."""
    for seed in (1, 2, 3):
        phantom = generate_phantom(
            seed=seed, shape_zyx=(24, 96, 96), spacing_mm=(5.0, 3.6, 3.6), tumour_probability=0.5
        )
        assert lung_coverage(phantom.hu).lung_fraction > 0.1
    assert lung_coverage(_head()).lung_fraction < 0.02
    assert lung_coverage(np.full((4, 8, 8), -1000, np.int16)).body_voxels == 0


def test_analyze_skips_a_head_ct(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A head CT given to analyze is skipped (exit 3) with 'no lung in the field of view'."""
    files = write_ct_series(
        _head(),
        tmp_path / "head",
        spacing_mm=(2.0, 2.5, 2.5),
        study=StudyIdentity.random(4),
        series=SeriesSpec(body_part_examined="HEAD"),
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tiny_model_dir}}}\n")
    done = node_cli(
        "analyze", str(files[0].parent), "--out", str(tmp_path / "o"), "--config", str(cfg)
    )
    assert done.returncode == 3, done.stderr
    assert "no lung in the field of view" in done.stderr
