"""Tests for the synthetic chest-CT phantoms: tissue values, ground truth, randomisation, writers.

Phantoms here are small (a few dozen slices of 64-192 pixels with large voxels) so that the file
runs in seconds; the generator is the same one that makes 512 x 512 phantoms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from scipy import ndimage  # type: ignore[import-untyped, unused-ignore]

from dicom_node.training.phantom import (
    Lobe,
    LookalikeKind,
    Phantom,
    SiteDistribution,
    SiteParameters,
    Tissue,
    TumourAttachment,
    TumourKind,
    generate_phantom,
    write_phantom_dicom,
    write_phantom_nifti,
)

Dciodvfy = Callable[[Path], tuple[list[str], list[str]]]

#: A calibrated site with moderate noise and no padding outside the reconstruction circle.
CLEAN_SITE = SiteParameters(
    name="test",
    fov_mm=384.0,
    matrix=192,
    slice_thickness_mm=5.0,
    slice_spacing_mm=5.0,
    kernel_sharpness=0.3,
    noise_sd_hu=10.0,
    outside_fov_hu=None,
)


def small(seed: int, **options: Any) -> Phantom:
    """A 24 x 96 x 96 phantom with 10 x 4 x 4 mm voxels (about 0.15 s)."""
    return generate_phantom(
        seed=seed, shape_zyx=(24, 96, 96), spacing_mm=(10.0, 4.0, 4.0), **options
    )


@pytest.fixture(scope="module")
def detailed() -> Phantom:
    """A 2 mm in-plane phantom of the mid chest with tumours and look-alikes."""
    return generate_phantom(
        seed=11,
        shape_zyx=(16, 192, 192),
        site=CLEAN_SITE,
        tumour_probability=1.0,
        n_tumours=(3, 3),
        n_lookalikes=(4, 4),
    )


def _interior(mask: np.ndarray) -> np.ndarray:
    """Voxels whose in-plane 3 x 3 neighbourhood lies in the mask (away from partial volume)."""
    return np.asarray(ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), dtype=bool)))


@pytest.mark.parametrize(
    ("tissue", "low", "high"),
    [
        (Tissue.LUNG, -950.0, -700.0),
        (Tissue.FAT, -120.0, -60.0),
        (Tissue.SOFT_TISSUE, 20.0, 80.0),
        (Tissue.BLOOD, 20.0, 80.0),
        (Tissue.BONE, 300.0, 3071.0),
    ],
)
def test_tissue_values_lie_in_their_hu_ranges(
    detailed: Phantom, tissue: Tissue, low: float, high: float
) -> None:
    """The median HU of each tissue's interior voxels is in the textbook range."""
    mask = detailed.tissue == tissue
    if tissue is not Tissue.BONE:  # cortical bone is thin: keep its rim voxels
        mask = _interior(mask)
    assert mask.sum() > 20
    median = float(np.median(detailed.hu[mask]))
    assert low <= median <= high, f"{tissue.name}: median {median} HU"


def test_tumour_mask_matches_the_listed_tumours(detailed: Phantom) -> None:
    """Each listed tumour has its own label, sits where stated, has about its diameter and lies
    in the lung; nothing else is labelled."""
    assert len(detailed.tumours) >= 1
    labels = set(np.unique(detailed.tumour_mask)) - {0}
    assert labels == {t.label for t in detailed.tumours}
    dz, dy, dx = detailed.spacing_mm
    ox, oy, oz = detailed.origin_mm
    lung = detailed.lung_mask > 0
    for tumour in detailed.tumours:
        voxels = np.argwhere(detailed.tumour_mask == tumour.label)
        assert voxels.size
        assert lung[tuple(voxels.T)].all()
        # The stated centre lies in or next to the labelled voxels.
        cx, cy, cz = tumour.centre_mm
        centre_idx = np.array([(cz - oz) / dz, (cy - oy) / dy, (cx - ox) / dx])
        gap_mm = np.min(np.linalg.norm((voxels - centre_idx) * np.array([dz, dy, dx]), axis=1))
        assert gap_mm <= max(dz, dy) + tumour.diameter_mm / 2
        # In-plane extent within voxelisation error of the diameter.
        extent = max(np.ptp(voxels[:, 1]) + 1, np.ptp(voxels[:, 2]) + 1) * dy
        upper = tumour.diameter_mm * (1.8 if tumour.kind is TumourKind.SPICULATED else 1.0)
        assert 0.55 * tumour.diameter_mm - 2 * dy <= extent <= upper + 2 * dy, tumour
        assert 4.0 <= tumour.diameter_mm <= 40.0
        right_lobes = {Lobe.RUL, Lobe.RML, Lobe.RLL}
        assert (tumour.lobe in right_lobes) == (tumour.side == "R")


def test_juxtapleural_tumours_touch_the_lung_boundary() -> None:
    """A juxta-pleural tumour has voxels next to tissue outside the lung."""
    found = 0
    for seed in range(40):
        phantom = small(seed, tumour_probability=1.0, n_tumours=(3, 3))
        outside = ndimage.binary_dilation(
            phantom.lung_mask == 0, structure=np.ones((1, 3, 3), dtype=bool)
        )
        for tumour in phantom.tumours:
            if tumour.attachment is TumourAttachment.JUXTAPLEURAL:
                found += 1
                assert (outside & (phantom.tumour_mask == tumour.label)).any(), tumour
        if found >= 2:
            break
    assert found >= 1


def test_all_tumour_kinds_occur() -> None:
    """Over a few seeds the generator makes every morphology and attachment."""
    kinds: set[TumourKind] = set()
    attachments: set[TumourAttachment] = set()
    for seed in range(25):
        phantom = small(seed, tumour_probability=1.0, n_tumours=(3, 3))
        kinds |= {t.kind for t in phantom.tumours}
        attachments |= {t.attachment for t in phantom.tumours}
        if len(kinds) == len(TumourKind) and len(attachments) == len(TumourAttachment):
            break
    assert kinds == set(TumourKind)
    assert attachments == set(TumourAttachment)


def test_tumour_free_phantoms_have_an_empty_mask() -> None:
    """With tumour probability 0 there are no tumours and no labelled voxel."""
    phantom = small(3, tumour_probability=0.0)
    assert phantom.tumours == ()
    assert not phantom.has_tumour
    assert not phantom.tumour_mask.any()


def test_lookalikes_are_labelled_apart_from_tumours(detailed: Phantom) -> None:
    """Look-alikes have their own labels, never overlap a tumour, and granulomas are calcified."""
    assert detailed.lookalikes
    labels = set(np.unique(detailed.lookalike_mask)) - {0}
    assert labels <= {item.label for item in detailed.lookalikes}
    assert any(item.kind is LookalikeKind.FISSURE for item in detailed.lookalikes)
    for item in detailed.lookalikes:
        region = detailed.lookalike_mask == item.label
        assert not (region & (detailed.tumour_mask > 0)).any(), item
        if item.kind is not LookalikeKind.FISSURE:
            assert region.any(), item
    for seed in range(30):
        phantom = generate_phantom(
            seed=seed, shape_zyx=(12, 160, 160), site=CLEAN_SITE, n_lookalikes=(4, 4)
        )
        granulomas = [g for g in phantom.lookalikes if g.kind is LookalikeKind.CALCIFIED_GRANULOMA]
        if granulomas:
            for g in granulomas:
                assert phantom.hu[phantom.lookalike_mask == g.label].max() > 200, g
            break
    else:
        pytest.fail("no calcified granuloma in 30 seeds")


def test_same_seed_same_phantom_and_different_seeds_differ() -> None:
    """Generation is a pure function of the seed and arguments."""
    a = small(7, tumour_probability=1.0)
    b = small(7, tumour_probability=1.0)
    c = small(8, tumour_probability=1.0)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.tumour_mask, b.tumour_mask)
    assert a.tumours == b.tumours and a.lookalikes == b.lookalikes and a.site == b.site
    assert not np.array_equal(a.hu, c.hu)
    assert a.patient != c.patient


def test_arrays_are_read_only() -> None:
    """A phantom is a value: its arrays cannot be modified in place."""
    phantom = small(
        1,
    )
    with pytest.raises(ValueError, match="read-only"):
        phantom.hu[0, 0, 0] = 0


def test_shifted_distribution_moves_site_parameters() -> None:
    """A shifted site distribution draws larger fields of view, thicker slices, more noise."""
    base, shifted = SiteDistribution(), SiteDistribution().shifted(1.0)
    assert SiteDistribution().shifted(0.0) == base
    a = [base.sample(seed) for seed in range(40)]
    b = [shifted.sample(seed) for seed in range(40)]
    for attribute in ("fov_mm", "slice_thickness_mm", "noise_sd_hu", "kernel_sharpness"):
        mean_a = np.mean([getattr(s, attribute) for s in a])
        mean_b = np.mean([getattr(s, attribute) for s in b])
        assert mean_b > mean_a, attribute
    assert np.mean([s.breath_depth_mean for s in b]) < np.mean([s.breath_depth_mean for s in a])


def test_site_changes_spacing_and_noise() -> None:
    """The same patient seen by a site with a larger field of view and more noise has larger
    pixels and noisier air."""
    quiet = replace(CLEAN_SITE, matrix=64, fov_mm=320.0, noise_sd_hu=5.0)
    loud = replace(quiet, fov_mm=420.0, noise_sd_hu=40.0)
    p_quiet = generate_phantom(seed=5, site=quiet, shape_zyx=(6, 64, 64))
    p_loud = generate_phantom(seed=5, site=loud, shape_zyx=(6, 64, 64))
    assert p_quiet.spacing_mm[1] == pytest.approx(320.0 / 64)
    assert p_loud.spacing_mm[1] == pytest.approx(420.0 / 64)
    assert p_quiet.patient == p_loud.patient

    def air_sd(p: Phantom) -> float:
        air = ndimage.binary_erosion(
            p.tissue == Tissue.AIR, structure=np.ones((1, 5, 5), dtype=bool)
        )
        return float(p.hu[air].std())

    assert air_sd(p_loud) > 3 * air_sd(p_quiet)


def test_default_grid_follows_the_site() -> None:
    """Without a shape, the site's matrix and slice spacing are used and the lungs covered."""
    site = replace(CLEAN_SITE, matrix=48, fov_mm=360.0, slice_spacing_mm=10.0)
    phantom = generate_phantom(seed=2, site=site)
    nz, ny, nx = phantom.hu.shape
    assert (ny, nx) == (48, 48)
    assert phantom.spacing_mm == pytest.approx((10.0, 7.5, 7.5))
    assert nz * 10.0 >= phantom.patient.lung_height_mm
    assert phantom.hu.dtype == np.int16
    assert phantom.lung_mask.any()


def test_invalid_arguments_are_refused() -> None:
    """Probabilities, counts and diameters outside their domains raise ValueError."""
    with pytest.raises(ValueError, match="tumour_probability"):
        small(0, tumour_probability=1.5)
    with pytest.raises(ValueError, match="n_tumours"):
        small(0, n_tumours=(3, 1))
    with pytest.raises(ValueError, match="tumour_diameter_mm"):
        small(0, tumour_diameter_mm=(0.0, 10.0))
    with pytest.raises(ValueError, match="kernel_sharpness"):
        replace(CLEAN_SITE, kernel_sharpness=2.0)


def test_dicom_series_is_valid_and_round_trips(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """The phantom written as DICOM decodes to its HU and geometry and passes dciodvfy."""
    site = replace(CLEAN_SITE, outside_fov_hu=-3024.0, matrix=64)
    phantom = generate_phantom(seed=4, site=site, shape_zyx=(6, 64, 64))
    files = write_phantom_dicom(phantom, tmp_path)
    assert len(files) == 6
    for k in (0, 5):
        ds = pydicom.dcmread(files[k])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, phantom.hu[k])
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        assert (x, y) == pytest.approx(phantom.origin_mm[:2], abs=1e-3)
        assert z == pytest.approx(phantom.origin_mm[2] + k * phantom.spacing_mm[0], abs=1e-3)
        assert ds.ConvolutionKernel == site.convolution_kernel
    again = write_phantom_dicom(phantom, tmp_path / "again")
    assert pydicom.dcmread(again[0]).SOPInstanceUID == pydicom.dcmread(files[0]).SOPInstanceUID
    errors, warnings = dciodvfy(files[3])
    assert errors == [], errors
    print(warnings)


def test_nifti_round_trip_keeps_values_and_geometry(tmp_path: Path) -> None:
    """Image and MSD-style label read back through SimpleITK with their spacing and origin."""
    import SimpleITK as sitk

    phantom = small(9, tumour_probability=1.0)
    image_path, label_path = tmp_path / "img.nii.gz", tmp_path / "lbl.nii.gz"
    write_phantom_nifti(phantom, image_path, label_path)
    image = sitk.ReadImage(str(image_path))
    label = sitk.ReadImage(str(label_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), phantom.hu)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(label), (phantom.tumour_mask > 0).astype(np.uint8)
    )
    dz, dy, dx = phantom.spacing_mm
    assert image.GetSpacing() == pytest.approx((dx, dy, dz))  # type: ignore[no-untyped-call, unused-ignore]
    assert image.GetOrigin() == pytest.approx(phantom.origin_mm)  # type: ignore[no-untyped-call, unused-ignore]
    assert label.GetOrigin() == pytest.approx(phantom.origin_mm)  # type: ignore[no-untyped-call, unused-ignore]
    write_phantom_nifti(phantom, image_path, label_path, instance_labels=True)
    instances = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    np.testing.assert_array_equal(instances, phantom.tumour_mask)


def test_seed_181_generates() -> None:
    """A fissure plane that misses every slice is left out, not a crash (seed 181 at 32x256²
    once raised ValueError in the fissure painter)."""
    phantom = generate_phantom(seed=181, shape_zyx=(32, 256, 256), tumour_probability=0.6)
    assert phantom.hu.shape == (32, 256, 256)


def test_widened_distribution_covers_the_shifted_one() -> None:
    """Domain randomisation: the widened ranges contain the default and the shifted ranges."""
    base = SiteDistribution()
    assert base.widened(0.0) == base
    wide, shifted = base.widened(1.0), base.shifted(0.5)
    for name in (
        "fov_mm",
        "slice_thickness_mm",
        "kernel_sharpness",
        "noise_sd_hu",
        "hu_offset",
        "hu_gain",
        "kvp",
        "patient_scale_mean",
        "breath_depth_mean",
    ):
        lo, hi = getattr(wide, name)
        for other in (base, shifted):
            o_lo, o_hi = getattr(other, name)
            assert lo <= o_lo and o_hi <= hi, name
        assert hi - lo > getattr(base, name)[1] - getattr(base, name)[0], name
    thickness = [wide.sample(seed).slice_thickness_mm for seed in range(60)]
    assert min(thickness) < 0.625 or max(thickness) > 2.5  # draws beyond the default range
