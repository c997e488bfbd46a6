"""The running node: wires the spool, job store, receiver, completion and worker together.

Threads: pynetdicom's (one per association) for receiving; one for the completion scan; one for
the worker. SIGTERM or SIGINT stops accepting associations, lets open ones and the job in hand
finish (or parks it for the next start) and returns exit status 0. SIGHUP is logged and
ignored: the configuration is read only at start.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from dicom_node import __version__
from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.dispatch.dispatcher import Dispatcher
from dicom_node.dispatch.routing import destinations_for
from dicom_node.errors import JobStoreError, NodeError
from dicom_node.health import HealthServer
from dicom_node.metrics import FREE_DISK, REGISTRY, StoreCollector, record_metrics
from dicom_node.notify import Notifier
from dicom_node.pipeline import InventoryPipeline, StudyPipeline
from dicom_node.preflight import check_model_folder
from dicom_node.receive.scp import Receiver
from dicom_node.store.jobs import JobStore
from dicom_node.store.outbox import Outbox
from dicom_node.store.recovery import reconcile
from dicom_node.store.retention import apply_retention, prune_history
from dicom_node.store.spool import Spool
from dicom_node.study.completion import Completion
from dicom_node.worker import Worker

logger = logging.getLogger(__name__)


def open_store(config: Config, *, read_only: bool = False) -> JobStore:
    """The existing job store of ``config``'s data folder, for the operator commands (which
    must not make an empty one where a mistyped folder points); ``read_only`` for those that
    only list (an operator in the service's group may read the store, not write it).

    Raises
    ------
    JobStoreError
        There is none.
    """
    path = config.storage.data_dir / "jobs.sqlite"
    if not path.is_file():
        raise JobStoreError(
            f"no job store at {path}: is storage.data_dir the node's? (--config, --data-dir)"
        )
    return JobStore(path, read_only=read_only)


def _on_hangup(_signum: int, _frame: FrameType | None) -> None:
    logger.warning(
        "received SIGHUP and ignored it: the configuration is read only at start;"
        " restart the service to apply changes"
    )


def ignore_hangups() -> None:
    """Log and ignore SIGHUP, whose default action would end the node with a status that
    ``Restart=on-failure`` does not restart. ``serve`` calls it before the model loads, and
    :meth:`Node.serve_forever` again."""
    signal.signal(signal.SIGHUP, _on_hangup)


class Node:
    """One node process.

    Parameters
    ----------
    config
        The configuration.
    pipeline
        What a job runs; the study inventory when not given.
    """

    def __init__(self, config: Config, *, pipeline: StudyPipeline | None = None) -> None:
        self.config = config
        data = config.storage.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_data_dir(data)
        self.store = JobStore(config.storage.data_dir / "jobs.sqlite")
        self.spool = Spool(
            data / "spool",
            min_free_bytes=config.storage.min_free_disk_mb * 2**20,
            fsync=config.storage.fsync,
        )
        audit_path = config.logging.audit_path
        self.audit = AuditLog(None if audit_path is None else data / audit_path)
        self.work_root = data / "work"
        self.outbox = Outbox(self.store, config.dispatch)
        self.dispatcher = Dispatcher(config, self.outbox, self.audit)
        if pipeline is None:
            pipeline = default_pipeline(config)
        self.worker = Worker(
            self.store,
            pipeline,
            config.jobs,
            data / "work",
            route=lambda study: destinations_for(config, {i.calling_ae for i in study.instances}),
            on_outputs=self.dispatcher.wake.set,
        )
        self.completion = Completion(
            self.store, config.study, on_job=lambda _job: self.worker.wake.set()
        )
        self.receiver = Receiver(
            config, spool=self.spool, store=self.store, completion=self.completion, audit=self.audit
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.notifier = Notifier()
        self.health: HealthServer | None = None
        self._collector = StoreCollector(self.store)

    def start(self) -> None:
        """Recover from any earlier crash, bind the ports, start the threads.

        The HTTP endpoint is bound before the DICOM port, so that a node that cannot serve it
        stops before it has acknowledged anything. A start that fails part-way leaves what it
        started for :meth:`stop`.
        """
        report = reconcile(self.spool, self.store)
        self.outbox.recover()
        logger.info(
            "starting dicom-node %s",
            __version__,
            extra={
                "fields": {"resumed_jobs": report.resumed_jobs, "reindexed": report.reindexed_files}
            },
        )
        http = self.config.service
        if http.http_port:
            self.health = HealthServer(
                http.http_host, http.http_port, live=self.live_checks, ready=self.ready_checks
            )
            self.health.start()
        self.completion.listening()
        self.receiver.start()
        REGISTRY.register(self._collector)
        poll = self.config.jobs.poll_seconds
        self._threads = [
            threading.Thread(target=self._completion_loop, name="completion", daemon=True),
            threading.Thread(
                target=self.worker.run_forever, args=(self._stop, poll), name="worker", daemon=True
            ),
            threading.Thread(
                target=self.dispatcher.run_forever, args=(self._stop,), name="dispatch", daemon=True
            ),
        ]
        for t in self._threads:
            t.start()
        self.notifier.ready(self._status_line())
        self.audit.application(
            "start",
            version=__version__,
            ae_title=self.config.node.ae_title,
            port=self.config.node.port,
        )

    def _status_line(self) -> str:
        counts = self.store.counts()
        return (
            f"listening on {self.config.node.port}; "
            f"{counts.get('queued', 0)} queued, {counts.get('running', 0)} running, "
            f"{counts.get('sending', 0)} sending, {counts.get('dead', 0)} dead"
        )

    def live_checks(self) -> dict[str, bool]:
        """Liveness: the receiver's accept loop and every worker thread are alive, and a job
        in hand has not outlived its time limit."""
        server = self.receiver.server_thread_alive()
        threads = {t.name: t.is_alive() for t in self._threads}
        return {"receiver": server, **threads, "worker_progress": self.worker.making_progress()}

    def ready_checks(self) -> dict[str, bool]:
        """Readiness: port bound, model loaded, disk above the floor, job store writable."""
        try:
            disk = self.spool.free_bytes() >= self.spool.min_free_bytes
        except OSError:
            disk = False
        return {
            "port_bound": self.receiver.server_thread_alive(),
            "model_loaded": bool(getattr(self.worker.pipeline, "ready", True)),
            "disk_above_floor": disk,
            "job_store_writable": self.store.writable(),
        }

    def _completion_loop(self) -> None:
        poll = min(self.config.jobs.poll_seconds, self.config.study.stable_seconds / 4)
        next_retention = next_history = 0.0
        while not self._stop.wait(poll):
            try:
                self.receiver.reap()  # associations that ended unannounced (Receiver.reap)
                self.completion.scan()
                FREE_DISK.set(self.spool.free_bytes())
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + 60.0
                    apply_retention(
                        self.store,
                        self.spool,
                        self.work_root,
                        keep_hours=self.config.storage.keep_hours,
                    )
                if time.monotonic() >= next_history:  # a longer read on a large store: hourly
                    next_history = time.monotonic() + 3600.0
                    prune_history(self.store, history_days=self.config.storage.history_days)
            except Exception:  # keep scanning: a transient SQLite error must not stop completion
                logger.exception("completion scan failed; retrying")

    def stop(self, *, drain_seconds: float = 30.0) -> None:
        """Stop accepting, let in-flight work finish for up to ``drain_seconds``, then return.

        A job still running after that is parked (queued again, its attempt given back) and
        resumed at the next start. Results still being sent then are aborted (A-ABORT) and
        sent at the next start, their attempt not counted.
        """
        logger.info("stopping: no new associations")
        self.notifier.stopping()
        deadline = time.monotonic() + drain_seconds  # one budget for associations and the job
        self.receiver.stop(drain_seconds=drain_seconds)
        self._stop.set()
        self.worker.wake.set()
        self.dispatcher.wake.set()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.dispatcher.join(max(0.0, deadline - time.monotonic()))
        self.dispatcher.abort()  # a send to a slow PACS must not hold the process past its stop
        self.worker.stopping.set()  # a job cut off from here on is parked, not failed
        close = getattr(self.worker.pipeline, "close", None)
        if close is not None:
            close()
        if any(t.is_alive() for t in self._threads):
            # an analysis that could not be ended (one in this process) has its job parked
            # here; the worker thread, a daemon, records nothing for it if it ends after all
            if self.worker.park() is None:  # (a job parked is logged by the worker)
                logger.warning("a job is still running; it resumes at the next start")
        elif not self.dispatcher.busy():  # (a send thread still recording keeps the store open)
            self.store.close()
        if self.health is not None:
            self.health.stop()
        with contextlib.suppress(KeyError):  # start() never ran
            REGISTRY.unregister(self._collector)
        self.audit.application("stop", version=__version__)
        os.close(self._lock_fd)
        logger.info("stopped")

    def serve_forever(self) -> int:
        """Start, run until SIGTERM/SIGINT, stop; returns the process exit status.

        Whatever ends the run, a start that fails included (a port taken), :meth:`stop` runs
        before the error goes on to the caller: nothing is left listening, and the analysis
        process ends.
        """
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        ignore_hangups()
        try:
            self.start()
            self._run_until(stop)
        except BaseException:
            try:
                self.stop(drain_seconds=self.config.service.drain_seconds)
            except Exception:  # the first error is the one to report
                logger.exception("stopping after a failure failed too")
            raise
        self.stop(drain_seconds=self.config.service.drain_seconds)
        if any(t.is_alive() for t in self._threads):
            # an analysis in this process still runs (its job parked): the interpreter's exit
            # would abort (SIGABRT) under PyTorch's threads; the job store and the audit log
            # hold nothing unwritten
            logging.shutdown()
            os._exit(0)
        return 0

    def _run_until(self, stop: threading.Event) -> None:
        """The main loop: watchdog pings and status lines while healthy, until ``stop``."""
        interval = self.notifier.watchdog_interval or 5.0
        tick = min(0.5, interval)
        last = 0.0
        while not stop.wait(tick):
            now = time.monotonic()
            if now - last < interval:
                continue
            last = now
            live = self.live_checks()
            if all(live.values()):
                self.notifier.watchdog()  # no ping while unhealthy: systemd restarts us
                self.notifier.status(self._status_line())
            else:
                failed = ", ".join(k for k, ok in live.items() if not ok)
                logger.error("unhealthy (%s); withholding the watchdog ping", failed)


def analysis_pipeline(config: Config) -> StudyPipeline:
    """The model's analysis, loading the model now (imports torch)."""
    from dicom_node.analysis.pipeline import AnalysisPipeline

    return AnalysisPipeline(config)


def default_pipeline(config: Config) -> StudyPipeline:
    """The model's analysis (loading the model now), or the inventory in receive-only mode."""
    if check_model_folder(config) is None:
        logger.warning("receive-only mode: no model configured; jobs only inventory studies")
        return InventoryPipeline()
    if not config.jobs.isolate:
        return analysis_pipeline(config)
    from dicom_node.isolation import IsolatedPipeline

    # The receiving process never imports torch: the model lives in the analysis process.
    return IsolatedPipeline(
        functools.partial(analysis_pipeline, config),
        timeout_seconds=config.jobs.job_timeout_seconds,
        logging_settings=config.logging,
        nice=config.jobs.analysis_nice,
        cpu_policy=config.jobs.analysis_cpu_policy,
        on_result=record_metrics,
    )


def _lock_data_dir(data: Path) -> int:
    fd = os.open(data / "node.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise NodeError(f"another node is running on the data folder {data}") from None
    return fd
