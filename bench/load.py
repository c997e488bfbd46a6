"""Load benchmark: parallel associations of C-STOREs, plus C-ECHOs, against a running node.

Starts ``dicom-node serve`` (receive-only, fsync on, as in production) on a free loopback port;
writes one CT series per association (the project's writer, unique UIDs each); sends them at
once from separate processes, one pynetdicom association each, timing every C-STORE request;
meanwhile a C-ECHO every ``--echo-every`` seconds, timed; meanwhile samples the node's RSS and
thread count. Prints instances/s, p50/p99 C-STORE latency, C-ECHO latency under load, the
node's peak RSS and threads (and both at rest, after), and checks that every instance landed
in the spool and the job store.

    .venv/bin/python bench/load.py [--associations 10] [--images 200] [--size 512]
        [--busy [--rounds 3] [--cpu-policy idle|batch|normal] [--nice N]]

With ``--busy`` the node runs the shipped model, and the load is sent ``--rounds`` times in
pairs: once with the worker idle, then while the worker analyses a study (``--busy-slices`` CT
slices sent just before; the next pair waits until that job has ended). It checks the job was
running at the start and the end of each busy load, and prints the median rates of both kinds
and their ratio against the target (receiving no more than 20 % slower while the worker is
busy), with the ratio of each pair: alternating pairs in one run keep a noisy machine's drift
out of the comparison.

Files are sent as they are on disk (pynetdicom streams them without decoding), so the client
costs little; on a 2-core machine client and node still share the CPUs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series  # noqa: E402
from tests.peers import NodeProcess  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _send_series(args: tuple[int, str, int]) -> tuple[list[float], list[int], float]:
    """In a worker process: one association, every file of ``folder``; per-request seconds,
    statuses, and the association's wall time."""
    index, folder, port = args
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the file; no decode on our side
    ae = AE(ae_title=f"LOAD{index:02d}")
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    files = sorted(Path(folder).iterdir())
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    if not assoc.is_established:
        return [], [-1] * len(files), 0.0
    # pynetdicom leaves Nagle's algorithm on: each C-STORE would wait ~40 ms for a delayed ACK
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies, statuses = [], []
    try:
        for path in files:
            t0 = time.perf_counter()
            rsp = assoc.send_c_store(path)
            latencies.append(time.perf_counter() - t0)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return latencies, statuses, time.perf_counter() - started


def _echo_loop(port: int, every: float, stop: threading.Event, out: list[float]) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="LOADECHO")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    while not stop.wait(every):
        t0 = time.perf_counter()
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        ok = assoc.is_established and int(assoc.send_c_echo().get("Status", -1)) == 0
        if assoc.is_established:
            assoc.release()
        out.append(time.perf_counter() - t0 if ok else float("inf"))


def _sample(pid: int, stop: threading.Event, peaks: dict[str, float]) -> None:
    while not stop.wait(0.05):
        try:
            peaks["threads"] = max(peaks["threads"], len(os.listdir(f"/proc/{pid}/task")))
            peaks["rss_mib"] = max(peaks["rss_mib"], _rss_mib(pid))
        except OSError:
            return


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--associations", type=int, default=10)
    parser.add_argument("--images", type=int, default=200, help="CT images per association")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each image")
    parser.add_argument("--echo-every", type=float, default=0.5, help="seconds between C-ECHOs")
    parser.add_argument("--busy", action="store_true", help="again while the worker analyses")
    parser.add_argument("--busy-slices", type=int, default=400, help="slices of that study")
    parser.add_argument(
        "--rounds", type=int, default=3, help="with --busy: idle/busy pairs, medians reported"
    )
    parser.add_argument(
        "--cpu-policy",
        choices=("idle", "batch", "normal"),
        help="jobs.analysis_cpu_policy (default: the node's)",
    )
    parser.add_argument("--nice", type=int, help="jobs.analysis_nice (default: the node's)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-load-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        total = args.associations * args.images
        print(
            f"{args.associations} associations x {args.images} CT images of {args.size}²"
            f" ({total} instances, {total * args.size**2 * 2 / 2**20:.0f} MiB of pixels),"
            f" C-ECHO every {args.echo_every} s"
        )

        settings: dict[str, object] = {
            "node": {"max_associations": args.associations + 3, "acse_timeout_seconds": 5.0},
            "study": {"stable_seconds": 600.0, "max_wait_seconds": 900.0},
            "logging": {"level": "WARNING"},
        }
        if args.busy:
            # The load's own studies become jobs that are skipped at once (their series
            # description is excluded); one chest study per busy round keeps the worker busy
            # (random HU: the lung check is off so that the model runs on it).
            settings["model"] = {"path": "models/lung-ct-unet-resnet50"}
            settings["study"] = {"stable_seconds": 2.0, "max_wait_seconds": 900.0}
            settings["selection"] = {"description_exclude": ["^LOAD$"], "min_lung_fraction": 0.0}
            jobs: dict[str, object] = {}
            if args.cpu_policy:
                jobs["analysis_cpu_policy"] = args.cpu_policy
            if args.nice is not None:
                jobs["analysis_nice"] = args.nice
            settings["jobs"] = jobs
        node = NodeProcess(root=work / "node", settings=settings).start()
        try:
            assert node.proc is not None
            time.sleep(5.5)  # the port probe's connection ends with the ACSE timeout
            idle_rates: list[float] = []
            busy_rates: list[float] = []
            for r in range(args.rounds if args.busy else 1):
                folders = _write_series(work / f"idle-{r}", args, first_study=1000 + 100 * r)
                idle_rates.append(_round(node, folders, args, f"round {r + 1}, worker idle"))
                shutil.rmtree(work / f"idle-{r}")
                if args.busy:
                    busy_rates.append(_busy_round(node, work, args, r))
            if not args.busy:
                return
            idle, busy = statistics.median(idle_rates), statistics.median(busy_rates)
            ratios = [b / i for i, b in zip(idle_rates, busy_rates, strict=True)]
            ratio = busy / idle
            verdict = "within" if ratio >= 0.8 else "NOT within"
            print(
                f"\nreceiving while the worker is busy, medians of {args.rounds} alternating"
                f" rounds: {busy:.0f} / {idle:.0f} instances/s = {ratio:.2f} of idle"
                f" ({verdict} the 20 % target); per pair: " + ", ".join(f"{x:.2f}" for x in ratios)
            )
        finally:
            node.terminate()


def _busy_round(node: NodeProcess, work: Path, args: argparse.Namespace, r: int) -> float:
    """Send a chest study, wait until its analysis runs, send the load; wait for the job to end
    so that the next idle round has the worker idle. Instances/s."""
    busy_folders = _write_series(work / f"busy-{r}", args, first_study=2000 + 100 * r)
    study = _write_series(
        work / f"study-{r}",
        args,
        first_study=3000 + r,
        count=1,
        images=args.busy_slices,
        description="CHEST",
    )[0]
    study_uid = StudyIdentity.random(3000 + r).study_instance_uid
    started = time.perf_counter()
    if _send_series((99, str(study), node.port))[1].count(0) != args.busy_slices:
        raise SystemExit("FAILED: the study for the worker was not accepted")
    state = _wait_state(node, study_uid, ("running",), timeout=120.0)
    print(
        f"\nworker busy: a {args.busy_slices}-slice study sent, job {state}"
        f" {time.perf_counter() - started:.1f} s later"
    )
    rate = _round(node, busy_folders, args, f"round {r + 1}, worker busy")
    state = _job_state(node, study_uid)
    print(f"analysis job at the end of the load: {state}")
    if state != "running":
        print("WARNING: the analysis ended during the load; use more --busy-slices")
    shutil.rmtree(work / f"busy-{r}")
    shutil.rmtree(work / f"study-{r}")
    started = time.perf_counter()
    state = _wait_state(
        node, study_uid, ("sending", "done", "skipped", "failed", "dead"), timeout=900.0
    )
    print(f"analysis job {state} {time.perf_counter() - started:.0f} s after the load\n")
    return rate


def _write_series(
    root: Path,
    args: argparse.Namespace,
    *,
    first_study: int,
    count: int | None = None,
    images: int | None = None,
    description: str = "LOAD",
) -> list[Path]:
    """One CT series per association, each its own study (unique UIDs)."""
    rng = np.random.default_rng(first_study)
    n = images or args.images
    volume = rng.integers(-1000, 1500, (n, args.size, args.size), dtype=np.int16)
    folders = []
    for i in range(args.associations if count is None else count):
        folder = root / f"series-{i:02d}"
        write_ct_series(
            volume,
            folder,
            spacing_mm=(1.0, 0.7, 0.7),
            study=StudyIdentity.random(first_study + i),
            series=SeriesSpec(series_number=1, series_description=description),
        )
        folders.append(folder)
    return folders


def _job_state(node: NodeProcess, study_uid: str) -> str:
    with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
        row = db.execute(
            "SELECT state FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT 1", (study_uid,)
        ).fetchone()
    return "none" if row is None else str(row[0])


def _wait_state(
    node: NodeProcess, study_uid: str, states: tuple[str, ...], *, timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(node, study_uid)
        if state in states:
            return state
        time.sleep(0.1)
    state = _job_state(node, study_uid)
    raise SystemExit(f"FAILED: the analysis job did not reach {states} (state {state})")


def _round(node: NodeProcess, folders: list[Path], args: argparse.Namespace, label: str) -> float:
    """Send every folder at once, one association each; print the figures; instances/s."""
    assert node.proc is not None
    pid = node.proc.pid
    with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
        before = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    spooled_before = len(node.spooled())
    mib = sum(p.stat().st_size for f in folders for p in f.iterdir()) / 2**20
    total = len(folders) * args.images
    rest_threads = len(os.listdir(f"/proc/{pid}/task"))
    rest_rss = _rss_mib(pid)
    peaks = {"threads": float(rest_threads), "rss_mib": rest_rss}
    # the senders are forked before any helper thread starts (a fork that copies a
    # lock held by another thread deadlocks the child)
    pool = multiprocessing.get_context("fork").Pool(len(folders))
    stop = threading.Event()
    echoes: list[float] = []
    helpers = [
        threading.Thread(target=_sample, args=(pid, stop, peaks), daemon=True),
        threading.Thread(
            target=_echo_loop, args=(node.port, args.echo_every, stop, echoes), daemon=True
        ),
    ]
    for t in helpers:
        t.start()
    jobs = [(i, str(f), node.port) for i, f in enumerate(folders)]
    started = time.perf_counter()
    with pool:
        results = pool.map(_send_series, jobs)
    elapsed = time.perf_counter() - started
    stop.set()
    for t in helpers:
        t.join(30)
    time.sleep(1.0)
    after_threads = len(os.listdir(f"/proc/{pid}/task"))
    after_rss = _rss_mib(pid)

    latencies = [x for lat, _, _ in results for x in lat]
    statuses = [s for _, st, _ in results for s in st]
    ok = sum(1 for s in statuses if s == 0)
    with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
        stored = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] - before
    spooled = len(node.spooled()) - spooled_before
    rate = total / elapsed
    print(f"[{label}] wall time {elapsed:.1f} s: {rate:.0f} instances/s, {mib / elapsed:.0f} MiB/s")
    if latencies:
        print(
            f"C-STORE latency: p50 {1000 * statistics.median(latencies):.1f} ms,"
            f" p99 {1000 * _pct(latencies, 0.99):.1f} ms,"
            f" max {1000 * max(latencies):.1f} ms"
        )
    per_assoc = [w for _, _, w in results if w]
    if per_assoc:
        print(f"association wall times: {min(per_assoc):.1f}-{max(per_assoc):.1f} s")
    finite = [e for e in echoes if e != float("inf")]
    print(
        f"C-ECHO under load: {len(finite)}/{len(echoes)} answered"
        + (
            f", p50 {1000 * statistics.median(finite):.0f} ms, max {1000 * max(finite):.0f} ms"
            if finite
            else ""
        )
    )
    print(
        f"node threads: {rest_threads} at rest, peak {peaks['threads']:.0f}, {after_threads} after"
    )
    print(
        f"node RSS: {rest_rss:.0f} MiB at rest, peak {peaks['rss_mib']:.0f} MiB,"
        f" {after_rss:.0f} MiB after"
    )
    print(f"statuses: {ok}/{total} success; job store {stored}; spool {spooled}")
    if not (ok == stored == spooled == total):
        raise SystemExit("FAILED: not every instance landed")
    print("every instance landed")
    return rate


if __name__ == "__main__":
    main()
