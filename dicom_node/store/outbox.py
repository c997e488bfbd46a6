"""The outbox: every result file for every destination, until delivered or dead-lettered.

Rows live in the job store (table ``outbox``) so that a delivery survives any restart. A row is
``pending`` (due at ``not_before``), ``sending`` (claimed by a dispatcher thread), ``delivered``
or ``dead``. A job in state ``sending`` becomes ``done`` when its last row is delivered, and
``dead`` as soon as one of its rows is dead-lettered (``dicom-node retry`` re-sends those).
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node.backoff import backoff_delay
from dicom_node.config import DispatchSettings
from dicom_node.store.jobs import JobState, JobStore


class DeliveryState(enum.StrEnum):
    """Where one outbox row is."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One file for one destination."""

    id: int
    job_id: int
    destination: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    state: DeliveryState
    attempts: int
    not_before: float
    last_error: str | None
    last_status: int | None
    created_at: float
    delivered_at: float | None


class Outbox:
    """Outbox operations on a :class:`JobStore`."""

    def __init__(self, store: JobStore, settings: DispatchSettings) -> None:
        self.store = store
        self.settings = settings

    def recover(self) -> int:
        """At the start: rows left ``sending`` (the node's end cut their send off: a stop that
        aborted it, a crash, a kill) are due again, their attempt not counted (the PACS did not
        refuse them). Returns how many."""
        with self.store.transaction() as db:
            return db.execute(
                "UPDATE outbox SET state='pending', not_before=0, attempts=MAX(attempts-1, 0)"
                " WHERE state='sending'"
            ).rowcount

    def due_destinations(self, now: float | None = None) -> list[str]:
        """Destinations with at least one row due now."""
        now = time.time() if now is None else now
        with self.store.reading() as db:  # a read: no wait on another process's write lock
            rows = db.execute(
                "SELECT DISTINCT destination FROM outbox WHERE state='pending' AND not_before<=?",
                (now,),
            ).fetchall()
        return [r[0] for r in rows]

    def studies_of(self, job_ids: Collection[int]) -> dict[int, str]:
        """The study of each job, in one read."""
        marks = ",".join("?" * len(job_ids))
        with self.store.reading() as db:
            rows = db.execute(
                f"SELECT id, study_uid FROM jobs WHERE id IN ({marks})",  # noqa: S608 - marks
                tuple(job_ids),
            ).fetchall()
        return {int(r[0]): str(r[1]) for r in rows}

    def unclaim(self, item_ids: Sequence[int]) -> None:
        """Put those of ``item_ids`` still claimed (``sending``) back to ``pending``, their
        attempt not counted: rows a batch did not send (held back behind a refused older
        version of their study, or cut short by an error)."""
        now = time.time()
        with self.store.transaction() as db:
            for item_id in item_ids:
                db.execute(
                    "UPDATE outbox SET state='pending', attempts=MAX(attempts-1, 0), updated_at=?"
                    " WHERE id=? AND state='sending'",
                    (now, item_id),
                )

    def claim(
        self, destination: str, *, limit: int = 64, now: float | None = None
    ) -> list[OutboxItem]:
        """Take up to ``limit`` due rows of one destination and mark them ``sending``, oldest
        job first. An older version's rows of a study go with a newer version's that are due,
        whatever their own backoff, so that a destination never gets a study's outdated
        results after the ones that revise them (a viewer shows the newest SEG it received)."""
        now = time.time() if now is None else now
        with self.store.transaction() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT o.id FROM outbox o WHERE o.destination=:d AND o.state='pending'"
                    " AND (o.not_before<=:now OR EXISTS (SELECT 1 FROM outbox n"
                    " JOIN jobs nj ON nj.id = n.job_id JOIN jobs oj ON oj.id = o.job_id"
                    " WHERE n.destination = o.destination AND n.state = 'pending'"
                    " AND n.not_before <= :now AND nj.study_uid = oj.study_uid"
                    " AND nj.version > oj.version))"
                    " ORDER BY o.job_id, o.id LIMIT :limit",
                    {"d": destination, "now": now, "limit": limit},
                ).fetchall()
            ]
            for item_id in ids:
                db.execute(
                    "UPDATE outbox SET state='sending', attempts=attempts+1, updated_at=?"
                    " WHERE id=?",
                    (now, item_id),
                )
        return [self.item(i) for i in ids]

    def delivered(self, item_id: int, status: int) -> None:
        """Record a delivery (success or warning status); finish the job if it was the last."""
        now = time.time()
        with self.store.transaction() as db:
            db.execute(
                "UPDATE outbox SET state='delivered', last_status=?, last_error=NULL,"
                " delivered_at=?, updated_at=? WHERE id=?",
                (status, now, now, item_id),
            )
            job_id = db.execute("SELECT job_id FROM outbox WHERE id=?", (item_id,)).fetchone()[0]
            left = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE job_id=? AND state!='delivered'", (job_id,)
            ).fetchone()[0]
            state = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
            if left == 0 and state == JobState.SENDING:
                self.store.set_state(
                    db, job_id, JobState.DONE, "all results delivered", finished_at=now
                )

    def failed(
        self, item_id: int, error: str, status: int | None = None, *, hopeless: bool = False
    ) -> DeliveryState:
        """Record a failed attempt: retry later with backoff, or dead-letter the row (and its
        job) once attempts or age run out, or at once when trying again cannot help
        (``hopeless``: its destination is no longer configured). Returns the row's new state."""
        now = time.time()
        item = self.item(item_id)
        too_old = now - item.created_at > self.settings.max_age_hours * 3600
        with self.store.transaction() as db:
            if hopeless or item.attempts >= self.settings.max_attempts or too_old:
                why = (
                    "one attempt"
                    if hopeless
                    else "too old"
                    if too_old
                    else f"{item.attempts} attempts"
                )
                db.execute(
                    "UPDATE outbox SET state='dead', last_error=?, last_status=?, updated_at=?"
                    " WHERE id=?",
                    (error, status, now, item_id),
                )
                state = db.execute("SELECT state FROM jobs WHERE id=?", (item.job_id,)).fetchone()
                if state is not None and state[0] == JobState.SENDING:
                    self.store.set_state(
                        db,
                        item.job_id,
                        JobState.DEAD,
                        f"delivery to {item.destination} dead after {why}: {error}",
                        last_error=f"delivery to {item.destination} failed: {error}",
                        finished_at=now,
                    )
                return DeliveryState.DEAD
            due = now + backoff_delay(
                item.attempts,
                base_seconds=self.settings.retry_base_seconds,
                max_seconds=self.settings.retry_max_seconds,
            )
            db.execute(
                "UPDATE outbox SET state='pending', last_error=?, last_status=?, not_before=?,"
                " updated_at=? WHERE id=?",
                (error, status, due, now, item_id),
            )
            # the study's newer versions wait for it at this destination, claimed in the same
            # batch or not (claim would otherwise take it along with any of theirs that is due,
            # whatever its backoff)
            db.execute(
                "UPDATE outbox SET not_before=MAX(not_before, ?) WHERE destination=?"
                " AND state IN ('pending', 'sending') AND job_id IN (SELECT n.id FROM jobs n"
                " JOIN jobs o ON o.study_uid = n.study_uid WHERE o.id=? AND n.version > o.version)",
                (due, item.destination, item.job_id),
            )
            return DeliveryState.PENDING

    def item(self, item_id: int) -> OutboxItem:
        """One row."""
        with self.store.transaction() as db:
            row = db.execute("SELECT * FROM outbox WHERE id=?", (item_id,)).fetchone()
        return _item(row)

    def items(self, job_id: int | None = None) -> list[OutboxItem]:
        """All rows (of one job), oldest first."""
        with self.store.transaction() as db:
            if job_id is None:
                rows = db.execute("SELECT * FROM outbox ORDER BY id").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM outbox WHERE job_id=? ORDER BY id", (job_id,)
                ).fetchall()
        return [_item(r) for r in rows]

    def listing(self, job_ids: Collection[int]) -> list[OutboxItem]:
        """The rows of the jobs ``job_ids`` and every row not delivered, oldest first (what
        ``dicom-node jobs`` shows), in one read."""
        marks = ",".join("?" * len(job_ids))
        with self.store.reading() as db:
            rows = db.execute(
                f"SELECT * FROM outbox WHERE state != 'delivered' OR job_id IN ({marks})"  # noqa: S608 - marks
                " ORDER BY id",
                tuple(job_ids),
            ).fetchall()
        return [_item(r) for r in rows]


def _item(r: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        id=r["id"],
        job_id=r["job_id"],
        destination=r["destination"],
        path=Path(r["path"]),
        sop_class_uid=r["sop_class_uid"],
        sop_instance_uid=r["sop_instance_uid"],
        state=DeliveryState(r["state"]),
        attempts=r["attempts"],
        not_before=r["not_before"],
        last_error=r["last_error"],
        last_status=r["last_status"],
        created_at=r["created_at"],
        delivered_at=r["delivered_at"],
    )
