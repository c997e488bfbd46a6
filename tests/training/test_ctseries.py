"""Tests for the synthetic CT writer: round trips through files, dciodvfy, UIDs, geometry.

dciodvfy warnings: none remain on the files these tests make (CT Image in all four syntaxes,
the localizer and the Enhanced CT file); the tests still print them to make a regression visible.
The localizer omits Rescale Type on purpose: dciodvfy warns on "HU" for an ORIGINAL LOCALIZER.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.training.ctseries import (
    CORONAL_ORIENTATION,
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    SeriesSpec,
    StudyIdentity,
    ct_slice_dataset,
    write_ct_series,
    write_enhanced_ct,
    write_localizer,
)

Dciodvfy = Callable[[Path], tuple[list[str], list[str]]]


def _volume(shape: tuple[int, int, int] = (6, 40, 48), seed: int = 0) -> np.ndarray:
    """A small int16 HU volume with air, lung, soft tissue and bone values."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1024, 1500, size=shape).astype(np.int16)
    vol[:, 0, 0] = -1024
    vol[:, -1, -1] = 1400
    return vol


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_round_trip_preserves_hu_and_geometry(tmp_path: Path) -> None:
    """Written slices read back with identical HU, spacing, orientation, positions and order."""
    vol = _volume()
    study = StudyIdentity.random(3)
    series = SeriesSpec(series_number=4, series_description="CHEST 2.5")
    files = write_ct_series(
        vol,
        tmp_path,
        spacing_mm=(2.5, 0.75, 0.8),
        origin_mm=(-18.0, -15.0, -100.0),
        study=study,
        series=series,
    )
    assert [f.name for f in files] == [f"IM{k:05d}.dcm" for k in range(vol.shape[0])]
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        np.testing.assert_array_equal(_hu(ds), vol[k])
        assert [float(v) for v in ds.PixelSpacing] == [0.75, 0.8]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(
            [-18.0, -15.0, -100.0 + 2.5 * k]
        )
        assert float(ds.SliceLocation) == pytest.approx(-100.0 + 2.5 * k)
        assert float(ds.SliceThickness) == 2.5
        assert ds.InstanceNumber == k + 1
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert ds.SeriesInstanceUID == series.series_instance_uid
        assert ds.SeriesNumber == 4
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.Rows == 40 and ds.Columns == 48


def test_pixel_representation_follows_the_stored_values(tmp_path: Path) -> None:
    """Values all >= the intercept are stored unsigned (12 bits); values below it need int16."""
    vol = _volume()
    series = SeriesSpec()
    study = StudyIdentity()
    unsigned = write_ct_series(
        vol, tmp_path / "u", spacing_mm=(1, 1, 1), study=study, series=series
    )[0]
    ds = pydicom.dcmread(unsigned)
    assert (ds.PixelRepresentation, ds.BitsStored, ds.HighBit) == (0, 12, 11)

    below = vol.copy()
    below[0, 1, 1] = -2000  # padding value below the intercept of -1024
    signed = write_ct_series(
        below, tmp_path / "s", spacing_mm=(1, 1, 1), study=study, series=series
    )[0]
    ds = pydicom.dcmread(signed)
    assert (ds.PixelRepresentation, ds.BitsStored) == (1, 16)
    np.testing.assert_array_equal(_hu(ds), below[0])


def test_float_volume_with_slope_rounds_to_the_rescale_step(tmp_path: Path) -> None:
    """A float volume is stored as round((hu - intercept) / slope) and reads back within slope/2."""
    rng = np.random.default_rng(1)
    vol = rng.uniform(-1000, 2000, size=(2, 16, 16))
    path = write_ct_series(
        vol,
        tmp_path,
        spacing_mm=(1, 1, 1),
        study=StudyIdentity(),
        series=SeriesSpec(),
        rescale_intercept=-1000.0,
        rescale_slope=0.5,
    )[1]
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleSlope) == 0.5
    assert np.max(np.abs(_hu(ds) - vol[1])) <= 0.25 + 1e-9


def test_values_that_cannot_be_stored_are_refused(tmp_path: Path) -> None:
    """A range that fits neither uint16 nor int16 raises instead of wrapping around."""
    vol = np.array([[[-40000.0, 30000.0]]])
    with pytest.raises(ValueError, match="fit neither"):
        write_ct_series(
            vol, tmp_path, spacing_mm=(1, 1, 1), study=StudyIdentity(), series=SeriesSpec()
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
    ids=lambda uid: uid.name,
)
def test_each_transfer_syntax_round_trips_and_passes_dciodvfy(
    tmp_path: Path, syntax: pydicom.uid.UID, dciodvfy: Dciodvfy
) -> None:
    """Every supported syntax is written as declared, decodes to the same HU, and is valid."""
    vol = _volume((2, 24, 20))
    vol[1, 2, 3] = -2048  # force int16, so big endian must swap signed values too
    files = write_ct_series(
        vol,
        tmp_path,
        spacing_mm=(1.25, 0.6, 0.6),
        study=StudyIdentity.random(5),
        series=SeriesSpec(),
        transfer_syntax=syntax,
    )
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(_hu(ds), vol[k])
    checked = files[1]
    if syntax == DeflatedExplicitVRLittleEndian:
        # dciodvfy (Debian dicom3tools 1.00~20220618) cannot read any deflated file, dcmtk's own
        # included: dcmtk must inflate ours, and dciodvfy checks the inflated dataset.
        checked = tmp_path / "inflated.dcm"
        subprocess.run(["/usr/bin/dcmconv", "+te", str(files[1]), str(checked)], check=True)
    errors, warnings = dciodvfy(checked)
    assert errors == [], errors
    print(warnings)


def test_unsupported_transfer_syntax_is_refused(tmp_path: Path) -> None:
    """Compressed syntaxes are made with dcmtk/gdcm; asking for one here raises."""
    with pytest.raises(ValueError, match="cannot be written here"):
        write_ct_series(
            _volume((1, 8, 8)),
            tmp_path,
            spacing_mm=(1, 1, 1),
            study=StudyIdentity(),
            series=SeriesSpec(),
            transfer_syntax=pydicom.uid.JPEGLSLossless,
        )


def test_instance_uids_are_deterministic_with_a_seed(tmp_path: Path) -> None:
    """The same seed gives the same SOP Instance UIDs; another seed or no seed gives new ones."""
    vol = _volume((3, 8, 8))
    study = StudyIdentity.random(11)
    series = SeriesSpec(series_instance_uid="1.2.3.4", frame_of_reference_uid="1.2.3.5")

    def uids(folder: str, seed: int | None) -> list[str]:
        files = write_ct_series(
            vol,
            tmp_path / folder,
            spacing_mm=(1, 1, 1),
            study=study,
            series=series,
            instance_uid_seed=seed,
        )
        return [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]

    first, again = uids("a", 7), uids("b", 7)
    assert first == again
    assert len(set(first)) == 3
    assert all(pydicom.uid.UID(u).is_valid for u in first)
    assert not set(uids("c", 8)) & set(first)
    assert not set(uids("d", None)) & set(first)


def test_random_study_identity_is_deterministic_by_seed() -> None:
    """StudyIdentity.random(seed) is repeatable, differs between seeds and accepts overrides."""
    a, b, c = StudyIdentity.random(1), StudyIdentity.random(1), StudyIdentity.random(2)
    assert a == b
    assert a != c
    assert a.study_instance_uid != c.study_instance_uid
    utf8 = StudyIdentity.random(1, specific_character_set="ISO_IR 192")
    assert utf8.specific_character_set == "ISO_IR 192"
    assert utf8.patient_id == a.patient_id


def test_non_ascii_name_is_stored_byte_exact_in_utf8(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """With ISO_IR 192 a non-Latin name is written as its UTF-8 bytes and reads back equal."""
    name = "Müller-Łukasiewicz^Zoë=山田^太郎"
    study = StudyIdentity(patient_name=name, specific_character_set="ISO_IR 192")
    path = write_ct_series(
        _volume((1, 8, 8)), tmp_path, spacing_mm=(1, 1, 1), study=study, series=SeriesSpec()
    )[0]
    raw = path.read_bytes()
    encoded = name.encode("utf-8")
    # PN (0010,0010), explicit VR LE: tag, "PN", 2-byte length, then the value (even-padded).
    header = b"\x10\x00\x10\x00PN"
    at = raw.index(header)
    length = int.from_bytes(raw[at + 6 : at + 8], "little")
    assert raw[at + 8 : at + 8 + len(encoded)] == encoded
    assert length == len(encoded) + len(encoded) % 2
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == name
    errors, _ = dciodvfy(path)
    assert errors == [], errors


def test_name_outside_the_character_set_is_refused() -> None:
    """A name that Latin-1 cannot encode is rejected when the character set is ISO_IR 100."""
    with pytest.raises(ValueError, match="ISO_IR 192"):
        StudyIdentity(patient_name="山田^太郎")


def test_explicit_positions_make_gaps_and_duplicates(tmp_path: Path) -> None:
    """positions_mm puts each slice exactly where stated, gaps and duplicates included."""
    positions = [-50.0, -48.0, -46.0, -40.0, -40.0, -37.5]
    files = write_ct_series(
        _volume((6, 8, 8)),
        tmp_path,
        spacing_mm=(2.0, 0.5, 0.5),
        origin_mm=(10.0, 20.0, 999.0),  # the origin's z is replaced by the explicit positions
        study=StudyIdentity(),
        series=SeriesSpec(),
        positions_mm=positions,
    )
    got = [pydicom.dcmread(f) for f in files]
    assert [[float(v) for v in ds.ImagePositionPatient] for ds in got] == [
        pytest.approx([10.0, 20.0, z]) for z in positions
    ]
    assert [float(ds.SliceLocation) for ds in got] == pytest.approx(positions)
    assert float(got[0].SliceThickness) == 2.0  # the nominal spacing, whatever the positions


def test_positions_of_the_wrong_length_are_refused(tmp_path: Path) -> None:
    """One explicit position per slice is required."""
    with pytest.raises(ValueError, match="positions_mm"):
        write_ct_series(
            _volume((3, 8, 8)),
            tmp_path,
            spacing_mm=(1, 1, 1),
            study=StudyIdentity(),
            series=SeriesSpec(),
            positions_mm=[0.0, 1.0],
        )


def test_gantry_tilt_shears_positions_along_y(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """A tilt of t degrees shifts slice k by (z_k - z_0) * tan(t) along y and is recorded."""
    tilt = 15.0
    files = write_ct_series(
        _volume((4, 8, 8)),
        tmp_path,
        spacing_mm=(3.0, 0.5, 0.5),
        origin_mm=(0.0, -5.0, 100.0),
        study=StudyIdentity(),
        series=SeriesSpec(),
        gantry_tilt_deg=tilt,
    )
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert float(ds.GantryDetectorTilt) == tilt
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        assert (x, z) == pytest.approx((0.0, 100.0 + 3.0 * k))
        assert y == pytest.approx(-5.0 + 3.0 * k * math.tan(math.radians(tilt)), abs=1e-4)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    errors, _ = dciodvfy(files[-1])
    assert errors == [], errors


def test_localizer_is_a_coronal_projection(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """The scout is one LOCALIZER image, coronal, head at the top, valid per dciodvfy."""
    vol = np.full((5, 6, 7), -1000, dtype=np.int16)
    vol[-1, :, :] = 200  # the most superior slice is dense
    series = SeriesSpec(series_number=1, series_description="TOPOGRAM")
    path = write_localizer(
        vol,
        tmp_path / "scout.dcm",
        spacing_mm=(2.0, 1.0, 0.5),
        origin_mm=(0.0, 0.0, -10.0),
        study=StudyIdentity(),
        series=series,
    )
    ds = pydicom.dcmread(path)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert tuple(float(v) for v in ds.ImageOrientationPatient) == CORONAL_ORIENTATION
    assert (ds.Rows, ds.Columns) == (5, 7)
    hu = _hu(ds)
    assert np.all(hu[0] == 200) and np.all(hu[1:] == -1000)
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([0.0, 2.5, -2.0])
    assert [float(v) for v in ds.PixelSpacing] == [2.0, 0.5]
    assert ds.SeriesInstanceUID == series.series_instance_uid
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    print(warnings)


def test_enhanced_ct_round_trips_and_passes_dciodvfy(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """The multi-frame file holds every slice as a frame with its own position, and is valid."""
    vol = _volume((4, 16, 12))
    path = write_enhanced_ct(
        vol,
        tmp_path / "enhanced.dcm",
        spacing_mm=(1.5, 0.7, 0.7),
        origin_mm=(1.0, 2.0, 3.0),
        study=StudyIdentity.random(2),
        series=SeriesSpec(),
    )
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE
    assert ds.NumberOfFrames == 4
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence[0]
    hu = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    np.testing.assert_array_equal(hu, vol)
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.7, 0.7]
    zs = [
        float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        for frame in ds.PerFrameFunctionalGroupsSequence
    ]
    assert zs == pytest.approx([3.0, 4.5, 6.0, 7.5])
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    print(warnings)


def test_single_slice_dataset_is_complete(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """ct_slice_dataset gives a dataset that dcmwrite can save as a valid CT image as is."""
    ds = ct_slice_dataset(
        _volume((1, 10, 10))[0],
        study=StudyIdentity(),
        series=SeriesSpec(),
        pixel_spacing_mm=(0.5, 0.5),
        position_mm=(0.0, 0.0, -42.0),
        sop_instance_uid="1.2.3.999",
    )
    assert float(ds.SliceLocation) == -42.0
    path = tmp_path / "one.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    assert pydicom.dcmread(path).SOPInstanceUID == "1.2.3.999"
    errors, _ = dciodvfy(path)
    assert errors == [], errors
