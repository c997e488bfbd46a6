"""The node's configuration: one frozen, validated object, loaded once from YAML.

``config.yaml`` at the top of the project documents every key; the defaults below are the
embedded ones (``dicom-node serve`` without ``--config`` uses them), and a test keeps the two
equal. A bad file fails at start with each bad key's path, its value and what was expected::

    node.port: 70000 is not a port (1-65535)
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from dicom_node.errors import ConfigError

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16:
        raise ValueError("is not an AE title (1-16 characters)")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("is not an AE title (no backslash or control characters)")
    if not value.strip(" "):
        raise ValueError("is not an AE title (not all spaces)")
    return value


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("is not a port (1-65535)")
    return value


def _check_uid_root(value: str) -> str:
    if not _UID_RE.match(value) or len(value) > 40:
        raise ValueError("is not a UID root (digits and dots, at most 40 characters)")
    return value


def _check_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise ValueError("is not a name (letters, digits, '_', '.', '-'; at most 64)")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, AfterValidator(_check_port)]
UIDRoot = Annotated[str, AfterValidator(_check_uid_root)]
Name = Annotated[str, AfterValidator(_check_name)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _check_ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(
            "is not an IP address (the caller's address is compared, not its name)"
        ) from None


IPAddress = Annotated[str, AfterValidator(_check_ip_address)]


def _check_long_string(value: str) -> str:
    if not 1 <= len(value) <= 64 or not value.strip(" "):
        raise ValueError("is not a DICOM long string (1-64 characters, not all spaces)")
    if any(not 0x20 <= ord(c) <= 0x7E or c == "\\" for c in value):
        raise ValueError(
            "must be printable ASCII without a backslash (it is written into every SEG and SR,"
            " whatever character set the study uses)"
        )
    return value


#: Text the node writes as a DICOM LO in its own outputs.
LongString = Annotated[str, AfterValidator(_check_long_string)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AllowedCaller(_Section):
    """A calling AE that may associate; ``host`` (an IP address) pins it to one address, and
    ``certificate_name`` (with TLS client certificates) to one certificate: a certificate the
    CA signed for another device cannot then claim this AE title."""

    ae_title: AETitle
    host: IPAddress | None = None
    #: The client certificate must name this (its subject's Common Name or a DNS name of its
    #: Subject Alternative Name).
    certificate_name: Annotated[str, Field(min_length=1, max_length=255)] | None = None


class TLSSettings(_Section):
    """DICOM TLS for the listener (PS3.15 secure transport, BCP 195): TLS 1.2 or newer only.

    With it the port speaks TLS alone: plaintext peers are refused. Files are PEM; relative
    paths are relative to the working folder.
    """

    #: This node's certificate (chain: leaf first, then intermediates).
    cert: Path
    #: Its private key, unencrypted; readable only by the node's user.
    key: Path
    #: CA certificates that client certificates must chain to.
    ca: Path | None = None
    #: Refuse every peer without a certificate that chains to ``ca`` (mutual TLS).
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _client_certs_need_ca(self) -> TLSSettings:
        if self.require_client_cert and self.ca is None:
            raise ValueError(
                "require_client_cert: true needs ca (the CA bundle client certificates are"
                " checked against)"
            )
        return self


class DestinationTLS(_Section):
    """DICOM TLS towards one destination: its certificate is checked against ``ca``."""

    #: CA certificates the destination's certificate must chain to.
    ca: Path
    #: This node's client certificate and key, for a destination that requires one.
    cert: Path | None = None
    key: Path | None = None
    #: Also require the certificate to name ``host`` (DNS name or IP address).
    check_hostname: bool = True

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> DestinationTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (give both or neither)")
        return self


class NodeSettings(_Section):
    """The DICOM listener."""

    ae_title: AETitle = "DICOM_NODE"
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens for the PACS; narrow it in config
    port: Port = 11112
    #: Empty: any calling AE may associate. Otherwise only these (A-ASSOCIATE-RJ for the rest).
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 10
    #: Concurrent associations one calling AE title may hold; ``None``: only the total counts.
    max_associations_per_caller: Annotated[int, Field(ge=1, le=1000)] | None = None
    #: Largest P-DATA PDU we advertise; large PDUs cut per-PDU overhead on big CT slices.
    max_pdu_bytes: Annotated[int, Field(ge=4096, le=16 * 1024 * 1024)] = 1024 * 1024
    #: Largest data set one C-STORE may carry, in MiB (a 2000-frame Enhanced CT of 512² is
    #: 1000 MiB); the association of a longer one is aborted before it fills the memory.
    max_dataset_mb: Annotated[int, Field(ge=1, le=64 * 1024)] = 2048
    network_timeout_seconds: Seconds = 60.0
    acse_timeout_seconds: Seconds = 30.0
    dimse_timeout_seconds: Seconds = 60.0
    #: Instances that are not CT / Enhanced CT: ``accept`` acknowledges and drops them (counted and
    #: logged); ``reject`` answers them with a failure status.
    other_instances: Literal["accept", "reject"] = "accept"
    #: DICOM TLS on the listening port; ``None``: plain TCP.
    tls: TLSSettings | None = None

    @model_validator(mode="after")
    def _certificate_names_need_client_certificates(self) -> NodeSettings:
        if any(c.certificate_name for c in self.allowed_callers) and (
            self.tls is None or self.tls.ca is None or not self.tls.require_client_cert
        ):
            raise ValueError(
                "allowed_callers[].certificate_name needs tls with ca and require_client_cert"
            )
        return self


class StorageSettings(_Section):
    """Where the spool and the job store live, and how full the disk may get."""

    data_dir: Path = Path("./var")
    #: Below this much free space a C-STORE is answered 0xA700 (out of resources) and not kept.
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 1024
    #: fsync every received file (and its directory) before acknowledging it. Turn off only for
    #: throw-away test nodes: a power cut could then lose acknowledged instances.
    fsync: bool = True
    #: A study's spooled instances and its job's work folder are deleted this long after its
    #: newest job ended done or skipped (and its results were delivered). Failed and dead jobs
    #: keep theirs until retried or purged (``dicom-node purge``). ``null``: keep forever.
    keep_hours: Annotated[float, Field(ge=0)] | None = 24.0
    #: The history of a study deleted by ``keep_hours`` (its jobs' state changes and
    #: deliveries, which ``dicom-node jobs`` lists) is forgotten this long after its last job
    #: ended; the newest job of each study stays, so a study sent again later still becomes its
    #: next version. ``null``: keep forever (the job store then grows with every study).
    history_days: Annotated[float, Field(gt=0)] | None = 90.0


class StudySettings(_Section):
    """When a study counts as complete."""

    stable_seconds: Seconds = 30.0
    max_wait_seconds: Seconds = 900.0
    #: Also complete a study when the association that sent it is released.
    complete_on_release: bool = False

    @model_validator(mode="after")
    def _wait_covers_stable(self) -> StudySettings:
        if self.max_wait_seconds < self.stable_seconds:
            raise ValueError("max_wait_seconds must be at least stable_seconds")
        return self


class Destination(_Section):
    """A DICOM peer that receives the node's results."""

    name: Name
    ae_title: AETitle
    host: str
    port: Port
    #: DICOM TLS to this destination; ``None``: plain TCP.
    tls: DestinationTLS | None = None


class LoggingSettings(_Section):
    """Logs: level, format, and whether patient identifiers may appear in them."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"
    include_patient_data: bool = False
    #: The audit log (JSON lines: who sent what, what was sent where, security events).
    #: Relative paths are inside storage.data_dir; ``null`` turns it off.
    audit_path: Path | None = Path("audit.jsonl")


class KnownPeer(_Section):
    """A DICOM peer the node may reply to, looked up by the calling AE title it sends with."""

    ae_title: AETitle
    host: str
    port: Port
    #: DICOM TLS for the replies, as for a destination (a study that came over TLS should not
    #: have its results go back in the clear).
    tls: DestinationTLS | None = None


def known_peer_tls_key(peer: KnownPeer) -> str:
    """Where a known peer's ``tls`` stands in the configuration (named in its errors)."""
    return f"dispatch.known_peers[{peer.ae_title.strip()}].tls"


class DispatchSettings(_Section):
    """Sending results: retries, limits, timeouts, and replies to the sender."""

    #: A delivery that failed this often, or is older than ``max_age_hours``, is dead-lettered.
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 12
    max_age_hours: Annotated[float, Field(gt=0)] = 72.0
    #: Delay before retry n is ``retry_base_seconds * 2**(n-1)``, capped, with ±20% jitter.
    retry_base_seconds: Seconds = 15.0
    retry_max_seconds: Seconds = 1800.0
    connect_timeout_seconds: Seconds = 15.0
    acse_timeout_seconds: Seconds = 30.0
    dimse_timeout_seconds: Seconds = 120.0
    network_timeout_seconds: Seconds = 60.0
    #: Also send results to the AE that sent the study, if it is in ``known_peers``. An unknown
    #: calling AE is never replied to: its address is not trusted from the association.
    reply_to_sender: bool = False
    known_peers: tuple[KnownPeer, ...] = ()
    poll_seconds: Seconds = 1.0


class ServiceSettings(_Section):
    """The process: health and metrics endpoint, systemd integration, shutdown."""

    #: Prometheus metrics, /healthz and /readyz over HTTP; port 0 turns the endpoint off.
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Field(ge=0, le=65535)] = 9108
    #: How long SIGTERM waits for open associations and the job in hand before parking it.
    #: At most 60: systemd's TimeoutStopSec (90 s) must leave room for the rest of the stop.
    drain_seconds: Annotated[Seconds, Field(le=60)] = 30.0


class JobSettings(_Section):
    """The worker: retries of failed jobs."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    #: Delay before retry n is ``retry_base_seconds * 2**(n-1)``, capped at ``retry_max_seconds``.
    retry_base_seconds: Seconds = 30.0
    retry_max_seconds: Seconds = 900.0
    #: How often the worker and the completion scan look for work.
    poll_seconds: Seconds = 1.0
    #: A job running longer than this is hung: with ``isolate`` its process is killed and the
    #: job retried; without, the watchdog stops being pinged.
    job_timeout_seconds: Seconds = 3600.0
    #: Run the analysis in a child process of its own (the model lives there), so that a hung
    #: job can be killed without stopping the node.
    isolate: bool = True
    #: Niceness of that process (0-19): receiving, which a PACS waits on, goes first when the
    #: CPUs are busy; the GPU's work is not affected.
    analysis_nice: Annotated[int, Field(ge=0, le=19)] = 10
    #: Linux scheduling policy of that process: ``normal`` and ``batch`` (SCHED_BATCH) share
    #: the CPUs by niceness; ``idle`` (SCHED_IDLE) gives it only CPU time nothing else wants,
    #: so it never slows receiving, but on a machine kept busy by other work it starves and its
    #: jobs run into ``job_timeout_seconds``.
    analysis_cpu_policy: Literal["normal", "batch", "idle"] = "normal"
    #: Most memory the analysis of one series may need, MB (estimated from its voxels before it
    #: is decoded); ``null``: what the machine has available (MemAvailable, and the service's
    #: cgroup limit). A series over it is set aside with the figures, and the next series that
    #: covers the chest analysed in its place.
    max_analysis_memory_mb: Annotated[int, Field(ge=1)] | None = None


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,2})?", value):
        raise ValueError('is not a device ("auto", "cpu", "cuda" or "cuda:N")')
    return value


def _check_batch_size(value: object) -> object:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ValueError('is not a batch size (a whole number 1-4096, or "auto")')
    return value


class ModelSettings(_Section):
    """The model folder the node loads at start (``model.yaml`` + ``weights.safetensors``)."""

    #: Relative paths are looked up in the working folder, then in the project's root (where
    #: the default model ships). ``null``: receive-only mode (jobs inventory each study's
    #: series and produce no results), for testing the routing before the model is deployed.
    path: Path | None = Path("models/lung-ct-unet-resnet50")
    #: Dtype the weights are held in on the device. ``float32`` lets ``inference.precision``
    #: choose the compute precision (autocast); a half dtype runs the whole network in it.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def _check_seg_scales(value: tuple[float, ...]) -> tuple[float, ...]:
    if 1.0 not in value or len(set(value)) != len(value):
        raise ValueError("seg_scales must hold 1.0, and each scale once")
    return value


#: Test-time scales of the segmentation
#: (:meth:`~dicom_node.analysis.network.LungCTNet.trunk`): magnifications of the model input
#: within [0.5, 2], 1 among them (the MLP reads that pass), each once.
SegScales = Annotated[
    tuple[Annotated[float, Field(ge=0.5, le=2.0)], ...], AfterValidator(_check_seg_scales)
]


class InferenceSettings(_Section):
    """How the model runs: device, batch size, precision."""

    #: ``auto``: the first CUDA device if there is one, else the CPU.
    device: Annotated[str, AfterValidator(_check_device)] = "auto"
    #: Slices per forward pass; ``auto`` measures on CUDA and fills ``auto_memory_fraction`` of
    #: the free memory (at most ``max_batch_size``), and uses 4 on the CPU.
    batch_size: Annotated[int | Literal["auto"], BeforeValidator(_check_batch_size)] = "auto"
    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    auto_memory_fraction: Annotated[float, Field(gt=0.0, le=0.95)] = 0.5
    #: Compute precision (autocast): ``auto`` is bf16 on CUDA (fp16 where bf16 is missing) and
    #: fp32 on the CPU; ``bf16`` works on both; ``fp16`` on CUDA only.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: NHWC memory layout (faster convolutions: tensor cores on CUDA, oneDNN on the CPU).
    channels_last: bool = True
    #: ``torch.compile`` the network at start (slower start, faster batches on CUDA).
    compile: bool = False
    #: Batches prepared ahead of the device by the loader thread.
    prefetch_batches: Annotated[int, Field(ge=1, le=16)] = 2
    #: Storage of the probability map: ``float32``, or ``uint8`` (p * 255, a quarter the memory).
    probability_dtype: Literal["float32", "uint8"] = "uint8"
    #: Test-time scales of the segmentation (the model card's ``input.seg_scales``); unset: the
    #: card's. ``[1.0]`` runs the network once per slice, for speed (the shipped card's
    #: ``[1.0, 1.25]`` takes 2.5-3 times as long); the card's lesion rule was chosen at its own.
    seg_scales: SegScales | None = None


class LesionSettings(_Section):
    """How the probability map becomes lesions."""

    #: Voxels at or above this probability are lesion; unset: the model card's threshold.
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    #: Components smaller than this are dropped (a 3 mm sphere is 14 mm³); unset: the model
    #: card's ``lesion_min_volume_mm3``.
    min_volume_mm3: Annotated[float, Field(ge=0.0)] | None = None
    #: A component is a lesion only when its highest probability reaches this; unset: the
    #: model card's ``lesion_peak`` (none there: every component).
    min_peak: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    #: A lesion is kept only when the per-image classifier calls one of its slices cancerous
    #: (at or above the model card's image threshold); unset: the card's ``lesion_image_gate``.
    image_gate: bool | None = None
    #: No lesion is reported in a study whose study probability is below this (0: every
    #: study's lesions are); unset: the model card's ``lesion_study_gate``.
    study_gate: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    #: Voxel connectivity of a component (26: faces, edges and corners).
    connectivity: Literal[6, 18, 26] = 26
    #: At most this many lesions are reported (the largest).
    max_lesions: Annotated[int, Field(ge=1, le=1000)] = 50


def _check_length_mm(value: float) -> float:
    if not 0.0 < value < float("inf"):
        raise ValueError("is not a length in mm (a positive number)")
    return value


def _check_angle_deg(value: float) -> float:
    if not 0.0 <= value <= 90.0:
        raise ValueError("is not an angle in degrees (0-90)")
    return value


def _check_tolerance_fraction(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError("is not a fraction (between 0 and 1, both excluded)")
    return value


def _check_slice_count(value: int) -> int:
    if value < 1:
        raise ValueError("is not a number of slices (a whole number, at least 1)")
    return value


def _check_code_string(value: str) -> str:
    if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", value) or not value.strip(" "):
        raise ValueError("is not a DICOM code string (1-16 of A-Z, 0-9, '_', space)")
    return value


def _check_sop_class_uid(value: str) -> str:
    if not _UID_RE.match(value) or len(value) > 64:
        raise ValueError("is not a UID (digits and dots, at most 64 characters)")
    return value


def _check_pattern(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a regular expression ({exc})") from exc
    return value


LengthMM = Annotated[float, AfterValidator(_check_length_mm)]
AngleDeg = Annotated[float, AfterValidator(_check_angle_deg)]
CodeString = Annotated[str, AfterValidator(_check_code_string)]
RegexPattern = Annotated[str, AfterValidator(_check_pattern)]


class VolumeGeometrySettings(_Section):
    """How regular a series' slices must be to form one volume (checked from headers alone)."""

    #: A step between neighbouring slices may differ from the series' median step by this
    #: fraction of it. A longer step is a missing slice, a shorter one uneven spacing, a step
    #: of (nearly) zero a duplicate position; each refuses the series (never interpolated).
    spacing_tolerance: Annotated[float, AfterValidator(_check_tolerance_fraction)] = 0.1
    #: Largest angle between the slice normal and the line the slice positions run along. A
    #: larger one is gantry tilt: the series is refused, as correcting it needs resampling.
    max_gantry_tilt_deg: AngleDeg = 1.0
    #: Largest angle between the slice normals of two images of one series; beyond it the
    #: series has mixed orientations and is refused.
    max_orientation_difference_deg: AngleDeg = 0.5


class SelectionSettings(_Section):
    """Which series of a study is analysed: the rules, as data, checked from headers alone."""

    #: ``best``: of the qualifying series that cover (nearly) as much as the widest one, the one
    #: with the thinnest slice spacing, then the most slices, then ORIGINAL\PRIMARY; ``all``:
    #: every qualifying series.
    policy: Literal["best", "all"] = "best"
    #: Modality (0008,0060) values that qualify.
    modalities: tuple[CodeString, ...] = ("CT",)
    #: SOP classes that qualify: CT Image Storage and Enhanced CT Image Storage.
    sop_classes: tuple[Annotated[str, AfterValidator(_check_sop_class_uid)], ...] = (
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.2.1",
    )
    #: Images with any of these Image Type (0008,0008) values are left out of their series (a
    #: scout filed with the axial images); a series left with no image fails.
    excluded_image_types: tuple[CodeString, ...] = ("LOCALIZER", "TOPOGRAM")
    #: ``true``: only ORIGINAL\PRIMARY series qualify; ``false``: they are only preferred.
    require_original_primary: bool = False
    #: Fewest slices (frames of an Enhanced CT) a series needs.
    min_slices: Annotated[int, AfterValidator(_check_slice_count)] = 20
    #: Largest Slice Thickness (0018,0050) that qualifies, mm.
    max_slice_thickness_mm: LengthMM = 2.5
    #: Largest distance between neighbouring slices (measured from their positions), mm.
    max_slice_spacing_mm: LengthMM = 2.5
    #: Largest angle between the slice normal (from Image Orientation (Patient)) and the patient
    #: z axis for a series to count as axial, degrees.
    axial_tolerance_deg: AngleDeg = 10.0
    #: Regular expressions (Python syntax, case-insensitive, matched anywhere in the value)
    #: on Body Part Examined and Series Description. An empty include list admits every value
    #: (a missing one too); a non-empty one admits only values that match one of its patterns.
    #: A value matching any exclude pattern fails.
    body_part_include: tuple[RegexPattern, ...] = ()
    body_part_exclude: tuple[RegexPattern, ...] = ()
    description_include: tuple[RegexPattern, ...] = ()
    description_exclude: tuple[RegexPattern, ...] = ()
    #: Regular expressions (as above) on Convolution Kernel (0018,1210), best first: of the
    #: series that cover the chest, one whose kernel matches an earlier pattern is chosen before
    #: one matching a later pattern or none, before slice spacing is compared (``["B3", "STANDARD",
    #: "SOFT"]`` for soft-tissue reconstructions over sharp lung ones). Empty: kernels not compared.
    prefer_kernels: tuple[RegexPattern, ...] = ()
    #: ``without``/``with``: of the series that cover the chest, one without (with) a contrast
    #: agent (Contrast/Bolus Agent, or an Enhanced CT's Contrast/Bolus Usage) is chosen first,
    #: after ``prefer_kernels``; ``either``: not compared.
    prefer_contrast: Literal["either", "without", "with"] = "either"
    #: Lossy-compressed images qualify: Lossy Image Compression "01" (lossy before), or a
    #: transfer syntax that may be lossy (JPEG-LS near-lossless, JPEG 2000) without "00".
    allow_lossy: bool = False
    #: A series whose body holds less lung-density tissue than this fraction (a head or an
    #: abdomen sent by mistake) is skipped: "no lung in the field of view". 0 turns it off.
    min_lung_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    geometry: VolumeGeometrySettings = VolumeGeometrySettings()


class ResultsSettings(_Section):
    """The DICOM Segmentation and Structured Report the node writes for each analysed study.

    Manufacturer is always ``dicom_node.MANUFACTURER`` (the node recognises its own output by
    it); the UIDs live under the top-level ``uid_root``.
    """

    seg_series_number: Annotated[int, Field(ge=1, le=2**31 - 1)] = 9101
    sr_series_number: Annotated[int, Field(ge=1, le=2**31 - 1)] = 9102
    seg_series_description: LongString = "AI lung lesions (dicom-node)"
    sr_series_description: LongString = "AI lung findings, not verified (dicom-node)"
    #: ``binary``: one bit per voxel per lesion; ``fractional``: the model's probability
    #: (8 bits, 255 = 1.0) over each lesion's voxels.
    segmentation_type: Literal["binary", "fractional"] = "binary"
    #: At most this many lesions (the largest) become SEG segments and SR measurement groups;
    #: the SR still counts all of them.
    max_segments: Annotated[int, Field(ge=1, le=255)] = 20
    #: Device Serial Number (Enhanced General Equipment, Type 1 in a SEG): name this install.
    device_serial_number: LongString = "1"


class Config(_Section):
    """The whole configuration. Build it with :func:`load_config`."""

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    study: StudySettings = StudySettings()
    destinations: tuple[Destination, ...] = (
        Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104),
    )
    logging: LoggingSettings = LoggingSettings()
    jobs: JobSettings = JobSettings()
    dispatch: DispatchSettings = DispatchSettings()
    service: ServiceSettings = ServiceSettings()
    model: ModelSettings = ModelSettings()
    inference: InferenceSettings = InferenceSettings()
    lesions: LesionSettings = LesionSettings()
    results: ResultsSettings = ResultsSettings()
    selection: SelectionSettings = SelectionSettings()
    #: Root of every UID this node makes; a 2.25 (UUID-derived) root by default.
    uid_root: UIDRoot = "2.25"

    @model_validator(mode="after")
    def _unique_destinations(self) -> Config:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return self


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return json.dumps(value)
    return json.dumps(value, default=str)[:80]


def describe_errors(err: ValidationError) -> list[str]:
    """One line per problem: ``path: value what-was-expected``."""
    lines = []
    for e in err.errors(include_url=False):
        path = _loc(tuple(e["loc"]))
        kind = e["type"]
        if kind == "missing":
            lines.append(f"{path}: missing (required)")
        elif kind == "extra_forbidden":
            lines.append(f"{path}: unknown key")
        elif kind == "value_error":
            reason = str(e["ctx"]["error"]) if "ctx" in e else e["msg"]
            if path == "(top level)" or isinstance(e["input"], dict):
                lines.append(f"{path}: {reason}")
            else:
                lines.append(f"{path}: {_shown(e['input'])} {reason}")
        else:
            msg = e["msg"]  # its quoted choices keep their case: 'INFO', not 'info'
            lines.append(f"{path}: {_shown(e['input'])} is invalid ({msg[:1].lower()}{msg[1:]})")
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: the last would silently
    win (a second ``node:`` section would undo the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"the key {key!r} is given twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


#: The project's root, where ``models/`` ships.
PROJECT_ROOT: Final = Path(__file__).resolve().parents[1]


def resolve_model_path(path: Path) -> Path:
    """A relative model path is taken from the working folder, else from the project's root
    (where ``models/`` ships), so ``dicom-node`` finds its default model from anywhere."""
    if path.is_absolute() or path.exists():
        return path
    shipped = PROJECT_ROOT / path
    return shipped if shipped.exists() else path


def load_config(path: Path | None = None, *, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load and validate the configuration.

    Parameters
    ----------
    path
        A YAML file; ``None`` means the embedded defaults.
    overrides
        Nested values that replace the file's (the command-line flags), validated the same way.

    Raises
    ------
    ConfigError
        The file cannot be read or parsed, or any value is invalid; the message has one line per
        problem.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
            ) from exc
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded
    if overrides:
        raw = _merge(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        where = f"{path}" if path is not None else "configuration"
        raise ConfigError(f"{where} is invalid:\n  " + "\n  ".join(describe_errors(exc))) from exc
