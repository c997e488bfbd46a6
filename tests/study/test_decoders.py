"""Every transfer syntax we accept decodes to the same HU as its uncompressed original.

Two sources: the compressed variants of one MR slice that pydicom ships (MR_small*), and a CT
series written uncompressed by our writer, then converted at test time with the dcmtk and gdcm
command-line tools, both unsigned (12-bit, intercept -1024) and signed (16-bit) pixel data.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node.config import SelectionSettings, VolumeGeometrySettings
from dicom_node.errors import StudySkipped, VolumeDecodeError
from dicom_node.study.headers import read_headers
from dicom_node.study.selection import select_series
from dicom_node.study.volume import DECODING_PLUGINS, plan_volume, read_volume
from dicom_node.training.ctseries import SeriesSpec
from tests.study.conftest import WriteSeries, hu_volume

GEOMETRY = VolumeGeometrySettings()

# (command, transfer syntax it produces); the output file name is appended to each command.
CONVERSIONS = {
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], JPEGLosslessSV1),
    "jpeg-lossless-p14": (["dcmcjpeg", "+el", "+sv", "6"], JPEGLossless),
    "jpeg-ls-lossless": (["dcmcjpls", "+el"], JPEGLSLossless),
    "rle": (["dcmcrle"], RLELossless),
    "jpeg2000-lossless": (["gdcmconv", "--j2k"], JPEG2000Lossless),
    "explicit-big-endian": (["dcmconv", "+tb"], "1.2.840.10008.1.2.2"),
    "implicit-little-endian": (["dcmconv", "+ti"], "1.2.840.10008.1.2"),
    "deflated": (["dcmconv", "+td"], "1.2.840.10008.1.2.1.99"),
}


def _testdata(name: str) -> Path:
    """A file shipped inside pydicom (never one it would download)."""
    found = get_testdata_file(name)
    assert isinstance(found, str), name
    return Path(found)


def _convert(command: list[str], source: Path, target: Path) -> None:
    # dcmtk and gdcm's tools are installed by ./quickstart test: a missing one is a failed
    # install, not an absence to skip over
    assert shutil.which(command[0]) is not None, f"{command[0]} is not installed"
    subprocess.run([*command, str(source), str(target)], check=True, capture_output=True)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_pydicom_test_files_decode_like_their_original(name: str) -> None:
    """pydicom's compressed / big endian / implicit MR_small variants equal MR_small.dcm."""
    original = read_volume([_testdata("MR_small.dcm")], settings=GEOMETRY)
    variant = read_volume([_testdata(name)], settings=GEOMETRY)
    np.testing.assert_array_equal(variant.hu, original.hu)
    assert variant.spacing_mm == original.spacing_mm


def test_pydicom_ct_small_is_rescaled_to_hu() -> None:
    """CT_small.dcm's HU are its stored values plus its intercept (-1024), as int16."""
    path = _testdata("CT_small.dcm")
    ct = read_volume([path], settings=GEOMETRY)
    stored = pydicom.dcmread(path).pixel_array
    assert ct.hu.dtype == np.int16
    np.testing.assert_array_equal(ct.hu[0], stored.astype(np.int32) - 1024)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned12", "signed16"])
@pytest.mark.parametrize("conversion", sorted(CONVERSIONS))
def test_converted_ct_series_decodes_to_the_same_hu(
    conversion: str, signed: bool, write_series: WriteSeries, tmp_path: Path
) -> None:
    """A CT series converted by dcmtk/gdcm decodes to exactly the HU it was written from."""
    command, syntax = CONVERSIONS[conversion]
    volume = hu_volume(3, 24, 20, seed=5)
    intercept = 0.0 if signed else -1024.0
    paths = write_series("orig", SeriesSpec(), volume=volume, rescale_intercept=intercept)
    out = tmp_path / "converted"
    out.mkdir()
    converted = []
    for p in paths:
        _convert(command, p, out / p.name)
        converted.append(out / p.name)
    headers = read_headers(converted)
    assert {h.transfer_syntax_uid for h in headers} == {syntax}
    assert {h.pixel_representation for h in headers} == {1 if signed else 0}
    ct = read_volume(converted, settings=GEOMETRY)
    np.testing.assert_array_equal(ct.hu, volume)


def test_every_planned_decoder_is_installed() -> None:
    """Each transfer syntax we accept has its chosen pydicom plug-in available here."""
    for syntax, plugin in DECODING_PLUGINS.items():
        decoder = get_decoder(syntax)
        assert decoder.is_available, syntax
        if plugin:
            assert plugin in decoder.available_plugins, (syntax, plugin)


def test_lossy_jpeg_is_not_decodable(write_series: WriteSeries, tmp_path: Path) -> None:
    """JPEG extended (lossy, 12-bit) is refused by the plan and reported by selection."""
    paths = write_series("orig", SeriesSpec(), volume=hu_volume(20, 16, 16))
    out = tmp_path / "lossy"
    out.mkdir()
    for p in paths:
        _convert(["dcmcjpeg", "+ee"], p, out / p.name)
    headers = read_headers(sorted(out.iterdir()))
    assert headers[0].transfer_syntax_uid == JPEGExtended12Bit
    with pytest.raises(VolumeDecodeError, match="cannot be decoded"):
        plan_volume(headers, settings=GEOMETRY)
    with pytest.raises(StudySkipped, match="lossy compressed, transfer syntax JPEG Extended"):
        select_series(headers, settings=SelectionSettings())
