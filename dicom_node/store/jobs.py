"""The job store: instances, studies and jobs in SQLite (WAL), the node's one source of truth.

States
------
A study is ``receiving`` while instances arrive and ``complete`` once quiet (or forced). Each
completion makes a job for the next *version* of the study. A job moves::

    queued -> running -> done | skipped
                      -> queued (the node stopped, or no analysis could run: attempt refunded)
                      -> sending (results in the outbox) -> done | dead (a delivery died)
                      -> failed (retry at ``not_before``) -> running ... -> dead
    queued | failed -> superseded   (a newer instance re-opened the study before it ran, or
                                     a newer version exists when it is due to run again)
    running -> superseded           (its study was re-opened while it ran: nothing is sent)

``dicom-node retry`` moves a dead job back to ``queued``. Every change is recorded in
``job_events``. After a crash, :meth:`JobStore.recover` puts ``running`` jobs back in the queue.

Durability: WAL with ``synchronous=NORMAL`` survives any process crash (kill -9) without loss;
after a power cut the last transactions may be missing, and :func:`dicom_node.recovery` re-indexes
spooled files the database does not know, so an acknowledged instance is never lost.
"""

from __future__ import annotations

import enum
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dicom_node.errors import JobStoreError, OutOfResourcesError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2

#: What each older schema needs to become the current one, in order.
_MIGRATIONS = {
    # 2: the SHA-256 of each instance's data set as acknowledged (NULL for older rows)
    1: "ALTER TABLE instances ADD COLUMN digest TEXT",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    digest TEXT
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    first_received REAL NOT NULL,
    receiving_since REAL NOT NULL,
    last_received REAL NOT NULL,
    completed_at REAL,
    completion_reason TEXT
);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    result TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    UNIQUE (study_uid, version)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, not_before);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    at REAL NOT NULL,
    state TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    last_status INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (job_id, destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_by_state ON outbox (destination, state, not_before);
"""


_COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

#: The job ``j`` has been overtaken: its study has a newer version, or is receiving again.
_OVERTAKEN = (
    "(EXISTS (SELECT 1 FROM jobs n WHERE n.study_uid = j.study_uid AND n.version > j.version)"
    " OR EXISTS (SELECT 1 FROM studies s WHERE s.study_uid = j.study_uid"
    " AND s.state = 'receiving'))"
)


#: The job ``j``'s history may be forgotten at ``:cutoff``: its study is no longer spooled,
#: every job of the study ended before the cutoff, and none of its deliveries is under way.
_PRUNABLE = (
    "j.state IN ('done', 'skipped', 'dead', 'superseded')"
    " AND NOT EXISTS (SELECT 1 FROM studies s WHERE s.study_uid = j.study_uid)"
    " AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.study_uid = j.study_uid"
    " AND (k.state NOT IN ('done', 'skipped', 'dead', 'superseded')"
    " OR COALESCE(k.finished_at, k.updated_at) >= :cutoff))"
    " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id"
    " AND o.state NOT IN ('delivered', 'dead'))"
)


class StudyState(enum.StrEnum):
    """Where a study is in assembly."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(enum.StrEnum):
    """Where a job is; see the module docstring for the transitions."""

    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    DEAD = "dead"
    SUPERSEDED = "superseded"


#: States a job never leaves on its own.
FINAL_STATES = frozenset({JobState.DONE, JobState.SKIPPED, JobState.DEAD, JobState.SUPERSEDED})
#: Final states that need nothing more of anyone (a dead job waits for an operator).
SETTLED_STATES = frozenset({JobState.DONE, JobState.SKIPPED, JobState.SUPERSEDED})


class Recorded(enum.Enum):
    """What :meth:`JobStore.record_instance` did."""

    NEW = "new"
    REPLACED = "replaced"


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One spooled instance, as the receiver files it."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str
    path: Path
    #: Bytes of the data set as received (the file holds File Meta, then these bytes).
    size: int
    calling_ae: str
    received_at: float
    #: SHA-256 (hex) of the data set as acknowledged; what an identical re-send is known by
    #: (the file may hold newer content that a crash kept from being recorded).
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class OutputFile:
    """A file a job produced, to be sent to each destination."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class Job:
    """A job row."""

    id: int
    study_uid: str
    version: int
    state: JobState
    attempts: int
    not_before: float
    last_error: str | None
    result: dict[str, Any] | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class StudyRow:
    """A study row with its instance count."""

    study_uid: str
    state: StudyState
    first_received: float
    last_received: float
    completed_at: float | None
    completion_reason: str | None
    instances: int


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        study_uid=row["study_uid"],
        version=row["version"],
        state=JobState(row["state"]),
        attempts=row["attempts"],
        not_before=row["not_before"],
        last_error=row["last_error"],
        result=json.loads(row["result"]) if row["result"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


#: How long one try for SQLite's write lock waits (see :meth:`JobStore._tx`).
_BUSY_RETRY_SECONDS = 0.05


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock (SQLITE_BUSY or SQLITE_LOCKED, extended codes too)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


_T = TypeVar("_T")


def until_recorded(
    write: Callable[[], _T], *, what: str, stop: threading.Event | None = None
) -> _T:
    """``write()`` to the job store, tried again with a growing pause (1 s, doubling to 30 s)
    while the store cannot take it for now: another process holding its lock past the wait,
    a full disk being cleared (:class:`OutOfResourcesError`), an I/O error
    (``sqlite3.OperationalError``). What the store refuses for good (a job that is not in the
    state the write needs) is raised at once, and so is the transient error once ``stop`` is
    set (the write is left to the next start's recovery). ``what`` names the write in the log.
    """
    pause = 1.0
    while True:
        try:
            return write()
        except (OutOfResourcesError, sqlite3.OperationalError) as exc:
            if stop is not None and stop.is_set():
                raise
            logger.warning("the job store did not take %s (%s); trying again", what, exc)
        if stop is not None:
            if stop.wait(pause):
                raise JobStoreError(f"the node stopped before {what} was recorded")
        else:
            time.sleep(pause)
        pause = min(pause * 2, 30.0)


class JobStore:
    """Thread-safe access to the SQLite job store at ``path``.

    One connection serialised by a lock: SQLite serialises writers anyway, and every operation
    here is a short transaction (well under a millisecond). Another process that holds the
    file's write lock (a backup, a shell left in a transaction) is waited for up to
    ``busy_seconds``; then the operation fails with :class:`OutOfResourcesError`, which the
    receiver answers as "out of resources" (the sender retries later) well within a sender's
    DIMSE timeout, rather than holding every association for half a minute and failing.
    """

    def __init__(self, path: Path, *, busy_seconds: float = 5.0, read_only: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._busy_seconds = busy_seconds
        if read_only:
            self._open_read_only()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_seconds
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        # from here each try for the write lock waits briefly, this store's lock held (see _tx)
        self._db.execute(f"PRAGMA busy_timeout = {round(_BUSY_RETRY_SECONDS * 1000)}")
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                return
            found = int(row["value"])
            if found > SCHEMA_VERSION or any(
                v not in _MIGRATIONS for v in range(found, SCHEMA_VERSION)
            ):
                raise JobStoreError(
                    f"job store {path} has schema {row['value']},"
                    f" this version needs {SCHEMA_VERSION}"
                )
            for version in range(found, SCHEMA_VERSION):
                db.execute(_MIGRATIONS[version])
            if found != SCHEMA_VERSION:
                db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
                logger.info("job store schema %d upgraded to %d", found, SCHEMA_VERSION)

    def _open_read_only(self) -> None:
        """Open for reads only (``read_only``): what an operator's listing needs, with read
        access to the store's files and none to write them or their folder (the service's
        group). With the node stopped, SQLite cannot make the WAL index such a reader needs;
        then, no write-ahead log being there, the file is read as it stands. A store whose
        schema is not this version's is refused: only the node upgrades it."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            try:
                row = self._connect(uri)
            except sqlite3.OperationalError:
                if wal.exists():
                    raise
                row = self._connect(uri + "&immutable=1")
        except sqlite3.Error as exc:
            raise JobStoreError(f"job store {self.path} cannot be read: {exc}") from exc
        if row is None or int(row["value"]) != SCHEMA_VERSION:
            self._db.close()
            raise JobStoreError(
                f"job store {self.path} has schema {row['value'] if row else '(none)'}, this"
                f" version reads {SCHEMA_VERSION}: start the node (it upgrades the store) or use"
                " the version that wrote it"
            )

    def _connect(self, uri: str) -> sqlite3.Row | None:
        """Connect read-only to ``uri``; the schema row."""
        self._db = sqlite3.connect(
            uri,
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=self._busy_seconds,
        )
        self._db.row_factory = sqlite3.Row
        try:
            row: sqlite3.Row | None = self._db.execute(
                "SELECT value FROM meta WHERE key='schema'"
            ).fetchone()
        except sqlite3.Error:
            self._db.close()
            raise
        return row

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), for the outbox's operations."""
        with self._tx() as db:
            yield db

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for reads only (no write transaction: nothing waits on the file)."""
        with self._lock:
            yield self._db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a full disk, or another process holding the write lock past
        ``busy_seconds``, raises :class:`OutOfResourcesError`. The write lock is asked for in
        short tries, with this store's lock let go between them, so that every thread waiting
        on another process waits at most ``busy_seconds``, not that times the threads before it.
        """
        deadline = time.monotonic() + self._busy_seconds
        try:
            while True:
                with self._lock:
                    try:
                        self._db.execute("BEGIN IMMEDIATE")
                    except sqlite3.OperationalError as exc:
                        if not _is_busy(exc) or time.monotonic() >= deadline:
                            raise
                    else:
                        try:
                            yield self._db
                            self._db.execute("COMMIT")
                        except BaseException:
                            if self._db.in_transaction:  # a failed COMMIT may have ended it
                                self._db.execute("ROLLBACK")
                            raise
                        return
                time.sleep(_BUSY_RETRY_SECONDS)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise OutOfResourcesError(f"job store: {exc}") from exc
            if _is_busy(exc):
                raise OutOfResourcesError(f"job store busy: {exc}") from exc
            raise

    def writable(self) -> bool:
        """True when a write transaction can be opened (for readiness checks)."""
        try:
            with self._tx() as db:
                db.execute("UPDATE meta SET value=value WHERE key='schema'")
        except (sqlite3.Error, OutOfResourcesError):
            return False
        return True

    # -- instances and studies ------------------------------------------------------------------

    def instance_location(self, sop_instance_uid: str) -> tuple[Path, int, str | None] | None:
        """Path, data-set size and digest recorded for an instance, or ``None`` when it is
        unknown."""
        with self._lock:
            row = self._db.execute(
                "SELECT path, size, digest FROM instances WHERE sop_instance_uid=?",
                (sop_instance_uid,),
            ).fetchone()
        return None if row is None else (Path(row["path"]), int(row["size"]), row["digest"])

    def record_instance(self, rec: InstanceRecord) -> Recorded:
        """File a spooled instance and (re)open its study for completion.

        A study that was complete goes back to ``receiving``; a job of it that has not started
        yet (queued, or failed and waiting to retry) is superseded by the next version.
        """
        with self._tx() as db:
            old = db.execute(
                "SELECT study_uid, path FROM instances WHERE sop_instance_uid=?",
                (rec.sop_instance_uid,),
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, study_uid, series_uid,"
                " sop_class_uid, modality, path, size, calling_ae, received_at, digest)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.sop_instance_uid,
                    rec.study_uid,
                    rec.series_uid,
                    rec.sop_class_uid,
                    rec.modality,
                    str(rec.path),
                    rec.size,
                    rec.calling_ae,
                    rec.received_at,
                    rec.digest,
                ),
            )
            self._touch_study(db, rec.study_uid, rec.received_at)
        return Recorded.NEW if old is None else Recorded.REPLACED

    def _touch_study(self, db: sqlite3.Connection, study_uid: str, now: float) -> None:
        row = db.execute("SELECT state FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO studies (study_uid, state, first_received, receiving_since,"
                " last_received) VALUES (?, 'receiving', ?, ?, ?)",
                (study_uid, now, now, now),
            )
            return
        if row["state"] == StudyState.RECEIVING:
            db.execute("UPDATE studies SET last_received=? WHERE study_uid=?", (now, study_uid))
            return
        db.execute(
            "UPDATE studies SET state='receiving', receiving_since=?, last_received=?,"
            " completed_at=NULL, completion_reason=NULL WHERE study_uid=?",
            (now, now, study_uid),
        )
        for job in db.execute(
            "SELECT id FROM jobs WHERE study_uid=? AND state IN ('queued', 'failed')", (study_uid,)
        ).fetchall():
            self.set_state(db, job["id"], JobState.SUPERSEDED, "new instances re-opened the study")

    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        """Every instance of a study, ordered by series and arrival."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE study_uid=? ORDER BY series_uid, received_at",
                (study_uid,),
            ).fetchall()
        return [
            InstanceRecord(
                sop_instance_uid=r["sop_instance_uid"],
                study_uid=r["study_uid"],
                series_uid=r["series_uid"],
                sop_class_uid=r["sop_class_uid"],
                modality=r["modality"],
                path=Path(r["path"]),
                size=r["size"],
                calling_ae=r["calling_ae"],
                received_at=r["received_at"],
                digest=r["digest"],
            )
            for r in rows
        ]

    def removable_paths(self, study_uid: str, newest_job_id: int) -> list[Path] | None:
        """The spooled paths of a study that may be deleted now, or ``None`` when it may not.

        It may when its study row exists, it is not receiving, its newest job is still
        ``newest_job_id`` and in a final state, and no result of any of its versions is still
        on its way to a destination (an older version's, to a PACS that was down): what the
        caller judged, re-checked in one transaction, since a re-send may have re-opened (or
        re-completed) the study since. The
        caller deletes the files (while the receiver cannot file into the study: see
        :meth:`~dicom_node.store.spool.Spool.removing`), then the rows with :meth:`forget_study`,
        so that a crash in between leaves rows without files (dropped at the next start), never
        files without rows (which would be indexed again as a new version of the study).
        """
        with self._tx() as db:
            row = db.execute("SELECT state FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or row["state"] == StudyState.RECEIVING:
                return None
            newest = db.execute(
                "SELECT id, state FROM jobs WHERE study_uid=? ORDER BY version DESC LIMIT 1",
                (study_uid,),
            ).fetchone()
            if newest is None or newest["id"] != newest_job_id:
                return None
            if JobState(newest["state"]) not in FINAL_STATES:
                return None
            if db.execute(  # an older version's results still on their way need their files
                "SELECT 1 FROM outbox o JOIN jobs j ON j.id = o.job_id WHERE j.study_uid=?"
                " AND o.state IN ('pending', 'sending') LIMIT 1",
                (study_uid,),
            ).fetchone():
                return None
            return [
                Path(r[0])
                for r in db.execute("SELECT path FROM instances WHERE study_uid=?", (study_uid,))
            ]

    def forget_study(self, study_uid: str) -> None:
        """Drop a study's instance and study rows (jobs stay, as history), after
        :meth:`removable_paths`, and its dead deliveries, whose files went with the study (they
        can never be sent, and would count as dead letters for good). A study receiving again
        is left alone."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or row["state"] == StudyState.RECEIVING:
                return
            db.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,))
            db.execute("DELETE FROM studies WHERE study_uid=?", (study_uid,))
            db.execute(
                "DELETE FROM outbox WHERE state='dead'"
                " AND job_id IN (SELECT id FROM jobs WHERE study_uid=?)",
                (study_uid,),
            )

    def known_paths(self) -> set[str]:
        """Paths of every recorded instance (for reconciling the spool after a crash)."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT path FROM instances")}

    def forget_instance(self, sop_instance_uid: str, path: Path) -> None:
        """Drop an instance's row whose file at ``path`` is gone (a row that names another
        path, where the instance was filed since, stays)."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM instances WHERE sop_instance_uid=? AND path=?",
                (sop_instance_uid, str(path)),
            )

    def studies(self) -> list[StudyRow]:
        """Every study with its instance count, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid) AS n"
                " FROM studies s ORDER BY last_received DESC"
            ).fetchall()
        return [
            StudyRow(
                study_uid=r["study_uid"],
                state=StudyState(r["state"]),
                first_received=r["first_received"],
                last_received=r["last_received"],
                completed_at=r["completed_at"],
                completion_reason=r["completion_reason"],
                instances=r["n"],
            )
            for r in rows
        ]

    def receiving_studies(self) -> list[tuple[str, float, float]]:
        """``(study_uid, receiving_since, last_received)`` of every study still receiving."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_uid, receiving_since, last_received FROM studies"
                " WHERE state='receiving'"
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def complete_study(
        self,
        study_uid: str,
        *,
        reason: str,
        now: float | None = None,
        quiet_since: float | None = None,
    ) -> Job | None:
        """Mark a receiving study complete and queue a job for its next version.

        ``quiet_since``: complete only if nothing arrived after this time (guards the quiet-period
        scan against an instance that landed between its read and this write). Returns the new
        job, or ``None`` when the study was not receiving (or not quiet) any more.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT state, last_received FROM studies WHERE study_uid=?", (study_uid,)
            ).fetchone()
            if row is None or row["state"] != StudyState.RECEIVING:
                return None
            if quiet_since is not None and row["last_received"] > quiet_since:
                return None
            db.execute(
                "UPDATE studies SET state='complete', completed_at=?, completion_reason=?"
                " WHERE study_uid=?",
                (now, reason, study_uid),
            )
            version = db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM jobs WHERE study_uid=?", (study_uid,)
            ).fetchone()[0]
            cur = db.execute(
                "INSERT INTO jobs (study_uid, version, state, created_at, updated_at)"
                " VALUES (?, ?, 'queued', ?, ?)",
                (study_uid, version, now, now),
            )
            job_id = cur.lastrowid
            assert job_id is not None
            db.execute(
                "INSERT INTO job_events (job_id, at, state, detail) VALUES (?, ?, 'queued', ?)",
                (job_id, now, f"study complete ({reason})"),
            )
            return _job(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    # -- jobs -----------------------------------------------------------------------------------

    def set_state(
        self,
        db: sqlite3.Connection,
        job_id: int,
        state: JobState,
        detail: str | None,
        **fields: Any,
    ) -> None:
        now = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        db.execute(
            f"UPDATE jobs SET state=?, updated_at=?{', ' + sets if sets else ''} WHERE id=?",  # noqa: S608 - keys are ours
            (state.value, now, *fields.values(), job_id),
        )
        db.execute(
            "INSERT INTO job_events (job_id, at, state, detail) VALUES (?, ?, ?, ?)",
            (job_id, now, state.value, detail),
        )

    def claim_next_job(
        self, now: float | None = None, *, max_attempts: int | None = None
    ) -> Job | None:
        """Take the oldest runnable job (queued, or failed and due) and mark it running.

        A job that was running when a late instance re-opened its study, and then failed or was
        interrupted by a stop, is runnable again while its study receives or after a newer
        version was queued: it is superseded instead, so that a study is never analysed in an
        outdated version beside (or before) the new one.

        With ``max_attempts``, a queued job that has used them all is dead-lettered instead of
        run: every attempt was cut off by the node's end (a crash, a kill, the watchdog), which
        the job itself may cause; it would otherwise take the node down at every start.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            if max_attempts is not None:
                for spent in db.execute(
                    "SELECT id, attempts FROM jobs WHERE state='queued' AND attempts >= ?",
                    (max_attempts,),
                ).fetchall():
                    why = (
                        f"each of its {spent['attempts']} attempts was cut off by the node's end"
                        " (a crash or a kill while it ran)"
                    )
                    self.set_state(
                        db, spent["id"], JobState.DEAD, why, last_error=why, finished_at=now
                    )
            for stale in db.execute(
                f"SELECT j.id FROM jobs j WHERE j.state IN ('queued', 'failed') AND {_OVERTAKEN}"  # noqa: S608 - a constant
            ).fetchall():
                self.set_state(
                    db, stale["id"], JobState.SUPERSEDED, "its study was re-opened while it ran"
                )
            row = db.execute(
                "SELECT id FROM jobs WHERE state IN ('queued', 'failed') AND not_before <= ?"
                " ORDER BY not_before, id LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id=?", (row["id"],))
            self.set_state(db, row["id"], JobState.RUNNING, None, started_at=now)
            return _job(db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone())

    def finish_job(
        self,
        job_id: int,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        not_before: float = 0.0,
    ) -> Job:
        """Record a job's outcome: done/skipped (with result), failed (with retry time) or dead."""
        if state not in (JobState.DONE, JobState.SKIPPED, JobState.FAILED, JobState.DEAD):
            raise JobStoreError(f"a job cannot finish as {state}")
        with self._tx() as db:
            return self._finish(
                db, job_id, state, result=result, error=error, not_before=not_before
            )

    def finish_with_outputs(
        self,
        job_id: int,
        *,
        result: dict[str, Any],
        outputs: Sequence[OutputFile],
        destinations: Sequence[str],
    ) -> Job:
        """A job produced files: queue each for each destination (state ``sending``) in the same
        transaction; with nothing to send (or nowhere to send it) the job is ``done`` at once.

        A job whose study was re-opened while it ran (it receives again, or a newer version is
        queued) is ``superseded`` instead and sends nothing: the newer version's results go in
        its place, so that a re-sent study supersedes its results and never doubles them.
        """
        now = time.time()
        with self._tx() as db:
            overtaken = db.execute(
                f"SELECT 1 FROM jobs j WHERE j.id=? AND {_OVERTAKEN}",  # noqa: S608 - a constant
                (job_id,),
            ).fetchone()
            if overtaken is not None:
                return self._finish(
                    db,
                    job_id,
                    JobState.SUPERSEDED,
                    result=result,
                    error="its study was re-opened while it ran; the newer version's results"
                    " go instead",
                )
            if not outputs or not destinations:
                return self._finish(db, job_id, JobState.DONE, result=result)
            for dest in destinations:
                for out in outputs:
                    db.execute(
                        "INSERT OR IGNORE INTO outbox (job_id, destination, path, sop_class_uid,"
                        " sop_instance_uid, state, created_at, updated_at)"
                        " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                        (
                            job_id,
                            dest,
                            str(out.path),
                            out.sop_class_uid,
                            out.sop_instance_uid,
                            now,
                            now,
                        ),
                    )
            return self._finish(db, job_id, JobState.SENDING, result=result)

    def _finish(
        self,
        db: sqlite3.Connection,
        job_id: int,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        not_before: float = 0.0,
    ) -> Job:
        row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobStoreError(f"no job {job_id}")
        if row["state"] != JobState.RUNNING:
            raise JobStoreError(f"job {job_id} is {row['state']}, not running")
        fields: dict[str, Any] = {"last_error": error, "not_before": not_before}
        if result is not None:
            fields["result"] = json.dumps(result, sort_keys=True)
        if state in FINAL_STATES:
            fields["finished_at"] = time.time()
        self.set_state(db, job_id, state, error, **fields)
        return _job(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def requeue(self, job_id: int, *, not_before: float, detail: str) -> Job:
        """Put a running job back in the queue without spending the attempt it was on: the
        node stopped under it, or no analysis could run (not the study's fault)."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobStoreError(f"no job {job_id}")
            if row["state"] != JobState.RUNNING:
                raise JobStoreError(f"job {job_id} is {row['state']}, not running")
            db.execute("UPDATE jobs SET attempts = MAX(attempts - 1, 0) WHERE id=?", (job_id,))
            self.set_state(db, job_id, JobState.QUEUED, detail, not_before=not_before)
            return _job(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def retry_job(self, job_id: int) -> Job:
        """Put a dead or failed job back to work now: its dead deliveries are sent again, or (when
        the analysis itself died) it is queued with a fresh attempt count."""
        with self._tx() as db:
            row = db.execute("SELECT state, study_uid FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobStoreError(f"no job {job_id}")
            if row["state"] not in (JobState.DEAD, JobState.FAILED):
                raise JobStoreError(
                    f"job {job_id} is {row['state']}; only dead or failed jobs are retried"
                )
            study = db.execute(
                "SELECT state FROM studies WHERE study_uid=?", (row["study_uid"],)
            ).fetchone()
            if study is None:
                raise JobStoreError(
                    f"job {job_id}: its study's files were removed (dicom-node purge); send the"
                    " study again to have it analysed"
                )
            newer = db.execute(  # (a newer version skipped, or superseded, has no results)
                "SELECT MAX(version) FROM jobs WHERE study_uid=? AND version>"
                "(SELECT version FROM jobs WHERE id=?) AND state NOT IN ('skipped', 'superseded')",
                (row["study_uid"], job_id),
            ).fetchone()[0]
            if newer is not None or study["state"] == StudyState.RECEIVING:
                raise JobStoreError(
                    f"job {job_id}: its study "
                    + (f"has a newer version ({newer})" if newer is not None else "is receiving")
                    + ", whose results revise this one's: only the newest version is retried"
                )
            now = time.time()
            dead_sends = db.execute(  # their age limit counts from the retry, as their attempts
                "UPDATE outbox SET state='pending', attempts=0, not_before=0, created_at=?,"
                " updated_at=? WHERE job_id=? AND state='dead'",
                (now, now, job_id),
            ).rowcount
            if dead_sends:  # the analysis succeeded; only delivery died: send again
                self.set_state(db, job_id, JobState.SENDING, f"re-sending {dead_sends} result(s)")
            else:
                db.execute("UPDATE jobs SET attempts=0 WHERE id=?", (job_id,))
                self.set_state(db, job_id, JobState.QUEUED, "retry requested", not_before=0.0)
            return _job(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def recover(self) -> list[Job]:
        """After a crash: jobs left ``running`` go back to the queue (their attempt counts)."""
        with self._tx() as db:
            rows = db.execute("SELECT id FROM jobs WHERE state='running'").fetchall()
            for r in rows:
                self.set_state(db, r["id"], JobState.QUEUED, "interrupted; resumed after restart")
            return [
                _job(db.execute("SELECT * FROM jobs WHERE id=?", (r["id"],)).fetchone())
                for r in rows
            ]

    def earlier_result(self, study_uid: str, version: int) -> dict[str, Any] | None:
        """The result of the newest version of a study before ``version`` whose report went
        out or is going out: ``done`` or ``sending``, or ``dead`` with its SR delivered (to
        one destination, another having refused it); ``None`` when there is none. The row
        outlives the study's files (retention keeps jobs as history)."""
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM jobs j WHERE study_uid=? AND version<? AND (state IN"
                " ('done', 'sending') OR (state='dead' AND EXISTS (SELECT 1 FROM outbox o"
                " WHERE o.job_id=j.id AND o.state='delivered' AND o.sop_class_uid=?)))"
                " ORDER BY version DESC LIMIT 1",
                (study_uid, version, _COMPREHENSIVE_3D_SR),
            ).fetchone()
        if row is None or not row["result"]:
            return None
        result = json.loads(row["result"])
        return result if isinstance(result, dict) else None

    def job(self, job_id: int) -> Job:
        """One job. Raises :class:`JobStoreError` when there is none."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobStoreError(f"no job {job_id}")
        return _job(row)

    def jobs(
        self, states: Sequence[JobState] | None = None, *, limit: int | None = None
    ) -> list[Job]:
        """Jobs, newest first, optionally only in the given states and only the ``limit``
        newest."""
        sql = "SELECT * FROM jobs"
        args: tuple[str | int, ...] = ()
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = tuple(s.value for s in states)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args = (*args, limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_job(r) for r in rows]

    def jobs_of_spooled_studies(self) -> list[Job]:
        """The jobs of the studies that still have a study row (their files are spooled),
        newest first, without their results: what retention judges. The history of studies
        removed before is not read again on every pass."""
        with self._lock:
            rows = self._db.execute(
                "SELECT j.id, j.study_uid, j.version, j.state, j.attempts, j.not_before,"
                " j.last_error, NULL AS result, j.created_at, j.updated_at, j.started_at,"
                " j.finished_at FROM jobs j JOIN studies s ON s.study_uid = j.study_uid"
                " ORDER BY j.id DESC"
            ).fetchall()
        return [_job(r) for r in rows]

    def prune_history(self, cutoff: float, *, batch: int = 500) -> tuple[int, int]:
        """Forget the history of studies no longer spooled whose jobs all ended before
        ``cutoff``: their state changes and deliveries, and every job but the two a later
        version of the study needs (the newest, whose version the next one follows, so that no
        result UID is made twice, and the newest whose results went out, whose reports the next
        one revises). A job with a delivery still under way (a dead job's other destinations)
        keeps its history. Returns ``(jobs, rows)``: the job rows and the event and delivery
        rows deleted.

        The jobs are found in one read and deleted ``batch`` at a time, each batch in a short
        write transaction that checks them again (a study sent again meanwhile keeps its
        history), so the receiver never waits long for the job store.
        """
        args: dict[str, float | int] = {"cutoff": cutoff}
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT j.id FROM jobs j WHERE {_PRUNABLE} AND ("  # noqa: S608 - constant SQL
                    "EXISTS (SELECT 1 FROM job_events e WHERE e.job_id = j.id)"
                    " OR EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)"
                    " OR j.id <> (SELECT MAX(m.id) FROM jobs m WHERE m.study_uid = j.study_uid))",
                    args,
                )
            ]
        jobs = rows = 0
        for first in range(0, len(ids), batch):
            chunk = {f"j{n}": job_id for n, job_id in enumerate(ids[first : first + batch])}
            marks = ",".join(f":{name}" for name in chunk)
            with self._tx() as db:
                still = [
                    r[0]
                    for r in db.execute(
                        f"SELECT j.id FROM jobs j WHERE j.id IN ({marks}) AND {_PRUNABLE}",  # noqa: S608 - constant SQL and marks
                        {**args, **chunk},
                    )
                ]
                if not still:
                    continue
                marks = ",".join("?" * len(still))
                rows += db.execute(
                    f"DELETE FROM job_events WHERE job_id IN ({marks})",  # noqa: S608 - marks
                    still,
                ).rowcount
                rows += db.execute(
                    f"DELETE FROM outbox WHERE job_id IN ({marks})",  # noqa: S608 - marks
                    still,
                ).rowcount
                jobs += db.execute(
                    f"DELETE FROM jobs WHERE id IN ({marks})"  # noqa: S608 - marks
                    " AND id <> (SELECT MAX(m.id) FROM jobs m WHERE m.study_uid = jobs.study_uid)"
                    " AND NOT (state IN ('done', 'sending') AND version = (SELECT MAX(m.version)"
                    " FROM jobs m WHERE m.study_uid = jobs.study_uid"
                    " AND m.state IN ('done', 'sending')))",
                    still,
                ).rowcount
        return jobs, rows

    def job_events(self, job_id: int) -> list[tuple[float, str, str | None]]:
        """``(at, state, detail)`` of every change of a job, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at, state, detail FROM job_events WHERE job_id=? ORDER BY id", (job_id,)
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        """Outbox rows by (destination, state)."""
        with self._lock:
            return {
                (r[0], r[1]): r[2]
                for r in self._db.execute(
                    "SELECT destination, state, COUNT(*) FROM outbox GROUP BY destination, state"
                )
            }

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""
        with self._lock:
            return {
                r[0]: r[1]
                for r in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            }
