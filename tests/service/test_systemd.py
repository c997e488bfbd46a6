"""The systemd unit and its companions, checked by systemd's own tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "dicom-node.service"


def _unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's console script (as install.sh does)."""
    exe = Path(sys.executable).parent / "dicom-node"
    assert exe.exists(), exe
    unit = tmp_path / "dicom-node.service"
    unit.write_text(UNIT.read_text().replace("/opt/dicom-node/.venv/bin/dicom-node", str(exe)))
    return unit


@pytest.fixture(autouse=True)
def _needs_systemd() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: ./quickstart test installs the systemd package")


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a warning."""
    done = subprocess.run(
        ["systemd-analyze", "verify", str(_unit_here(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_unit_is_hardened(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the unit's exposure low (at most 2.5 of 10)."""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(_unit_here(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    line = next(x for x in done.stdout.splitlines() if "Overall exposure level" in x)
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= 2.5, line
    text = UNIT.read_text()
    for setting in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "User=dicom-node",
        "StateDirectory=dicom-node",
        "ConfigurationDirectory=dicom-node",
        "LogsDirectory=dicom-node",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "RestrictAddressFamilies=",
        "SystemCallFilter=",
        "MemoryMax=",
        "OOMPolicy=continue",
        "TasksMax=",
        "DeviceAllow=/dev/nvidiactl",
    ):
        assert setting in text, setting
    assert "PrivateDevices=no" not in text


def test_sysusers_and_tmpfiles_apply_to_a_root(tmp_path: Path) -> None:
    """sysusers.d creates the account and tmpfiles.d the folders, in a scratch root."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).write_text(
            "root:x:0:0:root:/root:/bin/sh\n"
            if name == "passwd"
            else "root:x:0:\n"
            if name == "group"
            else ""
        )
    (root / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\n")
    done = subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(ROOT / "systemd" / "dicom-node.sysusers.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "dicom-node:" in (root / "etc" / "passwd").read_text()
    assert "video:x:44:dicom-node" in (root / "etc" / "group").read_text()
    done = subprocess.run(
        [
            "systemd-tmpfiles",
            "--create",
            f"--root={root}",
            str(ROOT / "systemd" / "dicom-node.tmpfiles.conf"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (root / "var" / "lib" / "dicom-node").is_dir()
    assert (root / "etc" / "dicom-node").is_dir()


def _syscalls(group_or_name: str) -> set[str]:
    if not group_or_name.startswith("@"):
        return {group_or_name}
    done = subprocess.run(
        ["systemd-analyze", "syscall-filter", group_or_name],
        capture_output=True,
        text=True,
        check=True,
    )
    names: set[str] = set()
    for line in done.stdout.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            names |= _syscalls(item)
    return names


def test_syscall_filter_lets_the_analysis_lower_its_priority() -> None:
    """The analysis process calls setpriority (jobs.analysis_nice) and sched_setscheduler
    (jobs.analysis_cpu_policy) at start. @resources holds both, so a unit that denies it without
    adding them back kills the node's start (the call fails with EPERM). The unit's
    SystemCallFilter lines are merged as systemd.exec(5) says: the first line's kind decides
    the default, later lines add to or take from its set."""
    lines = [
        x.split("=", 1)[1].split()
        for x in UNIT.read_text().splitlines()
        if x.startswith("SystemCallFilter=")
    ]
    assert lines and not lines[0][0].startswith("~"), "an allow list comes first"
    allowed: set[str] = set()
    for items in lines:
        deny = items[0].startswith("~")
        names = set().union(*(_syscalls(x.lstrip("~")) for x in items))
        allowed = allowed - names if deny else allowed | names
    assert {"setpriority", "sched_setscheduler"} <= allowed
    assert not {"setrlimit", "sched_setaffinity", "mbind", "reboot", "mount"} & allowed


def test_install_points_the_new_configuration_at_the_service_folders(tmp_path: Path) -> None:
    """install.sh's first configuration is config.yaml with the data folder under
    /var/lib/dicom-node and the model under the install prefix (its sed, run as written)."""
    import re

    import yaml

    script = (ROOT / "systemd" / "install.sh").read_text()
    expressions = re.findall(r'-e "(s#[^"]+)"', script)
    assert len(expressions) == 2, expressions
    command = ["sed"]
    for expression in expressions:
        command += ["-e", expression.replace("$prefix", "/srv/node")]
    done = subprocess.run(
        [*command, str(ROOT / "config.yaml")], capture_output=True, text=True, check=True
    )
    config = yaml.safe_load(done.stdout)
    assert config["storage"]["data_dir"] == "/var/lib/dicom-node"
    assert config["model"]["path"] == "/srv/node/models/lung-ct-unet-resnet50"
