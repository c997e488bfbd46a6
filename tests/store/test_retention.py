"""Retention and purge on a real job store and spool."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.errors import JobStoreError
from dicom_node.store.jobs import InstanceRecord, JobState, JobStore, StudyState
from dicom_node.store.retention import apply_retention, purge
from dicom_node.store.spool import Spool
from tests.conftest import InProcessReceiver
from tests.peers import storescu


def _study(store: JobStore, spool: Spool, study: str, n: int = 2) -> list[Path]:
    paths = []
    for i in range(n):
        sop = f"{study}.{i + 1}"
        path = spool.path_for(study, study + ".9", sop)
        spool.store(b"x" * 10, path)
        store.record_instance(
            InstanceRecord(
                sop_instance_uid=sop,
                study_uid=study,
                series_uid=study + ".9",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                modality="CT",
                path=path,
                size=10,
                calling_ae="PACS",
                received_at=time.time(),
            )
        )
        paths.append(path)
    return paths


def _finish(store: JobStore, study: str, state: JobState) -> int:
    job = store.complete_study(study, reason="test")
    assert job is not None
    claimed = store.claim_next_job()
    assert claimed is not None and claimed.id == job.id
    store.finish_job(job.id, state, error=None if state == JobState.DONE else "boom")
    return job.id


def test_retention_keeps_recent_and_failed_and_removes_old_successes(tmp_path: Path) -> None:
    """Done studies older than keep_hours lose inputs and outputs; recent, dead and still
    receiving studies keep theirs; job history stays."""
    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    work = tmp_path / "work"
    old = _study(store, spool, "1.1")
    old_job = _finish(store, "1.1", JobState.DONE)
    (work / f"{old_job}-v1").mkdir(parents=True)
    (work / f"{old_job}-v1" / "SR.dcm").write_bytes(b"sr")
    dead = _study(store, spool, "1.2")
    _finish(store, "1.2", JobState.DEAD)
    receiving = _study(store, spool, "1.3")
    later = time.time() + 25 * 3600
    removed = apply_retention(store, spool, work, keep_hours=24, now=later)
    assert (removed.studies, removed.files) == (1, 2)
    assert not any(p.exists() for p in old)
    assert not (work / f"{old_job}-v1").exists()
    assert all(p.exists() for p in dead + receiving)
    assert store.job(old_job).state == JobState.DONE  # history kept
    assert {s.study_uid for s in store.studies()} == {"1.2", "1.3"}
    assert apply_retention(store, spool, work, keep_hours=24, now=time.time()).studies == 0
    assert apply_retention(store, spool, work, keep_hours=None, now=later).studies == 0


def test_purge_removes_dead_studies_only(tmp_path: Path) -> None:
    """purge deletes what dead jobs kept, nothing else; a re-sent study starts afresh."""
    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    dead = _study(store, spool, "1.2")
    _finish(store, "1.2", JobState.DEAD)
    done = _study(store, spool, "1.4")
    _finish(store, "1.4", JobState.DONE)
    assert purge(store, spool, tmp_path / "work", older_than_hours=1).studies == 0
    removed = purge(store, spool, tmp_path / "work")
    assert (removed.studies, removed.files) == (1, 2)
    assert not any(p.exists() for p in dead)
    assert all(p.exists() for p in done)
    _study(store, spool, "1.2")  # the PACS sends it again
    job = store.complete_study("1.2", reason="test")
    assert job is not None and job.version == 2


def test_a_purged_job_is_not_retried_and_its_dead_deliveries_go(tmp_path: Path) -> None:
    """After purge a dead job's files are gone: its dead deliveries (which could never be sent,
    and counted as dead letters for good) go with them, and retrying it is refused with the
    reason rather than queued to end "skipped: no instances"."""
    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    _study(store, spool, "1.2")
    job = _finish(store, "1.2", JobState.DEAD)
    with store.transaction() as db:
        db.execute(
            "INSERT INTO outbox (job_id, destination, path, sop_class_uid, sop_instance_uid,"
            " state, attempts, not_before, created_at, updated_at)"
            " VALUES (?, 'pacs', '/gone/SR.dcm', '1.2.840.10008.5.1.4.1.1.88.34', '1.2.9',"
            " 'dead', 5, 0, 0, 0)",
            (job,),
        )
    assert purge(store, spool, tmp_path / "work").studies == 1
    with store.transaction() as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    with pytest.raises(JobStoreError, match="files were removed"):
        store.retry_job(job)
    assert store.job(job).state == JobState.DEAD  # kept, as history


def _spooled_without_record(tmp_path: Path, src: Path) -> tuple[JobStore, Spool, Path]:
    """A job store, and a spool holding ``src`` at its place, unrecorded (as a power cut that
    lost the last transactions leaves it); the file's path."""
    import shutil

    from pydicom import dcmread

    ds = dcmread(src)
    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    dest = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    dest.parent.mkdir(parents=True)
    shutil.copy(src, dest)
    return store, spool, dest


def test_reconcile_reindexes_a_spooled_file_the_store_lost(
    tmp_path: Path, write_study: object
) -> None:
    """After a power cut the store may lack the last records: a spooled file it does not know is
    read and recorded (with its data-set size), and its study re-opened."""
    from pydicom import dcmread
    from pydicom.filereader import read_file_meta_info

    from dicom_node.store.recovery import reconcile

    [src] = write_study(slices=1)  # type: ignore[operator]
    ds = dcmread(src)
    store, spool, _ = _spooled_without_record(tmp_path, src)
    report = reconcile(spool, store)
    assert report.reindexed_files == 1
    [rec] = store.study_instances(str(ds.StudyInstanceUID))
    meta_len = 144 + int(read_file_meta_info(src).FileMetaInformationGroupLength)
    assert rec.size == src.stat().st_size - meta_len
    assert store.studies()[0].state == "receiving"


def test_of_two_copies_of_a_moved_instance_the_later_stands(
    tmp_path: Path, write_study: object
) -> None:
    """An instance moved to another study whose record a power cut lost: the store still has
    the old place, the spool both files. The later file (where the sender put it last) is
    recorded and the old one goes; no record is reported missing."""
    import os

    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from dicom_node.store.recovery import reconcile

    [src] = write_study(slices=1)  # type: ignore[operator]
    ds = dcmread(src)
    store, spool, old = _spooled_without_record(tmp_path, src)
    assert reconcile(spool, store).reindexed_files == 1  # recorded at the old place
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    new = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    new.parent.mkdir(parents=True)
    ds.save_as(new, enforce_file_format=True)
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))  # the old file is the earlier one
    report = reconcile(spool, store)
    assert (report.reindexed_files, report.missing_files) == (1, 0)
    assert store.instance_location(str(ds.SOPInstanceUID))[0] == new  # type: ignore[index]
    assert not old.exists() and new.exists()


def test_retention_leaves_a_study_re_completed_since_it_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest jobs are read once per pass; a study re-sent and completed again (version 2
    queued) after that read keeps its instances and rows."""
    from dicom_node.store import retention

    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    paths = _study(store, spool, "1.1")
    _finish(store, "1.1", JobState.DONE)
    judged = retention._jobs_by_study(store)  # the pass's view, before the re-send
    _study(store, spool, "1.1")  # re-sent: re-opened ...
    assert store.complete_study("1.1", reason="released") is not None  # ... and queued as v2
    monkeypatch.setattr(retention, "_jobs_by_study", lambda _store: judged)
    removed = apply_retention(store, spool, tmp_path / "work", keep_hours=0, now=time.time() + 5)
    assert removed == retention.Removed(0, 0)
    assert all(p.exists() for p in paths)
    assert [s.instances for s in store.studies()] == [2]


def test_retention_passes_over_studies_it_removed_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Job rows stay as history after their study is removed; later passes find nothing to
    remove there and say nothing of it."""
    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    _study(store, spool, "1.1")
    _finish(store, "1.1", JobState.DONE)
    later = time.time() + 5
    assert apply_retention(store, spool, tmp_path / "work", keep_hours=0, now=later).studies == 1
    caplog.clear()
    with caplog.at_level("INFO"):
        again = apply_retention(store, spool, tmp_path / "work", keep_hours=0, now=later)
    assert again.studies == 0
    assert "removed" not in caplog.text


def test_a_resend_during_removal_waits_and_is_kept(
    receiver_in_process: Callable[..., InProcessReceiver],
    write_study: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A study re-sent (dcmtk's storescu, to the real receiver) while retention deletes it:
    the receiver waits until the deletion is over, then files the re-send as a new study.
    Nothing it acknowledged is deleted."""
    node = receiver_in_process()
    store, spool = node.store, node.spool
    files = write_study(slices=3)
    assert storescu(files, node.port).returncode == 0
    [study] = store.studies()
    _finish(store, study.study_uid, JobState.DONE)
    sent: list[subprocess.CompletedProcess[str]] = []
    resend = threading.Thread(target=lambda: sent.append(storescu(files, node.port)))
    real_remove = spool.remove

    def remove(path: Path) -> None:
        if resend.ident is None:  # the first file: the PACS sends the study again now
            resend.start()
            time.sleep(1.5)
            assert not sent, "a re-send was answered while its study was being deleted"
        real_remove(path)

    monkeypatch.setattr(spool, "remove", remove)
    removed = apply_retention(store, spool, tmp_path / "work", keep_hours=0, now=time.time() + 5)
    resend.join(120)
    assert removed.studies == 1
    [done] = sent
    assert (done.stdout + done.stderr).count("Received Store Response (Success)") == 3
    rows = store.study_instances(study.study_uid)
    assert len(rows) == 3
    assert all(r.path.exists() for r in rows)
    assert [s.state for s in store.studies()] == [StudyState.RECEIVING]


def test_a_retention_pass_reads_only_the_studies_still_spooled(tmp_path: Path) -> None:
    """The history of studies removed before (2,000 finished jobs with their results) is not
    read again by every pass: one pass stays within a few MiB (it had read every job with its
    result, every minute: 1.2 GB of memory with 20,000 jobs)."""
    import json
    import tracemalloc

    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    result = json.dumps({"series": [{"images": {"flagged": list(range(2000))}}]})
    old = time.time() - 30 * 86400
    with store.transaction() as db:
        db.executemany(
            "INSERT INTO jobs (study_uid, version, state, attempts, result, created_at,"
            " updated_at, finished_at) VALUES (?, 1, 'done', 1, ?, ?, ?, ?)",
            [(f"1.2.3.{i}", result, old, old, old) for i in range(2000)],
        )
    _study(store, spool, "1.4")
    _finish(store, "1.4", JobState.DONE)
    tracemalloc.start()
    try:
        removed = apply_retention(store, spool, tmp_path / "work", keep_hours=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert removed.studies == 1
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_a_study_purged_while_the_node_runs_can_arrive_again(tmp_path: Path) -> None:
    """``dicom-node purge`` (another process) removes a study's folders while the receiver's
    spool still knows them: the next instance of that study is filed all the same."""
    receiving = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    first = receiving.path_for("1.2.3", "1.2.3.4", "1.2.3.4.1")
    receiving.store(b"one", first)
    Spool(tmp_path / "spool", min_free_bytes=0, fsync=False).remove(first)  # the purge
    assert not first.parent.exists()
    second = receiving.path_for("1.2.3", "1.2.3.4", "1.2.3.4.2")
    receiving.store(b"two", second)
    assert second.read_bytes() == b"two"


def _deliver(store: JobStore, spool: Spool, study: str, *, result: dict[str, object]) -> int:
    """A version of ``study`` whose one report is delivered to the PACS."""
    from dicom_node.config import DispatchSettings
    from dicom_node.store.jobs import OutputFile
    from dicom_node.store.outbox import Outbox

    _study(store, spool, study)
    job = store.complete_study(study, reason="test")
    assert job is not None and store.claim_next_job() is not None
    store.finish_with_outputs(
        job.id,
        result=result,
        outputs=[OutputFile(Path(f"/w/{job.id}.dcm"), "1.2.840.10008.5.1.4.1.1.88.34", "9.9")],
        destinations=["pacs"],
    )
    outbox = Outbox(store, DispatchSettings())
    [item] = outbox.claim("pacs")
    outbox.delivered(item.id, 0)
    assert store.job(job.id).state == JobState.DONE
    return job.id


def test_history_of_removed_studies_is_pruned_but_a_resent_study_follows_on(
    tmp_path: Path,
) -> None:
    """``history_days`` after a removed study's last job ended, its state changes, deliveries
    and older jobs go; its newest job and its newest delivered one stay, so a re-send becomes
    the next version (no result UID made twice) and revises the last report. Spooled studies
    and recent history are left alone."""
    from dicom_node.store.retention import prune_history

    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    work = tmp_path / "work"
    first = _deliver(store, spool, "1.1", result={"reports": ["v1"]})
    second = _deliver(store, spool, "1.1", result={"reports": ["v2"]})
    delivered = _deliver(store, spool, "1.2", result={"reports": ["b1"]})
    _study(store, spool, "1.2")
    skipped = _finish(store, "1.2", JobState.SKIPPED)  # sent again without a series to analyse
    kept_spooled = _deliver(store, spool, "1.3", result={})
    later = time.time() + 2 * 3600
    assert apply_retention(store, spool, work, keep_hours=1, now=later).studies == 3
    _study(store, spool, "1.3")  # ...but 1.3 is sent again: spooled, and its history stays
    recent = _deliver(store, spool, "1.4", result={})
    assert apply_retention(store, spool, work, keep_hours=0, now=time.time() + 1).studies == 1

    assert prune_history(store, history_days=None, now=later + 400 * 86400) == (0, 0)
    assert prune_history(store, history_days=90, now=time.time() + 89 * 86400) == (0, 0)
    jobs, rows = prune_history(store, history_days=90, now=time.time() + 91 * 86400)
    kept = {j.id for j in store.jobs()}
    assert first not in kept and jobs == 1
    assert {second, delivered, skipped, kept_spooled, recent} <= kept
    assert rows > 0
    for job in (second, delivered, skipped, recent):
        assert store.job_events(job) == []
    assert store.job_events(kept_spooled) != []
    assert store.delivery_counts() == {("pacs", "delivered"): 1}  # 1.3's
    assert store.earlier_result("1.2", 99) == {"reports": ["b1"]}

    _study(store, spool, "1.1")
    again = store.complete_study("1.1", reason="test")
    assert again is not None and again.version == 3
    assert store.earlier_result("1.1", again.version) == {"reports": ["v2"]}


def test_history_goes_only_after_the_studys_last_job_and_its_last_delivery(
    tmp_path: Path,
) -> None:
    """A study's history is kept while any of its jobs ended within ``history_days`` (the
    count starts at its last job), and while a delivery of a dead job is still under way (its
    other destination): the dispatcher still needs those rows, and the study its files."""
    from dicom_node.config import DispatchSettings
    from dicom_node.store.jobs import OutputFile
    from dicom_node.store.outbox import Outbox
    from dicom_node.store.retention import prune_history

    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    now = time.time()
    old = _deliver(store, spool, "1.1", result={})
    newer = _deliver(store, spool, "1.1", result={})
    _study(store, spool, "1.2")
    dying = store.complete_study("1.2", reason="test")
    assert dying is not None and store.claim_next_job() is not None
    store.finish_with_outputs(
        dying.id,
        result={},
        outputs=[OutputFile(Path("/w/sr.dcm"), "1.2.840.10008.5.1.4.1.1.88.34", "8.8")],
        destinations=["pacs", "archive"],
    )
    outbox = Outbox(store, DispatchSettings())
    [archive] = outbox.claim("archive")
    with store.transaction() as db:  # the archive's delivery died: the job with it
        db.execute("UPDATE outbox SET state='dead' WHERE id=?", (archive.id,))
        store.set_state(db, dying.id, JobState.DEAD, "archive refused", finished_at=now)
        # the first version of 1.1 ended 100 days ago, the second 10 days ago
        db.execute("UPDATE jobs SET finished_at=? WHERE id=?", (now - 100 * 86400, old))
        db.execute("UPDATE jobs SET finished_at=? WHERE id=?", (now - 10 * 86400, newer))
    # 1.2's delivery to the PACS is still pending: the operator's purge leaves it for now
    assert purge(store, spool, tmp_path / "work").studies == 0
    assert apply_retention(store, spool, tmp_path / "work", keep_hours=1, now=now).studies == 1

    assert prune_history(store, history_days=90, now=now) == (0, 0)
    assert store.job_events(old) != []
    assert prune_history(store, history_days=1, now=now + 2 * 86400)[0] == 1  # old: 1.1's
    assert store.job_events(dying.id) != []
    [pending] = outbox.claim("pacs")
    outbox.delivered(pending.id, 0)
    assert purge(store, spool, tmp_path / "work").studies == 1
    jobs, rows = prune_history(store, history_days=1, now=now + 2 * 86400)
    assert jobs == 0 and rows > 0 and store.job_events(dying.id) == []
    assert {j.id for j in store.jobs()} == {newer, dying.id}


def test_an_older_versions_results_on_their_way_keep_the_study(tmp_path: Path) -> None:
    """Version 1's results wait for a PACS that is down; the study is sent again and version
    2 dies. ``purge`` (and retention) leave the study while any of its versions still has
    results on their way: deleting it took version 1's files from under the outbox, and the
    study ended with no results at all. Once they are delivered, it goes."""
    from dicom_node.config import DispatchSettings
    from dicom_node.store.jobs import OutputFile
    from dicom_node.store.outbox import Outbox

    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    work = tmp_path / "work"
    _study(store, spool, "1.1")
    first = store.complete_study("1.1", reason="test")
    assert first is not None and store.claim_next_job() is not None
    sr = work / f"{first.id}-v1" / "sr.dcm"
    sr.parent.mkdir(parents=True)
    sr.write_bytes(b"sr")
    store.finish_with_outputs(
        first.id,
        result={},
        outputs=[OutputFile(sr, "1.2.840.10008.5.1.4.1.1.88.34", "9.9")],
        destinations=["pacs"],
    )
    _study(store, spool, "1.1", n=3)  # sent again: version 2, which dies
    _finish(store, "1.1", JobState.DEAD)
    assert purge(store, spool, work).studies == 0
    assert apply_retention(store, spool, work, keep_hours=0, now=time.time() + 1).studies == 0
    assert sr.exists()
    outbox = Outbox(store, DispatchSettings())
    [item] = outbox.claim("pacs")
    outbox.delivered(item.id, 0)
    assert purge(store, spool, work).studies == 1
    assert not sr.exists()


def test_a_dead_version_keeps_its_study_when_a_newer_one_was_skipped(tmp_path: Path) -> None:
    """Version 1 died; the study came again with nothing to analyse (version 2 skipped).
    Version 1's results are still the study's newest: retention keeps the study, as it keeps
    any dead job's, for ``retry``; ``purge`` removes it."""
    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    work = tmp_path / "work"
    _study(store, spool, "1.1")
    _finish(store, "1.1", JobState.DEAD)
    _study(store, spool, "1.1", n=3)
    _finish(store, "1.1", JobState.SKIPPED)
    later = time.time() + 3600
    assert apply_retention(store, spool, work, keep_hours=0, now=later).studies == 0
    assert purge(store, spool, work, now=later).studies == 1
