"""The analysis process: a hung job is killed after its time limit, the next job runs (P2)."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.errors import PipelineError, StudySkipped
from dicom_node.isolation import AnalysisStartError, IsolatedPipeline, JobTimeoutError
from dicom_node.pipeline import StudyInput, StudyResult
from tests.peers import pid_alive
from tests.service.isolation_doubles import Behaving, Poisoned, broken, loads_unless


def _study(job_id: int, tmp_path: Path) -> StudyInput:
    return StudyInput(job_id=job_id, study_uid="1.2.3", version=1, instances=(), work_dir=tmp_path)


@pytest.fixture
def isolated() -> Iterator[IsolatedPipeline]:
    seen: list[StudyResult] = []
    pipeline = IsolatedPipeline(
        functools.partial(Behaving), timeout_seconds=2.0, on_result=seen.append
    )
    pipeline.seen = seen  # type: ignore[attr-defined]
    yield pipeline
    pipeline.close()


def test_results_come_from_a_child_process_that_keeps_its_state(
    isolated: IsolatedPipeline, tmp_path: Path
) -> None:
    """Jobs run in one long-lived child (the model stays loaded): its pid, its call count."""
    first = isolated(_study(10, tmp_path))
    second = isolated(_study(11, tmp_path))
    assert first.summary["pid"] == second.summary["pid"] == isolated.pid != os.getpid()
    assert (first.summary["calls"], second.summary["calls"]) == (1, 2)
    assert first.outputs == (tmp_path / "out.dcm",)
    assert isolated.seen == [first, second]  # type: ignore[attr-defined]
    assert isolated.ready


def test_a_hung_job_is_killed_after_its_timeout_and_the_next_job_runs(
    isolated: IsolatedPipeline, tmp_path: Path
) -> None:
    """P2: the hung child is killed at the limit; a fresh child takes the next job."""
    hung_pid = isolated.pid
    assert hung_pid is not None
    started = time.monotonic()
    with pytest.raises(JobTimeoutError, match="job_timeout_seconds"):
        isolated(_study(1, tmp_path))
    waited = time.monotonic() - started
    assert 2.0 <= waited < 30.0
    assert not pid_alive(hung_pid)
    assert isolated.ready and isolated.pid != hung_pid
    result = isolated(_study(12, tmp_path))
    assert result.summary["pid"] == isolated.pid and result.summary["calls"] == 1


def test_a_child_that_dies_fails_the_job_and_is_replaced(
    isolated: IsolatedPipeline, tmp_path: Path
) -> None:
    """A crash of the analysis process (here: exit status 3) fails the job, not the node."""
    with pytest.raises(PipelineError, match="exit status 3"):
        isolated(_study(2, tmp_path))
    assert isolated(_study(13, tmp_path)).summary["calls"] == 1


def test_skips_and_errors_keep_their_meaning(isolated: IsolatedPipeline, tmp_path: Path) -> None:
    """StudySkipped stays a skip; other exceptions become PipelineError naming their type."""
    pid = isolated.pid
    with pytest.raises(StudySkipped, match="no CT series"):
        isolated(_study(3, tmp_path))
    with pytest.raises(PipelineError, match="PipelineError: model output contains NaN"):
        isolated(_study(4, tmp_path))
    assert isolated.pid == pid  # the child survives ordinary failures


def test_an_unexpected_error_gets_the_next_job_a_fresh_process(tmp_path: Path) -> None:
    """An error the node did not raise on purpose (here a CUDA error, after which every CUDA
    call of that process fails) fails its job and replaces the process, so the next job does
    not fail too; errors the node raises on purpose keep the process (its loaded model)."""
    pipeline = IsolatedPipeline(functools.partial(Poisoned), timeout_seconds=30.0)
    try:
        first = pipeline(_study(10, tmp_path)).summary["pid"]
        with pytest.raises(PipelineError, match="RuntimeError: CUDA error"):
            pipeline(_study(5, tmp_path))
        assert pipeline.ready and pipeline.pid != first
        assert pipeline(_study(11, tmp_path)).summary["pid"] == pipeline.pid
    finally:
        pipeline.close()


def test_a_model_that_does_not_load_stops_the_start() -> None:
    """The child's build error reaches the constructor, so a broken model stops the node."""
    with pytest.raises(AnalysisStartError, match=r"ModelError: weights\.safetensors"):
        IsolatedPipeline(broken, timeout_seconds=30.0)


def test_close_ends_the_child(tmp_path: Path) -> None:
    """close() ends an idle child; the pipeline is no longer ready."""
    pipeline = IsolatedPipeline(functools.partial(Behaving), timeout_seconds=10.0)
    pid = pipeline.pid
    assert pid is not None and pid_alive(pid)
    pipeline.close()
    assert not pipeline.ready and not pid_alive(pid)
    with pytest.raises(PipelineError):
        pipeline(_study(10, tmp_path))


_EXIT_WITHOUT_CLOSE = """
import functools, sys, threading
from pathlib import Path
from dicom_node.isolation import IsolatedPipeline
from dicom_node.pipeline import StudyInput
from tests.service.isolation_doubles import Behaving

pipeline = IsolatedPipeline(functools.partial(Behaving), timeout_seconds=3600.0)
print(pipeline.pid, flush=True)
if sys.argv[1] == "busy":  # job 1 hangs: the child never reads the pipe again
    study = StudyInput(job_id=1, study_uid="1.2", version=1, instances=(), work_dir=Path("."))
    threading.Thread(target=pipeline, args=(study,), daemon=True).start()
sys.exit(1)
"""


@pytest.mark.parametrize("child", ["idle", "busy"])
def test_an_exit_without_close_ends_the_child_instead_of_hanging(child: str) -> None:
    """A process leaving with its analysis process still there (an error on the way out, no
    close()) exits at once with its status, and the child is gone: multiprocessing's own exit
    hook would SIGTERM it (ignored) and wait for ever."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_WITHOUT_CLOSE, child],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 30
    pid = int(done.stdout.split()[0])
    assert not pid_alive(pid)
    assert f"ending the analysis process {pid}: the node exits" in done.stderr


def _killed(pipeline: IsolatedPipeline) -> int:
    """SIGKILL the child (as the OOM killer would) and wait until it is seen ended."""
    pid = pipeline.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pipeline.ready:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return pid


def test_a_child_that_ends_while_idle_is_replaced_without_a_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """revive() (the idle worker's call) replaces a child that ended between jobs, saying so
    once; with a live child it does nothing."""
    pipeline = IsolatedPipeline(functools.partial(Behaving), timeout_seconds=10.0)
    try:
        dead = _killed(pipeline)
        with caplog.at_level(logging.WARNING, logger="dicom_node.isolation"):
            pipeline.revive()
            assert pipeline.ready and pipeline.pid != dead
            pipeline.revive()
            pipeline.revive()
        said = [r.getMessage() for r in caplog.records]
        assert said == [
            f"the analysis process {dead} ended while idle (killed by SIGKILL); restarting it"
        ]
    finally:
        pipeline.close()


def test_a_restart_that_fails_is_tried_again_after_a_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that does not start again (the model folder unreadable now) is not retried on
    every idle tick but after the backoff; once the model loads, the pipeline is ready."""
    from dicom_node import isolation

    monkeypatch.setattr(isolation, "RESTART_BASE_SECONDS", 1.0)
    flag = tmp_path / "broken"
    pipeline = IsolatedPipeline(functools.partial(loads_unless, flag), timeout_seconds=10.0)
    try:
        flag.touch()
        _killed(pipeline)
        with caplog.at_level(logging.WARNING, logger="dicom_node.isolation"):
            pipeline.revive()
            assert not pipeline.ready
            failed = time.monotonic()
            pipeline.revive()  # within the pause: not tried
            flag.unlink()
            pipeline.revive()
            assert not pipeline.ready
            while not pipeline.ready:
                assert time.monotonic() - failed < 10
                time.sleep(0.1)
                pipeline.revive()
        assert time.monotonic() - failed >= 0.8  # the pause, less its jitter
        tries = [r.getMessage() for r in caplog.records if "did not restart" in r.getMessage()]
        assert len(tries) == 1
        assert "ModelError: model folder unreadable" in caplog.text
    finally:
        pipeline.close()


def test_the_child_ignores_the_signals_the_parent_handles(tmp_path: Path) -> None:
    """SIGINT, SIGTERM and SIGHUP (to the process group: Ctrl-C, a closed terminal) leave the
    analysis process alone; the node decides when it ends."""
    pipeline = IsolatedPipeline(functools.partial(Behaving), timeout_seconds=10.0)
    try:
        pid = pipeline.pid
        assert pid is not None
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(pid, signum)
        time.sleep(0.5)
        assert pipeline.ready and pipeline.pid == pid
        assert pipeline(_study(10, tmp_path)).summary["pid"] == pid
    finally:
        pipeline.close()


def test_the_child_is_the_first_the_oom_killer_ends() -> None:
    """Out of memory, the kernel picks the analysis process before the receiver."""
    from dicom_node.isolation import OOM_SCORE_ADJ

    pipeline = IsolatedPipeline(functools.partial(Behaving), timeout_seconds=10.0)
    try:
        pid = pipeline.pid
        assert pid is not None
        child = int(Path(f"/proc/{pid}/oom_score_adj").read_text())
        mine = int(Path("/proc/self/oom_score_adj").read_text())
        assert child == OOM_SCORE_ADJ > mine
    finally:
        pipeline.close()


def test_the_child_runs_at_the_niceness_asked_for(tmp_path: Path) -> None:
    """``nice``: the analysis process yields the CPUs to the receiver."""
    pipeline = IsolatedPipeline(functools.partial(Behaving), timeout_seconds=10.0, nice=7)
    try:
        pid = pipeline.pid
        assert pid is not None
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, mine + 7)
    finally:
        pipeline.close()


@pytest.mark.parametrize(
    ("policy", "expected"), [("idle", os.SCHED_IDLE), ("batch", os.SCHED_BATCH), ("normal", None)]
)
def test_the_child_runs_under_the_cpu_policy_asked_for(policy: str, expected: int | None) -> None:
    """``cpu_policy``: SCHED_IDLE gives the analysis only CPU time the receiver leaves; threads
    started later (torch's) inherit it."""
    pipeline = IsolatedPipeline(
        functools.partial(Behaving),
        timeout_seconds=10.0,
        cpu_policy=policy,  # type: ignore[arg-type]
    )
    try:
        pid = pipeline.pid
        assert pid is not None
        want = os.sched_getscheduler(0) if expected is None else expected
        assert os.sched_getscheduler(pid) == want
        for task in os.listdir(f"/proc/{pid}/task"):
            assert os.sched_getscheduler(int(task)) == want
    finally:
        pipeline.close()


def test_a_forbidden_priority_change_is_reported_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a seccomp filter that denies setpriority and sched_setscheduler (EPERM), the
    analysis process still starts: what could not be done is returned for the log. (Called
    here with both calls replaced: the test process's own priority is left alone.)"""
    from dicom_node import isolation

    def refuse(*_args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(isolation.os, "setpriority", refuse)
    monkeypatch.setattr(isolation.os, "sched_setscheduler", refuse)
    problem = isolation._lower_priority(10, "idle")
    assert problem is not None
    assert "priority by 10" in problem
    assert "CPU policy idle" in problem
    assert isolation._lower_priority(0, "normal") is None
