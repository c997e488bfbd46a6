"""What the node's log says of a failure: no patient data unless the configuration allows it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node import logs
from dicom_node.config import LoggingSettings

UID = "1.2.826.0.1.3680043.8.498.424242"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in ("pydicom", "pynetdicom")}
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)
    logs._include_identifiers = False


def _fail() -> None:
    try:
        open(f"/nonexistent/spool/{UID}/{UID}.dcm")  # noqa: SIM115 - the failure itself
    except OSError as exc:
        raise RuntimeError(f"analysis failed for study {UID}") from exc


def _log_a_failure() -> None:
    try:
        _fail()
    except RuntimeError:
        logging.getLogger("dicom_node.worker").exception("job failed")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_traceback_keeps_its_frames_but_not_the_messages(
    fmt: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.setup_logging(LoggingSettings(format=fmt))
    _log_a_failure()
    err = capsys.readouterr().err
    assert "job failed" in err
    assert "_fail" in err  # the frames are there
    assert "FileNotFoundError (message not logged)" in err
    assert "RuntimeError (message not logged)" in err
    assert UID not in err
    if fmt == "json":
        [line] = err.strip().splitlines()
        assert "exc" in json.loads(line)


def test_with_patient_data_allowed_the_messages_are_logged(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.setup_logging(LoggingSettings(include_patient_data=True))
    _log_a_failure()
    assert f"analysis failed for study {UID}" in capsys.readouterr().err


def test_pydicom_does_not_log_the_values_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """An invalid UID in a header: pydicom would warn with the value; the node's log stays
    silent unless it is at DEBUG."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    with pytest.warns(UserWarning):  # pydicom says so when it is set, too
        ds.FrameOfReferenceUID = "1.2.03.4567"
        ds.save_as(tmp_path / "bad.dcm")
    logs.setup_logging(LoggingSettings())
    with pytest.warns(UserWarning):
        str(pydicom.dcmread(tmp_path / "bad.dcm").FrameOfReferenceUID)
    assert "1.2.03.4567" not in capsys.readouterr().err


def test_highdicom_does_not_log_the_source_uids(capsys: pytest.CaptureFixture[str]) -> None:
    """highdicom logs, at INFO, the SOP Instance UID of each image it copies patient data
    from (as the SEG and SR writers make it do): heard only when debugging."""
    import highdicom as hd
    from pydicom.data import get_testdata_file

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    logs.setup_logging(LoggingSettings())
    target = hd.SOPClass(
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        instance_number=1,
        modality="SEG",
        manufacturer="x",
    )
    target.copy_patient_and_study_information(source)
    assert str(source.SOPInstanceUID) not in capsys.readouterr().err
