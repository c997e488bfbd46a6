"""The DICOM Segmentation of one analysed series: a segment per lesion.

One Segmentation (``hd.seg.Segmentation``) per analysed series, BINARY by default or FRACTIONAL
(the model's probability over each lesion's voxels). Segment ``i`` (1-based) is the ``i``-th
largest lesion, labelled and tracked as ``"Lesion i"`` with a tracking UID shared with the SR
(:class:`SegmentedLesion`); at most ``max_segments`` lesions become segments.

Each segment says what it is (category "Morphologically abnormal structure", type "Neoplasm",
anatomic region "Lung") and which algorithm made it (family "Artificial Intelligence", the
model's name and version). Each frame references its source image (Derivation Image Sequence),
empty frames are left out, and patient and study attributes are copied from the source. The
source images (Referenced Series Sequence) are the slices a frame derives from, not the empty
ones: given all 1000 images of a series, highdicom took ~1 s more inspecting and matching them.

Speed: highdicom is given only the planes that hold a lesion (each segment's slice range) as a
label map renumbered to segment numbers, with their plane positions taken from the source
headers; it matches each plane back to its source image. A (z, y, x, segments) array is never
built. FRACTIONAL frames are written after highdicom has built the object from the binary label
map (which fixes which frames exist, their order, positions and references): each frame's bytes
are then ``round(p * 255)`` over its lesion's voxels, one frame at a time. Measured on the
2-core CI machine for 300 slices of 512 x 512 with five lesions (107 frames), in a warm process:
~0.33 s BINARY, ~0.5 s FRACTIONAL; passing the whole 300-slice label map instead took ~0.28 s
but holds a 78 MB copy; the first build in a process pays ~0.5 s more (highdicom loads its
tables). ``tests/results/test_timing.py`` (marked slow) prints these figures.

Source images need no pixel data: headers read with ``dcmread(path, stop_before_pixels=True)``
are enough (highdicom documents this, and the tests build from such headers).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, cast

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_node.analysis.lesions import Lesion
from dicom_node.results import codes
from dicom_node.results.identity import (
    BUILD_CHARACTER_SET,
    Producer,
    ResultUIDs,
    copy_identity,
    shallow_copy,
    source_header,
)

__all__ = [
    "MAX_FRACTIONAL_VALUE",
    "SegmentationType",
    "SegmentedLesion",
    "build_segmentation",
    "plan_segments",
]

logger = logging.getLogger(__name__)

#: Stored value that stands for probability 1.0 in a FRACTIONAL segmentation (8 bits).
MAX_FRACTIONAL_VALUE: Final = 255
_CONTENT_LABEL: Final = "LUNG_LESIONS"


class SegmentationType(enum.StrEnum):
    """Segmentation Type (0062,0001) values the node writes."""

    BINARY = "BINARY"
    FRACTIONAL = "FRACTIONAL"


@dataclass(frozen=True)
class SegmentedLesion:
    """A lesion that became a SEG segment, with what the SR needs to point at it.

    Attributes
    ----------
    segment_number
        1-based; segment 1 is the largest lesion.
    lesion
        The lesion (its ``label`` is its value in the label map).
    tracking_id
        ``"Lesion <segment_number>"``: segment label and tracking identifier.
    tracking_uid
        Tracking UID, the same in the SEG and the SR.
    """

    segment_number: int
    lesion: Lesion
    tracking_id: str
    tracking_uid: str


def plan_segments(
    lesions: Sequence[Lesion], *, uids: ResultUIDs, max_segments: int
) -> tuple[SegmentedLesion, ...]:
    """Choose and number the segments: the ``max_segments`` largest lesions, largest first.

    Ties in volume keep the lesions' label order.

    Raises
    ------
    ValueError
        ``max_segments`` outside 1-255 (segment numbers are stored as 8 bits on the way to
        highdicom), or two lesions share a label.
    """
    if not 1 <= max_segments <= 255:
        raise ValueError(f"max_segments must be 1-255, not {max_segments}")
    if len({lesion.label for lesion in lesions}) != len(lesions):
        raise ValueError("lesion labels must be unique")
    ordered = sorted(lesions, key=lambda les: (-les.voxel_count, les.label))[:max_segments]
    return tuple(
        SegmentedLesion(
            segment_number=number,
            lesion=lesion,
            tracking_id=f"Lesion {number}",
            tracking_uid=uids.tracking_uid(lesion.label),
        )
        for number, lesion in enumerate(ordered, start=1)
    )


def _segment_description(item: SegmentedLesion, producer: Producer) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=item.segment_number,
        segment_label=item.tracking_id,
        segmented_property_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        segmented_property_type=codes.NEOPLASM,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=producer.algorithm_identification(),
        tracking_uid=item.tracking_uid,
        tracking_id=item.tracking_id,
        anatomic_regions=[codes.LUNG],
    )


def _content_planes(
    labels: npt.NDArray[np.integer], segments: Sequence[SegmentedLesion]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint8]]:
    """The z indices that hold a chosen lesion and their label map renumbered to segments.

    Returns ``(planes, sub)`` with ``sub`` of shape (len(planes), y, x): 0 background, ``i``
    segment ``i``. Only the lesions' slice ranges are read from ``labels``, each voxel once.
    """
    n_slices = labels.shape[0]
    candidate = np.zeros(n_slices, dtype=bool)
    for item in segments:
        candidate[
            max(0, item.lesion.first_slice) : min(n_slices - 1, item.lesion.last_slice) + 1
        ] = True
    planes = np.flatnonzero(candidate)
    if labels.dtype in (np.uint16, np.uint8):
        # A table over every possible value: one gather, no clipping pass.
        lookup = np.zeros(np.iinfo(labels.dtype).max + 1, dtype=np.uint8)
    else:
        lookup = np.zeros(int(max(item.lesion.label for item in segments)) + 1, dtype=np.uint8)
        labels = np.where((labels >= 0) & (labels < lookup.size), labels, 0)
    for item in segments:
        lookup[item.lesion.label] = item.segment_number
    renumbered: npt.NDArray[np.uint8] = np.empty((len(planes), *labels.shape[1:]), np.uint8)
    for row, z in enumerate(planes):
        np.take(lookup, labels[z], out=renumbered[row])
    keep = renumbered.reshape(len(planes), -1).any(axis=1)
    return planes[keep], renumbered[keep]


def unique_images(headers: Sequence[Dataset]) -> list[Dataset]:
    """Each image once, in the order of first appearance."""
    seen: dict[str, Dataset] = {}
    for ds in headers:
        seen.setdefault(str(ds.SOPInstanceUID), ds)
    return list(seen.values())


def source_slices(
    source_images: Sequence[Dataset], frame_numbers: Sequence[int] | None
) -> tuple[list[Dataset], list[Dataset], list[int | None]]:
    """The source images completed for highdicom (:func:`source_header`), once each and per
    slice, and each slice's frame number (``None`` for single-frame images).

    Slices are frames of multi-frame images (Enhanced CT) when ``frame_numbers`` has one entry
    per slice and an image stands for several slices.
    """
    images = {str(ds.SOPInstanceUID): source_header(ds) for ds in unique_images(source_images)}
    multiframe = (
        frame_numbers is not None
        and len(frame_numbers) == len(source_images)
        and len(images) < len(source_images)
    )
    if not multiframe:
        _complete_slice_thickness(images, source_images)
    per_slice = [images[str(ds.SOPInstanceUID)] for ds in source_images]
    frames: list[int | None] = (
        [int(f) for f in frame_numbers]
        if multiframe and frame_numbers is not None
        else [None] * len(per_slice)
    )
    return list(images.values()), per_slice, frames


def _complete_slice_thickness(images: dict[str, Dataset], slices: Sequence[Dataset]) -> None:
    """Give the images whose Slice Thickness is empty (it is Type 2 in a CT image) or absent
    the spacing between the slices, measured along their normal, in place of the source's
    header. The SEG's pixel measures need a thickness (Type 1), and so do highdicom's image
    library entries in the SR; the spacing is the depth each segmentation frame stands for.
    """
    lacking = [uid for uid, header in images.items() if not _has_thickness(header)]
    if not lacking or len(slices) < 2:
        return
    orientation = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.asarray([ds.ImagePositionPatient for ds in slices], dtype=np.float64) @ normal
    steps = np.abs(np.diff(along))
    steps = steps[steps > 1e-3]
    if not steps.size:
        return
    thickness = round(float(np.median(steps)), 3)
    for uid in lacking:
        header = shallow_copy(images[uid])
        header.SliceThickness = thickness
        images[uid] = header
    logger.debug("%d images without a slice thickness: the spacing, %s mm", len(lacking), thickness)


def _has_thickness(header: Dataset) -> bool:
    try:
        return float(header.get("SliceThickness") or 0.0) > 0.0
    except (TypeError, ValueError):
        return False


def frame_position(header: Dataset, frame_number: int | None) -> list[float]:
    """Image Position (Patient) of an image, or of one frame of a multi-frame image."""
    if frame_number is not None and "PerFrameFunctionalGroupsSequence" in header:
        group = header.PerFrameFunctionalGroupsSequence[frame_number - 1]
        return [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
    return [float(v) for v in header.ImagePositionPatient]


def _plane_position(header: Dataset, frame_number: int | None = None) -> hd.PlanePositionSequence:
    return hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=frame_position(header, frame_number),
    )


def _write_fractional_frames(
    seg: hd.seg.Segmentation,
    *,
    labels: npt.NDArray[np.integer],
    probability: npt.NDArray[np.floating] | npt.NDArray[np.uint8],
    segments: Sequence[SegmentedLesion],
    slice_of: dict[tuple[str, int | None], int],
) -> None:
    """Replace the 0/255 frames highdicom wrote with ``round(p * 255)`` over each lesion.

    A lesion voxel never stores 0 (its value is at least 1), so no frame becomes empty and the
    frames highdicom chose stay exactly the frames with content.
    """
    label_of = {item.segment_number: item.lesion.label for item in segments}
    scale = 1.0 if probability.dtype == np.uint8 else float(MAX_FRACTIONAL_VALUE)
    chunks: list[bytes] = []
    # highdicom puts a functional group that is the same for every frame (one segment, say)
    # in the shared groups instead of each frame's
    shared = seg.SharedFunctionalGroupsSequence[0]

    def group(frame: Dataset, keyword: str) -> Dataset:
        return cast(Dataset, (frame if keyword in frame else shared)[keyword].value[0])

    for frame in seg.PerFrameFunctionalGroupsSequence:
        number = int(group(frame, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        source = group(frame, "DerivationImageSequence").SourceImageSequence[0]
        referenced = source.get("ReferencedFrameNumber")
        key = (
            str(source.ReferencedSOPInstanceUID),
            None if referenced is None else int(referenced),
        )
        z = slice_of[key]
        values = np.clip(np.rint(probability[z].astype(np.float32) * scale), 1, 255)
        chunks.append(np.where(labels[z] == label_of[number], values, 0).astype(np.uint8).tobytes())
    data = b"".join(chunks)
    if len(data) % 2:
        data += b"\x00"
    if len(data) != len(seg.PixelData):
        raise AssertionError("fractional frames do not match the frames highdicom built")
    seg.PixelData = data


def build_segmentation(
    source_images: Sequence[Dataset],
    labels: npt.NDArray[np.integer],
    lesions: Sequence[Lesion],
    *,
    uids: ResultUIDs,
    producer: Producer,
    series_number: int,
    series_description: str,
    segmentation_type: SegmentationType = SegmentationType.BINARY,
    probability: npt.NDArray[np.floating] | npt.NDArray[np.uint8] | None = None,
    max_segments: int = 20,
    frame_numbers: Sequence[int] | None = None,
) -> hd.seg.Segmentation | None:
    """Build the Segmentation of one analysed series.

    Parameters
    ----------
    source_images
        Headers of the analysed series' images (pixel data not needed), in slice order:
        ``source_images[k]`` is the slice ``labels[k]`` was computed on.
    labels
        (z, y, x) label map: 0 background, ``lesion.label`` the voxels of each lesion.
    lesions
        The lesions in ``labels``; the ``max_segments`` largest become segments.
    uids, producer
        The job's UIDs and the node/model that made the result.
    series_number, series_description
        Of the new SEG series.
    segmentation_type
        BINARY, or FRACTIONAL with ``probability``.
    probability
        (z, y, x) model probability in [0, 1] (float) or ``round(p * 255)`` (uint8); needed
        for FRACTIONAL, ignored for BINARY.
    max_segments
        At most this many segments.
    frame_numbers
        Each slice's frame number (1-based) when the slices are frames of a multi-frame image
        (Enhanced CT; then ``source_images[k]`` is that image for each of its frames).

    Returns
    -------
    highdicom.seg.Segmentation or None
        ``None`` when there is no lesion (no SEG is written for a study without findings).

    Raises
    ------
    ValueError
        The label map's shape does not match the source images (count, rows, columns),
        FRACTIONAL without a probability map of the same shape, or a lesion label that is not
        in the label map.
    """
    if not lesions:
        return None
    if labels.ndim != 3 or labels.shape[0] != len(source_images):
        raise ValueError(
            f"labels {labels.shape} must be (z, y, x) with one slice per source image "
            f"({len(source_images)})"
        )
    first = source_images[0]
    if labels.shape[1:] != (int(first.Rows), int(first.Columns)):
        raise ValueError(
            f"labels are {labels.shape[1:]} per slice, the images {first.Rows}x{first.Columns}"
        )
    kind = SegmentationType(segmentation_type)
    if kind is SegmentationType.FRACTIONAL and (
        probability is None or probability.shape != labels.shape
    ):
        raise ValueError("a FRACTIONAL segmentation needs a probability map shaped like labels")

    segments = plan_segments(lesions, uids=uids, max_segments=max_segments)
    planes, sub = _content_planes(labels, segments)
    present = set(np.unique(sub).tolist()) - {0}
    missing = [item.lesion.label for item in segments if item.segment_number not in present]
    if missing:
        raise ValueError(f"lesion labels {missing} do not occur in the label map")

    _, headers, frames = source_slices(source_images, frame_numbers)
    seg = hd.seg.Segmentation(
        # only the images a frame is derived from: highdicom's cost grows with every source
        # image it is given (it inspects and matches each), and its Referenced Series
        # Sequence then lists the images the frames reference
        source_images=unique_images([headers[int(z)] for z in planes]),
        pixel_array=sub,
        segmentation_type=kind.value,
        segment_descriptions=[_segment_description(item, producer) for item in segments],
        series_instance_uid=uids.seg_series,
        series_number=series_number,
        sop_instance_uid=uids.seg_instance,
        instance_number=1,
        manufacturer=producer.manufacturer,
        manufacturer_model_name=producer.manufacturer_model_name,
        # highdicom annotates ``str | tuple[str]``; pydicom stores a list as a multi-valued LO.
        software_versions=list(producer.software_versions),  # type: ignore[arg-type]
        device_serial_number=producer.device_serial_number,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_label=_CONTENT_LABEL,
        content_description="AI lung lesion segmentation, not verified by a clinician",
        specific_character_set=BUILD_CHARACTER_SET,  # the source's is put back below
        plane_positions=[_plane_position(headers[int(z)], frames[int(z)]) for z in planes],
        omit_empty_frames=True,
        series_description=series_description,
        contributing_equipment=[producer.contributing_equipment()],
    )
    if kind is SegmentationType.FRACTIONAL:
        assert probability is not None
        _write_fractional_frames(
            seg,
            labels=labels,
            probability=probability,
            segments=segments,
            slice_of={(str(ds.SOPInstanceUID), frames[k]): k for k, ds in enumerate(headers)},
        )
    copy_identity(seg, headers[0])
    logger.debug(
        "built %s SEG: %d segments, %d frames from %d of %d slices",
        kind.value,
        len(segments),
        int(seg.NumberOfFrames),
        len(planes),
        len(headers),
    )
    return seg
