"""Retention: what the node deletes, and when.

- A study whose newest job ended ``done`` or ``skipped`` (all results delivered) more than
  ``storage.keep_hours`` ago: its spooled instances, its rows in ``instances``/``studies``, and
  the work folders (outputs) of its jobs. Job rows stay as history.
- Failed and dead jobs keep everything until retried or purged by the operator
  (:func:`purge`, ``dicom-node purge``), also when a newer version of the study was skipped
  or superseded (it has no results of its own).
- The history of a study removed so (its jobs' state changes and deliveries, and its older
  jobs) goes ``storage.history_days`` after its last job ended (:func:`prune_history`). Each
  such study keeps its newest job and its newest delivered one: the next version of a study
  sent again follows on from the first (its result UIDs are never made twice) and names the
  report it revises.
- A study still receiving, or whose newest job is queued/running/sending, is never touched.

A study is deleted under the spool's exclusive lock (:meth:`Spool.removing`), after the job
store has confirmed, in the same moment, that its newest job is still the one judged and still
final: a re-send that arrives meanwhile waits, and is filed afterwards as a new study. Its
files go before its rows, so that a crash in between never leaves files the next start would
index again as a new version.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.logs import study_key
from dicom_node.store.jobs import Job, JobState, JobStore
from dicom_node.store.spool import Spool

logger = logging.getLogger(__name__)

_ENDED_WELL = (JobState.DONE, JobState.SKIPPED, JobState.SUPERSEDED)
_ENDED_BADLY = (JobState.DEAD,)


@dataclass(frozen=True)
class Removed:
    """What one pass removed."""

    studies: int
    files: int


def _jobs_by_study(store: JobStore) -> dict[str, list[Job]]:
    """The jobs of every study still spooled, newest first (one read of the job table per
    pass, without results or the history of studies removed before)."""
    by_study: dict[str, list[Job]] = {}
    for job in store.jobs_of_spooled_studies():  # newest first
        by_study.setdefault(job.study_uid, []).append(job)
    return by_study


def _with_results(jobs: list[Job]) -> Job:
    """Of a study's jobs (newest first), the newest that is not skipped or superseded: the
    version whose results count (a re-send that held nothing to analyse leaves them to the
    one before)."""
    return next(
        (j for j in jobs if j.state not in (JobState.SKIPPED, JobState.SUPERSEDED)), jobs[0]
    )


def _remove_study(store: JobStore, spool: Spool, work_root: Path, jobs: list[Job]) -> int | None:
    """Delete a study whose jobs are ``jobs`` (newest first); the number of spooled files it
    had, or ``None`` when it is gone already or its newest job is no longer ``jobs[0]`` (a
    re-send re-opened it)."""
    newest = jobs[0]
    with spool.removing():
        paths = store.removable_paths(newest.study_uid, newest.id)
        if paths is None:
            return None
        for path in paths:
            spool.remove(path)
        for job in jobs:
            shutil.rmtree(work_root / f"{job.id}-v{job.version}", ignore_errors=True)
        store.forget_study(newest.study_uid)
    logger.info(
        "study removed by retention", extra={"fields": {"study": study_key(newest.study_uid)}}
    )
    return len(paths)


def apply_retention(
    store: JobStore,
    spool: Spool,
    work_root: Path,
    *,
    keep_hours: float | None,
    now: float | None = None,
) -> Removed:
    """Delete what ``keep_hours`` says may go (see the module docstring)."""
    if keep_hours is None:
        return Removed(0, 0)
    now = time.time() if now is None else now
    cutoff = now - keep_hours * 3600
    studies = files = 0
    for jobs in _jobs_by_study(store).values():
        job = jobs[0]
        if _with_results(jobs).state in _ENDED_BADLY:
            continue  # an older version died, and a newer one (skipped) has no results: kept
        if job.state in _ENDED_WELL and job.finished_at is not None and job.finished_at <= cutoff:
            n = _remove_study(store, spool, work_root, jobs)
            if n is not None:
                studies += 1
                files += n
    return Removed(studies, files)


def purge(
    store: JobStore,
    spool: Spool,
    work_root: Path,
    *,
    older_than_hours: float = 0.0,
    now: float | None = None,
) -> Removed:
    """Delete the inputs and outputs of studies whose newest job is dead (the operator gave up
    on it), ended more than ``older_than_hours`` ago."""
    now = time.time() if now is None else now
    cutoff = now - older_than_hours * 3600
    studies = files = 0
    for jobs in _jobs_by_study(store).values():
        job = _with_results(jobs)
        if job.state in _ENDED_BADLY and (job.finished_at or job.updated_at) <= cutoff:
            n = _remove_study(store, spool, work_root, jobs)
            if n is not None:
                studies += 1
                files += n
    return Removed(studies, files)


def prune_history(
    store: JobStore, *, history_days: float | None, now: float | None = None
) -> tuple[int, int]:
    """Forget what ``history_days`` says may go (see the module docstring): ``(jobs, rows)``
    deleted, as :meth:`JobStore.prune_history`."""
    if history_days is None:
        return 0, 0
    now = time.time() if now is None else now
    jobs, rows = store.prune_history(now - history_days * 86400)
    if jobs or rows:
        logger.info(
            "history pruned", extra={"fields": {"jobs": jobs, "events_and_deliveries": rows}}
        )
    return jobs, rows
