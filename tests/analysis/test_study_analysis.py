"""A study with more than one series, one of which cannot be analysed: the others still are.

The tiny random model stands in for trained weights (see ``tiny_model_dir``): these tests check
which series are analysed and what the job learns about the others, never what a model finds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import RLELossless, generate_uid

from dicom_node.analysis.pipeline import AnalysisPipeline
from dicom_node.config import load_config
from dicom_node.errors import StudySkipped, VolumeDecodeError
from dicom_node.training.ctseries import (
    SeriesSpec,
    StudyIdentity,
    write_ct_series,
    write_enhanced_ct,
)
from dicom_node.training.phantom import SiteParameters, generate_phantom, write_phantom_dicom

STUDY = StudyIdentity.random(5)
FRAME_OF_REFERENCE = str(generate_uid())


def _pipeline(model: Path, **selection: object) -> AnalysisPipeline:
    config = load_config(
        overrides={
            "model": {"path": str(model)},
            "inference": {"device": "cpu", "batch_size": 8},
            "selection": selection,
        }
    )
    return AnalysisPipeline(config)


def _chest(out: Path, *, slices: int, spacing: float, number: int, description: str) -> list[Path]:
    site = SiteParameters(
        fov_mm=96 * 3.5,
        matrix=96,
        slice_thickness_mm=spacing,
        slice_spacing_mm=spacing,
        noise_sd_hu=0.0,
    )
    phantom = generate_phantom(
        seed=1,
        shape_zyx=(slices, 96, 96),
        spacing_mm=(spacing, 3.5, 3.5),
        site=site,
        tumour_probability=0.0,
    )
    return write_phantom_dicom(
        phantom,
        out,
        study=STUDY,
        series=SeriesSpec(
            series_number=number,
            series_description=description,
            frame_of_reference_uid=FRAME_OF_REFERENCE,
        ),
    )


def _head(out: Path) -> list[Path]:
    """An axial series of a head: water in a bony rim, no lung."""
    yy, xx = np.mgrid[0:96, 0:96]
    r = np.hypot(yy - 47.5, xx - 47.5)
    head = np.where(r < 36, 35, -1000).astype(np.int16)
    head[(r >= 33) & (r < 36)] = 1200
    return write_ct_series(
        np.repeat(head[None], 24, axis=0),
        out,
        spacing_mm=(1.0, 2.5, 2.5),
        study=STUDY,
        series=SeriesSpec(
            series_number=3,
            series_description="Head 1mm",
            body_part_examined="HEAD",
            frame_of_reference_uid=FRAME_OF_REFERENCE,
        ),
        origin_mm=(-120.0, -120.0, 100.0),
    )


def _corrupt_rle(path: Path) -> None:
    """Compress one image with RLE and break its segment count: it cannot be decoded."""
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    fragment = bytearray(next(generate_fragments(ds.PixelData)))
    fragment[0:4] = (1).to_bytes(4, "little")  # one segment where 16-bit data needs two
    ds.PixelData = encapsulate([bytes(fragment)])
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _chest(
        tmp_path_factory.mktemp("chest"), slices=24, spacing=2.0, number=2, description="Chest 2mm"
    )


def test_policy_all_analyses_the_chest_and_sets_the_head_aside(
    tiny_model_dir: Path, chest: list[Path], tmp_path: Path
) -> None:
    """Policy ``all``, a chest and a head series: the chest gets its results, the head is named
    as set aside (no lung), instead of the whole study being skipped and the chest's results
    written and never sent."""
    pipeline = _pipeline(tiny_model_dir, policy="all")
    findings = pipeline.analyse(chest + _head(tmp_path / "head"), out_dir=tmp_path / "out")
    assert [f.label for f in findings.series] == ["series 2"]
    [note] = findings.not_analysed
    assert note.startswith("series 3: no lung in the field of view")
    assert findings.outputs and all(p.exists() for p in findings.outputs)
    assert findings.summary()["not_analysed"] == [note]


def test_best_falls_back_to_the_next_series_when_the_chosen_one_cannot_be_decoded(
    tiny_model_dir: Path, chest: list[Path], tmp_path: Path
) -> None:
    """Policy ``best``: the chosen (thinner) series holds an image whose pixel data cannot be
    decoded; the series that qualified next is analysed in its place and the first is named
    with the file at fault. With no series left to try, the decoding error stands (the job
    fails, and is retried, as before)."""
    thin = _chest(tmp_path / "thin", slices=48, spacing=1.0, number=3, description="Lung 1mm")
    _corrupt_rle(thin[20])
    pipeline = _pipeline(tiny_model_dir)
    findings = pipeline.analyse(thin + chest, out_dir=tmp_path / "out")
    assert [f.label for f in findings.series] == ["series 2"]
    [note] = findings.not_analysed
    assert note.startswith("series 3: ") and thin[20].name in note
    with pytest.raises(VolumeDecodeError):
        pipeline.analyse(thin, out_dir=tmp_path / "alone")


def test_a_series_too_large_for_its_memory_is_set_aside_before_it_is_decoded(
    tiny_model_dir: Path, chest: list[Path], tmp_path: Path
) -> None:
    """Policy ``best`` with ``jobs.max_analysis_memory_mb`` of 3: the thinner series (48 slices
    of 96², about 4.6 MB to analyse) is set aside with its size and need, and the 2 mm one
    (24 slices, about 2.3 MB) is analysed in its place; alone, the study is skipped saying so."""
    thin = _chest(tmp_path / "thin", slices=48, spacing=1.0, number=3, description="Lung 1mm")
    config = load_config(
        overrides={
            "model": {"path": str(tiny_model_dir)},
            "inference": {"device": "cpu", "batch_size": 8},
            "jobs": {"max_analysis_memory_mb": 3},
        }
    )
    pipeline = AnalysisPipeline(config)
    findings = pipeline.analyse(thin + chest, out_dir=tmp_path / "out")
    assert [f.label for f in findings.series] == ["series 2"]
    assert findings.not_analysed == (
        "series 3: too large to analyse here (48 slices of 96x96: about 5 MB needed, 3 MB"
        " jobs.max_analysis_memory_mb)",
    )
    with pytest.raises(StudySkipped, match=r"series 3: too large to analyse here"):
        pipeline.analyse(thin, out_dir=tmp_path / "alone")


def test_an_unreadable_instance_sets_its_series_aside_not_the_study(
    tiny_model_dir: Path, chest: list[Path], tmp_path: Path
) -> None:
    """An instance of another series whose header cannot be parsed (an Enhanced CT with a
    per-frame item fewer than its frames; the receiver stored it, its pixel data being whole):
    with the series each file was received in, that series is set aside with the reason and
    the chest is analysed; without it, the file alone is left out."""
    enhanced = write_enhanced_ct(
        np.zeros((5, 16, 16), np.int16),
        tmp_path / "enh.dcm",
        spacing_mm=(5.0, 1.0, 1.0),
        study=STUDY,
        series=SeriesSpec(series_number=90, series_description="MPR sag"),
    )
    ds = pydicom.dcmread(enhanced)
    del ds.PerFrameFunctionalGroupsSequence[-1]
    ds.save_as(enhanced, enforce_file_format=True)
    pipeline = _pipeline(tiny_model_dir)
    series_of = {
        p: str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
        for p in [*chest, enhanced]
    }
    findings = pipeline.analyse([*chest, enhanced], out_dir=tmp_path / "out", series_of=series_of)
    assert [f.label for f in findings.series] == ["series 2"]
    [note] = findings.not_analysed
    assert "unreadable instance" in note and "Number of Frames" in note
    alone = pipeline.analyse([*chest, enhanced], out_dir=tmp_path / "alone")
    assert alone.not_analysed[0].startswith("unreadable instance left out: enh.dcm")


def test_best_does_not_fall_back_to_a_targeted_reconstruction(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The chosen whole-chest series cannot be decoded and the only other one is a thinner
    targeted reconstruction of part of the field of view: it is not analysed in its place (a
    report on one lung is no report on the chest); the decoding error stands."""
    whole = _chest(tmp_path / "whole", slices=24, spacing=2.0, number=2, description="Chest")
    _corrupt_rle(whole[10])
    site = SiteParameters(
        fov_mm=96 * 3.5, matrix=96, slice_thickness_mm=1.0, slice_spacing_mm=1.0, noise_sd_hu=0.0
    )
    phantom = generate_phantom(
        seed=1, shape_zyx=(48, 96, 96), spacing_mm=(1.0, 3.5, 3.5), site=site,
        tumour_probability=0.0,
    )  # fmt: skip
    part = np.ascontiguousarray(np.asarray(phantom.hu)[:, 24:72, 8:56])
    targeted = write_ct_series(
        part,
        tmp_path / "targeted",
        spacing_mm=(1.0, 3.5, 3.5),
        study=STUDY,
        series=SeriesSpec(
            series_number=3,
            series_description="R lung targeted",
            frame_of_reference_uid=FRAME_OF_REFERENCE,
        ),
        origin_mm=phantom.origin_mm,
    )
    with pytest.raises(VolumeDecodeError):
        _pipeline(tiny_model_dir).analyse(whole + targeted, out_dir=tmp_path / "out")
