"""The node's stop, in this process: what is still in flight once the drain time is spent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_node.config import Config, load_config
from dicom_node.pipeline import InventoryPipeline, StudyInput, StudyResult
from dicom_node.service import Node
from dicom_node.store.jobs import JobState, JobStore
from dicom_node.store.outbox import DeliveryState, Outbox
from tests.dispatch.test_dispatch import _job_with_outputs
from tests.peers import StoreSCP, free_port
from tests.test_worker import _queued_job


def _config(tmp_path: Path, pacs_port: int, **sections: Any) -> Config:
    return load_config(
        None,
        overrides={
            "node": {"host": "127.0.0.1", "port": free_port()},
            "storage": {"data_dir": str(tmp_path / "var"), "min_free_disk_mb": 1},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
            ],
            "service": {"http_port": 0},
            "dispatch": {"connect_timeout_seconds": 3},
            "jobs": {"poll_seconds": 0.1},
            **sections,
        },
    )


def _non_daemon_threads() -> list[threading.Thread]:
    """Threads that would keep the interpreter from exiting."""
    return [
        t
        for t in threading.enumerate()
        if t.is_alive() and not t.daemon and t is not threading.main_thread()
    ]


def _wait(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_stop_aborts_a_send_to_a_stalling_pacs_and_the_next_start_delivers_it(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """A PACS that accepts the association and the C-STORE, then takes longer to answer than
    the drain time (storescp --sleep-during; the DIMSE timeout is the default 120 s): the stop
    aborts the association and returns within the drain time and a few seconds, leaving no
    thread that holds the process (pynetdicom's DUL thread is not a daemon); the rows go back
    to pending, their attempt not counted, and the next start delivers them."""
    files = write_study(slices=2)
    slow = scps("slow", "--sleep-during", "60")
    config = _config(tmp_path, slow.port)
    node = Node(config, pipeline=InventoryPipeline())
    node.start()
    job_id = _job_with_outputs(node.store, files, ["pacs"])
    node.dispatcher.wake.set()
    _wait(lambda: any(i.state == DeliveryState.SENDING for i in node.outbox.items(job_id)))
    time.sleep(1.0)  # the C-STORE is with the PACS, which sleeps
    started = time.monotonic()
    node.stop(drain_seconds=1.0)
    took = time.monotonic() - started
    for t in _non_daemon_threads():
        t.join(1.0)  # (a moment for a thread just ending)
    assert not _non_daemon_threads(), "a thread would hold the process past its stop"
    assert took < 1.0 + 7.0, f"the stop took {took:.1f} s"
    store = JobStore(config.storage.data_dir / "jobs.sqlite")
    rows = [(i.state, i.attempts) for i in Outbox(store, config.dispatch).items(job_id)]
    assert rows == [(DeliveryState.PENDING, 0)] * 2, rows
    store.close()

    slow.stop()
    pacs = scps("pacs", port=slow.port)  # the PACS answers again
    again = Node(_config(tmp_path, slow.port), pipeline=InventoryPipeline())
    again.start()
    try:
        _wait(lambda: again.store.job(job_id).state == JobState.DONE)
        assert [i.attempts for i in again.outbox.items(job_id)] == [1, 1]
    finally:
        again.stop(drain_seconds=1.0)
    assert len(pacs.received()) == 2


class _Blocking:
    """An analysis in this process (``jobs.isolate: false``) that takes longer than the stop
    allows: it returns only once ``release`` is set. No ``close``: nothing can end it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, study: StudyInput) -> StudyResult:
        self.started.set()
        self.release.wait(60)
        return StudyResult(summary={"series": []})


def test_a_stop_parks_a_job_an_analysis_in_this_process_still_runs(tmp_path: Path) -> None:
    """jobs.isolate: false, the node stopped while an analysis runs past the drain time, four
    times: each stop parks the job (queued, its attempt given back), so it is never
    dead-lettered as cut off by the node's end; an analysis that ends after its stop records
    nothing, not even while the next start runs the job again; and the stop returns within
    the drain time and a few seconds."""
    job_id = 0
    analyses: list[_Blocking] = []
    for round_ in range(4):
        analysis = _Blocking()
        node = Node(
            _config(tmp_path, free_port(), jobs={"isolate": False, "poll_seconds": 0.1}),
            pipeline=analysis,
        )
        node.start()
        if round_ == 0:
            job_id = _queued_job(node.store, tmp_path)
            node.worker.wake.set()
        assert analysis.started.wait(30)
        assert node.store.job(job_id).state == JobState.RUNNING
        if analyses:  # the previous start's analysis ends now, while this start runs the job
            analyses[-1].release.set()
            time.sleep(0.5)
            assert node.store.job(job_id).state == JobState.RUNNING
        analyses.append(analysis)
        started = time.monotonic()
        node.stop(drain_seconds=0.5)
        assert time.monotonic() - started < 0.5 + 5.0
        store = JobStore(node.config.storage.data_dir / "jobs.sqlite")
        job = store.job(job_id)
        store.close()
        assert (job.state, job.attempts) == (JobState.QUEUED, 0), (round_, job)
    analyses[-1].release.set()  # ends after the last stop: the job stays parked
    time.sleep(0.5)
    store = JobStore(tmp_path / "var" / "jobs.sqlite")
    assert (store.job(job_id).state, store.job(job_id).attempts) == (JobState.QUEUED, 0)
    assert [s for _, s, _ in store.job_events(job_id)].count(JobState.DONE.value) == 0
