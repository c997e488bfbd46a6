"""Real peers for the tests: the node as a subprocess, dcmtk's tools, free loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The tests take their ports from here; one source, so that no port is handed out twice.
from dicom_node.testing.orthanc import free_port

DCMTK = Path("/usr/bin")
#: dcmtk and Orthanc leave Nagle's algorithm on unless told; without this each C-STORE costs ~45 ms.
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dicom3tools' dciodvfy on one file: its (errors, warnings) lines.

    ``./quickstart test`` installs dicom3tools; without it this fails rather than skips, since a
    conformance check that does not run checks nothing.
    """
    exe = Path("/usr/bin/dciodvfy")
    if not exe.exists():
        raise RuntimeError("dciodvfy is missing: ./quickstart test installs dicom3tools")
    done = subprocess.run(
        [str(exe), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (done.stdout + done.stderr).splitlines()
    return (
        [line for line in lines if line.startswith("Error")],
        [line for line in lines if line.startswith("Warning")],
    )


def wait_for_port(
    port: int, *, timeout: float = 90.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something listens on 127.0.0.1:port (or ``proc`` dies).

    The node listens once torch is imported and the model loaded: a few seconds on an idle
    machine, more than 30 on two cores busy with other work. A process that dies is reported
    at once, so the long timeout only delays the report of one that hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def storescu(
    files: Sequence[Path] | Path,
    port: int,
    *,
    called: str = "DICOM_NODE",
    calling: str = "STORESCU",
    extra: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu: one association, proposing what the files need (-R), verbose."""
    args = [
        str(DCMTK / "storescu"),
        "-v",
        "-R",
        "-aet",
        calling,
        "-aec",
        called,
        *extra,
        "127.0.0.1",
        str(port),
    ]
    if isinstance(files, Path):
        args += ["+sd", str(files)]
    else:
        args += [str(f) for f in files]
    return subprocess.run(
        args, capture_output=True, text=True, env=PEER_ENV, timeout=timeout, check=False
    )


def echoscu(
    port: int, *, called: str = "DICOM_NODE", calling: str = "ECHOSCU"
) -> subprocess.CompletedProcess[str]:
    """dcmtk's echoscu."""
    return subprocess.run(
        [str(DCMTK / "echoscu"), "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=PEER_ENV,
        timeout=30,
        check=False,
    )


def node_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``dicom-node ARGS`` (the installed console script's module) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@dataclass
class NodeProcess:
    """``dicom-node serve`` in a subprocess on a free loopback port, with its own data folder."""

    root: Path
    settings: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    #: Words put before the node's command (e.g. ``setpriv ...`` to run it as another user).
    prefix: Sequence[str] = ()

    @property
    def data_dir(self) -> Path:
        return self.root / "var"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    def write_config(self) -> None:
        cfg: dict[str, Any] = {
            "node": {"host": "127.0.0.1", "port": self.port},
            "storage": {"data_dir": str(self.data_dir), "min_free_disk_mb": 16},
            "study": {"stable_seconds": 1.0, "max_wait_seconds": 120.0},
            "jobs": {"poll_seconds": 0.2, "retry_base_seconds": 0.5, "retry_max_seconds": 2.0},
            "destinations": [],
            "logging": {"level": "INFO", "format": "json"},
            "service": {"http_port": self.http_port},
            # receive-only unless a test gives a model folder (model: {path: ...})
            "model": {"path": None},
        }
        for section, values in self.settings.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        self.config_path.write_text(yaml.safe_dump(cfg))

    def start(self) -> NodeProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "dicom_node.cli",
                "serve",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **self.env},
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)
        # the HTTP endpoint starts just after the DICOM port is bound
        wait_for_port(self.http_port, proc=self.proc)
        return self

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self.proc = None

    def jobs(self) -> dict[str, Any]:
        done = node_cli("jobs", "--json", "--config", str(self.config_path))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def wait_jobs(self, predicate: Any, *, timeout: float = 60.0) -> dict[str, Any]:
        """Poll ``dicom-node jobs --json`` until ``predicate(listing)`` holds."""
        deadline = time.monotonic() + timeout
        listing = self.jobs()
        while not predicate(listing):
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met; last listing: {json.dumps(listing)[:2000]}")
            time.sleep(0.2)
            listing = self.jobs()
        return listing

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def spooled(self) -> list[Path]:
        return sorted((self.data_dir / "spool").glob("*/*/*.dcm"))


@dataclass
class StoreSCP:
    """dcmtk's storescp as the stand-in PACS, on a free loopback port, storing into ``out``."""

    out: Path
    options: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(DCMTK / "storescp"), "-od", str(self.out), *self.options, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=PEER_ENV,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())


def node_starter(root_for: Callable[[str], Path]) -> Iterator[Callable[..., NodeProcess]]:
    """The body of the node fixtures: yields ``make(name, env, **settings)``, which starts a
    node in ``root_for(name)``; every node still running is killed when the fixture ends."""
    started: list[NodeProcess] = []

    def make(name: str = "node", env: dict[str, str] | None = None, **settings: Any) -> NodeProcess:
        node = NodeProcess(root=root_for(name), settings=settings, env=env or {})
        started.append(node)
        return node.start()

    yield make
    for node in started:
        if node.proc is not None:
            node.kill()


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def analysis_process(node_pid: int) -> int:
    """The pid of the node's analysis child (``multiprocessing`` spawn), found in /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == node_pid and b"spawn_main" in cmdline:
            return int(entry.name)
    raise AssertionError(f"node {node_pid} has no analysis process")
