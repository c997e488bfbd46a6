"""H3: a data folder on a small filesystem that fills (a real tmpfs mounted by the test)."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series
from tests.peers import NodeProcess, echoscu, storescu


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, mounted for the test and unmounted after it."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"this machine does not let the tests mount a tmpfs: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _acked(output: str) -> list[str]:
    acked, current = [], None
    for line in output.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
    return acked


@pytest.mark.parametrize("floor_mb", [2, 0])
def test_a_filling_disk_refuses_cleanly_and_recovers(
    node_factory: Callable[..., NodeProcess], small_disk: Path, tmp_path: Path, floor_mb: int
) -> None:
    """With the floor (2 MiB) the node answers 0xA700 before the disk fills; with no floor the
    disk really fills mid-write and the answer is the same. Either way: no partial file, every
    acknowledged instance is recorded and intact, C-ECHO still answers, and once space returns
    the refused instances are accepted."""
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1000, size=(30, 512, 512), dtype=np.int16)
    files = write_ct_series(
        volume,
        tmp_path / "study",
        spacing_mm=(1.0, 0.7, 0.7),
        study=StudyIdentity.random(9),
        series=SeriesSpec(),
    )
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (12 * 2**20))
    node = NodeProcess(
        root=small_disk / "node",
        settings={
            "storage": {"data_dir": str(small_disk / "var"), "min_free_disk_mb": floor_mb},
            "logging": {"audit_path": None},
        },
    )
    node.root = tmp_path / "node"  # config and log on the big disk; data on the small one
    node.start()
    try:
        first = storescu(files, node.port)
        out = first.stdout + first.stderr
        assert "Refused: OutOfResources" in out
        acked = _acked(out)
        assert 0 < len(acked) < len(files), len(acked)
        assert echoscu(node.port).returncode == 0
        assert list((small_disk / "var" / "spool" / "incoming").iterdir()) == []
        with sqlite3.connect(small_disk / "var" / "jobs.sqlite") as db:
            recorded = {r[0] for r in db.execute("SELECT path FROM instances")}
        spooled = {str(p) for p in (small_disk / "var" / "spool").glob("*/*/*.dcm")}
        assert recorded == spooled
        assert len(spooled) == len(acked)
        filler.unlink()  # space comes back
        again = storescu(files, node.port)
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(list((small_disk / "var" / "spool").glob("*/*/*.dcm"))) == len(files)
    finally:
        if node.proc is not None:
            node.kill()
