"""The cost of the results step on a full-size series: 300 slices of 512 x 512, five lesions.

Marked slow (it writes 150 MB of CT); run with ``pytest -m slow tests/results -s`` to see the
figures. The bound asserted is loose on purpose (shared CI machines); the point is the printout
against the model's time on the same series (~0.6-0.7 s per 512² slice on 2 CPU threads, so
~200 s: the results step must stay far below 10 % of it).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.analysis.lesions import find_lesions
from dicom_node.results.identity import Producer, ResultUIDs
from dicom_node.results.seg import SegmentationType, build_segmentation, plan_segments
from dicom_node.results.sr import build_report
from dicom_node.results.writer import read_headers
from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series
from tests.results.conftest import Dciodvfy

SLICES, SIZE = 300, 512
SPACING = (1.0, 0.7, 0.7)
ORIGIN = (-179.0, -179.0, -150.0)
#: (z, y, x, radius in mm): five lesions, 5-20 mm radius.
LESIONS = [(150, 200, 150, 20.0), (100, 300, 380, 12.0), (220, 260, 120, 8.0),
           (60, 180, 330, 6.0), (250, 320, 300, 5.0)]  # fmt: skip


@pytest.mark.slow
def test_results_for_300_slices_of_512(tmp_path: Path, dciodvfy: Dciodvfy) -> None:
    """Reading headers and building and encoding the SEG and the SR for 300 x 512² with five
    lesions takes seconds at most (printed), far below the model's ~200 s on the CPU; the
    full-size objects pass dciodvfy too."""
    shape = (SLICES, SIZE, SIZE)
    probability = np.zeros(shape, dtype=np.uint8)
    for cz, cy, cx, radius in LESIONS:
        r_z, r_xy = int(radius / SPACING[0]) + 1, int(radius / SPACING[1]) + 1
        zz, yy, xx = np.ogrid[-r_z : r_z + 1, -r_xy : r_xy + 1, -r_xy : r_xy + 1]
        d = np.sqrt((zz * SPACING[0]) ** 2 + (yy * SPACING[1]) ** 2 + (xx * SPACING[2]) ** 2)
        p = np.clip(1.2 - 0.7 * d / radius, 0.0, 1.0)
        box = probability[
            cz - r_z : cz + r_z + 1, cy - r_xy : cy + r_xy + 1, cx - r_xy : cx + r_xy + 1
        ]
        np.maximum(box, np.rint(p * 255).astype(np.uint8), out=box)
    hu = np.full(shape, -850, dtype=np.int16)
    hu[probability >= 128] = 40
    study = StudyIdentity.random(3)
    files = write_ct_series(
        hu, tmp_path / "ct", spacing_mm=SPACING, study=study, series=SeriesSpec(), origin_mm=ORIGIN
    )
    lesion_map = find_lesions(probability, hu, spacing_mm=SPACING, origin_lps=ORIGIN)
    assert len(lesion_map.lesions) == len(LESIONS)
    del hu

    t0 = time.perf_counter()
    headers = read_headers(files)
    t_read = time.perf_counter() - t0
    uids = ResultUIDs.derive(
        root="2.25",
        study_instance_uid=study.study_instance_uid,
        source_series_uid=str(headers[0].SeriesInstanceUID),
        job_version=1,
        model_version="1.0",
    )
    producer = Producer(model_name="lung-ct", model_version="1.0")
    timings: dict[str, float] = {"read 300 headers": t_read}
    segs = {}
    for kind in SegmentationType:
        t0 = time.perf_counter()
        seg = build_segmentation(
            headers,
            lesion_map.labels,
            lesion_map.lesions,
            uids=uids,
            producer=producer,
            series_number=9101,
            series_description="AI",
            segmentation_type=kind,
            probability=probability,
        )
        timings[f"build {kind.value} SEG"] = time.perf_counter() - t0
        assert seg is not None
        t0 = time.perf_counter()
        pydicom.dcmwrite(tmp_path / f"{kind.value}.dcm", seg, enforce_file_format=True)
        timings[f"write {kind.value} SEG"] = time.perf_counter() - t0
        segs[kind] = seg
    t0 = time.perf_counter()
    sr = build_report(
        headers,
        plan_segments(lesion_map.lesions, uids=uids, max_segments=20),
        segmentation=segs[SegmentationType.BINARY],
        lesion_count=len(lesion_map.lesions),
        study_probability=0.9,
        study_threshold=0.5,
        uids=uids,
        producer=producer,
        series_number=9102,
        series_description="AI",
        image_probabilities=[0.5] * SLICES,
    )
    timings["build SR"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pydicom.dcmwrite(tmp_path / "sr.dcm", sr, enforce_file_format=True)
    timings["write SR"] = time.perf_counter() - t0

    frames = int(segs[SegmentationType.BINARY].NumberOfFrames)
    print(f"\n300 x 512², {len(lesion_map.lesions)} lesions, {frames} SEG frames:")
    for what, seconds in timings.items():
        print(f"  {what:<24} {seconds:6.3f} s")
    binary = timings["read 300 headers"] + timings["build BINARY SEG"] + timings["build SR"]
    print(f"  {'headers + SEG + SR':<24} {binary:6.3f} s  ({100 * binary / 200:.2f} % of ~200 s)")
    assert binary < 20.0
    for name in ("BINARY.dcm", "FRACTIONAL.dcm", "sr.dcm"):
        errors, warnings = dciodvfy(tmp_path / name)
        assert errors == [] and warnings == [], (name, errors, warnings)
