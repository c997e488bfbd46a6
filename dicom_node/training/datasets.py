"""Datasets for training and evaluation: one interface, three sources, patient-level splits.

A dataset is anything that satisfies :class:`CaseDataset`: it lists case ids, names the patient
of each case and loads a case as a :class:`Case` (a CT volume in HU with its tumour mask). Three
sources are provided:

* :class:`MSDDataset` - the Medical Segmentation Decathlon layout (``dataset.json``,
  ``imagesTr/*.nii.gz``, ``labelsTr/*.nii.gz``; Task06_Lung), read with SimpleITK;
* :class:`DicomSegDataset` - DICOM CT series, each with a DICOM SEG ground truth whose frames
  refer to the CT slices by SOP Instance UID (read with highdicom);
* :class:`PhantomDataset` - seeded synthetic chest CTs from :mod:`dicom_node.training.phantom`,
  drawn from a :class:`~dicom_node.training.phantom.SiteDistribution`, optionally shifted.

:func:`split_cases` assigns whole patients to ``train`` / ``val`` / ``test``, so that no patient's
slices are on both sides; :func:`write_split` and :func:`read_split` keep a split in a JSON file.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from dicom_node.errors import DatasetError
from dicom_node.training.phantom import SiteDistribution, generate_phantom

if TYPE_CHECKING:
    from dicom_node.study.volume import CTVolume

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
#: A phantom seed the generator fails on is replaced by ``seed + k * step`` (k = 1, 2, ...).
_FALLBACK_SEED_STEP = 1_000_000_007
_PHANTOM_ATTEMPTS = 4


@dataclass(frozen=True, eq=False)
class Case:
    """One CT volume with its tumour ground truth.

    Attributes
    ----------
    case_id
        Unique within its dataset.
    patient_id
        The patient the volume belongs to (splits never divide a patient).
    hu
        (z, y, x) Hounsfield units (int16 or float32).
    tumour_mask
        (z, y, x) uint8: 0 background, > 0 tumour (instance labels where the source has them).
    spacing_mm
        (dz, dy, dx) voxel spacing, mm.
    origin_mm
        LPS position (x, y, z) of voxel ``[0, 0, 0]``, mm.
    """

    case_id: str
    patient_id: str
    hu: npt.NDArray[np.int16] | npt.NDArray[np.float32]
    tumour_mask: npt.NDArray[np.uint8]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    attributes: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3 or self.hu.shape != self.tumour_mask.shape:
            raise DatasetError(
                f"case {self.case_id}: volume {self.hu.shape} and mask "
                f"{self.tumour_mask.shape} must be (z, y, x) of one shape"
            )

    @property
    def has_tumour(self) -> bool:
        """Whether any voxel is tumour."""
        return bool(self.tumour_mask.any())

    @property
    def slice_labels(self) -> npt.NDArray[np.bool_]:
        """(z,) whether each slice holds tumour voxels (the per-image ground truth)."""
        return np.asarray(self.tumour_mask.reshape(self.tumour_mask.shape[0], -1).any(axis=1))


@runtime_checkable
class CaseDataset(Protocol):
    """What every dataset offers: case ids, their patients, and loading a case."""

    @property
    def name(self) -> str:
        """A short description (source and location) for logs and model cards."""
        ...

    def case_ids(self) -> list[str]:
        """All case ids, in a stable order."""
        ...

    def patient_id(self, case_id: str) -> str:
        """The patient of ``case_id`` (raises ``KeyError`` for an unknown id)."""
        ...

    def load(self, case_id: str) -> Case:
        """Read one case (raises ``KeyError`` for an unknown id, ``DatasetError`` if unreadable)."""
        ...


T = TypeVar("T")


def default_workers(limit: int = 8) -> int:
    """One loader process per CPU core this process may use, at most ``limit``."""
    return max(1, min(limit, len(os.sched_getaffinity(0))))


def iter_cases(
    dataset: CaseDataset, case_ids: Sequence[str] | None = None, *, workers: int = 1
) -> Iterator[Case]:
    """Load the given cases (all when ``None``) in order, in ``workers`` processes."""
    ids = dataset.case_ids() if case_ids is None else case_ids
    yield from map_cases(_load_case, dataset, ids, workers=workers)


def _load_case(dataset: CaseDataset, case_id: str) -> Case:
    return dataset.load(case_id)


def _one_torch_thread() -> None:
    """Loader processes share the cores among themselves: one torch thread each."""
    import torch

    torch.set_num_threads(1)


def map_cases(
    fn: Callable[[CaseDataset, str], T],
    dataset: CaseDataset,
    case_ids: Sequence[str],
    *,
    workers: int = 1,
) -> Iterator[T]:
    """``fn(dataset, case_id)`` for each case id, yielded in the order of ``case_ids``.

    With ``workers`` > 1 the calls run in that many processes (started fresh, not forked from
    a process whose torch threads are running), at most two cases per process ahead of the
    consumer, so memory stays bounded when the consumer is slower. ``fn`` and ``dataset`` must
    pickle: a module-level function (or a ``functools.partial`` of one) and a dataset of plain
    settings, as every dataset here is. Results are the same for any number of workers.
    """
    if workers <= 1 or len(case_ids) <= 1:
        for case_id in case_ids:
            yield fn(dataset, case_id)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        min(workers, len(case_ids)), mp_context=context, initializer=_one_torch_thread
    ) as pool:
        pending: collections.deque[Future[T]] = collections.deque()
        remaining = iter(case_ids)
        for case_id in remaining:
            pending.append(pool.submit(fn, dataset, case_id))
            if len(pending) >= 2 * workers:
                break
        try:
            while pending:
                result = pending.popleft().result()
                following = next(remaining, None)
                if following is not None:
                    pending.append(pool.submit(fn, dataset, following))
                yield result
        finally:
            for future in pending:
                future.cancel()


# ---------------------------------------------------------------------- MSD (NIfTI)


class MSDDataset:
    """A Medical Segmentation Decathlon task folder (e.g. ``Task06_Lung``).

    ``dataset.json`` lists the training pairs (``"training": [{"image": ..., "label": ...}]``,
    paths relative to the folder); each image is a CT volume in HU and each label a mask (0
    background, > 0 tumour). The case id is the image file's stem (``lung_001``); MSD has one
    volume per patient, so the patient id is the case id.

    Parameters
    ----------
    root
        The task folder.

    Raises
    ------
    DatasetError
        ``dataset.json`` is missing or not the MSD layout.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        meta = self.root / "dataset.json"
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            pairs = info["training"]
            self._pairs: dict[str, tuple[Path, Path]] = {}
            for pair in pairs:
                image = self.root / str(pair["image"])
                label = self.root / str(pair["label"])
                self._pairs[_nifti_stem(image)] = (image, label)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(
                f"{meta}: not a Medical Segmentation Decathlon dataset ({exc})"
            ) from exc

    @property
    def name(self) -> str:
        return f"MSD {self.root}"

    def case_ids(self) -> list[str]:
        return sorted(self._pairs)

    def patient_id(self, case_id: str) -> str:
        if case_id not in self._pairs:
            raise KeyError(case_id)
        return case_id

    def load(self, case_id: str) -> Case:
        import SimpleITK as sitk  # noqa: N813 - the name SimpleITK's own documentation uses

        image_path, label_path = self._pairs[case_id]
        try:
            image = sitk.ReadImage(str(image_path))
            label = sitk.ReadImage(str(label_path))
        except RuntimeError as exc:
            raise DatasetError(f"case {case_id}: cannot read NIfTI ({exc})") from exc
        # Both to increasing x, y, z along the LPS axes, as the node gives the model its
        # volumes: flipped, and permuted where the axes are stored in another order (a volume
        # stored sagittal or coronal).
        image = sitk.DICOMOrient(image, "LPS")  # type: ignore[no-untyped-call, unused-ignore]
        label = sitk.DICOMOrient(label, "LPS")  # type: ignore[no-untyped-call, unused-ignore]
        raw_direction = image.GetDirection()  # type: ignore[no-untyped-call, unused-ignore]
        direction = np.asarray(raw_direction, dtype=np.float64).reshape(3, 3)
        if not np.allclose(direction, np.eye(3), atol=1e-3):
            logger.warning("case %s: oblique direction %s read as axial", case_id, direction)
        hu = sitk.GetArrayFromImage(image)
        mask = sitk.GetArrayFromImage(label)
        if mask.shape != hu.shape:
            raise DatasetError(f"case {case_id}: label {mask.shape} and image {hu.shape} differ")
        _check_label_geometry(case_id, image, label)
        raw_spacing = image.GetSpacing()  # type: ignore[no-untyped-call, unused-ignore]
        sx, sy, sz = (float(v) for v in raw_spacing)
        hu_arr = (
            np.ascontiguousarray(hu, dtype=np.int16)
            if np.issubdtype(hu.dtype, np.integer) and hu.min() >= -32768 and hu.max() <= 32767
            else np.ascontiguousarray(hu, dtype=np.float32)
        )
        raw_origin = image.GetOrigin()  # type: ignore[no-untyped-call, unused-ignore]
        origin = tuple(float(v) for v in raw_origin)
        return Case(
            case_id=case_id,
            patient_id=case_id,
            hu=hu_arr,
            tumour_mask=_label_mask(mask),
            spacing_mm=(sz, sy, sx),
            origin_mm=(origin[0], origin[1], origin[2]),
        )


def _label_mask(label: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """An MSD label as the case's mask: integer labels above 0 are tumour (their values kept as
    instance labels up to 255); a floating-point label is tumour at 0.5 or more (a label
    resampled with linear interpolation, or 1.0 stored as 0.99999994), its whole values above
    1 kept."""
    if np.issubdtype(label.dtype, np.floating):
        tumour = np.where(label >= 0.5, np.clip(np.rint(np.nan_to_num(label)), 1, 255), 0)
        return np.ascontiguousarray(tumour, dtype=np.uint8)
    return np.ascontiguousarray(np.clip(label, 0, 255), dtype=np.uint8)


def _check_label_geometry(case_id: str, image: Any, label: Any) -> None:
    """Refuse a label that is not on its image's voxels (both oriented alike already): an
    origin more than half a voxel off along any axis, a spacing off by more than 0.1 %, or
    direction cosines that differ by more than 1e-3 (a header copied from another volume, or
    the array written under another orientation)."""
    geometry = {
        which: (
            np.asarray(volume.GetOrigin(), dtype=np.float64),
            np.asarray(volume.GetSpacing(), dtype=np.float64),
            np.asarray(volume.GetDirection(), dtype=np.float64).reshape(3, 3),
        )
        for which, volume in (("image", image), ("label", label))
    }
    (origin, spacing, direction), (l_origin, l_spacing, l_direction) = geometry.values()
    # the label's origin in the image's voxels, along each of its axes
    offset = direction.T @ (l_origin - origin) / spacing
    differences = []
    if not np.allclose(l_direction, direction, atol=1e-3):
        theirs, ours = np.round(l_direction, 3).tolist(), np.round(direction, 3).tolist()
        differences.append(f"direction {theirs} against {ours}")
    if not np.allclose(l_spacing, spacing, rtol=1e-3, atol=0.0):
        differences.append(f"spacing {_mm3(l_spacing)} against {_mm3(spacing)} mm")
    if np.any(np.abs(offset) > 0.5):
        differences.append(f"origin {_mm3(l_origin)} against {_mm3(origin)} mm")
    if differences:
        raise DatasetError(
            f"case {case_id}: the label is not on the image's voxels: its "
            + ", ".join(differences)
            + " (LPS, after orienting both)"
        )


def _mm3(values: npt.NDArray[np.float64]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ---------------------------------------------------------------------- DICOM CT + SEG


#: Segmented Property Types of tumour ground truth (SNOMED CT, by their names in pydicom's
#: code dictionary; older SEGs' SNOMED RT codes compare equal): Neoplasm (Tumor, 108369006),
#: Mass (4147007), Nodule (27925004), the primary and secondary (metastatic) neoplasm codes,
#: the lung's, and Gross Tumor Volume (228791009, as radiotherapy-derived SEGs label GTVs).
_TUMOUR_CODE_NAMES = (
    "Neoplasm",
    "Mass",
    "Nodule",
    "MalignantNeoplasmPrimary",
    "NeoplasmPrimary",
    "NeoplasmSecondary",
    "Metastasis",
    "PrimaryMalignantNeoplasmOfLung",
    "SecondaryMalignantNeoplasmOfLung",
    "GrossTumorVolume",
)
#: A SEG frame placed by its position lies at most this fraction of the smallest voxel
#: spacing from its CT slice's Image Position (Patient).
_POSITION_TOLERANCE = 0.1


class DicomSegDataset:
    """DICOM CT series under a folder, each with a DICOM SEG that holds its tumour ground truth.

    Every file under ``root`` is read once (headers only): CT images are grouped by Series
    Instance UID, SEG instances are matched to the series their frames refer to. A case is a
    series that has a SEG; the case id is its Series Instance UID and the patient its Patient
    ID. Series without one (blanked by an anonymiser) that share a study, or a Patient's Name
    and Birth Date, are one patient: the Patient ID of another series of their study where one
    has it, else a stand-in hashed from what links them (a warning says how many series had
    none; before, each such series was a patient of its own, and one patient's series could be
    split apart).

    Only the segments that are tumour count: those whose Segmented Property Type (or Category)
    is a tumour code (neoplasm, mass, nodule, metastasis, gross tumour volume; see
    ``_TUMOUR_CODE_NAMES``), or, with ``segment_labels``, those whose Segment Label matches it.
    A SEG of lungs, heart and GTV (NSCLC-Radiomics) gives the GTV only; a SEG with no such
    segment is refused. The mask is the union of the segments kept (their segment numbers
    as labels, the higher where they overlap), and of all SEGs of the series: several readers'
    outlines (LIDC-IDRI has up to four a series) count as tumour wherever one reader drew it.
    A FRACTIONAL SEG is tumour at half its Maximum Fractional Value or more.

    Frames are placed on slices by the source image (and, in an Enhanced CT, source frame) they
    reference; a SEG whose frames reference none is placed by each frame's Plane Position
    (Patient), on the series' Frame of Reference and pixel grid.

    Parameters
    ----------
    root
        Folder searched recursively for DICOM files.
    segment_labels
        A regular expression: keep the segments whose whole Segment Label matches it (case
        insensitive), whatever their codes, in place of the tumour codes (``"GTV.*"``).

    Raises
    ------
    DatasetError
        No CT series with a SEG under ``root``, or ``segment_labels`` is not a regular
        expression.
    """

    def __init__(self, root: Path, *, segment_labels: str | None = None) -> None:
        import pydicom

        self.root = Path(root)
        if segment_labels is not None:
            try:
                re.compile(segment_labels)
            except re.error as exc:
                raise DatasetError(
                    f"segment labels {segment_labels!r}: not a regular expression ({exc})"
                ) from exc
        self.segment_labels = segment_labels
        series: dict[str, list[Path]] = {}
        patients: dict[str, str] = {}
        without_id: dict[str, list[str]] = {}  # series: what links it to others
        study_patients: dict[str, str] = {}
        segs: dict[str, list[Path]] = {}
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, OSError):
                continue
            modality = str(ds.get("Modality", ""))
            if modality == "SEG":
                for ref in ds.get("ReferencedSeriesSequence", []):
                    segs.setdefault(str(ref.SeriesInstanceUID), []).append(path)
            elif modality == "CT":
                uid = str(ds.SeriesInstanceUID)
                series.setdefault(uid, []).append(path)
                patient = str(ds.get("PatientID", "") or "").strip()
                study = str(ds.get("StudyInstanceUID", "") or "")
                if patient:
                    patients[uid] = patient
                    if study:
                        study_patients.setdefault(study, patient)
                else:
                    without_id[uid] = _patient_links(ds, uid)
        patients.update(_stand_in_patients(without_id, study_patients))
        self._series = {uid: paths for uid, paths in series.items() if uid in segs}
        self._segs = segs
        self._patients = patients
        if not self._series:
            raise DatasetError(f"{self.root}: no CT series with a DICOM SEG found")
        unnamed = len(without_id.keys() & self._series.keys())
        if unnamed:
            logger.warning(
                "%s: %d of %d series have no Patient ID: series that share a study, or a"
                " Patient's Name and Birth Date, are taken as one patient (that of another"
                " series of the study where one has a Patient ID)",
                self.root,
                unnamed,
                len(self._series),
            )

    @property
    def name(self) -> str:
        return f"DICOM+SEG {self.root}" + (
            f" (segments labelled {self.segment_labels})" if self.segment_labels else ""
        )

    def case_ids(self) -> list[str]:
        return sorted(self._series)

    def patient_id(self, case_id: str) -> str:
        if case_id not in self._series:
            raise KeyError(case_id)
        return self._patients[case_id]

    def load(self, case_id: str) -> Case:
        import highdicom as hd

        from dicom_node.config import VolumeGeometrySettings
        from dicom_node.study.volume import read_volume

        paths = self._series[case_id]
        volume = read_volume(paths, settings=VolumeGeometrySettings())
        mask = np.zeros(volume.shape, dtype=np.uint8)
        for seg_path in self._segs[case_id]:
            where = f"case {case_id}: SEG {_relative(seg_path, self.root)}"
            try:
                seg = hd.seg.segread(seg_path)
                labels = self._seg_labels(seg, volume, where)
            except DatasetError:
                raise
            except Exception as exc:  # highdicom's own errors, said with the case and the file
                raise DatasetError(
                    f"{where}: cannot be read onto the series ({type(exc).__name__}: {exc})"
                ) from exc
            np.maximum(mask, labels, out=mask)
        # Both in the orientation the node's engine gives the model (x left, y back, z up),
        # as for the other datasets: a prone or feet-first series is flipped to it, a decubitus
        # one transposed.
        return Case(
            case_id=case_id,
            patient_id=self._patients[case_id],
            hu=volume.to_model_order(volume.hu).copy(order="C"),
            tumour_mask=volume.to_model_order(mask).copy(order="C"),
            spacing_mm=volume.model_spacing_mm,
            origin_mm=volume.model_origin_lps(),
        )

    def _seg_labels(self, seg: Any, volume: CTVolume, where: str) -> npt.NDArray[np.uint8]:
        """The tumour segments of ``seg`` on ``volume``'s slices, in its (z, y, x) order, each
        labelled with its segment number (the higher where they overlap)."""
        numbers = self._tumour_segments(seg, where)
        cut = 0.5
        if seg.segmentation_type.value == "FRACTIONAL":
            cut = 0.5 * float(seg.MaximumFractionalValue)
        if _frames_name_their_sources(seg):
            referenced = {str(entry[2]) for entry in seg.get_source_image_uids()}
            unknown = referenced - set(volume.sop_instance_uids)
            if unknown:
                raise DatasetError(f"{where}: refers to {len(unknown)} instances not in the series")
            tumour = _planes_by_source(seg, volume, numbers, cut)
        else:
            tumour = _planes_by_position(seg, volume, numbers, cut, where)
        labels = np.zeros(volume.shape, dtype=np.uint8)
        for k, number in sorted(enumerate(numbers), key=lambda item: item[1]):
            labels[tumour[..., k]] = min(number, 255)
        return labels

    def _tumour_segments(self, seg: Any, where: str) -> list[int]:
        """The segment numbers of ``seg`` that are tumour (see the class)."""
        chosen: list[int] = []
        found: list[str] = []
        for number in seg.segment_numbers:
            description = seg.get_segment_description(number)
            label = str(description.segment_label)
            kind = description.segmented_property_type
            found.append(f"{number} {label!r} ({kind.meaning})")
            if self.segment_labels is not None:
                if re.fullmatch(self.segment_labels, label, flags=re.IGNORECASE):
                    chosen.append(int(number))
            elif _is_tumour_code(kind) or _is_tumour_code(description.segmented_property_category):
                chosen.append(int(number))
        if not chosen:
            wanted = (
                f"segment labelled {self.segment_labels!r}"
                if self.segment_labels is not None
                else "segment whose Segmented Property Type is a tumour (neoplasm, mass,"
                " nodule, metastasis, gross tumour volume)"
            )
            raise DatasetError(
                f"{where}: no {wanted} among its segments {'; '.join(found)}: choose them by"
                " label with --segment-labels"
            )
        return chosen


def _patient_links(ds: Any, series_uid: str) -> list[str]:
    """What ties a series without Patient ID to another of its patient: its study, and its
    Patient's Name with Birth Date where the name is given (the series itself without both)."""
    links = []
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    if study:
        links.append(f"study:{study}")
    name = str(ds.get("PatientName", "") or "").strip()
    if name:
        links.append(f"name:{name}\\{str(ds.get('PatientBirthDate', '') or '').strip()}")
    return links or [f"series:{series_uid}"]


def _stand_in_patients(
    links: Mapping[str, Sequence[str]], study_patients: Mapping[str, str]
) -> dict[str, str]:
    """Patients for the series without Patient ID (``links`` as :func:`_patient_links`): the
    series that share a study or a name and birth date, directly or through others, are one
    patient; its id is the Patient ID of a series of one of its studies that has one, else a
    hash of what links them (no name ends up in a split file)."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    for keys in links.values():
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
    members: dict[str, list[str]] = {}
    for key in parent:
        members.setdefault(root(key), []).append(key)
    named: dict[str, str] = {}
    for group, keys in members.items():
        known = sorted(
            study_patients[key.removeprefix("study:")]
            for key in keys
            if key.startswith("study:") and key.removeprefix("study:") in study_patients
        )
        digest = hashlib.sha256(min(keys).encode()).hexdigest()[:16]
        named[group] = known[0] if known else f"no-id-{digest}"
    return {uid: named[root(keys[0])] for uid, keys in links.items()}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _is_tumour_code(concept: Any) -> bool:
    """Whether a coded concept (highdicom's or pydicom's) is one of the tumour codes."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if concept is None:
        return False
    code = Code(
        value=str(concept.value),
        scheme_designator=str(concept.scheme_designator),
        meaning=str(concept.meaning),
    )
    return any(code == getattr(codes.SCT, name) for name in _TUMOUR_CODE_NAMES)


def _frames_name_their_sources(seg: Any) -> bool:
    """Every frame of ``seg`` references its source image (Derivation Image Sequence)."""
    frames = seg.get("PerFrameFunctionalGroupsSequence", [])
    return len(frames) > 0 and all(
        any(
            len(derivation.get("SourceImageSequence", [])) > 0
            for derivation in frame.get("DerivationImageSequence", [])
        )
        for frame in frames
    )


def _planes_by_source(
    seg: Any, volume: CTVolume, numbers: Sequence[int], cut: float
) -> npt.NDArray[np.bool_]:
    """(z, y, x, segment) whether each voxel is at ``cut`` or more in each segment of
    ``numbers``, frames placed by the source image, or source frame, they reference."""
    # One plane per CT slice, in the volume's slice order; slices without a SEG frame (empty
    # frames are omitted) are zero.
    uids = volume.sop_instance_uids
    if len(set(uids)) == len(uids):  # one image a slice
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(uids),
            segment_numbers=list(numbers),
            combine_segments=False,
            rescale_fractional=False,
            skip_overlap_checks=True,
            assert_missing_frames_are_empty=True,
        )
        return np.asarray(pixels >= cut)
    # a multi-frame (Enhanced CT) series: by its instances' frame numbers
    tumour = np.zeros((*volume.shape, len(numbers)), dtype=bool)
    slices: dict[str, list[int]] = {}
    for z, uid in enumerate(uids):
        slices.setdefault(uid, []).append(z)
    for uid, zs in slices.items():
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=uid,
            source_frame_numbers=[volume.frame_numbers[z] for z in zs],
            segment_numbers=list(numbers),
            combine_segments=False,
            rescale_fractional=False,
            skip_overlap_checks=True,
            assert_missing_frames_are_empty=True,
        )
        tumour[zs] = pixels >= cut
    return tumour


def _planes_by_position(
    seg: Any, volume: CTVolume, numbers: Sequence[int], cut: float, where: str
) -> npt.NDArray[np.bool_]:
    """As :func:`_planes_by_source` for a SEG whose frames reference no source image: each
    frame goes on the slice at its Plane Position (Patient), which must be the series' Frame of
    Reference, pixel grid and orientation (nothing is resampled)."""
    if str(seg.get("FrameOfReferenceUID", "")) != volume.frame_of_reference_uid:
        raise DatasetError(
            f"{where}: its frames reference no source image, and its Frame of Reference is not"
            " the series': they cannot be placed"
        )
    _, rows, columns = volume.shape
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise DatasetError(
            f"{where}: its frames ({seg.Rows}x{seg.Columns}) reference no source image and are"
            f" not of the series' size ({rows}x{columns})"
        )
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    index = {number: k for k, number in enumerate(numbers)}
    tumour = np.zeros((*volume.shape, len(numbers)), dtype=bool)
    tolerance = _POSITION_TOLERANCE * min(volume.spacing_mm)
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        number = int(
            _functional(frame, shared, "SegmentIdentificationSequence").ReferencedSegmentNumber
        )
        if number not in index:
            continue
        orientation = np.asarray(
            _functional(frame, shared, "PlaneOrientationSequence").ImageOrientationPatient,
            dtype=np.float64,
        )
        pixel_spacing = np.asarray(
            _functional(frame, shared, "PixelMeasuresSequence").PixelSpacing, dtype=np.float64
        )
        if not np.allclose(
            orientation, volume.direction[:, :2].T.reshape(6), atol=1e-3
        ) or not np.allclose(pixel_spacing, volume.spacing_mm[1:], rtol=1e-3):
            raise DatasetError(
                f"{where}: frame {n} references no source image and is not on the series'"
                " pixel grid (orientation or pixel spacing differ)"
            )
        position = np.asarray(
            _functional(frame, shared, "PlanePositionSequence").ImagePositionPatient,
            dtype=np.float64,
        )
        distance = np.linalg.norm(volume.slice_positions_mm - position, axis=1)
        z = int(np.argmin(distance))
        if distance[z] > tolerance:
            raise DatasetError(
                f"{where}: frame {n} references no source image and lies"
                f" {float(distance[z]):.2f} mm from the nearest slice of the series"
            )
        tumour[z, :, :, index[number]] |= seg.get_stored_frame(n) >= cut
    return tumour


def _functional(frame: Any, shared: Any, name: str) -> Any:
    """The first item of functional group ``name`` of a frame, or of the shared groups."""
    for groups in (frame, shared):
        if groups is not None and len(groups.get(name, [])) > 0:
            return groups.get(name)[0]
    raise ValueError(f"a frame has no {name}")


# ---------------------------------------------------------------------- phantoms


@dataclass(frozen=True)
class PhantomSpec:
    """How a :class:`PhantomDataset` makes its phantoms.

    Attributes
    ----------
    first_seed, count
        Phantom ``k`` (0-based) uses seed ``first_seed + k``.
    shape_zyx
        (slices, rows, columns) of each phantom; pixel spacing follows from the site's field of
        view, slice spacing from the site.
    shift
        :meth:`SiteDistribution.shifted` amount (0: the default distribution).
    widen
        :meth:`SiteDistribution.widened` amount, applied after the shift (domain
        randomisation for training; 0: none).
    tumour_probability
        Probability that a phantom holds tumours.
    matrices
        In-plane matrices (rows = columns) the phantoms are rendered on, phantom of seed ``s``
        on ``matrices[s % len(matrices)]``, in place of ``shape_zyx``'s rows and columns: the
        same field of view on 256² and 512² gives 1.5 mm and 0.75 mm pixels, each with its own
        noise texture (empty: every phantom on ``shape_zyx``).
    """

    first_seed: int = 0
    count: int = 100
    shape_zyx: tuple[int, int, int] = (32, 256, 256)
    shift: float = 0.0
    tumour_probability: float = 0.5
    widen: float = 0.0
    matrices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.count < 1 or self.first_seed < 0:
            raise ValueError("count must be at least 1 and first_seed not negative")
        if self.widen < 0:
            raise ValueError("widen must not be negative")
        if min(self.shape_zyx) < 1:
            raise ValueError("shape_zyx must be positive")
        if any(m < 8 for m in self.matrices):
            raise ValueError("every matrix must be at least 8")

    def shape_for(self, seed: int) -> tuple[int, int, int]:
        """(slices, rows, columns) of the phantom of ``seed``."""
        if not self.matrices:
            return self.shape_zyx
        matrix = self.matrices[seed % len(self.matrices)]
        return (self.shape_zyx[0], matrix, matrix)

    def describe(self) -> str:
        """A one-line description for model cards."""
        z, y, x = self.shape_zyx
        voxels = (
            f"{z}x{y}x{x} voxels"
            if not self.matrices
            else f"{z} slices of {' or '.join(f'{m}x{m}' for m in self.matrices)} (by seed)"
        )
        return (
            f"{self.count} phantoms, seeds {self.first_seed}-{self.first_seed + self.count - 1}, "
            f"{voxels}, SiteDistribution shifted by {self.shift:g}"
            + (f" and widened by {self.widen:g}" if self.widen else "")
            + f", tumour probability {self.tumour_probability:g}"
        )


class PhantomDataset:
    """Synthetic chest CTs made on demand; one phantom is one patient.

    Parameters
    ----------
    spec
        Seeds, shape, site shift and tumour probability.
    distribution
        The site distribution before the shift (default :class:`SiteDistribution`).
    """

    def __init__(
        self,
        spec: PhantomSpec,
        *,
        distribution: SiteDistribution | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        base = distribution or SiteDistribution()
        shifted = base.shifted(spec.shift) if spec.shift else base
        self.distribution = shifted.widened(spec.widen) if spec.widen else shifted
        #: Generated cases are kept here (``.npz``) and read back instead of regenerated.
        self.cache_dir = cache_dir

    @property
    def name(self) -> str:
        return f"phantoms: {self.spec.describe()}"

    def case_ids(self) -> list[str]:
        return [f"phantom-{self.spec.first_seed + k:06d}" for k in range(self.spec.count)]

    def _seed(self, case_id: str) -> int:
        if not case_id.startswith("phantom-"):
            raise KeyError(case_id)
        seed = int(case_id.removeprefix("phantom-"))
        if not self.spec.first_seed <= seed < self.spec.first_seed + self.spec.count:
            raise KeyError(case_id)
        return seed

    def patient_id(self, case_id: str) -> str:
        self._seed(case_id)
        return case_id

    def load(self, case_id: str) -> Case:
        cached = self._cache_path(case_id)
        if cached is not None and cached.exists():
            with np.load(cached) as data:
                return Case(
                    case_id=case_id,
                    patient_id=case_id,
                    hu=data["hu"],
                    tumour_mask=data["tumour_mask"],
                    spacing_mm=_triple(data["spacing_mm"]),
                    origin_mm=_triple(data["origin_mm"]),
                )
        case = self._generate(case_id)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp.npz")
            np.savez(
                tmp,
                hu=case.hu,
                tumour_mask=case.tumour_mask,
                spacing_mm=np.array(case.spacing_mm),
                origin_mm=np.array(case.origin_mm),
            )
            tmp.replace(cached)
        return case

    def cache_key(self, case_id: str) -> str:
        """What the phantom of ``case_id`` depends on besides its seed, hashed: its shape, the
        tumour probability and the site distribution. A phantom rendered on 256² by a spec with
        ``matrices`` is the one a 256²-only spec makes, and shares its cached file."""
        key = (
            self.spec.shape_for(self._seed(case_id)),
            self.spec.tumour_probability,
            self.distribution,
        )
        return hashlib.sha256(repr(key).encode()).hexdigest()[:12]

    def _cache_path(self, case_id: str) -> Path | None:
        self._seed(case_id)
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{case_id}-{self.cache_key(case_id)}.npz"

    def _generate(self, case_id: str) -> Case:
        seed = self._seed(case_id)
        phantom = None
        for attempt in range(_PHANTOM_ATTEMPTS):
            try:
                phantom = generate_phantom(
                    seed=seed + attempt * _FALLBACK_SEED_STEP,
                    shape_zyx=self.spec.shape_for(seed),
                    site_distribution=self.distribution,
                    tumour_probability=self.spec.tumour_probability,
                )
                break
            except ValueError as exc:
                # The generator fails on a few seeds (an empty fissure hit list in
                # _paint_fissures); such a case is the phantom of a fixed fallback seed.
                logger.warning("phantom seed %d failed (%s); using a fallback seed", seed, exc)
        if phantom is None:
            raise DatasetError(f"case {case_id}: the phantom generator failed")
        return Case(
            case_id=case_id,
            patient_id=case_id,
            hu=phantom.hu,
            tumour_mask=phantom.tumour_mask,
            spacing_mm=phantom.spacing_mm,
            origin_mm=phantom.origin_mm,
            attributes={
                "site": phantom.site.name,
                "tumour_diameters_mm": [t.diameter_mm for t in phantom.tumours],
            },
        )


def _triple(values: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def phantom_spec_from_args(args: Any, *, prefix: str = "") -> PhantomSpec:
    """The phantoms a command line asks for (``dicom-node train`` / ``evaluate``): its
    ``--first-seed``, ``--phantoms``, ``--shift``, ``--widen``, ``--tumour-probability``, or
    with ``prefix="train_"`` the ``--train-...`` ones; shape and matrices are shared."""
    return PhantomSpec(
        first_seed=getattr(args, f"{prefix}first_seed"),
        count=getattr(args, f"{prefix}phantoms"),
        shape_zyx=tuple(args.phantom_shape),
        matrices=tuple(args.phantom_matrix),
        shift=getattr(args, f"{prefix}shift"),
        tumour_probability=getattr(args, f"{prefix}tumour_probability"),
        widen=getattr(args, f"{prefix}widen"),
    )


# ---------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Case ids by split name (``train``, ``val``, ``test``); a patient is in one split only.

    ``phantoms``: for a split of generated phantoms, how they were made. A phantom's case id
    names its seed, not its site distribution or tumour probability: the same id made with
    other settings is another case, so whoever reads the split makes its phantoms this way
    (:meth:`phantoms_for`).
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    phantoms: PhantomSpec | None = None

    def phantoms_for(
        self, asked: PhantomSpec, *, source: str = "the split", listing: bool = True
    ) -> PhantomSpec:
        """The phantoms this split's ids stand for: made with its own settings where it
        records them (with a warning when ``asked`` differs), else ``asked``. ``listing``:
        its seeds too; ``False`` keeps the seeds asked for (fewer of the split's cases, say)."""
        if self.phantoms is None:
            return asked
        made = (
            self.phantoms
            if listing
            else dataclasses.replace(self.phantoms, first_seed=asked.first_seed, count=asked.count)
        )
        if made != asked:
            logger.warning(
                "%s was made of phantoms %s: its cases are made that way, not as %s",
                source,
                made.describe(),
                asked.describe(),
            )
        return made

    def check_patients(self, dataset: CaseDataset, *, source: str = "the split") -> None:
        """Refuse a split that puts one of ``dataset``'s patients in two parts (a file written
        by another tool, or before splits listed their patients, is not trusted on that).

        Raises
        ------
        DatasetError
            A patient is in two parts (the message names the patient and the parts).
        """
        known = set(dataset.case_ids())
        owner: dict[str, str] = {}
        for name in SPLIT_NAMES:
            for case_id in self.get(name):
                if case_id not in known:
                    continue
                patient = dataset.patient_id(case_id)
                if owner.setdefault(patient, name) != name:
                    raise DatasetError(
                        f"{source}: patient {patient} is in {owner[patient]} and {name}: a split"
                        " must keep each patient's cases on one side"
                    )

    def check_cases(
        self,
        dataset: CaseDataset,
        *,
        parts: Sequence[str] = SPLIT_NAMES,
        source: str = "the split",
    ) -> None:
        """Refuse a split whose ``parts`` name cases ``dataset`` does not hold (a split written
        for another folder, or a case removed since), before a run fails part-way on one.

        Raises
        ------
        DatasetError
            Listing the missing case ids (the first 20, and how many more).
        """
        known = set(dataset.case_ids())
        missing = [case_id for name in parts for case_id in self.get(name) if case_id not in known]
        if missing:
            shown = ", ".join(missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise DatasetError(
                f"{source} names {len(missing)} case(s) ({'/'.join(parts)}) that"
                f" {dataset.name} does not hold: {shown}{more}"
            )

    def get(self, name: str) -> tuple[str, ...]:
        """The case ids of split ``name``; ``ValueError`` for an unknown name."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r} (one of {', '.join(SPLIT_NAMES)})")
        ids: tuple[str, ...] = getattr(self, name)
        return ids


def split_cases(
    dataset: CaseDataset,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Split:
    """Assign whole patients to train / val / test.

    Patients are ordered by a hash of (seed, patient id) - stable whatever the listing order -
    and cut by the fractions (at least one patient in val and in test where its fraction is
    positive and there are patients enough for one in each part asked for).

    Raises
    ------
    ValueError
        Fractions outside [0, 1) or summing to 1 or more.
    DatasetError
        A part asked for (train always, val and test where their fraction is positive) would be
        empty: too few patients (the message says how many; series whose Patient ID an
        anonymiser set to one value are one patient).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
    by_patient: dict[str, list[str]] = {}
    for case_id in dataset.case_ids():
        by_patient.setdefault(dataset.patient_id(case_id), []).append(case_id)
    patients = sorted(by_patient, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n = len(patients)
    fractions = {"train": 1.0, "val": val_fraction, "test": test_fraction}
    asked = [name for name in SPLIT_NAMES if fractions[name] > 0]

    def count(fraction: float) -> int:
        wanted = round(n * fraction)
        return max(1, wanted) if fraction > 0 and n >= len(asked) else wanted

    n_test = count(test_fraction)
    n_val = count(val_fraction)
    parts = {
        "test": patients[:n_test],
        "val": patients[n_test : n_test + n_val],
        "train": patients[n_test + n_val :],
    }
    empty = [name for name in asked if not parts[name]]
    if empty:
        cases = sum(len(c) for c in by_patient.values())
        which = " and ".join(empty) + (" parts" if len(empty) > 1 else " part")
        raise DatasetError(
            f"{dataset.name}: {n} patient(s) in {cases} case(s) leave the {which} of the split"
            f" empty (val fraction {val_fraction:g}, test fraction"
            f" {test_fraction:g}): each part asked for needs a patient of its own (cases"
            " whose Patient ID is one value, as some anonymisers set it, are one patient)"
        )
    ids = {k: tuple(sorted(c for p in v for c in by_patient[p])) for k, v in parts.items()}
    return Split(train=ids["train"], val=ids["val"], test=ids["test"])


def write_split(split: Split, path: Path, *, patients: Mapping[str, str] | None = None) -> None:
    """Write a split as JSON: ``{"train": [...], "val": [...], "test": [...]}``.

    ``patients`` (case id to patient id), when given, is stored too so that the file can be
    checked for patient leaks later; so is ``split.phantoms``, how its phantoms were made.
    """
    payload: dict[str, object] = {name: list(split.get(name)) for name in SPLIT_NAMES}
    if patients is not None:
        payload["patients"] = dict(patients)
    if split.phantoms is not None:
        payload["phantoms"] = dataclasses.asdict(split.phantoms)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def read_split(path: Path) -> Split:
    """Read a split file written by :func:`write_split`.

    Raises
    ------
    DatasetError
        The file is missing or malformed, a case is in two splits, or (when the file lists
        patients) a patient is in two splits.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        parts = {name: tuple(str(c) for c in raw.get(name, [])) for name in SPLIT_NAMES}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise DatasetError(f"{path}: not a split file ({exc})") from exc
    seen: dict[str, str] = {}
    patients = raw.get("patients") if isinstance(raw.get("patients"), dict) else None
    owner: dict[str, str] = {}
    for name, ids in parts.items():
        for case_id in ids:
            if case_id in seen:
                raise DatasetError(f"{path}: case {case_id} is in {seen[case_id]} and {name}")
            seen[case_id] = name
            if patients is not None and case_id in patients:
                patient = str(patients[case_id])
                if owner.setdefault(patient, name) != name:
                    raise DatasetError(
                        f"{path}: patient {patient} is in {owner[patient]} and {name}"
                    )
    phantoms = None
    if raw.get("phantoms") is not None:
        try:
            made = dict(raw["phantoms"])
            made["shape_zyx"] = tuple(int(v) for v in made["shape_zyx"])
            made["matrices"] = tuple(int(v) for v in made.get("matrices", ()))
            phantoms = PhantomSpec(**made)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: its phantoms are not readable ({exc})") from exc
    return Split(train=parts["train"], val=parts["val"], test=parts["test"], phantoms=phantoms)


def open_dataset(
    kind: str,
    *,
    path: Path | None = None,
    phantoms: PhantomSpec | None = None,
    cache_dir: Path | None = None,
    segment_labels: str | None = None,
) -> CaseDataset:
    """Open a dataset: ``phantoms`` (from ``phantoms``), ``msd`` or ``dicom-seg`` (at ``path``;
    ``segment_labels`` as :class:`DicomSegDataset` takes it).

    Raises
    ------
    DatasetError
        Unknown kind, a missing path, or a folder that is not of that kind.
    """
    if kind == "phantoms":
        return PhantomDataset(phantoms or PhantomSpec(), cache_dir=cache_dir)
    if path is None:
        raise DatasetError(f"dataset kind {kind!r} needs a path")
    if kind == "msd":
        return MSDDataset(path)
    if kind == "dicom-seg":
        return DicomSegDataset(path, segment_labels=segment_labels)
    raise DatasetError(f"unknown dataset kind {kind!r} (phantoms, msd, dicom-seg)")
