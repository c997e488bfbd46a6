"""Lesions from probability maps: synthetic shapes with known volumes, diameters and positions."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from dicom_node.analysis.lesions import LesionRule, convex_hull, find_lesions
from dicom_node.analysis.weights import Thresholds
from dicom_node.config import LesionSettings


def _ball(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    centre_mm: tuple[float, float, float],
    radius_mm: float,
) -> npt.NDArray[np.bool_]:
    """(z, y, x) mask of voxels centred within ``radius_mm`` of ``centre_mm`` (z, y, x)."""
    grid = np.indices(shape).astype(np.float64)
    d2 = sum(((grid[a] * spacing[a]) - centre_mm[a]) ** 2 for a in range(3))
    return np.asarray(d2 <= radius_mm**2)


@pytest.mark.parametrize(
    ("spacing", "radius", "centre"),
    [
        ((2.5, 0.7, 0.7), 10.0, (30.3, 22.1, 23.7)),
        ((1.25, 0.8, 0.6), 8.0, (20.1, 20.3, 19.9)),
        ((3.0, 0.9, 0.9), 15.0, (40.2, 30.1, 30.5)),
    ],
)
def test_sphere_volume_diameter_and_centroid(
    spacing: tuple[float, float, float], radius: float, centre: tuple[float, float, float]
) -> None:
    """A sphere on an anisotropic grid: volume 4/3 pi r^3 within 3 %, axes 2r within a pixel."""
    shape = (int(80 / spacing[0]), int(60 / spacing[1]), int(60 / spacing[2]))
    mask = _ball(shape, spacing, centre, radius)
    hu = np.where(mask, 40, -800).astype(np.int16)
    found = find_lesions(mask.astype(np.float32), hu, spacing_mm=spacing, threshold=0.5)
    assert len(found.lesions) == 1
    lesion = found.lesions[0]
    assert lesion.volume_mm3 == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.03)
    assert lesion.voxel_count == int(mask.sum())
    pixel_diagonal = math.hypot(spacing[1], spacing[2])
    assert abs(lesion.long_axis_mm - 2 * radius) <= pixel_diagonal
    assert abs(lesion.short_axis_mm - 2 * radius) <= pixel_diagonal
    assert lesion.short_axis_mm <= lesion.long_axis_mm
    # identity direction, zero origin: LPS (x, y, z) is the (x, y, z) position in mm
    assert lesion.centroid_lps == pytest.approx(centre[::-1], abs=0.05)
    z_centre = round(centre[0] / spacing[0])
    assert abs(lesion.axis_slice - z_centre) <= 1
    assert lesion.first_slice == int(np.flatnonzero(mask.any(axis=(1, 2)))[0])
    assert lesion.last_slice == int(np.flatnonzero(mask.any(axis=(1, 2)))[-1])
    assert (lesion.mean_hu, lesion.max_hu) == (40.0, 40.0)


def test_box_gives_diagonal_and_perpendicular_chord() -> None:
    """An 8 x 10 mm box: long axis = its diagonal, short = longest chord perpendicular to it."""
    probability = np.zeros((3, 40, 60), np.float32)
    probability[1, 10:18, 10:30] = 0.9  # 8 rows of 1 mm, 20 columns of 0.5 mm
    lesion = find_lesions(probability, probability, spacing_mm=(1.0, 1.0, 0.5)).lesions[0]
    diagonal = math.hypot(8.0, 10.0)
    assert lesion.long_axis_mm == pytest.approx(diagonal, abs=1e-6)
    # the longest segment perpendicular to the diagonal that fits in an a x b box: b * d / a
    assert lesion.short_axis_mm == pytest.approx(8.0 * diagonal / 10.0, abs=0.01)
    p, q = lesion.long_axis_lps
    assert sorted([p, q]) == [pytest.approx((4.75, 9.5, 1.0)), pytest.approx((14.75, 17.5, 1.0))]
    a, b = (np.array(x) for x in lesion.short_axis_lps)
    assert float(np.linalg.norm(a - b)) == pytest.approx(lesion.short_axis_mm)
    assert float(np.dot(a - b, np.array(q) - np.array(p))) == pytest.approx(0.0, abs=1e-6)
    assert lesion.mean_probability == pytest.approx(0.9)


@pytest.mark.parametrize("angle", [0.0, 0.5, 1.2])
def test_ellipse_gives_major_and_minor_axes(angle: float) -> None:
    """An ellipse (semi-axes 15, 6 mm) at any angle: long 30, short 12 mm, within a pixel."""
    sy = sx = 0.4
    yy, xx = np.indices((120, 160)).astype(np.float64)
    x, y = xx * sx - 32.1, yy * sy - 24.2
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    probability = np.zeros((2, 120, 160), np.float32)
    probability[0] = (u / 15) ** 2 + (v / 6) ** 2 <= 1
    lesion = find_lesions(probability, probability, spacing_mm=(2.0, sy, sx)).lesions[0]
    assert abs(lesion.long_axis_mm - 30.0) <= math.hypot(sy, sx)
    assert abs(lesion.short_axis_mm - 12.0) <= math.hypot(sy, sx)


def test_long_axis_is_taken_on_the_slice_where_it_is_longest() -> None:
    """A stack of discs of growing radius is measured on the slice with the largest disc."""
    probability = np.zeros((5, 64, 64), np.float32)
    for z, radius in enumerate([4, 8, 14, 10, 6]):
        probability[z] = _ball((1, 64, 64), (1.0, 1.0, 1.0), (0.0, 32.0, 32.0), radius)[0]
    lesion = find_lesions(probability, probability, spacing_mm=(2.0, 1.0, 1.0)).lesions[0]
    assert lesion.axis_slice == 2
    assert abs(lesion.long_axis_mm - 28.0) <= math.sqrt(2)
    assert (lesion.first_slice, lesion.last_slice) == (0, 4)


def test_two_blobs_are_ordered_by_volume_and_relabelled() -> None:
    """Two separate blobs become lesions 1 (larger) and 2, and the label map says which is which."""
    spacing = (1.0, 1.0, 1.0)
    small = _ball((30, 40, 40), spacing, (8.0, 10.0, 10.0), 3.0)  # scanned first
    large = _ball((30, 40, 40), spacing, (20.0, 28.0, 28.0), 6.0)
    probability = (small | large).astype(np.float32) * 0.8
    hu = np.where(small, 10, 0) + np.where(large, 50, 0)
    found = find_lesions(probability, hu.astype(np.int16), spacing_mm=spacing)
    assert [lesion.label for lesion in found.lesions] == [1, 2]
    assert found.lesions[0].voxel_count == int(large.sum())
    assert found.lesions[1].voxel_count == int(small.sum())
    assert found.lesions[0].mean_hu == 50.0
    assert found.labels.dtype == np.uint16
    assert found.labels.shape == probability.shape
    assert np.array_equal(found.labels == 1, large)
    assert np.array_equal(found.labels == 2, small)
    assert found.dropped == 0


def test_component_below_minimum_volume_is_dropped() -> None:
    """A component under ``min_volume_mm3`` is dropped from the list and from the label map."""
    spacing = (2.0, 0.5, 0.5)
    probability = np.zeros((10, 60, 60), np.float32)
    probability[2:6, 10:30, 10:30] = 1.0  # 4 * 20 * 20 voxels of 0.5 mm^3: 800 mm^3
    probability[8, 50, 50] = 1.0  # one voxel: 0.5 mm^3
    found = find_lesions(probability, probability, spacing_mm=spacing, min_volume_mm3=10.0)
    assert len(found.lesions) == 1
    assert found.lesions[0].volume_mm3 == pytest.approx(800.0)
    assert found.labels[8, 50, 50] == 0
    assert found.dropped == 1


def test_max_lesions_keeps_the_largest() -> None:
    """``max_lesions`` keeps the largest components and counts the rest as dropped."""
    probability = np.zeros((3, 40, 40), np.float32)
    for k, size in enumerate([2, 5, 3]):
        probability[1, 2 + 12 * k : 2 + 12 * k + size, 2 : 2 + size] = 1.0
    found = find_lesions(probability, probability, spacing_mm=(1.0, 1.0, 1.0), max_lesions=2)
    assert [lesion.voxel_count for lesion in found.lesions] == [25, 9]
    assert found.dropped == 1
    assert set(np.unique(found.labels)) == {0, 1, 2}


def test_threshold_and_connectivity() -> None:
    """Only voxels at or above the threshold count; diagonal neighbours join at 26, not at 6."""
    probability = np.zeros((3, 10, 10), np.float32)
    probability[1, 2, 2] = 0.7
    probability[1, 3, 3] = 0.5  # touches the first by an edge only
    probability[1, 8, 8] = 0.49
    spacing = (1.0, 1.0, 1.0)
    assert (
        len(find_lesions(probability, probability, spacing_mm=spacing, threshold=0.5).lesions) == 1
    )
    assert (
        len(find_lesions(probability, probability, spacing_mm=spacing, connectivity=6).lesions) == 2
    )
    assert (
        len(find_lesions(probability, probability, spacing_mm=spacing, threshold=0.6).lesions) == 1
    )


def test_empty_map_gives_no_lesions() -> None:
    """A map below the threshold everywhere gives no lesions and an all-zero label map."""
    probability = np.full((4, 16, 16), 0.2, np.float32)
    found = find_lesions(probability, np.zeros((4, 16, 16), np.int16), spacing_mm=(1.0, 1.0, 1.0))
    assert found.lesions == ()
    assert found.labels.shape == (4, 16, 16)
    assert not found.labels.any()


def test_uint8_map_gives_the_same_lesions_as_float() -> None:
    """A uint8 map (p * 255) gives the same lesions and probabilities as the float map."""
    rng = np.random.default_rng(3)
    probability = np.clip(rng.normal(0.3, 0.3, (6, 32, 32)), 0, 1).astype(np.float32)
    quantised = np.round(probability * 255).astype(np.uint8)
    exact = np.round(probability * 255).astype(np.float32) / 255  # what the uint8 map encodes
    hu = rng.integers(-100, 100, (6, 32, 32)).astype(np.int16)
    a = find_lesions(exact, hu, spacing_mm=(1.0, 1.0, 1.0), threshold=0.6)
    b = find_lesions(quantised, hu, spacing_mm=(1.0, 1.0, 1.0), threshold=0.6)
    assert np.array_equal(a.labels, b.labels)
    assert len(a.lesions) == len(b.lesions) > 0
    for x, y in zip(a.lesions, b.lesions, strict=True):
        assert x.mean_probability == pytest.approx(y.mean_probability, abs=1e-6)
        assert x.voxel_count == y.voxel_count


def test_centroid_uses_origin_and_direction() -> None:
    """Patient coordinates: origin + direction @ (x, y, z) mm, with a flipped, swapped direction."""
    probability = np.zeros((5, 20, 30), np.float32)
    probability[2, 4, 6] = 1.0  # index z=2, y=4, x=6
    spacing = (3.0, 0.5, 0.8)
    # x index axis runs along -L (right), y along +S, z along +P (a coronal-like orientation)
    direction = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    found = find_lesions(
        probability,
        probability,
        spacing_mm=spacing,
        origin_lps=(100.0, -50.0, 20.0),
        direction=direction,
    )
    lesion = found.lesions[0]
    x_mm, y_mm, z_mm = 6 * 0.8, 4 * 0.5, 2 * 3.0
    assert lesion.centroid_lps == pytest.approx((100.0 - x_mm, -50.0 + z_mm, 20.0 + y_mm))
    assert lesion.long_axis_mm == pytest.approx(math.hypot(0.5, 0.8))  # one pixel: its diagonal


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "spacing"),
        ({"spacing_mm": (1.0, 1.0)}, "spacing"),
        ({"direction": np.eye(2)}, "direction"),
        ({"threshold": 0.0}, "threshold"),
        ({"connectivity": 4}, "connectivity"),
        ({"max_lesions": 0}, "max_lesions"),
        ({"flagged_slices": np.ones(3, bool)}, "flagged_slices"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, object], fragment: str) -> None:
    """Invalid geometry or options raise ValueError naming the argument."""
    probability = np.zeros((2, 8, 8), np.float32)
    args: dict[str, object] = {"spacing_mm": (1.0, 1.0, 1.0), **kwargs}
    with pytest.raises(ValueError, match=fragment):
        find_lesions(probability, probability, **args)  # type: ignore[arg-type]


def test_shapes_must_match() -> None:
    """Probability and HU volumes of different shapes are refused."""
    with pytest.raises(ValueError, match="one shape"):
        find_lesions(
            np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 9)), spacing_mm=(1.0, 1.0, 1.0)
        )


def test_convex_hull_of_a_square_with_inner_and_edge_points() -> None:
    """The hull keeps the four corners, counter-clockwise; under 3 points come back as is."""
    points = np.array(
        [[0, 0], [2, 0], [2, 2], [0, 2], [1, 1], [1, 0], [0.5, 1.5]], dtype=np.float64
    )
    hull = convex_hull(points)
    assert sorted(map(tuple, hull)) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    area = 0.5 * sum(
        hull[i - 1][0] * hull[i][1] - hull[i][0] * hull[i - 1][1] for i in range(len(hull))
    )
    assert area == pytest.approx(4.0)  # positive: counter-clockwise in (first, second) axes
    assert len(convex_hull(np.array([[1.0, 1.0], [1.0, 1.0]]))) == 1


@pytest.mark.parametrize("as_uint8", [False, True])
def test_a_component_without_a_confident_voxel_is_dropped(as_uint8: bool) -> None:
    """``min_peak``: the threshold draws outlines, the peak decides which are lesions."""
    spacing = (1.0, 1.0, 1.0)
    probability = np.zeros((20, 40, 40), dtype=np.float32)
    probability[_ball(probability.shape, spacing, (10.0, 10.0, 10.0), 4.0)] = 0.6
    probability[_ball(probability.shape, spacing, (10.0, 30.0, 30.0), 4.0)] = 0.6
    probability[10, 30, 30] = 0.97  # the second one has a confident core
    prob: npt.NDArray[np.float32] | npt.NDArray[np.uint8] = probability
    if as_uint8:
        prob = np.round(probability * 255).astype(np.uint8)
    hu = np.zeros(probability.shape, dtype=np.int16)
    both = find_lesions(prob, hu, spacing_mm=spacing, threshold=0.5)
    assert len(both.lesions) == 2
    one = find_lesions(prob, hu, spacing_mm=spacing, threshold=0.5, min_peak=0.9)
    assert len(one.lesions) == 1 and one.dropped == 1
    assert one.labels[10, 30, 30] == 1 and one.labels[10, 10, 10] == 0
    assert set(np.unique(one.labels)) == {0, 1}


def test_the_lesion_rule_takes_the_cards_values_unless_configured() -> None:
    """Configured threshold, minimum volume and peak win; unset ones come from the card."""
    card = Thresholds(segmentation=0.7, lesion_peak=0.95, lesion_min_volume_mm3=65.0)
    rule = LesionRule.resolve(LesionSettings(), card)
    assert (rule.threshold, rule.min_peak, rule.min_volume_mm3) == (0.7, 0.95, 65.0)
    mine = LesionRule.resolve(
        LesionSettings(threshold=0.4, min_volume_mm3=0.0, min_peak=0.5, max_lesions=3), card
    )
    assert (mine.threshold, mine.min_peak, mine.min_volume_mm3, mine.max_lesions) == (
        0.4,
        0.5,
        0.0,
        3,
    )
    assert LesionRule.resolve(LesionSettings(), Thresholds()).min_peak is None


def test_the_image_gate_keeps_lesions_on_flagged_slices_only() -> None:
    """A component is dropped unless one of its slices is flagged, whatever slice that is."""
    spacing = (1.0, 1.0, 1.0)
    probability = np.zeros((20, 40, 40), dtype=np.float32)
    probability[_ball(probability.shape, spacing, (6.0, 10.0, 10.0), 3.0)] = 0.9  # slices 3-9
    probability[_ball(probability.shape, spacing, (14.0, 30.0, 30.0), 3.0)] = 0.9  # 11-17
    hu = np.zeros(probability.shape, dtype=np.int16)
    flags = np.zeros(20, dtype=bool)
    flags[9] = True  # the first ball's last slice
    gated = find_lesions(probability, hu, spacing_mm=spacing, flagged_slices=flags)
    assert len(gated.lesions) == 1 and gated.dropped == 1
    assert (gated.lesions[0].first_slice, gated.lesions[0].last_slice) == (3, 9)
    assert gated.labels[14, 30, 30] == 0
    flags[10] = True  # between the two: neither has a voxel there
    assert len(find_lesions(probability, hu, spacing_mm=spacing, flagged_slices=flags).lesions) == 1
    none = find_lesions(probability, hu, spacing_mm=spacing, flagged_slices=np.zeros(20, bool))
    assert none.lesions == () and none.dropped == 2
    assert not none.labels.any()
    every = find_lesions(probability, hu, spacing_mm=spacing, flagged_slices=np.ones(20, bool))
    assert len(every.lesions) == 2


def test_the_image_gate_comes_from_the_card_unless_configured() -> None:
    """The gate sits at the card's image threshold when the card or the configuration turns it
    on; a configured ``image_gate: false`` turns the card's off."""
    off = Thresholds(image=0.4)
    on = Thresholds(image=0.4, lesion_image_gate=True)
    assert LesionRule.resolve(LesionSettings(), off).image_gate is None
    assert LesionRule.resolve(LesionSettings(), on).image_gate == 0.4
    assert LesionRule.resolve(LesionSettings(image_gate=False), on).image_gate is None
    assert LesionRule.resolve(LesionSettings(image_gate=True), off).image_gate == 0.4
    rule = LesionRule.resolve(LesionSettings(), on)
    flags = rule.flagged_slices(np.array([0.1, 0.4, 0.9], np.float32), 0.5)
    assert flags is not None and flags.tolist() == [False, True, True]
    assert LesionRule.resolve(LesionSettings(), off).flagged_slices(np.zeros(3), 0.5) is None


def test_the_study_gate_comes_from_the_card_unless_configured() -> None:
    """Below the study gate no slice may hold a lesion, whatever the image gate says; at or
    above it the image gate (or none) decides. A configured 0 turns the card's gate off."""
    card = Thresholds(image=0.4, lesion_study_gate=0.7)
    rule = LesionRule.resolve(LesionSettings(), card)
    assert (rule.study_gate, rule.image_gate) == (0.7, None)
    image = np.array([0.1, 0.4, 0.9], np.float32)
    below = rule.flagged_slices(image, 0.69)
    assert below is not None and not below.any() and below.shape == (3,)
    assert rule.flagged_slices(image, 0.7) is None
    both = LesionRule.resolve(LesionSettings(image_gate=True), card)
    flags = both.flagged_slices(image, 0.8)
    assert flags is not None and flags.tolist() == [False, True, True]
    assert not np.any(both.flagged_slices(image, 0.5))
    assert LesionRule.resolve(LesionSettings(study_gate=0.0), card).study_gate is None
    assert LesionRule.resolve(LesionSettings(study_gate=0.3), card).study_gate == 0.3
    assert LesionRule.resolve(LesionSettings(study_gate=0.3), Thresholds()).study_gate == 0.3
    assert LesionRule.resolve(LesionSettings(), Thresholds()).study_gate is None
    with pytest.raises(ValueError, match="study_gate"):
        LesionSettings(study_gate=1.5)


@pytest.mark.parametrize("kind", ["blobs", "noise", "nearly_full", "empty"])
def test_components_are_those_of_a_labelling_of_the_whole_volume(kind: str) -> None:
    """Labelling only the box around the voxels above the threshold gives the labels, counts
    and boxes (the background's too) of cc3d on the whole volume, for uint8 and float maps,
    and find_lesions the label map a whole-volume relabelling gives."""
    import cc3d
    from scipy import ndimage

    from dicom_node.analysis.lesions import Components

    rng = np.random.default_rng(7)
    for _ in range(40):
        shape = (int(rng.integers(1, 20)), int(rng.integers(1, 24)), int(rng.integers(1, 24)))
        if kind == "blobs":
            p = ndimage.gaussian_filter(rng.random(shape), 1.5)
            p = (p - p.min()) / (np.ptp(p) + 1e-9)
        elif kind == "noise":  # components on every face
            p = rng.random(shape)
        elif kind == "nearly_full":
            p = 1.0 - 0.9 * (rng.random(shape) < 0.05)
        else:
            p = np.zeros(shape)
        threshold = float(rng.choice([0.2, 0.5, 0.8, 1.0, rng.uniform(0.01, 1.0)]))
        connectivity = int(rng.choice([6, 18, 26]))
        for probability in (p.astype(np.float32), np.rint(p * 255).astype(np.uint8)):
            scale = 255.0 if probability.dtype == np.uint8 else 1.0
            mask = probability >= threshold * scale
            labels, count = cc3d.connected_components(  # type: ignore[call-overload]
                mask, connectivity=connectivity, return_N=True, binary_image=True
            )
            found = Components(probability, threshold, connectivity)  # type: ignore[arg-type]
            assert found.count == count
            assert np.array_equal(found.labels, labels)
            if count:
                stats = cc3d.statistics(labels)
                assert found.voxel_counts.tolist() == stats["voxel_counts"].tolist()
                assert found.boxes == list(stats["bounding_boxes"])
            lesions = find_lesions(
                probability,
                np.zeros(shape, np.int16),
                spacing_mm=(1.0, 1.0, 1.0),
                threshold=threshold,
                min_volume_mm3=3.0,
                connectivity=connectivity,  # type: ignore[arg-type]
            )
            lookup = np.zeros(count + 1, dtype=np.uint16)
            for lesion in lesions.lesions:
                (old,) = set(
                    labels[lesion.first_slice : lesion.last_slice + 1][
                        lesions.labels[lesion.first_slice : lesion.last_slice + 1] == lesion.label
                    ].tolist()
                )
                lookup[old] = lesion.label
            assert np.array_equal(lesions.labels, lookup[labels])
