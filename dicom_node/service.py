"""The running node: wires the spool, job store, receiver, completion and worker together.

Threads: pynetdicom's (one per association) for receiving; one for the completion scan; one for
the worker. SIGTERM or SIGINT stops accepting associations, lets open ones and the job in hand
finish (or parks it for the next start) and returns exit status 0.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from dicom_node import __version__
from dicom_node.config import Config
from dicom_node.dispatch.dispatcher import Dispatcher
from dicom_node.dispatch.routing import destinations_for
from dicom_node.errors import NodeError
from dicom_node.metrics import FREE_DISK
from dicom_node.pipeline import InventoryPipeline, StudyPipeline
from dicom_node.receive.scp import Receiver
from dicom_node.store.jobs import JobStore
from dicom_node.store.outbox import Outbox
from dicom_node.store.recovery import reconcile
from dicom_node.store.spool import Spool
from dicom_node.study.completion import Completion
from dicom_node.worker import Worker

logger = logging.getLogger(__name__)


def open_store(config: Config) -> JobStore:
    """The job store of ``config``'s data folder (for the operator commands too)."""
    return JobStore(config.storage.data_dir / "jobs.sqlite")


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
        self.store = open_store(config)
        self.spool = Spool(
            data / "spool",
            min_free_bytes=config.storage.min_free_disk_mb * 2**20,
            fsync=config.storage.fsync,
        )
        self.outbox = Outbox(self.store, config.dispatch)
        self.dispatcher = Dispatcher(config, self.outbox)
        self.worker = Worker(
            self.store,
            pipeline or InventoryPipeline(),
            config.jobs,
            data / "work",
            route=lambda study: destinations_for(config, {i.calling_ae for i in study.instances}),
            on_outputs=self.dispatcher.wake.set,
        )
        self.completion = Completion(
            self.store, config.study, on_job=lambda _job: self.worker.wake.set()
        )
        self.receiver = Receiver(
            config, spool=self.spool, store=self.store, completion=self.completion
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Recover from any earlier crash, bind the port, start the threads."""
        report = reconcile(self.spool, self.store)
        self.outbox.recover()
        logger.info(
            "starting dicom-node %s",
            __version__,
            extra={
                "fields": {"resumed_jobs": report.resumed_jobs, "reindexed": report.reindexed_files}
            },
        )
        self.receiver.start()
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

    def _completion_loop(self) -> None:
        poll = min(self.config.jobs.poll_seconds, self.config.study.stable_seconds / 4)
        while not self._stop.wait(poll):
            try:
                self.completion.scan()
                FREE_DISK.set(self.spool.free_bytes())
            except Exception:  # keep scanning: a transient SQLite error must not stop completion
                logger.exception("completion scan failed; retrying")

    def stop(self, *, drain_seconds: float = 30.0) -> None:
        """Stop accepting, let in-flight work finish for up to ``drain_seconds``, then return.

        A job still running after that stays ``running`` in the store and is resumed at the next
        start.
        """
        logger.info("stopping: no new associations")
        self.receiver.stop(drain_seconds=min(drain_seconds, 10.0))
        self._stop.set()
        self.worker.wake.set()
        deadline = time.monotonic() + drain_seconds
        self.dispatcher.wake.set()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.dispatcher.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            logger.warning("a job is still running; it is parked and resumes at the next start")
        else:
            self.store.close()
        os.close(self._lock_fd)
        logger.info("stopped")

    def serve_forever(self) -> int:
        """Start, run until SIGTERM/SIGINT, stop; returns the process exit status."""
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not stop.wait(0.5):
            pass
        self.stop()
        return 0


def _lock_data_dir(data: Path) -> int:
    fd = os.open(data / "node.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise NodeError(f"another node is running on the data folder {data}") from None
    return fd
