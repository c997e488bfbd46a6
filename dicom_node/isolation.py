"""The analysis in a child process of its own, killed when a job runs past its time limit.

A study pipeline that hangs (a stuck GPU driver, a deadlocked library, an endless loop on a
pathological input) must not take the node with it. :class:`IsolatedPipeline` keeps the real
pipeline, and the model it holds, in one long-lived child process started with ``spawn``; each
job is sent to it over a pipe and the answer awaited for at most ``jobs.job_timeout_seconds``.
Past that the child is killed (SIGKILL: a frozen process cannot ignore it, and the GPU memory it
held is freed), a fresh one is started, and the job fails with :class:`JobTimeoutError`, so the
worker retries it with backoff like any other failure. The receiver, the dispatcher and the
health endpoint run in the parent and are never held up.

The child ignores SIGINT, SIGTERM and SIGHUP (the parent decides when it ends) and is killed
by the kernel if the parent dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the node leaves no
orphan holding the GPU. A parent that exits without :meth:`IsolatedPipeline.close` (an error
on the way out) kills it from an ``atexit`` hook, which runs before :mod:`multiprocessing`'s
own: that one would send the child a SIGTERM it ignores and then wait for it for ever. Its log
records go to the same stderr in the same format, with the job's context.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.util  # registers its atexit hook now, so that ours runs before it
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

from dicom_node.backoff import backoff_delay
from dicom_node.config import LoggingSettings
from dicom_node.errors import (
    AnalysisUnavailableError,
    ConfigError,
    NodeError,
    PipelineError,
    StudySkipped,
)
from dicom_node.logs import log_context, setup_logging
from dicom_node.pipeline import StudyInput, StudyPipeline, StudyResult

logger = logging.getLogger(__name__)

#: Linux prctl option: the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1


#: Seconds an idle child has to end by itself when the parent exits without closing it.
EXIT_GRACE_SECONDS = 2.0

#: After a restart of the analysis process that failed, the next (by :meth:`revive
#: <IsolatedPipeline.revive>`) waits this long, doubling with each failure up to the max.
RESTART_BASE_SECONDS = 5.0
RESTART_MAX_SECONDS = 300.0

#: Linux scheduling policies for the analysis process (see :func:`_lower_priority`).
CpuPolicy = Literal["normal", "batch", "idle"]


class JobTimeoutError(PipelineError):
    """The pipeline ran past ``jobs.job_timeout_seconds``; its process was killed."""


class AnalysisStartError(PipelineError):
    """The child process could not build its pipeline (the model did not load, ...)."""


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _lower_priority(nice: int, cpu_policy: CpuPolicy) -> str | None:
    """Add ``nice`` and set the policy on every thread of this process; threads started later
    inherit both (imports may already have started some: numpy's BLAS pool).

    ``idle`` (SCHED_IDLE) runs the process only on CPU time nothing else wants, so receiving is
    not slowed by the analysis; ``batch`` (SCHED_BATCH) keeps the fair share of ``nice`` but
    gives up wake-up preemption; ``normal`` leaves the policy alone. Returns what could not be
    done, for the log (set up later: it may start threads).
    """
    policies = {"batch": getattr(os, "SCHED_BATCH", None), "idle": getattr(os, "SCHED_IDLE", None)}
    policy = policies.get(cpu_policy)
    try:
        threads = [int(t.name) for t in Path("/proc/self/task").iterdir()]
    except OSError:
        threads = [0]
    problems: dict[str, str] = {}
    for tid in threads:
        if nice:
            try:  # per thread on Linux: PRIO_PROCESS with a thread id
                lowered = min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice)
                os.setpriority(os.PRIO_PROCESS, tid, lowered)
            except OSError as exc:  # a seccomp filter may forbid it: the parent's priority
                problems["nice"] = f"could not lower the analysis priority by {nice}: {exc}"
        if policy is not None:
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
            except OSError as exc:  # as above: the niceness still holds
                problems["policy"] = f"could not set the analysis CPU policy {cpu_policy}: {exc}"
    return "; ".join(problems.values()) or None


#: The analysis process's ``oom_score_adj``: out of memory, the kernel ends it before the
#: receiver (a job is retried in a fresh process; an acknowledged instance is never lost).
OOM_SCORE_ADJ = 500


def _first_for_the_oom_killer() -> None:
    try:  # raising it needs no privilege
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n", encoding="ascii")
    except OSError as exc:
        logger.debug("oom_score_adj left as it is: %s", exc)


def _child_main(
    conn: Connection,
    factory: Callable[[], StudyPipeline],
    logging_settings: LoggingSettings | None,
    nice: int = 0,
    cpu_policy: CpuPolicy = "normal",
) -> None:
    """The child: build the pipeline, say ready, then run jobs until told to stop."""
    _die_with_parent()
    _first_for_the_oom_killer()
    problem = _lower_priority(nice, cpu_policy)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the node ignores it too (a closed terminal)
    if logging_settings is not None:
        setup_logging(logging_settings)
    if problem:
        logger.warning("%s", problem)
    try:
        pipeline = factory()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("failed", type(exc).__name__, str(exc)))
        return
    # What is alive now (torch, highdicom, the model: ~500k objects) lives as long as the
    # process: out of the cyclic collector's full passes, which otherwise walk it all
    gc.freeze()
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent has gone
            return
        if message[0] != "run":
            return
        study, fields = message[1], message[2]
        with log_context(**fields):
            try:
                result = pipeline(study)
            except StudySkipped as exc:
                conn.send(("skipped", str(exc)))
            except Exception as exc:
                logger.exception("analysis failed")
                # an error the node did not raise on purpose may have left the process unfit
                # (a CUDA error poisons its context for every later call): the parent replaces it
                conn.send(("error", type(exc).__name__, str(exc), not isinstance(exc, NodeError)))
            else:
                conn.send(("ok", result))


class IsolatedPipeline:
    """A :class:`~dicom_node.pipeline.StudyPipeline` that runs another in a child process.

    Parameters
    ----------
    factory
        Builds the real pipeline in the child; it must be picklable (a module-level callable,
        or a :func:`functools.partial` of one with picklable arguments).
    timeout_seconds
        Longest a job may take.
    start_timeout_seconds
        Longest the child may take to start and build its pipeline (load the model).
    logging_settings
        The node's logging settings, applied in the child (``None``: leave logging as is).
    nice
        Niceness added to the child's (the receiver keeps the CPUs first).
    cpu_policy
        The child's Linux scheduling policy: ``idle`` (SCHED_IDLE: only CPU time nothing else
        wants), ``batch`` (SCHED_BATCH) or ``normal``.
    on_result
        Called in the parent with each successful result (for metrics the child cannot
        record in the parent's registry).

    Raises
    ------
    AnalysisStartError
        The child could not build the pipeline, or not within ``start_timeout_seconds``; raised
        at construction so that a broken model stops the node at start.
    """

    def __init__(
        self,
        factory: Callable[[], StudyPipeline],
        *,
        timeout_seconds: float,
        start_timeout_seconds: float = 600.0,
        logging_settings: LoggingSettings | None = None,
        nice: int = 0,
        cpu_policy: CpuPolicy = "normal",
        on_result: Callable[[StudyResult], None] = lambda _result: None,
    ) -> None:
        self._factory = factory
        self._timeout = timeout_seconds
        self._start_timeout = start_timeout_seconds
        self._logging = logging_settings
        self._nice = nice
        self._cpu_policy: CpuPolicy = cpu_policy
        self._on_result = on_result
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._built = False  # the current child has said it is ready
        self._closed = False
        self._restart_failures = 0
        self._restart_after = 0.0  # monotonic time before which revive() does not try again
        # registered after multiprocessing's (imported above): atexit runs it first
        atexit.register(self._end_at_exit)
        try:
            self._start()
        except BaseException:
            atexit.unregister(self._end_at_exit)
            raise

    # ------------------------------------------------------------------ state

    @property
    def start_timeout_seconds(self) -> float:
        """Longest a (fresh) child may take to start."""
        return self._start_timeout

    @property
    def ready(self) -> bool:
        """The child is alive with its pipeline built (not while a fresh one loads the model)."""
        process = self._process
        return self._built and process is not None and process.is_alive()

    @property
    def pid(self) -> int | None:
        """Process id of the current child (``None`` when there is none)."""
        process = self._process
        return None if process is None else process.pid

    # ------------------------------------------------------------------ the call

    def __call__(self, study: StudyInput, /) -> StudyResult:
        with self._lock:
            if not self.ready:
                self._restart("the analysis process had ended")
            conn = self._conn
            if conn is None:
                raise AnalysisUnavailableError(
                    "no analysis process (it did not restart, or the node stops)"
                )
            fields = {"job": study.job_id, "version": study.version}
            try:
                conn.send(("run", study, fields))
            except (OSError, ValueError) as exc:
                self._restart("the analysis process could not take the job")
                raise PipelineError(f"analysis process unavailable ({exc})") from exc
            try:
                answered = conn.poll(self._timeout)
            except (EOFError, OSError, ValueError):
                answered = True  # closed under us (the node stops): recv() says how
            if not answered:
                pid = self.pid
                self._restart(f"job {study.job_id} ran past {self._timeout:g} s")
                raise JobTimeoutError(
                    f"analysis ran past jobs.job_timeout_seconds ({self._timeout:g} s); "
                    f"its process {pid} was killed"
                )
            try:
                answer: tuple[Any, ...] = conn.recv()
            except (EOFError, OSError, ValueError):
                code = self._exit_code()
                self._restart("the analysis process died")
                raise PipelineError(f"analysis process died ({code})") from None
            if answer[0] == "error" and answer[3]:
                self._restart(f"job {study.job_id} failed unexpectedly ({answer[1]})")
        kind = answer[0]
        if kind == "ok":
            result: StudyResult = answer[1]
            self._on_result(result)
            return result
        if kind == "skipped":
            raise StudySkipped(answer[1])
        raise PipelineError(f"{answer[1]}: {answer[2]}")

    # ------------------------------------------------------------------ the child

    def _start(self) -> None:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main,
            args=(child, self._factory, self._logging, self._nice, self._cpu_policy),
            name="dicom-node-analysis",
            daemon=True,
        )
        started = time.monotonic()
        # Started with SIGHUP blocked, which they inherit: the child ignores it as soon as it
        # runs, and multiprocessing's resource tracker (started with the first child), which
        # ignores SIGINT and SIGTERM only, never gets it (systemctl kill -s HUP: every process)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        self._process, self._conn = process, parent
        if not parent.poll(self._start_timeout):
            self._kill()
            raise AnalysisStartError(
                f"the analysis process did not start within {self._start_timeout:g} s"
            )
        try:
            answer = parent.recv()
        except (EOFError, OSError):
            code = self._exit_code()
            self._kill()
            raise AnalysisStartError(f"the analysis process died while starting ({code})") from None
        if answer[0] != "ready":
            self._kill()
            if answer[1] == ConfigError.__name__:  # a setting: the node stops with status 2
                raise ConfigError(answer[2])
            raise AnalysisStartError(f"{answer[1]}: {answer[2]}")
        self._built = True
        logger.info("analysis process %d ready in %.1f s", process.pid, time.monotonic() - started)

    def _restart(self, why: str) -> None:
        self._kill()
        if self._closed:
            return
        logger.warning("restarting the analysis process: %s", why)
        self._start_again()

    def _start_again(self) -> None:
        """Start a fresh child; one that does not start puts off the next :meth:`revive`."""
        try:
            self._start()
        except (AnalysisStartError, ConfigError):
            if self._closed:  # killed by close() while it started
                return
            self._restart_failures += 1
            delay = backoff_delay(
                self._restart_failures,
                base_seconds=RESTART_BASE_SECONDS,
                max_seconds=RESTART_MAX_SECONDS,
            )
            self._restart_after = time.monotonic() + delay
            logger.exception(
                "the analysis process did not restart; trying again in %.0f s or at the next job",
                delay,
            )
        else:
            self._restart_failures = 0
            self._restart_after = 0.0

    def revive(self) -> None:
        """Replace a child that ended while no job ran (killed, out of memory), so that the
        pipeline is :attr:`ready` again without waiting for a job. The worker calls this
        while idle: from the thread that runs the jobs, since the child is killed when the
        thread that started it ends (``PR_SET_PDEATHSIG`` follows the thread).

        The end is logged once, as a warning; a restart that fails is tried again after a
        pause that doubles each time (:data:`RESTART_BASE_SECONDS` up to
        :data:`RESTART_MAX_SECONDS`), and by the next job whatever the pause.
        """
        if self._closed or time.monotonic() < self._restart_after:
            return
        if not self._lock.acquire(blocking=False):
            return  # a job or close() has the child and sees its end itself
        try:
            process = self._process
            if self._closed or (process is not None and process.is_alive()):
                return
            if process is not None:  # ended since it was last seen
                logger.warning(
                    "the analysis process %d ended while idle (%s); restarting it",
                    process.pid,
                    self._exit_code(),
                )
            self._kill()
            self._start_again()
        finally:
            self._lock.release()

    def _exit_code(self) -> str:
        process = self._process
        if process is None:
            return "no process"
        process.join(1.0)
        code = process.exitcode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def _kill(self, *, grace_seconds: float = 0.0) -> None:
        """Close the pipe and end the child: at once, or after ``grace_seconds`` in which an
        idle child ends by itself (it reads the end of the pipe)."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        self._built = False
        if conn is not None:
            conn.close()
        if process is not None:
            if grace_seconds > 0:
                process.join(grace_seconds)
            if process.is_alive():
                process.kill()
            process.join(10.0)
            with contextlib.suppress(ValueError):  # still running after SIGKILL (D state)
                process.close()

    def _end_at_exit(self) -> None:
        """The interpreter exits and :meth:`close` was not called (a failure on the way out):
        end the child without waiting for a job it may be running (no lock taken)."""
        self._closed = True
        process = self._process
        if process is not None and process.is_alive():
            logger.warning("ending the analysis process %d: the node exits", process.pid)
        self._kill(grace_seconds=EXIT_GRACE_SECONDS)

    def close(self) -> None:
        """End the child (the node calls this when it stops).

        An idle child is asked to end; one still running a job past the node's drain time is
        killed, and that job is retried at the next start.
        """
        self._closed = True
        atexit.unregister(self._end_at_exit)
        if self._lock.acquire(timeout=0.5):
            try:
                conn, process = self._conn, self._process
                if conn is not None and process is not None and process.is_alive():
                    with contextlib.suppress(OSError, ValueError):
                        conn.send(("stop",))
                    process.join(5.0)
                self._kill()
            finally:
                self._lock.release()
        else:
            self._kill()
