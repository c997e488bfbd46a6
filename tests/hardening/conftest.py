"""Fixtures for the hardening tests: certificates made now, nodes shared by a module, and the
pass condition every fault test ends with (the node alive, C-ECHO answered, threads back)."""

from __future__ import annotations

import json
import os
import sqlite3
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.pdus import RawPeer
from tests.peers import NodeProcess, node_starter


@dataclass(frozen=True)
class Certs:
    """A test PKI: a CA, the node's and a client's certificates, and a stranger's (own CA)."""

    ca: Path
    node_cert: Path
    node_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def client_context(
        self, *, with_cert: bool = True, rogue: bool = False, version: ssl.TLSVersion | None = None
    ) -> ssl.SSLContext:
        """A client context trusting the CA, with our (or the stranger's) certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca)
        if with_cert:
            cert, key = (self.rogue_cert, self.rogue_key) if rogue else (
                self.client_cert, self.client_key
            )  # fmt: skip
            ctx.load_cert_chain(cert, key)
        if version is not None:
            # an old client: offer only this version (OpenSSL needs security level 0 for it)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, on purpose
                ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                ctx.maximum_version = version
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        return ctx


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, ca: str, usage: str) -> None:
    (folder / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out",
             f"{name}.crt", cwd=folder)  # fmt: skip


def _make_ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.crt", "-days", "2", "-sha256", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Certificates made with the openssl command line, valid for two days."""
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "test-ca")
    _make_ca(folder, "rogue-ca")
    _issue(folder, "node", "test-ca", "serverAuth,clientAuth")
    _issue(folder, "client", "test-ca", "clientAuth")
    _issue(folder, "rogue", "rogue-ca", "clientAuth")
    return Certs(
        ca=folder / "test-ca.crt",
        node_cert=folder / "node.crt",
        node_key=folder / "node.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
        rogue_cert=folder / "rogue.crt",
        rogue_key=folder / "rogue.key",
    )


@pytest.fixture(scope="module")
def module_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., NodeProcess]]:
    """Like ``node_factory``, for nodes that one module's tests share (starting costs ~1 s)."""
    yield from node_starter(tmp_path_factory.mktemp)


# -- looking at a running node ----------------------------------------------------------------


def pid(node: NodeProcess) -> int:
    assert node.proc is not None, "node not running"
    return node.proc.pid


def threads(node: NodeProcess) -> int:
    """Threads of the node process now."""
    return len(os.listdir(f"/proc/{pid(node)}/task"))


def peak_rss_mib(node: NodeProcess) -> float:
    """Highest resident memory of the node process so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid(node)}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def rss_mib(node: NodeProcess) -> float:
    """Resident memory of the node process, MiB."""
    for line in Path(f"/proc/{pid(node)}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def instances(node: NodeProcess) -> set[str]:
    """SOP Instance UIDs in the job store."""
    with sqlite3.connect(node.data_dir / "jobs.sqlite") as db:
        return {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}


def stray_files(node: NodeProcess) -> list[Path]:
    """Half-written files anywhere under the data folder."""
    return sorted(node.data_dir.rglob("*.part"))


def audit(node: NodeProcess) -> list[dict[str, Any]]:
    """The node's audit records."""
    path = node.data_dir / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def security_codes(node: NodeProcess) -> list[str]:
    """The ``code`` of every Security Alert in the audit log, in order."""
    return [r.get("code", "") for r in audit(node) if r["event"] == "Security Alert"]


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def echo(node: NodeProcess, *, tls: ssl.SSLContext | None = None, calling: str = "PROBE") -> int:
    """C-ECHO over a raw association; returns the status (raises if refused)."""
    with RawPeer(node.port, tls=tls) as peer:
        answer = peer.associate(calling=calling)
        assert answer.pdu_type == 0x02, f"association not accepted: {answer}"
        status = peer.echo()
        peer.release()
        return status


#: How far above its baseline the node's resident memory may be after a fault (MiB).
MEMORY_SLACK_MIB = 150.0


@dataclass
class Baseline:
    """The node at rest: its threads, memory, and how to reach it."""

    node: NodeProcess
    threads: int
    rss_mib: float
    tls: ssl.SSLContext | None = None

    def check(self, *, settle: float = 10.0, memory_mib: float = MEMORY_SLACK_MIB) -> None:
        """The pass condition after a fault: the process is alive, C-ECHO answers, every
        association thread has ended (the thread count is back to the baseline), and resident
        memory is within ``memory_mib`` of the baseline (the allocator keeps some of what a
        burst used; a leak per association or per instance would grow past it)."""
        assert self.node.proc is not None and self.node.proc.poll() is None, "node died"
        assert echo(self.node, tls=self.tls) == 0
        wait_for(
            lambda: threads(self.node) <= self.threads,
            timeout=settle,
            what=f"threads back to {self.threads} (now {threads(self.node)})",
        )
        now = rss_mib(self.node)
        assert now < self.rss_mib + memory_mib, (
            f"resident memory {now:.0f} MiB, {now - self.rss_mib:.0f} MiB above the baseline"
        )


def baseline(node: NodeProcess, *, tls: ssl.SSLContext | None = None) -> Baseline:
    """Measure the node at rest, after one C-ECHO (so that lazily made threads exist).

    Waits out the ACSE timeout first: the probe that found the port open left a connection
    without an association, whose thread pynetdicom keeps until then.
    """
    acse = float(node.settings.get("node", {}).get("acse_timeout_seconds", 30.0))
    assert acse <= 5, "give nodes under test a short acse_timeout_seconds"
    time.sleep(acse + 0.3)
    assert echo(node, tls=tls) == 0
    last = -1
    stable_since = time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = threads(node)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since > 0.5:
            break
        time.sleep(0.05)
    return Baseline(node=node, threads=last, rss_mib=rss_mib(node), tls=tls)
