"""Retention and purge on a real job store and spool."""

from __future__ import annotations

import time
from pathlib import Path

from dicom_node.store.jobs import InstanceRecord, JobState, JobStore
from dicom_node.store.retention import apply_retention, purge
from dicom_node.store.spool import Spool


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


def test_reconcile_reindexes_a_spooled_file_the_store_lost(
    tmp_path: Path, write_study: object
) -> None:
    """After a power cut the store may lack the last records: a spooled file it does not know is
    read and recorded (with its data-set size), and its study re-opened."""
    import shutil

    from pydicom import dcmread
    from pydicom.filereader import read_file_meta_info

    from dicom_node.store.recovery import reconcile

    [src] = write_study(slices=1)  # type: ignore[operator]
    ds = dcmread(src)
    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    dest = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    dest.parent.mkdir(parents=True)
    shutil.copy(src, dest)
    report = reconcile(spool, store)
    assert report.reindexed_files == 1
    [rec] = store.study_instances(str(ds.StudyInstanceUID))
    meta_len = 144 + int(read_file_meta_info(src).FileMetaInformationGroupLength)
    assert rec.size == src.stat().st_size - meta_len
    assert store.studies()[0].state == "receiving"
