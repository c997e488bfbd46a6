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


def test_a_study_cut_off_by_a_stop_gets_a_quiet_period_after_the_start(tmp_path: Path) -> None:
    """A study left receiving when the node stopped (its sender's association cut) does not
    become a job the moment the node is back, however long it was down: the quiet period and
    the maximum wait count only from the start, so the sender can send the rest first."""
    store = JobStore(tmp_path / "j.sqlite")
    clock = Clock()
    _record(store, clock, "1.1", "1.1.1")
    clock.now += 3600  # down for an hour: beyond stable_seconds and max_wait_seconds
    done = Completion(store, StudySettings(stable_seconds=30, max_wait_seconds=100), clock=clock)
    done.listening()
    clock.now += 20
    _record(store, clock, "1.1", "1.1.2")  # the sender resumes
    clock.now += 29
    assert done.scan() == []
    clock.now += 2
    [job] = done.scan()
    assert job.study_uid == "1.1"
    assert len(store.study_instances(job.study_uid)) == 2


def test_a_study_nobody_resumes_completes_one_quiet_period_after_the_start(tmp_path: Path) -> None:
    """No sender comes back: the part received before the stop becomes a job, stable_seconds
    after the node started listening again."""
    store = JobStore(tmp_path / "j.sqlite")
    clock = Clock()
    _record(store, clock, "1.1", "1.1.1")
    clock.now += 600
    done = Completion(store, StudySettings(stable_seconds=30), clock=clock)
    done.listening()
    clock.now += 29
    assert done.scan() == []
    clock.now += 1
    assert [j.study_uid for j in done.scan()] == ["1.1"]


def test_the_maximum_wait_of_a_study_cut_off_by_a_stop_counts_from_the_start(
    tmp_path: Path,
) -> None:
    """A study that began arriving before the stop and never goes quiet after it completes
    max_wait_seconds after the start, not at once for the time the node was down."""
    store = JobStore(tmp_path / "j.sqlite")
    clock = Clock()
    _record(store, clock, "1.1", "1.1.0")
    clock.now += 3600
    done = Completion(store, StudySettings(stable_seconds=30, max_wait_seconds=100), clock=clock)
    done.listening()
    for i in range(1, 13):
        clock.now += 10
        _record(store, clock, "1.1", f"1.1.{i}")
        if jobs := done.scan():
            break
    assert [j.study_uid for j in jobs] == ["1.1"]
    assert i == 10  # 100 s after the start


def test_a_step_of_the_wall_clock_neither_splits_nor_holds_a_study(tmp_path: Path) -> None:
    """The wall clock steps forward 10 minutes while a study is arriving: it is not taken for
    quiet (a split into two versions); a quiet period from the step passes first, the rest
    arrives meanwhile, and one version completes. It steps back an hour: the times recorded
    before lie in the future, and the study completes a couple of quiet periods later, not
    an hour later."""
    store = JobStore(tmp_path / "j.sqlite")
    wall, steady = Clock(), Clock()
    steady.now = 0.0
    done = Completion(store, StudySettings(stable_seconds=30), clock=wall, monotonic=steady)

    def tick(seconds: float, *, step: float = 0.0) -> list[object]:
        wall.now += seconds + step
        steady.now += seconds
        return list(done.scan())

    tick(31)
    _record(store, wall, "1.1", "1.1.1")
    assert tick(10) == []
    assert tick(10, step=600) == []  # not taken for 10 minutes of quiet
    _record(store, wall, "1.1", "1.1.2")  # the rest of the study
    assert tick(25) == []
    [job] = tick(10)
    assert job.version == 1  # type: ignore[attr-defined]
    [row] = store.studies()
    assert row.instances == 2

    _record(store, wall, "1.2", "1.2.1")
    assert tick(10, step=-3600) == []
    completed: list[object] = []
    for _ in range(8):  # 80 s
        completed += tick(10)
    assert len(completed) == 1


def test_a_study_heard_since_the_start_is_timed_on_the_monotonic_clock(tmp_path: Path) -> None:
    """A wall clock stepping 10 s forward every 5 s (more often than the quiet period) neither
    holds back a study the receiver heard arriving, nor completes it while it arrives; its
    maximum wait counts on the monotonic clock too."""
    store = JobStore(tmp_path / "j.sqlite")
    wall, steady = Clock(), Clock()
    steady.now = 0.0
    settings = StudySettings(stable_seconds=30, max_wait_seconds=120)
    done = Completion(store, settings, clock=wall, monotonic=steady)

    def tick(seconds: float, *, step: float = 0.0) -> list[object]:
        wall.now += seconds + step
        steady.now += seconds
        return list(done.scan())

    def arrive(study: str, sop: str) -> None:
        done.instance_received(1, study)
        _record(store, wall, study, sop)

    tick(31)
    arrive("1.1", "1.1.1")
    completed: list[object] = []
    for _ in range(5):  # 25 s of quiet, 50 s on the stepping wall clock
        completed += tick(5, step=10)
    assert completed == []
    completed += tick(5, step=10)
    [job] = completed
    assert job.study_uid == "1.1"  # type: ignore[attr-defined]

    for i in range(40):  # arriving every 5 s: completes at the maximum wait, 120 s
        arrive("1.2", f"1.2.{i}")
        if completed := tick(5, step=10):
            break
    assert [j.study_uid for j in completed] == ["1.2"]  # type: ignore[attr-defined]
    assert i == 23
    arrive("1.2", "1.2.99")  # the next arrival is a new version, timed from its own start
    assert tick(29, step=10) == []
    [again] = tick(1)
    assert again.version == 2  # type: ignore[attr-defined]
