"""The CT volume: sorting, geometry refusals, Enhanced CT, HU and the voxel-to-patient mapping."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from dicom_node.config import VolumeGeometrySettings
from dicom_node.errors import VolumeDecodeError, VolumeGeometryError
from dicom_node.study.headers import read_headers
from dicom_node.study.volume import CTVolume, load_volume, plan_volume, read_volume
from dicom_node.training.ctseries import (
    CORONAL_ORIENTATION,
    ENHANCED_CT_IMAGE_STORAGE,
    SeriesSpec,
    StudyIdentity,
    write_enhanced_ct,
)
from tests.study.conftest import WriteSeries, hu_volume

GEOMETRY = VolumeGeometrySettings()


def _read(paths: list[Path]) -> CTVolume:
    return read_volume(paths, settings=GEOMETRY)


def test_slices_in_random_order_are_sorted_along_the_normal(write_series: WriteSeries) -> None:
    """Files given in any order make the volume in slice order, with UIDs and positions to match."""
    volume = hu_volume(24)
    paths = write_series("s", SeriesSpec(), volume=volume)
    shuffled = paths.copy()
    random.Random(3).shuffle(shuffled)
    ct = _read(shuffled)
    np.testing.assert_array_equal(ct.hu, volume)
    headers = read_headers(paths)
    assert ct.sop_instance_uids == tuple(h.sop_instance_uid for h in headers)
    assert ct.source_paths == tuple(paths)
    assert ct.frame_numbers == (1,) * 24
    assert np.all(np.diff(ct.slice_positions_mm[:, 2]) > 0)
    assert ct.origin_mm == pytest.approx((-5.6, -5.6, -100.0))
    assert ct.spacing_mm == pytest.approx((1.0, 0.7, 0.7))
    assert ct.hu.dtype == np.int16
    assert not ct.hu.flags.writeable


def test_positions_against_the_normal_are_reversed(write_series: WriteSeries) -> None:
    """A series written head to feet (decreasing z) comes out with z increasing along the normal."""
    volume = hu_volume(20)
    positions = [-100.0 - 2.0 * k for k in range(20)]
    ct = _read(write_series("s", SeriesSpec(), volume=volume, positions_mm=positions))
    np.testing.assert_array_equal(ct.hu, volume[::-1])
    assert ct.origin_mm[2] == pytest.approx(-138.0)
    assert ct.spacing_mm[0] == pytest.approx(2.0)


def test_missing_slice_is_refused_with_the_gap(write_series: WriteSeries) -> None:
    """One slice absent: refused with the gap's size and place and the expected spacing."""
    positions = [2.5 * k for k in range(21) if k != 8]
    paths = write_series("s", SeriesSpec(), n_slices=20, positions_mm=positions)
    with pytest.raises(VolumeGeometryError) as err:
        _read(paths)
    assert str(err.value) == "missing slice: gap of 5.0 mm at z=17.5 mm, expected 2.5 mm"


def test_deleted_file_is_refused_as_a_gap(write_series: WriteSeries) -> None:
    """A slice file that never arrived (deleted from the series) is a gap, not interpolated."""
    paths = write_series("s", SeriesSpec(), n_slices=20)
    del paths[5]
    with pytest.raises(VolumeGeometryError, match=r"^missing slice: gap of 2\.0 mm .*1\.0 mm$"):
        _read(paths)


def test_duplicate_position_is_refused(write_series: WriteSeries) -> None:
    """Two slices at one position (e.g. two acquisitions in one series) are refused."""
    positions = [float(k) for k in range(20)]
    positions[10] = positions[9]
    paths = write_series("s", SeriesSpec(), n_slices=20, positions_mm=positions)
    with pytest.raises(VolumeGeometryError) as err:
        _read(paths)
    assert str(err.value).startswith("duplicate slice position at z=")


def test_two_stacks_in_one_series_are_refused(write_series: WriteSeries) -> None:
    """Every position taken twice (two phases filed as one series) is refused as duplicates."""
    positions = [float(k // 2) for k in range(24)]
    paths = write_series("s", SeriesSpec(), positions_mm=positions)
    with pytest.raises(VolumeGeometryError, match=r"^duplicate slice positions: 12 of 24 slices"):
        _read(paths)


def test_interleaved_acquisitions_in_one_series_are_refused(write_series: WriteSeries) -> None:
    """Two acquisitions (two phases, two breath-holds) filed as one series with their slices
    half a step apart pass every spacing check, but neighbouring slices alternate between
    the scans: refused as mixed acquisitions. A long scan in two acquisitions one after the
    other along the patient is one volume."""
    import pydicom

    positions = [k * 0.5 for k in range(24)]
    paths = write_series("s", SeriesSpec(), positions_mm=positions)

    def number(acquisition_of: list[int]) -> None:
        for path, acquisition in zip(paths, acquisition_of, strict=True):
            ds = pydicom.dcmread(path)
            ds.AcquisitionNumber = acquisition
            ds.save_as(path, enforce_file_format=True)

    by_position = sorted(
        range(24), key=lambda k: float(pydicom.dcmread(paths[k]).ImagePositionPatient[2])
    )
    interleaved = [0] * 24
    for rank, k in enumerate(by_position):
        interleaved[k] = 1 + rank % 2
    number(interleaved)
    with pytest.raises(
        VolumeGeometryError, match=r"^mixed acquisitions: acquisitions 1 and 2 \(12 and 12"
    ):
        _read(paths)
    one_after_the_other = [0] * 24
    for rank, k in enumerate(by_position):
        one_after_the_other[k] = 1 + rank // 12
    number(one_after_the_other)
    assert _read(paths).hu.shape[0] == 24


@pytest.mark.parametrize("fault", ["absent intercept", "malformed intercept", "zero slope"])
def test_a_ct_slice_without_a_valid_rescale_is_refused(
    write_series: WriteSeries, fault: str
) -> None:
    """Rescale Intercept and Slope are Type 1 in CT; a slice without a usable one is refused
    with its image number, never read as intercept 0 / slope 1 (1024 HU off)."""
    import pydicom

    paths = write_series("s", SeriesSpec(), n_slices=12, rescale_intercept=-1024.0)
    ds = pydicom.dcmread(paths[5])
    if fault == "absent intercept":
        del ds.RescaleIntercept
    elif fault == "malformed intercept":
        from pydicom.dataelem import RawDataElement
        from pydicom.tag import Tag

        tag = Tag(0x0028, 0x1052)  # written as it is, not a decimal string
        ds._dict[tag] = RawDataElement(tag, "DS", 6, b"x1024 ", 0, False, True)
    else:
        ds.RescaleSlope = 0
    ds.save_as(paths[5])
    which = "Slope" if fault == "zero slope" else "Intercept"
    with pytest.raises(VolumeDecodeError, match=rf"^image 6 has no valid Rescale {which}$"):
        _read(paths)


def test_uneven_spacing_is_refused(write_series: WriteSeries) -> None:
    """Steps that differ from the median by more than the tolerance are refused with where."""
    positions = [float(k) for k in range(20)]
    positions[10] += 0.3
    paths = write_series("s", SeriesSpec(), n_slices=20, positions_mm=positions)
    with pytest.raises(VolumeGeometryError, match=r"uneven spacing: step of 1\.3 mm at z=9\.0 mm"):
        _read(paths)
    # within a wider tolerance the same series is accepted
    loose = VolumeGeometrySettings(spacing_tolerance=0.5)
    assert read_volume(paths, settings=loose).shape == (20, 16, 16)


def test_steps_each_within_tolerance_that_drift_apart_are_refused(
    write_series: WriteSeries,
) -> None:
    """150 steps of 0.95 mm then 149 of 1.04 mm: each step passes, but the even grid the volume
    would use lies 6.7 mm from the middle slice's own position."""
    positions = [0.95 * k for k in range(151)] + [142.5 + 1.04 * k for k in range(1, 150)]
    paths = write_series("s", SeriesSpec(), n_slices=300, positions_mm=positions)
    with pytest.raises(VolumeGeometryError, match=r"^uneven spacing: slice positions drift up to"):
        _read(paths)


def test_gantry_tilt_is_detected_from_geometry(write_series: WriteSeries) -> None:
    """Positions sheared 15° off the normal are refused as gantry tilt, with the angle."""
    paths = write_series("s", SeriesSpec(), n_slices=20, gantry_tilt_deg=15.0)
    with pytest.raises(VolumeGeometryError) as err:
        _read(paths)
    assert str(err.value).startswith("gantry tilt: slice positions run 15.0° off the slice normal")
    assert "resampling" in str(err.value)


def test_small_tilt_within_tolerance_keeps_exact_positions(write_series: WriteSeries) -> None:
    """A tilt below the tolerance is accepted and the affine still hits every slice's position."""
    paths = write_series("s", SeriesSpec(), n_slices=20, gantry_tilt_deg=0.5)
    ct = _read(paths)
    k = np.arange(20)
    index = np.stack([k, np.zeros(20), np.zeros(20)], axis=1)
    np.testing.assert_allclose(ct.index_to_lps(index), ct.slice_positions_mm, atol=1e-4)


def test_lesions_on_a_tilted_series_lie_where_its_slices_are(write_series: WriteSeries) -> None:
    """Within the tilt tolerance the slices step off the normal; a lesion found near the last of
    300 slices is placed with the measured step (step_direction), on its slice's position."""
    from dicom_node.analysis.lesions import find_lesions

    paths = write_series("s", SeriesSpec(), n_slices=300, gantry_tilt_deg=0.9)
    ct = _read(paths)
    probability = np.zeros(ct.shape, dtype=np.float32)
    probability[290:294, 6:10, 6:10] = 1.0
    centroids = [
        find_lesions(
            probability,
            ct.hu,
            spacing_mm=ct.spacing_mm,
            origin_lps=ct.origin_mm,
            direction=direction,
            threshold=0.5,
            min_volume_mm3=0.0,
        )
        .lesions[0]
        .centroid_lps
        for direction in (ct.step_direction, ct.direction)
    ]
    expected = ct.index_to_lps([291.5, 7.5, 7.5])
    np.testing.assert_allclose(centroids[0], expected, atol=1e-6)
    # what the plain direction (slices along the normal) would say: millimetres away
    assert np.linalg.norm(np.subtract(centroids[1], expected)) > 3.0


def test_mixed_orientations_are_refused(write_series: WriteSeries) -> None:
    """A coronal image filed in an axial series makes the series refused, not a volume."""
    axial = SeriesSpec()
    paths = write_series("a", axial, n_slices=20)
    coronal = SeriesSpec(
        series_instance_uid=axial.series_instance_uid,
        frame_of_reference_uid=axial.frame_of_reference_uid,
        image_orientation=CORONAL_ORIENTATION,
    )
    paths += write_series("c", coronal, n_slices=1, origin_mm=(0.0, 3.0, 0.0))
    with pytest.raises(VolumeGeometryError, match=r"^mixed orientations: 1 of 21 images"):
        _read(paths)


def test_mixed_image_sizes_are_refused(write_series: WriteSeries) -> None:
    """Images of different sizes cannot share a volume."""
    spec = SeriesSpec()
    paths = write_series("a", spec, n_slices=20)
    other = write_series("b", spec, volume=hu_volume(1, 8, 8), positions_mm=[-80.0])
    with pytest.raises(VolumeGeometryError, match="mixed image sizes: 16x16 and 8x8"):
        _read(paths + other)


def test_enhanced_ct_loads_like_the_single_frame_series(
    write_series: WriteSeries, tmp_path: Path, study: StudyIdentity
) -> None:
    """One Enhanced CT multi-frame file gives the same HU and geometry as the slice series."""
    volume = hu_volume(20)
    spec = SeriesSpec()
    single = _read(write_series("s", spec, volume=volume, n_slices=20))
    enhanced_path = write_enhanced_ct(
        volume,
        tmp_path / "enhanced.dcm",
        spacing_mm=(1.0, 0.7, 0.7),
        study=study,
        series=spec,
        origin_mm=(-5.6, -5.6, -100.0),
    )
    multi = _read([enhanced_path])
    np.testing.assert_array_equal(multi.hu, single.hu)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    assert multi.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE
    assert multi.frame_numbers == tuple(range(1, 21))
    assert len(set(multi.sop_instance_uids)) == 1


def test_enhanced_ct_frames_out_of_order_are_sorted(tmp_path: Path, study: StudyIdentity) -> None:
    """Frames stored head to feet come out sorted along the normal, with their frame numbers."""
    volume = hu_volume(20)
    path = write_enhanced_ct(
        volume,
        tmp_path / "enhanced.dcm",
        spacing_mm=(1.0, 0.7, 0.7),
        study=study,
        series=SeriesSpec(),
        positions_mm=[-100.0 - k for k in range(20)],
    )
    ct = _read([path])
    np.testing.assert_array_equal(ct.hu, volume[::-1])
    assert ct.frame_numbers == tuple(range(20, 0, -1))


def test_rescale_to_float_hu(write_series: WriteSeries) -> None:
    """A non-unit slope gives float32 HU equal to stored * slope + intercept."""
    volume = hu_volume(20).astype(np.float64)
    paths = write_series(
        "s", SeriesSpec(), volume=volume, rescale_slope=0.5, rescale_intercept=-1024.0
    )
    ct = _read(paths)
    assert ct.hu.dtype == np.float32
    np.testing.assert_allclose(ct.hu, np.round(volume * 2) / 2, atol=1e-3)
    # and asking for float32 gives float32 for an exact-integer series too
    exact = read_volume(write_series("t", SeriesSpec()), settings=GEOMETRY, hu_dtype="float32")
    assert exact.hu.dtype == np.float32
    np.testing.assert_array_equal(exact.hu, hu_volume(24))


def test_hu_beyond_int16_are_clipped(write_series: WriteSeries) -> None:
    """Exact-integer HU are int16; values above 32767 HU (none in real CT) saturate there."""
    volume = hu_volume(20).astype(np.int32)
    volume[3, 4, 5] = 40000
    ct = _read(write_series("s", SeriesSpec(), volume=volume))
    assert ct.hu.dtype == np.int16
    assert ct.hu[3, 4, 5] == 32767
    volume[3, 4, 5] = 32767
    np.testing.assert_array_equal(ct.hu, volume)


@pytest.mark.parametrize(
    ("signed", "value", "limit", "vr"),
    [
        (False, 63536, None, "US"),  # -2000 as unsigned, outside a reconstruction circle
        (True, -2000, None, "SS"),
        (True, 63536, None, "US"),  # a signed image's value written as US
        (False, 0, 24, "US"),  # a padding range (Pixel Padding Range Limit)
    ],
)
def test_pixel_padding_becomes_air_whatever_its_encoding(
    write_series: WriteSeries, signed: bool, value: int, limit: int | None, vr: str
) -> None:
    """Stored values that Pixel Padding Value (and Pixel Padding Range Limit) mark as padding
    are not image (PS3.3 C.7.5.1.1.2): they become air, not +32767 HU or whatever the rescale
    makes of them; the image's own pixels keep their HU."""
    import pydicom

    from dicom_node.study.volume import PADDING_HU

    paths = write_series("s", SeriesSpec(), n_slices=6)
    truth = _read(paths).hu.copy()
    outside = np.zeros(truth.shape[1:], dtype=bool)
    outside[:2, :] = outside[:, -3:] = True
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept) + 3024
        ds.RescaleIntercept = -3024  # the image's own pixels are stored at 2000 and above
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, int(signed)
        fill = (value - 65536 if signed and value > 32767 else value) if limit is None else 7
        stored[outside] = fill
        ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
        ds.add_new(0x00280120, vr, value)
        if limit is not None:
            ds.add_new(0x00280121, vr, limit)
        ds.save_as(path, enforce_file_format=True)
    ct = _read(paths)
    assert (ct.hu[:, outside] == PADDING_HU).all()
    np.testing.assert_array_equal(ct.hu[:, ~outside], truth[:, ~outside])


def test_index_to_lps_follows_the_image_orientation(write_series: WriteSeries) -> None:
    """Voxel (k, j, i) maps to IPP_k + j * dy * column direction + i * dx * row direction."""
    spec = SeriesSpec(image_orientation=CORONAL_ORIENTATION)
    ct = _read(write_series("c", spec, n_slices=20, spacing_mm=(2.0, 0.5, 0.8)))
    row, col = np.array(CORONAL_ORIENTATION[:3]), np.array(CORONAL_ORIENTATION[3:])
    np.testing.assert_allclose(ct.direction[:, 0], row)
    np.testing.assert_allclose(ct.direction[:, 1], col)
    np.testing.assert_allclose(ct.direction[:, 2], np.cross(row, col))
    expected = ct.slice_positions_mm[7] + 3 * 0.5 * col + 5 * 0.8 * row
    np.testing.assert_allclose(ct.index_to_lps([7, 3, 5]), expected, atol=1e-6)
    np.testing.assert_allclose(ct.lps_to_index(expected), [7, 3, 5], atol=1e-9)


def test_corrupt_pixel_data_is_refused_with_the_file(write_series: WriteSeries) -> None:
    """Pixel data shorter than the header promises is a decode error naming the file."""
    paths = write_series("s", SeriesSpec(), n_slices=20)
    plan = plan_volume(read_headers(paths), settings=GEOMETRY)
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[: len(data) - 100])
    with pytest.raises(VolumeDecodeError, match=paths[4].name):
        load_volume(plan)


def test_peak_memory_is_the_volume_plus_a_few_frames(write_series: WriteSeries) -> None:
    """Decoding allocates the volume once: peak traced memory stays near its size."""
    volume = hu_volume(48, 128, 128)
    paths = write_series("big", SeriesSpec(), volume=volume, spacing_mm=(1.0, 0.7, 0.7))
    plan = plan_volume(read_headers(paths), settings=GEOMETRY)
    frame = 128 * 128 * 4
    tracemalloc.start()
    try:
        ct = load_volume(plan, hu_dtype="float32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ct.hu.nbytes == 48 * frame
    assert peak < ct.hu.nbytes + 8 * frame, (peak, ct.hu.nbytes)
