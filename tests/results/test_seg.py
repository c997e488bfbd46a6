"""Tests for the DICOM Segmentation: segments, references, frames, pixels, FRACTIONAL.

Every SEG made here is written to bytes, read back with ``highdicom.seg.segread`` and checked
with dciodvfy. dciodvfy (dicom3tools 1.00~20220618) reports no errors and no warnings on them.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node import MANUFACTURER
from dicom_node.results import codes
from dicom_node.results.identity import Producer, ResultUIDs
from dicom_node.results.seg import (
    MAX_FRACTIONAL_VALUE,
    SegmentationType,
    build_segmentation,
    plan_segments,
)
from tests.results.conftest import CTCase, Dciodvfy, encode, make_case

PRODUCER = Producer(model_name="lung-ct", model_version="1.2.0")


def _uids(case: CTCase, version: int = 1) -> ResultUIDs:
    return ResultUIDs.derive(
        root="2.25",
        study_instance_uid=case.study.study_instance_uid,
        source_series_uid=str(case.headers[0].SeriesInstanceUID),
        job_version=version,
        model_version=PRODUCER.model_version,
    )


def _build(case: CTCase, **options: object) -> hd.seg.Segmentation | None:
    return build_segmentation(
        case.headers,
        case.lesion_map.labels,
        case.lesion_map.lesions,
        uids=_uids(case),
        producer=PRODUCER,
        series_number=9101,
        series_description="AI lung lesions (dicom-node)",
        **options,  # type: ignore[arg-type]
    )


def _round_trip(
    seg: hd.seg.Segmentation, tmp_path: Path, dciodvfy: Dciodvfy
) -> hd.seg.Segmentation:
    """Bytes, dciodvfy (no errors), and highdicom's reader."""
    data = encode(seg)
    path = tmp_path / "seg.dcm"
    path.write_bytes(data)
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert warnings == [], warnings
    return hd.seg.segread(BytesIO(data))


def test_two_lesions_make_two_labelled_tracked_segments(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """Two lesions give two segments, "Lesion 1/2", largest first, tracked, coded, AI."""
    built = _build(two_lesions)
    assert built is not None
    seg = _round_trip(built, tmp_path, dciodvfy)
    uids = _uids(two_lesions)

    assert seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == 2
    lesions = two_lesions.lesion_map.lesions
    assert lesions[0].voxel_count > lesions[1].voxel_count
    for number, lesion in enumerate(lesions, start=1):
        item = seg.get_segment_description(number)
        assert item.segment_label == f"Lesion {number}"
        assert item.tracking_id == f"Lesion {number}"
        assert item.tracking_uid == uids.tracking_uid(lesion.label)
        assert item.segmented_property_category == codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE
        assert item.segmented_property_type == codes.NEOPLASM
        assert list(item.anatomic_regions) == [codes.LUNG]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "lung-ct"
        assert algorithm.AlgorithmVersion == "1.2.0"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert seg.Manufacturer == MANUFACTURER
    assert seg.SeriesInstanceUID == uids.seg_series
    assert seg.SOPInstanceUID == uids.seg_instance
    assert seg.SeriesNumber == 9101


def test_frames_reference_their_source_images_and_match_the_label_map(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """Each frame references the source slice it lies on; empty frames are left out; the
    pixels of every segment equal the lesion's voxels in the label map."""
    built = _build(two_lesions)
    assert built is not None
    seg = _round_trip(built, tmp_path, dciodvfy)
    labels = two_lesions.lesion_map.labels
    sop_uids = [str(h.SOPInstanceUID) for h in two_lesions.headers]
    positions = [tuple(float(v) for v in h.ImagePositionPatient) for h in two_lesions.headers]

    expected_frames = sum(
        int(np.any(labels == lesion.label, axis=(1, 2)).sum())
        for lesion in two_lesions.lesion_map.lesions
    )
    assert int(seg.NumberOfFrames) == expected_frames  # one per (segment, slice with content)
    pixels = seg.pixel_array.reshape(expected_frames, *labels.shape[1:])
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        z = sop_uids.index(str(source.ReferencedSOPInstanceUID))
        position = tuple(float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        assert position == positions[z]
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        label = two_lesions.lesion_map.lesions[number - 1].label
        np.testing.assert_array_equal(pixels[index].astype(bool), labels[z] == label)

    # The SEG's source images are the slices a frame derives from, no empty one.
    holding = [k for k in range(labels.shape[0]) if labels[k].any()]
    assert len(holding) < labels.shape[0]
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {sop_uids[k] for k in holding}

    # highdicom's own reader puts the masks back on the source images.
    volume = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[sop_uids[k] for k in holding],
        combine_segments=True,
        skip_overlap_checks=True,
    )
    np.testing.assert_array_equal(volume, labels[holding])


def test_no_lesion_gives_no_segmentation(tmp_path: Path) -> None:
    """Without a lesion there is no SEG at all (``None``), not an empty one."""
    case = make_case(tmp_path, [], slices=4, size=32)
    assert case.lesion_map.lesions == ()
    assert _build(case) is None


def test_max_segments_keeps_the_largest(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """With more lesions than ``max_segments`` only the largest become segments, renumbered."""
    case = make_case(
        tmp_path / "ct",
        [(4.0, 16.0, 16.0, 3.0), (6.0, 46.0, 46.0, 5.0), (8.0, 16.0, 46.0, 4.0)],
    )
    assert len(case.lesion_map.lesions) == 3
    built = _build(case, max_segments=2)
    assert built is not None
    seg = _round_trip(built, tmp_path, dciodvfy)
    assert seg.number_of_segments == 2
    kept = sorted(case.lesion_map.lesions, key=lambda les: -les.voxel_count)[:2]
    uids = _uids(case)
    for number, lesion in enumerate(kept, start=1):
        assert seg.get_segment_description(number).tracking_uid == uids.tracking_uid(lesion.label)
    planned = plan_segments(case.lesion_map.lesions, uids=uids, max_segments=2)
    assert [p.lesion for p in planned] == kept


def test_fractional_segmentation_stores_the_probability(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """FRACTIONAL: each segment stores round(p * 255) over its lesion's voxels and 0 elsewhere."""
    built = _build(
        two_lesions,
        segmentation_type=SegmentationType.FRACTIONAL,
        probability=two_lesions.probability,
    )
    assert built is not None
    seg = _round_trip(built, tmp_path, dciodvfy)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    assert int(seg.MaximumFractionalValue) == MAX_FRACTIONAL_VALUE
    labels = two_lesions.lesion_map.labels
    sop_uids = [str(h.SOPInstanceUID) for h in two_lesions.headers]
    stored = seg.pixel_array.reshape(int(seg.NumberOfFrames), *labels.shape[1:])
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        z = sop_uids.index(
            str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        )
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        mask = labels[z] == two_lesions.lesion_map.lesions[number - 1].label
        expected = np.where(mask, np.rint(two_lesions.probability[z] * 255), 0)
        np.testing.assert_array_equal(stored[index], expected)


def test_fractional_needs_a_probability_map(two_lesions: CTCase) -> None:
    """FRACTIONAL without a probability map of the label map's shape is refused."""
    with pytest.raises(ValueError, match="probability map"):
        _build(two_lesions, segmentation_type=SegmentationType.FRACTIONAL)


def test_source_headers_may_lack_type_2_attributes(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """A source that omits Type 2 patient/study attributes still gives a valid SEG, with them
    present and empty (highdicom alone fails on such a file)."""
    headers = []
    for path in two_lesions.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        del ds.AccessionNumber, ds.ReferringPhysicianName
        headers.append(ds)
    built = build_segmentation(
        headers,
        two_lesions.lesion_map.labels,
        two_lesions.lesion_map.lesions,
        uids=_uids(two_lesions),
        producer=PRODUCER,
        series_number=9101,
        series_description="AI",
    )
    assert built is not None
    seg = _round_trip(built, tmp_path, dciodvfy)
    assert seg.AccessionNumber == ""
    assert seg.ReferringPhysicianName == ""


def test_labels_must_match_the_source_images(two_lesions: CTCase) -> None:
    """A label map with another slice count than the source series is refused."""
    with pytest.raises(ValueError, match="one slice per source image"):
        build_segmentation(
            two_lesions.headers[:-1],
            two_lesions.lesion_map.labels,
            two_lesions.lesion_map.lesions,
            uids=_uids(two_lesions),
            producer=PRODUCER,
            series_number=9101,
            series_description="AI",
        )
