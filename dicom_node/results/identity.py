"""Who the results belong to, who made them, and the UIDs they carry.

The IHE AI Results (AIR) profile asks that AI output join the study it was derived from: same
Study Instance UID, the patient and study attributes copied from the source images, a new series,
and the producing algorithm identified. This module holds those three parts:

* **Identity**: :data:`IDENTITY_KEYWORDS` are copied element by element from the analysed series
  (:func:`copy_identity`), so values and character set stay byte-exact (a UTF-8 name stays
  UTF-8). :func:`source_header` prepares a source header for highdicom, which reads the Type 2
  attributes directly and fails on a file that omits one. A source's Timezone Offset From UTC
  is kept too, with the result's own dates and times given in it.
* **Equipment**: :class:`Producer` names the node and the model: Manufacturer is always
  :data:`dicom_node.MANUFACTURER`, Software Versions the node's and the model's versions, and a
  Contributing Equipment item names the node as processing equipment.
* **UIDs**: :func:`derive_uid` makes a UID from a root and any parts, deterministically.
  :class:`ResultUIDs` derives every UID of one job's output from (study, analysed series, job
  version, model version, output kind), so a retried send carries the same UIDs (the PACS keeps
  one copy) and a new version of the study's job gets new ones.
"""

from __future__ import annotations

import copy
import datetime
import enum
import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Final

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node import MANUFACTURER, __version__
from dicom_node.uids import is_valid_uid

__all__ = [
    "BUILD_CHARACTER_SET",
    "IDENTITY_KEYWORDS",
    "TYPE_2_KEYWORDS",
    "OutputKind",
    "Producer",
    "ResultUIDs",
    "copy_identity",
    "derive_uid",
    "shallow_copy",
    "source_header",
]

logger = logging.getLogger(__name__)

#: The character set highdicom builds a result in. highdicom refuses some valid ones (ISO 2022
#: with an empty first value, as PS3.5's examples write Japanese and Korean); everything it
#: writes itself is ASCII, and :func:`copy_identity` then gives the result the source's
#: character set with the attributes encoded in it.
BUILD_CHARACTER_SET: Final = "ISO_IR 192"

#: Patient and study attributes every result copies from its source, in this order.
IDENTITY_KEYWORDS: Final[tuple[str, ...]] = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)

# Type 2 attributes of the Patient and General Study modules that highdicom reads directly
# (``src.PatientID``...): a source that omits one gets it empty, as Type 2 allows.
_TYPE_2: Final[tuple[str, ...]] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)

#: The Type 2 patient and study attributes highdicom reads from a source image.
TYPE_2_KEYWORDS: Final = _TYPE_2

# Namespace of the name-based (version 5) UUIDs under the "2.25" root.
_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-node:results")
_MAX_UID: Final = 64
_ROOT_RE: Final = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Fewer hash digits than this under a long root would make collisions plausible.
_MIN_DIGITS: Final = 20


class OutputKind(enum.StrEnum):
    """What a derived UID names; part of what it is derived from."""

    SEG_SERIES = "seg-series"
    SEG_INSTANCE = "seg-instance"
    SR_SERIES = "sr-series"
    SR_INSTANCE = "sr-instance"
    TRACKING = "tracking"
    DEVICE = "device"


def derive_uid(root: str, *parts: object) -> str:
    """A UID that depends only on ``root`` and ``parts``.

    Parameters
    ----------
    root
        ``"2.25"``: the UID is ``2.25.<n>`` with ``n`` the integer of a name-based UUID (version
        5, SHA-1) of the parts, as PS3.5 B.2 describes. Any other root: ``<root>.<digits>`` with
        the digits of a SHA-256 of the parts, as many as fit in 64 characters.
    parts
        Anything with a stable ``str()``; they are joined unambiguously (as a JSON list), so
        ``("a.b",)`` and ``("a", "b")`` give different UIDs.

    Returns
    -------
    str
        A valid DICOM UID of at most 64 characters.

    Raises
    ------
    ValueError
        The root is not a UID, or leaves fewer than 20 digits for the hash.
    """
    if len(root) > _MAX_UID or not _ROOT_RE.match(root):
        raise ValueError(f"UID root {root!r} is not a valid UID")
    name = json.dumps([str(p) for p in parts], ensure_ascii=False)
    if root == "2.25":
        return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
    room = _MAX_UID - len(root) - 1
    if room < _MIN_DIGITS:
        raise ValueError(f"UID root {root!r} is too long: it leaves {room} digits for the hash")
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    digits = str(int.from_bytes(digest, "big"))  # 76-78 digits, never a leading zero
    return f"{root}.{digits[:room]}"


@dataclass(frozen=True)
class ResultUIDs:
    """Every UID of one job's output, derived from what identifies the job's result.

    Build it with :meth:`derive`; equal inputs give equal UIDs.

    Attributes
    ----------
    seg_series, seg_instance
        Series and SOP Instance UID of the Segmentation.
    sr_series, sr_instance
        Series and SOP Instance UID of the Structured Report.
    """

    root: str
    study_instance_uid: str
    source_series_uid: str
    job_version: int
    model_version: str
    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str

    @classmethod
    def derive(
        cls,
        *,
        root: str,
        study_instance_uid: str,
        source_series_uid: str,
        job_version: int,
        model_version: str,
    ) -> ResultUIDs:
        """Derive the UIDs of a job's output.

        Parameters
        ----------
        root
            The node's UID root (``uid_root`` in the configuration).
        study_instance_uid, source_series_uid
            The study and the analysed series.
        job_version
            The job's version: a study that grew after analysis is analysed again as a new
            version, whose results get new UIDs.
        model_version
            The model's version: results of another model are other objects.

        Raises
        ------
        ValueError
            As :func:`derive_uid`.
        """
        key = (study_instance_uid, source_series_uid, job_version, model_version)

        def uid(kind: OutputKind) -> str:
            return derive_uid(root, kind.value, *key)

        return cls(
            root=root,
            study_instance_uid=study_instance_uid,
            source_series_uid=source_series_uid,
            job_version=job_version,
            model_version=model_version,
            seg_series=uid(OutputKind.SEG_SERIES),
            seg_instance=uid(OutputKind.SEG_INSTANCE),
            sr_series=uid(OutputKind.SR_SERIES),
            sr_instance=uid(OutputKind.SR_INSTANCE),
        )

    def tracking_uid(self, lesion_label: int) -> str:
        """Tracking UID of a lesion: the same in the SEG segment and the SR measurement group."""
        return self._derive(OutputKind.TRACKING, lesion_label)

    def study_tracking_uid(self) -> str:
        """Tracking UID of the SR's study-level measurement group (the classification)."""
        return self._derive(OutputKind.TRACKING, "study")

    def _derive(self, kind: OutputKind, *more: object) -> str:
        return derive_uid(
            self.root,
            kind.value,
            self.study_instance_uid,
            self.source_series_uid,
            self.job_version,
            self.model_version,
            *more,
        )


@dataclass(frozen=True)
class Producer:
    """The node and model that made a result: the equipment attributes of SEG and SR.

    Attributes
    ----------
    model_name, model_version
        From the model card.
    device_serial_number
        Device Serial Number of this install (``results.device_serial_number``).
    """

    model_name: str
    model_version: str
    device_serial_number: str = "1"

    def __post_init__(self) -> None:
        for what, value in (
            ("model_name", self.model_name),
            ("model_version", self.model_version),
            ("device_serial_number", self.device_serial_number),
        ):
            if not value or len(value) > 64 or "\\" in value:
                raise ValueError(f"{what} must be 1-64 characters without a backslash")

    @property
    def manufacturer(self) -> str:
        """Always :data:`dicom_node.MANUFACTURER`: the node recognises its own output by it."""
        return MANUFACTURER

    @property
    def manufacturer_model_name(self) -> str:
        """The model's name (the "device model" that made the content)."""
        return self.model_name

    @property
    def software_versions(self) -> tuple[str, str]:
        """Software Versions: the node's version, then the model's."""
        return (f"{MANUFACTURER} {__version__}", f"{self.model_name} {self.model_version}")

    def device_uid(self, root: str) -> str:
        """A UID naming this model version as an observer device (the same for every study)."""
        return derive_uid(
            root, OutputKind.DEVICE.value, MANUFACTURER, self.model_name, self.model_version
        )

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """A Contributing Equipment item naming the node as the processing equipment."""
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name,
            software_versions=list(self.software_versions),
            device_serial_number=self.device_serial_number,
            contribution_description=("AI analysis (results not verified by a clinician)"),
        )

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification for a SEG segment: name, version, family AI."""
        return hd.AlgorithmIdentificationSequence(
            name=self.model_name,
            family=codes.cid7162.ArtificialIntelligence,
            version=self.model_version,
            source=MANUFACTURER,
        )

    def sr_algorithm_identification(self) -> hd.sr.AlgorithmIdentification:
        """Algorithm Identification (TID 4019) for an SR measurement or group."""
        return hd.sr.AlgorithmIdentification(
            name=self.model_name,
            version=self.model_version,
            family=codes.cid7162.ArtificialIntelligence,
            manufacturer=MANUFACTURER,
        )


def source_header(dataset: Dataset) -> Dataset:
    """A source image's header in the shape highdicom can build from.

    Type 2 patient and study attributes the file omits are added empty (highdicom reads them
    directly and fails on a missing one). A header that has them all is returned as it is;
    otherwise a shallow copy is completed (the caller's dataset is never changed). Pixel data
    is not needed (read headers with ``stop_before_pixels=True``).

    Raises
    ------
    ValueError
        The dataset has no valid Study Instance UID.
    """
    if not is_valid_uid(dataset.get("StudyInstanceUID")):
        raise ValueError("source image has no valid Study Instance UID")
    missing = [keyword for keyword in _TYPE_2 if keyword not in dataset]
    if not missing:
        return dataset
    header = shallow_copy(dataset)
    for keyword in missing:
        setattr(header, keyword, "")
    return header


def shallow_copy(dataset: Dataset) -> Dataset:
    """A new dataset holding ``dataset``'s elements (but its pixel data) and file meta, to
    complete without changing the caller's."""
    header = Dataset()
    for element in dataset:
        if element.tag != 0x7FE00010:
            header.add(element)
    if hasattr(dataset, "file_meta"):
        header.file_meta = dataset.file_meta
    return header


def copy_identity(target: Dataset, source: Dataset) -> None:
    """Copy :data:`IDENTITY_KEYWORDS` from ``source`` into ``target``, element by element.

    An attribute the source lacks is written empty when it is Type 2 and removed otherwise,
    so the result says exactly what the source says. Elements are deep-copied; their values,
    and with the same Specific Character Set their encoded bytes, are identical to the
    source's.
    """
    for keyword in IDENTITY_KEYWORDS:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
        elif keyword in _TYPE_2:
            setattr(target, keyword, "")
        elif keyword in target:
            del target[keyword]
    _align_timezone(target, source)
    logger.debug("copied %d identity attributes", len(IDENTITY_KEYWORDS))


#: The dates and times a result gets when it is built (highdicom's, in the node's local time).
_OWN_TIMES: Final[tuple[tuple[str, str], ...]] = (
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("ContentDate", "ContentTime"),
    ("SeriesDate", "SeriesTime"),
)
_OFFSET_RE: Final = re.compile(r"^([+-])(\d{2})(\d{2})$")


def _utc_offset(value: object) -> datetime.timezone | None:
    """The fixed offset of a Timezone Offset From UTC (``+HHMM``/``-HHMM``), or ``None``."""
    match = _OFFSET_RE.match(str(value).strip()) if value is not None else None
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    delta = datetime.timedelta(hours=int(hours), minutes=int(minutes))
    if delta > datetime.timedelta(hours=14) or int(minutes) >= 60:
        return None
    return datetime.timezone(-delta if sign == "-" else delta)


def _align_timezone(target: Dataset, source: Dataset) -> None:
    """Give ``target`` the source's Timezone Offset From UTC, and its own dates and times
    (made in the node's local time) in that offset: the offset applies to every date and time
    of an instance (PS3.3 C.12.1.1.8), the Study Date and Time copied from the source among
    them, so a result without it, or with the node's own, would move the study in time."""
    offset = _utc_offset(source.get("TimezoneOffsetFromUTC"))
    if offset is None:
        if "TimezoneOffsetFromUTC" in target:
            del target.TimezoneOffsetFromUTC
        return
    for date_keyword, time_keyword in _OWN_TIMES:
        date, time = target.get(date_keyword), target.get(time_keyword)
        if not date or not time:
            continue
        local = datetime.datetime.strptime(f"{date}{str(time)[:6]:0<6}", "%Y%m%d%H%M%S")
        there = local.astimezone().astimezone(offset)  # naive: the node's local time
        target[date_keyword].value = there.strftime("%Y%m%d")
        target[time_keyword].value = there.strftime("%H%M%S")
    target.TimezoneOffsetFromUTC = str(source.TimezoneOffsetFromUTC).strip()
