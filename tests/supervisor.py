"""A test double for systemd's service manager, limited to what the H4 row depends on.

systemd cannot run as PID 1 on the machines this suite runs on (and must not be booted in a
namespace there: its start-up cleans the shared /tmp). This class plays its part for a unit with
``Type=notify``, ``WatchdogSec=``, ``Restart=on-failure`` and ``RestartSec=``, following
systemd.service(5) and sd_notify(3):

* the service gets ``NOTIFY_SOCKET`` (a datagram socket the supervisor reads) and
  ``WATCHDOG_USEC`` / ``WATCHDOG_PID``;
* the watchdog is armed by ``READY=1`` and re-armed by each ``WATCHDOG=1``; when no ping arrives
  within ``WatchdogSec``, the main process gets the watchdog signal (SIGABRT) followed by
  SIGCONT (so that a stopped process can act on it), and SIGKILL if it is still there after
  ``TimeoutAbortSec``;
* a main process that ends on a signal, or with a non-zero status, is started again after
  ``RestartSec`` (``Restart=on-failure``).

Times are scaled down from the shipped unit's (60 s of watchdog) so that the test is short.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import NodeProcess


@dataclass
class Exit:
    """How one main process ended."""

    pid: int
    returncode: int
    watchdog: bool


@dataclass
class WatchdogSupervisor:
    """Runs ``node`` as systemd would run the unit (see the module docstring)."""

    node: NodeProcess
    socket_path: Path
    watchdog_sec: float = 2.0
    timeout_abort_sec: float = 10.0
    restart_sec: float = 0.5
    exits: list[Exit] = field(default_factory=list)
    #: Each READY=1 with whether the node's port accepted a connection when it arrived.
    readies: list[tuple[int, bool]] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> WatchdogSupervisor:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.socket_path))
        self.node.env.update(
            NOTIFY_SOCKET=str(self.socket_path),
            WATCHDOG_USEC=str(int(self.watchdog_sec * 1e6)),
        )
        self._launch()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.node.proc is not None:
            self.node.terminate()
        if self._sock is not None:
            self._sock.close()

    def wait_ready(self, count: int, timeout: float = 120.0) -> None:
        """Until ``count`` READY=1 have arrived in all."""
        deadline = time.monotonic() + timeout
        while len(self.readies) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.readies)} READY=1 of {count}; exits {self.exits}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ the manager

    def _launch(self) -> None:
        # no WATCHDOG_PID: the pid is not known before the start (sd_notify allows leaving it out)
        self.node.start()

    def _run(self) -> None:
        assert self._sock is not None
        armed_until: float | None = None
        while not self._stop.is_set():
            proc = self.node.proc
            assert proc is not None
            self._sock.settimeout(0.05)
            try:
                message = self._sock.recv(4096).decode()
            except TimeoutError:
                message = ""
            now = time.monotonic()
            if "READY=1" in message:
                self.readies.append((proc.pid, self._port_open()))
                armed_until = now + self.watchdog_sec
            if "WATCHDOG=1" in message and armed_until is not None:
                armed_until = now + self.watchdog_sec
            if armed_until is not None and now > armed_until:
                self._abort(proc)
                armed_until = None
                continue
            code = proc.poll()
            if code is not None and not self._stop.is_set():
                self.exits.append(Exit(proc.pid, code, watchdog=False))
                self.node.proc = None
                armed_until = None
                if code != 0:  # Restart=on-failure
                    time.sleep(self.restart_sec)
                    self._launch()
                else:
                    return

    def _abort(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGABRT)
        proc.send_signal(signal.SIGCONT)
        try:
            code = proc.wait(self.timeout_abort_sec)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(30)
        self.exits.append(Exit(proc.pid, code, watchdog=True))
        self.node.proc = None
        time.sleep(self.restart_sec)
        self._launch()

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.node.port), timeout=1):
                return True
        except OSError:
            return False
