"""The node as a service: sd_notify on a real notify socket, the HTTP endpoint, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.peers import NodeProcess, node_cli, pid_alive, storescu


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
            return rsp.status, rsp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_sd_notify_ready_watchdog_status_stopping(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """READY=1 only once the port is bound; WATCHDOG=1 pings at half WatchdogSec; STATUS lines;
    STOPPING=1 on SIGTERM, then exit 0 — all read from a real notify socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    node = node_factory(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    messages: list[str] = []

    def read_until(key: str) -> None:
        while not any(key in m for m in messages):
            messages.append(sock.recv(4096).decode())

    read_until("READY=1")
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=listening on" in ready
    with socket.create_connection(("127.0.0.1", node.port), timeout=5):
        pass  # the port was bound before READY
    started = time.monotonic()
    read_until("WATCHDOG=1")
    pings = 1
    while pings < 3:
        if "WATCHDOG=1" in sock.recv(4096).decode():
            pings += 1
    assert time.monotonic() - started < 5  # every ~0.5 s
    assert node.terminate() == 0
    read_until("STOPPING=1")
    sock.close()


def test_http_metrics_health_and_readiness(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """/healthz and /readyz answer 200 with their checks; /metrics counts what was received."""
    node = node_factory()
    assert storescu(write_study(slices=3), node.port).returncode == 0
    node.wait_jobs(lambda j: j["jobs"] and j["jobs"][0]["state"] == "done")
    code, body = _get(node.http_port, "/healthz")
    assert code == 200, body
    assert json.loads(body)["ok"] is True
    code, body = _get(node.http_port, "/readyz")
    assert code == 200, body
    checks = json.loads(body)["checks"]
    assert checks == {
        "port_bound": True,
        "model_loaded": True,
        "disk_above_floor": True,
        "job_store_writable": True,
    }
    code, body = _get(node.http_port, "/metrics")
    text = body.decode()
    assert code == 200
    assert 'dicom_node_instances_received_total{outcome="stored"} 3.0' in text
    assert 'dicom_node_jobs{state="done"} 1.0' in text
    assert 'dicom_node_studies_completed_total{reason="quiet period"} 1.0' in text
    assert "dicom_node_free_disk_bytes" in text
    assert _get(node.http_port, "/nothing")[0] == 404


def test_readiness_fails_below_the_disk_floor(node_factory: Callable[..., NodeProcess]) -> None:
    """/readyz answers 503 and names the failed check when the disk is below the floor."""
    node = node_factory(storage={"min_free_disk_mb": 1024 * 1024 * 1024})
    code, body = _get(node.http_port, "/readyz")
    assert code == 503
    assert json.loads(body)["checks"]["disk_above_floor"] is False


def test_readiness_comes_back_when_the_analysis_process_dies_while_idle(
    node_factory: Callable[..., NodeProcess], tiny_model_dir: Path
) -> None:
    """The analysis process killed between studies (kill -9, as the OOM killer does): the node
    logs it and starts a fresh one, and /readyz is 200 again without a study arriving."""
    import signal

    from tests.peers import analysis_process

    node = node_factory(
        model={"path": str(tiny_model_dir)}, inference={"device": "cpu"}, jobs={"isolate": True}
    )
    assert node.proc is not None
    assert _get(node.http_port, "/readyz")[0] == 200
    child = analysis_process(node.proc.pid)
    os.kill(child, signal.SIGKILL)
    killed = time.monotonic()

    def replaced() -> bool:
        assert node.proc is not None
        try:
            return analysis_process(node.proc.pid) != child
        except AssertionError:  # none at this moment
            return False

    codes = [_get(node.http_port, "/readyz")[0]]
    while not (codes[-1] == 200 and replaced()):
        assert time.monotonic() - killed < 60, node.log()[-2000:]
        time.sleep(0.2)
        codes.append(_get(node.http_port, "/readyz")[0])
    print(f"ready again {time.monotonic() - killed:.1f} s after the kill")
    assert 503 in codes  # not ready while the fresh process loads the model
    said = f"the analysis process {child} ended while idle (killed by SIGKILL); restarting it"
    assert node.log().count(said) == 1
    assert node.terminate() == 0


def test_sighup_is_logged_and_ignored(
    node_factory: Callable[..., NodeProcess], tiny_model_dir: Path
) -> None:
    """SIGHUP to every process of the node (``systemctl kill -s HUP``, a closed terminal) leaves
    them all running, and the node says that the configuration is read only at start (its
    default action had ended the node, which Restart=on-failure does not restart); SIGTERM
    then stops it as usual."""
    import signal

    from tests.peers import analysis_process

    node = node_factory(
        model={"path": str(tiny_model_dir)}, inference={"device": "cpu"}, jobs={"isolate": True}
    )
    assert node.proc is not None
    children = [int(pid) for pid in _children(node.proc.pid)]
    analysis = analysis_process(node.proc.pid)
    assert analysis in children and len(children) == 2  # and multiprocessing's resource tracker
    for pid in children:
        os.kill(pid, signal.SIGHUP)
    node.proc.send_signal(signal.SIGHUP)
    said = (
        "received SIGHUP and ignored it: the configuration is read only at start;"
        " restart the service to apply changes"
    )
    deadline = time.monotonic() + 10
    while said not in node.log():
        assert node.proc.poll() is None, node.log()[-2000:]
        assert time.monotonic() < deadline, node.log()[-2000:]
        time.sleep(0.05)
    assert '"level": "WARNING"' in next(line for line in node.log().splitlines() if said in line)
    time.sleep(0.5)
    assert all(pid_alive(pid) for pid in children)
    assert _get(node.http_port, "/readyz")[0] == 200
    assert node.terminate() == 0
    assert node.log().rstrip().endswith('"msg": "stopped"}')
    assert "died unexpectedly" not in node.log()


def test_sighup_while_the_model_loads_is_ignored_too(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A SIGHUP that arrives while the analysis process still loads the model, before the
    node's loop runs, is ignored as well: the node comes up and says so."""
    import signal
    import threading

    node = NodeProcess(
        root=tmp_path / "node",
        settings=_isolated_analysis(tiny_model_dir),
    )
    failure: list[BaseException] = []

    def start() -> None:
        try:
            node.start()
        except BaseException as exc:  # the node ended before it listened
            failure.append(exc)

    starting = threading.Thread(target=start)
    starting.start()
    try:
        deadline = time.monotonic() + 60
        while node.proc is None or not _children(node.proc.pid):  # the analysis process
            assert starting.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        assert "analysis process" not in node.log()  # not ready yet: still loading
        node.proc.send_signal(signal.SIGHUP)
        starting.join(90)
        assert not failure, node.log()[-2000:]
        assert "received SIGHUP and ignored it" in node.log()
        assert node.terminate() == 0
    finally:
        starting.join(90)
        if node.proc is not None and node.proc.poll() is None:
            node.kill()


def _isolated_analysis(model: Path) -> dict[str, object]:
    """Node settings: the tiny model on the CPU, in an analysis process of its own."""
    return {
        "model": {"path": str(model)},
        "inference": {"device": "cpu"},
        "jobs": {"isolate": True},
    }


def _children(pid: int) -> list[str]:
    """The pids of ``pid``'s child processes (Linux)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [c for t in tasks for c in (t / "children").read_text(encoding="ascii").split()]


def test_audit_log_records_who_sent_what_and_security_events(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """The audit log (JSON lines) has the start, each association's transfer with its study
    and count, a rejected caller as a security alert, and the stop."""
    from pydicom import dcmread

    from tests.peers import echoscu

    files = write_study(slices=4)
    node = node_factory(node={"allowed_callers": [{"ae_title": "STORESCU"}]})
    assert storescu(files, node.port).returncode == 0
    assert storescu(files, node.port).returncode == 0  # an identical re-send
    assert echoscu(node.port, calling="STRANGER").returncode != 0
    assert echoscu(node.port, calling="STORESCU", called="SOMEONE_ELSE").returncode != 0
    assert node.terminate() == 0
    records = [json.loads(x) for x in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    events = [
        (r["event"], r.get("action") or r.get("direction") or r.get("reason")) for r in records
    ]
    assert events == [
        ("Application Activity", "start"),
        ("Begin Transferring DICOM Instances", "received"),
        ("DICOM Instances Transferred", "received"),
        ("Begin Transferring DICOM Instances", "received"),
        ("DICOM Instances Transferred", "received"),
        ("Security Alert", "calling AE not allowed"),
        ("Security Alert", "called AE not recognised; association rejected"),
        ("Application Activity", "stop"),
    ]
    study = str(dcmread(files[0]).StudyInstanceUID)
    assert (records[1]["calling_ae"], records[1]["study"]) == ("STORESCU", study)
    transfer, again = records[2], records[4]
    assert transfer["calling_ae"] == "STORESCU"
    assert transfer["studies"] == {study: 4} and "duplicates" not in transfer
    assert (again["studies"], again["duplicates"]) == ({study: 4}, {study: 4})
    assert records[5]["calling_ae"] == "STRANGER"
    assert records[6]["code"] == "called_ae_not_recognised"
    assert records[6]["called_ae"] == "SOMEONE_ELSE"
    # ordinary logs carry no Study Instance UID by default
    assert str(dcmread(files[0]).StudyInstanceUID) not in node.log()


def test_frozen_process_stops_watchdog_pings(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """H4: while the node is frozen (SIGSTOP) no WATCHDOG=1 arrives, so systemd's WatchdogSec
    restarts it; after SIGCONT the pings resume. No thread pings on a loop's behalf."""
    import signal

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    node = node_factory(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    assert node.proc is not None

    def pings_within(seconds: float) -> int:
        count, deadline = 0, time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                count += sock.recv(4096).decode().count("WATCHDOG=1")
            except TimeoutError:
                break
        return count

    assert pings_within(2.0) >= 2
    node.proc.send_signal(signal.SIGSTOP)
    try:
        while True:  # drain what was sent before the stop took effect
            sock.settimeout(0.3)
            try:
                sock.recv(4096)
            except TimeoutError:
                break
        assert pings_within(2.5) == 0
    finally:
        node.proc.send_signal(signal.SIGCONT)
    assert pings_within(2.0) >= 2
    sock.close()


def test_watchdog_restarts_a_frozen_node_and_nothing_is_lost(
    tmp_path: Path, write_study: Callable[..., list[Path]], tiny_model_dir: Path
) -> None:
    """H4 end to end, under tests/supervisor.py: a test double for systemd's watchdog and
    Restart=on-failure (systemd cannot run as PID 1 where the suite runs; see that module).

    A study is acknowledged, then the node's main process is frozen (SIGSTOP) before it has
    analysed it. The missing pings make the supervisor abort it (SIGABRT, SIGCONT) and start it
    again; the new process says READY=1 only with its port bound, answers C-ECHO, and finishes
    the study that the frozen one had acknowledged. The frozen node's analysis process does
    not outlive it."""
    import signal

    from tests.peers import analysis_process, echoscu, pid_alive
    from tests.supervisor import WatchdogSupervisor

    node = NodeProcess(
        root=tmp_path / "node",
        settings={
            "model": {"path": str(tiny_model_dir)},
            "inference": {"device": "cpu", "batch_size": 8},
            "lesions": {"threshold": 0.5, "min_volume_mm3": 0},
            "study": {"stable_seconds": 3.0, "max_wait_seconds": 120.0},
            "selection": {"min_slices": 4, "min_lung_fraction": 0.0},
        },
    )
    supervisor = WatchdogSupervisor(node, tmp_path / "notify.sock", watchdog_sec=2.0).start()
    try:
        supervisor.wait_ready(1)
        assert node.proc is not None
        frozen = node.proc.pid
        analysis = analysis_process(frozen)
        files = write_study(slices=6)
        assert storescu(files, node.port).returncode == 0  # acknowledged
        os.kill(frozen, signal.SIGSTOP)
        supervisor.wait_ready(2, timeout=90)
        assert [(e.pid, e.returncode, e.watchdog) for e in supervisor.exits] == [
            (frozen, -signal.SIGABRT, True)
        ]
        assert not pid_alive(frozen)
        deadline = time.monotonic() + 10
        while pid_alive(analysis) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(analysis)
        assert [bound for _, bound in supervisor.readies] == [True, True]
        assert echoscu(node.port).returncode == 0
        listing = node.wait_jobs(
            lambda j: any(job["state"] == "done" for job in j["jobs"]), timeout=90
        )
        done = [job for job in listing["jobs"] if job["state"] == "done"]
        assert len(done) == 1
        assert listing["studies"][0]["instances"] == len(files)
        assert len(node.spooled()) == len(files)
    finally:
        supervisor.stop()


def _serve_once(node: NodeProcess) -> subprocess.CompletedProcess[str]:
    """``dicom-node serve`` with ``node``'s configuration, for a start that must fail."""
    node.root.mkdir(parents=True)
    node.write_config()
    return node_cli("serve", "--config", str(node.config_path), timeout=120)


def test_a_port_in_use_stops_the_start_with_a_clear_reason(tmp_path: Path) -> None:
    """Another program on the DICOM port: the node exits non-zero and says which address."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        node = NodeProcess(root=tmp_path / "node", port=port)
        done = _serve_once(node)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr


@pytest.mark.parametrize("taken", ["http", "dicom"])
def test_a_start_that_fails_after_the_analysis_process_started_exits_and_leaves_nothing(
    tmp_path: Path, tiny_model_dir: Path, taken: str
) -> None:
    """A port taken (HTTP or DICOM) once the analysis process is up: the node says which, exits
    non-zero within seconds (it had hung for ever, ignoring SIGTERM, its DICOM port open) and
    leaves neither a listening port nor its analysis process behind."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        node = NodeProcess(
            root=tmp_path / "node",
            settings=_isolated_analysis(tiny_model_dir),
            **({"http_port": port} if taken == "http" else {"port": port}),
        )
        node.root.mkdir(parents=True)
        node.write_config()
        with node.log_path.open("ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dicom_node.cli",
                    "serve",
                    "--config",
                    str(node.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
        try:
            said = f"cannot listen{' for HTTP' if taken == 'http' else ''} on 127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while said not in node.log() and proc.poll() is None:
                assert time.monotonic() < deadline, node.log()[-2000:]
                time.sleep(0.05)
            failed = time.monotonic()
            code = proc.wait(15)
            exited = time.monotonic() - failed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    text = node.log()
    assert code == 1, text[-2000:]
    assert exited < 10, exited
    assert f"dicom-node: {said}" in text
    child = re.search(r"analysis process (\d+) ready", text)
    assert child is not None, text[-2000:]
    assert not pid_alive(int(child.group(1)))
    mine = node.port if taken == "http" else node.http_port
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", mine), 1):
        pass


def test_a_setting_the_analysis_process_refuses_stops_the_node_with_status_2(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """fp16 on the CPU is refused where the model loads, in the analysis process: the node
    still exits with status 2 (a configuration error, which the unit does not restart), not
    1 (which it would restart every few seconds, reloading the model each time)."""
    node = NodeProcess(
        root=tmp_path / "node",
        settings={
            "model": {"path": str(tiny_model_dir)},
            "inference": {"device": "cpu", "precision": "fp16"},
            "jobs": {"isolate": True},
        },
    )
    done = _serve_once(node)
    assert done.returncode == 2, done.stderr[-800:]
    assert "inference.precision: 'fp16' is supported on CUDA only" in done.stderr


def test_operator_commands_do_not_make_a_job_store_where_there_is_none(tmp_path: Path) -> None:
    """`jobs`, `retry` and `purge` on a folder without a job store (a mistyped --data-dir)
    say so with status 2 and leave nothing behind."""
    missing = tmp_path / "typo"
    for args in (["jobs"], ["retry", "1"], ["purge"]):
        done = node_cli(*args, "--data-dir", str(missing))
        assert done.returncode == 2, (args, done.stderr)
        assert "no job store at" in done.stderr
    assert not missing.exists()


def test_the_job_listing_shows_the_newest_jobs_and_every_delivery_still_owed(
    tmp_path: Path,
) -> None:
    """`dicom-node jobs` lists the 50 newest jobs by default (`--limit N`, 0 for all), and
    every job not settled (a dead one waiting for an operator, one still sending) whatever
    its age; the deliveries of the jobs listed, and every delivery not yet made. The text
    says how many jobs it left out. A negative limit is refused by the argument parser."""
    from dicom_node.config import DispatchSettings
    from dicom_node.store.jobs import InstanceRecord, JobState, JobStore, OutputFile
    from dicom_node.store.outbox import Outbox

    data = tmp_path / "var"
    data.mkdir()
    store = JobStore(data / "jobs.sqlite")
    outbox = Outbox(store, DispatchSettings())
    for n in range(1, 56):
        study = f"1.2.{n}"
        store.record_instance(
            InstanceRecord(
                f"{study}.1",
                study,
                f"{study}.9",
                "1.2.840.10008.5.1.4.1.1.2",
                "CT",
                data / f"{n}.dcm",
                10,
                "PACS",
                time.time(),
            )
        )
        job = store.complete_study(study, reason="test")
        assert job is not None and store.claim_next_job() is not None
        sr = OutputFile(data / f"sr{n}.dcm", "1.2.840.10008.5.1.4.1.1.88.34", f"{study}.7")
        store.finish_with_outputs(job.id, result={}, outputs=[sr], destinations=["pacs"])
        for item in outbox.claim("pacs"):
            if item.job_id != 1:  # the first job's report is still owed
                outbox.delivered(item.id, 0)
    with store.transaction() as db:  # the second died (its operator has not seen it yet)
        store.set_state(db, 2, JobState.DEAD, "refused by the archive")
    store.close()

    def listing(*args: str) -> dict[str, list[dict[str, object]]]:
        done = node_cli("jobs", "--json", "--data-dir", str(data), *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    default = listing()
    assert [j["id"] for j in default["jobs"]] == [*range(55, 5, -1), 2, 1]
    assert [j["state"] for j in default["jobs"][-2:]] == ["dead", "sending"]
    assert {d["job_id"] for d in default["deliveries"]} == {1, 2} | set(range(6, 56))
    assert [j["id"] for j in listing("--limit", "2")["jobs"]] == [55, 54, 2, 1]
    assert len(listing("--limit", "0")["jobs"]) == 55
    refused = node_cli("jobs", "--limit", "-1", "--data-dir", str(data))
    assert refused.returncode == 2 and "must be 0 or more" in refused.stderr
    text = node_cli("jobs", "--limit", "3", "--data-dir", str(data))
    assert text.returncode == 0, text.stderr
    jobs_table = text.stdout.split("\n\n")[1].splitlines()
    assert jobs_table[0].split()[:2] == ["JOB", "STATE"] and len(jobs_table) == 6
    assert text.stdout.rstrip().endswith(
        "50 older settled job(s) not listed (--limit 0 lists every job)"
    )


def test_who_sent_a_study_is_audited_before_a_kill_9(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """Instances acknowledged in an association the node never saw end (kill -9) are in the
    audit log: the first of each study is audited as it is acknowledged."""
    from pydicom import dcmread
    from pynetdicom import AE

    files = write_study(slices=3)
    node = node_factory()
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        for path in files:
            assert assoc.send_c_store(dcmread(path)).Status == 0
        node.kill()
    finally:
        assoc.abort()
    records = [json.loads(x) for x in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    begun = [r for r in records if r["event"] == "Begin Transferring DICOM Instances"]
    assert [(r["calling_ae"], r["study"]) for r in begun] == [
        ("MODALITY1", str(dcmread(files[0]).StudyInstanceUID))
    ]


def test_what_the_node_writes_is_not_for_every_user(
    node_factory: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """Started from a shell (umask 022), the node still keeps its job store, spool and data
    folders from other users, as the unit's UMask=0027 does: they hold patient data."""
    old = os.umask(0o022)
    try:
        node = node_factory()
    finally:
        os.umask(old)
    assert storescu(write_study(slices=2), node.port).returncode == 0
    assert node.terminate() == 0
    readable = sorted(
        str(p.relative_to(node.data_dir))
        for p in [node.data_dir / "jobs.sqlite", *node.data_dir.rglob("*")]
        if p.stat().st_mode & 0o007
    )
    assert readable == []
