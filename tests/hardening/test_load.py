"""Parallel load against the real node (test-matrix N8, CI-sized): 10 associations of dcmtk's
storescu at once, 20 CT images each. ``bench/load.py`` runs the full 200 per association."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series
from tests.hardening.conftest import baseline, instances, rss_mib, stray_files, threads, wait_for
from tests.peers import NodeProcess, storescu

ASSOCIATIONS = 10
IMAGES = 20


def test_n8_parallel_associations(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    """N8: 10 parallel associations x 20 CT images (128²) within the default limit of 10
    associations all succeed; every instance is in the spool and the job store; afterwards the
    node's threads are back to their baseline, its memory near it, and C-ECHO answers."""
    node = node_factory(node={"acse_timeout_seconds": 2.0})
    rest = baseline(node)
    folders = []
    for i in range(ASSOCIATIONS):
        volume = np.random.default_rng(i).integers(-1000, 400, (IMAGES, 128, 128), dtype=np.int16)
        folder = tmp_path / f"series-{i}"
        write_ct_series(
            volume,
            folder,
            spacing_mm=(1.0, 0.7, 0.7),
            study=StudyIdentity.random(100 + i),
            series=SeriesSpec(series_number=1),
        )
        folders.append(folder)
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for f in folders for p in
            f.iterdir()}  # fmt: skip
    with ThreadPoolExecutor(ASSOCIATIONS) as pool:
        runs: list[subprocess.CompletedProcess[str]] = list(
            pool.map(lambda f: storescu(f, node.port, calling=f"LOAD{f.name[-1]}"), folders)
        )
    failed = [r.stdout[-400:] + r.stderr[-400:] for r in runs if r.returncode != 0]
    assert not failed, failed
    assert len(sent) == ASSOCIATIONS * IMAGES
    assert instances(node) == sent
    assert {p.stem for p in node.spooled()} == sent
    assert not stray_files(node)
    wait_for(lambda: threads(node) <= rest.threads, timeout=10, what="threads back to baseline")
    assert rss_mib(node) < rest.rss_mib + 150
    rest.check()
