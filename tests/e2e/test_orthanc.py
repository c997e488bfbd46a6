"""The node behind a real Orthanc: Orthanc sends studies to it, auto-routes them with the shipped
Lua script, and receives the results back into the same study."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom_node import MANUFACTURER
from dicom_node.testing.orthanc import (
    COMPREHENSIVE_3D_SR_STORAGE,
    SEGMENTATION_STORAGE,
    OrthancClient,
    OrthancError,
    OrthancJob,
    OrthancPacs,
    OrthancRestError,
)
from dicom_node.training.ctseries import StudyIdentity
from tests.e2e.conftest import AUTOROUTE_LUA, PacsAndNode

EXAMPLE_CONFIG = AUTOROUTE_LUA.parent / "orthanc.json"
RESULT_CLASSES = {SEGMENTATION_STORAGE, COMPREHENSIVE_3D_SR_STORAGE}


def _analysis(model_dir: Path) -> dict[str, Any]:
    """Node settings that run the tiny random-weight model (the machinery, not the findings) on
    8-slice studies and always find a lesion, hence always write a SEG beside the SR."""
    return {
        "model": {"path": str(model_dir)},
        "inference": {"device": "cpu", "batch_size": 4},
        "lesions": {"threshold": 0.01, "min_volume_mm3": 0.0},
        "selection": {"min_slices": 8},
    }


def _chest_ct(
    write_study: Callable[..., list[Path]],
    *,
    series: int = 2,
    slices: int = 8,
    size: int = 32,
    seed: int = 0,
) -> tuple[str, list[Path]]:
    """A generated chest CT study: ``series`` series of ``slices`` slices of ``size``²."""
    study = StudyIdentity.random(seed)
    files: list[Path] = []
    for number in range(1, series + 1):
        files += write_study(study=study, slices=slices, size=size, series_number=number, seed=seed)
    return study.study_instance_uid, files


def _job_of(listing: dict[str, Any], study_uid: str, state: str = "done") -> bool:
    return any(j["study_uid"] == study_uid and j["state"] == state for j in listing["jobs"])


def _upload_study(client: OrthancClient, study_uid: str, files: list[Path]) -> str:
    uploaded = client.upload_files(files)
    assert {u.status for u in uploaded} == {"Success"}
    study_id = client.find_study(study_uid)
    assert study_id is not None and {u.study_id for u in uploaded} == {study_id}
    return study_id


def _store_jobs(client: OrthancClient) -> list[OrthancJob]:
    return [j for j in client.jobs() if j.type == "DicomModalityStore"]


def _decisions(pacs: OrthancPacs, study_id: str) -> list[str]:
    """The autoroute script's log lines about one study, oldest first."""
    return re.findall(rf"dicom-node autoroute: study {study_id}: (.*)", pacs.log())


def _wait_decision(
    pacs: OrthancPacs, study_id: str, wanted: Callable[[str], bool], *, after: int = 0
) -> tuple[int, list[str]]:
    """Wait for a routing decision about ``study_id``, later than the first ``after`` ones, that
    ``wanted`` accepts; returns its index and every decision so far."""
    deadline = time.monotonic() + 15
    while True:
        found = _decisions(pacs, study_id)
        for index in range(after, len(found)):
            if wanted(found[index]):
                return index, found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no such routing decision for {study_id}: {found}")
        time.sleep(0.1)


def _skipped(decision: str) -> list[str]:
    """The reasons of a "not routed (...)" decision, sorted ([] for any other decision)."""
    match = re.fullmatch(r"not routed \((.*)\)", decision)
    return sorted(match.group(1).split(", ")) if match else []


def _result_instances(client: OrthancClient, study_id: str) -> dict[str, str]:
    """SOP Instance UID → SOP Class UID of every SEG and SR in the Orthanc study."""
    out = {}
    for inst in client.study_instances(study_id):
        sop_class = client.sop_class(inst["ID"])
        if sop_class in RESULT_CLASSES:
            out[inst["MainDicomTags"]["SOPInstanceUID"]] = sop_class
    return out


def test_orthanc_sends_a_study_and_the_node_has_all_of_it(
    pacs_and_node: Callable[..., PacsAndNode], write_study: Callable[..., list[Path]]
) -> None:
    """A chest CT study (2 series x 8 slices) uploaded to Orthanc over REST and sent by Orthanc
    to the node (synchronous C-STORE) arrives whole: the node has one study with all 16
    instances, one job for it that ends done, and Orthanc reports 16 sent, none failed."""
    pair = pacs_and_node()
    client = pair.pacs.client
    uid, files = _chest_ct(write_study)
    study_id = _upload_study(client, uid, files)
    assert client.echo("node")

    answer = client.store_to_modality(study_id, "node", synchronous=True)
    assert (answer.instances, answer.failed_instances) == (16, 0)
    assert answer.remote_aet == "DICOM_NODE"

    listing = pair.node.wait_jobs(lambda j: _job_of(j, uid), timeout=30)
    [study] = listing["studies"]
    assert (study["study_uid"], study["instances"], study["state"]) == (uid, 16, "complete")
    [job] = listing["jobs"]
    assert (job["study_uid"], job["version"], job["state"]) == (uid, 1, "done")
    assert len(pair.node.spooled()) == 16


def test_orthanc_sending_twice_makes_one_job(
    pacs_and_node: Callable[..., PacsAndNode], write_study: Callable[..., list[Path]]
) -> None:
    """Orthanc sending the same study again after its job finished is an identical re-send: the
    node acknowledges every instance and queues no new job; the study stays at version 1.
    (With a model, one result set per version: see the results test below.)"""
    pair = pacs_and_node()
    client = pair.pacs.client
    uid, files = _chest_ct(write_study, seed=1)
    study_id = _upload_study(client, uid, files)
    assert client.store_to_modality(study_id).failed_instances == 0
    pair.node.wait_jobs(lambda j: _job_of(j, uid), timeout=30)

    again = client.store_to_modality(study_id)
    assert (again.instances, again.failed_instances) == (16, 0)
    time.sleep(2.5)  # longer than stable_seconds (1) plus the completion scan (0.2)
    listing = pair.node.jobs()
    [job] = listing["jobs"]
    assert (job["version"], job["state"]) == (1, "done")
    [study] = listing["studies"]
    assert (study["instances"], study["state"]) == (16, "complete")


def test_node_down_fails_visibly_in_orthanc_and_a_resend_succeeds(
    pacs_and_node: Callable[..., PacsAndNode], write_study: Callable[..., list[Path]]
) -> None:
    """While the node is down, Orthanc's synchronous send fails with an HTTP error naming the
    refused connection, and an asynchronous send ends as a failed job in ``/jobs``; once the
    node is up, the same send succeeds and the node completes the study."""
    pair = pacs_and_node(start_node=False)
    client = pair.pacs.client
    uid, files = _chest_ct(write_study, seed=2)
    study_id = _upload_study(client, uid, files)
    assert not client.echo("node")

    with pytest.raises(OrthancRestError) as failed:
        client.store_to_modality(study_id, "node", synchronous=True)
    assert failed.value.status == 500
    assert "DICOM_NODE" in failed.value.details
    assert "refused" in failed.value.details.lower()

    queued = client.store_to_modality(study_id, "node", synchronous=False)
    assert queued.job_id is not None
    job = client.wait_job(queued.job_id, timeout=30)
    assert job.state == "Failure"
    assert job.content["RemoteAet"] == "DICOM_NODE"
    assert "refused" in job.error_details.lower()
    assert queued.job_id in {j.id for j in client.jobs() if j.state == "Failure"}

    pair.node.start()
    answer = client.store_to_modality(study_id, "node", synchronous=True)
    assert (answer.instances, answer.failed_instances) == (16, 0)
    listing = pair.node.wait_jobs(lambda j: _job_of(j, uid), timeout=30)
    assert [s["instances"] for s in listing["studies"]] == [16]


def test_autoroute_sends_stable_chest_ct_and_not_other_studies(
    pacs_and_node: Callable[..., PacsAndNode], write_study: Callable[..., list[Path]]
) -> None:
    """With examples/orthanc/autoroute.lua and StableAge 1, a chest CT study uploaded to Orthanc
    reaches the node by itself once stable (one store job holding exactly its CT series), while
    an MR study uploaded beside it is never sent."""
    pair = pacs_and_node(lua=True, stable_age=1)
    client = pair.pacs.client
    mr = client.upload(Path(str(get_testdata_file("MR_small.dcm"))))
    uid, files = _chest_ct(write_study, seed=3)
    study_id = _upload_study(client, uid, files)

    pair.node.wait_jobs(lambda j: _job_of(j, uid), timeout=30)
    _wait_decision(pair.pacs, mr.study_id, bool)
    assert _decisions(pair.pacs, mr.study_id) == ["not routed (modality MR)"]
    assert _decisions(pair.pacs, study_id)[0].startswith("routed 2 series to node")

    [job] = _store_jobs(client)
    assert job.state == "Success"
    assert job.content["RemoteAet"] == "DICOM_NODE"
    ct_series = {s["ID"] for s in client.study_series(study_id)}
    assert set(job.content["ParentResources"]) == ct_series
    listing = pair.node.jobs()
    assert [(s["study_uid"], s["instances"]) for s in listing["studies"]] == [(uid, 16)]


def test_autoroute_never_routes_results_back_and_routes_later_ct(
    pacs_and_node: Callable[..., PacsAndNode],
    write_study: Callable[..., list[Path]],
    tiny_model_dir: Path,
) -> None:
    """With the Lua script, the node's results (SEG + SR, Manufacturer dicom-node) arriving in
    the routed study make it stable again and nothing is routed: neither the results nor the CT
    they were made from. A CT series added after the results is routed alone, and the node
    queues a second version of the study."""
    pair = pacs_and_node(lua=True, stable_age=1, **_analysis(tiny_model_dir))
    client = pair.pacs.client
    identity = StudyIdentity.random(4)
    uid = identity.study_instance_uid
    study_id = _upload_study(client, uid, write_study(study=identity, size=64, seed=4))
    pair.node.wait_jobs(lambda j: _job_of(j, uid), timeout=60)

    # Both results are in Orthanc once the job is done; the study becomes stable again.
    results = ["dicom-node result", "dicom-node result", "sent already"]  # (sorted)
    seen, decisions = _wait_decision(pair.pacs, study_id, lambda d: _skipped(d) == results)
    assert decisions[0].startswith("routed 1 series to node"), decisions
    assert not any(d.startswith("routed") for d in decisions[1:]), decisions
    assert len(_store_jobs(client)) == 1

    later = client.upload_files(write_study(study=identity, series_number=2, size=64, seed=5))
    index, decisions = _wait_decision(
        pair.pacs, study_id, lambda d: d.startswith("routed"), after=seen + 1
    )
    assert decisions[index].startswith("routed 1 series to node"), decisions
    second = next(j for j in _store_jobs(client) if j.id in decisions[index])
    assert client.wait_job(second.id).state == "Success"
    assert second.content["ParentResources"] == [later[0].series_id]
    listing = pair.node.wait_jobs(lambda j: len(j["jobs"]) == 2, timeout=30)
    assert sorted(j["version"] for j in listing["jobs"]) == [1, 2]


def test_example_orthanc_config_runs_on_this_orthanc(tmp_path: Path) -> None:
    """examples/orthanc/orthanc.json, with only its folders, ports, the node's address and the
    HTTP access made local, starts Orthanc 1.10 with the shipped Lua script compiled and the
    node registered as a modality that may store results back; it answers the node's C-ECHO
    and not one from an AE title it does not know."""
    example = json.loads(EXAMPLE_CONFIG.read_text())
    owned = {"StorageDirectory", "IndexDirectory", "HttpPort", "DicomPort", "LuaScripts"}
    settings = {k: v for k, v in example.items() if k not in owned}
    settings |= {"RemoteAccessAllowed": False, "AuthenticationEnabled": False}
    node = settings["DicomModalities"]["node"]
    node |= {"Host": "127.0.0.1", "Port": 1}
    pacs = OrthancPacs(
        root=tmp_path / "orthanc", lua_scripts=[AUTOROUTE_LUA], extra_config=settings
    )
    with pacs:  # and a graceful stop on the way out
        client = pacs.client
        assert client.system()["DicomAet"] == example["DicomAet"]
        modalities = client.get_json("/modalities?expand")
        assert modalities["node"]["AET"] == "DICOM_NODE"
        assert modalities["node"]["AllowStore"] is True
        assert "Lua" not in "".join(line for line in pacs.log().splitlines() if line[:1] == "E")
        # `dicom-node echo` answers as the node's results would be: a mistyped AE title fails
        from dicom_node.config import Config
        from dicom_node.dispatch.scu import Peer, echo

        peer = Peer(
            name="pacs", ae_title=example["DicomAet"], host="127.0.0.1", port=pacs.dicom_port
        )
        assert echo(peer, calling_ae="DICOM_NODE", settings=Config().dispatch)[0]
        assert not echo(peer, calling_ae="DICOM-NODE", settings=Config().dispatch)[0]
    assert not pacs.running
    assert "Orthanc has stopped" in pacs.log()


def test_results_arrive_in_orthanc_once_and_are_not_analysed_again(
    pacs_and_node: Callable[..., PacsAndNode],
    write_study: Callable[..., list[Path]],
    tiny_model_dir: Path,
) -> None:
    """After Orthanc sends a chest CT study, the node's results arrive in Orthanc in the same
    study: a DICOM SEG (1.2.840.10008.5.1.4.1.1.66.4) and a Comprehensive 3D SR
    (1.2.840.10008.5.1.4.1.1.88.34), each as the node delivered it, the SR marked unverified
    and preliminary. Orthanc sending the results back to the node, then the whole study (CT and
    results), makes no new job, and Orthanc still holds that one result set."""
    pair = pacs_and_node(**_analysis(tiny_model_dir))
    client = pair.pacs.client
    uid, files = _chest_ct(write_study, series=1, slices=8, size=64, seed=7)
    study_id = _upload_study(client, uid, files)
    assert client.store_to_modality(study_id).failed_instances == 0

    final = {"done", "skipped", "dead"}
    listing = pair.node.wait_jobs(
        lambda j: any(x["study_uid"] == uid and x["state"] in final for x in j["jobs"]),
        timeout=60,
    )
    [job] = listing["jobs"]
    assert job["state"] == "done", job
    sent = [d for d in listing["deliveries"] if d["job_id"] == job["id"]]
    assert sent, "the node delivered nothing to Orthanc"
    assert {d["state"] for d in sent} == {"delivered"}, sent
    assert sorted(d["sop_class_uid"] for d in sent) == sorted(RESULT_CLASSES), sent

    in_orthanc = {
        i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in client.study_instances(study_id)
    }
    for delivery in sent:
        instance_id = in_orthanc[delivery["sop_instance_uid"]]
        assert client.sop_class(instance_id) == delivery["sop_class_uid"]
        tags = client.tags(instance_id)
        written = dcmread(delivery["path"], stop_before_pixels=True)
        for keyword in (
            "SOPClassUID",
            "SOPInstanceUID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "Modality",
            "Manufacturer",
            "PatientID",
            "SeriesNumber",
            "SeriesDescription",
        ):
            assert tags[keyword] == str(written[keyword].value), keyword
        assert (tags["StudyInstanceUID"], tags["Manufacturer"]) == (uid, MANUFACTURER)
        if delivery["sop_class_uid"] == COMPREHENSIVE_3D_SR_STORAGE:
            assert (tags["VerificationFlag"], tags["PreliminaryFlag"]) == (
                "UNVERIFIED",
                "PRELIMINARY",
            )

    results = [in_orthanc[d["sop_instance_uid"]] for d in sent]
    back = client.store_to_modality(results, "node")
    assert (back.instances, back.failed_instances) == (len(sent), 0)
    whole = client.store_to_modality(study_id, "node")  # the CT again, and the results
    assert (whole.instances, whole.failed_instances) == (len(files) + len(sent), 0)
    time.sleep(2.5)  # longer than stable_seconds (1) plus the completion scan (0.2)
    after = pair.node.jobs()
    assert [j["id"] for j in after["jobs"]] == [job["id"]]
    assert [s["instances"] for s in after["studies"]] == [len(files)]
    expected = {d["sop_instance_uid"]: d["sop_class_uid"] for d in sent}
    assert _result_instances(client, study_id) == expected  # one result set for one version


def test_the_harness_is_not_fooled_by_another_orthanc_on_its_http_port() -> None:
    """An Orthanc started on an HTTP port another Orthanc holds cannot bind it and exits: its
    start fails (after new ports where they were chosen for it), rather than passing because
    the other one answered."""
    with OrthancPacs(node_port=1) as first:
        second = OrthancPacs(node_port=1, http_port=first.http_port)
        try:
            with pytest.raises(OrthancError):
                second.start()
        finally:
            second.stop()


def test_a_failed_start_leaves_no_temporary_folder(tmp_path: Path) -> None:
    """A start that fails (a Lua script that does not compile) takes the harness's temporary
    folder with it, as a context manager and as the command."""
    import shutil
    import subprocess
    import sys
    import tempfile

    def folders() -> set[str]:
        return {p.name for p in Path(tempfile.gettempdir()).glob("orthanc-*")}

    bad = tmp_path / "bad.lua"
    bad.write_text("function OnStableStudy(\n")
    before = folders()
    with pytest.raises(OrthancError), OrthancPacs(node_port=1, lua_scripts=[bad]):
        pass
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node.testing.orthanc", "--lua", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    leaked = folders() - before
    for name in leaked:
        shutil.rmtree(Path(tempfile.gettempdir()) / name, ignore_errors=True)
    assert leaked == set()


def test_autoroute_sends_a_series_that_arrives_while_the_node_analyses(
    pacs_and_node: Callable[..., PacsAndNode],
    write_study: Callable[..., list[Path]],
    tiny_model_dir: Path,
) -> None:
    """A CT series that reaches Orthanc after the study was routed, and whose own stable event
    comes after the node's results, is still sent (the script had taken it for analysed: its
    LastUpdate was not later than the results')."""
    pair = pacs_and_node(
        lua=True, stable_age=6, study={"stable_seconds": 0.5}, **_analysis(tiny_model_dir)
    )
    client = pair.pacs.client
    identity = StudyIdentity.random(41)
    uid = identity.study_instance_uid
    study_id = _upload_study(client, uid, write_study(study=identity, size=64, seed=4))
    _wait_decision(pair.pacs, study_id, lambda d: d.startswith("routed"))
    client.upload_files(write_study(study=identity, series_number=2, size=64, seed=5))
    pair.node.wait_jobs(
        lambda j: any(x["state"] == "done" for x in j["jobs"]), timeout=60
    )  # the results come back within StableAge of the second series
    listing = pair.node.wait_jobs(
        lambda j: [s["instances"] for s in j["studies"]] == [16], timeout=60
    )
    assert len(listing["studies"]) == 1
