"""Orthanc as a real PACS on loopback: a process harness, a small REST client and a command.

:class:`OrthancPacs` writes its own JSON configuration and storage into a folder, registers the
node as a DICOM modality, starts ``Orthanc`` as a plain process (with ``TCP_NODELAY=1``: Debian's
build leaves Nagle's algorithm on, and each C-STORE then costs ~45 ms), waits until ``/system``
answers and stops it again (SIGTERM, then SIGKILL). :class:`OrthancClient` speaks the few REST
calls a test or a person needs: upload, look up a study, send it to a modality, list what a study
holds, read an instance's SOP class and tags, and follow Orthanc's jobs. It uses ``urllib`` with
proxies switched off, so a loopback URL is never sent through a proxy from the environment.

Orthanc 1.10 has no bind-address option: its DICOM port listens on every interface. The harness
keeps HTTP to loopback (``RemoteAccessAllowed: false``) and registers peers on 127.0.0.1 only;
run it where an open DICOM port is acceptable, or in a loopback-only network namespace.

Run it by hand to wire a node to a throw-away PACS::

    python -m dicom_node.testing.orthanc --node-port 11112 --node-aet DICOM_NODE

It prints Orthanc's URL, its DICOM port and the ``destinations:`` block for the node's
``config.yaml``, and runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final

from dicom_node.errors import NodeError

__all__ = [
    "COMPREHENSIVE_3D_SR_STORAGE",
    "SEGMENTATION_STORAGE",
    "OrthancClient",
    "OrthancError",
    "OrthancJob",
    "OrthancPacs",
    "OrthancRestError",
    "StoreAnswer",
    "Uploaded",
    "find_orthanc",
    "free_port",
    "main",
]

#: SOP classes of the node's results, as Orthanc reports them.
SEGMENTATION_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.88.34"

#: Where Debian's package installs the server (``/usr/sbin`` is not on every user's PATH).
_DEBIAN_ORTHANC: Final = Path("/usr/sbin/Orthanc")
_LOOPBACK: Final = "127.0.0.1"
#: Orthanc job states after which a job does not change on its own.
_FINAL_JOB_STATES: Final = frozenset({"Success", "Failure"})


class OrthancError(NodeError):
    """Orthanc could not be found, started or stopped; the message ends with its log's tail."""


class OrthancRestError(OrthancError):
    """Orthanc answered a REST call with an HTTP error, or could not be reached.

    Attributes
    ----------
    method, path
        The call, e.g. ``POST /modalities/node/store``.
    status
        The HTTP status (``0`` when Orthanc could not be reached at all).
    answer
        Orthanc's JSON error body (``Message``, ``Details``, ``OrthancError``...), or ``{}``.
    """

    def __init__(self, method: str, path: str, status: int, answer: Mapping[str, Any]) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.answer: dict[str, Any] = dict(answer)
        what = answer.get("Details") or answer.get("Message") or "no answer"
        super().__init__(f"{method} {path}: HTTP {status}: {what}")

    @property
    def details(self) -> str:
        """Orthanc's own explanation (``Details``, else ``Message``), or ``""``."""
        return str(self.answer.get("Details") or self.answer.get("Message") or "")


@dataclass(frozen=True, slots=True)
class Uploaded:
    """Orthanc's answer to ``POST /instances``: the new (or known) instance and its parents.

    ``status`` is ``"Success"`` for a new instance, ``"AlreadyStored"`` for a known one.
    """

    instance_id: str
    series_id: str
    study_id: str
    patient_id: str
    status: str


@dataclass(frozen=True, slots=True)
class StoreAnswer:
    """Orthanc's answer to ``POST /modalities/{name}/store``.

    Synchronous: the counts are set and ``job_id`` is ``None`` (a failed send raises instead).
    Asynchronous: only ``job_id`` is set; follow it with :meth:`OrthancClient.wait_job`.
    """

    job_id: str | None
    instances: int | None
    failed_instances: int | None
    remote_aet: str | None
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OrthancJob:
    """One of Orthanc's jobs (``GET /jobs/{id}``).

    ``state`` is Orthanc's: ``Pending``, ``Running``, ``Success``, ``Failure``, ``Paused`` or
    ``Retry``. ``content`` is the job's own detail (for a C-STORE: ``RemoteAet``,
    ``InstancesCount``, ``FailedInstancesCount``, ``ParentResources``).
    """

    id: str
    type: str
    state: str
    error_code: int
    error_description: str
    error_details: str
    content: dict[str, Any]
    raw: dict[str, Any]

    @property
    def finished(self) -> bool:
        """True once the job succeeded or failed for good."""
        return self.state in _FINAL_JOB_STATES

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> OrthancJob:
        """Build from Orthanc's JSON description of a job."""
        content = value.get("Content")
        return cls(
            id=str(value["ID"]),
            type=str(value.get("Type", "")),
            state=str(value.get("State", "")),
            error_code=int(value.get("ErrorCode", 0)),
            error_description=str(value.get("ErrorDescription", "")),
            error_details=str(value.get("ErrorDetails", "")),
            content=dict(content) if isinstance(content, Mapping) else {},
            raw=dict(value),
        )


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OrthancError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _as_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise OrthancError(f"{what}: expected a JSON array, got {type(value).__name__}")
    return value


class OrthancClient:
    """A small client for Orthanc's REST API over ``urllib``.

    Parameters
    ----------
    url
        Orthanc's base URL, ``http://HOST:PORT`` (plain HTTP only).
    timeout
        Seconds one call may take (a synchronous send of a large study takes a while).

    Every call raises :class:`OrthancRestError` on an HTTP error or when Orthanc cannot be
    reached, carrying Orthanc's JSON explanation.
    """

    def __init__(self, url: str, *, timeout: float = 120.0) -> None:
        if not url.startswith("http://"):
            raise ValueError(f"{url!r} is not a plain http:// URL")
        self.url = url.rstrip("/")
        self.timeout = timeout
        # No proxy handler: a loopback PACS is never reached through $http_proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- transport ------------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """One HTTP call; returns the body of a 2xx answer."""
        headers = {"Content-Type": content_type} if content_type else {}
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked to be http://
            self.url + path, data=body, method=method, headers=headers
        )
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as answer:
                data: bytes = answer.read()
                return data
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                parsed = json.loads(raw) if raw else {}
            except ValueError:
                parsed = {"Message": raw.decode(errors="replace")[:500]}
            raise OrthancRestError(
                method, path, exc.code, parsed if isinstance(parsed, dict) else {}
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise OrthancRestError(method, path, 0, {"Details": str(exc)}) from exc

    def get_json(self, path: str) -> Any:
        """``GET path`` and decode the JSON answer."""
        return json.loads(self.call("GET", path))

    def post_json(self, path: str, value: Any, *, timeout: float | None = None) -> Any:
        """``POST path`` with a JSON body and decode the JSON answer."""
        body = json.dumps(value).encode()
        answer = self.call(
            "POST", path, body=body, content_type="application/json", timeout=timeout
        )
        return json.loads(answer) if answer.strip() else None

    # -- server ---------------------------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        """``GET /system``: name, version, AE title, ports."""
        return _as_dict(self.get_json("/system"), "/system")

    # -- resources ------------------------------------------------------------------------------

    def upload(self, data: Path | bytes) -> Uploaded:
        """Store one DICOM file (a path or its bytes) with ``POST /instances``."""
        body = data.read_bytes() if isinstance(data, Path) else data
        raw = self.call("POST", "/instances", body=body, content_type="application/dicom")
        answer = _as_dict(json.loads(raw), "/instances")
        return Uploaded(
            instance_id=str(answer["ID"]),
            series_id=str(answer["ParentSeries"]),
            study_id=str(answer["ParentStudy"]),
            patient_id=str(answer["ParentPatient"]),
            status=str(answer["Status"]),
        )

    def upload_files(self, paths: Iterable[Path]) -> list[Uploaded]:
        """Store several files, one request each, in order."""
        return [self.upload(p) for p in paths]

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """``POST /tools/lookup``: every resource whose DICOM UID (or ID) is ``uid``."""
        answer = self.call("POST", "/tools/lookup", body=uid.encode(), content_type="text/plain")
        return [_as_dict(r, "/tools/lookup") for r in _as_list(json.loads(answer), "lookup")]

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc's ID of the study with this Study Instance UID, or ``None``."""
        for resource in self.lookup(study_instance_uid):
            if resource.get("Type") == "Study":
                return str(resource["ID"])
        return None

    def studies(self) -> list[str]:
        """Orthanc IDs of every study."""
        return [str(s) for s in _as_list(self.get_json("/studies"), "/studies")]

    def study(self, study_id: str) -> dict[str, Any]:
        """``GET /studies/{id}``: main tags, series, ``IsStable``, ``LastUpdate``."""
        return _as_dict(self.get_json(f"/studies/{study_id}"), "study")

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """The series of a study, each with ``ID``, ``MainDicomTags`` and ``Instances``."""
        answer = self.get_json(f"/studies/{study_id}/series")
        return [_as_dict(s, "series") for s in _as_list(answer, "series")]

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        """The instances of a study, each with ``ID``, ``ParentSeries`` and ``MainDicomTags``."""
        answer = self.get_json(f"/studies/{study_id}/instances")
        return [_as_dict(i, "instance") for i in _as_list(answer, "instances")]

    def sop_class(self, instance_id: str) -> str:
        """An instance's SOP Class UID (Orthanc's ``SopClassUid`` metadata)."""
        return self.call("GET", f"/instances/{instance_id}/metadata/SopClassUid").decode().strip()

    def instances_by_sop_class(self, study_id: str) -> dict[str, list[str]]:
        """Instance IDs of a study grouped by SOP Class UID."""
        out: dict[str, list[str]] = {}
        for instance in self.study_instances(study_id):
            out.setdefault(self.sop_class(str(instance["ID"])), []).append(str(instance["ID"]))
        return out

    def tags(self, instance_id: str, *, simplify: bool = True) -> dict[str, Any]:
        """An instance's data set as Orthanc parsed it (without pixel data).

        ``simplify``: keyword → value (sequences as lists of dicts); otherwise Orthanc's full
        form, keyed by ``gggg,eeee`` with ``Name``, ``Type`` and ``Value``.
        """
        path = f"/instances/{instance_id}/{'simplified-tags' if simplify else 'tags'}"
        return _as_dict(self.get_json(path), "tags")

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance, byte for byte."""
        return self.call("GET", f"/instances/{instance_id}/file")

    # -- DICOM network --------------------------------------------------------------------------

    def echo(self, modality: str) -> bool:
        """C-ECHO a registered modality from Orthanc; ``True`` when it answered."""
        try:
            self.post_json(f"/modalities/{modality}/echo", {})
        except OrthancRestError as exc:
            if exc.status == 0:
                raise
            return False
        return True

    def store_to_modality(
        self,
        resources: str | Sequence[str],
        modality: str = "node",
        *,
        synchronous: bool = True,
        timeout: float | None = None,
    ) -> StoreAnswer:
        """C-STORE studies, series or instances (Orthanc IDs) to a registered modality.

        Synchronous: waits for the send and returns the counts; a send that fails (the peer is
        down, refuses the association or an instance) raises :class:`OrthancRestError`, whose
        ``details`` carry Orthanc's reason (e.g. ``... Connection refused``). Asynchronous:
        returns at once with the job's ID; a failure shows in :meth:`wait_job` and ``/jobs``.
        """
        ids = [resources] if isinstance(resources, str) else list(resources)
        answer = _as_dict(
            self.post_json(
                f"/modalities/{modality}/store",
                {"Resources": ids, "Synchronous": synchronous},
                timeout=timeout,
            ),
            "store",
        )
        if not synchronous:
            return StoreAnswer(str(answer["ID"]), None, None, None, answer)
        return StoreAnswer(
            job_id=None,
            instances=int(answer.get("InstancesCount", 0)),
            failed_instances=int(answer.get("FailedInstancesCount", 0)),
            remote_aet=str(answer.get("RemoteAet", "")) or None,
            raw=answer,
        )

    # -- jobs -------------------------------------------------------------------------------------

    def jobs(self) -> list[OrthancJob]:
        """Every job Orthanc still remembers (``JobsHistorySize`` of the finished ones)."""
        answer = _as_list(self.get_json("/jobs?expand"), "/jobs")
        return [OrthancJob.from_json(_as_dict(j, "job")) for j in answer]

    def job(self, job_id: str) -> OrthancJob:
        """One job by ID."""
        return OrthancJob.from_json(_as_dict(self.get_json(f"/jobs/{job_id}"), "job"))

    def wait_job(self, job_id: str, *, timeout: float = 60.0, poll: float = 0.1) -> OrthancJob:
        """Poll a job until it succeeded or failed; raises :class:`TimeoutError` otherwise."""
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while not job.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc job {job_id} still {job.state} after {timeout} s")
            time.sleep(poll)
            job = self.job(job_id)
        return job


def find_orthanc() -> Path:
    """The ``Orthanc`` executable: on PATH, else Debian's ``/usr/sbin/Orthanc``."""
    found = shutil.which("Orthanc")
    if found:
        return Path(found)
    if _DEBIAN_ORTHANC.exists():
        return _DEBIAN_ORTHANC
    raise OrthancError("Orthanc is not installed (Debian: apt-get install orthanc)")


#: Ports :func:`free_port` has handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free on loopback now, and not handed out before in this process.

    The kernel may give a port it has just released again at once: two servers of one test
    (the node's DICOM and HTTP ports, say) would then be configured on the same port.
    """
    for _ in range(100):
        with socket.socket() as s:
            s.bind((_LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OrthancError("no loopback port left that was not handed out before")


class OrthancPacs:
    """Orthanc in a child process with its own configuration and storage, as a test PACS.

    Parameters
    ----------
    root
        Folder for the configuration, database, storage and logs; a fresh temporary folder
        (deleted by :meth:`stop`) when ``None``.
    node_port, node_aet, node_host
        The node, registered as DICOM modality ``modality`` (not registered when ``node_port``
        is ``None``).
    modality
        The name of that modality in Orthanc (``/modalities/{modality}/store``).
    aet, name
        Orthanc's AE title and display name.
    http_port, dicom_port
        Fixed ports; free loopback ports when ``None``. Auto-chosen ports can change when a port
        was taken between the choice and Orthanc's start: read them after :meth:`start`.
    lua_scripts
        Lua files for Orthanc's ``LuaScripts`` (e.g. ``examples/orthanc/autoroute.lua``).
    stable_age
        Orthanc's ``StableAge``: seconds without a new instance before a study is stable
        (``OnStableStudy`` runs then). Orthanc's default is 60; tests use 1.
    extra_config
        Merged last over the generated configuration (keys at the top level). Replacing the
        ports, folders or ``RemoteAccessAllowed`` breaks the harness.
    executable
        The ``Orthanc`` binary; :func:`find_orthanc` when ``None``.
    start_timeout
        Seconds :meth:`start` waits for ``/system`` to answer.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        *,
        root: Path | None = None,
        node_port: int | None = None,
        node_aet: str = "DICOM_NODE",
        node_host: str = _LOOPBACK,
        modality: str = "node",
        aet: str = "ORTHANC",
        name: str = "TEST-PACS",
        http_port: int | None = None,
        dicom_port: int | None = None,
        lua_scripts: Sequence[Path] = (),
        stable_age: int = 60,
        extra_config: Mapping[str, Any] | None = None,
        executable: Path | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="orthanc-")) if root is None else root
        self.node_port = node_port
        self.node_aet = node_aet
        self.node_host = node_host
        self.modality = modality
        self.aet = aet
        self.name = name
        self._fixed_ports = (http_port, dicom_port)
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.lua_scripts = tuple(Path(p).resolve() for p in lua_scripts)
        self.stable_age = stable_age
        self.extra_config = dict(extra_config or {})
        self.executable = executable
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    # -- where things are -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Orthanc's base URL, ``http://127.0.0.1:PORT``."""
        return f"http://{_LOOPBACK}:{self.http_port}"

    @property
    def client(self) -> OrthancClient:
        """A REST client for this Orthanc."""
        return OrthancClient(self.url)

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def storage_dir(self) -> Path:
        return self.root / "db"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration :meth:`start` writes (Orthanc's JSON keys)."""
        cfg: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "OverwriteInstances": False,
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "JobsHistorySize": 100,
            "DicomModalities": {},
            "LuaScripts": [str(p) for p in self.lua_scripts],
        }
        if self.lua_scripts:
            # where examples/orthanc/autoroute.lua notes what it routed (as the example's
            # orthanc.json declares): without it the script sends each study again when the
            # node's results arrive
            cfg["UserMetadata"] = {"DicomNodeRouted": 1024}
        if self.node_port is not None:
            cfg["DicomModalities"] = {
                self.modality: [self.node_aet, self.node_host, self.node_port]
            }
        cfg.update(self.extra_config)
        return cfg

    def destination(self, name: str = "orthanc") -> dict[str, str | int]:
        """This Orthanc as an entry of the node's ``destinations``."""
        return {"name": name, "ae_title": self.aet, "host": _LOOPBACK, "port": self.dicom_port}

    def destinations_yaml(self, name: str = "orthanc") -> str:
        """The ``destinations:`` block to paste into the node's ``config.yaml``."""
        d = self.destination(name)
        return (
            "destinations:\n"
            f"  - {{name: {d['name']}, ae_title: {d['ae_title']}, host: {d['host']},"
            f" port: {d['port']}}}\n"
        )

    def log(self) -> str:
        """The current run's log (Orthanc's ``--logdir`` file), or ``""``."""
        current = self.log_dir / "Orthanc.log"
        return current.read_text(errors="replace") if current.exists() else ""

    def _tail(self, lines: int = 30) -> str:
        text = self.log()
        out = self.root / "orthanc.out"
        if out.exists():
            text += out.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> OrthancPacs:
        """Write the configuration, start Orthanc and wait until ``/system`` answers.

        Raises :class:`OrthancError` when Orthanc exits (a bad configuration, a Lua script that
        does not compile) or does not answer in time. When an auto-chosen port was taken between
        its choice and Orthanc's start, new ports are chosen (three tries in all).
        """
        if self.running:
            return self
        executable = self.executable or find_orthanc()
        for attempt in range(3):
            self._spawn(executable)
            if self._wait_ready():
                return self
            self._reap()
            port_taken = "already in use" in self._tail(50)
            if not port_taken or self._fixed_ports != (None, None) or attempt == 2:
                break
            self.http_port, self.dicom_port = free_port(), free_port()
        raise OrthancError(f"Orthanc did not start (see {self.log_dir}):\n{self._tail()}")

    def _spawn(self, executable: Path) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with (self.root / "orthanc.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(executable), f"--logdir={self.log_dir}", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
                cwd=self.root,
            )

    def _wait_ready(self) -> bool:
        client = OrthancClient(self.url, timeout=2.0)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                system = client.system()
            except OrthancRestError:
                time.sleep(0.05)
                continue
            # another Orthanc may hold our HTTP port (ours then exits): ready is ours answering
            if system.get("DicomPort") == self.dicom_port:
                return True
            time.sleep(0.05)
        return False

    def _reap(self, timeout: float = 20.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop Orthanc (SIGTERM, SIGKILL after ``timeout`` s); returns its exit status.

        Orthanc 1.10 takes about 3.5 s to wind down its HTTP and DICOM servers.

        A temporary root (``root=None``) is deleted; a given one is kept for another start.
        """
        rc = self._reap(timeout)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        return rc

    def kill(self) -> None:
        """Stop Orthanc at once (SIGKILL), for throw-away test instances: a graceful stop takes
        ~3.5 s (its HTTP and DICOM servers wind down), and SQLite survives a kill. A temporary
        root is deleted as by :meth:`stop`."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(20)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> OrthancPacs:
        try:
            return self.start()
        except BaseException:
            self.stop()  # a temporary root goes too
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- the command ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dicom_node.testing.orthanc",
        description=(
            "Start a throw-away Orthanc PACS with the node registered as DICOM modality 'node', "
            "print what to put in the node's config, and run until Ctrl-C."
        ),
    )
    p.add_argument("--node-port", type=int, default=11112, help="the node's DICOM port")
    p.add_argument("--node-aet", default="DICOM_NODE", help="the node's AE title")
    p.add_argument("--node-host", default=_LOOPBACK, help="the node's address (default loopback)")
    p.add_argument("--aet", default="ORTHANC", help="Orthanc's AE title")
    p.add_argument("--http-port", type=int, default=None, help="default: a free port")
    p.add_argument("--dicom-port", type=int, default=None, help="default: a free port")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder for Orthanc's config, storage and logs (kept); default: a temporary one",
    )
    p.add_argument(
        "--lua",
        type=Path,
        action="append",
        default=[],
        help="a Lua script to load, e.g. examples/orthanc/autoroute.lua (repeatable)",
    )
    p.add_argument("--stable-age", type=int, default=60, help="Orthanc's StableAge, seconds")
    p.add_argument(
        "--destination-name", default="orthanc", help="the destination's name in the node config"
    )
    return p


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run Orthanc for a person wiring a node by hand; returns the exit status."""
    args = _parser().parse_args(argv)
    for script in args.lua:
        if not script.is_file():
            print(f"no such Lua script: {script}", file=sys.stderr)
            return 2
    pacs = OrthancPacs(
        root=args.data,
        node_port=args.node_port,
        node_aet=args.node_aet,
        node_host=args.node_host,
        aet=args.aet,
        http_port=args.http_port,
        dicom_port=args.dicom_port,
        lua_scripts=args.lua,
        stable_age=args.stable_age,
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        pacs.start()
    except OrthancError as exc:
        print(exc, file=sys.stderr)
        pacs.stop()  # a temporary root goes too, as the banner promises
        return 1
    try:
        version = pacs.client.system().get("Version", "?")
        kept = "kept" if args.data else "deleted on exit"
        print(f"Orthanc {version} is running (data and logs: {pacs.root}, {kept}).")
        print(f"  HTTP (REST API, Orthanc Explorer): {pacs.url}/")
        print(f"  DICOM: AE title {pacs.aet}, port {pacs.dicom_port} (on every interface)")
        print(
            f"  The node is modality '{pacs.modality}': "
            f"{pacs.node_aet}@{pacs.node_host}:{pacs.node_port}"
        )
        for script in pacs.lua_scripts:
            print(f"  Lua: {script}")
        print("\nPaste into the node's config.yaml:\n")
        print(pacs.destinations_yaml(args.destination_name))
        print("Press Ctrl-C to stop.", flush=True)
        while pacs.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping Orthanc", flush=True)
        return 0
    else:
        print(f"Orthanc exited on its own:\n{pacs._tail()}", file=sys.stderr)
        return 1
    finally:
        pacs.stop()


if __name__ == "__main__":
    sys.exit(main())
