"""Kills at the instants no timing hits by chance, in the real node process (H1, H2, S4): the
fault injector in tests/faults/ sends the node SIGKILL at a chosen point."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.peers import NodeProcess, storescu

FAULTS = Path(__file__).resolve().parents[1] / "faults"


def _node(tmp_path: Path) -> NodeProcess:
    """A receive-only node with the fault injector loaded (and no fault asked for yet)."""
    return NodeProcess(
        root=tmp_path / "node",
        settings={"study": {"stable_seconds": 0.5, "max_wait_seconds": 5.0}},
        env={"PYTHONPATH": str(FAULTS)},
    ).start()


def _restart_with_kill_at(node: NodeProcess, point: str) -> None:
    assert node.terminate() == 0
    node.env = {"PYTHONPATH": str(FAULTS), "DN_KILL": point}
    node.start()


def _after_the_kill(node: NodeProcess) -> None:
    """Wait for the injected SIGKILL, then start the node again as its unit would."""
    assert node.proc is not None
    assert node.proc.wait(30) == -9
    node.proc = None
    node.env = {"PYTHONPATH": str(FAULTS)}
    node.start()


def _settled(node: NodeProcess) -> dict[str, list[dict[str, object]]]:
    return node.wait_jobs(
        lambda j: (
            j["jobs"]
            and all(s["state"] == "complete" for s in j["studies"])
            and all(x["state"] in ("done", "superseded", "skipped") for x in j["jobs"])
        ),
        timeout=60,
    )


def _versions(node: NodeProcess) -> list[tuple[str, int]]:
    with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
        return sorted(db.execute("SELECT study_uid, version FROM jobs").fetchall())


def test_a_correction_cut_off_before_it_was_recorded_is_filed_when_sent_again(
    tmp_path: Path, write_study: Callable[..., list[Path]]
) -> None:
    """The node dies after new content for an acknowledged instance replaced its file, before
    the job store recorded it (so before any acknowledgement). At the start the acknowledged
    content is back in the spool; the PACS's retry of the correction is new content, filed,
    and makes version 2 (before, it met its own bytes on disk and passed for a duplicate)."""
    files = write_study(slices=4)
    corrected = dcmread(files[1])
    pixels = bytearray(corrected.PixelData)
    pixels[100] ^= 0xFF
    corrected.PixelData = bytes(pixels)
    corrected.save_as(tmp_path / "corrected.dcm")
    node = _node(tmp_path)
    try:
        assert storescu(files, node.port).returncode == 0
        _settled(node)
        [spooled] = [p for p in node.spooled() if p.stem == str(corrected.SOPInstanceUID)]
        acknowledged = spooled.read_bytes()
        _restart_with_kill_at(node, "record_replace")
        assert storescu(tmp_path / "corrected.dcm", node.port).returncode != 0
        _after_the_kill(node)
        assert spooled.read_bytes() == acknowledged
        assert storescu(tmp_path / "corrected.dcm", node.port).returncode == 0
        _settled(node)
        assert len(_versions(node)) == 2
        assert dcmread(spooled).PixelData == corrected.PixelData
    finally:
        node.kill()


def test_a_move_cut_off_before_the_old_copy_went_leaves_one_copy(
    tmp_path: Path, write_study: Callable[..., list[Path]]
) -> None:
    """An instance re-sent under another study (a PACS merge): the node dies as it removes
    the old copy. After the start one copy is left, every spooled file has its row, and
    later restarts make no new version (before, the two copies took turns being re-indexed,
    and each restart re-opened a study)."""
    files = write_study(slices=4)
    moved = dcmread(files[2])
    moved.StudyInstanceUID, moved.SeriesInstanceUID = generate_uid(), generate_uid()
    moved.save_as(tmp_path / "moved.dcm")
    node = _node(tmp_path)
    try:
        assert storescu(files, node.port).returncode == 0
        _settled(node)
        _restart_with_kill_at(node, "spool_remove")
        storescu(tmp_path / "moved.dcm", node.port)
        _after_the_kill(node)
        assert storescu(tmp_path / "moved.dcm", node.port).returncode == 0
        _settled(node)
        with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
            recorded = {r[0] for r in db.execute("SELECT path FROM instances")}
        assert {str(p) for p in node.spooled()} == recorded
        assert [p.stem for p in node.spooled()].count(str(moved.SOPInstanceUID)) == 1
        before = _versions(node)
        for _ in range(2):
            assert node.terminate() == 0
            node.start()
            time.sleep(1.5)
            _settled(node)
        assert _versions(node) == before
    finally:
        node.kill()
