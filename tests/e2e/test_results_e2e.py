"""The whole node: study in over DICOM, SEG + SR out to a stand-in PACS (dcmtk's storescp).

The node runs the tiny randomly initialised model (a test double for trained weights; see
tests/conftest.py::tiny_model_dir). Every SEG and SR that arrives is checked with dciodvfy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.peers import (
    NodeProcess,
    StoreSCP,
    analysis_process,
    dciodvfy,
    free_port,
    storescu,
)

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _dciodvfy_errors(path: Path) -> list[str]:
    return dciodvfy(path)[0]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs")
    yield scp.start()
    scp.stop()


def _node(
    node_factory: Callable[..., NodeProcess],
    model: Path,
    pacs_port: int,
    threshold: float,
    **extra: object,
) -> NodeProcess:
    return node_factory(
        model={"path": str(model)},
        lesions={"threshold": threshold, "min_volume_mm3": 0},
        inference={"device": "cpu", "batch_size": 8},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        dispatch={"retry_base_seconds": 0.5, "retry_max_seconds": 1.0},
        **extra,
    )


def _references(ds: object) -> set[str]:
    """Every Referenced SOP Instance UID anywhere in a dataset."""
    found: set[str] = set()

    def walk(d: object) -> None:
        for elem in d:  # type: ignore[attr-defined]
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.keyword == "ReferencedSOPInstanceUID":
                found.add(str(elem.value))

    walk(ds)
    return found


def test_study_in_seg_and_sr_out(
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
    pacs: StoreSCP,
    phantom_series: Callable[..., list[Path]],
) -> None:
    """storescu sends a study; the PACS receives a SEG and an SR in the same study, valid per
    dciodvfy, whose references resolve to the sent images; the job ends done."""
    files = phantom_series()
    node = _node(node_factory, tiny_model_dir, pacs.port, 0.5)
    assert storescu(files, node.port).returncode == 0
    listing = node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "done", timeout=120)
    received = pacs.received()
    classes = sorted(str(dcmread(p).SOPClassUID) for p in received)
    assert classes == sorted([SEG, COMPREHENSIVE_3D_SR])
    sent = {str(dcmread(f).SOPInstanceUID) for f in files}
    study = str(dcmread(files[0]).StudyInstanceUID)
    for path in received:
        ds = dcmread(path)
        assert str(ds.StudyInstanceUID) == study
        assert ds.PatientID == dcmread(files[0]).PatientID
        assert ds.Manufacturer == "dicom-node"
        assert _references(ds) & sent and _references(ds) <= sent | {
            str(dcmread(p).SOPInstanceUID) for p in received
        }
        assert _dciodvfy_errors(path) == [], path
    assert all(d["state"] == "delivered" for d in listing["deliveries"])
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10) as rsp:
        metrics = rsp.read().decode()
    assert 'dicom_node_stage_seconds_count{stage="model"} 1.0' in metrics
    assert 'dicom_node_sends_total{destination="pacs",outcome="delivered"} 2.0' in metrics
    assert "dicom_node_inference_slices_per_second" in metrics


def test_study_without_lesion_yields_only_the_sr(
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
    pacs: StoreSCP,
    phantom_series: Callable[..., list[Path]],
) -> None:
    """No lesion found: only the SR reaches the PACS (no empty SEG). The study corrected and
    sent again (one image with new content) makes version 2, whose SR names the first as the
    report it revises."""
    files = phantom_series(tumour=False)
    node = _node(node_factory, tiny_model_dir, pacs.port, 0.99)
    assert storescu(files, node.port).returncode == 0
    node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "done", timeout=120)
    [sr] = pacs.received()
    first = dcmread(sr)
    assert str(first.SOPClassUID) == COMPREHENSIVE_3D_SR
    assert _dciodvfy_errors(sr) == []

    corrected = dcmread(files[3])
    corrected.ImageComments = "corrected"
    corrected.save_as(sr.parent.parent / "corrected.dcm")
    assert storescu(sr.parent.parent / "corrected.dcm", node.port).returncode == 0
    node.wait_jobs(lambda j: len(j["jobs"]) == 2 and j["jobs"][0]["state"] == "done", timeout=120)
    [second] = [dcmread(p) for p in pacs.received() if p != sr]
    [revised] = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    assert revised.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_a_study_sent_again_after_retention_revises_the_first_report(
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
    pacs: StoreSCP,
    phantom_series: Callable[..., list[Path]],
) -> None:
    """The PACS sends a study again after retention removed it (``storage.keep_hours``: the
    pass at the node's start): version 2's SR names version 1's as the report it revises,
    although version 1's files are gone, rather than being a second, unrelated report."""
    files = phantom_series(tumour=False)
    node = _node(node_factory, tiny_model_dir, pacs.port, 0.99, storage={"keep_hours": 0})
    assert storescu(files, node.port).returncode == 0
    node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "done", timeout=120)
    [sr] = pacs.received()
    first = dcmread(sr)
    assert node.terminate() == 0
    node.start()  # retention's first pass removes the study and its outputs
    node.wait_jobs(lambda j: not j["studies"], timeout=60)
    assert storescu(files, node.port).returncode == 0
    node.wait_jobs(lambda j: len(j["jobs"]) == 2 and j["jobs"][0]["state"] == "done", timeout=120)
    [again] = [p for p in pacs.received() if p != sr]
    second = dcmread(again)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    [revised] = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    assert revised.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert _dciodvfy_errors(again) == []


def test_refusing_pacs_is_retried_across_a_restart(
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
    tmp_path: Path,
    phantom_series: Callable[..., list[Path]],
) -> None:
    """The PACS is down: results wait in the outbox, survive a node restart, and are delivered
    once the PACS comes back; our own results sent back to the node are ignored."""
    files = phantom_series()
    port = free_port()
    node = _node(node_factory, tiny_model_dir, port, 0.5)
    assert storescu(files, node.port).returncode == 0
    node.wait_jobs(
        lambda j: (
            j["jobs"]
            and j["jobs"][0]["state"] == "sending"
            and any(d["attempts"] >= 1 for d in j["deliveries"])
        ),
        timeout=120,
    )
    assert node.terminate() == 0
    pacs = StoreSCP(tmp_path / "late-pacs", port=port).start()
    try:
        node.start()
        listing = node.wait_jobs(lambda j: j["jobs"][0]["state"] == "done", timeout=60)
        assert len(pacs.received()) == 2
        assert len(listing["jobs"]) == 1
        # the PACS routes our results back to the node: acknowledged, never processed
        assert storescu(pacs.received(), node.port).returncode == 0
        listing = node.jobs()
        assert len(listing["jobs"]) == 1
        assert len(listing["studies"]) == 1
        assert "own output" in node.log()
    finally:
        pacs.stop()


def test_results_reply_to_a_known_sender(
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
    tmp_path: Path,
    phantom_series: Callable[..., list[Path]],
) -> None:
    """With reply_to_sender, results go to the calling AE's address from known_peers."""
    files = phantom_series(tumour=False)
    sender_scp = StoreSCP(tmp_path / "modality").start()
    try:
        node = node_factory(
            model={"path": str(tiny_model_dir)},
            lesions={"threshold": 0.99},
            inference={"device": "cpu", "batch_size": 8},
            destinations=[],
            dispatch={
                "reply_to_sender": True,
                "known_peers": [
                    {"ae_title": "STORESCU", "host": "127.0.0.1", "port": sender_scp.port}
                ],
            },
        )
        assert storescu(files, node.port, calling="STORESCU").returncode == 0
        listing = node.wait_jobs(
            lambda j: j["jobs"] and j["jobs"][0]["state"] == "done", timeout=120
        )
        assert [d["destination"] for d in listing["deliveries"]] == ["reply:STORESCU"]
        [sr] = sender_scp.received()
        assert str(dcmread(sr).SOPClassUID) == COMPREHENSIVE_3D_SR
    finally:
        sender_scp.stop()


def test_kill_9_during_inference_and_during_sending(
    node_factory: Callable[..., NodeProcess],
    tmp_path: Path,
    phantom_series: Callable[..., list[Path]],
) -> None:
    """H2: kill -9 while the model runs, then again while results wait to be sent: each restart
    resumes the job; the PACS finally gets one SEG/SR set whose UIDs are the ones first made."""
    import sqlite3
    import time

    files = phantom_series(slices=40, size=160)
    port = free_port()
    node = node_factory(
        inference={"device": "cpu", "batch_size": 2},  # the shipped model: seconds of inference
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        dispatch={"retry_base_seconds": 0.5, "retry_max_seconds": 1.0},
        model={"path": "models/lung-ct-unet-resnet50"},
    )
    db = node.data_dir / "jobs.sqlite"

    def job_state() -> str | None:
        with sqlite3.connect(db) as con:
            row = con.execute("SELECT state FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else str(row[0])

    assert storescu(files, node.port).returncode == 0
    deadline = time.monotonic() + 120
    while job_state() != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    node.kill()  # mid-inference
    node.start()
    listing = node.wait_jobs(
        lambda j: (
            j["jobs"][0]["state"] == "sending" and any(d["attempts"] >= 1 for d in j["deliveries"])
        ),
        timeout=180,
    )
    assert listing["jobs"][0]["attempts"] == 2  # the interrupted attempt counts
    made = {d["sop_instance_uid"] for d in listing["deliveries"]}
    node.kill()  # results made, not yet sent
    pacs = StoreSCP(tmp_path / "pacs", port=port).start()
    try:
        node.start()
        node.wait_jobs(lambda j: j["jobs"][0]["state"] == "done", timeout=120)
        assert {str(dcmread(p).SOPInstanceUID) for p in pacs.received()} == made
        assert len(node.jobs()["jobs"]) == 1
    finally:
        pacs.stop()


def test_a_hung_analysis_is_killed_and_retried_while_receiving_goes_on(
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
    pacs: StoreSCP,
    phantom_series: Callable[..., list[Path]],
) -> None:
    """P2: the analysis process is frozen (SIGSTOP) before a study arrives. The node keeps
    receiving, kills the frozen process at jobs.job_timeout_seconds, retries the job in a
    fresh one, and the PACS gets the results."""
    import os
    import signal
    import time

    node = _node(
        node_factory,
        tiny_model_dir,
        pacs.port,
        0.5,
        jobs={
            "job_timeout_seconds": 20.0,
            "retry_base_seconds": 0.5,
            "retry_max_seconds": 1.0,
            "analysis_nice": 0,  # a busy test machine must not push a real job past 20 s
        },
    )
    assert node.proc is not None
    frozen = analysis_process(node.proc.pid)
    os.kill(frozen, signal.SIGSTOP)
    try:
        assert storescu(phantom_series(seed=1), node.port).returncode == 0
        node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "running", timeout=60)
        # The job hangs; a second study is received meanwhile.
        second = phantom_series(seed=2, tumour=False)
        started = time.monotonic()
        assert storescu(second, node.port).returncode == 0
        assert time.monotonic() - started < 20.0
        states = {j["id"]: j["state"] for j in node.jobs()["jobs"]}
        assert "running" in states.values()
        listing = node.wait_jobs(
            lambda j: len(j["jobs"]) == 2 and all(x["state"] == "done" for x in j["jobs"]),
            timeout=180,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    attempts = sorted(j["attempts"] for j in listing["jobs"])
    assert attempts == [1, 2]  # the hung job ran twice, the other once
    assert not Path(f"/proc/{frozen}").exists()  # killed and reaped
    assert node.proc is not None and analysis_process(node.proc.pid) != frozen
    log = node.log_path.read_text(encoding="utf-8")
    assert "job failed (JobTimeoutError)" in log  # the reason's words stay in the job store
    classes = sorted(str(dcmread(p).SOPClassUID) for p in pacs.received())
    assert classes.count(COMPREHENSIVE_3D_SR) == 2


def test_sigterm_during_a_job_past_the_drain_time_parks_it(
    node_factory: Callable[..., NodeProcess],
    tiny_model_dir: Path,
    pacs: StoreSCP,
    phantom_series: Callable[..., list[Path]],
) -> None:
    """H5: SIGTERM while a job is still running when service.drain_seconds is up (its analysis
    process frozen, so it cannot finish): the node ends the analysis process and exits 0, the
    job is parked (queued again with its attempt given back: none is spent on a failure, even
    with max_attempts 1), and the next start runs it to the end."""
    import sqlite3

    node = _node(
        node_factory,
        tiny_model_dir,
        pacs.port,
        0.5,
        jobs={"max_attempts": 1, "job_timeout_seconds": 600.0, "analysis_nice": 0},
        service={"drain_seconds": 2.0},
    )
    assert node.proc is not None
    frozen = analysis_process(node.proc.pid)
    os.kill(frozen, signal.SIGSTOP)
    try:
        assert storescu(phantom_series(seed=1), node.port).returncode == 0
        node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "running", timeout=60)
        assert node.terminate() == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
        assert db.execute("SELECT state, attempts FROM jobs").fetchall() == [("queued", 0)]
    assert "job parked: the node stops" in node.log()
    node.start()
    listing = node.wait_jobs(lambda j: j["jobs"][0]["state"] == "done", timeout=180)
    assert listing["jobs"][0]["attempts"] == 1
    classes = [str(dcmread(p).SOPClassUID) for p in pacs.received()]
    assert classes.count(COMPREHENSIVE_3D_SR) == 1


def test_the_analysis_process_ends_with_the_node(
    node_factory: Callable[..., NodeProcess], tiny_model_dir: Path, pacs: StoreSCP
) -> None:
    """H2/H5 for the analysis process: SIGTERM stops it with the node; after a kill -9 of the
    node the kernel kills it too (no orphan keeps the model, or the GPU, busy)."""
    import time

    node = _node(node_factory, tiny_model_dir, pacs.port, 0.5)
    assert node.proc is not None
    child = analysis_process(node.proc.pid)
    assert node.terminate() == 0
    assert not Path(f"/proc/{child}").exists()

    node.start()
    assert node.proc is not None
    child = analysis_process(node.proc.pid)
    # Frozen, it cannot notice its parent is gone: only the kernel's death signal ends it.
    os.kill(child, signal.SIGSTOP)
    node.kill()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists():
        status = Path(f"/proc/{child}/status").read_text(encoding="ascii", errors="replace")
        if "State:\tZ" in status:  # dead, waiting for init to reap it
            break
        assert time.monotonic() < deadline, "the analysis process outlived the node"
        time.sleep(0.05)
