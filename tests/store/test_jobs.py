"""The job store's state machine, on a real SQLite file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.errors import JobStoreError
from dicom_node.store.jobs import InstanceRecord, JobState, JobStore, Recorded, StudyState


def _rec(
    store_dir: Path, sop: str, study: str = "1.2.3", series: str = "1.2.3.4"
) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop,
        study_uid=study,
        series_uid=series,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        path=store_dir / f"{sop}.dcm",
        size=10,
        calling_ae="PACS",
        received_at=time.time(),
    )


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite")


def test_completion_queues_a_job_per_version(store: JobStore, tmp_path: Path) -> None:
    """A completed study gets job version 1; re-opening and completing again gives version 2."""
    assert store.record_instance(_rec(tmp_path, "1.1")) is Recorded.NEW
    assert store.record_instance(_rec(tmp_path, "1.2")) is Recorded.NEW
    job = store.complete_study("1.2.3", reason="quiet period")
    assert job is not None
    assert (job.version, job.state) == (1, JobState.QUEUED)
    assert store.complete_study("1.2.3", reason="again") is None  # already complete
    claimed = store.claim_next_job()
    assert claimed is not None
    assert (claimed.id, claimed.state, claimed.attempts) == (job.id, JobState.RUNNING, 1)
    assert store.record_instance(_rec(tmp_path, "1.3")) is Recorded.NEW  # late instance
    [study] = store.studies()
    assert (study.state, study.instances) == (StudyState.RECEIVING, 3)
    job2 = store.complete_study("1.2.3", reason="quiet period")
    assert job2 is not None
    assert job2.version == 2


def test_new_instance_supersedes_a_job_not_yet_started(store: JobStore, tmp_path: Path) -> None:
    """A queued job whose study is re-opened is superseded, never run twice."""
    store.record_instance(_rec(tmp_path, "1.1"))
    job = store.complete_study("1.2.3", reason="quiet period")
    assert job is not None
    assert store.record_instance(_rec(tmp_path, "1.1")) is Recorded.REPLACED
    assert store.job(job.id).state == JobState.SUPERSEDED
    assert store.claim_next_job() is None
    job2 = store.complete_study("1.2.3", reason="quiet period")
    assert job2 is not None
    assert job2.version == 2
    claimed = store.claim_next_job()
    assert claimed is not None
    assert claimed.id == job2.id


def test_quiet_since_guards_against_a_racing_instance(store: JobStore, tmp_path: Path) -> None:
    """Completion by quiet period does not fire if an instance landed after the scan read."""
    rec = _rec(tmp_path, "1.1")
    store.record_instance(rec)
    assert store.complete_study("1.2.3", reason="quiet", quiet_since=rec.received_at - 1) is None
    assert store.complete_study("1.2.3", reason="quiet", quiet_since=rec.received_at) is not None


def test_failed_then_dead_then_retried(store: JobStore, tmp_path: Path) -> None:
    """failed waits for its retry time; dead is final until retried by the operator."""
    store.record_instance(_rec(tmp_path, "1.1"))
    job = store.complete_study("1.2.3", reason="quiet")
    assert job is not None
    running = store.claim_next_job()
    assert running is not None
    later = time.time() + 3600
    failed = store.finish_job(job.id, JobState.FAILED, error="boom", not_before=later)
    assert (failed.state, failed.last_error) == (JobState.FAILED, "boom")
    assert store.claim_next_job() is None  # not due yet
    again = store.claim_next_job(now=later + 1)
    assert again is not None
    assert again.attempts == 2
    dead = store.finish_job(job.id, JobState.DEAD, error="boom again")
    assert dead.finished_at is not None
    assert store.claim_next_job(now=later + 10) is None
    with pytest.raises(JobStoreError):
        store.finish_job(job.id, JobState.DONE)  # not running
    retried = store.retry_job(job.id)
    assert (retried.state, retried.attempts) == (JobState.QUEUED, 0)
    states = [s for _, s, _ in store.job_events(job.id)]
    assert states == ["queued", "running", "failed", "running", "dead", "queued"]
    with pytest.raises(JobStoreError, match="only dead or failed"):
        store.retry_job(job.id)
    with pytest.raises(JobStoreError, match="no job"):
        store.retry_job(999)


def test_recover_requeues_running_jobs_after_a_crash(tmp_path: Path) -> None:
    """A job left running by a crashed process is queued again when the store is reopened."""
    first = JobStore(tmp_path / "jobs.sqlite")
    first.record_instance(_rec(tmp_path, "1.1"))
    first.complete_study("1.2.3", reason="quiet")
    assert first.claim_next_job() is not None
    # no close(): the process "dies" here
    second = JobStore(tmp_path / "jobs.sqlite")
    [job] = second.recover()
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    claimed = second.claim_next_job()
    assert claimed is not None
    assert claimed.attempts == 2
