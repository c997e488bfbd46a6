"""Tests for ``write_results``: the files a job leaves, through bytes, readers and dciodvfy.

dciodvfy (dicom3tools 1.00~20220618) reports no errors and no warnings on the SEG and SR files
written here (BINARY and FRACTIONAL SEG; SR with and without lesions).
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.config import ResultsSettings
from dicom_node.pipeline import ReportReference, earlier_reports
from dicom_node.results import codes
from dicom_node.results.writer import ResultFiles, SourceSlice, write_results
from tests.results.conftest import TWO_SPHERES, CTCase, Dciodvfy, make_case, report_content


def _write(
    case: CTCase,
    out: Path,
    settings: ResultsSettings | None = None,
    *,
    job_version: int = 1,
    earlier_reports: tuple[ReportReference, ...] = (),
    analysed_series: tuple[str, ...] = (),
    present_series: tuple[str, ...] = (),
    slices: list[SourceSlice] | None = None,
) -> ResultFiles:
    return write_results(
        source_files=case.files,
        labels=case.lesion_map.labels,
        probability=case.probability,
        lesions=case.lesion_map.lesions,
        study_probability=0.75,
        study_threshold=0.5,
        image_probabilities=[0.2] * len(case.files),
        model_name="lung-ct",
        model_version="1.2.0",
        job_version=job_version,
        settings=settings or ResultsSettings(),
        uid_root="2.25",
        out_dir=out,
        earlier_reports=earlier_reports,
        analysed_series=analysed_series,
        present_series=present_series,
        slices=slices,
    )


def _check_file(path: Path, dciodvfy: Dciodvfy) -> None:
    data = path.read_bytes()
    assert data[128:132] == b"DICM"  # enforce_file_format: preamble and File Meta
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert warnings == [], warnings


def test_writes_seg_and_sr_that_read_back(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """A job with lesions leaves a SEG and an SR, both whole DICOM files that pass dciodvfy,
    in the configured series, named by their SOP Instance UIDs; no partial file remains."""
    files = _write(two_lesions, tmp_path / "out")
    assert files.seg is not None
    assert files.seg.name == f"SEG_{files.uids.seg_instance}.dcm"
    assert files.sr.name == f"SR_{files.uids.sr_instance}.dcm"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [files.seg.name, files.sr.name]
    )
    for path in (files.seg, files.sr):
        _check_file(path, dciodvfy)

    seg = hd.seg.segread(files.seg)
    assert seg.SeriesNumber == 9101
    assert seg.SeriesDescription == "AI lung lesions (dicom-node)"
    assert seg.number_of_segments == 2
    sr = hd.sr.srread(files.sr)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SeriesNumber == 9102
    assert len(report_content(sr).get_volumetric_roi_measurement_groups()) == 2
    assert files.read_seconds >= 0 and files.seg_seconds > 0 and files.sr_seconds > 0


def _without_times(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` without what differs between two builds: creation times, highdicom's random
    Dimension Organization UID."""
    for keyword in (
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "SeriesDate",
        "SeriesTime",
        "ContributingEquipmentSequence",
        "DimensionOrganizationSequence",
        "DimensionIndexSequence",
    ):
        if keyword in ds:
            del ds[keyword]
    return ds


def test_given_the_slices_only_their_lesions_files_are_read_and_the_results_are_the_same(
    tmp_path: Path, dciodvfy: Dciodvfy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With each slice's UID and position from the caller, only the files of the first and
    last slice and of the lesions' slices are read, and the SEG and SR are those written from
    every header: the same frames, references and report. The SEG references just the images
    its frames derive from, and reads back to the label map."""
    case = make_case(tmp_path / "ct", [(9.0, 32.0, 20.0, 5.0)], slices=20, size=64)
    [lesion] = case.lesion_map.lesions
    assert lesion.first_slice > 1 and lesion.last_slice < 18
    slices = [
        SourceSlice(
            sop_instance_uid=str(ds.SOPInstanceUID),
            position_mm=tuple(float(v) for v in ds.ImagePositionPatient),  # type: ignore[arg-type]
        )
        for ds in case.headers
    ]
    everything = _write(case, tmp_path / "all")
    read: list[Path] = []
    dcmread = pydicom.dcmread

    def counting(path: Path, **kwargs: object) -> pydicom.Dataset:
        read.append(Path(path))
        return dcmread(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmread", counting)
    files = _write(case, tmp_path / "some", slices=slices)
    monkeypatch.undo()
    lesion_slices = range(lesion.first_slice, lesion.last_slice + 1)
    assert set(read) == {case.files[k] for k in (0, len(case.files) - 1, *lesion_slices)}

    assert files.seg is not None and everything.seg is not None
    for path in (files.seg, files.sr):
        _check_file(path, dciodvfy)
    assert _without_times(pydicom.dcmread(files.sr)) == _without_times(
        pydicom.dcmread(everything.sr)
    )
    seg, before = pydicom.dcmread(files.seg), pydicom.dcmread(everything.seg)
    assert seg.PixelData == before.PixelData
    assert seg.PerFrameFunctionalGroupsSequence == before.PerFrameFunctionalGroupsSequence
    assert seg.SegmentSequence == before.SegmentSequence

    holding = {str(case.headers[k].SOPInstanceUID) for k in lesion_slices}
    [series] = seg.ReferencedSeriesSequence
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence} == holding
    read_back = hd.seg.segread(files.seg)
    assert {uid for _, _, uid in read_back.get_source_image_uids()} == holding
    volume = read_back.get_volume(combine_segments=True)
    assert volume is not None
    labels = case.lesion_map.labels[lesion.first_slice : lesion.last_slice + 1]
    assert volume.array.shape[:3] == labels.shape
    assert (volume.array.astype(bool) == (labels == lesion.label)).all()


def test_no_lesion_writes_only_the_sr(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """A job without lesions writes no SEG and an SR that says "no lesion"."""
    case = make_case(tmp_path / "ct", [], slices=4, size=32)
    files = _write(case, tmp_path / "out")
    assert files.seg is None
    _check_file(files.sr, dciodvfy)
    sr = hd.sr.srread(files.sr)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    [group] = report_content(sr).get_image_measurement_groups()
    [lesion] = group.get_qualitative_evaluations(name=codes.LESION)
    assert lesion.value == codes.ABSENT


def test_fractional_is_a_setting(two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """``segmentation_type: fractional`` writes a FRACTIONAL (probability) SEG."""
    files = _write(two_lesions, tmp_path / "out", ResultsSettings(segmentation_type="fractional"))
    assert files.seg is not None
    _check_file(files.seg, dciodvfy)
    ds = pydicom.dcmread(files.seg, stop_before_pixels=True)
    assert ds.SegmentationType == "FRACTIONAL"
    assert ds.BitsAllocated == 8


def test_source_files_of_two_series_are_refused(two_lesions: CTCase, tmp_path: Path) -> None:
    """Source files must form one series (the analysed one)."""
    other = make_case(tmp_path / "other", [], slices=1, size=64)
    mixed = CTCase(
        files=[*two_lesions.files[:-1], other.files[0]],
        headers=two_lesions.headers,
        study=two_lesions.study,
        hu=two_lesions.hu,
        probability=two_lesions.probability,
        lesion_map=two_lesions.lesion_map,
    )
    with pytest.raises(ValueError, match="series"):
        _write(mixed, tmp_path / "out")


def test_a_new_version_names_the_report_it_revises(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """Version 2 of a study, given what version 1 sent: its SR lists version 1's SR in the
    Predecessor Documents Sequence (a viewer shows it as a revision), and passes dciodvfy.
    From the output files of a result kept without its reports (before they were kept): files
    that are gone, the SEG, and an SR of another study are passed over."""
    first = _write(two_lesions, tmp_path / "v1")
    other = make_case(tmp_path / "other-ct", [], slices=4, size=32)  # another study
    elsewhere = _write(other, tmp_path / "other")
    assert first.seg is not None
    outputs = (first.seg, first.sr, elsewhere.sr, tmp_path / "v1" / "gone.dcm")
    earlier = earlier_reports({"outputs": [str(p) for p in outputs]})
    assert len(earlier) == 2  # the two SRs
    second = _write(two_lesions, tmp_path / "v2", job_version=2, earlier_reports=earlier)
    _check_file(second.sr, dciodvfy)
    sr = pydicom.dcmread(second.sr)
    [study] = sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == sr.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    [instance] = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == first.uids.sr_instance
    assert series.SeriesInstanceUID == first.uids.sr_series
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(first.sr)


def test_a_new_version_names_its_predecessor_after_the_files_are_gone(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """The reports a job's result keeps name the predecessor when retention has deleted the
    earlier version's files (a study sent again days later): the same Predecessor Documents
    Sequence as from the file itself. A kept entry that is not a reference is passed over."""
    first = _write(two_lesions, tmp_path / "v1")
    from_file = ReportReference.read(first.sr)
    assert from_file is not None
    assert first.seg is not None and ReportReference.read(first.seg) is None  # not a report
    kept = {"reports": [from_file.as_json(), {"sop_class_uid": 1}, "x"], "outputs": []}
    for path in (first.sr, first.seg):
        path.unlink()
    earlier = earlier_reports(kept)
    assert earlier == (from_file,)
    second = _write(two_lesions, tmp_path / "v2", job_version=2, earlier_reports=earlier)
    _check_file(second.sr, dciodvfy)
    [study] = pydicom.dcmread(second.sr).PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.uids.sr_series
    [instance] = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == first.uids.sr_instance
    assert instance.ReferencedSOPClassUID == pydicom.uid.Comprehensive3DSRStorage


def _rewrite(case: CTCase, **attributes: object) -> None:
    """Change attributes of every source file in place."""
    for path in case.files:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # PS3.5 H.3.1
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),  # PS3.5 I.2
        (["ISO 2022 IR 6", "ISO 2022 IR 58"], "Zhang^XiaoDong=张^小东="),  # PS3.5 K.2
    ],
)
def test_iso_2022_studies_get_results_in_their_character_set(
    tmp_path: Path, dciodvfy: Dciodvfy, charset: list[str], name: str
) -> None:
    """Japanese, Korean and Chinese studies in ISO 2022 (highdicom refuses a first value that
    is empty, the form PS3.5's examples use) get a SEG and an SR in the study's character set,
    the patient's name byte for byte the source's."""
    case = make_case(tmp_path / "ct", TWO_SPHERES)
    _rewrite(case, SpecificCharacterSet=charset, PatientName=name)
    source = pydicom.dcmread(case.files[0])
    files = _write(case, tmp_path / "out")
    assert files.seg is not None
    for path in (files.seg, files.sr):
        _check_file(path, dciodvfy)
        written = pydicom.dcmread(path)
        assert written.SpecificCharacterSet == source.SpecificCharacterSet
        assert written.get_item("PatientName").value == source.get_item("PatientName").value


def test_a_fractional_seg_of_one_lesion(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """One lesion in a FRACTIONAL SEG (highdicom then shares its segment and source image
    among the frames) stores the probability over the lesion."""
    case = make_case(tmp_path / "ct", TWO_SPHERES[:1])
    files = _write(case, tmp_path / "out", ResultsSettings(segmentation_type="fractional"))
    assert files.seg is not None
    _check_file(files.seg, dciodvfy)
    seg = pydicom.dcmread(files.seg)
    assert seg.SegmentationType == "FRACTIONAL"
    assert 0 < int(seg.pixel_array.max()) <= 255


@pytest.mark.parametrize("absent", [False, True], ids=["empty", "absent"])
def test_a_source_without_slice_thickness_gets_results(
    tmp_path: Path, dciodvfy: Dciodvfy, absent: bool
) -> None:
    """Slice Thickness is Type 2 in a CT image: a source that leaves it empty (or, against the
    standard, out) gets a SEG and an SR that give the spacing between its slices instead."""
    case = make_case(tmp_path / "ct", TWO_SPHERES)
    for path in case.files:
        ds = pydicom.dcmread(path)
        if absent:
            del ds.SliceThickness
        else:
            ds.SliceThickness = None
        ds.save_as(path, enforce_file_format=True)
    files = _write(case, tmp_path / "out")
    assert files.seg is not None
    for path in (files.seg, files.sr):
        _check_file(path, dciodvfy)
    seg = pydicom.dcmread(files.seg, stop_before_pixels=True)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    positions = sorted(float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in case.files)
    assert float(measures.SliceThickness) == pytest.approx(positions[1] - positions[0], abs=1e-3)


def test_a_new_version_on_another_series_revises_the_report_it_replaces(
    two_lesions: CTCase, tmp_path: Path, dciodvfy: Dciodvfy
) -> None:
    """Version 2 analyses another series of the study (a thinner one that arrived later and
    was chosen in place of the first): its SR names version 1's, whose series this version no
    longer analyses. Where version 2 analyses both series (policy ``all``), the first series'
    new report revises it, and the other one's names none; where version 2 does not hold the
    first series at all (retention deleted the study, and it was sent again with the thinner
    series alone), it revises nothing: that report is about a series it never saw."""
    first = _write(two_lesions, tmp_path / "v1")
    thinner = make_case(tmp_path / "thin", TWO_SPHERES)
    study = str(pydicom.dcmread(two_lesions.files[0]).StudyInstanceUID)
    _rewrite(thinner, StudyInstanceUID=study)
    source_series = str(pydicom.dcmread(two_lesions.files[0]).SeriesInstanceUID)
    thin_series = str(pydicom.dcmread(thinner.files[0]).SeriesInstanceUID)
    second = _write(
        thinner,
        tmp_path / "v2",
        job_version=2,
        earlier_reports=earlier_reports({"outputs": [str(first.sr)]}),
        analysed_series=(thin_series,),
        present_series=(source_series, thin_series),
    )
    _check_file(second.sr, dciodvfy)
    [revised] = pydicom.dcmread(second.sr).PredecessorDocumentsSequence
    [series] = revised.ReferencedSeriesSequence
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.uids.sr_instance
    both = _write(
        thinner,
        tmp_path / "v2-all",
        job_version=2,
        earlier_reports=earlier_reports({"outputs": [str(first.sr)]}),
        analysed_series=(source_series, thin_series),
        present_series=(source_series, thin_series),
    )
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(both.sr)
    alone = _write(
        thinner,
        tmp_path / "v2-alone",
        job_version=2,
        earlier_reports=earlier_reports({"outputs": [str(first.sr)]}),
        analysed_series=(thin_series,),
        present_series=(thin_series,),
    )
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(alone.sr)


@pytest.mark.parametrize("offset", ["+0900", "-0330"])
def test_results_keep_the_sources_timezone_and_tell_their_own_times_in_it(
    tmp_path: Path,
    dciodvfy: Dciodvfy,
    monkeypatch: pytest.MonkeyPatch,
    offset: str,
) -> None:
    """A source that states its Timezone Offset From UTC (which applies to every date and time
    of an instance, its Study Date and Time among them): the SEG and SR state the same one,
    and their own creation and content times, made on a node that runs on UTC, are given in
    it. A source without one gets results without one."""
    import datetime
    import time

    case = make_case(tmp_path / "ct", TWO_SPHERES)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        plain = _write(case, tmp_path / "plain")
        _rewrite(case, TimezoneOffsetFromUTC=offset)
        before = datetime.datetime.now(datetime.UTC)
        files = _write(case, tmp_path / "out")
        after = datetime.datetime.now(datetime.UTC)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert plain.seg is not None and files.seg is not None
    assert "TimezoneOffsetFromUTC" not in pydicom.dcmread(plain.sr)
    sign = -1 if offset[0] == "-" else 1
    span = datetime.timedelta(hours=int(offset[1:3]), minutes=int(offset[3:]))
    zone = datetime.timezone(sign * span)
    for path in (files.seg, files.sr):
        _check_file(path, dciodvfy)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.TimezoneOffsetFromUTC == offset
        for date, clock in (
            ("InstanceCreationDate", "InstanceCreationTime"),
            ("ContentDate", "ContentTime"),
        ):
            there = datetime.datetime.strptime(
                f"{ds[date].value}{str(ds[clock].value)[:6]}", "%Y%m%d%H%M%S"
            ).replace(tzinfo=zone)
            assert before - datetime.timedelta(seconds=1) <= there <= after, (path.name, date)
