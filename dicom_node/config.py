"""The node's configuration: one frozen, validated object, loaded once from YAML.

``config.yaml`` at the top of the project documents every key; the defaults below are the
embedded ones (``dicom-node serve`` without ``--config`` uses them), and a test keeps the two
equal. A bad file fails at start with each bad key's path, its value and what was expected::

    node.port: 70000 is not a port (1-65535)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

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
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AllowedCaller(_Section):
    """A calling AE that may associate; ``host`` (an IP address) pins it to one address."""

    ae_title: AETitle
    host: str | None = None


class NodeSettings(_Section):
    """The DICOM listener."""

    ae_title: AETitle = "DICOM_NODE"
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens for the PACS; narrow it in config
    port: Port = 11112
    #: Empty: any calling AE may associate. Otherwise only these (A-ASSOCIATE-RJ for the rest).
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 10
    #: Largest P-DATA PDU we advertise; large PDUs cut per-PDU overhead on big CT slices.
    max_pdu_bytes: Annotated[int, Field(ge=4096, le=16 * 1024 * 1024)] = 1024 * 1024
    network_timeout_seconds: Seconds = 60.0
    acse_timeout_seconds: Seconds = 30.0
    dimse_timeout_seconds: Seconds = 60.0
    #: Instances that are not CT / Enhanced CT: ``accept`` acknowledges and drops them (counted and
    #: logged); ``reject`` answers them with a failure status.
    other_instances: Literal["accept", "reject"] = "accept"


class StorageSettings(_Section):
    """Where the spool and the job store live, and how full the disk may get."""

    data_dir: Path = Path("./var")
    #: Below this much free space a C-STORE is answered 0xA700 (out of resources) and not kept.
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 1024
    #: fsync every received file (and its directory) before acknowledging it. Turn off only for
    #: throw-away test nodes: a power cut could then lose acknowledged instances.
    fsync: bool = True


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


class LoggingSettings(_Section):
    """Logs: level, format, and whether patient identifiers may appear in them."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"
    include_patient_data: bool = False


class JobSettings(_Section):
    """The worker: retries of failed jobs."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    #: Delay before retry n is ``retry_base_seconds * 2**(n-1)``, capped at ``retry_max_seconds``.
    retry_base_seconds: Seconds = 30.0
    retry_max_seconds: Seconds = 900.0
    #: How often the worker and the completion scan look for work.
    poll_seconds: Seconds = 1.0


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

    path: Path = Path("./models/lung-ct")
    #: Dtype the weights are held in on the device. ``float32`` lets ``inference.precision``
    #: choose the compute precision (autocast); a half dtype runs the whole network in it.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


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
    #: NHWC memory layout on CUDA (faster convolutions with tensor cores).
    channels_last: bool = True
    #: ``torch.compile`` the network at start (slower start, faster batches on CUDA).
    compile: bool = False
    #: Batches prepared ahead of the device by the loader thread.
    prefetch_batches: Annotated[int, Field(ge=1, le=16)] = 2
    #: Storage of the probability map: ``float32``, or ``uint8`` (p * 255, a quarter the memory).
    probability_dtype: Literal["float32", "uint8"] = "float32"


class LesionSettings(_Section):
    """How the probability map becomes lesions."""

    #: Voxels at or above this probability are lesion; unset: the model card's threshold.
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    #: Components smaller than this are dropped (a 3 mm sphere is 14 mm³).
    min_volume_mm3: Annotated[float, Field(ge=0.0)] = 10.0
    #: Voxel connectivity of a component (26: faces, edges and corners).
    connectivity: Literal[6, 18, 26] = 26
    #: At most this many lesions are reported (the largest).
    max_lesions: Annotated[int, Field(ge=1, le=1000)] = 50


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
    model: ModelSettings = ModelSettings()
    inference: InferenceSettings = InferenceSettings()
    lesions: LesionSettings = LesionSettings()
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
            lines.append(f"{path}: {_shown(e['input'])} is invalid ({e['msg'].lower()})")
    return lines


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


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
        try:
            loaded = yaml.safe_load(text)
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
