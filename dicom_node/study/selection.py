"""Series selection: which series of a complete study the model analyses.

The rules are data (the ``selection`` section of the configuration), checked on header
summaries alone (:mod:`dicom_node.study.headers`), in this order, for each series:

1. modality (``CT``) and SOP class (CT or Enhanced CT Image Storage);
2. Image Type: images with an excluded value (``LOCALIZER``) are left out of their series, so a
   scout filed with the axial images does not spoil them; a series left empty fails. With
   ``require_original_primary`` only ORIGINAL\\PRIMARY series qualify (otherwise they are
   preferred);
3. Body Part Examined and Series Description against include / exclude regular expressions;
4. not lossy compressed (unless allowed), a transfer syntax we decode, one sample per pixel;
5. at least ``min_slices`` slices and at most ``max_slice_thickness_mm``;
6. axial: the slice normal, computed from Image Orientation (Patient), within
   ``axial_tolerance_deg`` of the patient z axis (never from a tag that claims a plane);
7. the volume geometry (:func:`dicom_node.study.volume.plan_volume`: no gap, duplicate,
   uneven spacing, tilt or mixed orientation), then at most ``max_slice_spacing_mm`` between
   slices.

Of the series that pass, policy ``best`` chooses one: among those that cover the chest (a
field of view at least 0.8 of the widest one's side, or 300 mm; an extent along the body at
least 0.9 of the longest one's, or 250 mm: judged apart; where none does, those of at least
0.9 of the largest volume), the thinnest slice spacing, then the most slices, then
ORIGINAL\\PRIMARY, then the lowest series number; policy ``all`` keeps all, in that order. A
targeted reconstruction (one lung, a small field of view, the upper lobes, a few centimetres
around a finding) is thus never chosen over the whole chest for being thinner, and a thin lung
reconstruction at a 350 mm field of view is not passed over for a thicker soft-tissue one at
400 mm, nor a chest series for a longer chest-abdomen-pelvis one. If none passes,
:class:`~dicom_node.errors.StudySkipped` says, for every series, every rule it failed (rules
1-6 are all reported; the geometry is checked only when they pass).

Series are named in messages and logs by number and description, never by patient data.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.uid import UID

from dicom_node.config import SelectionSettings
from dicom_node.errors import PipelineError, StudySkipped, VolumeDecodeError, VolumeGeometryError
from dicom_node.logs import identifiers_allowed
from dicom_node.study.headers import InstanceHeader
from dicom_node.study.volume import DECODABLE_TRANSFER_SYNTAXES, VolumePlan, _mm, plan_volume

__all__ = [
    "Selection",
    "SeriesCandidate",
    "SeriesRejection",
    "select_series",
    "series_label",
]

logger = logging.getLogger(__name__)


def series_label(number: int | None, description: str) -> str:
    """How a series is named in messages, logs and results: ``series 3``, with its description
    (``series 3 "Lung 1mm"``) only where patient data may be logged (``logging.
    include_patient_data``): a Series Description is free text a technologist may have put a
    name into."""
    shown_number = str(number) if number is not None else "(no number)"
    if not identifiers_allowed():
        return f"series {shown_number}"
    shown_description = f'"{description}"' if description else "(no description)"
    return f"series {shown_number} {shown_description}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesCandidate:
    """A series that passed every rule, with its volume plan.

    Attributes
    ----------
    series_instance_uid, series_number, series_description
        Of the series.
    instances
        Its images that make the volume (those with an excluded Image Type left out).
    plan
        The volume plan; :func:`dicom_node.study.volume.load_volume` decodes it.
    original_primary
        Every image is ORIGINAL\\PRIMARY.
    convolution_kernel
        The first image's Convolution Kernel (``""`` if absent).
    contrast
        Any image says a contrast agent was given.
    left_out
        Images left out for their Image Type (a scout filed in the series).
    """

    series_instance_uid: str
    series_number: int | None
    series_description: str
    instances: tuple[InstanceHeader, ...]
    plan: VolumePlan
    original_primary: bool
    convolution_kernel: str = ""
    contrast: bool = False
    left_out: int = 0

    @property
    def label(self) -> str:
        """``series N "description"``."""
        return series_label(self.series_number, self.series_description)

    @property
    def number_of_slices(self) -> int:
        """Slices (frames) in the volume."""
        return len(self.plan.slices)


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesRejection:
    """A series that failed at least one rule, and why."""

    series_instance_uid: str
    series_number: int | None
    series_description: str
    reasons: tuple[str, ...]

    @property
    def label(self) -> str:
        """``series N "description"``."""
        return series_label(self.series_number, self.series_description)

    def __str__(self) -> str:
        return f"{self.label}: {', '.join(self.reasons)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """The outcome of selection for one study.

    Attributes
    ----------
    chosen
        The series to analyse, never empty: one with policy ``best``, all qualifying ones with
        ``all``; best first.
    passed_over
        Series that qualified but were not chosen (policy ``best``).
    rejected
        Series that failed a rule, with the reasons.
    """

    chosen: tuple[SeriesCandidate, ...]
    passed_over: tuple[SeriesCandidate, ...]
    rejected: tuple[SeriesRejection, ...]
    #: Series Instance UIDs of the candidates that cover the chest (see the module docstring).
    covering: frozenset[str] = frozenset()


def select_series(instances: Iterable[InstanceHeader], *, settings: SelectionSettings) -> Selection:
    """Apply the selection rules to one study's instances.

    Parameters
    ----------
    instances
        Header summaries of every instance of one study (images and anything else).
    settings
        The ``selection`` section of the configuration.

    Returns
    -------
    Selection
        The chosen series (at least one) and why the others were not chosen.

    Raises
    ------
    StudySkipped
        No series qualifies; the message names every series and the rules it failed, e.g.
        ``series 3: localizer; series 5: slice thickness 5.0 > 2.5 mm`` (the descriptions too
        with ``logging.include_patient_data``).
    PipelineError
        The instances belong to more than one study.
    """
    by_series: dict[str, list[InstanceHeader]] = {}
    studies: set[str] = set()
    for inst in instances:
        studies.add(inst.study_instance_uid)
        by_series.setdefault(inst.series_instance_uid, []).append(inst)
    if len(studies) > 1:
        raise PipelineError(f"instances of {len(studies)} studies given to series selection")
    if not by_series:
        raise StudySkipped("no series qualifies for analysis: the study has no instances")

    rules = _Rules(settings)
    candidates: list[SeriesCandidate] = []
    rejected: list[SeriesRejection] = []
    for uid in sorted(by_series, key=lambda u: _series_order(by_series[u], u)):
        outcome = rules.evaluate(uid, by_series[uid])
        if isinstance(outcome, SeriesCandidate):
            candidates.append(outcome)
        else:
            rejected.append(outcome)
            logger.info("%s not selected: %s", outcome.label, ", ".join(outcome.reasons))

    if not candidates:
        raise StudySkipped(
            "no series qualifies for analysis: " + "; ".join(str(r) for r in rejected)
        )
    widest_fov = max(_field_of_view_mm(c) for c in candidates)
    longest = max(_extent_mm(c) for c in candidates)
    largest = max(_volume_mm3(c) for c in candidates)
    covering = frozenset(
        c.series_instance_uid for c in candidates if _covers_the_chest(c, widest_fov, longest)
    )
    # where none covers the chest by both measures, the one covering the most volume still
    # beats a thinner part of it (a child's chest beside a targeted reconstruction)
    candidates.sort(
        key=lambda c: (
            c.series_instance_uid not in covering,
            c.series_instance_uid not in covering and _volume_mm3(c) < _FULL_VOLUME * largest,
            *rules.site_preference(c),
            *_preference(c),
        )
    )
    if settings.policy == "best":
        chosen, passed_over = tuple(candidates[:1]), tuple(candidates[1:])
    else:
        chosen, passed_over = tuple(candidates), ()
    for c in chosen:
        logger.info(
            "%s selected: %d slices, %.3g mm apart, kernel %s, %s contrast%s",
            c.label,
            c.number_of_slices,
            c.plan.spacing_mm[0],
            c.convolution_kernel or "(none)",
            "with" if c.contrast else "without",
            f", {c.left_out} localizer images left out" if c.left_out else "",
        )
    return Selection(
        chosen=chosen, passed_over=passed_over, rejected=tuple(rejected), covering=covering
    )


def _series_order(instances: Sequence[InstanceHeader], uid: str) -> tuple[bool, int, str]:
    """Series in messages: by number (those without one last), then UID."""
    number = instances[0].series_number
    return (number is None, number or 0, uid)


#: A series whose field of view is at least this fraction of the widest one's (side of the
#: square of equal area), or at least :data:`_WHOLE_FOV_MM` wide, covers the chest in plane: a
#: lung reconstruction at 350 mm beside a soft-tissue one at 400 mm covers what it does; a
#: targeted one of a single lung does not.
_FOV_FRACTION = 0.8
_WHOLE_FOV_MM = 300.0
#: Along the patient: at least this fraction of the longest series' extent, or at least
#: :data:`_WHOLE_EXTENT_MM` (an adult's lungs; a chest series beside a longer
#: chest-abdomen-pelvis one covers them), where a thin reconstruction of the upper lobes or a
#: few centimetres around a finding does not.
_EXTENT_FRACTION = 0.9
_WHOLE_EXTENT_MM = 250.0
#: Where no series covers the chest by both measures, one of at least this fraction of the
#: largest one's volume (field of view times extent) is preferred.
_FULL_VOLUME = 0.9


def _field_of_view_mm(c: SeriesCandidate) -> float:
    """The side of the square of the series' in-plane area, mm."""
    _, rows, columns = c.plan.shape
    _, dy, dx = c.plan.spacing_mm
    return math.sqrt(rows * dy * columns * dx)


def _extent_mm(c: SeriesCandidate) -> float:
    """How far the series reaches along the slice normal, mm."""
    return max(c.plan.shape[0] - 1, 1) * c.plan.spacing_mm[0]


def _volume_mm3(c: SeriesCandidate) -> float:
    """Field of view times extent, mm³."""
    return _field_of_view_mm(c) ** 2 * _extent_mm(c)


def _covers_the_chest(c: SeriesCandidate, widest_fov_mm: float, longest_mm: float) -> bool:
    """Whether a series covers the chest as well as the study's widest and longest ones do,
    in plane and along the patient (judged apart: a few per cent less of one is not a
    targeted reconstruction)."""
    fov, extent = _field_of_view_mm(c), _extent_mm(c)
    in_plane = fov >= _FOV_FRACTION * widest_fov_mm or fov >= _WHOLE_FOV_MM
    along = extent >= _EXTENT_FRACTION * longest_mm or extent >= _WHOLE_EXTENT_MM
    return in_plane and along


def _preference(c: SeriesCandidate) -> tuple[float, int, bool, float, str]:
    """Sort key, best first: thinnest spacing, most slices, ORIGINAL\\PRIMARY, lowest number."""
    return (
        round(c.plan.spacing_mm[0], 3),
        -c.number_of_slices,
        not c.original_primary,
        c.series_number if c.series_number is not None else math.inf,
        c.series_instance_uid,
    )


def _plane(normal: Sequence[float]) -> str:
    """Name the plane of a non-axial slice from its normal's largest component."""
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if axis == 2 or abs(normal[axis]) < math.cos(math.radians(30.0)):
        return "oblique"
    return "sagittal" if axis == 0 else "coronal"


class _Rules:
    """The configured rules, with their patterns compiled once."""

    def __init__(self, settings: SelectionSettings) -> None:
        self.settings = settings
        flags = re.IGNORECASE
        self.body_include = [re.compile(p, flags) for p in settings.body_part_include]
        self.body_exclude = [re.compile(p, flags) for p in settings.body_part_exclude]
        self.desc_include = [re.compile(p, flags) for p in settings.description_include]
        self.desc_exclude = [re.compile(p, flags) for p in settings.description_exclude]
        self.kernels = [re.compile(p, flags) for p in settings.prefer_kernels]

    def site_preference(self, c: SeriesCandidate) -> tuple[int, bool]:
        """Sort key of the site's preferences, best first: the first of ``prefer_kernels``
        the series' kernel matches (none: after all of them), then ``prefer_contrast``."""
        kernel = next(
            (i for i, p in enumerate(self.kernels) if p.search(c.convolution_kernel)),
            len(self.kernels),
        )
        wanted = self.settings.prefer_contrast
        return kernel, wanted != "either" and c.contrast != (wanted == "with")

    def evaluate(
        self, uid: str, instances: Sequence[InstanceHeader]
    ) -> SeriesCandidate | SeriesRejection:
        first = instances[0]
        number, description = first.series_number, first.series_description
        kept, reasons = self._header_rules(instances)
        plan: VolumePlan | None = None
        if not reasons:
            try:
                plan = plan_volume(kept, settings=self.settings.geometry)
            except (VolumeGeometryError, VolumeDecodeError) as exc:
                reasons.append(str(exc))
        if plan is not None and plan.spacing_mm[0] > self.settings.max_slice_spacing_mm:
            reasons.append(
                f"slice spacing {_mm(plan.spacing_mm[0])} > "
                f"{_mm(self.settings.max_slice_spacing_mm)} mm"
            )
        if reasons or plan is None:
            return SeriesRejection(
                series_instance_uid=uid,
                series_number=number,
                series_description=description,
                reasons=tuple(reasons),
            )
        first_kept = kept[0]
        return SeriesCandidate(
            series_instance_uid=uid,
            series_number=number,
            series_description=description,
            instances=tuple(kept),
            plan=plan,
            original_primary=all(i.is_original_primary for i in kept),
            convolution_kernel=first_kept.convolution_kernel,
            contrast=any(i.contrast for i in kept),
            left_out=len(instances) - len(kept),
        )

    def _header_rules(
        self, instances: Sequence[InstanceHeader]
    ) -> tuple[list[InstanceHeader], list[str]]:
        """Rules 1-6; return the images kept and the reasons the series fails."""
        s = self.settings
        reasons: list[str] = []
        modalities = sorted({i.modality or "(none)" for i in instances} - set(s.modalities))
        if modalities:
            reasons.append("modality " + "/".join(modalities))
        classes = sorted({i.sop_class_uid for i in instances} - set(s.sop_classes))
        if classes:
            reasons.append("SOP class " + " / ".join(UID(c).name for c in classes))

        excluded = set(s.excluded_image_types)
        kept = [i for i in instances if not excluded.intersection(i.image_type)]
        if not kept:
            hit = sorted(excluded.intersection(v for i in instances for v in i.image_type))
            reasons.append("localizer" if hit == ["LOCALIZER"] else "image type " + "/".join(hit))
            return kept, reasons
        if s.require_original_primary and not all(i.is_original_primary for i in kept):
            types = sorted({"\\".join(i.image_type[:2]) or "(none)" for i in kept})
            reasons.append(f"not ORIGINAL\\PRIMARY ({', '.join(types)})")

        first = kept[0]
        reasons += _pattern_reasons(
            "body part", first.body_part_examined, self.body_include, self.body_exclude
        )
        reasons += _pattern_reasons(
            "series description",
            first.series_description,
            self.desc_include,
            self.desc_exclude,
            free_text=True,
        )

        if not s.allow_lossy and any(i.lossy_compressed for i in kept):
            reasons.append("lossy compressed")
        syntaxes = sorted(
            {i.transfer_syntax_uid for i in kept} - DECODABLE_TRANSFER_SYNTAXES,
        )
        if syntaxes:
            names = " / ".join(UID(t).name for t in syntaxes)
            reasons.append(f"transfer syntax {names} cannot be decoded")
        if any(i.frames and i.samples_per_pixel != 1 for i in kept):
            reasons.append("not a grayscale image")

        frames = [f for i in kept for f in i.frames]
        if not frames:
            reasons.append("no image")
            return kept, reasons
        if len(frames) < s.min_slices:
            reasons.append(f"{len(frames)} slices < {s.min_slices}")
        thicknesses = [f.slice_thickness_mm for f in frames if f.slice_thickness_mm is not None]
        if thicknesses and max(thicknesses) > s.max_slice_thickness_mm:
            reasons.append(
                f"slice thickness {_mm(max(thicknesses))} > {_mm(s.max_slice_thickness_mm)} mm"
            )
        reasons += self._orientation_reasons([f.orientation for f in frames])
        return kept, reasons

    def _orientation_reasons(self, orientations: Sequence[tuple[float, ...] | None]) -> list[str]:
        """Axial within tolerance, from the normal of Image Orientation (Patient)."""
        limit = self.settings.axial_tolerance_deg
        missing = sum(o is None for o in orientations)
        if missing:
            return [f"no Image Orientation (Patient) on {missing} of {len(orientations)} images"]
        off_axis: list[tuple[float, tuple[float, float, float]]] = []
        for o in orientations:
            assert o is not None
            row, col = o[:3], o[3:]
            normal = (
                row[1] * col[2] - row[2] * col[1],
                row[2] * col[0] - row[0] * col[2],
                row[0] * col[1] - row[1] * col[0],
            )
            length = math.sqrt(sum(v * v for v in normal))
            if length < 0.5:
                return ["Image Orientation (Patient) is not two orthogonal unit vectors"]
            normal = (normal[0] / length, normal[1] / length, normal[2] / length)
            angle = math.degrees(math.acos(min(1.0, abs(normal[2]))))
            if angle > limit:
                off_axis.append((angle, normal))
        if not off_axis:
            return []
        if len(off_axis) < len(orientations):
            return [f"mixed orientations: {len(off_axis)} of {len(orientations)} images not axial"]
        angle, normal = max(off_axis)
        return [
            f"{_plane(normal)}, not axial (slice normal {angle:.1f}° from the "
            f"patient z axis, more than {limit:g}°)"
        ]


def _pattern_reasons(
    what: str,
    value: str,
    include: Sequence[re.Pattern[str]],
    exclude: Sequence[re.Pattern[str]],
    *,
    free_text: bool = False,
) -> list[str]:
    """Why ``value`` fails the patterns; a free-text value is quoted only where patient data
    may be logged."""
    quoted = f'"{value}"' if identifiers_allowed() or not free_text else ""
    shown = quoted if value else "(none)"
    what = f"{what} {shown}".rstrip()
    if include and not any(p.search(value) for p in include):
        return [f"{what} matches no include pattern"]
    for p in exclude:
        if p.search(value):
            return [f'{what} matches exclude pattern "{p.pattern}"']
    return []
