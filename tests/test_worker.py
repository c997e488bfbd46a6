"""The worker's one boundary: every outcome of a job becomes a job state, on a real job store."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dicom_node.config import JobSettings
from dicom_node.pipeline import StudyInput, StudyResult
from dicom_node.store.jobs import InstanceRecord, JobState, JobStore
from dicom_node.worker import Worker


def _queued_job(store: JobStore, tmp_path: Path) -> int:
    store.record_instance(
        InstanceRecord(
            sop_instance_uid="1.1",
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality="CT",
            path=tmp_path / "1.1.dcm",
            size=10,
            calling_ae="PACS",
            received_at=time.time(),
        )
    )
    job = store.complete_study("1.2.3", reason="quiet")
    assert job is not None
    return job.id


def _loop_until(worker: Worker, store: JobStore, job_id: int, state: JobState) -> None:
    """Run the worker's loop in a thread until the job reaches ``state``; the loop must stay
    alive all along, and end when told to."""
    stop = threading.Event()
    loop = threading.Thread(target=worker.run_forever, args=(stop, 0.05), daemon=True)
    loop.start()
    deadline = time.monotonic() + 30
    while store.job(job_id).state != state:
        assert time.monotonic() < deadline and loop.is_alive()
        time.sleep(0.05)
    assert loop.is_alive()
    stop.set()
    worker.wake.set()
    loop.join(10)
    assert not loop.is_alive()


def test_an_output_that_is_not_dicom_fails_the_job_and_the_worker_goes_on(
    tmp_path: Path,
) -> None:
    """A pipeline whose output file cannot be read as DICOM (a stand-in pipeline in this test:
    the fault is in what it returns): the job fails and is retried later; the worker loop
    keeps running and takes the next job."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _queued_job(store, tmp_path)

    def pipeline(study: StudyInput) -> StudyResult:
        bad = study.work_dir / "SR.dcm"
        bad.write_bytes(b"not DICOM")
        return StudyResult(summary={}, outputs=(bad,))

    _loop_until(
        Worker(store, pipeline, JobSettings(), tmp_path / "work"), store, job_id, JobState.FAILED
    )
    assert "InvalidDicomError" in (store.job(job_id).last_error or "")


def test_no_analysis_process_makes_the_job_wait_without_spending_an_attempt(
    tmp_path: Path,
) -> None:
    """The analysis process cannot start (a stand-in pipeline raises what the isolated one
    raises then): the job goes back to the queue for later with its attempt refunded, instead
    of being failed and dead-lettered with every other queued study."""
    from dicom_node.errors import AnalysisUnavailableError

    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _queued_job(store, tmp_path)

    def pipeline(study: StudyInput) -> StudyResult:
        raise AnalysisUnavailableError("no analysis process")

    worker = Worker(store, pipeline, JobSettings(max_attempts=1), tmp_path / "work")
    done = worker.run_once()
    assert done is not None
    job = store.job(job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    assert job.not_before > time.time()


def test_a_failing_job_store_does_not_end_the_worker_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job store fails outside any job (its disk full, say): the loop logs it, waits and
    goes on; once the store works again the queued job runs."""
    from dicom_node.errors import OutOfResourcesError

    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _queued_job(store, tmp_path)
    real_claim = store.claim_next_job
    failures = iter([OutOfResourcesError("job store: database or disk is full")])

    def claim(*args: object, **kwargs: object) -> object:
        for exc in failures:
            raise exc
        return real_claim(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "claim_next_job", claim)

    def pipeline(study: StudyInput) -> StudyResult:
        return StudyResult(summary={})

    _loop_until(
        Worker(store, pipeline, JobSettings(), tmp_path / "work"), store, job_id, JobState.DONE
    )


def test_progress_allows_a_job_past_its_limit_the_start_of_a_fresh_analysis(
    tmp_path: Path,
) -> None:
    """A job that ran into jobs.job_timeout_seconds also waits for a fresh analysis process
    to start (its model to load): the liveness check allows for it and no more."""

    class Slow:  # what the node's isolated pipeline says of its starts
        start_timeout_seconds = 600.0

        def __call__(self, study: StudyInput) -> StudyResult:
            return StudyResult(summary={})

    worker = Worker(
        JobStore(tmp_path / "jobs.sqlite"),
        Slow(),
        JobSettings(job_timeout_seconds=30.0),
        tmp_path / "work",
    )
    worker.last_beat = time.monotonic() - (30.0 + 62.0)
    assert worker.making_progress()  # 30 s of job and 62 s of restart
    worker.last_beat = time.monotonic() - (30.0 + 600.0 + 61.0)
    assert not worker.making_progress()


def _report(study: StudyInput) -> Path:
    """A structured report on the study's series, as the analysis writes one (its header)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = generate_uid()
    evidence = Dataset()
    series = Dataset()
    series.SeriesInstanceUID = study.instances[0].series_uid
    evidence.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    path = study.work_dir / f"SR_{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_study_sent_again_after_retention_revises_the_report_sent_before(
    tmp_path: Path,
) -> None:
    """A study analysed, its files and outputs deleted by retention, then sent again: the new
    version is given the earlier report from the job's result (the file is gone), so its SR
    names it as predecessor instead of being a second, unrelated report in the PACS."""
    from dicom_node.pipeline import ReportReference
    from dicom_node.store.retention import apply_retention
    from dicom_node.store.spool import Spool

    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    work = tmp_path / "work"
    first_id = _queued_job(store, tmp_path)
    seen: list[StudyInput] = []
    sent: list[Path] = []

    def pipeline(study: StudyInput) -> StudyResult:
        seen.append(study)
        sent.append(_report(study))
        return StudyResult(summary={}, outputs=(sent[-1],))

    worker = Worker(store, pipeline, JobSettings(), work)
    first = worker.run_once()
    assert first is not None and first.state == JobState.DONE
    assert seen[0].earlier_reports == ()
    reference = ReportReference.read(sent[0])
    assert reference is not None
    assert apply_retention(store, spool, work, keep_hours=0, now=time.time() + 1).studies == 1
    assert not sent[0].exists()

    second_id = _queued_job(store, tmp_path)  # the same study, sent again
    assert second_id != first_id
    second = worker.run_once()
    assert second is not None and (second.state, second.version) == (JobState.DONE, 2)
    assert seen[1].earlier_reports == (reference,)


def test_a_report_cut_short_gives_no_reference_and_never_leaves_its_job_running(
    tmp_path: Path,
) -> None:
    """An output SR whose file meta is whole but whose data set is cut short (a stand-in
    pipeline wrote it; the node's own writes whole files): reading its reference raises
    nothing, whatever the cut, and gives none when the cut falls before the series it is
    about; the job ends instead of staying ``running`` with the error escaping the worker's
    boundary."""
    from dicom_node.pipeline import ReportReference

    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _queued_job(store, tmp_path)
    cuts: list[int] = []

    def pipeline(study: StudyInput) -> StudyResult:
        path = _report(study)
        whole = path.read_bytes()
        cut = whole[: len(whole) - 40]
        path.write_bytes(cut)
        cuts.append(len(cut))
        return StudyResult(summary={}, outputs=(path,))

    done = Worker(store, pipeline, JobSettings(), tmp_path / "work").run_once()
    assert done is not None and done.state != JobState.RUNNING
    assert store.job(job_id).state == done.state
    [path] = (tmp_path / "work").glob("*/SR_*.dcm")
    whole_meta = path.read_bytes()
    for length in range(132, len(whole_meta), 7):
        path.write_bytes(whole_meta[:length])
        reference = ReportReference.read(path)
        if reference is None:
            continue
        assert reference.evidence_series, length
        assert whole_meta.find(b"\x40\x00\x75\xa3") < length, length  # the evidence is there


def test_a_job_store_locked_when_the_job_ends_still_gets_its_outcome(tmp_path: Path) -> None:
    """Another process holds the job store's write lock just as a job's analysis ends, past
    the store's own wait: the outcome is recorded once the lock is let go, instead of the job
    staying ``running`` (results unsent, nothing for ``retry`` to take) until a restart."""
    import sqlite3

    store = JobStore(tmp_path / "jobs.sqlite", busy_seconds=0.5)
    job_id = _queued_job(store, tmp_path)
    holder = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)

    def pipeline(study: StudyInput) -> StudyResult:
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(2.5, lambda: holder.execute("ROLLBACK")).start()
        return StudyResult(summary={"series": []})

    worker = Worker(store, pipeline, JobSettings(), tmp_path / "work")
    done = worker.run_once()
    holder.close()
    assert done is not None and done.state == JobState.DONE
    assert store.job(job_id).state == JobState.DONE


def test_a_stop_while_an_outcome_waits_on_the_store_ends_the_worker_at_once(
    tmp_path: Path,
) -> None:
    """The node stops while a job's outcome waits for a job store another process holds: the
    worker gives up waiting at the stop (the job, still ``running``, is resumed at the next
    start) instead of holding the stop for its whole drain period."""
    import sqlite3

    store = JobStore(tmp_path / "jobs.sqlite", busy_seconds=0.3)
    job_id = _queued_job(store, tmp_path)
    holder = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    waiting = threading.Event()

    def pipeline(study: StudyInput) -> StudyResult:
        holder.execute("BEGIN IMMEDIATE")
        waiting.set()
        return StudyResult(summary={"series": []})

    worker = Worker(store, pipeline, JobSettings(), tmp_path / "work")
    stop = threading.Event()
    loop = threading.Thread(target=worker.run_forever, args=(stop, 0.05), daemon=True)
    loop.start()
    assert waiting.wait(10)
    time.sleep(1.0)  # the outcome is being tried again
    stopped = time.monotonic()
    stop.set()
    worker.wake.set()
    loop.join(10)
    assert not loop.is_alive() and time.monotonic() - stopped < 3
    holder.execute("ROLLBACK")
    holder.close()
    assert store.job(job_id).state == JobState.RUNNING
    assert [j.id for j in store.recover()] == [job_id]
