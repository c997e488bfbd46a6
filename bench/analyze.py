"""`dicom-node analyze` on a generated study: seconds per stage and peak RSS.

Generates a chest CT study with the project's phantom generator (default 300 slices of 512²),
runs ``dicom-node analyze`` on it in a child process, and prints the seconds of each stage
(headers and selection, volume, model, lesions, SEG, SR) and the child's peak RSS — the target
for a 600-slice 512² study on the CPU is under 3 GB.

    .venv/bin/python bench/analyze.py [--slices 300] [--size 512] [--model DIR | --random-model]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.e2e import SHIPPED, _peak_rss_mib, _random_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--random-model", action="store_true")
    parser.add_argument("--probability-dtype", choices=["float32", "uint8"], default="uint8")
    parser.add_argument("--device", default="cpu", help="inference.device: cpu, cuda[:N] or auto")
    args = parser.parse_args()

    from dicom_node.training.phantom import generate_phantom, write_phantom_dicom

    with tempfile.TemporaryDirectory(
        prefix="bench-analyze-", dir=os.environ.get("BENCH_DIR")
    ) as tmp:
        work = Path(tmp)
        model = args.model or SHIPPED
        if args.random_model:
            model = _random_model(work / "model", args.size)
        t = time.perf_counter()
        phantom = generate_phantom(
            seed=5,
            shape_zyx=(args.slices, args.size, args.size),
            spacing_mm=(1.0, 350.0 / args.size, 350.0 / args.size),
            tumour_probability=1.0,
        )
        files = write_phantom_dicom(phantom, work / "study")
        del phantom
        print(
            f"study: {len(files)} slices of {args.size}² ({time.perf_counter() - t:.1f} s to make)"
        )
        cfg = work / "c.yaml"
        cfg.write_text(
            f"model: {{path: {model}}}\n"
            f"inference: {{device: {args.device}, probability_dtype: {args.probability_dtype}}}\n"
        )
        t = time.perf_counter()
        # The child's own peak (VmHWM, which exec resets): RUSAGE_CHILDREN would count the
        # pages a fork shares with this process, which just made a large phantom.
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dicom_node.cli",
                "analyze",
                str(work / "study"),
                "--out",
                str(work / "out"),
                "--config",
                str(cfg),
            ],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        peak = 0.0
        while child.poll() is None:
            peak = max(peak, _peak_rss_mib(child.pid))
            time.sleep(0.1)
        stderr = child.stderr.read() if child.stderr else ""
        wall = time.perf_counter() - t
        if child.returncode != 0:
            sys.exit(f"analyze failed ({child.returncode}): {stderr[-2000:]}")
        findings = json.loads((work / "out" / "findings.json").read_text())
        for series in findings["series"]:
            secs = series["seconds"]
            print("seconds per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in secs.items()))
            model_s = secs["model"]
            rate = args.slices / model_s
            print(f"model: {rate:.2f} slices/s; lesions found: {len(series['lesions'])}")
        print(f"analyze wall time (incl. start-up and model load): {wall:.1f} s")
        print(f"peak RSS of analyze: {peak:.0f} MiB (probability map {args.probability_dtype})")


if __name__ == "__main__":
    main()
