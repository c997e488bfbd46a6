"""Ingest benchmark: dcmtk storescu → dcmtk storescp vs → dicom-node, one association.

Sends the same generated CT series (default 200 slices of 512²) with dcmtk's storescu, one
association, TCP_NODELAY on both ends, alternating between the peers for several runs, each run
into a fresh folder. Prints the median seconds of each and the node's throughput relative to
storescp (storescp seconds ÷ node seconds). A minimal pynetdicom SCP (raw bytes to a file, no
fsync, no bookkeeping) is measured too, to show what pynetdicom alone costs.

    .venv/bin/python bench/ingest.py [--slices 200] [--size 512] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series  # noqa: E402
from tests.peers import PEER_ENV, free_port, wait_for_port  # noqa: E402

MINIMAL_SCP = textwrap.dedent(
    """
    import sys
    from pynetdicom import AE, evt, AllStoragePresentationContexts
    out = sys.argv[2]
    def store(event):
        with open(f"{out}/{event.request.AffectedSOPInstanceUID}", "wb") as f:
            f.write(event.encoded_dataset())
        return 0
    ae = AE(ae_title="DICOM_NODE")
    for c in AllStoragePresentationContexts:
        ae.add_supported_context(c.abstract_syntax)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, store)])
    """
)


def _send(folder: Path, port: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(port), "+sd", str(folder)],
        env=PEER_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-500:]}")
    return elapsed


def _run_peer(kind: str, series: Path, work: Path, expected: int) -> float:
    port = free_port()
    out = work / f"{kind}-{time.monotonic_ns()}"
    out.mkdir()
    if kind == "storescp":
        cmd = ["/usr/bin/storescp", "-od", str(out), str(port)]
    elif kind == "pynetdicom-minimal":
        cmd = [sys.executable, "-c", MINIMAL_SCP, str(port), str(out)]
    else:
        cfg = out / "config.yaml"
        cfg.write_text(
            f"node: {{host: 127.0.0.1, port: {port}}}\n"
            f"storage: {{data_dir: {out / 'var'}, fsync: true, min_free_disk_mb: 64}}\n"
            "study: {stable_seconds: 600, max_wait_seconds: 900}\n"
            "logging: {level: WARNING}\ndestinations: []\n"
            # receive-only: this measures ingest, not the model
            "model: {path: null}\nservice: {http_port: 0}\n"
        )
        cmd = [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        seconds = _send(series, port)
    finally:
        proc.terminate()
        proc.wait(60)
    if kind == "node":
        stored = len(list((out / "var" / "spool").glob("*/*/*.dcm")))
    else:
        stored = sum(1 for p in out.iterdir() if p.is_file())
    if stored != expected:
        raise RuntimeError(f"{kind} stored {stored} of {expected} instances")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(
        prefix="bench-ingest-", dir=os.environ.get("BENCH_DIR")
    ) as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(0)
        volume = rng.integers(-1000, 1500, size=(args.slices, args.size, args.size), dtype=np.int16)
        series = work / "series"
        write_ct_series(
            volume,
            series,
            spacing_mm=(1.0, 0.7, 0.7),
            study=StudyIdentity.random(0),
            series=SeriesSpec(),
        )
        mb = sum(p.stat().st_size for p in series.iterdir()) / 2**20
        print(f"series: {args.slices} slices of {args.size}², {mb:.0f} MiB; {args.runs} runs each")
        peers = ["storescp", "node", "pynetdicom-minimal"]
        times: dict[str, list[float]] = {p: [] for p in peers}
        for run in range(args.runs):
            for peer in peers if run % 2 == 0 else reversed(peers):
                times[peer].append(_run_peer(peer, series, work, args.slices))
        med = {p: statistics.median(t) for p, t in times.items()}
        for peer in peers:
            runs = " ".join(f"{t:.2f}" for t in times[peer])
            print(
                f"{peer:>20}: median {med[peer]:.3f} s  ({args.slices / med[peer]:6.0f} inst/s;"
                f" {mb / med[peer]:5.0f} MiB/s)  runs: {runs}"
            )
        for peer in ("node", "pynetdicom-minimal"):
            ratio = med["storescp"] / med[peer]
            print(f"{peer} throughput relative to storescp (storescp s / {peer} s): {ratio:.2f}")


if __name__ == "__main__":
    main()
