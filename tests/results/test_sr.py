"""Tests for the TID 1500 Structured Report: groups, references, measurements, verdict, flags.

Every SR made here is written to bytes, read back with ``highdicom.sr.srread`` and checked with
dciodvfy. dciodvfy (dicom3tools 1.00~20220618) reports no errors and no warnings on them.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from dicom_node import MANUFACTURER
from dicom_node.results import codes
from dicom_node.results.codes import Laterality, StudyClassification
from dicom_node.results.identity import Producer, ResultUIDs
from dicom_node.results.seg import build_segmentation, plan_segments
from dicom_node.results.sr import (
    SEGMENTATION_STORAGE,
    build_report,
    classify,
    field_of_view_centre_x,
    laterality,
)
from tests.results.conftest import CTCase, Dciodvfy, encode, make_case, report_content

PRODUCER = Producer(model_name="lung-ct", model_version="1.2.0")


def _uids(case: CTCase) -> ResultUIDs:
    return ResultUIDs.derive(
        root="2.25",
        study_instance_uid=case.study.study_instance_uid,
        source_series_uid=str(case.headers[0].SeriesInstanceUID),
        job_version=1,
        model_version=PRODUCER.model_version,
    )


def _report(
    case: CTCase,
    *,
    study_probability: float,
    max_segments: int = 20,
    image_probabilities: list[float] | None = None,
) -> hd.sr.Comprehensive3DSR:
    uids = _uids(case)
    lesions = case.lesion_map.lesions
    seg: Dataset | None = build_segmentation(
        case.headers,
        case.lesion_map.labels,
        lesions,
        uids=uids,
        producer=PRODUCER,
        series_number=9101,
        series_description="AI",
        max_segments=max_segments,
    )
    return build_report(
        case.headers,
        plan_segments(lesions, uids=uids, max_segments=max_segments),
        segmentation=seg,
        lesion_count=len(lesions),
        study_probability=study_probability,
        study_threshold=0.5,
        uids=uids,
        producer=PRODUCER,
        series_number=9102,
        series_description="AI lung findings, not verified (dicom-node)",
        image_probabilities=image_probabilities,
    )


def _round_trip(
    sr: hd.sr.Comprehensive3DSR, tmp_path: Path, dciodvfy: Dciodvfy
) -> hd.sr.Comprehensive3DSR:
    """Bytes, dciodvfy (no errors), and highdicom's reader."""
    data = encode(sr)
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert warnings == [], warnings
    read = hd.sr.srread(BytesIO(data))
    assert isinstance(read, hd.sr.Comprehensive3DSR)
    return read


def _value(
    group: (
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ),
    name: hd.sr.CodedConcept,
) -> float:
    found = group.get_measurements(name=name)
    assert len(found) == 1, name
    return float(found[0].value)


def test_lesion_groups_reference_their_segments_and_carry_measurements(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """One volumetric group per lesion: the SEG's tracking UID, its segment number in the SEG
    instance, the lesion's source images, finding, site with laterality, and measurements."""
    sr = _round_trip(_report(two_lesions, study_probability=0.8), tmp_path, dciodvfy)
    uids = _uids(two_lesions)
    groups = report_content(sr).get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    sop_uids = [str(h.SOPInstanceUID) for h in two_lesions.headers]
    sides = [Laterality.RIGHT, Laterality.LEFT]  # conftest: lesion 1 at x < 0, lesion 2 x > 0
    for number, (group, lesion) in enumerate(
        zip(groups, two_lesions.lesion_map.lesions, strict=True), start=1
    ):
        assert group.tracking_uid == uids.tracking_uid(lesion.label)
        assert group.tracking_identifier == f"Lesion {number}"
        segment = group.referenced_segment
        assert segment is not None
        assert segment.referenced_segment_numbers == [number]
        assert segment.referenced_sop_instance_uid == uids.seg_instance
        assert segment.referenced_sop_class_uid == SEGMENTATION_STORAGE
        assert [s.referenced_sop_instance_uid for s in segment.source_images_for_segmentation] == (
            sop_uids[lesion.first_slice : lesion.last_slice + 1]
        )
        assert group.finding_type == codes.NEOPLASM
        [site] = group.finding_sites
        assert site.value == codes.LUNG
        assert site.laterality == sides[number - 1].code

        assert _value(group, codes.VOLUME) == pytest.approx(lesion.volume_mm3, abs=0.005)
        assert _value(group, codes.LONG_AXIS) == pytest.approx(lesion.long_axis_mm, abs=0.005)
        assert _value(group, codes.SHORT_AXIS) == pytest.approx(lesion.short_axis_mm, abs=0.005)
        hu = group.get_measurements(name=codes.ATTENUATION_COEFFICIENT)
        by_derivation = {m.derivation: float(m.value) for m in hu}
        assert by_derivation[codes.MEAN] == pytest.approx(lesion.mean_hu, abs=0.05)
        assert by_derivation[codes.MAXIMUM] == pytest.approx(lesion.max_hu, abs=0.05)
        [probability] = group.get_measurements(name=codes.PROBABILITY_OF_CANCER)
        assert float(probability.value) == pytest.approx(lesion.mean_probability, abs=5e-5)
        assert probability.unit == codes.NO_UNITS


def test_study_group_classifies_and_names_the_algorithm(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """The study group holds the verdict (Present at p >= threshold), the probability, the
    threshold, the lesion count and the image with the highest probability."""
    probabilities = [0.1] * len(two_lesions.headers)
    probabilities[6] = 0.9
    sr = _round_trip(
        _report(two_lesions, study_probability=0.8, image_probabilities=probabilities),
        tmp_path,
        dciodvfy,
    )
    [group] = report_content(sr).get_image_measurement_groups()
    assert group.tracking_identifier == "Study classification"
    assert group.tracking_uid == _uids(two_lesions).study_tracking_uid()
    [verdict] = group.get_qualitative_evaluations(name=codes.MALIGNANT_NEOPLASTIC_DISEASE)
    assert verdict.value == codes.PRESENT
    [lesion] = group.get_qualitative_evaluations(name=codes.LESION)
    assert lesion.value == codes.PRESENT
    assert _value(group, codes.THRESHOLD_VALUE) == 0.5
    assert _value(group, codes.NUMBER_OF_LESIONS) == 2
    by_derivation = {
        m.derivation: m for m in group.get_measurements(name=codes.PROBABILITY_OF_CANCER)
    }
    assert float(by_derivation[None].value) == pytest.approx(0.8)
    top = by_derivation[codes.MAXIMUM]
    assert float(top.value) == pytest.approx(0.9)
    assert [r.referenced_sop_instance_uid for r in top.referenced_images] == [
        str(two_lesions.headers[6].SOPInstanceUID)
    ]
    # The algorithm is named as AI (TID 4019) on the group.
    family = [
        item for item in group[0].ContentSequence if item.name == dcm_codes.DCM.AlgorithmFamily
    ]
    assert [item.value for item in family] == [codes.ARTIFICIAL_INTELLIGENCE]


def test_report_is_marked_as_unverified_ai_output(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """Preliminary, unverified, observed by a device (our model), CT chest, evidence lists
    every analysed image and the SEG, the library each lesion's measurement slice."""
    sr = _round_trip(_report(two_lesions, study_probability=0.8), tmp_path, dciodvfy)
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.Manufacturer == MANUFACTURER
    [observer] = report_content(sr).get_observer_contexts()
    assert observer.observer_type == dcm_codes.DCM.Device
    device = observer.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.name == "lung-ct (AI)"
    assert device.manufacturer_name == MANUFACTURER
    assert device.model_name == "lung-ct 1.2.0"
    assert device.uid == PRODUCER.device_uid("2.25")
    procedure = [
        item for item in sr.ContentSequence if item.name == dcm_codes.DCM.ProcedureReported
    ]
    assert [item.value for item in procedure] == [codes.CT_OF_CHEST]

    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    referenced = {
        str(instance.ReferencedSOPInstanceUID)
        for series in evidence
        for instance in series.ReferencedSOPSequence
    }
    expected = {str(h.SOPInstanceUID) for h in two_lesions.headers} | {
        _uids(two_lesions).seg_instance
    }
    assert referenced == expected

    # The Image Library lists each lesion's measurement slice.
    [library] = [item for item in sr.ContentSequence if item.name == dcm_codes.DCM.ImageLibrary]
    entries = [
        str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for group in library.ContentSequence
        for entry in group.ContentSequence
        if entry.ValueType == "IMAGE"
    ]
    axis_slices = sorted({lesion.axis_slice for lesion in two_lesions.lesion_map.lesions})
    assert entries == [str(two_lesions.headers[z].SOPInstanceUID) for z in axis_slices]


def test_no_lesion_report_says_so(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """Without lesions the SR is still valid: no lesion groups, "Lesion: Absent", zero lesions,
    and the verdict Absent below the threshold."""
    case = make_case(tmp_path / "ct", [], slices=4, size=32)
    sr = _round_trip(_report(case, study_probability=0.2), tmp_path, dciodvfy)
    assert report_content(sr).get_volumetric_roi_measurement_groups() == []
    [group] = report_content(sr).get_image_measurement_groups()
    [verdict] = group.get_qualitative_evaluations(name=codes.MALIGNANT_NEOPLASTIC_DISEASE)
    assert verdict.value == codes.ABSENT
    [lesion] = group.get_qualitative_evaluations(name=codes.LESION)
    assert lesion.value == codes.ABSENT
    assert _value(group, codes.NUMBER_OF_LESIONS) == 0


def test_capped_segments_still_count_every_lesion(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """With ``max_segments`` below the lesion count, groups follow the segments and the study
    group counts every lesion."""
    case = make_case(
        tmp_path / "ct",
        [(4.0, 16.0, 16.0, 3.0), (6.0, 46.0, 46.0, 5.0), (8.0, 16.0, 46.0, 4.0)],
    )
    sr = _round_trip(_report(case, study_probability=0.7, max_segments=1), tmp_path, dciodvfy)
    assert len(report_content(sr).get_volumetric_roi_measurement_groups()) == 1
    [group] = report_content(sr).get_image_measurement_groups()
    assert _value(group, codes.NUMBER_OF_LESIONS) == 3


def test_laterality_follows_lps() -> None:
    """LPS +x is the patient's left: smaller x than the midline is Right, larger is Left."""
    assert laterality(-30.0, 0.0) is Laterality.RIGHT
    assert laterality(30.0, 0.0) is Laterality.LEFT
    assert laterality(12.0, 20.0) is Laterality.RIGHT
    assert laterality(5.0, 5.0) is None
    assert Laterality.RIGHT.code.value == "24028007"
    assert Laterality.LEFT.code.value == "7771000"


def test_field_of_view_centre(two_lesions: CTCase) -> None:
    """The midline default is the x of the reconstructed field of view's centre."""
    # conftest: origin x -25.2, 64 columns of 0.8 mm: centre at -25.2 + 31.5 * 0.8 = 0.
    assert field_of_view_centre_x(two_lesions.headers) == pytest.approx(0.0, abs=1e-6)


def test_classification_threshold() -> None:
    """Cancerous at or above the threshold; probabilities outside [0, 1] are refused."""
    assert classify(0.5, 0.5) is StudyClassification.CANCEROUS
    assert classify(0.49, 0.5) is StudyClassification.NON_CANCEROUS
    assert StudyClassification.CANCEROUS.code == codes.PRESENT
    with pytest.raises(ValueError, match="probability"):
        classify(1.5, 0.5)


def test_segments_need_their_segmentation(two_lesions: CTCase) -> None:
    """Lesion groups without the SEG they reference are refused."""
    uids = _uids(two_lesions)
    with pytest.raises(ValueError, match="segmentation"):
        build_report(
            two_lesions.headers,
            plan_segments(two_lesions.lesion_map.lesions, uids=uids, max_segments=20),
            segmentation=None,
            lesion_count=2,
            study_probability=0.8,
            study_threshold=0.5,
            uids=uids,
            producer=PRODUCER,
            series_number=9102,
            series_description="AI",
        )
