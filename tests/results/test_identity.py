"""Tests for identity and UIDs: derived UIDs, and patient/study attributes copied byte-exact."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node import MANUFACTURER, __version__
from dicom_node.config import Config, ResultsSettings
from dicom_node.results.identity import (
    IDENTITY_KEYWORDS,
    Producer,
    ResultUIDs,
    copy_identity,
    derive_uid,
)
from dicom_node.results.writer import write_results
from dicom_node.uids import is_valid_uid
from tests.results.conftest import PATIENT_NAME, CTCase


def _raw_value(path: Path, keyword: str) -> bytes | None:
    """The element's value bytes exactly as stored in the file (not decoded).

    pydicom decodes Specific Character Set while reading (it needs it to decode the rest); that
    one (a CS, ASCII by definition) is re-encoded with its padding.
    """
    with pydicom.dcmread(path) as ds:
        element: object = ds.get_item(Tag(keyword))
    if element is None:
        return None
    if isinstance(element, RawDataElement):
        return bytes(element.value or b"")
    assert isinstance(element, DataElement)
    value = element.value
    text = "\\".join(value) if isinstance(value, list) else str(value)
    data = text.encode("ascii")
    return data + b" " if len(data) % 2 else data


def _write(case: CTCase, out: Path, *, version: int = 1, root: str = "2.25") -> tuple[Path, Path]:
    files = write_results(
        source_files=case.files,
        labels=case.lesion_map.labels,
        probability=case.probability,
        lesions=case.lesion_map.lesions,
        study_probability=0.8,
        study_threshold=0.5,
        model_name="lung-ct",
        model_version="1.2.0",
        job_version=version,
        settings=ResultsSettings(),
        uid_root=root,
        out_dir=out,
    )
    assert files.seg is not None
    return files.seg, files.sr


def test_derive_uid_under_2_25_is_a_uuid_integer() -> None:
    """Under "2.25" a UID is 2.25.<128-bit integer>, the same for the same parts."""
    uid = derive_uid("2.25", "study", 1)
    assert uid.startswith("2.25.")
    assert int(uid.split(".", 2)[2]) < 2**128
    assert is_valid_uid(uid)
    assert uid == derive_uid("2.25", "study", 1)
    assert uid != derive_uid("2.25", "study", 2)
    # Parts are joined unambiguously.
    assert derive_uid("2.25", "a.b") != derive_uid("2.25", "a", "b")


def test_derive_uid_under_another_root_fills_64_characters() -> None:
    """Under an organisation root the hash digits fill the UID to 64 characters, no more."""
    root = "1.2.826.0.1.3680043.10.1234"
    uid = derive_uid(root, "x")
    assert uid.startswith(root + ".")
    assert len(uid) == 64
    assert is_valid_uid(uid)
    assert uid == derive_uid(root, "x")
    assert uid != derive_uid(root, "y")


def test_derive_uid_refuses_bad_roots() -> None:
    """A root that is not a UID, or leaves too few digits, is refused."""
    with pytest.raises(ValueError, match="not a valid UID"):
        derive_uid("1.02.3", "x")
    with pytest.raises(ValueError, match="too long"):
        derive_uid("1." + "2" * 45, "x")


def test_result_uids_depend_on_every_part() -> None:
    """Each of study, series, version and model version changes every UID; all are distinct."""
    base = {
        "root": "2.25",
        "study_instance_uid": "1.2.3",
        "source_series_uid": "1.2.3.4",
        "job_version": 1,
        "model_version": "1.0",
    }
    reference = ResultUIDs.derive(**base)  # type: ignore[arg-type]
    own = [reference.seg_series, reference.seg_instance, reference.sr_series, reference.sr_instance]
    own += [reference.tracking_uid(1), reference.tracking_uid(2), reference.study_tracking_uid()]
    assert len(set(own)) == len(own)
    assert ResultUIDs.derive(**base) == reference  # type: ignore[arg-type]
    for key, other in (
        ("study_instance_uid", "1.2.5"),
        ("source_series_uid", "1.2.3.5"),
        ("job_version", 2),
        ("model_version", "1.1"),
    ):
        changed = ResultUIDs.derive(**{**base, key: other})  # type: ignore[arg-type]
        assert changed.seg_instance != reference.seg_instance, key
        assert changed.sr_instance != reference.sr_instance, key
        assert changed.tracking_uid(1) != reference.tracking_uid(1), key


def test_written_uids_are_deterministic_per_version(two_lesions: CTCase, tmp_path: Path) -> None:
    """Writing a job twice gives the same UIDs and file names; version 2 gives new ones."""
    first = _write(two_lesions, tmp_path / "a")
    again = _write(two_lesions, tmp_path / "b")
    newer = _write(two_lesions, tmp_path / "c", version=2)
    assert [p.name for p in first] == [p.name for p in again]

    def uids(paths: tuple[Path, Path]) -> list[str]:
        out = []
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out += [str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
        seg = pydicom.dcmread(paths[0], stop_before_pixels=True)
        out += [str(item.TrackingUID) for item in seg.SegmentSequence]
        return out

    assert uids(first) == uids(again)
    assert not set(uids(first)) & set(uids(newer))
    # Under another root the UIDs live under it.
    other = _write(two_lesions, tmp_path / "d", root="1.2.826.0.1.3680043.10.99")
    assert all(u.startswith("1.2.826.0.1.3680043.10.99.") for u in uids(other))


def test_identity_is_copied_byte_exact(two_lesions: CTCase, tmp_path: Path) -> None:
    """SEG and SR carry the source's Study Instance UID and patient/study attributes with the
    very bytes of the source (a UTF-8 name with three component groups included), in new
    series, and name the node as manufacturer, with its and the model's versions."""
    source = two_lesions.files[0]
    source_ds = pydicom.dcmread(source, stop_before_pixels=True)
    assert source_ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(source_ds.PatientName) == PATIENT_NAME
    for path in _write(two_lesions, tmp_path):
        for keyword in IDENTITY_KEYWORDS:
            assert _raw_value(path, keyword) == _raw_value(source, keyword), keyword
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientName) == PATIENT_NAME
        assert ds.StudyInstanceUID == source_ds.StudyInstanceUID
        assert ds.SeriesInstanceUID != source_ds.SeriesInstanceUID
        assert ds.Manufacturer == MANUFACTURER
        assert list(ds.SoftwareVersions) == [f"{MANUFACTURER} {__version__}", "lung-ct 1.2.0"]
        ours = [
            item for item in ds.ContributingEquipmentSequence if item.Manufacturer == MANUFACTURER
        ]
        assert len(ours) == 1
        assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # processing


def test_copy_identity_mirrors_the_source() -> None:
    """Present attributes are copied; absent Type 2 ones become empty, absent others go."""
    source = Dataset()
    source.SpecificCharacterSet = "ISO_IR 192"
    source.PatientName = "Ñandú^Ana"
    source.StudyInstanceUID = "1.2.3"
    target = Dataset()
    target.PatientID = "WRONG"
    target.StudyDescription = "stale"
    copy_identity(target, source)
    assert target.PatientName == "Ñandú^Ana"
    assert target.SpecificCharacterSet == "ISO_IR 192"
    assert target.PatientID == ""
    assert "StudyDescription" not in target


def test_producer_and_settings_defaults() -> None:
    """The results settings have their documented defaults and the producer checks its names."""
    settings = Config().results
    assert settings.seg_series_number == 9101
    assert settings.seg_series_description == "AI lung lesions (dicom-node)"
    assert settings.segmentation_type == "binary"
    assert settings.max_segments == 20
    with pytest.raises(ValueError, match="model_name"):
        Producer(model_name="", model_version="1")
