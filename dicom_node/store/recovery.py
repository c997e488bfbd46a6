"""Start-up reconciliation of the spool with the job store, after any kind of crash."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from dicom_node.logs import study_key
from dicom_node.store.jobs import InstanceRecord, JobStore
from dicom_node.store.spool import Spool
from dicom_node.uids import is_valid_uid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What :func:`reconcile` found and did."""

    resumed_jobs: int
    reindexed_files: int
    missing_files: int


def reconcile(spool: Spool, store: JobStore) -> RecoveryReport:
    """Make the job store and the spool agree again, and resume interrupted jobs.

    - an instance whose replacement by new content was cut off before the store recorded it
      gets back the content that was acknowledged (kept aside in ``incoming/``);
    - files left half-written in the spool's ``incoming/`` are removed (never acknowledged);
    - jobs left ``running`` go back to the queue;
    - a spooled file the store does not know (its record was lost with the last transactions
      of a power cut) is read and recorded, which re-opens its study; when the store has that
      instance filed elsewhere too, in a file that is there (a move to another study or series
      that a crash cut off), the later of the two files stands and the other is removed;
    - a record whose file is gone is dropped, with an error in the log.
    """
    restored = _restore_kept_aside(spool, store)
    spool.clean_incoming()
    resumed = store.recover()
    known = store.known_paths()
    reindexed = 0
    on_disk: set[str] = set()
    for path in spool.iter_files():
        on_disk.add(str(path))
        if str(path) in known:
            continue
        recorded = store.instance_location(path.stem)
        if recorded is not None and recorded[0] != path and recorded[0].is_file():
            # two copies of one instance: a move to another study or series that a crash cut
            # off. The later file is where the sender put the instance last (its record lost
            # with a power cut, or not yet made: the sender then sends it again); the other goes
            older, newer = sorted((path, recorded[0]), key=lambda p: p.stat().st_mtime_ns)
            logger.warning("two copies of an instance after a move that a crash cut off")
            if newer == path and _reindex(path, store):
                reindexed += 1
            spool.remove(older)
            on_disk.discard(str(older))
            known.discard(str(older))  # gone on purpose, not missing
            continue
        if _reindex(path, store):
            reindexed += 1
    missing = 0
    for path_text in known - on_disk:
        logger.error("a recorded instance's file is missing from the spool; record dropped")
        store.forget_instance(Path(path_text).stem, Path(path_text))
        missing += 1
    if restored:
        logger.warning(
            "restored %d acknowledged instance(s) whose replacement was cut off", restored
        )
    report = RecoveryReport(len(resumed), reindexed, missing)
    if resumed or reindexed or missing:
        logger.warning(
            "recovered after an unclean stop",
            extra={
                "fields": {"resumed_jobs": len(resumed), "reindexed": reindexed, "missing": missing}
            },
        )
    return report


def _restore_kept_aside(spool: Spool, store: JobStore) -> int:
    """Put back the acknowledged content of instances whose replacement a crash cut off before
    the store recorded it (the record's digest is still the kept content's); the number put
    back. A replacement that was recorded keeps its new content."""
    restored = 0
    for aside in spool.kept_aside():
        recorded = store.instance_location(spool.aside_sop_instance_uid(aside))
        if recorded is None or recorded[2] is None:
            continue  # nothing to tell the two contents apart by: the newer one stays
        path, _, digest = recorded
        if path.is_file() and _digest(path) == digest:
            continue  # the replacement was recorded
        if _digest(aside) == digest and path.parent.is_dir():
            spool.put_back(aside, path)
            restored += 1
    return restored


def _digest(path: Path) -> str | None:
    """SHA-256 of a spooled file's data set (what the receiver records), ``None`` when it
    cannot be read."""
    try:
        data = path.read_bytes()
        return hashlib.sha256(data[_dataset_offset(path) :]).hexdigest()
    except (OSError, ValueError, InvalidDicomError):
        return None


def _reindex(path: Path, store: JobStore) -> bool:
    try:
        ds = dcmread(path, stop_before_pixels=True)
        uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    except Exception as exc:  # noqa: BLE001 - unreadable: not an instance we acknowledged intact
        logger.error(  # noqa: TRY400 - a traceback would name the file (a SOP Instance UID)
            "unreadable file in the spool left in place (%s)",
            type(exc).__name__,
            extra={"fields": {"study": study_key(path.parent.parent.name)}},
        )
        return False
    if not all(is_valid_uid(u) for u in uids):
        return False
    meta_end = _dataset_offset(path)
    store.record_instance(
        InstanceRecord(
            sop_instance_uid=uids[2],
            study_uid=uids[0],
            series_uid=uids[1],
            sop_class_uid=str(ds.SOPClassUID),
            modality=str(ds.get("Modality", "")).upper(),
            path=path,
            size=path.stat().st_size - meta_end,
            calling_ae="",
            received_at=path.stat().st_mtime,
            digest=_digest(path),
        )
    )
    return True


def _dataset_offset(path: Path) -> int:
    """Byte offset where the data set starts, after the preamble and File Meta."""
    # preamble (128) + "DICM" (4) + the group length element (12) + the group it counts
    return 144 + int(read_file_meta_info(path).FileMetaInformationGroupLength)
