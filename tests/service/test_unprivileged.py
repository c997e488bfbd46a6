"""X4 without systemd: the node as an unprivileged user, port 104 (or another port below 1024
where 104 is taken) through one capability.

The unit runs the node as ``User=dicom-node`` with ``AmbientCapabilities=CAP_NET_BIND_SERVICE``
and a bounding set of that capability alone. systemd cannot run as PID 1 where this suite runs,
so util-linux's ``setpriv`` makes the same process state: another user and group, no
supplementary groups, ``no_new_privs``, the bounding set cut to CAP_NET_BIND_SERVICE and that
capability ambient. The node is then a real unprivileged process on a real privileged port.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.peers import NodeProcess, echoscu, storescu

USER, GROUP = "nobody", "nogroup"


def _privileged_port() -> int:
    """104 (DICOM's), or the first free port below 1024 counting down from 1023."""
    for port in (104, *range(1023, 600, -1)):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on 127.0.0.1")


def _setpriv(*, capability: bool) -> list[str]:
    words = ["setpriv", f"--reuid={USER}", f"--regid={GROUP}", "--clear-groups", "--no-new-privs"]
    if capability:
        return [
            *words,
            "--bounding-set=-all,+net_bind_service",
            "--inh-caps=-all,+net_bind_service",
            "--ambient-caps=+net_bind_service",
        ]
    return [*words, "--bounding-set=-all", "--inh-caps=-all"]


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder the unprivileged user can reach (pytest's own tmp folders are root's alone),
    its data folder owned by that user."""
    if os.geteuid() != 0:
        pytest.skip(
            "absent: root, which changing to another user needs (./quickstart test runs as root)"
        )
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv missing (util-linux)")
    reach = subprocess.run(
        [*_setpriv(capability=False), sys.executable, "-c", "import dicom_node"],
        capture_output=True,
        text=True,
        check=False,
    )
    if reach.returncode != 0:
        pytest.skip(
            f"absent: a Python environment {USER} can run (this checkout's is closed to other"
            f" users): {reach.stderr[-200:]}"
        )
    root = Path(tempfile.mkdtemp(prefix="dicom-node-x4-"))
    root.chmod(0o755)
    data = root / "var"
    data.mkdir()
    entry = pwd.getpwnam(USER)
    os.chown(data, entry.pw_uid, entry.pw_gid)
    data.chmod(0o750)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def port(shared_root: Path) -> int:
    """A free port below 1024 (after the checks of ``shared_root``: only root can bind one)."""
    return _privileged_port()


def _owned_outside(uid: int, folders: list[Path], inside: Path) -> list[Path]:
    found = []
    for folder in folders:
        for path in folder.rglob("*") if folder.exists() else ():
            try:
                if path.lstat().st_uid == uid and inside not in path.parents:
                    found.append(path)
            except OSError:
                continue
    return found


def test_unprivileged_node_binds_104_with_the_capability_and_writes_only_its_data(
    shared_root: Path, port: int, write_study: Callable[..., list[Path]]
) -> None:
    """As ``nobody`` with CAP_NET_BIND_SERVICE alone: it binds 127.0.0.1:104, answers C-ECHO,
    stores a study in its data folder (files owned by that user), and leaves no file of that
    user in /tmp, /var/tmp or /dev/shm; SIGTERM ends it cleanly."""
    uid = pwd.getpwnam(USER).pw_uid
    node = NodeProcess(root=shared_root, port=port, prefix=_setpriv(capability=True))
    node.start()
    try:
        assert node.proc is not None
        status = Path(f"/proc/{node.proc.pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Uid"].split()[0] == str(uid)
        assert int(fields["CapEff"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
        assert echoscu(port).returncode == 0
        files = write_study(slices=4)
        assert storescu(files, port).returncode == 0
        spooled = node.spooled()
        assert len(spooled) == len(files)
        assert all(p.stat().st_uid == uid for p in spooled)
    finally:
        if node.proc is not None:
            assert node.terminate() == 0
    strays = _owned_outside(uid, [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")], shared_root)
    assert strays == []


def test_without_the_capability_port_104_is_refused(shared_root: Path, port: int) -> None:
    """The same user without CAP_NET_BIND_SERVICE cannot bind 104: the node exits with an
    error saying so, and nothing listens."""
    node = NodeProcess(root=shared_root, port=port, prefix=_setpriv(capability=False))
    with pytest.raises(RuntimeError, match="exited"):
        node.start()
    assert node.proc is not None
    assert node.proc.wait(30) != 0
    assert f"cannot listen on 127.0.0.1:{port}: Permission denied" in node.log()
    assert "CAP_NET_BIND_SERVICE" in node.log()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
