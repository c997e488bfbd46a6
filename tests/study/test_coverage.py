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


def test_a_field_of_view_that_cuts_through_the_lungs_still_shows_them() -> None:
    """A tight field of view on a large patient cuts through both lungs (and the chest wall
    beside them): the lungs reaching the image's edge still count as lung, not as the air
    around the patient, and the fraction stays that of the whole chest; a head cut the same way
    still shows none."""
    phantom = generate_phantom(
        seed=5, shape_zyx=(24, 128, 128), spacing_mm=(2.0, 3.0, 3.0), tumour_probability=0.0
    )
    hu = np.asarray(phantom.hu)
    whole = lung_coverage(hu).lung_fraction
    columns = np.flatnonzero((np.asarray(phantom.lung_mask) > 0).any(axis=(0, 1)))
    tight = np.ascontiguousarray(hu[:, :, columns[0] + 3 : columns[-1] - 3])
    cut = lung_coverage(tight)
    assert cut.body_cut
    assert cut.lung_fraction > 0.8 * whole > 0.1
    head = _head()
    assert lung_coverage(np.ascontiguousarray(head[:, :, 20:-20])).lung_fraction < 0.02


def test_an_abdomen_cut_by_the_field_of_view_on_a_foam_pad_shows_no_lung() -> None:
    """An abdomen wider than the field of view (cut at both sides) lying on the table's foam
    pad (-850 HU, as table pads are) and its carbon top: the pad reaches the image's edges
    beside the cut body and is of lung density, but the body does not flank it there (it
    lies under the patient), so it is not taken for a lung the field of view cuts."""
    rng = np.random.default_rng(0)
    n, pixel = 128, 350.0 / 128
    yy, xx = (np.mgrid[0:n, 0:n] - (n - 1) / 2) * pixel
    plane = np.full((n, n), -1000.0)
    body = (xx / 195.0) ** 2 + ((yy + 10) / 125.0) ** 2 <= 1.0  # 390 mm wide
    plane[body] = 40.0
    plane[body & ~((xx / 180.0) ** 2 + ((yy + 10) / 110.0) ** 2 <= 1.0)] = -100.0  # fat
    bottom = 115.0
    plane[(yy > bottom - 5) & (yy <= bottom + 45) & ~body] = -850.0  # the pad
    plane[(yy > bottom + 45) & (yy <= bottom + 60)] = 150.0  # the table top
    hu = (np.repeat(plane[None], 16, axis=0) + rng.normal(0, 15, (16, n, n))).astype(np.float32)
    coverage = lung_coverage(hu)
    assert coverage.body_cut
    assert coverage.lung_fraction < 0.02


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


def test_the_midline_is_the_middle_of_the_body_not_of_the_field_of_view(tmp_path: Path) -> None:
    """The laterality's midline: the same chest in a field of view 30 columns wider on the
    patient's left keeps its midline (the body's middle), while the field of view's centre
    moves by 15 columns (45 mm), also lying on its side (decubitus: the image's rows run across
    the patient); a field of view narrower than the body falls back to x = 0."""
    from dicom_node.analysis.pipeline import midline_x_mm
    from dicom_node.config import VolumeGeometrySettings
    from dicom_node.study.volume import read_volume

    phantom = generate_phantom(
        seed=2, shape_zyx=(24, 128, 128), spacing_mm=(5.0, 3.0, 3.0), tumour_probability=0.0
    )
    hu = np.asarray(phantom.hu)
    found = {}
    wider = np.pad(hu, ((0, 0), (0, 0), (0, 30)), constant_values=-1000)
    ox, oy, oz = phantom.origin_mm
    right = ox + (wider.shape[2] - 1) * 3.0
    hfs, hfdl = (1, 0, 0, 0, 1, 0), (0, 1, 0, -1, 0, 0)
    for name, pixels, orientation, origin in (
        ("full", hu, hfs, phantom.origin_mm),
        ("wider", wider, hfs, phantom.origin_mm),
        # on the left side: stored[z, r, c] = wider[z, c, x-1-r]
        ("decubitus", wider[:, :, ::-1].transpose(0, 2, 1), hfdl, (right, oy, oz)),
        ("narrow", hu[:, :, 40:88], hfs, phantom.origin_mm),
    ):
        files = write_ct_series(
            np.ascontiguousarray(pixels),
            tmp_path / name,
            spacing_mm=phantom.spacing_mm,
            study=StudyIdentity.random(2),
            series=SeriesSpec(image_orientation=orientation),
            origin_mm=origin,
        )
        volume = read_volume(files, settings=VolumeGeometrySettings())
        coverage = lung_coverage(volume.to_model_order(volume.hu))
        found[name] = (midline_x_mm(volume, coverage), coverage.body_cut)
    full, wider, narrow = found["full"], found["wider"], found["narrow"]
    assert not full[1] and not wider[1]
    assert abs(full[0] - wider[0]) <= 2 * 3.0  # the sampling step of two columns
    assert abs(found["decubitus"][0] - wider[0]) <= 2 * 3.0 and not found["decubitus"][1]
    centre_full = phantom.origin_mm[0] + 127 / 2 * 3.0
    assert abs(full[0] - centre_full) < 15.0  # the phantom's patient lies near the centre
    assert narrow == (0.0, True)


def test_holes_are_filled_as_binary_fill_holes_fills_each_slice() -> None:
    """The one-labelling hole filling equals scipy's binary_fill_holes slice by slice."""
    from scipy import ndimage

    from dicom_node.study.coverage import _fill_holes_per_slice

    rng = np.random.default_rng(3)
    for _ in range(60):
        shape = (int(rng.integers(1, 8)), int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        body = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.0, 2.0)) > rng.uniform(
            0.3, 0.7
        )
        expected = np.stack([ndimage.binary_fill_holes(plane) for plane in body])
        air = np.full(body.shape, -1000.0)  # no region of lung density reaches an edge
        assert np.array_equal(_fill_holes_per_slice(body, air, -950.0), expected)
