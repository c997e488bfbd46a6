"""The receiver against real peers: dcmtk's echoscu/storescu and pynetdicom as an SCU."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config

from tests.peers import NodeProcess, echoscu, storescu

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _instances(node: NodeProcess) -> list[tuple[str, str, str]]:
    with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
        return db.execute(
            "SELECT sop_instance_uid, study_uid, series_uid FROM instances"
        ).fetchall()


def _send_raw(port: int, path: Path, *, sop_class: str = CT_IMAGE_STORAGE) -> int:
    """Send a file with pynetdicom as it is on disk (no re-encoding); returns the status."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, even when broken
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status)
    finally:
        assoc.release()


def test_echo(node_factory: Callable[..., NodeProcess]) -> None:
    """C-ECHO from dcmtk's echoscu succeeds."""
    node = node_factory()
    done = echoscu(node.port)
    assert done.returncode == 0, done.stderr


def test_multi_series_study_arrives_whole(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """Two series of one study sent in one association: every instance spooled, one job."""
    from dicom_node.training.ctseries import StudyIdentity

    study = StudyIdentity.random(7)
    files = write_study(study=study, slices=10, series_number=1, out=tmp_path / "s") + write_study(
        study=study, slices=12, series_number=2, out=tmp_path / "s2"
    )
    node = node_factory()
    done = storescu(files, node.port)
    assert done.returncode == 0, done.stderr
    listing = node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "done")
    assert len(node.spooled()) == 22
    assert [s["instances"] for s in listing["studies"]] == [22]
    [job] = listing["jobs"]
    assert job["study_uid"] == study.study_instance_uid
    assert sorted(s["instances"] for s in job["result"]["series"]) == [10, 12]
    # spooled files hold exactly the bytes sent (pixel data intact)
    for path in node.spooled()[:3]:
        ds = dcmread(path)
        original = next(f for f in files if dcmread(f).SOPInstanceUID == ds.SOPInstanceUID)
        assert ds.PixelData == dcmread(original).PixelData


def test_interleaved_studies_stay_apart(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """Two studies sent at once over two associations become two studies and two jobs."""
    import threading

    a = write_study(slices=15, seed=1, out=tmp_path / "a")
    b = write_study(slices=9, seed=2, out=tmp_path / "b")
    node = node_factory()
    results: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, storescu(f, node.port)))
        for k, f in (("a", a), ("b", b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results.values())
    listing = node.wait_jobs(
        lambda j: len(j["jobs"]) == 2 and all(x["state"] == "done" for x in j["jobs"])
    )
    assert sorted(s["instances"] for s in listing["studies"]) == [9, 15]
    by_study = {j["study_uid"]: j["result"]["instances"] for j in listing["jobs"]}
    assert by_study == {dcmread(a[0]).StudyInstanceUID: 15, dcmread(b[0]).StudyInstanceUID: 9}


def test_identical_resend_does_not_double_the_job(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """An identical re-send is acknowledged and queues nothing; changed bytes make version 2."""
    files = write_study(slices=6)
    node = node_factory()
    assert storescu(files, node.port).returncode == 0
    node.wait_jobs(lambda j: len(j["jobs"]) == 1 and j["jobs"][0]["state"] == "done")
    again = storescu(files, node.port)
    assert again.returncode == 0
    assert again.stdout.count("Success") + again.stderr.count("Success") >= 6
    import time

    time.sleep(2.0)  # longer than stable_seconds: a wrongly re-opened study would complete now
    listing = node.jobs()
    assert len(listing["jobs"]) == 1
    assert listing["studies"][0]["state"] == "complete"
    # same SOP Instance UID, different bytes: replaced, study re-opened, a new version
    ds = dcmread(files[0])
    ds.WindowCenter = -500
    ds.save_as(files[0])
    assert storescu([files[0]], node.port).returncode == 0
    listing = node.wait_jobs(lambda j: len(j["jobs"]) == 2 and j["jobs"][0]["state"] == "done")
    assert [j["version"] for j in listing["jobs"]] == [2, 1]
    assert len(node.spooled()) == 6
    assert (
        dcmread(next(p for p in node.spooled() if p.stem == ds.SOPInstanceUID)).WindowCenter == -500
    )


def test_calling_ae_allow_list(node_factory: Callable[..., NodeProcess]) -> None:
    """With an allow list, other calling AEs (or the right AE from another host) are rejected."""
    node = node_factory(
        node={
            "allowed_callers": [
                {"ae_title": "GOODPACS"},
                {"ae_title": "PINNED", "host": "10.9.9.9"},
            ]
        }
    )
    assert echoscu(node.port, calling="GOODPACS").returncode == 0
    bad = echoscu(node.port, calling="INTRUDER")
    assert bad.returncode != 0
    assert "Association Rejected" in bad.stdout + bad.stderr
    assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
    pinned = echoscu(node.port, calling="PINNED")
    assert pinned.returncode != 0
    assert "calling AE not allowed" in node.log()


def test_wrong_called_ae_is_rejected(node_factory: Callable[..., NodeProcess]) -> None:
    """An association to another called AE title is rejected."""
    node = node_factory()
    done = echoscu(node.port, called="SOMEONE_ELSE")
    assert done.returncode != 0
    assert "Called AE Title Not Recognized" in done.stdout + done.stderr


def test_truncated_dataset_fails_and_leaves_nothing(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """A data set cut short gets 0xC210 and leaves no file and no record behind."""
    [path] = write_study(slices=1)
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 1000])
    node = node_factory()
    assert _send_raw(node.port, cut) == 0xC210
    assert node.spooled() == []
    assert _instances(node) == []
    assert list((node.data_dir / "spool" / "incoming").iterdir()) == []
    # the intact file is accepted on the same node afterwards
    assert _send_raw(node.port, path) == 0x0000
    assert len(node.spooled()) == 1


def test_invalid_uid_never_becomes_a_path(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """A Series Instance UID like '../../x' is refused (0xC211) and nothing is written."""
    [path] = write_study(slices=1)
    ds = dcmread(path)
    ds.SeriesInstanceUID = "../../../../tmp/evil"
    bad = tmp_path / "evil.dcm"
    ds.save_as(bad)
    node = node_factory()
    assert _send_raw(node.port, bad) == 0xC211
    assert node.spooled() == []
    assert not list(tmp_path.glob("**/evil*.dcm"))[1:]


def test_sop_class_mismatch_is_refused(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """A data set whose SOP Class differs from its command's gets 0xA900."""
    [path] = write_study(slices=1)
    ds = dcmread(path)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage, but sent as CT
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    bad = tmp_path / "mismatch.dcm"
    ds.save_as(bad)
    node = node_factory()
    assert _send_raw(node.port, bad, sop_class=CT_IMAGE_STORAGE) == 0xA900
    assert node.spooled() == []


@pytest.mark.parametrize("policy", ["accept", "reject"])
def test_non_ct_is_dropped_or_rejected(
    node_factory: Callable[..., NodeProcess], policy: str
) -> None:
    """An MR image is acknowledged and dropped (or refused with 0x0122), never spooled."""
    mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    node = node_factory(node={"other_instances": policy})
    status = _send_raw(node.port, mr, sop_class=str(dcmread(mr).SOPClassUID))
    assert status == (0x0000 if policy == "accept" else 0x0122)
    assert node.spooled() == []
    assert _instances(node) == []
    assert "instance not kept (not ct)" in node.log()


def test_disk_floor_answers_out_of_resources(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """Below the free-space floor a C-STORE gets 0xA700 and nothing is kept."""
    files = write_study(slices=2)
    node = node_factory(storage={"min_free_disk_mb": 1024 * 1024 * 1024})  # a petabyte floor
    done = storescu(files, node.port)
    assert "Refused: OutOfResources" in done.stdout + done.stderr  # 0xA700
    assert node.spooled() == []
    assert list((node.data_dir / "spool" / "incoming").iterdir()) == []


def test_compressed_syntaxes_are_negotiated_only_when_decodable(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """JPEG-LS, RLE and JPEG Lossless arrive as sent (not recompressed) and decode to the HU of
    the original (one image each: the same image again in another syntax would be a duplicate
    of the first); lossy baseline JPEG, which the analysis would not read, is refused at
    negotiation."""
    import subprocess

    import numpy as np

    from dicom_node.config import SelectionSettings
    from dicom_node.study.volume import read_volume

    originals = write_study(slices=4, size=64)
    node = node_factory()
    for original, (tool, flags, propose, name) in zip(
        originals,
        (
            ("dcmcjpls", ["+el"], ["-xt"], "jls.dcm"),
            ("dcmcrle", [], ["-xr"], "rle.dcm"),
            ("dcmcjpeg", ["+e1"], ["-xs"], "jpll.dcm"),
        ),
        strict=False,
    ):
        out = tmp_path / name
        subprocess.run(["/usr/bin/" + tool, *flags, str(original), str(out)], check=True)
        done = storescu([out], node.port, extra=propose)
        assert done.returncode == 0, done.stdout + done.stderr
        [stored] = [p for p in node.spooled() if p.stem == str(dcmread(out).SOPInstanceUID)]
        assert (
            dcmread(stored).file_meta.TransferSyntaxUID == dcmread(out).file_meta.TransferSyntaxUID
        )
        assert dcmread(stored).PixelData == dcmread(out).PixelData
        geometry = SelectionSettings().geometry
        np.testing.assert_array_equal(
            read_volume([stored], settings=geometry).hu,
            read_volume([original], settings=geometry).hu,
        )
    lossy = tmp_path / "baseline.dcm"
    subprocess.run(["/usr/bin/dcmcjpeg", "+eb", str(originals[3]), str(lossy)], check=True)
    refused = storescu([lossy], node.port, extra=["-xy"])
    assert refused.returncode != 0
    # the node accepted only the uncompressed alternatives for it: storescu had to convert
    assert "Converting transfer syntax: JPEG Baseline" in refused.stdout + refused.stderr
    assert str(dcmread(lossy).SOPInstanceUID) not in {p.stem for p in node.spooled()}
