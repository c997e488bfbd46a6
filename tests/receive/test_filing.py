"""How the receiver files an instance, with faults timed inside it (the receiver in process,
real sockets, dcmtk's storescu as the peer, a real job store and spool)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.store import spool as spool_module
from dicom_node.store.jobs import InstanceRecord, JobState, JobStore, Recorded
from dicom_node.store.recovery import reconcile
from dicom_node.store.spool import Spool
from tests.conftest import InProcessReceiver
from tests.peers import storescu


def _answers(done: object) -> str:
    return str(getattr(done, "stdout", "")) + str(getattr(done, "stderr", ""))


def test_another_association_ending_mid_filing_does_not_complete_the_study(
    receiver_in_process: Callable[..., InProcessReceiver],
    write_study: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With complete_on_release, a second association sending the same study is released
    while the first is between spooling an instance and recording it: the study is not
    complete until the first is released too (one job, after all its instances)."""
    node = receiver_in_process(study={"complete_on_release": True})
    files = write_study(slices=4)
    from pydicom import dcmread

    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    other = 10**9  # an association id that is not a live one
    node.completion.instance_received(other, study_uid)  # it sent part of the study before
    real_record = node.store.record_instance
    seen: list[int] = []

    def record(rec: InstanceRecord) -> Recorded:
        recorded = real_record(rec)
        if not seen:  # the other association is released right after the first record
            node.completion.association_ended(other, released=True)
        seen.append(len(node.store.jobs()))
        return recorded

    monkeypatch.setattr(node.store, "record_instance", record)
    done = storescu(files, node.port)
    assert _answers(done).count("Received Store Response (Success)") == 4
    assert seen == [0, 0, 0, 0]  # no job while this association was still sending
    [job] = node.store.jobs()
    assert job.state == JobState.QUEUED
    assert [s.instances for s in node.store.studies()] == [4]


def test_a_full_job_store_answers_out_of_resources_and_keeps_nothing(
    receiver_in_process: Callable[..., InProcessReceiver], write_study: Callable[..., list[Path]]
) -> None:
    """SQLite cannot grow (max_page_count: its "database or disk is full"): every instance it
    could not record is refused with 0xA700 and leaves no file for the next start to index;
    the rest are acknowledged and recorded. Once there is room again, a re-send is filed."""
    node = receiver_in_process()
    db = node.store._db
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    files = write_study(slices=60)
    answers = _answers(storescu(files, node.port, extra=["--no-halt"]))
    refused = answers.count("Refused: OutOfResources")
    acknowledged = answers.count("Received Store Response (Success)")
    assert refused > 0 and refused + acknowledged == 60
    spooled = list(node.spool.iter_files())
    assert len(spooled) == acknowledged == len(node.store.known_paths())
    assert list((node.spool.root / "incoming").iterdir()) == []
    assert reconcile(node.spool, node.store).reindexed_files == 0
    db.execute("PRAGMA max_page_count = 1073741823")
    answers = _answers(storescu(files, node.port))
    assert answers.count("Received Store Response (Success)") == 60
    assert len(node.store.known_paths()) == 60


def test_a_new_series_folder_is_durable_before_any_file_in_it_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers into a series folder neither has seen: the second does not return (the
    receiver's acknowledgement) before the first has fsynced the new folders into their
    parents."""
    events: list[str] = []
    real_fsync_dir = spool_module._fsync_dir

    def fsync_dir(path: Path) -> None:
        if path.name == "1.2.3":  # the study folder, naming the new series folder
            time.sleep(0.5)
        real_fsync_dir(path)
        events.append(f"fsync {path.name}")

    monkeypatch.setattr(spool_module, "_fsync_dir", fsync_dir)
    spool = Spool(tmp_path / "spool", min_free_bytes=0)

    def write(sop: str) -> None:
        spool.store(b"x" * 10, spool.path_for("1.2.3", "1.2.3.4", sop))
        events.append(f"stored {sop}")

    writers = [threading.Thread(target=write, args=(f"1.2.3.4.{i}",)) for i in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    first_store = min(i for i, e in enumerate(events) if e.startswith("stored"))
    assert "fsync 1.2.3" in events[:first_store]
    assert "fsync spool" in events[:first_store]


def test_partial_files_left_by_a_crash_are_removed_at_start_without_naming_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's start removes partial files; another process opening the spool while the
    node runs does not. Their names hold SOP Instance UIDs: the log counts them."""
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "1.2.826.0.1.3680043.8.498.777.dcm.1.part").write_bytes(b"half")
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    assert len(list(incoming.iterdir())) == 1  # opening the spool (as purge does) keeps it
    with caplog.at_level(logging.INFO):
        reconcile(spool, JobStore(tmp_path / "jobs.sqlite"))  # the node's start
    assert list(incoming.iterdir()) == []
    assert "removed 1 unacknowledged partial file" in caplog.text
    assert "3680043" not in caplog.text


def test_a_correction_the_store_refuses_leaves_the_acknowledged_content(
    receiver_in_process: Callable[..., InProcessReceiver],
    write_study: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """S4 with a fault: new content for an acknowledged instance (one pixel changed) is refused
    because the job store fails to record it. The spool keeps the content that was
    acknowledged, so the sender's retry is new content again: filed, and the study re-opened
    (before, the retry met its own bytes on disk and was taken for a duplicate)."""
    import sqlite3

    from pydicom import dcmread

    from dicom_node.store.jobs import StudyState

    node = receiver_in_process()
    files = write_study(slices=3)
    assert storescu(files, node.port).returncode == 0
    [study] = node.store.studies()
    assert node.store.complete_study(study.study_uid, reason="quiet") is not None
    corrected = dcmread(files[1])
    pixels = bytearray(corrected.PixelData)
    pixels[100] ^= 0xFF
    corrected.PixelData = bytes(pixels)
    corrected.save_as(tmp_path / "corrected.dcm")
    known = node.store.instance_location(str(corrected.SOPInstanceUID))
    assert known is not None
    spooled = known[0]
    original = spooled.read_bytes()

    real_record = node.store.record_instance
    failures = iter([sqlite3.OperationalError("disk I/O error")])

    def record(rec: InstanceRecord) -> Recorded:
        for exc in failures:
            raise exc
        return real_record(rec)

    monkeypatch.setattr(node.store, "record_instance", record)
    first = _answers(storescu(tmp_path / "corrected.dcm", node.port))
    assert "Received Store Response (Success)" not in first
    assert spooled.read_bytes() == original  # what was acknowledged
    assert list((node.spool.root / "incoming").iterdir()) == []
    again = _answers(storescu(tmp_path / "corrected.dcm", node.port))
    assert "Received Store Response (Success)" in again
    assert dcmread(spooled).PixelData == corrected.PixelData
    assert [s.state for s in node.store.studies()] == [StudyState.RECEIVING]  # re-opened


def test_the_sop_classes_selection_analyses_are_kept(
    receiver_in_process: Callable[..., InProcessReceiver], write_study: Callable[..., list[Path]]
) -> None:
    """A SOP class added to ``selection.sop_classes`` (Legacy Converted Enhanced CT) is kept
    for analysis, as its pixel data must be, instead of being acknowledged and dropped as
    "not CT" before the selection rules could see it; without the setting it is dropped."""
    from pydicom import dcmread

    legacy = "1.2.840.10008.5.1.4.1.1.2.2"
    files = write_study(slices=1)
    ds = dcmread(files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = legacy
    ds.save_as(files[0], enforce_file_format=True)
    default = receiver_in_process()
    assert _answers(storescu(files, default.port)).count("Store Response (Success)") == 1
    assert default.store.known_paths() == set()
    assert default.receiver.dropped["dropped_not_ct"] == 1
    configured = receiver_in_process(
        selection={
            "sop_classes": ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", legacy]
        }
    )
    assert _answers(storescu(files, configured.port)).count("Store Response (Success)") == 1
    [kept] = configured.store.known_paths()
    assert str(dcmread(kept, stop_before_pixels=True).SOPClassUID) == legacy


def test_an_allowed_host_matches_an_ipv4_caller_on_a_dual_stack_listener(
    receiver_in_process: Callable[..., InProcessReceiver], write_study: Callable[..., list[Path]]
) -> None:
    """Listening on ``::`` (IPv6 and IPv4), an IPv4 caller's address arrives as
    ``::ffff:127.0.0.1``: an allowed caller pinned to ``127.0.0.1`` (or to the mapped form)
    is the same host and is served; another host is still refused."""
    files = write_study(slices=1)
    for host in ("127.0.0.1", "::ffff:127.0.0.1"):
        node = receiver_in_process(
            node={"host": "::", "allowed_callers": [{"ae_title": "STORESCU", "host": host}]}
        )
        assert _answers(storescu(files, node.port)).count("Store Response (Success)") == 1
    elsewhere = receiver_in_process(
        node={"host": "::", "allowed_callers": [{"ae_title": "STORESCU", "host": "10.1.2.3"}]}
    )
    assert "Store Response (Success)" not in _answers(storescu(files, elsewhere.port))


def test_a_job_store_another_process_holds_is_answered_out_of_resources_in_time(
    receiver_in_process: Callable[..., InProcessReceiver], write_study: Callable[..., list[Path]]
) -> None:
    """Another process holds the job store's write lock (a backup, a shell left in a
    transaction): a C-STORE waits at most 5 s for it, then is answered "out of resources"
    (0xA700: the sender retries later) with nothing left spooled, well within a PACS's DIMSE
    timeout, instead of holding the association for 30 s and failing with 0x0110. Once the
    lock is let go, the same instance is stored."""
    import sqlite3

    node = receiver_in_process()
    files = write_study(slices=1)
    holder = sqlite3.connect(node.store.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(7.0, lambda: holder.execute("ROLLBACK"))
    release.start()
    try:
        started = time.monotonic()
        answer = _answers(storescu(files, node.port))
        waited = time.monotonic() - started
    finally:
        release.join()
        holder.close()
    assert "Refused: OutOfResources" in answer
    assert waited > 4.5  # (and under 7 s: the lock was still held when it was refused)
    assert list(node.spool.iter_files()) == []
    assert _answers(storescu(files, node.port)).count("Store Response (Success)") == 1
    assert len(node.store.known_paths()) == 1


def test_the_same_instances_in_another_transfer_syntax_are_duplicates(
    receiver_in_process: Callable[..., InProcessReceiver], write_study: Callable[..., list[Path]]
) -> None:
    """A study the modality sent uncompressed, in implicit VR with private elements (as CT
    carries them), comes again from a PACS that stores it RLE compressed: other bytes, the
    same attributes and pixels (a private element read in implicit VR is bytes, in explicit VR
    text: compared encoded). The instances count as duplicates: the complete study is not
    re-opened and its job not superseded (no second analysis). One pixel changed is new
    content and re-opens it."""
    from pydicom import dcmread
    from pydicom.uid import RLELossless
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from dicom_node.store.jobs import StudyState

    node = receiver_in_process()
    files = write_study(slices=3)
    for path in files:
        ds = dcmread(path)
        ds.add_new(0x00090010, "LO", "ACME 1.0")  # a private creator and its element
        ds.add_new(0x00091001, "LO", "RECON KERNEL B30f")
        ds.save_as(path, enforce_file_format=True)
    sent = _answers(storescu(files, node.port, extra=["-xi"]))  # implicit VR only
    assert sent.count("Store Response (Success)") == 3
    [study] = node.store.studies()
    job = node.store.complete_study(study.study_uid, reason="quiet period")
    assert job is not None
    compressed = []
    for path in files:
        ds = dcmread(path)
        ds.compress(RLELossless, generate_instance_uid=False)
        compressed.append(ds)

    def send(datasets: list[object]) -> list[int]:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, [RLELossless])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(ds).Status) for ds in datasets]
        finally:
            assoc.release()

    assert send(compressed) == [0, 0, 0]
    assert [s.state for s in node.store.studies()] == [StudyState.COMPLETE]
    assert node.store.job(job.id).state == JobState.QUEUED
    changed = dcmread(files[1])
    changed.PixelData = bytes([changed.PixelData[0] ^ 1]) + changed.PixelData[1:]
    changed.compress(RLELossless, generate_instance_uid=False)
    assert send([changed]) == [0]
    assert [s.state for s in node.store.studies()] == [StudyState.RECEIVING]
    assert node.store.job(job.id).state == JobState.SUPERSEDED
