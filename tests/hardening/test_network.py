"""Network and association faults against the real node (test-matrix N1-N7), with hand-built
PDUs from a raw socket. Every test ends with the pass condition: the node alive, C-ECHO
answered, every association thread ended."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hardening.conftest import (
    Baseline,
    audit,
    baseline,
    echo,
    instances,
    security_codes,
    stray_files,
    wait_for,
)
from tests.hardening.pdus import (
    A_ABORT,
    A_ASSOCIATE_AC,
    COMMAND,
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LE,
    LAST,
    P_DATA_TF,
    Context,
    RawPeer,
    abort,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    dataset_of,
    fragments,
    p_data,
    pdu,
    release_rq,
)
from tests.peers import NodeProcess

TIMEOUT = 2.0  # network and ACSE timeout of the node under test, seconds
MAX_PDU = 16384
PENDING = 6  # connections without an association: twice max_associations
CALLERS = ["RAWPEER", "PROBE", "HOLDER", "OTHER"]


@pytest.fixture(scope="module")
def node(module_nodes: Callable[..., NodeProcess]) -> Iterator[Baseline]:
    """A node with small limits and timeouts: 3 associations, 2 per caller, 2 s timeouts."""
    proc = module_nodes(
        "net",
        node={
            "max_associations": 3,
            "max_associations_per_caller": 2,
            "network_timeout_seconds": TIMEOUT,
            "acse_timeout_seconds": TIMEOUT,
            "max_pdu_bytes": MAX_PDU,
            "allowed_callers": [{"ae_title": ae} for ae in CALLERS],
        },
    )
    yield baseline(proc)


CT = Context(1, CT_IMAGE_STORAGE, (EXPLICIT_VR_LE,))


def test_n1_caller_not_on_the_allow_list(node: Baseline) -> None:
    """N1: a calling AE not on the allow list gets A-ASSOCIATE-RJ (rejected-permanent, calling
    AE not recognised), recorded as a security event with the caller's AE and address."""
    with RawPeer(node.node.port) as peer:
        answer = peer.associate(calling="INTRUDER")
    assert answer.reject_reason() == (1, 1, 3)
    [record] = [r for r in audit(node.node) if r.get("calling_ae") == "INTRUDER"]
    assert (record["event"], record["code"], record["peer"]) == (
        "Security Alert",
        "caller_not_allowed",
        "127.0.0.1",
    )
    node.check()


def test_n2_wrong_called_ae(node: Baseline) -> None:
    """N2: an association to another called AE title is rejected (called AE not recognised)."""
    with RawPeer(node.node.port) as peer:
        answer = peer.associate(called="SOMEONE_ELSE")
    assert answer.reject_reason() == (1, 1, 7)
    node.check()


def test_n3_only_unsupported_contexts(
    node: Baseline, write_study: Callable[..., list[Path]]
) -> None:
    """N3: an unknown SOP class, a lossy and an unknown transfer syntax are each rejected in the
    A-ASSOCIATE-AC; a C-STORE sent anyway on a rejected context aborts the association and
    nothing is stored."""
    data, _, sop_class, sop_instance = dataset_of(write_study(slices=1, size=16)[0])
    contexts = [
        Context(1, "1.2.3.4.5.6.7.8.9", (EXPLICIT_VR_LE,)),
        Context(3, CT_IMAGE_STORAGE, ("1.2.840.10008.1.2.4.50",)),  # JPEG baseline (lossy)
        Context(5, CT_IMAGE_STORAGE, ("1.2.3.999",)),
    ]
    with RawPeer(node.node.port) as peer:
        answer = peer.associate(contexts)
        assert answer.pdu_type == A_ASSOCIATE_AC
        results = {cx: result for cx, (result, _) in answer.accepted().items()}
        assert results == {1: 3, 3: 4, 5: 4}  # abstract syntax / transfer syntax not supported
        for frame in fragments(3, c_store_rq(sop_class, sop_instance), command=True):
            peer.send(frame)
        for frame in fragments(3, data, command=False):
            peer.send(frame)
        _, seen = peer.wait_closed(TIMEOUT + 3)
    assert A_ABORT in seen
    assert sop_instance not in instances(node.node)
    assert not node.node.spooled()
    node.check()


def _closed_by_node(sock: socket.socket, timeout: float) -> float:
    """Seconds until the node closes ``sock`` (fails if it stays open past ``timeout``)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def _connect_from(host: str, port: int) -> socket.socket:
    """A connection to the node from another loopback address (another "host")."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def test_n4_idle_sockets_cannot_hold_the_node(node: Baseline) -> None:
    """N4: idle sockets (connected, silent) are bounded apart from associations: one host may
    hold half of the slots (its next connection is closed at once) and does not stop
    another's C-ECHO; past the bound in all, a connection is closed at once; all are closed
    after acse_timeout_seconds and their slots come back. Connections their peer has closed
    count no more (a host probing the port cannot lock the others out)."""
    port = node.node.port
    share = PENDING // 2
    for _ in range(2 * PENDING):  # connect and close: no slot stays taken
        _connect_from("127.0.0.4", port).close()
    time.sleep(0.3)
    assert echo(node.node) == 0
    idle = [_connect_from("127.0.0.2", port) for _ in range(share)]
    try:
        time.sleep(0.2)
        with _connect_from("127.0.0.2", port) as extra:
            assert _closed_by_node(extra, 1.0) < 1.0  # that host's share is taken
        assert echo(node.node) == 0  # another host's association goes ahead
        idle += [_connect_from("127.0.0.3", port) for _ in range(PENDING - share)]
        time.sleep(0.2)
        with _connect_from("127.0.0.4", port) as extra:
            assert _closed_by_node(extra, 1.0) < 1.0  # the bound in all is reached
        took = max(_closed_by_node(s, TIMEOUT + 3) for s in idle)
        assert took < TIMEOUT + 2
    finally:
        for s in idle:
            s.close()
    assert "connection_limit" in security_codes(node.node)
    node.check()


def test_n4_association_limits_total_and_per_caller(node: Baseline) -> None:
    """N4: past max_associations_per_caller a caller's next association, and past
    max_associations anyone's, gets A-ASSOCIATE-RJ (rejected-transient, local limit exceeded);
    a release gives the slot back; idle associations are aborted after the network timeout."""
    port = node.node.port
    held = [RawPeer(port) for _ in range(3)]
    try:
        assert held[0].associate(calling="HOLDER").pdu_type == A_ASSOCIATE_AC
        assert held[1].associate(calling="HOLDER").pdu_type == A_ASSOCIATE_AC
        with RawPeer(port) as third:
            assert third.associate(calling="HOLDER").reject_reason() == (2, 3, 2)
        assert held[2].associate(calling="OTHER").pdu_type == A_ASSOCIATE_AC
        with RawPeer(port) as fourth:
            assert fourth.associate(calling="OTHER").reject_reason() == (2, 3, 2)
        held[0].release()
        held[0].close()
        with RawPeer(port) as again:
            assert again.associate(calling="HOLDER").pdu_type == A_ASSOCIATE_AC
            again.release()
        # the silent associations are aborted by the node's network timeout
        for peer in held[1:]:
            _, seen = peer.wait_closed(TIMEOUT + 3)
            assert A_ABORT in seen
    finally:
        for peer in held:
            peer.close()
    codes = security_codes(node.node)
    assert "caller_limit" in codes
    assert "association_limit" in codes
    node.check()


def test_n5_half_a_pdu_then_silence(node: Baseline) -> None:
    """N5: a peer that sends half a PDU and stalls (or trickles it byte by byte) is cut off
    within the network timeout; another association meanwhile is served at once."""
    port = node.node.port
    frame = p_data([(1, COMMAND | LAST, c_echo_rq() + bytes(900))])
    stalled = RawPeer(port)
    trickle = RawPeer(port)
    early = socket.create_connection(("127.0.0.1", port))
    try:
        assert stalled.associate().pdu_type == A_ASSOCIATE_AC
        assert trickle.associate(calling="PROBE").pdu_type == A_ASSOCIATE_AC
        early.sendall(associate_rq([CT])[:3])  # half a PDU header before any association
        stalled.send(frame[:100])
        stop = threading.Event()

        def drip() -> None:
            for byte in frame:
                if stop.wait(0.3):
                    return
                try:
                    trickle.send(bytes([byte]))
                except OSError:
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        started = time.monotonic()
        assert echo(node.node, calling="OTHER") == 0
        assert time.monotonic() - started < 1.0
        for peer in (stalled, trickle):
            peer.wait_closed(TIMEOUT + 3)
            assert time.monotonic() - started < TIMEOUT + 1.5
        assert _closed_by_node(early, TIMEOUT + 3) < TIMEOUT + 2
        stop.set()
        dripper.join(5)
    finally:
        stalled.close()
        trickle.close()
        early.close()
    assert security_codes(node.node).count("peer_stalled") >= 2
    node.check()


def _assoc_then(frame: bytes) -> bytes:
    return associate_rq([Context(1, "1.2.840.10008.1.1")]) + frame


MALFORMED: dict[str, tuple[bool, bytes]] = {
    # name: (associate first, bytes sent)
    "unknown type before association": (False, pdu(0x09, bytes(10))),
    "unknown type after association": (True, pdu(0x11, b"\x01\x02\x03\x04")),
    "association request shorter than its length": (False, associate_rq([CT])[:6] + bytes(4)),
    "association request length zero": (False, pdu(0x01, b"")),
    "association request length 4 GiB": (False, pdu(0x01, bytes(8), length=0xFFFFFFFF)),
    "release before association": (False, release_rq()),
    "PDV longer than its PDU": (True, pdu(P_DATA_TF, struct.pack(">LBB", 5000, 1, 3) + bytes(10))),
    "PDV of length zero": (True, pdu(P_DATA_TF, struct.pack(">L", 0))),
    "unknown presentation context id": (True, p_data([(99, COMMAND | LAST, c_echo_rq())])),
    "P-DATA longer than advertised": (True, pdu(P_DATA_TF, bytes(8), length=MAX_PDU + 1)),
    "P-DATA of 4 GiB": (True, pdu(P_DATA_TF, bytes(8), length=0xFFFFFFFF)),
    "garbage command set": (True, p_data([(1, COMMAND | LAST, bytes(range(256)) * 4)])),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_n6_malformed_pdus(node: Baseline, name: str) -> None:
    """N6: malformed PDUs (unknown type, bad lengths, unknown context id, oversized) end the
    connection (A-ABORT or close) within the timeouts; the node survives and answers C-ECHO.
    A PDU longer than we advertised is aborted before its body is read."""
    first, frame = MALFORMED[name]
    with RawPeer(node.node.port) as peer:
        if first:
            assert peer.associate([Context(1, "1.2.840.10008.1.1")]).pdu_type == A_ASSOCIATE_AC
        peer.send(frame)
        took, seen = peer.wait_closed(TIMEOUT + 3)
    assert A_ASSOCIATE_AC not in seen
    if "4 GiB" in name or "advertised" in name:
        assert seen == [A_ABORT]
        assert took < 1.0
        assert security_codes(node.node)[-1] == "pdu_too_long"
    node.check()


@pytest.mark.parametrize("how", ["A-ABORT", "TCP reset"])
def test_n7_abort_in_the_middle_of_a_c_store(
    node: Baseline, write_study: Callable[..., list[Path]], how: str
) -> None:
    """N7: a peer that aborts (A-ABORT, or a TCP reset) after half the data set's fragments
    leaves no file, no half-written file and no job-store row; the same instance sent whole
    afterwards is stored."""
    data, _, sop_class, sop_instance = dataset_of(write_study(slices=1, size=256)[0])
    frames = list(fragments(1, data, command=False, max_pdu=MAX_PDU))
    assert len(frames) >= 4
    peer = RawPeer(node.node.port)
    try:
        assert peer.associate([CT]).pdu_type == A_ASSOCIATE_AC
        for frame in fragments(1, c_store_rq(sop_class, sop_instance), command=True):
            peer.send(frame)
        for frame in frames[: len(frames) // 2]:
            peer.send(frame)
        if how == "A-ABORT":
            peer.send(abort())
        else:
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        peer.close()
    wait_for(lambda: echo(node.node) == 0, timeout=5, what="C-ECHO")
    assert sop_instance not in instances(node.node)
    assert not [p for p in node.node.spooled() if p.stem == sop_instance]
    assert not stray_files(node.node)
    with RawPeer(node.node.port) as again:
        assert again.associate([CT]).pdu_type == A_ASSOCIATE_AC
        status = again.store(1, data, sop_class=sop_class, sop_instance=sop_instance)
        again.release()
    assert status == 0
    assert sop_instance in instances(node.node)
    node.check()


def test_a_data_set_longer_than_allowed_is_aborted_before_it_fills_the_memory(
    module_nodes: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """N6/D: a C-STORE whose data set runs past node.max_dataset_mb (1 MiB here) without
    ending: the association is aborted at the fragment that passes it, a security event says
    so, the node's memory stays where it was; a CT slice under the limit is stored after."""
    proc = module_nodes(
        "dataset",
        node={
            "max_dataset_mb": 1,
            "network_timeout_seconds": TIMEOUT,
            "acse_timeout_seconds": TIMEOUT,
            "max_pdu_bytes": MAX_PDU,
        },
    )
    node = baseline(proc)
    data, _, sop_class, sop_instance = dataset_of(write_study(slices=1, size=128)[0])
    with RawPeer(proc.port) as peer:
        assert peer.associate([CT]).pdu_type == A_ASSOCIATE_AC
        for frame in fragments(1, c_store_rq(sop_class, sop_instance), command=True):
            peer.send(frame)
        chunk = MAX_PDU - 6
        sent = 0
        with pytest.raises(OSError):  # the node aborts and closes: a send fails
            for _ in range(8 * 1024 * 1024 // chunk):  # 8 MiB, no last fragment
                peer.send(p_data([(1, 0, bytes(chunk))]))
                sent += chunk
            peer.wait_closed(TIMEOUT + 3)
            raise OSError("not closed")
    assert sent < 8 * 1024 * 1024 - chunk  # the node closed before the end
    [alert] = [r for r in audit(proc) if r.get("code") == "dataset_too_long"]
    # refused at the fragment that passed the limit (what the sender got out beyond it sat in
    # the kernels' socket buffers)
    assert 1024 * 1024 < alert["length"] <= 1024 * 1024 + chunk
    assert security_codes(proc)[-1] == "dataset_too_long"
    assert sop_instance not in instances(proc)
    with RawPeer(proc.port) as again:
        assert again.associate([CT]).pdu_type == A_ASSOCIATE_AC
        status = again.store(1, data, sop_class=sop_class, sop_instance=sop_instance)
        again.release()
    assert status == 0
    node.check()


def test_an_association_whose_reactor_fails_is_still_audited_and_released(
    node: Baseline, write_study: Callable[..., list[Path]]
) -> None:
    """N6: after a stored instance, a PDV of length 1 makes pynetdicom's reactor fail: no
    release or abort event comes. The node still ends the association as aborted: its audit
    record says what it sent, its slot comes back, and the node goes on."""
    data, _, sop_class, sop_instance = dataset_of(write_study(slices=1)[0])
    before = len(audit(node.node))
    with RawPeer(node.node.port) as peer:
        assert peer.associate([CT]).pdu_type == A_ASSOCIATE_AC
        assert peer.store(1, data, sop_class=sop_class, sop_instance=sop_instance) == 0
        peer.send(pdu(P_DATA_TF, struct.pack(">LB", 1, 1)))
        peer.wait_closed(TIMEOUT + 3)
    wait_for(
        lambda: any(r["event"] == "DICOM Instances Transferred" for r in audit(node.node)[before:]),
        timeout=10,
        what="the audit record of the failed association",
    )
    [record] = [r for r in audit(node.node)[before:] if r["event"] == "DICOM Instances Transferred"]
    assert record["outcome"] == "association aborted"
    assert sop_instance in instances(node.node)
    node.check()


def test_n5_a_data_set_dripped_a_few_bytes_at_a_time_is_aborted(node: Baseline) -> None:
    """N5: each PDU whole and in time, but a data set of two bytes every half second: once it
    has taken longer than the network timeout at under 8 KiB/s, the association is aborted
    (it would otherwise hold its slot for good)."""
    with RawPeer(node.node.port) as peer:
        assert peer.associate([CT]).pdu_type == A_ASSOCIATE_AC
        peer.send(p_data([(1, COMMAND | LAST, c_store_rq(CT_IMAGE_STORAGE, "1.2.3.4"))]))
        started = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - started < 20:
                peer.send(p_data([(1, 0, b"\0\0")]))
                time.sleep(0.5)
    assert time.monotonic() - started < TIMEOUT + 8
    assert "peer_too_slow" in security_codes(node.node)
    node.check()


def test_a_command_set_that_never_ends_is_aborted(node: Baseline) -> None:
    """N6: command-set fragments, none of them the last, each PDU whole and in time: once the
    command passes 64 KiB (a C-STORE-RQ's is a few hundred bytes) the association is aborted,
    where pynetdicom would gather it in memory without end."""
    with RawPeer(node.node.port) as peer:
        assert peer.associate([CT]).pdu_type == A_ASSOCIATE_AC
        sent = 0
        with pytest.raises(OSError):
            for _ in range(4 * 1024 * 1024 // (MAX_PDU - 12)):  # 4 MiB of command
                peer.send(p_data([(1, COMMAND, bytes(MAX_PDU - 12))]))
                sent += MAX_PDU - 12
            peer.wait_closed(TIMEOUT + 3)
            raise OSError("not closed")
    assert sent < 4 * 1024 * 1024 - MAX_PDU
    [alert] = [r for r in audit(node.node) if r.get("code") == "command_too_long"]
    assert 64 * 1024 < alert["length"] <= 64 * 1024 + MAX_PDU
    node.check()


def test_a_request_sent_before_the_previous_one_was_answered_is_aborted(
    node: Baseline, write_study: Callable[..., list[Path]]
) -> None:
    """N6: the node negotiates no asynchronous operations (PS3.7 D.3.3.3), so a peer must wait
    for each response. C-STOREs sent back to back without waiting would be queued in memory
    while the spool files them one by one: the second request aborts the association. A peer
    that waits for each response stores as many as it likes."""
    paths = write_study(slices=3, size=16)
    with RawPeer(node.node.port) as peer:
        assert peer.associate([CT]).pdu_type == A_ASSOCIATE_AC
        with pytest.raises(OSError):
            for message_id, path in enumerate(paths, start=1):
                data, _, sop_class, sop_instance = dataset_of(path)
                frames = fragments(1, c_store_rq(sop_class, sop_instance, message_id), command=True)
                for frame in [*frames, *fragments(1, data, command=False)]:
                    peer.send(frame)
            peer.wait_closed(TIMEOUT + 3)
            raise OSError("not closed")
    assert "request_before_response" in security_codes(node.node)
    with RawPeer(node.node.port) as peer:
        assert peer.associate([CT]).pdu_type == A_ASSOCIATE_AC
        for path in paths:
            data, _, sop_class, sop_instance = dataset_of(path)
            assert peer.store(1, data, sop_class=sop_class, sop_instance=sop_instance) == 0
        peer.release()
    node.check()


def test_a_pdu_on_a_slow_but_steady_link_is_stored(
    module_nodes: Callable[..., NodeProcess], write_study: Callable[..., list[Path]]
) -> None:
    """N5: a link at 12 KiB/s, above the 8 KiB/s a data set must keep to, carrying a PDU of
    50 KiB: it takes 4 s, twice the network timeout. The PDU's deadline is what the slowest
    rate allowed needs for its length, and the association is not taken for idle while its
    bytes arrive (pynetdicom's own idle timer counts whole PDUs), so the instance is stored."""
    proc = module_nodes(
        "slowlink",
        node={
            "network_timeout_seconds": TIMEOUT,
            "acse_timeout_seconds": TIMEOUT,
            "max_pdu_bytes": 65536,
        },
    )
    data, _, sop_class, sop_instance = dataset_of(write_study(slices=1, size=160)[0])
    assert len(data) > 48 * 1024
    with RawPeer(proc.port, timeout=30) as peer:
        assert peer.associate([CT], max_pdu=65536).pdu_type == A_ASSOCIATE_AC
        peer.send(p_data([(1, COMMAND | LAST, c_store_rq(sop_class, sop_instance))]))
        frame = p_data([(1, LAST, data[: 65536 - 12])])
        assert len(data) <= 65536 - 12, "one PDU"
        started = time.monotonic()
        for i in range(0, len(frame), 768):  # 768 bytes every 1/16 s: 12 KiB/s
            peer.send(frame[i : i + 768])
            time.sleep(1 / 16)
        assert time.monotonic() - started > 1.5 * TIMEOUT
        status = int(struct.unpack("<H", peer.response()[0x0900])[0])
        peer.release()
    assert status == 0
    assert sop_instance in instances(proc)
    assert "peer_stalled" not in security_codes(proc)


def test_a_large_pdu_header_then_silence_is_cut_off_in_the_network_timeout(
    module_nodes: Callable[..., NodeProcess],
) -> None:
    """N5: a P-DATA header announcing the largest PDU allowed, then silence (or a byte a
    second): the time a PDU is given grows only with the bytes that actually arrive, so the
    association is aborted after the network timeout, as for any stalled PDU, not after what
    the announced length would take at the slowest rate allowed (minutes)."""
    proc = module_nodes(
        "silent",
        node={
            "network_timeout_seconds": TIMEOUT,
            "acse_timeout_seconds": TIMEOUT,
            "max_pdu_bytes": 1 << 20,
        },
    )
    for drip in (False, True):
        with RawPeer(proc.port, timeout=30) as peer:
            assert peer.associate([CT], max_pdu=1 << 20).pdu_type == A_ASSOCIATE_AC
            peer.send(struct.pack(">BBL", P_DATA_TF, 0, (1 << 20) - 6))
            started = time.monotonic()
            with pytest.raises(OSError):
                while time.monotonic() - started < 30:
                    if drip:
                        peer.send(b"\0")
                    time.sleep(1.0)
                    peer.sock.settimeout(0.01)
                    with contextlib.suppress(TimeoutError):
                        if peer.sock.recv(1024) == b"":
                            raise OSError("closed")
            assert time.monotonic() - started < TIMEOUT + 4
    assert "peer_stalled" in security_codes(proc)
