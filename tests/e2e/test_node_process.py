"""The node as a real process: kill -9 and restart, SIGTERM, retries to dead and back."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series
from tests.peers import DCMTK, PEER_ENV, NodeProcess, echoscu, node_cli, storescu


def _series(out: Path, slices: int, size: int) -> list[Path]:
    rng = np.random.default_rng(3)
    volume = rng.integers(-1000, 1000, size=(slices, size, size), dtype=np.int16)
    return write_ct_series(
        volume, out, spacing_mm=(1.0, 0.7, 0.7), study=StudyIdentity.random(3), series=SeriesSpec()
    )


def _storescu_in_background(files: list[Path], port: int) -> subprocess.Popen[str]:
    """dcmtk's storescu, verbose, its output readable line by line as it sends."""
    return subprocess.Popen(
        [
            str(DCMTK / "storescu"),
            "-v",
            "-aec",
            "DICOM_NODE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=PEER_ENV,
    )


def test_kill_9_mid_study_loses_nothing_acknowledged(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """kill -9 while a study is arriving: every instance acknowledged before the kill is in the
    spool and the job store after a restart, intact; re-sending completes the study once: the
    part spooled before the kill does not become a job of its own, because the quiet period
    counts from the restart, not from the last instance before the kill."""
    files = _series(tmp_path / "study", slices=120, size=256)
    node = node_factory(study={"stable_seconds": 5.0})
    sender = _storescu_in_background(files, node.port)
    assert sender.stdout is not None
    acked: list[str] = []
    current = None
    for line in sender.stdout:
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            if len(acked) == 30:
                node.kill()  # SIGKILL, mid-association
    sender.wait(30)
    assert 30 <= len(acked) < len(files), "the kill must land mid-study"

    # As the kill left it: whatever lies at a final path is whole (only incoming/ may hold
    # part of the instance that was in flight)
    sources = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    left = sorted((node.data_dir / "spool").glob("*/*/*.dcm"))
    assert len(left) >= len(acked)
    for path in left:
        ds = dcmread(path)
        assert ds.PixelData == dcmread(sources[str(ds.SOPInstanceUID)]).PixelData

    node.start()  # same data folder
    with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
        recorded = {r[0]: r[1] for r in db.execute("SELECT sop_instance_uid, path FROM instances")}
    for name in acked:
        ds = dcmread(name)
        assert ds.SOPInstanceUID in recorded
        assert dcmread(recorded[ds.SOPInstanceUID]).PixelData == ds.PixelData
    assert not list((node.data_dir / "spool" / "incoming").iterdir())
    assert sorted(recorded.values()) == [str(p) for p in left]  # one row for each file

    assert storescu(files, node.port).returncode == 0  # the PACS re-sends the whole study
    listing = node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "done")
    assert len(listing["jobs"]) == 1
    assert listing["jobs"][0]["result"]["instances"] == len(files)


def test_sigterm_stops_accepting_and_exits_0(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """SIGTERM: the node stops listening, finishes what it has and exits with status 0."""
    node = node_factory()
    assert storescu(write_study(slices=4), node.port).returncode == 0
    port = node.port
    assert node.terminate() == 0
    assert echoscu(port).returncode != 0
    assert '"msg": "stopped"' in node.log()


def test_failing_job_retries_then_dies_and_retry_requeues(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """A job whose spooled file vanished fails, is retried with backoff, ends dead (visible in
    `jobs`), and `dicom-node retry` runs it again once the file is back."""
    files = write_study(slices=5)
    node = node_factory(study={"stable_seconds": 3.0})
    assert storescu(files, node.port).returncode == 0
    victim = node.spooled()[0]
    saved = tmp_path / "saved.dcm"
    shutil.move(victim, saved)
    listing = node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "dead", timeout=60)
    [job] = listing["jobs"]
    assert job["attempts"] == 3
    assert "spooled instance unreadable" in job["last_error"]
    # the job store keeps the whole reason; the log, with patient data off, no UID of it
    assert victim.parent.parent.name not in node.log()  # the Study Instance UID
    assert victim.stem not in node.log()  # the SOP Instance UID
    table = node_cli("jobs", "--config", str(node.config_path))
    assert re.search(rf"\b{job['id']}\s+dead\s+1\s+3\b", table.stdout), table.stdout
    shutil.move(saved, victim)
    done = node_cli("retry", str(job["id"]), "--config", str(node.config_path))
    assert done.returncode == 0, done.stderr
    node.wait_jobs(lambda j: j["jobs"][0]["state"] == "done")
    again = node_cli("retry", str(job["id"]), "--config", str(node.config_path))
    assert again.returncode == 2
    assert "only dead or failed jobs are retried" in again.stderr


def test_complete_on_release(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """With complete_on_release, the study completes when storescu releases, long before the
    quiet period would end."""
    node = node_factory(
        study={"stable_seconds": 600.0, "max_wait_seconds": 900.0, "complete_on_release": True}
    )
    started = time.monotonic()
    assert storescu(write_study(slices=5), node.port).returncode == 0
    listing = node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "done", timeout=30)
    assert time.monotonic() - started < 30
    assert listing["studies"][0]["completion_reason"] == "association released"


def test_sigterm_lets_an_open_association_finish(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """SIGTERM during a transfer: the open association is drained, every instance is stored,
    storescu succeeds, and the node exits 0 without accepting new associations."""
    files = _series(tmp_path / "study", slices=80, size=256)
    node = node_factory()
    sender = _storescu_in_background(files, node.port)
    assert sender.stdout is not None
    for line in sender.stdout:
        if "Received Store Response (Success)" in line:
            break
    assert node.proc is not None
    node.proc.terminate()
    out = sender.stdout.read()
    assert sender.wait(60) == 0, out
    assert node.proc.wait(60) == 0
    node.proc = None
    assert len(node.spooled()) == len(files)
