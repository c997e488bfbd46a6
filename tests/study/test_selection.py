"""Series selection: the configured rules, the reasons a series fails, and the policy."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, JPEGLSLossless, JPEGLSNearLossless

from dicom_node.config import SelectionSettings, load_config
from dicom_node.errors import ConfigError, DatasetError, PipelineError, StudySkipped
from dicom_node.study.headers import InstanceHeader, read_headers
from dicom_node.study.selection import select_series
from dicom_node.study.volume import load_volume
from dicom_node.training.ctseries import (
    CORONAL_ORIENTATION,
    SeriesSpec,
    StudyIdentity,
    write_enhanced_ct,
    write_localizer,
)
from tests.study.conftest import WriteSeries, hu_volume

DEFAULTS = SelectionSettings()


def _headers(*groups: list[Path]) -> list[InstanceHeader]:
    return [h for paths in groups for h in read_headers(paths)]


def _scout(tmp_path: Path, study: StudyIdentity, number: int = 3) -> list[Path]:
    spec = SeriesSpec(series_number=number, series_description="Scout")
    path = write_localizer(
        hu_volume(20, 16, 16),
        tmp_path / "scout",
        spacing_mm=(5.0, 0.7, 0.7),
        study=study,
        series=spec,
    )
    return [path]


def test_thin_series_chosen_over_localizer_and_thick(
    write_series: WriteSeries, tmp_path: Path, study: StudyIdentity
) -> None:
    """Localizer + 5 mm + 1 mm recon: the 1 mm series is chosen; the others say why not."""
    thin = write_series("thin", SeriesSpec(series_number=4, series_description="Lung 1mm"))
    thick = write_series(
        "thick",
        SeriesSpec(series_number=5, series_description="Lung 5mm"),
        n_slices=20,
        spacing_mm=(5.0, 0.7, 0.7),
    )
    selection = select_series(_headers(_scout(tmp_path, study), thick, thin), settings=DEFAULTS)
    (chosen,) = selection.chosen
    assert chosen.label == "series 4"
    assert chosen.number_of_slices == 24
    assert chosen.plan.spacing_mm[0] == pytest.approx(1.0)
    assert [str(r) for r in selection.rejected] == [
        "series 3: localizer",
        "series 5: slice thickness 5.0 > 2.5 mm",
    ]
    # the plan is what the volume is decoded from: headers are not read again
    volume = load_volume(chosen.plan)
    assert volume.shape == (24, 16, 16)


def test_only_failing_series_skip_the_study_with_one_reason_each(
    write_series: WriteSeries, tmp_path: Path, study: StudyIdentity
) -> None:
    """No series qualifies: StudySkipped names every series and its failed rule, no patient data."""
    thick = write_series(
        "thick",
        SeriesSpec(series_number=5, series_description="Lung 5mm"),
        n_slices=20,
        spacing_mm=(5.0, 0.7, 0.7),
    )
    with pytest.raises(StudySkipped) as err:
        select_series(_headers(thick, _scout(tmp_path, study)), settings=DEFAULTS)
    message = str(err.value)
    assert message == (
        "no series qualifies for analysis: series 3: localizer; "
        "series 5: slice thickness 5.0 > 2.5 mm"
    )
    for private in (study.patient_name, study.patient_id, study.accession_number):
        assert private not in message


def test_coronal_series_is_rejected_by_the_orientation_tolerance(
    write_series: WriteSeries,
) -> None:
    """A coronal reformat fails 'axial', computed from Image Orientation (Patient)."""
    spec = SeriesSpec(
        series_number=7, series_description="Cor", image_orientation=CORONAL_ORIENTATION
    )
    paths = write_series("cor", spec)
    with pytest.raises(StudySkipped) as err:
        select_series(_headers(paths), settings=DEFAULTS)
    assert str(err.value).endswith(
        "series 7: coronal, not axial (slice normal 90.0° from the patient z axis, more than 10°)"
    )


def test_oblique_axial_passes_or_fails_by_the_configured_tolerance(
    write_series: WriteSeries,
) -> None:
    """An axial series tipped 5° qualifies at a 10° tolerance and fails at 2°."""
    c, s = math.cos(math.radians(5.0)), math.sin(math.radians(5.0))
    spec = SeriesSpec(image_orientation=(1.0, 0.0, 0.0, 0.0, c, s))
    paths = write_series("obl", spec)
    assert select_series(_headers(paths), settings=DEFAULTS).chosen
    strict = SelectionSettings(axial_tolerance_deg=2.0)
    with pytest.raises(StudySkipped, match=r"oblique, not axial \(slice normal 5\.0°"):
        select_series(_headers(paths), settings=strict)


def test_policy_all_returns_every_qualifying_series_best_first(
    write_series: WriteSeries,
) -> None:
    """Two qualifying recons of the same stretch: ``best`` keeps the thinner, ``all`` keeps
    both, thinner first."""
    two = write_series(
        "two", SeriesSpec(series_number=2, series_description="2mm"), spacing_mm=(2.0, 0.7, 0.7)
    )
    one = write_series("one", SeriesSpec(series_number=3, series_description="1mm"), n_slices=47)
    headers = _headers(two, one)
    best = select_series(headers, settings=DEFAULTS)
    assert [c.series_number for c in best.chosen] == [3]
    assert [c.series_number for c in best.passed_over] == [2]
    every = select_series(headers, settings=SelectionSettings(policy="all"))
    assert [c.series_number for c in every.chosen] == [3, 2]
    assert every.passed_over == ()


def test_ties_go_to_more_slices_then_original(write_series: WriteSeries) -> None:
    """Same spacing: the series with more slices wins; same count: ORIGINAL\\PRIMARY wins."""
    short = write_series("short", SeriesSpec(series_number=1), n_slices=22)
    derived = write_series(
        "derived",
        SeriesSpec(series_number=2, image_type=("DERIVED", "SECONDARY", "AXIAL")),
        n_slices=24,
    )
    original = write_series("original", SeriesSpec(series_number=3), n_slices=24)
    chosen = select_series(_headers(short, derived, original), settings=DEFAULTS).chosen
    assert chosen[0].series_number == 3
    chosen = select_series(_headers(short, derived), settings=DEFAULTS).chosen
    assert chosen[0].series_number == 2
    strict = SelectionSettings(require_original_primary=True)
    with pytest.raises(StudySkipped, match=r"not ORIGINAL\\PRIMARY \(DERIVED\\SECONDARY\)"):
        select_series(_headers(derived), settings=strict)


def test_a_targeted_reconstruction_does_not_beat_the_whole_chest(
    write_series: WriteSeries,
) -> None:
    """A thinner reconstruction of part of the field of view (one lung, a quarter of the area)
    is not chosen over the whole-chest series; among series covering the same, the thinner
    one still is."""
    chest = write_series(
        "chest", SeriesSpec(series_number=2), n_slices=30, spacing_mm=(1.0, 0.7, 0.7)
    )
    target = write_series(
        "target", SeriesSpec(series_number=3), n_slices=60, spacing_mm=(0.5, 0.35, 0.35)
    )
    thin_chest = write_series(
        "thin", SeriesSpec(series_number=4), n_slices=59, spacing_mm=(0.5, 0.7, 0.7)
    )
    chosen = select_series(_headers(chest, target), settings=DEFAULTS).chosen
    assert [c.series_number for c in chosen] == [2]
    chosen = select_series(_headers(chest, target, thin_chest), settings=DEFAULTS).chosen
    assert [c.series_number for c in chosen] == [4]


def test_a_thin_lung_series_is_not_passed_over_for_a_wider_or_longer_thick_one(
    write_series: WriteSeries,
) -> None:
    """What a chest CT study holds, on 16-pixel images with the sites' fields of view: the
    1 mm lung reconstruction at 350 mm is chosen over the 2 mm soft-tissue one at 400 mm (they
    cover the same chest; the volume ratio, 0.77, had set it aside), and a 1.5 mm chest series
    of 270 mm over a 2.5 mm chest-abdomen-pelvis one twice as long. A few centimetres of thin
    slices around a finding, or 200 mm of them over the upper lobes, still do not beat the
    whole chest; nor, where no series covers by both measures (a child's chest of 150 mm at
    250 mm beside a targeted reconstruction of 180 mm at 180 mm), does the thinner part."""
    lung = write_series(
        "lung", SeriesSpec(series_number=3), n_slices=41, spacing_mm=(1.0, 21.875, 21.875)
    )
    soft = write_series(
        "soft", SeriesSpec(series_number=4), n_slices=21, spacing_mm=(2.0, 25.0, 25.0)
    )
    chosen = select_series(_headers(soft, lung), settings=DEFAULTS).chosen
    assert [c.series_number for c in chosen] == [3]

    chest = write_series(
        "chest", SeriesSpec(series_number=5), n_slices=181, spacing_mm=(1.5, 22.0, 22.0)
    )
    body = write_series(
        "body", SeriesSpec(series_number=6), n_slices=241, spacing_mm=(2.5, 22.0, 22.0)
    )
    chosen = select_series(_headers(body, chest), settings=DEFAULTS).chosen
    assert [c.series_number for c in chosen] == [5]
    around = write_series(
        "around", SeriesSpec(series_number=7), n_slices=61, spacing_mm=(0.5, 22.0, 22.0)
    )
    chosen = select_series(_headers(body, around), settings=DEFAULTS).chosen
    assert [c.series_number for c in chosen] == [6]
    whole = write_series(
        "whole", SeriesSpec(series_number=8), n_slices=257, spacing_mm=(1.25, 22.0, 22.0)
    )
    upper = write_series(
        "upper", SeriesSpec(series_number=9), n_slices=321, spacing_mm=(0.625, 22.0, 22.0)
    )
    chosen = select_series(_headers(whole, upper), settings=DEFAULTS).chosen
    assert [c.series_number for c in chosen] == [8]
    child = write_series(
        "child", SeriesSpec(series_number=10), n_slices=121, spacing_mm=(1.25, 15.625, 15.625)
    )
    targeted = write_series(
        "targeted", SeriesSpec(series_number=11), n_slices=289, spacing_mm=(0.625, 11.25, 11.25)
    )
    chosen = select_series(_headers(child, targeted), settings=DEFAULTS).chosen
    assert [c.series_number for c in chosen] == [10]


def test_scout_filed_inside_the_axial_series_is_left_out(
    write_series: WriteSeries, tmp_path: Path, study: StudyIdentity
) -> None:
    """A localizer image with the axial series' UID is dropped; the axial images still qualify."""
    spec = SeriesSpec(series_number=2, series_description="Chest")
    axial = write_series("axial", spec)
    scout = write_localizer(
        hu_volume(20), tmp_path / "scout", spacing_mm=(1.0, 0.7, 0.7), study=study, series=spec
    )
    (chosen,) = select_series(_headers(axial, [scout]), settings=DEFAULTS).chosen
    assert chosen.left_out == 1
    assert chosen.number_of_slices == 24


def test_gap_in_the_thin_series_falls_back_to_a_sound_one(write_series: WriteSeries) -> None:
    """A thin series with a missing slice is rejected with the gap; a sound series is chosen."""
    positions = [float(k) for k in range(25) if k != 12]
    gappy = write_series(
        "gappy", SeriesSpec(series_number=3, series_description="thin"), positions_mm=positions
    )
    sound = write_series(
        "sound", SeriesSpec(series_number=4, series_description="2mm"), spacing_mm=(2.0, 0.7, 0.7)
    )
    selection = select_series(_headers(gappy, sound), settings=DEFAULTS)
    assert selection.chosen[0].series_number == 4
    (rejected,) = selection.rejected
    assert str(rejected) == ("series 3: missing slice: gap of 2.0 mm at z=11.0 mm, expected 1.0 mm")


def test_spacing_and_slice_count_rules(write_series: WriteSeries) -> None:
    """Too few slices, and slices farther apart than allowed, fail with the numbers."""
    few = write_series("few", SeriesSpec(series_number=1, series_description="few"), n_slices=8)
    sparse = write_series(
        "sparse",
        SeriesSpec(series_number=2, series_description="gapped", slice_thickness=1.0),
        spacing_mm=(3.0, 0.7, 0.7),
    )
    with pytest.raises(StudySkipped) as err:
        select_series(_headers(few, sparse), settings=DEFAULTS)
    assert str(err.value) == (
        "no series qualifies for analysis: series 1: 8 slices < 20; "
        "series 2: slice spacing 3.0 > 2.5 mm"
    )


def test_body_part_and_description_patterns(write_series: WriteSeries) -> None:
    """Include and exclude patterns (case-insensitive) on body part and description."""
    head = write_series(
        "head", SeriesSpec(series_number=1, series_description="Head", body_part_examined="HEAD")
    )
    mip = write_series("mip", SeriesSpec(series_number=2, series_description="Lung MIP 1mm"))
    settings = SelectionSettings(body_part_include=("chest|lung",), description_exclude=("mip",))
    with pytest.raises(StudySkipped) as err:
        select_series(_headers(head, mip), settings=settings)
    assert str(err.value) == (
        'no series qualifies for analysis: series 1: body part "HEAD" matches no include '
        "pattern; series 2: series description matches exclude "
        'pattern "mip"'
    )


def test_enhanced_ct_counts_its_frames_as_slices(tmp_path: Path, study: StudyIdentity) -> None:
    """An Enhanced CT file of 24 frames qualifies as a 24-slice series."""
    path = write_enhanced_ct(
        hu_volume(24),
        tmp_path / "e.dcm",
        spacing_mm=(1.0, 0.7, 0.7),
        study=study,
        series=SeriesSpec(series_number=9),
    )
    (chosen,) = select_series(read_headers([path]), settings=DEFAULTS).chosen
    assert chosen.number_of_slices == 24


def test_non_ct_instances_and_lossy_images_fail_their_rules(write_series: WriteSeries) -> None:
    """Another modality or SOP class, and lossy compression, are reasons; all are listed."""
    ct = read_headers(write_series("ct", SeriesSpec(series_number=1, series_description="CT")))
    sr = dataclasses.replace(
        ct[0],
        series_instance_uid="1.2.3.4",
        series_number=99,
        series_description="Report",
        modality="SR",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
        frames=(),
    )
    lossy = [dataclasses.replace(h, lossy_compressed=True) for h in ct]
    with pytest.raises(StudySkipped) as err:
        select_series([*lossy, sr], settings=DEFAULTS)
    assert str(err.value) == (
        "no series qualifies for analysis: series 1: lossy compressed; "
        "series 99: modality SR, SOP class Comprehensive 3D SR Storage, no image"
    )
    assert select_series(lossy, settings=SelectionSettings(allow_lossy=True)).chosen


@pytest.mark.parametrize(
    ("syntax", "lossy_image_compression", "lossy"),
    [
        (JPEGLSNearLossless, None, True),
        (JPEG2000, None, True),
        (JPEG2000, "00", False),
        (JPEGLSNearLossless, "00", False),
        (JPEGLSLossless, None, False),
    ],
)
def test_a_syntax_that_may_be_lossy_counts_as_lossy_unless_the_image_says_not(
    write_series: WriteSeries, syntax: str, lossy_image_compression: str | None, lossy: bool
) -> None:
    """Lossy Image Compression is Type 3: JPEG-LS near-lossless and JPEG 2000 without it may
    have lost HU, and count as lossy unless it says "00"."""
    paths = write_series("ct", SeriesSpec(series_number=1))[:1]
    ds = pydicom.dcmread(paths[0])
    if lossy_image_compression is not None:
        ds.LossyImageCompression = lossy_image_compression
    ds.PixelData = encapsulate([ds.PixelData])  # the header is read, not the pixels
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(paths[0], enforce_file_format=True)
    [header] = read_headers(paths)
    assert header.lossy_compressed is lossy


def test_a_frame_count_the_file_does_not_hold_is_refused(write_series: WriteSeries) -> None:
    """A CT claiming a million frames without a per-frame item for each is unreadable, at
    once (its count would otherwise make a million frame headers)."""
    paths = write_series("ct", SeriesSpec(series_number=1))
    ds = pydicom.dcmread(paths[0])
    ds.NumberOfFrames = 1_000_000
    ds.save_as(paths[0], enforce_file_format=True)
    with pytest.raises(DatasetError, match="Number of Frames is 1000000 but the Per-frame"):
        read_headers(paths)


def test_instances_of_two_studies_are_an_error(write_series: WriteSeries) -> None:
    """Selection works on one study; instances of two are a pipeline error."""
    headers = read_headers(write_series("a", SeriesSpec()))
    other = dataclasses.replace(headers[0], study_instance_uid="1.2.3")
    with pytest.raises(PipelineError, match="2 studies"):
        select_series([*headers, other], settings=DEFAULTS)


def test_selection_config_errors_name_the_key() -> None:
    """Bad selection settings fail at load with the key's path, the value and what was expected."""
    with pytest.raises(ConfigError) as err:
        load_config(
            overrides={
                "selection": {
                    "max_slice_spacing_mm": -1,
                    "description_exclude": ["("],
                    "modalities": ["ct"],
                    "geometry": {"spacing_tolerance": 2},
                }
            }
        )
    message = str(err.value)
    assert "selection.max_slice_spacing_mm: -1 is not a length in mm (a positive number)" in message
    assert 'selection.description_exclude[0]: "(" is not a regular expression' in message
    assert 'selection.modalities[0]: "ct" is not a DICOM code string' in message
    assert "selection.geometry.spacing_tolerance: 2 is not a fraction" in message
    assert load_config().selection == SelectionSettings()


def test_a_site_prefers_kernels_then_contrast_before_slice_spacing(
    write_series: WriteSeries, tmp_path: Path, study: StudyIdentity
) -> None:
    """Sharp 1 mm, soft 1.5 mm with contrast, soft 1.5 mm without: by default the thinnest
    wins; with kernel patterns the soft ones do, and of those the one the contrast rule
    wants. Enhanced CT's kernel is read from its CT Reconstruction group."""
    sharp = write_series(
        "sharp", SeriesSpec(series_number=1, convolution_kernel="B70f"), n_slices=30
    )
    soft_cm = write_series(
        "soft_cm",
        SeriesSpec(series_number=2, convolution_kernel="B31f"),
        n_slices=20,
        spacing_mm=(1.5, 0.7, 0.7),
    )
    for path in soft_cm:
        ds = pydicom.dcmread(path)
        ds.ContrastBolusAgent = "IOPAMIDOL"
        ds.save_as(path)
    soft = write_series(
        "soft",
        SeriesSpec(series_number=3, convolution_kernel="B31f"),
        n_slices=20,
        spacing_mm=(1.5, 0.7, 0.7),
    )
    headers = _headers(sharp, soft_cm, soft)

    def chosen(**settings: object) -> int | None:
        picked = select_series(headers, settings=SelectionSettings(**settings)).chosen  # type: ignore[arg-type]
        return picked[0].series_number

    assert chosen() == 1
    assert chosen(prefer_contrast="without") == 1  # not before the kernels: none are given
    assert chosen(prefer_kernels=("b3", "b4")) == 2  # the lower number of two soft ones
    assert chosen(prefer_kernels=("b3",), prefer_contrast="without") == 3
    assert chosen(prefer_kernels=("b3",), prefer_contrast="with") == 2
    assert chosen(prefer_kernels=("b9", "b7")) == 1
    # the policy "all" orders the same way
    every = select_series(
        headers,
        settings=SelectionSettings(policy="all", prefer_kernels=("b3",), prefer_contrast="without"),
    ).chosen
    assert [c.series_number for c in every] == [3, 2, 1]
    assert [c.contrast for c in every] == [False, True, False]

    enhanced = write_enhanced_ct(
        hu_volume(24),
        tmp_path / "e.dcm",
        spacing_mm=(1.0, 0.7, 0.7),
        study=study,
        series=SeriesSpec(series_number=9, convolution_kernel="LUNG"),
    )
    (header,) = read_headers([enhanced])
    assert header.convolution_kernel == "LUNG"
    assert not header.contrast


def test_contrast_is_read_from_the_agent_its_code_or_the_usage_sequence(tmp_path: Path) -> None:
    """Contrast/Bolus Agent text, its code sequence, or Contrast/Bolus Usage saying YES."""
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")

    def item(**attributes: object) -> pydicom.Dataset:
        ds = pydicom.Dataset()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        return ds

    cases = {
        "none": lambda ds: None,
        "agent": lambda ds: setattr(ds, "ContrastBolusAgent", "OMNIPAQUE"),
        "code": lambda ds: setattr(
            ds,
            "ContrastBolusAgentSequence",
            [item(CodeValue="C-B0300", CodingSchemeDesignator="SRT", CodeMeaning="x")],
        ),
        "usage_yes": lambda ds: setattr(
            ds,
            "ContrastBolusUsageSequence",
            [item(ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES")],
        ),
        "usage_no": lambda ds: setattr(
            ds,
            "ContrastBolusUsageSequence",
            [item(ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="NO")],
        ),
    }
    found = {}
    for name, edit in cases.items():
        ds = pydicom.dcmread(source)
        for keyword in ("ContrastBolusAgent", "ContrastBolusRoute"):
            if keyword in ds:
                del ds[keyword]
        edit(ds)
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path)
        (header,) = read_headers([path])
        found[name] = header.contrast
    assert found == {
        "none": False,
        "agent": True,
        "code": True,
        "usage_yes": True,
        "usage_no": False,
    }


def test_series_descriptions_are_quoted_only_where_patient_data_may_be_logged(
    write_series: WriteSeries, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Series Description is free text (a technologist may type a name into it): messages,
    logs and results name a series by its number, and quote its description only with
    ``logging.include_patient_data``."""
    mip = write_series("mip", SeriesSpec(series_number=2, series_description="MIP SMITH^JOHN"))
    settings = SelectionSettings(description_exclude=("mip",))
    with pytest.raises(StudySkipped) as err:
        select_series(_headers(mip), settings=settings)
    assert "SMITH" not in str(err.value)
    assert str(err.value).endswith('series 2: series description matches exclude pattern "mip"')
    monkeypatch.setattr("dicom_node.logs._include_identifiers", True)
    with pytest.raises(StudySkipped) as err:
        select_series(_headers(mip), settings=settings)
    assert str(err.value).endswith(
        'series 2 "MIP SMITH^JOHN": series description "MIP SMITH^JOHN" matches exclude pattern'
        ' "mip"'
    )
