"""Dispatch against dcmtk's storescp: delivery, refusal, retries, dead letters, restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.config import Config, load_config
from dicom_node.dispatch.dispatcher import Dispatcher
from dicom_node.store.jobs import InstanceRecord, JobState, JobStore, OutputFile
from dicom_node.store.outbox import DeliveryState, Outbox
from tests.peers import StoreSCP, free_port, node_cli


def _config(tmp_path: Path, destinations: dict[str, int], **dispatch: object) -> Config:
    return load_config(
        None,
        overrides={
            "storage": {"data_dir": str(tmp_path / "var")},
            "destinations": [
                {"name": n, "ae_title": "PACS", "host": "127.0.0.1", "port": p}
                for n, p in destinations.items()
            ],
            "dispatch": {
                "retry_base_seconds": 0.2,
                "retry_max_seconds": 0.5,
                "connect_timeout_seconds": 3,
                **dispatch,
            },
        },
    )


def _job_with_outputs(store: JobStore, outputs: list[Path], destinations: list[str]) -> int:
    """A real job that 'produced' ``outputs`` (generated DICOM files)."""
    ds = dcmread(outputs[0])
    store.record_instance(
        InstanceRecord(
            sop_instance_uid="1.2.3.4.5",
            study_uid=str(ds.StudyInstanceUID),
            series_uid="1.2.3.4",
            sop_class_uid=str(ds.SOPClassUID),
            modality="CT",
            path=outputs[0],
            size=1,
            calling_ae="PACS",
            received_at=time.time(),
        )
    )
    job = store.complete_study(str(ds.StudyInstanceUID), reason="test")
    assert job is not None
    assert store.claim_next_job() is not None
    files = [
        OutputFile(p, str(dcmread(p).SOPClassUID), str(dcmread(p).SOPInstanceUID)) for p in outputs
    ]
    done = store.finish_with_outputs(job.id, result={}, outputs=files, destinations=destinations)
    assert done.state == JobState.SENDING
    return job.id


def _drain_until(
    dispatcher: Dispatcher, outbox: Outbox, done: Callable[[], bool], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, [
            (i.destination, i.state, i.last_error) for i in outbox.items()
        ]
        dispatcher.kick()
        time.sleep(0.1)


def test_delivers_to_every_destination_and_finishes_the_job(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """Each output reaches each destination; the job is done when the last is delivered."""
    files = write_study(slices=3)
    a, b = scps("a"), scps("b")
    cfg = _config(tmp_path, {"a": a.port, "b": b.port})
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, files, ["a", "b"])
    dispatcher = Dispatcher(cfg, outbox)
    _drain_until(dispatcher, outbox, lambda: store.job(job_id).state == JobState.DONE)
    assert len(a.received()) == len(b.received()) == 3
    assert {dcmread(p).SOPInstanceUID for p in a.received()} == {
        dcmread(f).SOPInstanceUID for f in files
    }
    assert all(i.state == DeliveryState.DELIVERED and i.last_status == 0 for i in outbox.items())


def test_a_refusing_destination_retries_without_blocking_another(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """storescp --refuse: that destination retries with backoff and then dead-letters; the
    other destination is delivered meanwhile; `retry` re-sends once the PACS accepts again."""
    files = write_study(slices=2)
    good = scps("good")
    refusing = scps("refusing", "--refuse")
    cfg = _config(tmp_path, {"good": good.port, "bad": refusing.port}, max_attempts=3)
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, files, ["good", "bad"])
    dispatcher = Dispatcher(cfg, outbox)
    _drain_until(
        dispatcher,
        outbox,
        lambda: all(
            i.state == DeliveryState.DEAD for i in outbox.items() if i.destination == "bad"
        ),
    )
    assert store.job(job_id).state == JobState.DEAD
    assert len(good.received()) == 2
    bad = [i for i in outbox.items() if i.destination == "bad"]
    assert all(i.state == DeliveryState.DEAD and i.attempts == 3 for i in bad)
    # storescp --refuse closes its socket right after the A-ASSOCIATE-RJ; pynetdicom then reports
    # some of those refusals as an abort (54 of 300 in a loop against storescp --refuse), so
    # either is what a refused attempt leaves
    assert bad[0].last_error in ("association rejected", "association aborted")
    job = store.job(job_id)
    assert "delivery to bad failed" in (job.last_error or "")
    # the PACS comes back on the same port; the operator re-sends the dead letters
    port = refusing.port
    refusing.stop()
    back = scps("back", port=port)
    assert store.retry_job(job_id).state == JobState.SENDING
    _drain_until(dispatcher, outbox, lambda: store.job(job_id).state == JobState.DONE)
    assert len(back.received()) == 2
    assert len(good.received()) == 2  # delivered ones are not sent twice


def test_outbox_survives_a_restart(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """Deliveries pending when the process stops are sent by the next process; those left
    ``sending`` go back to pending with their cut-off attempt not counted."""
    files = write_study(slices=2)
    port = free_port()  # nothing listens yet: the PACS is down
    cfg = _config(tmp_path, {"pacs": port})
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, files, ["pacs"])
    dispatcher = Dispatcher(cfg, outbox)
    dispatcher.drain("pacs")
    assert all(i.state == DeliveryState.PENDING and i.attempts == 1 for i in outbox.items())
    # crash mid-send: claimed rows stay 'sending' in the file
    outbox.claim("pacs", now=time.time() + 10)
    del dispatcher, outbox, store
    pacs = scps("pacs", port=port)
    store2 = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox2 = Outbox(store2, cfg.dispatch)
    assert outbox2.recover() == 2
    # the send the node's end cut off does not count: no attempt spent on it
    assert [i.attempts for i in outbox2.items()] == [1, 1]
    _drain_until(
        Dispatcher(cfg, outbox2), outbox2, lambda: store2.job(job_id).state == JobState.DONE
    )
    assert len(pacs.received()) == 2


@pytest.mark.parametrize("option", ["--abort-during", "--abort-after"])
def test_aborts_are_retried(
    tmp_path: Path,
    scps: Callable[..., StoreSCP],
    write_study: Callable[..., list[Path]],
    option: str,
) -> None:
    """A PACS that aborts during or after a C-STORE leaves the result pending for a retry."""
    files = write_study(slices=1)
    aborting = scps("aborting", option)
    cfg = _config(tmp_path, {"pacs": aborting.port})
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, files, ["pacs"])
    Dispatcher(cfg, outbox).drain("pacs")
    [item] = outbox.items()
    assert item.state == DeliveryState.PENDING
    assert item.attempts == 1
    assert store.job(job_id).state == JobState.SENDING


def test_a_slow_pacs_times_out_and_is_retried(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """A PACS slower than our DIMSE timeout: the attempt fails and stays pending; a second
    destination is served by its own thread meanwhile."""
    files = write_study(slices=1)
    slow = scps("slow", "--sleep-during", "5")
    fast = scps("fast")
    cfg = _config(tmp_path, {"slow": slow.port, "fast": fast.port}, dimse_timeout_seconds=1)
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    _job_with_outputs(store, files, ["slow", "fast"])
    dispatcher = Dispatcher(cfg, outbox)
    stop = threading.Event()
    started = time.monotonic()
    dispatcher.kick(stop)
    deadline = time.monotonic() + 10
    while not fast.received():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert time.monotonic() - started < 4, "the slow PACS must not hold back the fast one"
    dispatcher.join(10)
    slow_item = next(i for i in outbox.items() if i.destination == "slow")
    assert slow_item.state == DeliveryState.PENDING
    assert slow_item.attempts == 1


def test_send_and_echo_commands(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """`dicom-node echo NAME` and `dicom-node send FILES --to NAME` for operators."""
    files = write_study(slices=2)
    pacs = scps("pacs")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"destinations: [{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs.port}}},"
        f" {{name: down, ae_title: X, host: 127.0.0.1, port: {free_port()}}}]\n"
        f"storage: {{data_dir: {tmp_path / 'var'}}}\n"
    )
    ok = node_cli("echo", "pacs", "--config", str(cfg))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "status 0x0000" in ok.stdout
    down = node_cli("echo", "down", "--config", str(cfg))
    assert down.returncode == 1
    # pynetdicom marks an association aborted when no connection was made at all
    assert "no connection to 127.0.0.1:" in down.stdout, down.stdout
    assert "aborted" not in down.stdout
    unknown = node_cli("echo", "nowhere", "--config", str(cfg))
    assert unknown.returncode == 2
    assert "no destination named 'nowhere'" in unknown.stderr
    sent = node_cli("send", str(files[0].parent), "--to", "pacs", "--config", str(cfg))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "2 of 2 delivered to pacs" in sent.stdout
    assert len(pacs.received()) == 2


def _as_sr(src: Path, out: Path) -> Path:
    """A copy of a CT file relabelled as a Comprehensive 3D SR (a SOP class the test PACS does
    not accept; its content never leaves the node)."""
    from pydicom.uid import generate_uid

    ds = dcmread(src)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out)
    return out


_CT_ONLY = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[CT]
PresentationContext1 = CTImageStorage\\Uncompressed

[[Profiles]]
[CTOnly]
PresentationContexts = CT
"""


def test_a_sop_class_the_pacs_does_not_accept_is_retried_then_dead_lettered(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """storescp accepting CT only (a PACS without SR storage): the CT output is delivered, the
    other fails with the reason, retries with backoff and is dead-lettered; the dispatcher
    stays usable (nothing is left 'sending')."""
    [ct] = write_study(slices=1)
    sr = _as_sr(ct, tmp_path / "sr.dcm")
    (tmp_path / "ct-only.cfg").write_text(_CT_ONLY)
    pacs = scps("pacs", "-xf", str(tmp_path / "ct-only.cfg"), "CTOnly")
    cfg = _config(tmp_path, {"pacs": pacs.port}, max_attempts=2)
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, [ct, sr], ["pacs"])
    dispatcher = Dispatcher(cfg, outbox)
    _drain_until(dispatcher, outbox, lambda: store.job(job_id).state == JobState.DEAD)
    by_path = {i.path: i for i in outbox.items()}
    assert by_path[ct].state == DeliveryState.DELIVERED
    assert by_path[sr].state == DeliveryState.DEAD and by_path[sr].attempts == 2
    assert "not accepted by the peer" in (by_path[sr].last_error or "")
    assert [dcmread(p).SOPInstanceUID for p in pacs.received()] == [dcmread(ct).SOPInstanceUID]


def test_an_unreadable_output_fails_alone(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """Of two outputs the second is gone from disk: it fails (and retries), the first is
    delivered and recorded as such; each outcome lands on its own outbox row."""
    first, second = write_study(slices=2)
    pacs = scps("pacs")
    cfg = _config(tmp_path, {"pacs": pacs.port})
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, [first, second], ["pacs"])
    gone = dcmread(second).SOPInstanceUID
    second.unlink()
    Dispatcher(cfg, outbox).drain("pacs")
    by_uid = {i.sop_instance_uid: i for i in outbox.items()}
    assert by_uid[gone].state == DeliveryState.PENDING
    assert "cannot read file" in (by_uid[gone].last_error or "")
    [(uid, item)] = [(u, i) for u, i in by_uid.items() if u != gone]
    assert item.state == DeliveryState.DELIVERED
    assert [dcmread(p).SOPInstanceUID for p in pacs.received()] == [uid]
    assert store.job(job_id).state == JobState.SENDING


def test_a_retried_dead_delivery_ages_from_the_retry(
    tmp_path: Path, write_study: Callable[..., list[Path]]
) -> None:
    """A delivery dead-lettered for its age gets its attempts again after `retry`: one more
    failure makes it wait for the next attempt, not dead at once."""
    files = write_study(slices=1)
    cfg = _config(tmp_path, {"pacs": free_port()}, max_age_hours=1.0)
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, files, ["pacs"])
    with store.transaction() as db:  # queued four days ago
        db.execute("UPDATE outbox SET created_at = created_at - 4 * 86400")
    [item] = outbox.claim("pacs")
    assert outbox.failed(item.id, "PACS down") == DeliveryState.DEAD
    assert store.retry_job(job_id).state == JobState.SENDING
    [item] = outbox.claim("pacs")
    assert outbox.failed(item.id, "PACS down") == DeliveryState.PENDING


def test_a_warning_status_counts_as_delivered(
    tmp_path: Path, write_study: Callable[..., list[Path]]
) -> None:
    """O2: a PACS that stores with a warning (0xB000, coercion of data elements; a pynetdicom
    SCP here, since storescp cannot answer one) has the result: delivered, its status kept."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda _e: 0xB000)]
    )
    try:
        files = write_study(slices=1)
        cfg = _config(tmp_path, {"pacs": port})
        store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
        outbox = Outbox(store, cfg.dispatch)
        job_id = _job_with_outputs(store, files, ["pacs"])
        Dispatcher(cfg, outbox).drain("pacs")
        [item] = outbox.items()
        assert (item.state, item.last_status) == (DeliveryState.DELIVERED, 0xB000)
        assert store.job(job_id).state == JobState.DONE
    finally:
        server.shutdown()


def test_a_pacs_that_stalls_mid_pdu_is_given_up_and_retried(
    tmp_path: Path, write_study: Callable[..., list[Path]]
) -> None:
    """A PACS (raw sockets) that accepts the association and the C-STORE, then sends the first
    bytes of a PDU and nothing more: the send gives up after dispatch.network_timeout_seconds
    instead of waiting for ever, the result waits for its retry, and the sending thread is free."""
    import socket
    import struct

    from tests.hardening.pdus import EXPLICIT_VR_LE, IMPLEMENTATION_UID, _ae, _item, pdu

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def pacs() -> None:
        conn, _ = listener.accept()
        with conn:
            header = conn.recv(6)
            body = b""
            while len(body) < struct.unpack(">L", header[2:])[0]:
                body += conn.recv(65536)
            items = _item(0x10, b"1.2.840.10008.3.1.1.1")
            items += _item(0x21, bytes([1, 0, 0, 0]) + _item(0x40, EXPLICIT_VR_LE.encode()))
            user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, IMPLEMENTATION_UID.encode())
            fixed = struct.pack(">HH", 1, 0) + _ae("PACS") + _ae("DICOM_NODE") + bytes(32)
            conn.sendall(pdu(0x02, fixed + items + _item(0x50, user)))
            conn.recv(65536)  # the C-STORE begins
            conn.sendall(struct.pack(">BBL", 0x04, 0, 100) + bytes(10))  # 10 of 100 bytes
            done.wait(60)

    server = threading.Thread(target=pacs, daemon=True)
    server.start()
    try:
        files = write_study(slices=1)
        cfg = _config(tmp_path, {"pacs": port}, network_timeout_seconds=2, dimse_timeout_seconds=2)
        store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
        outbox = Outbox(store, cfg.dispatch)
        job_id = _job_with_outputs(store, files, ["pacs"])
        started = time.monotonic()
        sender = threading.Thread(target=Dispatcher(cfg, outbox).drain, args=("pacs",))
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "the send is still blocked on the stalled PACS"
        assert time.monotonic() - started < 20
        [item] = outbox.items()
        assert item.state == DeliveryState.PENDING and item.attempts == 1
        assert store.job(job_id).state == JobState.SENDING
    finally:
        done.set()
        listener.close()


def test_results_reach_a_pacs_that_takes_only_implicit_vr_little_endian(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """Implicit VR Little Endian is the default transfer syntax every SCP must accept: a PACS
    configured to take only it (storescp +xi) still gets explicit-VR files, re-encoded (the
    node had proposed the files' own syntax alone, and every delivery failed)."""
    from dicom_node.dispatch.scu import Peer, send_files

    files = write_study(slices=2)
    pacs = scps("pacs", "+xi")
    peer = Peer(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port)
    outcomes = send_files(peer, files, calling_ae="DICOM_NODE", settings=Config().dispatch)
    assert [o.delivered for o in outcomes] == [True, True], outcomes
    received = sorted(pacs.received())
    assert [str(dcmread(p).file_meta.TransferSyntaxUID) for p in received] == [
        "1.2.840.10008.1.2"
    ] * 2
    assert sorted(dcmread(p).SOPInstanceUID for p in received) == sorted(
        dcmread(f).SOPInstanceUID for f in files
    )


def test_what_is_recorded_after_a_send_cannot_strand_its_deliveries(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """After the PACS took the files, the audit log cannot be written (a full disk) and the
    job store is held by another process for longer than its own wait: the deliveries are
    recorded once the store is free again and the job is done, where the send thread used to
    die with its rows claimed, leaving them and the job ``sending`` until a restart."""
    import sqlite3

    from dicom_node.audit import AuditLog

    files = write_study(slices=2)
    pacs = scps("pacs")
    cfg = _config(tmp_path, {"pacs": pacs.port})
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite", busy_seconds=0.3)
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, files, ["pacs"])
    audit_path = tmp_path / "audit"
    audit_path.mkdir()  # a folder where the log's file should be: every write fails
    holder = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)

    class LockingAudit(AuditLog):
        def sent(self, **fields: object) -> None:
            if not holder.in_transaction:  # the store is taken just as the PACS answered
                holder.execute("BEGIN IMMEDIATE")
                threading.Timer(2.0, lambda: holder.execute("ROLLBACK")).start()
            super().sent(**fields)

    dispatcher = Dispatcher(cfg, outbox, LockingAudit(audit_path))
    thread = threading.Thread(target=dispatcher.drain, args=("pacs",))
    thread.start()
    thread.join(30)
    holder.close()
    assert not thread.is_alive()
    assert store.job(job_id).state == JobState.DONE
    assert [i.state for i in outbox.items()] == [DeliveryState.DELIVERED] * 2
    assert len(pacs.received()) == 2


def test_a_destination_no_longer_configured_is_dead_lettered_at_once(
    tmp_path: Path, write_study: Callable[..., list[Path]]
) -> None:
    """Results queued for a destination since removed from (or renamed in) the configuration
    can never be delivered: dead-lettered at the first try with the reason, not retried for
    hours; ``dicom-node retry`` then refuses, naming the destination, rather than starting
    the same hopeless cycle again."""
    files = write_study(slices=1)
    cfg = _config(tmp_path, {"pacs": free_port()})
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, files, ["old-pacs"])
    Dispatcher(cfg, outbox).drain("old-pacs")
    [item] = outbox.items()
    assert (item.state, item.attempts) == (DeliveryState.DEAD, 1)
    assert item.last_error == "destination 'old-pacs' is no longer configured"
    assert store.job(job_id).state == JobState.DEAD
    config = tmp_path / "node.yaml"
    config.write_text(
        f"storage: {{data_dir: {cfg.storage.data_dir}}}\n"
        f"destinations: [{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {free_port()}}}]\n"
    )
    store.close()
    refused = node_cli("retry", str(job_id), "--config", str(config))
    assert refused.returncode == 2
    assert "'old-pacs', no longer configured" in refused.stderr


def test_a_newer_version_waits_for_an_older_one_the_pacs_refused_in_the_same_batch(
    tmp_path: Path, write_study: Callable[..., list[Path]]
) -> None:
    """Version 1's result (in backoff: the PACS was down) goes in the batch with version 2's;
    the PACS refuses version 1's once (0xA700, out of resources). Version 2's is not sent in
    that association: it waits, its attempt not counted, until version 1's went through, so
    the PACS stores them in order (a viewer shows the newest SEG it received). A loop pass
    that fails (the job store unreadable) does not end the dispatcher."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    first, second = write_study(slices=2)
    v1 = str(dcmread(first).SOPInstanceUID)
    received: list[str] = []
    refused: set[str] = set()

    def on_store(event: object) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)  # type: ignore[attr-defined]
        if uid == v1 and uid not in refused:
            refused.add(uid)
            return 0xA700
        received.append("v1" if uid == v1 else "v2")
        return 0

    ae = AE("PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    scp = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        cfg = _config(tmp_path, {"pacs": scp.socket.getsockname()[1]})
        store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
        outbox = Outbox(store, cfg.dispatch)
        study = str(dcmread(first).StudyInstanceUID)
        jobs = []
        for n, path in enumerate((first, second), start=1):
            store.record_instance(
                InstanceRecord(f"9.{n}", study, "9", "1.2", "CT", path, 1, "X", time.time())
            )
            job = store.complete_study(study, reason="test")
            assert job is not None and store.claim_next_job() is not None
            ds = dcmread(path)
            output = OutputFile(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
            store.finish_with_outputs(job.id, result={}, outputs=[output], destinations=["pacs"])
            jobs.append(job.id)
            if n == 1:  # the PACS was down: version 1 is in its backoff
                [item] = outbox.claim("pacs")
                outbox.failed(item.id, "no connection")
        dispatcher = Dispatcher(cfg, outbox)
        stop = threading.Event()
        calls = {"n": 0}
        real = outbox.due_destinations

        def flaky(now: float | None = None) -> list[str]:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError("the job store could not be read")
            return real(now)

        outbox.due_destinations = flaky  # type: ignore[method-assign]
        loop = threading.Thread(target=dispatcher.run_forever, args=(stop,), daemon=True)
        loop.start()
        deadline = time.monotonic() + 30
        while (
            store.job(jobs[1]).state != JobState.DONE or store.job(jobs[0]).state != JobState.DONE
        ):
            assert time.monotonic() < deadline and loop.is_alive(), outbox.items()
            dispatcher.wake.set()
            time.sleep(0.1)
        stop.set()
        dispatcher.wake.set()
        loop.join(10)
    finally:
        scp.shutdown()
    assert received == ["v1", "v2"]
    assert [i.attempts for i in outbox.items()] == [3, 1]


def test_a_batch_cut_short_by_an_error_leaves_nothing_claimed(
    tmp_path: Path, scps: Callable[..., StoreSCP], write_study: Callable[..., list[Path]]
) -> None:
    """The job store cannot be read just after a batch was claimed (a disk I/O error): the
    send thread ends with the error, but its rows go back to ``pending``, their attempt not
    counted, and the next pass delivers them, instead of their staying ``sending`` (and the
    job with them) until a restart."""
    import sqlite3

    files = write_study(slices=1)
    pacs = scps("pacs")
    cfg = _config(tmp_path, {"pacs": pacs.port})
    store = JobStore(cfg.storage.data_dir / "jobs.sqlite")
    outbox = Outbox(store, cfg.dispatch)
    job_id = _job_with_outputs(store, files, ["pacs"])
    real = outbox.studies_of

    def failing(job_ids: object) -> dict[int, str]:
        outbox.studies_of = real  # type: ignore[method-assign]
        raise sqlite3.OperationalError("disk I/O error")

    outbox.studies_of = failing  # type: ignore[method-assign]
    dispatcher = Dispatcher(cfg, outbox)
    with pytest.raises(sqlite3.OperationalError):
        dispatcher.drain("pacs")
    [item] = outbox.items()
    assert (item.state, item.attempts) == (DeliveryState.PENDING, 0)
    dispatcher.drain("pacs")
    assert store.job(job_id).state == JobState.DONE
    assert len(pacs.received()) == 1
