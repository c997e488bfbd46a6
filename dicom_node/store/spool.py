"""The spool: received instances as files, written so that an acknowledged one survives a crash.

Layout under ``<data_dir>/spool``::

    incoming/                    temporary files being written (same file system, for rename)
    <study uid>/<series uid>/<sop instance uid>.dcm
    .lock                        held shared while an instance is filed, exclusive while a
                                 study is deleted (retention, purge: also from another process)

Each file holds exactly the bytes the peer sent, behind a File Meta header
(``event.encoded_dataset()``). A file is written to ``incoming/``, flushed and fsynced, renamed
into place and its directory fsynced before the receiver acknowledges it; a new study or series
folder is fsynced into its parent before any file in it is acknowledged. Only UIDs that pass
:func:`dicom_node.uids.is_valid_uid` become path parts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from dicom_node.errors import InvalidUIDError, OutOfResourcesError
from dicom_node.uids import is_valid_uid

logger = logging.getLogger(__name__)

_INCOMING = "incoming"
_ASIDE = ".prev"
_LOCK = ".lock"


class Spool:
    """Durable file storage of received instances.

    Parameters
    ----------
    root
        The spool folder; created if missing.
    min_free_bytes
        Writes that would leave less free space than this raise :class:`OutOfResourcesError`.
    fsync
        Flush files and directories to disk before :meth:`store` returns.
    """

    def __init__(self, root: Path, *, min_free_bytes: int, fsync: bool = True) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self._incoming = root / _INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def kept_aside(self) -> list[Path]:
        """Files :meth:`keep_aside` kept that a crash left in ``incoming/`` (the acknowledged
        content of an instance whose replacement may not have been recorded)."""
        return sorted(self._incoming.glob(f"*{_ASIDE}"))

    @staticmethod
    def aside_sop_instance_uid(aside: Path) -> str:
        """The SOP Instance UID whose file ``aside`` is (as named by :meth:`keep_aside`)."""
        return aside.name.split(".dcm.", 1)[0]

    def clean_incoming(self) -> None:
        """Remove files left half-written by a crash: they were never acknowledged.

        For the node's start only (:func:`~dicom_node.store.recovery.reconcile`): another
        process that opens the spool while the node runs (``dicom-node purge``) must not touch
        the files its receiver is writing.
        """
        removed = 0
        for leftover in self._incoming.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:  # the names hold SOP Instance UIDs: counted, not named
            logger.info("removed %d unacknowledged partial file(s) left by a crash", removed)

    @contextmanager
    def _flock(self, operation: int) -> Iterator[None]:
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # releases the lock

    def filing(self) -> AbstractContextManager[None]:
        """Held (shared) by the receiver from looking an instance up to recording it, so that
        no study is deleted under it; any number of filings run at once."""
        return self._flock(fcntl.LOCK_SH)

    def removing(self) -> AbstractContextManager[None]:
        """Held (exclusive) while a study's files and rows are deleted: no instance is filed
        meanwhile, in this process or another (``dicom-node purge``). A re-send waits and is
        then filed as a new study, instead of being acknowledged and deleted."""
        return self._flock(fcntl.LOCK_EX)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives. Raises :class:`InvalidUIDError` for a UID that is not valid."""
        for name, uid in (
            ("Study", study_uid),
            ("Series", series_uid),
            ("SOP Instance", sop_instance_uid),
        ):
            if not is_valid_uid(uid):
                raise InvalidUIDError(f"{name} Instance UID is not a valid UID")
        return self.root / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def free_bytes(self) -> int:
        """Free space on the spool's file system, in bytes."""
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming_bytes: int = 0) -> None:
        """Raise :class:`OutOfResourcesError` when storing would go below the free-space floor."""
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfResourcesError(
                f"free disk {free // 2**20} MiB is below the floor"
                f" of {self.min_free_bytes // 2**20} MiB"
            )

    def store(self, data: bytes, dest: Path, *, head: bytes = b"") -> None:
        """Write ``head`` then ``data`` durably at ``dest`` (from :meth:`path_for`), replacing
        any older file. Two parts so that a header goes in front without copying the data.

        Raises
        ------
        OutOfResourcesError
            Below the free-space floor, or the disk filled while writing; nothing is left behind.
        """
        self.check_space(len(head) + len(data))
        tmp = self._incoming / f"{dest.name}.{threading.get_ident()}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                for part in (head, data):
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            parent = dest.parent
            self._ensure_dir(parent)
            try:
                tmp.replace(dest)
            except FileNotFoundError:
                # the folder went since it was made: ``dicom-node purge``, another process,
                # removed the study while the node ran; make it again
                self._forget_dirs(parent)
                self._ensure_dir(parent)
                tmp.replace(dest)
            if self.fsync:
                _fsync_dir(parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfResourcesError(f"disk full while writing: {exc.strerror}") from exc
            raise

    def _ensure_dir(self, path: Path) -> None:
        """Make a series folder (and its study folder) durable before any file goes in it.

        Under the lock: a second writer into a folder another one is creating waits until the
        folders are fsynced into their parents, instead of acknowledging a file whose folder a
        power cut could still lose.
        """
        with self._dirs_lock:
            if path in self._known_dirs:
                return
            path.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                _fsync_dir(path.parent)  # names the series folder
                _fsync_dir(path.parent.parent)  # names the study folder
            self._known_dirs.add(path)

    def _forget_dirs(self, series: Path) -> None:
        with self._dirs_lock:
            self._known_dirs.discard(series)
            self._known_dirs.discard(series.parent)

    def keep_aside(self, path: Path) -> Path | None:
        """A second name, in ``incoming/``, for the file at ``path`` before it is replaced
        (``None`` when there is none); :meth:`put_back` restores it, else unlink the name.
        A crash leaves the name in ``incoming/``, which the next start clears."""
        aside = self._incoming / f"{path.name}.{threading.get_ident()}{_ASIDE}"
        aside.unlink(missing_ok=True)
        try:
            os.link(path, aside)
        except FileNotFoundError:
            return None
        return aside

    def put_back(self, aside: Path, path: Path) -> None:
        """Restore the file :meth:`keep_aside` kept, at ``path``."""
        aside.replace(path)
        if self.fsync:
            _fsync_dir(path.parent)

    def remove(self, path: Path) -> None:
        """Delete one spooled file (and its series/study folders once empty)."""
        path.unlink(missing_ok=True)
        for folder in (path.parent, path.parent.parent):
            if folder == self.root:
                break
            try:
                folder.rmdir()
            except OSError:
                break
            with self._dirs_lock:
                self._known_dirs.discard(folder)

    def iter_files(self) -> Iterator[Path]:
        """Every spooled instance file (for recovery after a crash)."""
        for study in self.root.iterdir():
            if study.name == _INCOMING or not study.is_dir():
                continue
            yield from study.glob("*/*.dcm")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
