"""The exception hierarchy.

Exceptions become DICOM statuses only in the receiver (:mod:`dicom_node.receive.scp`) and job
states only in the worker's one boundary (:mod:`dicom_node.worker`). Everywhere else code raises
one of these, precisely, and never swallows one.
"""


class NodeError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(NodeError):
    """The configuration file is missing, unreadable or invalid; the message names each bad key."""


class DatasetError(NodeError):
    """A received dataset cannot be parsed or lacks what is needed to file it."""


class DatasetMismatchError(DatasetError):
    """The dataset contradicts its C-STORE command (SOP Class or SOP Instance UID differ)."""


class InvalidUIDError(DatasetError):
    """A UID is not a valid DICOM UID (and so can never become part of a path)."""


class OutOfResourcesError(NodeError):
    """Free disk space is below the configured floor, or the disk is full."""


class JobStoreError(NodeError):
    """The job store refused an operation (unknown job, illegal state change)."""


class PipelineError(NodeError):
    """A study could not be processed; the message says why and becomes the job's last error."""


class AnalysisUnavailableError(PipelineError):
    """No analysis can run now (its process could not be started): the job waits and is tried
    again, without spending one of its attempts on what is not the study's fault."""


class StudySkipped(NodeError):  # noqa: N818 - an outcome, not a failure: "the study was skipped"
    """The study holds nothing to analyse; the message says which rule each series failed."""


class ModelError(NodeError):
    """A model folder cannot be used: its card or weights are missing, invalid or do not match."""


class TrainingBudgetError(NodeError):
    """A training run's time budget leaves one of its stages no time."""


class DeviceOutOfMemoryError(PipelineError):
    """The inference device ran out of memory even at batch size 1 (worth retrying later)."""


class VolumeGeometryError(PipelineError):
    """A series' slices do not form one regular volume: a gap, a duplicate position, gantry
    tilt, mixed orientations or image sizes. The message says what and where (never patient
    data)."""


class VolumeDecodeError(PipelineError):
    """A series' pixel data cannot be decoded: a transfer syntax without a decoder, corrupt or
    truncated data, or frames that contradict the header."""
