"""The job store's state machine, on a real SQLite file."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
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


@pytest.mark.parametrize("interruption", ["failed", "stopped"])
def test_a_job_whose_study_reopened_while_it_ran_is_superseded(
    tmp_path: Path, interruption: str
) -> None:
    """Version 1 is running when a late instance re-opens the study; it then fails (or the node
    stops and resumes it). It is never run again: while the study receives nothing runs, and
    once version 2 is queued only version 2 does."""
    store = JobStore(tmp_path / "jobs.sqlite")
    store.record_instance(_rec(tmp_path, "1.1"))
    v1 = store.complete_study("1.2.3", reason="quiet")
    assert v1 is not None and store.claim_next_job() is not None
    store.record_instance(_rec(tmp_path, "1.2"))  # late instance while v1 runs
    if interruption == "failed":
        store.finish_job(v1.id, JobState.FAILED, error="transient", not_before=0.0)
    else:
        store = JobStore(tmp_path / "jobs.sqlite")  # killed and restarted
        store.recover()
    assert store.claim_next_job() is None  # the study is receiving: v1 must not run on
    assert store.job(v1.id).state == JobState.SUPERSEDED
    v2 = store.complete_study("1.2.3", reason="quiet")
    assert v2 is not None
    claimed = store.claim_next_job()
    assert claimed is not None and claimed.id == v2.id
    assert store.claim_next_job() is None


def test_a_stale_job_left_queued_is_superseded_by_the_newer_version(tmp_path: Path) -> None:
    """A job queued again (a restart) after a newer version exists is superseded when due."""
    store = JobStore(tmp_path / "jobs.sqlite")
    store.record_instance(_rec(tmp_path, "1.1"))
    v1 = store.complete_study("1.2.3", reason="quiet")
    assert v1 is not None and store.claim_next_job() is not None
    store.record_instance(_rec(tmp_path, "1.2"))
    v2 = store.complete_study("1.2.3", reason="quiet")  # v1 still running
    assert v2 is not None
    store = JobStore(tmp_path / "jobs.sqlite")
    [resumed] = store.recover()
    assert resumed.id == v1.id
    claimed = store.claim_next_job()
    assert claimed is not None and claimed.id == v2.id
    assert store.job(v1.id).state == JobState.SUPERSEDED


def test_removable_paths_rechecks_what_retention_judged(tmp_path: Path) -> None:
    """A study may be deleted only while its newest job is the one judged and final, and it is
    not receiving; forget_study drops its rows, never those of a study receiving again."""
    store = JobStore(tmp_path / "jobs.sqlite")
    store.record_instance(_rec(tmp_path, "1.1"))
    v1 = store.complete_study("1.2.3", reason="quiet")
    assert v1 is not None
    assert store.removable_paths("1.2.3", v1.id) is None  # queued
    store.claim_next_job()
    store.finish_job(v1.id, JobState.DONE, result={})
    assert store.removable_paths("1.2.3", v1.id) == [tmp_path / "1.1.dcm"]
    store.record_instance(_rec(tmp_path, "1.2"))  # re-sent
    assert store.removable_paths("1.2.3", v1.id) is None  # receiving
    store.forget_study("1.2.3")
    assert [s.instances for s in store.studies()] == [2]
    v2 = store.complete_study("1.2.3", reason="quiet")
    assert v2 is not None
    assert store.removable_paths("1.2.3", v1.id) is None  # v1 is no longer the newest
    assert store.removable_paths("9.9", v1.id) is None  # no such study
    store.claim_next_job()
    store.finish_job(v2.id, JobState.DONE, result={})
    assert len(store.removable_paths("1.2.3", v2.id) or []) == 2
    store.forget_study("1.2.3")
    assert store.studies() == []


def test_a_full_database_raises_out_of_resources(tmp_path: Path) -> None:
    """SQLite's "database or disk is full" becomes OutOfResourcesError (0xA700 at the
    receiver); the store works again once there is room."""
    from dicom_node.errors import OutOfResourcesError

    store = JobStore(tmp_path / "jobs.sqlite")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(OutOfResourcesError, match="full"):
        for i in range(1000):
            store.record_instance(_rec(tmp_path, f"1.{i + 1}" + "0" * 60))
    store._db.execute("PRAGMA max_page_count = 1073741823")
    assert store.record_instance(_rec(tmp_path, "2.1")) is Recorded.NEW
    assert store.writable()


def test_results_of_a_job_overtaken_while_it_ran_are_not_sent(tmp_path: Path) -> None:
    """Version 1 finishes with outputs after a late instance re-opened its study: it ends
    superseded and queues nothing, so the study's results are not doubled."""
    from dicom_node.store.jobs import OutputFile

    store = JobStore(tmp_path / "jobs.sqlite")
    store.record_instance(_rec(tmp_path, "1.1"))
    v1 = store.complete_study("1.2.3", reason="quiet")
    assert v1 is not None and store.claim_next_job() is not None
    store.record_instance(_rec(tmp_path, "1.2"))  # late instance while v1 runs
    outputs = [OutputFile(tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34", "2.25.1")]
    done = store.finish_with_outputs(v1.id, result={"n": 1}, outputs=outputs, destinations=["p"])
    assert done.state == JobState.SUPERSEDED and done.finished_at is not None
    with store.transaction() as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    v2 = store.complete_study("1.2.3", reason="quiet")
    assert v2 is not None and store.claim_next_job() is not None
    done = store.finish_with_outputs(v2.id, result={"n": 2}, outputs=outputs, destinations=["p"])
    assert done.state == JobState.SENDING


def test_a_job_cut_off_by_the_node_at_every_attempt_is_dead_lettered(tmp_path: Path) -> None:
    """A job that takes the node down (a crash, the watchdog's kill) is resumed after each
    start, but not for ever: once it has used max_attempts it is dead-lettered, not run."""
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    store.record_instance(_rec(tmp_path, "1.1"))
    job = store.complete_study("1.2.3", reason="quiet")
    assert job is not None
    for attempt in (1, 2, 3):
        claimed = store.claim_next_job(max_attempts=3)
        assert claimed is not None and claimed.attempts == attempt
        store = JobStore(path)  # the node dies with the job running, and starts again
        store.recover()
    assert store.claim_next_job(max_attempts=3) is None
    dead = store.job(job.id)
    assert dead.state == JobState.DEAD and "cut off" in (dead.last_error or "")
    assert store.retry_job(job.id).state == JobState.QUEUED  # the operator may try again


def test_requeue_gives_the_attempt_back(store: JobStore, tmp_path: Path) -> None:
    """A job put back because the node stopped (or no analysis could run) keeps its attempts."""
    store.record_instance(_rec(tmp_path, "1.1"))
    job = store.complete_study("1.2.3", reason="quiet")
    assert job is not None and store.claim_next_job() is not None
    back = store.requeue(job.id, not_before=time.time() + 60, detail="parked")
    assert (back.state, back.attempts) == (JobState.QUEUED, 0)
    assert store.claim_next_job() is None  # not before its time
    with pytest.raises(JobStoreError, match="not running"):
        store.requeue(job.id, not_before=0.0, detail="again")


def test_a_job_store_of_the_first_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    """A store written before instances carried their digest (schema 1) opens: the column is
    added, its rows keep everything else with no digest, and the store says schema 2."""
    import sqlite3

    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO meta VALUES ('schema', '1');"
            "CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,"
            " series_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, modality TEXT NOT NULL,"
            " path TEXT NOT NULL, size INTEGER NOT NULL, calling_ae TEXT NOT NULL,"
            " received_at REAL NOT NULL);"
            "INSERT INTO instances VALUES ('1.2.3.1', '1.2.3', '1.2.3.9',"
            " '1.2.840.10008.5.1.4.1.1.2', 'CT', '/spool/a.dcm', 100, 'PACS', 1.0);"
        )
    store = JobStore(path)
    assert store.instance_location("1.2.3.1") == (Path("/spool/a.dcm"), 100, None)
    with store.transaction() as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "2"
    store.close()
    JobStore(path).close()  # and opens again as it is
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='3' WHERE key='schema'")
    with pytest.raises(JobStoreError, match="has schema 3, this version needs 2"):
        JobStore(path)


def test_only_the_newest_version_is_retried_and_a_report_that_went_out_is_revised(
    store: JobStore, tmp_path: Path
) -> None:
    """Version 1 died with its SR delivered to one destination (its SEG refused by it); the
    study came again as version 2. ``retry`` of version 1 is refused (its results would land
    after, and be revised by, version 2's), as it is while the study receives again; version
    2 is given version 1's result as the one whose report it revises, since its SR reached
    the PACS."""
    from dicom_node.config import DispatchSettings
    from dicom_node.store.jobs import OutputFile
    from dicom_node.store.outbox import DeliveryState, Outbox

    store.record_instance(_rec(tmp_path, "1.1"))
    first = store.complete_study("1.2.3", reason="quiet period")
    assert first is not None and store.claim_next_job() is not None
    outputs = [
        OutputFile(tmp_path / "seg.dcm", "1.2.840.10008.5.1.4.1.1.66.4", "7.1"),
        OutputFile(tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34", "7.2"),
    ]
    store.finish_with_outputs(
        first.id, result={"reports": ["v1"]}, outputs=outputs, destinations=["pacs"]
    )
    outbox = Outbox(store, DispatchSettings(max_attempts=1))
    seg, sr = outbox.claim("pacs")
    outbox.delivered(sr.id, 0)
    assert outbox.failed(seg.id, "failure status 0xA700", 0xA700) == DeliveryState.DEAD
    assert store.job(first.id).state == JobState.DEAD
    assert store.earlier_result("1.2.3", 2) == {"reports": ["v1"]}

    store.record_instance(_rec(tmp_path, "1.2"))  # the study comes again
    with pytest.raises(JobStoreError, match="is receiving"):
        store.retry_job(first.id)
    second = store.complete_study("1.2.3", reason="quiet period")
    assert second is not None and second.version == 2
    with pytest.raises(JobStoreError, match=r"has a newer version \(2\)"):
        store.retry_job(first.id)


def test_writable_says_no_while_another_process_holds_the_store(tmp_path: Path) -> None:
    """The readiness check's question: with another process holding the write lock past the
    store's wait, the answer is "not writable" (a 503 with the reason), not an exception that
    drops the probe's connection."""
    import sqlite3

    store = JobStore(tmp_path / "jobs.sqlite", busy_seconds=0.3)
    assert store.writable()
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert store.writable() is False
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.writable()


def test_an_older_versions_deliveries_go_before_a_newer_ones(
    store: JobStore, tmp_path: Path
) -> None:
    """Version 1's results wait out a long backoff for a PACS that was down; version 2's are
    due. Claiming for that PACS takes version 1's with them, first, whatever their backoff:
    the PACS never gets the outdated SEG after the one that revises it."""
    from dicom_node.config import DispatchSettings
    from dicom_node.store.jobs import OutputFile
    from dicom_node.store.outbox import Outbox

    outbox = Outbox(store, DispatchSettings())
    jobs = []
    for version in (1, 2):
        store.record_instance(_rec(tmp_path, f"1.{version}"))
        job = store.complete_study("1.2.3", reason="quiet period")
        assert job is not None and store.claim_next_job() is not None
        outputs = [
            OutputFile(tmp_path / f"seg{version}", "1.2.840.10008.5.1.4.1.1.66.4", f"7.{version}")
        ]
        store.finish_with_outputs(job.id, result={}, outputs=outputs, destinations=["pacs"])
        jobs.append(job.id)
        if version == 1:
            [first] = outbox.claim("pacs")
            outbox.failed(first.id, "no connection")
            with store.transaction() as db:  # deep in its backoff
                db.execute(
                    "UPDATE outbox SET not_before=? WHERE id=?", (time.time() + 3600, first.id)
                )
    assert [i.job_id for i in outbox.claim("pacs")] == jobs


def test_a_write_is_tried_again_only_while_the_store_cannot_take_it_for_now() -> None:
    """``until_recorded``: a store that is busy (or full, or failing to read) is asked again
    until it takes the write; a refusal for good (a job not in the state the write needs) is
    raised at once, as is the transient error once the node stops."""
    import sqlite3
    import threading

    from dicom_node.errors import OutOfResourcesError
    from dicom_node.store.jobs import until_recorded

    tries: list[int] = []

    def busy_twice() -> str:
        tries.append(1)
        if len(tries) <= 2:
            raise (OutOfResourcesError if len(tries) == 1 else sqlite3.OperationalError)("busy")
        return "recorded"

    assert until_recorded(busy_twice, what="a test write") == "recorded"
    assert len(tries) == 3

    def for_good() -> str:
        raise JobStoreError("job 7 is done")

    started = time.monotonic()
    with pytest.raises(JobStoreError, match="job 7 is done"):
        until_recorded(for_good, what="a test write")
    assert time.monotonic() - started < 0.5
    stopped = threading.Event()
    stopped.set()

    def busy() -> str:
        raise OutOfResourcesError("busy")

    with pytest.raises(OutOfResourcesError):
        until_recorded(busy, what="a test write", stop=stopped)


def test_a_dead_version_is_retried_when_the_newer_one_has_no_results(
    store: JobStore, tmp_path: Path
) -> None:
    """Version 1 died; the study came again and version 2 was skipped (nothing to analyse in
    what was sent): version 1's results are still the newest, so it is retried."""
    store.record_instance(_rec(tmp_path, "1.1"))
    first = store.complete_study("1.2.3", reason="quiet period")
    assert first is not None and store.claim_next_job() is not None
    store.finish_job(first.id, JobState.DEAD, error="boom")
    store.record_instance(_rec(tmp_path, "1.2"))
    second = store.complete_study("1.2.3", reason="quiet period")
    assert second is not None and store.claim_next_job() is not None
    store.finish_job(second.id, JobState.SKIPPED, error="no series qualifies")
    assert store.retry_job(first.id).state == JobState.QUEUED


def test_a_refused_older_version_holds_back_every_newer_row_of_its_study(
    store: JobStore, tmp_path: Path
) -> None:
    """Version 1's delivery is refused and retried later: every pending row of the study's
    newer versions at that destination waits as long, in the batch or not (claim would
    otherwise take version 1 along with any of them that is due, whatever its backoff);
    another destination's rows, and other studies', are left as they are."""
    from dicom_node.config import DispatchSettings
    from dicom_node.store.jobs import OutputFile
    from dicom_node.store.outbox import Outbox

    outbox = Outbox(store, DispatchSettings(retry_base_seconds=60))
    for version in (1, 2):
        store.record_instance(_rec(tmp_path, f"1.{version}"))
        job = store.complete_study("1.2.3", reason="quiet period")
        assert job is not None and store.claim_next_job() is not None
        outputs = [
            OutputFile(
                tmp_path / f"o{version}{k}", "1.2.840.10008.5.1.4.1.1.66.4", f"7.{version}{k}"
            )
            for k in range(3)
        ]
        store.finish_with_outputs(job.id, result={}, outputs=outputs, destinations=["a", "b"])
    [oldest, *_] = outbox.claim("a", limit=1)
    outbox.failed(oldest.id, "failure status 0xA700", 0xA700)
    refused = outbox.item(oldest.id)
    newer = [i for i in outbox.items() if i.job_id != oldest.job_id]
    assert all(i.not_before >= refused.not_before for i in newer if i.destination == "a")
    assert all(i.not_before == 0 for i in newer if i.destination == "b")
    # of the study, only version 1's other result is due at "a" before version 1's refused one
    assert {i.job_id for i in outbox.claim("a")} == {oldest.job_id}


def _listed_as(uid: int | None, path: Path) -> int:
    """In a forked child, running as user ``uid`` (``None``: this user), open ``path``
    read-only and list its jobs; the exit status says how (0 listed one job, 3 refused as
    JobStoreError, 4 anything else)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 4
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            store = JobStore(path, read_only=True)
            code = 0 if len(store.jobs()) == 1 and store.counts() else 4
        except JobStoreError:
            code = 3
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_user_who_may_only_read_the_store_can_list_it(tmp_path: Path) -> None:
    """An operator in the service's group reads the store's files and cannot write them or
    their folder (the unit's 0750 state folder, UMask 0027): the listing opens it read-only,
    with the node running (its WAL files exist) and stopped (they do not). Root, whom file
    modes do not hold back, lists as ``nobody`` (others: read and search only); another user
    lists its own store with the write permissions taken away."""
    reader = 65534 if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="ro-store-"))

    def read_only(files: int, own: int) -> None:
        for file in folder.iterdir():
            file.chmod(files)
        folder.chmod(own)

    locked = (0o644, 0o755) if reader is not None else (0o444, 0o555)
    try:
        path = folder / "jobs.sqlite"
        node = JobStore(path)
        node.record_instance(_rec(folder, "1.1"))
        assert node.complete_study("1.2.3", reason="test") is not None
        read_only(*locked)
        assert (folder / "jobs.sqlite-wal").exists()
        assert _listed_as(reader, path) == 0  # the node running
        read_only(0o644, 0o755)  # the node may end its write-ahead log
        node.close()
        assert not (folder / "jobs.sqlite-wal").exists()
        read_only(*locked)
        assert _listed_as(reader, path) == 0  # the node stopped
        listing = JobStore(path, read_only=True)
        with pytest.raises(sqlite3.OperationalError, match="readonly"), listing.reading() as db:
            db.execute("DELETE FROM jobs")
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def test_a_read_only_store_of_another_schema_is_refused(tmp_path: Path) -> None:
    """Only the node upgrades a store: a listing of one at another schema says so."""
    path = tmp_path / "jobs.sqlite"
    JobStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.close()
    with pytest.raises(JobStoreError, match="has schema 1, this version reads"):
        JobStore(path, read_only=True)
