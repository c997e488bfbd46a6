"""The audit log: who sent what, what was sent where, security events, start and stop.

One JSON object a line, named after the DICOM audit message vocabulary (PS3.15 A.5):
``Application Activity``, ``DICOM Instances Transferred``, ``Security Alert``. Unlike the ordinary
logs, an audit record carries the Study Instance UID: that is what an audit is for. The file is
append-only and flushed per record; rotate it with logrotate's ``copytruncate``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class AuditLog:
    """Appends audit records to ``path`` (``None``: audit off)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, *, outcome: str = "success", **fields: Any) -> None:
        """Write one record: ``event`` (the audit message name), ``outcome`` and details."""
        if self.path is None:
            return
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": event,
            "outcome": outcome,
            **fields,
        }
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def application(self, action: str, **fields: Any) -> None:
        """Application Activity: ``start`` or ``stop``."""
        self.record("Application Activity", action=action, pid=os.getpid(), **fields)

    def security(self, reason: str, **fields: Any) -> None:
        """Security Alert (rejected caller, failed TLS, a limit hit)."""
        self.record("Security Alert", outcome="minor failure", reason=reason, **fields)

    def begin_receiving(
        self, *, calling_ae: str, peer: str, study: str, certificate: str | None = None
    ) -> None:
        """Begin Transferring DICOM Instances, inbound: the first instance of a study in an
        association was filed (written at once, so a crash cannot lose who sent it); with the
        name of the client certificate, over TLS."""
        self.record(
            "Begin Transferring DICOM Instances",
            direction="received",
            calling_ae=calling_ae,
            peer=peer,
            study=study,
            **({"certificate": certificate} if certificate else {}),
        )

    def received(
        self, *, calling_ae: str, peer: str, studies: dict[str, int], **fields: Any
    ) -> None:
        """DICOM Instances Transferred, inbound: one record per association."""
        self.record(
            "DICOM Instances Transferred",
            direction="received",
            calling_ae=calling_ae,
            peer=peer,
            studies=studies,
            **fields,
        )

    def sent(self, *, destination: str, ae_title: str, host: str, port: int, **fields: Any) -> None:
        """DICOM Instances Transferred, outbound: one record per delivered or failed file."""
        self.record(
            "DICOM Instances Transferred",
            direction="sent",
            destination=destination,
            ae_title=ae_title,
            host=host,
            port=port,
            **fields,
        )
