"""End-to-end benchmark: last instance acknowledged → last result acknowledged by the PACS.

A generated chest CT study (default 300 slices of 512², the project's phantom generator) is sent
by dcmtk's storescu to `dicom-node serve` (complete_on_release on), which analyses it and sends
its SEG and SR to dcmtk's storescp. Prints the seconds from the end of storescu (its last
instance acknowledged) to the last result file landing at storescp, the node's seconds per stage
(from the job's summary), the share of writing the SEG and SR, and the node's peak RSS.

The model is the shipped one (``models/lung-ct-unet-resnet50``) unless ``--model`` names
another; ``--random-model`` builds a randomly initialised product network (ResNet50 U-Net at
the shipped card's input size, or 512²) when no trained weights are at hand: the arithmetic,
and so the timing, is the same.

    .venv/bin/python bench/e2e.py [--slices 300] [--size 512] [--random-model]
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

from tests.peers import PEER_ENV, StoreSCP, free_port, node_cli, wait_for_port  # noqa: E402

SHIPPED = ROOT / "models" / "lung-ct-unet-resnet50"


def _random_model(path: Path, size: int) -> Path:
    import torch

    from dicom_node.analysis.network import LungCTNet
    from dicom_node.analysis.weights import CARD_FILE, ModelCard, read_card, save_model

    if SHIPPED.exists():
        card = read_card(SHIPPED / CARD_FILE).model_copy(update={"name": "random-resnet50"})
    else:
        card = ModelCard.model_validate(
            {
                "name": "random-resnet50",
                "version": "0",
                "architecture": {"encoder": "resnet50"},
                "input": {"size": size, "mode": "fit"},
                "normalisation": {"window_low_hu": -1000.0, "window_high_hu": 400.0},
                "thresholds": {"segmentation": 0.5, "image": 0.5, "study": 0.5},
                "top_k": 5,
                "classes": {
                    "finding": {
                        "name": "lung tumour",
                        "code": {"scheme": "SCT", "value": "108369006", "meaning": "Neoplasm"},
                    },
                    "positive": {
                        "name": "cancerous",
                        "code": {"scheme": "SCT", "value": "21594007", "meaning": "Malignant"},
                    },
                    "negative": {
                        "name": "non-cancerous",
                        "code": {"scheme": "SCT", "value": "30807003", "meaning": "Benign"},
                    },
                },
                "intended_use": "benchmark only",
                "training_data": "none: random weights",
                "metrics": {},
            }
        )
    torch.manual_seed(0)
    save_model(LungCTNet(card.architecture), card, path, dtype=torch.float16)
    return path


def start_node(
    work: Path, *, port: int, model: Path, destination: dict[str, object]
) -> tuple[Path, subprocess.Popen[bytes]]:
    """`dicom-node serve` for a benchmark: complete_on_release, fast polling, one destination.

    Returns its configuration file and process (not yet listening: wait for ``port``)."""
    cfg = work / "node.yaml"
    cfg.write_text(
        f"node: {{host: 127.0.0.1, port: {port}}}\n"
        f"storage: {{data_dir: {work / 'var'}, min_free_disk_mb: 64}}\n"
        "study: {stable_seconds: 600, max_wait_seconds: 900, complete_on_release: true}\n"
        f"destinations: [{json.dumps(destination)}]\n"
        f"model: {{path: {model}}}\nservice: {{http_port: {free_port()}}}\n"
        "jobs: {poll_seconds: 0.1}\ndispatch: {poll_seconds: 0.1}\nlogging: {level: WARNING}\n"
    )
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
        env={**PEER_ENV, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return cfg, node


def _peak_rss_mib(pid: int) -> float:
    """VmHWM of a running process, in MiB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--random-model", action="store_true")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    from dicom_node.training.phantom import generate_phantom, write_phantom_dicom

    with tempfile.TemporaryDirectory(prefix="bench-e2e-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        model = args.model or SHIPPED
        if args.random_model:
            model = _random_model(work / "model", args.size)
        if not model.exists():
            sys.exit(f"no model at {model}: train one, name one with --model, or --random-model")
        t = time.perf_counter()
        fov = 350.0
        phantom = generate_phantom(
            seed=args.seed,
            shape_zyx=(args.slices, args.size, args.size),
            spacing_mm=(1.0, fov / args.size, fov / args.size),
            tumour_probability=1.0,
        )
        files = write_phantom_dicom(phantom, work / "study")
        del phantom
        print(
            f"study: {len(files)} slices of {args.size}² written in {time.perf_counter() - t:.1f} s"
        )

        pacs = StoreSCP(work / "pacs").start()
        port = free_port()
        dest = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
        cfg, node = start_node(work, port=port, model=model, destination=dest)
        try:
            wait_for_port(port, proc=node, timeout=120)
            t0 = time.perf_counter()
            sent = subprocess.run(
                [
                    "/usr/bin/storescu",
                    "-aec",
                    "DICOM_NODE",
                    "127.0.0.1",
                    str(port),
                    "+sd",
                    str(work / "study"),
                ],
                env=PEER_ENV,
                check=True,
                capture_output=True,
            )
            del sent
            t_acked = time.perf_counter()
            while True:
                listing = json.loads(node_cli("jobs", "--json", "--config", str(cfg)).stdout)
                jobs = listing["jobs"]
                if jobs and jobs[0]["state"] in ("done", "dead", "skipped"):
                    break
                if node.poll() is not None:
                    sys.exit("the node exited")
                time.sleep(0.2)
            received = pacs.received()
            t_end = max((p.stat().st_mtime for p in received), default=time.time())
            t_end_rel = t_end - (time.time() - time.perf_counter())
            rss = _peak_rss_mib(node.pid)
        finally:
            node.terminate()
            node.wait(120)
            pacs.stop()
        job = jobs[0]
        print(f"ingest (storescu, one association): {t_acked - t0:.1f} s")
        print(f"job: {job['state']}; results at the PACS: {len(received)} file(s)")
        total = t_end_rel - t_acked
        print(f"last instance acknowledged → last result acknowledged: {total:.1f} s")
        if job["state"] == "done" and job["result"]:
            for series in job["result"]["series"]:
                secs = series["seconds"]
                print("  seconds per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in secs.items()))
                writing = secs.get("results_total", secs.get("seg", 0) + secs.get("sr", 0))
                share = 100 * writing / total
                print(
                    f"  writing SEG + SR: {writing:.2f} s = {share:.1f}% of the total"
                    f" (target < 10%); lesions found: {len(series['lesions'])}"
                )
        print(f"node peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
