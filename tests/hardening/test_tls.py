"""DICOM TLS against the real node (test-matrix X1, X2): dcmtk's and pynetdicom's TLS clients,
and every kind of client that must be refused; our own SCU sending to a TLS destination."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import DestinationTLS, DispatchSettings
from dicom_node.dispatch.scu import Peer, echo, send_files
from tests.hardening.conftest import (
    Baseline,
    Certs,
    audit,
    baseline,
    instances,
    security_codes,
    wait_for,
)
from tests.hardening.pdus import RawPeer
from tests.peers import DCMTK, PEER_ENV, NodeProcess, echoscu

HANDSHAKE_SECONDS = 3.0


def _node_tls(certs: Certs) -> dict[str, str]:
    """The node's ``tls`` section: its certificate and key, and the test CA."""
    return {"cert": str(certs.node_cert), "key": str(certs.node_key), "ca": str(certs.ca)}


@pytest.fixture(scope="module")
def tls_node(module_nodes: Callable[..., NodeProcess], certs: Certs) -> Iterator[Baseline]:
    """A node whose port speaks TLS only and requires client certificates from the test CA."""
    node = module_nodes(
        "tls",
        node={
            "acse_timeout_seconds": HANDSHAKE_SECONDS,
            "network_timeout_seconds": 5.0,
            "tls": {**_node_tls(certs), "require_client_cert": True},
        },
    )
    yield baseline(node, tls=certs.client_context())


def _dcmtk(
    tool: str, port: int, certs: Certs, *args: str, files: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    tls = ["+tls", str(certs.client_key), str(certs.client_cert), "-pw", "+cf", str(certs.ca)]
    return subprocess.run(
        [str(DCMTK / tool), "-aec", "DICOM_NODE", *tls, *args, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        env=PEER_ENV,
        timeout=60,
        check=False,
    )


def test_dcmtk_tls_echo_and_store(
    tls_node: Baseline, certs: Certs, write_study: Callable[..., list[Path]]
) -> None:
    """dcmtk's echoscu and storescu with a client certificate from the trusted CA (BCP 195
    profile, dcmtk's default) are served: C-ECHO succeeds, every instance is stored."""
    node = tls_node.node
    done = _dcmtk("echoscu", node.port, certs)
    assert done.returncode == 0, done.stdout + done.stderr
    files = write_study(slices=3, size=16)
    done = _dcmtk("storescu", node.port, certs, "-R", files=tuple(files))
    assert done.returncode == 0, done.stdout + done.stderr
    from pydicom import dcmread

    assert {str(dcmread(f).SOPInstanceUID) for f in files} <= instances(node)
    tls_node.check()


def test_our_scu_sends_to_a_tls_destination(
    tls_node: Baseline, certs: Certs, write_study: Callable[..., list[Path]]
) -> None:
    """The dispatcher's SCU (pynetdicom with our client context) echoes and stores over TLS to a
    destination that requires its certificate; without the certificate it is refused."""
    node = tls_node.node
    settings = DispatchSettings(connect_timeout_seconds=5, acse_timeout_seconds=5)
    tls = DestinationTLS(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    peer = Peer(name="tlspacs", ae_title="DICOM_NODE", host="127.0.0.1", port=node.port, tls=tls)
    ok, detail = echo(peer, calling_ae="SENDER", settings=settings)
    assert ok, detail
    files = write_study(slices=2, size=16)
    outcomes = send_files(peer, files, calling_ae="SENDER", settings=settings)
    assert [o.delivered for o in outcomes] == [True, True], outcomes
    anonymous = Peer(
        name="tlspacs",
        ae_title="DICOM_NODE",
        host="127.0.0.1",
        port=node.port,
        tls=DestinationTLS(ca=certs.ca),
    )
    ok, _ = echo(anonymous, calling_ae="SENDER", settings=settings)
    assert not ok
    # a destination whose CA file is gone: every file fails with the reason, nothing raises
    broken = Peer(
        name="tlspacs",
        ae_title="DICOM_NODE",
        host="127.0.0.1",
        port=node.port,
        tls=DestinationTLS(ca=certs.ca.with_name("missing.crt")),
    )
    [outcome] = send_files(broken, files[:1], calling_ae="SENDER", settings=settings)
    assert not outcome.delivered
    assert "missing.crt" in outcome.detail
    tls_node.check()


def _refused(port: int, context: ssl.SSLContext | None) -> str:
    """Try to associate; return how it failed (it must fail before any A-ASSOCIATE-AC)."""
    try:
        with RawPeer(port, tls=context, timeout=10) as peer:
            answer = peer.associate()
    except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
        return type(exc).__name__
    raise AssertionError(f"association answered: PDU type 0x{answer.pdu_type:02X}")


@pytest.mark.parametrize(
    ("client", "detail"),
    [
        ("plaintext", "wrong version number"),
        ("no certificate", "peer did not return a certificate"),
        ("untrusted certificate", "certificate verify failed"),
        ("TLS 1.1", "unsupported protocol"),
    ],
)
def test_clients_that_must_be_refused(
    tls_node: Baseline, certs: Certs, client: str, detail: str
) -> None:
    """Plaintext, certificate-less, untrusted and TLS 1.1 clients get no association; each
    refusal is a Security Alert in the audit log saying why (from the node's side)."""
    node = tls_node.node
    contexts: dict[str, ssl.SSLContext | None] = {
        "plaintext": None,
        "no certificate": certs.client_context(with_cert=False),
        "untrusted certificate": certs.client_context(rogue=True),
        "TLS 1.1": certs.client_context(version=ssl.TLSVersion.TLSv1_1),
    }
    before = len(audit(node))
    _refused(node.port, contexts[client])
    wait_for(
        lambda: any(r.get("code") == "tls_handshake_failed" for r in audit(node)[before:]),
        timeout=5,
        what="a tls_handshake_failed audit record",
    )
    [record] = [r for r in audit(node)[before:] if r.get("code") == "tls_handshake_failed"]
    assert detail in record["detail"], record
    assert record["event"] == "Security Alert"
    assert record["peer"] == "127.0.0.1"
    tls_node.check()


def test_dcmtk_without_tls_or_certificate_is_refused(tls_node: Baseline, certs: Certs) -> None:
    """dcmtk's echoscu in plain TCP, or with anonymous TLS (no certificate), cannot associate."""
    node = tls_node.node
    assert echoscu(node.port).returncode != 0
    anonymous = subprocess.run(
        [str(DCMTK / "echoscu"), "-aec", "DICOM_NODE", "+tla", "+cf", str(certs.ca),
         "127.0.0.1", str(node.port)],
        capture_output=True, text=True, env=PEER_ENV, timeout=60, check=False,
    )  # fmt: skip
    assert anonymous.returncode != 0
    tls_node.check()


def test_silent_peers_do_not_stall_tls_associations(tls_node: Baseline, certs: Certs) -> None:
    """X2: raw TCP connections that send nothing sit on the TLS port; a real TLS C-ECHO still
    answers within a second or two, and the silent ones are closed after the handshake
    deadline (acse_timeout_seconds) as failed handshakes."""
    node = tls_node.node
    before = len(audit(node))
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        time.sleep(0.2)  # let the node accept them all
        started = time.monotonic()
        from tests.hardening.conftest import echo as tls_echo

        assert tls_echo(node, tls=tls_node.tls) == 0
        assert time.monotonic() - started < 2.0
        for s in silent:
            s.settimeout(HANDSHAKE_SECONDS + 5)
            assert s.recv(1) == b""  # closed by the node
        took = time.monotonic() - started
        assert took < HANDSHAKE_SECONDS + 3
    finally:
        for s in silent:
            s.close()
    timeouts = [r for r in audit(node)[before:] if r.get("detail") == "handshake timed out"]
    assert len(timeouts) == 3
    tls_node.check()


def test_tls_needs_a_ca_to_require_client_certificates(tmp_path: Path, certs: Certs) -> None:
    """Configuration: require_client_cert without a CA, or a certificate file that is not there,
    fails at start with the key's path and the reason (exit status 2)."""
    from tests.peers import node_cli

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"node: {{tls: {{cert: {certs.node_cert}, key: {certs.node_key}}}}}\n")
    done = node_cli("check-config", str(bad))
    assert done.returncode == 2
    assert "node.tls: require_client_cert: true needs ca" in done.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        "node: {port: 1, host: 127.0.0.1, tls: {cert: /nonexistent.crt, key: /x.key,"
        " require_client_cert: false}}\n"
        f"storage: {{data_dir: {tmp_path / 'var'}}}\nmodel: {{path: null}}\n"
        "service: {http_port: 0}\n"
    )
    done = node_cli("serve", "--config", str(missing), timeout=60)
    assert done.returncode == 2
    assert "node.tls.cert: '/nonexistent.crt' is not a readable file" in done.stderr


def test_security_events_are_counted_in_the_metrics(tls_node: Baseline) -> None:
    """Failed handshakes appear in dicom_node_security_events{reason=...} on /metrics."""
    import urllib.request

    node = tls_node.node
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    line = next(
        x
        for x in text.splitlines()
        if x.startswith('dicom_node_security_events_total{reason="tls_handshake_failed"}')
    )
    assert float(line.split()[-1]) >= 1
    assert security_codes(node)  # and they were audited


def test_a_destination_whose_certificate_fails_says_so(tls_node: Baseline, certs: Certs) -> None:
    """A destination certificate that does not chain to the CA we trust for it fails with
    the handshake's reason (pynetdicom swallows it: it looked like a network outage)."""
    settings = DispatchSettings(connect_timeout_seconds=5, acse_timeout_seconds=5)
    peer = Peer(
        name="tlspacs",
        ae_title="DICOM_NODE",
        host="127.0.0.1",
        port=tls_node.node.port,
        tls=DestinationTLS(
            ca=certs.rogue_cert.with_name("rogue-ca.crt"),
            cert=certs.client_cert,
            key=certs.client_key,
        ),
    )
    ok, detail = echo(peer, calling_ae="SENDER", settings=settings)
    assert not ok
    assert detail.startswith(f"TLS handshake with 127.0.0.1:{tls_node.node.port} failed:"), detail
    assert "certificate" in detail, detail


def test_a_certificate_name_ties_an_ae_title_to_one_certificate(
    module_nodes: Callable[..., NodeProcess], certs: Certs, write_study: Callable[..., list[Path]]
) -> None:
    """With ``certificate_name``, an AE title is served only to the certificate that names it:
    another certificate from the same CA claiming that AE title is refused and audited with
    its name; what the right one sends is audited with the certificate's name."""
    node = module_nodes(
        "bound",
        node={
            "allowed_callers": [{"ae_title": "MODALITY1", "certificate_name": "client"}],
            "tls": _node_tls(certs),
        },
    )
    files = write_study(slices=2, size=16)
    sent = _dcmtk("storescu", node.port, certs, "-aet", "MODALITY1", files=tuple(files))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    impostor = subprocess.run(
        [str(DCMTK / "echoscu"), "-aec", "DICOM_NODE", "-aet", "MODALITY1", "+tls",
         str(certs.node_key), str(certs.node_cert), "-pw", "+cf", str(certs.ca),
         "127.0.0.1", str(node.port)],
        capture_output=True, text=True, env=PEER_ENV, timeout=60, check=False,
    )  # fmt: skip
    assert impostor.returncode != 0
    wait_for(lambda: "caller_not_allowed" in security_codes(node), timeout=10, what="refusal")
    [refused] = [r for r in audit(node) if r.get("code") == "caller_not_allowed"]
    assert (refused["calling_ae"], refused["certificate"]) == ("MODALITY1", "node")
    from pydicom import dcmread

    study = str(dcmread(files[0]).StudyInstanceUID)
    wait_for(lambda: any(r.get("studies") for r in audit(node)), timeout=10, what="audit")
    [begun] = [r for r in audit(node) if r["event"] == "Begin Transferring DICOM Instances"]
    [received] = [r for r in audit(node) if r.get("studies")]
    assert (begun["study"], begun["certificate"]) == (study, "client")
    assert (received["studies"], received["certificate"]) == ({study: 2}, "client")


def test_a_private_key_every_user_can_read_is_refused(tmp_path: Path, certs: Certs) -> None:
    """The node's TLS key readable by every user stops the start, naming the key."""
    from dicom_node.config import TLSSettings
    from dicom_node.errors import ConfigError
    from dicom_node.receive.tls import server_context

    key = tmp_path / "node.key"
    key.write_bytes(certs.node_key.read_bytes())
    key.chmod(0o640)
    settings = TLSSettings(cert=certs.node_cert, key=key, ca=certs.ca)
    server_context(settings)  # the service's group may read it
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"node\.tls\.key: .* can be read by every user"):
        server_context(settings)


def test_replies_to_a_known_peer_can_go_over_tls(certs: Certs) -> None:
    """``dispatch.known_peers[].tls`` is a destination's: a study that came over TLS need
    not have its results go back in the clear."""
    from dicom_node.config import load_config
    from dicom_node.dispatch.routing import resolve

    config = load_config(
        overrides={
            "dispatch": {
                "reply_to_sender": True,
                "known_peers": [
                    {"ae_title": "MOD1", "host": "127.0.0.1", "port": 2762,
                     "tls": {"ca": str(certs.ca)}},
                ],
            }
        }
    )  # fmt: skip
    peer = resolve(config, "reply:MOD1")
    assert peer is not None and peer.tls is not None and peer.tls.ca == certs.ca


def test_a_refused_tls_caller_leaves_no_certificate_behind(
    receiver_in_process: Callable[..., Any], certs: Certs
) -> None:
    """A TLS caller refused for its AE title (and one calling another AE title): the name
    read from its certificate is forgotten with the association, where it had been kept for
    good, one entry per refusal (and could have been taken, for a reused id, for another
    association's certificate in the audit)."""
    node = receiver_in_process(
        node={
            "allowed_callers": [{"ae_title": "MODALITY1", "certificate_name": "client"}],
            "tls": _node_tls(certs),
        }
    )
    for called, calling in (("DICOM_NODE", "INTRUDER"), ("ELSEWHERE", "MODALITY1")) * 3:
        refused = subprocess.run(
            [str(DCMTK / "echoscu"), "-aec", called, "-aet", calling, "+tls",
             str(certs.client_key), str(certs.client_cert), "-pw", "+cf", str(certs.ca),
             "127.0.0.1", str(node.port)],
            capture_output=True, text=True, env=PEER_ENV, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode != 0
    wait_for(lambda: not node.receiver._live, timeout=10, what="the associations to end")
    assert node.receiver._certificates == {}
