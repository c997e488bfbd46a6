"""Orthanc → dicom-node → Orthanc: seconds from Orthanc's send to SEG + SR present in Orthanc.

A generated chest CT study (default 100 slices of 512², the phantom generator) is uploaded to
Debian's Orthanc over REST; Orthanc sends it to ``dicom-node serve`` (complete_on_release on),
which analyses it with the shipped model (or ``--model``/``--random-model``) and sends its SEG
and SR back to Orthanc. Prints the seconds from the start of Orthanc's send until both results
are in Orthanc, and where the time went (Orthanc's send, the node's stages, delivery).

    .venv/bin/python bench/orthanc_e2e.py [--slices 100] [--size 512] [--random-model]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.e2e import SHIPPED, _random_model, start_node  # noqa: E402
from dicom_node.testing.orthanc import (  # noqa: E402
    COMPREHENSIVE_3D_SR_STORAGE,
    SEGMENTATION_STORAGE,
    OrthancPacs,
)
from tests.peers import free_port, node_cli, wait_for_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--random-model", action="store_true")
    args = parser.parse_args()

    from dicom_node.training.phantom import generate_phantom, write_phantom_dicom

    with tempfile.TemporaryDirectory(
        prefix="bench-orthanc-", dir=os.environ.get("BENCH_DIR")
    ) as tmp:
        work = Path(tmp)
        model = (
            _random_model(work / "model", args.size)
            if args.random_model
            else (args.model or SHIPPED)
        )
        phantom = generate_phantom(
            seed=11,
            shape_zyx=(args.slices, args.size, args.size),
            spacing_mm=(1.25, 350.0 / args.size, 350.0 / args.size),
            tumour_probability=1.0,
        )
        files = write_phantom_dicom(phantom, work / "study")
        study_uid = str(__import__("pydicom").dcmread(files[0]).StudyInstanceUID)
        del phantom
        port = free_port()
        with OrthancPacs(root=work / "orthanc", node_port=port) as pacs:
            cfg, node = start_node(
                work, port=port, model=model, destination=pacs.destination("orthanc")
            )
            try:
                wait_for_port(port, proc=node, timeout=180)
                pacs.client.upload_files(files)
                study_id = pacs.client.find_study(study_uid)
                assert study_id is not None
                t0 = time.perf_counter()
                pacs.client.store_to_modality([study_id], "node", synchronous=True)
                t_sent = time.perf_counter()
                while True:
                    present = pacs.client.instances_by_sop_class(study_id)
                    if COMPREHENSIVE_3D_SR_STORAGE in present and (
                        SEGMENTATION_STORAGE in present or _job_done_without_seg(cfg)
                    ):
                        break
                    if node.poll() is not None:
                        sys.exit("the node exited")
                    time.sleep(0.25)
                t_end = time.perf_counter()
                listing = json.loads(node_cli("jobs", "--json", "--config", str(cfg)).stdout)
            finally:
                node.terminate()
                node.wait(120)
        total = t_end - t0
        print(f"study: {args.slices} slices of {args.size}²; model {model.name}")
        print(f"Orthanc's send → SEG + SR present in Orthanc: {total:.1f} s")
        print(f"  Orthanc's C-STORE of the study to the node: {t_sent - t0:.1f} s")
        job = listing["jobs"][0]
        for series in (job.get("result") or {}).get("series", []):
            secs = series["seconds"]
            print("  node stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in secs.items()))
            print(f"  lesions: {len(series['lesions'])}; {series['classification']}")
        done = [d for d in listing["deliveries"] if d["delivered_at"]]
        if done:
            last = max(d["delivered_at"] for d in done)
            print(
                f"  delivery: last result acknowledged {last - job['started_at']:.1f} s after the"
                " job started"
            )


def _job_done_without_seg(cfg: Path) -> bool:
    listing = json.loads(node_cli("jobs", "--json", "--config", str(cfg)).stdout)
    jobs = listing["jobs"]
    return (
        bool(jobs)
        and jobs[0]["state"] == "done"
        and all(d["sop_class_uid"] != SEGMENTATION_STORAGE for d in listing["deliveries"])
    )


if __name__ == "__main__":
    main()
