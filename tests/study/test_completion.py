"""Study completion: quiet period, maximum wait, and release of the sending association."""

from __future__ import annotations

import time
from pathlib import Path

from dicom_node.config import StudySettings
from dicom_node.store.jobs import InstanceRecord, JobStore
from dicom_node.study.completion import Completion


class Clock:
    """A settable clock, so the timing rules are tested without sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _record(store: JobStore, clock: Clock, study: str, sop: str) -> None:
    store.record_instance(
        InstanceRecord(
            sop_instance_uid=sop,
            study_uid=study,
            series_uid=study + ".1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality="CT",
            path=Path(f"/x/{sop}"),
            size=1,
            calling_ae="A",
            received_at=clock(),
        )
    )


def test_quiet_period_and_maximum_wait(tmp_path: Path) -> None:
    """Complete after stable_seconds of quiet, or at max_wait_seconds even while busy."""
    store = JobStore(tmp_path / "j.sqlite")
    clock = Clock()
    done = Completion(store, StudySettings(stable_seconds=30, max_wait_seconds=100), clock=clock)
    _record(store, clock, "1.1", "1.1.1")
    clock.now += 29
    assert done.scan() == []
    clock.now += 2
    [job] = done.scan()
    assert job.study_uid == "1.1"
    # a study that never goes quiet completes at max wait
    for i in range(12):
        _record(store, clock, "1.2", f"1.2.{i}")
        clock.now += 10
        jobs = done.scan()
        if jobs:
            break
    assert [j.study_uid for j in jobs] == ["1.2"]
    assert i == 9  # 100 s after the first instance


def test_release_completes_only_studies_no_other_association_is_sending(tmp_path: Path) -> None:
    """With complete_on_release, a study interleaved across two associations completes only when
    the last of them is released; an abort completes nothing."""
    store = JobStore(tmp_path / "j.sqlite")
    clock = Clock()
    done = Completion(
        store, StudySettings(stable_seconds=30, complete_on_release=True), clock=clock
    )
    _record(store, clock, "1.1", "1.1.1")
    done.instance_received(1, "1.1")
    _record(store, clock, "1.1", "1.1.2")
    done.instance_received(2, "1.1")
    _record(store, clock, "1.2", "1.2.1")
    done.instance_received(2, "1.2")
    assert done.association_ended(1, released=True) == []  # association 2 still sends 1.1
    _record(store, clock, "1.3", "1.3.1")
    done.instance_received(3, "1.3")
    assert done.association_ended(3, released=False) == []  # aborted: wait for the quiet period
    jobs = done.association_ended(2, released=True)
    assert sorted(j.study_uid for j in jobs) == ["1.1", "1.2"]


def test_release_does_nothing_when_not_configured(tmp_path: Path) -> None:
    """Without complete_on_release, a release leaves completion to the quiet period."""
    store = JobStore(tmp_path / "j.sqlite")
    clock = Clock()
    done = Completion(store, StudySettings(stable_seconds=30), clock=clock)
    _record(store, clock, "1.1", "1.1.1")
    done.instance_received(1, "1.1")
    assert done.association_ended(1, released=True) == []
